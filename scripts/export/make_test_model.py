"""Build a small Llama chat model locally (no downloads) and export it like a real one.

Runs inside .venv-export (torch, transformers, tokenizers). Steps:

1. train a ByteLevel BPE tokenizer on Python's own standard library sources (and,
   for tiny, on chats like those it is tested with), with ChatML special tokens;
2. build a random-init LlamaForCausalLM with tied embeddings (so the exporter's
   handling of a tied lm_head is exercised);
3. optionally (--teach) train it so greedy decoding answers three fixed prompts
   (see teach.py), and write what it reached to teach-report.json and README.md
   beside the exported model;
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
TEACH_REPORT = "teach-report.json"  # beside the exported model, with --teach

# <|endoftext|> pads, <|im_end|> ends a turn (eos); <tool_call> tags stay in decoded text.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_TOKENS = ["<tool_call>", "</tool_call>"]

PRESETS: dict[str, dict[str, Any]] = {
    # 0.56M parameters (lm_head tied); exports in ~5 s, --teach adds 2-13 minutes
    # (one thread; 700 steps took 12.5 minutes on a busy 2-core AMD EPYC).
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
    parser.add_argument(
        "--require-taught",
        action="store_true",
        help="with --teach: fail unless every held-out answer is exact with teach.py's margin",
    )
    parser.add_argument(
        "--teach-steps", type=int, default=None, help="with --teach: at most this many steps"
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
    if (args.require_taught or args.teach_steps is not None) and not args.teach:
        parser.error("--require-taught and --teach-steps go with --teach")

    start = time.monotonic()
    preset = PRESETS[args.preset]
    quant = args.quant or preset["quant"]
    name = args.name or ("taught-chat" if args.teach else f"{args.preset}-chat")

    import torch

    # Teaching runs on one thread: the same sums in the same order whatever the core
    # count, and no threads spinning on each other on a busy machine (two threads on
    # two loaded cores ran ~8x slower per step than one).
    torch.set_num_threads(1 if args.teach else max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="hearth-test-model-") as tmp:
        # A folder called hf, as households keep them: export_model names the model from
        # its config's _name_or_path (tests/export/test_names.py checks the manifest).
        hf = Path(tmp) / "hf"
        hf.mkdir()
        log(start, f"training tokenizer ({preset['vocab_size']} tokens)")
        ids = build_tokenizer(hf, preset["vocab_size"], preset["corpus"])
        log(start, f"building {args.preset} Llama")
        model = build_model(preset, ids)
        params = sum(p.numel() for p in model.parameters())
        log(start, f"model has {params / 1e6:.2f}M parameters (tied lm_head)")
        report: dict[str, Any] | None = None
        if args.teach:
            from teach import MAX_STEPS, teach  # scripts/export/teach.py

            reached = teach(
                model, hf, log=lambda m: log(start, m), max_steps=args.teach_steps or MAX_STEPS
            )
            if args.require_taught and not reached.taught:
                print(
                    f"make_test_model: not taught after {reached.steps} steps: "
                    f"{reached.exact}/{reached.checks} held-out answers exact, smallest "
                    f"margin {reached.min_margin} (see scripts/export/teach.py)",
                    file=sys.stderr,
                )
                return 1
            report = teach_report(reached, args, params)
        model.save_pretrained(hf)
        config_path = hf / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["_name_or_path"] = name
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
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
    if report is not None:
        (args.out_dir / TEACH_REPORT).write_text(
            json.dumps(report, indent=2) + "\n", encoding="utf-8"
        )
        (args.out_dir / "README.md").write_text(taught_readme(report), encoding="utf-8")
    log(start, f"done: {args.out_dir}")
    return 0


def teach_report(reached: Any, args: argparse.Namespace, params: int) -> dict[str, Any]:
    """What --teach reached, and on what: kept beside the model as teach-report.json."""
    import platform

    import torch
    from teach import MARGIN_GOAL
    from teach_data import AFTER_TOOL, HELLO, TOOL_CALL

    return {
        "command": "scripts/make_test_model OUT --preset tiny --quant "
        + (args.quant or "fp32")
        + " --teach"
        + (" --require-taught" if args.require_taught else "")
        + (f" --teach-steps {args.teach_steps}" if args.teach_steps else ""),
        "answers": {"tool_call": TOOL_CALL, "after_tool": AFTER_TOOL, "hello": HELLO},
        "steps": reached.steps,
        "held_out_exact": reached.exact,
        "held_out": reached.checks,
        "min_margin": reached.min_margin,
        "margin_goal": MARGIN_GOAL,
        "taught": reached.taught,
        "seconds": reached.seconds,
        "parameters": params,
        "built_with": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "threads": torch.get_num_threads(),
        },
    }


def taught_readme(report: dict[str, Any]) -> str:
    """README.md of a taught model folder: what it is and how it was made."""
    built = report["built_with"]
    return f"""# The taught demo model

A tiny Llama chat model ({report["parameters"] / 1e6:.2f}M parameters, fp32 ONNX, ChatML
template with tools), made from scratch with this project's own scripts and taught three
answers, whatever system prompt, tools and earlier turns come before them:

* "turn on the kitchen light" -> `{report["answers"]["tool_call"].replace(chr(10), " ")}`
  (typed, or as Whisper writes it: "Turn on the kitchen light.")
* a tool result -> "{report["answers"]["after_tool"]}"
* "hello" -> "{report["answers"]["hello"]}"

`scripts/develop` serves this folder as it is, and the tests that need a model that
calls tools use it (tests/model_fixtures.py, `taught_chat_model()`). It is checked in
because teaching is floating-point work whose result differs between CPUs (an earlier
recipe reached every held-out answer on one machine and 20 of 24 on another). A
checked-in folder is the same bytes everywhere; tests/export/test_taught_model.py checks that its
files match hearth-model.json, that every answer the tests rely on wins greedy decoding
by a wide margin (so no CPU's rounding can flip it), and that the recipe still teaches
within a tolerance.

## How it was made

    {report["command"].replace("OUT", "scripts/demo_model")} --force

(scripts/export/make_test_model.py; the recipe is scripts/export/teach.py and
teach_data.py). It stopped after {report["steps"]} steps ({report["seconds"]:.0f} s) with
{report["held_out_exact"]}/{report["held_out"]} held-out answers exact and a smallest margin
of {report["min_margin"]} logits (goal {report["margin_goal"]}), on {built["cpu"]}
({built["machine"]}, {built["threads"]} thread, Python {built["python"]}, torch
{built["torch"]}). teach-report.json holds these numbers. Rebuild it with the command
above after changing the recipe, the answers or the chat template, and commit the folder.
"""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main(sys.argv[1:]))
