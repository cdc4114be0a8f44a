"""Checks on caller input, run before anything is written."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from .errors import ValidationError
from .lifecycle import END_STATUSES
from .models import SessionStatus

MAX_ID_LENGTH = 255
#: Deepest nesting of JSON values (metadata, preferences, structured content): a mapping
#: or list holding scalars is 1 level; deeper documents are refused before encoding.
MAX_JSON_DEPTH = 64
#: Most tags a session may have (each an identifier of at most MAX_ID_LENGTH characters).
MAX_TAGS = 100
#: Largest quota amount or limit: far from float overflow, and every whole number up to
#: it is exact as a float (< 2**53), so ``used + amount`` stays finite and exact enough.
MAX_QUANTITY = 1e15
#: Longest duration argument in seconds (rate-limit windows, look-backs): about 31 years.
MAX_SECONDS = 1e9
#: ``\u0000`` in JSON text that is not an escaped backslash followed by "u0000".
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

E = TypeVar("E", bound=StrEnum)


def identifier(value: object, field: str = "session_id") -> str:
    """A string of 1 to 255 characters that every backend stores as given: not only
    whitespace, no NUL character, no lone surrogate (ids of sessions, users, chats,
    tenants, operations, tags)."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string, got {type(value).__name__}", field=field)
    if not value or value.isspace():
        raise ValidationError(
            f"{field} must not be empty or only whitespace", field=field, value=value
        )
    if len(value) > MAX_ID_LENGTH:
        raise ValidationError(
            f"{field} is {len(value)} characters long; at most {MAX_ID_LENGTH} are allowed",
            field=field,
            value=value,
        )
    if "\x00" in value:
        raise ValidationError(f"{field} must not contain NUL characters", field=field)
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValidationError(
                f"{field} is not valid Unicode text (lone surrogates)", field=field
            ) from None
    return value


def optional_identifier(value: object, field: str) -> str | None:
    return None if value is None else identifier(value, field)


def choice(enum: type[E], value: object, field: str) -> E:
    """A member of the string enum ``enum``, given as the member or its value."""
    if isinstance(value, enum):
        return value
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return enum(value)
    except ValueError:
        known = ", ".join(member.value for member in enum)
        raise ValidationError(f"unknown {field} {value!r}; one of: {known}", field=field) from None


def choice_of(options: Sequence[str], value: object, field: str) -> str:
    """One of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValidationError(
            f"unknown {field} {value!r}; one of: {', '.join(options)}", field=field
        )
    return value


def status(value: object, field: str = "status") -> SessionStatus:
    """A known :class:`SessionStatus`."""
    return choice(SessionStatus, value, field)


def tier(name: object, tiers: Mapping[str, object]) -> str:
    """The name of a configured tier."""
    if not isinstance(name, str) or name not in tiers:
        known = ", ".join(sorted(tiers))
        raise ValidationError(f"unknown tier {name!r}; one of: {known}", field="tier")
    return name


def end_status(value: object) -> SessionStatus:
    """completed, failed or expired."""
    result = status(value)
    if result not in END_STATUSES:
        raise ValidationError(
            f"end_session needs an end status (completed, failed or expired), got {value!r}",
            field="status",
            value=value,
        )
    return result


def _number(value: object, field: str) -> float:
    """An int or float as a float (booleans are refused; ints too large become inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{field} must be a number, got {value!r}", field=field)
    try:
        return float(value)
    except OverflowError:
        return math.inf


def non_negative(value: object, field: str) -> float:
    """A finite number >= 0 (booleans are refused)."""
    number = _number(value, field)
    if not math.isfinite(number) or number < 0:
        raise ValidationError(
            f"{field} must be a finite number >= 0, got {value!r}", field=field, value=value
        )
    return number


def positive(value: object, field: str) -> float:
    """A finite number > 0."""
    number = _number(value, field)
    if not math.isfinite(number) or number <= 0:
        raise ValidationError(
            f"{field} must be a finite number > 0, got {value!r}", field=field, value=value
        )
    return number


def _at_most(number: float, maximum: float, field: str, value: object, unit: str = "") -> float:
    if number > maximum:
        raise ValidationError(
            f"{field} must be at most {maximum:g}{unit}, got {value!r}", field=field, value=value
        )
    return number


def quantity(value: object, field: str, *, zero: bool = False) -> float:
    """A quota amount (> 0) or limit (>= 0 with ``zero``) of at most MAX_QUANTITY."""
    number = non_negative(value, field) if zero else positive(value, field)
    return _at_most(number, MAX_QUANTITY, field, value)


def seconds(value: object, field: str) -> float:
    """A duration > 0 of at most MAX_SECONDS."""
    return _at_most(positive(value, field), MAX_SECONDS, field, value, " seconds")


def duration(value: object, field: str) -> float:
    """A duration >= 0 of at most MAX_SECONDS."""
    return _at_most(non_negative(value, field), MAX_SECONDS, field, value, " seconds")


def whole(value: object, field: str) -> int:
    """A whole number from 1 to MAX_QUANTITY (rate-limit calls and costs)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_QUANTITY:
        raise ValidationError(
            f"{field} must be a whole number from 1 to {MAX_QUANTITY:g}, got {value!r}",
            field=field,
        )
    return value


def limit(value: object, field: str = "limit") -> int:
    """A whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"{field} must be a whole number >= 1, got {value!r}", field=field)
    return value


def count(value: object, field: str) -> int:
    """A whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{field} must be a whole number >= 0, got {value!r}", field=field)
    return value


def text(value: object, field: str, max_bytes: int) -> str:
    """A string that every backend stores as given: UTF-8 encodable, no NUL characters,
    at most ``max_bytes`` bytes as UTF-8."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string, got {type(value).__name__}", field=field)
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValidationError(
            f"{field} is not valid Unicode text (lone surrogates)", field=field
        ) from None
    if size > max_bytes:
        raise ValidationError(
            f"{field} is {size} bytes as UTF-8; at most {max_bytes} are allowed "
            "(max_message_bytes)",
            field=field,
        )
    if "\x00" in value:
        raise ValidationError(f"{field} must not contain NUL characters", field=field)
    return value


def aware(value: object, field: str) -> datetime:
    """A timezone-aware datetime."""
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{field} must be a timezone-aware datetime", field=field)
    return value


def optional_aware(value: object, field: str) -> datetime | None:
    return None if value is None else aware(value, field)


def json_object(value: object, field: str, max_bytes: int) -> dict[str, Any]:
    """A JSON-serializable mapping with string keys, at most ``max_bytes`` when encoded."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(f"{field} must be a mapping, got {type(value).__name__}", field=field)
    if not all(isinstance(key, str) for key in value):
        raise ValidationError(f"{field} keys must be strings", field=field)
    encoded = json_text(value, field)
    if len(encoded.encode()) > max_bytes:
        raise ValidationError(
            f"{field} is {len(encoded.encode())} bytes as JSON; at most {max_bytes} are allowed "
            "(max_metadata_bytes)",
            field=field,
        )
    result: dict[str, Any] = json.loads(encoded)
    return result


def merged_size(document: object, field: str, max_bytes: int) -> None:
    """Refuse a merged document that grew past ``max_bytes`` (the caller's unit of work
    is then rolled back)."""
    size = len(json_text(document, field).encode())
    if size > max_bytes:
        raise ValidationError(
            f"{field} would grow to {size} bytes, over max_metadata_bytes={max_bytes}; "
            "nothing was written",
            field=field,
        )


def json_depth(value: object, field: str) -> None:
    """Refuse mappings and lists nested deeper than MAX_JSON_DEPTH, without recursion
    (the encoder and every later reader would recurse once per level)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, Mapping) else node
        assert isinstance(children, Iterable)
        for child in children:
            if isinstance(child, Mapping | list | tuple):
                if depth >= MAX_JSON_DEPTH:
                    raise ValidationError(
                        f"{field} is nested deeper than {MAX_JSON_DEPTH} levels",
                        field=field,
                    )
                stack.append((child, depth + 1))


def json_text(value: object, field: str) -> str:
    """Encode ``value`` as strict JSON (no NaN, only JSON types, at most MAX_JSON_DEPTH
    levels of nesting)."""
    if isinstance(value, Mapping | list | tuple):
        json_depth(value, field)
    try:
        encoded = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        encoded.encode()
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{field} must be JSON-serializable: {exc}", field=field) from None
    if _ESCAPED_NUL.search(encoded):
        raise ValidationError(f"{field} must not contain NUL characters", field=field)
    return encoded


def tags(value: object) -> list[str]:
    """At most MAX_TAGS identifiers (order kept, duplicates dropped), checked in linear time."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValidationError("tags must be a list of strings", field="tags")
    result: dict[str, None] = {}
    for tag in value:
        result[identifier(tag, "tag")] = None
        if len(result) > MAX_TAGS:
            raise ValidationError(f"at most {MAX_TAGS} tags are allowed", field="tags")
    return list(result)
