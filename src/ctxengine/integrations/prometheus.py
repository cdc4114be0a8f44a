"""Prometheus metrics for ctxengine (extra ``prometheus``).

    from prometheus_client import start_http_server
    from ctxengine.integrations.prometheus import PrometheusCollector

    collector = PrometheusCollector(engine)      # registers in the default registry
    collector.start(interval=15)                 # refresh the gauges in the background
    start_http_server(9100)

Counters are fed by the engine's calls and events as they happen; the gauges come from
``get_statistics()`` (SQL aggregates) at each :meth:`PrometheusCollector.refresh`. Label
values are snake_case (``create_session``, ``session_not_found_error``,
``message_added``); no label holds a session id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ..engine import ContextEngine
from ..errors import ContextEngineError
from ..models import Event
from ..services.usage import usage_of

__all__ = ["PrometheusCollector", "snake_case"]

M = TypeVar("M", Counter, Gauge, Histogram)

log = logging.getLogger("ctxengine.prometheus")

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=1024)
def snake_case(value: str) -> str:
    """``value`` as a snake_case label value: ``SessionNotFoundError`` ->
    ``session_not_found_error``, ``message.added`` -> ``message_added``,
    ``renew lease`` -> ``renew_lease``."""
    return _SEPARATORS.sub("_", _CAMEL.sub("_", value).lower()).strip("_")


class PrometheusCollector:
    """Metrics of one open engine in a Prometheus registry (names start ``ctxengine_``).

    Counters: ``calls_total`` / ``errors_total`` by operation (errors also by type),
    ``usage_total`` by resource type, ``sessions_expired_total``, ``events_total`` by
    type; histogram ``call_duration_seconds``. Gauges from ``get_statistics()``:
    ``sessions`` by status, ``users``, ``requests``, ``request_errors``, ``messages``,
    ``usage_by_resource``.
    """

    def __init__(self, engine: ContextEngine, registry: CollectorRegistry = REGISTRY) -> None:
        self.engine = engine

        def make(kind: type[M], name: str, doc: str, *labels: str) -> M:
            return kind(name, doc, labels, namespace="ctxengine", registry=registry)

        self.calls = make(Counter, "calls", "Calls that reached the database", "operation")
        self.errors = make(Counter, "errors", "Calls that raised", "operation", "error_type")
        self.duration = make(
            Histogram, "call_duration_seconds", "Time in a call's transaction", "operation"
        )
        self.usage = make(Counter, "usage", "Resource amounts recorded", "resource_type")
        self.expired = make(Counter, "sessions_expired", "Sessions expired")
        self.events = make(Counter, "events", "Events published", "type")
        self.sessions = make(Gauge, "sessions", "Sessions by status", "status")
        self.users = make(Gauge, "users", "Users with sessions")
        self.requests = make(Gauge, "requests", "Requests recorded on sessions")
        self.request_errors = make(Gauge, "request_errors", "Errors recorded on sessions")
        self.messages = make(Gauge, "messages", "Messages stored")
        self.usage_by_resource = make(
            Gauge, "usage_by_resource", "Use so far per resource type", "resource_type"
        )
        self._unsubscribe = engine.subscribe(self._on_event)
        self._detach = engine._observe(self._observe)
        self._task: asyncio.Task[None] | None = None

    @contextmanager
    def _observe(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            self.errors.labels(snake_case(operation), snake_case(type(exc).__name__)).inc()
            raise
        finally:
            operation = snake_case(operation)
            self.calls.labels(operation).inc()
            self.duration.labels(operation).observe(time.perf_counter() - started)

    def _on_event(self, event: Event) -> None:
        self.events.labels(snake_case(event.type)).inc()
        if event.type == "session.expired":
            self.expired.inc()
        record = usage_of(event) if event.type == "usage.recorded" else None
        if record is not None:
            self.usage.labels(snake_case(record.resource_type.value)).inc(record.amount)

    async def refresh(self) -> None:
        """Read ``get_statistics()`` into the gauges."""
        stats = await self.engine.get_statistics()
        for status, count in stats.sessions_by_status.items():
            self.sessions.labels(snake_case(status)).set(count)
        self.users.set(stats.total_users)
        self.requests.set(stats.total_requests)
        self.request_errors.set(stats.total_errors)
        self.messages.set(stats.total_messages)
        for kind, amount in stats.usage_by_resource.items():
            self.usage_by_resource.labels(snake_case(kind)).set(amount)

    def start(self, interval: float = 15.0) -> None:
        """Refresh the gauges every ``interval`` seconds until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(interval), name="ctxengine-prometheus")

    async def _loop(self, interval: float) -> None:
        while True:
            try:
                await self.refresh()
            except ContextEngineError:
                log.warning(
                    "could not refresh ctxengine gauges",
                    exc_info=True,
                    extra={"retry_in": interval},
                )
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """Stop refreshing and stop counting this engine's calls and events."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._unsubscribe()
        self._detach()
