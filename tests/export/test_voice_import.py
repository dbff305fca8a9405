"""Piper voices through scripts/export_model: taken as they are (issue 12).

A voice's ``.onnx`` with its ``.onnx.json`` (or a folder holding one) is copied with
the hearth-model.json the worker's own import writes (hearth_worker.voices, the same
as ``hearth-worker pull`` and ``python -m hearth_worker.speech``); options that
change a model (--quant, --context-length, --via) are refused for a voice, and
--kind tts on anything else says what a voice is. Uses the real en_US joe-medium
voice (model_fixtures.piper_voice()).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import model_fixtures
import pytest
from hearth_worker.voices import read_voice

EXPORT_MODEL = model_fixtures.REPO / "scripts" / "export_model"
VOICE = "en_US-joe-medium"


@pytest.fixture(scope="module")
def voice_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The voice as Piper ships it: the two files, no hearth-model.json."""
    folder = tmp_path_factory.mktemp("piper") / "voice"
    folder.mkdir()
    for name in (f"{VOICE}.onnx", f"{VOICE}.onnx.json"):
        shutil.copyfile(model_fixtures.piper_voice() / name, folder / name)
    return folder


def export(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXPORT_MODEL), *map(str, args)], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("given", ["folder", "onnx"])
def test_a_piper_voice_is_taken_as_it_is(voice_files: Path, tmp_path: Path, given: str) -> None:
    source = voice_files if given == "folder" else voice_files / f"{VOICE}.onnx"
    result = export(source, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out = Path(result.stdout.strip())
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{VOICE}.onnx", f"{VOICE}.onnx.json", "hearth-model.json"]
    )
    for name in (f"{VOICE}.onnx", f"{VOICE}.onnx.json"):  # byte for byte
        assert (out / name).read_bytes() == (voice_files / name).read_bytes()
    written = json.loads((out / "hearth-model.json").read_text(encoding="utf-8"))
    imported = json.loads((model_fixtures.piper_voice() / "hearth-model.json").read_text())
    assert written == imported  # what the worker's own import writes
    voice = read_voice(out)
    assert voice is not None
    assert (voice.name, voice.sample_rate, voice.languages) == (VOICE, 22050, ["en_US"])
    assert not list(tmp_path.glob(".out.export-*"))  # no work folder left behind


def test_a_voice_gets_the_name_asked_for(voice_files: Path, tmp_path: Path) -> None:
    result = export(voice_files, tmp_path / "joe", "--name", "Joe", "--kind", "tts")
    assert result.returncode == 0, result.stderr
    voice = read_voice(tmp_path / "joe")
    assert voice is not None and voice.name == "Joe"


@pytest.mark.parametrize("option", [["--quant", "int4"], ["--context-length", "512"]])
def test_options_that_change_a_model_are_refused_for_a_voice(
    voice_files: Path, tmp_path: Path, option: list[str]
) -> None:
    result = export(voice_files, tmp_path / "out", *option)
    assert result.returncode == 2
    assert "a Piper voice is taken as it is" in result.stderr
    assert not (tmp_path / "out").exists()


def test_kind_tts_on_something_else_says_what_a_voice_is(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-voice"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")  # no .onnx.json beside it
    result = export(folder, tmp_path / "out", "--kind", "tts")
    assert result.returncode == 2
    assert "is no Piper voice (a VOICE.onnx with its VOICE.onnx.json)" in result.stderr


def test_a_folder_of_two_voices_asks_which(voice_files: Path, tmp_path: Path) -> None:
    folder = tmp_path / "two"
    shutil.copytree(voice_files, folder)
    for suffix in (".onnx", ".onnx.json"):
        shutil.copyfile(voice_files / f"{VOICE}{suffix}", folder / f"en_US-other-medium{suffix}")
    result = export(folder, tmp_path / "out")
    assert result.returncode == 2
    assert "holds 2 Piper voices; give the one to take" in result.stderr
