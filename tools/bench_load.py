"""Load generators of the bench: `wrk` (closed loop, fixed concurrency) driven by generated Lua scripts,
and an asyncio HTTP/1.1 client (tools/http1.py's keep-alive pools, on uvloop) for the open-loop loads:
paced commands read back with `min_version`, and the sustained mixed load of the soak. Open loop: every
request is sent at its scheduled time whatever the earlier ones are doing, and its latency counts from
that time (no coordinated omission). Local tooling only.
"""

from __future__ import annotations

import asyncio
import json
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


def lua_get_sequence(lo: int, hi: int) -> str:
    """GET /{id} with ids lo, lo+1, ... (each read once per run while the run stays below hi-lo ids)."""
    return (
        f"local n = {lo - 1}\n"
        "request = function()\n"
        f"  n = n + 1; if n > {hi} then n = {lo} end\n"
        '  return wrk.format("GET", "/" .. n)\n'
        "end\n"
    )


def lua_get_paths(paths: Sequence[str]) -> str:
    """GET one of the given paths at random (deep list pages)."""
    table = ", ".join(json.dumps(p) for p in paths)
    return (
        f"math.randomseed({random.randrange(1 << 30)})\n"
        f"local paths = {{{table}}}\n"
        'request = function() return wrk.format("GET", paths[math.random(#paths)]) end\n'
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

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "runs": [asdict(r) for r in self.runs]}


@dataclass(frozen=True)
class Load:
    """One closed-loop load: where, what (a Lua script), how many connections, what to do before a run."""

    url: str
    lua: str
    connections: int
    before_each: Callable[[], None] | None = None


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


def _script(load: Load, script_dir: Path) -> Path:
    script_dir.mkdir(parents=True, exist_ok=True)
    script = script_dir / f"load-{abs(hash(load.lua))}.lua"
    script.write_text(load.lua + _DONE)
    return script


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
    scripts = {name: _script(load, script_dir) for name, load in loads.items()}
    names = list(loads)
    if warmup_s:
        for name in names:
            load = loads[name]
            if load.before_each:
                load.before_each()
            wrk_run(load.url, scripts[name], load.connections, warmup_s)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    cpu: dict[str, dict[str, float]] = {name: {} for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            load = loads[name]
            if load.before_each:
                load.before_each()
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


def run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run the client on uvloop, as the functions run: the client's own cost stays small."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned with the functions' server
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def read_back(
    client: HttpClient, todo_id: int, version: int, since: float, timeout_s: float = 15.0
) -> tuple[float | None, int]:
    """Read-your-writes: GET /{id}?min_version=<version> until 200 (get_todos waits server-side, then
    answers 503 and is asked again). Returns (ms from `since` until visible, or None; 503s seen)."""
    path = f"/{todo_id}?min_version={version}"
    not_yet = 0
    while time.monotonic() - since < timeout_s:
        try:
            read = await client.request("GET", path)
        except CLIENT_ERRORS:
            return None, not_yet
        if read.status == 200:
            return (time.monotonic() - since) * 1000, not_yet
        if read.status != 503:
            return None, not_yet
        not_yet += 1
    return None, not_yet


@dataclass
class PacedResult:
    rate: float
    sent: int
    command_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    command_errors: int = 0
    not_yet_consistent: int = 0  # 503 answers to min_version reads (asked again until visible)
    lag_failures: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "rate_per_s": self.rate,
            "sent": self.sent,
            "command_p50_ms": _ms(self.command_ms, 50),
            "command_p99_ms": _ms(self.command_ms, 99),
            "lag_p50_ms": _ms(self.lag_ms, 50),
            "lag_p99_ms": _ms(self.lag_ms, 99),
            "lag_max_ms": _ms(self.lag_ms, 100),
            "command_errors": self.command_errors,
            "not_yet_consistent_503": self.not_yet_consistent,
            "lag_failures": self.lag_failures,
        }


async def paced_commands(host: str, ports: dict[str, int], rate: float, duration_s: float) -> PacedResult:
    """Open loop: command i is sent at t0 + i/rate, half creates, half PATCHes of todos created earlier;
    each answer is read back with min_version. Lag: from the command's 2xx until that read answers 200."""
    clients = {name: HttpClient(host, port) for name, port in ports.items()}
    clients["get"] = HttpClient(host, ports["get"], PROBE_IN_FLIGHT)
    result = PacedResult(rate=rate, sent=0)
    created: list[int] = []

    async def one(i: int, scheduled: float) -> None:
        try:
            if i % 2 == 0 or not created:
                answer = await clients["create"].request("POST", "/", {"title": f"paced {i}"})
            else:
                target = random.choice(created)
                answer = await clients["update"].request("PATCH", f"/{target}", {"title": f"paced {i}"})
        except CLIENT_ERRORS:
            result.command_errors += 1
            return
        done = time.monotonic()
        if answer.status not in (200, 201):
            result.command_errors += 1
            return
        result.command_ms.append((done - scheduled) * 1000)
        todo = answer.json()
        if answer.status == 201:
            created.append(todo["id"])
        lag, not_yet = await read_back(clients["get"], todo["id"], todo["version"], done)
        result.not_yet_consistent += not_yet
        if lag is None:
            result.lag_failures += 1
        else:
            result.lag_ms.append(lag)

    t0 = time.monotonic() + 0.05
    tasks = []
    for i in range(int(rate * duration_s)):
        scheduled = t0 + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        tasks.append(asyncio.create_task(one(i, scheduled)))
        result.sent += 1
    await asyncio.gather(*tasks)
    for client in clients.values():
        client.close()
    return result


async def paced_posts(
    host: str, port: int, rate: float, duration_s: float, patch_ids: Sequence[int] = ()
) -> int:
    """Open loop, nothing read back: a create (or, with `patch_ids`, a PATCH of one of them) sent at
    t0 + i/rate; returns how many answered 2xx."""
    client = HttpClient(host, port)
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        try:
            if patch_ids:
                answer = await client.request(
                    "PATCH", f"/{random.choice(patch_ids)}", {"title": f"paced {i}"}
                )
            else:
                answer = await client.request("POST", "/", {"title": f"paced {i}"})
        except CLIENT_ERRORS:
            return
        ok += answer.status in (200, 201)

    t0 = time.monotonic() + 0.05
    tasks = []
    for i in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    client.close()
    return ok


# --- the soak: sustained mixed load ----------------------------------------------------------------------


@dataclass
class Window:
    """What happened to the requests scheduled in one window of the soak."""

    commands: int = 0
    reads: int = 0
    command_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)
    not_yet_consistent: int = 0
    client_late_ms: list[float] = field(default_factory=list)  # how late the client's ticks woke up
    consumer_lag_max: float = 0.0  # records behind, summed over partitions (the KafkaSource's gauge)

    def error(self, kind: str, detail: object = None) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if detail is not None and kind not in self.error_samples:
            self.error_samples[kind] = f"{detail!s:.200}"  # the first of each kind

    def summary(self, window_s: float) -> dict[str, Any]:
        return {
            "commands_per_s": round(self.commands / window_s, 1),
            "reads_per_s": round(self.reads / window_s, 1),
            "ok_commands_per_s": round(len(self.command_ms) / window_s, 1),
            "ok_reads_per_s": round(len(self.read_ms) / window_s, 1),
            "command_p50_ms": _ms(self.command_ms, 50),
            "command_p99_ms": _ms(self.command_ms, 99),
            "read_p50_ms": _ms(self.read_ms, 50),
            "read_p99_ms": _ms(self.read_ms, 99),
            "lag_samples": len(self.lag_ms),
            "lag_p50_ms": _ms(self.lag_ms, 50),
            "lag_p99_ms": _ms(self.lag_ms, 99),
            "lag_max_ms": _ms(self.lag_ms, 100),
            "consumer_lag_max": self.consumer_lag_max,
            "not_yet_consistent_503": self.not_yet_consistent,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "error_samples": self.error_samples,
            "client_late_p99_ms": _ms(self.client_late_ms, 99),
            "client_late_max_ms": _ms(self.client_late_ms, 100),
        }


@dataclass(frozen=True)
class SoakPlan:
    command_rate: float = 250.0  # half creates, half PATCHes
    read_rate: float = 600.0  # plain GET /{id}, plus the lag probes, together
    probe_every: int = 5  # every n-th command is read back with min_version: its projection lag
    duration_s: float = 180.0
    window_s: float = 10.0
    seeded_ids: int = 10_000  # ids 1..n exist in the read model (seeded by the bench)
    timeout_s: float = 5.0  # a command or read not answered this long after its scheduled time failed
    max_in_flight: int = 5000  # beyond it the client counts an error instead of piling up tasks


@dataclass
class SoakResult:
    plan: SoakPlan
    windows: list[Window]
    sent_commands: int = 0
    sent_reads: int = 0
    seconds: float = 0.0
    client_cpu_s: float = 0.0  # CPU time the load generator itself used
    pressure: list[dict[str, Any]] = field(default_factory=list)

    def all(self, name: str) -> list[float]:
        return [v for w in self.windows for v in getattr(w, name)]

    def summary(self) -> dict[str, Any]:
        w = self.plan.window_s
        lag = self.all("lag_ms")
        per_window = [win.summary(w) for win in self.windows]
        worst = max((s["lag_p99_ms"] for s in per_window if s["lag_samples"]), default=float("nan"))
        return {
            "plan": asdict(self.plan),
            "seconds": round(self.seconds, 1),
            "commands_per_s": round(self.sent_commands / self.plan.duration_s, 1),
            "reads_per_s": round(self.sent_reads / self.plan.duration_s, 1),
            "command_p50_ms": _ms(self.all("command_ms"), 50),
            "command_p99_ms": _ms(self.all("command_ms"), 99),
            "read_p50_ms": _ms(self.all("read_ms"), 50),
            "read_p99_ms": _ms(self.all("read_ms"), 99),
            "ok_commands_per_s": round(len(self.all("command_ms")) / self.plan.duration_s, 1),
            "ok_reads_per_s": round(len(self.all("read_ms")) / self.plan.duration_s, 1),
            "lag_samples": len(lag),
            "lag_p50_ms": _ms(lag, 50),
            "lag_p99_ms": _ms(lag, 99),
            "lag_max_ms": _ms(lag, 100),
            "lag_p99_worst_window_ms": worst,
            "consumer_lag_max": max((win.consumer_lag_max for win in self.windows), default=0.0),
            "errors": sum(win.errors for win in self.windows),
            "error_samples": {k: v for win in reversed(self.windows) for k, v in win.error_samples.items()},
            "client_late_p99_ms": _ms(self.all("client_late_ms"), 99),
            "client_cpu_cores": round(self.client_cpu_s / max(self.seconds, 1e-6), 2),
            "not_yet_consistent_503": sum(win.not_yet_consistent for win in self.windows),
            "windows": per_window,
            "pressure": self.pressure,
        }


async def soak(
    host: str,
    ports: dict[str, int],
    plan: SoakPlan,
    *,
    on_second: Callable[[float], dict[str, Any]] | None = None,
) -> SoakResult:
    """Open-loop mixed load for plan.duration_s: commands (creates and PATCHes of todos created during the
    soak) and reads (GET /{id} of seeded todos, and of created ones already seen on the read side), each
    sent at its scheduled time. Every plan.probe_every-th command is read back with min_version: its lag.
    Every second the KafkaSource's consumer lag is scraped (ports["kafkasource_metrics"]) and
    `on_second(elapsed)` may record what it wants (the bench samples memory)."""
    clients = {name: HttpClient(host, port) for name, port in ports.items()}
    # Probes wait server-side (min_version) at little cost: their own, wide client, not the reads' slots.
    clients["probe"] = HttpClient(host, ports["get"], PROBE_IN_FLIGHT)
    windows = [Window() for _ in range(int(plan.duration_s / plan.window_s + 0.999))]
    result = SoakResult(plan, windows)
    created: list[int] = []
    visible: list[int] = []
    in_flight = 0
    probe_rate = plan.command_rate / plan.probe_every
    plain_read_rate = max(1.0, plan.read_rate - probe_rate)
    t0 = time.monotonic() + 0.1

    def window(scheduled: float) -> Window:
        return windows[min(len(windows) - 1, int((scheduled - t0) / plan.window_s))]

    async def command(i: int, scheduled: float) -> None:
        nonlocal in_flight
        win = window(scheduled)
        try:
            timeout_s = scheduled + plan.timeout_s - time.monotonic()
            if i % 2 == 0 or not created:
                answer = await clients["create"].request("POST", "/", {"title": f"soak {i}"}, timeout_s)
            else:
                target = created[-1 - int(random.random() ** 2 * min(len(created), 2000))]
                body = {"title": f"soak {i}"}
                answer = await clients["update"].request("PATCH", f"/{target}", body, timeout_s)
        except CLIENT_ERRORS as exc:
            win.error(f"command {type(exc).__name__}", exc)
            return
        finally:
            in_flight -= 1
        done = time.monotonic()
        if answer.status not in (200, 201):
            win.error(f"command {answer.status}", answer.body[:200])
            return
        if done - scheduled > plan.timeout_s:  # a cancellation the client lost in a race: still too late
            win.error("command TimeoutError", f"answered {done - scheduled:.1f} s after its time")
            return
        win.command_ms.append((done - scheduled) * 1000)
        todo = answer.json()
        if answer.status == 201:
            created.append(todo["id"])
        if i % plan.probe_every == 0:
            lag, not_yet = await read_back(clients["probe"], todo["id"], todo["version"], done)
            win.not_yet_consistent += not_yet
            if lag is None:
                win.error("lag probe never visible")
            else:
                win.lag_ms.append(lag)
                visible.append(todo["id"])

    async def read(scheduled: float) -> None:
        nonlocal in_flight
        win = window(scheduled)
        if visible and random.random() < 0.5:
            todo_id = visible[-1 - int(random.random() * min(len(visible), 2000))]
        else:
            todo_id = random.randint(1, plan.seeded_ids)
        try:
            timeout_s = scheduled + plan.timeout_s - time.monotonic()
            answer = await clients["get"].request("GET", f"/{todo_id}", None, timeout_s)
        except CLIENT_ERRORS as exc:
            win.error(f"read {type(exc).__name__}", exc)
            return
        finally:
            in_flight -= 1
        if answer.status != 200:
            win.error(f"read {answer.status}", answer.body[:200])
            return
        took = time.monotonic() - scheduled
        if took > plan.timeout_s:  # a cancellation the client lost in a race: still too late
            win.error("read TimeoutError", f"answered {took:.1f} s after its time")
            return
        win.read_ms.append(took * 1000)

    async def scrape(elapsed: float) -> None:
        try:
            answer = await clients["kafkasource_metrics"].request("GET", "/metrics", None, 2.0)
        except CLIENT_ERRORS:
            return
        samples = pipeline.parse_exposition(answer.body.decode())
        behind = sum(v for name, _, v in samples if name == "todo_kafkasource_consumer_lag")
        win = windows[min(len(windows) - 1, int(elapsed / plan.window_s))]
        win.consumer_lag_max = max(win.consumer_lag_max, behind)

    tasks: set[asyncio.Task[None]] = set()

    def launch(coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    n_commands = n_reads = 0
    cpu_before = time.process_time()
    next_second = 1.0
    end = t0 + plan.duration_s
    while True:
        now = time.monotonic()
        if now >= end:
            break
        # Everything whose time has come, each with its own scheduled time (a late tick sends a burst).
        while t0 + n_commands / plan.command_rate <= now:
            scheduled = t0 + n_commands / plan.command_rate
            win = window(scheduled)
            win.commands += 1
            if n_commands % plan.probe_every == 0:
                win.reads += 1  # its read-back
            if in_flight >= plan.max_in_flight:
                win.error("client: too many in flight")
            else:
                in_flight += 1
                launch(command(n_commands, scheduled))
            n_commands += 1
        while t0 + n_reads / plain_read_rate <= now:
            scheduled = t0 + n_reads / plain_read_rate
            window(scheduled).reads += 1
            if in_flight >= plan.max_in_flight:
                window(scheduled).error("client: too many in flight")
            else:
                in_flight += 1
                launch(read(scheduled))
            n_reads += 1
        if now - t0 >= next_second:
            launch(scrape(now - t0))
            if on_second is not None:
                result.pressure.append(on_second(now - t0))
            next_second += 1.0
        await asyncio.sleep(TICK_S)
        if time.monotonic() < end:
            window(time.monotonic()).client_late_ms.append((time.monotonic() - now - TICK_S) * 1000)
    result.sent_commands = n_commands
    result.sent_reads = n_reads + n_commands // plan.probe_every
    await asyncio.gather(*list(tasks))
    result.seconds = time.monotonic() - t0
    result.client_cpu_s = time.process_time() - cpu_before
    for client in clients.values():
        client.close()
    return result
