"""Probe: can batched decoding pay off on this CPU? One decode step of the real model.

Runs the worker's exported decoder (a standard onnxruntime-genai export: input_ids,
attention_mask, past_key_values.* -> logits, present.*; GroupQueryAttention with its
KV cache shared between past and present, as onnxruntime-genai runs it) with plain
onnxruntime, one decode step at batch 1, 2 and 4, each sequence with its own KV cache
length (right-padded in one buffer, the attention mask marking each one's length), and
reports the aggregate tok/s per batch size and KV length. Interleaved rounds; medians.

It first checks that such a batch is exact: each sequence's next-token logits in the
batch against the same sequence run alone (greedy token equal, max |diff| reported).

    .venv/bin/python scripts/bench/batch_step.py [--model DIR] [--threads N]
        [--past 64,300,1100,1546] [--rounds N] [--steps N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

MAX_LEN = 2048


class Decoder:
    def __init__(self, folder: Path, threads: int) -> None:
        model = json.loads((folder / "genai_config.json").read_text())["model"]
        config = model["decoder"]
        self.max_length = min(MAX_LEN, int(model.get("context_length") or MAX_LEN))
        self.layers = int(config["num_hidden_layers"])
        self.kv_heads = int(config["num_key_value_heads"])
        self.head = int(config["head_size"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(folder / config["filename"]), options, providers=["CPUExecutionProvider"]
        )

    def names(self) -> list[tuple[str, str]]:
        return [
            (f"past_key_values.{i}.{kv}", f"present.{i}.{kv}")
            for i in range(self.layers)
            for kv in ("key", "value")
        ]

    def prefill(self, tokens: list[int]) -> tuple[int, list[np.ndarray]]:
        """Greedy next token and KV cache of one sequence (present is exactly its length)."""
        feeds: dict[str, Any] = {
            "input_ids": np.array([tokens], np.int64),
            "attention_mask": np.ones((1, len(tokens)), np.int64),
        }
        empty = np.zeros((1, self.kv_heads, 0, self.head), np.float32)
        for past, _ in self.names():
            feeds[past] = empty
        outputs = self.session.run(["logits", *(present for _, present in self.names())], feeds)
        return int(np.argmax(outputs[0][0, -1])), [np.asarray(o) for o in outputs[1:]]

    def batch(
        self, caches: list[list[np.ndarray]], lengths: list[int], next_ids: list[int]
    ) -> tuple[Any, list[ort.OrtValue]]:
        """An IO binding for one decode step of len(lengths) sequences, KV right-padded."""
        size = len(lengths)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array(next_ids, np.int64).reshape(size, 1))
        mask = np.zeros((size, max(lengths) + 1), np.int64)
        for b, length in enumerate(lengths):
            mask[b, : length + 1] = 1
        binding.bind_cpu_input("attention_mask", mask)
        keep: list[ort.OrtValue] = []
        for index, (past, present) in enumerate(self.names()):
            buffer = np.zeros((size, self.kv_heads, self.max_length, self.head), np.float32)
            for b, length in enumerate(lengths):
                buffer[b, :, :length] = caches[b][index][0, :, :length]
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            keep.append(value)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_output("logits")
        return binding, keep

    def step(self, binding: Any) -> np.ndarray:
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])[:, -1, :]


def check_exact(decoder: Decoder, prompts: list[list[int]]) -> dict[str, Any]:
    prefilled = [decoder.prefill(p) for p in prompts]
    next_ids = [token for token, _ in prefilled]
    caches = [cache for _, cache in prefilled]
    lengths = [len(p) for p in prompts]
    binding, _keep = decoder.batch(caches, lengths, next_ids)
    together = decoder.step(binding)
    worst = 0.0
    same = True
    for b in range(len(prompts)):
        alone_binding, _alone_keep = decoder.batch([caches[b]], [lengths[b]], [next_ids[b]])
        alone = decoder.step(alone_binding)[0]
        worst = max(worst, float(np.max(np.abs(alone - together[b]))))
        same = same and int(np.argmax(alone)) == int(np.argmax(together[b]))
    return {"greedy_tokens_equal": same, "max_abs_logit_diff": worst}


def check_genai_kv(decoder: Decoder, folder: Path, prompt: list[int]) -> dict[str, Any]:
    """A prompt-cache generator's KV (onnxruntime-genai) can seed a batch slot: the same."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    token, cache = decoder.prefill(prompt)
    worst = 0.0
    for index, (_, present) in enumerate(decoder.names()):
        held = np.asarray(generator.get_output(present))[:, :, : len(prompt)]
        worst = max(worst, float(np.max(np.abs(held - cache[index]))))
    generator.generate_next_token()
    return {
        "max_abs_kv_diff": worst,
        "next_token_equal": int(generator.get_next_tokens()[0]) == token,
    }


def genai_model(folder: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    config.overlay(json.dumps(overlay))
    return og.Model(config)


def genai_decode_rate(model: Any, prompt: list[int], steps: int, max_length: int) -> float:
    """One onnxruntime-genai generator's decode tok/s (greedy), for comparison with batch 1."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()
    started = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
    return steps / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: the real SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--past", default="64,300,1100,1546", help="KV lengths (comma list)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps timed per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = args.model
    if folder is None:
        import model_fixtures

        folder = model_fixtures.real_chat_model()
    decoder = Decoder(folder, args.threads)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(10, 1000, size=n))) for n in (37, 12, 25, 5)]
    exact = check_exact(decoder, prompts)
    print(f"batch of 4 vs alone: {exact}", flush=True)
    seeded = check_genai_kv(decoder, folder, prompts[0])
    print(f"batch slot seeded from an onnxruntime-genai generator: {seeded}", flush=True)
    genai_rates: list[float] = []
    genai = genai_model(folder, args.threads)

    pasts = [int(p) for p in args.past.split(",")]
    bindings: dict[tuple[int, int], tuple[Any, list[ort.OrtValue]]] = {}
    for past in pasts:
        for size in (1, 2, 4):
            lengths = [max(1, past - 16 * b) for b in range(size)]  # each its own, padded
            caches = [
                [
                    rng.standard_normal((1, decoder.kv_heads, length, decoder.head)).astype(
                        np.float32
                    )
                    for _ in decoder.names()
                ]
                for length in lengths
            ]
            bindings[past, size] = decoder.batch(caches, lengths, [42] * size)
            decoder.session.run_with_iobinding(bindings[past, size][0])  # warm
    rates: dict[tuple[int, int], list[float]] = {key: [] for key in bindings}
    # Tokens per CPU-second of this process: what batching saves, less blurred by other
    # load on a shared machine than wall-clock rates.
    per_cpu: dict[tuple[int, int], list[float]] = {key: [] for key in bindings}
    for _ in range(args.rounds):
        genai_rates.append(genai_decode_rate(genai, prompts[0], 4 * args.steps, decoder.max_length))
        for (past, size), (binding, _keep) in bindings.items():
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                decoder.session.run_with_iobinding(binding)
            rates[past, size].append(size * args.steps / (time.perf_counter() - started))
            per_cpu[past, size].append(size * args.steps / (time.process_time() - cpu))
    table: dict[str, dict[str, float]] = {}
    cpu_table: dict[str, dict[str, float]] = {}
    for past in pasts:
        row = {str(size): statistics.median(rates[past, size]) for size in (1, 2, 4)}
        table[str(past)] = {k: round(v, 1) for k, v in row.items()}
        cpu_row = {str(size): statistics.median(per_cpu[past, size]) for size in (1, 2, 4)}
        cpu_table[str(past)] = {k: round(v, 1) for k, v in cpu_row.items()}
        print(
            f"KV {past:5d}: aggregate tok/s  1: {row['1']:.1f}  2: {row['2']:.1f}  "
            f"4: {row['4']:.1f}  (4/1 = {row['4'] / row['1']:.2f}x); tok per CPU-s  "
            f"1: {cpu_row['1']:.1f}  4: {cpu_row['4']:.1f}  "
            f"(4/1 = {cpu_row['4'] / cpu_row['1']:.2f}x)",
            flush=True,
        )
    one = statistics.median(genai_rates)
    print(
        f"one onnxruntime-genai generator, greedy, KV {len(prompts[0])} + "
        f"{4 * args.steps} steps: {one:.1f} tok/s",
        flush=True,
    )
    if args.json:
        result = {
            "threads": args.threads,
            "exact": exact,
            "genai_kv_seed": seeded,
            "genai_one_stream_tok_s": round(one, 1),
            "tok_s": table,
            "tok_per_cpu_s": cpu_table,
        }
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
