"""Prometheus metrics of every function, served on `GET /metrics` of the function's own port.

The request metrics are here; each part of the core defines the metrics of what it does beside it
(the outbox relay, the projection, the query side, the dead letters), so a function exposes only
what it updates.

One process per function (WORKERS=1), so the default registry is the process's: no multiprocess mode.
docs/observability.md lists every metric and what it is for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from todo_cqrs.settings import settings

disable_created_metrics()  # no `_created` series beside every counter: half the exposition is noise

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

http_requests = Counter(
    "todo_http_requests",
    "HTTP requests answered, by route and status",
    ["function", "route", "method", "status"],
)
http_latency = Histogram(
    "todo_http_request_duration_seconds",
    "Time from a request's arrival at the function to its answer",
    ["function", "route", "method"],
    buckets=LATENCY_BUCKETS,
)


class _Off:
    """What a metric child is when METRICS_ENABLED=0 (the bench measures what metrics cost)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


OFF = _Off()


def child(metric: Counter | Histogram, *labels: str) -> Any:
    """A labelled child made once (hot paths keep it), or a no-op when metrics are off."""
    return metric.labels(*labels) if settings().metrics_enabled else OFF


class RequestMetrics:
    """Per (route, method, status) children, made once: the hot path then costs two locked adds."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], Counter] = {}
        self._latencies: dict[tuple[str, str], Histogram] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if not settings().metrics_enabled:
            return
        key = (route, method, status)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = http_requests.labels(
                settings().function_name, route, method, str(status)
            )
        count.inc()
        latency = self._latencies.get((route, method))
        if latency is None:
            latency = self._latencies[(route, method)] = http_latency.labels(
                settings().function_name, route, method
            )
        latency.observe(seconds)


request_metrics = RequestMetrics()
_on_scrape: list[Callable[[], None]] = []


def on_scrape(hook: Callable[[], None]) -> None:
    """Run `hook` (which must not block) at every scrape, before the exposition is made."""
    if hook not in _on_scrape:
        _on_scrape.append(hook)


def exposition() -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and its content type."""
    for hook in _on_scrape:
        hook()
    return generate_latest(), CONTENT_TYPE_LATEST
