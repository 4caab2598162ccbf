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

from todo_cqrs import roles
from tools import topology

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
    "PORT": "set by Knative Serving in every revision's container (the Dockerfile's ENV says 8080)",
    "WORKERS": "set by the Dockerfile's ENV (test_every_image_runs_one_asgi_worker)",
    "METRICS_ENABLED": "on unless set to 0 (to measure what metrics cost); the cluster leaves it on",
    "LOG_FLUSH_SECONDS": "how often log lines go to the writer thread (0.05 s); unit tests hold them",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "unset (no export) unless a collector is named (configmap.yaml's comment)",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "the OpenTelemetry SDK's per-signal form of the endpoint",
    "OTEL_SERVICE_NAME": "defaults to K_SERVICE, the Knative Service's name",
    "RECONCILE_INTERVAL_SECONDS": "local only: make run's tick; in a cluster the PingSource's schedule",
    "DB_ROLE_HOSTS": "optional host part of the role users the migrations Job grants (default %: any host)",
    "REDIS_PASSWORD": "read by `python -m todo_cqrs.roles redis-acl`, which `make secret` runs locally",
    "OIDC_AUDIENCE": "per receiver: its Service's env (defaults to K_SERVICE, the same name)",
    "OIDC_ALLOWED_SUBJECTS": "per receiver: its Service's env names its source's service account",
    "OIDC_CA_FILE": "defaults to the pod's mounted service-account CA",
    "OIDC_TOKEN_FILE": "defaults to the pod's mounted service-account token",
    "RESEND_TOKEN_FILE": "the dead-letter resend's token for project_event, given per run",
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
        KNATIVE / "serviceaccounts.yaml",
        KNATIVE / "networkpolicies.yaml",
        KNATIVE / "kafka-users.yaml",
    }
    assert {p.resolve() for p in wanted} <= listed
    # Never applied with the rest: a template, and an object of the Kafka cluster's namespace.
    for excluded in ("secret.example.yaml", "kafka-topic.yaml", "kafka-single-broker"):
        assert (KNATIVE / excluded).resolve() not in listed


def test_manifests_leave_the_namespace_to_make_deploy() -> None:
    # `make deploy NAMESPACE=...` sets it; a hard-coded one would split the system across namespaces.
    for kind in ("ConfigMap", "PingSource", "ServiceAccount", "NetworkPolicy", "KafkaUser"):
        for name, doc in objects(kind).items():
            assert "namespace" not in doc["metadata"], (kind, name)
    for name, doc in workloads().items():
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
        pod = workload["spec"]["template"]["spec"]
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            volumes = {v["name"]: v for v in pod["volumes"]}
            (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly"), name
            # Every other mount is read-only: the root filesystem's writable place is /tmp alone.
            assert all(m.get("readOnly") for m in c["volumeMounts"] if m is not tmp), name
    assert image_env("get_todos")["XDG_RUNTIME_DIR"] == "/tmp"


def test_every_image_runs_one_asgi_worker() -> None:
    """functions-framework's ASGI server as todo_cqrs/serve.py runs it, one uvicorn worker per pod: the
    pod's concurrency is its event loop's, and its Prometheus metrics are the one process's."""
    assert "python -m todo_cqrs.serve " in image_command()
    for function in ("get_todos", "create_todo", "project_event"):
        env = image_env(function)
        assert env["WORKERS"] == "1" and "THREADS" not in env, function


def test_every_db_bound_service_has_a_connection_for_each_request_slot() -> None:
    """A request in flight holds a pooled connection for its transaction (pool + overflow =
    2 x DB_POOL_SIZE): a request never waits for one inside the pod; Knative queues the rest.
    (project-event's requests share one connection per group of events: todo_cqrs/projection.)"""
    default_pool = int(config_data()["DB_POOL_SIZE"])
    for name in ("create-todo", "update-todo", "delete-todo", "relay-outbox"):
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
    # No more pods than partitions: each then gets a partition's events together, which it applies
    # as groups (kafka-source.yaml: unordered, 50 in flight per partition).
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
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|\.crt|\.acl", key, re.IGNORECASE):
                assert value == "REPLACE_ME", f"{name}.{key} must stay a placeholder"
            if key == "REDIS_URL":  # a URL with the role's ACL user: its password is a placeholder
                assert re.fullmatch(r"redis://\w*:REPLACE_ME@[\w.-]+:\d+/\d+", value), (name, value)


def make_secret_recipe() -> dict[str, str]:
    """Secret name -> the `make secret` lines that create it (apply_secret calls in mk/deploy.mk)."""
    recipe = DEPLOY_MK.read_text().replace("\\\n", " ")
    return {m.group(1): m.group(0) for m in re.finditer(r"apply_secret,([\w-]+),[^\n]*", recipe)}


def test_make_secret_creates_every_key_of_the_template() -> None:
    recipe = make_secret_recipe()
    assert set(recipe) == set(secret_templates())
    for name, data in secret_templates().items():
        for key in data:
            assert re.search(rf"--from-(literal|file)={re.escape(key)}=", recipe[name]), (
                f"make secret does not set {name}.{key}"
            )


def test_workloads_take_config_and_secrets_that_exist() -> None:
    configmaps, secrets = set(objects("ConfigMap")), set(secret_templates())
    for name, workload in workloads().items():
        refs = container(workload)["envFrom"]
        assert {r["configMapRef"]["name"] for r in refs if "configMapRef" in r} == configmaps, name
        assert {r["secretRef"]["name"] for r in refs if "secretRef" in r} <= secrets, name
        for entry in container(workload).get("env", []):
            assert isinstance(entry.get("value", ""), str), (name, entry)


def test_only_dead_letter_sees_the_object_store_credentials() -> None:
    for name, workload in workloads().items():
        if "todo-cqrs-s3" in {secret for secret, _key in workload_secret_refs(workload)}:
            assert name in {"dead-letter", "todo-cqrs-dead-letters-list", "todo-cqrs-dead-letters-resend"}, (
                name
            )


def test_jobs_run_modules_that_exist() -> None:
    for name, job in objects("Job", "batch/v1").items():
        pod = job["spec"]["template"]["spec"]
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            command = c["command"]
            assert command[:2] == ["python", "-m"], name
            module = REPO.joinpath(*command[2].split("."))
            assert (module.with_suffix(".py")).exists() or (module / "__main__.py").exists(), (name, command)


def test_the_migrations_job_upgrades_the_schema_then_grants_every_role() -> None:
    pod = objects("Job")["todo-cqrs-migrate"]["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]  # init containers run first, each to completion
    assert migrate["command"][2:] == ["todo_cqrs.migrations", "upgrade"]
    grant = container(objects("Job")["todo-cqrs-migrate"])
    assert grant["command"][2:] == ["todo_cqrs.roles", "grant"]
    # Each role's password from that role's own Secret: the one the role's functions log in with.
    passwords = {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in grant["env"]
    }
    assert passwords == {
        roles.env_name("DB_PASSWORD", role): (role_secret(role), "DB_PASSWORD") for role in roles.ROLES
    }


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
    # project-event's grouping (many events of a partition in flight at once) rests on this, and its
    # correctness on the version gate, whatever the order.
    assert spec.get("ordering") == "unordered"


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


# ---- least privilege: identities, credentials, network, Kafka ACLs ------------------------------------

# The event receivers: sender identity reads the issuer's keys from the API server with the pod's token.
RECEIVERS = {"project-event", "relay-outbox", "dead-letter", "reconcile"}
PRODUCERS = {"create-todo", "update-todo", "delete-todo", "relay-outbox"}
JOBS_SERVICE_ACCOUNT = "todo-cqrs-jobs"
KAFKASOURCE_OIDC_ACCOUNT = "todo-events-projection-oidc-sources.knative.dev-kafkasource"


def role_secret(role: str) -> str:
    """The Secret of a DB role of todo_cqrs/roles.py: todo_command -> todo-cqrs-command."""
    return "todo-cqrs-" + role.removeprefix("todo_")


def service_role(service: str) -> str | None:
    return roles.FUNCTION_ROLES[service.replace("-", "_")]


def workload_secret_refs(workload: dict[str, Any]) -> set[tuple[str, str | None]]:
    """(Secret, key or None for all of it) of every Secret a workload's pod reads: envFrom, env, volumes."""
    pod = workload["spec"]["template"]["spec"]
    refs: set[tuple[str, str | None]] = set()
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        refs |= {(r["secretRef"]["name"], None) for r in c.get("envFrom", []) if "secretRef" in r}
        for entry in c.get("env", []):
            if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                refs.add((ref["name"], ref["key"]))
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            refs |= {(volume["secret"]["secretName"], i["key"]) for i in volume["secret"].get("items", [])}
    return refs


def test_every_service_runs_as_its_own_service_account_and_the_jobs_as_theirs() -> None:
    accounts = objects("ServiceAccount", "v1")
    for name, service in knative_services().items():
        assert service["spec"]["template"]["spec"]["serviceAccountName"] == name
        assert name in accounts, f"knative/serviceaccounts.yaml lacks {name}"
    for name, job in objects("Job", "batch/v1").items():
        # The dead-letter resend delivers as the KafkaSource (its OIDC account, which Knative makes).
        expected = (
            KAFKASOURCE_OIDC_ACCOUNT if name == "todo-cqrs-dead-letters-resend" else JOBS_SERVICE_ACCOUNT
        )
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == expected, name
    # No account is left over, and none is given rights: the repository binds no Role to any.
    assert set(accounts) == set(knative_services()) | RECEIVERS | {JOBS_SERVICE_ACCOUNT}
    assert not objects("RoleBinding") and not objects("ClusterRoleBinding")


def test_only_the_event_receivers_get_a_service_account_token() -> None:
    accounts = objects("ServiceAccount", "v1")
    for name, account in accounts.items():
        assert account["automountServiceAccountToken"] is (name in RECEIVERS), name
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        if name in RECEIVERS:
            # Knative's webhook accepts only `false` in a Service's pod spec: the account says true.
            assert "automountServiceAccountToken" not in pod, name
        else:
            assert pod["automountServiceAccountToken"] is False, name


def test_every_workload_reads_only_its_roles_secrets() -> None:
    for name, service in knative_services().items():
        role = service_role(name)
        expected: set[tuple[str, str | None]] = {(role_secret(role) if role else "todo-cqrs-s3", None)}
        if name in PRODUCERS:
            expected.add(("todo-cqrs-kafka-ca", "ca.crt"))
        assert workload_secret_refs(service) == expected, name
    admin = {("todo-cqrs-admin", None)}
    assert workload_secret_refs(objects("Job")["todo-cqrs-rebuild-read-model"]) == admin
    for job in ("todo-cqrs-dead-letters-list", "todo-cqrs-dead-letters-resend"):
        assert workload_secret_refs(objects("Job")[job]) == {("todo-cqrs-s3", None)}, job


def test_each_roles_secret_holds_its_own_user_and_only_what_the_role_uses() -> None:
    templates = secret_templates()
    writers = {service_role(s) for s in PRODUCERS}
    for role in roles.ROLES:
        data = templates[role_secret(role)]
        assert data["DB_USER"] == role
        assert ("REDIS_URL" in data) is (role in roles.REDIS_RULES), role
        if "REDIS_URL" in data:
            assert data["REDIS_URL"].startswith(f"redis://{role}:"), role  # its own ACL user
        assert ("KAFKA_SASL_PASSWORD" in data) is (role in writers), role
        assert ("CURSOR_SECRET" in data) is (role == roles.QUERY), role
    assert templates["todo-cqrs-admin"]["DB_USER"] == "todo"


def network_policies() -> dict[str, dict[str, Any]]:
    return objects("NetworkPolicy", "networking.k8s.io/v1")


def selected_pods(selector: dict[str, Any]) -> set[str] | None:
    """The app.kubernetes.io/name values a pod selector picks out; None for every pod."""
    if not selector:
        return None
    (expression,) = selector["matchExpressions"]
    assert expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In", selector
    return set(expression["values"])


def pod_names() -> set[str]:
    return {
        w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] for w in workloads().values()
    }


def egress_to(port: int) -> set[str]:
    """The pods some policy lets out to `port`."""
    found: set[str] = set()
    for policy in network_policies().values():
        for rule in policy["spec"].get("egress", []):
            if any(p["port"] == port for p in rule.get("ports", [])):
                found |= selected_pods(policy["spec"]["podSelector"]) or {"*"}
    return found


def test_the_network_policy_denies_everything_by_default() -> None:
    deny = network_policies()["todo-cqrs-default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, policy in network_policies().items():
        spec = policy["spec"]
        # Every allow names the pods it opens by their label, and they exist (a typo would open nothing
        # and break the path silently); the few others are named here.
        pods = selected_pods(spec["podSelector"]) if "matchExpressions" in spec["podSelector"] else None
        if pods is not None:
            assert pods <= pod_names(), (name, pods - pod_names())
        else:
            assert name in {
                "todo-cqrs-default-deny",
                "todo-cqrs-dns",
                "todo-cqrs-traces",  # every pod of the system, to the collector only
                "todo-cqrs-mariadb-ingress",  # the in-namespace trial servers, from their clients
                "todo-cqrs-redis-ingress",
            }, name


def test_the_network_policy_opens_each_path_to_its_users_only() -> None:
    assert egress_to(9093) == PRODUCERS  # Kafka: the producers; the KafkaSource runs in knative-eventing
    assert egress_to(3306) == {"todo-cqrs-migrate", "todo-cqrs-rebuild-read-model"} | {
        s for s in knative_services() if service_role(s)
    }
    redis_users = {s for s in knative_services() if service_role(s) in roles.REDIS_RULES}
    assert egress_to(6379) == redis_users | {"todo-cqrs-rebuild-read-model"}
    assert egress_to(6443) == RECEIVERS  # the issuer's keys, for sender identity
    public = network_policies()["todo-cqrs-public-ingress"]["spec"]
    assert selected_pods(public["podSelector"]) == set(knative_services()) - RECEIVERS
    receivers = network_policies()["todo-cqrs-receivers-ingress"]["spec"]
    assert selected_pods(receivers["podSelector"]) == RECEIVERS
    # From other namespaces only to queue-proxy's ports (and the autoscaler's metrics port), never
    # straight to the function's 8080, but for Prometheus.
    for name, policy in network_policies().items():
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule["ports"]}
            if name == "todo-cqrs-metrics-scrape":
                assert ports == {8080}
            elif name.startswith("todo-cqrs-") and name.endswith("-ingress") and "podSelector" in str(rule):
                continue  # the in-namespace MariaDB and Redis, from their clients
            else:
                assert ports <= {8012, 8013, 8112, 9090}, (name, ports)


def kafka_users() -> dict[str, dict[str, Any]]:
    return objects("KafkaUser", "kafka.strimzi.io/v1")


def acls(user: str) -> set[tuple[str, str, str]]:
    """(resource type, resource name, operation) the user is allowed."""
    spec = kafka_users()[user]["spec"]["authorization"]
    assert spec["type"] == "simple"
    found = set()
    for rule in spec["acls"]:
        assert (
            rule.get("type", "allow") == "allow"
            and rule["resource"].get("patternType", "literal") == "literal"
        )
        found |= {
            (rule["resource"]["type"], rule["resource"].get("name", ""), op) for op in rule["operations"]
        }
    return found


def test_kafka_users_acls_let_only_the_producers_write_and_only_the_source_read(
    kafka_source: dict[str, Any],
) -> None:
    topic = config_data()["TODO_EVENTS_TOPIC"]
    writer = {("topic", topic, "Write"), ("topic", topic, "Describe"), ("cluster", "", "IdempotentWrite")}
    assert acls("todo-command") == writer
    assert acls("todo-relay") == writer
    group = kafka_source["spec"]["consumerGroup"]
    assert acls("todo-kafka-source") == {
        ("topic", topic, "Read"),
        ("topic", topic, "Describe"),
        ("group", group, "Read"),
    }
    assert set(kafka_users()) == {"todo-command", "todo-relay", "todo-kafka-source"}
    for user in kafka_users().values():
        assert (
            user["metadata"]["labels"]["strimzi.io/cluster"]
            == kafka_topic()["metadata"]["labels"]["strimzi.io/cluster"]
        )


def test_kafka_identities_are_one_password_each_from_the_roles_secret(kafka_source: dict[str, Any]) -> None:
    templates = secret_templates()
    for user, secret in (("todo-command", "todo-cqrs-command"), ("todo-relay", "todo-cqrs-relay")):
        auth = kafka_users()[user]["spec"]["authentication"]
        assert auth["type"] == "scram-sha-512"
        assert auth["password"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "KAFKA_SASL_PASSWORD"}
        assert templates[secret]["KAFKA_SASL_USERNAME"] == user
    source_auth = kafka_users()["todo-kafka-source"]["spec"]["authentication"]
    sasl = kafka_source["spec"]["net"]["sasl"]
    assert sasl["enable"] is True
    assert source_auth["password"]["valueFrom"]["secretKeyRef"] == sasl["password"]["secretKeyRef"]
    source_secret = templates[sasl["user"]["secretKeyRef"]["name"]]
    assert source_secret[sasl["user"]["secretKeyRef"]["key"]] == "todo-kafka-source"
    assert (
        source_secret[sasl["type"]["secretKeyRef"]["key"]]
        == config_data()["KAFKA_SASL_MECHANISM"]
        == "SCRAM-SHA-512"
    )
    tls = kafka_source["spec"]["net"]["tls"]
    assert tls["enable"] is True and tls["caCert"]["secretKeyRef"] == {
        "name": "todo-cqrs-kafka-ca",
        "key": "ca.crt",
    }
    # The producers: SASL over TLS, the CA where the settings look for it.
    assert config_data()["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    for name in PRODUCERS:
        c = container(knative_services()[name])
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "kafka-ca"]
        assert config_data()["KAFKA_SSL_CA_FILE"] == f"{mount['mountPath']}/ca.crt", name


def single_broker_topic() -> dict[str, Any]:
    """knative/kafka-topic.yaml through knative/kafka-single-broker/'s JSON patches."""
    (kustomization,) = load(KNATIVE / "kafka-single-broker" / "kustomization.yaml")
    assert kustomization["resources"] == ["../kafka-topic.yaml"]
    topic = json.loads(json.dumps(kafka_topic()))
    for patch in kustomization["patches"]:
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "replace", op
            *parents, leaf = op["path"].strip("/").split("/")
            node = topic
            for part in parents:
                node = node[part]
            assert leaf in node, op["path"]
            node[leaf] = op["value"]
    return topic


def test_topic_keeps_acknowledged_events_on_three_brokers_and_the_overlay_on_one() -> None:
    spec = kafka_topic()["spec"]
    assert spec["replicas"] == 3
    assert spec["config"]["min.insync.replicas"] == 2
    assert spec["config"]["unclean.leader.election.enable"] is False
    trial = single_broker_topic()["spec"]
    assert (trial["replicas"], trial["config"]["min.insync.replicas"]) == (1, 1)
    assert trial["config"]["unclean.leader.election.enable"] is False


def test_the_deploy_guide_generates_every_password_make_secret_wants() -> None:
    from tools.deploy_check import secret_vars

    guide = (REPO / "docs" / "deploy.md").read_text()
    match = re.search(r"for v in (DB_ROOT_PASSWORD .*?); do", guide, re.DOTALL)
    assert match, "docs/deploy.md step 4 lost its password loop"
    generated = set(match.group(1).replace("\\", " ").split())
    wanted = {v for v in secret_vars() if not v.startswith("AWS_")}  # step 5's keys come from the bucket
    assert generated == wanted | {"DB_ROOT_PASSWORD"}
