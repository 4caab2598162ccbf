"""The bench's own copy of the local system, beside the standard one: its databases, Redis db, topic,
consumer group and ports (set by tools.bench in the environment before anything reads it), started and
stopped by the bench. Also: resetting and seeding its data, sampling the memory of its processes, and
the tiny OTLP sink the traced get_todos exports to.

The shared services (MariaDB, Redis, Kafka) are reused, never restarted; the standard system's data
(todo_write, todo_read, Redis db 0, topic todo-events) is never touched. The bench's own code is sync
(PyMySQL engines, redis-py); only the functions it measures are async.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
import yaml
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from sqlalchemy.engine import make_url

from todo_cqrs.adapters.write_store import outbox, shard_of, todo_values, todos
from todo_cqrs.domain import events
from todo_cqrs.domain.clock import naive_utc, utc_now
from todo_cqrs.domain.todo import NewTodo
from todo_cqrs.settings import LOCAL_DIR, settings
from tools import run, services
from tools.kafkasource import load_spec
from tools.sync_db import read_db, write_db
from tools.topology import FUNCTIONS, HOST, KAFKASOURCE_METRICS_PORT, REPO, Function

BENCH_DIR = LOCAL_DIR / "bench"
CONSUMER_GROUP = "todo-projection-bench"
# Todos made through the API get ids from here on, above every id the bench seeds into the read DB.
API_ID_BASE = 10_000_001
LIMIT_TABLE = "bench_limit"
LIMITS_DIR = REPO / "tools" / "bench_limits"
SEED_CHUNK = 100_000
STATUSES = "'CREATED','IN_PROGRESS','FINISHED','CANCELED'"
STOP_TIMEOUT_S = 10.0
PSS_EVERY_TICKS = 20  # of the memory sampler's 0.25 s


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def check_isolated() -> None:
    """Refuse to run against anything but the bench's own databases, Redis db and topic."""
    s = settings()
    names = {make_url(s.write_db_url).database, make_url(s.read_db_url).database}
    redis_db = redis.connection.parse_url(s.redis_url).get("db", 0)
    if names != {"todo_bench_write", "todo_bench_read"} or redis_db in (0, "0") or s.topic == "todo-events":
        raise SystemExit(f"bench refuses to run on databases {names}, redis db {redis_db}, topic {s.topic}")


# --- data ----------------------------------------------------------------------------------------------


def migrate() -> None:
    subprocess.run([sys.executable, "-m", "todo_cqrs.migrations", "upgrade"], cwd=REPO, check=True)
    services.ensure_roles()  # the functions run as their roles, here on the bench's databases


def reset_data() -> None:
    """Empty the bench databases, its Redis db, its topic and consumer group."""
    with write_db().begin() as conn:
        for table in ("todos", "outbox", "outbox_leases", "idempotency_keys"):
            conn.execute(sa.text(f"TRUNCATE TABLE {table}"))
        conn.execute(sa.text(f"ALTER TABLE todos AUTO_INCREMENT = {API_ID_BASE}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {LIMIT_TABLE} "
                "(id BIGINT AUTO_INCREMENT PRIMARY KEY, payload TEXT NOT NULL) ENGINE=InnoDB"
            )
        )
        conn.execute(sa.text(f"TRUNCATE TABLE {LIMIT_TABLE}"))
    truncate_read_model()
    flush_cache()
    recreate_topic()


def truncate_read_model() -> None:
    with read_db().begin() as conn:
        conn.execute(sa.text("TRUNCATE TABLE todos_view"))


def flush_cache() -> None:
    client = redis.Redis.from_url(settings().redis_url)
    with client:
        client.flushdb()


def recreate_topic() -> None:
    """Delete the bench topic and consumer group, so a run never sees an earlier run's events.
    (tools.services creates the topic again, with the configured partitions.)"""
    s = settings()
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap_servers})
    try:
        admin.delete_consumer_groups([CONSUMER_GROUP], request_timeout=10)[CONSUMER_GROUP].result(10)
    except KafkaException as exc:
        if exc.args[0].code() not in (KafkaError.GROUP_ID_NOT_FOUND, KafkaError.NON_EMPTY_GROUP):
            raise
    try:
        admin.delete_topics([s.topic], operation_timeout=30)[s.topic].result(30)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise
    deadline = time.monotonic() + 30
    while s.topic in admin.list_topics(timeout=5).topics:
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {s.topic} still exists 30 s after its deletion")
        time.sleep(0.2)


def seed_read_model(first_id: int, last_id: int) -> float:
    """Insert todos first_id..last_id straight into the read DB (MariaDB's sequence engine, in chunks);
    returns the seconds it took."""
    started = time.monotonic()
    for lo in range(first_id, last_id + 1, SEED_CHUNK):
        hi = min(last_id, lo + SEED_CHUNK - 1)
        with read_db().begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO todos_view "
                    "(id, title, description, status, version, created_at, updated_at, deleted) "
                    "SELECT seq, CONCAT('seeded todo ', seq), 'seeded by make bench', "
                    f"ELT(1 + seq MOD 4, {STATUSES}), 1, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3), 0 "
                    f"FROM seq_{lo}_to_{hi}"
                )
            )
    with read_db().connect() as conn:
        conn.execute(sa.text("ANALYZE TABLE todos_view")).all()
    return time.monotonic() - started


def insert_backlog(count: int) -> range:
    """`count` new todos and their pending outbox rows, written straight into the write DB (what
    `count` creates would leave behind with Kafka unreachable); returns their ids."""
    with write_db().begin() as conn:
        first = (conn.execute(sa.text("SELECT COALESCE(MAX(id), 0) FROM todos")).scalar() or 0) + 1
    first = max(first, API_ID_BASE)
    ids = range(first, first + count)
    now = utc_now()
    for lo in range(0, count, 1000):
        chunk = [NewTodo(title=f"backlog {i}", description="").created(i, now) for i in ids[lo : lo + 1000]]
        created = [events.todo_created(todo) for todo in chunk]
        with write_db().begin() as conn:
            conn.execute(sa.insert(todos), [{"id": t.id, **todo_values(t)} for t in chunk])
            conn.execute(
                sa.insert(outbox),
                [
                    {
                        "event_id": e.event_id,
                        "event_type": e.type,
                        "todo_id": e.todo_id,
                        "version": e.version,
                        "occurred_at": naive_utc(e.time),
                        "payload": e.payload.decode(),
                        "shard": shard_of(e.todo_id),
                    }
                    for e in created
                ],
            )
    return ids


_PUBLISHER = """
import asyncio, sys
from todo_cqrs.adapters.publisher import publisher
from todo_cqrs.outbox.leases import outbox_engine
from todo_cqrs.outbox.relay import Relay
from todo_cqrs.settings import settings

async def main() -> None:
    relay = Relay(outbox_engine(settings()), publisher(), settings(), min_age_s=0.0)
    print("ready", flush=True)  # connected before the clock starts, as a warm pod's is
    await asyncio.to_thread(sys.stdin.readline)
    while True:  # until the bench sees nothing pending and ends this process
        if not await relay.drain_all(wait_s=0.05):
            await asyncio.sleep(0.01)

asyncio.run(main())
"""


def publish_backlog(processes: int, timeout_s: float = 120.0) -> float:
    """Events per second with which `processes` publishers (the relay's own drain, each in its own
    process) put the pending outbox on Kafka, from their start signal to no row pending."""
    pending = pending_events()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        started = time.monotonic()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        while pending_events():
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{processes} publishers did not publish the backlog in {timeout_s:.0f} s")
            time.sleep(0.01)
        return pending / (time.monotonic() - started)
    finally:
        for child in children:
            child.kill()
            child.wait(10)


def pending_events() -> int:
    with write_db().connect() as conn:
        query = "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL"
        return int(conn.execute(sa.text(query)).scalar() or 0)


def count_read(ids: range) -> int:
    with read_db().connect() as conn:
        query = "SELECT COUNT(*) FROM todos_view WHERE id BETWEEN :lo AND :hi AND deleted = 0"
        return int(conn.execute(sa.text(query), {"lo": ids.start, "hi": ids.stop - 1}).scalar() or 0)


def max_todo_id() -> int:
    with write_db().connect() as conn:
        return int(conn.execute(sa.text("SELECT MAX(id) FROM todos")).scalar() or API_ID_BASE)


def models_agree() -> bool:
    """True when the read model holds every API-made todo at its write-side version."""
    query = "SELECT COUNT(*), COALESCE(SUM(version), 0) FROM {table} WHERE id >= :base {live}"
    with write_db().connect() as conn:
        written = conn.execute(sa.text(query.format(table="todos", live="")), {"base": API_ID_BASE}).one()
    with read_db().connect() as conn:
        read = conn.execute(
            sa.text(query.format(table="todos_view", live="AND deleted = 0")), {"base": API_ID_BASE}
        ).one()
    return tuple(written) == tuple(read)


def wait_until_projected(timeout_s: float = 120.0) -> float | None:
    """Wait until the read model caught up with the write model; returns the seconds waited, or None
    (with a warning) when it did not within timeout_s: the figures that follow then say so."""
    started = time.monotonic()
    while not models_agree():
        if time.monotonic() - started > timeout_s:
            say(f"warning: the read model did not catch up within {timeout_s:.0f} s")
            return None
        time.sleep(0.2)
    return time.monotonic() - started


# --- processes -----------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on (for a get_todos whose Redis is unreachable)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def http_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, dict[str, str], bytes] | None:
    """One GET on 127.0.0.1:port; None when nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except OSError:
        return None
    finally:
        conn.close()


def http_post(port: int, path: str, body: bytes = b"{}", timeout_s: float = 30.0) -> int | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Server:
    """A process the bench started that answers HTTP: its supervisor child and its URL."""

    child: run.Child
    port: int
    function: str | None  # the function it runs (None: a limit)

    @property
    def pid(self) -> int:
        assert self.child.process is not None
        return self.child.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def function_on(function: Function, port: int) -> Function:
    """The same function on another port (its Knative Service name unchanged)."""
    return Function(function.name, function.service, port, function.signature)


class BenchSystem:
    """The bench's processes: the functions, the limits and the variants of get_todos, its KafkaSource
    and the relay's tick; each can be stopped on its own, all are stopped by `stop()` (their process
    groups), whatever happened. Spawned from the main thread: run.System ties each child's life to it."""

    def __init__(self) -> None:
        run.LOG_DIR = BENCH_DIR / "logs"  # beside, not into, the standard system's logs
        for old_log in run.LOG_DIR.glob("*.log"):  # one run's logs only, to read beside its figures
            old_log.unlink()
        self.system = run.System()
        self.servers: dict[str, Server] = {}
        self._kafkasource: run.Child | None = None
        self.kafkasource_ordering = ""
        self._relay: threading.Thread | None = None
        self.relay_paused = threading.Event()

    def spawn_function(
        self, name: str, function: Function, env: dict[str, str] | None = None, wait: bool = True
    ) -> Server:
        """A function as `make run` starts it (tools/run.py's argv, env and SERVER_ENV), plus env."""
        child = self.system.spawn(
            name, run.function_argv(function), {**run.function_env(function), **(env or {})}, function.port
        )
        server = self.servers[name] = Server(child, function.port, function.name)
        if wait:
            self.wait_ready(name)
        return server

    def spawn_limit(
        self, name: str, target: str, port: int, *, sync: bool, threads: int = 0, wait: bool = True
    ) -> Server:
        """A limit of tools/bench_limits: async (main.py, --asgi, run.SERVER_ENV, like the functions) or
        the old sync reference (sync_main.py, gunicorn gthread: 1 worker x `threads`)."""
        source = LIMITS_DIR / ("sync_main.py" if sync else "main.py")
        argv = [
            str(run.VENV_BIN / "functions-framework"),
            *([] if sync else ["--asgi"]),
            *("--target", target, "--source", str(source), "--host", HOST, "--port", str(port)),
        ]
        env = {"K_SERVICE": name, "PORT": str(port), **run.SERVER_ENV}
        if sync:
            env.update(WORKERS="1", THREADS=str(threads))
        child = self.system.spawn(name, argv, env, port)
        server = self.servers[name] = Server(child, port, None)
        if wait:
            self.wait_ready(name)
        return server

    def wait_ready(self, name: str) -> float:
        server = self.servers[name]
        took = run.wait_http_ready(self.system, name, f"{server.url}/healthz")
        say(f"{name:<22} ready on {server.url} ({took:.1f} s)")
        return took

    def start(self) -> None:
        """Every function on its bench port, the KafkaSource, the relay's tick (not the gateway); the
        event receivers with sender identity required and the local issuer, as `make run` has them."""
        run.start_issuer(self.system)
        for function in FUNCTIONS:
            self.spawn_function(function.name, function, run.receiver_env(function), wait=False)
        for function in FUNCTIONS:
            self.wait_ready(function.name)
        self.start_kafkasource()
        self._relay = threading.Thread(
            target=run.relay_schedule,
            args=(self.system.stopping, self.relay_paused),
            name="relay-schedule",
            daemon=True,
        )
        self._relay.start()

    def start_gateway(self, port: int) -> None:
        child = self.system.spawn("gateway", [sys.executable, "-m", "tools.gateway"], port=port)
        self.servers["gateway"] = Server(child, port, None)
        self.wait_ready("gateway")

    def kafkasource_spec(self, ordering: str | None) -> Path:
        """A copy of kafka-source.yaml naming the bench topic and group (and `ordering`, if given)."""
        with open(REPO / "kafka-source.yaml") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            if doc.get("kind") == "KafkaSource":
                # Its name stays: the token it presents names it, and project_event accepts that subject.
                doc["spec"]["topics"] = [settings().topic]
                doc["spec"]["consumerGroup"] = CONSUMER_GROUP
                if ordering:
                    doc["spec"]["ordering"] = ordering
        spec = BENCH_DIR / f"kafka-source{'-' + ordering if ordering else ''}.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        text = "# Generated by tools.bench: the bench's topic and consumer group.\n"
        spec.write_text(text + yaml.safe_dump_all(docs, sort_keys=False))
        return spec

    def start_kafkasource(self, ordering: str | None = None) -> None:
        """The local KafkaSource on the bench's copy of kafka-source.yaml (its ordering unless given)."""
        self.stop_kafkasource()
        spec = self.kafkasource_spec(ordering)
        port = KAFKASOURCE_METRICS_PORT
        argv = [sys.executable, "-m", "tools.kafkasource", "--file", str(spec), "--metrics-port", str(port)]
        self._kafkasource = self.system.spawn("kafkasource", argv, {}, port)
        self.kafkasource_ordering = load_spec(spec).ordering

    @property
    def kafkasource_pid(self) -> int | None:
        child = self._kafkasource
        return child.process.pid if child is not None and child.process is not None else None

    def stop_kafkasource(self) -> None:
        if self._kafkasource is not None:
            self._stop_child(self._kafkasource)
            self._kafkasource = None

    def stop_server(self, name: str, graceful: bool = True) -> None:
        """Stop one server; `graceful=False` (SIGKILL at once) for one that never had traffic."""
        server = self.servers.pop(name, None)
        if server is not None:
            self._stop_child(server.child, graceful)

    def _stop_child(self, child: run.Child, graceful: bool = True) -> None:
        """SIGTERM its process group, wait, SIGKILL what is left; it is no longer supervised."""
        process = child.process
        if process is not None and graceful:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"{child.name} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        if child in self.system.children:
            self.system.children.remove(child)

    def check_alive(self) -> None:
        """A process of the bench that died makes the run fail, naming its log."""
        self.system.check_alive()

    def url(self, name: str) -> str:
        return self.servers[name].url

    def port(self, name: str) -> int:
        return self.servers[name].port

    def stop(self) -> None:
        self.system.stop()
        self.servers.clear()


# --- memory --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_rss_mb(master: int) -> float:
    """The RSS of the largest process of a server (the gunicorn master or its worker), MB."""
    return max(_status_kb(p, "VmRSS") for p in [master, *_children(master)]) / 1024


def cpu_seconds(master: int) -> float:
    """User + system CPU time of a server's processes so far (its master and workers), s."""
    total = 0
    for pid in [master, *_children(master)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy so far, every core summed (from /proc/stat), s."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's children that were waited for (wrk runs), s."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds the named processes used between enter and exit (`sample()`: cumulative CPU per name)."""

    def __init__(self, sample: Callable[[], dict[str, float]]) -> None:
        self.sample = sample
        self.used: dict[str, float] = {}
        self.seconds = 0.0

    def __enter__(self) -> CpuMeter:
        self._before, self._started = self.sample(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        after = self.sample()
        self.seconds = time.monotonic() - self._started
        # A process that ended meanwhile (a shared service restarted by someone else) is left out.
        self.used = {
            name: after[name] - self._before[name]
            for name in after
            if name in self._before and after[name] >= self._before[name]
        }

    def cores(self) -> dict[str, float]:
        """Cores used on average, per name."""
        return {name: round(used / max(self.seconds, 1e-6), 3) for name, used in self.used.items()}

    def ms_per(self, count: int) -> dict[str, float]:
        """CPU milliseconds per unit of work (a request, an event), per name; the tiny ones left out."""
        per = {name: used * 1000 / max(count, 1) for name, used in self.used.items()}
        return {name: round(ms, 3) for name, ms in per.items() if ms >= 0.005}


@dataclass
class _Peak:
    rss_kb: int = 0
    pss_kb: int = 0
    process_rss_kb: int = 0
    processes: int = 0


class MemorySampler(threading.Thread):
    """Every 0.25 s, per function server: the RSS of its largest process (the worker under load), the RSS
    summed over the gunicorn master and its worker (which counts the pages the forked worker shares with
    its master twice); every 5 s the PSS sum (shared pages split: what the function's container is charged).
    Servers are read from the bench's live table each time, so the processes started later count too."""

    def __init__(self, servers: dict[str, Server]) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.servers = servers
        self.peaks: dict[str, _Peak] = {}
        self._done = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self._done.wait(0.25):
            tick += 1
            for name, server in list(self.servers.items()):
                if server.function is None:
                    continue
                pids = [server.pid, *_children(server.pid)]
                each = [_status_kb(p, "VmRSS") for p in pids]
                peak = self.peaks.setdefault(name, _Peak())
                peak.process_rss_kb = max(peak.process_rss_kb, *each)
                if sum(each) > peak.rss_kb:
                    peak.rss_kb, peak.processes = sum(each), len(pids)
                # PSS walks every mapping (about 3 ms a process): every 5 s only, or the sampler itself
                # would take a tenth of a core from what it measures.
                if tick % PSS_EVERY_TICKS == 1:
                    peak.pss_kb = max(peak.pss_kb, sum(_pss_kb(p) for p in pids))

    def stop(self) -> dict[str, dict[str, Any]]:
        self._done.set()
        if self.is_alive():
            self.join(2)
        return {
            name: {
                "peak_rss_mb": round(peak.rss_kb / 1024, 1),
                "peak_pss_mb": round(peak.pss_kb / 1024, 1),
                "peak_process_rss_mb": round(peak.process_rss_kb / 1024, 1),
                "processes": peak.processes,
            }
            for name, peak in self.peaks.items()
        }


# --- the OTLP sink -------------------------------------------------------------------------------------


@dataclass
class OtlpSink:
    """A tiny OTLP/HTTP receiver on 127.0.0.1:port: answers 200 (an empty ExportTraceServiceResponse) to
    every POST /v1/traces and counts what it got, so a traced function exports for real, at no cost
    of a collector's own. Runs in a thread of the bench."""

    port: int
    requests: int = 0
    bytes: int = 0
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)

    def __enter__(self) -> OtlpSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                sink.requests += 1
                sink.bytes += length
                status = 200 if self.path == "/v1/traces" else 404
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        self._server = ThreadingHTTPServer((HOST, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"
