"""Sentence embeddings with plain onnxruntime and the model's own tokenizer.

A request's inputs are tokenized first (each truncated to the model's length)
and refused when they hold more than ``max_request_tokens`` tokens together.
The model then runs on micro-batches of at most ``micro_batch_tokens`` padded
tokens (inputs sorted by length, so similar lengths share padding): the memory
of one run grows with batch size times length (and attention with length
squared), and 256 inputs of 512 tokens in one run would take gigabytes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from .manifest import Manifest

MAX_REQUEST_TOKENS = 16_384
MICRO_BATCH_TOKENS = 4_096

Vectors = np.ndarray[Any, np.dtype[np.float32]]


class EmbeddingTooLarge(ValueError):
    """The inputs hold more tokens than one request may."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(
            f"The input has {tokens} tokens; at most {limit} are embedded per request "
            "(split it over several requests)"
        )
        self.tokens = tokens
        self.limit = limit


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group input indices so that each group's padded size (inputs x longest) is at
    most ``max_tokens``; an input longer than that on its own gets a group of one.
    Groups hold inputs of similar length (sorted), every index exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max(lengths[index], 1)  # sorted: the newcomer is the longest
        if current and longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class EmbeddingModel:
    """One embedding model (an optimum feature-extraction export)."""

    def __init__(self, manifest: Manifest, *, threads: int | None = None) -> None:
        assert manifest.embedding is not None
        self.manifest = manifest
        self.id = manifest.name
        self.dimensions = int(manifest.embedding["dimensions"])
        self.pooling = str(manifest.embedding.get("pooling", "mean"))
        self.normalize = bool(manifest.embedding.get("normalize", True))
        self.max_tokens = min(manifest.context_length, 512)
        self.max_request_tokens = MAX_REQUEST_TOKENS
        self.micro_batch_tokens = max(MICRO_BATCH_TOKENS, self.max_tokens)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self._session = ort.InferenceSession(
            str(manifest.path / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = Tokenizer.from_file(str(manifest.path / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.enable_padding()
        self._pad_id = int((self._tokenizer.padding or {}).get("pad_id", 0))
        self._tokenizer.no_padding()  # padded per micro-batch

    def tokenize(self, texts: list[str]) -> list[Encoding]:
        """Tokenize (blocking); raises EmbeddingTooLarge beyond the request's budget."""
        encodings = self._tokenizer.encode_batch(texts)
        tokens = sum(len(e.ids) for e in encodings)
        if tokens > self.max_request_tokens:
            raise EmbeddingTooLarge(tokens, self.max_request_tokens)
        return list(encodings)

    def embed_tokens(self, encodings: list[Encoding]) -> tuple[Vectors, int]:
        """Embed tokenized inputs (blocking), micro-batch by micro-batch."""
        vectors = np.zeros((len(encodings), self.dimensions), dtype=np.float32)
        lengths = [len(e.ids) for e in encodings]
        for batch in micro_batches(lengths, self.micro_batch_tokens):
            vectors[batch] = self._run([encodings[i] for i in batch])
        return vectors, sum(lengths)

    def embed(self, texts: list[str]) -> tuple[Vectors, int]:
        """Embed `texts` (blocking); returns the vectors and the tokens used."""
        return self.embed_tokens(self.tokenize(texts))

    def _run(self, encodings: list[Encoding]) -> Vectors:
        longest = max(1, *(len(e.ids) for e in encodings))
        ids = np.full((len(encodings), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), longest), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0].astype(np.float32)
        if self.pooling == "cls":
            vectors = hidden[:, 0, :]
        else:
            weights = mask[:, :, None].astype(np.float32)
            vectors = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self.normalize:
            vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        result: Vectors = vectors.astype(np.float32)
        return result
