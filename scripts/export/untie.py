"""Untie a causal LM's lm_head from its input embeddings (runs in either export env).

usage: untie.py SRC DEST INFO_JSON

If the model ties lm_head to the embeddings, saves a copy in DEST with
tie_word_embeddings=False and lm_head holding its own copy of the weights, so an
exporter that would share it as Transpose(embedding) (optimum) makes lm_head a MatMul
that is quantized like any other. Writes {"untied": bool, "seconds": float}
to INFO_JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def text_config(config: object) -> object:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def main(src: Path, dest: Path, info_path: Path) -> None:
    started = time.monotonic()
    config = AutoConfig.from_pretrained(src)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(text_config(config), "tie_word_embeddings", False)
    )
    if not tied:
        info_path.write_text(json.dumps({"untied": False, "seconds": 0.0}))
        return

    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None or embeddings is None:
        raise SystemExit("untie: the model exposes no input/output embeddings")
    head.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config(model.config).tie_word_embeddings = False
    if head.weight.data_ptr() == embeddings.weight.data_ptr():
        raise SystemExit("untie: lm_head still shares the embedding weights")

    dest.mkdir(parents=True)
    for path in src.iterdir():  # tokenizer, chat template, generation config, ...
        if path.is_file() and not path.name.endswith(WEIGHTS) and path.name not in WEIGHT_INDEXES:
            shutil.copy2(path, dest / path.name)
    model.save_pretrained(dest)
    info_path.write_text(json.dumps({"untied": True, "seconds": time.monotonic() - started}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
