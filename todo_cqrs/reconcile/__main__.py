"""`python -m todo_cqrs.reconcile` (`make reconcile`): one pass now, and what it found and repaired."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from todo_cqrs import bootstrap, logs
from todo_cqrs.settings import settings


async def _once() -> dict[str, Any]:
    tick = bootstrap.reconcile(settings())
    try:
        return await tick.run()
    finally:
        await tick.aclose()


def summary(result: dict[str, Any]) -> str:
    drift, repaired = result["drift"], result["repaired"]
    kinds = ", ".join(f"{kind} {drift[kind]} (repaired {repaired[kind]})" for kind in drift)
    return (
        f"reconcile: {result['todos']:,} todos compared in {result['seconds']:.2f} s; drift: {kinds}; "
        f"in flight (younger than the grace period): {result['in_flight']}; "
        f"changed during the pass: {result['changed_meanwhile']}; "
        f"outbox rows pruned: {result['outbox_rows_pruned']}"
    )


if __name__ == "__main__":
    outcome = asyncio.run(_once())
    logs.flush()
    print(json.dumps(outcome))
    print(summary(outcome), file=sys.stderr)
