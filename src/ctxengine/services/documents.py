"""The JSON documents of checkpoints and exports, validated before anything is written.

``format_version`` 1 (export):

    {"format_version": 1, "session": {...}, "metadata": {...}, "chats": [...],
     "messages": [...], "quotas": [...]}

A checkpoint stores the conversation part: metadata, current chat, chats, messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    StringConstraints,
)

from ..errors import ValidationError
from ..models import QuotaType, SessionStatus
from ..validation import MAX_QUANTITY

FORMAT_VERSION = 1
ROLES = ("system", "user", "assistant", "tool")
Role = Literal["system", "user", "assistant", "tool"]
Id = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ChatDoc(_Doc):
    chat_id: Id
    name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    max_messages: PositiveInt | None = None
    created_at: AwareDatetime
    next_seq: NonNegativeInt


class MessageDoc(_Doc):
    chat_id: Id
    seq: PositiveInt
    message_id: Id
    role: Role
    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    tokens: NonNegativeInt | None = None
    created_at: AwareDatetime
    #: Replaced by a summary (absent: False).
    compacted: bool = False

    @pydantic.model_validator(mode="after")
    def _summary(self) -> MessageDoc:
        span = self.metadata.get("summary_of")
        if span is None:
            return self
        if (
            self.role != "system"
            or not isinstance(span, list)
            or len(span) != 2
            or not all(type(seq) is int for seq in span)
            or not 1 <= span[0] <= span[1] < self.seq
        ):
            raise ValueError(
                "metadata summary_of must be [first_seq, last_seq] of earlier messages, "
                "on a system message"
            )
        return self


class ConversationDoc(_Doc):
    """What a checkpoint holds."""

    metadata: dict[str, Any] = Field(default_factory=dict)
    current_chat_id: Id | None = None
    chats: list[ChatDoc] = Field(default_factory=list)
    messages: list[MessageDoc] = Field(default_factory=list)

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> ConversationDoc:
        next_seq: dict[str, int] = {}
        for chat in self.chats:
            if chat.chat_id in next_seq:
                raise ValueError(f"chat {chat.chat_id!r} appears twice")
            next_seq[chat.chat_id] = chat.next_seq
        if self.current_chat_id is not None and self.current_chat_id not in next_seq:
            raise ValueError(f"current_chat_id {self.current_chat_id!r} is not one of the chats")
        seen: set[tuple[str, int]] = set()
        for message in self.messages:
            if message.chat_id not in next_seq:
                raise ValueError(f"message {message.message_id!r} names unknown chat")
            key = (message.chat_id, message.seq)
            if key in seen:
                raise ValueError(f"seq {message.seq} appears twice in chat {message.chat_id!r}")
            if message.seq > next_seq[message.chat_id]:
                raise ValueError(
                    f"seq {message.seq} in chat {message.chat_id!r} is past its next_seq"
                )
            seen.add(key)
        return self


class SessionDoc(_Doc):
    session_id: Id
    user_id: Id
    tier: str
    status: SessionStatus
    name: str | None = None
    tags: list[Id] = Field(default_factory=list)
    preferences: dict[str, Any] = Field(default_factory=dict)
    created_at: AwareDatetime
    last_activity: AwareDatetime
    ended_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    #: Absent in documents written before per-session timeouts: the engine's setting.
    idle_timeout: float | None = Field(None, gt=0)
    request_count: NonNegativeInt = 0
    error_count: NonNegativeInt = 0
    total_processing_time: float = Field(0.0, ge=0)


class QuotaDoc(_Doc):
    resource_type: QuotaType
    used: float = Field(ge=0, le=MAX_QUANTITY)
    limit: float | None = Field(None, ge=0, le=MAX_QUANTITY)
    custom: bool = False


class ExportDoc(ConversationDoc):
    """What ``export_session`` returns and ``import_session`` takes."""

    format_version: Literal[1]
    session: SessionDoc
    quotas: list[QuotaDoc] = Field(default_factory=list)

    @pydantic.model_validator(mode="after")
    def _one_quota_per_type(self) -> ExportDoc:
        kinds = [q.resource_type for q in self.quotas]
        if len(set(kinds)) != len(kinds):
            raise ValueError("a quota type appears twice")
        return self


def parse(model: type[_Doc], data: object, what: str) -> Any:
    """Validate ``data`` as ``model``; a ValidationError naming every problem otherwise."""
    if what == "export":
        if not isinstance(data, Mapping):
            raise ValidationError(
                f"import_session takes the dict export_session returned, got {type(data).__name__}",
                field="data",
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValidationError(
                f"unsupported format_version {version!r}; this version of ctxengine reads "
                f"format_version {FORMAT_VERSION}",
                field="format_version",
            )
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or what}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise ValidationError(
            f"malformed {what} document ({exc.error_count()} problems): {problems}; "
            "nothing was written",
            field="data",
        ) from None
