"""Pulling speech models from a (fake, local) Hugging Face Hub: Piper voices (kind
``tts``, laid out as ``rhasspy/piper-voices`` holds them) and Whisper models exported
for onnxruntime-genai (kind ``stt``, format ``genai-whisper``).

The real voice (``model_fixtures.piper_voice()``) and the real Whisper base
(``model_fixtures.whisper_base()``) are served by the fake hub where a test needs the
worker to load or speak them; tiny stand-in files where only the choice of files and
the manifest are checked.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import model_fixtures
import pytest
from fakehub import FakeHub
from hearth_worker import voices
from hearth_worker.catalog import load_catalog
from hearth_worker.manifest import MANIFEST_NAME
from hearth_worker.pull import (
    PARTIAL_DIR,
    PullError,
    installed_models,
    pull_model,
    remove_model,
)
from hearth_worker.registry import read_manifest
from test_api import check_schema
from test_models_api import get_json, hub_worker, start_pull, wait_for_job

VOICES_REPO = "rhasspy/piper-voices"
JOE_FOLDER = "en/en_US/joe/medium"
JOE = f"{VOICES_REPO}:{JOE_FOLDER}"
JOE_INSTALLED = "rhasspy--piper-voices--en--en_US--joe--medium"
JOE_FILES = ("en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json")
WHISPER_REPO = "acme/whisper-tiny-genai"
LANGUAGES = ["en", "de", "fr"]


@pytest.fixture(scope="module")
def piper_voice() -> Path:
    return model_fixtures.piper_voice()


def voice_stand_in(folder: Path, piper_voice: Path, stem: str = "en_US-joe-medium") -> Path:
    """A voice folder whose .onnx is a few bytes (the real .onnx.json beside it): enough
    for choosing files and writing the manifest, not for speaking."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.onnx").write_bytes(b"a stand-in for the voice's graph")
    shutil.copyfile(piper_voice / "en_US-joe-medium.onnx.json", folder / f"{stem}.onnx.json")
    return folder


def whisper_stand_in(
    folder: Path,
    *,
    model_type: str = "whisper",
    vocab_size: int = 51865,
    audio_processor: bool = True,
    languages: list[str] = LANGUAGES,
) -> Path:
    """The files of a genai Whisper export, with tiny graphs: the layout the genai model
    builder writes (encoder/decoder .onnx with external data, the audio processor's
    config, a tokenizer with Whisper's special tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    genai = {
        "model": {
            "type": model_type,
            "context_length": 448,
            "vocab_size": vocab_size,
            "encoder": {"filename": "encoder.onnx"},
            "decoder": {"filename": "decoder.onnx"},
        },
        "search": {"max_length": 448},
    }
    (folder / "genai_config.json").write_text(json.dumps(genai))
    if audio_processor:
        (folder / "audio_processor_config.json").write_text('{"feature_extraction": {}}')
    (folder / "encoder.onnx").write_bytes(b"encoder graph with MatMulNBits nodes")
    (folder / "encoder.onnx.data").write_bytes(b"\0" * 4096)
    (folder / "decoder.onnx").write_bytes(b"decoder graph with MatMulNBits nodes")
    (folder / "decoder.onnx.data").write_bytes(b"\0" * 4096)
    special = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in languages)]
    special += ["<|translate|>", "<|transcribe|>", "<|nocaptions|>", "<|notimestamps|>"]
    added = [{"id": 50257 + i, "content": token} for i, token in enumerate(special)]
    added.append({"id": 50400, "content": "<|0.00|>"})
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {}}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def fetched(hub: FakeHub) -> set[str]:
    """The repository paths downloaded so far."""
    return {re.sub(r".*/resolve/[^/]+/", "", p) for _, p in hub.requests if "/resolve/" in p}


# -- Piper voices --------------------------------------------------------------------


def test_a_piper_voice_is_pulled_as_the_voice_import_writes_it(
    piper_voice: Path, tmp_path: Path
) -> None:
    """rhasspy/piper-voices' layout: only the voice's .onnx and .onnx.json come (not the
    model card, not the other voices); hearth-model.json is the one
    `python -m hearth_worker.speech` writes for the same files, with the hub source."""
    models_dir = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_repo(
            VOICES_REPO,
            {JOE_FOLDER: piper_voice},
            files={
                f"{JOE_FOLDER}/MODEL_CARD": b"# Model card for joe (medium)\n",
                "en/en_US/amy/low/en_US-amy-low.onnx": b"another voice",
                "en/en_US/amy/low/en_US-amy-low.onnx.json": b"{}",
                "voices.json": b"{}",
            },
        )
        path = pull_model(JOE, models_dir, endpoint=hub.url)
        assert path == models_dir / JOE_INSTALLED
        assert fetched(hub) == {f"{JOE_FOLDER}/{name}" for name in JOE_FILES}
        assert sorted(p.name for p in path.iterdir()) == sorted([*JOE_FILES, MANIFEST_NAME])
        revision = hub.repos[VOICES_REPO].sha

        written = json.loads((path / MANIFEST_NAME).read_text())
        imported = json.loads((piper_voice / MANIFEST_NAME).read_text())
        assert (written["source"], written["revision"]) == (JOE, revision)
        assert {k: v for k, v in written.items() if k not in ("source", "revision")} == {
            k: v for k, v in imported.items() if k != "source"
        }
        assert written["kind"] == "tts" and written["name"] == "en_US-joe-medium"

        # The speech host serves it as it finds it in the models directory.
        voice = voices.read_voice(path)
        assert voice is not None
        assert (voice.name, voice.sample_rate, voice.languages) == (
            "en_US-joe-medium",
            22050,
            ["en_US"],
        )
        assert list(voices.scan_voices(models_dir)) == ["en_US-joe-medium"]
        assert [(m.name, m.kind) for m in installed_models(models_dir)] == [
            ("en_US-joe-medium", "tts")
        ]
        assert not list((models_dir / PARTIAL_DIR).iterdir())

        before = len(hub.requests)  # pulled again: nothing downloaded
        assert pull_model(JOE, models_dir, endpoint=hub.url) == path
        assert len(hub.requests) == before

    assert remove_model(models_dir, "en_US-joe-medium") == path
    assert not path.exists() and installed_models(models_dir) == []


def test_a_voice_gets_the_name_asked_for_and_a_taken_name_is_refused(
    piper_voice: Path, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_repo(
            VOICES_REPO,
            {
                JOE_FOLDER: voice_stand_in(tmp_path / "joe", piper_voice),
                "en/en_US/joe/low": voice_stand_in(tmp_path / "low", piper_voice),
            },
        )
        path = pull_model(JOE, models_dir, endpoint=hub.url, name="Joe")
        assert json.loads((path / MANIFEST_NAME).read_text())["name"] == "Joe"
        # Another folder with a voice of the same file name: the name is taken.
        with pytest.raises(PullError) as caught:
            pull_model(f"{VOICES_REPO}:en/en_US/joe/low", models_dir, endpoint=hub.url, name="Joe")
    assert caught.value.code == "name_taken"
    assert [m.name for m in installed_models(models_dir)] == ["Joe"]


async def test_a_voice_pulled_through_the_api_is_served_at_once(
    http: aiohttp.ClientSession, piper_voice: Path, tmp_path: Path
) -> None:
    """What Home Assistant's add-model step does with the catalog's voice: the job ends
    with the voice as /v1/models lists it, the voice speaks without a restart, and the
    catalog says it is installed."""
    entry = next(e for e in load_catalog() if e.kind == "tts")
    assert entry.source == JOE
    with FakeHub() as hub:
        hub.add_repo(VOICES_REPO, {JOE_FOLDER: piper_voice})
        worker, admin = hub_worker(hub, tmp_path)
        try:
            job = await start_pull(http, worker, admin, {"source": entry.source})
            done, _ = await wait_for_job(http, worker, admin, job["id"])
            assert done["status"] == "done", done
            assert done["model"]["id"] == "en_US-joe-medium"
            assert done["model"]["hearth"]["kind"] == "tts"

            _, models = await get_json(http, worker.url + "/v1/models", worker.headers)
            check_schema(models, "ModelList")
            listed = {m["id"]: m["hearth"]["kind"] for m in models["data"]}
            assert listed == {"en_US-joe-medium": "tts"}

            body = {"model": "en_US-joe-medium", "input": "The light is on.", "sample_rate": 16000}
            async with http.post(
                worker.url + "/v1/audio/speech", json=body, headers=worker.headers
            ) as resp:
                audio = await resp.read()
                assert resp.status == 200, audio[:200]
            assert audio[:4] == b"RIFF" and len(audio) > 44 + 16000  # over half a second

            _, catalog = await get_json(http, worker.url + "/v1/catalog", worker.headers)
            check_schema(catalog, "Catalog")
            installed = {e["id"] for e in catalog["data"] if e["installed"]}
            assert installed == {entry.id}
        finally:
            assert await worker.astop() == 0, worker.log()
    log = worker.log()
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.fixture
def voice_cli(
    piper_voice: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """`hearth-worker ARGS` in this process, pulling from a fake hub with a stand-in voice."""
    from hearth_worker.cli import main
    from huggingface_hub import constants

    with FakeHub() as hub:
        hub.add_repo(VOICES_REPO, {JOE_FOLDER: voice_stand_in(tmp_path / "joe", piper_voice)})
        # Both: the download URLs come from the template (made from ENDPOINT at import).
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)

        def run(*args: str) -> tuple[int, str, str]:
            code = main(["--state-dir", str(tmp_path / "state"), *args])
            out, err = capsys.readouterr()
            return code, out, err

        yield run


def test_cli_pulls_lists_and_removes_a_voice(
    voice_cli: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    code, out, err = voice_cli("pull", JOE)
    assert code == 0, err
    models_dir = tmp_path / "state" / "models"
    assert out.startswith("Installed en_US-joe-medium (tts, fp32, ")
    assert str(models_dir / JOE_INSTALLED) in out
    code, out, _ = voice_cli("pull", JOE)
    assert (code, out.split(" (")[0]) == (0, "Already installed: en_US-joe-medium")
    code, out, _ = voice_cli("models", "list")
    assert out.split("\t")[:3] == ["en_US-joe-medium", "tts", "fp32"]
    code, out, _ = voice_cli("models", "remove", "en_US-joe-medium")
    assert code == 0 and not (models_dir / JOE_INSTALLED).exists()


# -- Whisper (genai) -------------------------------------------------------------------


def test_a_genai_whisper_folder_is_pulled_as_speech_to_text(tmp_path: Path) -> None:
    """The manifest fields scripts/export_model writes for Whisper: kind stt, format
    genai-whisper, the languages in token order, 16 kHz; the quantization from the
    graphs (the folder's name does not say)."""
    models_dir = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_repo(
            WHISPER_REPO,
            {"cpu": whisper_stand_in(tmp_path / "whisper")},
            files={"README.md": b"# Whisper tiny for onnxruntime-genai\n"},
        )
        path = pull_model(f"{WHISPER_REPO}:cpu", models_dir, endpoint=hub.url)
        assert "README.md" not in fetched(hub)
    written = json.loads((path / MANIFEST_NAME).read_text())
    assert {k: written[k] for k in ("name", "kind", "runtime", "format")} == {
        "name": "whisper-tiny-genai-cpu",
        "kind": "stt",
        "runtime": "onnxruntime-genai",
        "format": "genai-whisper",
    }
    assert written["languages"] == LANGUAGES
    assert written["sample_rate"] == 16000
    assert (written["context_length"], written["quantization"]) == (448, "int4")
    assert written["source"] == f"{WHISPER_REPO}:cpu"
    assert sorted(f["path"] for f in written["files"]) == sorted(
        p.name for p in (tmp_path / "whisper").iterdir()
    )
    manifest = read_manifest(path)  # as the worker's registry reads it
    assert (manifest.kind, manifest.runtime, manifest.name) == (
        "stt",
        "genai-whisper",
        "whisper-tiny-genai-cpu",
    )
    assert [(m.name, m.kind) for m in installed_models(models_dir)] == [
        ("whisper-tiny-genai-cpu", "stt")
    ]


def test_an_english_only_whisper_hears_english(tmp_path: Path) -> None:
    """whisper-*.en: a smaller vocabulary, no languages to choose (as scripts/export_model
    lists them), whatever language tokens its tokenizer keeps."""
    with FakeHub() as hub:
        hub.add_repo(WHISPER_REPO, {"": whisper_stand_in(tmp_path / "w", vocab_size=51864)})
        path = pull_model(WHISPER_REPO, tmp_path / "models", endpoint=hub.url)
    assert json.loads((path / MANIFEST_NAME).read_text())["languages"] == ["en"]


def test_the_real_whisper_base_pulled_is_its_export_and_loads(tmp_path: Path) -> None:
    """The real genai Whisper base through the hub: the manifest says what
    scripts/export_model's says (languages, rate, format, files), and the worker's
    speech-to-text loader takes the folder."""
    from hearth_worker.stt_engine import WhisperEngine

    export = model_fixtures.whisper_base()
    with FakeHub() as hub:
        hub.add_repo("acme/whisper-base-genai", {"cpu-int4": export})
        path = pull_model("acme/whisper-base-genai:cpu-int4", tmp_path / "m", endpoint=hub.url)
    pulled = json.loads((path / MANIFEST_NAME).read_text())
    exported = json.loads((export / MANIFEST_NAME).read_text())
    same = (
        "kind",
        "runtime",
        "format",
        "languages",
        "sample_rate",
        "quantization",
        "context_length",
        "files",
        "size_bytes",
    )
    assert {k: pulled[k] for k in same} == {k: exported[k] for k in same}
    engine = WhisperEngine.load(path, threads=1)
    assert engine.languages == exported["languages"]
    assert engine.transcribe(b"", "en") == ""


# -- what is not a speech model ----------------------------------------------------------


def _error(hub: FakeHub, source: str, models_dir: Path) -> PullError:
    with pytest.raises(PullError) as caught:
        pull_model(source, models_dir, endpoint=hub.url)
    assert "\n" not in caught.value.message
    assert installed_models(models_dir) == []
    return caught.value


@pytest.mark.parametrize(
    ("files", "words"),
    [
        # A Whisper genai folder without the audio processor's config.
        (lambda d: whisper_stand_in(d, audio_processor=False), ["audio_processor_config.json"]),
        # The audio processor's config beside a genai model that is not Whisper.
        (lambda d: whisper_stand_in(d, model_type="phi3"), ["'phi3'", "whisper"]),
        # A multilingual vocabulary but no language tokens in the tokenizer.
        (lambda d: whisper_stand_in(d, languages=[]), ["language tokens"]),
    ],
    ids=["no-audio-processor", "not-whisper", "no-languages"],
)
def test_a_genai_folder_that_is_no_whisper_model_is_refused(
    tmp_path: Path, files: Callable[[Path], Path], words: list[str]
) -> None:
    with FakeHub() as hub:
        hub.add_repo(WHISPER_REPO, {"cpu": files(tmp_path / "model")})
        error = _error(hub, f"{WHISPER_REPO}:cpu", tmp_path / "models")
    assert error.code == "not_a_model"
    for word in words:
        assert word in error.message, error.message


def test_a_folder_above_the_voices_is_not_a_model_and_names_them(
    piper_voice: Path, tmp_path: Path
) -> None:
    with FakeHub() as hub:
        hub.add_repo(
            VOICES_REPO,
            {
                JOE_FOLDER: voice_stand_in(tmp_path / "medium", piper_voice),
                "en/en_US/joe/low": voice_stand_in(tmp_path / "low", piper_voice, "x-joe-low"),
            },
            files={"en/en_US/joe/README.md": b"# joe\n"},
        )
        error = _error(hub, f"{VOICES_REPO}:en/en_US/joe", tmp_path / "models")
    assert error.code == "not_a_model"
    for looked_for in ("genai_config.json", "VOICE.onnx.json", "model.onnx"):
        assert looked_for in error.message
    assert "en/en_US/joe/low, en/en_US/joe/medium" in error.message


@pytest.mark.parametrize(
    ("files", "words"),
    [
        (  # two voices in one folder
            {
                "v/a.onnx": b"graph",
                "v/a.onnx.json": b'{"audio": {"sample_rate": 22050}}',
                "v/b.onnx": b"graph",
                "v/b.onnx.json": b'{"audio": {"sample_rate": 22050}}',
            },
            ["2 Piper voices", "a.onnx, b.onnx"],
        ),
        (  # a .onnx.json that is not a Piper voice's config
            {"v/a.onnx": b"graph", "v/a.onnx.json": b'{"dims": 384}'},
            ["a.onnx.json", "Piper"],
        ),
    ],
    ids=["two-voices", "not-a-voice-config"],
)
def test_what_looks_like_a_voice_but_is_none_is_refused(
    tmp_path: Path, files: dict[str, Any], words: list[str]
) -> None:
    models_dir = tmp_path / "models"
    with FakeHub() as hub:
        hub.add_repo("acme/voices", files=files)
        error = _error(hub, "acme/voices:v", models_dir)
    assert error.code == "not_a_model"
    for word in words:
        assert word in error.message, error.message
    assert not models_dir.is_dir() or [p.name for p in models_dir.iterdir()] == [PARTIAL_DIR]
