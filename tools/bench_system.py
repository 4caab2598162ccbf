"""The bench's own copy of the local system, beside the standard one: its databases, Redis db, topic,
consumer group and ports (set by tools.bench in the environment before anything reads it), started and
stopped by the bench; resetting and seeding its data; the CPU time of its processes.

The shared services (MariaDB, Redis, Kafka) are reused, never restarted; the standard system's data
(todo_write, todo_read, Redis db 0, topic todo-events) is never touched. The bench's own code is sync
(PyMySQL engines, redis-py); only the functions it measures are async.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import sqlalchemy as sa
import yaml
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from sqlalchemy.engine import make_url

from todo_cqrs.settings import LOCAL_DIR, settings
from tools import run, services
from tools.kafkasource import load_spec
from tools.sync_db import read_db, write_db
from tools.topology import FUNCTIONS, HOST, KAFKASOURCE_METRICS_PORT, REPO

BENCH_DIR = LOCAL_DIR / "bench"
CONSUMER_GROUP = "todo-projection-bench"
# Todos made through the API get ids from here on, above every id the bench seeds into the read DB.
API_ID_BASE = 10_000_001
LIMIT_TABLE = "bench_limit"
LIMITS_DIR = REPO / "tools" / "bench_limits"
STOP_TIMEOUT_S = 10.0


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


def seed_read_model(count: int) -> None:
    """Todos 1..count straight into the read DB (MariaDB's sequence engine): what the reads read."""
    with read_db().begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO todos_view "
                "(id, title, description, status, version, created_at, updated_at, deleted) "
                "SELECT seq, CONCAT('seeded todo ', seq), 'seeded by make bench', 'CREATED', 1, "
                f"UTC_TIMESTAMP(3), UTC_TIMESTAMP(3), 0 FROM seq_1_to_{count}"
            )
        )


def pending_events() -> int:
    with write_db().connect() as conn:
        query = "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL"
        return int(conn.execute(sa.text(query)).scalar() or 0)


def count_read(first: int, last: int) -> int:
    with read_db().connect() as conn:
        query = "SELECT COUNT(*) FROM todos_view WHERE id BETWEEN :lo AND :hi AND deleted = 0"
        return int(conn.execute(sa.text(query), {"lo": first, "hi": last}).scalar() or 0)


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


@dataclass
class Server:
    """A process the bench started that answers HTTP."""

    child: run.Child
    port: int

    @property
    def pid(self) -> int:
        assert self.child.process is not None
        return self.child.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


class BenchSystem:
    """The bench's processes: the functions, the limits, the gateway, its KafkaSource and the relay's
    tick, all stopped by `stop()` (their process groups), whatever happened; the KafkaSource also on its
    own. Spawned from the main thread: run.System ties each child's life to it."""

    def __init__(self) -> None:
        self.system = run.System(log_dir=BENCH_DIR / "logs")  # beside, not into, the standard system's
        self.servers: dict[str, Server] = {}
        self.kafkasource: run.Child | None = None
        self.kafkasource_ordering = ""

    def spawn(self, name: str, argv: list[str], env: dict[str, str], port: int) -> None:
        self.servers[name] = Server(self.system.spawn(name, argv, env, port), port)

    def start(self, limits: dict[str, tuple[str, int]] | None = None, gateway_port: int = 0) -> None:
        """Every function on its bench port as `make run` starts it (tools/run.py's argv and env: the
        event receivers with sender identity required, and the local issuer); with `limits` (name: target
        in tools/bench_limits/main.py, port) the gateway and those limits, served as the functions are
        (--asgi, run.SERVER_ENV); once all answer, the KafkaSource and the relay's tick."""
        run.start_issuer(self.system)
        for function in FUNCTIONS:
            env = run.function_env(function) | run.receiver_env(function)
            self.spawn(function.name, run.function_argv(function), env, function.port)
        if limits:
            self.spawn("gateway", [sys.executable, "-m", "tools.gateway"], {}, gateway_port)
        for name, (target, port) in (limits or {}).items():
            argv = [sys.executable, "-m", "todo_cqrs.serve", "--target", target]
            argv += ["--source", str(LIMITS_DIR / "main.py"), "--host", HOST, "--port", str(port)]
            self.spawn(name, argv, {"K_SERVICE": name, "PORT": str(port), **run.SERVER_ENV}, port)
        for name, server in self.servers.items():
            took = run.wait_http_ready(self.system, name, f"{server.url}/healthz")
            say(f"{name:<22} ready on {server.url} ({took:.1f} s)")
        self.start_kafkasource()
        threading.Thread(
            target=run.relay_schedule, args=(self.system.stopping,), name="relay-schedule", daemon=True
        ).start()

    def start_kafkasource(self, ordering: str | None = None) -> None:
        """The local KafkaSource on a copy of kafka-source.yaml naming the bench's topic and consumer
        group (and `ordering`, when given)."""
        self.stop_kafkasource()
        with open(REPO / "kafka-source.yaml") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            if doc.get("kind") == "KafkaSource":
                # Its name stays: the token it presents names it, and project_event accepts that subject.
                doc["spec"] |= {"topics": [settings().topic], "consumerGroup": CONSUMER_GROUP}
                if ordering:
                    doc["spec"]["ordering"] = ordering
        spec = BENCH_DIR / f"kafka-source{'-' + ordering if ordering else ''}.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        header = "# Generated by tools.bench: the bench's topic and consumer group.\n"
        spec.write_text(header + yaml.safe_dump_all(docs, sort_keys=False))
        port = KAFKASOURCE_METRICS_PORT
        argv = [sys.executable, "-m", "tools.kafkasource", "--file", str(spec), "--metrics-port", str(port)]
        self.kafkasource = self.system.spawn("kafkasource", argv, {}, port)
        self.kafkasource_ordering = load_spec(spec).ordering

    @property
    def kafkasource_pid(self) -> int | None:
        child = self.kafkasource
        return child.process.pid if child is not None and child.process is not None else None

    def stop_kafkasource(self) -> None:
        """SIGTERM its process group, wait, SIGKILL what is left; it is no longer supervised."""
        child, self.kafkasource = self.kafkasource, None
        if child is None or child.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signal.SIGTERM)
        try:
            child.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            say(f"the KafkaSource did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait(5)
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


# --- memory and CPU -----------------------------------------------------------------------------------


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
