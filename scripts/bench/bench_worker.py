"""Benchmark one chat model: the engine called directly vs. the worker's HTTP API.

Prints, in one run on the same model and prompt: direct decode tok/s, API
decode tok/s (streaming), time to first token through the API, the worker's
peak RSS, and aggregate tok/s at 1, 2 and 4 concurrent requests. With --json
the last line is one JSON object with those figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def stream_once(
    http: aiohttp.ClientSession, worker: WorkerProcess, body: dict[str, Any]
) -> dict[str, float]:
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
    args = parser.parse_args()

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
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
