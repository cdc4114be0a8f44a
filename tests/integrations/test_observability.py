"""OpenTelemetry and Prometheus instrumentation, read back through the real libraries'
in-memory exporters and registries."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest

from ctxengine import ContextEngine, QuotaType
from ctxengine.errors import SessionNotFoundError
from ctxengine.integrations.otel import instrument
from ctxengine.integrations.prometheus import PrometheusCollector


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, object], float]]]:
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[tuple[dict[str, object], float]]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:  # type: ignore[attr-defined]
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count
                    points.setdefault(metric.name, []).append((dict(point.attributes), value))
    return points


async def test_opentelemetry_spans_and_metrics(engine: ContextEngine) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    detach = instrument(engine, tracer_provider=tracer_provider, meter_provider=meter_provider)

    await engine.create_session("s", "u")
    await engine.track_usage("s", "llm", QuotaType.TOKENS, 30)
    await engine.end_session("s", "expired")
    with pytest.raises(SessionNotFoundError):
        await engine.update_session("missing", increment_requests=True)

    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert {"ctxengine create_session", "ctxengine update_session"} <= set(spans)
    created = spans["ctxengine create_session"]
    assert created.attributes is not None
    assert created.attributes["db.system"] == engine._store.backend.name
    assert spans["ctxengine update_session"].status.status_code is StatusCode.ERROR

    points = metric_points(reader)
    calls = {attrs["ctxengine.operation"]: value for attrs, value in points["ctxengine.calls"]}
    assert calls["create_session"] == 1 and calls["update_session"] == 1
    (error,) = points["ctxengine.errors"]
    assert error[0]["error.type"] == "SessionNotFoundError"
    assert points["ctxengine.usage"] == [({"ctxengine.resource_type": "tokens"}, 30.0)]
    assert points["ctxengine.sessions.expired"][0][1] == 1
    assert any(count >= 1 for _, count in points["ctxengine.call.duration"])

    detach()
    exporter.clear()
    await engine.get_session("s")
    assert exporter.get_finished_spans() == ()


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
    assert 'ctxengine_events_total{type="message.added"} 1.0' in text
    assert 'ctxengine_sessions{status="active"} 1.0' in text
    assert "ctxengine_messages 2.0" in text
    assert "ctxengine_request_errors 1.0" in text
    assert 'ctxengine_usage_by_resource{resource_type="tokens"} 12.0' in text
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
