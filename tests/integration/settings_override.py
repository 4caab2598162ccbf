"""Point one setting elsewhere for a block (e.g. a closed port), rebuilding what was made from it.

The engines and Redis clients of the core are made once per event loop (todo_cqrs/loop_local.py), so
an override names the loop-local factories it affects and the loops to rebuild them in: a test's
runner (`lambda fn: run(fn())`) and an in-process function's loop (its TestClient's `portal.call`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from todo_cqrs.adapters.cache import TodoCache
from todo_cqrs.loop_local import LoopLocal
from todo_cqrs.settings import settings

T = TypeVar("T")
# The session's runner (the `run` fixture): runs a coroutine on the loop every direct call shares.
Run = Callable[[Coroutine[Any, Any, T]], T]
# Runs an async function on one event loop and returns its result.
InLoop = Callable[[Callable[[], Awaitable[Any]]], Any]


async def close_and_forget(*factories: LoopLocal[Any]) -> None:
    """Close this loop's instances of the factories (an engine's pool, a cache's Redis connections);
    their next use makes new ones."""
    for factory in factories:
        instance = factory.peek()
        if instance is None:
            continue
        factory.forget()
        if isinstance(instance, AsyncEngine):
            await instance.dispose()
        elif isinstance(instance, TodoCache):
            await instance.aclose()


@contextmanager
def overridden_setting(
    name: str, value: str, *factories: LoopLocal[Any], loops: Sequence[InLoop] = ()
) -> Iterator[None]:
    """The environment variable set for the block; the settings, and the factories' instances on each
    of `loops`, rebuilt on the way in and out."""

    def rebuild() -> None:
        settings.cache_clear()
        for in_loop in loops:
            in_loop(lambda: close_and_forget(*factories))

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(name, value)
        rebuild()
        try:
            yield
        finally:
            patch.undo()
            rebuild()
