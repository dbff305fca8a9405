"""The worker's HTTP API, against a real worker process serving real models."""

from __future__ import annotations

import asyncio
import json
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import numpy as np
import pytest
import yaml
from referencing import Registry, Resource
from worker_process import WorkerProcess, start_worker

SPEC_PATH = Path(__file__).parents[2] / "addon" / "hearth_worker" / "openapi.yaml"
CHAT = "/v1/chat/completions"


@cache
def _spec() -> dict[str, Any]:
    return dict(yaml.safe_load(SPEC_PATH.read_text()))


def check_schema(instance: Any, name: str) -> None:
    """Validate `instance` against components/schemas/`name` of openapi.yaml."""
    resource = Resource.from_contents(
        {**_spec(), "$schema": "https://json-schema.org/draft/2020-12/schema"}
    )
    registry: Registry[Any] = Registry().with_resource("urn:hearth-openapi", resource)
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"urn:hearth-openapi#/components/schemas/{name}"}, registry=registry
    )
    validator.validate(instance)


def model_id(path: Path) -> str:
    return str(json.loads((path / "hearth-model.json").read_text())["name"])


async def chat(
    http: aiohttp.ClientSession, worker: WorkerProcess, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(worker.url + CHAT, json=body, headers=worker.headers) as resp:
        return resp.status, await resp.json()


async def stream_chat(
    http: aiohttp.ClientSession, worker: WorkerProcess, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """POST with stream=true and return the parsed SSE chunks (checking [DONE])."""
    chunks: list[dict[str, Any]] = []
    async with http.post(
        worker.url + CHAT, json={**body, "stream": True}, headers=worker.headers
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = (await resp.text()).split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunks.append(json.loads(event[6:]))
    return chunks


def content_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


HELLO = [{"role": "user", "content": "hello"}]
# Enough tokens that a request holds its slot for seconds even on a slow, busy CI
# machine (the tiny model decodes "hello" to the full length at ~5,000 tok/s here).
HOLD_TOKENS = 8000


async def test_health_needs_no_token(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess
) -> None:
    async with http.get(shared_worker.url + "/v1/health") as resp:
        assert resp.status == 200
        check_schema(await resp.json(), "Health")


@pytest.mark.parametrize("path", ["/v1/info", "/v1/capacity", "/v1/models"])
async def test_endpoints_need_a_token(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, path: str
) -> None:
    async with http.get(shared_worker.url + path) as resp:
        assert resp.status == 401
        check_schema(await resp.json(), "Error")
    async with http.get(
        shared_worker.url + path, headers={"Authorization": "Bearer hearth_not-a-token"}
    ) as resp:
        assert resp.status == 401
    async with http.post(shared_worker.url + CHAT, json={}) as resp:
        assert resp.status == 401


async def test_info_capacity_models_match_the_spec(
    http: aiohttp.ClientSession,
    shared_worker: WorkerProcess,
    tiny_chat_model: Path,
    embedding_model: Path,
) -> None:
    headers = shared_worker.headers
    async with http.get(shared_worker.url + "/v1/info", headers=headers) as resp:
        info = await resp.json()
    check_schema(info, "Info")
    assert {m["id"] for m in info["models"]} == {
        model_id(tiny_chat_model),
        model_id(embedding_model),
    }
    assert "CPUExecutionProvider" in info["execution_providers"]
    async with http.get(shared_worker.url + "/v1/capacity", headers=headers) as resp:
        capacity = await resp.json()
    check_schema(capacity, "Capacity")
    assert capacity["node_id"] == info["node_id"]
    rates = capacity["models"][model_id(tiny_chat_model)]
    assert rates["decode_tok_s"] and rates["decode_tok_s"] > 0, "warm-up seeds measured rates"
    async with http.get(shared_worker.url + "/v1/models", headers=headers) as resp:
        check_schema(await resp.json(), "ModelList")
    async with http.get(shared_worker.url + "/v1/openapi.yaml") as resp:
        assert yaml.safe_load(await resp.text()) == _spec()


async def test_chat_completion(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    status, body = await chat(
        http,
        shared_worker,
        {"model": model_id(tiny_chat_model), "messages": HELLO, "max_tokens": 12},
    )
    assert status == 200, body
    check_schema(body, "ChatCompletion")
    assert body["usage"]["completion_tokens"] <= 12
    assert body["usage"]["prompt_tokens"] > 0
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


async def test_streaming_matches_non_streaming(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    body = {"model": model_id(tiny_chat_model), "messages": HELLO, "max_tokens": 24}
    _, whole = await chat(http, shared_worker, body)
    chunks = await stream_chat(
        http, shared_worker, {**body, "stream_options": {"include_usage": True}}
    )
    for chunk in chunks:
        check_schema(chunk, "ChatCompletionChunk")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_of(chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


async def test_stream_events_are_whole_json_lines(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """Each event is one line of JSON as json.dumps writes it, keys in the usual order."""
    body = {
        "model": model_id(tiny_chat_model),
        "messages": HELLO,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(shared_worker.url + CHAT, json=body, headers=shared_worker.headers) as r:
        assert r.status == 200
        raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    for event in events[:-2]:
        assert event.startswith(b"data: {") and b"\n" not in event, event
        payload = event[len(b"data: ") :].decode()
        parsed = json.loads(payload)
        assert json.dumps(parsed) == payload  # the bytes clients have always read
        assert list(parsed)[:4] == ["id", "object", "created", "model"]
    assert len({json.loads(e[6:])["id"] for e in events[:-2]}) == 1


async def test_max_tokens_and_stop(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    body = {"model": model_id(tiny_chat_model), "messages": HELLO, "max_tokens": 30}
    _, whole = await chat(http, shared_worker, body)
    text = whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 30
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"greedy output too uniform to pick a stop sequence from: {text!r}"
    _, cut = await chat(http, shared_worker, {**body, "stop": [stop, "never-appears"]})
    expected = text[: text.index(stop)]
    assert cut["choices"][0]["message"]["content"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    chunks = await stream_chat(http, shared_worker, {**body, "stop": stop})
    assert content_of(chunks) == expected


async def test_sampling_is_reproducible_with_a_seed(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """Same seed, same answer; and seed, temperature and top_p each change what comes out.

    Every comparison is between answers of this worker on this machine (none
    against stored text), so nothing depends on the CPU's floating point.
    """
    base = {"model": model_id(tiny_chat_model), "messages": HELLO, "max_tokens": 16}

    async def answer(**sampling: float) -> str:
        status, body = await chat(http, shared_worker, {**base, **sampling})
        assert status == 200, body
        return str(body["choices"][0]["message"]["content"])

    greedy = await answer()
    sampled = await answer(temperature=1.0, top_p=0.9, seed=7)
    assert await answer(temperature=1.0, top_p=0.9, seed=7) == sampled
    # The seed matters: the random tiny model's next-token distribution is nearly flat,
    # so 16 sampled tokens repeat under another seed practically never.
    others = {await answer(temperature=1.0, top_p=0.9, seed=seed) for seed in (8, 9, 10)}
    assert len(others | {sampled}) == 4, others
    assert sampled != greedy
    # The temperature shapes the distribution the seed's draws pick from.
    shaped = {await answer(temperature=t, seed=7, max_tokens=32) for t in (0.2, 1.0, 2.0)}
    assert len(shaped) > 1, shaped
    # Temperature 0 is greedy, whatever the seed.
    assert await answer(temperature=0.0, seed=7) == greedy
    assert await answer(temperature=0.0, top_p=0.9, seed=8) == greedy
    # top_p keeps only the likeliest tokens: a tiny one leaves just the greedy choice.
    for seed in (7, 8):
        assert await answer(temperature=1.0, top_p=1e-6, seed=seed) == greedy


BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("not json", b"{not json", 400, None),
    ("array body", [], 400, None),
    ("no model", {"messages": HELLO}, 400, "model"),
    ("model not a string", {"model": 3, "messages": HELLO}, 400, "model"),
    ("no messages", {"model": "MODEL"}, 400, "messages"),
    ("empty messages", {"model": "MODEL", "messages": []}, 400, "messages"),
    (
        "bad role",
        {"model": "MODEL", "messages": [{"role": "king", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "content an int",
        {"model": "MODEL", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    (
        "image part",
        {"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        "max_tokens string",
        {"model": "MODEL", "messages": HELLO, "max_tokens": "10"},
        400,
        "max_tokens",
    ),
    ("max_tokens zero", {"model": "MODEL", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    (
        "temperature too hot",
        {"model": "MODEL", "messages": HELLO, "temperature": 9},
        400,
        "temperature",
    ),
    ("top_p zero", {"model": "MODEL", "messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("stream not bool", {"model": "MODEL", "messages": HELLO, "stream": "yes"}, 400, "stream"),
    (
        "five stops",
        {"model": "MODEL", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    ("n=2", {"model": "MODEL", "messages": HELLO, "n": 2}, 400, "n"),
    ("tools not array", {"model": "MODEL", "messages": HELLO, "tools": {}}, 400, "tools"),
    (
        "tool without name",
        {"model": "MODEL", "messages": HELLO, "tools": [{"type": "function", "function": {}}]},
        400,
        "tools[0].function",
    ),
    (
        "bad tool_choice",
        {"model": "MODEL", "messages": HELLO, "tool_choice": "sometimes"},
        400,
        "tool_choice",
    ),
    ("unknown model", {"model": "no-such-model", "messages": HELLO}, 404, "model"),
]


@pytest.mark.parametrize(
    ("case", "payload", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
async def test_bad_chat_requests_get_a_clear_4xx(
    http: aiohttp.ClientSession,
    shared_worker: WorkerProcess,
    tiny_chat_model: Path,
    case: str,
    payload: Any,
    status: int,
    param: str | None,
) -> None:
    if isinstance(payload, dict) and payload.get("model") == "MODEL":
        payload = {**payload, "model": model_id(tiny_chat_model)}
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {**shared_worker.headers, "Content-Type": "application/json"}
    async with http.post(shared_worker.url + CHAT, data=data, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == status, body
    check_schema(body, "Error")
    assert body["error"]["message"]
    if param:
        assert body["error"]["param"] == param
    async with http.get(shared_worker.url + "/v1/health") as resp:
        assert resp.status == 200


async def test_oversized_prompt_and_body(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    context = json.loads((tiny_chat_model / "hearth-model.json").read_text())["context_length"]
    long_text = "the quick brown fox jumps " * context
    status, body = await chat(
        http,
        shared_worker,
        {"model": model_id(tiny_chat_model), "messages": [{"role": "user", "content": long_text}]},
    )
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    huge = json.dumps({"model": "x", "messages": [{"role": "user", "content": "x" * 5_000_000}]})
    async with http.post(
        shared_worker.url + CHAT, data=huge, headers=shared_worker.headers
    ) as resp:
        assert resp.status == 413
        check_schema(await resp.json(), "Error")


async def test_unknown_route_and_method(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess
) -> None:
    async with http.get(shared_worker.url + "/v1/nothing", headers=shared_worker.headers) as resp:
        assert resp.status == 404
        check_schema(await resp.json(), "Error")
    async with http.get(shared_worker.url + CHAT, headers=shared_worker.headers) as resp:
        assert resp.status == 405


async def test_embeddings_have_meaning(
    http: aiohttp.ClientSession, shared_worker: WorkerProcess, embedding_model: Path
) -> None:
    sentences = [
        "How many grams of flour go into a loaf of bread?",
        "What amount of flour does a bread recipe need?",
        "The train to Berlin leaves from platform nine.",
    ]
    async with http.post(
        shared_worker.url + "/v1/embeddings",
        json={"model": model_id(embedding_model), "input": sentences},
        headers=shared_worker.headers,
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    check_schema(body, "EmbeddingList")
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
    related, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert related > unrelated + 0.2, (related, unrelated)
    async with http.post(
        shared_worker.url + "/v1/embeddings",
        json={"model": model_id(embedding_model), "input": 42},
        headers=shared_worker.headers,
    ) as resp:
        assert resp.status == 400
    async with http.post(
        shared_worker.url + "/v1/embeddings",
        json={"model": "nope", "input": "x"},
        headers=shared_worker.headers,
    ) as resp:
        assert resp.status == 404


async def test_queue_full_gets_429_and_client_disconnect_cancels(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        [tiny_chat_model], tmp_path, extra=["--max-running", "1", "--max-queued", "0"]
    )
    try:
        long_body = {
            "model": model_id(tiny_chat_model),
            "messages": HELLO,
            "max_tokens": HOLD_TOKENS,
            "stream": True,
        }
        # Hold the only slot with a streaming request, then drop it mid-stream.
        resp = await http.post(worker.url + CHAT, json=long_body, headers=worker.headers)
        assert resp.status == 200
        await resp.content.readline()
        status, body = await chat(http, worker, {**long_body, "stream": False})
        assert status == 429
        assert body["error"]["code"] == "busy"
        resp.close()  # the client goes away
        for _ in range(100):
            async with http.get(worker.url + "/v1/capacity", headers=worker.headers) as cap:
                if (await cap.json())["running"] == 0:
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("generation kept running after the client went away")
        status, body = await chat(http, worker, {**long_body, "stream": False, "max_tokens": 4})
        assert status == 200, body
    finally:
        assert worker.stop() == 0, worker.log()


async def test_busy_response_has_retry_after(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        [tiny_chat_model], tmp_path, extra=["--max-running", "1", "--max-queued", "1"]
    )
    try:
        body = {"model": model_id(tiny_chat_model), "messages": HELLO, "max_tokens": HOLD_TOKENS}
        # A stream that is read slowly holds the one running slot.
        holder = await http.post(
            worker.url + CHAT, json={**body, "stream": True}, headers=worker.headers
        )
        await holder.content.readline()
        queued = asyncio.create_task(chat(http, worker, {**body, "max_tokens": 4}))
        async with asyncio.timeout(60):  # generous: a loaded machine is slow to queue it
            while True:
                async with http.get(worker.url + "/v1/capacity", headers=worker.headers) as cap:
                    if (await cap.json())["queued"] == 1:
                        break
                await asyncio.sleep(0.02)
        async with http.post(worker.url + CHAT, json=body, headers=worker.headers) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1
        await holder.read()  # drain the stream: the slot frees and the queued one runs
        holder.close()
        status, _ = await queued
        assert status == 200
    finally:
        assert worker.stop() == 0, worker.log()
