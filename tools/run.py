"""`make run`: the whole system on one machine, in the foreground, until Ctrl-C.

Starts (or reuses) MariaDB, Redis and Kafka, applies the migrations, then starts every function as
its own process, served as functions-framework's `--asgi` serves it (todo_cqrs/serve.py: gunicorn's
uvicorn worker, uvloop, httptools),
the local KafkaSource, the outbox relay's and the reconciliation's schedules (what PingSources do
in a cluster: RECONCILE_INTERVAL_SECONDS, 10 s, for the latter), the live page's pipeline server
and, last, the gateway (nginx). Each process logs to its own file (this run's; the previous run's
is kept as <name>.log.1).

Supervised, as a Kubernetes user expects: a child that dies is started again after a backoff
(0.5 s, doubling, at most 10 s) with a log line; only a child that crashes 5 times within 30 s stops
the run, naming its log. MariaDB, Redis or Kafka, if one dies, is started again (checked every
second). Ctrl-C (or SIGTERM) stops everything this command started.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from todo_cqrs.settings import LOCAL_DIR, settings
from tools import credentials, issuer, services
from tools.kafkasource import DEFAULT_SPEC, load_spec
from tools.processes import die_with_parent, port_free
from tools.topology import (
    BY_NAME,
    FUNCTIONS,
    GATEWAY_PORT,
    HOST,
    KAFKASOURCE_METRICS_PORT,
    PIPELINE_PORT,
    REPO,
    Function,
)

LOG_DIR = LOCAL_DIR / "logs"
VENV_BIN = Path(sys.executable).parent
RELAY_PERIOD_S = float(os.environ.get("RELAY_PERIOD_SECONDS", "1.0"))
READY_TIMEOUT_S = 60.0
CRASHES_ALLOWED, CRASH_WINDOW_S = 5, 30.0
RESTART_FIRST_S, RESTART_MAX_S = 0.5, 10.0
STOP_TIMEOUT_S = 10.0
SERVICE_CHECK_S = 1.0  # how often supervision looks for a dead MariaDB, Redis or Kafka

# One worker process per function, as in a Knative pod (one container, WORKERS=1): more throughput
# comes from more pods (or, locally, it is not needed: `make bench` shows the limits per process).
SERVER_ENV = {"WORKERS": "1"}


def say(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


class RunFailed(RuntimeError):
    pass


@dataclass
class Child:
    """A supervised process: its command, and what became of it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path  # its stdout and stderr, this run's only (appended to across restarts)
    port: int | None = None  # a port it listens on: free again before a restart
    process: subprocess.Popen[bytes] | None = None
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    restart_at: float | None = None


@dataclass
class System:
    """The processes `make run` started, stopped in reverse order; their logs in `log_dir`."""

    log_dir: Path = LOG_DIR
    children: list[Child] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    # MariaDB, Redis and Kafka as they ran once the system was up: one that dies is started again.
    services: list[str] = field(default_factory=list)
    next_service_check: float = 0.0

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, port: int | None = None
    ) -> Child:
        child = Child(name, argv, env or {}, self.log(name), port)
        self.children.append(child)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if child.log.exists():  # the previous run's log, kept once: logs do not pile up run after run
            child.log.replace(child.log.with_suffix(".log.1"))
        self._start(child)
        return child

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _start(self, child: Child) -> None:
        log = open(child.log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        child.process = subprocess.Popen(
            child.argv,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **child.env},
            start_new_session=True,  # Ctrl-C reaches the runner only; it stops the children in order
            preexec_fn=die_with_parent,  # SIGTERM: nothing is left behind
        )
        log.close()
        child.restart_at = None

    def supervise(self) -> None:
        """Start again what died (with a backoff); raise RunFailed when one keeps crashing."""
        now = time.monotonic()
        if self.services and now >= self.next_service_check and not self.stopping.is_set():
            self._restart_dead_services()
            self.next_service_check = time.monotonic() + SERVICE_CHECK_S
        for child in self.children:
            process = child.process
            if process is None or self.stopping.is_set():
                continue
            if child.restart_at is None and process.poll() is not None:
                _kill_group(process)  # a gunicorn master's orphaned worker would keep the port
                child.crashes.append(now)
                while child.crashes and now - child.crashes[0] > CRASH_WINDOW_S:
                    child.crashes.popleft()
                if len(child.crashes) >= CRASHES_ALLOWED:
                    raise RunFailed(
                        f"{child.name} crashed {len(child.crashes)} times within {CRASH_WINDOW_S:.0f} s "
                        f"(last exit status {process.returncode}); see {child.log}"
                    )
                delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (len(child.crashes) - 1))
                status = process.returncode
                say(f"{child.name} exited ({status}); restarting in {delay:.1f} s; see {child.log}")
                child.restart_at = now + delay
            elif (
                child.restart_at is not None
                and now >= child.restart_at
                and (child.port is None or port_free(child.port, HOST))
            ):
                say(f"{child.name} restarted")
                self._start(child)

    def _restart_dead_services(self) -> None:
        """Start again whichever service has died (as Kubernetes would restart its pod) and wait until
        it answers; a paused one is alive. RunFailed when it cannot be started."""
        dead = [name for name in self.services if name not in services.running_services()]
        if not dead:
            return
        names = " and ".join(dead)
        say(f"{names} exited; starting again ...")
        try:
            services.ensure_services()
        except services.ServiceError as exc:
            raise RunFailed(f"{names} could not be started again: {exc}") from exc
        say(f"{names} started again")

    def check_alive(self) -> None:
        """During start-up: a child that exits fails the start (nothing is up to restart it into)."""
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                raise RunFailed(f"{child.name} exited with {child.process.returncode}; see {child.log}")

    def stop(self) -> None:
        self.stopping.set()
        running = [
            c.process for c in reversed(self.children) if c.process is not None and c.process.poll() is None
        ]
        for process in running:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in reversed(self.children):
            process = child.process
            if process is None:
                continue
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{child.name} did not stop in time; killing it")
            _kill_group(process)
        self.children.clear()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left of the child's process group (a frozen one included), and reap it."""
    _signal_group(process, signal.SIGCONT)
    _signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def function_argv(function: Function) -> list[str]:
    return [
        sys.executable,
        "-m",
        "todo_cqrs.serve",
        "--target",
        function.name,
        "--source",
        str(function.source),
        "--host",
        HOST,
        "--port",
        str(function.port),
    ]


def function_env(function: Function) -> dict[str, str]:
    """Its Knative Service name and port, and its role's credentials (least privilege: docs/security.md)."""
    env = {"K_SERVICE": function.service, "PORT": str(function.port), **SERVER_ENV}
    return {**env, **credentials.function_env(function.name)}


def receiver_env(function: Function) -> dict[str, str]:
    """An event receiver's sender identity (required, with the local issuer); {} for the others."""
    return issuer.receiver_env(function.service)


def start_issuer(system: System) -> None:
    """The local OIDC issuer, before the receivers that fetch its keys and the sources that present its
    tokens (tools/issuer.py)."""
    system.spawn("issuer", [sys.executable, "-m", "tools.issuer"], port=issuer.ISSUER_PORT)
    took = wait_http_ready(system, "issuer", f"{issuer.ISSUER_URL}/healthz")
    say(f"{'issuer':<14} ready on {issuer.ISSUER_URL} ({took:.1f} s)")


def kafkasource_argv() -> list[str]:
    return [sys.executable, "-m", "tools.kafkasource", "--metrics-port", str(KAFKASOURCE_METRICS_PORT)]


def wait_http_ready(system: System, name: str, url: str, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Poll url until it answers 200; returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        system.check_alive()
        if time.monotonic() - started > timeout_s:
            raise RunFailed(f"{name} not ready after {timeout_s:.0f} s; see {system.log(name)}")
        time.sleep(0.05)


def wait_consumer_group_assigned(system: System, group: str, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Poll the consumer group until its members own partitions: only then do events flow."""
    admin = AdminClient({"bootstrap.servers": settings().kafka_bootstrap_servers})
    started = time.monotonic()
    while True:
        try:
            group_state = admin.describe_consumer_groups([group])[group].result(timeout=5)
            if group_state.state == ConsumerGroupState.STABLE and any(
                member.assignment.topic_partitions for member in group_state.members
            ):
                return time.monotonic() - started
        except KafkaException:
            pass
        system.check_alive()
        if time.monotonic() - started > timeout_s:
            raise RunFailed(f"the local KafkaSource did not join {group}; see {system.log('kafkasource')}")
        time.sleep(0.1)


def start(system: System) -> None:
    """Start every process of the local system and wait until each answers."""
    started = time.monotonic()
    say("starting MariaDB, Redis and Kafka (or reusing them) ...")
    services.ensure_services()
    services.ensure_packages(["nginx"])  # the gateway's
    say(f"services ready after {time.monotonic() - started:.1f} s; applying migrations ...")
    subprocess.run([sys.executable, "-m", "todo_cqrs.migrations", "upgrade"], cwd=REPO, check=True)
    services.ensure_roles()  # the role users' grants name the tables the migrations made
    start_issuer(system)
    for function in FUNCTIONS:
        env = {**function_env(function), **receiver_env(function)}
        system.spawn(function.name, function_argv(function), env, function.port)
    for function in FUNCTIONS:
        took = wait_http_ready(system, function.name, f"{function.url}/healthz")
        say(f"{function.name:<14} ready on {function.url} ({took:.1f} s)")
    # Once its sinks answer: a backlog is delivered at once, not retried with backoff while they start.
    system.spawn("kafkasource", kafkasource_argv(), port=KAFKASOURCE_METRICS_PORT)
    took = wait_consumer_group_assigned(system, load_spec(DEFAULT_SPEC).consumer_group)
    say(f"kafkasource    consuming ({took:.1f} s)")
    threading.Thread(
        target=relay_schedule, args=(system.stopping,), name="relay-schedule", daemon=True
    ).start()
    reconcile = BY_NAME["reconcile"]
    threading.Thread(
        target=scheduled_ticks,
        args=(
            "reconcile",
            f"{reconcile.url}/",
            settings().reconcile_interval_s,
            system.stopping,
            issuer.Tokens(issuer.RECONCILE_TICK_SUBJECT).headers_for(reconcile.service),
        ),
        name="reconcile-schedule",
        daemon=True,
    ).start()
    system.spawn("pipeline", [sys.executable, "-m", "tools.pipeline_server"], port=PIPELINE_PORT)
    # The gateway last: once it answers, every path behind it works, events included.
    system.spawn("gateway", [sys.executable, "-m", "tools.gateway"], port=GATEWAY_PORT)
    wait_http_ready(system, "gateway", f"http://{HOST}:{GATEWAY_PORT}/healthz")
    system.services = services.running_services()
    say(f"everything up in {time.monotonic() - started:.1f} s")


def relay_schedule(stopping: threading.Event) -> None:
    """What the PingSource does in a cluster: ask relay_outbox to publish the orphaned outbox rows, with
    the PingSource's token."""
    relay = BY_NAME["relay_outbox"]
    headers = issuer.Tokens(issuer.RELAY_TICK_SUBJECT).headers_for(relay.service)
    scheduled_ticks("outbox relay", f"{relay.url}/", RELAY_PERIOD_S, stopping, headers, 10.0)


def scheduled_ticks(
    name: str,
    url: str,
    period_s: float,
    stopping: threading.Event,
    headers: Callable[[], dict[str, str]] | None = None,
    timeout_s: float = 120.0,
) -> None:
    """What a PingSource does in a cluster: POST to `url` every `period_s` (counted from the end of the
    previous tick, so ticks never pile up), with `headers()` made afresh for each (a sender's token).
    It never dies: a failed tick is logged once and the next one follows."""
    failing = False
    while not stopping.wait(period_s):
        request = urllib.request.Request(
            url,
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json", **(headers() if headers else {})},
        )
        try:
            urllib.request.urlopen(request, timeout=timeout_s).close()
            if failing:
                say(f"{name} tick works again")
            failing = False
        except Exception as exc:  # noqa: BLE001 - the function restarting, or busy: the next tick retries
            if not failing:
                say(f"{name} tick failed: {exc}; retrying every {period_s:.0f} s")
            failing = True


def banner() -> str:
    gateway = f"http://{HOST}:{GATEWAY_PORT}"
    lines = [
        "",
        f"Gateway (the original sample's API): {gateway}",
        f"Live page: {gateway}/ui/",
        *(f"  {f.name:<14} {f.url}" for f in FUNCTIONS),
        f"Logs: {LOG_DIR}/<name>.log (the previous run's: <name>.log.1)",
        "",
        "Try it:",
        f"  curl -s -X POST {gateway}/todo -H 'Content-Type: application/json' \\",
        """       -d '{"title": "buy milk"}'""",
        f"  curl -s '{gateway}/todo/1?min_version=1'",
        f"  curl -s {gateway}/todo",
        "Ctrl-C stops everything this command started.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--keep-services", action="store_true", help="leave MariaDB, Redis and Kafka running on exit"
    )
    args = parser.parse_args()
    services_before = services.running_services()
    system = System()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    die_with_parent()  # if `make` itself is killed, stop everything as on Ctrl-C
    failed = False
    try:
        start(system)
        print(banner(), flush=True)
        while not stopping.wait(0.2):
            system.supervise()
    except RunFailed as exc:
        say(str(exc))
        failed = True
    finally:
        say("stopping ...")
        system.stop()
        started_here = [name for name in services.running_services() if name not in services_before]
        if started_here and not args.keep_services:
            services.stop_services(started_here)
        say("stopped")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
