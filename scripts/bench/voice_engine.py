"""Probe: onnxruntime-genai 0.18's Engine (batching) against the worker's generators.

Why the worker does not batch with the Engine, in figures, on the real SmolLM2 (or
--model): decode tok/s of one generator, and of the Engine with 1, 2 and 4 requests
at once (short prompts); then, on the household prompt of bench_voice, the time to a
first token of a new conversation with the Engine (a fresh request: its prefix is
prefilled again, whatever other requests hold) and with the worker's prompt cache (a
generator rewound to the shared prefix). Runs interleaved; medians.

    .venv/bin/python scripts/bench/voice_engine.py [--runs N] [--json]
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

import numpy as np
import onnxruntime_genai as og

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import voice_prompt  # noqa: E402
from hearth_worker.chat_engine import ChatModel, Sampling  # noqa: E402
from hearth_worker.manifest import load_manifest  # noqa: E402
from hearth_worker.prompt_cache import PromptCache  # noqa: E402

NEW_TOKENS = 64


def engine_turns(engine: og.Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Requests begun together; aggregate decode tok/s after each one's first token."""
    buffer = engine.create_event_buffer(64)
    requests = []
    started = time.perf_counter()
    for prompt in prompts:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(new_tokens)
        options.set_temperature(0)
        request.begin_turn(np.array(prompt, dtype=np.int32), options)
        requests.append(request)
    first = None
    count = 0
    while engine.has_pending_requests():
        engine.run(buffer)
        for i in range(len(buffer)):
            if buffer[i].flags & og.EngineEventFlags.TOKEN:
                count += 1
                first = first or time.perf_counter()
    ended = time.perf_counter()
    for request in requests:
        request.close()
    assert first is not None
    return {
        "decode_tok_s": (count - len(prompts)) / (ended - first),
        "ttft_ms": (first - started) * 1000,
    }


def generator_decode(model: ChatModel, prompt: list[int], new_tokens: int) -> float:
    result = model.generate(
        prompt,
        Sampling(max_new_tokens=new_tokens, temperature=0),
        lambda _: None,
        threading.Event(),
    )
    return (result.completion_tokens - 1) / result.decode_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: the real SmolLM2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        import model_fixtures  # tests/: builds the real model once

        args.model = model_fixtures.real_chat_model()
    manifest = load_manifest(args.model)
    plain = ChatModel(manifest)
    cached = ChatModel(manifest, cache=PromptCache())
    engine = og.Engine(plain._model)  # the same loaded model
    capabilities = engine.get_capabilities()
    short = [
        plain.prepare([{"role": "user", "content": f"Tell me a long story, number {i}."}], None)
        for i in range(4)
    ]
    figures: dict[str, list[float]] = {k: [] for k in ("generator", "1", "2", "4")}
    for run in range(args.runs):
        order = ["generator", "1", "2", "4"]
        for what in order if run % 2 == 0 else order[::-1]:
            if what == "generator":
                figures[what].append(generator_decode(plain, short[0], NEW_TOKENS))
            else:
                n = int(what)
                figures[what].append(engine_turns(engine, short[:n], NEW_TOKENS)["decode_tok_s"])
        print({k: round(v[-1], 1) for k, v in figures.items()}, flush=True)
    # New conversation in a household whose prompt another conversation has used.
    household = cached.prepare(voice_prompt.messages(1, 1), voice_prompt.tools())
    other = cached.prepare(
        voice_prompt.messages(1, 1, first=voice_prompt.OTHER_MEMBER), voice_prompt.tools()
    )
    one = Sampling(max_new_tokens=1, temperature=0)
    cached.generate(household, one, lambda _: None, threading.Event())
    engine_turns(engine, [household], 1)
    engine_new: list[float] = []
    cache_new: list[float] = []
    for _ in range(args.runs):
        engine_new.append(engine_turns(engine, [other], 1)["ttft_ms"])
        result = cached.generate(other, one, lambda _: None, threading.Event())
        cache_new.append(result.prefill_s * 1000)
    out: dict[str, Any] = {
        "engine_max_batch_size": capabilities.configured_max_batch_size,
        "generator_decode_tok_s": statistics.median(figures["generator"]),
        "engine_decode_tok_s": {k: statistics.median(figures[k]) for k in ("1", "2", "4")},
        "prompt_tokens": len(other),
        "new_conversation_ttft_ms": {
            "engine": statistics.median(engine_new),
            "prompt_cache": statistics.median(cache_new),
        },
    }
    print(
        f"decode tok/s: generator {out['generator_decode_tok_s']:.1f}; engine "
        + ", ".join(f"{k} at once {v:.1f}" for k, v in out["engine_decode_tok_s"].items())
    )
    print(
        f"new conversation, {len(other)}-token prompt: engine "
        f"{out['new_conversation_ttft_ms']['engine']:.0f} ms, prompt cache "
        f"{out['new_conversation_ttft_ms']['prompt_cache']:.0f} ms"
    )
    if args.json:
        print(json.dumps({k: v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
