"""`make bench`: every path of the system measured next to its physical limit, in one run; `make soak`:
the sustained mixed load alone.

Starts its own copy of the local system beside the standard one (databases todo_bench_write and
todo_bench_read, Redis db 1, topic todo-events-bench with its own consumer group, ports 9080-9091 and
9101-9107), loads it on loopback only, bounded in count and time, prints the tables and writes
bench-results.json (the soak alone: bench-results-soak.json), then stops everything it started, also on
an error, Ctrl-C or SIGTERM.
Load: `wrk` (closed loop, fixed concurrency) and an asyncio HTTP/1.1 client (open loop: paced commands,
read-your-writes, the soak). Method and history: docs/performance.md.
"""

from __future__ import annotations

import os

# The bench's own databases, Redis db, topic and ports: set before any module reads the environment.
# A WRITE_DB_URL/READ_DB_URL would win over the names and point the bench at someone's data; an OTLP
# endpoint or METRICS_ENABLED from the shell would change what "default" measures.
for _name in (
    "WRITE_DB_URL",
    "READ_DB_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "METRICS_ENABLED",
    "KAFKA_SOURCE_FILE",
    "LOCAL_KAFKASOURCE_IN_FLIGHT",
):
    os.environ.pop(_name, None)
os.environ.update(
    {
        "WRITE_DB_NAME": "todo_bench_write",
        "READ_DB_NAME": "todo_bench_read",
        "REDIS_URL": "redis://127.0.0.1:6379/1",
        "TODO_EVENTS_TOPIC": "todo-events-bench",
        "FUNCTIONS_BASE_PORT": "9081",
        "GATEWAY_PORT": "9080",
        "KAFKASOURCE_METRICS_PORT": "9088",
        "PROJECT_EVENT_URL": "http://127.0.0.1:9085",
    }
)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from todo_cqrs.query.handlers import encode_cursor  # noqa: E402
from tools import bench_load as load  # noqa: E402
from tools import bench_system as bs  # noqa: E402
from tools import deploy_tools, kafkasource, queue_proxy, run, services  # noqa: E402
from tools.topology import BY_NAME, FUNCTIONS, GATEWAY_PORT, HOST, KAFKASOURCE_METRICS_PORT, REPO  # noqa: E402

os.environ.setdefault("DEAD_LETTER_DIR", str(bs.BENCH_DIR / "dead-letters"))
RESULTS = REPO / "bench-results.json"
SOAK_RESULTS = REPO / "bench-results-soak.json"
LUA_DIR = bs.BENCH_DIR / "lua"

# Ports past the local system's 9080-9091 (functions, KafkaSource metrics, pipeline page, reconcile, issuer;
# 9092 and 9093 are Kafka's). 9101-9103 are used in turn: the sync limits, the observability variants,
# then the cold starts.
SPARE_PORT = 9101
SYNC_LIMITS = {  # name: (target in tools/bench_limits/sync_main.py, port, gunicorn threads)
    "sync_constant": ("constant", 9101, 16),
    "sync_redis_get": ("redis_get", 9102, 16),
    "sync_db_commit": ("db_commit", 9103, 8),
}
ASYNC_LIMITS = {  # name: (target in tools/bench_limits/main.py, port)
    "async_constant": ("constant", 9104),
    "async_redis_get": ("redis_get", 9105),
    "async_db_commit": ("db_commit", 9106),
}
NO_METRICS_PORT, OTLP_SINK_PORT, TRACED_PORT = 9101, 9102, 9103
BYPASS_PORT = 9107
HOT_IDS = 1000  # the cache-hit loads read these, all cached beforehand

TARGET_HIT = 0.70
TARGET_COMMAND = 0.50
TARGET_COMMAND_P99_MS, TARGET_COMMAND_P99_AT = 25.0, 200
TARGET_RYW_P99_MS, TARGET_RYW_AT = 50.0, 100
TARGET_DRAIN = 2000.0
TARGET_RSS_MB = 150.0
TARGET_SOAK_LAG_MS = 1000.0
TARGET_SOAK_GROWTH_MB = 10.0
TARGET_SCALE = 1.5
SOAK_CATCH_UP_S = 60  # how long the bench waits for the read model after the soak, at most
TARGET_CPU_MS = {"create": 3.0, "patch": 4.0}  # machine CPU per command, end to end
EFFICIENCY_IDLE_S, EFFICIENCY_SATURATED_S, EFFICIENCY_PACED_S, EFFICIENCY_RATE = 10.0, 8.0, 10.0, 100
QUEUE_PROXY_NOT_BUILT = "queue-proxy: not built (make verify-deploy builds it)"


@dataclass(frozen=True)
class Plan:
    repeats: int = 3
    duration_s: float = 3.0
    warmup_s: float = 1.0
    query_connections: int = 16
    command_connections: int = 8
    paced_rates: tuple[int, ...] = (TARGET_RYW_AT, TARGET_COMMAND_P99_AT)
    paced_s: float = 8.0
    backlog: int = 10_000
    small: int = 10_000
    large: int = 1_000_000
    cold_repeats: int = 3
    soak: load.SoakPlan = load.SoakPlan()
    soak_warmup_s: float = 3.0


QUICK = Plan(
    repeats=1,
    duration_s=1.0,
    paced_s=3.0,
    backlog=1000,
    large=100_000,
    cold_repeats=1,
    soak=replace(load.SoakPlan(), duration_s=10.0),
    soak_warmup_s=1.0,
)


@dataclass(frozen=True)
class Row:
    path: str
    figure: str
    limit: str = "-"
    ratio: str = "-"
    target: str = "-"
    verdict: str = "-"


def _fmt(series: load.Series) -> str:
    return f"{series.rps:.0f} req/s, p50 {series.p50_ms:.1f} ms, p99 {series.p99_ms:.1f} ms"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _rps(series: load.Series) -> str:
    return f"{series.rps:.0f} req/s"


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


# --- queue-proxy ---------------------------------------------------------------------------------------


def queue_proxy_available() -> str | None:
    """None when the cached queue-proxy binary (tools/deploy_tools.py) is there; else why not (the bench
    does not start a build in the middle of a run)."""
    return None if deploy_tools.TOOLS["queue-proxy"].cached_path().exists() else QUEUE_PROXY_NOT_BUILT


@contextlib.contextmanager
def behind_queue_proxy(user_port: int, service: str) -> Iterator[str]:
    """Knative's queue-proxy in front of 127.0.0.1:user_port, configured as in a pod of Knative Service
    `service`; yields the URL that reaches the function through it."""
    with queue_proxy.start_queue_proxy(user_port, service) as proxy:
        yield proxy.url


# --- the bench ----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan, system: bs.BenchSystem) -> None:
        self.plan = plan
        self.system = system
        self.results: dict[str, Any] = {"loadavg": {"start": loadavg()}, "phase_seconds": {}}
        self._phase: str | None = None
        self._phase_started = time.monotonic()
        self.rows: list[Row] = []
        self.per_function: dict[str, dict[str, Any]] = {name: {} for name in BY_NAME}
        self.soak_result: dict[str, Any] | None = None
        self.service_pids = {svc.name: svc.pid for svc in services.status() if svc.pid}

    def mark(self, phase: str) -> None:
        self.system.check_alive()
        now = time.monotonic()
        if self._phase is not None:
            self.results["phase_seconds"][self._phase] = round(now - self._phase_started, 1)
        self._phase, self._phase_started = phase, now
        self.results["loadavg"][phase] = loadavg()
        bs.say(f"--- {phase} (load average {' '.join(loadavg())})")

    def compare(self, loads: dict[str, load.Load]) -> dict[str, load.Series]:
        """Closed-loop loads measured round-robin (docs/performance.md: method)."""
        p = self.plan
        names = ", ".join(loads)
        bs.say(f"{names}: {p.repeats} x {p.duration_s:.0f} s each, interleaved")
        result = load.wrk_interleaved(
            loads,
            LUA_DIR,
            repeats=p.repeats,
            duration_s=p.duration_s,
            warmup_s=p.warmup_s,
            cpu_sample=self.cpu_sample,
        )
        for name, series in result.items():
            bs.say(f"  {name}: {_fmt(series)}, {series.errors} errors")
            self.results[name] = series.as_dict()
        return result

    def url(self, name: str) -> str:
        return self.system.url(name)

    def cpu_sample(self) -> dict[str, float]:
        """Cumulative CPU seconds of every process that serves the bench's requests, the shared services
        (which other work on the machine uses too), wrk, the bench itself, and the machine as a whole."""
        sample = {name: bs.cpu_seconds(server.pid) for name, server in list(self.system.servers.items())}
        if self.system.kafkasource_pid is not None:
            sample["kafkasource"] = bs.cpu_seconds(self.system.kafkasource_pid)
        for name, pid in self.service_pids.items():
            sample[f"{name} (shared)"] = bs.cpu_seconds(pid)
        sample["wrk"] = bs.children_cpu_seconds()
        sample["bench client"] = time.process_time()
        sample["machine"] = bs.machine_busy_seconds()
        return sample

    def warm_hot_ids(self) -> None:
        c = self.plan.query_connections
        warm = load.Load(self.url("get_todos"), load.lua_get_sequence(1, HOT_IDS), c)
        load.wrk_interleaved({"warm": warm}, LUA_DIR, repeats=1, duration_s=2, warmup_s=0)

    # limits and the query side --------------------------------------------------------------------------
    def queries(self) -> None:
        self.mark("queries")
        p, c = self.plan, self.plan.query_connections
        self.warm_hot_ids()
        hot = load.lua_get_random(1, HOT_IDS)
        s = self.compare(
            {
                "sync_constant": load.Load(self.url("sync_constant"), "", c),
                "sync_redis_get": load.Load(self.url("sync_redis_get"), "", c),
                "async_constant": load.Load(self.url("async_constant"), "", c),
                "async_redis_get": load.Load(self.url("async_redis_get"), "", c),
                "query_hit": load.Load(self.url("get_todos"), hot, c),
                "gateway_hit": load.Load(self.url("gateway"), load.lua_get_random(1, HOT_IDS, "/todo/"), c),
            }
        )
        s |= self.compare(
            {
                "query_miss": load.Load(
                    self.url("get_todos"), load.lua_get_sequence(1, p.small), c, bs.flush_cache
                )
            }
        )
        s |= self.compare(
            {"query_bypass": load.Load(self.url("get_todos_bypass"), load.lua_get_random(1, p.small), c)}
        )
        limit = s["async_redis_get"]
        hit, miss, bypass = s["query_hit"], s["query_miss"], s["query_bypass"]
        hit_ratio = hit.rps / limit.rps
        self.results["runtime_gain"] = {
            "constant": s["async_constant"].rps / s["sync_constant"].rps,
            "redis_get": s["async_redis_get"].rps / s["sync_redis_get"].rps,
        }
        self.results["cache_gain"] = {
            "hit_vs_miss": hit.rps / miss.rps,
            "hit_vs_bypass": hit.rps / bypass.rps,
        }
        self.rows += [
            Row("limit (old sync runtime): bare Flask function, gthread 1x16", _fmt(s["sync_constant"])),
            Row("limit (old sync runtime): + Redis GET, 1x16", _fmt(s["sync_redis_get"])),
            Row("limit: bare async function (--asgi)", _fmt(s["async_constant"])),
            Row("limit: + redis.asyncio GET", _fmt(limit)),
            Row(
                "runtime gain, async vs sync (bare, + Redis GET)",
                f"x{self.results['runtime_gain']['constant']:.2f}, "
                f"x{self.results['runtime_gain']['redis_get']:.2f}",
            ),
            Row(
                "GET /{id} cache hit",
                _fmt(hit),
                _rps(limit),
                f"{hit_ratio:.2f}",
                f">= {TARGET_HIT:.2f}",
                _verdict(hit_ratio >= TARGET_HIT),
            ),
            Row(
                "GET /todo/{id} cache hit through the gateway",
                _fmt(s["gateway_hit"]),
                f"{hit.rps:.0f} req/s direct",
                f"{s['gateway_hit'].rps / hit.rps:.2f}",
            ),
            Row("CPU per request: + redis.asyncio GET limit", cpu_said(limit.cpu_ms_per_request)),
            Row("CPU per request: GET /{id} cache hit", cpu_said(hit.cpu_ms_per_request)),
            Row("GET /{id} cache miss", _fmt(miss), _rps(limit), f"{miss.rps / limit.rps:.2f}"),
            Row("GET /{id} bypass (no Redis)", _fmt(bypass), _rps(limit), f"{bypass.rps / limit.rps:.2f}"),
            Row(
                "cache gain (hit vs miss, bypass)",
                f"x{hit.rps / miss.rps:.2f}, x{hit.rps / bypass.rps:.2f}",
            ),
        ]

    # the command side -----------------------------------------------------------------------------------
    def commands(self) -> None:
        self.mark("commands")
        c = self.plan.command_connections
        post = load.lua_post_json({"title": "bench"})
        # Todos to PATCH: made first, so every PATCH of the interleaved rounds finds one.
        load.wrk_interleaved(
            {"first": load.Load(self.url("create_todo"), post, c)},
            LUA_DIR,
            repeats=1,
            duration_s=1,
            warmup_s=0,
        )
        last = bs.max_todo_id()
        s = self.compare(
            {
                "sync_db_commit": load.Load(self.url("sync_db_commit"), "", c),
                "async_db_commit": load.Load(self.url("async_db_commit"), "", c),
                "command_create": load.Load(self.url("create_todo"), post, c),
                "command_patch": load.Load(
                    self.url("update_todo"), load.lua_patch_random(bs.API_ID_BASE, last), c
                ),
                "gateway_create": load.Load(f"{self.url('gateway')}/todo", post, c),
            }
        )
        limit = s["async_db_commit"]
        self.results.setdefault("runtime_gain", {})["db_commit"] = limit.rps / s["sync_db_commit"].rps
        self.rows += [
            Row("limit (old sync runtime): + write-DB commit, 1x8", _fmt(s["sync_db_commit"])),
            Row("limit: + async commit (aiomysql)", _fmt(limit)),
            Row("runtime gain, async vs sync (commit)", f"x{self.results['runtime_gain']['db_commit']:.2f}"),
        ]
        for name, key in (
            ("POST / create_todo", "command_create"),
            ("PATCH /{id} update_todo", "command_patch"),
        ):
            series = s[key]
            ratio = series.rps / limit.rps
            self.rows.append(
                Row(
                    f"{name} (c={c})",
                    _fmt(series),
                    _rps(limit),
                    f"{ratio:.2f}",
                    f">= {TARGET_COMMAND:.2f}",
                    _verdict(ratio >= TARGET_COMMAND),
                )
            )
        self.rows += [
            Row("CPU per request: + async commit limit", cpu_said(limit.cpu_ms_per_request)),
            Row("CPU per request: POST / create_todo", cpu_said(s["command_create"].cpu_ms_per_request)),
            Row("CPU per request: PATCH /{id} update_todo", cpu_said(s["command_patch"].cpu_ms_per_request)),
        ]
        gateway = s["gateway_create"]
        self.rows.append(
            Row(
                f"POST /todo through the gateway (c={c})",
                _fmt(gateway),
                f"{s['command_create'].rps:.0f} req/s direct",
                f"{gateway.rps / s['command_create'].rps:.2f}",
            )
        )
        bs.say(f"waiting for the projection to catch up ({bs.wait_until_projected()} s)")
        for name in SYNC_LIMITS:
            self.system.stop_server(name)

    # machine CPU per command, end to end (until the read model has it) ---------------------------------
    def efficiency(self) -> None:
        """CPU of every process of the system (functions, KafkaSource, MariaDB, Redis, Kafka) per create
        and per PATCH, from the first request until the read model holds the last: at saturation (wrk,
        closed loop) and paced at 100/s (open loop); and the system's cores when idle."""
        self.mark("efficiency")
        system_names = {*BY_NAME, "kafkasource", *(f"{name} (shared)" for name in self.service_pids)}

        def by_process(figures: dict[str, float]) -> dict[str, float]:
            return {k: v for k, v in figures.items() if k not in ("system", "machine")}

        def system_ms(meter: bs.CpuMeter, count: int) -> dict[str, float]:
            per = meter.ms_per(count)
            shown = {name: ms for name, ms in per.items() if name in system_names}
            shown["system"] = round(sum(shown.values()), 3)
            shown["machine"] = per.get("machine", 0.0)
            return shown

        bs.wait_until_projected()
        with bs.CpuMeter(self.cpu_sample) as idle:
            time.sleep(EFFICIENCY_IDLE_S)
        idle_cores = idle.cores()
        system_idle = round(sum(v for k, v in idle_cores.items() if k in system_names), 3)
        self.results["idle_cores"] = {**idle_cores, "system": system_idle}
        self.rows.append(
            Row(
                "idle: cores used by the whole system",
                f"{system_idle:.3f}",
                "-",
                "-",
                "< 0.05",
                _verdict(system_idle < 0.05),
            )
        )
        c = self.plan.command_connections
        last = bs.max_todo_id()
        patch_ids = list(range(max(bs.API_ID_BASE, last - 999), last + 1))
        loads = {
            "create": (self.url("create_todo"), load.lua_post_json({"title": "bench"}), None),
            "patch": (self.url("update_todo"), load.lua_patch_random(patch_ids[0], patch_ids[-1]), patch_ids),
        }
        for name, (url, lua, ids) in loads.items():
            script = load._script(load.Load(url, lua, c), LUA_DIR)
            with bs.CpuMeter(self.cpu_sample) as meter:
                run_ = load.wrk_run(url, script, c, EFFICIENCY_SATURATED_S)
                bs.wait_until_projected()
            saturated = system_ms(meter, run_.requests)
            with bs.CpuMeter(self.cpu_sample) as meter:
                port = self.system.port("create_todo" if name == "create" else "update_todo")
                done = load.run_async(
                    load.paced_posts(HOST, port, EFFICIENCY_RATE, EFFICIENCY_PACED_S, ids or ())
                )
                bs.wait_until_projected()
            paced = system_ms(meter, done)
            self.results[f"efficiency_{name}"] = {
                "saturated_rps": run_.rps,
                "saturated_ms": saturated,
                f"paced_{EFFICIENCY_RATE}_ms": paced,
            }
            bs.say(f"{name}: saturated {run_.rps:.0f}/s {saturated}; paced {EFFICIENCY_RATE}/s {paced}")
            target = TARGET_CPU_MS[name]
            for label, figures in (("saturated", saturated), (f"paced {EFFICIENCY_RATE}/s", paced)):
                self.rows.append(
                    Row(
                        f"machine CPU per {name}, end to end, {label}",
                        f"{figures['system']:.2f} ms ({cpu_said(by_process(figures))})",
                        "-",
                        "-",
                        f"<= {target:.0f} ms",
                        _verdict(figures["system"] <= target),
                    )
                )

    # what tracing and metrics cost on the cache-hit path -------------------------------------------------
    def observability(self) -> None:
        self.mark("observability")
        c = self.plan.query_connections
        get_todos = BY_NAME["get_todos"]
        with bs.OtlpSink(OTLP_SINK_PORT) as sink:
            self.system.spawn_function(
                "get_todos_no_metrics",
                bs.function_on(get_todos, NO_METRICS_PORT),
                {"METRICS_ENABLED": "0"},
                wait=False,
            )
            self.system.spawn_function(
                "get_todos_traced",
                bs.function_on(get_todos, TRACED_PORT),
                {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint},
                wait=False,
            )
            self.system.wait_ready("get_todos_no_metrics")
            self.system.wait_ready("get_todos_traced")
            try:
                self.warm_hot_ids()
                hot = load.lua_get_random(1, HOT_IDS)
                s = self.compare(
                    {
                        "hit_metrics_off": load.Load(self.url("get_todos_no_metrics"), hot, c),
                        "hit_default": load.Load(self.url("get_todos"), hot, c),
                        "hit_traced": load.Load(self.url("get_todos_traced"), hot, c),
                    }
                )
            finally:
                self.system.stop_server("get_todos_no_metrics")
                self.system.stop_server("get_todos_traced")
            exported = {"requests": sink.requests, "bytes": sink.bytes}
        off, default, traced = s["hit_metrics_off"], s["hit_default"], s["hit_traced"]

        def cost(base: load.Series, base_process: str, more: load.Series, process: str) -> dict[str, float]:
            cpu_base = base.cpu_ms_per_request.get(base_process, float("nan"))
            cpu_more = more.cpu_ms_per_request.get(process, float("nan"))
            return {
                "rps_change": more.rps / base.rps - 1,
                "p50_ms_change": more.p50_ms - base.p50_ms,
                # the function process's own CPU per request: what the feature costs, whatever the load
                "cpu_us_per_request_before": cpu_base * 1000,
                "cpu_us_per_request_after": cpu_more * 1000,
                "cpu_us_per_request_added": (cpu_more - cpu_base) * 1000,
            }

        self.results["observability_cost"] = {
            "metrics": cost(off, "get_todos_no_metrics", default, "get_todos"),
            "tracing": cost(default, "get_todos", traced, "get_todos_traced"),
            "otlp_sink_received": exported,
        }

        def said(what: dict[str, float]) -> str:
            return (
                f"{what['rps_change'] * 100:+.0f} % req/s, p50 {what['p50_ms_change']:+.1f} ms; CPU "
                f"{what['cpu_us_per_request_before']:.0f} -> {what['cpu_us_per_request_after']:.0f} "
                f"us/request ({what['cpu_us_per_request_added']:+.0f})"
            )

        m, t = self.results["observability_cost"]["metrics"], self.results["observability_cost"]["tracing"]
        self.rows += [
            Row("GET /{id} cache hit, METRICS_ENABLED=0", _fmt(off)),
            Row(
                "GET /{id} cache hit, default (metrics on, tracing off)",
                _fmt(default),
                _rps(off),
                f"{default.rps / off.rps:.2f}",
            ),
            Row(
                "GET /{id} cache hit, tracing on (OTLP/HTTP to a local sink)",
                _fmt(traced),
                _rps(default),
                f"{traced.rps / default.rps:.2f}",
            ),
            Row("cost of metrics on the cache-hit path", said(m)),
            Row(
                "cost of tracing on the cache-hit path",
                said(t) + f"; sink got {exported['requests']} exports, {exported['bytes'] / 1e6:.1f} MB",
            ),
        ]

    # Knative's queue-proxy in front of get_todos --------------------------------------------------------
    def queue_proxy(self) -> None:
        self.mark("queue-proxy")
        why_not = queue_proxy_available()
        name = "GET /{id} cache hit behind Knative's queue-proxy (c=16)"
        if why_not is not None:
            bs.say(why_not)
            self.results["queue_proxy"] = {"skipped": why_not}
            self.rows.append(Row(name, why_not))
            return
        c = self.plan.query_connections
        hot = load.lua_get_random(1, HOT_IDS)
        try:
            with behind_queue_proxy(BY_NAME["get_todos"].port, "get-todos") as url:
                self.warm_hot_ids()
                s = self.compare(
                    {
                        "hit_direct": load.Load(self.url("get_todos"), hot, c),
                        "hit_queue_proxy": load.Load(url, hot, c),
                    }
                )
        except Exception as exc:  # noqa: BLE001 - the row says why; the rest of the bench goes on
            bs.say(f"queue-proxy row failed: {exc!r}")
            self.results["queue_proxy"] = {"failed": repr(exc)}
            self.rows.append(Row(name, f"queue-proxy failed: {str(exc).splitlines()[0][:80]}"))
            return
        direct, proxied = s["hit_direct"], s["hit_queue_proxy"]
        self.results["queue_proxy"] = {
            "rps_ratio": proxied.rps / direct.rps,
            "p50_ms_added": proxied.p50_ms - direct.p50_ms,
        }
        self.rows.append(
            Row(
                name,
                _fmt(proxied) + f" (p50 {proxied.p50_ms - direct.p50_ms:+.1f} ms)",
                f"{direct.rps:.0f} req/s direct",
                f"{proxied.rps / direct.rps:.2f}",
            )
        )

    # open loop: command latency and read-your-writes ----------------------------------------------------
    def paced(self) -> None:
        self.mark("paced")
        ports = {"create": self.system.port("create_todo"), "update": self.system.port("update_todo")}
        ports["get"] = self.system.port("get_todos")
        for rate in self.plan.paced_rates:
            bs.say(f"paced commands: {rate}/s for {self.plan.paced_s:.0f} s, each read back with min_version")
            paced = load.run_async(load.paced_commands(HOST, ports, rate, self.plan.paced_s)).summary()
            self.results[f"paced_{rate}"] = paced
            bs.say(f"paced {rate}/s: {paced}")
            bs.wait_until_projected()
            errors = paced["command_errors"] + paced["lag_failures"]
            tail = f"; {errors} errors" if errors else ""
            command = f"p50 {paced['command_p50_ms']:.1f} ms, p99 {paced['command_p99_ms']:.1f} ms{tail}"
            ryw = f"p50 {paced['lag_p50_ms']:.1f} ms, p99 {paced['lag_p99_ms']:.1f} ms"
            command_row = Row(f"command latency @{rate} cmd/s (open loop)", command)
            ryw_row = Row(f"read-your-writes (min_version) @{rate} cmd/s", ryw)
            if rate == TARGET_COMMAND_P99_AT:
                ok = paced["command_p99_ms"] < TARGET_COMMAND_P99_MS and not errors
                command_row = replace(
                    command_row, target=f"p99 < {TARGET_COMMAND_P99_MS:.0f} ms", verdict=_verdict(ok)
                )
            if rate == TARGET_RYW_AT:
                ok = paced["lag_p99_ms"] < TARGET_RYW_P99_MS and not errors
                ryw_row = replace(ryw_row, target=f"p99 < {TARGET_RYW_P99_MS:.0f} ms", verdict=_verdict(ok))
            self.rows += [command_row, ryw_row]

    # projection: the drain of a backlog, with each ordering ---------------------------------------------
    def drains(self) -> None:
        self.mark("drain")
        shipped = self.system.kafkasource_ordering
        in_flight = kafkasource.UNORDERED_IN_FLIGHT  # the bench clears LOCAL_KAFKASOURCE_IN_FLIGHT
        for ordering in ("ordered", "unordered"):
            rate, detail = self.drain(ordering)
            label = (
                "one in flight per partition"
                if ordering == "ordered"
                else f"{in_flight} in flight per partition"
            )
            ships = ", kafka-source.yaml" if ordering == shipped else ""
            self.rows.append(
                Row(
                    f"drain {self.plan.backlog} events, ordering: {ordering} ({label}{ships})",
                    f"{rate:.0f} events/s ({detail})",
                    "-",
                    "-",
                    f">= {TARGET_DRAIN:,.0f}/s",
                    _verdict(rate >= TARGET_DRAIN),
                )
            )
        self.system.start_kafkasource()  # back to kafka-source.yaml's ordering

    def drain(self, ordering: str) -> tuple[float, str]:
        n = self.plan.backlog
        self.system.stop_kafkasource()
        ids = bs.insert_backlog(n)
        started = time.monotonic()
        bs.publish_backlog(1)  # the relay's drain, taking every pending row
        bs.say(f"backlog: {n} events on the topic after {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        self.system.start_kafkasource(ordering)
        first_seen = first_count = None
        meter = bs.CpuMeter(self.cpu_sample)  # from the first projected event: not the source's start-up
        count = 0
        while count < n:
            if time.monotonic() - started > 300:
                raise RuntimeError(f"the backlog did not drain within 300 s ({count}/{n})")
            time.sleep(0.05)
            count = bs.count_read(ids)
            if first_seen is None and count:
                first_seen, first_count = time.monotonic(), count
                meter.__enter__()
        meter.__exit__()
        ended = time.monotonic()
        assert first_seen is not None and first_count is not None
        rate = (n - first_count) / max(ended - first_seen, 1e-6)
        cpu = meter.ms_per(n - first_count)
        self.results[f"drain_{ordering}"] = {
            "events": n,
            "events_per_s": round(rate, 1),
            "seconds_from_source_start": round(ended - started, 2),
            "seconds_to_first_event": round(first_seen - started, 2),
            "cpu_ms_per_event": cpu,
            "cores": meter.cores(),
        }
        bs.say(f"drain {ordering}: {rate:.0f} events/s, {ended - started:.1f} s from the source's start")
        bs.say(f"  CPU ms per event: {cpu}")
        return rate, f"{ended - started:.1f} s incl. start; CPU/event {cpu_said(cpu)}"

    # publishing: how the outbox's drain scales with publishing processes (shard leases) ---------------
    def publishing(self) -> None:
        """A backlog drained to Kafka by 1, then 3 processes running the relay's drain, each taking
        whichever shard leases are free (the KafkaSource stopped, the relay's tick paused)."""
        self.mark("publishing")
        self.system.stop_kafkasource()
        self.system.relay_paused.set()
        rates = {}
        try:
            for count in (1, 3):
                bs.insert_backlog(self.plan.backlog)
                rates[count] = bs.publish_backlog(count)
                bs.say(f"publishing with {count} process(es): {rates[count]:.0f} events/s")
        finally:
            self.system.relay_paused.clear()
            self.system.start_kafkasource()
        self.results["publishing"] = {f"{n}_processes_events_per_s": round(r, 1) for n, r in rates.items()}
        self.rows.append(
            Row(
                f"outbox to Kafka, {self.plan.backlog} events: 1 -> 3 publishing processes",
                f"{rates[1]:.0f} -> {rates[3]:.0f} events/s (x{rates[3] / rates[1]:.2f})",
                "-",
                "-",
                "-",
                "-",
            )
        )

    # cold starts ----------------------------------------------------------------------------------------
    def cold_starts(self) -> None:
        self.mark("cold starts")
        bs.http_get(self.system.port("get_todos"), "/1")  # cached: the new get_todos' first read is a hit
        for function in FUNCTIONS:
            to_health, to_hit = [], []
            for _ in range(self.plan.cold_repeats):
                name = f"cold_{function.name}"
                started = time.monotonic()
                self.system.spawn_function(name, bs.function_on(function, SPARE_PORT), wait=False)
                try:
                    to_health.append(self._first(started, "/healthz", lambda a: a[0] == 200))
                    if function.name == "get_todos":
                        to_hit.append(self._first(started, "/1", lambda a: a[1].get("x-cache") == "hit"))
                finally:
                    self.system.stop_server(name, graceful=False)  # it never had traffic
            figure = {"healthz_s": statistics.median(to_health), "healthz_runs_s": to_health}
            if to_hit:
                figure |= {"first_hit_s": statistics.median(to_hit), "first_hit_runs_s": to_hit}
            self.per_function[function.name]["cold_start"] = figure
            bs.say(f"cold start {function.name}: {figure}")
        self.results["cold_starts"] = {name: f.get("cold_start") for name, f in self.per_function.items()}
        health = {n: f["cold_start"]["healthz_s"] for n, f in self.per_function.items()}
        slowest = max(health, key=lambda n: health[n])
        hit = self.per_function["get_todos"]["cold_start"]["first_hit_s"]
        self.rows.append(
            Row(
                f"cold start, process start to first 200 on /healthz (median of {self.plan.cold_repeats})",
                f"{min(health.values()):.2f} to {health[slowest]:.2f} s ({slowest}); "
                f"get_todos to its first cache hit {hit:.2f} s",
            )
        )

    def _first(
        self, started: float, path: str, ok: Callable[[tuple[int, dict[str, str], bytes]], bool]
    ) -> float:
        """Seconds from `started` until GET path on the spare port answers as `ok` says (polled: 5 ms)."""
        while True:
            answer = bs.http_get(SPARE_PORT, path, timeout_s=5)
            if answer is not None and ok(answer):
                return round(time.monotonic() - started, 3)
            self.system.check_alive()
            if time.monotonic() - started > 60:
                raise RuntimeError(f"nothing answered GET {path} on port {SPARE_PORT} within 60 s")
            time.sleep(0.005)

    # the soak: sustained mixed load ---------------------------------------------------------------------
    def soak(self) -> None:
        self.mark("soak")
        sp = self.plan.soak
        ports = {
            "create": self.system.port("create_todo"),
            "update": self.system.port("update_todo"),
            "get": self.system.port("get_todos"),
            "kafkasource_metrics": KAFKASOURCE_METRICS_PORT,
        }
        functions = {name: self.system.servers[name].pid for name in BY_NAME}
        if self.plan.soak_warmup_s:
            bs.say(f"soak warm-up: {self.plan.soak_warmup_s:.0f} s of the same mix (not counted)")
            load.run_async(load.soak(HOST, ports, replace(sp, duration_s=self.plan.soak_warmup_s)))
            bs.wait_until_projected(30)
        bs.say(
            f"soak: {sp.duration_s:.0f} s of {sp.command_rate:.0f} commands/s + {sp.read_rate:.0f} reads/s, "
            f"open loop; every {sp.probe_every}th command read back with min_version"
        )
        rss_start = {name: bs.process_rss_mb(pid) for name, pid in functions.items()}

        def sample(elapsed: float) -> dict[str, Any]:
            return {
                "t": round(elapsed, 1),
                "rss_mb": {name: round(bs.process_rss_mb(pid), 1) for name, pid in functions.items()},
            }

        with bs.CpuMeter(self.cpu_sample) as meter:
            result = load.run_async(load.soak(HOST, ports, sp, on_second=sample))
        rss_end = {name: bs.process_rss_mb(pid) for name, pid in functions.items()}
        summary = result.summary()
        summary["cores"] = cores = meter.cores()
        converged = bs.wait_until_projected(SOAK_CATCH_UP_S)
        summary["converged_s_after_load"] = round(converged, 2) if converged is not None else None
        for name in functions:
            self.per_function[name]["soak"] = {
                "rss_start_mb": round(rss_start[name], 1),
                "rss_end_mb": round(rss_end[name], 1),
                "growth_mb": round(rss_end[name] - rss_start[name], 1),
                "cpu_cores": round(cores.get(name, 0.0), 2),
            }
        self.results["soak"] = summary
        self.soak_result = summary
        self.rows += soak_rows(summary, self.per_function)

    # scale ----------------------------------------------------------------------------------------------
    def scale(self) -> None:
        self.mark("scale")
        p, c = self.plan, self.plan.query_connections
        url = self.url("get_todos_bypass")
        small = self.compare(
            {
                "scale_get_small": load.Load(url, load.lua_get_random(1, p.small), c),
                "scale_list_small": load.Load(url, _deep_pages(p.small), c),
            }
        )
        bs.say(f"seeding the read DB up to {p.large} todos ...")
        took = bs.seed_read_model(p.small + 1, p.large)
        bs.say(f"seeded in {took:.1f} s")
        self.results["seed_seconds"] = round(took, 1)
        s = self.compare(
            {
                "scale_get_large": load.Load(url, load.lua_get_random(1, p.large), c),
                "scale_list_large": load.Load(url, _deep_pages(p.large), c),
            }
        )
        pairs = (
            ("GET /{id}", small["scale_get_small"], s["scale_get_large"]),
            ("deep list page", small["scale_list_small"], s["scale_list_large"]),
        )
        for what, small, large in pairs:
            ratio = large.p50_ms / small.p50_ms
            self.rows.append(
                Row(
                    f"scale {what}, {p.small:,} -> {p.large:,} rows (no Redis)",
                    f"p50 {small.p50_ms:.2f} -> {large.p50_ms:.2f} ms",
                    "-",
                    f"{ratio:.2f}",
                    f"<= {TARGET_SCALE}",
                    _verdict(ratio <= TARGET_SCALE),
                )
            )

    # memory ---------------------------------------------------------------------------------------------
    def memory(self, peaks: dict[str, dict[str, Any]]) -> None:
        self.results["memory"] = peaks
        for name in BY_NAME:
            self.per_function[name]["memory"] = peaks.get(name)
        measured = {n: p for n, p in peaks.items() if n in BY_NAME}
        largest = max(measured, key=lambda n: measured[n]["peak_process_rss_mb"])
        peak = measured[largest]["peak_process_rss_mb"]
        self.rows.append(
            Row(
                "memory: largest function process (peak RSS over the run)",
                f"{peak:.0f} MB ({largest}); per function below",
                "-",
                "-",
                f"< {TARGET_RSS_MB:.0f} MB",
                _verdict(peak < TARGET_RSS_MB),
            )
        )


def cpu_said(ms: dict[str, float]) -> str:
    """The main CPU costs per unit of work 'project_event 1.60, kafkasource 0.80 ms (machine 5.0)'."""
    parts = [
        f"{name.replace(' (shared)', '')} {v:.2f}" for name, v in ms.items() if name != "machine" and v >= 0.1
    ]
    machine = f" (machine {ms['machine']:.1f})" if "machine" in ms else ""
    return ", ".join(parts) + " ms" + machine


def cores_said(cores: dict[str, float]) -> str:
    """Where the machine's CPU went: the bench's processes, the shared services, everything else."""
    ours = {n: c for n, c in cores.items() if n != "machine" and "(shared)" not in n}
    shared = sum(c for n, c in cores.items() if "(shared)" in n)
    top = ", ".join(f"{n} {c:.2f}" for n, c in sorted(ours.items(), key=lambda i: -i[1]) if c >= 0.05)
    machine = cores.get("machine", 0.0)
    others = machine - sum(ours.values()) - shared
    return (
        f"bench {sum(ours.values()):.2f} ({top}); MariaDB+Redis+Kafka {shared:.2f}; "
        f"other work {others:.2f}; machine busy {machine:.2f}"
    )


def soak_rows(summary: dict[str, Any], per_function: dict[str, dict[str, Any]]) -> list[Row]:
    sp = summary["plan"]
    growth = {n: f["soak"]["growth_mb"] for n, f in per_function.items() if "soak" in f}
    grew = max(growth, key=lambda n: growth[n])
    requests = (summary["commands_per_s"] + summary["reads_per_s"]) * sp["duration_s"]
    kinds: dict[str, int] = {}
    for window in summary["windows"]:
        for kind, count in window["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    errors = summary["errors"]
    what = f" ({', '.join(f'{k}: {v}' for k, v in kinds.items())})" if kinds else ""
    after = summary["converged_s_after_load"]
    caught_up = (
        f"caught up {after:.1f} s after" if after is not None else f"not caught up {SOAK_CATCH_UP_S} s after"
    )
    lag_ok = (
        summary["lag_p99_worst_window_ms"] < TARGET_SOAK_LAG_MS and summary["lag_p99_ms"] < TARGET_SOAK_LAG_MS
    )
    return [
        Row(
            f"soak {sp['duration_s']:.0f} s: {sp['command_rate']:.0f} cmd/s + {sp['read_rate']:.0f} reads/s "
            "(open loop)",
            f"sent {summary['commands_per_s']:.0f} cmd/s, {summary['reads_per_s']:.0f} reads/s; answered in "
            f"time {summary['ok_commands_per_s']:.0f} cmd/s, {summary['ok_reads_per_s']:.0f} reads/s; "
            f"command p99 {summary['command_p99_ms']:.1f} ms, read p99 {summary['read_p99_ms']:.1f} ms",
        ),
        Row(
            "soak errors", f"{errors} of {requests:,.0f} requests{what}", "-", "-", "0", _verdict(errors == 0)
        ),
        Row(
            f"soak projection lag (min_version, 1 in {sp['probe_every']} commands)",
            f"p99 {summary['lag_p99_ms']:.0f} ms overall, worst {sp['window_s']:.0f} s window "
            f"{summary['lag_p99_worst_window_ms']:.0f} ms; p50 {summary['lag_p50_ms']:.0f} ms; "
            f"consumer lag max {summary['consumer_lag_max']:.0f} records; {caught_up}",
            "-",
            "-",
            f"p99 < {TARGET_SOAK_LAG_MS / 1000:.0f} s throughout",
            _verdict(lag_ok),
        ),
        Row("soak CPU, cores of the machine's 2 (time-averaged)", cores_said(summary["cores"])),
        Row(
            "soak RSS, start -> end, every function",
            f"largest growth {growth[grew]:+.1f} MB ({grew}); per function below",
            "-",
            "-",
            f"< {TARGET_SOAK_GROWTH_MB:.0f} MB",
            _verdict(growth[grew] < TARGET_SOAK_GROWTH_MB),
        ),
    ]


def _deep_pages(rows: int) -> str:
    """A page of 20 with a cursor among the last thousand seeded todos."""
    return load.lua_get_paths([f"/?limit=20&cursor={encode_cursor(rows - k)}" for k in range(40, 1000, 5)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_table(rows: list[Row]) -> str:
    fields = list(Row.__dataclass_fields__)
    return markdown_table(fields, [[getattr(r, f) for f in fields] for r in rows])


def function_table(per_function: dict[str, dict[str, Any]]) -> str:
    """Per function: cold start, memory over the run, RSS and CPU during the soak."""
    rows = []
    for name, f in per_function.items():
        cold, memory, soaked = f.get("cold_start"), f.get("memory"), f.get("soak")
        cell_cold = "-"
        if cold:
            cell_cold = f"{cold['healthz_s']:.2f} s"
            if "first_hit_s" in cold:
                cell_cold += f" (first cache hit {cold['first_hit_s']:.2f} s)"
        cell_memory = cell_sums = "-"
        ok = True
        if memory:
            cell_memory = f"{memory['peak_process_rss_mb']:.0f} MB"
            cell_sums = f"RSS {memory['peak_rss_mb']:.0f}, PSS {memory['peak_pss_mb']:.0f} MB"
            ok = memory["peak_process_rss_mb"] < TARGET_RSS_MB
        cell_soak = cell_cpu = "-"
        if soaked:
            cell_soak = (
                f"{soaked['rss_start_mb']:.0f} -> {soaked['rss_end_mb']:.0f} MB ({soaked['growth_mb']:+.1f})"
            )
            cell_cpu = f"{soaked['cpu_cores'] * 100:.0f} %"
            ok = ok and soaked["growth_mb"] < TARGET_SOAK_GROWTH_MB
        verdict = _verdict(ok) if (memory or soaked) else "-"
        rows.append([name, cell_cold, cell_memory, cell_sums, cell_soak, cell_cpu, verdict])
    header = [
        "function",
        "cold start (to /healthz)",
        "peak RSS, largest process",
        "master + worker",
        "soak RSS start -> end",
        "soak CPU (of a core)",
        "verdict",
    ]
    return markdown_table(header, rows)


def soak_table(summary: dict[str, Any]) -> str:
    w = summary["plan"]["window_s"]
    rows = []
    for i, win in enumerate(summary["windows"]):
        rows.append(
            [
                f"{i * w:.0f}-{(i + 1) * w:.0f} s",
                f"{win['commands_per_s']:.0f} / {win['ok_commands_per_s']:.0f}",
                f"{win['reads_per_s']:.0f} / {win['ok_reads_per_s']:.0f}",
                f"{win['command_p99_ms']:.1f}",
                f"{win['read_p99_ms']:.1f}",
                f"{win['lag_p50_ms']:.0f} / {win['lag_p99_ms']:.0f}",
                f"{win['consumer_lag_max']:.0f}",
                f"{win['client_late_p99_ms']:.1f}",
                str(win["errors"]),
            ]
        )
    header = [
        "window",
        "cmd/s sent / ok",
        "reads/s sent / ok",
        "command p99 ms",
        "read p99 ms",
        "lag p50 / p99 ms",
        "consumer lag",
        "client late p99 ms",
        "errors",
    ]
    return markdown_table(header, rows)


def reconciliation_passes() -> dict[str, Any]:
    """Clean passes over 10,000 and 1,000,000 todos and a repair of 1,000 drifted rows
    (docs/reconciliation.md): tools/bench_reconcile.py, in a process of its own (its own databases)."""
    bs.say("reconciliation passes (tools/bench_reconcile.py) ...")
    output = REPO / ".local" / "bench-reconcile.json"
    argv = [sys.executable, "-m", "tools.bench_reconcile", "--output", str(output)]
    subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    results: dict[str, Any] = json.loads(output.read_text())
    return results


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
        "load_generator": f"{wrk.split(' Copyright')[0]} (closed loop); "
        "asyncio HTTP/1.1 client on uvloop (open loop)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short repeat each, 100k rows (a smoke run)")
    parser.add_argument("--soak", action="store_true", help="only the sustained mixed load (make soak)")
    parser.add_argument("--soak-seconds", type=float, help="the soak's length (default 180)")
    parser.add_argument("--output", help="the JSON results file")
    parser.add_argument("--only", help="comma-separated phases, e.g. efficiency,drains (default: all)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.soak_seconds:
        plan = replace(plan, soak=replace(plan.soak, duration_s=args.soak_seconds))
    output = Path(args.output or (SOAK_RESULTS if args.soak else RESULTS))
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
        system.start()
        sampler = bs.MemorySampler(system.servers)
        sampler.start()
        bench = Bench(plan, system)
        if args.soak:
            bench.soak()
        else:
            system.start_gateway(GATEWAY_PORT)
            bs.say("limits and a get_todos without Redis ...")
            for name, (target, port) in ASYNC_LIMITS.items():
                system.spawn_limit(name, target, port, sync=False, wait=False)
            for name, (target, port, threads) in SYNC_LIMITS.items():
                system.spawn_limit(name, target, port, sync=True, threads=threads, wait=False)
            bypass = bs.function_on(BY_NAME["get_todos"], BYPASS_PORT)
            no_redis = {"REDIS_URL": f"redis://{HOST}:{bs.free_port()}/1"}
            system.spawn_function("get_todos_bypass", bypass, no_redis, wait=False)
            for name in [*ASYNC_LIMITS, *SYNC_LIMITS, "get_todos_bypass"]:
                system.wait_ready(name)
            phases = [
                bench.queries,
                bench.commands,
                bench.efficiency,
                bench.observability,
                bench.queue_proxy,
                bench.paced,
                bench.drains,
                bench.publishing,
                bench.cold_starts,
                bench.soak,
                bench.scale,
            ]
            chosen = set(args.only.split(",")) if args.only else None
            for phase in phases:
                if chosen is None or phase.__name__ in chosen:
                    phase()
            if chosen is None or "reconciliation" in chosen:
                bench.results["reconciliation"] = reconciliation_passes()
        bench.mark("done")
        bench.memory(sampler.stop())
        bench.results["loadavg"]["end"] = loadavg()
        elapsed = time.monotonic() - started
        print(print_table(bench.rows), flush=True)
        print("\n" + function_table(bench.per_function), flush=True)
        if bench.soak_result:
            print("\n" + soak_table(bench.soak_result), flush=True)
        document = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "plan": {**plan.__dict__, "soak": plan.soak.__dict__},
            "server_env": run.SERVER_ENV,
            "kafkasource_ordering": system.kafkasource_ordering,
            "seconds": round(elapsed, 1),
            "table": [row.__dict__ for row in bench.rows],
            "per_function": bench.per_function,
            "results": bench.results,
        }
        output.write_text(json.dumps(document, indent=2) + "\n")
        la = bench.results["loadavg"]
        bs.say(
            f"done in {elapsed:.0f} s; load average {' '.join(la['start'])} at the start, "
            f"{' '.join(la['end'])} at the end"
        )
        bs.say(f"results in {output}")
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
    for port in [*range(9080, 9092), *range(9101, 9108)]:
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                bs.say(f"warning: something still listens on {HOST}:{port}")


if __name__ == "__main__":
    sys.exit(main())
