"""Start, stop and inspect the local MariaDB, Redis and Kafka that the runner and the tests use (no Docker).

    python -m tools.services start|stop|status
    python -m tools.services pause|resume mariadb|redis|kafka    (SIGSTOP/SIGCONT, for fault tests)
    python -m tools.services roles    (after the migrations: the role users and their grants)

Everything lives under settings.LOCAL_DIR: services/<name>/ (data), logs/<name>.log, run/<name>.pid,
secrets/ (tools/credentials.py). This process and what it starts act as the admin (DB user `todo`,
Redis user `default`); each function runs as its role (todo_cqrs/roles.py, docs/security.md): MariaDB
users created by `ensure_roles`, Redis ACL users from services/redis/users.acl. Redis is bounded by
REDIS_MAXMEMORY (256mb) with the volatile-lru policy.
Processes run detached, so `make services` and a later `make test` share them; `stop` ends only the
processes whose pid files this module wrote.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pymysql
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy.engine import make_url

from todo_cqrs import roles
from todo_cqrs.settings import LOCAL_DIR, settings
from tools import credentials
from tools.processes import port_free

NAMES = ("mariadb", "redis", "kafka")
# A topic of the local broker's own, for the warm-up of a fresh broker (never the events topic).
WARMUP_TOPIC = "todo-cqrs-warmup"
KAFKA_VERSION = "4.1.1"
KAFKA_ARTIFACT = f"kafka_2.13-{KAFKA_VERSION}"
# Kafka's slf4j is 1.7 and its own binding does not bind to it; without this one the broker logs nothing.
LOG4J_SLF4J_VERSION = "2.24.3"
# Redis is a cache: bounded, and only keys with a TTL may be evicted (docs/security.md).
REDIS_MAXMEMORY = os.environ.get("REDIS_MAXMEMORY", "256mb")
REDIS_MAXMEMORY_POLICY = "volatile-lru"
# The role accounts exist for both ways a local client reaches MariaDB (TCP to 127.0.0.1, the socket).
ROLE_HOSTS = ("127.0.0.1", "localhost")
READY_TIMEOUT_S = {"mariadb": 60.0, "redis": 15.0, "kafka": 120.0}
# A server someone else runs is either up or not; there is no boot to wait for.
EXTERNAL_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2
REPORT_EVERY_S = 5.0
# sun_path holds 108 bytes including the terminating NUL.
SOCKET_PATH_MAX = 107
# Guards against a recycled pid: the process behind our pid file must still look like the service.
_COMMAND_MARK = {"mariadb": "mariadbd", "redis": "redis-server", "kafka": "kafka.Kafka"}
_PACKAGES = {
    "mariadb": ("mariadb-server", ("mariadbd", "mariadb-install-db")),
    "redis": ("redis-server", ("redis-server",)),
    "nginx": ("nginx", ("nginx",)),  # the local gateway (tools/gateway.py)
    "chromium": ("chromium", ("chromium",)),  # the live page's browser test (tests/e2e/test_live_page.py)
}
_PORT_SETTING = {
    "mariadb": "DB_PORT",
    "redis": "REDIS_URL",
    "kafka": "KAFKA_BOOTSTRAP_SERVERS (the controller uses its port + 1)",
}
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# MariaDB errors that mean "the server answers but the app user or a database is not set up yet".
_NOT_BOOTSTRAPPED = {1044, 1045, 1049, 1130, 1698}

# Children started by this process, kept so a dead one can be reaped instead of lingering as a zombie.
_children: dict[int, subprocess.Popen[bytes]] = {}


class ServiceError(RuntimeError):
    """A local service could not be installed, started, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str  # running, paused, stopped or external
    pid: int | None
    port: int

    def line(self) -> str:
        pid = f"pid {self.pid}" if self.pid else "-"
        return f"{self.name:<8} {self.state:<8} {pid:<12} port {self.port}"


@dataclass(frozen=True)
class _Config:
    db_host: str
    db_port: int
    db_user: str
    db_password: str
    write_db: str
    read_db: str
    redis_url: str
    redis_port: int
    kafka_bootstrap: str
    kafka_host: str
    kafka_port: int
    kafka_external: bool
    topic: str
    partitions: int

    def port(self, name: str) -> int:
        return {"mariadb": self.db_port, "redis": self.redis_port, "kafka": self.kafka_port}[name]


def _config() -> _Config:
    s = settings()
    write_url, read_url = make_url(s.write_db_url), make_url(s.read_db_url)
    for identifier in (write_url.database, read_url.database, write_url.username):
        if not identifier or not _IDENTIFIER.match(identifier):
            raise ServiceError(
                f"database and user names must match {_IDENTIFIER.pattern}, got {identifier!r}"
            )
    first_broker = s.kafka_bootstrap_servers.split(",")[0].split("://")[-1]
    kafka_host, _, kafka_port = first_broker.rpartition(":")
    return _Config(
        db_host=write_url.host or "127.0.0.1",
        db_port=write_url.port or 3306,
        db_user=write_url.username or "",
        db_password=write_url.password or "",
        write_db=write_url.database or "",
        read_db=read_url.database or "",
        redis_url=s.redis_url,
        redis_port=urlsplit(s.redis_url).port or 6379,
        kafka_bootstrap=s.kafka_bootstrap_servers,
        kafka_host=kafka_host or "127.0.0.1",
        kafka_port=int(kafka_port),
        kafka_external=os.environ.get("KAFKA_EXTERNAL") == "1",
        topic=s.topic,
        partitions=s.topic_partitions,
    )


# ---------------------------------------------------------------- layout and processes


def _service_dir(name: str) -> Path:
    return LOCAL_DIR / "services" / name


def _log_file(name: str) -> Path:
    return LOCAL_DIR / "logs" / f"{name}.log"


def _pid_file(name: str) -> Path:
    return LOCAL_DIR / "run" / f"{name}.pid"


def _progress(message: str) -> None:
    print(f"[services] {message}", file=sys.stderr, flush=True)


def _log_tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            start = max(0, path.stat().st_size - max_bytes)
            f.seek(start)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log yet)"
    # Drop the line the cut went through.
    return text.partition("\n")[2] if start else text


def _proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process (R, S, T, Z, ...), or None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _is_gone(pid: int) -> bool:
    state = _proc_state(pid)
    if state == "Z" and (child := _children.pop(pid, None)) is not None:
        child.poll()
    return state in (None, "Z")


def _running_pid(name: str) -> int | None:
    """The pid in our pid file when that process is alive and still the service we started."""
    try:
        pid = int(_pid_file(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if _is_gone(pid) or _COMMAND_MARK[name] not in _cmdline(pid):
        return None
    return pid


def _launch(name: str, argv: list[str], cwd: Path) -> int:
    """Start a service detached (own session, output to its log) and record its pid."""
    log = _log_file(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        child = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children[child.pid] = child
    _pid_file(name).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(name).write_text(f"{child.pid}\n")
    _progress(f"{name}: started pid {child.pid}, log {log}")
    return child.pid


def _require_free_ports(cfg: _Config, names: list[str]) -> None:
    """Fail before starting anything when a port we need is held by a process we did not start."""
    for name in names:
        ports = [cfg.port(name), cfg.kafka_port + 1] if name == "kafka" else [cfg.port(name)]
        for port in ports:
            if not port_free(port):
                raise ServiceError(
                    f"port {port} for {name} is in use by a process that tools.services did not start; "
                    f"stop it or choose another port with {_PORT_SETTING[name]}"
                )


def _serves_configured_port(name: str, pid: int, cfg: _Config) -> bool:
    port = cfg.port(name)
    if name == "kafka":
        properties = _service_dir("kafka") / "server.properties"
        return properties.exists() and f"PLAINTEXT://127.0.0.1:{port}" in properties.read_text()
    # mariadbd keeps its arguments; redis-server retitles itself "redis-server 127.0.0.1:<port>".
    return (f"--port={port}" if name == "mariadb" else f":{port}") in _cmdline(pid)


def _wait_until(
    name: str, what: str, probe: Callable[[], object], pid: int | None, external: bool = False
) -> None:
    """Call probe until it stops raising; fail naming the log when the process dies or time runs out."""
    timeout = EXTERNAL_TIMEOUT_S if external else READY_TIMEOUT_S[name]
    started = time.monotonic()
    next_report = started
    last_error: BaseException | None = None
    while True:
        try:
            probe()
        except Exception as exc:  # each client raises its own types; any failure means "not yet"
            last_error = exc
        else:
            _progress(f"{name}: {what}: ok ({time.monotonic() - started:.1f}s)")
            return
        elapsed = time.monotonic() - started
        log = _log_file(name)
        if pid is not None and _is_gone(pid):
            raise ServiceError(f"{name} exited while starting; see {log}:\n{_log_tail(log)}")
        if elapsed > timeout:
            failure = f"{name} did not answer {what} within {timeout:.0f}s (last error: {last_error})"
            # An external server's log is not ours to show.
            raise ServiceError(failure if external else f"{failure}; see {log}:\n{_log_tail(log)}")
        if time.monotonic() >= next_report:
            _progress(f"{name}: waiting for {what} ({elapsed:.1f}s)")
            next_report += REPORT_EVERY_S
        time.sleep(POLL_S)


@contextlib.contextmanager
def _exclusive() -> Iterator[None]:
    """Serialise start and stop across processes: `make services` and a test run may overlap."""
    lock = LOCAL_DIR / "run" / "services.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------- packages and credentials


def _binary(name: str) -> str | None:
    # Debian puts mariadbd in /usr/sbin, which a normal user's PATH often lacks.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")


def _require_binary(name: str, hint: str) -> str:
    path = _binary(name)
    if path is None:
        raise ServiceError(f"{name} not found; {hint}")
    return path


def _install_missing_packages(names: list[str]) -> None:
    packages = [_PACKAGES[name] for name in names]
    missing = sorted(package for package, binaries in packages if not all(map(_binary, binaries)))
    if not missing:
        return
    command = f"apt-get install -y {' '.join(missing)}"
    if os.geteuid() != 0:
        raise ServiceError(f"{', '.join(missing)} not installed; run `sudo {command}` and start again")
    if not shutil.which("apt-get"):
        raise ServiceError(f"{', '.join(missing)} not installed and apt-get is missing; install them by hand")
    # The packages would start system-wide daemons on the standard ports; policy-rc.d exit 101 forbids it.
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = not os.path.lexists(policy)
    if created_policy:
        policy.write_text(
            "#!/bin/sh\n# temporary, from tools.services: no daemons during apt-get\nexit 101\n"
        )
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
            _progress(f"running {' '.join(argv)}")
            result = subprocess.run(argv, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise ServiceError(f"`{' '.join(argv)}` failed:\n{(result.stdout + result.stderr)[-3000:]}")
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)


def ensure_packages(names: list[str]) -> None:
    """Install the Debian packages of these tools (`_PACKAGES`) when their binaries are missing."""
    _install_missing_packages(names)


def binary(name: str) -> str | None:
    """Where a Debian package's binary is, /usr/sbin included."""
    return _binary(name)


def _use_admin_credentials() -> None:
    """This process (and what it starts: migrations, tools, tests) acts as the admin: DB user `todo`
    and Redis's `default` user, with the passwords generated under .local/secrets/ (tools/credentials.py)."""
    credentials.use_admin()


# ---------------------------------------------------------------- MariaDB


def _os_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _mariadb_socket() -> Path:
    path = LOCAL_DIR / "run" / "mariadb.sock"
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(LOCAL_DIR.resolve())).hexdigest()[:12]
    return Path(f"/tmp/todo-cqrs-{digest}-mariadb.sock")


def _start_mariadb(cfg: _Config) -> int:
    mariadbd = _require_binary("mariadbd", "install the Debian package mariadb-server")
    datadir = _service_dir("mariadb")
    if not (datadir / "mysql").is_dir():
        _initialise_mariadb(datadir)
    (LOCAL_DIR / "run").mkdir(parents=True, exist_ok=True)
    argv = [
        mariadbd,
        "--no-defaults",  # must come first; keeps /etc/mysql out of a dev server's settings
        f"--datadir={datadir}",
        f"--socket={_mariadb_socket()}",
        f"--port={cfg.db_port}",
        "--bind-address=127.0.0.1",
        "--skip-name-resolve",
        *(["--user=root"] if os.geteuid() == 0 else []),
        f"--log-error={_log_file('mariadb')}",
        f"--pid-file={datadir / 'mariadbd.pid'}",
        "--innodb-buffer-pool-size=256M",
        "--innodb-flush-log-at-trx-commit=1",  # durable commits: the outbox relies on them
        "--max-connections=300",  # several functions, each with its own pool, plus tests
        "--character-set-server=utf8mb4",
        "--collation-server=utf8mb4_unicode_ci",
    ]
    return _launch("mariadb", argv, cwd=datadir)


def _initialise_mariadb(datadir: Path) -> None:
    install_db = _require_binary("mariadb-install-db", "install the Debian package mariadb-server")
    log = _log_file("mariadb")
    log.parent.mkdir(parents=True, exist_ok=True)
    datadir.mkdir(parents=True, exist_ok=True)
    # Socket auth for the OS user that runs us: the bootstrap needs no password of its own.
    argv = [
        install_db,
        "--no-defaults",
        f"--datadir={datadir}",
        f"--user={_os_user()}",
        "--auth-root-authentication-method=socket",
        "--skip-test-db",
    ]
    _progress(f"mariadb: initialising {datadir}")
    with log.open("ab") as out:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        # A half-written datadir would be taken for an initialised one next time.
        shutil.rmtree(datadir, ignore_errors=True)
        raise ServiceError(f"mariadb-install-db failed; see {log}:\n{_log_tail(log)}")


def _bootstrap_mariadb(cfg: _Config) -> None:
    """Create both databases and the app user with grants, over the socket as the OS user; safe to repeat."""
    with _socket_admin() as admin, admin.cursor() as cur:
        for database in (cfg.write_db, cfg.read_db):
            charset = "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database}` {charset}")
        for host in ("127.0.0.1", "localhost"):
            account = (cfg.db_user, host)
            cur.execute("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (*account, cfg.db_password))
            # The password file or DB_PASSWORD may have changed since the account was created.
            cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", (*account, cfg.db_password))
            for database in (cfg.write_db, cfg.read_db):
                cur.execute(f"GRANT ALL PRIVILEGES ON `{database}`.* TO %s@%s", account)


def _socket_admin() -> pymysql.Connection:  # type: ignore[type-arg]
    return pymysql.connect(
        unix_socket=str(_mariadb_socket()), user=_os_user(), connect_timeout=5, autocommit=True
    )


def socket_path() -> str:
    return str(_mariadb_socket())


def os_user() -> str:
    return _os_user()


def socket_admin_url(database: str) -> str:
    """A SQLAlchemy URL of the server's own administrator (the OS user over the socket), e.g. to run
    `python -m todo_cqrs.roles grant` as a cluster's migrations Job would."""
    return f"mysql+pymysql://{_os_user()}@localhost/{database}?unix_socket={_mariadb_socket()}"


def ensure_roles() -> None:
    """Create or update the role users (todo_cqrs/roles.py) with their generated passwords, each with
    exactly its grants on the configured databases. Table grants need the tables: call it after the
    migrations. Safe to repeat."""
    with _exclusive():
        cfg = _config()
        missing: list[str] = []
        with _socket_admin() as admin, admin.cursor() as cur:
            for database, table in {
                (g.database, g.table) for grants in roles.GRANTS.values() for g in grants
            }:
                name = cfg.write_db if database == "write" else cfg.read_db
                cur.execute(
                    "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
                    (name, table),
                )
                if cur.fetchone() is None:
                    missing.append(f"{name}.{table}")
            if missing:
                raise ServiceError(f"tables {', '.join(sorted(missing))} missing: apply the migrations first")
            for role in roles.ROLES:
                for host in ROLE_HOSTS:
                    roles.apply(cur, role, host, credentials.db_password(role), cfg.write_db, cfg.read_db)


def _mariadb_answers(cfg: _Config, bootstrap: bool) -> None:
    """SELECT 1 as the app user over TCP in both databases; set them up first if they are missing."""
    try:
        conn = pymysql.connect(
            host=cfg.db_host,
            port=cfg.db_port,
            user=cfg.db_user,
            password=cfg.db_password,
            database=cfg.write_db,
            connect_timeout=2,
            read_timeout=5,
        )
        with conn, conn.cursor() as cur:
            cur.execute(f"USE `{cfg.read_db}`")
            cur.execute("SELECT 1")
    except pymysql.err.OperationalError as exc:
        if not bootstrap or exc.args[0] not in _NOT_BOOTSTRAPPED:
            raise
        _bootstrap_mariadb(cfg)
        _mariadb_answers(cfg, bootstrap=False)


# ---------------------------------------------------------------- Redis


def _redis_acl_lines() -> list[str]:
    passwords = {role: credentials.redis_password(role) for role in roles.REDIS_RULES}
    return roles.redis_acl(passwords, credentials.redis_admin_password())


def _write_redis_acl_file(path: Path) -> None:
    """The ACL file the server starts with (0600: it holds the passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(_redis_acl_lines()) + "\n")


def _configure_redis(cfg: _Config) -> None:
    """On a running server (maybe started before these settings existed): the role users, `default`
    behind its password, and the memory bound, applied live. Safe to repeat."""
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=5, socket_connect_timeout=2)
    with client:
        for line in _redis_acl_lines():
            _, user, *rules = line.split()
            client.execute_command("ACL", "SETUSER", user, "reset", *rules)
        client.config_set("maxmemory", REDIS_MAXMEMORY)
        client.config_set("maxmemory-policy", REDIS_MAXMEMORY_POLICY)


def _start_redis(cfg: _Config) -> int:
    redis_server = _require_binary("redis-server", "install the Debian package redis-server")
    data = _service_dir("redis")
    data.mkdir(parents=True, exist_ok=True)
    acl_file = data / "users.acl"
    _write_redis_acl_file(acl_file)
    _log_file("redis").parent.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server,
        "--port", str(cfg.redis_port),
        "--bind", "127.0.0.1",
        "--dir", str(data),
        "--logfile", str(_log_file("redis")),
        "--pidfile", str(data / "redis-server.pid"),
        "--save", "",  # a cache: nothing worth persisting, and no fork for snapshots
        "--appendonly", "no",
        # Its timer (expiry sweeps, statistics) runs once a second instead of ten times: an idle server
        # used 2.3 ms of CPU a second, now 0.3. An expired key is still never served (it is checked on
        # access), and the LRU clock keeps its resolution of a second.
        "--hz", "1",
        "--daemonize", "no",  # stays our child, so the pid we record is the server's
        "--aclfile", str(acl_file),
        "--maxmemory", REDIS_MAXMEMORY,
        "--maxmemory-policy", REDIS_MAXMEMORY_POLICY,
    ]  # fmt: skip
    return _launch("redis", argv, cwd=data)


def _redis_answers(cfg: _Config) -> None:
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    finally:
        client.close()


# ---------------------------------------------------------------- Kafka

_POM = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by tools.services: resolves the jars of a single-node Kafka broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.todo-cqrs</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_SLF4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """# Generated by tools.services: the broker logs to stdout, which goes to logs/kafka.log.
status = warn
# Kafka logs its own shutdown from a JVM shutdown hook; log4j's hook would close the appender first.
shutdownHook = disable
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
"""


def _server_properties(port: int, log_dir: Path) -> str:
    controller = f"127.0.0.1:{port + 1}"
    return f"""# Generated by tools.services on every start: a single KRaft node for local development.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{controller}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs={log_dir}
num.partitions=3
# One broker: internal topics cannot have more replicas than that.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests create fresh consumer groups constantly; the default 3 s delay would slow every one.
group.initial.rebalance.delay.ms=0
# Few partitions for the internal topics: their coordinators load in a moment on a fresh broker.
offsets.topic.num.partitions=3
transaction.state.log.num.partitions=3
# An idle single-node controller need not append a no-op record to its metadata log twice a second.
metadata.max.idle.interval.ms=5000
# Two cores: one network thread and two request handlers. Each idle thread polls its queue every 300 ms,
# and a request crosses the same number of threads however many there are (3 and 8 by default).
num.network.threads=1
num.io.threads=2
"""


def _kafka_libs() -> Path:
    """The directory of Kafka's jars: $KAFKA_HOME/libs, or a user cache filled once with Maven."""
    if home := os.environ.get("KAFKA_HOME"):
        libs = Path(home) / "libs"
        if not any(libs.glob("kafka_*.jar")):
            raise ServiceError(f"KAFKA_HOME={home} has no libs/kafka_*.jar")
        return libs
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = cache_home / "todo-cqrs" / f"kafka-{KAFKA_VERSION}"
    libs = cache / "libs"
    sentinels = (f"{KAFKA_ARTIFACT}.jar", f"log4j-slf4j-impl-{LOG4J_SLF4J_VERSION}.jar")
    if all((libs / jar).exists() for jar in sentinels):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Kafka jars are not cached and mvn is missing: install maven, or set KAFKA_HOME")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "pom.xml").write_text(_POM)
    # Download next to the cache and rename, so an interrupted download never looks complete.
    partial = cache / "libs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _progress(f"kafka: fetching Kafka {KAFKA_VERSION} jars from Maven Central into {libs}")
    started = time.monotonic()
    argv = [mvn, "-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime"]
    argv.append(f"-DoutputDirectory={partial}")
    result = subprocess.run(argv, cwd=cache, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-3000:]
        raise ServiceError(f"Maven could not fetch the Kafka jars:\n{output}")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    _progress(f"kafka: jars ready ({time.monotonic() - started:.1f}s)")
    return libs


def _kafka_cluster_id() -> str:
    """A random cluster id in Kafka's Uuid form: 16 bytes, URL-safe base64 without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):  # it would read as an option on the command line
            return cluster_id


def _start_kafka(cfg: _Config) -> int:
    java = _require_binary("java", "Kafka needs a Java 17+ runtime (Debian: openjdk-17-jre-headless)")
    libs = _kafka_libs()
    home = _service_dir("kafka")
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    properties = home / "server.properties"
    properties.write_text(_server_properties(cfg.kafka_port, data))
    log4j = home / "log4j2.properties"
    log4j.write_text(_LOG4J2)
    classpath = ["-cp", f"{libs}/*", f"-Dlog4j2.configurationFile={log4j}"]
    if not (data / "meta.properties").exists():
        # No --standalone: controller.quorum.voters already names the single voter.
        log = _log_file("kafka")
        log.parent.mkdir(parents=True, exist_ok=True)
        format_args = ["format", "-t", _kafka_cluster_id(), "-c", str(properties)]
        argv = [java, *classpath, "kafka.tools.StorageTool", *format_args]
        _progress(f"kafka: formatting {data}")
        with log.open("ab") as out:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise ServiceError(f"formatting Kafka storage failed; see {log}:\n{_log_tail(log)}")
    # The serial collector: a local broker's heap is small, and G1's concurrent threads cost CPU when idle.
    # No hsperfdata (what jstat reads): the JVM would sample its counters every 50 ms, idle or not
    # (1 ms of CPU a second, 20 wake-ups).
    jvm = ["-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:-UsePerfData"]
    argv = [java, *jvm, *classpath, "kafka.Kafka", str(properties)]
    return _launch("kafka", argv, cwd=home)


def _kafka_admin(cfg: _Config) -> AdminClient:
    return AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})


def _kafka_answers(cfg: _Config) -> None:
    # A plain connect first: librdkafka would log every refused connection while the JVM boots.
    with socket.create_connection((cfg.kafka_host, cfg.kafka_port), timeout=1):
        pass
    _kafka_admin(cfg).list_topics(timeout=3)


def _ensure_topic(cfg: _Config) -> None:
    """Create the events topic unless it exists, then wait until every partition has a leader."""
    admin = _kafka_admin(cfg)
    futures = admin.create_topics([NewTopic(cfg.topic, num_partitions=cfg.partitions, replication_factor=1)])
    try:
        futures[cfg.topic].result(timeout=30)
        _progress(f"kafka: created topic {cfg.topic} ({cfg.partitions} partitions)")
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise ServiceError(f"could not create topic {cfg.topic}: {exc}") from exc

    def has_leaders() -> None:
        topic = admin.list_topics(topic=cfg.topic, timeout=3).topics[cfg.topic]
        if topic.error is not None or not topic.partitions:
            raise ServiceError(f"topic {cfg.topic} not available yet: {topic.error}")
        if any(p.leader < 0 for p in topic.partitions.values()):
            raise ServiceError(f"topic {cfg.topic} has partitions without a leader")
        if len(topic.partitions) != cfg.partitions:
            found = len(topic.partitions)
            _progress(f"kafka: warning: {cfg.topic} has {found} partitions, settings say {cfg.partitions}")

    what = f"topic {cfg.topic} with partition leaders"
    _wait_until("kafka", what, has_leaders, pid=None, external=cfg.kafka_external)


def _warm_coordinators(cfg: _Config) -> None:
    """On a broker just started: load the coordinators that an idempotent producer (producer id) and
    a consumer group need, so the first command's event and the first projection are not delayed."""
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "enable.idempotence": True})
    delivered: list[bool] = []
    producer.produce(WARMUP_TOPIC, b"warm-up", on_delivery=lambda err, _msg: delivered.append(err is None))
    producer.flush(30)
    if delivered != [True]:
        raise ServiceError(f"kafka: no idempotent produce within 30 s; see {_log_file('kafka')}")
    consumer = Consumer(
        {
            "bootstrap.servers": cfg.kafka_bootstrap,
            "group.id": WARMUP_TOPIC,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([WARMUP_TOPIC])
        deadline = time.monotonic() + 30
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"kafka: no consumer group assignment within 30 s; see {_log_file('kafka')}"
                )
            consumer.poll(0.2)
    finally:
        consumer.close()


# ---------------------------------------------------------------- public API


def ensure_services() -> dict[str, int | None]:
    """Start whichever service is not running, wait until all answer; return their pids (None: external)."""
    started = time.monotonic()
    with _exclusive():
        _use_admin_credentials()
        cfg = _config()
        managed = [name for name in NAMES if not (name == "kafka" and cfg.kafka_external)]
        pids: dict[str, int | None] = {name: None for name in NAMES}
        for name in managed:
            pid = pids[name] = _running_pid(name)
            if pid is None:
                continue
            if _proc_state(pid) == "T":
                raise ServiceError(f"{name} (pid {pid}) is paused; `python -m tools.services resume {name}`")
            if not _serves_configured_port(name, pid, cfg):
                raise ServiceError(
                    f"{name} (pid {pid}) runs on another port than port {cfg.port(name)} configured now; "
                    "run `python -m tools.services stop` first"
                )
        to_start = [name for name in managed if pids[name] is None]
        # All checks before the slow Maven download, so a taken port or a missing package fails in seconds.
        _require_free_ports(cfg, to_start)
        _install_missing_packages([name for name in to_start if name != "kafka"])
        # Kafka boots slowest: its JVM starts first and comes up while the others do.
        if "kafka" in to_start:
            pids["kafka"] = _start_kafka(cfg)
        if "mariadb" in to_start:
            pids["mariadb"] = _start_mariadb(cfg)
        if "redis" in to_start:
            pids["redis"] = _start_redis(cfg)

        _wait_until("redis", f"PING on port {cfg.redis_port}", lambda: _redis_answers(cfg), pids["redis"])
        _configure_redis(cfg)
        _wait_until(
            "mariadb",
            f"SELECT 1 as {cfg.db_user} on {cfg.db_host}:{cfg.db_port}",
            lambda: _mariadb_answers(cfg, bootstrap=True),
            pids["mariadb"],
        )
        what = f"metadata from {cfg.kafka_bootstrap}" + (" (KAFKA_EXTERNAL=1)" if cfg.kafka_external else "")
        _wait_until("kafka", what, lambda: _kafka_answers(cfg), pids["kafka"], external=cfg.kafka_external)
        _ensure_topic(cfg)
        if "kafka" in to_start:
            _wait_until(
                "kafka",
                "producer id and consumer group coordinators",
                lambda: _warm_coordinators(cfg),
                pids["kafka"],
            )
    _progress(f"all services ready ({time.monotonic() - started:.1f}s)")
    return pids


def stop_services(names: Iterable[str] | None = None) -> None:
    """Stop the processes whose pid files we wrote (all, or the named ones): SIGTERM, later SIGKILL."""
    selected = list(NAMES if names is None else names)
    if unknown := set(selected) - set(NAMES):
        raise ServiceError(f"unknown services {sorted(unknown)}; expected some of {', '.join(NAMES)}")
    with _exclusive():
        stopping: dict[str, int] = {}
        for name in selected:
            pid = _running_pid(name)
            if pid is None:
                _pid_file(name).unlink(missing_ok=True)
                continue
            os.kill(pid, signal.SIGTERM)
            # A paused process acts on SIGTERM only once it runs again.
            os.kill(pid, signal.SIGCONT)
            stopping[name] = pid
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name, pid in stopping.items():
            while not _is_gone(pid) and time.monotonic() < deadline:
                time.sleep(POLL_S / 2)
            if not _is_gone(pid):
                _progress(f"{name}: pid {pid} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s, sending SIGKILL")
                os.kill(pid, signal.SIGKILL)
                killed_by = time.monotonic() + 5
                while not _is_gone(pid):
                    if time.monotonic() > killed_by:
                        raise ServiceError(f"{name} (pid {pid}) survived SIGKILL; check `ps -o stat {pid}`")
                    time.sleep(POLL_S / 2)
            _pid_file(name).unlink(missing_ok=True)
            _progress(f"{name}: stopped pid {pid}")


def running_services() -> list[str]:
    """Names of the services running from our pid files (paused ones included), e.g. to stop them later."""
    return [name for name in NAMES if _running_pid(name) is not None]


def status() -> list[ServiceStatus]:
    """One entry per service: running or paused with its pid, stopped, or external (Kafka)."""
    cfg = _config()
    result = []
    for name in NAMES:
        if name == "kafka" and cfg.kafka_external:
            result.append(ServiceStatus(name, "external", None, cfg.kafka_port))
            continue
        pid = _running_pid(name)
        state = "stopped" if pid is None else "paused" if _proc_state(pid) == "T" else "running"
        result.append(ServiceStatus(name, state, pid, cfg.port(name)))
    return result


def pause(name: str) -> None:
    """Freeze a service (SIGSTOP): its port still accepts connections but nothing answers."""
    _signal_and_wait(name, signal.SIGSTOP, paused=True)


def resume(name: str) -> None:
    """Let a paused service run again (SIGCONT)."""
    _signal_and_wait(name, signal.SIGCONT, paused=False)


def _signal_and_wait(name: str, sig: signal.Signals, paused: bool) -> None:
    # Delivery is asynchronous; a fault test must not act before the process has really stopped.
    pid = _pid_of(name)
    os.kill(pid, sig)
    deadline = time.monotonic() + 5
    while (_proc_state(pid) == "T") != paused:
        if time.monotonic() > deadline:
            raise ServiceError(f"{name} (pid {pid}) did not {'stop' if paused else 'continue'} within 5s")
        time.sleep(0.01)


def _pid_of(name: str) -> int:
    if name not in NAMES:
        raise ServiceError(f"unknown service {name!r}; expected one of {', '.join(NAMES)}")
    pid = _running_pid(name)
    if pid is None:
        raise ServiceError(f"{name} is not running (no live process behind {_pid_file(name)})")
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.services", description="Local MariaDB, Redis, Kafka."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start", help="start what is not running and wait until everything answers")
    commands.add_parser("stop", help="stop the services this tool started")
    commands.add_parser("status", help="one line per service")
    commands.add_parser("roles", help="create or update the role users and grants (after the migrations)")
    for command in ("pause", "resume"):
        one = commands.add_parser(command, help=f"{command} one service (SIGSTOP/SIGCONT)")
        one.add_argument("name", choices=NAMES)
    args = parser.parse_args(argv)
    _use_admin_credentials()
    try:
        if args.command == "start":
            ensure_services()
        elif args.command == "stop":
            stop_services()
        elif args.command == "roles":
            ensure_roles()
        elif args.command == "pause":
            pause(args.name)
        elif args.command == "resume":
            resume(args.name)
        if args.command in ("start", "status", "pause", "resume"):
            for entry in status():
                print(entry.line())
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
