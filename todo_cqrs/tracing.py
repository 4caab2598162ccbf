"""W3C trace context across every hop, and OpenTelemetry spans when an OTLP endpoint is configured.

A request's `traceparent`/`tracestate` (or, for an event, its CloudEvents distributed-tracing
extension) is its parent; without one a new trace starts. A command stores its context in the outbox
row, the event carries it as `ce_traceparent`/`ce_tracestate`, and project_event continues it.

Two modes, chosen once per process:
- `OTEL_EXPORTER_OTLP_ENDPOINT` set: the OpenTelemetry SDK records spans (server spans here, client
  spans from the SQLAlchemy and redis instrumentations) and exports them over OTLP/HTTP in batches.
- unset (the default): no SDK at all. Ids are still made and passed on, and every log line still
  names its trace and span, at the cost of a random number per request.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any

from todo_cqrs.settings import settings

_HEX = frozenset("0123456789abcdef")
_MAX_TRACESTATE = 512


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's identity, as W3C trace context carries it."""

    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    sampled: bool = True
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


_current: ContextVar[TraceContext | None] = ContextVar("trace_context", default=None)


def enabled() -> bool:
    return _sdk() is not None


def current() -> TraceContext | None:
    """The context of the span in progress (this request's), if any."""
    return _current.get()


def parse_traceparent(value: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The parent a `traceparent` header names; None when it is absent or malformed (a new trace starts)."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")  # lowercase hex only, as W3C trace context says
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or not set(parts[0]) <= _HEX:
        return None
    version, trace_id, span_id, flags = parts[:4]
    if version == "00" and len(parts) != 4:
        return None
    if len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
        return None
    if not set(trace_id + span_id + flags) <= _HEX or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    state = tracestate.strip()[:_MAX_TRACESTATE] if tracestate else None
    return TraceContext(trace_id, span_id, bool(int(flags, 16) & 1), state or None)


def _new_id(bits: int) -> str:
    return f"{random.getrandbits(bits) or 1:0{bits // 4}x}"


class Span:
    """A span of this process: server (a request, an event) or internal. Use through `start_span`."""

    __slots__ = ("context", "_sdk_span", "_token", "_otel_token")

    def __init__(self, context: TraceContext, sdk_span: Any = None) -> None:
        self.context = context
        self._sdk_span = sdk_span
        self._token: Any = None
        self._otel_token: Any = None

    def set(self, **attributes: Any) -> None:
        if self._sdk_span is not None:
            self._sdk_span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def fail(self, error: BaseException | str) -> None:
        if self._sdk_span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._sdk_span.set_status(Status(StatusCode.ERROR, str(error)[:200]))

    def __enter__(self) -> Span:
        self._token = _current.set(self.context)
        if self._sdk_span is not None:
            from opentelemetry import context as otel_context
            from opentelemetry import trace as otel_trace

            self._otel_token = otel_context.attach(otel_trace.set_span_in_context(self._sdk_span))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sdk_span is not None:
            from opentelemetry import context as otel_context

            self._sdk_span.end()
            otel_context.detach(self._otel_token)
        _current.reset(self._token)


def start_span(
    name: str,
    parent: TraceContext | None = None,
    *,
    kind: str = "server",
    links: Sequence[TraceContext] = (),
    attributes: dict[str, Any] | None = None,
) -> Span:
    """A span under `parent` (a remote parent), or under the current span, or at the root of a new trace."""
    parent = parent or _current.get()
    sdk = _sdk()
    if sdk is None:
        if parent is None:
            return Span(TraceContext(_new_id(128), _new_id(64)))
        return Span(TraceContext(parent.trace_id, _new_id(64), parent.sampled, parent.tracestate))
    return _sdk_span(sdk, name, parent, kind, links, attributes or {})


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Span]:
    """An internal child span of the current one (recorded only when the SDK is on)."""
    with start_span(name, kind="internal", attributes=attributes) as child:
        yield child


# --- the OpenTelemetry SDK, loaded only when an endpoint is configured ---------------------------------


@cache
def _sdk() -> Any:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        return None
    from opentelemetry import trace as otel_trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME") or settings().function_name
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    otel_trace.set_tracer_provider(provider)
    try:  # only the functions that use Redis have redis and its instrumentation
        from opentelemetry.instrumentation.redis import RedisInstrumentor
    except ImportError:
        pass
    else:
        RedisInstrumentor().instrument()
    return otel_trace.get_tracer("todo_cqrs")


@cache
def instrument_sqlalchemy() -> None:
    """When the SDK is on: client spans for every statement of the engines made from now on (the
    instrumentation wraps SQLAlchemy's engine constructors). Its declared range stops below
    SQLAlchemy 2.1; the event API it uses is the same in 2.1, so its version check is skipped."""
    if _sdk() is not None:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        SQLAlchemyInstrumentor().instrument(skip_dep_check=True)


def _span_context(context: TraceContext) -> Any:
    from opentelemetry.trace import SpanContext, TraceFlags, TraceState

    state = TraceState.from_header([context.tracestate]) if context.tracestate else None
    return SpanContext(
        int(context.trace_id, 16),
        int(context.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(1 if context.sampled else 0),
        trace_state=state,
    )


def _sdk_span(
    tracer: Any,
    name: str,
    parent: TraceContext | None,
    kind: str,
    links: Sequence[TraceContext],
    attributes: dict[str, Any],
) -> Span:
    from opentelemetry import trace as otel_trace

    parent_context = None
    if parent is not None:
        parent_context = otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(_span_context(parent)))
    kinds = {
        "server": otel_trace.SpanKind.SERVER,
        "consumer": otel_trace.SpanKind.CONSUMER,
        "producer": otel_trace.SpanKind.PRODUCER,
        "internal": otel_trace.SpanKind.INTERNAL,
    }
    sdk_span = tracer.start_span(
        name,
        context=parent_context,
        kind=kinds[kind],
        links=[otel_trace.Link(_span_context(link)) for link in links[:128]],
        attributes=attributes,
    )
    ctx = sdk_span.get_span_context()
    state = ctx.trace_state.to_header() if ctx.trace_state else None
    own = TraceContext(
        f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", bool(ctx.trace_flags & 1), state or None
    )
    return Span(own, sdk_span)


def shutdown() -> None:
    """Export what is buffered (at exit)."""
    if _sdk() is not None:
        from opentelemetry import trace as otel_trace

        provider = otel_trace.get_tracer_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()
