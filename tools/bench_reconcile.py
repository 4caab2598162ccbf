"""`python -m tools.bench_reconcile`: what a reconciliation pass costs (docs/reconciliation.md).

In databases of its own (todo_reconcile_bench_write and _read, dropped at the end), filled with bulk
SQL (INSERT ... SELECT from MariaDB's sequence engine, seconds for a million rows):
- a clean pass over 10,000 and over 1,000,000 todos: time, todos per second, the pass's CPU (this
  process, and the MariaDB server's), and this process's peak RSS after each (flat: not O(rows));
- a pass that finds and repairs 1,000 drifted rows among 1,000,000 (missing, different, higher
  versions, extra).
Run it alone (it loads the shared MariaDB for a minute), under the tests' lock where others test.
"""

from __future__ import annotations

import os

os.environ.update(
    {
        "WRITE_DB_NAME": "todo_reconcile_bench_write",
        "READ_DB_NAME": "todo_reconcile_bench_read",
        "REDIS_URL": "redis://127.0.0.1:6379/2",
    }
)
for _name in ("WRITE_DB_URL", "READ_DB_URL"):
    os.environ.pop(_name, None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import sqlalchemy as sa  # noqa: E402

from todo_cqrs.bootstrap import todo_cache  # noqa: E402
from todo_cqrs.migrations import upgrade  # noqa: E402
from todo_cqrs.reconcile.passes import Reconciler  # noqa: E402
from todo_cqrs.reconcile.service import batch_engine  # noqa: E402
from todo_cqrs.settings import settings  # noqa: E402
from tools import services  # noqa: E402
from tools.bench_system import cpu_seconds  # noqa: E402
from tools.sync_db import read_db, write_db  # noqa: E402

WRITE, READ = "todo_reconcile_bench_write", "todo_reconcile_bench_read"
COLUMNS = "id, title, description, status, version, created_at, updated_at"


def say(message: str) -> None:
    print(f"[bench-reconcile] {message}", file=sys.stderr, flush=True)


def mariadb_cpu_s() -> float | None:
    """The MariaDB server's CPU time so far (user + system), when this machine runs it."""
    pid = services._running_pid("mariadb")
    return None if pid is None else cpu_seconds(pid)


def seed(count: int) -> None:
    """`count` todos in the write model and the same rows in the read model, by bulk SQL."""
    with write_db().begin() as conn:
        conn.execute(sa.text("TRUNCATE TABLE todos"))
        conn.execute(
            sa.text(
                "INSERT INTO todos (id, title, description, status, version, created_at, updated_at) "
                "SELECT seq, CONCAT('bench todo ', seq), IF(seq % 3 = 0, 'with a description', ''), "
                "'CREATED', 1 + seq % 5, '2026-01-01 00:00:00.000', '2026-01-01 00:00:00.000' + "
                f"INTERVAL seq SECOND FROM seq_1_to_{count}"
            )
        )
    with read_db().begin() as conn:
        conn.execute(sa.text("TRUNCATE TABLE todos_view"))
        conn.execute(
            sa.text(f"INSERT INTO todos_view ({COLUMNS}, deleted) SELECT {COLUMNS}, 0 FROM {WRITE}.todos")
        )


def drift(count: int, among: int) -> None:
    """`count` drifted rows spread over the ids: a quarter each missing, different, higher, extra."""
    step = among // count
    ids = [1 + k * step for k in range(count)]
    quarter = count // 4

    def among(statement: str) -> sa.TextClause:
        return sa.text(statement + " WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True))

    with read_db().begin() as conn:
        conn.execute(among("DELETE FROM todos_view"), {"ids": ids[:quarter]})
        conn.execute(among("UPDATE todos_view SET title = 'drifted'"), {"ids": ids[quarter : 2 * quarter]})
        conn.execute(
            among("UPDATE todos_view SET version = version + 1000"), {"ids": ids[2 * quarter : 3 * quarter]}
        )
    with write_db().begin() as conn:  # the extra rows: deleted from the write model (assigned ids)
        conn.execute(among("DELETE FROM todos"), {"ids": ids[3 * quarter :]})


async def one_pass() -> dict[str, Any]:
    s = settings()
    write, read = batch_engine(s.write_db_url), batch_engine(s.read_db_url)
    cache = todo_cache(s)
    try:
        reconciler = Reconciler(write, read, cache, grace_s=0, count_metrics=False)
        cpu_before, server_before = time.process_time(), mariadb_cpu_s()
        started = time.perf_counter()
        report = await reconciler.run_pass()
        seconds = time.perf_counter() - started
        server_after = mariadb_cpu_s()
        return {
            "todos": report.todos,
            "seconds": round(seconds, 3),
            "todos_per_second": round(report.todos / seconds) if seconds else None,
            "cpu_seconds": round(time.process_time() - cpu_before, 3),
            "mariadb_cpu_seconds": round(server_after - server_before, 3)
            if server_before is not None and server_after is not None
            else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "leaves": report.leaves,
            "drift": dict(report.drift),
            "repaired": dict(report.repaired),
        }
    finally:
        await cache.aclose()
        await write.dispose()
        await read.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--output", default="bench-reconcile.json")
    args = parser.parse_args()
    services.ensure_services()
    upgrade()
    results: dict[str, Any] = {}
    try:
        for name, count in (("clean_10k", 10_000), ("clean_large", args.large)):
            say(f"seeding {count:,} todos ...")
            seed(count)
            say(f"clean pass over {count:,} todos ...")
            results[name] = asyncio.run(one_pass())
            say(json.dumps(results[name]))
        say("1,000 drifted rows among them ...")
        drift(1000, args.large)
        results["repair_1000"] = asyncio.run(one_pass())
        say(json.dumps(results["repair_1000"]))
        results["clean_after_repair"] = asyncio.run(one_pass())
        say(json.dumps(results["clean_after_repair"]))
    finally:
        with write_db().begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {READ}"))
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {WRITE}"))
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
