"""How a chat's history reads once compacted (SPEC §14), as pure functions.

A chat's *summary* is a system message, not compacted, whose metadata ``summary_of``
is ``[first_seq, last_seq]``: the range of sequence numbers it replaced. It has the
sequence number it was written with (the chat's next), yet it stands where the messages
it replaced stood: after the system messages before ``first_seq`` (the system prompt),
before every message not compacted after them. Its *position* is ``first_seq - 0.5``;
every other message's is its ``seq``. The history shown is the chat's messages not
compacted, ordered by position.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from ..models import Message

#: The metadata key naming the range of sequence numbers a summary replaced.
SUMMARY_OF = "summary_of"


def summary_range(message: Message) -> tuple[int, int] | None:
    """``(first_seq, last_seq)`` when ``message`` is a summary not compacted, else None."""
    if message.role != "system" or message.compacted:
        return None
    span = message.metadata.get(SUMMARY_OF)
    if (
        isinstance(span, list)
        and len(span) == 2
        and all(type(seq) is int for seq in span)
        and span[0] <= span[1]
    ):
        return span[0], span[1]
    return None


def latest_summary(system: Sequence[Message]) -> Message | None:
    """The newest summary among a chat's system messages not compacted (oldest first)."""
    for message in reversed(system):
        if summary_range(message) is not None:
            return message
    return None


def position(message: Message, summary: Message | None) -> float:
    """Where ``message`` stands in the history shown, given the chat's latest summary."""
    if summary is not None and message.seq == summary.seq:
        span = summary_range(summary)
        assert span is not None
        return span[0] - 0.5
    return float(message.seq)


def bound(before_seq: int | None, summary: Message | None) -> float:
    """The position below which a page ``before_seq`` reads: the position of the message
    at ``before_seq`` (the summary's own when it is the summary)."""
    if before_seq is None:
        return math.inf
    if summary is not None and before_seq == summary.seq:
        return position(summary, summary)
    return float(before_seq)


def arrange(
    newest_first: Sequence[Message],
    older: Sequence[Message],
    summary: Message | None,
    below: float,
    limit: int | None,
) -> list[Message]:
    """The last ``limit`` (all with None) messages of the history shown below position
    ``below``, in order, from ``newest_first`` (the newest messages not compacted below
    ``below`` above the chat's floor: at least ``limit + 1`` of them when there are, the
    summary among them or not) and ``older`` (its system messages at or below the
    floor, oldest first)."""
    skip = -1 if summary is None else summary.seq
    ordered = [m for m in older if m.seq < below]
    ordered += [m for m in reversed(newest_first) if m.seq != skip and m.seq < below]
    if summary is not None:
        at = position(summary, summary)
        if at < below:
            ordered.insert(bisect.bisect_left([m.seq for m in ordered], at), summary)
    if limit is None:
        return ordered
    return ordered[max(0, len(ordered) - limit) :]
