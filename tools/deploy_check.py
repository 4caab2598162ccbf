"""`make verify-deploy`: every manifest applied to a real Kubernetes API server, as `make deploy` applies it.

    python -m tools.deploy_check [--namespace todo] [--kafka-namespace kafka]

No cluster is needed. It builds (once; cached by tools/deploy_tools.py) kube-apiserver and queue-proxy
from tools/deploy/, starts etcd (Debian's etcd-server) and kube-apiserver on free loopback ports, with
their data in a temporary directory, and loads the CRDs the cluster would have
(../shared/schemas/crds: Knative Service, PingSource, Strimzi KafkaTopic v1;
../shared/schemas/kafkasource-crd.yaml; Strimzi's KafkaUser v1, made from Strimzi's jars on Maven
Central and cached by tools/deploy_tools.py; Knative's EventPolicy, from the knative.dev/eventing Go
module through the Go module proxy, cached likewise), tools/deploy/admission-policies.yaml (a stand-in
for a rule of Knative's webhooks) and tools/deploy/admission-policies-kafka.yaml and
admission-policies-eventing.yaml (rules of the project's).
It runs `make secret` against that API server (placeholder values: it checks the recipe and what it
creates), then, with `kubectl apply --dry-run=server --validate=strict`, it applies:

- what `make deploy` applies, phase by phase with the same label selectors: the kustomize output of
  `make deploy-render` (ConfigMap; ServiceAccounts, NetworkPolicies, KafkaUsers; migrations Job,
  Knative Services, PingSource, EventPolicies), the KafkaTopic in the Kafka namespace (and its single-broker
  overlay), the rendered kafka-source.yaml; and checks that those phases cover every rendered object
  (one without its phase's label would never be applied);
- the Secrets' template (knative/secret.example.yaml), and checks that every Secret and key the
  manifests refer to is one that `make secret` created;
- the ops Jobs (knative/ops, rendered the same way), each as its `make cluster-*` target applies it;
- every file of tests/deploy/broken/, each of which must be refused with the messages of its
  `# expect:` lines.

Whatever it started is stopped at the end, also on a failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.deploy_tools import ToolError, ensure_binary, knative_eventing_crd, strimzi_crd
from tools.processes import killed_with_parent

REPO = Path(__file__).resolve().parents[1]
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"
CRDS = [
    SHARED_SCHEMAS / "crds" / "serving-service.yaml",
    SHARED_SCHEMAS / "crds" / "eventing-pingsource.yaml",
    SHARED_SCHEMAS / "crds" / "strimzi-kafkatopic.yaml",
    SHARED_SCHEMAS / "kafkasource-crd.yaml",
]
POLICIES = [
    REPO / "tools" / "deploy" / "admission-policies.yaml",
    REPO / "tools" / "deploy" / "admission-policies-kafka.yaml",
    REPO / "tools" / "deploy" / "admission-policies-eventing.yaml",
]
SECRET_TEMPLATE = REPO / "knative" / "secret.example.yaml"
BROKEN = REPO / "tests" / "deploy" / "broken"
RENDERED = {
    "deploy": REPO / "build" / "deploy" / "all.yaml",
    "kafka-source": REPO / "build" / "kafka-source" / "all.yaml",
    "ops": REPO / "build" / "ops" / "all.yaml",
    "ops-without-sender-identity": REPO / "build" / "ops-without-sender-identity" / "all.yaml",
    "kafka-topic": REPO / "build" / "kafka-topic" / "all.yaml",
}
KAFKA_SINGLE_BROKER = REPO / "knative" / "kafka-single-broker"
COMPONENT = "app.kubernetes.io/component"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0


class CheckError(RuntimeError):
    """The check could not run (a missing program, a server that did not start)."""


def say(message: str) -> None:
    print(f"[verify-deploy] {message}", file=sys.stderr, flush=True)


# ---- the API server ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiServer:
    """etcd and kube-apiserver on loopback, data and logs under `workdir`."""

    workdir: Path
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    token: str = field(default_factory=lambda: os.urandom(16).hex())
    port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def start(self) -> None:
        etcd = shutil.which("etcd") or shutil.which("etcd", path="/usr/sbin:/usr/bin")
        if not etcd:
            raise CheckError("etcd is not installed: apt-get install etcd-server (Debian), then run it again")
        apiserver = ensure_binary("kube-apiserver")
        client, peer, self.port = _free_port(), _free_port(), _free_port()
        self._spawn(
            "etcd",
            [
                etcd,
                "--name=verify-deploy",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=verify-deploy=http://127.0.0.1:{peer}",
            ],
        )
        self._wait("etcd", lambda: _get(f"http://127.0.0.1:{client}/health"))
        key = self.workdir / "service-account.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},verify-deploy,verify-deploy,"system:masters"\n')
        self._spawn(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers=http://127.0.0.1:{client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={key}",
                f"--service-account-signing-key-file={key}",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--profiling=false",
            ],
        )
        self._wait("kube-apiserver", lambda: _get(f"https://127.0.0.1:{self.port}/readyz", self.token))
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "verify",
                            "cluster": {
                                "server": f"https://127.0.0.1:{self.port}",
                                "insecure-skip-tls-verify": True,
                            },
                        }
                    ],
                    "users": [{"name": "verify", "user": {"token": self.token}}],
                    "contexts": [{"name": "verify", "context": {"cluster": "verify", "user": "verify"}}],
                    "current-context": "verify",
                }
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=killed_with_parent,  # nothing outlives a check
        )
        log.close()
        self.processes.append((name, process))

    def _wait(self, name: str, probe: Any) -> None:
        started = time.monotonic()
        process = dict(self.processes)[name]
        while True:
            try:
                probe()
                say(f"{name} ready ({time.monotonic() - started:.1f} s)")
                return
            except (OSError, urllib.error.URLError):
                pass
            if process.poll() is not None:
                raise CheckError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise CheckError(f"{name} not ready in {READY_TIMEOUT_S:.0f} s:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def log_tail(self, name: str, max_bytes: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_bytes()[-max_bytes:].decode(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for _name, process in reversed(self.processes):  # the API server before its etcd
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [
            "kubectl",
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kube-cache'}",
            *args,
        ]
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)


def _get(url: str, token: str | None = None) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # its own self-signed certificate
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=headers), timeout=2, context=context
    ) as r:
        if r.status != 200:
            raise OSError(f"{url}: {r.status}")


@contextlib.contextmanager
def api_server() -> Iterator[ApiServer]:
    """A started API server, stopped (and its data deleted) when the block ends, however it ends."""
    workdir = Path(tempfile.mkdtemp(prefix="todo-cqrs-verify-deploy-"))
    server = ApiServer(workdir)

    def stop_on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        server.start()
        yield server
    except Exception:
        for name, _process in server.processes:
            say(f"{name}'s log, last lines:\n{server.log_tail(name)}")
        raise
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)


# ---- what the cluster would have -------------------------------------------------------------------------


def load_crds(server: ApiServer) -> None:
    docs = []
    for path in [*CRDS, strimzi_crd("kafkauser"), knative_eventing_crd("eventpolicy")]:
        if not path.exists():
            raise CheckError(f"{path} is missing: ../shared must be beside the repository")
        (crd,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if crd["spec"].get("conversion", {}).get("strategy") == "Webhook":
            # No Knative conversion webhook here (../shared/schemas/crds/README.md).
            crd["spec"]["conversion"] = {"strategy": "None"}
        docs.append(crd)
    run = server.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    if run.returncode != 0:
        raise CheckError(f"loading the CRDs failed:\n{run.stdout}{run.stderr}")
    # Served once listed: a CRD's resource is in discovery only some time after it is stored, and
    # `kubectl wait` on a cold API server was seen to fail without a word.
    deadline = time.monotonic() + READY_TIMEOUT_S
    for name in (d["metadata"]["name"] for d in docs):  # <plural>.<group>, which kubectl get accepts
        while (run := server.kubectl("get", name, "--all-namespaces", "-o", "name")).returncode != 0:
            if time.monotonic() > deadline:
                raise CheckError(
                    f"{name} is not served after {READY_TIMEOUT_S:.0f} s:\n{run.stdout}{run.stderr}"
                )
            time.sleep(0.2)
    say(f"CRDs served: {', '.join(d['metadata']['name'] for d in docs)}")


# A probe per policy: an object it must refuse, so that its taking effect can be seen.
POLICY_PROBES: dict[str, dict[str, Any]] = {
    "knative-source-has-a-sink": {
        "apiVersion": "sources.knative.dev/v1",
        "kind": "PingSource",
        "metadata": {"name": "policy-probe", "namespace": "default"},
        "spec": {"schedule": "* * * * *"},
    },
    "kafkasource-sasl-names-its-secrets": {
        "apiVersion": "sources.knative.dev/v1",
        "kind": "KafkaSource",
        "metadata": {"name": "policy-probe", "namespace": "default"},
        "spec": {
            "bootstrapServers": ["kafka:9093"],
            "topics": ["probe"],
            "net": {"sasl": {"enable": True}},
            "sink": {"uri": "http://probe.default.svc"},
        },
    },
    "eventpolicy-names-its-senders": {
        "apiVersion": "eventing.knative.dev/v1alpha1",
        "kind": "EventPolicy",
        "metadata": {"name": "policy-probe", "namespace": "default"},
        "spec": {"to": [{"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "x"}}]},
    },
}


def load_policies(server: ApiServer) -> None:
    for path in POLICIES:
        run = server.kubectl("apply", "-f", str(path))
        if run.returncode != 0:
            raise CheckError(f"loading {path.name} failed:\n{run.stdout}{run.stderr}")
    names = [
        d["metadata"]["name"]
        for path in POLICIES
        for d in yaml.safe_load_all(path.read_text())
        if d and d["kind"] == "ValidatingAdmissionPolicy"
    ]
    if missing := set(names) - set(POLICY_PROBES):
        raise CheckError(f"no probe for the admission policies {sorted(missing)}: add one to POLICY_PROBES")
    # A new policy takes effect once the API server's informer has it: wait until it refuses its probe.
    deadline = time.monotonic() + 30
    for name in names:
        while True:
            probe = json.dumps(POLICY_PROBES[name])
            run = server.kubectl("apply", "--dry-run=server", "-f", "-", stdin=probe)
            if run.returncode != 0 and name in run.stderr:
                break
            if time.monotonic() > deadline:
                raise CheckError(f"the admission policy {name} never took effect:\n{run.stdout}{run.stderr}")
            time.sleep(0.2)
    say(f"admission policies in force: {', '.join(names)}")


# ---- the checks ------------------------------------------------------------------------------------------


@dataclass
class Results:
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.passed += 1
        say(f"ok    {what}")

    def fail(self, what: str, detail: str) -> None:
        self.failed.append(what)
        say(f"FAIL  {what}\n{detail.rstrip()}")


def render(namespace: str) -> None:
    run = subprocess.run(
        ["make", "--no-print-directory", "-s", "deploy-render", f"NAMESPACE={namespace}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise CheckError(f"make deploy-render failed:\n{run.stdout}{run.stderr}")


def rendered_objects(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def deploy_phases(namespace: str, kafka_namespace: str) -> list[tuple[str, list[str]]]:
    """What `make deploy` applies (mk/deploy.mk), in its order: (what, kubectl apply arguments)."""
    deploy, source = str(RENDERED["deploy"]), str(RENDERED["kafka-source"])
    return [
        ("ConfigMap", ["-n", namespace, "-f", deploy, "-l", f"{COMPONENT}=config"]),
        (
            "ServiceAccounts, NetworkPolicies, KafkaUsers",
            ["-n", namespace, "-f", deploy, "-l", f"{COMPONENT}=access"],
        ),
        ("KafkaTopic", ["-n", kafka_namespace, "-f", str(RENDERED["kafka-topic"])]),
        ("migrations Job", ["-n", namespace, "-f", deploy, "-l", f"{COMPONENT}=migrations"]),
        ("Knative Services", ["-n", namespace, "-f", deploy, "-l", f"{COMPONENT}=function"]),
        ("KafkaSource", ["-n", namespace, "-f", source]),
        ("PingSource", ["-n", namespace, "-f", deploy, "-l", f"{COMPONENT}=event-source"]),
        ("EventPolicies", ["-n", namespace, "-f", deploy, "-l", f"{COMPONENT}=event-policy"]),
    ]


def ops_phases(namespace: str) -> list[tuple[str, list[str]]]:
    """Each ops Job as its `make cluster-*` target applies it (mk/deploy.mk); the resend also as it is
    applied while authentication-oidc is off."""
    phases = []
    for key, when in (("ops", ""), ("ops-without-sender-identity", " (authentication-oidc off)")):
        for doc in rendered_objects(RENDERED[key]):
            name = doc["metadata"]["name"]
            selector = ["-l", f"app.kubernetes.io/name={name}"]
            phases.append((f"ops Job {name}{when}", ["-n", namespace, "-f", str(RENDERED[key]), *selector]))
    return phases


def applied_names(output: str) -> list[str]:
    """kubectl apply's lines 'kind.group/name created (server dry run)' -> ['kind.group/name', ...]."""
    return [line.split()[0] for line in output.splitlines() if "(server dry run)" in line]


def is_applied(doc: dict[str, Any], applied: list[str]) -> bool:
    """Whether `doc` is among kubectl's 'kind.group/name' lines (kind and name: a ServiceAccount and a
    Service may share a name)."""
    kind, name = doc["kind"].lower(), doc["metadata"]["name"]
    return any(n.split("/", 1)[0].split(".", 1)[0] == kind and n.split("/", 1)[1] == name for n in applied)


def make_secret(server: ApiServer, namespace: str, kafka_namespace: str, results: Results) -> None:
    """`make secret` against this API server, for real (it is a throwaway), with placeholder values and
    a placeholder Kafka CA: every make deploy phase then finds the Secrets it names."""
    run_env = {**os.environ, "KUBECONFIG": str(server.kubeconfig)}
    names = secret_vars()
    if not names:
        results.fail("make secret", "mk/deploy.mk has no SECRET_VARS")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".crt") as ca:
        ca.write("-----BEGIN CERTIFICATE-----\nplaceholder\n-----END CERTIFICATE-----\n")
        ca.flush()
        env = {**run_env, **{name: f"verify-{name.lower()}" for name in names}, "KAFKA_CA_FILE": ca.name}
        run = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "secret",
                f"NAMESPACE={namespace}",
                f"KAFKA_NAMESPACE={kafka_namespace}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    created = sorted(line.split()[0] for line in run.stdout.splitlines() if line.endswith(" applied"))
    if run.returncode != 0 or not created:
        results.fail("make secret", run.stdout + run.stderr)
    else:
        results.ok(f"make secret: created {', '.join(created)}")


def secret_vars() -> list[str]:
    """The variables `make secret` wants (SECRET_VARS in mk/deploy.mk, continuation lines joined)."""
    text = (REPO / "mk" / "deploy.mk").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("SECRET_VARS :="):
            return line.split(":=", 1)[1].split()
    return []


def secret_refs(doc: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(Secret name, key or None for the whole Secret) of every reference in `doc`: envFrom, env
    valueFrom, secret volumes, and any secretKeyRef (KafkaSource net, KafkaUser password)."""
    refs: list[tuple[str, str | None]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretRef" in node and isinstance(node["secretRef"], dict):
                refs.append((node["secretRef"]["name"], None))
            if "secretKeyRef" in node and isinstance(node["secretKeyRef"], dict):
                refs.append((node["secretKeyRef"].get("name", ""), node["secretKeyRef"].get("key")))
            if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
                items = node["secret"].get("items") or [{"key": None}]
                refs.extend((node["secret"]["secretName"], item["key"]) for item in items)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return refs


def check_secret_refs(server: ApiServer, namespace: str, results: Results) -> None:
    run = server.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(SECRET_TEMPLATE)
    )
    if run.returncode != 0 or not applied_names(run.stdout):
        results.fail("the Secrets' template: refused", run.stdout + run.stderr)
    else:
        results.ok(f"the Secrets' template: accepted: {', '.join(applied_names(run.stdout))}")
    run = server.kubectl("get", "secrets", "-n", namespace, "-o", "json")
    existing = {
        s["metadata"]["name"]: set(s.get("data") or {})
        for s in json.loads(run.stdout or "{}").get("items", [])
    }
    template = {d["metadata"]["name"]: set(d["stringData"]) for d in rendered_objects(SECRET_TEMPLATE)}
    if differ := {n: (template[n], existing.get(n)) for n in template if existing.get(n) != template[n]}:
        results.fail("make secret creates the template's Secrets and keys", f"(template, created): {differ}")
    else:
        results.ok(f"make secret creates the template's {len(template)} Secrets, key for key")
    dangling = sorted(
        {
            f"{d['kind']}/{d['metadata']['name']} -> {name}{'.' + key if key else ''}"
            for key_ in ("deploy", "kafka-source", "ops", "ops-without-sender-identity")
            for d in rendered_objects(RENDERED[key_])
            for name, key in secret_refs(d)
            if name not in existing or (key is not None and key not in existing[name])
        }
    )
    if dangling:
        results.fail("every Secret and key the manifests name exists", "\n".join(dangling))
    else:
        results.ok("every Secret and key the manifests name is one make secret created")


def check_manifests(server: ApiServer, namespace: str, kafka_namespace: str, results: Results) -> None:
    applied: list[str] = []
    single_broker = server.workdir / "kafka-topic-single-broker.yaml"
    render = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(KAFKA_SINGLE_BROKER)],
        capture_output=True,
        text=True,
    )
    single_broker.write_text(render.stdout)
    extra = [("KafkaTopic, single-broker overlay", ["-n", kafka_namespace, "-f", str(single_broker)])]
    for what, args in [*deploy_phases(namespace, kafka_namespace), *extra, *ops_phases(namespace)]:
        run = server.kubectl("apply", "--dry-run=server", "--validate=strict", *args)
        names = applied_names(run.stdout)
        if run.returncode != 0 or not names:
            results.fail(f"{what}: refused", run.stdout + run.stderr or "(nothing applied)")
        else:
            results.ok(f"{what}: accepted: {', '.join(names)}")
        applied += names
    # Every rendered object is applied by some phase: none lacks the label that selects it.
    expected = [
        d
        for key in ("deploy", "kafka-source", "ops")
        for d in rendered_objects(RENDERED[key])
        if d.get("kind") != "Namespace"
    ]
    missed = [f"{d['kind']}/{d['metadata']['name']}" for d in expected if not is_applied(d, applied)]
    if missed:
        results.fail("every rendered object is applied by a phase", f"never applied: {', '.join(missed)}")
    else:
        results.ok(f"every rendered object is applied by a phase ({len(expected)} objects, and the topic)")


def expectations(path: Path) -> list[str]:
    return [
        line.split(":", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.startswith("# expect:")
    ]


def check_broken(server: ApiServer, namespace: str, results: Results) -> None:
    fixtures = sorted(BROKEN.glob("*.yaml"))
    if not fixtures:
        results.fail("broken fixtures", f"none in {BROKEN}")
    for path in fixtures:
        what = f"refuses tests/deploy/broken/{path.name}"
        expected = expectations(path)
        if not expected:
            results.fail(what, "the file has no '# expect: <message>' line")
            continue
        run = server.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path)
        )
        output = run.stdout + run.stderr
        if run.returncode == 0:
            results.fail(what, f"it was accepted:\n{output}")
        elif missing := [e for e in expected if e not in output]:
            results.fail(what, f"refused, but without {missing}:\n{output}")
        else:
            results.ok(f"{what}: {expected[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.deploy_check", description=__doc__.split("\n")[0])
    parser.add_argument("--namespace", default=os.environ.get("NAMESPACE", "todo"))
    parser.add_argument("--kafka-namespace", default=os.environ.get("KAFKA_NAMESPACE", "kafka"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = Results()
    try:
        if not shutil.which("kubectl"):
            raise CheckError("kubectl is not installed (https://kubernetes.io/docs/tasks/tools/)")
        render(args.namespace)
        # Not used here, built here too: one `make verify-deploy` leaves the image tests and the bench
        # (tools/queue_proxy.py) nothing to build.
        say(f"queue-proxy: {ensure_binary('queue-proxy')}")
        with api_server() as server:
            version = json.loads(server.kubectl("version", "-o", "json").stdout or "{}").get(
                "serverVersion", {}
            )
            say(f"kube-apiserver {version.get('gitVersion')} on 127.0.0.1:{server.port}")
            load_crds(server)
            load_policies(server)
            for ns in {args.namespace, args.kafka_namespace}:
                server.kubectl("create", "namespace", ns)  # real, like ensure_namespace in mk/deploy.mk
            make_secret(server, args.namespace, args.kafka_namespace, results)
            check_manifests(server, args.namespace, args.kafka_namespace, results)
            check_secret_refs(server, args.namespace, results)
            check_broken(server, args.namespace, results)
    except (CheckError, ToolError) as error:
        say(f"could not check: {error}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        return 130
    except SystemExit:
        say("terminated; everything it started is stopped")
        raise
    say(f"done in {time.monotonic() - started:.0f} s")
    print(f"verify-deploy: {results.passed} passed, {len(results.failed)} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
