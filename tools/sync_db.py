"""Plain synchronous engines on the system's databases, for tests and the bench that look at the rows
themselves (the product's engines are asyncio, one per event loop; a test reading rows needs neither)."""

from __future__ import annotations

from functools import cache

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from todo_cqrs.db import driver_url
from todo_cqrs.settings import settings


@cache
def write_db() -> Engine:
    return sa.create_engine(driver_url(settings().write_db_url, "pymysql"), pool_pre_ping=True)


@cache
def read_db() -> Engine:
    return sa.create_engine(driver_url(settings().read_db_url, "pymysql"), pool_pre_ping=True)
