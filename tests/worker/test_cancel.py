"""A client that goes away stops its generation, and keeps its slot until it has stopped.

Against a real worker process. What the engine really did is read from the
worker's debug log, where every generation thread reports when it starts (with
the number of generation threads running) and when it ends (why, and after how
many tokens): the admission counter alone drops whether or not decoding stops.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
from test_api import CHAT, HELLO, model_id
from tokenizers import Tokenizer
from worker_process import WorkerProcess, start_worker

STARTED = re.compile(r"Generation started: (\d+) running")
ENDED = re.compile(
    r"Generation ended \((\w+)\) after (\d+) tokens, prefill ([\d.]+) s: (\d+) running"
)
# Generous: only reached when something never stops.
WAIT_S = 120.0


def context_of(model: Path) -> int:
    return int(json.loads((model / "hearth-model.json").read_text())["context_length"])


def hello_prompt(model: Path, room: int) -> str:
    """ " hello" as often as fits in `model`'s context with `room` tokens to spare."""
    context = context_of(model)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    words = context
    while len(tokenizer.encode(" hello" * words).ids) > context - room:
        words -= 100
    return " hello" * words


async def ended(worker: WorkerProcess, count: int) -> list[tuple[str, int]]:
    """Wait until `count` generations have ended; their (finish reason, tokens)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        found = [(m[1], int(m[2])) for m in ENDED.finditer(worker.log())]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    pytest.fail(f"only {len(found)} of {count} generations ended:\n{worker.log()[-3000:]}")


async def idle(http: aiohttp.ClientSession, worker: WorkerProcess) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        async with http.get(worker.url + "/v1/capacity", headers=worker.headers) as resp:
            capacity = await resp.json()
        if capacity["running"] == 0 and capacity["queued"] == 0:
            return
        await asyncio.sleep(0.1)
    pytest.fail("the worker never became idle")


async def test_client_going_away_stops_decoding(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        [tiny_chat_model], tmp_path, extra=["--no-warmup", "--log-level", "debug"]
    )
    try:
        max_tokens = context_of(tiny_chat_model) - 100  # the tiny model never stops early
        body = {
            "model": model_id(tiny_chat_model),
            "messages": HELLO,
            "max_tokens": max_tokens,
            "stream": True,
        }
        resp = await http.post(worker.url + CHAT, json=body, headers=worker.headers)
        assert resp.status == 200
        await resp.content.readline()  # the role chunk
        await resp.content.readline()
        await resp.content.readline()  # decoding is under way
        resp.close()  # the client goes away
        [(reason, tokens)] = await ended(worker, 1)
        assert reason == "cancelled", f"decoding went on: ended ({reason}) after {tokens}"
        assert tokens < max_tokens
        await idle(http, worker)
        # The worker serves the next request normally.
        async with http.post(
            worker.url + CHAT,
            json={**body, "stream": False, "max_tokens": 4},
            headers=worker.headers,
        ) as done:
            assert done.status == 200
    finally:
        assert await worker.astop() == 0, worker.log()


async def test_dropped_requests_never_run_beyond_max_running(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """A request dropped during its prefill keeps its slot until its thread has ended."""
    worker = start_worker(
        [tiny_chat_model],
        tmp_path,
        extra=["--no-warmup", "--log-level", "debug", "--max-running", "1", "--max-queued", "8"],
    )
    try:
        # A prompt that fills most of the context: a long prefill.
        long_body = {
            "model": model_id(tiny_chat_model),
            "messages": [{"role": "user", "content": hello_prompt(tiny_chat_model, 300)}],
            "max_tokens": 200,
            "stream": True,
        }
        short_body = {**long_body, "messages": HELLO, "max_tokens": 4, "stream": False}
        rounds = 3
        for _ in range(rounds):
            dropped = await http.post(worker.url + CHAT, json=long_body, headers=worker.headers)
            assert dropped.status == 200
            await dropped.content.readline()  # admitted: its prefill is under way
            waiting = asyncio.create_task(
                http.post(worker.url + CHAT, json=short_body, headers=worker.headers)
            )
            for _ in range(int(WAIT_S / 0.02)):
                async with http.get(worker.url + "/v1/capacity", headers=worker.headers) as cap:
                    if (await cap.json())["queued"] == 1:
                        break
                await asyncio.sleep(0.02)
            dropped.close()  # the client goes away during the prefill
            answered = await waiting
            assert answered.status == 200
            answered.close()
        await ended(worker, 2 * rounds)
        await idle(http, worker)
        running = [int(m[1]) for m in STARTED.finditer(worker.log())]
        assert len(running) == 2 * rounds
        assert max(running) == 1, f"generations running at once: {running}"
    finally:
        assert await worker.astop() == 0, worker.log()
