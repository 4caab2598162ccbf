"""One instance per event loop: the process's connections (engines, Redis, the publisher's task).

A function process runs one loop for its lifetime, so this is "once per process" there. Tests and
command-line tools run a loop per `asyncio.run`, and an asyncio connection must never outlive its loop.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_every: list[LoopLocal[Any]] = []


class LoopLocal(Generic[T]):
    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, factory)
        _every.append(self)

    def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        value = self._by_loop.get(loop)
        if value is None:
            value = self._by_loop[loop] = self._factory()
        return value

    def peek(self) -> T | None:
        """This loop's instance if one was made, without making it."""
        try:
            return self._by_loop.get(asyncio.get_running_loop())
        except RuntimeError:
            return None

    def forget(self) -> None:
        """Drop this loop's instance (after closing it); the next call makes a new one."""
        self._by_loop.pop(asyncio.get_running_loop(), None)


def loop_local(factory: Callable[[], T]) -> LoopLocal[T]:
    return LoopLocal(factory)


async def close_loop_resources() -> None:
    """Close what this loop made (engines, Redis clients, tasks), before the loop itself closes:
    a test's loop, a command-line tool's `asyncio.run`."""
    for local in reversed(_every):  # the users first (a publisher's task), then what they use (engines)
        value = local.peek()
        if value is None:
            continue
        local.forget()
        for name in ("dispose", "aclose", "close"):
            closer = getattr(value, name, None)
            if closer is not None:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
                break
