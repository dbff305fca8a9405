"""The chat and embedding models' registry passes Piper voices by: speech.py serves them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hearth_worker import voices
from hearth_worker.capacity import RateTracker
from hearth_worker.manifest import ManifestError
from hearth_worker.registry import ModelRegistry


def _voice(folder: Path, *, complete: bool = True) -> Path:
    """A voice folder as ``import_piper_voice`` writes it (files as placeholders: the
    registry never opens them)."""
    folder.mkdir(parents=True)
    (folder / "v.onnx").write_bytes(b"onnx")
    if complete:
        (folder / "v.onnx.json").write_text("{}")
    manifest = {
        "format_version": 1,
        "name": folder.name,
        "kind": "tts",
        "runtime": "piper",
        "tts": {"model": "v.onnx", "config": "v.onnx.json", "sample_rate": 22050},
    }
    (folder / voices.MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def _registry(models_dir: Path | None, fixed: list[Path]) -> ModelRegistry:
    return ModelRegistry(fixed_dirs=fixed, models_dir=models_dir, rates=RateTracker(), warmup=False)


def test_voices_in_the_models_directory_are_passed_by_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    _voice(models / "en_US-joe-medium")
    (models / "not-a-model").mkdir()
    with caplog.at_level(logging.WARNING, logger="hearth_worker"):
        registry = _registry(models, [])
        registry.load_all()
    assert registry.manifests == {}
    skipped = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
    assert len(skipped) == 1 and "not-a-model" in skipped[0], skipped  # only the real stray
    assert voices.scan_voices(models).keys() == {"en_US-joe-medium"}


def test_a_voice_given_with_model_does_not_stop_the_start(tmp_path: Path) -> None:
    voice = _voice(tmp_path / "voice")
    registry = _registry(None, [voice])
    registry.load_all()  # no ManifestError: the voice is speech.py's
    assert registry.manifests == {}
    assert voices.scan_voices(None, [voice]).keys() == {"voice"}


def test_a_broken_voice_given_with_model_is_a_clear_error(tmp_path: Path) -> None:
    voice = _voice(tmp_path / "voice", complete=False)
    with pytest.raises(ManifestError, match="not a usable Piper voice"):
        _registry(None, [voice]).load_all()
