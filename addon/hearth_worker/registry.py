"""The models a worker serves: loading, warm-up, adding and removing them at run time.

Two sources of model folders:

* the models directory (``serve --models-dir``, default ``<state-dir>/models``):
  every valid model folder in it is served; pulls land there, and these models
  may be removed through the API. A folder that is not a model is skipped with a
  warning; hidden folders (``.partial``, where pulls download) are ignored.
* ``serve --model FOLDER``: extra folders, served as given and never removed.

Piper voices (``hearth-model.json`` of kind ``tts``) are not this registry's:
``speech.py`` serves them, from both sources; the registry passes them by quietly.
Speech-to-text models (kind ``stt``, format ``genai-whisper``) are: loaded with
``stt_engine.WhisperEngine``, warmed up on a second of silence, held like the others
(``hold_stt``; ``transcription.py`` serves them) and listed with kind ``stt``.

The HTTP app (``server.py``) asks the registry for a model per request and holds
it while the request runs (``use``): a model being removed is gone for new
requests at once, and unloaded only when the requests running on it have ended.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

from . import voices
from .capacity import RateTracker, SpeechCosts
from .chat_engine import ChatModel, Sampling
from .embedding_engine import EmbeddingModel
from .manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest
from .prompt_cache import PromptCache
from .stt_engine import WhisperEngine

_LOGGER = logging.getLogger(__name__)

WARMUP_PROMPT_TOKENS = 32
WARMUP_NEW_TOKENS = 8
STT_KIND = "stt"
STT_RUNTIME = "genai-whisper"
STT_WARMUP_S = 1.0  # of silence, at the model's rate


class SttEngine(Protocol):
    """A speech-to-text model (``stt_engine.WhisperEngine``): 16-bit mono PCM at
    ``sample_rate`` in, its text out (blocking: run it in an executor)."""

    @property
    def languages(self) -> Sequence[str]: ...

    @property
    def sample_rate(self) -> int: ...

    def transcribe(self, pcm: bytes, language: str | None) -> str: ...


Engine = ChatModel | EmbeddingModel | SttEngine
_E = TypeVar("_E", ChatModel, EmbeddingModel, SttEngine)


def _kind(folder: Path) -> str | None:
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def read_stt_manifest(folder: Path) -> Manifest:
    """A speech-to-text model folder's ``hearth-model.json`` (kind ``stt``)."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest(
            path=folder,
            name=str(data["name"]),
            kind=STT_KIND,
            runtime=str(data.get("format") or data.get("runtime") or STT_RUNTIME),
            quantization=str(data.get("quantization") or ""),
            context_length=int(data.get("context_length") or 0),
            size_bytes=int(data.get("size_bytes") or 0),
            files=list(data.get("files") or []),
            embedding=None,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{path} is not a usable speech-to-text manifest: {err!r}") from err
    if data.get("kind") != STT_KIND:
        raise ManifestError(f"{path}: not a speech-to-text model")
    missing = [f["path"] for f in manifest.files if not (folder / f["path"]).is_file()]
    if missing:
        raise ManifestError(f"{folder} is missing files listed in its manifest: {missing}")
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a chat, embedding or speech-to-text model folder."""
    if _kind(folder) == STT_KIND:
        return read_stt_manifest(folder)
    return load_manifest(folder)


def load_stt(folder: Path, threads: int | None = None) -> SttEngine:
    """Load a speech-to-text model folder (blocking)."""
    return WhisperEngine.load(folder, threads=threads)


class ModelNotRemovable(Exception):
    """The model was given with ``--model``: it is not the API's to remove."""


class DuplicateModel(ManifestError):
    """Another model with the same name is served already."""


@dataclass
class _Served:
    manifest: Manifest
    engine: Engine
    removable: bool
    users: int = 0  # requests holding the model now
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while users == 0

    def __post_init__(self) -> None:
        self.idle.set()


class Held(Generic[_E]):  # noqa: UP046 - runs on Python 3.11
    """One request's hold on a served model (a context manager, entered at once)."""

    def __init__(self, served: _Served, engine: _E) -> None:
        self._served = served
        self.engine: _E = engine

    def __enter__(self) -> _E:
        self._served.users += 1
        self._served.idle.clear()
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self._served.users -= 1
        if self._served.users == 0:
            self._served.idle.set()


class ModelRegistry:
    """The served models by id (the manifest's name), in the order they were added."""

    def __init__(
        self,
        *,
        fixed_dirs: list[Path],
        models_dir: Path | None,
        rates: RateTracker,
        threads: int | None = None,
        warmup: bool = True,
        remove_folder: Callable[[Path, str], Path] | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.fixed_dirs = list(fixed_dirs)
        self.models_dir = models_dir
        self.threads = threads
        self.warmup = warmup
        self._rates = rates
        self.speech_costs = SpeechCosts()  # the speech models' (transcription.py, speech.py)
        self._remove_folder = remove_folder
        self.prompt_cache = prompt_cache  # shared by the chat models; each drops its own
        self._served: dict[str, _Served] = {}
        self._adding = threading.Lock()  # publishing models: one at a time

    # -- what is served ---------------------------------------------------------

    @property
    def manifests(self) -> dict[str, Manifest]:
        return {model_id: served.manifest for model_id, served in self._served.items()}

    @property
    def chat_models(self) -> dict[str, ChatModel]:
        return {
            model_id: served.engine
            for model_id, served in self._served.items()
            if isinstance(served.engine, ChatModel)
        }

    @property
    def embedding_models(self) -> dict[str, EmbeddingModel]:
        return {
            model_id: served.engine
            for model_id, served in self._served.items()
            if isinstance(served.engine, EmbeddingModel)
        }

    @property
    def stt_models(self) -> dict[str, SttEngine]:
        return {
            model_id: cast(SttEngine, served.engine)
            for model_id, served in self._served.items()
            if served.manifest.kind == STT_KIND
        }

    def hold_stt(self, model_id: str) -> Held[SttEngine]:
        """The speech-to-text model of that id, as ``hold_chat``."""
        served = self._served.get(model_id)
        if served is None or served.manifest.kind != STT_KIND:
            raise KeyError(model_id)
        return Held(served, cast(SttEngine, served.engine))

    def hold_chat(self, model_id: str) -> Held[ChatModel]:
        """The chat model of that id, to hold (``with``) while a request runs on it;
        KeyError when none is served. A removal waits until every hold is released."""
        return self._hold(model_id, ChatModel)

    def hold_embedding(self, model_id: str) -> Held[EmbeddingModel]:
        """The embedding model of that id, as ``hold_chat``."""
        return self._hold(model_id, EmbeddingModel)

    def _hold(self, model_id: str, kind: type[_E]) -> Held[_E]:
        served = self._served.get(model_id)
        if served is None or not isinstance(served.engine, kind):
            raise KeyError(model_id)
        return Held(served, served.engine)

    # -- loading ------------------------------------------------------------------

    def load_all(self) -> None:
        """Load the ``--model`` folders, then every model in the models directory (blocking).

        A ``--model`` folder that cannot be loaded stops the start (ManifestError);
        a folder in the models directory that cannot is skipped with a warning.
        """
        fixed = {path.resolve() for path in self.fixed_dirs}
        for model_dir in self.fixed_dirs:
            if voices.is_voice_folder(model_dir):
                if voices.read_voice(model_dir) is None:
                    raise ManifestError(f"{model_dir}: not a usable Piper voice (see above)")
                continue  # a voice: speech.py serves it
            manifest = read_manifest(model_dir)
            if manifest.name in self._served:
                raise DuplicateModel(f"Two models are named {manifest.name!r}")
            self._publish(manifest, self._load(manifest), removable=False)
        for model_dir in self.scan():
            if model_dir.resolve() in fixed or voices.is_voice_folder(model_dir):
                continue  # a voice (speech.py serves it, or warns when it is broken)
            try:
                manifest = read_manifest(model_dir)
            except ManifestError as err:
                _LOGGER.warning("Skipping %s: not a model folder: %s", model_dir, err)
                continue
            if manifest.name in self._served:
                _LOGGER.warning(
                    "Skipping %s: a model named %r is served already (from %s)",
                    model_dir,
                    manifest.name,
                    self._served[manifest.name].manifest.path,
                )
                continue
            try:
                engine = self._load(manifest)
            except Exception as err:  # one broken model must not stop the others
                _LOGGER.warning("Skipping %s: the model could not be loaded: %s", model_dir, err)
                continue
            self._publish(manifest, engine, removable=True)
        if not self._served:
            _LOGGER.warning(
                "No model to serve yet: this worker starts without one. Add one from Home "
                "Assistant, or run 'hearth-worker pull SOURCE' (models directory: %s)",
                self.models_dir,
            )

    def scan(self) -> list[Path]:
        """The candidate model folders in the models directory (hidden ones left out)."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        return sorted(
            path
            for path in self.models_dir.iterdir()
            if path.is_dir() and not path.name.startswith(".")
        )

    def _load(self, manifest: Manifest) -> Engine:
        """Load (and warm up) one model; blocking."""
        started = time.perf_counter()
        engine: Engine
        if manifest.kind == "chat":
            engine = ChatModel(manifest, threads=self.threads, cache=self.prompt_cache)
            if self.warmup:
                self._warm_up(engine)
                if engine.batching:  # the first voice command need not wait for it (~1 s)
                    engine.grammars.prepare()
        elif manifest.kind == STT_KIND:
            engine = stt = load_stt(manifest.path, self.threads)
            if self.warmup:  # the first command is fast
                silence = bytes(2 * int(stt.sample_rate * STT_WARMUP_S))
                stt.transcribe(silence, stt.languages[0] if stt.languages else None)
        else:
            engine = EmbeddingModel(manifest, threads=self.threads)
        _LOGGER.info(
            "Loaded %s model %s (%s) in %.1f s",
            manifest.kind,
            manifest.name,
            manifest.quantization,
            time.perf_counter() - started,
        )
        return engine

    def _warm_up(self, model: ChatModel) -> None:
        """One short generation, so capacity reports real rates from the start."""
        space = model.encode(" ")
        prompt = [space[0] if space else 0] * WARMUP_PROMPT_TOKENS
        result = model.generate(
            prompt, Sampling(max_new_tokens=WARMUP_NEW_TOKENS), lambda _: None, threading.Event()
        )
        self._rates.seed(
            model.id,
            prefill_tok_s=result.prompt_tokens / result.prefill_s if result.prefill_s else None,
            decode_tok_s=(result.completion_tokens - 1) / result.decode_s
            if result.decode_s
            else None,
        )

    def _publish(self, manifest: Manifest, engine: Engine, *, removable: bool) -> None:
        with self._adding:
            if manifest.name in self._served:
                raise DuplicateModel(f"A model named {manifest.name!r} is served already")
            self._served[manifest.name] = _Served(manifest, engine, removable)

    # -- at run time ----------------------------------------------------------------

    async def add_model(self, folder: Path) -> Manifest:
        """Load and warm up the model in ``folder`` (off the event loop), then serve it.

        Raises ManifestError for a folder that is not a model and DuplicateModel when
        a model of the same name is served already (nothing is loaded then).
        """
        loop = asyncio.get_running_loop()
        manifest = await loop.run_in_executor(None, read_manifest, folder)
        if manifest.name in self._served:
            raise DuplicateModel(
                f"A model named {manifest.name!r} is served already: give this one another name"
            )
        engine = await loop.run_in_executor(None, self._load, manifest)
        try:
            self._publish(manifest, engine, removable=True)
        except DuplicateModel:
            await _unload(engine)
            raise
        _LOGGER.info("Now serving %s", manifest.name)
        return manifest

    async def remove_model(self, model_id: str) -> Manifest:
        """Stop serving a model, wait for its running requests, unload it and delete its
        folder. KeyError when it is not served; ModelNotRemovable for a ``--model`` one."""
        served = self._served.get(model_id)
        if served is None:
            raise KeyError(model_id)
        if not served.removable:
            raise ModelNotRemovable(model_id)
        del self._served[model_id]  # new requests get a 404 from now on
        if served.users:
            _LOGGER.info(
                "Removing %s: waiting for %d running request(s) on it", model_id, served.users
            )
        await served.idle.wait()
        self._rates.forget(model_id)
        self.speech_costs.forget(model_id)
        manifest, engine = served.manifest, served.engine
        del served
        await _unload(engine)
        loop = asyncio.get_running_loop()
        if self._remove_folder is not None and self.models_dir is not None:
            await loop.run_in_executor(None, self._remove_folder, self.models_dir, model_id)
        _LOGGER.info("Removed model %s (%s)", model_id, manifest.path)
        return manifest


async def _unload(engine: Engine) -> None:
    """Let go of a model: its prompt cache entries now, its sessions with the last reference."""
    if isinstance(engine, ChatModel):
        engine.close()
    del engine
    await asyncio.get_running_loop().run_in_executor(None, gc.collect)


__all__ = [
    "DuplicateModel",
    "ManifestError",
    "ModelNotRemovable",
    "ModelRegistry",
]
