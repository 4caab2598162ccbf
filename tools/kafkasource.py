"""A local KafkaSource: reads kafka-source.yaml and delivers the topic's records to the sink the way
Knative's KafkaSource dispatcher (knative-extensions/eventing-kafka-broker) does, so a local run
exercises the same contract as the cluster. Local tooling only; never deployed.

What it reproduces of the dispatcher:
- A record that is a CloudEvent (Kafka binary mode: ce_* headers; structured mode: content-type
  application/cloudevents+json) is sent as that event, in HTTP binary mode (ce-* headers, Content-Type,
  data as body). Any other record becomes a `dev.knative.kafka.event` with id `partition:<p>/offset:<o>`,
  source `/apis/v1/namespaces/<ns>/kafkasources/<name>#<topic>`, subject `partition:<p>#<o>`, time = the
  record's timestamp, `key` and `partitionkey` = the record key, and one `kafkaheader<name>` extension
  per header (name lowercased, only a-z and 0-9 kept; content-type becomes the event's content type).
- ordering "ordered": per partition, the next record waits for the sink's answer; partitions run in
  parallel. "unordered": up to LOCAL_KAFKASOURCE_IN_FLIGHT (16) records of a partition in flight at
  once, each retried on its own; offsets still move only past records that are done (an offset
  tracker per partition), as the dispatcher's unordered consumer does.
- 2xx is success; 5xx, 404, 408, 409, 429, connection errors and timeouts are retried `delivery.retry`
  times, waiting backoffDelay x 2^n (exponential) or backoffDelay x n (linear) before retry n. Anything
  else, or exhausted retries, goes to the dead-letter sink with `knativeerrordest` (the sink URL),
  `knativeerrorcode` (the status; absent when there was no response), `knativeerrordata` (the response
  body, truncated to 1024 bytes, base64) and one extension per `kne-<name>` response header.
  Without a dead-letter sink the record is dropped, with a log line.
- A sink (or dead-letter sink) with an `audience` gets `Authorization: Bearer <token>` on every request:
  a token of the source's OIDC service account for that audience (tools/issuer.py stands in for the
  cluster's issuer), cached and renewed before it expires, as the dispatcher does with
  `authentication-oidc` on.
- An offset is stored only once its record was delivered, dead-lettered or dropped; stored offsets are
  auto-committed, and committed on revocation and shutdown. A stop lets the HTTP attempt in flight finish;
  a record abandoned mid-retry is delivered again after a restart (at least once, never skipped).

Where it deliberately differs: when the dead-letter sink itself keeps failing, the dispatcher commits
the offset and the event is lost; this runner keeps retrying the dead-letter sink (backoff capped at
30 s, one log line per failure), so the partition waits visibly instead of losing an event.

Metrics (`--metrics-port`, KAFKASOURCE_METRICS_PORT): consumer lag per partition, retries, and
records done with by outcome, in the Prometheus text format.

Threads: the consumer's (every Consumer call), and an event loop's that posts over keep-alive
connections (tools/http1.py).

Run: `python -m tools.kafkasource [--file kafka-source.yaml]` (until SIGINT/SIGTERM), or in-process:
`LocalKafkaSource("kafka-source.yaml").start()` ... `.stop()`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urljoin, urlsplit

import orjson
import uvloop
import yaml
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from prometheus_client import Counter, Gauge, disable_created_metrics, start_http_server

from todo_cqrs.settings import settings
from tools import http1
from tools.issuer import Tokens, source_subject
from tools.topology import BY_SERVICE, REPO

# KAFKA_SOURCE_FILE: another copy (the bench's, an isolated run's) naming another topic and group.
DEFAULT_SPEC = Path(os.environ.get("KAFKA_SOURCE_FILE") or REPO / "kafka-source.yaml")
DEFAULT_REQUEST_TIMEOUT_S = 10.0  # Knative's default is 600 s; locally a hung function should show fast
PLAIN_EVENT_TYPE = "dev.knative.kafka.event"
ERROR_DATA_MAX_BYTES = 1024
ERROR_HEADER_PREFIX = "kne-"
DEAD_LETTER_MIN_BACKOFF_S = 0.1
DEAD_LETTER_MAX_BACKOFF_S = 30.0
# A partition holds at most this many polled records not yet done with; above it the partition is paused.
QUEUE_HIGH_WATER = 1000
QUEUE_LOW_WATER = 100
# The consumer thread stores the offsets of what was delivered, and resumes paused partitions, between
# polls: every POLL_TIMEOUT_S while records are in flight. With none, it has nothing to do but wait for
# a record (which ends the wait at once), or a stop (which waits for the poll, at most IDLE_POLL_TIMEOUT_S).
POLL_TIMEOUT_S = 0.1
IDLE_POLL_TIMEOUT_S = 1.0
# ordering "unordered": records of a partition in flight at once (LOCAL_KAFKASOURCE_IN_FLIGHT).
UNORDERED_IN_FLIGHT = 50  # Knative's Kafka dispatcher: max.poll.records
LAG_EVERY_S = 1.0


# --- the spec ---------------------------------------------------------------------------------------


_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> float:
    """Seconds in an ISO-8601 duration of days and time (`PT0.2S`, `PT1M30S`, `P1D`)."""
    normalized = text.strip().upper()
    match = _DURATION.match(normalized)
    if not match or not any(match.groupdict().values()) or normalized.endswith("T"):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
    return sum(parts.get(name, 0.0) * factor for name, factor in units.items())


@dataclass(frozen=True)
class Destination:
    """A sink as a KafkaSource names it: a ref to a Knative Service, an absolute uri, or both."""

    ref_kind: str | None = None
    ref_name: str | None = None
    uri: str | None = None
    audience: str | None = None  # with one, each request carries a token for it (sender identity)

    @classmethod
    def from_spec(cls, node: Mapping[str, Any]) -> Destination:
        ref = node.get("ref") or {}
        return cls(ref.get("kind"), ref.get("name"), node.get("uri"), node.get("audience"))

    def local_url(self) -> str:
        """The URL of this destination on this machine (Services resolved through tools/topology.py)."""
        if self.ref_name is None:
            if not self.uri or not re.match(r"^https?://", self.uri):
                raise ValueError(f"a sink without ref needs an absolute uri, got {self.uri!r}")
            return self.uri
        if self.ref_kind != "Service":
            raise ValueError(f"only Service refs resolve locally, got {self.ref_kind}/{self.ref_name}")
        function = BY_SERVICE.get(self.ref_name)
        if function is None:
            raise ValueError(f"no local function for Service {self.ref_name!r}; known: {sorted(BY_SERVICE)}")
        return urljoin(function.url + "/", self.uri) if self.uri else function.url


@dataclass(frozen=True)
class DeliverySpec:
    retry: int = 0
    backoff_policy: str = "exponential"
    backoff_delay_s: float = 0.0
    timeout_s: float | None = None

    def backoff_s(self, retry_number: int) -> float:
        """The wait before retry number `retry_number` (1, 2, ...), as the dispatcher computes it."""
        if self.backoff_policy == "linear":
            return self.backoff_delay_s * retry_number
        return self.backoff_delay_s * 2**retry_number


@dataclass(frozen=True)
class KafkaSourceSpec:
    name: str
    namespace: str
    topics: tuple[str, ...]
    consumer_group: str
    initial_offset: str
    ordering: str
    sink: Destination
    dead_letter_sink: Destination | None
    delivery: DeliverySpec
    ce_overrides: Mapping[str, str] = field(default_factory=dict)


def load_spec(path: str | Path) -> KafkaSourceSpec:
    """The first KafkaSource in a manifest file."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict) and d.get("kind") == "KafkaSource"]
    if not docs:
        raise ValueError(f"{path}: no KafkaSource in it")
    doc = docs[0]
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    delivery = spec.get("delivery") or {}
    dls = delivery.get("deadLetterSink")
    initial_offset = spec.get("initialOffset", "latest")
    if initial_offset not in ("earliest", "latest"):
        raise ValueError(f"initialOffset must be earliest or latest, got {initial_offset!r}")
    return KafkaSourceSpec(
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        topics=tuple(spec["topics"]),
        # The controller's default group id when none is set is the source's UID; a fixed local one will do.
        consumer_group=spec.get("consumerGroup") or f"local-kafkasource-{meta['name']}",
        initial_offset=initial_offset,
        ordering=spec.get("ordering", "ordered"),
        sink=Destination.from_spec(spec["sink"]),
        dead_letter_sink=Destination.from_spec(dls) if dls else None,
        delivery=DeliverySpec(
            retry=int(delivery.get("retry", 0)),
            backoff_policy=delivery.get("backoffPolicy", "exponential"),
            backoff_delay_s=parse_duration(delivery["backoffDelay"]) if delivery.get("backoffDelay") else 0.0,
            timeout_s=parse_duration(delivery["timeout"]) if delivery.get("timeout") else None,
        ),
        ce_overrides=dict((spec.get("ceOverrides") or {}).get("extensions") or {}),
    )


# --- records to HTTP CloudEvents ----------------------------------------------------------------------


@dataclass(frozen=True)
class HttpEvent:
    """A CloudEvent in HTTP binary mode: ce-* headers (and Content-Type), data as the body."""

    headers: Mapping[str, str]
    body: bytes

    @property
    def id(self) -> str | None:
        return self.headers.get("ce-id")

    @property
    def type(self) -> str | None:
        return self.headers.get("ce-type")

    def with_extensions(self, extensions: Mapping[str, str]) -> HttpEvent:
        headers = dict(self.headers)
        headers.update({f"ce-{name}": header_value(value) for name, value in extensions.items()})
        return HttpEvent(headers, self.body)


def header_value(value: str) -> str:
    """An attribute value as an HTTP header value. Printable ASCII goes verbatim (what the Python SDK
    reads back); anything else is percent-encoded as the CloudEvents HTTP binding prescribes."""
    if all(" " <= c <= "~" for c in value):
        return value
    return quote(value, safe="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%'))


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def _attribute_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def kafka_header_extension(name: str) -> str:
    """The extension a plain record's header becomes: its name lowercased, keeping only a-z and 0-9."""
    return "kafkaheader" + "".join(c for c in name.lower() if "a" <= c <= "z" or "0" <= c <= "9")


def _binary_event(headers: list[tuple[str, bytes | None]], value: bytes | None) -> HttpEvent | None:
    out: dict[str, str] = {}
    for name, raw in headers:
        lowered = name.lower()
        if lowered.startswith("ce_"):
            out["ce-" + lowered[3:]] = header_value(_text(raw))
        elif lowered == "content-type":
            out["Content-Type"] = _text(raw)
    if not all(k in out for k in ("ce-specversion", "ce-id", "ce-source", "ce-type")):
        return None  # not a valid CloudEvent: the dispatcher wraps it like any plain record
    return HttpEvent(out, value or b"")


def _structured_event(value: bytes | None) -> HttpEvent | None:
    try:
        doc = json.loads(value or b"")
    except ValueError:
        return None
    if not isinstance(doc, dict) or not all(k in doc for k in ("specversion", "id", "source", "type")):
        return None
    headers: dict[str, str] = {}
    body = b""
    content_type = doc.get("datacontenttype")
    for name, attr in doc.items():
        if name in ("data", "data_base64", "datacontenttype") or attr is None:
            continue
        headers[f"ce-{name}"] = header_value(_attribute_text(attr))
    if "data_base64" in doc:
        body = base64.b64decode(doc["data_base64"])
    elif "data" in doc:
        data = doc["data"]
        if isinstance(data, str) and content_type and "json" not in content_type:
            body = data.encode()
        else:
            body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
            content_type = content_type or "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    return HttpEvent(headers, body)


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _record_time(msg: Message) -> str | None:
    kind, millis = msg.timestamp()
    if kind == TIMESTAMP_NOT_AVAILABLE:
        return None
    return _rfc3339(datetime.fromtimestamp(millis / 1000, UTC))


def _plain_event(msg: Message, spec: KafkaSourceSpec) -> HttpEvent:
    p, o = msg.partition(), msg.offset()
    headers = {
        "ce-specversion": "1.0",
        "ce-id": f"partition:{p}/offset:{o}",
        "ce-source": f"/apis/v1/namespaces/{spec.namespace}/kafkasources/{spec.name}#{msg.topic()}",
        "ce-type": PLAIN_EVENT_TYPE,
        "ce-subject": f"partition:{p}#{o}",
    }
    record_time = _record_time(msg)
    if record_time:
        headers["ce-time"] = record_time
    if msg.key() is not None:
        key = header_value(_text(msg.key()))
        headers["ce-key"] = key
        headers["ce-partitionkey"] = key
    for name, raw in _record_headers(msg):
        if name.lower() == "content-type":
            headers["Content-Type"] = _text(raw).lower()
        else:
            headers["ce-" + kafka_header_extension(name)] = header_value(_text(raw))
    return HttpEvent(headers, msg.value() or b"")


def _record_headers(msg: Message) -> list[tuple[str, bytes | None]]:
    headers = msg.headers() or []  # a consumed record's are a list of (name, bytes) pairs
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    return [(name, raw.encode() if isinstance(raw, str) else raw) for name, raw in pairs]


def to_http_event(msg: Message, spec: KafkaSourceSpec) -> HttpEvent:
    """The CloudEvent the dispatcher sends for a Kafka record (with the source's ceOverrides)."""
    headers = _record_headers(msg)
    content_type = next((_text(v) for k, v in headers if k.lower() == "content-type"), "")
    event = None
    if content_type.lower().startswith("application/cloudevents"):
        event = _structured_event(msg.value())
    elif any(k.lower() == "ce_specversion" for k, _ in headers):
        event = _binary_event(headers, msg.value())
    event = event or _plain_event(msg, spec)
    return event.with_extensions(spec.ce_overrides) if spec.ce_overrides else event


# --- delivery ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """The outcome of one POST: a status and body, or the connection error that stood in for them."""

    status: int | None
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        # The dispatcher's list (from the Knative data-plane spec); no answer at all is retried too.
        return self.status is None or self.status >= 500 or self.status in (404, 408, 409, 429)


def error_extensions(destination: str, answer: Answer) -> dict[str, str]:
    """The extensions the dispatcher adds to an event before it goes to the dead-letter sink."""
    extensions = {"knativeerrordest": destination}
    if answer.status is None:
        return extensions
    extensions["knativeerrorcode"] = str(answer.status)
    for name, value in answer.headers.items():
        if name.lower().startswith(ERROR_HEADER_PREFIX):
            extensions[name[len(ERROR_HEADER_PREFIX) :].lower()] = value
    if answer.body:
        extensions["knativeerrordata"] = base64.b64encode(answer.body[:ERROR_DATA_MAX_BYTES]).decode()
    return extensions


class JsonLog:
    """One JSON object per line on a stream (stdout by default), safe across threads."""

    def __init__(self, stream: TextIO | None = None, **fields: Any) -> None:
        self._stream = stream
        self._fields = fields
        self._lock = threading.Lock()

    def __call__(self, level: str, msg: str, **fields: Any) -> None:
        line = orjson.dumps(
            {"ts": _rfc3339(datetime.now(UTC)), "level": level, "msg": msg, **self._fields, **fields},
            default=str,
        )
        stream = self._stream or sys.stdout
        with self._lock:
            stream.write(line.decode() + "\n")
            stream.flush()


class _Tracker:
    """A partition's records in offset order: each is done once delivered, dead-lettered or dropped, and
    only a done prefix is handed back for its offsets to be stored (unordered delivery finishes records
    out of order; an offset is never committed past a record still in flight)."""

    def __init__(self) -> None:
        self.records: collections.deque[list[Any]] = collections.deque()  # [msg, done]

    def add(self, msg: Message) -> list[Any]:
        entry = [msg, False]
        self.records.append(entry)
        return entry

    def finish(self, entry: list[Any]) -> list[Message]:
        entry[1] = True
        ready = []
        while self.records and self.records[0][1]:
            ready.append(self.records.popleft()[0])
        return ready


class _Partition:
    """Delivers one partition's records: one after the other (ordered), or up to `in_flight` at once
    (unordered)."""

    def __init__(self, source: LocalKafkaSource, topic: str, partition: int) -> None:
        self.source = source
        self.key = (topic, partition)
        self.tracker = _Tracker()
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.ordered = source.spec.ordering != "unordered"
        self.slots = asyncio.Semaphore(1 if self.ordered else source.in_flight)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    def accept(self, msg: Message) -> None:
        self.queue.put_nowait(msg)

    async def _pump(self) -> None:
        while not self.stopping:
            msg = await self.queue.get()
            await self.slots.acquire()
            if self.stopping:
                self.slots.release()
                return
            entry = self.tracker.add(msg)
            task = asyncio.get_running_loop().create_task(self._deliver(msg, entry))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _deliver(self, msg: Message, entry: list[Any]) -> None:
        try:
            if await self.source.delivery.deliver(msg, lambda: self.stopping):
                for done in self.tracker.finish(entry):
                    self.source.done.put(done)
        except Exception:
            # A bug here must not stall the partition silently: stop the whole source, loudly.
            self.source.log("error", "delivery failed; stopping", error=traceback.format_exc())
            self.source.stopping.set()
        finally:
            self.slots.release()

    async def stop(self) -> None:
        """Let the HTTP attempts in flight finish; give up what is queued or waiting to retry (not
        stored, so the partition's next owner delivers it again)."""
        self.stopping = True
        self.pump.cancel()
        self.source.delivery.wake_stopped()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=self.source.request_timeout_s + 5)


class _Delivery:
    """Sends one record's event to the sink, retrying as the delivery spec says, then to the dead-letter
    sink; over keep-alive connections shared by every partition."""

    def __init__(self, source: LocalKafkaSource) -> None:
        self.source = source
        spec = source.spec
        tokens = Tokens(source_subject(spec.name, "kafkasource", spec.namespace))
        self.sink = _Target(source.sink_url, spec.sink.audience, tokens)
        dls = spec.dead_letter_sink
        self.dead_letter_sink = (
            _Target(source.dead_letter_url, dls.audience if dls else None, tokens)
            if source.dead_letter_url
            else None
        )
        self._stopped = asyncio.Event()

    def wake_stopped(self) -> None:
        self._stopped.set()
        self._stopped = asyncio.Event()

    async def _wait(self, seconds: float, stopping: Callable[[], bool]) -> bool:
        """Sleep; True if the partition was stopped meanwhile."""
        stopped = self._stopped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), seconds)
        return stopping()

    async def _post(self, target: _Target, event: HttpEvent) -> Answer:
        source = self.source
        headers = {**event.headers, "Prefer": "reply", "Kn-Namespace": source.spec.namespace}
        if target.tokens is not None and target.audience:
            headers["Authorization"] = target.tokens.authorization(target.audience)
        raw = http1.encode_request(
            "POST",
            target.path,
            [(k.encode(), v.encode("latin-1")) for k, v in headers.items()],
            event.body,
            target.pool.host_header,
        )
        try:
            reply = await target.pool.request(raw, timeout_s=source.request_timeout_s, retry=True)
        except (http1.UpstreamError, TimeoutError) as e:
            return Answer(None, error=f"{type(e).__name__}: {e}")
        return Answer(
            reply.status, reply.body, {k.decode("latin-1"): v.decode("latin-1") for k, v in reply.headers}
        )

    async def deliver(self, msg: Message, stopping: Callable[[], bool]) -> bool:
        """True when the record is done with (delivered, dead-lettered or dropped); False when stopped."""
        source = self.source
        started = time.monotonic()
        where = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
        try:
            event = to_http_event(msg, source.spec)
        except Exception:  # as the dispatcher does with a record it cannot read: log it, move on
            source.log("error", "discarded: record unreadable", **where, error=traceback.format_exc())
            return True
        fields = {**where, "event_id": event.id, "event_type": event.type}
        sent = await self._send_to_sink(event, fields, stopping)
        if sent is None:
            return False
        answer, attempts = sent
        fields.update(status=answer.status, attempts=attempts)
        if answer.error:
            fields["error"] = answer.error
        if answer.ok:
            _DELIVERIES["delivered"].inc()
            source.log("info", "delivered", **fields, latency_ms=_ms_since(started))
            return True
        if self.dead_letter_sink is None:
            _DELIVERIES["dropped"].inc()
            source.log("error", "dropped: no dead-letter sink", **fields, latency_ms=_ms_since(started))
            return True
        dead_letter = event.with_extensions(error_extensions(source.sink_url, answer))
        dls_attempts = await self._send_to_dead_letter_sink(dead_letter, fields, stopping)
        if dls_attempts is None:
            return False
        _DELIVERIES["dead_lettered"].inc()
        source.log("warning", "dead-lettered", **fields, dead_letter_attempts=dls_attempts,
                   latency_ms=_ms_since(started))  # fmt: skip
        return True

    async def _send_to_sink(
        self, event: HttpEvent, fields: dict[str, Any], stopping: Callable[[], bool]
    ) -> tuple[Answer, int] | None:
        """The last answer and the number of attempts, retrying as the delivery spec says; None if stopped."""
        delivery = self.source.spec.delivery
        attempt = 0
        while True:
            attempt += 1
            answer = await self._post(self.sink, event)
            if answer.ok or not answer.retryable or attempt > delivery.retry:
                return answer, attempt
            wait = delivery.backoff_s(attempt)
            _RETRIES.inc()
            self.source.log("warning", "retrying", **fields, status=answer.status, error=answer.error,
                            attempts=attempt, retry_in_s=wait)  # fmt: skip
            if await self._wait(wait, stopping):
                return None

    async def _send_to_dead_letter_sink(
        self, event: HttpEvent, fields: dict[str, Any], stopping: Callable[[], bool]
    ) -> int | None:
        """Attempts until the dead-letter sink took the event (it is never given up); None if stopped."""
        assert self.dead_letter_sink is not None
        delivery = self.source.spec.delivery
        attempt = 0
        while True:
            attempt += 1
            answer = await self._post(self.dead_letter_sink, event)
            if answer.ok:
                return attempt
            wait = min(max(delivery.backoff_s(attempt), DEAD_LETTER_MIN_BACKOFF_S), DEAD_LETTER_MAX_BACKOFF_S)
            self.source.log("error", "dead-letter sink failed; retrying so the event is not lost", **fields,
                            dead_letter_status=answer.status, dead_letter_error=answer.error,
                            dead_letter_attempts=attempt, retry_in_s=wait)  # fmt: skip
            if await self._wait(wait, stopping):
                return None


class _Target:
    """A sink: its URL, the request path, and keep-alive connections to it (opened on the source's loop);
    with an audience, the source's token for it (minted by the local issuer, renewed before it expires,
    as the dispatcher does with the cluster's)."""

    def __init__(self, url: str, audience: str | None = None, tokens: Tokens | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the local KafkaSource posts over plain HTTP only, not to {url!r}")
        self.url = url
        self.audience = audience
        self.tokens = tokens if audience else None
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.pool = http1.Pool(parts.hostname, parts.port or 80)


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


disable_created_metrics()
_LAG = Gauge(
    "todo_kafkasource_consumer_lag", "Records on the partition not yet delivered", ["topic", "partition"]
)
_RETRIES = Counter("todo_kafkasource_retries", "Deliveries to the sink tried again after a retryable answer")
_DELIVERIES_ALL = Counter("todo_kafkasource_deliveries", "Records done with, by outcome", ["outcome"])
_DELIVERIES = {o: _DELIVERIES_ALL.labels(o) for o in ("delivered", "dead_lettered", "dropped")}


# --- the source --------------------------------------------------------------------------------------


class LocalKafkaSource:
    """Consumes the KafkaSource's topics in its consumer group and delivers to its sink, in background
    threads (the consumer's, and an event loop's for delivery): `start()`, then `stop()` (which commits
    what was delivered)."""

    def __init__(
        self,
        spec_path: str | Path = DEFAULT_SPEC,
        *,
        sink_url: str | None = None,
        dead_letter_url: str | None = None,
        bootstrap_servers: str | None = None,
        request_timeout_s: float | None = None,
        log_stream: TextIO | None = None,
        in_flight: int | None = None,
    ) -> None:
        self.spec = load_spec(spec_path)
        self.sink_url = sink_url or self.spec.sink.local_url()
        dls = self.spec.dead_letter_sink
        self.dead_letter_url = dead_letter_url or (dls.local_url() if dls else None)
        self.bootstrap_servers = bootstrap_servers or settings().kafka_bootstrap_servers
        self.request_timeout_s = (
            request_timeout_s or self.spec.delivery.timeout_s or DEFAULT_REQUEST_TIMEOUT_S
        )
        self.in_flight = in_flight or int(os.environ.get("LOCAL_KAFKASOURCE_IN_FLIGHT", UNORDERED_IN_FLIGHT))
        self.log = JsonLog(log_stream, component="kafkasource", source=self.spec.name)
        self._consumer: Consumer | None = None
        # Records the partitions are done with, whose offsets the consumer thread stores. Every Consumer call
        # stays on that thread: confluent-kafka serialises calls from several threads with a gate that a
        # polling thread can hold almost continuously, starving the others.
        self.done: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._in_flight: dict[tuple[str, int], int] = collections.defaultdict(int)  # consumer thread only
        self._stored: dict[tuple[str, int], int] = {}
        self._first_seen: dict[tuple[str, int], int] = {}
        self._assignment: set[tuple[str, int]] = set()
        self._paused: set[tuple[str, int]] = set()
        self._assigned = threading.Event()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop = uvloop.new_event_loop()  # the event loop the functions run on (their server's)
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="kafkasource-delivery", daemon=True
        )
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self.delivery: _Delivery | None = None
        self._next_lag_at = 0.0

    def __enter__(self) -> LocalKafkaSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalKafkaSource:
        """Subscribe and start delivering in background threads."""
        self._loop_thread.start()
        self.delivery = self._call(self._make_delivery())
        self._consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": self.spec.consumer_group,
                "client.id": f"local-kafkasource-{self.spec.name}",
                "auto.offset.reset": self.spec.initial_offset,
                # Offsets are stored once each record is done with, and only those are committed:
                # periodically, on revocation and on close.
                "enable.auto.offset.store": False,
                "enable.auto.commit": True,
                "auto.commit.interval.ms": 500,
                # The broker answers a fetch as soon as one byte is there, or after 500 ms (Kafka's
                # default): an idle source fetches twice a second, a busy one as often as records come.
                "fetch.wait.max.ms": 500,
                # A crashed local runner's partitions come back within 10 s instead of 45, and a member
                # joining the group is noticed within a second.
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 1000,
                "error_cb": lambda err: self.log("warning", "kafka", error=str(err)),
            }
        )
        self._consumer.subscribe(list(self.spec.topics), on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread = threading.Thread(target=self._run, name=f"kafkasource-{self.spec.name}", daemon=True)
        self._thread.start()
        self.log(
            "info",
            "started",
            topics=self.spec.topics,
            consumer_group=self.spec.consumer_group,
            initial_offset=self.spec.initial_offset,
            ordering=self.spec.ordering,
            in_flight_per_partition=1 if self.spec.ordering != "unordered" else self.in_flight,
            sink=self.sink_url,
            dead_letter_sink=self.dead_letter_url,
            retry=self.spec.delivery.retry,
            backoff_policy=self.spec.delivery.backoff_policy,
            backoff_delay_s=self.spec.delivery.backoff_delay_s,
        )
        return self

    async def _make_delivery(self) -> _Delivery:
        return _Delivery(self)

    def _call(self, coroutine: Any, timeout_s: float | None = None) -> Any:
        """Run a coroutine on the delivery loop from the consumer thread, and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    @property
    def running(self) -> bool:
        """False once stopped, or when the consumer loop died (its reason is in the log)."""
        return self._thread is not None and self._thread.is_alive()

    def wait_until_assigned(self, timeout_s: float) -> bool:
        """True once the group gave this source its partitions."""
        return self._assigned.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop delivering, commit what was delivered, leave the group."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._loop.is_running():
            self._call(self._close_pools(), 5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5)

    async def _close_pools(self) -> None:
        if self.delivery is not None:
            for target in (self.delivery.sink, self.delivery.dead_letter_sink):
                if target is not None:
                    target.pool.close()

    # The consumer thread: polls, hands records to the partitions, pauses full partitions.
    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self.stopping.is_set():
                busy = any(self._in_flight.values())
                msg = consumer.poll(POLL_TIMEOUT_S if busy else IDLE_POLL_TIMEOUT_S)
                if msg is not None:
                    self._dispatch(msg)
                self._store_done()
                self._apply_backpressure()
                self._measure_lag()
        except Exception as e:  # keep the process's log readable; the runner restarts it
            self.log("error", "consumer loop failed", error=f"{type(e).__name__}: {e}")
        finally:
            self._stop_partitions(list(self._partitions))
            self._store_done()
            self._commit()
            consumer.close()  # revokes (committing again) and leaves the group at once
            self.log("info", "stopped")

    def _dispatch(self, msg: Message) -> None:
        error = msg.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                self.log("warning", "kafka", error=str(error))
            return
        key = (str(msg.topic()), int(msg.partition() or 0))
        self._in_flight[key] += 1
        self._first_seen.setdefault(key, msg.offset())
        self._loop.call_soon_threadsafe(self._accept, key, msg)

    def _accept(self, key: tuple[str, int], msg: Message) -> None:  # on the delivery loop
        partition = self._partitions.get(key)
        if partition is None:
            partition = self._partitions[key] = _Partition(self, *key)
        partition.accept(msg)

    def _apply_backpressure(self) -> None:
        assert self._consumer is not None
        for key, size in self._in_flight.items():
            if key not in self._paused and size >= QUEUE_HIGH_WATER:
                self._consumer.pause([TopicPartition(*key)])
                self._paused.add(key)
            elif key in self._paused and size <= QUEUE_LOW_WATER:
                self._consumer.resume([TopicPartition(*key)])
                self._paused.discard(key)

    def _store_done(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                msg = self.done.get_nowait()
            except queue.Empty:
                return
            key = (str(msg.topic()), int(msg.partition() or 0))
            self._in_flight[key] -= 1
            try:
                self._consumer.store_offsets(message=msg)
                self._stored[key] = msg.offset() + 1
            except KafkaException as e:  # the partition is gone: its next owner delivers the record again
                where = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
                self.log("warning", "offset not stored", **where, error=str(e))

    def _measure_lag(self) -> None:
        """Consumer lag per partition (records on the topic not yet done with), once a second, from the
        high watermarks the fetches brought back (no request to the broker)."""
        now = time.monotonic()
        if now < self._next_lag_at or self._consumer is None:
            return
        self._next_lag_at = now + LAG_EVERY_S
        for topic, partition in self._assignment:
            try:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            key = (topic, partition)
            position = self._stored.get(key, self._first_seen.get(key, high))
            _LAG.labels(topic, str(partition)).set(max(0, high - position) if high >= 0 else 0)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment.update((p.topic, p.partition) for p in partitions)
        self.log("info", "partitions assigned", partitions=[f"{p.topic}/{p.partition}" for p in partitions])
        self._assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Runs inside poll(), while the partitions are still ours: let their deliveries finish the attempt
        # in flight, drop what was queued (not stored, so fetched again by the next owner), commit.
        keys = [(p.topic, p.partition) for p in partitions]
        self._stop_partitions(keys)
        self._store_done()
        self._commit()
        self._paused.difference_update(keys)
        for key in keys:
            self._in_flight.pop(key, None)
            self._stored.pop(key, None)
            self._first_seen.pop(key, None)
            self._assignment.discard(key)
            _LAG.labels(key[0], str(key[1])).set(0)
        self._assigned.clear()
        self.log("info", "partitions revoked", partitions=[f"{t}/{p}" for t, p in keys])

    def _stop_partitions(self, keys: list[tuple[str, int]]) -> None:
        async def stop_them() -> None:
            partitions = [p for p in (self._partitions.pop(k, None) for k in keys) if p is not None]
            await asyncio.gather(*(p.stop() for p in partitions))

        if self._loop.is_running():
            try:
                self._call(stop_them(), self.request_timeout_s + 10)
            except Exception as e:  # noqa: BLE001 - stopping must go on; what was not stored is redelivered
                self.log("warning", "partition stop incomplete", error=repr(e))

    def _commit(self) -> None:
        assert self._consumer is not None
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:
                self.log("warning", "commit failed", error=str(e))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.kafkasource", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--file", default=str(DEFAULT_SPEC), help="the KafkaSource manifest (kafka-source.yaml)"
    )
    parser.add_argument("--sink-url", help="deliver here instead of the resolved sink")
    parser.add_argument("--dead-letter-url", help="dead-letter here instead of the resolved deadLetterSink")
    parser.add_argument(
        "--timeout", type=float, help=f"per-request timeout, s (default {DEFAULT_REQUEST_TIMEOUT_S})"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("KAFKASOURCE_METRICS_PORT", "0")) or None,
        help="serve Prometheus metrics (consumer lag per partition, retries) on this port",
    )  # fmt: skip
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.metrics_port:
        start_http_server(args.metrics_port, addr="127.0.0.1")
    source = LocalKafkaSource(
        args.file,
        sink_url=args.sink_url,
        dead_letter_url=args.dead_letter_url,
        request_timeout_s=args.timeout,
    ).start()
    while not stop.wait(0.5):
        if not source.running:
            return 1  # the consumer loop died; its reason is in the log
    source.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
