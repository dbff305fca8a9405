"""What a worker serves and how busy it is, apart from HTTP (server.py answers with it).

``ModelHost`` holds the model registry (loading, warm-up, adding and removing models:
registry.py), the shared prompt cache, the admission of generations, the measured rates,
the pull jobs and the capacity snapshot, as ``llama_cpp/server/model.py`` stands beside
its ``app.py``.
"""

from __future__ import annotations

import time
from typing import Any

import onnxruntime as ort

from . import pull
from .admission import Admission
from .capacity import RateTracker, hardware_info, system_snapshot
from .chat_engine import ChatModel, GenerationResult
from .embedding_engine import EmbeddingModel
from .manifest import Manifest
from .prompt_cache import PromptCache
from .pull_jobs import PullJobs
from .registry import ModelRegistry
from .settings import WorkerSettings


class ModelHost:
    """The served models, the prompt cache, admission, rates and pull jobs of one worker."""

    def __init__(self, settings: WorkerSettings, node_id: str) -> None:
        self.node_id = node_id
        self.admission = Admission(settings.max_running, settings.max_queued)
        self.rates = RateTracker()
        self.prompt_cache = (
            PromptCache(settings.prompt_cache_mb * 1024 * 1024)
            if settings.prompt_cache_mb > 0
            else None
        )
        self.registry = ModelRegistry(
            prompt_cache=self.prompt_cache,
            fixed_dirs=settings.model_dirs,
            models_dir=settings.models_dir,
            rates=self.rates,
            threads=settings.threads,
            warmup=settings.warmup,
            remove_folder=pull.remove_model,
        )
        self.jobs = PullJobs(self.registry)
        self.hardware = hardware_info()
        self.providers = list(ort.get_available_providers())

    def load(self) -> None:
        """Load (and warm up) every model to serve; blocking: ``ModelRegistry.load_all``."""
        self.registry.load_all()

    @property
    def chat_models(self) -> dict[str, ChatModel]:
        return self.registry.chat_models

    @property
    def embedding_models(self) -> dict[str, EmbeddingModel]:
        return self.registry.embedding_models

    @property
    def manifests(self) -> dict[str, Manifest]:
        return self.registry.manifests

    def record(self, model_id: str, result: GenerationResult) -> None:
        """Count a finished generation in the model's measured rates."""
        self.rates.record(
            model_id,
            prompt_tokens=result.prompt_tokens,
            prefill_s=result.prefill_s,
            completion_tokens=max(0, result.completion_tokens - 1),
            decode_s=result.decode_s,
        )

    def model_info(self, manifest: Manifest) -> dict[str, Any]:
        """A model in /v1/info; a chat model also tells its guidance and sampling defaults."""
        info = manifest.public()
        chat = self.chat_models.get(manifest.name)
        if chat is not None:
            info |= chat.guidance.public()
            info["sampling_defaults"] = manifest.generation.public()
        return info

    def capacity_snapshot(self) -> dict[str, Any]:
        """What /v1/capacity answers: load, measured rates per model, the machine now."""
        rates = self.rates.snapshot()
        models = {
            name: rates.get(
                name, {"prefill_tok_s": None, "decode_tok_s": None, "requests_served": 0}
            )
            for name in self.manifests
        }
        for name, chat in self.chat_models.items():
            models[name] = {**models[name], "batch_peak_bytes": chat.batch_peak_bytes}
        return {
            "node_id": self.node_id,
            "running": self.admission.running,
            "queued": self.admission.queued,
            "max_running": self.admission.max_running,
            "max_queued": self.admission.max_queued,
            "prompt_cache": self._prompt_cache_snapshot(),
            "models": models,
            **system_snapshot(),
            "timestamp": time.time(),
        }

    def _prompt_cache_snapshot(self) -> dict[str, Any] | None:
        """Budget, bytes and the warm prefixes (hashes of token ids, never text) per model."""
        if self.prompt_cache is None:
            return None
        return {
            **self.prompt_cache.snapshot(),
            "warm_prefixes": {
                name: model.warm_prefixes() for name, model in self.chat_models.items()
            },
            "warm_keys": {name: model.warm_keys() for name, model in self.chat_models.items()},
        }
