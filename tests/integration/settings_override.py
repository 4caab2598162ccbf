"""The types of the integration tests' event-loop fixtures (tests/integration/conftest.py).

A setting is changed by building a function's dependencies from changed settings
(`bootstrap.queries(replace(settings(), redis_url=...))`): nothing made from the settings lives in a
module to be rebuilt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
# The session's runner (the `run` fixture): runs a coroutine on the loop every direct call shares.
Run = Callable[[Coroutine[Any, Any, T]], T]
# Runs an async function on one event loop and returns its result.
InLoop = Callable[[Callable[[], Awaitable[Any]]], Any]
