"""The live page's pipeline health, `GET /ui/api/pipeline`: one JSON document aggregating a scrape of
every function's `/metrics` and the local KafkaSource's. Local tooling only: served by
tools/pipeline_server.py, behind the gateway's `/ui/api/`; `answer(path)` is its whole interface.

Cost: one scrape round per request, every target at once over keep-alive connections, each bounded
by SCRAPE_TIMEOUT_S; a target that does not answer in time is listed under "errors" and the rest is
still answered. Requests that arrive while a round is in flight share it, and a round younger than
REUSE_S is answered again, so two open tabs cost one round. Nothing runs when nobody polls.

Deltas: the previous reading of every target stays in memory (rates are over the time since it). Each
round's deltas are added into SERIES_BIN_S bins kept for SERIES_S; the "last 60 s" figures and the
chart's series are sums over those bins. A counter that went down (its process restarted) counts
from zero; a gap longer than MAX_GAP_S between rounds (nobody polled) is not attributed to any bin:
the window starts again. Percentiles are estimated from the histogram's bucket deltas by linear
interpolation within a bucket, as Prometheus' histogram_quantile does, so they are as coarse as
todo_projection_lag_seconds' buckets (5, 10, 25, 50, 100 ms ...).

The document (a number is null when its source did not answer, or when the window has no samples):
- `scraped_at`: RFC 3339 UTC time of the round; `scrape_ms`: how long the round took;
  `interval_seconds`: since the previous round (null on the first), the span the `*_per_second` rates
  cover; `window_seconds`: the span the `*_60s` figures cover (under 60 s after a start or a gap).
- `components`: `{name: "up" | "down"}` for the eight functions and `kafkasource`.
- `errors`: `[{"component", "message", "detail"}]`, e.g. `"project_event unreachable"`, one per target
  that did not answer.
- `outbox`: `pending_rows`, `oldest_pending_age_seconds` (relay_outbox's gauges: it counts the table at
  its scrapes), `published_per_second`, `publish_failures_total` (the commands' and the relay's counters).
- `consumer` (the KafkaSource): `partitions` `[{"topic", "partition", "lag"}]` (records not yet
  delivered), `lag_total`, `retries_total`, `retries_60s`,
  `deliveries` `{"delivered", "dead_lettered", "dropped"}` (totals).
- `projection` (project_event): `events` and `events_60s`, each `{"applied", "skipped", "rejected",
  "failed"}` summed over event types; `applied_per_second`; `lag_ms_60s` `{"count", "p50", "p90",
  "p99"}` (from an event's commit to its read-model commit, in ms); `lag_series`
  `[{"t", "count", "p50_ms", "p99_ms"}]`, one per `series_bin_seconds` bin with events over the last
  `series_seconds`, `t` the bin's start in Unix seconds.
- `cache` (get_todos): `item` and `list`, each `{"hit", "miss", "bypass", "hit_ratio", "hit_ratio_60s"}`
  (counts since start; a ratio is hits over all reads, null without reads).
- `min_version` (get_todos' read-your-writes waits): `ready_60s`, `timeout_60s`.
- `dead_letters` (dead_letter): `stored_total`, `stored_60s`.
- `reconcile` (the reconcile function, docs/reconciliation.md): `passes_total`, `last_pass_at` (RFC 3339,
  null before the first pass), `last_pass_age_seconds`, `drift` and `drift_60s` `{"missing", "different",
  "extra"}` (differences older than the grace period, found), `repaired_total`, `repaired_60s`.
- `requests`: `{function: {"per_second", "server_errors_per_second"}}`, API requests only (not
  /metrics nor the health paths).

Any other path under /ui/api/ answers 404 with the contract's JSON error body.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from todo_cqrs.http import error_body
from todo_cqrs.loop_local import loop_local
from tools import http1
from tools.topology import FUNCTIONS, HOST, KAFKASOURCE_METRICS_PORT

PIPELINE_PATH = "/ui/api/pipeline"
SCRAPE_TIMEOUT_S = 0.5
REUSE_S = 0.5
MAX_GAP_S = 10.0
WINDOW_S = 60.0
SERIES_BIN_S = 5
SERIES_S = 300
KAFKASOURCE = "kafkasource"
TARGETS = {**{f.name: f.port for f in FUNCTIONS}, KAFKASOURCE: KAFKASOURCE_METRICS_PORT}
OUTBOX_GAUGE_SOURCES = ("create_todo", "update_todo", "delete_todo", "relay_outbox")
NOT_API_ROUTES = {"/metrics", "/healthz", "/readyz"}
OUTCOMES = ("applied", "skipped", "rejected", "failed")
CACHE_RESULTS = ("hit", "miss", "bypass")
LAG = "todo_projection_lag_seconds_bucket"
LAG_SOURCE = "project_event"
PENDING, OLDEST = "todo_outbox_pending_rows", "todo_outbox_oldest_pending_age_seconds"
CONSUMER_LAG_TOTAL = "consumer_lag_total"
RECONCILE_PASSES, RECONCILE_DRIFT = "todo_reconcile_passes_total", "todo_reconcile_drift_total"
RECONCILE_REPAIRED = "todo_reconcile_repaired_total"
RECONCILE_LAST_PASS = "todo_reconcile_last_pass_timestamp_seconds"
DRIFT_KINDS = ("missing", "different", "extra")
WANTED = {
    "todo_http_requests_total",
    PENDING,
    OLDEST,
    "todo_outbox_published_total",
    "todo_outbox_publish_failures_total",
    "todo_projection_events_total",
    LAG,
    "todo_cache_reads_total",
    "todo_min_version_wait_seconds_count",
    "todo_dead_letters_stored_total",
    RECONCILE_PASSES,
    RECONCILE_DRIFT,
    RECONCILE_REPAIRED,
    RECONCILE_LAST_PASS,
    "todo_kafkasource_consumer_lag",
    "todo_kafkasource_retries_total",
    "todo_kafkasource_deliveries_total",
}

SKIPPED_PREFIX = "todo_http_request_duration"  # most of the exposition's lines, none of the page's figures
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def parse_exposition(text: str) -> list[Sample]:
    """The samples of the metrics this page (and the bench's soak) reads, from the Prometheus text format:
    a filter over the lines, not a full parser, as the page scrapes every function every second and most
    of an exposition is request-duration buckets it never shows."""
    samples: list[Sample] = []
    for line in text.splitlines():
        if not line.startswith("todo_") or line.startswith(SKIPPED_PREFIX):
            continue
        brace = line.find("{")
        if brace == -1:
            name, _, rest = line.partition(" ")
            labels: dict[str, str] = {}
        else:
            name = line[:brace]
            close = line.rfind("}")
            labels = dict(_LABEL.findall(line[brace + 1 : close]))
            rest = line[close + 1 :]
        if name not in WANTED:
            continue
        try:
            samples.append((name, labels, float(rest.split()[0])))
        except (IndexError, ValueError):
            continue
    return samples


def histogram_quantile(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """The q-quantile of a histogram's cumulative bucket counts (upper bounds ascending, +Inf last)."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all that is known
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass
class Reading:
    """What one target's scrape says, reduced to the figures the page shows."""

    counters: dict[str, float] = field(default_factory=dict)  # cumulative: deltas are taken of these
    gauges: dict[str, float] = field(default_factory=dict)
    lag_bounds: list[float] = field(default_factory=list)
    lag_buckets: list[float] = field(default_factory=list)
    partitions: list[dict[str, object]] = field(default_factory=list)


def read_samples(samples: list[Sample]) -> Reading:
    reading = Reading()
    counters, gauges = reading.counters, reading.gauges
    lag: list[tuple[float, float]] = []

    def add(key: str, value: float) -> None:
        counters[key] = counters.get(key, 0.0) + value

    for name, labels, value in samples:
        if name == "todo_http_requests_total":
            if labels.get("route") not in NOT_API_ROUTES:
                add("requests", value)
                if labels.get("status", "").startswith("5"):
                    add("server_errors", value)
        elif name == "todo_projection_events_total":
            add(f"projection.{labels.get('outcome', '')}", value)
        elif name == LAG:
            lag.append((math.inf if labels.get("le") == "+Inf" else float(labels.get("le", "nan")), value))
        elif name == "todo_cache_reads_total":
            add(f"cache.{labels.get('kind', '')}.{labels.get('result', '')}", value)
        elif name == "todo_min_version_wait_seconds_count":
            add(f"min_version.{labels.get('outcome', '')}", value)
        elif name == "todo_kafkasource_consumer_lag":
            gauges[CONSUMER_LAG_TOTAL] = gauges.get(CONSUMER_LAG_TOTAL, 0.0) + value
            partition = labels.get("partition", "")
            reading.partitions.append(
                {
                    "topic": labels.get("topic", ""),
                    "partition": int(partition) if partition.isdigit() else partition,
                    "lag": int(value),
                }
            )
        elif name == "todo_kafkasource_deliveries_total":
            add(f"deliveries.{labels.get('outcome', '')}", value)
        elif name == RECONCILE_DRIFT:
            add(f"reconcile.drift.{labels.get('kind', '')}", value)
        elif name in (PENDING, OLDEST, RECONCILE_LAST_PASS):
            gauges[name] = value
        else:
            add(name, value)
    lag.sort()
    reading.lag_bounds = [bound for bound, _ in lag]
    reading.lag_buckets = [count for _, count in lag]
    reading.partitions.sort(key=lambda p: (str(p["topic"]), str(p["partition"]).zfill(6)))
    return reading


def _delta(current: float, previous: float | None) -> float:
    if previous is None or current < previous:  # new, or its process restarted: it counted from zero
        return current
    return current - previous


@dataclass
class Bin:
    start: int  # Unix seconds, a multiple of SERIES_BIN_S
    counters: dict[str, float] = field(default_factory=dict)
    lag_buckets: list[float] = field(default_factory=list)


@dataclass
class Round:
    """One scrape round: the readings of the targets that answered, and why the others did not."""

    at_wall: float
    at_mono: float
    took_s: float
    readings: dict[str, Reading]
    errors: list[dict[str, str]]


class PipelineState:
    """The previous readings and the recent bins; lives as long as the pipeline server's process."""

    def __init__(self) -> None:
        self.previous: dict[str, Reading] = {}
        self.previous_at: float | None = None  # monotonic time of the last round
        self.window_since: float | None = None  # wall time since when deltas are in the bins
        self.bins: collections.deque[Bin] = collections.deque()
        self.lag_bounds: list[float] = []
        self.last_document: bytes | None = None
        self.in_flight: asyncio.Task[bytes] | None = None
        # per target, per counter: its increase per second since the previous round
        self.rates: dict[str, dict[str, float]] = {}

    def record(self, round_: Round) -> float | None:
        """Add the round's deltas into the bins; returns the seconds since the previous round."""
        interval = None if self.previous_at is None else round_.at_mono - self.previous_at
        attribute = interval is not None and interval <= MAX_GAP_S
        if not attribute:
            self.bins.clear()
            self.window_since = round_.at_wall
        start = int(round_.at_wall // SERIES_BIN_S * SERIES_BIN_S)
        if not self.bins or self.bins[-1].start != start:
            self.bins.append(Bin(start))
        current_bin = self.bins[-1]
        self.rates = {}
        for name, reading in round_.readings.items():
            before = self.previous.get(name)
            deltas = {
                key: _delta(value, before.counters.get(key) if before else None)
                for key, value in reading.counters.items()
            }
            self.rates[name] = {k: v / interval for k, v in deltas.items()} if interval else {}
            if attribute:
                for key, value in deltas.items():
                    current_bin.counters[key] = current_bin.counters.get(key, 0.0) + value
                if name == LAG_SOURCE and reading.lag_buckets:
                    self._add_lag(current_bin, reading, before)
            self.previous[name] = reading
        while self.bins and self.bins[0].start + SERIES_BIN_S <= round_.at_wall - SERIES_S:
            self.bins.popleft()
        self.previous_at = round_.at_mono
        return interval

    def _add_lag(self, current_bin: Bin, reading: Reading, before: Reading | None) -> None:
        if reading.lag_bounds != self.lag_bounds:  # the buckets changed (a redeploy): start over
            self.lag_bounds = reading.lag_bounds
            for old in self.bins:
                old.lag_buckets = []
        old_counts = before.lag_buckets if before and before.lag_bounds == reading.lag_bounds else None
        if old_counts is None or any(
            now < then for now, then in zip(reading.lag_buckets, old_counts, strict=True)
        ):
            old_counts = [0.0] * len(reading.lag_buckets)
        deltas = [now - then for now, then in zip(reading.lag_buckets, old_counts, strict=True)]
        if not current_bin.lag_buckets:
            current_bin.lag_buckets = deltas
        else:
            current_bin.lag_buckets = [a + b for a, b in zip(current_bin.lag_buckets, deltas, strict=True)]

    def window(self, now_wall: float) -> tuple[dict[str, float], list[float], float]:
        """Counter deltas and lag bucket deltas over the last WINDOW_S, and the span they cover."""
        counters: dict[str, float] = {}
        lag = [0.0] * len(self.lag_bounds)
        for bin_ in self.bins:
            if bin_.start + SERIES_BIN_S <= now_wall - WINDOW_S:
                continue
            for key, value in bin_.counters.items():
                counters[key] = counters.get(key, 0.0) + value
            if len(bin_.lag_buckets) == len(lag):
                lag = [a + b for a, b in zip(lag, bin_.lag_buckets, strict=True)]
        since = self.window_since if self.window_since is not None else now_wall
        return counters, lag, min(WINDOW_S, max(0.0, now_wall - since))


_state = PipelineState()


@loop_local
def _pools() -> dict[str, http1.Pool]:
    """Keep-alive connections to each target, per event loop (a pool's connections belong to one)."""
    return {}


def _pool(name: str) -> http1.Pool:
    pools = _pools()
    pool = pools.get(name)
    if pool is None:
        pool = pools[name] = http1.Pool(HOST, TARGETS[name], connect_timeout_s=SCRAPE_TIMEOUT_S)
    return pool


async def _scrape(name: str) -> Reading:
    pool = _pool(name)
    raw = http1.encode_request("GET", "/metrics", [(b"Accept", b"text/plain")], None, pool.host_header)
    # One bound for all of it: connecting, the answer, and the one retry on a stale keep-alive connection.
    answer = await asyncio.wait_for(
        pool.request(raw, timeout_s=SCRAPE_TIMEOUT_S, retry=True), SCRAPE_TIMEOUT_S
    )
    if answer.status != 200:
        raise http1.UpstreamError(f"GET /metrics answered {answer.status}")
    return read_samples(parse_exposition(answer.body.decode("utf-8", "replace")))


async def scrape_round() -> Round:
    """Every target at once; each failure becomes an entry of `errors`."""
    at_wall, at_mono = time.time(), time.monotonic()
    names = list(TARGETS)
    results = await asyncio.gather(*(_scrape(name) for name in names), return_exceptions=True)
    readings: dict[str, Reading] = {}
    errors: list[dict[str, str]] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, Reading):
            readings[name] = result
        elif isinstance(result, TimeoutError):
            errors.append(
                {
                    "component": name,
                    "message": f"{name} did not answer within {SCRAPE_TIMEOUT_S:g} s",
                    "detail": "timeout",
                }
            )
        elif isinstance(result, http1.UpstreamError):
            errors.append({"component": name, "message": f"{name} unreachable", "detail": str(result)[:200]})
        elif isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # a cancellation goes on up
            errors.append({"component": name, "message": f"{name} unreadable", "detail": repr(result)[:200]})
    return Round(at_wall, at_mono, time.monotonic() - at_mono, readings, errors)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _ratio(hits: float, total: float) -> float | None:
    return round(hits / total, 4) if total > 0 else None


@dataclass
class View:
    """One round seen through the state it was recorded in: what each section is built from."""

    readings: dict[str, Reading]
    rates: dict[str, dict[str, float]]
    interval: float | None
    window: dict[str, float]  # counter deltas over the last WINDOW_S
    window_lag: list[float]  # lag bucket deltas over the last WINDOW_S

    def total(self, component: str, key: str) -> int | None:
        reading = self.readings.get(component)
        return None if reading is None else int(reading.counters.get(key, 0.0))

    def recent(self, component: str, key: str) -> int | None:
        return int(self.window.get(key, 0.0)) if component in self.readings else None

    def rate(self, component: str, key: str) -> float | None:
        if component not in self.readings or self.interval is None:
            return None
        return round(self.rates.get(component, {}).get(key, 0.0), 3)


def _outbox(view: View) -> dict[str, object]:
    readings = [view.readings[n] for n in OUTBOX_GAUGE_SOURCES if n in view.readings]
    pending = [r.gauges[PENDING] for r in readings if PENDING in r.gauges]
    oldest = [r.gauges[OLDEST] for r in readings if OLDEST in r.gauges]
    published = [view.rates.get(n, {}).get("todo_outbox_published_total", 0.0) for n in OUTBOX_GAUGE_SOURCES]
    failures = [r.counters.get("todo_outbox_publish_failures_total", 0.0) for r in readings]
    return {
        "pending_rows": _int(max(pending)) if pending else None,
        "oldest_pending_age_seconds": round(max(oldest), 3) if oldest else None,
        "published_per_second": round(sum(published), 3) if readings and view.interval else None,
        "publish_failures_total": _int(sum(failures)) if readings else None,
    }


def _consumer(view: View) -> dict[str, object]:
    source = view.readings.get(KAFKASOURCE)
    return {
        "partitions": source.partitions if source else None,
        "lag_total": _int(source.gauges.get(CONSUMER_LAG_TOTAL, 0.0)) if source else None,
        "retries_total": view.total(KAFKASOURCE, "todo_kafkasource_retries_total"),
        "retries_60s": view.recent(KAFKASOURCE, "todo_kafkasource_retries_total"),
        "deliveries": {
            outcome: view.total(KAFKASOURCE, f"deliveries.{outcome}")
            for outcome in ("delivered", "dead_lettered", "dropped")
        },
    }


def _projection(view: View, bounds: list[float], bins: Iterable[Bin]) -> dict[str, object]:
    series = []
    for bin_ in bins:
        if len(bin_.lag_buckets) == len(bounds) and bin_.lag_buckets and bin_.lag_buckets[-1] > 0:
            series.append(
                {
                    "t": bin_.start,
                    "count": int(bin_.lag_buckets[-1]),
                    "p50_ms": _ms(histogram_quantile(0.5, bounds, bin_.lag_buckets)),
                    "p99_ms": _ms(histogram_quantile(0.99, bounds, bin_.lag_buckets)),
                }
            )
    lag = view.window_lag
    return {
        "events": {o: view.total(LAG_SOURCE, f"projection.{o}") for o in OUTCOMES},
        "events_60s": {o: view.recent(LAG_SOURCE, f"projection.{o}") for o in OUTCOMES},
        "applied_per_second": view.rate(LAG_SOURCE, "projection.applied"),
        "lag_ms_60s": {
            "count": int(lag[-1]) if lag else 0,
            "p50": _ms(histogram_quantile(0.5, bounds, lag)),
            "p90": _ms(histogram_quantile(0.9, bounds, lag)),
            "p99": _ms(histogram_quantile(0.99, bounds, lag)),
        },
        "lag_series": series,
        "series_bin_seconds": SERIES_BIN_S,
        "series_seconds": SERIES_S,
    }


def _cache(view: View) -> dict[str, object]:
    sections: dict[str, object] = {}
    known = "get_todos" in view.readings
    for kind in ("item", "list"):
        counts = {r: view.total("get_todos", f"cache.{kind}.{r}") or 0 for r in CACHE_RESULTS}
        recent = {r: view.window.get(f"cache.{kind}.{r}", 0.0) for r in CACHE_RESULTS}
        sections[kind] = {
            **({r: counts[r] if known else None for r in CACHE_RESULTS}),
            "hit_ratio": _ratio(counts["hit"], sum(counts.values())) if known else None,
            "hit_ratio_60s": _ratio(recent["hit"], sum(recent.values())) if known else None,
        }
    return sections


def _reconcile(view: View, now_wall: float) -> dict[str, object]:
    reading = view.readings.get("reconcile")
    last = reading.gauges.get(RECONCILE_LAST_PASS, 0.0) if reading else 0.0
    return {
        "passes_total": view.total("reconcile", RECONCILE_PASSES),
        "last_pass_at": _rfc3339(last) if last > 0 else None,
        "last_pass_age_seconds": round(max(0.0, now_wall - last), 1) if last > 0 else None,
        "drift": {kind: view.total("reconcile", f"reconcile.drift.{kind}") for kind in DRIFT_KINDS},
        "drift_60s": {kind: view.recent("reconcile", f"reconcile.drift.{kind}") for kind in DRIFT_KINDS},
        "repaired_total": view.total("reconcile", RECONCILE_REPAIRED),
        "repaired_60s": view.recent("reconcile", RECONCILE_REPAIRED),
    }


def _rfc3339(unix_seconds: float) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def build_document(round_: Round, state: PipelineState, interval: float | None) -> dict[str, object]:
    """The JSON document of the module docstring, from one round and the state it was recorded in."""
    window, window_lag, window_s = state.window(round_.at_wall)
    view = View(round_.readings, state.rates, interval, window, window_lag)
    return {
        "scraped_at": _rfc3339(round_.at_wall),
        "scrape_ms": round(round_.took_s * 1000, 1),
        "interval_seconds": None if interval is None else round(interval, 3),
        "window_seconds": round(window_s, 1),
        "components": {name: ("up" if name in round_.readings else "down") for name in TARGETS},
        "errors": round_.errors,
        "outbox": _outbox(view),
        "consumer": _consumer(view),
        "projection": _projection(view, state.lag_bounds, state.bins),
        "cache": _cache(view),
        "min_version": {
            f"{o}_60s": view.recent("get_todos", f"min_version.{o}") for o in ("ready", "timeout")
        },
        "dead_letters": {
            "stored_total": view.total("dead_letter", "todo_dead_letters_stored_total"),
            "stored_60s": view.recent("dead_letter", "todo_dead_letters_stored_total"),
        },
        "reconcile": _reconcile(view, round_.at_wall),
        "requests": {
            f.name: {
                "per_second": view.rate(f.name, "requests"),
                "server_errors_per_second": view.rate(f.name, "server_errors"),
            }
            for f in FUNCTIONS
        },
    }


async def _fresh_document() -> bytes:
    round_ = await scrape_round()
    interval = _state.record(round_)
    document = orjson.dumps(build_document(round_, _state, interval))
    _state.last_document = document
    return document


async def pipeline_document() -> bytes:
    """The document of a new round; or of the round in flight, or of one younger than REUSE_S."""
    state = _state
    recent = state.previous_at is not None and time.monotonic() - state.previous_at < REUSE_S
    if recent and state.last_document is not None:
        return state.last_document
    task = state.in_flight
    if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
        task = state.in_flight = asyncio.get_running_loop().create_task(_fresh_document())
    return await asyncio.shield(task)  # a client that goes away does not cancel the others' round


def _not_found(path: str) -> bytes:
    return orjson.dumps(error_body("not_found", f"no such endpoint {path}"))


async def answer(path: str) -> tuple[int, bytes]:
    """status and JSON body for a GET under /ui/api/."""
    if path == PIPELINE_PATH:
        return 200, await pipeline_document()
    return 404, _not_found(path)
