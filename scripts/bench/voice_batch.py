"""Batched decoding A/B: each request its own generator (before) vs the shared batch (now).

In this process, no server: `ChatModel`s of the same model: "generators" (every
request prefilled and decoded by its own onnxruntime-genai generator, as before
issue 10, and as a model that cannot batch is still served) and "batch" (the worker
now: every request prefilled and decoded in batch_decode.py's session, the running
ones decoding together, one alone too); with --no-spin also
both with onnxruntime's threads not spin-waiting. Each round runs, for each in turn
(the order alternating between rounds, as bench_worker interleaves its paths,
because the machines are noisy): one stream's decode rate, then the
aggregate rate of 1, 2 and 4 concurrent requests (each its own short prompt, as
scripts/bench/voice.py's concurrent figure), in tokens per wall-clock second and per
CPU-second of this process. Medians over the rounds.

    .venv/bin/python scripts/bench/voice_batch.py [--model DIR] [--rounds N]
        [--new-tokens N] [--no-spin] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "addon"))

from hearth_worker.chat_engine import ChatModel, Sampling  # noqa: E402
from hearth_worker.manifest import load_manifest  # noqa: E402
from hearth_worker.prompt_cache import PromptCache  # noqa: E402

STORY = "Tell me a long story about a family cooking dinner together, number {}."
SIZES = (1, 2, 4)


def one_stream(model: ChatModel, prompt: list[int], tokens: int) -> float:
    """Decode tok/s of one stream: from its first token to its last."""
    times: list[float] = []
    result = model.generate(
        prompt,
        Sampling(max_new_tokens=tokens, temperature=0),
        lambda _: times.append(time.perf_counter()),
        threading.Event(),
    )
    if len(times) < 2 or result.completion_tokens < 2:
        return 0.0
    return (result.completion_tokens - 1) / (times[-1] - times[0])


def concurrent(model: ChatModel, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Aggregate (tok/s, tok per CPU-second) of these requests run at once."""
    counts = [0] * len(prompts)

    def run(i: int) -> None:
        result = model.generate(
            prompts[i],
            Sampling(max_new_tokens=tokens, temperature=0),
            lambda _: None,
            threading.Event(),
        )
        counts[i] = result.completion_tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    started, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    return sum(counts) / wall, sum(counts) / max(used, 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: the real SmolLM2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--no-spin", action="store_true", help="also both paths without spin-waiting threads"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = args.model
    if folder is None:
        import model_fixtures

        folder = model_fixtures.real_chat_model()
    manifest = load_manifest(folder)
    paths = {
        # before issue 10's batch: each request decoded by its own generator
        "generators": ChatModel(manifest, cache=PromptCache(), batching=False),
        # the worker now: every request in the batch's session
        "batch": ChatModel(manifest, cache=PromptCache()),
    }
    if args.no_spin:  # the same two with onnxruntime's threads not spin-waiting
        paths["gen_nospin"] = ChatModel(
            manifest, cache=PromptCache(), batching=False, spinning=False
        )
        paths["batch_nospin"] = ChatModel(manifest, cache=PromptCache(), spinning=False)
    if not paths["batch"].batching:
        print("this model's export cannot be batched", file=sys.stderr)
        return 1
    model = paths["batch"]
    prompt = model.prepare([{"role": "user", "content": STORY.format(0)}], None)
    groups = {
        n: [
            model.prepare([{"role": "user", "content": STORY.format(m + 10 * n)}], None)
            for m in range(n)
        ]
        for n in SIZES
    }
    for chat in paths.values():  # warm both (sessions, buffers), uncounted
        one_stream(chat, prompt, 8)
        concurrent(chat, groups[2], 8)
    single: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, dict[int, list[float]]] = {name: {n: [] for n in SIZES} for name in paths}
    cpu: dict[str, dict[int, list[float]]] = {name: {n: [] for n in SIZES} for name in paths}
    for r in range(args.rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            chat = paths[name]
            single[name].append(one_stream(chat, prompt, args.new_tokens))
            for n in SIZES:
                rate, per_cpu = concurrent(chat, groups[n], args.new_tokens)
                wall[name][n].append(rate)
                cpu[name][n].append(per_cpu)
            print(
                f"round {r + 1} {name:10s}: one stream {single[name][-1]:.1f} tok/s; "
                + ", ".join(f"{n}: {wall[name][n][-1]:.1f}" for n in SIZES)
                + " tok/s in all",
                flush=True,
            )
    figures: dict[str, Any] = {"rounds": args.rounds, "new_tokens": args.new_tokens}
    for name in paths:
        figures[name] = {
            "decode_tok_s": round(statistics.median(single[name]), 1),
            "concurrent_tok_s": {str(n): round(statistics.median(wall[name][n]), 1) for n in SIZES},
            "concurrent_tok_per_cpu_s": {
                str(n): round(statistics.median(cpu[name][n]), 1) for n in SIZES
            },
        }
        rates = figures[name]["concurrent_tok_s"]
        per_cpu = figures[name]["concurrent_tok_per_cpu_s"]
        print(
            f"{name:10s}: one stream {figures[name]['decode_tok_s']} tok/s; concurrent "
            f"{rates} tok/s, 4/1 = {rates['4'] / rates['1']:.2f}x; per CPU-second "
            f"{per_cpu}, 4/1 = {per_cpu['4'] / per_cpu['1']:.2f}x"
        )
    ratio = figures["batch"]["decode_tok_s"] / max(figures["generators"]["decode_tok_s"], 1e-9)
    figures["one_stream_batch_vs_generators"] = round(ratio, 3)
    print(f"one stream, batch / generators: {ratio:.3f}")
    batch = paths["batch"].batch_decoder()
    if batch is not None:
        figures["batch_peak_mb"] = round(batch.peak_bytes / 2**20, 1)
        print(f"batch KV buffer peak {figures['batch_peak_mb']} MB, {batch.peak_batch} at most")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
