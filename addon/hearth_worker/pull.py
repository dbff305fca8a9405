"""Pull a model from the Hugging Face Hub into a models folder (`hearth-worker pull`).

A source is ``owner/name`` or ``owner/name:sub/folder`` naming one of:

* an onnxruntime-genai chat model (a folder with ``genai_config.json``);
* a Whisper model exported for onnxruntime-genai (``genai_config.json`` of model type
  ``whisper`` beside ``audio_processor_config.json``, the encoder and decoder): kind
  ``stt``, format ``genai-whisper``, with its languages (from ``tokenizer.json``'s
  language tokens) and sample rate in the manifest, as scripts/export_model writes them;
* a Piper voice (``VOICE.onnx`` with ``VOICE.onnx.json`` beside it, as
  ``rhasspy/piper-voices:en/en_US/joe/medium`` holds one): only those two files are
  pulled, and ``hearth-model.json`` (kind ``tts``) is written by the worker's own
  voice import (``voices.import_piper_voice``);
* an ONNX embedding model (``model.onnx`` beside or under the folder,
  ``onnx/model.onnx`` with the tokenizer at the repository's root being the common
  layout).

The repository's file list (with sizes and hashes) comes from the Hub's API through
``huggingface_hub``; only the files the model needs are downloaded, into
``<models_dir>/.partial/<folder>/``, with our own HTTP requests against the Hub's
``/resolve/`` URLs: ``hf_hub_download`` deletes a half-downloaded file when it fails,
and cannot be interrupted between chunks. A retry resumes each file where it stopped
(an HTTP Range request). Every file is checked against the Hub's hashes (sha256 for
LFS files, the git blob id for the others); then ``hearth-model.json`` is written in
the format scripts/export_model writes, and the folder is renamed into
``<models_dir>/<folder>`` in one step: a model is visible complete or not at all.
Nothing is written outside ``models_dir`` (no ``~/.cache/huggingface``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import re
import shutil
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import httpx

from . import voices
from .manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

PARTIAL_DIR = ".partial"
SPACE_MARGIN_BYTES = 16 * 1024 * 1024  # the manifest, the file system's own blocks
ATTEMPTS_PER_FILE = 3  # a dropped connection that made progress is resumed at once
ERROR_CODES = (
    "unknown_repo",
    "unknown_subfolder",
    "not_a_model",
    "no_space",
    "network",
    "corrupt",
    "cancelled",
    "name_taken",
)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_PART = re.compile(r"[A-Za-z0-9._+=@-]+")
# Files a genai folder holds that no model needs.
_SKIPPED = {".gitattributes"}
# Words in a folder name that tell the device and quantization (kept in display names).
_HINT_WORDS = {
    "cpu",
    "gpu",
    "cuda",
    "dml",
    "directml",
    "webgpu",
    "mobile",
    "int4",
    "int8",
    "uint8",
    "q4",
    "q4f16",
    "q8",
    "fp16",
    "bf16",
    "fp32",
    "quantized",
}
# Embedding model files looked up beside the ONNX file, then in the folders above it.
_EMBEDDING_FILES = (
    "tokenizer.json",
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "modules.json",
    "sentence_bert_config.json",
)
_DECODER_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
GENAI_CONFIG = "genai_config.json"
AUDIO_PROCESSOR_CONFIG = "audio_processor_config.json"  # genai's Whisper export has one
STT_FORMAT = "genai-whisper"  # as stt_engine.FORMAT (not imported: it loads onnxruntime-genai)
WHISPER_SAMPLE_RATE = 16000  # what Whisper hears (stt_engine.SAMPLE_RATE)
# OpenAI's Whisper: a vocabulary this large or larger is multilingual (whisper-*.en: 51864).
WHISPER_MULTILINGUAL_VOCAB = 51865
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3})\|>")


class PullError(Exception):
    """A pull that cannot finish; `code` is one of ERROR_CODES, `message` one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class PullProgress:
    source: str
    phase: str  # "resolving" | "downloading" | "verifying" | "installing" | "done"
    total_bytes: int  # 0 until known
    done_bytes: int
    file: str | None  # file being downloaded


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    subfolder: str  # "" for the repository's root

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.subfolder}" if self.subfolder else self.repo_id

    @property
    def folder_name(self) -> str:
        """The model's folder in the models dir (one path component)."""
        parts = [*self.repo_id.split("/"), *(self.subfolder.split("/") if self.subfolder else [])]
        return "--".join(parts)


@dataclass(frozen=True)
class _HubFile:
    repo_path: str  # path in the repository
    local_path: str  # path in the model folder
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob id (sha1) of the others


@dataclass(frozen=True)
class _Plan:
    kind: str  # "chat" | "embedding" | "stt" | "tts"
    files: list[_HubFile]
    revision: str


def default_models_dir(state_dir: Path) -> Path:
    """Where `serve` and `pull` keep models unless told otherwise."""
    return state_dir / "models"


def parse_source(source: str) -> HubSource:
    """``owner/name`` or ``owner/name:sub/folder``; ValueError if malformed."""
    text = source.strip()
    repo_id, _, subfolder = text.partition(":")
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(
            f"{source!r} is not a Hugging Face model id: expected owner/name or owner/name:folder"
        )
    parts = [part for part in subfolder.strip("/").split("/") if part]
    for part in parts:
        if part in (".", "..") or not _PART.fullmatch(part):
            raise ValueError(f"{source!r}: {part!r} is not a folder name in a repository")
    return HubSource(repo_id, "/".join(parts))


def display_name(source: HubSource) -> str:
    """The repository's name, plus the device/quantization words of the subfolder's name
    ("Phi-4-mini-instruct-onnx-cpu-int4")."""
    repo_name = source.repo_id.split("/")[1]
    if not source.subfolder:
        return repo_name
    last = source.subfolder.split("/")[-1]
    words = [w for w in re.split(r"[-_]", last) if w.lower() in _HINT_WORDS]
    hint = "-".join(words) if words else last
    if hint.lower() in ("onnx", "model", "models") or hint.lower() in repo_name.lower():
        return repo_name
    return f"{repo_name}-{hint}"


def guess_quantization(text: str) -> str | None:
    words = {w.lower() for w in re.split(r"[-_/:.]", text)}
    for quant, markers in (
        ("int4", {"int4", "uint4", "q4", "q4f16", "4bit", "w4"}),
        ("int8", {"int8", "uint8", "qint8", "q8", "quantized", "8bit"}),
        ("fp16", {"fp16", "f16", "float16", "half"}),
        ("bf16", {"bf16"}),
        ("fp32", {"fp32", "f32"}),
    ):
        if words & markers:
            return quant
    return None


# ---------------------------------------------------------------------------- installed models


def read_model(folder: Path) -> Manifest:
    """The manifest of a model folder of any kind: chat, embedding, speech to text, or
    a Piper voice (kind ``tts``, read as the speech host reads it). ManifestError if
    the folder is not a complete model."""
    if voices.is_voice_folder(folder):
        voice = voices.read_voice(folder)
        if voice is None:
            raise ManifestError(f"{folder} is not a usable Piper voice")
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        return Manifest(
            path=folder,
            name=voice.name,
            kind=voices.KIND,
            runtime=voices.RUNTIME,
            quantization=str(data.get("quantization") or "fp32"),
            context_length=0,
            size_bytes=voice.size_bytes,
            files=list(data.get("files") or []),
            embedding=None,
        )
    return load_manifest(folder)


def installed_models(models_dir: Path) -> list[Manifest]:
    """The model folders in `models_dir` with a valid manifest, by name."""
    if not models_dir.is_dir():
        return []
    found = []
    for folder in sorted(models_dir.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            found.append(read_model(folder))
        except ManifestError:
            continue
    return sorted(found, key=lambda m: m.name)


def remove_model(models_dir: Path, model_id: str) -> Path:
    """Delete the model named `model_id` (or in the folder of that name); KeyError if none.

    The folder is first renamed out of sight, so a reader never sees half of it."""
    for manifest in installed_models(models_dir):
        if model_id in (manifest.name, manifest.path.name):
            folder = manifest.path
            trash = models_dir / PARTIAL_DIR / f".removing-{folder.name}-{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
            return folder
    raise KeyError(model_id)


# ---------------------------------------------------------------------------- pulling


def pull_model(
    source: str,
    models_dir: Path,
    *,
    name: str | None = None,
    progress: Callable[[PullProgress], None] | None = None,
    cancel: threading.Event | None = None,
    endpoint: str | None = None,
    free_space: Callable[[Path], int] | None = None,
) -> Path:
    """Download `source` into `models_dir` and return the installed model folder.

    Blocking (run it in a thread). Raises PullError; ValueError for a malformed source.
    `free_space` (bytes free at a path) is for tests; default shutil.disk_usage."""
    hub = parse_source(source)
    puller = _Puller(hub, models_dir, name, progress, cancel, endpoint, free_space)
    try:
        return puller.run()
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # filled by something else meanwhile
            raise PullError(
                "no_space",
                f"{models_dir} ran out of disk space while pulling {hub} (what was "
                "downloaded is kept: free some space and pull again)",
            ) from err
        raise


class _Puller:
    def __init__(
        self,
        hub: HubSource,
        models_dir: Path,
        name: str | None,
        progress: Callable[[PullProgress], None] | None,
        cancel: threading.Event | None,
        endpoint: str | None,
        free_space: Callable[[Path], int] | None,
    ) -> None:
        from huggingface_hub import constants  # noqa: PLC0415 (slow import, only when pulling)

        self.hub = hub
        self.models_dir = models_dir
        self.given_name = name.strip() if name and name.strip() else None
        self.name = self.given_name or display_name(hub)
        self.progress_cb = progress
        self.cancel = cancel or threading.Event()
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.free_space = free_space or (lambda path: shutil.disk_usage(path).free)
        self.final = models_dir / hub.folder_name
        self.partial = models_dir / PARTIAL_DIR / hub.folder_name
        self.state_path = models_dir / PARTIAL_DIR / f"{hub.folder_name}.pull.json"
        self.total = 0
        self.done = 0
        self._socket: socket.socket | None = None  # the connection being read
        self._socket_lock = threading.Lock()

    # -- progress and cancellation

    def _report(self, phase: str, file: str | None = None) -> None:
        if self.progress_cb is not None:
            self.progress_cb(PullProgress(str(self.hub), phase, self.total, self.done, file))

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise PullError(
                "cancelled",
                f"Pulling {self.hub} was cancelled (what was downloaded is kept for a retry)",
            )

    # -- the steps

    def run(self) -> Path:
        self._report("resolving")
        existing = self._installed_here()
        if existing is not None:
            self._report("done")
            return existing
        if self.given_name:  # before asking the hub
            self._check_name_free()
        plan = self._plan()  # names a voice after its file when no name was given
        self._check_name_free()
        self._check_cancel()
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with self._folder_lock():
            existing = self._installed_here()  # by another process while we waited
            if existing is not None:
                self._report("done")
                return existing
            return self._pull(plan)

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        """One pull of a folder at a time, across processes (the worker and the CLI):
        a second one waits (cancellable), then finds the model installed."""
        lock_path = self.models_dir / PARTIAL_DIR / f"{self.hub.folder_name}.lock"
        with lock_path.open("a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.cancel.wait(0.2):
                        self._check_cancel()
            try:
                yield
                lock_path.unlink(missing_ok=True)  # installed: a waiter finds the model
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _pull(self, plan: _Plan) -> Path:
        self.partial.mkdir(parents=True, exist_ok=True)
        self._forget_changed(plan)
        self.total = sum(f.size for f in plan.files)
        self.done = sum(min(self._have(f), f.size) for f in plan.files)
        self._check_space(plan)
        self._report("downloading")
        self._download_all(plan)
        self._report("verifying")
        fields = self._inspect(plan)
        self._check_cancel()
        self._report("installing")
        return self._install(fields)

    def _installed_here(self) -> Path | None:
        """The model folder if this source is installed already (a second pull is a no-op)."""
        try:
            read_model(self.final)
        except ManifestError:
            return None
        return self.final

    def _check_name_free(self) -> None:
        for manifest in installed_models(self.models_dir):
            if manifest.name == self.name:
                raise PullError(
                    "name_taken",
                    f"A model named {self.name!r} is installed already ({manifest.path.name}); "
                    "choose another name",
                )

    def _plan(self) -> _Plan:
        from huggingface_hub import HfApi  # noqa: PLC0415
        from huggingface_hub.errors import (  # noqa: PLC0415
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo = self.hub.repo_id
        try:
            info = HfApi(endpoint=self.endpoint).model_info(repo, files_metadata=True, timeout=30)
        except GatedRepoError as err:
            raise PullError(
                "unknown_repo",
                f"{repo} is a gated repository on Hugging Face: accept its terms there and "
                "set HF_TOKEN",
            ) from err
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise PullError(
                "unknown_repo", f"There is no model {repo} on Hugging Face ({self.endpoint})"
            ) from err
        except OfflineModeIsEnabled as err:
            raise PullError("network", f"Cannot pull {repo}: HF_HUB_OFFLINE is set") from err
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else "?"
            raise PullError(
                "network", f"Hugging Face answered HTTP {status} for {repo}: try again later"
            ) from err
        except httpx.HTTPError as err:
            raise PullError(
                "network", f"Cannot reach Hugging Face ({self.endpoint}): {_reason(err)}"
            ) from err
        revision = info.sha or "main"
        files: dict[str, _HubFile] = {}
        for sibling in info.siblings or []:
            parts = sibling.rfilename.split("/")
            if any(part in ("", ".", "..") for part in parts):  # never outside the folder
                continue
            lfs = sibling.lfs
            files[sibling.rfilename] = _HubFile(
                repo_path=sibling.rfilename,
                local_path=sibling.rfilename,
                size=int(lfs.size if lfs else sibling.size or 0),
                sha256=str(lfs.sha256) if lfs else None,
                blob_id=None if lfs else sibling.blob_id,
            )
        return self._select(files, revision)

    def _select(self, files: dict[str, _HubFile], revision: str) -> _Plan:
        sub = self.hub.subfolder
        prefix = f"{sub}/" if sub else ""
        under = {path: f for path, f in files.items() if path.startswith(prefix)}
        if not under:
            raise PullError("unknown_subfolder", self._no_folder_message(files))
        if f"{prefix}{GENAI_CONFIG}" in under:
            if f"{prefix}{AUDIO_PROCESSOR_CONFIG}" in under:
                return self._select_genai("stt", under, prefix, revision)
            return self._select_genai("chat", under, prefix, revision)
        voice = self._voice_in(under, prefix)
        if voice is not None:
            return self._select_voice(voice, under, prefix, revision)
        return self._select_embedding(files, prefix, revision)

    def _no_folder_message(self, files: dict[str, _HubFile]) -> str:
        models = _model_folders(files, "")
        hint = f"; folders with a model: {', '.join(models[:6])}" if models else ""
        return f"{self.hub.repo_id} has no folder {self.hub.subfolder!r}{hint}"

    def _select_genai(
        self, kind: str, under: dict[str, _HubFile], prefix: str, revision: str
    ) -> _Plan:
        """An onnxruntime-genai folder (chat, or Whisper for "stt"): its files, not
        those of the folders below it."""
        chosen = [
            _HubFile(f.repo_path, f.repo_path[len(prefix) :], f.size, f.sha256, f.blob_id)
            for path, f in sorted(under.items())
            if "/" not in path[len(prefix) :] and path[len(prefix) :] not in _SKIPPED
        ]
        names = {f.local_path for f in chosen}
        if "tokenizer.json" not in names:
            what = "a Whisper model's" if kind == "stt" else "a"
            raise PullError(
                "not_a_model",
                f"{self.hub} has {what} {GENAI_CONFIG} but no tokenizer.json: the worker "
                "cannot serve it",
            )
        return _Plan(kind, chosen, revision)

    @staticmethod
    def _voice_in(under: dict[str, _HubFile], prefix: str) -> str | None:
        """The Piper voice right in the folder (VOICE.onnx with VOICE.onnx.json): the
        .onnx file's name in it; PullError when there are several."""
        found = sorted(
            rest
            for path in under
            if "/" not in (rest := path[len(prefix) :])
            and rest.endswith(".onnx")
            and f"{path}.json" in under
        )
        if len(found) > 1:
            raise PullError(
                "not_a_model",
                f"{len(found)} Piper voices in one folder ({', '.join(found[:6])}): "
                "the worker serves a voice from a folder of its own",
            )
        return found[0] if found else None

    def _select_voice(
        self, onnx: str, under: dict[str, _HubFile], prefix: str, revision: str
    ) -> _Plan:
        """Only the voice's two files (not the model card, not other voices)."""
        chosen = [
            _HubFile(f.repo_path, name, f.size, f.sha256, f.blob_id)
            for name in (onnx, f"{onnx}.json")
            for f in (under[f"{prefix}{name}"],)
        ]
        # Named after its file (en_US-joe-medium), as the voice import names it.
        self.name = self.given_name or onnx.removesuffix(".onnx")
        return _Plan(voices.KIND, chosen, revision)

    def _select_embedding(self, files: dict[str, _HubFile], prefix: str, revision: str) -> _Plan:
        onnx_dir = next(
            (d for d in (prefix, f"{prefix}onnx/") if f"{d}model.onnx" in files),
            None,
        )
        if onnx_dir is None:
            below = _model_folders(files, prefix)
            hint = f"; folders below it with a model: {', '.join(below[:6])}" if below else ""
            raise PullError(
                "not_a_model",
                f"{self.hub} is not a model the worker can serve: no {GENAI_CONFIG} (an "
                "onnxruntime-genai chat model, or a Whisper model with "
                f"{AUDIO_PROCESSOR_CONFIG}), no VOICE.onnx with VOICE.onnx.json (a Piper "
                f"voice) and no model.onnx (an ONNX embedding model){hint}",
            )
        chosen = [
            _HubFile(f.repo_path, f.repo_path[len(onnx_dir) :], f.size, f.sha256, f.blob_id)
            for path, f in sorted(files.items())
            if path.startswith(f"{onnx_dir}model.onnx")
            and "/" not in path[len(onnx_dir) :]
            and re.fullmatch(r"model\.onnx([._]data)?", path[len(onnx_dir) :])
        ]
        # Tokenizer and configs: beside the ONNX file, else in the nearest folder above.
        folders = [onnx_dir]
        parts = onnx_dir.rstrip("/").split("/") if onnx_dir else []
        while parts:
            parts.pop()
            folders.append("/".join(parts) + "/" if parts else "")
        found_in: dict[str, str] = {}
        for wanted in _EMBEDDING_FILES:
            for folder in folders:
                if f"{folder}{wanted}" in files:
                    f = files[f"{folder}{wanted}"]
                    chosen.append(_HubFile(f.repo_path, wanted, f.size, f.sha256, f.blob_id))
                    found_in[wanted] = folder
                    break
        if "tokenizer.json" not in found_in or "config.json" not in found_in:
            raise PullError(
                "not_a_model",
                f"{self.hub} has a model.onnx but no tokenizer.json and config.json beside it "
                "or above it: not an embedding model the worker can serve",
            )
        if "modules.json" in found_in:  # sentence-transformers: the pooling module's config
            folder = found_in["modules.json"]
            for path, f in sorted(files.items()):
                rest = path[len(folder) :] if path.startswith(folder) else ""
                if re.fullmatch(r"\d+_Pooling/config\.json", rest):
                    chosen.append(_HubFile(f.repo_path, rest, f.size, f.sha256, f.blob_id))
        return _Plan("embedding", chosen, revision)

    # -- disk

    def _have(self, f: _HubFile) -> int:
        path = self.partial / f.local_path
        return path.stat().st_size if path.is_file() else 0

    def _forget_changed(self, plan: _Plan) -> None:
        """Drop partial files whose hub version changed since an earlier try."""
        wanted = {f.local_path: f.sha256 or f.blob_id for f in plan.files}
        try:
            before = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = {}
        if not isinstance(before, dict):
            before = {}
        for local, digest in before.get("files", {}).items():
            if wanted.get(local) != digest:
                (self.partial / local).unlink(missing_ok=True)
        for path in self.partial.rglob("*"):
            if path.is_file() and path.relative_to(self.partial).as_posix() not in wanted:
                path.unlink()
        state = {"source": str(self.hub), "revision": plan.revision, "files": wanted}
        self.state_path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    def _check_space(self, plan: _Plan) -> None:
        needed = self.total - self.done
        free = self.free_space(self.models_dir)
        if needed + SPACE_MARGIN_BYTES > free:
            raise PullError(
                "no_space",
                f"{self.hub} needs {_size(needed + SPACE_MARGIN_BYTES)} more disk space "
                f"and {self.models_dir} has {_size(free)} free",
            )

    # -- download

    def _download_all(self, plan: _Plan) -> None:
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # noqa: PLC0415

        headers = build_hf_headers()
        timeout = httpx.Timeout(30.0, connect=15.0)
        finished = threading.Event()
        watcher = threading.Thread(
            target=self._watch_cancel, args=(finished,), name="hearth-pull-cancel", daemon=True
        )
        watcher.start()
        try:
            with httpx.Client(follow_redirects=True, timeout=timeout, headers=headers) as client:
                for f in plan.files:
                    self._check_cancel()
                    self._download(client, f, plan.revision)
        finally:
            finished.set()
            watcher.join()

    def _watch_cancel(self, finished: threading.Event) -> None:
        """On cancel, shut the connection being read: a stalled one would otherwise keep
        the pull waiting until its read timeout before it sees the cancel."""
        while not finished.is_set():
            if self.cancel.wait(0.1):
                with self._socket_lock:
                    if self._socket is not None:
                        with contextlib.suppress(OSError):
                            self._socket.shutdown(socket.SHUT_RDWR)
                return

    def _url(self, f: _HubFile, revision: str) -> str:
        from huggingface_hub import hf_hub_url  # noqa: PLC0415

        return hf_hub_url(self.hub.repo_id, f.repo_path, revision=revision, endpoint=self.endpoint)

    def _download(self, client: httpx.Client, f: _HubFile, revision: str) -> None:
        path = self.partial / f.local_path
        path.parent.mkdir(parents=True, exist_ok=True)
        have = self._have(f)
        if have > f.size:
            path.unlink()
            self.done -= f.size
            have = 0
        attempt = 0
        while have < f.size:
            self._check_cancel()
            attempt += 1
            try:
                got = self._fetch(client, f, revision, path, have)
            except httpx.HTTPError as err:
                self._check_cancel()  # the connection was shut because of it
                got = self._have(f) - have
                if attempt >= ATTEMPTS_PER_FILE or got <= 0:
                    raise PullError(
                        "network",
                        f"Downloading {f.repo_path} from {self.hub.repo_id} failed after "
                        f"{_size(self._have(f))} of {_size(f.size)} ({_reason(err)}): "
                        "pull again to resume",
                    ) from err
            have = self._have(f)
            if got > 0:
                attempt = 0  # progress was made: a new drop gets its own attempts
            elif have < f.size:  # an answer without the bytes: asking again would loop
                raise PullError(
                    "network",
                    f"Hugging Face sent none of the {_size(f.size - have)} missing from "
                    f"{f.repo_path} of {self.hub.repo_id}: pull again later",
                )
        if f.size == 0:
            path.touch()

    def _fetch(
        self, client: httpx.Client, f: _HubFile, revision: str, path: Path, have: int
    ) -> int:
        """Request the file from byte `have` on; append what comes. Returns bytes written."""
        request_headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself
        if have:
            request_headers["Range"] = f"bytes={have}-"
        written = 0
        with client.stream("GET", self._url(f, revision), headers=request_headers) as response:
            if response.status_code in (401, 403, 404):
                raise PullError(
                    "unknown_repo",
                    f"Hugging Face refused {f.repo_path} of {self.hub.repo_id} "
                    f"(HTTP {response.status_code})",
                )
            if response.status_code >= 400:
                raise httpx.HTTPStatusError(
                    f"HTTP {response.status_code}", request=response.request, response=response
                )
            stream = response.extensions.get("network_stream")
            with self._socket_lock:
                self._socket = stream.get_extra_info("socket") if stream is not None else None
            mode = "ab"
            if have and response.status_code != 206:  # the server sent the whole file
                mode = "wb"
                self.done -= have
            with path.open(mode) as out:
                # As it arrives: a chunk held back in a buffer would be lost with the
                # connection, and fetched again on the retry.
                for chunk in response.iter_raw():
                    out.write(chunk)
                    written += len(chunk)
                    self.done += len(chunk)
                    self._report("downloading", f.repo_path)
                    self._check_cancel()
        return written

    # -- verify and describe

    def _verify(self, f: _HubFile) -> str:
        """The file's sha256, after checking it against the hub's hash (corrupt: deleted)."""
        path = self.partial / f.local_path
        sha256 = hashlib.sha256()
        git = hashlib.sha1(f"blob {f.size}\0".encode(), usedforsecurity=False)
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                self._check_cancel()
                sha256.update(block)
                if f.blob_id:
                    git.update(block)
        digest = sha256.hexdigest()
        if f.sha256:
            good, expected, got = digest == f.sha256, f.sha256, digest
        elif f.blob_id:
            good, expected, got = git.hexdigest() == f.blob_id, f.blob_id, git.hexdigest()
        else:
            good, expected, got = True, "", ""
        if not good or path.stat().st_size != f.size:
            path.unlink(missing_ok=True)
            raise PullError(
                "corrupt",
                f"{f.repo_path} from {self.hub.repo_id} does not match the hub's hash "
                f"(expected {expected[:12]}, got {got[:12]}): deleted, pull again",
            )
        return digest

    def _inspect(self, plan: _Plan) -> dict[str, Any]:
        digests = {f.local_path: self._verify(f) for f in plan.files}
        if plan.kind == voices.KIND:
            return self._describe_voice(plan)
        files = [
            {"path": f.local_path, "sha256": digests[f.local_path], "size_bytes": f.size}
            for f in sorted(plan.files, key=lambda f: f.local_path)
        ]
        fields: dict[str, Any] = {
            "format_version": 1,
            "name": self.name,
            "kind": plan.kind,
            "runtime": "onnxruntime-genai" if plan.kind in ("chat", "stt") else "onnxruntime",
            "source": str(self.hub),
            "revision": plan.revision,
            "quantization": guess_quantization(str(self.hub)),  # None: looked at below
            "context_length": 0,
            "size_bytes": sum(f.size for f in plan.files),
            "files": files,
            "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "embedding": None,
        }
        if plan.kind == "chat":
            self._describe_chat(fields)
        elif plan.kind == "stt":
            self._describe_stt(fields)
        else:
            self._describe_embedding(fields)
        return fields

    def _read_json(self, name: str) -> Any:
        try:
            return json.loads((self.partial / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PullError("not_a_model", f"{self.hub}: {name} is not valid JSON") from err

    def _describe_chat(self, fields: dict[str, Any]) -> None:
        genai = self._read_json("genai_config.json")
        try:
            model = genai["model"]
            fields["context_length"] = int(model["context_length"])
            decoder_file = str(model["decoder"]["filename"])
        except (KeyError, TypeError, ValueError) as err:
            raise PullError(
                "not_a_model", f"{self.hub}: genai_config.json lacks {err} (not a genai model?)"
            ) from err
        if model.get("type") == "whisper":
            raise PullError(
                "not_a_model",
                f"{self.hub} is a Whisper model ({GENAI_CONFIG} says so) without "
                f"{AUDIO_PROCESSOR_CONFIG}: the worker hears audio through the genai "
                "export's audio processor (the genai model builder writes it)",
            )
        self._quantization_of(fields, [decoder_file])

    def _quantization_of(self, fields: dict[str, Any], graphs: list[str]) -> None:
        """Check the graphs genai_config.json names are there; where the folder's name
        does not say the quantization, the graphs do (MatMulNBits: int4)."""
        for graph in graphs:
            if not (self.partial / graph).is_file():
                raise PullError(
                    "not_a_model", f"{self.hub}: {GENAI_CONFIG} names {graph}, not in folder"
                )
        if fields["quantization"] is None:
            int4 = any(_has_int4(self.partial / graph) for graph in graphs)
            fields["quantization"] = "int4" if int4 else "fp32"

    def _describe_stt(self, fields: dict[str, Any]) -> None:
        """A Whisper model in genai's layout: the manifest fields scripts/export_model
        writes for one (format, languages, sample rate)."""
        genai = self._read_json(GENAI_CONFIG)
        try:
            model = genai["model"]
            model_type = model["type"]
            fields["context_length"] = int(model["context_length"])
            graphs = [str(model[part]["filename"]) for part in ("encoder", "decoder")]
            vocab_size = model.get("vocab_size")
        except (KeyError, TypeError, ValueError) as err:
            raise PullError(
                "not_a_model",
                f"{self.hub}: {GENAI_CONFIG} lacks {err} (not a genai Whisper model?)",
            ) from err
        if model_type != "whisper":
            raise PullError(
                "not_a_model",
                f"{self.hub} has {AUDIO_PROCESSOR_CONFIG}, but its {GENAI_CONFIG} is of model "
                f"type {model_type!r}: speech to text here is Whisper (type 'whisper')",
            )
        self._quantization_of(fields, graphs)
        fields["format"] = STT_FORMAT
        fields["languages"] = self._whisper_languages(vocab_size)
        fields["sample_rate"] = WHISPER_SAMPLE_RATE

    def _whisper_languages(self, vocab_size: Any) -> list[str]:
        """The languages, in token order, as scripts/export_model lists them: an
        English-only Whisper (whisper-*.en, a smaller vocabulary) hears "en" only; a
        multilingual one the language tokens of its tokenizer (<|en|>, <|zh|>, ...,
        between <|startoftranscript|> and <|translate|>)."""
        if isinstance(vocab_size, int) and vocab_size < WHISPER_MULTILINGUAL_VOCAB:
            return ["en"]
        tokenizer = self._read_json("tokenizer.json")
        added = tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None
        ids = {
            str(token["content"]): int(token["id"])
            for token in added or []
            if isinstance(token, dict) and "content" in token and "id" in token
        }
        start, end = ids.get("<|startoftranscript|>"), ids.get("<|translate|>")
        found = sorted(
            (token_id, match.group(1))
            for content, token_id in ids.items()
            if (match := _LANGUAGE_TOKEN.fullmatch(content))
            and start is not None
            and end is not None
            and start < token_id < end
        )
        if not found:
            raise PullError(
                "not_a_model",
                f"{self.hub}: a multilingual Whisper whose tokenizer.json has no language "
                "tokens (<|en|>, ... between <|startoftranscript|> and <|translate|>)",
            )
        return [code for _, code in found]

    def _describe_voice(self, plan: _Plan) -> dict[str, Any]:
        """A Piper voice: hearth-model.json as the worker's voice import writes it."""
        onnx = next(f.local_path for f in plan.files if f.local_path.endswith(".onnx"))
        try:
            voices.import_piper_voice(self.partial, self.partial, self.name, origin=str(self.hub))
            fields = json.loads((self.partial / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise PullError(
                "not_a_model",
                f"{self.hub}: {onnx}.json is not a Piper voice's config the worker can read "
                f"({_reason(err)})",
            ) from err
        if not isinstance(fields, dict):
            raise PullError("not_a_model", f"{self.hub}: the voice's manifest is not an object")
        fields["revision"] = plan.revision
        return fields

    def _describe_embedding(self, fields: dict[str, Any]) -> None:
        config = self._read_json("config.json")
        if not isinstance(config, dict):
            raise PullError("not_a_model", f"{self.hub}: config.json is not an object")
        architectures = [str(a) for a in config.get("architectures") or []]
        if any(a.endswith(_DECODER_ARCHITECTURES) for a in architectures):
            raise PullError(
                "not_a_model",
                f"{self.hub} is a text generator ({architectures[0]}) in plain ONNX, not in "
                "onnxruntime-genai layout: pick a folder with genai_config.json",
            )
        pooling, dims = "mean", None
        pooling_configs = sorted(self.partial.glob("*_Pooling/config.json"))
        if pooling_configs:
            pool = self._read_json(pooling_configs[0].relative_to(self.partial).as_posix())
            for key, value in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_lasttoken", "last"),
            ):
                if pool.get(key):
                    pooling = value
                    break
            dims = pool.get("word_embedding_dimension")
        dims = dims or config.get("hidden_size") or config.get("dim") or config.get("d_model")
        if not dims:
            raise PullError("not_a_model", f"{self.hub}: config.json does not give a hidden size")
        native = int(config.get("max_position_embeddings") or 512)
        seq = None
        if (self.partial / "sentence_bert_config.json").is_file():
            seq = self._read_json("sentence_bert_config.json").get("max_seq_length")
        fields["context_length"] = min(int(seq or native), native)
        fields["quantization"] = fields["quantization"] or "fp32"
        fields["embedding"] = {"dimensions": int(dims), "pooling": pooling, "normalize": True}

    # -- install

    def _install(self, fields: dict[str, Any]) -> Path:
        (self.partial / MANIFEST_NAME).write_text(
            json.dumps(fields, indent=2) + "\n", encoding="utf-8"
        )
        try:
            read_model(self.partial)
        except ManifestError as err:
            raise PullError("not_a_model", f"{self.hub}: {err}") from err
        if self.final.exists():  # a leftover without a valid manifest: moved aside
            trash = self.models_dir / PARTIAL_DIR / f".removing-{uuid.uuid4().hex[:8]}"
            self.final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        self.partial.rename(self.final)
        self.state_path.unlink(missing_ok=True)
        self._report("done")
        return self.final


def _has_int4(graph: Path) -> bool:
    """Whether an ONNX graph holds int4 matrix products (MatMulNBits nodes)."""
    with graph.open("rb") as fh:
        return any(b"MatMulNBits" in block for block in iter(lambda: fh.read(1 << 24), b""))


def _model_folders(files: dict[str, _HubFile], prefix: str) -> list[str]:
    """The folders under ``prefix`` that hold a genai model or a Piper voice (hints)."""
    found = set()
    for path in files:
        pure = PurePosixPath(path)
        if path.startswith(prefix) and (
            pure.name == GENAI_CONFIG or (path.endswith(".onnx.json") and path[:-5] in files)
        ):
            found.add(str(pure.parent))
    return sorted(found)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------- command line


class _Display:
    """Progress on the terminal: a bar on a TTY, else a line per phase, file and 10%."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.bar: Any = None
        self.phase = ""
        self.file: str | None = None
        self.tenth = -1
        self.downloaded = False

    def update(self, p: PullProgress) -> None:
        self.downloaded = self.downloaded or p.phase == "downloading"
        if self.tty:
            self._bar(p)
        else:
            self._lines(p)

    def _bar(self, p: PullProgress) -> None:
        if p.phase == "downloading" and p.total_bytes:
            if self.bar is None:
                from tqdm import tqdm  # type: ignore[import-untyped]  # noqa: PLC0415

                self.bar = tqdm(
                    total=p.total_bytes,
                    initial=p.done_bytes,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=self.stream,
                    desc=p.source,
                    dynamic_ncols=True,
                )
            self.bar.update(p.done_bytes - self.bar.n)
        elif p.phase != self.phase:
            self.close()
            if p.phase in ("resolving", "verifying", "installing"):
                print(f"{p.phase} {p.source}", file=self.stream, flush=True)
        self.phase = p.phase

    def _lines(self, p: PullProgress) -> None:
        if p.phase not in (self.phase, "done"):
            extra = ""
            if p.phase == "downloading":
                extra = f": {_size(p.total_bytes)}"
                if p.done_bytes:
                    extra += f" ({_size(p.done_bytes)} here already)"
            print(f"{p.phase} {p.source}{extra}", file=self.stream, flush=True)
        self.phase = p.phase
        if p.phase != "downloading" or not p.total_bytes:
            return
        if p.file and p.file != self.file:
            self.file = p.file
            print(f"  {p.file}", file=self.stream, flush=True)
        tenth = p.done_bytes * 10 // p.total_bytes
        if tenth != self.tenth:
            if self.tenth >= 0:
                print(f"  {tenth * 10}% of {_size(p.total_bytes)}", file=self.stream, flush=True)
            self.tenth = tenth

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_pull(source: str, models_dir: Path, name: str | None) -> int:
    """`hearth-worker pull`: progress on stderr, one line on success or failure;
    Ctrl-C cancels (what was downloaded is kept: pulling again resumes)."""
    display = _Display(sys.stderr)
    cancel = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["path"] = pull_model(
                source, models_dir, name=name, progress=display.update, cancel=cancel
            )
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err

    thread = threading.Thread(target=work, name="hearth-pull", daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.2)
        except KeyboardInterrupt:  # the pull stops at its next chunk (a second one too)
            cancel.set()
    display.close()
    error = outcome.get("error")
    if isinstance(error, PullError):
        print(f"hearth-worker: {error.message}", file=sys.stderr)
        return 130 if error.code == "cancelled" else 1
    if isinstance(error, ValueError):
        print(f"hearth-worker: {error}", file=sys.stderr)
        return 1
    if isinstance(error, OSError):
        print(f"hearth-worker: cannot write the model: {error}", file=sys.stderr)
        return 1
    if error is not None:
        raise error
    manifest = read_model(outcome["path"])
    done = "Installed" if display.downloaded else "Already installed:"
    print(
        f"{done} {manifest.name} ({manifest.kind}, {manifest.quantization}, "
        f"{_size(manifest.size_bytes)}) in {manifest.path}"
    )
    return 0


def run_models_list(models_dir: Path) -> int:
    models = installed_models(models_dir)
    if not models:
        print(f"No models in {models_dir}")
    for m in models:
        print(f"{m.name}\t{m.kind}\t{m.quantization}\t{_size(m.size_bytes)}\t{m.path.name}")
    return 0


def run_models_remove(models_dir: Path, model_id: str) -> int:
    try:
        folder = remove_model(models_dir, model_id)
    except KeyError:
        print(f"hearth-worker: no model {model_id!r} in {models_dir}", file=sys.stderr)
        return 1
    print(f"Removed {model_id} ({folder})")
    return 0
