"""How relevant each preference is to a request: cosine similarity of worker embeddings.

The texts are embedded through the household (`Household.async_embed`: routed like
chat, the household's chosen embedding model first, each try bounded by
`EMBEDDING_TIMEOUT`). Vectors of preference texts are cached in memory per
(model, text), least recently used dropped beyond `EMBEDDING_CACHE_SIZE`; the
request is embedded together with the texts missing from the cache, in one request.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

from homeassistant.core import HomeAssistant

from .const import LOGGER
from .household import Household, NoWorkerError, RequestNotServableError

EMBEDDING_TIMEOUT: Final = 3.0  # per worker asked: the prompt must not wait long for relevance
EMBEDDING_CACHE_SIZE: Final = 4096


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


class Relevance:
    """Similarity of texts to a query, with the texts' vectors cached per model."""

    def __init__(self, hass: HomeAssistant) -> None:
        self.hass = hass
        self.vectors: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    async def _async_embed(self, texts: list[str]) -> tuple[str, list[list[float]]] | None:
        """Embeddings of the texts and the model that made them; None when no worker
        gave them in time."""
        try:
            return await Household.get(self.hass).async_embed(texts, per_try_s=EMBEDDING_TIMEOUT)
        except (NoWorkerError, RequestNotServableError) as err:
            LOGGER.debug("No embeddings: %r", err)
            return None

    async def async_similarities(self, query: str, texts: list[str]) -> list[float] | None:
        """Cosine similarity of each text to the query; None without embeddings."""
        model = Household.get(self.hass).embedding_model()
        if model is None:
            return None
        missing = [t for t in dict.fromkeys(texts) if (model, t) not in self.vectors]
        result = await self._async_embed([query, *missing])
        if result is None:
            return None
        used_model, vectors = result
        if used_model != model:  # another worker answered: its vectors for everything
            missing = list(dict.fromkeys(texts))
            result = await self._async_embed([query, *missing])
            if result is None or result[0] != used_model:
                return None
            vectors = result[1]
            model = used_model
        query_vector = vectors[0]
        for text, vector in zip(missing, vectors[1:], strict=True):
            self.vectors[(model, text)] = vector
        for text in texts:
            self.vectors.move_to_end((model, text))
        while len(self.vectors) > EMBEDDING_CACHE_SIZE:
            self.vectors.popitem(last=False)
        return [cosine(query_vector, self.vectors[(model, text)]) for text in texts]
