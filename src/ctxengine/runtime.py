"""What exists only while an engine is open, and what a tenant view reads of its engine."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Protocol

from .cleanup import CleanupLoop
from .services.base import Context
from .services.context import ContextService
from .services.conversation import ConversationService
from .services.graph_checkpoints import GraphCheckpointService
from .services.graph_store import GraphStoreService
from .services.limits import LeaseService, RateLimitService
from .services.memory import MemoryService
from .services.memory_transfer import MemoryTransferService
from .services.metadata import MetadataService
from .services.semantic_memory import SemanticMemoryService
from .services.sessions import SessionService
from .services.snapshots import SnapshotService
from .services.usage import UsageService


@dataclass(slots=True)
class Runtime:
    """Everything that exists only while the engine is open."""

    ctx: Context
    sessions: SessionService
    conversation: ConversationService
    context: ContextService
    snapshots: SnapshotService
    metadata: MetadataService
    usage: UsageService
    leases: LeaseService
    rates: RateLimitService
    memory: MemoryService
    semantic: SemanticMemoryService
    transfer: MemoryTransferService
    cleanup: CleanupLoop | None
    #: LangGraph checkpoints (integrations.langgraph)
    graph: GraphCheckpointService = field(init=False)
    graph_store: GraphStoreService = field(init=False)  # the LangGraph store
    #: The event loop (and its thread) that opened the engine: the only one it serves.
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    thread: int = field(default_factory=threading.get_ident)

    def __post_init__(self) -> None:
        self.graph = GraphCheckpointService(self.ctx, self.sessions)
        self.graph_store = GraphStoreService(self.ctx)

    @classmethod
    def open(cls, ctx: Context, cleanup: CleanupLoop | None) -> Runtime:
        """The services of an engine opened with ``ctx``, on the running event loop."""
        sessions = SessionService(ctx)
        conversation = ConversationService(ctx, sessions)
        return cls(
            ctx,
            sessions,
            conversation,
            ContextService(ctx, conversation),
            SnapshotService(ctx, sessions),
            MetadataService(ctx, sessions),
            UsageService(ctx, sessions),
            LeaseService(ctx, sessions),
            RateLimitService(ctx, sessions),
            MemoryService(ctx),
            SemanticMemoryService(ctx, sessions, conversation),
            MemoryTransferService(ctx),
            cleanup,
        )


class Host(Protocol):
    """The engine as its tenant views see it: its runtime while open, and its state."""

    @property
    def _live(self) -> Runtime | None: ...

    @property
    def _state(self) -> str: ...
