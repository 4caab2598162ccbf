"""Alembic environment of the read database."""

from alembic import context

from todo_cqrs.migrations import run_online

run_online(context)
