"""Secret redaction for chat message content.

A :class:`Redactor` replaces every match of a set of regular expressions with
:data:`REDACTED` before content is stored. :data:`DEFAULT_SECRET_PATTERNS` covers
common credential formats and can be passed as ``EngineSettings.redact_patterns``.

Patterns that name a key (``Bearer``, ``password=``) match only the secret after it,
through fixed-width lookbehinds, so the key stays readable: ``password=[REDACTED]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import ValidationError

__all__ = ["DEFAULT_SECRET_PATTERNS", "REDACTED", "Redactor"]

#: What each redacted secret is replaced with.
REDACTED = "[REDACTED]"


def _password_value_pattern() -> str:
    """The value of a ``password=...`` style pair, the key and separator excluded.

    Python lookbehinds must be fixed-width, so every key/separator shape gets its own
    lookbehind: ``password=v``, ``password: v``, ``"password": "v"``, ``pwd = v``...
    """
    keys = ("password", "passwd", "pwd")
    separators = ("[=:]", "[=:][ \\t]", "[ \\t]=[ \\t]", "[\"'][=:]", "[\"'][=:][ \\t]")
    key = "|".join(f"(?<={k}{s})" for k in keys for s in separators)
    # A value already redacted is left alone, which keeps redaction idempotent.
    value = "(?!\\[REDACTED\\])(?:\"[^\"\\r\\n]+\"|'[^'\\r\\n]+'|[\"']?[^\\s'\",;]+[\"']?)"
    return f"(?i:{key}){value}"


#: Common secret formats, each a plain regex string.
DEFAULT_SECRET_PATTERNS: tuple[str, ...] = (
    # password=..., password: ..., "password": "..." (also passwd, pwd): the value only.
    # First, so that it wins over the patterns below when a value is itself a token.
    _password_value_pattern(),
    # OpenAI-style API keys: sk-... and sk-proj-...
    r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}",
    # The token after "Bearer ", when it looks like one: 8+ token characters with a
    # digit or inner punctuation, or 20+ letters (so "Bearer authentication" stays).
    r"(?i:(?<=\bbearer[ \t]))"
    r"(?=[A-Za-z]*[0-9]|[A-Za-z]*[._~+/=-][A-Za-z0-9]|[A-Za-z]{20})"
    r"[A-Za-z0-9._~+/=-]{8,}",
    # AWS access key ids (long-term AKIA, temporary ASIA).
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
    # GitHub tokens: classic (ghp_, gho_, ghu_, ghs_, ghr_) and fine-grained.
    r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    r"\bgithub_pat_[A-Za-z0-9_]{22,}",
)


def _replace(match: re.Match[str]) -> str:
    # An empty match (from a pattern such as "x*") has nothing to hide.
    return REDACTED if match.end() > match.start() else ""


class Redactor:
    """Replaces every match of any of its patterns with :data:`REDACTED`.

    Patterns without capture groups or global inline flags are joined into one
    alternation and applied in a single left-to-right pass (the earlier pattern wins
    where two match at the same place); otherwise each is applied in turn.
    """

    __slots__ = ("_combined", "_compiled", "_patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        if isinstance(patterns, str):
            raise ValidationError(
                f"redact patterns must be a sequence of strings, not the string {patterns!r}",
                field="redact_patterns",
                value=patterns,
            )
        compiled: list[re.Pattern[str]] = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValidationError(
                    f"redact pattern {pattern!r} must be a string, not {type(pattern).__name__}",
                    field="redact_patterns",
                    value=pattern,
                )
            try:
                compiled.append(re.compile(pattern))
            except re.error as exc:
                raise ValidationError(
                    f"redact pattern {pattern!r} is not a valid regular expression: {exc}",
                    field="redact_patterns",
                    value=pattern,
                ) from None
        self._patterns = tuple(p.pattern for p in compiled)
        self._combined: re.Pattern[str] | None = None
        self._compiled: tuple[re.Pattern[str], ...] = tuple(compiled)
        if len(compiled) > 1 and all(p.groups == 0 and p.flags == re.UNICODE for p in compiled):
            try:
                self._combined = re.compile("|".join(f"(?:{p})" for p in self._patterns))
            except re.error:  # pragma: no cover - each compiled alone; keep them apart
                self._combined = None
        elif len(compiled) == 1:
            self._combined = compiled[0]

    @property
    def active(self) -> bool:
        """Whether there is at least one pattern."""
        return bool(self._compiled)

    @property
    def patterns(self) -> tuple[str, ...]:
        """The pattern strings, in order."""
        return self._patterns

    def redact(self, text: str) -> str:
        """Return ``text`` with every match replaced by :data:`REDACTED`."""
        if self._combined is not None:
            return self._combined.sub(_replace, text)
        for pattern in self._compiled:
            text = pattern.sub(_replace, text)
        return text

    def __repr__(self) -> str:
        return f"Redactor({list(self._patterns)!r})"
