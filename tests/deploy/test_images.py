"""The images, built for real and run as their Knative pods run them.

`make images` builds every image (on the local Debian base when the registry's python image cannot be
pulled). Each function image then runs as its Service's pod would run it (knative/services/<svc>.yaml,
read by tools/knative_pod.py): the image's own user, a read-only root filesystem with the Service's
emptyDir mounts and its Secret volumes (read-only, their files from the Secret template; a certificate,
which no placeholder can stand in for, is a self-signed CA made here, as the Kafka cluster's CA is one),
no capabilities, no privilege escalation, the Service's env over the ConfigMap and the Secret template,
PORT set. It must answer /healthz without MariaDB, Redis or Kafka (the ConfigMap's hosts do not resolve
here), log no error, and stop cleanly on SIGTERM within the pod's grace period.
One function also runs behind Knative's real queue-proxy, configured from its Service.

Nothing here depends on what the functions are made of: any function folder, any requirements, any
server command in the Dockerfile. Needs podman or docker (CONTAINER_CLI picks one); CI installs podman
and fails rather than skips when none works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import knative_pod
from tools.queue_proxy import start_queue_proxy

REPO = Path(__file__).resolve().parents[2]
REGISTRY, TAG = "localhost", "image-test"
HEALTH_PATH = "/healthz"
START_TIMEOUT_S = 60.0
# What a clean start and stop never print: gunicorn's and Python's error lines, a JSON log's error level.
ERROR_LINE = re.compile(r"\b(error|critical|fatal|traceback|exception)\b", re.IGNORECASE)
# The sandbox refuses to raise these limits, and a container inherits them unless told.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def _works(cli: str) -> bool:
    return bool(shutil.which(cli)) and subprocess.run([cli, "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def cli() -> str:
    wanted = os.environ.get("CONTAINER_CLI")
    for candidate in [wanted] if wanted else ["podman", "docker"]:
        if _works(candidate):
            return candidate
    reason = f"no working container CLI ({wanted or 'podman or docker'}): the images cannot be built here"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run these tests (.ci/run installs podman)")
    pytest.skip(reason)


def image_of(service: str) -> str:
    return f"{REGISTRY}/todo-cqrs-{service}:{TAG}"


@pytest.fixture(scope="session")
def images(cli: str) -> None:
    """Every image, built by `make images` exactly as a user builds them (layers cached by the CLI)."""
    command = ["make", "--no-print-directory", "images", f"CONTAINER_CLI={cli}", f"IMAGE_REGISTRY={REGISTRY}"]
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        run = subprocess.run([*command, f"IMAGE_TAG={TAG}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert run.returncode == 0, f"make images failed:\n{output[-6000:]}"
    print(f"make images: {time.monotonic() - started:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tmpfs_size(limit: str | None) -> str:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    if not limit:
        return ""
    for suffix, factor in units.items():
        if limit.endswith(suffix):
            return f",tmpfs-size={int(limit[: -len(suffix)]) * factor}"
    return f",tmpfs-size={int(limit)}"


class SecretVolumes:
    """Secret volumes' files on this machine, as the kubelet writes them for a pod: the Secret template's
    values (knative/secret.example.yaml), except a certificate (a key ending in .crt), which is a
    self-signed CA made once here, as Strimzi's cluster CA Secret holds one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ca: bytes | None = None

    def ca_certificate(self) -> bytes:
        if self._ca is None:
            cert, key = self.root / "ca.crt", self.root / "ca.key"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=cluster-ca", "-keyout", str(key), "-out", str(cert)],
                check=True, capture_output=True,
            )  # fmt: skip
            self._ca = cert.read_bytes()
        return self._ca

    def directory(self, mount: dict[str, Any]) -> Path:
        """A new directory holding the mount's files, to bind-mount read-only at its path."""
        directory = Path(tempfile.mkdtemp(prefix=f"{mount['secret']}-", dir=self.root))
        directory.chmod(0o755)  # the image's user reads it, as a Secret volume's directory
        template = knative_pod.secret_template(mount["secret"])
        for name, key in mount["files"].items():
            path = directory / name
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            path.write_bytes(self.ca_certificate() if key.endswith(".crt") else template[key].encode())
            path.chmod(mount["mode"])
        return directory


@pytest.fixture(scope="session")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> SecretVolumes:
    return SecretVolumes(tmp_path_factory.mktemp("secret-volumes"))


class Pod:
    """One function's image run as the user container of its Knative Service's pod."""

    def __init__(self, cli: str, service: str, secrets: SecretVolumes, role: str = "test") -> None:
        self.cli, self.service = cli, service
        self.doc = knative_pod.service_manifest(service)
        self.port = free_port()
        self.name = f"todo-cqrs-{role}-{service}-{os.getpid()}"
        context = knative_pod.user_container(self.doc)["securityContext"]
        argv = [cli, "run", "--detach", "--name", self.name, "--network", "host", *ULIMITS]
        if context.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
            if Path(cli).name == "podman":
                argv.append("--read-only-tmpfs=false")  # podman would add writable /tmp, /run: a pod has none
        if "ALL" in context.get("capabilities", {}).get("drop", []):
            argv += ["--cap-drop", "ALL"]
        if context.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        for mount in knative_pod.writable_mounts(self.doc):
            argv += [
                "--mount",
                f"type=tmpfs,destination={mount['path']},tmpfs-mode=1777{tmpfs_size(mount.get('sizeLimit'))}",
            ]
        for mount in knative_pod.secret_mounts(self.doc):
            source = secrets.directory(mount)
            argv += ["--mount", f"type=bind,source={source},destination={mount['path']},readonly=true"]
        for key, value in knative_pod.container_env(self.doc, self.port).items():
            argv += ["--env", f"{key}={value}"]
        self.run_argv = [*argv, image_of(service)]
        self.started = False
        self.startup_s = 0.0

    def start(self) -> None:
        run = subprocess.run(self.run_argv, capture_output=True, text=True)
        assert run.returncode == 0, f"{self.cli} run failed: {run.stderr}"
        self.started = True

    def state(self) -> dict[str, object]:
        run = subprocess.run(
            [self.cli, "inspect", "--format", "{{json .State}}", self.name], capture_output=True
        )
        return json.loads(run.stdout) if run.returncode == 0 else {}

    def logs(self) -> str:
        run = subprocess.run([self.cli, "logs", self.name], capture_output=True)
        return (run.stdout + run.stderr).decode(errors="replace")

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.cli, "exec", self.name, *command], capture_output=True, text=True)

    def get(self, path: str, port: int | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{port or self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def wait_healthy(self) -> float:
        """Seconds until the health path answered 200; fails when the container exits or time runs out."""
        started = next_state_check = time.monotonic()
        while True:
            try:
                status, body = self.get(HEALTH_PATH)
                assert status == 200, (status, body)
                return time.monotonic() - started
            except (ConnectionError, urllib.error.URLError, TimeoutError):
                pass
            now = time.monotonic()
            if now >= next_state_check:
                if not self.state().get("Running"):
                    pytest.fail(f"{self.service}'s container exited at start:\n{self.logs()[-4000:]}")
                next_state_check = now + 1.0
            if now - started > START_TIMEOUT_S:
                pytest.fail(
                    f"{self.service} did not answer {HEALTH_PATH} in {START_TIMEOUT_S:.0f} s:\n{self.logs()}"
                )
            time.sleep(0.1)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, as the kubelet sends it; (exit code, seconds until exit). Killed past the grace period."""
        grace = knative_pod.grace_period_seconds(self.doc)
        started = time.monotonic()
        subprocess.run([self.cli, "kill", "--signal", "TERM", self.name], capture_output=True, check=True)
        try:
            run = subprocess.run(
                [self.cli, "wait", self.name], capture_output=True, text=True, timeout=grace + 5
            )
        except subprocess.TimeoutExpired:
            return -1, time.monotonic() - started
        return int(run.stdout.strip().splitlines()[-1]), time.monotonic() - started

    def remove(self) -> None:
        if self.started:
            subprocess.run([self.cli, "rm", "--force", self.name], capture_output=True)


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ERROR_LINE.search(line)]


@contextmanager
def healthy_pod(cli: str, service: str, secrets: SecretVolumes, role: str = "test") -> Iterator[Pod]:
    running = Pod(cli, service, secrets, role)
    try:
        running.start()
        running.startup_s = running.wait_healthy()
        yield running
    finally:
        running.remove()


@pytest.fixture(scope="module", params=knative_pod.services())
def pod(request: pytest.FixtureRequest, cli: str, images: None, secrets: SecretVolumes) -> Iterator[Pod]:
    """One pod per Service, shared by the tests that only look at it."""
    with healthy_pod(cli, request.param, secrets) as running:
        yield running


@pytest.fixture(params=knative_pod.services())
def pod_to_stop(
    request: pytest.FixtureRequest, cli: str, images: None, secrets: SecretVolumes
) -> Iterator[Pod]:
    """A pod of the test's own, for a test that stops it."""
    with healthy_pod(cli, request.param, secrets, role="stop") as running:
        yield running


def test_image_runs_as_a_non_root_numeric_user(pod: Pod, cli: str) -> None:
    # runAsNonRoot: the kubelet can verify only a numeric, non-zero image user.
    run = subprocess.run(
        [cli, "image", "inspect", "--format", "{{.Config.User}}", image_of(pod.service)],
        capture_output=True,
        text=True,
    )
    user = run.stdout.strip().split(":")[0]
    assert user.isdigit() and int(user) > 0, f"image user {run.stdout.strip()!r}"
    status = pod.exec("sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status")
    uids = {uid for line in status.stdout.splitlines() for uid in line.split()[1:]}
    assert uids == {user}, f"processes run as {uids}, not only the image user {user}"


def test_root_filesystem_is_read_only_and_only_the_emptydir_is_writable(pod: Pod) -> None:
    assert knative_pod.user_container(pod.doc)["securityContext"]["readOnlyRootFilesystem"] is True
    refused = pod.exec("sh", "-c", "touch /app/probe")
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused
    for mount in knative_pod.writable_mounts(pod.doc):
        written = pod.exec("sh", "-c", f"touch {mount['path']}/probe && rm {mount['path']}/probe")
        assert written.returncode == 0, (mount, written.stderr)
    # A Secret volume: its files readable by the image's user, nothing writable.
    for mount in knative_pod.secret_mounts(pod.doc):
        for name in mount["files"]:
            read = pod.exec("sh", "-c", f"test -s {mount['path']}/{name} && cat {mount['path']}/{name}")
            assert read.returncode == 0, (mount, name, read.stderr)
        refused = pod.exec("sh", "-c", f"touch {mount['path']}/probe")
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, (mount, refused)


def test_answers_its_health_path_without_any_backing_service(pod: Pod) -> None:
    status, body = pod.get(HEALTH_PATH)
    assert status == 200 and isinstance(json.loads(body), dict), (status, body)
    print(f"{pod.service}: /healthz answered {pod.startup_s:.1f} s after start")


def test_logs_no_error_at_start(pod: Pod) -> None:
    assert not error_lines(pod.logs()), pod.logs()


def test_stops_cleanly_on_sigterm_within_the_grace_period(pod_to_stop: Pod) -> None:
    grace = knative_pod.grace_period_seconds(pod_to_stop.doc)
    code, seconds = pod_to_stop.terminate()
    log = pod_to_stop.logs()
    assert code == 0, f"exit code {code} after SIGTERM ({seconds:.1f} s, grace {grace} s):\n{log}"
    assert seconds < grace, f"took {seconds:.1f} s, grace period {grace} s"
    assert not error_lines(log), log


# ---- the ops image (the Jobs) and queue-proxy ------------------------------------------------------------


def jobs_modules() -> list[str]:
    """The modules the Jobs run (`python -m <module>`, init containers included): the migrations Job and
    the ops Jobs of knative/."""
    modules = set()
    for path in [REPO / "knative" / "migrate-job.yaml", *sorted((REPO / "knative" / "ops").glob("*.yaml"))]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Job":
                pod = doc["spec"]["template"]["spec"]
                modules |= {c["command"][2] for c in [*pod.get("initContainers", []), *pod["containers"]]}
    return sorted(modules)


def test_ops_image_imports_every_jobs_module_as_non_root_on_a_read_only_root(cli: str, images: None) -> None:
    modules = jobs_modules()
    assert {"todo_cqrs.migrations", "todo_cqrs.roles", "todo_cqrs.projection.rebuild"} <= set(modules)
    run = subprocess.run(
        [cli, "run", "--rm", "--network", "none", *ULIMITS, "--read-only", "--cap-drop", "ALL",
         *(["--read-only-tmpfs=false"] if Path(cli).name == "podman" else []),
         "--mount", "type=tmpfs,destination=/tmp,tmpfs-mode=1777", image_of("ops"),
         "python", "-c", f"import os, {', '.join(modules)}; print(os.getuid())"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.strip()) > 0


def test_a_function_answers_behind_knatives_queue_proxy_configured_from_its_service(
    cli: str, images: None, secrets: SecretVolumes
) -> None:
    service = "get-todos"
    # Its own name: the shared get-todos pod may still run.
    pod = Pod(cli, service, secrets, role="queue-proxy")
    try:
        pod.start()
        pod.wait_healthy()
        # Returns once queue-proxy, probed as the kubelet probes it, ran the Service's readinessProbe.
        with start_queue_proxy(pod.port, service) as proxy:
            assert proxy.env["CONTAINER_CONCURRENCY"] == str(
                knative_pod.revision_spec(pod.doc)["containerConcurrency"]
            )
            assert json.loads(proxy.env["SERVING_READINESS_PROBE"])["httpGet"]["path"] == HEALTH_PATH
            status, body = pod.get(HEALTH_PATH, port=proxy.port)
            assert status == 200 and json.loads(body) == json.loads(pod.get(HEALTH_PATH)[1]), (status, body)
            # The liveness probe goes to the user port itself, within its timeout.
            liveness = knative_pod.user_container(pod.doc)["livenessProbe"]
            assert pod.get(liveness["httpGet"]["path"], timeout=liveness["timeoutSeconds"])[0] == 200
            assert proxy.ready(), proxy.log_tail()
        assert f'"path":"{HEALTH_PATH}"' in pod.logs().replace(" ", "")  # it reached the function
    finally:
        pod.remove()
