"""Turn a GGUF file into a Hugging Face model folder for the genai model builder.

Runs in .venv-export (torch, transformers, gguf, accelerate).

usage: gguf_import.py GGUF OUT_DIR INFO_JSON

The GGUF's tensors are dequantized by transformers' GGUF loader; the loaded model
refuses save_pretrained ("quantized with gguf"), so its weights move into a fresh
model built from the same config (on the meta device: no second copy in memory),
which saves as usual. Tokenizer and chat template come from the GGUF too. The
config transformers writes from a GGUF differs from a hub release in places (rope
scaling is not read from the GGUF metadata; the file name sits in it): it is
normalized here, see normalize_config.

INFO_JSON gets {"name", "architecture", "hf_architecture", "dtype", "seconds"}. A GGUF
that cannot be imported (not a GGUF, an architecture the builder cannot build, a
split file) is no crash: INFO_JSON gets {"error": "<one paragraph>"} and the exit
status is 3; scripts/export_model shows the paragraph.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

IMPORT_FAILED = 3
# GGUF model types transformers names differently in its model classes.
MODEL_TYPE_RENAMES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
# transformers' names for GGUF architectures llama.cpp spells otherwise.
GGUF_SPELLING = {"gpt_oss": "gpt-oss", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


class ImportRefused(Exception):
    """A GGUF this import cannot take; the message is the paragraph shown to the user."""


def builder_architectures() -> set[str]:
    """The Hugging Face architectures the installed onnxruntime-genai model builder knows."""
    spec = find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        raise ImportRefused("onnxruntime-genai is not installed in the export environment")
    builder = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    return set(re.findall(r'architectures\[0\] == "(\w+)"', builder.read_text(encoding="utf-8")))


def causal_lm_class(model_type: str) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(MODEL_TYPE_RENAMES.get(model_type, model_type))
    return name if isinstance(name, str) else None


def importable_architectures(known: set[str]) -> list[str]:
    """GGUF architectures transformers dequantizes and the builder builds."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    found = []
    for arch in GGUF_SUPPORTED_ARCHITECTURES:
        if arch in GGUF_CONFIG_MAPPING and arch not in ("general", "tokenizer"):  # noqa: SIM102
            if causal_lm_class(arch) in known:
                found.append(GGUF_SPELLING.get(arch, arch))
    return sorted(set(found))


def what_to_do(known: set[str]) -> str:
    archs = ", ".join(importable_architectures(known))
    return (
        f"GGUF files can be imported for these architectures: {archs}. "
        "Export the model's original Hugging Face release (safetensors) instead: "
        "scripts/export_model OWNER/NAME OUT_DIR (or a local folder), which also takes "
        "architectures the builder lacks through optimum."
    )


# ---------------------------------------------------------------------------- metadata


def field_value(reader: Any, key: str) -> Any:
    """A GGUF metadata value as a Python value (str, int, float, bool, list), or None."""
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # an unreadable value counts as absent
        return None


def share_one_reader() -> None:
    """One GGUFReader per file for this process. transformers opens the file anew for
    the config, the weights and the tokenizer, and each reader parses every metadata
    value (tens of thousands of token strings) again: most of an import's time."""
    import gguf

    if getattr(gguf.GGUFReader, "hearth_shared", False):
        return
    open_reader = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = open_reader(path, mode)
        return readers[key]

    shared.hearth_shared = True  # type: ignore[attr-defined]
    gguf.GGUFReader = shared


def read_metadata(path: Path) -> tuple[Any, str, str | None]:
    """(reader, general.architecture, general.name)."""
    share_one_reader()
    from gguf import GGUFReader

    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ImportRefused(
            f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes). "
            "Pass a .gguf model file as llama.cpp or Ollama use them, or a Hugging Face "
            "model folder or hub id."
        )
    try:
        reader = GGUFReader(path)
    except Exception as err:
        raise ImportRefused(
            f"{path.name} cannot be read as a GGUF file ({type(err).__name__}: {err}); "
            "it may be truncated or damaged: download it again."
        ) from None
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ImportRefused(
            f"{path.name} has no general.architecture in its metadata, so it is not clear "
            "which model it holds. Use a GGUF written by llama.cpp's converter, or export "
            "the model's original Hugging Face release with scripts/export_model."
        )
    splits = field_value(reader, "split.count")
    if isinstance(splits, int) and splits > 1:
        raise ImportRefused(
            f"{path.name} is one part of a GGUF split into {splits} files. Merge the parts "
            "into one file first (llama.cpp: llama-gguf-split --merge FIRST_PART OUT.gguf) "
            "and import that."
        )
    name = field_value(reader, "general.name")
    return reader, arch, name.strip() if isinstance(name, str) and name.strip() else None


def check_architecture(path: Path, arch: str) -> tuple[dict[str, Any], str]:
    """The config transformers reads from the GGUF, and the builder architecture to use."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    known = builder_architectures()
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as err:
        if "not supported" not in str(err):
            raise
        raise ImportRefused(
            f"{path.name} holds a model of architecture '{arch}' (general.architecture), "
            "which the GGUF reader of transformers cannot dequantize, so Hearth cannot "
            f"import it. {what_to_do(known)}"
        ) from None
    config: dict[str, Any] = parsed["config"]
    model_type = str(config.get("model_type") or arch)
    hf_class = causal_lm_class(model_type)
    if hf_class is None or hf_class not in known:
        as_class = f" ({hf_class} in transformers)" if hf_class else ""
        raise ImportRefused(
            f"{path.name} holds a model of architecture '{arch}'{as_class}, which the "
            "onnxruntime-genai model builder cannot build, so Hearth cannot import this "
            f"GGUF. {what_to_do(known)}"
        )
    return config, hf_class


# ---------------------------------------------------------------------------- config


def config_overrides(reader: Any, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """Config values a GGUF states that transformers' loader does not read for its type.

    * head_dim: llama.cpp writes it as attention.key_length (Qwen 3, Gemma);
    * Gemma: llama.cpp scales queries by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for
      the 27B models), which transformers calls query_pre_attn_scalar (default 256);
      logit soft-capping as <arch>.attn_logit_softcapping / final_logit_softcapping.
    """
    out: dict[str, Any] = {}
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None
    head_dim = config.get("head_dim") or derived
    key_length = field_value(reader, f"{arch}.attention.key_length")
    if isinstance(key_length, int) and key_length > 0 and key_length != head_dim:
        out["head_dim"] = head_dim = key_length
    if arch in ("gemma2", "gemma3"):
        layers = config.get("num_hidden_layers")
        big = layers == (46 if arch == "gemma2" else 62)  # the 27B models
        scalar = derived if big and derived else head_dim
        if scalar:
            out["query_pre_attn_scalar"] = scalar
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = field_value(reader, f"{arch}.{key}")
        if isinstance(value, (int, float)) and value > 0:
            out[key] = float(value)
    return out


def rope_from_gguf(reader: Any, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    """RoPE scaling as a hub config states it, from the GGUF's metadata and tensors.

    transformers' GGUF loader reads rope scaling for gpt-oss only. llama.cpp writes it
    as `<arch>.rope.scaling.*` keys (linear, yarn), and Llama 3.x's frequency scaling
    as a `rope_freqs.weight` tensor of per-frequency factors.
    """
    kind = field_value(reader, f"{arch}.rope.scaling.type")
    factor = field_value(reader, f"{arch}.rope.scaling.factor")
    original = field_value(reader, f"{arch}.rope.scaling.original_context_length")
    if isinstance(kind, str) and kind not in ("none", "") and factor:
        rope: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        if original:
            rope["original_max_position_embeddings"] = int(original)
        return rope
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    return llama3_rope(
        [float(x) for x in freqs.data.reshape(-1)], head_dim, theta, original, factor
    )


def llama3_rope(
    factors: list[float], head_dim: int, theta: float, original: Any, factor: Any
) -> dict[str, Any]:
    """The llama3 rope parameters that reproduce llama.cpp's rope_freqs factors."""
    scale = float(factor) if factor else max(factors)
    candidates = [int(original)] if original else [8192, 4096, 2048, 16384, 32768, 131072]
    for context in candidates:
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0, 1.0):
                if high <= low:
                    continue
                if _llama3_factors(head_dim, theta, scale, low, high, context, factors):
                    return {
                        "rope_type": "llama3",
                        "factor": scale,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": context,
                    }
    raise ImportRefused(
        "the GGUF scales its rotary embeddings with a rope_freqs tensor that matches no "
        "llama3 rope scaling Hearth knows, so an import would answer wrongly. Export the "
        "model's original Hugging Face release with scripts/export_model instead."
    )


def _llama3_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low: float,
    high: float,
    context: int,
    expected: list[float],
) -> bool:
    """Whether llama3 scaling with these parameters gives llama.cpp's per-frequency factors."""
    if len(expected) != head_dim // 2:
        return False
    low_wavelen = context / low
    high_wavelen = context / high
    for i, got in enumerate(expected):
        freq = 1.0 / theta ** (2 * i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            want = 1.0
        elif wavelen > low_wavelen:
            want = factor
        else:
            smooth = (context / wavelen - low) / (high - low)
            want = 1.0 / ((1 - smooth) / factor + smooth)
        if abs(want - got) > 1e-3 * max(1.0, abs(want)):
            return False
    return True


def normalize_config(config: dict[str, Any], rope: dict[str, Any] | None) -> dict[str, Any]:
    """A config.json as the hub's releases write it, from one transformers wrote from a GGUF.

    * the GGUF's name (`_model_name_or_path`, `_name_or_path`) and quantization_config go;
    * rope settings end up in one `rope_parameters` dict with `rope_type` and `rope_theta`
      (transformers 5 style, which the builder reads), whatever shape they came in: flat
      `rope_theta`, `rope_scaling` with `type` or `rope_type`, or a nested dict per layer
      type (left as is); plus the flat `rope_theta` older readers look for;
    * scaling read from the GGUF itself (`rope`) is added.
    """
    out = {k: v for k, v in config.items() if k not in ("_model_name_or_path", "_name_or_path")}
    out.pop("quantization_config", None)
    params = out.get("rope_parameters")
    scaling = out.pop("rope_scaling", None)
    nested = isinstance(params, dict) and all(isinstance(v, dict) for v in params.values())
    if nested and params:  # per attention type (Gemma 3/4): scaling is the global layers'
        if rope and isinstance(params.get("full_attention"), dict):
            out["rope_parameters"] = {
                **params,
                "full_attention": {**params["full_attention"], **rope},
            }
        return out
    merged: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
    if isinstance(scaling, dict):
        for key, value in scaling.items():
            merged.setdefault(key, value)
    if rope:
        merged.update(rope)
    if "type" in merged:
        merged.setdefault("rope_type", merged.pop("type"))
    theta = merged.get("rope_theta", out.get("rope_theta"))
    if theta is None and not merged:
        return out  # a model without rotary embeddings
    merged.setdefault("rope_type", "default")
    if theta is not None:
        merged["rope_theta"] = float(theta)
        out["rope_theta"] = float(theta)
    out["rope_parameters"] = merged
    return out


# ---------------------------------------------------------------------------- import


def pick_dtype(reader: Any) -> Any:
    """float32 unless its copy would not fit in memory; then float16."""
    import torch

    params = sum(int(t.n_elements) for t in reader.tensors)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    if memory and params * 4 * 1.5 > memory:
        return torch.float16
    return torch.float32


def import_gguf(path: Path, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    reader, arch, name = read_metadata(path)
    gguf_config, hf_class = check_architecture(path, arch)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = pick_dtype(reader)
    folder, file_name = str(path.parent), path.name
    overrides = config_overrides(reader, arch, gguf_config)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=dtype, **overrides
    )
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(model.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    del model
    if type(fresh).__name__ != hf_class:
        raise RuntimeError(f"expected a {hf_class}, transformers built a {type(fresh).__name__}")
    fresh.save_pretrained(out)
    del fresh

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    tokenizer.save_pretrained(out)

    config_path = out / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    head_dim = int(saved.get("head_dim") or saved["hidden_size"] // saved["num_attention_heads"])
    theta = (saved.get("rope_parameters") or {}).get("rope_theta") or gguf_config.get(
        "rope_theta", 10000.0
    )
    rope = rope_from_gguf(reader, arch, head_dim, float(theta))
    config_path.write_text(
        json.dumps(normalize_config(saved, rope), indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    return {
        "name": name,
        "architecture": arch,
        "hf_architecture": hf_class,
        "dtype": str(dtype).removeprefix("torch."),
        "rope": rope,
        "overrides": overrides,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    path, out, info_path = Path(argv[0]), Path(argv[1]), Path(argv[2])
    # No telemetry, no hub lookups: everything here is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        info = import_gguf(path, out)
    except ImportRefused as err:
        info_path.write_text(json.dumps({"error": str(err)}) + "\n", encoding="utf-8")
        print(f"gguf_import: {err}", file=sys.stderr)
        return IMPORT_FAILED
    info_path.write_text(json.dumps(info) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
