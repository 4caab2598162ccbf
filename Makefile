# The project's commands. Two do all the set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FN ?= create_todo
# Tools act as the admin (DB user todo, Redis user default) with the generated local secrets.
ADMIN := $(PY) -m tools.credentials --

.PHONY: help install services services-down services-status migrate run func-run test test-unit lint \
        format bench soak relay-once rebuild reconcile sql dead-letters dead-letters-resend consume clean

help:  ## list the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 22

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(STAMP)  ## create .venv with the pinned dependencies

services: $(STAMP)  ## start (or reuse) local MariaDB, Redis and Kafka
	$(PY) -m tools.services start

services-down: $(STAMP)  ## stop the local services this project started
	$(PY) -m tools.services stop

services-status: $(STAMP)  ## show the local services
	$(PY) -m tools.services status

migrate: services  ## apply the schema migrations of both databases, then the role users' grants
	$(ADMIN) $(PY) -m todo_cqrs.migrations upgrade
	$(PY) -m tools.services roles

run: $(STAMP)  ## run the whole system in the foreground (Ctrl-C stops it)
	$(PY) -m tools.run

func-run: migrate  ## run one function alone on its local port: make func-run FN=get_todos
	$(PY) -m tools.func_run $(FN)

test: $(STAMP)  ## every test: unit, integration (real MariaDB, Redis, Kafka), end to end
	$(PY) -m pytest

test-unit: $(STAMP)  ## only the tests that need no service
	$(PY) -m pytest tests/unit

lint: $(STAMP)  ## ruff (lint and format check) and mypy on the core
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## what the README's table and docs/performance.md report, the soak included
	$(PY) -m tools.bench

soak: $(STAMP)  ## only the soak: 3 minutes of 250 commands/s + 600 reads/s, open loop
	$(PY) -m tools.bench --soak

relay-once: migrate  ## publish every pending outbox event now
	$(ADMIN) $(PY) -m todo_cqrs.outbox.relay

rebuild: migrate  ## rebuild the read model from the write model's state into a shadow table, swapped in
	$(ADMIN) $(PY) -m todo_cqrs.projection.rebuild

reconcile: migrate  ## one reconciliation pass now: what differs between the models, and what it repaired
	$(ADMIN) $(PY) -m todo_cqrs.reconcile

DB ?= write
sql: $(STAMP)  ## admin SQL shell on the local database: make sql DB=read|write (statements from stdin too)
	@$(ADMIN) $(PY) -m tools.sql_shell $(DB)

dead-letters: $(STAMP)  ## list the events the KafkaSource could not deliver
	$(PY) -m todo_cqrs.dead_letter list

dead-letters-resend: $(STAMP)  ## re-send dead letters to project_event
	$(PY) -m todo_cqrs.dead_letter resend

consume: $(STAMP)  ## print the events on the topic, from the beginning (Ctrl-C stops)
	$(PY) -m tools.consume

clean: services-down  ## stop the services and delete .local (data) and .venv
	rm -rf .local $(VENV)

-include mk/deploy.mk
