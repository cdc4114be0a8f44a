"""Token counts for context windows, and the summarizer compaction calls (SPEC §14).

A message counts its ``tokens`` when it was given them, else what
``EngineSettings.token_counter`` says of its content; by default
:func:`estimate_tokens`, an estimate that needs no tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from .models import Message

__all__ = ["Summarizer", "TokenCounter", "estimate_tokens"]

#: Counts the tokens of a text (``EngineSettings.token_counter``).
TokenCounter = Callable[[str], int]

#: Writes the summary of the messages a compaction replaces, oldest first (the previous
#: summary, if any, first of all): ``await summarizer(messages) -> str``
#: (``EngineSettings.summarizer``, ``compact_history``).
Summarizer = Callable[[list[Message]], Awaitable[str]]

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
#: Each match is about one token of a byte-pair encoding (OpenAI's o200k_base and
#: cl100k_base): a CJK, kana or hangul character; an ASCII word, or each piece of up
#: to 8 letters of a longer one; up to 4 other letters (accented, Cyrillic, Arabic, ...);
#: up to 3 digits; a run of line breaks; up to 3 punctuation characters. Spaces and
#: tabs count nothing: a BPE folds them into the next token.
_TOKEN = re.compile(rf"[{_CJK}]|[A-Za-z]{{1,8}}|[^\W\d_{_CJK}]{{1,4}}|\d{{1,3}}|\n+|[^\w\s]{{1,3}}")


def estimate_tokens(text: str) -> int:
    """About how many tokens ``text`` is for a current OpenAI tokenizer, without one.

    Measured against o200k_base and cl100k_base on 650 varied texts (prose, Python,
    JSON agent items, eight other languages, ids and base64, short chat turns;
    ``python -m benchmarks.token_estimate``): mean absolute error 8-9 % per text,
    90 % of texts within 22-25 %, totals within 2 %. It runs low on random ids and
    base64 (-23 %) and, for o200k_base, high on non-Latin scripts (+23 %). About
    0.15 µs per character. Give ``tokens=`` or a real ``token_counter`` where exact
    counts matter."""
    return len(_TOKEN.findall(text))
