"""A request's slot: a client that goes away during the prefill stops it and frees the slot.

Against a real worker process with the tiny model and a prompt that fills most of
its context (a prefill of seconds). What the engine did is read from the worker's
debug log: each generation reports how many prompt tokens it prefilled. Nothing
here is timed: the prompt is long enough that a prefill run to its end would
show as all of it prefilled, whatever the machine's speed.

(onnxruntime-genai 0.18's Engine, which batches requests, is not used: see
chat_engine's module notes; `max_running` generations run side by side.)
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from test_api import CHAT, model_id
from test_cancel import WAIT_S, hello_prompt, idle
from worker_process import WorkerProcess, start_worker

ENDED = re.compile(
    r"Generation ended \((\w+)\) after (\d+) tokens, .* prompt (\d+) tokens: "
    r"(\d+) from the cache, (\d+) prefilled"
)


async def ended(worker: WorkerProcess, count: int) -> list[tuple[str, int, int, int]]:
    """(finish reason, completion tokens, prompt tokens, prefilled) of `count` generations."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    found: list[tuple[str, int, int, int]] = []
    while loop.time() < deadline:
        found = [(m[1], int(m[2]), int(m[3]), int(m[5])) for m in ENDED.finditer(worker.log())]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"only {len(found)} of {count} generations ended:\n{worker.log()[-3000:]}")


def long_body(model: Path, *, stream: bool) -> dict[str, object]:
    return {
        "model": model_id(model),
        "messages": [{"role": "user", "content": hello_prompt(model, 300)}],
        "max_tokens": 200,
        "stream": stream,
    }


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_client_gone_during_prefill_stops_it_and_frees_the_slot(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path, stream: bool
) -> None:
    worker = start_worker(
        [tiny_chat_model],
        tmp_path,
        extra=["--no-warmup", "--log-level", "debug", "--max-running", "1"],
    )
    try:
        body = long_body(tiny_chat_model, stream=stream)
        request = asyncio.create_task(
            http.post(worker.url + CHAT, json=body, headers=worker.headers)
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while "Generation started" not in worker.log():  # admitted, prefilling
            assert loop.time() < deadline, worker.log()[-3000:]
            await asyncio.sleep(0.02)
        if stream:
            response = await request
            response.close()  # the client goes away during the prefill
        else:
            request.cancel()  # no answer yet: the connection is closed
            with pytest.raises(asyncio.CancelledError):
                await request
        [(reason, tokens, prompt, prefilled)] = await ended(worker, 1)
        assert reason == "cancelled"
        assert tokens == 0
        assert prefilled < prompt  # the prefill stopped part way
        await idle(http, worker)  # the slot is free
        # ... and the next request is served.
        short = {
            "model": model_id(tiny_chat_model),
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with http.post(
            worker.url + CHAT, json={**short, "max_tokens": 2}, headers=worker.headers
        ) as resp:
            assert resp.status == 200
    finally:
        assert await worker.astop() == 0, worker.log()
