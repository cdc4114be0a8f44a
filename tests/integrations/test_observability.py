"""OpenTelemetry and Prometheus instrumentation, read back through the real libraries'
in-memory exporters and registries."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, generate_latest

from ctxengine import ContextEngine, QuotaType
from ctxengine.errors import SessionNotFoundError
from ctxengine.integrations.otel import SESSION_ID, instrument
from ctxengine.integrations.prometheus import PrometheusCollector, snake_case


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, object], float]]]:
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[tuple[dict[str, object], float]]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = getattr(point, "count")  # noqa: B009 - histograms only
                    attributes: dict[str, object] = dict(point.attributes or {})
                    points.setdefault(metric.name, []).append((attributes, value))
    return points


def otel(
    engine: ContextEngine, **options: bool
) -> tuple[InMemorySpanExporter, InMemoryMetricReader, Callable[[], None]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    detach = instrument(
        engine, tracer_provider=tracer_provider, meter_provider=meter_provider, **options
    )
    return exporter, reader, detach


async def test_opentelemetry_spans_and_metrics(engine: ContextEngine) -> None:
    exporter, reader, detach = otel(engine)
    system = engine._store.backend.name
    assert system in ("sqlite", "postgresql")  # the conventions' well-known values

    await engine.create_session("s", "u")
    await engine.track_usage("s", "llm", QuotaType.TOKENS, 30)
    await engine.end_session("s", "expired")
    with pytest.raises(SessionNotFoundError):
        await engine.update_session("missing", increment_requests=True)

    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"create_session", "track_usage", "update_session"} <= set(spans)
    created = spans["create_session"]
    assert created.kind is SpanKind.CLIENT
    assert created.attributes == {"db.system.name": system, "db.operation.name": "create_session"}
    failed = spans["update_session"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "ctxengine.errors.SessionNotFoundError"

    points = metric_points(reader)
    assert set(points) == {
        "db.client.operation.duration",
        "ctxengine.usage",
        "ctxengine.sessions.expired",
    }
    calls = {
        (attrs["db.operation.name"], attrs.get("error.type")): count
        for attrs, count in points["db.client.operation.duration"]
    }
    assert calls[("create_session", None)] == 1
    assert calls[("update_session", "ctxengine.errors.SessionNotFoundError")] == 1
    assert all(
        attrs["db.system.name"] == system for attrs, _ in points["db.client.operation.duration"]
    )
    assert points["ctxengine.usage"] == [({"ctxengine.resource_type": "tokens"}, 30.0)]
    assert points["ctxengine.sessions.expired"][0][1] == 1
    for name, values in points.items():  # no session id anywhere in the metrics
        assert all(SESSION_ID not in attrs and "s" not in attrs.values() for attrs, _ in values), (
            name
        )

    detach()
    exporter.clear()
    await engine.get_session("s")
    assert exporter.get_finished_spans() == ()


async def test_opentelemetry_session_id_is_opt_in(engine: ContextEngine) -> None:
    exporter, _, detach = otel(engine)
    await engine.create_session("s", "u")
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and SESSION_ID not in span.attributes
    detach()

    exporter, reader, detach = otel(engine, record_session_id=True)
    await engine.add_message("s", "user", "hi")
    await engine.get_session("s")
    await engine.create_session("t", "u")
    spans = {span.name: span for span in exporter.get_finished_spans()}
    # the semantic conventions' session attribute (requirement level Opt-In)
    assert SESSION_ID == "session.id"
    assert spans["add_message"].attributes is not None
    assert spans["add_message"].attributes["session.id"] == "s"
    assert spans["create_session"].attributes is not None
    assert spans["create_session"].attributes["session.id"] == "t"
    assert spans["get_session"].attributes is not None
    assert SESSION_ID not in spans["get_session"].attributes  # a read publishes no event
    for values in metric_points(reader).values():
        assert all(SESSION_ID not in attrs for attrs, _ in values)
    detach()


async def test_prometheus_collector(engine: ContextEngine) -> None:
    registry = CollectorRegistry()
    collector = PrometheusCollector(engine, registry)
    await engine.create_session("s", "u", system_prompt="rules")
    await engine.add_message("s", "user", "hi")
    await engine.track_usage("s", "llm", QuotaType.TOKENS, 12)
    await engine.update_session("s", increment_requests=True, mark_error=True)
    await collector.refresh()
    text = generate_latest(registry).decode()
    assert 'ctxengine_calls_total{operation="create_session"} 1.0' in text
    assert 'ctxengine_usage_total{resource_type="tokens"} 12.0' in text
    assert 'ctxengine_events_total{type="message_added"} 1.0' in text
    assert 'ctxengine_sessions{status="active"} 1.0' in text
    assert "ctxengine_messages 2.0" in text
    assert "ctxengine_request_errors 1.0" in text
    assert 'ctxengine_usage_by_resource{resource_type="tokens"} 12.0' in text
    with pytest.raises(SessionNotFoundError):
        await engine.update_session("missing", increment_requests=True)
    text = generate_latest(registry).decode()
    labels = 'error_type="session_not_found_error",operation="update_session"'
    assert f"ctxengine_errors_total{{{labels}}} 1.0" in text
    label_values = [v for k, v in re.findall(r'(\w+)="([^"]*)"', text) if k != "le"]
    assert label_values and all(value == snake_case(value) for value in label_values)
    collector.start(interval=0.05)
    await collector.stop()
    await engine.create_session("t", "u")
    assert (
        'ctxengine_calls_total{operation="create_session"} 1.0'
        in generate_latest(registry).decode()
    )


async def test_logs_carry_structured_fields(
    engine: ContextEngine, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("handler bug")

    engine.subscribe(broken, "session.created")
    with caplog.at_level(logging.ERROR, logger="ctxengine"):
        await engine.create_session("s", "u")
    (record,) = [r for r in caplog.records if r.name == "ctxengine.events"]
    assert record.event_type == "session.created"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SessionNotFoundError", "session_not_found_error"),
        ("HTTPError", "http_error"),
        ("message.added", "message_added"),
        ("rate_limit.exceeded", "rate_limit_exceeded"),
        ("renew lease", "renew_lease"),
        ("create_session", "create_session"),
    ],
)
def test_prometheus_label_values_are_snake_case(value: str, expected: str) -> None:
    assert snake_case(value) == expected
