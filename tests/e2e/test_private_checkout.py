"""The gateway and the live page's files from a checkout that only its owner can read: a copy of the
working tree in a `mktemp -d` folder (mode 0700, as Debian's home directories are), its gateway
started the way `make run` starts it (`python -m tools.gateway`, from the copy, its `.local` inside
the copy), on a port of its own. nginx's worker must read `ui/` and write its temp files there.

The gateway alone: every other process `make run` starts (functions, pipeline server, local
KafkaSource, MariaDB, Redis, Kafka) runs as the invoking user, whom a 0700 folder does not stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import services
from tools.topology import HOST, REPO

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 30.0


def copy_working_tree(destination: Path) -> None:
    """The tracked and the new (not ignored) files as they are now, uncommitted edits included:
    what a fresh clone holds, without .local or .venv (both ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if not source.is_file():  # deleted in the working tree, not yet committed
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body), whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


@pytest.fixture(scope="module")
def private_checkout() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="todo-cqrs-private-"))
    try:
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        copy_working_tree(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def private_gateway(private_checkout: Path) -> Iterator[str]:
    """The copy's gateway on a free port; its URL once /healthz answers. Stopped (SIGTERM, nginx's fast
    shutdown) at the end of the module."""
    services.ensure_packages(["nginx"])  # what `make run` does first; may need apt-get once
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "TODO_LOCAL_DIR"}
    env["GATEWAY_PORT"] = str(port)
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.gateway"],
        cwd=private_checkout,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-3000:]

    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while get_ready(url) is False:
            if process.poll() is not None:
                pytest.fail(f"the gateway exited with {process.returncode}:\n{output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the gateway did not answer in {START_TIMEOUT_S} s:\n{output()}")
            time.sleep(0.05)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()


def get_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_the_gateway_runs_from_the_private_copy(private_checkout: Path, private_gateway: str) -> None:
    """Its config and temp folders are the copy's own: nothing of the original checkout serves."""
    port = private_gateway.rsplit(":", 1)[1]
    config = (private_checkout / ".local" / "gateway" / port / "nginx.conf").read_text()
    assert f"alias {private_checkout / 'ui'}/;" in config
    assert (private_checkout / ".local" / "gateway" / port / "body").is_dir()


@pytest.mark.parametrize("path", ["index.html", "app.js"])
def test_live_page_files_are_served_from_a_folder_only_its_owner_can_read(
    private_checkout: Path, private_gateway: str, path: str
) -> None:
    status, content_type, body = get(f"{private_gateway}/ui/{'' if path == 'index.html' else path}")

    assert status == 200
    assert content_type.startswith({"index.html": "text/html", "app.js": "application/javascript"}[path])
    assert body == (private_checkout / "ui" / path).read_bytes()


@pytest.mark.parametrize("path", ["/metrics", "/metrics/", "/todo/metrics", "/todo/7/metrics", "/ui/metrics"])
def test_no_path_reaches_a_metrics_endpoint(private_gateway: str, path: str) -> None:
    """Prometheus scrapes each function on its own port; the public gateway serves no /metrics."""
    status, content_type, body = get(private_gateway + path)

    assert (status, content_type) == (404, "application/json")
    assert json.loads(body)["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/ui/no-such-file.js", "/no-such-file.html"])
def test_missing_file_answers_404_in_the_json_error_body(private_gateway: str, path: str) -> None:
    """Whatever the extension says: the gateway's own answers are JSON."""
    status, content_type, body = get(private_gateway + path)

    assert (status, content_type) == (404, "application/json")
    assert json.loads(body)["error"]["code"] == "not_found"
