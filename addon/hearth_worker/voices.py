"""Piper voices on disk: a voice folder and its ``hearth-model.json`` (kind ``tts``),
importing a voice, and finding the voices of a models directory.

No aiohttp and no Piper here: the model registry reads these too (``speech.py``
serves the voices).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import api_types as types

_LOGGER = logging.getLogger(__name__)

MANIFEST_NAME = "hearth-model.json"
KIND = "tts"
RUNTIME = "piper"
FORMATS = types.SPEECH_FORMATS
MIN_SAMPLE_RATE = types.MIN_SAMPLE_RATE
MAX_SAMPLE_RATE = types.MAX_SAMPLE_RATE


# -- voices on disk ---------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """A Piper voice folder with its ``hearth-model.json``."""

    path: Path
    name: str
    onnx: Path
    config: Path
    sample_rate: int
    languages: list[str]
    speaker: str
    quality: str | None
    size_bytes: int

    def public(self) -> dict[str, Any]:
        """What /v1/models tells about the voice (in ``hearth``)."""
        return {
            "id": self.name,
            "kind": KIND,
            "runtime": RUNTIME,
            "languages": self.languages,
            "voice": self.speaker,
            "voices": [self.speaker],
            "quality": self.quality,
            "sample_rate": self.sample_rate,
            "sample_rates": [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE],
            "response_formats": list(FORMATS),
            "size_bytes": self.size_bytes,
        }

    def model_json(self) -> dict[str, Any]:
        """The voice as /v1/models lists it (OpenAI's shape)."""
        try:
            created = int(self.path.stat().st_mtime)
        except OSError:
            created = 0
        return {
            "id": self.name,
            "object": "model",
            "created": created,
            "owned_by": "hearth",
            "hearth": self.public(),
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_piper_voice(
    source: Path, out_dir: Path, name: str | None = None, *, origin: str | None = None
) -> Path:
    """Copy a Piper voice (its ``.onnx``, or a folder with one) into ``out_dir`` as it
    is, with its ``.onnx.json``, and write ``hearth-model.json``; returns ``out_dir``.
    ``origin`` is what the manifest's ``source`` says (default: the ``.onnx`` file's
    name; ``hearth-worker pull`` gives the hub source). ``out_dir`` may be the folder
    the voice is in already (nothing is copied then)."""
    onnx = source
    if source.is_dir():
        found = sorted(source.glob("*.onnx"))
        if len(found) != 1:
            raise ValueError(f"{source} must hold exactly one .onnx voice (found {len(found)})")
        onnx = found[0]
    config = onnx.with_name(onnx.name + ".json")
    if onnx.suffix != ".onnx" or not onnx.is_file() or not config.is_file():
        raise ValueError(f"A Piper voice is a .onnx file with its .onnx.json: {onnx}")
    data = json.loads(config.read_text(encoding="utf-8"))
    rate = int(data["audio"]["sample_rate"])
    language = data.get("language", {}).get("code") or data.get("espeak", {}).get("voice")
    stem = onnx.name.removesuffix(".onnx")  # en_US-joe-medium
    parts = stem.split("-")
    speaker = str(data.get("dataset") or (parts[1] if len(parts) > 2 else stem))
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    for src in (onnx, config):
        dst = out_dir / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        files.append({"path": dst.name, "sha256": _sha256(dst), "size_bytes": dst.stat().st_size})
    manifest = {
        "format_version": 1,
        "name": name or stem,
        "kind": KIND,
        "runtime": RUNTIME,
        "source": origin or onnx.name,
        "quantization": "fp32",
        "context_length": 0,
        "size_bytes": sum(int(f["size_bytes"]) for f in files),
        "files": files,
        "tts": {
            "model": onnx.name,
            "config": config.name,
            "sample_rate": rate,
            "languages": [str(language)] if language else [],
            "voice": speaker,
            "quality": data.get("audio", {}).get("quality"),
        },
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out_dir


def is_voice_folder(folder: Path) -> bool:
    """Whether ``folder``'s ``hearth-model.json`` says it holds a Piper voice (kind
    ``tts``), usable or not; the chat and embedding models' registry passes these by."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == KIND


def read_voice(folder: Path) -> Voice | None:
    """The voice in ``folder``; None when the folder is not a Piper voice."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        return None
    try:
        tts = data["tts"]
        voice = Voice(
            path=folder,
            name=str(data["name"]),
            onnx=folder / str(tts["model"]),
            config=folder / str(tts["config"]),
            sample_rate=int(tts["sample_rate"]),
            languages=[str(x) for x in tts.get("languages", [])],
            speaker=str(tts.get("voice") or data["name"]),
            quality=tts.get("quality"),
            size_bytes=int(data.get("size_bytes", 0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        _LOGGER.warning("Skipping %s: its %s is incomplete: %r", folder, MANIFEST_NAME, err)
        return None
    if not (voice.onnx.is_file() and voice.config.is_file()):
        _LOGGER.warning("Skipping %s: the voice's files are missing", folder)
        return None
    return voice


def scan_voices(models_dir: Path | None, folders: list[Path] = []) -> dict[str, Voice]:  # noqa: B006
    """The voices in the models directory (and ``folders``), by name."""
    candidates = list(folders)
    if models_dir is not None and models_dir.is_dir():
        candidates += sorted(
            p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    voices: dict[str, Voice] = {}
    for folder in candidates:
        voice = read_voice(folder)
        if voice is not None and voice.name not in voices:
            voices[voice.name] = voice
    return voices
