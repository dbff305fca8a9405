"""Hostile and malformed input gets a clear 4xx, never a 500 or a traceback in the log.

Each case here was once a 500 with a traceback, a 200 with a truncated stream, or
an ERROR logged by aiohttp; one real worker takes them all and its log is checked
after each test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hearth_worker.validation import MAX_JSON_DEPTH, MAX_TOOL_BYTES
from test_api import CHAT, HELLO, check_schema, content_of, model_id, stream_chat
from worker_process import WorkerProcess, insecure_ssl, start_worker, tls_closed

PAIR_BODY = {"salt": "00" * 16, "client_nonce": "11" * 16, "proof": "22" * 32}


@pytest.fixture(scope="module")
def worker(
    tiny_chat_model: Path, embedding_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    started = start_worker(
        [tiny_chat_model, embedding_model],
        tmp_path_factory.mktemp("bad-input"),
        extra=["--no-warmup", "--log-level", "debug"],
    )
    yield started
    assert started.stop() == 0, started.log()


@pytest.fixture(autouse=True)
async def _clean_log(worker: WorkerProcess) -> AsyncIterator[None]:
    """After each test: the worker still answers, and logged no traceback and no ERROR."""
    yield
    async with (
        aiohttp.ClientSession() as session,
        session.get(worker.url + "/v1/health", ssl=worker.ssl) as resp,
    ):
        assert resp.status == 200
    await tls_closed()
    log = worker.log()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


async def post(
    http: aiohttp.ClientSession,
    worker: WorkerProcess,
    path: str,
    data: bytes | str,
    *,
    token: bool = True,
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **(worker.headers if token else {})}
    async with http.post(worker.url + path, data=data, headers=headers) as resp:
        body = await resp.json()
    check_schema(body, "Error")
    return resp.status, body


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def with_raw(body: dict[str, Any], key: str, raw: str) -> str:
    """`body` as JSON with `key` set to the raw JSON text `raw` (what json.dumps cannot make)."""
    text = json.dumps({**body, key: None})
    return text[:-1] + f", {json.dumps(key)}: {raw}}}"


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        pytest.param(nested(100_000), 413, "body_too_large", id="nested-100k-deep"),
        pytest.param("1" * 5000, 413, "body_too_large", id="5000-digit-integer"),
        pytest.param("[" * 1900 + "]" * 1900, 400, "json_too_deep", id="arrays-1900-deep"),
        pytest.param(nested(500), 400, "json_too_deep", id="objects-500-deep"),
        pytest.param("[" * 3800, 400, "invalid_json", id="unclosed-3800-deep"),
        pytest.param("NaN", 400, "invalid_json", id="NaN"),
        pytest.param("-Infinity", 400, "invalid_json", id="Infinity"),
        pytest.param("1e999", 400, "invalid_json", id="1e999"),
        pytest.param('"\\ud800"', 400, "invalid_unicode", id="lone-surrogate"),
    ],
)
async def test_pairing_refuses_hostile_json_without_a_token(
    http: aiohttp.ClientSession, worker: WorkerProcess, raw: str, status: int, code: str
) -> None:
    got, answer = await post(
        http, worker, "/v1/pair", with_raw(PAIR_BODY, "client_name", raw), token=False
    )
    assert (got, answer["error"]["code"]) == (status, code), answer


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param(nested(100_000), "json_too_deep", id="nested-100k-deep"),
        pytest.param("[" * 1_000_000, "json_too_deep", id="unclosed-1M-deep"),
        pytest.param("1" * 5000, "invalid_json", id="5000-digit-integer"),
        pytest.param("-" + "9" * 4301, "invalid_json", id="4301-digit-integer"),
    ],
)
async def test_token_holders_get_the_same_limits(
    http: aiohttp.ClientSession, worker: WorkerProcess, raw: str, code: str
) -> None:
    body = {"model": "no-such-model", "messages": HELLO}
    status, answer = await post(http, worker, CHAT, with_raw(body, "max_tokens", raw))
    assert (status, answer["error"]["code"]) == (400, code), answer


async def test_pairing_reads_at_most_a_few_kib(
    http: aiohttp.ClientSession, worker: WorkerProcess
) -> None:
    big = json.dumps({**PAIR_BODY, "client_name": "x" * 8000})
    status, answer = await post(http, worker, "/v1/pair", big, token=False)
    assert status == 413, answer
    assert answer["error"]["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read until the limit
        yield json.dumps(PAIR_BODY)[:-1].encode() + b', "client_name": "'
        for _ in range(64):
            yield b"y" * 1024

    headers = {"Content-Type": "application/json"}
    async with http.post(worker.url + "/v1/pair", data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        check_schema(await resp.json(), "Error")


async def test_any_body_nested_too_deeply(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    body = {"model": "no-such-model", "messages": HELLO}
    # The body is the first level: MAX_JSON_DEPTH levels in all are accepted (the
    # unknown model answers), one more is refused.
    status, answer = await post(
        http, worker, CHAT, with_raw(body, "extra", "[" * (MAX_JSON_DEPTH - 1) + "]" * 63)
    )
    assert (status, answer["error"]["code"]) == (404, "model_not_found"), answer
    status, answer = await post(
        http, worker, CHAT, with_raw(body, "extra", "[" * MAX_JSON_DEPTH + "]" * 64)
    )
    assert status == 400, answer
    assert answer["error"]["code"] == "json_too_deep"
    assert "64" in answer["error"]["message"]
    assert answer["error"]["param"] == "extra"


async def test_tool_parameters_nested_3000_deep(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    deep = nested(3000, '{"type": "string"}')
    tool = f'[{{"type": "function", "function": {{"name": "deep", "parameters": {deep}}}}}]'
    body = {"model": model_id(tiny_chat_model), "messages": HELLO, "max_tokens": 4}
    status, answer = await post(http, worker, CHAT, with_raw(body, "tools", tool))
    assert status == 400, answer
    assert answer["error"]["code"] == "json_too_deep"
    assert answer["error"]["param"] == "tools"


async def test_tool_schemas_have_a_size_limit(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    properties = {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(400)}
    tool = {
        "type": "function",
        "function": {"name": "big", "parameters": {"type": "object", "properties": properties}},
    }
    assert len(json.dumps(tool)) > MAX_TOOL_BYTES
    body = {"model": model_id(tiny_chat_model), "messages": HELLO, "tools": [tool]}
    status, answer = await post(http, worker, CHAT, json.dumps(body))
    assert status == 400, answer
    assert answer["error"]["code"] == "tool_too_large"
    assert answer["error"]["param"] == "tools[0].function"
    # Many tools, each within the limit, are refused together past the total.
    small = {
        **tool["function"],
        "parameters": {"type": "object", "properties": dict(list(properties.items())[:200])},
    }
    many = [{"type": "function", "function": {**small, "name": f"t{i}"}} for i in range(20)]
    status, answer = await post(http, worker, CHAT, json.dumps({**body, "tools": many}))
    assert status == 400, answer
    assert answer["error"]["code"] == "tools_too_large"


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**30])
async def test_a_seed_beyond_64_bits_is_refused_before_streaming(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path, seed: int
) -> None:
    body = {
        "model": model_id(tiny_chat_model),
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
    }
    status, answer = await post(http, worker, CHAT, json.dumps(body))
    assert status == 400, answer
    assert answer["error"]["param"] == "seed"


@pytest.mark.parametrize("seed", [2**31, 2**63 - 1, -(2**63), -1])
async def test_any_64_bit_seed_samples_reproducibly(
    http: aiohttp.ClientSession, worker: WorkerProcess, tiny_chat_model: Path, seed: int
) -> None:
    body = {
        "model": model_id(tiny_chat_model),
        "messages": HELLO,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": seed,
    }
    first = await stream_chat(http, worker, body)  # the whole stream, up to [DONE]
    second = await stream_chat(http, worker, body)
    assert first[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert content_of(first) == content_of(second)


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "messages[0].content[0].text",
        ),
        ("/v1/embeddings", {"input": "\ud800"}, "input"),
        ("/v1/embeddings", {"input": ["fine", "x\udc00"]}, "input[1]"),
    ],
)
async def test_lone_surrogates_are_refused(
    http: aiohttp.ClientSession,
    worker: WorkerProcess,
    tiny_chat_model: Path,
    embedding_model: Path,
    path: str,
    payload: dict[str, Any],
    param: str,
) -> None:
    model = model_id(tiny_chat_model if path == CHAT else embedding_model)
    status, answer = await post(http, worker, path, json.dumps({"model": model, **payload}))
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_unicode"
    assert answer["error"]["param"] == param


async def raw_request(worker: WorkerProcess, request: bytes) -> bytes:
    """Send bytes as they are (over TLS, as the worker serves); return the whole answer."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", worker.port, ssl=insecure_ssl() if not worker.plain_http else None
    )
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
        await tls_closed()


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /v1/health HTTP/1.1\r\nHost: w\r\nX-A: a\x00b\r\n\r\n", id="NUL"),
        pytest.param(
            b"GET /v1/health HTTP/1.1\r\nHost: w\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n",
            id="header-too-long",
        ),
        pytest.param(b"GET /v1/he\x00alth HTTP/1.1\r\nHost: w\r\n\r\n", id="NUL-in-path"),
        pytest.param(b"GET / HTTP/9.9\r\n\r\n", id="bad-version"),
    ],
)
async def test_malformed_http_is_a_400_without_a_traceback(
    worker: WorkerProcess, request_bytes: bytes
) -> None:
    answer = await raw_request(worker, request_bytes)
    assert answer[:13] in (b"HTTP/1.1 400 ", b"HTTP/1.0 400 "), answer[:200]


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"Authorization: Bearer \xff\xfe", id="not-UTF-8"),
        pytest.param(b"Authorization: Bearer \xed\xa0\x80", id="surrogate-bytes"),
        pytest.param(b"Authorization: \xed\xa0\x80 hearth_x", id="surrogate-scheme"),
    ],
)
async def test_a_token_that_is_not_text_is_a_401(worker: WorkerProcess, header: bytes) -> None:
    answer = await raw_request(
        worker, b"GET /v1/info HTTP/1.1\r\nHost: w\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


async def test_a_broken_chunked_body_is_a_400(worker: WorkerProcess, tiny_chat_model: Path) -> None:
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {worker.token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    answer = await raw_request(worker, head + b'5\r\n{"mod\r\nzz\r\n')
    assert answer[:13] in (b"HTTP/1.1 400 ", b"HTTP/1.0 400 "), answer[:300]


async def test_empty_model_agrees_with_the_spec(
    http: aiohttp.ClientSession, worker: WorkerProcess
) -> None:
    import jsonschema

    for path, body, name in [
        (CHAT, {"model": "", "messages": HELLO}, "ChatCompletionRequest"),
        ("/v1/embeddings", {"model": "", "input": "x"}, "EmbeddingRequest"),
    ]:
        with pytest.raises(jsonschema.ValidationError):
            check_schema(body, name)
        status, answer = await post(http, worker, path, json.dumps(body))
        assert status == 400, answer
        assert answer["error"]["param"] == "model"
