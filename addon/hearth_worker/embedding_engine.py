"""Sentence embeddings with plain onnxruntime and the model's own tokenizer."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .manifest import Manifest


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
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self._session = ort.InferenceSession(
            str(manifest.path / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = Tokenizer.from_file(str(manifest.path / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.enable_padding()

    def embed(self, texts: list[str]) -> tuple[np.ndarray[Any, np.dtype[np.float32]], int]:
        """Embed `texts` (blocking); returns the vectors and the tokens used."""
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
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
        return vectors.astype(np.float32), int(mask.sum())
