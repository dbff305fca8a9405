"""A Whisper model in CTranslate2's format (faster-whisper) as a Hugging Face folder.

usage: whisper_ct2.py CT2_DIR OUT_DIR [--report REPORT.json]

CT2_DIR is a folder as faster-whisper (and Home Assistant's Whisper add-on) keep
them: model.bin (or model.bin.part1, model.bin.part2, ... to be joined in order),
config.json, tokenizer.json and vocabulary.txt (or vocabulary.json). OUT_DIR gets
what transformers' WhisperForConditionalGeneration and WhisperProcessor load:
config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json, special_tokens_map.json and preprocessor_config.json.

model.bin (ctranslate2/specs/model_spec.py, ModelSpec._serialize): a uint32 binary
version, the spec's name and revision, then each variable as (name, rank, shape,
dtype id, byte count, bytes), then aliases (name -> name of an equal variable). All
little-endian; strings are a uint16 length (with the closing NUL) and UTF-8 bytes.
Weights are float32, float16 or bfloat16, or int8/int16 with a `weight_scale`
(quantized as round(w * scale): w = q / scale).

CTranslate2's Whisper converter (converters/transformers.py, WhisperLoader on
BartLoader) fuses the attention projections: self-attention `linear_0` is q, k and
v stacked (k has no bias in Hugging Face's Whisper: a zero bias is stored),
cross-attention `linear_0` is q and `linear_1` is k and v; `linear_1` (self) and
`linear_2` (cross) are the output projections. No scaling is folded into the
weights. This undoes exactly that; every variable is accounted for, or the
conversion fails. The dimensions come from the tensors and the head counts from
the spec's own scalars.

Needs only numpy and the standard library (safetensors are written by hand): no
ctranslate2, no torch.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

# ctranslate2/specs/model_spec.py _dtype_to_type_id: the order of its DataType enum.
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_SPECIAL = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3}|haw|yue)\|>")
SAMPLE_RATE = 16000


class ConversionError(ValueError):
    """The folder is not a CTranslate2 Whisper model this converter can map."""


# ---------------------------------------------------------------------------- model.bin


def model_bytes(folder: Path) -> bytes:
    """model.bin, or its parts (model.bin.part1, part2, ...) joined in order."""
    whole = folder / "model.bin"
    if whole.is_file():
        return whole.read_bytes()
    parts = sorted(
        folder.glob("model.bin.part*"),
        key=lambda p: int(p.name.removeprefix("model.bin.part") or 0),
    )
    if not parts or any(not p.name.removeprefix("model.bin.part").isdigit() for p in parts):
        raise ConversionError(f"{folder} has no model.bin (nor model.bin.part1, part2, ...)")
    numbers = [int(p.name.removeprefix("model.bin.part")) for p in parts]
    if numbers != list(range(1, len(parts) + 1)):
        raise ConversionError(f"{folder}: model.bin parts {numbers} are not 1..{len(parts)}")
    return b"".join(p.read_bytes() for p in parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ConversionError("model.bin ends early (a part missing or truncated?)")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str) -> int:
        return int(struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0])

    def string(self) -> str:
        size = self.unpack("H")
        return self.take(size)[:-1].decode("utf-8")


def _array(raw: bytes, dtype: str, shape: list[int]) -> np.ndarray[Any, Any]:
    if dtype == "bfloat16":  # numpy has none: the high half of a float32
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def read_model_bin(data: bytes) -> tuple[str, dict[str, np.ndarray[Any, Any]], dict[str, str]]:
    """(spec name, variables by name, aliases: name -> the variable it equals)."""
    reader = _Reader(data)
    version = reader.unpack("I")
    if not 1 <= version <= 6:
        raise ConversionError(f"model.bin has binary version {version} (this reads 1 to 6)")
    spec = reader.string() if version >= 2 else ""
    if version >= 2:
        reader.unpack("I")  # the spec's revision
    variables: dict[str, np.ndarray[Any, Any]] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        if version >= 4:
            type_id = reader.unpack("B")
            if type_id >= len(_DTYPES):
                raise ConversionError(f"{name}: unknown data type id {type_id}")
            dtype = _DTYPES[type_id]
            size = reader.unpack("I")
        else:  # older files: an item size, float32 or int8/int16 by size
            item = reader.unpack("B")
            dtype = {4: "float32", 2: "int16", 1: "int8"}[item]
            size = reader.unpack("I") * item
        variables[name] = _array(reader.take(size), dtype, shape)
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(reader.unpack("I")):
            alias = reader.string()
            aliases[alias] = reader.string()
    return spec, variables, aliases


# ---------------------------------------------------------------------------- mapping


class _Weights:
    """The variables of model.bin, taken one by one (so leftovers can be found)."""

    def __init__(self, variables: dict[str, np.ndarray[Any, Any]], aliases: dict[str, str]):
        self.variables = variables
        self.aliases = aliases
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def take(self, name: str) -> np.ndarray[Any, Any]:
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise ConversionError(f"model.bin has no {name}")
        self.used.add(name)
        self.used.add(target)
        value = self.variables[target]
        if value.dtype in (np.int8, np.int16):  # quantized: w = q / scale
            scale_name = f"{target}_scale"
            if scale_name not in self.variables:
                raise ConversionError(f"{name} is {value.dtype} without {scale_name}")
            self.used.add(scale_name)
            scale = self.variables[scale_name].astype(np.float32)
            if scale.ndim == 1:
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            return value.astype(np.float32) / scale
        return value.astype(np.float32)

    def scalar(self, name: str) -> int:
        value = self.variables.get(name)
        if value is None or value.ndim != 0:
            raise ConversionError(f"model.bin has no scalar {name}")
        self.used.add(name)
        return int(value)

    def leftovers(self) -> list[str]:
        """Variables with values (not scalars) that nothing took."""
        return sorted(
            name
            for name, value in self.variables.items()
            if name not in self.used and value.ndim > 0
        )


def _layer_count(weights: _Weights, prefix: str) -> int:
    count = 0
    while weights.has(f"{prefix}/layer_{count}/ffn/linear_0/weight"):
        count += 1
    if count == 0:
        raise ConversionError(f"model.bin has no {prefix} layers")
    return count


def _linear(weights: _Weights, src: str, dst: str, out: dict[str, np.ndarray[Any, Any]]) -> None:
    out[f"{dst}.weight"] = weights.take(f"{src}/weight")
    out[f"{dst}.bias"] = weights.take(f"{src}/bias")


def _norm(weights: _Weights, src: str, dst: str, out: dict[str, np.ndarray[Any, Any]]) -> None:
    out[f"{dst}.weight"] = weights.take(f"{src}/gamma")
    out[f"{dst}.bias"] = weights.take(f"{src}/beta")


def _split_rows(value: np.ndarray[Any, Any], parts: int, name: str) -> list[np.ndarray[Any, Any]]:
    if value.shape[0] % parts:
        raise ConversionError(f"{name}: {value.shape[0]} rows do not split in {parts}")
    return list(np.split(value, parts, axis=0))


def _attention(
    weights: _Weights,
    src: str,
    dst: str,
    out: dict[str, np.ndarray[Any, Any]],
    *,
    cross: bool,
) -> None:
    """q, k, v and out projections from CTranslate2's fused ones."""
    if cross:
        out[f"{dst}.q_proj.weight"] = weights.take(f"{src}/linear_0/weight")
        out[f"{dst}.q_proj.bias"] = weights.take(f"{src}/linear_0/bias")
        kv = f"{src}/linear_1"
        k_w, v_w = _split_rows(weights.take(f"{kv}/weight"), 2, kv)
        k_b, v_b = _split_rows(weights.take(f"{kv}/bias"), 2, kv)
        output = f"{src}/linear_2"
    else:
        qkv = f"{src}/linear_0"
        q_w, k_w, v_w = _split_rows(weights.take(f"{qkv}/weight"), 3, qkv)
        q_b, k_b, v_b = _split_rows(weights.take(f"{qkv}/bias"), 3, qkv)
        out[f"{dst}.q_proj.weight"] = q_w
        out[f"{dst}.q_proj.bias"] = q_b
        output = f"{src}/linear_1"
    if np.any(k_b):
        raise ConversionError(f"{src}: the key projection has a bias (Whisper's has none)")
    out[f"{dst}.k_proj.weight"] = k_w
    out[f"{dst}.v_proj.weight"] = v_w
    out[f"{dst}.v_proj.bias"] = v_b
    _linear(weights, output, f"{dst}.out_proj", out)


def _layer_common(
    weights: _Weights, src: str, dst: str, out: dict[str, np.ndarray[Any, Any]]
) -> None:
    _attention(weights, f"{src}/self_attention", f"{dst}.self_attn", out, cross=False)
    _norm(weights, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", out)
    _linear(weights, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
    _linear(weights, f"{src}/ffn/linear_1", f"{dst}.fc2", out)
    _norm(weights, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)


def convert_weights(
    variables: dict[str, np.ndarray[Any, Any]], aliases: dict[str, str]
) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, int], bool]:
    """(Hugging Face state dict, dimensions, whether proj_out is tied to the embeddings)."""
    weights = _Weights(variables, aliases)
    out: dict[str, np.ndarray[Any, Any]] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        _linear(weights, f"encoder/{conv}", f"{enc}.{conv}", out)
    out[f"{enc}.embed_positions.weight"] = weights.take("encoder/position_encodings/encodings")
    encoder_layers = _layer_count(weights, "encoder")
    for i in range(encoder_layers):
        _layer_common(weights, f"encoder/layer_{i}", f"{enc}.layers.{i}", out)
    _norm(weights, "encoder/layer_norm", f"{enc}.layer_norm", out)

    out[f"{dec}.embed_tokens.weight"] = weights.take("decoder/embeddings/weight")
    out[f"{dec}.embed_positions.weight"] = weights.take("decoder/position_encodings/encodings")
    decoder_layers = _layer_count(weights, "decoder")
    for i in range(decoder_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        _layer_common(weights, src, dst, out)
        _attention(weights, f"{src}/attention", f"{dst}.encoder_attn", out, cross=True)
        _norm(weights, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", out)
    _norm(weights, "decoder/layer_norm", f"{dec}.layer_norm", out)

    projection = "decoder/projection/weight"
    tied = aliases.get(projection) == "decoder/embeddings/weight"
    head = weights.take(projection)
    if not tied:
        tied = bool(np.array_equal(head, out[f"{dec}.embed_tokens.weight"]))
    if not tied:
        out["proj_out.weight"] = head
    if weights.has("decoder/projection/bias"):
        bias = weights.take("decoder/projection/bias")
        if np.any(bias):
            raise ConversionError("the output projection has a bias (Whisper's has none)")
    leftovers = weights.leftovers()
    if leftovers:
        raise ConversionError(f"model.bin variables this converter cannot map: {leftovers}")

    embed = out[f"{dec}.embed_tokens.weight"]
    dims = {
        "d_model": int(embed.shape[1]),
        "vocab_size": int(embed.shape[0]),
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "encoder_attention_heads": weights.scalar("encoder/num_heads"),
        "decoder_attention_heads": weights.scalar("decoder/num_heads"),
        "encoder_ffn_dim": int(out[f"{enc}.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(out[f"{dec}.layers.0.fc1.weight"].shape[0]),
        "num_mel_bins": int(out[f"{enc}.conv1.weight"].shape[1]),
        "max_source_positions": int(out[f"{enc}.embed_positions.weight"].shape[0]),
        "max_target_positions": int(out[f"{dec}.embed_positions.weight"].shape[0]),
    }
    return out, dims, tied


# ---------------------------------------------------------------------------- files


def write_safetensors(path: Path, tensors: dict[str, np.ndarray[Any, Any]]) -> None:
    """float32 tensors in the safetensors format (an 8-byte header size, a JSON header,
    the data), written without the safetensors package."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        size = tensors[name].size * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for name in sorted(tensors):
            fh.write(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())


def read_vocabulary(folder: Path) -> list[str]:
    text = folder / "vocabulary.txt"
    if text.is_file():
        tokens = text.read_text(encoding="utf-8").split("\n")  # a token may hold U+2028
        return tokens[:-1] if tokens and tokens[-1] == "" else tokens
    listed = folder / "vocabulary.json"
    if listed.is_file():
        data = json.loads(listed.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return [str(token) for token in data]
    raise ConversionError(f"{folder} has no vocabulary.txt (nor vocabulary.json)")


def complete_tokenizer(tokenizer: dict[str, Any], vocabulary: list[str]) -> int:
    """Add the vocabulary's tokens beyond the tokenizer's (the timestamp tokens
    <|0.00|> ... <|30.00|>, which older tokenizer.json files lack) as special added
    tokens, as newer Whisper tokenizer.json files have them. Returns how many."""
    known = {int(t["id"]) for t in tokenizer.get("added_tokens", [])}
    known |= {int(i) for i in tokenizer["model"]["vocab"].values()}
    added = 0
    for token_id, token in enumerate(vocabulary):
        if token_id in known:
            continue
        tokenizer["added_tokens"].append(
            {
                "id": token_id,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
        added += 1
    return added


def _token_ids(tokenizer: dict[str, Any]) -> dict[str, int]:
    ids = {str(t["content"]): int(t["id"]) for t in tokenizer.get("added_tokens", [])}
    for token in _SPECIAL:
        if token not in ids and token in tokenizer["model"]["vocab"]:
            ids[token] = int(tokenizer["model"]["vocab"][token])
    return ids


def languages_of(ct2_config: dict[str, Any], vocabulary: list[str]) -> dict[str, int]:
    """Language codes (as Whisper's tokens name them) -> token id, in token order."""
    found: dict[str, int] = {}
    for token_id in ct2_config.get("lang_ids") or []:
        if 0 <= int(token_id) < len(vocabulary):
            match = _LANGUAGE_TOKEN.fullmatch(vocabulary[int(token_id)])
            if match:
                found[match.group(1)] = int(token_id)
    return found


def write_hf_folder(
    ct2_dir: Path,
    out: Path,
    tensors: dict[str, np.ndarray[Any, Any]],
    dims: dict[str, int],
    tied: bool,
) -> dict[str, Any]:
    """The Hugging Face folder's files; returns what the report says about them."""
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_path = ct2_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ConversionError(f"{ct2_dir} has no tokenizer.json")
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    vocabulary = read_vocabulary(ct2_dir)
    if len(vocabulary) != dims["vocab_size"]:
        raise ConversionError(
            f"vocabulary.txt has {len(vocabulary)} tokens, the model {dims['vocab_size']}"
        )
    added = complete_tokenizer(tokenizer, vocabulary)
    ids = _token_ids(tokenizer)
    for token in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if token not in ids:
            raise ConversionError(f"tokenizer.json has no {token}")
    languages = languages_of(ct2_config, vocabulary)
    multilingual = bool(languages)
    eot = ids["<|endoftext|>"]
    suppress = [int(i) for i in ct2_config.get("suppress_ids") or []]
    begin_suppress = [int(i) for i in ct2_config.get("suppress_ids_begin") or [220, eot]]

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors)
    config: dict[str, Any] = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        **dims,
        "num_hidden_layers": dims["encoder_layers"],
        "activation_function": "gelu",
        "activation_dropout": 0.0,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "apply_spec_augment": False,
        "init_std": 0.02,
        "is_encoder_decoder": True,
        "scale_embedding": False,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": ids["<|startoftranscript|>"],
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "max_length": dims["max_target_positions"],
        "torch_dtype": "float32",
    }
    generation: dict[str, Any] = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": ids["<|startoftranscript|>"],
        "begin_suppress_tokens": begin_suppress,
        "suppress_tokens": suppress,
        "max_length": dims["max_target_positions"],
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if ct2_config.get("alignment_heads"):
        generation["alignment_heads"] = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if multilingual:
        generation["lang_to_id"] = {f"<|{code}|>": i for code, i in languages.items()}
        generation["task_to_id"] = {
            task: ids[f"<|{task}|>"] for task in ("transcribe", "translate") if f"<|{task}|>" in ids
        }
    if "<|startofprev|>" in ids:
        generation["prev_sot_token_id"] = ids["<|startofprev|>"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(
        json.dumps(generation, indent=2) + "\n", encoding="utf-8"
    )
    (out / "tokenizer.json").write_text(
        json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    special = {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "processor_class": "WhisperProcessor",
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 1024,
        "predict_timestamps": False,
        "language": None,
        "task": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2) + "\n", encoding="utf-8"
    )
    chunk = 30
    hop = 160
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": dims["num_mel_bins"],
        "sampling_rate": SAMPLE_RATE,
        "hop_length": hop,
        "n_fft": 400,
        "chunk_length": chunk,
        "n_samples": chunk * SAMPLE_RATE,
        "nb_max_frames": chunk * SAMPLE_RATE // hop,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8"
    )
    return {
        "languages": list(languages),
        "multilingual": multilingual,
        "tied_proj_out": tied,
        "timestamp_tokens_added": added,
    }


def convert(ct2_dir: Path, out: Path) -> dict[str, Any]:
    """Convert; returns a report (also what tests check)."""
    spec, variables, aliases = read_model_bin(model_bytes(ct2_dir))
    if spec and spec != "WhisperSpec":
        raise ConversionError(f"model.bin holds a {spec}, not a WhisperSpec")
    tensors, dims, tied = convert_weights(variables, aliases)
    info = write_hf_folder(ct2_dir, out, tensors, dims, tied)
    return {
        "dims": dims,
        "ct2_variables": sorted(n for n, v in variables.items() if v.ndim > 0),
        "ct2_aliases": aliases,
        "hf_tensors": sorted(tensors),
        **info,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="whisper_ct2.py", description=__doc__.splitlines()[0])
    parser.add_argument("ct2_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--report", type=Path, help="write the conversion report (JSON) here")
    args = parser.parse_args(argv)
    try:
        report = convert(args.ct2_dir, args.out_dir)
    except (ConversionError, OSError, ValueError) as err:
        print(f"whisper_ct2: error: {err}", file=sys.stderr)
        return 3
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    dims = report["dims"]
    print(
        f"converted {len(report['ct2_variables'])} CTranslate2 variables into "
        f"{len(report['hf_tensors'])} tensors: d_model {dims['d_model']}, "
        f"{dims['encoder_layers']}+{dims['decoder_layers']} layers, "
        f"{len(report['languages'])} languages",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
