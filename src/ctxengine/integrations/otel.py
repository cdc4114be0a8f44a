"""OpenTelemetry for ctxengine (extra ``otel``): a span around every call that reaches
the database, and metrics, after the database semantic conventions.

    from ctxengine.integrations.otel import instrument
    detach = instrument(engine)          # global providers, or pass your own

Spans (kind CLIENT) are named after the call (``create_session``) and carry
``db.system.name`` (``sqlite`` or ``postgresql``), ``db.operation.name`` and, when the
call raised, ``error.type`` (the exception's qualified class name) with status ERROR.
``record_session_id=True`` adds ``session.id`` (the semantic conventions' session
attribute, opt-in there too) to the span of a call that changed one session (taken
from the events it published; reads carry none).

Metrics: ``db.client.operation.duration`` (seconds, by ``db.system.name``,
``db.operation.name`` and ``error.type``; its count is the number of calls),
``ctxengine.usage`` (amounts recorded, by ``ctxengine.resource_type``) and
``ctxengine.sessions.expired``. No metric carries a session id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import metrics, trace

from .. import __version__
from ..engine import ContextEngine
from ..models import Event
from ..services.usage import usage_of

__all__ = ["SESSION_ID", "instrument"]

#: The span attribute that holds the session id (only with ``record_session_id=True``).
SESSION_ID = "session.id"

# The bucket boundaries the conventions advise for db.client.operation.duration.
_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

# Session ids named by the events of the call being observed in this context.
_sessions: ContextVar[set[str] | None] = ContextVar("ctxengine_otel_sessions", default=None)


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of ``exc``: its class's qualified name (builtins unprefixed)."""
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def instrument(
    engine: ContextEngine,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    record_session_id: bool = False,
) -> Callable[[], None]:
    """Trace and measure the open ``engine``; returns the function that detaches it.

    ``record_session_id``: put the session id on spans (off by default: ids may be
    personal data, and they make every span unique to its session)."""
    tracer = trace.get_tracer("ctxengine", __version__, tracer_provider)
    meter = metrics.get_meter("ctxengine", __version__, meter_provider)
    duration = meter.create_histogram(
        "db.client.operation.duration",
        unit="s",
        description="Duration of ctxengine calls, each one unit of work on the database",
        explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
    )
    usage = meter.create_counter("ctxengine.usage", description="resource amounts recorded")
    expired = meter.create_counter(
        "ctxengine.sessions.expired", unit="{session}", description="sessions expired"
    )
    system = engine._store.backend.name

    @contextmanager
    def observe(operation: str) -> Iterator[None]:
        attributes: dict[str, str] = {"db.system.name": system, "db.operation.name": operation}
        seen: set[str] = set()
        token = _sessions.set(seen) if record_session_id else None
        started = time.perf_counter()
        with tracer.start_as_current_span(
            operation, kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as span:
            try:
                yield
            except BaseException as exc:
                attributes["error.type"] = error_type(exc)
                span.set_attribute("error.type", attributes["error.type"])
                raise
            finally:
                duration.record(time.perf_counter() - started, attributes)
                if token is not None:
                    _sessions.reset(token)
                    if len(seen) == 1:
                        span.set_attribute(SESSION_ID, seen.pop())

    def on_event(event: Event) -> None:
        seen = _sessions.get()
        if seen is not None and event.session_id:
            seen.add(event.session_id)
        if event.type == "session.expired":
            expired.add(1)
        record = usage_of(event) if event.type == "usage.recorded" else None
        if record is not None:
            usage.add(record.amount, {"ctxengine.resource_type": record.resource_type.value})

    types = () if record_session_id else ("usage.recorded", "session.expired")
    unsubscribe = engine.subscribe(on_event, *types)
    detach_observer = engine._observe(observe)

    def detach() -> None:
        detach_observer()
        unsubscribe()

    return detach
