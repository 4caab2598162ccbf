"""Point one setting elsewhere for a block (e.g. a closed port), rebuilding the cached clients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from todo_cqrs.settings import settings


@contextmanager
def overridden_setting(name: str, value: str, *caches: Any) -> Iterator[None]:
    """The environment variable set for the block; the settings and the named cached clients rebuilt
    on the way in and out."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(name, value)
        settings.cache_clear()
        for cached in caches:
            cached.cache_clear()
        try:
            yield
        finally:
            patch.undo()
            settings.cache_clear()
            for cached in caches:
                cached.cache_clear()
