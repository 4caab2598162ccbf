"""Dead letters: events the KafkaSource could not deliver, kept whole until someone re-sends them.

A letter is stored as one JSON document per event. Two backends share one small interface:
S3-compatible object storage (the cluster) and a plain directory (local, no account needed).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from todo_cqrs.domain.errors import DependencyUnavailable
from todo_cqrs.settings import Settings, settings

# Extensions Knative adds when it dead-letters an event; they describe the failure, not the event.
ERROR_EXTENSIONS = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")

_KEY_SUFFIX = ".json"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_MAX_ID_IN_KEY = 100
# Bounded, so an unreachable object store answers the sink's caller in seconds (it then retries).
_S3_CONNECT_TIMEOUT_S = 2.0
_S3_READ_TIMEOUT_S = 10.0
_S3_MAX_ATTEMPTS = 2


@dataclass(frozen=True)
class DeadLetter:
    """One undeliverable CloudEvent: every attribute (error extensions included) and its data as bytes."""

    attributes: Mapping[str, str]
    data: bytes | None
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def from_http(cls, headers: Mapping[str, str], body: bytes) -> DeadLetter:
        """The letter of a CloudEvent HTTP request, binary or structured mode, exactly as it arrived.

        Raises ValueError when the request is not a CloudEvent.
        """
        lowered = {name.lower(): value for name, value in headers.items()}
        if "ce-specversion" in lowered:
            attributes = {name[3:]: value for name, value in lowered.items() if name.startswith("ce-")}
            if "content-type" in lowered:
                attributes["datacontenttype"] = lowered["content-type"]
            return cls(attributes, body or None)
        return cls._from_structured(body)

    @classmethod
    def _from_structured(cls, body: bytes) -> DeadLetter:
        try:
            envelope = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError("neither a binary-mode nor a structured-mode CloudEvent") from exc
        if not isinstance(envelope, dict) or "specversion" not in envelope:
            raise ValueError("a JSON body without specversion is not a structured-mode CloudEvent")
        attributes = {k: str(v) for k, v in envelope.items() if k not in ("data", "data_base64")}
        if "data_base64" in envelope:
            return cls(attributes, base64.b64decode(envelope["data_base64"]))
        if "data" not in envelope:
            return cls(attributes, None)
        data = envelope["data"]
        content_type = attributes.get("datacontenttype", "application/json")
        if isinstance(data, str) and not _is_json(content_type):
            return cls(attributes, data.encode())
        return cls(attributes, json.dumps(data, separators=(",", ":")).encode())

    @property
    def id(self) -> str:
        return self.attributes.get("id", "")

    @property
    def type(self) -> str:
        return self.attributes.get("type", "")

    @property
    def subject(self) -> str:
        return self.attributes.get("subject", "")

    @property
    def error_code(self) -> str:
        return self.attributes.get("knativeerrorcode", "")

    @property
    def error_dest(self) -> str:
        return self.attributes.get("knativeerrordest", "")

    def original_attributes(self) -> dict[str, str]:
        """The attributes the event had before Knative dead-lettered it (no knativeerror* extensions)."""
        return {k: v for k, v in self.attributes.items() if k not in ERROR_EXTENSIONS}

    def new_key(self) -> str:
        """A key that sorts by arrival time and is unique even for the same event dead-lettered twice."""
        stamp = self.received_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        event_id = _UNSAFE_KEY_CHARS.sub("_", self.id)[:_MAX_ID_IN_KEY] or "no-id"
        return f"{stamp}-{event_id}-{secrets.token_hex(4)}{_KEY_SUFFIX}"

    def to_json(self) -> bytes:
        document: dict[str, Any] = {
            "received_at": self.received_at.astimezone(UTC).isoformat(timespec="microseconds"),
            "attributes": dict(self.attributes),
        }
        if self.data is not None:
            # Text stays readable in the stored file; anything that is not UTF-8 goes base64, byte for byte.
            try:
                document["data_text"] = self.data.decode("utf-8")
            except UnicodeDecodeError:
                document["data_base64"] = base64.b64encode(self.data).decode("ascii")
        return json.dumps(document, indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> DeadLetter:
        document = json.loads(raw)
        data: bytes | None = None
        if "data_text" in document:
            data = document["data_text"].encode("utf-8")
        elif "data_base64" in document:
            data = base64.b64decode(document["data_base64"])
        return cls(
            attributes=document["attributes"],
            data=data,
            received_at=datetime.fromisoformat(document["received_at"]),
        )


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class DeadLetterStore(Protocol):
    """Where dead letters wait. Every method raises DependencyUnavailable when the storage is unreachable."""

    def put(self, letter: DeadLetter) -> str:
        """Store the letter under a new key and return that key."""
        ...

    def list(self) -> list[str]:
        """Every key, oldest first."""
        ...

    def get(self, key: str) -> DeadLetter:
        """The letter under key; KeyError when there is none."""
        ...

    def delete(self, key: str) -> None:
        """Remove the letter under key; removing one that is already gone is not an error."""
        ...


class DirectoryDeadLetterStore:
    """One file per letter in a local directory: the default that works with no account."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def put(self, letter: DeadLetter) -> str:
        key = letter.new_key()
        with self._unavailable_on_os_error("write"):
            self.directory.mkdir(parents=True, exist_ok=True)
            # Written under a hidden temporary name, then renamed: a reader never sees half a letter.
            fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as tmp:
                    tmp.write(letter.to_json())
                    tmp.flush()
                    os.fsync(tmp.fileno())
                os.replace(tmp_name, self.directory / key)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        return key

    def list(self) -> list[str]:
        if not self.directory.exists():
            return []
        with self._unavailable_on_os_error("list"):
            names = [entry.name for entry in self.directory.iterdir() if entry.is_file()]
        return sorted(n for n in names if n.endswith(_KEY_SUFFIX) and not n.startswith("."))

    def get(self, key: str) -> DeadLetter:
        path = self._path(key)
        with self._unavailable_on_os_error("read"):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raise KeyError(key) from None
        return DeadLetter.from_json(raw)

    def delete(self, key: str) -> None:
        with self._unavailable_on_os_error("delete"):
            self._path(key).unlink(missing_ok=True)

    def __str__(self) -> str:
        return str(self.directory)

    @contextmanager
    def _unavailable_on_os_error(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise DependencyUnavailable(f"cannot {action} dead letters in {self}", exc) from exc

    def _path(self, key: str) -> Path:
        # A key is a plain file name: nothing outside the directory can be read or deleted through it.
        if not key or key != Path(key).name or key.startswith("."):
            raise KeyError(key)
        return self.directory / key


class S3DeadLetterStore:
    """One object per letter under bucket/prefix in S3-compatible storage (AWS S3, MinIO, ...).

    Credentials and region come from the usual boto3 sources (environment, config files, instance role).
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or None
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use and then shared by every invocation."""
        with self._client_lock:
            if self._client is None:
                config = Config(
                    connect_timeout=_S3_CONNECT_TIMEOUT_S,
                    read_timeout=_S3_READ_TIMEOUT_S,
                    retries={"max_attempts": _S3_MAX_ATTEMPTS, "mode": "standard"},
                    # Self-hosted endpoints (MinIO and the like) rarely serve virtual-hosted bucket names.
                    s3={"addressing_style": "path"} if self.endpoint_url else None,
                )
                self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
            return self._client

    def put(self, letter: DeadLetter) -> str:
        key = self.prefix + letter.new_key()
        with _unavailable_on_boto_error(f"cannot write dead letters to {self}"):
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=letter.to_json(), ContentType="application/json"
            )
        return key

    def list(self) -> list[str]:
        keys: list[str] = []
        with _unavailable_on_boto_error(f"cannot list dead letters in {self}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(k for k in keys if k.endswith(_KEY_SUFFIX))

    def get(self, key: str) -> DeadLetter:
        if not key.startswith(self.prefix):
            raise KeyError(key)
        with _unavailable_on_boto_error(f"cannot read dead letters in {self}", missing_key=key):
            raw = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return DeadLetter.from_json(raw)

    def delete(self, key: str) -> None:
        if not key.startswith(self.prefix):
            raise KeyError(key)
        with _unavailable_on_boto_error(f"cannot delete dead letters in {self}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@contextmanager
def _unavailable_on_boto_error(message: str, missing_key: str | None = None) -> Iterator[None]:
    """Any boto error becomes DependencyUnavailable, except a missing object, which becomes KeyError."""
    try:
        yield
    except ClientError as exc:
        if missing_key is not None and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise KeyError(missing_key) from exc
        raise DependencyUnavailable(message, exc) from exc
    except BotoCoreError as exc:
        raise DependencyUnavailable(message, exc) from exc


@cache
def from_settings() -> DeadLetterStore:
    """The store this process's settings name (the command-line tools': a function is given its own,
    built by todo_cqrs/bootstrap.py)."""
    return store_from(settings())


def store_from(s: Settings) -> DeadLetterStore:
    """The dead-letter store DEAD_LETTER_STORE ("dir" or "s3") and its settings choose."""
    if s.dead_letter_store == "s3":
        return S3DeadLetterStore(s.dead_letter_bucket, s.dead_letter_prefix, s.dead_letter_s3_endpoint)
    if s.dead_letter_store == "dir":
        return DirectoryDeadLetterStore(s.dead_letter_dir)
    raise ValueError(f"DEAD_LETTER_STORE must be 'dir' or 's3', not {s.dead_letter_store!r}")
