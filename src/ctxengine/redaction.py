"""Secret redaction for chat message content.

A :class:`Redactor` replaces every match of a set of regular expressions with
:data:`REDACTED` before content is stored: in text with :meth:`Redactor.redact`, in
JSON data with :meth:`Redactor.redact_data`. :data:`DEFAULT_SECRET_PATTERNS` covers
common credential formats and can be passed as ``EngineSettings.redact_patterns``.

A pattern with a group named ``secret`` replaces only what that group matched, so
the rest of the match stays readable: ``password=[REDACTED]``, ``"token": "[REDACTED]"``.
No default pattern consumes a quote, a backslash escape or a delimiter that is not
part of the secret, so redacting JSON text leaves valid JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from .errors import ValidationError

__all__ = ["DEFAULT_SECRET_PATTERNS", "REDACTED", "Redactor", "names_secret"]

#: What each redacted secret is replaced with.
REDACTED = "[REDACTED]"

# The value of a key=value pair, as group "secret" (never empty, never already redacted):
# inside \"...\" (JSON text within a JSON string), "...", '...', or bare up to a
# delimiter. A backslash is taken only with the character it escapes and no alternative
# takes a raw double quote, so a JSON string is never cut open. In JSON text a raw quote
# after "password=" closes a string: what follows it is JSON punctuation (not taken as
# a quoted value) and nothing bare is taken after it.
_VALUE = (
    r"(?P<secret>(?!\[REDACTED\])(?:"
    r'(?<=\\")(?:[^"\\\r\n]|\\[^"\r\n])+(?=\\")'
    r'|(?<=")(?!\s*[,:\]}])(?:[^"\\\r\n]|\\.)+(?=")'
    r"|(?<=')(?:[^'\"\\\r\n]|\\.)+(?=')"
    r'|(?<!")(?:[^\s\'"\\,;&)\]}]|\\\S)+'
    r"))"
)
_SEP = r"[ \t]*[=:][ \t]*"


def _key(words: Sequence[str]) -> str:
    """Any of ``words`` (regexes, case-insensitive), not preceded by a letter or digit.

    The pattern starts with a character class (the engine then skips to where one of
    the first letters is), the word boundary checked after it.
    """
    firsts = sorted({w[0] for w in words})
    rest = "|".join(f"(?<={w[0]}){w[1:]}" for w in words)
    return f"[{''.join(c.upper() + c for c in firsts)}](?<![A-Za-z0-9].)(?i:{rest})"


def _word(prefix: str) -> str:
    """``prefix`` (a fixed-width regex) where a word starts, the boundary checked after
    it so that the engine can search for the prefix itself (``\\bsk-`` scans 30x slower)."""
    return rf"{prefix}(?<!\w{prefix})"


def _pair_pattern(keys: Sequence[str], *, bare_colon: bool) -> str:
    """``key=value`` / ``key: value`` / ``"key": "value"`` for any of ``keys``
    (case-insensitive, also as the last part of a compound such as ``client_secret``).

    A double-quoted key (JSON) takes only a quoted value: ``"password": 5`` stays valid
    JSON. Without ``bare_colon``, ``key: value`` needs the value quoted (prose such as
    "each token: a word" stays).
    """
    quoted_key = rf"""\\?"{_SEP}(?=\\?["'])|'{_SEP}"""
    bare_key = _SEP if bare_colon else r"""[ \t]*(?:=[ \t]*|:[ \t]*(?=\\?["']))"""
    return rf"""{_key(keys)}(?:{quoted_key}|{bare_key})(?:\\?["'])?{_VALUE}"""


_TOKEN_TAIL = r"[A-Za-z0-9_-]"

#: Common secret formats, each a plain regex string (see docs/concepts/conversation.md).
DEFAULT_SECRET_PATTERNS: tuple[str, ...] = (
    # password=..., password: ..., "password": "..." (also passwd, pwd, passphrase,
    # api_key, apikey, secret_key, secret_access_key, private_key, access_key): the value.
    _pair_pattern(
        (
            "passw(?:or)?d",
            "pwd",
            "passphrase",
            "api[_-]?key",
            "secret[_-]?(?:access[_-]?)?key",
            "private[_-]?key",
            "access[_-]?key",
        ),
        bare_colon=True,
    ),
    # secret=..., token=..., "secret": "...", token: "..." (access_token, client_secret).
    _pair_pattern(("secret", "token"), bare_colon=False),
    # The token after "Bearer ", when it looks like one: 8+ token characters with a
    # digit or inner punctuation, or 20+ letters (so "Bearer authentication" stays).
    rf"{_key(['bearer'])}[ \t]+(?P<secret>(?!\[REDACTED\])"
    r"(?=[A-Za-z]*[0-9]|[A-Za-z]*[._~+/=-][A-Za-z0-9]|[A-Za-z]{20})"
    r"[A-Za-z0-9._~+/=-]{8,})",
    # PEM private key blocks, whole (also when JSON-escaped: \n for line breaks); a
    # block cut short loses its header and the key material that follows.
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:"
    r"(?:[A-Za-z0-9+/=:,.\s-]|\\[nrt])*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
    r"|(?:[A-Za-z0-9+/=:,.\s]|\\[nrt])*)",
    # JSON Web Tokens: header.payload.signature, header and payload base64url JSON.
    rf"{_word('eyJ')}{_TOKEN_TAIL}+\.eyJ{_TOKEN_TAIL}+\.(?:{_TOKEN_TAIL}+)?",
    # OpenAI-style API keys: sk-... and sk-proj-...
    rf"{_word('sk-')}(?:proj-)?[A-Za-z0-9_-]{{20,}}",
    # Stripe secret and restricted keys.
    rf"{_word('[sr]k_')}(?:live|test)_[A-Za-z0-9]{{16,}}",
    # Slack tokens: xoxa-, xoxb-, xoxp-, xoxr-, xoxs-.
    rf"{_word('xox[abprs]-')}(?=[A-Za-z0-9-]{{10}})[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*",
    # Google API keys.
    rf"{_word('AIza')}{_TOKEN_TAIL}{{35}}(?!{_TOKEN_TAIL})",
    # AWS access key ids (long-term AKIA, temporary ASIA).
    rf"{_word('A[KS]IA')}[A-Z0-9]{{16}}\b",
    # GitHub tokens: classic (ghp_, gho_, ghu_, ghs_, ghr_) and fine-grained.
    rf"{_word('gh[pousr]_')}[A-Za-z0-9]{{36,}}",
    rf"{_word('github_pat_')}[A-Za-z0-9_]{{22,}}",
)

# Words that make a key name a secret when they end it (see names_secret).
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "passphrase", "secret", "token", "apikey"})
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("secret", "key"), ("private", "key"), ("access", "key")}
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=4096)
def names_secret(key: str) -> bool:
    """Whether a mapping key names a secret: its last word is password, passwd, pwd,
    passphrase, secret, token or apikey, or its last two are api/secret/private/access
    key (``client_secret``, ``access_token``, ``x-api-key``, ``apiKey``), but not a count
    such as ``max_tokens`` or ``token_count``."""
    words = [w for w in _NON_ALNUM.split(_CAMEL.sub("_", key).lower()) if w]
    if not words:
        return False
    return words[-1] in _SECRET_WORDS or tuple(words[-2:]) in _SECRET_PAIRS


def _replace_match(match: re.Match[str]) -> str:
    # An empty match (from a pattern such as "x*") has nothing to hide.
    return REDACTED if match.end() > match.start() else ""


def _replace_secret(match: re.Match[str]) -> str:
    """The match with only its ``secret`` group replaced (kept whole when it is empty)."""
    start, end = match.span("secret")
    whole = match.group()
    if end <= start:
        return whole
    offset = match.start()
    return f"{whole[: start - offset]}{REDACTED}{whole[end - offset :]}"


class Redactor:
    """Replaces every match of any of its patterns with :data:`REDACTED`, applying the
    patterns in turn (each one compiled once, when the redactor is made)."""

    __slots__ = ("_compiled", "_patterns", "_replacers")

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
        self._compiled: tuple[re.Pattern[str], ...] = tuple(compiled)
        self._replacers = tuple(
            (p.sub, _replace_secret if "secret" in p.groupindex else _replace_match)
            for p in compiled
        )

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
        for sub, replace in self._replacers:
            text = sub(replace, text)
        return text

    def redact_data(self, value: Any) -> Any:
        """Return JSON data (dict, list, str, number, bool, None) of the same shape with
        every string value redacted as text and every value under a key that
        :func:`names_secret` replaced: non-empty strings and numbers by :data:`REDACTED`,
        also inside a list or dict held there (null and booleans stay). Keys stay as they
        are; ``value`` is never changed. Without patterns, ``value`` itself is returned."""
        if not self._compiled:
            return value
        return self._data(value)

    def _data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            # A log-probability entry's "token" is a piece of model output, not a secret.
            keyed = "logprob" not in value
            return {
                key: _hidden(item)
                if keyed and isinstance(key, str) and names_secret(key)
                else self._data(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return type(value)(self._data(item) for item in value)
        return value

    def __repr__(self) -> str:
        return f"Redactor({list(self._patterns)!r})"


def _hidden(value: Any) -> Any:
    """``value`` under a secret key: every non-empty string and every number replaced,
    shape kept."""
    if isinstance(value, str):
        return REDACTED if value else value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return REDACTED
    if isinstance(value, Mapping):
        return {key: _hidden(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_hidden(item) for item in value)
    return value
