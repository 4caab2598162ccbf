"""`make run`: the whole system on one machine, in the foreground, until Ctrl-C.

Starts (or reuses) MariaDB, Redis and Kafka, applies the migrations, then starts every function as
its own functions-framework process, the gateway, the local KafkaSource and the outbox relay's
schedule (what a PingSource does in a cluster). Each process logs to its own file.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from local import services
from local.kafkasource import load_spec
from local.topology import BY_NAME, FUNCTIONS, GATEWAY_PORT, HOST, REPO, Function
from todo_cqrs.settings import LOCAL_DIR, settings

LOG_DIR = LOCAL_DIR / "logs"
PR_SET_PDEATHSIG = 1
VENV_BIN = Path(sys.executable).parent
RELAY_PERIOD_S = float(os.environ.get("RELAY_PERIOD_SECONDS", "1.0"))
READY_TIMEOUT_S = 60.0

# Production-like server settings per function (gunicorn gthread). The query side waits for
# read-your-writes (min_version) on a thread, so it gets more of them. One worker each, as in a
# Knative pod: `make bench` measured 2 workers for get_todos at ~215-235 MB RSS (target < 150 MB) for
# ~1.5x the cache-hit throughput, which a cluster gets from more pods instead.
SERVER_ENV: dict[str, dict[str, str]] = {
    "get_todos": {"WORKERS": "1", "THREADS": "16"},
    "project_event": {"WORKERS": "1", "THREADS": "8"},
}


def say(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the runner dies, even by SIGKILL, so nothing is left behind.
    (The kernel ties it to the spawning thread: spawn from a thread that lives as long as the child.)"""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class System:
    """The processes `make run` started, stopped in reverse order."""

    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = open(LOG_DIR / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches the runner only; it stops the children in order
            preexec_fn=_die_with_parent,
        )
        self.processes.append((name, process))
        return process

    def stop(self) -> None:
        self.stopping.set()
        for _, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, process in reversed(self.processes):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in time; killing it")
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode}; see {LOG_DIR / (name + '.log')}"
                )


def function_argv(function: Function) -> list[str]:
    return [
        str(VENV_BIN / "functions-framework"),
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
    return {"K_SERVICE": function.service, "PORT": str(function.port), **SERVER_ENV.get(function.name, {})}


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
            raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s; see {LOG_DIR / (name + '.log')}")
        time.sleep(0.1)


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
            raise RuntimeError(
                f"the local KafkaSource did not join {group}; see {LOG_DIR / 'kafkasource.log'}"
            )
        time.sleep(0.1)


def gateway_argv() -> list[str]:
    return [
        str(VENV_BIN / "gunicorn"),
        "--bind",
        f"{HOST}:{GATEWAY_PORT}",
        "--worker-class",
        "gthread",
        "--threads",
        "32",
        "--workers",
        "1",
        "--log-level",
        "warning",
        "local.gateway:app",
    ]


def start(system: System) -> None:
    """Start every process of the local system and wait until each answers."""
    started = time.monotonic()
    say("starting MariaDB, Redis and Kafka (or reusing them) ...")
    services.ensure_services()
    say(f"services ready after {time.monotonic() - started:.1f} s; applying migrations ...")
    subprocess.run([sys.executable, "-m", "todo_cqrs.migrations", "upgrade"], cwd=REPO, check=True)
    for function in FUNCTIONS:
        system.spawn(function.name, function_argv(function), function_env(function))
    system.spawn("kafkasource", [sys.executable, "-m", "local.kafkasource"])
    for function in FUNCTIONS:
        took = wait_http_ready(system, function.name, f"{function.url}/healthz")
        say(f"{function.name:<14} ready on {function.url} ({took:.1f} s)")
    took = wait_consumer_group_assigned(system, load_spec(REPO / "kafka-source.yaml").consumer_group)
    say(f"kafkasource    consuming ({took:.1f} s)")
    threading.Thread(
        target=relay_schedule, args=(system.stopping,), name="relay-schedule", daemon=True
    ).start()
    # The gateway last: once it answers, every path behind it works, events included.
    system.spawn("gateway", gateway_argv())
    wait_http_ready(system, "gateway", f"http://{HOST}:{GATEWAY_PORT}/healthz")
    say(f"everything up in {time.monotonic() - started:.1f} s")


def relay_schedule(stopping: threading.Event) -> None:
    """What the PingSource does in a cluster: ask relay_outbox to publish whatever is still pending."""
    request = urllib.request.Request(
        f"{BY_NAME['relay_outbox'].url}/",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    while not stopping.wait(RELAY_PERIOD_S):
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            say(f"outbox relay tick failed: {exc}")


def banner() -> str:
    gateway = f"http://{HOST}:{GATEWAY_PORT}"
    lines = [
        "",
        f"Gateway (the original sample's API): {gateway}",
        *(f"  {f.name:<14} {f.url}" for f in FUNCTIONS),
        f"Logs: {LOG_DIR}/<name>.log",
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
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _die_with_parent()  # if `make` itself is killed, stop everything as on Ctrl-C
    try:
        start(system)
        print(banner(), flush=True)
        while not stopping:
            system.check_alive()
            system.stopping.wait(0.5)
    finally:
        say("stopping ...")
        system.stop()
        started_here = [name for name in services.running_services() if name not in services_before]
        if started_here and not args.keep_services:
            services.stop_services(started_here)
        say("stopped")


if __name__ == "__main__":
    main()
