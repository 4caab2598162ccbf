"""What Knative Serving gives a pod of one of knative/services/*.yaml, read from the manifests, for running
the same function outside a cluster (tests/deploy/test_images.py, tools/queue_proxy.py).

The rules are Knative Serving's (knative.dev/serving v0.50: pkg/reconciler/revision/resources/queue.go
and deploy.go, pkg/apis/serving/v1/revision_defaults.go): the user container's environment (env over
envFrom, plus PORT and the K_* variables), the grace period (terminationGracePeriodSeconds is the
revision's timeoutSeconds), and the queue-proxy sidecar's environment, including the readiness probe it
runs itself against the user port.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
KNATIVE = REPO / "knative"
# Knative's defaults (config-defaults, config-deployment) where a Service says nothing.
DEFAULT_TIMEOUT_SECONDS = 300
QUEUE_SERVING_PORT = 8012
QUEUE_SERVING_TLS_PORT = 8112
# The value a kubelet sends in K-Network-Probe when it probes queue-proxy's readiness (queue.Name).
QUEUE_PROBE_HEADERS = {"User-Agent": "kube-probe/1.34", "K-Network-Probe": "queue"}


def service_manifest(service: str) -> dict[str, Any]:
    """knative/services/<service>.yaml, parsed."""
    with (KNATIVE / "services" / f"{service}.yaml").open() as f:
        (doc,) = [d for d in yaml.safe_load_all(f) if d]
    return doc


def services() -> list[str]:
    return sorted(p.stem for p in (KNATIVE / "services").glob("*.yaml"))


def user_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def revision_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def timeout_seconds(doc: dict[str, Any]) -> int:
    return int(revision_spec(doc).get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS))


def grace_period_seconds(doc: dict[str, Any]) -> int:
    """Knative sets the pod's terminationGracePeriodSeconds to the revision's timeoutSeconds."""
    return timeout_seconds(doc)


def _config_sources() -> dict[tuple[str, str], dict[str, str]]:
    """(kind, name) -> data of the ConfigMap and of the Secrets' template (placeholder values)."""
    sources: dict[tuple[str, str], dict[str, str]] = {}
    for path in (KNATIVE / "configmap.yaml", KNATIVE / "secret.example.yaml"):
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc["kind"] in ("ConfigMap", "Secret"):
                    data = doc.get("data") or doc.get("stringData") or {}
                    sources[(doc["kind"], doc["metadata"]["name"])] = {k: str(v) for k, v in data.items()}
    return sources


def container_env(doc: dict[str, Any], port: int) -> dict[str, str]:
    """The user container's environment in a pod of this Service, listening on `port`.
    Secrets come from knative/secret.example.yaml: placeholders, which the health path never uses."""
    sources = _config_sources()
    env: dict[str, str] = {}
    container = user_container(doc)
    for ref in container.get("envFrom", []):
        kind, key = ("ConfigMap", "configMapRef") if "configMapRef" in ref else ("Secret", "secretRef")
        env.update(sources[(kind, ref[key]["name"])])
    for entry in container.get("env", []):
        env[entry["name"]] = str(entry.get("value", ""))
    name = doc["metadata"]["name"]
    env.update(PORT=str(port), K_SERVICE=name, K_CONFIGURATION=name, K_REVISION=f"{name}-00001")
    return env


def writable_mounts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The user container's emptyDir mounts: [{"path": ..., "medium": ..., "sizeLimit": ...}]."""
    volumes = {v["name"]: v for v in revision_spec(doc).get("volumes", [])}
    mounts = []
    for mount in user_container(doc).get("volumeMounts", []):
        empty_dir = volumes[mount["name"]].get("emptyDir")
        if empty_dir is not None:
            mounts.append({"path": mount["mountPath"], **empty_dir})
    return mounts


def secret_template(name: str) -> dict[str, str]:
    """The data of the Secret `name` in knative/secret.example.yaml (placeholder values)."""
    return dict(_config_sources()[("Secret", name)])


# The kubelet's file mode for a Secret volume's files when the volume says nothing (defaultMode).
DEFAULT_SECRET_MODE = 0o644


def secret_mounts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The user container's Secret volume mounts, as the kubelet projects them: [{"path": mount path,
    "secret": Secret name, "files": {file path in the volume: key}, "mode": file mode}]; the files are
    the volume's items, or one per key of the Secret (its template) when it lists none. Always read-only."""
    volumes = {v["name"]: v for v in revision_spec(doc).get("volumes", [])}
    mounts = []
    for mount in user_container(doc).get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        name = secret["secretName"]
        items = secret.get("items") or [{"key": k, "path": k} for k in secret_template(name)]
        mounts.append(
            {
                "path": mount["mountPath"],
                "secret": name,
                "files": {item["path"]: item["key"] for item in items},
                "mode": int(secret.get("defaultMode", DEFAULT_SECRET_MODE)),
            }
        )
    return mounts


def readiness_probe(doc: dict[str, Any], user_port: int) -> dict[str, Any]:
    """The user container's readiness probe as queue-proxy receives it (SERVING_READINESS_PROBE): aimed at
    127.0.0.1 and the user port, with Knative's defaults; an absent probe becomes a TCP probe."""
    probe = json.loads(json.dumps(user_container(doc).get("readinessProbe") or {}))
    if not any(k in probe for k in ("httpGet", "tcpSocket", "exec", "grpc")):
        probe["tcpSocket"] = {}
    probe.setdefault("successThreshold", 1)
    if probe.get("periodSeconds"):
        probe.setdefault("failureThreshold", 3)
        probe.setdefault("timeoutSeconds", 1)
    for handler in ("httpGet", "tcpSocket"):
        if handler in probe:
            action = probe[handler]
            port = action.get("port") if isinstance(action.get("port"), int) and action["port"] else user_port
            action.update(host="127.0.0.1", port=port)
            if handler == "httpGet":
                action.setdefault("scheme", "HTTP")
    if "exec" in probe:  # queue-proxy replaces an exec probe by a TCP one on the user port
        probe.pop("exec")
        probe["tcpSocket"] = {"host": "127.0.0.1", "port": user_port}
    if probe.get("periodSeconds", 0) > 0 and probe.get("timeoutSeconds", 0) < 1:
        probe["timeoutSeconds"] = 1
    return probe


def queue_proxy_env(doc: dict[str, Any], user_port: int, port: int = QUEUE_SERVING_PORT) -> dict[str, str]:
    """queue-proxy's environment in a pod of this Service, in front of `user_port` and serving `port`."""
    name = doc["metadata"]["name"]
    revision = f"{name}-00001"
    spec = revision_spec(doc)
    return {
        "SERVING_NAMESPACE": "todo",
        "SERVING_SERVICE": name,
        "SERVING_CONFIGURATION": name,
        "SERVING_REVISION": revision,
        "SERVING_POD": f"{revision}-deployment-local",
        "SERVING_POD_IP": "127.0.0.1",
        "QUEUE_SERVING_PORT": str(port),
        "QUEUE_SERVING_TLS_PORT": str(QUEUE_SERVING_TLS_PORT),
        "USER_PORT": str(user_port),
        "CONTAINER_CONCURRENCY": str(spec.get("containerConcurrency", 0)),
        "REVISION_TIMEOUT_SECONDS": str(timeout_seconds(doc)),
        "REVISION_RESPONSE_START_TIMEOUT_SECONDS": str(spec.get("responseStartTimeoutSeconds", 0)),
        "REVISION_IDLE_TIMEOUT_SECONDS": str(spec.get("idleTimeoutSeconds", 0)),
        "SERVING_READINESS_PROBE": json.dumps(readiness_probe(doc, user_port), separators=(",", ":")),
        "SERVING_LOGGING_CONFIG": "",
        "SERVING_LOGGING_LEVEL": "",
        "SYSTEM_NAMESPACE": "knative-serving",
        "ENABLE_HTTP2_AUTO_DETECTION": "false",
        "ENABLE_HTTP_FULL_DUPLEX": "false",
        "ENABLE_MULTI_CONTAINER_PROBES": "false",
    }
