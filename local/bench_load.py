"""Load generators of the bench: `wrk` (closed loop, fixed concurrency) driven by generated Lua scripts,
and a small asyncio HTTP/1.1 client for open-loop paced commands and the projection lag. Local tooling.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WRK_TIMEOUT_S = 5
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


def lua_get_random(lo: int, hi: int, query: str = "") -> str:
    """GET /{id} with an id drawn uniformly from [lo, hi]."""
    return (
        f"math.randomseed({random.randrange(1 << 30)})\n"
        f'request = function() return wrk.format("GET", "/" .. math.random({lo}, {hi}) .. "{query}") end\n'
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
    """POST / with a fixed JSON body."""
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


def lua_patch_random(lo: int, hi: int) -> str:
    """PATCH /{id} (id uniform in [lo, hi]) with a new title every time, so every request is a change."""
    return (
        f"math.randomseed({random.randrange(1 << 30)})\n"
        "local n = 0\n"
        'local headers = {["Content-Type"] = "application/json"}\n'
        "request = function()\n"
        "  n = n + 1\n"
        f'  return wrk.format("PATCH", "/" .. math.random({lo}, {hi}), headers, '
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

    @classmethod
    def of(cls, runs: list[Run]) -> Series:
        return cls(
            rps=statistics.median(r.rps for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            errors=sum(r.errors for r in runs),
            runs=runs,
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "runs": [asdict(r) for r in self.runs]}


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


def wrk_series(
    url: str,
    lua: str,
    script_dir: Path,
    *,
    connections: int,
    repeats: int,
    duration_s: float,
    warmup_s: float = 1.0,
    before_each: Callable[[], None] | None = None,
) -> Series:
    """A warm-up, then `repeats` runs of `duration_s` at a fixed concurrency; medians over the runs."""
    script_dir.mkdir(parents=True, exist_ok=True)
    script = script_dir / f"load-{abs(hash(lua))}.lua"
    script.write_text(lua + _DONE)
    if warmup_s:
        if before_each:
            before_each()
        wrk_run(url, script, connections, warmup_s)
    runs = []
    for _ in range(repeats):
        if before_each:
            before_each()
        runs.append(wrk_run(url, script, connections, duration_s))
    return Series.of(runs)


# --- the asyncio client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpClient:
    """Keep-alive HTTP/1.1 connections to one host:port: a request takes an idle one or opens another,
    so open-loop load is never queued behind the client's own pool."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 10.0
    ) -> Response:
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        request = head.encode() + b"\r\n" + payload
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            try:
                writer.write(request)
                response = await asyncio.wait_for(self._read(reader), timeout_s)
                break
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                writer.close()
                # gunicorn closes a keep-alive connection idle for 2 s: nothing was read, so send again.
                if not (reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial)):
                    raise
            except BaseException:
                writer.close()
                raise
        if response.headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append(conn)
        return response

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Response:
        status_line = await reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return Response(status, headers, body)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


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
        def ms(values: list[float], pct: float) -> float:
            return round(percentile(values, pct), 2)

        return {
            "rate_per_s": self.rate,
            "sent": self.sent,
            "command_p50_ms": ms(self.command_ms, 50),
            "command_p99_ms": ms(self.command_ms, 99),
            "lag_p50_ms": ms(self.lag_ms, 50),
            "lag_p99_ms": ms(self.lag_ms, 99),
            "lag_max_ms": ms(self.lag_ms, 100),
            "command_errors": self.command_errors,
            "not_yet_consistent_503": self.not_yet_consistent,
            "lag_failures": self.lag_failures,
        }


async def paced_commands(
    host: str, ports: dict[str, int], rate: float, duration_s: float, visible_timeout_s: float = 15.0
) -> PacedResult:
    """Open loop: command i is sent at t0 + i/rate whatever the earlier ones are doing, half creates, half
    PATCHes of todos created earlier. Command latency counts from the scheduled send (no coordinated
    omission); lag from the command's 2xx until GET /{id}?min_version=<its version> answers 200."""
    clients = {name: HttpClient(host, port) for name, port in ports.items()}
    result = PacedResult(rate=rate, sent=0)
    created: list[int] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, scheduled: float) -> None:
        try:
            if i % 2 == 0 or not created:
                answer = await clients["create"].request("POST", "/", {"title": f"paced {i}"})
            else:
                target = random.choice(created)
                answer = await clients["update"].request("PATCH", f"/{target}", {"title": f"paced {i}"})
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
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
        path = f"/{todo['id']}?min_version={todo['version']}"
        while time.monotonic() - done < visible_timeout_s:
            try:
                read = await clients["get"].request("GET", path)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                break
            if read.status == 200:
                result.lag_ms.append((time.monotonic() - done) * 1000)
                return
            if read.status != 503:
                break
            result.not_yet_consistent += 1
        result.lag_failures += 1

    t0 = time.monotonic() + 0.05
    count = int(rate * duration_s)
    for i in range(count):
        scheduled = t0 + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        tasks.append(asyncio.create_task(one(i, scheduled)))
        result.sent += 1
    await asyncio.gather(*tasks)
    for client in clients.values():
        client.close()
    return result
