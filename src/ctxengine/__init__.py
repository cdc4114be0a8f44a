"""ctxengine: durable, exact, asyncio-native session state for AI agents."""

import logging

from .engine import ContextEngine
from .models import (
    Chat,
    Checkpoint,
    Event,
    MemoryHit,
    MemoryItem,
    MemoryRecord,
    Message,
    QuotaStatus,
    QuotaType,
    RateLimitStatus,
    RateLimitType,
    Session,
    SessionStats,
    SessionStatus,
    SessionTemplate,
    Statistics,
    UsageRecord,
    UserAnalytics,
)
from .settings import EngineSettings, TierPolicy

__all__ = [
    "Chat",
    "Checkpoint",
    "ContextEngine",
    "EngineSettings",
    "Event",
    "MemoryHit",
    "MemoryItem",
    "MemoryRecord",
    "Message",
    "QuotaStatus",
    "QuotaType",
    "RateLimitStatus",
    "RateLimitType",
    "Session",
    "SessionStats",
    "SessionStatus",
    "SessionTemplate",
    "Statistics",
    "TierPolicy",
    "UsageRecord",
    "UserAnalytics",
]

__version__ = "0.1.0"

# A library's records go where the application sends them, and nowhere else by default.
logging.getLogger("ctxengine").addHandler(logging.NullHandler())
