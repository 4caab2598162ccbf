"""Load generators of the bench: `wrk` (closed loop, fixed concurrency) driven by generated Lua scripts,
and an asyncio HTTP/1.1 client (tools/http1.py's keep-alive pools, on uvloop) for the open-loop loads:
paced commands read back with `min_version`, and the mixed loads of the soak and the overload. Open
loop: every request is sent at its scheduled time whatever the earlier ones are doing, and its latency
counts from that time (no coordinated omission). Local tooling only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools import http1, pipeline

WRK_TIMEOUT_S = 5
TICK_S = 0.002  # the open-loop client's scheduling tick
MAX_IN_FLIGHT_PER_TARGET = 32  # requests the open-loop client has in flight per function at most
QUEUE_PER_SLOT = 10  # queue-proxy's breaker queues 10 x containerConcurrency requests
PROBE_IN_FLIGHT = 1024  # min_version reads in flight at most (each mostly waits server-side)
_MARK = "BENCH-RESULT "

# Printed by wrk once the run is over: one JSON line the bench parses (latencies in microseconds).
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"status_errors":%d,"socket_errors":%d}\\n',
    "MARK", summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
""".replace("MARK", _MARK)


def lua_get_random(lo: int, hi: int, prefix: str = "/") -> str:
    """GET {prefix}{id} with an id drawn uniformly from [lo, hi]."""
    return (
        f"math.randomseed({random.randrange(1 << 30)})\n"
        f'request = function() return wrk.format("GET", "{prefix}" .. math.random({lo}, {hi})) end\n'
    )


def lua_post_json(body: dict[str, Any]) -> str:
    """POST to the URL's path with a fixed JSON body."""
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


def lua_patch_random(lo: int, hi: int, prefix: str = "/") -> str:
    """PATCH {prefix}{id} (id uniform in [lo, hi]) with a new title every time: every request is a change."""
    return (
        f"math.randomseed({random.randrange(1 << 30)})\n"
        "local n = 0\n"
        'local headers = {["Content-Type"] = "application/json"}\n'
        "request = function()\n"
        "  n = n + 1\n"
        f'  return wrk.format("PATCH", "{prefix}" .. math.random({lo}, {hi}), headers, '
        "'{\"title\":\"patched ' .. n .. '\"}')\n"
        "end\n"
    )


@dataclass(frozen=True)
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


@dataclass
class Series:
    """Repeats of one load: the median of each figure, and every run."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    runs: list[Run] = field(default_factory=list)
    # CPU ms per request, per process (the function, its dependencies, wrk), over every run: what the
    # request costs whatever the machine's other load (docs/performance.md: reading the figures)
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, runs: list[Run], cpu_s: dict[str, float] | None = None) -> Series:
        requests = max(1, sum(r.requests for r in runs))
        cpu = {name: round(s * 1000 / requests, 3) for name, s in (cpu_s or {}).items()}
        return cls(
            rps=statistics.median(r.rps for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            errors=sum(r.errors for r in runs),
            runs=runs,
            cpu_ms_per_request={name: ms for name, ms in cpu.items() if ms >= 0.005},
        )


@dataclass(frozen=True)
class Load:
    """One closed-loop load: where, what (a Lua script), how many connections."""

    url: str
    lua: str
    connections: int


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: `apt-get install wrk` (Debian package)")
    return wrk


def wrk_run(url: str, script: Path, connections: int, duration_s: float) -> Run:
    seconds = max(1, round(duration_s))
    argv = [require_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={WRK_TIMEOUT_S}s"]
    result = subprocess.run([*argv, "-s", str(script), url], capture_output=True, text=True, check=True)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(_MARK)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{result.stdout}\n{result.stderr}")
    data = json.loads(line[len(_MARK) :])
    return Run(
        rps=round(data["requests"] / (data["duration_us"] / 1e6), 1),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        requests=data["requests"],
        errors=data["status_errors"] + data["socket_errors"],
    )


def script(lua: str, script_dir: Path) -> Path:
    """The Lua script of a load, with the result printer wrk runs at its end."""
    script_dir.mkdir(parents=True, exist_ok=True)
    path = script_dir / f"load-{abs(hash(lua))}.lua"
    path.write_text(lua + _DONE)
    return path


def wrk_interleaved(
    loads: dict[str, Load],
    script_dir: Path,
    *,
    repeats: int,
    duration_s: float,
    warmup_s: float = 1.0,
    cpu_sample: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Series]:
    """A warm-up of each load, then `repeats` rounds running each load once, in an order rotated every
    round: loads compared with each other see the same drift of a shared, noisy machine. Medians; and,
    with `cpu_sample` (cumulative CPU seconds per process), the CPU each load's requests cost."""
    scripts = {name: script(load.lua, script_dir) for name, load in loads.items()}
    names = list(loads)
    if warmup_s:
        for name in names:
            wrk_run(loads[name].url, scripts[name], loads[name].connections, warmup_s)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    cpu: dict[str, dict[str, float]] = {name: {} for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            load = loads[name]
            before = cpu_sample() if cpu_sample else {}
            runs[name].append(wrk_run(load.url, scripts[name], load.connections, duration_s))
            after = cpu_sample() if cpu_sample else {}
            for process in after.keys() & before.keys():
                cpu[name][process] = cpu[name].get(process, 0.0) + after[process] - before[process]
    return {name: Series.of(r, cpu[name]) for name, r in runs.items()}


# --- the asyncio client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """Keep-alive HTTP/1.1 to one host:port (tools/http1.py's pool): a request takes an idle connection
    or opens another, so an open-loop load is never queued behind the client's own pool."""

    _JSON = ((b"Content-Type", b"application/json"),)

    def __init__(self, host: str, port: int, max_in_flight: int = MAX_IN_FLIGHT_PER_TARGET) -> None:
        self.pool = http1.Pool(host, port)
        # A proxy in front of a pod bounds what reaches it (queue-proxy: containerConcurrency, and a queue
        # of 10x that); beyond the bound requests wait here, their latency still counted from their
        # scheduled time, and beyond the queue they are refused at once (Overloaded), as queue-proxy's
        # breaker answers 503: an overloaded function then still serves what it can, instead of working
        # on requests whose senders have given up.
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_waiting = QUEUE_PER_SLOT * max_in_flight
        self._waiting = 0

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 10.0
    ) -> Response:
        """One request; TimeoutError when it is not answered within timeout_s, waiting for a slot included."""
        payload = json.dumps(body).encode() if body is not None else None
        request = http1.encode_request(
            method, path, self._JSON if payload is not None else (), payload, self.pool.host_header
        )
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise Overloaded(f"{self._waiting} requests already wait for this function")
        async with asyncio.timeout(timeout_s):
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                # Only a GET is sent again when a kept-alive connection turns out closed: never a command.
                answer = await self.pool.request(request, timeout_s=timeout_s, retry=method == "GET")
            finally:
                self._slots.release()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in answer.headers}
        return Response(answer.status, headers, answer.body)

    def close(self) -> None:
        self.pool.close()


class Overloaded(Exception):
    """The client's queue for a function is full: the request is refused without being sent."""


CLIENT_ERRORS = (http1.UpstreamError, TimeoutError, OSError, Overloaded)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _ms(values: Sequence[float], pct: float) -> float:
    return round(percentile(values, pct), 2)


def _summary(ms: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": _ms(ms, 50), "p99_ms": _ms(ms, 99), "max_ms": _ms(ms, 100)}


def run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run the client on uvloop, as the functions run: the client's own cost stays small."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned with the functions' server
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def read_back(
    client: HttpClient, todo_id: int, version: int, since: float, timeout_s: float = 15.0
) -> float | None:
    """Read-your-writes: GET /{id}?min_version=<version> until 200 (get_todos waits server-side, then
    answers 503 and is asked again). Returns the ms from `since` until it was visible, or None."""
    path = f"/{todo_id}?min_version={version}"
    while time.monotonic() - since < timeout_s:
        try:
            read = await client.request("GET", path)
        except CLIENT_ERRORS:
            return None
        if read.status == 200:
            return (time.monotonic() - since) * 1000
        if read.status != 503:
            return None
    return None


async def creates(host: str, port: int, count: int, concurrency: int = 8) -> list[int]:
    """`count` todos created through the API, `concurrency` at a time; their ids."""
    client = HttpClient(host, port)
    ids: list[int] = []

    async def worker() -> None:
        while len(ids) < count:
            answer = await client.request("POST", "/", {"title": f"backlog {len(ids)}"})
            if answer.status == 201:
                ids.append(answer.json()["id"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    client.close()
    return ids


# --- open-loop loads: paced commands, the overload, the soak -------------------------------------------


@dataclass(frozen=True)
class MixPlan:
    """An open-loop mix of commands (half creates, half PATCHes of todos it created) and reads."""

    command_rate: float
    read_rate: float  # the min_version probes included
    duration_s: float
    commands: str = "create,patch"  # or only one of them
    patch_ids: range = range(0)  # todos to PATCH besides those it created
    read_ids: int = 10_000  # plain reads: ids 1..read_ids (seeded into the read model, and cached)
    misses: range = range(0)  # reads of these ids, once each in turn (never cached before): the misses
    miss_share: float = 0.0  # of the plain reads
    probe_every: int = 0  # every n-th command read back with min_version (0: none): its projection lag
    read_in_flight: int = MAX_IN_FLIGHT_PER_TARGET  # get_todos' requests in flight at most
    timeout_s: float = 5.0  # a request not answered this long after its scheduled time failed
    window_s: float = 10.0


@dataclass(frozen=True)
class Outcome:
    """One request of a mix: its kind (create, patch, hit, miss, read, probe), when it was due (s from
    the start), how long from then until its answer (ms), and what it got: a status, `cache:<X-Cache>`
    for a 200 read, or the client's error (Overloaded: refused by the client's queue, queue-proxy's 503)."""

    kind: str
    at_s: float
    ms: float
    result: str

    @property
    def ok(self) -> bool:
        return self.result in ("200", "201") or self.result.startswith("cache:")


@dataclass
class MixResult:
    plan: MixPlan
    outcomes: list[Outcome] = field(default_factory=list)
    consumer_lag: list[tuple[float, float]] = field(default_factory=list)  # (s, records behind)
    client_cpu_s: float = 0.0


async def mixed(host: str, ports: dict[str, int], plan: MixPlan) -> MixResult:
    """Open-loop mix for plan.duration_s, each request sent at its scheduled time. Reads: GET /{id} of an
    id in 1..read_ids, or of a todo already seen on the read side, or (miss_share of them) the next id of
    plan.misses. Every second the KafkaSource's consumer lag is scraped (ports["kafkasource_metrics"])."""
    clients = {name: HttpClient(host, port) for name, port in ports.items()}
    clients["get"] = HttpClient(host, ports["get"], plan.read_in_flight)
    # Probes wait server-side (min_version) at little cost: their own, wide client, not the reads' slots.
    clients["probe"] = HttpClient(host, ports["get"], PROBE_IN_FLIGHT)
    result = MixResult(plan)
    created = list(plan.patch_ids)
    visible: list[int] = []
    misses = iter(plan.misses)
    probes = plan.command_rate / plan.probe_every if plan.probe_every else 0.0
    read_rate = plan.read_rate - probes
    t0 = time.monotonic() + 0.1

    def record(kind: str, scheduled: float, result_: str) -> None:
        result.outcomes.append(Outcome(kind, scheduled - t0, (time.monotonic() - scheduled) * 1000, result_))

    async def send(
        kind: str, client: str, method: str, path: str, scheduled: float, body: Any = None
    ) -> Response | None:
        """The request, its outcome recorded; the answer when it is a 2xx in time, else None."""
        try:
            answer = await clients[client].request(
                method, path, body, scheduled + plan.timeout_s - time.monotonic()
            )
        except CLIENT_ERRORS as exc:
            record(kind, scheduled, type(exc).__name__)
            return None
        status = str(answer.status)
        if status == "200" and method == "GET":
            status = f"cache:{answer.headers.get('x-cache', '-')}"
        if time.monotonic() - scheduled > plan.timeout_s:  # a cancellation the client lost in a race
            status = "TimeoutError"
        record(kind, scheduled, status)
        return answer if status in ("201", "200") else None

    async def command(i: int, scheduled: float) -> None:
        if "patch" not in plan.commands or ("create" in plan.commands and i % 2 == 0) or not created:
            answer = await send("create", "create", "POST", "/", scheduled, {"title": f"mix {i}"})
        else:
            target = created[-1 - int(random.random() ** 2 * min(len(created), 2000))]
            answer = await send("patch", "update", "PATCH", f"/{target}", scheduled, {"title": f"mix {i}"})
        if answer is None:
            return
        todo = answer.json()
        if answer.status == 201:
            created.append(todo["id"])
        if plan.probe_every and i % plan.probe_every == 0:
            done = time.monotonic()
            lag = await read_back(clients["probe"], todo["id"], todo["version"], done, plan.timeout_s * 3)
            result.outcomes.append(Outcome("probe", done - t0, lag or 0.0, "200" if lag else "never visible"))
            if lag:
                visible.append(todo["id"])

    async def read(scheduled: float) -> None:
        draw = random.random()
        todo_id = next(misses, None) if draw < plan.miss_share else None
        if todo_id is not None:
            kind = "miss"
        elif visible and draw > 0.5:
            kind, todo_id = "read", visible[-1 - int(random.random() * min(len(visible), 2000))]
        else:
            kind, todo_id = ("hit" if plan.misses else "read"), random.randint(1, plan.read_ids)
        await send(kind, "get", "GET", f"/{todo_id}", scheduled)

    async def scrape(elapsed: float) -> None:
        with contextlib.suppress(*CLIENT_ERRORS):
            answer = await clients["kafkasource_metrics"].request("GET", "/metrics", None, 2.0)
            samples = pipeline.parse_exposition(answer.body.decode())
            behind = sum(v for name, _, v in samples if name == "todo_kafkasource_consumer_lag")
            result.consumer_lag.append((elapsed, behind))

    # What may be in flight is bounded by the clients (their queues refuse the excess at once).
    tasks: set[asyncio.Task[None]] = set()

    def launch(coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    n_commands = n_reads = 0
    cpu_before = time.process_time()
    next_second = 1.0
    end = t0 + plan.duration_s
    while (now := time.monotonic()) < end:
        # Everything whose time has come, each with its own scheduled time (a late tick sends a burst).
        while (scheduled := t0 + n_commands / plan.command_rate) <= now:
            launch(command(n_commands, scheduled))
            n_commands += 1
        while read_rate > 0 and (scheduled := t0 + n_reads / read_rate) <= now:
            launch(read(scheduled))
            n_reads += 1
        if "kafkasource_metrics" in clients and now - t0 >= next_second:
            launch(scrape(now - t0))
            next_second += 1.0
        await asyncio.sleep(TICK_S)
    await asyncio.gather(*list(tasks))
    result.client_cpu_s = time.process_time() - cpu_before
    for client in clients.values():
        client.close()
    return result


def mix_summary(result: MixResult) -> dict[str, Any]:
    """Per window and overall: what was sent and answered in time, p99s, the projection lag (probes), the
    KafkaSource's consumer lag, the errors by kind."""
    plan = result.plan

    def figures(outcomes: list[Outcome], span_s: float) -> dict[str, Any]:
        commands = [o for o in outcomes if o.kind in ("create", "patch")]
        reads = [o for o in outcomes if o.kind in ("read", "probe")]
        lag = [o.ms for o in outcomes if o.kind == "probe" and o.ok]
        errors: dict[str, int] = {}
        for o in outcomes:
            if not o.ok:
                kind = f"{'read' if o.kind in ('read', 'probe') else 'command'} {o.result}"
                errors[kind] = errors.get(kind, 0) + 1
        return {
            "commands_per_s": round(len(commands) / span_s, 1),
            "reads_per_s": round(len(reads) / span_s, 1),
            "ok_commands_per_s": round(sum(o.ok for o in commands) / span_s, 1),
            "ok_reads_per_s": round(sum(o.ok for o in reads) / span_s, 1),
            "command_p50_ms": _ms([o.ms for o in commands if o.ok], 50),
            "command_p99_ms": _ms([o.ms for o in commands if o.ok], 99),
            "read_p99_ms": _ms([o.ms for o in reads if o.ok and o.kind == "read"], 99),
            "lag_p50_ms": _ms(lag, 50),
            "lag_p99_ms": _ms(lag, 99),
            "ok_commands": sum(o.ok for o in commands),
            "errors": sum(errors.values()),
            "error_kinds": errors,
        }

    windows = []
    for start in range(0, int(plan.duration_s + 0.999), int(plan.window_s)):
        inside = [o for o in result.outcomes if start <= o.at_s < start + plan.window_s]
        window = figures(inside, min(plan.window_s, plan.duration_s - start))
        behind = [n for t, n in result.consumer_lag if start <= t < start + plan.window_s]
        window["consumer_lag_max"] = max(behind, default=0.0)
        windows.append(window)
    overall = figures(result.outcomes, plan.duration_s)
    return {
        "plan": asdict(plan),
        **overall,
        "lag_p99_worst_window_ms": max(
            (w["lag_p99_ms"] for w in windows if not math.isnan(w["lag_p99_ms"])), default=float("nan")
        ),
        "consumer_lag_max": max((n for _, n in result.consumer_lag), default=0.0),
        "client_cpu_cores": round(result.client_cpu_s / plan.duration_s, 2),
        "windows": windows,
    }


def overload_summary(result: MixResult) -> dict[str, Any]:
    """The overload's figures: the cache hits' latency, how the excess was refused (503s from the
    functions, and refusals of the client's queue, as queue-proxy's breaker answers 503), and the longest
    any request waited for its answer."""
    outcomes = [o for o in result.outcomes if o.kind != "probe"]
    hits = [o for o in outcomes if o.kind == "hit"]
    refused = [o for o in outcomes if o.result == "503"]
    queue_full = [o for o in outcomes if o.result == "Overloaded"]
    late = [o for o in outcomes if o.result == "TimeoutError"]
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        counts = by_kind.setdefault(o.kind, {})
        counts[o.result] = counts.get(o.result, 0) + 1
    return {
        "plan": asdict(result.plan),
        "requests": len(outcomes),
        "per_s": round(len(outcomes) / result.plan.duration_s, 1),
        "hit_answered": round(sum(o.result == "cache:hit" for o in hits) / max(1, len(hits)), 3),
        "hit": _summary([o.ms for o in hits if o.result == "cache:hit"]),
        "503": round(len(refused) / max(1, len(outcomes)), 3),  # shares of the requests
        "503_ms": _summary([o.ms for o in refused]),
        "queue_refused": round(len(queue_full) / max(1, len(outcomes)), 3),
        "ok_per_s": round(sum(o.ok for o in outcomes) / result.plan.duration_s, 1),
        "longest_wait_ms": _ms([o.ms for o in outcomes], 100),
        "past_timeout": len(late),
        "by_kind": by_kind,
        "client_cpu_cores": round(result.client_cpu_s / result.plan.duration_s, 2),
    }
