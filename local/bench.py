"""`make bench`: every path of the system measured next to its physical limit, in one run.

Starts its own copy of the local system beside the standard one (databases todo_bench_write and
todo_bench_read, Redis db 1, topic todo-events-bench with its own consumer group, ports 9080-9087 and
9094-9097), loads it on loopback only, bounded in count and time, prints one table and writes
bench-results.json, then stops everything it started, also on an error or Ctrl-C. Load: `wrk` (closed
loop, fixed concurrency) and an asyncio HTTP/1.1 client (open-loop paced commands, projection lag).
See README, Performance.
"""

from __future__ import annotations

import os

# The bench's own databases, Redis db, topic and ports: set before any module reads the environment.
# A WRITE_DB_URL/READ_DB_URL would win over the names and point the bench at someone's data.
for _name in ("WRITE_DB_URL", "READ_DB_URL"):
    os.environ.pop(_name, None)
os.environ.update(
    {
        "WRITE_DB_NAME": "todo_bench_write",
        "READ_DB_NAME": "todo_bench_read",
        "REDIS_URL": "redis://127.0.0.1:6379/1",
        "TODO_EVENTS_TOPIC": "todo-events-bench",
        "FUNCTIONS_BASE_PORT": "9081",
        "GATEWAY_PORT": "9080",
        "PROJECT_EVENT_URL": "http://127.0.0.1:9085",
    }
)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import sqlalchemy as sa  # noqa: E402

from local import bench_load as load  # noqa: E402
from local import bench_system as bs  # noqa: E402
from local import run, services  # noqa: E402
from local.topology import BY_NAME, HOST, REPO  # noqa: E402
from todo_cqrs.command.relay import drain_outbox  # noqa: E402
from todo_cqrs.db import write_engine  # noqa: E402
from todo_cqrs.query.handlers import encode_cursor  # noqa: E402

os.environ.setdefault("DEAD_LETTER_DIR", str(bs.BENCH_DIR / "dead-letters"))
RESULTS = REPO / "bench-results.json"
LUA_DIR = bs.BENCH_DIR / "lua"
LIMITS = {  # name: (target in local/bench_limits, port, the function whose server settings it gets)
    "limit_constant": ("constant", 9094, "get_todos"),
    "limit_redis_get": ("redis_get", 9095, "get_todos"),
    "limit_db_commit": ("db_commit", 9096, "create_todo"),
}
BYPASS_PORT = 9097  # (9092 and 9093 are Kafka and its controller)
HOT_IDS = 1000  # the cache-hit test reads these, all cached beforehand


@dataclass(frozen=True)
class Plan:
    repeats: int = 3
    duration_s: float = 5.0
    query_connections: int = 16
    command_connections: int = 8
    paced_rates: tuple[int, ...] = (50, 100, 200)
    paced_s: float = 10.0
    backlog: int = 10_000
    small: int = 10_000
    large: int = 1_000_000


QUICK = Plan(repeats=1, duration_s=2.0, paced_rates=(50, 200), paced_s=4.0, backlog=2000, large=100_000)


@dataclass(frozen=True)
class Row:
    path: str
    figure: str
    limit: str
    ratio: str
    target: str
    verdict: str


def _fmt(series: load.Series) -> str:
    return f"{series.rps:.0f} req/s, p50 {series.p50_ms:.1f} ms, p99 {series.p99_ms:.1f} ms"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


class Bench:
    def __init__(self, plan: Plan, system: bs.BenchSystem) -> None:
        self.plan = plan
        self.system = system
        self.results: dict[str, Any] = {}
        self.rows: list[Row] = []

    def series(self, name: str, url: str, lua: str, connections: int, **kwargs: Any) -> load.Series:
        bs.say(f"{name}: {self.plan.repeats} x {self.plan.duration_s:.0f} s at {connections} connections")
        result = load.wrk_series(
            url,
            lua,
            LUA_DIR,
            connections=connections,
            repeats=self.plan.repeats,
            duration_s=self.plan.duration_s,
            **kwargs,
        )
        bs.say(f"{name}: {_fmt(result)}, {result.errors} errors")
        self.results[name] = result.as_dict()
        return result

    # 1 and 2: the query side --------------------------------------------------------------------------
    def queries(self) -> None:
        p, c = self.plan, self.plan.query_connections
        get_url = self.system.url("get_todos")
        limit_const = self.series("limit_constant", self.system.url("limit_constant"), "", c)
        limit_redis = self.series("limit_redis_get", self.system.url("limit_redis_get"), "", c)
        warm = load.lua_get_sequence(1, HOT_IDS)
        load.wrk_series(get_url, warm, LUA_DIR, connections=c, repeats=1, duration_s=2, warmup_s=0)
        hit = self.series("query_hit", get_url, load.lua_get_random(1, HOT_IDS), c)
        miss = self.series(
            "query_miss", get_url, load.lua_get_sequence(1, p.small), c, before_each=bs.flush_cache
        )
        bypass = self.series(
            "query_bypass", self.system.url("get_todos_bypass"), load.lua_get_random(1, p.small), c
        )
        self.results["scale_get_small"] = self.results["query_bypass"]
        hit_ratio = hit.rps / limit_redis.rps
        self.rows += [
            Row("limit: bare function", _fmt(limit_const), "-", "-", "-", "-"),
            Row("limit: + Redis GET", _fmt(limit_redis), "-", "-", "-", "-"),
            Row(
                "GET /{id} cache hit",
                _fmt(hit),
                f"{limit_redis.rps:.0f} req/s",
                f"{hit_ratio:.2f}",
                ">= 0.70",
                _verdict(hit_ratio >= 0.70),
            ),  # fmt: skip
            Row(
                "GET /{id} cache miss",
                _fmt(miss),
                f"{limit_redis.rps:.0f} req/s",
                f"{miss.rps / limit_redis.rps:.2f}",
                "-",
                "-",
            ),  # fmt: skip
            Row(
                "GET /{id} bypass (no Redis)",
                _fmt(bypass),
                f"{limit_redis.rps:.0f} req/s",
                f"{bypass.rps / limit_redis.rps:.2f}",
                "-",
                "-",
            ),  # fmt: skip
            Row(
                "cache gain (hit vs miss, bypass)",
                f"x{hit.rps / miss.rps:.2f}, x{hit.rps / bypass.rps:.2f}",
                "-",
                "-",
                "-",
                "-",
            ),  # fmt: skip
        ]
        gain = {"hit_vs_miss": hit.rps / miss.rps, "hit_vs_bypass": hit.rps / bypass.rps}
        self.results["cache_gain"] = gain

    # 3: the command side ----------------------------------------------------------------------------
    def commands(self) -> None:
        c = self.plan.command_connections
        limit = self.series("limit_db_commit", self.system.url("limit_db_commit"), "", c)
        create = self.series(
            "command_create", self.system.url("create_todo"), load.lua_post_json({"title": "bench"}), c
        )
        last = _max_todo_id()
        patch = self.series(
            "command_patch", self.system.url("update_todo"), load.lua_patch_random(bs.API_ID_BASE, last), c
        )
        self.rows.append(Row("limit: + write-DB commit", _fmt(limit), "-", "-", "-", "-"))
        for name, series in (("POST / create_todo", create), ("PATCH /{id} update_todo", patch)):
            ratio = series.rps / limit.rps
            self.rows.append(
                Row(
                    f"{name} (c={c})",
                    _fmt(series),
                    f"{limit.rps:.0f} req/s",
                    f"{ratio:.2f}",
                    ">= 0.50",
                    _verdict(ratio >= 0.50),
                )  # fmt: skip
            )
        bs.say(f"waiting for the projection to catch up ({bs.wait_until_projected():.1f} s)")

    # 4: projection lag and drain ------------------------------------------------------------------------
    def projection(self) -> None:
        ports = {
            "create": BY_NAME["create_todo"].port,
            "update": BY_NAME["update_todo"].port,
            "get": BY_NAME["get_todos"].port,
        }
        for rate in self.plan.paced_rates:
            bs.say(f"paced commands: {rate}/s for {self.plan.paced_s:.0f} s, each read back with min_version")
            paced = asyncio.run(load.paced_commands(HOST, ports, rate, self.plan.paced_s)).summary()
            self.results[f"paced_{rate}"] = paced
            bs.say(f"paced {rate}/s: {paced}")
            bs.wait_until_projected()
            figure = f"p50 {paced['lag_p50_ms']:.0f} ms, p99 {paced['lag_p99_ms']:.0f} ms"
            target = ok = None
            if rate == 50:
                target, ok = "p99 < 250 ms", paced["lag_p99_ms"] < 250
            self.rows.append(
                Row(
                    f"projection lag @{rate} cmd/s",
                    figure,
                    "-",
                    "-",
                    target or "-",
                    _verdict(ok) if ok is not None else "-",
                )  # fmt: skip
            )
            command = f"p50 {paced['command_p50_ms']:.1f} ms, p99 {paced['command_p99_ms']:.1f} ms"
            target = ok = None
            if rate == 100:
                target, ok = "p99 < 25 ms", paced["command_p99_ms"] < 25
            self.rows.append(
                Row(
                    f"command latency @{rate} cmd/s (open loop)",
                    command,
                    "-",
                    "-",
                    target or "-",
                    _verdict(ok) if ok is not None else "-",
                )  # fmt: skip
            )
        self.drain()

    def drain(self) -> None:
        n = self.plan.backlog
        self.system.stop_kafkasource()
        ids = bs.insert_backlog(n)
        started = time.monotonic()
        # The relay's tick may publish some (or all) of them first: wait until none is pending.
        while bs.pending_events():
            if time.monotonic() - started > 120:
                raise RuntimeError("the backlog was not published to Kafka within 120 s")
            drain_outbox(lock_wait_s=30, publish_timeout_s=30)
        bs.say(f"backlog: {n} events on the topic after {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        self.system.start_kafkasource()
        first_seen = first_count = None
        count = 0
        while count < n:
            if time.monotonic() - started > 300:
                raise RuntimeError(f"the backlog did not drain within 300 s ({count}/{n})")
            time.sleep(0.05)
            count = bs.count_read(ids)
            if first_seen is None and count:
                first_seen, first_count = time.monotonic(), count
        ended = time.monotonic()
        assert first_seen is not None and first_count is not None
        rate = (n - first_count) / max(ended - first_seen, 1e-6)
        self.results["drain"] = {
            "events": n,
            "events_per_s": round(rate, 1),
            "seconds_from_source_start": round(ended - started, 2),
            "seconds_to_first_event": round(first_seen - started, 2),
        }
        self.rows.append(
            Row(
                f"drain {n} events (KafkaSource)",
                f"{rate:.0f} events/s",
                "-",
                "-",
                "-",
                f"({ended - started:.1f} s incl. start)",
            )  # fmt: skip
        )

    # 5: scale -------------------------------------------------------------------------------------------
    def scale(self) -> None:
        p, c = self.plan, self.plan.query_connections
        url = self.system.url("get_todos_bypass")
        small_list = self.series("scale_list_small", url, _deep_pages(p.small), c)
        bs.say(f"seeding the read DB up to {p.large} todos ...")
        took = bs.seed_read_model(p.small + 1, p.large)
        bs.say(f"seeded in {took:.1f} s")
        self.results["seed_seconds"] = round(took, 1)
        large_get = self.series("scale_get_large", url, load.lua_get_random(1, p.large), c)
        large_list = self.series("scale_list_large", url, _deep_pages(p.large), c)
        small_get = load.Series(**{**self.results["scale_get_small"], "runs": []})
        pairs = (("GET /{id}", small_get, large_get), ("deep list page", small_list, large_list))
        for what, small, large in pairs:
            ratio = large.p50_ms / small.p50_ms
            self.rows.append(
                Row(
                    f"scale {what}, {p.small:,} -> {p.large:,} rows",
                    f"p50 {small.p50_ms:.2f} -> {large.p50_ms:.2f} ms",
                    "-",
                    f"{ratio:.2f}",
                    "<= 1.5",
                    _verdict(ratio <= 1.5),
                )  # fmt: skip
            )

    # 6: memory -------------------------------------------------------------------------------------------
    def memory(self, peaks: dict[str, dict[str, Any]]) -> None:
        self.results["memory"] = peaks
        for name in BY_NAME:
            peak = peaks[name]
            self.rows.append(
                Row(
                    f"memory {name} (largest of {peak['processes']} processes)",
                    f"peak RSS {peak['peak_process_rss_mb']:.0f} MB; all: RSS {peak['peak_rss_mb']:.0f},"
                    f" PSS {peak['peak_pss_mb']:.0f} MB",
                    "-",
                    "-",
                    "< 150 MB",
                    _verdict(peak["peak_process_rss_mb"] < 150),
                )  # fmt: skip
            )


def _max_todo_id() -> int:
    with write_engine().connect() as conn:
        return int(conn.execute(sa.text("SELECT MAX(id) FROM todos")).scalar() or bs.API_ID_BASE)


def _deep_pages(rows: int) -> str:
    """A page of 20 with a cursor among the last thousand seeded todos."""
    return load.lua_get_paths([f"/?limit=20&cursor={encode_cursor(rows - k)}" for k in range(40, 1000, 5)])


def print_table(rows: list[Row]) -> str:
    header = Row("path", "figure", "limit", "ratio", "target", "verdict")
    widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in Row.__dataclass_fields__]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = [getattr(row, f).ljust(w) for f, w in zip(Row.__dataclass_fields__, widths, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), "?"
    )  # fmt: skip
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_generator": f"{wrk.split(' Copyright')[0]} (closed loop); asyncio HTTP/1.1 client (paced)",
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short repeat each, 100k rows (a smoke run)")
    parser.add_argument("--output", default=str(RESULTS), help="the JSON results file")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    load.require_wrk()
    bs.check_isolated()
    # SIGTERM ends the run like Ctrl-C does: through the finally below.
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.monotonic()
    services_before = services.running_services()
    system = bs.BenchSystem()
    sampler: bs.MemorySampler | None = None
    try:
        bs.say("services (shared, reused) and the bench's databases, Redis db, topic ...")
        services.ensure_services()
        bs.migrate()
        bs.reset_data()
        services.ensure_services()  # creates the bench topic again
        bs.say(f"seeding {plan.small} todos into the read DB ...")
        bs.seed_read_model(1, plan.small)
        system.start(LIMITS, BYPASS_PORT)
        sampler = bs.MemorySampler(system.servers)
        sampler.start()
        bench = Bench(plan, system)
        bench.queries()
        bench.commands()
        bench.projection()
        bench.scale()
        bench.memory(sampler.stop())
        elapsed = time.monotonic() - started
        table = print_table(bench.rows)
        print(table, flush=True)
        output = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "plan": plan.__dict__,
            "server_env": run.SERVER_ENV,
            "seconds": round(elapsed, 1),
            "table": [row.__dict__ for row in bench.rows],
            "results": bench.results,
        }
        Path(args.output).write_text(json.dumps(output, indent=2) + "\n")
        bs.say(f"done in {elapsed:.0f} s; results in {args.output}")
        return 0
    except KeyboardInterrupt:
        bs.say("interrupted")
        return 130
    finally:
        bs.say("stopping the bench's processes ...")
        # Each step on its own: a failing one must not leave the bench's processes running.
        for step in (
            lambda: sampler and sampler.stop(),
            system.stop,
            bs.truncate_read_model,  # a million rows are of no use to anyone once the run is over
            lambda: _stop_services_started_here(services_before),
            _check_ports_free,
        ):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - report it and go on cleaning up
                bs.say(f"cleanup step failed: {exc!r}")


def _stop_services_started_here(before: list[str]) -> None:
    started_here = [name for name in services.running_services() if name not in before]
    if started_here:
        services.stop_services(started_here)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_ports_free() -> None:
    urls = [f.url for f in BY_NAME.values()] + [f"http://{HOST}:{p}" for _, p, _ in LIMITS.values()]
    for url in [*urls, f"http://{HOST}:{BYPASS_PORT}"]:
        parts = urlsplit(url)
        with socket.socket() as probe:
            if probe.connect_ex((parts.hostname or HOST, parts.port or 80)) == 0:
                bs.say(f"warning: something still listens on {url}")


if __name__ == "__main__":
    sys.exit(main())
