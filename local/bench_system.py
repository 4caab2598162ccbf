"""The bench's own copy of the local system, beside the standard one: its databases, Redis db, topic,
consumer group and ports (set by local.bench in the environment before anything reads it), started and
stopped by the bench. Also: resetting and seeding its data, and sampling the memory of its processes.

The shared services (MariaDB, Redis, Kafka) are reused, never restarted; the standard system's data
(todo_write, todo_read, Redis db 0, topic todo-events) is never touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
import yaml
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from sqlalchemy.engine import make_url

from local import run
from local.topology import FUNCTIONS, HOST, REPO, Function
from todo_cqrs.adapters.write_store import naive_utc, outbox, todo_values, todos
from todo_cqrs.db import read_engine, write_engine
from todo_cqrs.domain import events
from todo_cqrs.domain.todo import NewTodo, utc_now
from todo_cqrs.settings import LOCAL_DIR, settings

BENCH_DIR = LOCAL_DIR / "bench"
CONSUMER_GROUP = "todo-projection-bench"
# Todos made through the API get ids from here on, above every id the bench seeds into the read DB.
API_ID_BASE = 10_000_001
LIMIT_TABLE = "bench_limit"
LIMITS_SOURCE = REPO / "local" / "bench_limits" / "main.py"
SEED_CHUNK = 100_000
STATUSES = "'CREATED','IN_PROGRESS','FINISHED','CANCELED'"


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


def reset_data() -> None:
    """Empty the bench databases, its Redis db, its topic and consumer group."""
    with write_engine().begin() as conn:
        conn.execute(sa.text("TRUNCATE TABLE todos"))
        conn.execute(sa.text("TRUNCATE TABLE outbox"))
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
    with read_engine().begin() as conn:
        conn.execute(sa.text("TRUNCATE TABLE todos_view"))


def flush_cache() -> None:
    client = redis.Redis.from_url(settings().redis_url)
    with client:
        client.flushdb()


def recreate_topic() -> None:
    """Delete the bench topic and consumer group, so a run never sees an earlier run's events.
    (local.services creates the topic again, with the configured partitions.)"""
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
        with read_engine().begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO todos_view "
                    "(id, title, description, status, version, created_at, updated_at, deleted) "
                    "SELECT seq, CONCAT('seeded todo ', seq), 'seeded by make bench', "
                    f"ELT(1 + seq MOD 4, {STATUSES}), 1, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3), 0 "
                    f"FROM seq_{lo}_to_{hi}"
                )
            )
    with read_engine().connect() as conn:
        conn.execute(sa.text("ANALYZE TABLE todos_view")).all()
    return time.monotonic() - started


def insert_backlog(count: int) -> range:
    """`count` new todos and their pending outbox rows, written straight into the write DB (what
    `count` creates would leave behind with Kafka unreachable); returns their ids."""
    with write_engine().begin() as conn:
        first = (conn.execute(sa.text("SELECT COALESCE(MAX(id), 0) FROM todos")).scalar() or 0) + 1
    first = max(first, API_ID_BASE)
    ids = range(first, first + count)
    now = utc_now()
    for lo in range(0, count, 1000):
        chunk = [NewTodo(title=f"backlog {i}", description="").created(i, now) for i in ids[lo : lo + 1000]]
        created = [events.todo_created(todo) for todo in chunk]
        with write_engine().begin() as conn:
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
                    }
                    for e in created
                ],
            )
    return ids


def pending_events() -> int:
    with write_engine().connect() as conn:
        query = "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL"
        return int(conn.execute(sa.text(query)).scalar() or 0)


def count_read(ids: range) -> int:
    with read_engine().connect() as conn:
        query = "SELECT COUNT(*) FROM todos_view WHERE id BETWEEN :lo AND :hi AND deleted = 0"
        return int(conn.execute(sa.text(query), {"lo": ids.start, "hi": ids.stop - 1}).scalar() or 0)


def models_agree() -> bool:
    """True when the read model holds every API-made todo at its write-side version."""
    query = "SELECT COUNT(*), COALESCE(SUM(version), 0) FROM {table} WHERE id >= :base {live}"
    with write_engine().connect() as conn:
        written = conn.execute(sa.text(query.format(table="todos", live="")), {"base": API_ID_BASE}).one()
    with read_engine().connect() as conn:
        read = conn.execute(
            sa.text(query.format(table="todos_view", live="AND deleted = 0")), {"base": API_ID_BASE}
        ).one()
    return tuple(written) == tuple(read)


def wait_until_projected(timeout_s: float = 120.0) -> float:
    """Wait until the read model caught up with the write model; returns the seconds waited."""
    started = time.monotonic()
    while not models_agree():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the read model did not catch up within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


# --- processes -----------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on (for a get_todos whose Redis is unreachable)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class BenchSystem:
    """The bench's processes: the functions, the limits, a get_todos without Redis, its KafkaSource
    and the relay's tick; all stopped by `stop()` (their process groups), whatever happened."""

    def __init__(self) -> None:
        run.LOG_DIR = BENCH_DIR / "logs"  # beside, not into, the standard system's logs
        self.system = run.System()
        self.servers: dict[str, tuple[int, str]] = {}  # name -> (master pid, url)
        self._kafkasource: subprocess.Popen[bytes] | None = None

    def spawn_function(self, name: str, target: Function, env: dict[str, str] | None = None) -> None:
        argv = run.function_argv(target)
        process = self.system.spawn(name, argv, {**run.function_env(target), **(env or {})})
        self.servers[name] = (process.pid, target.url)

    def spawn_limit(self, name: str, target: str, port: int, server_env: dict[str, str]) -> None:
        argv = [
            str(run.VENV_BIN / "functions-framework"),
            *("--target", target, "--source", str(LIMITS_SOURCE), "--host", HOST, "--port", str(port)),
        ]
        process = self.system.spawn(name, argv, {"K_SERVICE": name, "PORT": str(port), **server_env})
        self.servers[name] = (process.pid, f"http://{HOST}:{port}")

    def start(self, limits: dict[str, tuple[str, int, str]], bypass_port: int) -> None:
        """Functions, limits {name: (target, port, like function)} and get_todos without Redis."""
        for function in FUNCTIONS:
            self.spawn_function(function.name, function)
        for name, (target, port, like) in limits.items():
            self.spawn_limit(name, target, port, run.SERVER_ENV.get(like, {}))
        bypass = Function("get_todos", "get-todos-bypass", bypass_port, "http")
        self.spawn_function("get_todos_bypass", bypass, {"REDIS_URL": f"redis://{HOST}:{free_port()}/1"})
        for name, (_, url) in self.servers.items():
            took = run.wait_http_ready(self.system, name, f"{url}/healthz")
            say(f"{name:<17} ready on {url} ({took:.1f} s)")
        self.start_kafkasource()
        threading.Thread(
            target=run.relay_schedule, args=(self.system.stopping,), name="relay-schedule", daemon=True
        ).start()

    def start_kafkasource(self) -> None:
        """The local KafkaSource on a copy of kafka-source.yaml naming the bench topic and group."""
        with open(REPO / "kafka-source.yaml") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            if doc.get("kind") == "KafkaSource":
                doc["metadata"]["name"] = "todo-events-projection-bench"
                doc["spec"]["topics"] = [settings().topic]
                doc["spec"]["consumerGroup"] = CONSUMER_GROUP
        spec = BENCH_DIR / "kafka-source.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text("# Generated by local.bench: the bench's topic and consumer group.\n")
        with spec.open("a") as f:
            yaml.safe_dump_all(docs, f, sort_keys=False)
        argv = [sys.executable, "-m", "local.kafkasource", "--file", str(spec)]
        self._kafkasource = self.system.spawn("kafkasource", argv)

    def stop_kafkasource(self) -> None:
        process = self._kafkasource
        if process is None:
            return
        os.killpg(process.pid, 15)
        process.wait(30)
        self.system.processes = [(n, p) for n, p in self.system.processes if p is not process]
        self._kafkasource = None

    def url(self, name: str) -> str:
        return self.servers[name][1]

    def stop(self) -> None:
        self.system.stop()


# --- memory --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
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


class MemorySampler(threading.Thread):
    """Every 0.25 s, per server: the RSS of its largest process (the worker under load), the RSS summed
    over the gunicorn master and its workers (which counts the pages a forked worker shares with its
    master twice), and the PSS sum (shared pages split: what the function's container is charged)."""

    def __init__(self, servers: dict[str, tuple[int, str]]) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.masters = {name: pid for name, (pid, _) in servers.items()}
        self.peak_rss_kb: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.peak_pss_kb: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.peak_process_rss_kb: dict[str, int] = dict.fromkeys(self.masters, 0)
        self.processes: dict[str, int] = dict.fromkeys(self.masters, 0)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.25):
            for name, master in self.masters.items():
                pids = [master, *_children(master)]
                each = [_status_kb(p, "VmRSS") for p in pids]
                self.peak_process_rss_kb[name] = max(self.peak_process_rss_kb[name], *each)
                rss = sum(each)
                if rss > self.peak_rss_kb[name]:
                    self.peak_rss_kb[name] = rss
                    self.processes[name] = len(pids)
                self.peak_pss_kb[name] = max(self.peak_pss_kb[name], sum(_pss_kb(p) for p in pids))

    def stop(self) -> dict[str, dict[str, Any]]:
        self._done.set()
        self.join(2)
        return {
            name: {
                "peak_rss_mb": round(self.peak_rss_kb[name] / 1024, 1),
                "peak_pss_mb": round(self.peak_pss_kb[name] / 1024, 1),
                "peak_process_rss_mb": round(self.peak_process_rss_kb[name] / 1024, 1),
                "processes": self.processes[name],
            }
            for name in self.masters
        }
