"""Make an optimum decoder export servable by onnxruntime-genai (runs in .venv-export-optimum).

usage: optimum_decoder.py quantize MODEL_DIR BITS
       optimum_decoder.py genai-config SOURCE_DIR MODEL_DIR CONTEXT_LENGTH

For chat architectures the onnxruntime-genai model builder lacks: optimum exports
them (text-generation-with-past), `quantize` turns their MatMuls into MatMulNBits
(4 or 8 bits; the lm_head too once it has its own weights), and `genai-config`
writes a genai_config.json that maps the export's inputs and outputs
(past_key_values.N.key, present.N.key, ...) for genai's generic "decoder" type.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import onnx


def quantize(model_dir: Path, bits: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = model_dir / "model.onnx"
    model = onnx.load(path, load_external_data=True)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True)
    quantizer.process()
    for old in model_dir.glob("model.onnx*"):
        old.unlink()
    onnx.save_model(
        quantizer.model.model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def _dim(value: onnx.ValueInfoProto, index: int) -> int | None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) > index and dims[index].HasField("dim_value"):
        return int(dims[index].dim_value)
    return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def genai_config(source: Path, model_dir: Path, context: int) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    graph = onnx.load(model_dir / "model.onnx", load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}

    past = sorted(n for n in inputs if re.fullmatch(r"past_key_values\.\d+\.key", n))
    if not past or "logits" not in outputs:
        raise SystemExit("optimum_decoder: the export has no KV-cache inputs or no logits")
    first = inputs[past[0]]
    heads = int(text.num_attention_heads)
    kv_heads = _dim(first, 1) or int(getattr(text, "num_key_value_heads", None) or heads)
    head_size = _dim(first, 3) or int(getattr(text, "head_dim", None) or text.hidden_size // heads)

    generation: dict[str, Any] = {}
    if (source / "generation_config.json").is_file():
        generation = json.loads((source / "generation_config.json").read_text(encoding="utf-8"))
    eos = _ids(generation.get("eos_token_id", text.eos_token_id))
    pad = _ids(generation.get("pad_token_id", text.pad_token_id)) or eos[:1]
    bos = _ids(generation.get("bos_token_id", text.bos_token_id)) or eos[:1]

    names = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": head_size,
        "hidden_size": int(text.hidden_size),
        "inputs": {
            **names,
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": heads,
        "num_hidden_layers": len(past),
        "num_key_value_heads": kv_heads,
    }
    genai = {
        "model": {
            "bos_token_id": bos[0],
            "context_length": context,
            "decoder": decoder,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad[0],
            "type": "decoder",  # genai's generic decoder-only model
            "vocab_size": int(text.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # optimum's cache grows by concatenation
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (model_dir / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "quantize":
        quantize(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "genai-config":
        genai_config(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
