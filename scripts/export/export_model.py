"""Export a Hugging Face model (hub id, local folder) or a .gguf file into a folder Hearth serves.

This driver uses the standard library only; the heavy lifting runs in the export
environments (.venv-export: onnxruntime-genai model builder; .venv-export-optimum:
optimum-onnx), which it builds on first use through scripts/setup.

A .gguf file (as llama.cpp and Ollama keep models) is dequantized into a Hugging Face
folder first (scripts/export/gguf_import.py), then built and quantized by the genai
model builder like any other chat model; its display name is the GGUF's general.name.
A folder's display name comes from its metadata (model_name(); --name overrides).

Whisper (speech to text, kind "stt"): a Hugging Face WhisperForConditionalGeneration
folder or hub id, or a faster-whisper (CTranslate2) folder such as Home Assistant's
Whisper add-on keeps (model.bin, config.json, tokenizer.json, vocabulary.txt;
converted back first by scripts/export/whisper_ct2.py), built by the genai model
builder into an encoder, a decoder and genai's audio processor config (format
"genai-whisper", 16 kHz, the model's languages in the manifest).

Piper voices (text to speech, kind "tts"): a voice's ``.onnx`` with its ``.onnx.json``
beside it, or a folder holding one voice, is taken as it is: both files are copied and
hearth-model.json is written by the worker's own import (hearth_worker.voices, run in
.venv-export), the same as ``hearth-worker pull`` writes for a voice from the hub.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXPORT_PY = REPO / ".venv-export" / "bin" / "python"
OPTIMUM_BIN = REPO / ".venv-export-optimum" / "bin"
MANIFEST = "hearth-model.json"
DEFAULT_MAX_CONTEXT = 4096  # the genai KV buffer is preallocated to it: keep it tight
QUANTS = ("int4", "int8", "fp32")
KINDS = ("auto", "chat", "embedding", "stt", "tts")
WHISPER = "WhisperForConditionalGeneration"
STT_SAMPLE_RATE = 16000
# What a genai Whisper folder needs (the builder writes them; tokenizer_config too).
STT_FILES = (
    "genai_config.json",
    "audio_processor_config.json",
    "encoder.onnx",
    "decoder.onnx",
    "tokenizer.json",
    "tokenizer_config.json",
)
# Encoders that only make sense as sentence-embedding models.
ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "mpnet",
    "distilbert",
    "nomic_bert",
    "electra",
    "deberta",
    "deberta-v2",
    "modernbert",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".onnx")

GGUF_REFUSED = 3  # gguf_import.py's exit status for a GGUF it cannot take (with a message)
GGUF_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")

_START = time.monotonic()
_LOGS: list[Path] = []  # the tools' output; kept beside OUT_DIR if the export fails


def stage(message: str) -> None:
    print(
        f"[export_model {time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True
    )


def fail(message: str) -> NoReturn:
    print(f"export_model: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run(command: list[str], log_path: Path, what: str, refusal: Path | None = None) -> None:
    """Run a tool with its chatter in a log file; show the log's tail if it fails.

    With `refusal`: a tool that exits with GGUF_REFUSED wrote {"error": paragraph} there,
    an input it cannot take; that paragraph is the whole error (no log, no traceback)."""
    if log_path not in _LOGS:
        _LOGS.append(log_path)
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if refusal is not None and result.returncode == GGUF_REFUSED and refusal.is_file():
        _LOGS.clear()  # the message says it all
        fail(str(read_json(refusal)["error"]))
    if result.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        fail(f"{what} failed (exit {result.returncode})")


def ensure_env(target: str) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "scripts" / "setup"), target],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        print(result.stdout, file=sys.stderr)
        fail(f"'scripts/setup {target}' failed")
    if "up to date" not in result.stdout:
        stage(f"built environment '{target}' in {time.monotonic() - started:.1f}s")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        fail(f"cannot read {path}: {err}")


# ---------------------------------------------------------------------------- voices
def piper_voice(source: str) -> Path | None:
    """The voice's .onnx when ``source`` is a Piper voice: a .onnx file with its .onnx.json,
    or a folder holding exactly one such pair (and no model config); else None."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "genai_config.json").is_file():
            return None
        found = [p for p in sorted(path.glob("*.onnx")) if p.with_name(p.name + ".json").is_file()]
        if len(found) > 1:
            fail(f"{source} holds {len(found)} Piper voices; give the one to take (its .onnx)")
        path = found[0] if found else path
    if path.suffix == ".onnx" and path.is_file() and path.with_name(path.name + ".json").is_file():
        return path.resolve()
    return None


def import_voice(onnx: Path, staged: Path, name: str | None) -> None:
    """Copy the voice into ``staged`` and write its hearth-model.json with the worker's
    own import (hearth_worker.voices.import_piper_voice), in .venv-export."""
    ensure_env("export")
    program = (
        "import sys; from pathlib import Path; "
        "from hearth_worker.voices import import_piper_voice; "
        "import_piper_voice(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] or None)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "addon")}
    result = subprocess.run(
        [str(EXPORT_PY), "-c", program, str(onnx), str(staged), name or ""],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"not a Piper voice: {onnx} ({last})")


# ---------------------------------------------------------------------------- source


def looks_local(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or Path(source).exists()
    )


def is_gguf(source: str) -> bool:
    """A .gguf name, or any file that starts with the GGUF magic bytes (Ollama keeps its
    models as blobs named sha256-HEX, without the suffix)."""
    if source.lower().endswith(".gguf"):
        return True
    path = Path(source).expanduser()
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:  # missing, a folder, unreadable: not a GGUF
        return False


def resolve_source(source: str, work: Path) -> tuple[Path, str, str]:
    """Return (local folder, source as recorded, default name)."""
    if is_gguf(source):
        return import_gguf(source, work)
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            fail(f"source folder not found: {source}")
        if not path.is_dir():
            fail(f"source is not a folder or a .gguf file: {source}")
        path = path.resolve()
        if is_ct2_whisper(path):
            return import_ct2_whisper(path, work)
        return path, str(path), model_name(path)
    if source.count("/") != 1 or not all(source.split("/")):
        fail(f"'{source}' is neither an existing folder nor a Hugging Face hub id (owner/name)")
    ensure_env("export")
    stage(f"downloading {source} from the Hugging Face hub")
    log = work / "export.log"
    run([str(EXPORT_PY), str(HERE / "hub_download.py"), source, str(work / "hub")], log, "download")
    return work / "hub", source, clean_name(source.split("/")[1])


def import_gguf(source: str, work: Path) -> tuple[Path, str, str]:
    """Dequantize a GGUF into a Hugging Face folder: (folder, GGUF path, general.name)."""
    path = Path(source).expanduser()
    if not path.is_file():
        fail(f"GGUF file not found: {source}")
    path = path.resolve()
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            fail(
                f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes). "
                "Pass a .gguf model file as llama.cpp or Ollama keep them, or a Hugging Face "
                "model folder or hub id."
            )
    if GGUF_SPLIT.search(path.name):
        stage("warning: this looks like one part of a split GGUF; merge the parts if it fails")
    ensure_env("export")
    stage(f"importing {path.name}: dequantizing the GGUF with transformers")
    log = work / "export.log"
    info_path = work / "gguf.json"
    named = path
    if path.suffix.lower() != ".gguf":  # transformers' loader goes by the file's suffix
        named = work / f"{path.name}.gguf"
        named.symlink_to(path)
    run(
        [
            str(EXPORT_PY),
            str(HERE / "gguf_import.py"),
            str(named),
            str(work / "gguf"),
            str(info_path),
        ],
        log,
        "GGUF import",
        refusal=info_path,
    )
    info = read_json(info_path)
    stage(
        f"imported a {info['architecture']} GGUF as {info['hf_architecture']} "
        f"({info['dtype']}) in {info['seconds']:.1f}s"
    )
    fallback = path.stem if path.suffix.lower() == ".gguf" else path.name
    return work / "gguf", str(path), clean_name(info.get("name") or "") or clean_name(fallback)


def is_ct2_whisper(folder: Path) -> bool:
    """A faster-whisper (CTranslate2) folder: model.bin (or model.bin.part1, ...) whose
    header names a WhisperSpec, beside faster-whisper's config.json."""
    first = folder / "model.bin"
    if not first.is_file():
        first = folder / "model.bin.part1"
    if not first.is_file() or not (folder / "config.json").is_file():
        return False
    with first.open("rb") as fh:
        return b"WhisperSpec" in fh.read(64)


def import_ct2_whisper(path: Path, work: Path) -> tuple[Path, str, str]:
    """A CTranslate2 Whisper folder as a Hugging Face folder (whisper_ct2.py)."""
    ensure_env("export")
    stage(f"converting the CTranslate2 (faster-whisper) model in {path} to Hugging Face's form")
    log = work / "export.log"
    report = work / "whisper_ct2.json"
    run(
        [
            str(EXPORT_PY),
            str(HERE / "whisper_ct2.py"),
            str(path),
            str(work / "hf"),
            "--report",
            str(report),
        ],
        log,
        "CTranslate2 Whisper conversion",
    )
    info = read_json(report)
    stage(
        f"converted {len(info['ct2_variables'])} variables into {len(info['hf_tensors'])} "
        f"tensors ({len(info['languages'])} languages)"
    )
    return work / "hf", str(path), model_name(path)


# ---------------------------------------------------------------------------- display name

# Folder names that say nothing about the model inside (the "hf"): a name from
# one of them is passed over for the model's metadata or a more telling parent folder.
GENERIC_FOLDERS = {
    "hf",
    "huggingface",
    "hub",
    "model",
    "models",
    "snapshots",
    "checkpoint",
    "checkpoints",
    "weights",
    "original",
    "onnx",
    "export",
    "exports",
    "out",
    "output",
    "outputs",
    "final",
    "latest",
    "main",
    "src",
    "source",
    "download",
    "downloads",
    "files",
    "tmp",
    "temp",
}
NAME_MAX = 100
_GENERIC_PATTERN = re.compile(r"(?i)(checkpoint-\d+|[0-9a-f]{40}|\d+|\.+)")
_ID_LIKE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_HUB_CACHE = re.compile(r"models--([^/]+?)--(.+)")  # huggingface_hub's cache: models--OWNER--NAME


def clean_name(text: str) -> str:
    """`text` as a model id: slashes and control characters become separators, runs of
    white space one space, trimmed to NAME_MAX characters. Spaces and other letters stay:
    the id is what Home Assistant shows; the worker takes any string without a slash."""
    text = re.sub(r"[/\\]+", "-", text)
    text = "".join(" " if (ch.isspace() or not ch.isprintable()) else ch for ch in text)
    text = re.sub(r" +", " ", text).strip(" -")
    return text[:NAME_MAX].rstrip(" -")


def name_problem(name: str) -> str | None:
    """Why `name` (a --name) cannot be a model id, or None."""
    if not name.strip():
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a slash (the id is part of the worker's URLs, /v1/models/ID)"
    if any(not ch.isprintable() for ch in name if ch != " "):
        return "it contains control characters"
    if name != name.strip():
        return "it starts or ends with white space"
    if len(name) > NAME_MAX:
        return f"it is longer than {NAME_MAX} characters"
    return None


def is_generic(name: str) -> bool:
    return not name or name.lower() in GENERIC_FOLDERS or bool(_GENERIC_PATTERN.fullmatch(name))


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hub_name(value: Any) -> str | None:
    """NAME of a hub id OWNER/NAME (as `_name_or_path` records a model loaded from the hub)."""
    if not isinstance(value, str) or looks_local(value) or value.count("/") != 1:
        return None
    owner, name = value.split("/")
    return name if owner and name and not is_generic(name) else None


def _path_name(value: Any) -> str | None:
    """The last telling part of a local path (as `_name_or_path` records a folder)."""
    if not isinstance(value, str) or not value.strip():
        return None
    parts = [p for p in re.split(r"[/\\]+", value.strip()) if p]
    for part in reversed(parts):
        found = _HUB_CACHE.fullmatch(part)
        if found:
            return found.group(2)
        if not is_generic(part) and part != "snapshots":
            return part
    return None


def _readme_names(folder: Path) -> tuple[str | None, str | None]:
    """(name from the model card's front matter, its first '# ' heading)."""
    try:
        lines = (folder / "README.md").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    declared = None
    body = lines
    if lines and lines[0].strip() == "---":
        end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
        if end is not None:
            body = lines[end + 1 :]
            front = lines[1:end]
            for i, line in enumerate(front):
                found = re.fullmatch(r"model_name:\s*(.+)", line.strip())
                if found is None and line.startswith("model-index:"):
                    # model-index:\n- name: NAME   (the fine-tuned model's own name)
                    nxt = front[i + 1].strip() if i + 1 < len(front) else ""
                    found = re.fullmatch(r"-\s*name:\s*(.+)", nxt)
                if found:
                    declared = found.group(1).strip().strip("'\"") or None
                    break
    heading = None
    fenced = False
    for line in body:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("# "):
            text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", line[2:]).strip(" *_`")
            text = re.sub(r"(?i)^model card for\s+", "", text)
            if text and "<" not in text and text.lower() != "model id":
                heading = text
            break
    return declared, heading


def model_name(folder: Path) -> str:
    """The display name of the Hugging Face model folder `folder`, from its own metadata.

    In order: the model card's declared name (README.md front matter `model_name`, or
    `model-index`'s first `name`); config.json's `_name_or_path` when it is a hub id
    (its NAME part), else tokenizer_config.json's `name_or_path` hub id; the model card's
    first heading, when it is a one-word model id that says more than that hub name
    (all-MiniLM-L6-v2's card over `nreimers/MiniLM-L6-H384-uncased`, its base model;
    not SmolLM2 over SmolLM2-135M-Instruct); a huggingface_hub cache path
    (models--OWNER--NAME); the last telling part of a local `_name_or_path`; the folder's
    own name, or its parent's when the folder is called `hf`, `model`, `snapshots/HASH`...
    """
    folder = folder.resolve()
    declared, heading = _readme_names(folder)
    config = _json_object(folder / "config.json")
    tokenizer = _json_object(folder / "tokenizer_config.json")
    hub = _hub_name(config.get("_name_or_path")) or _hub_name(tokenizer.get("name_or_path"))
    if heading is not None and (
        not _ID_LIKE.fullmatch(heading) or (hub and hub.lower().startswith(heading.lower()))
    ):
        heading = None
    cached = next(
        (m.group(2) for p in reversed(folder.parts) if (m := _HUB_CACHE.fullmatch(p))), None
    )
    candidates = [
        declared,
        hub if heading is None else heading,
        hub,
        cached,
        _path_name(config.get("_name_or_path")),
        *(p.name for p in (folder, *list(folder.parents)[:2]) if not is_generic(p.name)),
        folder.name,
    ]
    for candidate in candidates:
        if candidate and (name := clean_name(candidate)):
            return name
    return "model"


def detect_kind(src: Path, kind: str) -> str:
    config_path = src / "config.json"
    if not config_path.is_file():
        fail(f"{src} has no config.json: not a Hugging Face transformers model folder")
    if kind != "auto":
        return kind
    if (src / "modules.json").is_file() or (src / "sentence_bert_config.json").is_file():
        return "embedding"
    config = read_json(config_path)
    architectures = config.get("architectures") or []
    if WHISPER in architectures or config.get("model_type") == "whisper":
        return "stt"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "chat"
    if config.get("model_type") in ENCODER_TYPES:
        return "embedding"
    fail(
        f"cannot tell whether {src} is a chat or an embedding model "
        f"(architectures={architectures}, model_type={config.get('model_type')}); pass --kind"
    )


# ---------------------------------------------------------------------------- chat


def untie(src: Path, work: Path, log: Path, python: Path = EXPORT_PY) -> Path:
    """A copy of SRC whose lm_head has its own weights (SRC itself if it is not tied).
    Runs with the transformers of the exporter that reads the copy."""
    info_path = work / "untie.json"
    shutil.rmtree(work / "untied", ignore_errors=True)
    run(
        [str(python), str(HERE / "untie.py"), str(src), str(work / "untied"), str(info_path)],
        log,
        "untying lm_head",
    )
    info = read_json(info_path)
    if not info["untied"]:
        stage("lm_head is not tied to the embeddings")
        return src
    stage(f"untied lm_head from the embeddings ({info['seconds']:.1f}s)")
    return work / "untied"


def build_genai(src: Path, out: Path, work: Path, quant: str, log: Path) -> None:
    stage(f"building ONNX with the onnxruntime-genai model builder ({quant}, cpu)")
    started = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    run(
        [
            str(EXPORT_PY),
            str(HERE / "run_builder.py"),  # the builder, fed configs it can read
            "-i",
            str(src),
            "-o",
            str(out),
            "-p",
            quant,
            "-e",
            "cpu",
            "-c",
            str(work / "cache"),
        ],
        log,
        "onnxruntime-genai model builder",
    )
    stage(f"model builder done in {time.monotonic() - started:.1f}s")


def lm_head_is_float(out: Path, work: Path, log: Path) -> bool:
    report_path = work / "graph.json"
    with report_path.open("w", encoding="utf-8") as report:
        result = subprocess.run(
            [str(EXPORT_PY), str(HERE / "check_graph.py"), str(out)],
            stdout=report,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        with log.open("a", encoding="utf-8") as fh:
            fh.write(result.stderr)
        fail("could not read the exported graph (check_graph.py)")
    return bool(read_json(report_path)["lm_head_float"])


def builder_architectures() -> set[str]:
    """The architectures the installed onnxruntime-genai model builder knows."""
    found = sorted((REPO / ".venv-export" / "lib").glob("python*/site-packages/onnxruntime_genai"))
    if not found:
        fail("onnxruntime-genai is not installed in .venv-export")
    text = (found[0] / "models" / "builder.py").read_text(encoding="utf-8")
    return set(re.findall(r'architectures\[0\] == "(\w+)"', text))


def export_chat(
    src: Path, out: Path, work: Path, quant: str, context: int | None, untie_mode: str, via: str
) -> int:
    ensure_env("export")
    log = work / "export.log"
    if via == "auto":
        architectures = read_json(src / "config.json").get("architectures") or []
        known = builder_architectures()
        via = "builder" if any(a in known for a in architectures) else "optimum"
        if via == "optimum":
            stage(f"the genai model builder lacks {architectures}: exporting with optimum")
    if via == "builder":
        build_with_builder(src, out, work, quant, untie_mode, log)
    else:
        build_with_optimum(src, out, work, quant, untie_mode, log)
    return finish_chat(src, out, context)


def build_with_builder(
    src: Path, out: Path, work: Path, quant: str, untie_mode: str, log: Path
) -> None:
    """onnxruntime-genai builder. A tied lm_head must end up quantized too: the builder
    (0.18) shares one int4 matrix between the embedding and lm_head and quantizes an
    int8 head on its own; if a build still multiplies by a float head (a Transpose of
    the embedding table), the model is untied and built again (--untie always: first)."""
    builder_input = src
    untied = False
    if quant != "fp32" and untie_mode == "always":
        builder_input = untie(src, work, log)
        untied = True
    build_genai(builder_input, out, work, quant, log)
    if quant != "fp32" and untie_mode != "never":
        stage("checking that lm_head is quantized")
        if lm_head_is_float(out, work, log):
            if untied:
                fail("lm_head is still a float MatMul after untying")
            stage("lm_head stayed float: untying it and building again")
            builder_input = untie(src, work, log)
            build_genai(builder_input, out, work, quant, log)
            if lm_head_is_float(out, work, log):
                fail("lm_head is still a float MatMul after untying")


def build_with_optimum(
    src: Path, out: Path, work: Path, quant: str, untie_mode: str, log: Path
) -> None:
    """optimum (text-generation-with-past), MatMulNBits quantization, and a hand-written
    genai_config.json for genai's generic decoder. optimum exports a tied lm_head as a
    MatMul with Transpose(embedding), which the quantizer leaves float: untie first."""
    ensure_env("optimum")
    python = OPTIMUM_BIN / "python"
    source = src
    if quant != "fp32" and untie_mode != "never":
        source = untie(src, work, log, python)
    stage("exporting ONNX with optimum (text-generation-with-past)")
    started = time.monotonic()
    run(
        [
            str(OPTIMUM_BIN / "optimum-cli"),
            "export",
            "onnx",
            "--model",
            str(source),
            "--task",
            "text-generation-with-past",
            str(out),
        ],
        log,
        "optimum export",
    )
    stage(f"optimum export done in {time.monotonic() - started:.1f}s")
    if quant != "fp32":
        bits = "4" if quant == "int4" else "8"
        stage(f"quantizing MatMuls to {quant} (MatMulNBits)")
        run(
            [str(python), str(HERE / "optimum_decoder.py"), "quantize", str(out), bits],
            log,
            f"{quant} quantization",
        )
        if untie_mode != "never":
            stage("checking that lm_head is quantized")
            if lm_head_is_float(out, work, log):
                fail("lm_head is still a float MatMul after untying")
    native = read_json(src / "config.json").get("max_position_embeddings") or read_json(
        src / "config.json"
    ).get("n_positions", DEFAULT_MAX_CONTEXT)
    run(
        [
            str(python),
            str(HERE / "optimum_decoder.py"),
            "genai-config",
            str(source),
            str(out),
            str(int(native)),
        ],
        log,
        "writing genai_config.json",
    )


def finish_chat(src: Path, out: Path, context: int | None) -> int:
    """Tokenizer files, chat template and context length: the same for both exporters."""
    # The exporters save the tokenizer; fill in what they missed.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if not (out / name).exists() and (src / name).is_file():
            shutil.copy2(src / name, out / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / name).is_file():
            fail(f"the export has no {name} (the source has no fast tokenizer?)")
    has_template = (out / "chat_template.jinja").is_file() or bool(
        read_json(out / "tokenizer_config.json").get("chat_template")
    )
    if not has_template:
        stage("warning: the model has no chat template; the worker cannot serve chat with it")

    genai_path = out / "genai_config.json"
    genai = read_json(genai_path)
    native = int(genai["model"]["context_length"])
    if context is None:
        context = min(native, DEFAULT_MAX_CONTEXT)
    elif context > native:
        fail(f"--context-length {context} exceeds the model's maximum ({native})")
    genai["model"]["context_length"] = context
    genai["search"]["max_length"] = context
    genai_path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return context


# ---------------------------------------------------------------------------- speech to text


def whisper_languages(src: Path) -> list[str]:
    """The languages a Whisper folder knows, in token order: generation_config.json's
    lang_to_id ("<|en|>": 50259, ...); an English-only model (whisper-*.en) has none."""
    generation = _json_object(src / "generation_config.json")
    lang_to_id = generation.get("lang_to_id")
    if isinstance(lang_to_id, dict) and lang_to_id:
        ordered = sorted(lang_to_id.items(), key=lambda item: int(item[1]))
        return [token.strip("<|>") for token, _ in ordered]
    if generation.get("is_multilingual") is True:
        fail(f"{src}: a multilingual Whisper without lang_to_id in generation_config.json")
    return ["en"]


def export_stt(src: Path, out: Path, work: Path, quant: str) -> tuple[int, list[str]]:
    """Whisper through the genai model builder: (context length, languages)."""
    ensure_env("export")
    log = work / "export.log"
    config = read_json(src / "config.json")
    if WHISPER not in (config.get("architectures") or []):
        fail(f"{src}: only {WHISPER} models can be speech-to-text models here")
    languages = whisper_languages(src)
    build_genai(src, out, work, quant, log)
    missing = [name for name in STT_FILES if not (out / name).is_file()]
    if missing:
        fail(f"the Whisper export lacks {missing}")
    context = int(read_json(out / "genai_config.json")["model"]["context_length"])
    return context, languages


# ---------------------------------------------------------------------------- embedding


def pooling_of(src: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, dimensions) from sentence-transformers files, if any."""
    modules_path = src / "modules.json"
    if not modules_path.is_file():
        stage("warning: not a sentence-transformers model; recording mean pooling + normalize")
        return "mean", True, None
    modules = read_json(modules_path)
    pooling_dir = next(
        (m.get("path", "1_Pooling") for m in modules if m.get("type", "").endswith(".Pooling")),
        "1_Pooling",
    )
    config_path = src / pooling_dir / "config.json"
    if not config_path.is_file():
        return "mean", True, None
    config = read_json(config_path)
    if config.get("pooling_mode_cls_token"):
        pooling = "cls"
    elif config.get("pooling_mode_max_tokens"):
        pooling = "max"
    elif config.get("pooling_mode_lasttoken"):
        pooling = "last"
    else:
        pooling = "mean"
    dims = config.get("word_embedding_dimension")
    return pooling, True, int(dims) if dims else None


def export_embedding(
    src: Path, out: Path, work: Path, quant: str, context: int | None
) -> tuple[int, dict[str, Any]]:
    if quant == "int4":
        fail("int4 is for chat models; embedding exports support fp32 or int8")
    ensure_env("optimum")
    log = work / "export.log"
    stage("exporting ONNX with optimum (feature-extraction)")
    started = time.monotonic()
    run(
        [
            str(OPTIMUM_BIN / "optimum-cli"),
            "export",
            "onnx",
            "--model",
            str(src),
            "--task",
            "feature-extraction",
            str(out),
        ],
        log,
        "optimum export",
    )
    stage(f"optimum export done in {time.monotonic() - started:.1f}s")
    if quant == "int8":
        stage("quantizing weights to int8 (onnxruntime quantize_dynamic)")
        run(
            [
                str(OPTIMUM_BIN / "python"),
                str(HERE / "quantize_embedding.py"),
                str(out / "model.onnx"),
            ],
            log,
            "int8 quantization",
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / name).exists() and (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if not (out / "tokenizer.json").is_file():
        fail("the export has no tokenizer.json (the source has no fast tokenizer?)")

    config = read_json(src / "config.json")
    pooling, normalize, dims = pooling_of(src)
    native = int(config.get("max_position_embeddings") or 512)
    seq = None
    if (src / "sentence_bert_config.json").is_file():
        seq = read_json(src / "sentence_bert_config.json").get("max_seq_length")
    if context is None:
        context = min(int(seq or native), native)
    elif context > native:
        fail(f"--context-length {context} exceeds the model's maximum ({native})")
    # Padding is the server's business (it batches); truncate at the recorded context.
    tokenizer_path = out / "tokenizer.json"
    tokenizer = read_json(tokenizer_path)
    tokenizer["padding"] = None
    tokenizer["truncation"] = {
        "direction": "Right",
        "max_length": context,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    tokenizer_path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8")
    embedding = {
        "dimensions": dims or int(config["hidden_size"]),
        "pooling": pooling,
        "normalize": normalize,
    }
    return context, embedding


# ---------------------------------------------------------------------------- manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out: Path, fields: dict[str, Any]) -> dict[str, Any]:
    files: list[dict[str, Any]] = []
    total = 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel == MANIFEST:
            continue
        size = path.stat().st_size
        total += size
        files.append({"path": rel, "sha256": sha256_of(path), "size_bytes": size})
    manifest = {
        "format_version": 1,
        "name": fields["name"],
        "kind": fields["kind"],
        "runtime": fields["runtime"],
        "source": fields["source"],
        "quantization": fields["quantization"],
        "context_length": fields["context_length"],
        "size_bytes": total,
        "files": files,
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "embedding": fields["embedding"],
        **fields.get("extra", {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ---------------------------------------------------------------------------- main


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="export_model", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "source",
        help="Hugging Face hub id (owner/name), local model folder, or a .gguf file (as "
        "llama.cpp keeps models; Ollama's blobs, ~/.ollama/models/blobs/sha256-..., are GGUF "
        "files too): dequantized, then built and quantized like any chat model by the genai "
        "model builder, for the architectures it knows",
    )
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist, or --force)")
    parser.add_argument(
        "--name",
        help="the model's id: the name the worker serves it under and Home Assistant shows "
        "(no slash). Default, from the model's own metadata: a GGUF's general.name (else its "
        "file name); a hub id's repository name; a folder's model card name (README.md "
        "model_name or model-index), config.json's _name_or_path hub id (tokenizer_config's "
        "name_or_path) unless the card's first heading names it more precisely, else the "
        "folder's name, or its parent's when the folder is called hf, model, ... "
        "(_name_or_path may name the base model of a fine-tune: "
        "pass --name then)",
    )
    parser.add_argument(
        "--quant", choices=QUANTS, help="default: int4 for chat and stt, fp32 for embedding"
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="auto: embedding for sentence-transformers/encoder models, chat for causal LMs, "
        "stt (speech to text) for Whisper, also from a faster-whisper (CTranslate2) folder; "
        "tts for a Piper voice (VOICE.onnx with VOICE.onnx.json, taken as it is)",
    )
    parser.add_argument(
        "--context-length",
        type=positive_int,
        default=None,
        help=f"chat default: the model's own, at most {DEFAULT_MAX_CONTEXT} (genai preallocates "
        "its KV cache to it); embedding default: max_seq_length",
    )
    parser.add_argument(
        "--untie",
        choices=("auto", "always", "never"),
        default="auto",
        help="chat, int4/int8: give a tied lm_head its own weights before quantizing "
        "(auto: when the exporter would leave it float: optimum always, the genai builder "
        "only if its build shows a float lm_head)",
    )
    parser.add_argument(
        "--via",
        choices=("auto", "builder", "optimum"),
        default="auto",
        help="chat exporter (auto: the genai model builder if it knows the architecture)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--source-label", help=argparse.SUPPRESS)  # "source" in the manifest
    args = parser.parse_args(argv)
    if args.name is not None and (problem := name_problem(args.name)):
        fail(f"--name {args.name!r} cannot be a model id: {problem}")

    out: Path = args.out_dir.expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            fail(f"output path exists and is not a folder: {out}")
        if any(out.iterdir()) and not args.force:
            fail(f"output folder is not empty: {out} (pass --force to replace it)")
    if not out.parent.is_dir():
        fail(f"parent folder of the output does not exist: {out.parent}")

    work = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        voice = piper_voice(args.source) if args.kind in ("auto", "tts") else None
        if args.kind == "tts" and voice is None:
            fail(f"{args.source} is no Piper voice (a VOICE.onnx with its VOICE.onnx.json)")
        if voice is not None:
            if args.quant or args.context_length or args.via != "auto":
                fail(
                    "a Piper voice is taken as it is: --quant, --context-length, --via do not apply"
                )
            stage(f"taking the Piper voice {voice.name} as it is")
            staged = work / "out"
            import_voice(voice, staged, args.name)
            for path in staged.rglob("*"):  # the server may be another user
                path.chmod(0o755 if path.is_dir() else 0o644)
            if out.exists():
                out.rename(work / "previous")
            staged.rename(out)
            manifest = read_json(out / MANIFEST)
            stage(f"done: {out} ({manifest['size_bytes'] / 1e6:.1f} MB, voice {manifest['name']})")
            print(out)
            return 0
        if is_gguf(args.source) and args.kind == "embedding":
            fail("a .gguf file is imported as a chat model; --kind embedding takes a folder")
        if is_gguf(args.source) and args.via == "optimum":
            fail("a .gguf file is built with the genai model builder; --via optimum takes a folder")
        src, source, default_name = resolve_source(args.source, work)
        kind = detect_kind(src, args.kind)
        quant = args.quant or ("fp32" if kind == "embedding" else "int4")
        if kind == "stt" and args.context_length:
            fail("--context-length is for chat and embedding models (Whisper's is its own)")
        native = read_json(src / "config.json").get("max_position_embeddings")
        if args.context_length and isinstance(native, int) and args.context_length > native:
            fail(f"--context-length {args.context_length} exceeds the model's maximum ({native})")
        name = args.name or default_name
        stage(f"exporting {source} as {kind} model '{name}' ({quant})")
        staged = work / "out"
        embedding = None
        extra: dict[str, Any] = {}
        if kind == "stt":
            context, languages = export_stt(src, staged, work, quant)
            runtime = "onnxruntime-genai"
            extra = {
                "format": "genai-whisper",
                "languages": languages,
                "sample_rate": STT_SAMPLE_RATE,
            }
        elif kind == "chat":
            context = export_chat(
                src, staged, work, quant, args.context_length, args.untie, args.via
            )
            runtime = "onnxruntime-genai"
        else:
            context, embedding = export_embedding(src, staged, work, quant, args.context_length)
            runtime = "onnxruntime"
        for path in staged.rglob("*"):  # some writers leave 0600; the server may be another user
            path.chmod(0o755 if path.is_dir() else 0o644)
        stage("writing hearth-model.json (sha256 of every file)")
        manifest = write_manifest(
            staged,
            {
                "name": name,
                "kind": kind,
                "runtime": runtime,
                "source": args.source_label or source,
                "quantization": quant,
                "context_length": context,
                "embedding": embedding,
                "extra": extra,
            },
        )
        # Swap the finished folder in: a half-written export never sits at OUT_DIR.
        old = work / "previous"
        if out.exists():
            out.rename(old)
        staged.rename(out)
        stage(
            f"done: {out} ({manifest['size_bytes'] / 1e6:.1f} MB, {len(manifest['files'])} files, "
            f"context {context})"
        )
    except BaseException:
        if _LOGS and _LOGS[0].is_file():
            kept = out.parent / f".{out.name}.export.log"
            shutil.move(_LOGS[0], kept)
            print(f"export_model: the tools' output is in {kept}", file=sys.stderr)
        raise
    finally:
        if os.environ.get("HEARTH_EXPORT_KEEP_WORK") != "1":
            shutil.rmtree(work, ignore_errors=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
