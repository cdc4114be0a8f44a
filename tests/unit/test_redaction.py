"""Tests of :mod:`ctxengine.redaction` (no database)."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctxengine.errors import ValidationError
from ctxengine.redaction import DEFAULT_SECRET_PATTERNS, REDACTED, Redactor

DEFAULT = Redactor(DEFAULT_SECRET_PATTERNS)

GH_BODY = "0123456789abcdefghijABCDEFGHIJ012345"  # 36 alphanumerics
FINE_GRAINED = "github_pat_11ABCDEFG0123456789abcd_" + "Zy9" * 20

# (text, expected) with real-looking secrets inside sentences.
SECRETS = [
    ("my key is sk-proj-AbC123dEf456GhI789jKl012", "my key is [REDACTED]"),
    ("use sk-AbCdEf0123456789GhIjKl for tests", "use [REDACTED] for tests"),
    ("key=sk-abc_DEF-123456789012345678.", "key=[REDACTED]."),
    (
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl",
        "Authorization: Bearer [REDACTED]",
    ),
    (
        "curl -H 'Authorization: bearer abcDEF123456' url",
        "curl -H 'Authorization: bearer [REDACTED]' url",
    ),
    ("send Bearer abcdefghijklmnopqrstuvwxyz now", "send Bearer [REDACTED] now"),
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "aws_access_key_id = [REDACTED]"),
    ("temporary ASIAY34FZKBOKMUTVV7A credentials", "temporary [REDACTED] credentials"),
    (f"token ghp_{GH_BODY} here", "token [REDACTED] here"),
    (f"oauth gho_{GH_BODY}", "oauth [REDACTED]"),
    (f"user-to-server ghu_{GH_BODY}!", "user-to-server [REDACTED]!"),
    (f"(ghs_{GH_BODY})", "([REDACTED])"),
    (f"refresh: ghr_{GH_BODY}xyz", "refresh: [REDACTED]"),
    (f"fine-grained {FINE_GRAINED} token", "fine-grained [REDACTED] token"),
    ("login with password=hunter2 please", "login with password=[REDACTED] please"),
    ("admin password: swordfish", "admin password: [REDACTED]"),
    ("Password:hunter2, then log in", "Password:[REDACTED], then log in"),
    ("DB_PASSWORD=s3cr3t!", "DB_PASSWORD=[REDACTED]"),
    ("passwd=abc;user=bob", "passwd=[REDACTED];user=bob"),
    ("pwd = x1y2z3 and more", "pwd = [REDACTED] and more"),
    ("PWD='p@ss w0rd' end", "PWD=[REDACTED] end"),
    ('config = {"password": "correct horse battery staple"}', 'config = {"password": [REDACTED]}'),
    ("{'passwd':'tr0ub4dor'}", "{'passwd':[REDACTED]}"),
    ("connect(user='u', password='hunter2')", "connect(user='u', password=[REDACTED])"),
]

# Ordinary text that must come out byte for byte the same.
ORDINARY = [
    "",
    "ask-me-anything",
    "the sk-8 model",
    "sk-learn is not a package, scikit-learn is",
    "the task-list skeleton is ready",
    "desk-organizer-with-many-small-drawers",
    "Bearer of bad news",
    "The Bearer token goes in the Authorization header.",
    "Bearer authentication is described in RFC 6750.",
    "bearer instruments and bearer bonds",
    "password reset instructions",
    "Forgot your password? Click the link.",
    "passwordless login is enabled",
    "Enter your password: ",
    "run pwd to print the working directory",
    "AKIA is a word",
    "ASIA and AKIAIOSFODNN7 are too short",
    "ASIAN markets opened higher",
    "ghp_short and gho_ and github_pat_ are only prefixes",
    "def password_ok(pw):\n    return len(pw) >= 12\n",
    "if not user.check_password(raw_password):\n    raise PermissionError",
    "https://example.com/docs/search?q=python+regex&page=2#results",
    "git clone git@github.com:octo/repo.git && cd repo",
    "Ünïcödé text — 日本語のテキスト, émojis 🙂 and Ελληνικά",
    "x = [1, 2, 3]; y = {'a': 1}",
    "already [REDACTED] text",
]


@pytest.mark.parametrize(("text", "expected"), SECRETS)
def test_secrets_are_redacted(text: str, expected: str) -> None:
    assert DEFAULT.redact(text) == expected


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert DEFAULT.redact(text) == text


def test_several_secrets_in_one_text() -> None:
    text = (
        f"keys: sk-proj-AbC123dEf456GhI789jKl012, AKIAIOSFODNN7EXAMPLE and ghp_{GH_BODY}; "
        "header Authorization: Bearer abc.DEF.123456; db password=hunter2 done"
    )
    assert DEFAULT.redact(text) == (
        "keys: [REDACTED], [REDACTED] and [REDACTED]; "
        "header Authorization: Bearer [REDACTED]; db password=[REDACTED] done"
    )


def test_password_value_that_is_also_a_token_is_redacted_once() -> None:
    assert DEFAULT.redact("password=sk-AbCdEf0123456789GhIjKl.x") == "password=[REDACTED]"


def test_secret_values_do_not_survive() -> None:
    text = "\n".join(text for text, _ in SECRETS)
    redacted = DEFAULT.redact(text)
    for leaked in ("AbC123", "IOSFODNN7", GH_BODY, "hunter2", "swordfish", "s3cr3t", "battery"):
        assert leaked not in redacted


def test_default_patterns_are_plain_compilable_strings() -> None:
    assert DEFAULT_SECRET_PATTERNS
    for pattern in DEFAULT_SECRET_PATTERNS:
        assert type(pattern) is str
        re.compile(pattern)
    assert DEFAULT.active
    assert DEFAULT.patterns == DEFAULT_SECRET_PATTERNS
    assert REDACTED == "[REDACTED]"


def test_custom_patterns() -> None:
    ssn = Redactor([r"\b\d{3}-\d{2}-\d{4}\b"])
    assert ssn.redact("ssn 123-45-6789, phone 555-1234") == "ssn [REDACTED], phone 555-1234"
    both = Redactor([*DEFAULT_SECRET_PATTERNS, r"\bACME-\d{6}\b"])
    assert both.redact("ACME-123456 and password=x") == "[REDACTED] and password=[REDACTED]"


def test_patterns_with_groups_or_global_flags_still_work() -> None:
    redactor = Redactor([r"(?i)internal-(\d+)", r"(ab)\1", r"\btoken\b"])
    assert redactor.redact("INTERNAL-42 abab token ab") == "[REDACTED] [REDACTED] [REDACTED] ab"


def test_empty_matches_insert_nothing() -> None:
    redactor = Redactor([r"x*"])
    assert redactor.redact("abc") == "abc"
    assert redactor.redact("axxb") == f"a{REDACTED}b"


@pytest.mark.parametrize("patterns", [[], ()])
def test_empty_redactor_leaves_text_unchanged(patterns: list[str] | tuple[str, ...]) -> None:
    redactor = Redactor(patterns)
    assert not redactor.active
    text = "password=hunter2 sk-proj-AbC123dEf456GhI789jKl012"
    assert redactor.redact(text) is text


@pytest.mark.parametrize("bad", ["(unclosed", "[a-", "a{2,1}", "(?<=a+)b"])
def test_invalid_pattern_is_named(bad: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(repr(bad))) as info:
        Redactor(["ok", bad])
    assert info.value.field == "redact_patterns"
    assert info.value.value == bad


def test_non_string_pattern_is_rejected() -> None:
    with pytest.raises(ValidationError, match="must be a string") as info:
        Redactor(["ok", 42])  # type: ignore[list-item]
    assert info.value.field == "redact_patterns"
    with pytest.raises(ValidationError, match="must be a string"):
        Redactor([re.compile("x")])  # type: ignore[list-item]


def test_a_single_string_is_not_a_pattern_list() -> None:
    with pytest.raises(ValidationError, match="sequence of strings"):
        Redactor(r"sk-\w+")


# Text that mixes random characters with pieces of secrets and their keys.
FRAGMENTS = [
    "sk-",
    "proj-",
    "Bearer ",
    "bearer\t",
    "password",
    "Passwd",
    "pwd",
    "=",
    ":",
    ": ",
    " = ",
    '"',
    "'",
    ",",
    ";",
    "_",
    "-",
    ".",
    " ",
    "\n",
    REDACTED,
    "AKIA",
    "ASIA",
    "ghp_",
    "github_pat_",
    "IOSFODNN7EXAMPLE",
    GH_BODY,
    "AbC123dEf456GhI789jKl012",
]
mixed_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=30).map(
    "".join
)


@given(mixed_text)
def test_redaction_is_idempotent(text: str) -> None:
    once = DEFAULT.redact(text)
    assert DEFAULT.redact(once) == once


LETTERS_AND_SPACES = st.text(
    alphabet=st.one_of(
        st.sampled_from(string.ascii_letters + " "),
        st.characters(categories=["L"]),
    ),
    max_size=200,
)


@given(
    LETTERS_AND_SPACES.filter(lambda t: not any(w in t.upper() for w in ("AKIA", "ASIA", "BEARER")))
)
def test_letters_and_spaces_without_key_words_are_unchanged(text: str) -> None:
    assert DEFAULT.redact(text) == text
