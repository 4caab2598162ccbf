"""The one settings object, read from the environment once per process.

Every default points at the local services that `make services` starts (loopback, standard ports).
In a cluster the same names come from the ConfigMap and the Secret in `knative/`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# The local services keep their state here (git-ignored). The product reads no secret from it: the
# local tooling (tools/credentials.py) passes DB_PASSWORD, REDIS_URL and CURSOR_SECRET in the env.
LOCAL_DIR = Path(os.environ.get("TODO_LOCAL_DIR", Path(__file__).resolve().parent.parent / ".local"))
# A pod's service-account token and the cluster's CA (read the OIDC issuer's keys with them).
_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _db_url(database: str) -> str:
    host = os.environ.get("DB_HOST", "127.0.0.1")
    port = os.environ.get("DB_PORT", "3306")
    user = os.environ.get("DB_USER", "todo")
    password = os.environ.get("DB_PASSWORD", "")
    return f"mysql+aiomysql://{user}:{password}@{host}:{port}/{database}?charset=utf8mb4"


def _cursor_key() -> bytes:
    """get_todos' HMAC key for next_cursor: the same in every pod, so any pod takes any pod's cursor.
    CURSOR_SECRET (a Secret); without it, a key derived from the DB password the pods share."""
    secret = os.environ.get("CURSOR_SECRET") or os.environ.get("DB_PASSWORD", "")
    return hmac.new(secret.encode(), b"todo-cqrs next_cursor v1", hashlib.sha256).digest()


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Settings:
    write_db_url: str
    read_db_url: str
    db_timeout_s: float
    db_pool_size: int
    redis_url: str
    redis_timeout_s: float
    kafka_bootstrap_servers: str
    # How the producer reaches Kafka: PLAINTEXT locally (loopback); SASL_SSL with SCRAM-SHA-512 in a cluster.
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str
    kafka_sasl_password: str
    kafka_ssl_ca_file: str
    topic: str
    topic_partitions: int
    event_source: str
    publish_timeout_s: float
    relay_batch_size: int
    outbox_shards: int
    outbox_lease_s: float
    outbox_orphan_s: float
    idempotency_ttl_s: int
    cache_ttl_s: int
    list_cache_ttl_s: int
    min_version_wait_s: float
    min_version_max_waiters: int
    cursor_key: bytes
    dead_letter_bucket: str
    dead_letter_prefix: str
    dead_letter_s3_endpoint: str
    dead_letter_dir: str
    dead_letter_store: str
    project_event_url: str
    function_name: str
    metrics_enabled: bool
    # Reconciliation (todo_cqrs/reconcile): how often `make run` ticks it (a PingSource in a cluster),
    # how old a difference must be to count as drift, and how long published outbox rows are kept.
    reconcile_interval_s: float
    reconcile_grace_s: float
    outbox_retention_h: float
    # Sender identity of the event receivers (todo_cqrs/sender_identity.py): off | on | required.
    sender_identity: str
    oidc_issuer: str
    oidc_audience: str
    oidc_allowed_subjects: tuple[str, ...]
    oidc_ca_file: str
    oidc_token_file: str

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            write_db_url=os.environ.get("WRITE_DB_URL")
            or _db_url(os.environ.get("WRITE_DB_NAME", "todo_write")),
            read_db_url=os.environ.get("READ_DB_URL") or _db_url(os.environ.get("READ_DB_NAME", "todo_read")),
            db_timeout_s=_float("DB_TIMEOUT_SECONDS", 1.0),
            db_pool_size=_int("DB_POOL_SIZE", 8),
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            redis_timeout_s=_float("REDIS_TIMEOUT_SECONDS", 0.25),
            kafka_bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
            kafka_security_protocol=os.environ.get("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
            kafka_sasl_mechanism=os.environ.get("KAFKA_SASL_MECHANISM", ""),
            kafka_sasl_username=os.environ.get("KAFKA_SASL_USERNAME", ""),
            kafka_sasl_password=os.environ.get("KAFKA_SASL_PASSWORD", ""),
            kafka_ssl_ca_file=os.environ.get("KAFKA_SSL_CA_FILE", ""),
            topic=os.environ.get("TODO_EVENTS_TOPIC", "todo-events"),
            topic_partitions=_int("TODO_EVENTS_PARTITIONS", 3),
            event_source=os.environ.get("EVENT_SOURCE", "/todo-cqrs/commands"),
            publish_timeout_s=_float("PUBLISH_TIMEOUT_SECONDS", 1.0),
            relay_batch_size=_int("RELAY_BATCH_SIZE", 500),
            outbox_shards=_int("OUTBOX_SHARDS", _int("TODO_EVENTS_PARTITIONS", 3)),
            outbox_lease_s=_float("OUTBOX_LEASE_SECONDS", 5.0),
            outbox_orphan_s=_float("OUTBOX_ORPHAN_SECONDS", 10.0),
            idempotency_ttl_s=_int("IDEMPOTENCY_TTL_SECONDS", 86400),
            cache_ttl_s=_int("CACHE_TTL_SECONDS", 300),
            list_cache_ttl_s=_int("LIST_CACHE_TTL_SECONDS", 60),
            min_version_wait_s=_float("MIN_VERSION_WAIT_SECONDS", 2.0),
            min_version_max_waiters=_int("MIN_VERSION_MAX_WAITERS", 64),
            cursor_key=_cursor_key(),
            dead_letter_bucket=os.environ.get("DEAD_LETTER_BUCKET", "todo-dead-letters"),
            dead_letter_prefix=os.environ.get("DEAD_LETTER_PREFIX", "dead-letters/"),
            dead_letter_s3_endpoint=os.environ.get("DEAD_LETTER_S3_ENDPOINT", ""),
            dead_letter_dir=os.environ.get("DEAD_LETTER_DIR", str(LOCAL_DIR / "dead-letters")),
            dead_letter_store=os.environ.get("DEAD_LETTER_STORE", "dir"),
            project_event_url=os.environ.get("PROJECT_EVENT_URL", "http://127.0.0.1:8085"),
            function_name=os.environ.get("K_SERVICE") or os.environ.get("FUNCTION_TARGET", "todo"),
            metrics_enabled=os.environ.get("METRICS_ENABLED", "1").lower() not in ("0", "false", "no", "off"),
            reconcile_interval_s=_float("RECONCILE_INTERVAL_SECONDS", 10.0),
            reconcile_grace_s=_float("RECONCILE_GRACE_SECONDS", 30.0),
            outbox_retention_h=_float("OUTBOX_RETENTION_HOURS", 168.0),
            sender_identity=os.environ.get("SENDER_IDENTITY", "off").strip().lower(),
            oidc_issuer=os.environ.get("OIDC_ISSUER", "https://kubernetes.default.svc").rstrip("/"),
            # The receiver's own audience: its Knative Service name unless set.
            oidc_audience=os.environ.get("OIDC_AUDIENCE") or os.environ.get("K_SERVICE", ""),
            oidc_allowed_subjects=tuple(
                s.strip() for s in os.environ.get("OIDC_ALLOWED_SUBJECTS", "").split(",") if s.strip()
            ),
            oidc_ca_file=os.environ.get("OIDC_CA_FILE", f"{_SERVICE_ACCOUNT_DIR}/ca.crt"),
            oidc_token_file=os.environ.get("OIDC_TOKEN_FILE", f"{_SERVICE_ACCOUNT_DIR}/token"),
        )


@cache
def settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
