"""The manifests agree on sender identity: each source's sink audience is its receiver's OIDC_AUDIENCE
(a mismatch dead-letters every event: 401 is not retried), each receiver's OIDC_ALLOWED_SUBJECTS is its
source's OIDC service account, and its EventPolicy names the same sender. Offline, no API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tools.issuer import source_subject

REPO = Path(__file__).resolve().parents[2]
RECEIVERS = ("project-event", "dead-letter", "relay-outbox", "reconcile")
# Senders besides the sources: the dead-letter resend Job's account (knative/ops/dead-letters-resend.yaml).
OPS = {"project-event": ["system:serviceaccount:todo:todo-cqrs-jobs"]}


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
        assert env["OIDC_ALLOWED_SUBJECTS"].split(",") == [subject, *OPS.get(service, [])], service


def test_every_receiver_has_an_event_policy_from_its_source() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in docs(REPO / "knative" / "eventpolicies.yaml")}
    by_receiver = senders()
    assert sorted(policies) == sorted(RECEIVERS)
    for name, spec in policies.items():
        assert [t["ref"]["name"] for t in spec["to"]] == [name]
        assert [f["sub"] for f in spec["from"]] == [by_receiver[name][1], *OPS.get(name, [])]


def test_the_local_run_gives_the_receivers_the_clusters_subjects() -> None:
    from tools.issuer import SENDERS

    assert {service: list(subjects) for service, subjects in SENDERS.items()} == {
        service: [subject, *OPS.get(service, [])] for service, (_, subject) in senders().items()
    }
