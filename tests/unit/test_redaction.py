"""Tests of :mod:`ctxengine.redaction` (no database)."""

from __future__ import annotations

import copy
import json
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxengine.errors import ValidationError
from ctxengine.redaction import DEFAULT_SECRET_PATTERNS, REDACTED, Redactor, names_secret

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
    ("PWD='p@ss w0rd' end", "PWD='[REDACTED]' end"),
    (
        'config = {"password": "correct horse battery staple"}',
        'config = {"password": "[REDACTED]"}',
    ),
    ("{'passwd':'tr0ub4dor'}", "{'passwd':'[REDACTED]'}"),
    ("connect(user='u', password='hunter2')", "connect(user='u', password='[REDACTED]')"),
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
    "token",
    "api_key",
    "secret",
    "\\",
    '\\"',
    "Bearer abcdef123456",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----END RSA PRIVATE KEY-----",
    "eyJ",
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


# -- patterns added for structured content and more credential formats ---------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlXzEyMw"
STRIPE = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
GOOGLE = "AIzaSyA-1234567890abcdefghijklmnopqrstu"  # AIza + 35
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7\n"
    "Kx9+abc/def==\n-----END RSA PRIVATE KEY-----"
)

# (pattern's subject, text, expected): what is matched and what is kept.
MORE_SECRETS = [
    ("json pair", '{"password": "hunter2"}', '{"password": "[REDACTED]"}'),
    ("json pair", '{"api_key": "k-123"}', '{"api_key": "[REDACTED]"}'),
    ("json pair", '{"secret":"s3"}', '{"secret":"[REDACTED]"}'),
    ("json pair", '{"token" : "t0k"}', '{"token" : "[REDACTED]"}'),
    ("json pair", '{"client_secret": "cs", "access_token": "at"}', None),
    ("json pair", '{"x-api-key": "k"}', '{"x-api-key": "[REDACTED]"}'),
    ("json pair", '{"password": "a\\"b\\\\"}', '{"password": "[REDACTED]"}'),
    ("escaped json", '"{\\"password\\": \\"pw\\"}"', '"{\\"password\\": \\"[REDACTED]\\"}"'),
    ("pair", "api_key=abc123 next", "api_key=[REDACTED] next"),
    ("pair", "APIKEY=abc123", "APIKEY=[REDACTED]"),
    ("pair", "secret=xyz;", "secret=[REDACTED];"),
    ("pair", "https://x.test/cb?token=abc123&page=2", "https://x.test/cb?token=[REDACTED]&page=2"),
    ("pair", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "AWS_SECRET_ACCESS_KEY=[REDACTED]"),
    ("pair", "X-Api-Key: 0f1e2d3c", "X-Api-Key: [REDACTED]"),
    ("pair", "token: 'q1w2'", "token: '[REDACTED]'"),
    ("pair", "f(password=hunter2)", "f(password=[REDACTED])"),
    ("jwt", f"id {JWT} end", "id [REDACTED] end"),
    ("stripe", f"key {STRIPE}", "key [REDACTED]"),
    ("stripe", "rk_live_0123456789abcdefXYZ.", "[REDACTED]."),
    ("stripe", "sk_test_0123456789abcdefXYZ", "[REDACTED]"),
    ("slack", f"bot {SLACK}!", "bot [REDACTED]!"),
    ("slack", "xoxp-1234567890-abcdef", "[REDACTED]"),
    ("google", f"maps {GOOGLE} ok", "maps [REDACTED] ok"),
    ("pem", f"key:\n{PEM}\ndone", "key:\n[REDACTED]\ndone"),
    ("pem", "-----BEGIN PRIVATE KEY-----\nMIIabc+/", "[REDACTED]"),
    ("pem", "-----BEGIN OPENSSH PRIVATE KEY----- b3Blbg== -----END OPENSSH PRIVATE KEY-----", None),
]

MORE_ORDINARY = [
    '{"max_tokens": 100, "input_tokens": 5, "token_count": 3}',
    "max_tokens=100 input_tokens=5 token_count=3 tokenizer=bpe",
    "each token: a word; the secret: patience",
    '{"password": 5, "token": null, "secret": true}',
    '{"password": "", "token_type": "bearer", "secret_name": "db"}',
    "mysecret=value is a variable name",
    "eyJhbGciOiJIUzI1NiJ9 alone is only a header",
    "pk_live_0123456789abcdefXYZ is a publishable key",
    "sk_live_short",
    "xoxb- and xoxz-1234567890abcdef",
    "AIza is a prefix; AIzaShort",
    "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----",
]


@pytest.mark.parametrize(("kind", "text", "expected"), MORE_SECRETS)
def test_more_secret_formats(kind: str, text: str, expected: str | None) -> None:
    redacted = DEFAULT.redact(text)
    if expected is not None:
        assert redacted == expected
    assert REDACTED in redacted
    if text.startswith(("{", '"')):
        json.loads(redacted)


@pytest.mark.parametrize("text", MORE_ORDINARY)
def test_more_ordinary_text_is_unchanged(text: str) -> None:
    assert DEFAULT.redact(text) == text


def test_pem_block_is_redacted_inside_json_text() -> None:
    text = json.dumps({"key": PEM, "n": 1})
    redacted = DEFAULT.redact(text)
    assert json.loads(redacted) == {"key": REDACTED, "n": 1}


@pytest.mark.parametrize(
    "value",
    [
        {"note": "my password=hunter2"},
        {"note": "password='hunter2"},
        {"x": "password=", "y": 1},
        {"password=": "x", "token:": 2},
        ["token='", "x'"],
        {"a": "x 'password': ", "b": 1},
        {"a": "Bearer abcdef123456\\"},
        {"t": 'secret="a,b"', "u": "api_key=\\"},
    ],
)
def test_json_text_stays_valid(value: object) -> None:
    text = json.dumps(value)
    redacted = DEFAULT.redact(text)
    assert _same_shape(json.loads(redacted), value)
    assert "hunter2" not in redacted


def test_a_secret_group_keeps_the_rest_of_the_match() -> None:
    redactor = Redactor([r"pin (?P<secret>\d+)", r"card (?P<secret>\d*)x"])
    assert redactor.redact("pin 1234, card x") == "pin [REDACTED], card x"


# -- keys that name secrets -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "passwd",
        "pwd",
        "DB_PASSWORD",
        "api_key",
        "apikey",
        "apiKey",
        "x-api-key",
        "X-API-KEY",
        "secret",
        "client_secret",
        "clientSecret",
        "token",
        "access_token",
        "accessToken",
        "refresh-token",
        "secret_key",
        "private_key",
        "passphrase",
    ],
)
def test_keys_that_name_secrets(key: str) -> None:
    assert names_secret(key)


@pytest.mark.parametrize(
    "key",
    [
        "max_tokens",
        "input_tokens",
        "output_tokens",
        "token_count",
        "maxTokens",
        "token_type",
        "tokenizer",
        "secret_name",
        "password_policy",
        "keyboard",
        "monkey",
        "",
        "_",
        "role",
    ],
)
def test_keys_that_do_not_name_secrets(key: str) -> None:
    assert not names_secret(key)


# -- redact_data --------------------------------------------------------------------------------


def test_redact_data_redacts_values_not_keys() -> None:
    item = {
        "type": "function_call",
        "arguments": json.dumps({"password": "pw1", "q": "x"}),
        "password=k": "say password=pw2",
        "headers": {"Authorization": "Bearer abcdef123456", "X-Api-Key": "k3"},
        "auth": {"client_secret": ["s1", {"deep": "s2"}, 7, None, True], "token": ""},
        "usage": {"max_tokens": 100, "input_tokens": 5, "token_count": 3},
        "content": [{"type": "output_text", "text": f"use {JWT}"}],
    }
    before = copy.deepcopy(item)
    redacted = DEFAULT.redact_data(item)
    assert item == before  # the input is never changed
    assert redacted == {
        "type": "function_call",
        "arguments": json.dumps({"password": REDACTED, "q": "x"}),
        "password=k": "say password=[REDACTED]",
        "headers": {"Authorization": "Bearer [REDACTED]", "X-Api-Key": REDACTED},
        "auth": {
            "client_secret": [REDACTED, {"deep": REDACTED}, REDACTED, None, True],
            "token": "",
        },
        "usage": {"max_tokens": 100, "input_tokens": 5, "token_count": 3},
        "content": [{"type": "output_text", "text": "use [REDACTED]"}],
    }


def test_redact_data_scalars_and_sequences() -> None:
    assert DEFAULT.redact_data("password=x") == "password=[REDACTED]"
    for scalar in (None, True, 3, 2.5):
        assert DEFAULT.redact_data(scalar) == scalar
    assert DEFAULT.redact_data(("token=a", 1)) == ("token=[REDACTED]", 1)
    assert DEFAULT.redact_data({"password": 1234, "pin": 1234}) == {
        "password": REDACTED,
        "pin": 1234,
    }


def test_logprob_tokens_are_model_output() -> None:
    entry = {"token": "Hello", "logprob": -0.25, "top_logprobs": [{"token": "Hi", "logprob": -2.0}]}
    assert DEFAULT.redact_data(entry) == entry


def test_redact_data_without_patterns_returns_the_value() -> None:
    value = {"password": "x"}
    assert Redactor([]).redact_data(value) is value


def test_redact_data_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    redactor = Redactor(DEFAULT_SECRET_PATTERNS)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pattern was compiled while redacting")

    monkeypatch.setattr(re, "compile", refuse)
    monkeypatch.setattr(re, "sub", refuse)
    item = {"role": "user", "content": [{"type": "input_text", "text": "hi " * 600}], "k": [1]}
    assert redactor.redact_data(item) == item


# -- properties ---------------------------------------------------------------------------------

# (text holding a secret, the secret itself): what is injected and must not survive.
INJECTED = [
    ("password=Hx7rT2qZ", "Hx7rT2qZ"),
    ("api_key=Kq93LmZ0", "Kq93LmZ0"),
    ("token=Tq8mZ3vW", "Tq8mZ3vW"),
    ("secret=Wz5Pn1Ls", "Wz5Pn1Ls"),
    ('"password": "Pv2Xc8Jd"', "Pv2Xc8Jd"),
    ("Bearer abc123DEF456ghi", "abc123DEF456ghi"),
    ("sk-proj-AbC123dEf456GhI789jKl012", "AbC123dEf456GhI789jKl012"),
    (f"ghp_{GH_BODY}", GH_BODY),
    ("AKIAIOSFODNN7EXAMPLE", "IOSFODNN7EXAMPLE"),
    (JWT, "eyJzdWIiOiIxMjM0In0"),
    (STRIPE, "4eC39HqLyjWDarjtT1zdp7dc"),
    (SLACK, "AbCdEfGhIjKlMnOpQrStUvWx"),
    (GOOGLE, GOOGLE[4:]),
    (PEM, "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn"),
]
UNDER_KEY = "Uk7Qm2Rx"  # the only string put under keys that name secrets
SECRET_KEYS = ["password", "api_key", "client_secret", "access_token", "x-api-key", "apiKey"]

texts_with_secrets = st.builds(
    lambda before, injected, after: f"{before} {injected[0]} {after}",
    st.text(max_size=8),
    st.sampled_from(INJECTED),
    st.text(max_size=8),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    texts_with_secrets,
)
under_secret_key = st.recursive(
    st.one_of(st.just(UNDER_KEY), st.integers(), st.none(), st.booleans()),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    keyed = st.tuples(st.sampled_from(SECRET_KEYS), under_secret_key)
    plain = st.tuples(st.text(max_size=8).filter(lambda k: not names_secret(k)), children)
    return st.lists(children, max_size=4) | st.lists(keyed | plain, max_size=4).map(dict)


json_values = st.recursive(scalars, _containers, max_leaves=20)
# Also pieces of keys, quotes, escapes and separators: for JSON text, what matters is
# that it still parses.
json_values_with_fragments = st.recursive(scalars | mixed_text, _containers, max_leaves=20)


def _same_shape(a: object, b: object) -> bool:
    if isinstance(b, dict):
        return (
            isinstance(a, dict) and list(a) == list(b) and all(_same_shape(a[k], b[k]) for k in b)
        )
    if isinstance(b, list | tuple):
        return isinstance(a, list | tuple) and len(a) == len(b) and all(map(_same_shape, a, b))
    return not isinstance(a, dict | list | tuple)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_redacted_data_is_json_of_the_same_shape_without_secrets(value: object) -> None:
    before = json.dumps(value)
    redacted = DEFAULT.redact_data(value)
    assert json.dumps(value) == before
    text = json.dumps(redacted)
    assert _same_shape(json.loads(text), value)
    for _, secret in INJECTED:
        assert secret not in text
    assert UNDER_KEY not in text


@settings(max_examples=150, deadline=None)
@given(json_values_with_fragments, st.booleans())
def test_redacted_json_text_still_parses(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert _same_shape(json.loads(DEFAULT.redact(text)), value)
