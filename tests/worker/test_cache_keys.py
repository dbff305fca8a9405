"""Household prefix keys (X-Hearth-Prefix): what /v1/capacity lists as warm.

A client that cannot tokenize sends a key for the prompt's household part with
each request; the worker keeps the keys with the cache entry that holds the
request's tokens and lists them (hashes only) in `prompt_cache.warm_keys`.
They go with their entry: evicted, rewound into its history, or its model
removed. Assertions are on keys and entries only (no timing, no floats).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_api import CHAT, model_id
from worker_process import WorkerProcess

from addon.hearth_worker.chat_engine import ChatModel, Sampling
from addon.hearth_worker.manifest import load_manifest
from addon.hearth_worker.prompt_cache import MAX_KEYS_PER_ENTRY, CacheEntry, PromptCache
from addon.hearth_worker.server import PREFIX_HEADER

GREEDY = Sampling(max_new_tokens=4, temperature=0)
HOUSEHOLD = "You are the voice assistant of a home. " + " ".join(
    f"light.room_{i} is {'on' if i % 2 else 'off'}." for i in range(30)
)


def key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def messages(system: str, user: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@pytest.fixture(scope="module")
def manifest(tiny_chat_model: Path) -> Any:
    return load_manifest(tiny_chat_model)


def run(model: ChatModel, prompt: list[int], prefix_key: str | None) -> None:
    model.generate(prompt, GREEDY, lambda _: None, threading.Event(), prefix_key)


def test_keys_follow_their_entry() -> None:
    cache = PromptCache(budget_bytes=1000)
    entry = CacheEntry(model_id=1, key="k", generator=None, max_length=64, nbytes=400)
    cache.started(entry.nbytes)
    cache.put(entry, list(range(40)), "a" * 64)
    assert cache.warm_keys(1) == ["a" * 64]
    assert cache.warm_keys(2) == []
    # Extended (the whole history reused): the old key still holds; at most a few kept.
    for i in range(MAX_KEYS_PER_ENTRY + 1):
        taken = cache.take(1, "k", list(range(40 + i + 1)), 64)
        assert taken.entry is entry and taken.reuse == 39 + i
        cache.put(entry, list(range(41 + i)), str(i) * 64)
    assert cache.warm_keys(1) == [str(i) * 64 for i in range(MAX_KEYS_PER_ENTRY, 0, -1)]
    # Rewound into its history (another household's prompt after 20 shared tokens).
    taken = cache.take(1, "k", [*range(20), 99, 99], 64)
    assert taken.entry is entry and taken.reuse == 20
    cache.put(entry, [*range(20), 99, 99, 5], None)
    assert cache.warm_keys(1) == []
    # Evicted: gone with its entry.
    cache.put(entry, list(range(40)), "b" * 64)  # (bookkeeping only: given back again)
    assert cache.warm_keys(1) == ["b" * 64]
    cache.started(900)
    assert cache.entries() == [] and cache.warm_keys(1) == []


def test_engine_keeps_the_key_until_the_model_goes(manifest: Any) -> None:
    cache = PromptCache()
    model = ChatModel(manifest, threads=1, cache=cache)
    household = key(HOUSEHOLD)
    run(model, model.prepare(messages(HOUSEHOLD, "turn on the kitchen light"), None), household)
    assert model.warm_keys() == [household]
    # Another member's first turn: same household prefix, same key, one entry.
    run(model, model.prepare(messages(HOUSEHOLD, "is the attic warm?"), None), household)
    assert model.warm_keys() == [household]
    other = ChatModel(manifest, threads=1, cache=cache)
    assert other.warm_keys() == []
    model.close()
    assert model.warm_keys() == []
    del other
    gc.collect()


async def test_worker_lists_warm_keys(
    http: aiohttp.ClientSession, tiny_chat_model: Path, cache_worker: WorkerProcess
) -> None:
    worker = cache_worker
    model = model_id(tiny_chat_model)

    async def chat(system: str, prefix: str | None, stream: bool = False) -> None:
        body = {
            "model": model,
            "messages": messages(system, "turn on the kitchen light"),
            "max_tokens": 4,
            "stream": stream,
        }
        headers = dict(worker.headers)
        if prefix is not None:
            headers[PREFIX_HEADER] = prefix
        async with http.post(worker.url + CHAT, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    async def warm() -> list[str]:
        async with http.get(worker.url + "/v1/capacity", headers=worker.headers) as resp:
            capacity = await resp.json()
        keys: list[str] = capacity["prompt_cache"]["warm_keys"][model]
        return keys

    assert await warm() == []
    household = key(HOUSEHOLD)
    await chat(HOUSEHOLD, household.upper())  # hex, either case
    assert await warm() == [household]
    await chat(HOUSEHOLD, "not a key")  # ignored: not 64 hex digits
    assert await warm() == [household]
    # A prompt that parts from it halfway through the household part starts from the
    # household's entry, which it only reads (the worker batches this model: its
    # entries are shared, never rewound): both keys are listed, the newest first.
    # (A generator's entry rewound into its history forgets: test_keys_follow_their_entry.)
    other = HOUSEHOLD[: len(HOUSEHOLD) // 2] + " Everything else is off."
    await chat(other, key(other), stream=True)
    assert await warm() == [key(other), household]
    await asyncio.sleep(0)
