"""Work a token holder can cause is bounded and kept off the event loop.

* A prompt that cannot fit the context is refused before it is rendered.
* Rendering and tokenizing run off the event loop, and a long prefill does
  not freeze it: other requests are answered meanwhile (measured against the
  worker's own prefill time, so the bound holds on a slow or busy machine).
* Embeddings have a token budget per request and run in micro-batches.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hearth_worker.auth import AuthStore
from hearth_worker.chat_engine import ChatModel
from hearth_worker.embedding_engine import EmbeddingModel, micro_batches
from hearth_worker.manifest import load_manifest
from hearth_worker.server import Worker
from hearth_worker.settings import WorkerSettings
from test_api import CHAT, model_id
from test_cancel import context_of, hello_prompt
from worker_process import WorkerProcess, start_worker

EMBED = "/v1/embeddings"
PREFILL = re.compile(r"Generation ended \(\w+\) after \d+ tokens, prefill ([\d.]+) s")


# -- in-process: what runs where -------------------------------------------------


InProcess = tuple[TestClient[Any, Any], ChatModel, dict[str, str]]


@pytest.fixture
async def in_process(tiny_chat_model: Path, tmp_path: Path) -> AsyncIterator[InProcess]:
    """A worker in this process: its client, its tiny chat model, and a token's headers."""
    auth = AuthStore(tmp_path / "state")
    token, _ = auth.create_token("tests")
    worker = Worker(
        WorkerSettings(model_dirs=[tiny_chat_model], state_dir=tmp_path, warmup=False), auth
    )
    worker.models.load()
    async with TestClient(TestServer(worker.build_app())) as client:
        model = worker.models.chat_models[model_id(tiny_chat_model)]
        yield client, model, {"Authorization": f"Bearer {token}"}


def spy(calls: list[int], method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.get_ident())
        return method(*args, **kwargs)

    return wrapper


async def test_prompt_beyond_context_refused_before_rendering(
    in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, model, headers = in_process
    renders: list[int] = []
    monkeypatch.setattr(model, "render", spy(renders, model.render))
    huge = "x" * (4 * 1024 * 1024 - 1024)  # just under the body limit
    resp = await client.post(
        CHAT,
        json={"model": model.id, "messages": [{"role": "user", "content": huge}]},
        headers=headers,
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"{len(huge)} characters" in error["message"]
    assert f"context is {model.context_length} tokens" in error["message"]
    assert renders == [], "the prompt was rendered before it was refused"


async def test_prompt_rendered_and_tokenized_off_the_event_loop(
    in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, model, headers = in_process
    renders: list[int] = []
    encodes: list[int] = []
    monkeypatch.setattr(model, "render", spy(renders, model.render))
    monkeypatch.setattr(model, "encode", spy(encodes, model.encode))
    resp = await client.post(
        CHAT,
        json={
            "model": model.id,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2,
        },
        headers=headers,
    )
    assert resp.status == 200
    loop_thread = threading.get_ident()
    assert renders and encodes
    assert loop_thread not in renders + encodes, "rendering or tokenizing ran on the event loop"


# -- a real worker: the event loop keeps answering -------------------------------


async def poll_health(worker: WorkerProcess, stop: asyncio.Event) -> list[float]:
    """Latencies of /v1/health requests made back to back until `stop`."""
    latencies: list[float] = []
    context = worker.ssl  # one context: one connection, reused
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            begun = time.perf_counter()
            async with session.get(worker.url + "/v1/health", ssl=context) as resp:
                assert resp.status == 200
                await resp.read()
            latencies.append(time.perf_counter() - begun)
    return latencies


async def while_polling(
    worker: WorkerProcess, work: Callable[[], Any]
) -> tuple[Any, float, list[float]]:
    """Run `work()` while polling /v1/health; its result, duration and the latencies."""
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(worker, stop))
    await asyncio.sleep(0.2)  # the poller's connection is up
    begun = time.perf_counter()
    try:
        result = await work()
    finally:
        took = time.perf_counter() - begun
        stop.set()
    return result, took, await poller


@pytest.fixture
def debug_worker(tiny_chat_model: Path, tmp_path: Path) -> Any:
    worker = start_worker(
        [tiny_chat_model], tmp_path, extra=["--no-warmup", "--log-level", "debug"]
    )
    yield worker
    assert worker.stop() == 0, worker.log()


async def test_long_prefill_does_not_freeze_the_worker(
    http: aiohttp.ClientSession, debug_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    worker = debug_worker
    body = {
        "model": model_id(tiny_chat_model),
        "messages": [{"role": "user", "content": hello_prompt(tiny_chat_model, 100)}],
        "max_tokens": 1,
    }

    async def ask() -> int:
        async with http.post(worker.url + CHAT, json=body, headers=worker.headers) as resp:
            await resp.read()
            return resp.status

    status, _, latencies = await while_polling(worker, ask)
    assert status == 200
    [prefill_s] = [float(m[1]) for m in PREFILL.finditer(worker.log())]
    slowest = max(latencies)
    print(
        f"prefill {prefill_s:.2f} s; health answered {len(latencies)} times, "
        f"slowest {slowest:.3f} s"
    )
    # Frozen for the whole prefill, a health request would wait about prefill_s.
    assert slowest < max(0.5, prefill_s / 2), (slowest, prefill_s)


async def test_prompt_too_long_after_tokenizing_names_its_tokens(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    # Short enough to pass the estimate before rendering, far too long for the context:
    # rendered and tokenized (off the event loop), then refused with its real size.
    text = "the quick brown fox jumps over " * 18_000
    body = {"model": model_id(tiny_chat_model), "messages": [{"role": "user", "content": text}]}
    async with http.post(
        shared_worker.url + CHAT, json=body, headers=shared_worker.headers
    ) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "context_length_exceeded"
    assert re.search(
        r"The prompt has \d+ tokens; this model's context is \d+ tokens", error["message"]
    )


# -- embeddings -----------------------------------------------------------------


def test_micro_batches_bound_the_padded_size() -> None:
    lengths = [5, 512, 3, 300, 512, 7, 120, 512, 64, 1, 250, 33]
    batches = micro_batches(lengths, 1024)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 1024
    assert micro_batches([2000, 10], 1024) == [[1], [0]]  # too long alone: a batch of one
    assert micro_batches([], 1024) == []


def test_embeddings_run_in_micro_batches(embedding_model: Path) -> None:
    model = EmbeddingModel(load_manifest(embedding_model), threads=1)
    session = model._session
    shapes: list[tuple[int, ...]] = []

    class Counting:
        def run(self, names: Any, feeds: dict[str, Any]) -> Any:
            shapes.append(feeds["input_ids"].shape)
            return session.run(names, feeds)

    texts = [f"Sentence {i}: " + "the light in the kitchen is on " * (i % 7 + 1) for i in range(24)]
    single = np.stack([model.embed([text])[0][0] for text in texts])
    model._session = Counting()  # type: ignore[assignment]
    model.micro_batch_tokens = 128
    shapes.clear()
    vectors, tokens = model.embed(texts)
    assert len(shapes) > 1
    assert all(rows * length <= 128 for rows, length in shapes), shapes
    assert sum(rows for rows, _ in shapes) == len(texts)
    np.testing.assert_allclose(vectors, single, atol=1e-4)  # same order, same vectors
    assert tokens == sum(len(model.tokenize([t])[0].ids) for t in texts)


async def test_embedding_token_budget_through_the_api(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, embedding_model: Path
) -> None:
    name = model_id(embedding_model)
    per_input = min(context_of(embedding_model), 512)  # inputs are truncated to this
    long_text = "The kitchen light turned on when someone came home late. " * 60  # > 512 tokens
    async with http.post(
        shared_worker.url + EMBED,
        json={"model": name, "input": [long_text] * 256},
        headers=shared_worker.headers,
    ) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "too_many_tokens"
    assert f"{256 * per_input} tokens" in error["message"]
    assert "at most 16384" in error["message"]

    # Large but allowed: 16,384 tokens at most, embedded in several micro-batches.
    texts = [f"Note {i}. " + long_text for i in range(16_384 // per_input)]
    async with http.post(
        shared_worker.url + EMBED,
        json={"model": name, "input": texts},
        headers=shared_worker.headers,
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["usage"]["prompt_tokens"] == len(texts) * per_input
    vectors = np.array([item["embedding"] for item in body["data"]])
    assert vectors.shape[0] == len(texts)
    for i in (0, len(texts) // 2, len(texts) - 1):
        async with http.post(
            shared_worker.url + EMBED,
            json={"model": name, "input": texts[i]},
            headers=shared_worker.headers,
        ) as resp:
            alone = np.array((await resp.json())["data"][0]["embedding"])
        np.testing.assert_allclose(vectors[i], alone, atol=1e-4)
