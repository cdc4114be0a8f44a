"""OpenTelemetry for ctxengine (extra ``otel``): a span around every call that reaches
the database, and metrics.

    from ctxengine.integrations.otel import instrument
    detach = instrument(engine)          # global providers, or pass your own

Metrics: ``ctxengine.calls`` and ``ctxengine.errors`` (by ``ctxengine.operation``, errors
also by ``error.type``), ``ctxengine.call.duration`` (seconds), ``ctxengine.usage``
(amounts recorded, by ``ctxengine.resource_type``), ``ctxengine.sessions.expired``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from opentelemetry import metrics, trace

from .. import __version__
from ..engine import ContextEngine
from ..models import Event
from ..services.usage import usage_of

__all__ = ["instrument"]

_EVENTS = ("usage.recorded", "session.expired")


def instrument(
    engine: ContextEngine,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> Callable[[], None]:
    """Trace and measure the open ``engine``; returns the function that detaches it."""
    tracer = trace.get_tracer("ctxengine", __version__, tracer_provider)
    meter = metrics.get_meter("ctxengine", __version__, meter_provider)
    calls = meter.create_counter("ctxengine.calls", unit="{call}", description="calls")
    errors = meter.create_counter(
        "ctxengine.errors", unit="{call}", description="calls that raised"
    )
    duration = meter.create_histogram(
        "ctxengine.call.duration", unit="s", description="time spent in a call's transaction"
    )
    usage = meter.create_counter("ctxengine.usage", description="resource amounts recorded")
    expired = meter.create_counter(
        "ctxengine.sessions.expired", unit="{session}", description="sessions expired"
    )
    system = engine._store.backend.name

    @contextmanager
    def observe(operation: str) -> Iterator[None]:
        attributes = {"ctxengine.operation": operation}
        span_attributes = {**attributes, "db.system": system}
        started = time.perf_counter()
        with tracer.start_as_current_span(
            f"ctxengine {operation}", kind=trace.SpanKind.CLIENT, attributes=span_attributes
        ):
            try:
                yield
            except BaseException as exc:
                errors.add(1, {**attributes, "error.type": type(exc).__name__})
                raise
            finally:
                calls.add(1, attributes)
                duration.record(time.perf_counter() - started, attributes)

    def on_event(event: Event) -> None:
        if event.type == "session.expired":
            expired.add(1)
            return
        record = usage_of(event)
        if record is not None:
            usage.add(record.amount, {"ctxengine.resource_type": record.resource_type.value})

    unsubscribe = engine.subscribe(on_event, *_EVENTS)
    detach_observer = engine._observe(observe)

    def detach() -> None:
        detach_observer()
        unsubscribe()

    return detach
