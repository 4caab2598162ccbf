"""The producers' Kafka identity, from the manifests to librdkafka: a command pod's environment
(knative/configmap.yaml and its role's Secret template) gives a producer configuration that librdkafka
accepts for SCRAM-SHA-512 over TLS, with the CA it verifies the brokers by. No broker is contacted.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, Producer

from todo_cqrs.adapters.publisher import producer_config
from todo_cqrs.settings import Settings, settings
from tools import knative_pod

KAFKA_ENV = (
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CA_FILE",
)


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    settings.cache_clear()
    yield
    settings.cache_clear()


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    """A self-signed CA certificate, as Strimzi's cluster CA Secret holds one (ca.crt)."""
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=cluster-ca",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert


def command_pod_env(monkeypatch: pytest.MonkeyPatch, ca: Path) -> dict[str, str]:
    """create-todo's container environment, the CA at the path the Secret volume would mount it."""
    doc = knative_pod.service_manifest("create-todo")
    env = knative_pod.container_env(doc, 8080)
    (mount,) = [m for m in knative_pod.user_container(doc)["volumeMounts"] if m["name"] == "kafka-ca"]
    assert env["KAFKA_SSL_CA_FILE"] == f"{mount['mountPath']}/ca.crt"
    env["KAFKA_SSL_CA_FILE"] = str(ca)
    for name in KAFKA_ENV:
        monkeypatch.setenv(name, env[name])
    return env


def test_a_command_pods_environment_makes_a_scram_over_tls_producer(
    monkeypatch: pytest.MonkeyPatch, fresh_settings: None, ca_file: Path
) -> None:
    command_pod_env(monkeypatch, ca_file)  # the env of a command pod, as its manifest gives it
    config = producer_config(Settings.from_env())
    assert {k: config[k] for k in config if k.startswith(("security.", "sasl.", "ssl."))} == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "todo-command",  # the KafkaUser of knative/kafka-users.yaml
        "sasl.password": "REPLACE_ME",  # the template's placeholder: the Secret's value in a pod
        "ssl.ca.location": str(ca_file),
    }
    assert config["enable.idempotence"] is True  # what the KafkaUser's IdempotentWrite ACL is for
    producer = Producer(config)  # librdkafka checks the mechanism and loads the CA here
    assert producer.flush(0) == 0


def test_a_producer_without_its_ca_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, fresh_settings: None, tmp_path: Path, ca_file: Path
) -> None:
    command_pod_env(monkeypatch, ca_file)  # the env of a command pod, as its manifest gives it
    monkeypatch.setenv("KAFKA_SSL_CA_FILE", str(tmp_path / "missing-ca.crt"))
    with pytest.raises(KafkaException, match="ssl.ca.location"):
        Producer(producer_config(Settings.from_env()))


def test_local_kafka_stays_plaintext(monkeypatch: pytest.MonkeyPatch, fresh_settings: None) -> None:
    for name in KAFKA_ENV:
        monkeypatch.delenv(name, raising=False)
    config = producer_config(Settings.from_env())
    assert config["security.protocol"] == "PLAINTEXT"
    assert not [k for k in config if k.startswith(("sasl.", "ssl."))]
