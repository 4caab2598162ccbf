"""`make run`'s supervision, on the whole local system: a child killed with SIGKILL (a function's
gunicorn master, the local KafkaSource) or a service (Redis) is started again and the system works on;
a child that keeps crashing stops the run, naming its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import run, services

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def supervised(system: run.System) -> Iterator[run.System]:
    """The module's system with make run's supervision loop running beside the tests. (Children it
    restarts are tied to this thread by PDEATHSIG; it lives as long as the module.)"""
    stopping = threading.Event()
    failures: list[BaseException] = []

    def supervise() -> None:
        while not stopping.wait(0.1):
            try:
                system.supervise()
            except BaseException as exc:  # noqa: BLE001 - reported by the test that caused it
                failures.append(exc)
                return

    thread = threading.Thread(target=supervise, name="supervise", daemon=True)
    thread.start()
    yield system
    stopping.set()
    thread.join(5)
    assert not failures, failures


def child(system: run.System, name: str) -> run.Child:
    return next(c for c in system.children if c.name == name)


def wait_restarted(system: run.System, name: str, old_pid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        process = child(system, name).process
        if process is not None and process.pid != old_pid and process.poll() is None:
            return
        assert time.monotonic() < deadline, f"{name} was not started again"
        time.sleep(0.05)


def test_a_function_whose_gunicorn_master_is_killed_is_started_again_and_answers(supervised, gateway):
    victim = child(supervised, "create_todo").process
    assert victim is not None
    os.kill(victim.pid, signal.SIGKILL)
    wait_restarted(supervised, "create_todo", victim.pid)
    run.wait_http_ready(supervised, "create_todo", run.BY_NAME["create_todo"].url + "/healthz")
    created = gateway.request("POST", "/todo", {"title": "after a restart"})
    assert created.status == 201
    assert gateway.request("GET", f"/todo/{created.body['id']}?min_version=1").status == 200


def test_a_killed_kafkasource_is_started_again_and_events_flow_on(supervised, gateway):
    victim = child(supervised, "kafkasource").process
    assert victim is not None
    os.kill(victim.pid, signal.SIGKILL)
    created = gateway.request("POST", "/todo", {"title": "while the KafkaSource restarts"})
    assert created.status == 201
    wait_restarted(supervised, "kafkasource", victim.pid)
    for _ in range(15):  # each read waits about 2 s; the group hands the partitions over meanwhile
        read = gateway.request("GET", f"/todo/{created.body['id']}?min_version=1")
        if read.status != 503:
            break
    assert read.status == 200


def redis_pid() -> int | None:
    return next(status.pid for status in services.status() if status.name == "redis")


def test_a_killed_redis_is_started_again_and_the_cache_serves_hits_again(supervised, gateway):
    created = gateway.request("POST", "/todo", {"title": "across a Redis restart"})
    victim = redis_pid()
    assert created.status == 201 and victim is not None
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while redis_pid() in (None, victim):
        assert time.monotonic() < deadline, "Redis was not started again"
        time.sleep(0.1)
    path = f"/todo/{created.body['id']}?min_version=1"
    deadline = time.monotonic() + 30
    while (read := gateway.request("GET", path)).headers.get("X-Cache") != "hit":
        assert read.status in (200, 503), read  # a miss stores the todo; 503 while it is projected
        assert time.monotonic() < deadline, f"no cache hit after the restart: {read}"
        time.sleep(0.1)
    assert read.status == 200 and read.body["title"] == "across a Redis restart"


def test_a_child_that_keeps_crashing_stops_the_run_naming_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESTART_FIRST_S", 0.01)
    system = run.System(log_dir=tmp_path)
    try:
        system.spawn("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
        deadline = time.monotonic() + 30
        with pytest.raises(run.RunFailed, match=r"crasher crashed 5 times .* see .*crasher\.log"):
            while time.monotonic() < deadline:
                system.supervise()
                time.sleep(0.01)
    finally:
        system.stop()
    assert not any(c.process and c.process.poll() is None for c in system.children)


def test_each_run_has_its_own_log_and_keeps_only_the_previous_runs(tmp_path):
    for said in ("first run", "second run", "third run"):
        system = run.System(log_dir=tmp_path)
        try:
            spawned = system.spawn("echo", [sys.executable, "-c", f"print({said!r})"])
            assert spawned.process is not None and spawned.process.wait(10) == 0
        finally:
            system.stop()
    assert (tmp_path / "echo.log").read_text() == "third run\n"
    assert (tmp_path / "echo.log.1").read_text() == "second run\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["echo.log", "echo.log.1"]


def test_stop_ends_every_child_and_its_process_group(tmp_path):
    system = run.System(log_dir=tmp_path)
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    spawned = system.spawn("parent", [sys.executable, "-c", script])
    assert spawned.process is not None
    pgid = spawned.process.pid
    deadline = time.monotonic() + 10
    while len(subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()) < 2:
        assert time.monotonic() < deadline, "the grandchild did not start"
        time.sleep(0.05)
    system.stop()
    deadline = time.monotonic() + 5
    while alive_in_group(pgid):  # killed: gone once init has reaped the orphaned grandchild
        assert time.monotonic() < deadline, f"left running: {alive_in_group(pgid)}"
        time.sleep(0.05)


def alive_in_group(pgid: int) -> list[int]:
    """The processes of a group that are not zombies."""
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    alive = []
    for pid in found:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(int(pid))
    return alive
