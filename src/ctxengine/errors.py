"""The errors ctxengine raises.

Every error derives from :class:`ContextEngineError`, carries its data as
attributes and says in its message what the caller can do about it.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ChatLimitError",
    "ChatNotFoundError",
    "CheckpointNotFoundError",
    "ConcurrencyLimitError",
    "ConflictError",
    "ConnectionLostError",
    "ContextEngineError",
    "DatabaseFullError",
    "DatabaseUnavailableError",
    "EngineClosedError",
    "HistoryLimitError",
    "InvalidTransitionError",
    "QuotaExceededError",
    "RateLimitError",
    "ReadOnlyDatabaseError",
    "SessionExistsError",
    "SessionExpiredError",
    "SessionLimitError",
    "SessionNotActiveError",
    "SessionNotFoundError",
    "StorageError",
    "StorageTimeoutError",
    "ValidationError",
    "WrongEventLoopError",
]


class ContextEngineError(Exception):
    """Base class of every error raised by ctxengine."""


class SessionNotFoundError(ContextEngineError):
    """No session with this id exists (in this tenant)."""

    def __init__(self, session_id: str, tenant_id: str = "default") -> None:
        self.session_id = session_id
        self.tenant_id = tenant_id
        super().__init__(
            f"session {session_id!r} does not exist in tenant {tenant_id!r}; "
            "create it with create_session() or get_or_create_session()"
        )


class SessionExistsError(ContextEngineError):
    """A session with this id already exists (in this tenant)."""

    def __init__(self, session_id: str, tenant_id: str = "default") -> None:
        self.session_id = session_id
        self.tenant_id = tenant_id
        super().__init__(
            f"session {session_id!r} already exists in tenant {tenant_id!r}; "
            "use get_or_create_session() to reuse it"
        )


class InvalidTransitionError(ContextEngineError):
    """The lifecycle does not allow moving the session to the requested status."""

    def __init__(self, current: str, requested: str, session_id: str | None = None) -> None:
        self.current = str(current)
        self.requested = str(requested)
        self.session_id = session_id
        subject = f"session {session_id!r}" if session_id else "session"
        super().__init__(
            f"cannot move {subject} from {self.current!r} to {self.requested!r}; "
            "completed, failed and expired are final"
        )


class SessionNotActiveError(ContextEngineError):
    """Work was attempted on a session that is not active."""

    def __init__(self, session_id: str, status: str) -> None:
        self.session_id = session_id
        self.status = str(status)
        super().__init__(self._message())

    def _message(self) -> str:
        hint = (
            "resume it with resume_session() first"
            if self.status == "paused"
            else "start a new session"
        )
        return f"session {self.session_id!r} is {self.status}, not active; {hint}"


class SessionExpiredError(SessionNotActiveError):
    """The session expired (idle longer than the timeout or past its deadline)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id, "expired")

    def _message(self) -> str:
        return (
            f"session {self.session_id!r} has expired (idle longer than the session "
            "timeout or past its expires_at); start a new session"
        )


class SessionLimitError(ContextEngineError):
    """Creating the session would exceed a session limit."""

    def __init__(self, limit_name: str, limit: int, current: int, user_id: str | None = None):
        self.limit_name = limit_name
        self.limit = limit
        self.current = current
        self.user_id = user_id
        who = f" for user {user_id!r}" if user_id is not None else ""
        super().__init__(
            f"{limit_name}={limit} reached{who} ({current} active or paused sessions); "
            "end or expire sessions, or raise the limit in EngineSettings"
        )


class ChatNotFoundError(ContextEngineError, LookupError):
    """The session has no chat with this id (or no current chat)."""

    def __init__(self, session_id: str, chat_id: str | None) -> None:
        self.session_id = session_id
        self.chat_id = chat_id
        if chat_id is None:
            message = (
                f"session {session_id!r} has no current chat; "
                "create one with create_chat() or choose one with switch_chat()"
            )
        else:
            message = (
                f"session {session_id!r} has no chat {chat_id!r}; "
                "list_chats() shows the chats it has"
            )
        super().__init__(message)


class CheckpointNotFoundError(ContextEngineError, LookupError):
    """The session has no checkpoint with this id."""

    def __init__(self, session_id: str, checkpoint_id: str) -> None:
        self.session_id = session_id
        self.checkpoint_id = checkpoint_id
        super().__init__(
            f"session {session_id!r} has no checkpoint {checkpoint_id!r}; "
            "list_checkpoints() shows the ones it has"
        )


class ChatLimitError(ContextEngineError):
    """Creating the chat would exceed ``max_chats_per_session``."""

    def __init__(self, session_id: str, limit: int) -> None:
        self.session_id = session_id
        self.limit = limit
        super().__init__(
            f"session {session_id!r} already has {limit} chats (max_chats_per_session); "
            "delete a chat or raise the limit"
        )


class HistoryLimitError(ContextEngineError):
    """The chat is full and ``history_overflow`` is "reject"."""

    def __init__(self, session_id: str, chat_id: str, limit: int) -> None:
        self.session_id = session_id
        self.chat_id = chat_id
        self.limit = limit
        super().__init__(
            f"chat {chat_id!r} of session {session_id!r} holds {limit} messages "
            "(max_messages_per_chat); trim the history or use history_overflow='trim'"
        )


class ConflictError(ContextEngineError):
    """A compare-and-set lost: ``key`` did not hold the ``expected`` value (it held
    ``actual``); nothing was written."""

    def __init__(self, key: str, expected: object, actual: object) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{key} is {actual!r}, not the expected {expected!r}; nothing was written: "
            "read it again and decide whether to retry"
        )


class QuotaExceededError(ContextEngineError):
    """Recording the amount would take the quota past its limit."""

    def __init__(self, resource_type: str, used: float, limit: float, requested: float) -> None:
        self.resource_type = str(resource_type)
        self.used = used
        self.limit = limit
        self.requested = requested
        super().__init__(
            f"quota {self.resource_type!r} exceeded: {used} used of {limit}, "
            f"{requested} requested; raise the quota with set_quota() or change_tier()"
        )


class RateLimitError(ContextEngineError):
    """The call would exceed a rate limit; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float, limit: int, window: float, operation: str) -> None:
        self.retry_after = retry_after
        self.limit = limit
        self.window = window
        self.operation = operation
        super().__init__(
            f"rate limit for {operation!r} reached ({limit} per {window:g}s); "
            f"retry after {retry_after:.3f}s"
        )


class ConcurrencyLimitError(RateLimitError):
    """The session holds as many live concurrency leases as its cap allows."""

    def __init__(self, session_id: str, limit: int, operation: str, retry_after: float = 0.0):
        self.session_id = session_id
        ContextEngineError.__init__(
            self,
            f"session {session_id!r} already runs {limit} concurrent operations; "
            "wait for one to finish or raise the CONCURRENT_REQUESTS quota",
        )
        self.retry_after = retry_after
        self.limit = limit
        self.window = 0.0
        self.operation = operation


class ValidationError(ContextEngineError, ValueError):
    """An argument is not acceptable; nothing was written."""

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        self.field = field
        self.value = value
        super().__init__(message)


class StorageError(ContextEngineError):
    """The database or its driver failed; nothing of the call was committed unless the
    failure came while the commit itself was answered (then it may have been).

    ``operation`` names the call, ``cause`` is the driver's own error (``__cause__`` the
    error as it was raised), ``retryable`` says whether the same call may succeed later
    without anyone changing anything. Subclasses say what failed.
    """

    #: Whether trying again later may help, for errors of this class.
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        retryable: bool | None = None,
        cause: BaseException | None = None,
    ) -> None:
        self.operation = operation
        self.retryable = self.default_retryable if retryable is None else retryable
        self.cause = cause
        super().__init__(message)


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or refuses connections: the server is down,
    starting up, in recovery or shutting down, has too many connections, or the
    database or role does not exist (then ``retryable`` is False)."""

    default_retryable = True


class StorageTimeoutError(StorageError):
    """The database did not answer in time, or a lock stayed taken past the wait
    allowed (SQLite's ``sqlite_busy_timeout``, the pool's ``pool_timeout``)."""

    default_retryable = True


class ConnectionLostError(StorageError):
    """The connection broke during the call (server process terminated, network
    closed, driver protocol or state error); the pool replaces it."""

    default_retryable = True


class DatabaseFullError(StorageError):
    """The disk (or SQLite's page limit) holding the database is full."""


class ReadOnlyDatabaseError(StorageError):
    """The database accepts no writes (a read-only file, mount or ``mode=ro`` URI; a
    PostgreSQL standby or ``default_transaction_read_only``)."""


class EngineClosedError(ContextEngineError):
    """The engine is not open: call ``initialize()`` (or use ``async with``) first."""

    def __init__(self, state: str, *, blocking: bool = False) -> None:
        self.state = state
        if state == "closed":
            msg = "the ContextEngine is closed; create a new one"
        elif state == "forked":  # ctxengine.sync.ContextEngine in a forked child
            msg = (
                "the ContextEngine was opened before this process forked, and serves the "
                "parent only; open one in this process after the fork (gunicorn: post_fork "
                "or the first request; Celery: worker_process_init)"
            )
        elif blocking:  # ctxengine.sync.ContextEngine
            msg = "the ContextEngine is not initialized; call engine.initialize() or use `with`"
        else:
            msg = (
                "the ContextEngine is not initialized; "
                "await engine.initialize() or use `async with`"
            )
        super().__init__(msg)


class WrongEventLoopError(ContextEngineError):
    """The engine was used from an event loop (or thread) other than the one it was
    opened on; its connections and tasks belong to that loop. To call one engine from
    many threads, use the blocking facade, ``ctxengine.sync.ContextEngine``."""

    def __init__(self) -> None:
        super().__init__(
            "this ContextEngine was opened on another event loop (or thread) than the one "
            "calling it; use one engine per event loop: open another ContextEngine on the "
            "same URL in this one (engines share the database, not their connections), "
            "or share one engine between threads with the blocking facade, "
            "ctxengine.sync.ContextEngine (its own event loop thread, callable from any thread)"
        )
