"""Build a small Llama chat model locally (no downloads) and export it like a real one.

Runs inside .venv-export (torch, transformers, tokenizers). Steps:

1. train a ByteLevel BPE tokenizer on Python's own standard library sources (and,
   for tiny, on chats like those it is tested with), with ChatML special tokens;
2. build a random-init LlamaForCausalLM with tied embeddings (so the exporter's
   handling of a tied lm_head is exercised);
3. optionally (--teach) train it briefly so greedy decoding answers three fixed
   prompts (see teach.py);
4. hand the Hugging Face folder to scripts/export_model, the path a real model takes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SEED = 1234

# <|endoftext|> pads, <|im_end|> ends a turn (eos); <tool_call> tags stay in decoded text.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_TOKENS = ["<tool_call>", "</tool_call>"]

PRESETS: dict[str, dict[str, Any]] = {
    # 0.56M parameters (lm_head tied); exports in ~5 s, --teach adds ~80 s.
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        "max_position_embeddings": 8192,
        "corpus": "top",
        "quant": "fp32",
        # At 0.02 greedy decoding repeats one token; at this size 0.05 still does.
        "initializer_range": 0.1,
    },
    # The SmolLM-135M shape, for benchmarks.
    "bench": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 2048,
        "corpus": "all",
        "quant": "int4",
        "initializer_range": 0.05,
    },
}


def log(start: float, message: str) -> None:
    print(
        f"[make_test_model {time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True
    )


def corpus(which: str) -> Iterator[str]:
    """Python's standard library sources (top-level modules, or every package too),
    and for the tiny model also chats like those it is taught and tested with (Home
    Assistant-style prompts and tool lists), so that they take fewer tokens."""
    if which == "top":
        import random

        from teach_data import Sampler  # scripts/export/teach_data.py

        sampler = Sampler(
            (HERE / "chat_template.jinja").read_text(encoding="utf-8"), random.Random(77)
        )
        for _ in range(300):
            messages, tools = sampler.conversation()
            yield sampler.render(messages, tools, False)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = stdlib.glob("*.py") if which == "top" else stdlib.rglob("*.py")
    for path in sorted(paths):
        if "site-packages" in path.parts:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def build_tokenizer(out: Path, vocab_size: int, which_corpus: str) -> dict[str, int]:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(TEXT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(which_corpus), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(
            f"make_test_model: tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}"
            " (the training corpus is too small for this vocabulary)"
        )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1 << 20,
    )
    fast.chat_template = (HERE / "chat_template.jinja").read_text(encoding="utf-8")
    fast.save_pretrained(out)
    # A class name that every consumer knows (onnxruntime-extensions picks its BPE
    # implementation from it); the vocabulary itself lives in tokenizer.json.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "GPT2Tokenizer"
    config["add_bos_token"] = False
    config["add_prefix_space"] = False
    config_path.write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return {t: int(tok.token_to_id(t)) for t in SPECIAL_TOKENS + TEXT_TOKENS}


def build_model(preset: dict[str, Any], ids: dict[str, int]) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=preset["vocab_size"],
        hidden_size=preset["hidden_size"],
        intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_key_value_heads"],
        max_position_embeddings=preset["max_position_embeddings"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=preset["initializer_range"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    return model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make_test_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--quant", choices=["int4", "int8", "fp32"], default=None)
    parser.add_argument(
        "--teach", action="store_true", help="train it to answer three fixed prompts"
    )
    parser.add_argument("--name", default=None, help="model name in hearth-model.json")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument(
        "--hf-dir", type=Path, default=None, help="also keep the Hugging Face folder here"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    if args.teach and args.preset != "tiny":
        parser.error("--teach works with --preset tiny only")

    start = time.monotonic()
    preset = PRESETS[args.preset]
    quant = args.quant or preset["quant"]
    name = args.name or ("taught-chat" if args.teach else f"{args.preset}-chat")

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="hearth-test-model-") as tmp:
        hf = Path(tmp) / name
        hf.mkdir()
        log(start, f"training tokenizer ({preset['vocab_size']} tokens)")
        ids = build_tokenizer(hf, preset["vocab_size"], preset["corpus"])
        log(start, f"building {args.preset} Llama")
        model = build_model(preset, ids)
        params = sum(p.numel() for p in model.parameters())
        log(start, f"model has {params / 1e6:.2f}M parameters (tied lm_head)")
        if args.teach:
            from teach import teach  # scripts/export/teach.py

            teach(model, hf, log=lambda m: log(start, m))
        model.save_pretrained(hf)
        if args.hf_dir is not None:
            if args.hf_dir.exists():
                shutil.rmtree(args.hf_dir)
            shutil.copytree(hf, args.hf_dir)
        log(start, "exporting with scripts/export_model")
        label = f"scripts/make_test_model --preset {args.preset}" + (
            " --teach" if args.teach else ""
        )
        command = [
            str(REPO / "scripts" / "export_model"),
            str(hf),
            str(args.out_dir),
            "--name",
            name,
            "--quant",
            quant,
            "--kind",
            "chat",
            "--context-length",
            str(args.context_length or preset["max_position_embeddings"]),
            "--source-label",
            label,
        ]
        if args.force:
            command.append("--force")
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            print(f"make_test_model: export failed (exit {result.returncode})", file=sys.stderr)
            return result.returncode
    log(start, f"done: {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main(sys.argv[1:]))
