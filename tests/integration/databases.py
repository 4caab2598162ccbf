"""The databases as the tests reach them directly (the admin user of the local settings), an engine per
event loop, closed with the loop's other resources (todo_cqrs/loop_local.close_loop_resources)."""

from __future__ import annotations

from functools import cache

from todo_cqrs.db import Database
from todo_cqrs.settings import settings


@cache
def write_db() -> Database:
    return Database.write(settings())


@cache
def read_db() -> Database:
    return Database.read(settings())
