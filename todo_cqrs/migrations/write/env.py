"""Alembic environment of the write database."""

from alembic import context

from todo_cqrs.migrations import run_online

run_online(context)
