"""scripts/export_model with a .gguf file: import, names, and GGUFs it cannot take.

The GGUFs here are written by the `gguf` package (in .venv-export, the environment
that imports them): a tiny Llama converted the way llama.cpp's converter does it
(f32, llama.cpp tensor names, q/k rows permuted), and metadata-only files of
architectures the genai model builder cannot build. The real SmolLM2 GGUF has its
own tests (tests/worker/test_real_model.py, tests/integration/test_real_model.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import model_fixtures
import numpy as np
import onnxruntime_genai as og
import pytest

REPO = model_fixtures.REPO
EXPORT_MODEL = REPO / "scripts" / "export_model"
EXPORT_PYTHON = REPO / ".venv-export" / "bin" / "python"

pytestmark = pytest.mark.slow

# Runs in .venv-export: python - HF_DIR OUT.gguf OPTIONS_JSON   (HF_DIR "" = metadata only)
WRITE_GGUF = r"""
import json, sys
from pathlib import Path
import numpy as np
import gguf

hf, path, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
arch = options.get("arch", "llama")
writer = gguf.GGUFWriter(path, arch)
if options.get("name"):
    writer.add_name(options["name"])
if not hf:  # metadata only: enough for an architecture check
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
else:
    from safetensors.numpy import load_file

    hf = Path(hf)
    config = json.loads((hf / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: per attention type
    theta = rope.get("rope_theta") or config["rope_theta"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if rope.get("rope_type") == "llama3":  # llama.cpp writes per-frequency factors
        import math

        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        factors = []
        for i in range(0, head_dim, 2):
            wavelen = 2 * math.pi * float(theta) ** (i / head_dim)
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))

    tokenizer = json.loads((hf / "tokenizer.json").read_text())
    tokens = ["[PAD%d]" % i for i in range(config["vocab_size"])]
    types = [gguf.TokenType.UNUSED] * config["vocab_size"]
    for text, index in tokenizer["model"]["vocab"].items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in tokenizer["added_tokens"]:
        tokens[added["id"]] = added["content"]
        special = added["special"]
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template((hf / "chat_template.jinja").read_text())

    def permute(w, n):  # as llama.cpp's convert_hf_to_gguf.py does for q and k
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for name, weight in load_file(hf / "model.safetensors").items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            weight = permute(weight, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            weight = permute(weight, kv_heads)
        elif arch.startswith("gemma") and name.endswith("norm.weight"):
            weight = weight + 1  # llama.cpp's Gemma norms multiply by w, transformers' by 1 + w
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target, name
        writer.add_tensor(target, np.ascontiguousarray(weight, dtype=np.float32))
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
"""


# Runs in .venv-export: python - TOKENIZER_DIR OUT_DIR MODEL_TYPE SETTINGS_JSON IDS_JSON
# A tiny random model of that type (tokenizer from TOKENIZER_DIR) in OUT_DIR/hf, and
# transformers' logits after IDS in OUT_DIR/reference.npy.
MAKE_TINY = r"""
import json, shutil, sys
from pathlib import Path
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

tokenizer_dir, out, model_type = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
settings, ids = json.loads(sys.argv[4]), json.loads(sys.argv[5])
torch.manual_seed(0)
config = AutoConfig.for_model(model_type, **settings)
model = AutoModelForCausalLM.from_config(config).eval()
model.save_pretrained(out / "hf")
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(tokenizer_dir / name, out / "hf" / name)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
np.save(out / "reference.npy", logits.numpy())
"""


def write_gguf(path: Path, hf_dir: Path | None = None, **options: Any) -> Path:
    subprocess.run(
        [str(EXPORT_PYTHON), "-", str(hf_dir or ""), str(path), json.dumps(options)],
        input=WRITE_GGUF,
        text=True,
        check=True,
        capture_output=True,
    )
    return path


def export_model(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return subprocess.run(
        [str(EXPORT_MODEL), *args],
        capture_output=True,
        text=True,
        env={**environ, **env},
        check=False,
    )


def manifest_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "hearth-model.json").read_text())
    return data


def first_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """The logits after a prompt of token ids (the same ids for both models compared)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    return np.array(generator.get_logits()).reshape(-1)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model's Hugging Face folder (scripts/make_test_model --hf-dir)."""
    base = tmp_path_factory.mktemp("tiny-hf")
    made = subprocess.run(
        [
            str(REPO / "scripts" / "make_test_model"),
            str(base / "onnx"),
            "--hf-dir",
            str(base / "hf"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return base / "hf"


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("arch", "why"),
    [
        ("hearthnet", "transformers cannot dequantize"),  # unknown to everyone
        ("gpt2", "GPT2LMHeadModel in transformers"),  # transformers reads it; builder lacks it
    ],
)
def test_unsupported_architecture_is_one_clear_paragraph(
    tmp_path: Path, arch: str, why: str
) -> None:
    gguf = write_gguf(tmp_path / f"{arch}.gguf", arch=arch, name=f"Some {arch} model")
    done = export_model(str(gguf), str(tmp_path / "out"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("export_model: ")]
    assert len(errors) == 1, done.stderr  # one paragraph, no log dump
    error = errors[0]
    assert error.startswith("export_model: error: ")
    assert f"architecture '{arch}'" in error
    assert why in error
    # what to do: the architectures that work, and the original release instead
    assert "llama" in error and "qwen2" in error
    assert "scripts/export_model OWNER/NAME OUT_DIR" in error
    # nothing left behind: no output, no work folder, no kept log
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{arch}.gguf"]


def test_not_a_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>not found</html>")
    done = export_model(str(fake), str(tmp_path / "out"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "model.gguf is not a GGUF file" in done.stderr
    missing = export_model(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    assert missing.returncode == 2
    assert "GGUF file not found" in missing.stderr


def test_help_mentions_gguf() -> None:
    done = export_model("--help")
    assert done.returncode == 0
    assert ".gguf" in done.stdout


# ---------------------------------------------------------------------------- imports


def copy_folder(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in src.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def test_gguf_import_matches_the_original(tiny_hf: Path, tmp_path: Path) -> None:
    """A GGUF of the tiny model exports to the same model as its Hugging Face folder;
    the name is the GGUF's general.name. The original uses Llama 3 rope scaling, which
    a GGUF keeps only as a rope_freqs tensor (transformers does not read it): the
    import finds the scaling again, else its answers would differ."""
    original = copy_folder(tiny_hf, tmp_path / "hf")
    config = json.loads((original / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_theta": config["rope_parameters"]["rope_theta"],
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
    }
    (original / "config.json").write_text(json.dumps(config))
    gguf = write_gguf(tmp_path / "tiny.gguf", original, name="Tiny Hearth Chat 0.5M")

    done = export_model(str(gguf), str(tmp_path / "from-gguf"), "--quant", "fp32")
    assert done.returncode == 0, done.stderr
    assert "imported a llama GGUF as LlamaForCausalLM" in done.stderr
    manifest = manifest_of(tmp_path / "from-gguf")
    assert manifest["name"] == "Tiny Hearth Chat 0.5M"
    assert manifest["source"] == str(gguf)
    assert manifest["kind"] == "chat"
    assert manifest["quantization"] == "fp32"
    assert (tmp_path / "from-gguf" / "chat_template.jinja").read_text() == (
        original / "chat_template.jinja"
    ).read_text()

    direct = export_model(str(original), str(tmp_path / "direct"), "--quant", "fp32")
    assert direct.returncode == 0, direct.stderr
    ids = [5 + (7 * i) % 1900 for i in range(600)]  # far enough for the scaling to matter
    reference = first_logits(tmp_path / "direct", ids)
    np.testing.assert_allclose(
        first_logits(tmp_path / "from-gguf", ids), reference, rtol=1e-3, atol=1e-3
    )
    # The same weights without the scaling (make_test_model's own export) answer otherwise.
    unscaled = first_logits(tiny_hf.parent / "onnx", ids)
    assert np.abs(unscaled - reference).max() > 0.05


def test_name_option_wins_over_general_name(tiny_hf: Path, tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "tiny.gguf", tiny_hf, name="Tiny Hearth Chat 0.5M")
    done = export_model(str(gguf), str(tmp_path / "out"), "--name", "kitchen-helper")
    assert done.returncode == 0, done.stderr
    manifest = manifest_of(tmp_path / "out")
    assert manifest["name"] == "kitchen-helper"
    assert manifest["quantization"] == "int4"
    # without general.name, the file's name; a GGUF without the suffix, as Ollama keeps
    # its models (blobs/sha256-HEX), is recognized by its magic bytes
    bare = write_gguf(tmp_path / "sha256-0a1b2c3d", tiny_hf)
    done = export_model(str(bare), str(tmp_path / "bare"), "--quant", "fp32")
    assert done.returncode == 0, done.stderr
    assert manifest_of(tmp_path / "bare")["name"] == "sha256-0a1b2c3d"
    assert manifest_of(tmp_path / "bare")["source"] == str(bare)


# ---------------------------------------------------------------------------- config shapes


def gguf_import_module() -> Any:
    """scripts/export/gguf_import.py (its config helpers need only the standard library)."""
    spec = importlib.util.spec_from_file_location(
        "gguf_import", REPO / "scripts" / "export" / "gguf_import.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("config", "rope", "expected"),
    [
        # transformers 5 from a GGUF: the file's name in it, flat rope parameters
        (
            {"_model_name_or_path": "X", "rope_parameters": {"rope_theta": 1e5}},
            None,
            {"rope_theta": 1e5, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}},
        ),
        # older shape: flat rope_theta, rope_scaling with "type"
        (
            {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
            None,
            {
                "rope_theta": 5e5,
                "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0},
            },
        ),
        # scaling found in the GGUF itself wins over the loader's default
        (
            {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
            {
                "rope_theta": 1e4,
                "rope_parameters": {
                    "rope_theta": 1e4,
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32768,
                },
            },
        ),
        # per-layer-type rope (Gemma 3): kept as it is
        (
            {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {}}},
            None,
            {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {}}},
        ),
        # ... with the GGUF's scaling for the global layers (Gemma 3 4B: linear, 8)
        (
            {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {}}},
            {"rope_type": "linear", "factor": 8.0},
            {
                "rope_parameters": {
                    "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                    "sliding_attention": {},
                }
            },
        ),
    ],
)
def test_config_is_normalized(
    config: dict[str, Any], rope: dict[str, Any] | None, expected: dict[str, Any]
) -> None:
    module = gguf_import_module()
    normalized = module.normalize_config({**config, "quantization_config": {}}, rope)
    assert normalized == expected


# ---------------------------------------------------------------------------- architectures

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 2048,
    "max_position_embeddings": 4096,
    "initializer_range": 0.1,
    "rms_norm_eps": 1e-6,
    "bos_token_id": None,
    "eos_token_id": 2045,
    "pad_token_id": 2043,
    "tie_word_embeddings": True,
}
# GGUF architecture -> (transformers model type, settings beside TINY). head_dim differs
# from hidden_size / heads where the architecture allows it: a GGUF states it only as
# attention.key_length, which transformers' loader does not read for these.
ARCHITECTURES = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 16,
            "final_logit_softcapping": 20.0,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16, "num_hidden_layers": 6},
    ),
    "phi3": ("phi3", {"tie_word_embeddings": False, "original_max_position_embeddings": 4096}),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_import_faithfully(arch: str, tiny_hf: Path, tmp_path: Path) -> None:
    """A GGUF of each architecture the builder knows, beside llama, exports to a model
    whose logits are transformers' own for the original weights."""
    model_type, settings = ARCHITECTURES[arch]
    ids = [5 + (7 * i) % 1900 for i in range(40)]  # past the sliding windows
    subprocess.run(
        [
            str(EXPORT_PYTHON),
            "-",
            *(str(tiny_hf), str(tmp_path), model_type),
            *(json.dumps({**TINY, **settings}), json.dumps(ids)),
        ],
        input=MAKE_TINY,
        text=True,
        check=True,
        capture_output=True,
    )
    gguf = write_gguf(tmp_path / f"{arch}.gguf", tmp_path / "hf", arch=arch, name=f"Tiny {arch}")
    done = export_model(str(gguf), str(tmp_path / "out"), "--quant", "fp32")
    assert done.returncode == 0, done.stderr
    assert manifest_of(tmp_path / "out")["name"] == f"Tiny {arch}"
    reference = np.load(tmp_path / "reference.npy")
    np.testing.assert_allclose(first_logits(tmp_path / "out", ids), reference, atol=1e-2, rtol=0)
