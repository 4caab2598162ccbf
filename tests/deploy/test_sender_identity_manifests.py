"""The manifests agree on sender identity: each source's sink audience is its receiver's OIDC_AUDIENCE
(a mismatch dead-letters every event: 401 is not retried), each receiver's OIDC_ALLOWED_SUBJECTS is its
source's OIDC service account, and its EventPolicy names the same sender. Offline, no API server."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tools.issuer import source_subject

REPO = Path(__file__).resolve().parents[2]
WITHOUT_IDENTITY = REPO / "knative" / "ops" / "without-sender-identity"
RECEIVERS = ("project-event", "dead-letter", "relay-outbox", "reconcile")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def receiver_env(service: str) -> dict[str, str]:
    (doc,) = docs(REPO / "knative" / "services" / f"{service}.yaml")
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def senders() -> dict[str, tuple[str, str]]:
    """receiver Service -> (audience its source presents, the source's subject)."""
    found: dict[str, tuple[str, str]] = {}
    sources = docs(REPO / "kafka-source.yaml") + [
        d for p in sorted((REPO / "knative").glob("pingsource-*.yaml")) for d in docs(p)
    ]
    for source in sources:
        kind, name = source["kind"], source["metadata"]["name"]
        namespace = source["metadata"].get("namespace", "todo")
        subject = source_subject(name, kind.lower(), namespace)
        sinks = [source["spec"]["sink"]]
        if kind == "KafkaSource":
            sinks.append(source["spec"]["delivery"]["deadLetterSink"])
        for sink in sinks:
            found[sink["ref"]["name"]] = (sink.get("audience", ""), subject)
    return found


def test_every_receiver_has_a_source_presenting_its_audience_and_allows_that_source_only() -> None:
    by_receiver = senders()
    assert sorted(by_receiver) == sorted(RECEIVERS)
    for service, (audience, subject) in by_receiver.items():
        env = receiver_env(service)
        assert audience == env["OIDC_AUDIENCE"] == service, service
        assert env["OIDC_ALLOWED_SUBJECTS"].split(",") == [subject], service


def test_every_receiver_has_an_event_policy_from_its_source() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in docs(REPO / "knative" / "eventpolicies.yaml")}
    by_receiver = senders()
    assert sorted(policies) == sorted(RECEIVERS)
    for name, spec in policies.items():
        assert [t["ref"]["name"] for t in spec["to"]] == [name]
        assert [f["sub"] for f in spec["from"]] == [by_receiver[name][1]]


def test_the_local_run_gives_the_receivers_the_clusters_subjects() -> None:
    from tools.issuer import SENDERS

    assert {service: list(subjects) for service, subjects in SENDERS.items()} == {
        service: [subject] for service, (_, subject) in senders().items()
    }


def test_the_resend_delivers_as_the_kafkasource_and_without_its_identity_presents_no_token() -> None:
    """knative/ops/dead-letters-resend.yaml runs as the KafkaSource's OIDC account with a token for
    project-event; its without-sender-identity/ overlay (authentication-oidc off: no such account) as the
    Jobs' account, with no token at all."""
    (job,) = docs(REPO / "knative" / "ops" / "dead-letters-resend.yaml")
    pod = job["spec"]["template"]["spec"]
    assert f"system:serviceaccount:todo:{pod['serviceAccountName']}" == senders()["project-event"][1]
    (token,) = [
        v["projected"]["sources"][0]["serviceAccountToken"] for v in pod["volumes"] if "projected" in v
    ]
    assert token["audience"] == "project-event"

    rendered = subprocess.run(
        ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(WITHOUT_IDENTITY)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (anonymous,) = [d for d in yaml.safe_load_all(rendered) if d]
    pod = anonymous["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "todo-cqrs-jobs"
    assert not [v for v in pod.get("volumes", []) if "projected" in v]
    (container,) = pod["containers"]
    assert "RESEND_TOKEN_FILE" not in {e["name"] for e in container.get("env", [])}
    assert container["command"] == job["spec"]["template"]["spec"]["containers"][0]["command"]
