"""The cluster deployment, checked offline: no cluster, no Docker, no network.

What can be checked without a cluster is checked exactly: the manifests parse and agree with each
other, with the code (every environment variable it reads is provided), with kafka-source.yaml, and
the image's command, run locally against the function, starts it and answers its health path.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from local import topology

REPO = Path(__file__).resolve().parents[2]
KNATIVE = REPO / "knative"
KAFKA_SOURCE = REPO / "kafka-source.yaml"
DOCKERFILE = REPO / "Dockerfile"
DEPLOY_MK = REPO / "mk" / "deploy.mk"
VALIDATE_MANIFESTS = REPO.parent / "shared" / "tools" / "validate-manifests"
HEALTH_PATH = "/healthz"

# Variables the code reads that neither the ConfigMap nor a Secret provides, and why.
NOT_FROM_CONFIG = {
    "TODO_LOCAL_DIR": "local only: where `make services` keeps its state and the generated DB password",
    "DEAD_LETTER_DIR": "local only: the directory store (DEAD_LETTER_STORE=dir); the cluster uses s3",
    "WRITE_DB_URL": "optional whole-URL override; the cluster composes it from DB_*, password in the Secret",
    "READ_DB_URL": "optional whole-URL override; the cluster composes it from DB_*, password in the Secret",
    "K_SERVICE": "set by Knative Serving in every revision's container",
    "FUNCTION_TARGET": "set by the Dockerfile's ENV (test_function_image_sets_function_target)",
    "METRICS_ENABLED": "on unless set to 0; only the bench turns it off, to measure what metrics cost",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "unset (no export) unless a collector is named (configmap.yaml's comment)",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "the OpenTelemetry SDK's per-signal form of the endpoint",
    "OTEL_SERVICE_NAME": "defaults to K_SERVICE, the Knative Service's name",
    "RECONCILE_INTERVAL_SECONDS": "local only: make run's tick; in a cluster the PingSource's schedule",
}


# ---- loading ---------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    files = sorted(p for p in KNATIVE.rglob("*") if p.suffix in (".yaml", ".yml"))
    return files + ([KAFKA_SOURCE] if KAFKA_SOURCE.exists() else [])


def load(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def all_objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load(path)]


def objects(kind: str, api_version: str | None = None) -> dict[str, dict[str, Any]]:
    found = {}
    for doc in all_objects():
        if doc.get("kind") == kind and api_version in (None, doc.get("apiVersion")):
            found[doc["metadata"]["name"]] = doc
    return found


def knative_services() -> dict[str, dict[str, Any]]:
    return objects("Service", "serving.knative.dev/v1")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def config_data() -> dict[str, Any]:
    return objects("ConfigMap")["todo-cqrs-config"]["data"]


def secret_templates() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc["stringData"] for doc in load(KNATIVE / "secret.example.yaml")}


def kafka_topic() -> dict[str, Any]:
    # Strimzi 1.0 and later serve only kafka.strimzi.io/v1 (make verify-deploy loads that CRD).
    (topic,) = objects("KafkaTopic", "kafka.strimzi.io/v1").values()
    return topic


def function_folders() -> list[str]:
    return sorted(p.parent.name for p in (REPO / "functions").glob("*/main.py"))


def workloads() -> dict[str, dict[str, Any]]:
    """Every Knative Service and Job, by name: the objects that run an image with envFrom."""
    return {**knative_services(), **objects("Job", "batch/v1")}


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


# ---- the manifests themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_manifest_parses_and_names_its_object(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc


def test_validate_manifests_finds_nothing_wrong() -> None:
    if not VALIDATE_MANIFESTS.exists():
        pytest.skip(f"{VALIDATE_MANIFESTS} is not beside the repository")
    deps = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "validate-manifests-deps"
    probe = subprocess.run(["python3", "-c", "import yaml, jsonschema"], capture_output=True)
    has_deps = probe.returncode == 0
    if not has_deps and not (deps / "jsonschema").is_dir():
        pytest.skip("validate-manifests would pip-install jsonschema first (network); run it by hand")
    command = ["bash", str(VALIDATE_MANIFESTS), str(REPO)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout + run.stderr


def test_every_function_has_a_knative_service_and_every_service_a_function() -> None:
    assert function_folders() == sorted(f.name for f in topology.FUNCTIONS)
    expected = {topology.BY_NAME[name].service for name in function_folders()}
    assert set(knative_services()) == expected


def test_kustomization_applies_every_service_and_the_cluster_wide_pieces() -> None:
    (kustomization,) = load(KNATIVE / "kustomization.yaml")
    listed = {(KNATIVE / r).resolve() for r in kustomization["resources"]}
    assert all(p.exists() for p in listed), listed
    wanted = set((KNATIVE / "services").glob("*.yaml")) | {
        KNATIVE / "configmap.yaml",
        KNATIVE / "migrate-job.yaml",
        KNATIVE / "pingsource-relay-outbox.yaml",
    }
    assert {p.resolve() for p in wanted} <= listed
    # Never applied with the rest: a template, and an object of the Kafka cluster's namespace.
    for excluded in ("secret.example.yaml", "kafka-topic.yaml"):
        assert (KNATIVE / excluded).resolve() not in listed


def test_manifests_leave_the_namespace_to_make_deploy() -> None:
    # `make deploy NAMESPACE=...` sets it; a hard-coded one would split the system across namespaces.
    for name, doc in {**workloads(), **objects("ConfigMap"), **objects("PingSource")}.items():
        assert "namespace" not in doc["metadata"], name


def test_each_workload_runs_the_image_make_builds_for_it() -> None:
    for name, service in knative_services().items():
        assert container(service)["image"] == f"todo-cqrs-{name}"
    for name, job in objects("Job", "batch/v1").items():
        assert container(job)["image"] == "todo-cqrs-ops", name
    assert "IMAGE_NAMES := $(subst _,-,$(FUNCTIONS)) ops" in DEPLOY_MK.read_text()


def test_services_probe_the_health_path_and_bound_their_resources() -> None:
    for name, service in knative_services().items():
        c = container(service)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == HEALTH_PATH, (name, probe)
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][bound]), (name, bound)
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        assert {"autoscaling.knative.dev/min-scale", "autoscaling.knative.dev/max-scale"} <= set(annotations)
        assert c["securityContext"]["runAsNonRoot"] is True, name


def test_workloads_run_on_a_read_only_root_filesystem_with_a_writable_tmp() -> None:
    # gunicorn writes its workers' heartbeat files and its control socket under /tmp (XDG_RUNTIME_DIR).
    for name, workload in workloads().items():
        c = container(workload)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly"), name
    assert image_env("get_todos")["XDG_RUNTIME_DIR"] == "/tmp"


def test_every_image_runs_one_asgi_worker() -> None:
    """functions-framework's ASGI server, one uvicorn worker per pod: the pod's concurrency is its
    event loop's, and its Prometheus metrics are the one process's."""
    assert " --asgi " in image_command()
    for function in ("get_todos", "create_todo", "project_event"):
        env = image_env(function)
        assert env["WORKERS"] == "1" and "THREADS" not in env, function


def test_every_db_bound_service_has_a_connection_for_each_request_slot() -> None:
    """A request in flight holds a pooled connection for its transaction (pool + overflow =
    2 x DB_POOL_SIZE): a request never waits for one inside the pod; Knative queues the rest."""
    default_pool = int(config_data()["DB_POOL_SIZE"])
    for name in ("create-todo", "update-todo", "delete-todo", "project-event", "relay-outbox"):
        service = knative_services()[name]
        slots = service["spec"]["template"]["spec"]["containerConcurrency"]
        env = {e["name"]: e["value"] for e in container(service).get("env", [])}
        assert 1 <= slots <= 2 * int(env.get("DB_POOL_SIZE", default_pool)), name


def test_every_service_sets_its_autoscaling_target_below_its_concurrency_and_is_scraped() -> None:
    for name, service in knative_services().items():
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        slots = service["spec"]["template"]["spec"]["containerConcurrency"]
        target = annotations.get("autoscaling.knative.dev/target")
        assert target is None or 1 <= int(target) <= slots, name
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == "/metrics", name


def test_project_event_keeps_a_warm_pod_and_a_bounded_scale() -> None:
    annotations = knative_services()["project-event"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "1"
    # More pods than partitions would receive nothing (kafka-source.yaml delivers per partition).
    assert 1 <= int(annotations["autoscaling.knative.dev/max-scale"]) <= kafka_topic()["spec"]["partitions"]


@pytest.mark.parametrize(
    ("service", "tick"), [("relay-outbox", "relay-outbox-tick"), ("reconcile", "reconcile-tick")]
)
def test_scheduled_functions_run_one_pass_at_a_time_every_minute(service: str, tick: str) -> None:
    template = knative_services()[service]["spec"]["template"]
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == "1"
    assert template["spec"]["containerConcurrency"] == 1
    ping = objects("PingSource", "sources.knative.dev/v1")[tick]
    assert ping["spec"]["schedule"] == "* * * * *"
    assert ping["spec"]["sink"]["ref"] == {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "name": service,
    }


def test_internal_services_are_not_reachable_from_outside_the_cluster() -> None:
    for name in ("project-event", "relay-outbox", "dead-letter", "reconcile"):
        labels = knative_services()[name]["metadata"]["labels"]
        assert labels.get("networking.knative.dev/visibility") == "cluster-local", name


def test_topic_matches_the_configuration() -> None:
    topic, data = kafka_topic(), config_data()
    assert topic["spec"]["topicName"] == data["TODO_EVENTS_TOPIC"]
    assert topic["spec"]["partitions"] == int(data["TODO_EVENTS_PARTITIONS"])
    assert topic["spec"]["config"]["cleanup.policy"] == "delete"
    assert int(topic["spec"]["config"]["retention.ms"]) >= 24 * 3600 * 1000


# ---- configuration: every variable the code reads is provided ---------------------------------------


def _is_environ(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _env_key(node: ast.AST) -> ast.expr | None:
    """The key expression when `node` reads the environment, else None."""
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "get" and _is_environ(func.value):
            return node.args[0]
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "getenv"
            and isinstance(func.value, ast.Name)
            and func.value.id == "os"
        ):
            return node.args[0]
    if isinstance(node, ast.Subscript) and _is_environ(node.value):
        return node.slice
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.ops[0], ast.In | ast.NotIn)
        and _is_environ(node.comparators[0])
    ):
        return node.left
    return None


def env_vars_read_by_the_code() -> dict[str, str]:
    """Variable name -> where it is read, in todo_cqrs/: direct reads of os.environ / os.getenv with a
    literal name, and calls with a literal first argument of helpers that read the variable their
    first parameter names (such as settings.py's `_int("DB_POOL_SIZE", 8)`)."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in sorted((REPO / "todo_cqrs").rglob("*.py"))}
    helpers = set()
    for tree in trees.values():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.args.args:
                first = fn.args.args[0].arg
                for node in ast.walk(fn):
                    key = _env_key(node)
                    if isinstance(key, ast.Name) and key.id == first:
                        helpers.add(fn.name)
    found: dict[str, str] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            key = _env_key(node)
            if (
                key is None
                and isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in helpers
                and node.args
            ):
                key = node.args[0]
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                found.setdefault(key.value, f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}")
    return found


def test_the_scan_sees_the_settings_it_must() -> None:
    # Guards the scan itself: were it broken, the next test would pass on nothing.
    read = env_vars_read_by_the_code()
    assert {"DB_HOST", "DB_PASSWORD", "DB_POOL_SIZE", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"} <= set(read)


def test_every_env_var_the_code_reads_is_provided_by_the_configmap_or_a_secret() -> None:
    provided = set(config_data()) | {key for data in secret_templates().values() for key in data}
    missing = {
        name: where
        for name, where in env_vars_read_by_the_code().items()
        if name not in provided and name not in NOT_FROM_CONFIG
    }
    assert not missing, f"add these to knative/configmap.yaml or a Secret: {missing}"


def test_the_exceptions_name_only_variables_the_code_reads() -> None:
    stale = set(NOT_FROM_CONFIG) - set(env_vars_read_by_the_code())
    assert not stale, f"no longer read by todo_cqrs/, drop from NOT_FROM_CONFIG: {stale}"


def test_configmap_values_are_strings_and_hold_no_credentials() -> None:
    for key, value in config_data().items():
        assert isinstance(value, str), f"{key}: Kubernetes wants a string, quote it"
        assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key), f"{key} belongs in a Secret"


def test_secret_template_holds_placeholders_only() -> None:
    for name, data in secret_templates().items():
        for key, value in data.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert value == "REPLACE_ME", f"{name}.{key} must stay a placeholder"


def test_make_secret_creates_every_key_of_the_template() -> None:
    recipe = DEPLOY_MK.read_text()
    for name, data in secret_templates().items():
        assert f"kubectl create secret generic {name} " in recipe
        for key in data:
            assert f"--from-literal={key}=" in recipe, f"make secret does not set {name}.{key}"


def test_workloads_take_config_and_secrets_that_exist() -> None:
    configmaps, secrets = set(objects("ConfigMap")), set(secret_templates())
    for name, workload in workloads().items():
        refs = container(workload)["envFrom"]
        assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == configmaps, name
        assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} <= secrets, name
        for entry in container(workload).get("env", []):
            assert isinstance(entry.get("value", ""), str), (name, entry)


def test_only_dead_letter_sees_the_object_store_credentials() -> None:
    for name, service in knative_services().items():
        secrets = {r["secretRef"]["name"] for r in container(service)["envFrom"] if "secretRef" in r}
        assert secrets == ({"todo-cqrs-s3"} if name == "dead-letter" else {"todo-cqrs-secrets"}), name


def test_jobs_run_modules_that_exist() -> None:
    for name, job in objects("Job", "batch/v1").items():
        command = container(job)["command"]
        assert command[:2] == ["python", "-m"], name
        module = REPO.joinpath(*command[2].split("."))
        assert (module.with_suffix(".py")).exists() or (module / "__main__.py").exists(), (name, command)
    migrate = container(objects("Job")["todo-cqrs-migrate"])["command"]
    assert migrate[2:] == ["todo_cqrs.migrations", "upgrade"]


# ---- kafka-source.yaml (checked against these manifests) ---------------------------------------------


@pytest.fixture
def kafka_source() -> dict[str, Any]:
    (source,) = (doc for doc in load(KAFKA_SOURCE) if doc["kind"] == "KafkaSource")
    return source


def test_kafka_source_sinks_are_existing_services(kafka_source: dict[str, Any]) -> None:
    services = knative_services()
    spec = kafka_source["spec"]
    for ref in (spec["sink"]["ref"], spec["delivery"]["deadLetterSink"]["ref"]):
        assert ref["apiVersion"] == "serving.knative.dev/v1" and ref["kind"] == "Service", ref
        assert ref["name"] in services, ref
    assert spec["sink"]["ref"]["name"] == "project-event"
    assert spec["delivery"]["deadLetterSink"]["ref"]["name"] == "dead-letter"


def test_kafka_source_reads_the_configured_topic_from_the_start(kafka_source: dict[str, Any]) -> None:
    spec, data = kafka_source["spec"], config_data()
    assert spec["topics"] == [data["TODO_EVENTS_TOPIC"]]
    assert spec["bootstrapServers"] == data["KAFKA_BOOTSTRAP_SERVERS"].split(",")
    assert spec["initialOffset"] == "earliest"
    # project-event's scaling (one request per partition at a time) rests on this.
    assert spec.get("ordering") == "ordered"


# ---- the image ---------------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (INSTRUCTION, arguments), continuation lines joined."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for entry in logical:
        instruction, _, args = entry.partition(" ")
        if instruction.upper() == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", args, re.IGNORECASE)
            current = match.group(1) if match else args
            stages[current] = []
        stages[current].append((instruction.upper(), args.strip()))
    return stages


def stage(name: str) -> list[tuple[str, str]]:
    return dockerfile_stages()[name]


def args_of(instruction: str, *stage_names: str) -> list[str]:
    return [args for name in stage_names for inst, args in stage(name) if inst == instruction]


def test_dockerfile_pins_its_base_image() -> None:
    (base,) = [a for a in args_of("ARG", "") if a.startswith("PYTHON_IMAGE=")]
    # Fully qualified: Podman resolves no short name without a registries.conf alias.
    pattern = r"PYTHON_IMAGE=docker\.io/library/python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?"
    assert re.fullmatch(pattern, base), base
    assert f"PYTHON_IMAGE ?= {base.partition('=')[2]}" in DEPLOY_MK.read_text(), "mk/deploy.mk's base differs"


def test_images_run_as_a_non_root_user() -> None:
    for name in ("function", "ops"):
        (user,) = args_of("USER", name)
        assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0, (name, user)


def test_function_image_installs_only_its_own_requirements() -> None:
    runs = " ".join(args_of("RUN", "function"))
    copies = args_of("COPY", "function")
    assert "functions/${FUNCTION}/requirements.txt /tmp/requirements.txt" in copies
    assert "pip install -r /tmp/requirements.txt -c /tmp/constraints.txt" in runs
    assert not any(c.startswith("functions/ ") or c.startswith(". ") for c in copies), copies
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert patterns[0] == "*", "the build context must be an allowlist"
    assert not {"!.venv", "!.venv/", "!.local", "!.local/", "!tests/"} & set(patterns)


@pytest.mark.parametrize("folder", function_folders())
def test_function_requirements_are_exact_pins_from_the_lock(folder: str) -> None:
    pins = lock_pins()
    text = (REPO / "functions" / folder / "requirements.txt").read_text()
    requirements = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert any(r.startswith("functions-framework==") for r in requirements)
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        assert version and pins.get(canonical(name)) == version, f"{folder}: {requirement} is not the lock's"


def image_env(function: str) -> dict[str, str]:
    """The ENV of the base and function stages with ${FUNCTION} = function and /app = the repository."""
    env: dict[str, str] = {}
    for args in args_of("ENV", "base", "function"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value.replace("${FUNCTION}", function).replace("/app", str(REPO))
    return env


def test_function_image_sets_function_target() -> None:
    assert image_env("get_todos")["FUNCTION_TARGET"] == "get_todos"
    (workdir,) = args_of("WORKDIR", "base")
    assert workdir == "/app"  # what image_env maps to the repository


def image_command() -> str:
    (cmd,) = args_of("CMD", "function")
    assert not cmd.startswith("["), "shell form expected: the command expands $FUNCTION_TARGET"
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ImageProcess:
    """The Dockerfile's CMD for one function, run as the image would run it: the same ENV, the same
    relative paths (the repository standing in for /app), the test's virtualenv on PATH."""

    def __init__(self, function: str) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop(), after the process
        self.tmp = tempfile.TemporaryDirectory(prefix="todo-cqrs-image-tmp-")
        env = {
            **os.environ,
            **image_env(function),
            "PORT": str(self.port),
            # The pod's /tmp emptyDir, one per process: gunicorn's control socket goes there.
            "XDG_RUNTIME_DIR": self.tmp.name,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
        self.process = subprocess.Popen(
            ["sh", "-c", image_command()],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def get_health_when_up(self, deadline_s: float = 30.0) -> tuple[int, bytes]:
        """GET the health path once the server accepts connections; fails if it exits or the deadline
        passes first."""
        url, deadline = f"http://127.0.0.1:{self.port}{HEALTH_PATH}", time.monotonic() + deadline_s
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the image command exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.read()
            except (ConnectionError, urllib.error.URLError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"nothing answered on port {self.port} in {deadline_s} s:\n{self.output()}")
                time.sleep(0.05)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=5)
        self.log.close()
        self.tmp.cleanup()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)  # the shell, gunicorn and its workers


@pytest.fixture
def image_process(request: pytest.FixtureRequest) -> Iterator[ImageProcess]:
    running = ImageProcess(request.param)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("image_process", ["get_todos", "project_event"], indirect=True)
def test_image_command_starts_the_function_and_answers_its_health_path(image_process: ImageProcess) -> None:
    # get_todos is an HTTP function, project_event a CloudEvent one: both kinds start the same way.
    status, body = image_process.get_health_when_up()
    assert status == 200, body
    assert isinstance(json.loads(body), dict)


# ---- tests/deploy/broken (make verify-deploy applies them and wants each refused) ------------------------


@pytest.mark.parametrize(
    "path", sorted((REPO / "tests" / "deploy" / "broken").glob("*.yaml")), ids=lambda p: p.name
)
def test_each_broken_fixture_names_the_refusal_it_expects(path: Path) -> None:
    (doc,) = load(path)
    assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path
    assert any(line.startswith("# expect: ") for line in path.read_text().splitlines()), path
