"""Read a model folder's `hearth-model.json` (written by scripts/export_model).

A chat model's sampling defaults come from the folder too: its own
``generation_config.json`` when the export kept it, else the ``search`` section of
``genai_config.json`` (which onnxruntime-genai's builder fills from it). Where the
model says nothing about repetition, Hearth's repetition penalty applies: greedy
decoding without one makes small models loop.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

MANIFEST_NAME = "hearth-model.json"
KINDS = ("chat", "embedding", "stt")  # stt: Whisper (stt_engine.py)
GENERATION_CONFIG = "generation_config.json"
GENAI_CONFIG = "genai_config.json"
# Used where the model does not say (measured on SmolLM2-135M-Instruct: greedy
# decoding loops on "What is the capital of France?" without it, ends after one
# sentence with it).
DEFAULT_REPETITION_PENALTY = 1.1
# transformers' GenerationConfig defaults, for keys a generation_config.json leaves out.
_HF_TEMPERATURE = 1.0
_HF_TOP_P = 1.0
_HF_TOP_K = 50


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling used where a request sets nothing; temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    no_repeat_ngram_size: int = 0
    # Where the values come from: "generation_config.json", "genai_config.json" or
    # "hearth" (the model folder says nothing); repetition control may still be Hearth's.
    source: str = "hearth"
    repetition_source: str = "hearth"
    vocab_size: int | None = None  # a top_k of at least this cuts nothing

    def public(self) -> dict[str, Any]:
        """What /v1/info tells about them."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "source": self.source,
            "repetition_source": self.repetition_source,
        }

    def search_options(
        self,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """onnxruntime-genai search options: the request's values, else these defaults.

        A temperature of 0 (asked for, or the default) is greedy decoding: the
        same answer every time. Repetition control applies either way.
        """
        temp = self.temperature if temperature is None else temperature
        options: dict[str, Any] = {
            "repetition_penalty": (
                self.repetition_penalty if repetition_penalty is None else repetition_penalty
            ),
            "no_repeat_ngram_size": (
                self.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size
            ),
        }
        if temp > 0:
            k = self.top_k if top_k is None else top_k
            if self.vocab_size is not None and k >= self.vocab_size:
                k = 0  # onnxruntime-genai refuses a top_k beyond the vocabulary
            options |= {
                "do_sample": True,
                "temperature": temp,
                "top_p": self.top_p if top_p is None else top_p,
                "top_k": k,
            }
            if seed is not None:
                options["random_seed"] = seed
        else:
            options["do_sample"] = False
        return options


def _number(data: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and low <= value <= high else None


def _read_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        _LOGGER.warning("Cannot read %s (%s): using Hearth's sampling defaults", path, err)
        return None
    return data if isinstance(data, dict) else None


def read_generation_defaults(model_dir: Path) -> GenerationDefaults:
    """The sampling defaults a chat model folder states (see the module's docstring)."""
    genai = model_dir / GENAI_CONFIG
    genai_data = (_read_object(genai) or {}) if genai.is_file() else {}
    model = genai_data.get("model")
    vocab = _number(model, "vocab_size", 1, 2**31 - 1) if isinstance(model, dict) else None
    vocab_size = None if vocab is None else int(vocab)
    config = model_dir / GENERATION_CONFIG
    if config.is_file():
        data = _read_object(config)
        if data is not None:
            return _from_values(data, GENERATION_CONFIG, said=set(data), vocab_size=vocab_size)
    search = genai_data.get("search")
    if isinstance(search, dict):
        # The builder writes every key, with its own defaults for those the model
        # left out: only values other than those defaults are the model's.
        said: set[str] = set()
        if search.get("do_sample") is True:
            said.add("do_sample")
        if _number(search, "repetition_penalty", 0, 100) not in (None, 1.0):
            said.add("repetition_penalty")
        if search.get("no_repeat_ngram_size"):
            said.add("no_repeat_ngram_size")
        return _from_values(search, GENAI_CONFIG, said=said, vocab_size=vocab_size)
    return GenerationDefaults(vocab_size=vocab_size)


def _from_values(
    data: dict[str, Any], source: str, *, said: set[str], vocab_size: int | None
) -> GenerationDefaults:
    values: dict[str, Any] = {"vocab_size": vocab_size}
    if data.get("do_sample") is True and "do_sample" in said:
        temperature = _number(data, "temperature", 0.0, 100.0)
        values["temperature"] = _HF_TEMPERATURE if temperature is None else temperature
        top_p = _number(data, "top_p", 0.0, 1.0)
        values["top_p"] = top_p or _HF_TOP_P
        top_k = _number(data, "top_k", 0, 2**31 - 1)
        values["top_k"] = _HF_TOP_K if top_k is None else int(top_k)
        values["source"] = source
    if said & {"repetition_penalty", "no_repeat_ngram_size"}:
        penalty = _number(data, "repetition_penalty", 0.0, 100.0)
        values["repetition_penalty"] = penalty or 1.0
        size = _number(data, "no_repeat_ngram_size", 0, 2**31 - 1)
        values["no_repeat_ngram_size"] = int(size or 0)
        values["repetition_source"] = values["source"] = source
    return GenerationDefaults(**values)


class ManifestError(ValueError):
    """A model folder is missing, incomplete or not one the worker can serve."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    kind: str
    runtime: str
    quantization: str
    context_length: int
    size_bytes: int
    files: list[dict[str, Any]]
    embedding: dict[str, Any] | None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def dimensions(self) -> int | None:
        return int(self.embedding["dimensions"]) if self.embedding else None

    def public(self) -> dict[str, Any]:
        """What /v1/info and /v1/models tell about this model."""
        return {
            "id": self.name,
            "kind": self.kind,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "size_bytes": self.size_bytes,
            "dimensions": self.dimensions,
        }


def load_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_NAME
    if not model_dir.is_dir():
        raise ManifestError(f"Model folder {model_dir} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ManifestError(
            f"{model_dir} has no {MANIFEST_NAME}: export the model with scripts/export_model"
        ) from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    try:
        manifest = Manifest(
            path=model_dir,
            name=str(data["name"]),
            kind=str(data["kind"]),
            runtime=str(data["runtime"]),
            quantization=str(data["quantization"]),
            context_length=int(data["context_length"]),
            size_bytes=int(data["size_bytes"]),
            files=list(data["files"]),
            embedding=data.get("embedding"),
            generation=read_generation_defaults(model_dir)
            if data.get("kind") == "chat"
            else GenerationDefaults(),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"{path} is incomplete: {err!r}") from err
    if manifest.kind not in KINDS:
        raise ManifestError(f"{path}: unknown kind {manifest.kind!r}")
    if manifest.kind == "embedding" and not manifest.embedding:
        raise ManifestError(f"{path}: an embedding model needs the 'embedding' section")
    missing = [f["path"] for f in manifest.files if not (model_dir / f["path"]).is_file()]
    if missing:
        raise ManifestError(f"{model_dir} is missing files listed in its manifest: {missing}")
    return manifest
