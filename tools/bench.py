"""`make bench`: what README.md's performance table and docs/performance.md report, in one run; `make
soak`: the sustained mixed load alone.

Starts its own copy of the local system beside the standard one (databases todo_bench_write and
todo_bench_read, Redis db 1, topic todo-events-bench with its own consumer group, ports 9080-9091 and
9104-9106), loads it on loopback only, bounded in count and time, prints a table and writes
bench-results.json (the soak alone: bench-results-soak.json), then stops everything it started, also on
an error, Ctrl-C or SIGTERM.
Load: `wrk` (closed loop, fixed concurrency) and an asyncio HTTP/1.1 client (open loop: paced commands,
read-your-writes, the overload, the soak). Method: docs/performance.md.
"""

from __future__ import annotations

import os

# The bench's own databases, Redis db, topic and ports: set before any module reads the environment.
# A WRITE_DB_URL/READ_DB_URL would win over the names and point the bench at someone's data; an OTLP
# endpoint or METRICS_ENABLED from the shell would change what is measured.
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
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402

from todo_cqrs.settings import settings  # noqa: E402
from tools import bench_load as load  # noqa: E402
from tools import bench_system as bs  # noqa: E402
from tools import kafkasource, run, services  # noqa: E402
from tools.topology import BY_NAME, GATEWAY_PORT, HOST, KAFKASOURCE_METRICS_PORT, REPO  # noqa: E402

os.environ.setdefault("DEAD_LETTER_DIR", str(bs.BENCH_DIR / "dead-letters"))
RESULTS = REPO / "bench-results.json"
SOAK_RESULTS = REPO / "bench-results-soak.json"
LUA_DIR = bs.BENCH_DIR / "lua"
LIMITS = {  # name: (target in tools/bench_limits/main.py, port)
    "async_constant": ("constant", 9104),
    "async_redis_get": ("redis_get", 9105),
    "async_db_commit": ("db_commit", 9106),
}
HOT_IDS = 1000  # the cache-hit loads read these, all cached beforehand
GET_TODOS_CONCURRENCY = 64  # knative/services/get-todos.yaml's containerConcurrency

TARGET_CPU_MS = {"create": 3.0, "patch": 4.0}  # machine CPU per command, end to end
TARGET_IDLE_CORES = 0.05
TARGET_COMMAND_P99 = (200, 25.0)  # at 200 commands/s, p99 < 25 ms
TARGET_RYW_P99 = (100, 50.0)
TARGET_DRAIN, TARGET_DRAIN_CPU_MS = 2000.0, 1.0
TARGET_OVERLOAD_HIT_P99_MS, TARGET_OVERLOAD_WAIT_S = 100.0, 5.0
TARGET_SOAK_LAG_MS = 1000.0
TARGET_SOAK_GROWTH_MB = 10.0
SOAK_CATCH_UP_S = 60  # how long the bench waits for the read model after the soak, at most


@dataclass(frozen=True)
class Plan:
    repeats: int = 3
    duration_s: float = 3.0
    warmup_s: float = 1.0
    query_connections: int = 16
    command_connections: int = 8
    idle_s: float = 10.0
    saturated_s: float = 8.0
    efficiency_rate: int = 100  # the efficiency phase's paced load, per second
    efficiency_paced_s: float = 10.0
    paced_s: float = 8.0
    paced_rates: tuple[int, ...] = (TARGET_RYW_P99[0], TARGET_COMMAND_P99[0])
    backlog: int = 10_000
    seeded: int = 10_000  # todos 1..seeded in the read model
    overload_s: float = 10.0
    soak: load.MixPlan = load.MixPlan(command_rate=250, read_rate=600, duration_s=180, probe_every=5)
    soak_warmup_s: float = 3.0


QUICK = Plan(
    repeats=1,
    duration_s=1.0,
    idle_s=3.0,
    saturated_s=2.0,
    efficiency_paced_s=3.0,
    paced_s=3.0,
    backlog=1000,
    overload_s=4.0,
    soak=replace(Plan.soak, duration_s=10.0),
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


def _target(path: str, figure: str, target: str, ok: bool) -> Row:
    return Row(path, figure, target=target, verdict=_verdict(ok))


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def cpu_said(ms: dict[str, float]) -> str:
    """The main CPU costs per unit of work: 'project_event 1.60, kafkasource 0.80 ms (machine 5.0)'."""
    parts = [
        f"{name.replace(' (shared)', '')} {v:.2f}" for name, v in ms.items() if name != "machine" and v >= 0.1
    ]
    machine = f" (machine {ms['machine']:.1f})" if "machine" in ms else ""
    return (", ".join(parts) or "each process < 0.1") + " ms" + machine


class Bench:
    def __init__(self, plan: Plan, system: bs.BenchSystem) -> None:
        self.plan = plan
        self.system = system
        self.results: dict[str, Any] = {"loadavg": {"start": loadavg()}, "phase_seconds": {}}
        self._phase: str | None = None
        self._phase_started = time.monotonic()
        self.rows: list[Row] = []
        self.soak_result: dict[str, Any] | None = None
        self.service_pids = {svc.name: svc.pid for svc in services.status() if svc.pid}
        self.system_names = {*BY_NAME, "kafkasource", *(f"{name} (shared)" for name in self.service_pids)}

    def mark(self, phase: str) -> None:
        self.system.check_alive()
        now = time.monotonic()
        if self._phase is not None:
            self.results["phase_seconds"][self._phase] = round(now - self._phase_started, 1)
        self._phase, self._phase_started = phase, now
        self.results["loadavg"][phase] = loadavg()
        bs.say(f"--- {phase} (load average {' '.join(loadavg())})")

    def url(self, name: str) -> str:
        return self.system.url(name)

    def port(self, name: str) -> int:
        return self.system.port(name)

    def ports(self, consumer_lag: bool = False) -> dict[str, int]:
        """Where the open-loop loads go (and, for the soak, where the KafkaSource's lag is read)."""
        functions = {"create": "create_todo", "update": "update_todo", "get": "get_todos"}
        ports = {name: self.port(function) for name, function in functions.items()}
        return ports | ({"kafkasource_metrics": KAFKASOURCE_METRICS_PORT} if consumer_lag else {})

    def closed_loop(self, connections: int, loads: list[tuple[str, str, str, str, str | None]]) -> None:
        """Closed-loop loads (name, row label, URL, Lua script, the load it is compared with) measured
        round-robin (docs/performance.md: method); a row each: the figures, CPU per request, the ratio."""
        p = self.plan
        bs.say(
            f"{', '.join(name for name, *_ in loads)}: {p.repeats} x {p.duration_s:.0f} s each, interleaved"
        )
        s = load.wrk_interleaved(
            {name: load.Load(url, lua, connections) for name, _, url, lua, _ in loads},
            LUA_DIR,
            repeats=p.repeats,
            duration_s=p.duration_s,
            warmup_s=p.warmup_s,
            cpu_sample=self.cpu,
        )
        for name, label, _, _, against in loads:
            series = s[name]
            self.results[name] = dataclasses.asdict(series)
            figure = f"{_fmt(series)}; CPU {cpu_said(series.cpu_ms_per_request)}"
            bs.say(f"  {name}: {figure}, {series.errors} errors")
            base = s[against].rps if against else None
            ratio = (
                ("-", "-") if base is None else (f"{base:.0f} req/s ({against})", f"{series.rps / base:.2f}")
            )
            self.rows.append(Row(label, figure, *ratio))

    def cpu(self) -> dict[str, float]:
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

    def system_ms(self, meter: bs.CpuMeter, count: int) -> dict[str, float]:
        """CPU ms per unit of work of the system's processes, their sum ("system"), and the machine's."""
        per = meter.ms_per(count)
        shown = {name: ms for name, ms in per.items() if name in self.system_names}
        return shown | {"system": round(sum(shown.values()), 3), "machine": per.get("machine", 0.0)}

    def warm_hot_ids(self) -> None:
        """Every hot id read, so cached: 2 s of random reads among 1,000 ids read each many times."""
        warm = load.lua_get_random(1, HOT_IDS)
        load.wrk_run(self.url("get_todos"), load.script(warm, LUA_DIR), self.plan.query_connections, 2)

    # the query side and the command side against their limits -----------------------------------------
    def queries(self) -> None:
        self.mark("queries")
        c, url = self.plan.query_connections, self.url
        self.warm_hot_ids()
        hot, gateway = load.lua_get_random(1, HOT_IDS), load.lua_get_random(1, HOT_IDS, "/todo/")
        self.closed_loop(
            c,
            [
                ("async_constant", "limit: bare async function", url("async_constant"), "", None),
                ("async_redis_get", "limit: + redis.asyncio GET", url("async_redis_get"), "", None),
                ("query_hit", f"GET /{{id}} cache hit (c={c})", url("get_todos"), hot, "async_redis_get"),
                ("gateway_hit", "GET /todo/{id} through the gateway", url("gateway"), gateway, "query_hit"),
            ],
        )

    def commands(self) -> None:
        self.mark("commands")
        c, url = self.plan.command_connections, self.url
        post = load.lua_post_json({"title": "bench"})
        # Todos to PATCH: made first, so every PATCH of the interleaved rounds finds one.
        load.wrk_run(url("create_todo"), load.script(post, LUA_DIR), c, 1)
        patch = load.lua_patch_random(bs.API_ID_BASE, bs.max_todo_id())
        limit, create = "async_db_commit", "command_create"
        self.closed_loop(
            c,
            [
                (limit, "limit: + async commit (aiomysql)", url(limit), "", None),
                (create, f"POST / create_todo (c={c})", url("create_todo"), post, limit),
                ("command_patch", f"PATCH /{{id}} update_todo (c={c})", url("update_todo"), patch, limit),
                ("gateway_create", "POST /todo through the gateway", url("gateway") + "/todo", post, create),
            ],
        )
        bs.say(f"waiting for the projection to catch up ({bs.wait_until_projected()} s)")

    # machine CPU per command, end to end (until the read model has it) ---------------------------------
    def efficiency(self) -> None:
        """CPU of every process of the system (functions, KafkaSource, MariaDB, Redis, Kafka) per create
        and per PATCH, from the first request until the read model holds the last: at saturation (wrk,
        closed loop) and paced (open loop); and the system's cores when idle."""
        self.mark("efficiency")
        p = self.plan
        bs.wait_until_projected()
        with bs.CpuMeter(self.cpu) as idle:
            time.sleep(p.idle_s)
        cores = idle.cores()
        system_idle = round(sum(v for k, v in cores.items() if k in self.system_names), 3)
        self.results["idle_cores"] = {**cores, "system": system_idle}
        idle_row = "idle: cores used by the whole system"
        self.rows.append(
            _target(idle_row, f"{system_idle:.3f}", f"< {TARGET_IDLE_CORES}", system_idle < TARGET_IDLE_CORES)
        )
        last = bs.max_todo_id()
        patch_ids = range(max(bs.API_ID_BASE, last - 999), last + 1)
        loads = {
            "create": ("create_todo", load.lua_post_json({"title": "bench"})),
            "patch": ("update_todo", load.lua_patch_random(patch_ids[0], patch_ids[-1])),
        }
        for name, (function, lua) in loads.items():
            saturated_run, saturated, paced = self.saturated_and_paced(
                function, lua, name, self.system_ms, self.ports(), patch_ids
            )
            self.results[f"efficiency_{name}"] = {
                "saturated_rps": saturated_run.rps,
                "saturated_ms": saturated,
                f"paced_{p.efficiency_rate}_ms": paced,
            }
            bs.say(
                f"{name}: saturated {saturated_run.rps:.0f}/s {saturated}; "
                f"paced {p.efficiency_rate}/s {paced}"
            )
            target = TARGET_CPU_MS[name]
            for label, figures in (("saturated", saturated), (f"paced {p.efficiency_rate}/s", paced)):
                by_process = {k: v for k, v in figures.items() if k not in ("system", "machine")}
                self.rows.append(
                    _target(
                        f"machine CPU per {name}, end to end, {label}",
                        f"{figures['system']:.2f} ms ({cpu_said(by_process)})",
                        f"<= {target:.0f} ms",
                        figures["system"] <= target,
                    )
                )
        self.floor_paced_over_saturated()
        self.servers_paced_over_saturated()

    def saturated_and_paced(
        self,
        function: str,
        lua: str,
        commands: str,
        figures: Callable[[bs.CpuMeter, int], dict[str, float]],
        ports: dict[str, int],
        patch_ids: range = range(0),
    ) -> tuple[load.Run, dict[str, float], dict[str, float]]:
        """`commands` sent to `function` at saturation (wrk), then paced (open loop, sent to `ports`), each
        until the read model holds the last; the saturated run and the CPU `figures` of each per command."""
        p = self.plan
        with bs.CpuMeter(self.cpu) as meter:
            run = load.wrk_run(
                self.url(function), load.script(lua, LUA_DIR), p.command_connections, p.saturated_s
            )
            bs.wait_until_projected()
        saturated = figures(meter, run.requests)
        plan = load.MixPlan(
            p.efficiency_rate, 0, p.efficiency_paced_s, commands=commands, patch_ids=patch_ids
        )
        with bs.CpuMeter(self.cpu) as meter:
            done = load.mix_summary(load.run_async(load.mixed(HOST, ports, plan)))["ok_commands"]
            bs.wait_until_projected()
        return run, saturated, figures(meter, done)

    def floor_paced_over_saturated(self) -> None:
        """The async commit limit (its function and MariaDB) measured as the creates just were: what
        the floor of a command costs per request saturated and paced, so the system's ratio paced /
        saturated (issue 19 asks <= 1.2) can be read against the floor's own."""
        p, name = self.plan, "async_db_commit"

        def floor_ms(meter: bs.CpuMeter, count: int) -> dict[str, float]:
            return {k: v for k, v in meter.ms_per(count).items() if k in (name, "mariadb (shared)")}

        saturated_run, saturated, paced = self.saturated_and_paced(
            name, load.lua_post_json({"title": "bench"}), "create", floor_ms,
            self.ports() | {"create": self.port(name)},
        )  # fmt: skip
        totals = [round(sum(figures.values()), 3) for figures in (saturated, paced)]
        self.results["efficiency_floor"] = {"saturated_ms": saturated, f"paced_{p.efficiency_rate}_ms": paced}
        bs.say(f"floor: saturated {saturated_run.rps:.0f}/s {saturated}; paced {p.efficiency_rate}/s {paced}")
        self.rows.append(
            Row(
                "limit: + async commit, its function and MariaDB, saturated / paced "
                f"{p.efficiency_rate}/s (the floor's own ratio)",
                f"{totals[0]:.2f} / {totals[1]:.2f} ms ({cpu_said(saturated)} / {cpu_said(paced)})",
                ratio=f"{totals[1] / totals[0]:.2f}" if totals[0] else "-",
            )
        )

    def servers_paced_over_saturated(self) -> None:
        """Redis and MariaDB alone, each sent the least it can answer (PING; SELECT 1) by one client, in a
        closed loop and then paced: the server's own CPU per request both ways. Neither runs Python or
        this project's code, so their ratio is what waking a process for each request costs here."""
        p = self.plan
        client, engine = redis.Redis.from_url(settings().redis_url), bs.write_db()
        with client, engine.connect() as conn:
            asks: dict[str, Callable[[], object]] = {
                "redis": client.ping,
                "mariadb": lambda: conn.exec_driver_sql("SELECT 1").all(),
            }
            figures = {name: self.server_ms(name, ask) for name, ask in asks.items()}
        self.results["efficiency_servers_alone"] = figures
        said = "; ".join(f"{name} {loop:.3f} / {paced:.3f} ms" for name, (loop, paced) in figures.items())
        ratios = " / ".join(f"{paced / loop:.1f}" if loop else "-" for loop, paced in figures.values())
        self.rows.append(
            Row(
                "limit: Redis PING / MariaDB SELECT 1, the server alone, closed loop / paced "
                f"{p.efficiency_rate}/s (their own ratios)",
                said,
                ratio=ratios,
            )
        )

    def server_ms(self, name: str, ask: Callable[[], object]) -> tuple[float, float]:
        """The CPU ms per request of service `name`, asked by `ask` back to back, then paced."""
        p, key = self.plan, f"{name} (shared)"
        with bs.CpuMeter(self.cpu) as looped:
            deadline, asked = time.monotonic() + p.saturated_s, 0
            while time.monotonic() < deadline:
                ask()
                asked += 1
        paced_count = round(p.efficiency_rate * p.efficiency_paced_s)
        with bs.CpuMeter(self.cpu) as paced:
            start = time.monotonic()
            for n in range(paced_count):
                time.sleep(max(0.0, start + n / p.efficiency_rate - time.monotonic()))  # the schedule
                ask()
        return looped.ms_per(asked).get(key, 0.0), paced.ms_per(paced_count).get(key, 0.0)

    # open loop: command latency and read-your-writes ----------------------------------------------------
    def paced(self) -> None:
        """Commands sent at a fixed rate (half creates, half PATCHes), each read back with min_version:
        the command's latency from its scheduled time, and the lag until the read side has it."""
        self.mark("paced")
        for rate in self.plan.paced_rates:
            bs.say(f"paced commands: {rate}/s for {self.plan.paced_s:.0f} s, each read back with min_version")
            plan = load.MixPlan(rate, rate, self.plan.paced_s, probe_every=1)
            paced = load.mix_summary(load.run_async(load.mixed(HOST, self.ports(), plan)))
            del paced["windows"]
            self.results[f"paced_{rate}"] = paced
            bs.say(f"paced {rate}/s: {paced}")
            bs.wait_until_projected()
            tail = f"; {paced['errors']} errors" if paced["errors"] else ""
            for path, what, target_at, target_ms in (
                (f"command latency @{rate} cmd/s (open loop)", "command", *TARGET_COMMAND_P99),
                (f"read-your-writes (min_version) @{rate} cmd/s", "lag", *TARGET_RYW_P99),
            ):
                p50, p99 = paced[f"{what}_p50_ms"], paced[f"{what}_p99_ms"]
                row = Row(path, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms{tail}")
                if rate == target_at:
                    ok = p99 < target_ms and not paced["errors"]
                    row = replace(row, target=f"p99 < {target_ms:.0f} ms", verdict=_verdict(ok))
                self.rows.append(row)

    # projection: the drain of a backlog, with each ordering ---------------------------------------------
    def drains(self) -> None:
        self.mark("drain")
        shipped = self.system.kafkasource_ordering
        for ordering in ("ordered", "unordered"):
            rate, cpu = self.drain(ordering)
            in_flight = "one" if ordering == "ordered" else str(kafkasource.UNORDERED_IN_FLIGHT)
            ships = ", kafka-source.yaml" if ordering == shipped else ""
            self.rows.append(
                _target(
                    f"drain {self.plan.backlog} events, ordering: {ordering} ({in_flight} in flight per "
                    f"partition{ships})",
                    f"{rate:.0f} events/s; CPU per event {cpu_said(cpu)}",
                    f">= {TARGET_DRAIN:,.0f}/s, <= {TARGET_DRAIN_CPU_MS:.0f} ms",
                    rate >= TARGET_DRAIN and cpu.get("machine", 0.0) <= TARGET_DRAIN_CPU_MS,
                )
            )
        self.system.start_kafkasource()  # back to kafka-source.yaml's ordering

    def drain(self, ordering: str) -> tuple[float, dict[str, float]]:
        """A backlog made through the API with the KafkaSource stopped, then drained with `ordering`:
        events per second and the CPU per event, from the first projected event to the last."""
        n = self.plan.backlog
        self.system.stop_kafkasource()
        ids = load.run_async(load.creates(HOST, self.port("create_todo"), n))
        first, last = min(ids), max(ids)
        while bs.pending_events():  # every event on the topic (the publisher follows each commit)
            time.sleep(0.05)
        started = time.monotonic()
        self.system.start_kafkasource(ordering)
        meter = bs.CpuMeter(self.cpu)  # from the first projected event: not the source's start-up
        first_seen = first_count = None
        count = 0
        while count < len(ids):
            if time.monotonic() - started > 300:
                raise RuntimeError(f"the backlog did not drain within 300 s ({count}/{n})")
            time.sleep(0.05)
            count = bs.count_read(first, last)
            if first_seen is None and count:
                first_seen, first_count = time.monotonic(), count
                meter.__enter__()
        meter.__exit__()
        assert first_seen is not None and first_count is not None
        rate = (count - first_count) / max(time.monotonic() - first_seen, 1e-6)
        cpu = meter.ms_per(count - first_count)
        self.results[f"drain_{ordering}"] = {
            "events": n,
            "events_per_s": round(rate, 1),
            "cpu_ms_per_event": cpu,
        }
        bs.say(f"drain {ordering}: {rate:.0f} events/s; CPU ms per event: {cpu}")
        return rate, cpu

    # overload: twice what the machine can do, mixed -----------------------------------------------------
    def overload(self) -> None:
        """Commands at the rate the machine saturates at with creates alone, plus reads at the rate it
        saturates at with cache hits alone (1 in 10 a miss): about twice its capacity. Asked: the hits
        still answered fast, the excess refused fast (503), no request waiting past 5 s."""
        self.mark("overload")
        p, url = self.plan, self.url
        bs.flush_cache()  # every seeded id past the hot ones is a miss again
        self.warm_hot_ids()
        post, hot = load.lua_post_json({"title": "capacity"}), load.lua_get_random(1, HOT_IDS)
        alone = {
            "commands": load.wrk_run(
                url("create_todo"), load.script(post, LUA_DIR), p.command_connections, 2
            ),
            "hits": load.wrk_run(url("get_todos"), load.script(hot, LUA_DIR), p.query_connections, 2),
        }
        bs.wait_until_projected()
        commands, reads = alone["commands"].rps, alone["hits"].rps
        misses = range(HOT_IDS + 1, p.seeded + 1)
        # The client allows 10 s, so that a wait past the 5 s asked is seen, not cut off.
        plan = load.MixPlan(commands, reads, p.overload_s, read_ids=HOT_IDS, misses=misses, miss_share=0.1)
        plan = replace(plan, read_in_flight=GET_TODOS_CONCURRENCY, timeout_s=2 * TARGET_OVERLOAD_WAIT_S)
        bs.say(
            f"overload: {commands:.0f} commands/s + {reads:.0f} reads/s for {p.overload_s:.0f} s, open loop"
        )
        r = load.overload_summary(load.run_async(load.mixed(HOST, self.ports(), plan)))
        self.results["overload"] = r | {"capacity_alone": {"commands_per_s": commands, "hits_per_s": reads}}
        bs.say(f"overload: {r}")
        bs.say(f"waiting for the projection to catch up ({bs.wait_until_projected()} s)")
        hit, longest, late = r["hit"], r["longest_wait_ms"], r["past_timeout"]
        self.rows += [
            _target(
                f"overload {p.overload_s:.0f} s, {commands:.0f} cmd/s + {reads:.0f} reads/s: cache hits",
                f"p50 {hit['p50_ms']:.1f} ms, p99 {hit['p99_ms']:.1f} ms; "
                f"{r['hit_answered'] * 100:.0f} % answered",
                f"p99 < {TARGET_OVERLOAD_HIT_P99_MS:.0f} ms",
                hit["p99_ms"] < TARGET_OVERLOAD_HIT_P99_MS,
            ),
            Row(
                "overload: the excess",
                f"{r['503'] * 100:.1f} % answered 503 by the functions (p99 {r['503_ms']['p99_ms']:.1f} ms), "
                f"{r['queue_refused'] * 100:.1f} % refused by the client's queue (queue-proxy's 503); "
                f"{r['ok_per_s']:.0f} of {r['per_s']:.0f} req/s answered 2xx",
            ),
            _target(
                "overload: the longest any request waited",
                f"{longest / 1000:.2f} s; {late} not answered within {plan.timeout_s:.0f} s",
                f"<= {TARGET_OVERLOAD_WAIT_S:.0f} s",
                longest <= TARGET_OVERLOAD_WAIT_S * 1000 and not late,
            ),
        ]

    # the soak: sustained mixed load ---------------------------------------------------------------------
    def soak(self) -> None:
        self.mark("soak")
        sp, ports = self.plan.soak, self.ports(consumer_lag=True)
        functions = {name: self.system.servers[name].pid for name in BY_NAME}
        if self.plan.soak_warmup_s:
            bs.say(f"soak warm-up: {self.plan.soak_warmup_s:.0f} s of the same mix (not counted)")
            load.run_async(load.mixed(HOST, ports, replace(sp, duration_s=self.plan.soak_warmup_s)))
            bs.wait_until_projected(30)
        bs.say(
            f"soak: {sp.duration_s:.0f} s of {sp.command_rate:.0f} commands/s + {sp.read_rate:.0f} reads/s, "
            f"open loop; every {sp.probe_every}th command read back with min_version"
        )
        rss_start = {name: bs.process_rss_mb(pid) for name, pid in functions.items()}
        with bs.CpuMeter(self.cpu) as meter:
            summary = load.mix_summary(load.run_async(load.mixed(HOST, ports, sp)))
        growth = {name: round(bs.process_rss_mb(pid) - rss_start[name], 1) for name, pid in functions.items()}
        summary["cores"] = meter.cores()
        summary["rss_start_mb"] = {name: round(mb, 1) for name, mb in rss_start.items()}
        summary["rss_growth_mb"] = growth
        converged = bs.wait_until_projected(SOAK_CATCH_UP_S)
        summary["converged_s_after_load"] = round(converged, 2) if converged is not None else None
        self.results["soak"] = self.soak_result = summary
        self.rows += soak_rows(summary)


def soak_rows(summary: dict[str, Any]) -> list[Row]:
    sp = summary["plan"]
    kinds = ", ".join(f"{kind}: {count}" for kind, count in summary["error_kinds"].items())
    after = summary["converged_s_after_load"]
    caught_up = (
        f"caught up {after:.1f} s after" if after is not None else f"not caught up {SOAK_CATCH_UP_S} s after"
    )
    lag_ok = max(summary["lag_p99_worst_window_ms"], summary["lag_p99_ms"]) < TARGET_SOAK_LAG_MS
    growth = summary["rss_growth_mb"]
    grew = max(growth, key=lambda name: growth[name])
    cores = summary["cores"]
    ours = sum(v for name, v in cores.items() if name in BY_NAME or name == "kafkasource")
    shared = sum(v for name, v in cores.items() if "(shared)" in name)
    return [
        Row(
            f"soak {sp['duration_s']:.0f} s: {sp['command_rate']:.0f} cmd/s + {sp['read_rate']:.0f} reads/s",
            f"answered in time {summary['ok_commands_per_s']:.0f} cmd/s, "
            f"{summary['ok_reads_per_s']:.0f} reads/s; command p99 {summary['command_p99_ms']:.1f} ms, "
            f"read p99 {summary['read_p99_ms']:.1f} ms; cores: functions {ours:.2f}, "
            f"MariaDB+Redis+Kafka {shared:.2f}, machine {cores.get('machine', 0):.2f}",
        ),
        _target(
            "soak errors",
            f"{summary['errors']}" + (f" ({kinds})" if kinds else ""),
            "0",
            summary["errors"] == 0,
        ),
        _target(
            f"soak projection lag (min_version, 1 in {sp['probe_every']} commands)",
            f"p99 {summary['lag_p99_ms']:.0f} ms, worst {sp['window_s']:.0f} s window "
            f"{summary['lag_p99_worst_window_ms']:.0f} ms; consumer lag max "
            f"{summary['consumer_lag_max']:.0f} records; {caught_up}",
            f"p99 < {TARGET_SOAK_LAG_MS / 1000:.0f} s in every window",
            lag_ok,
        ),
        _target(
            "soak RSS growth, every function",
            f"largest {growth[grew]:+.1f} MB ({grew})",
            f"< {TARGET_SOAK_GROWTH_MB:.0f} MB",
            growth[grew] < TARGET_SOAK_GROWTH_MB,
        ),
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in [header, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def soak_table(summary: dict[str, Any]) -> str:
    w = summary["plan"]["window_s"]
    header = ["window", "cmd/s sent / ok", "reads/s sent / ok", "command p99 ms", "read p99 ms"]
    header += ["lag p50 / p99 ms", "consumer lag", "errors"]
    rows = [
        [
            f"{i * w:.0f}-{(i + 1) * w:.0f} s",
            f"{win['commands_per_s']:.0f} / {win['ok_commands_per_s']:.0f}",
            f"{win['reads_per_s']:.0f} / {win['ok_reads_per_s']:.0f}",
            f"{win['command_p99_ms']:.1f}",
            f"{win['read_p99_ms']:.1f}",
            f"{win['lag_p50_ms']:.0f} / {win['lag_p99_ms']:.0f}",
            f"{win['consumer_lag_max']:.0f}",
            str(win["errors"]),
        ]
        for i, win in enumerate(summary["windows"])
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
    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split(" Copyright")[0]
    memory_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu[0].split(":", 1)[1].strip() if cpu else "?",
        "memory_gb": memory_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": wrk.strip(),
    }


PHASES = ["queries", "commands", "efficiency", "paced", "drains", "overload", "soak", "reconciliation"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every phase briefly (a smoke run)")
    parser.add_argument("--soak", action="store_true", help="only the sustained mixed load (make soak)")
    parser.add_argument("--soak-seconds", type=float, help="the soak's length (default 180)")
    parser.add_argument("--output", help="the JSON results file")
    parser.add_argument("--only", help=f"comma-separated phases of: {','.join(PHASES)} (default: all)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.soak_seconds:
        plan = replace(plan, soak=replace(plan.soak, duration_s=args.soak_seconds))
    chosen = ["soak"] if args.soak else args.only.split(",") if args.only else PHASES
    if unknown := set(chosen) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}; the phases are {','.join(PHASES)}")
    output = Path(args.output or (SOAK_RESULTS if args.soak else RESULTS))
    load.require_wrk()
    bs.check_isolated()
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends the run like Ctrl-C: through the finally

    started = time.monotonic()
    services_before = services.running_services()
    system = bs.BenchSystem()
    try:
        bs.say("services (shared, reused) and the bench's databases, Redis db, topic ...")
        services.ensure_services()
        bs.migrate()
        bs.reset_data()
        services.ensure_services()  # creates the bench topic again
        bs.say(f"seeding {plan.seeded} todos into the read DB ...")
        bs.seed_read_model(plan.seeded)
        system.start(None if args.soak else LIMITS, GATEWAY_PORT)
        bench = Bench(plan, system)
        for phase in PHASES:
            if phase in chosen and phase != "reconciliation":
                getattr(bench, phase)()
        if "reconciliation" in chosen:
            bench.results["reconciliation"] = reconciliation_passes()
        bench.mark("done")
        bench.results["loadavg"]["end"] = loadavg()
        elapsed = time.monotonic() - started
        fields = list(Row.__dataclass_fields__)
        print(markdown_table(fields, [[getattr(r, f) for f in fields] for r in bench.rows]), flush=True)
        if bench.soak_result:
            print("\n" + soak_table(bench.soak_result), flush=True)
        document = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "plan": plan,
            "server_env": run.SERVER_ENV,
            "kafkasource_ordering": system.kafkasource_ordering,
            "seconds": round(elapsed, 1),
            "table": [row.__dict__ for row in bench.rows],
            "results": bench.results,
        }
        output.write_text(json.dumps(document, indent=2, default=_as_json) + "\n")
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
        for step in (system.stop, lambda: _stop_services_started_here(services_before), _check_ports_free):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - report it and go on cleaning up
                bs.say(f"cleanup step failed: {exc!r}")


def _as_json(value: object) -> object:
    """The plan's dataclasses and ranges, in the results file."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)  # type: ignore[arg-type]


def _stop_services_started_here(before: list[str]) -> None:
    started_here = [name for name in services.running_services() if name not in before]
    if started_here:
        services.stop_services(started_here)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_ports_free() -> None:
    for port in [*range(9080, 9092), *(port for _, port in LIMITS.values())]:
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                bs.say(f"warning: something still listens on {HOST}:{port}")


if __name__ == "__main__":
    sys.exit(main())
