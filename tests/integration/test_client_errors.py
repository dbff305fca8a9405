"""The worker API client's error branches.

Against real worker processes on 127.0.0.1 where a worker can produce the error
(rejected token, unknown model, busy with Retry-After), and
against a small aiohttp server on 127.0.0.1 for answers a healthy worker never
gives (HTTP 500, garbage bodies, a broken event stream, a connection cut off).
Pairing refusals are tested through the config flow (tests/integration/test_config_flow.py).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from worker_process import WorkerProcess, free_port, start_worker

from custom_components.hearth.client import HearthClient
from custom_components.hearth.worker_api import (
    ChatDelta,
    HearthAuthError,
    HearthBusyError,
    HearthConnectionError,
    HearthRequestError,
)

HELLO = [{"role": "user", "content": "hello"}]
# Enough tokens that a stream holds the worker's one slot for seconds (the tiny
# model decodes at thousands of tokens/s; see tests/worker/test_api.py).
HOLD_TOKENS = 8000


async def complete(client: HearthClient, body: Mapping[str, Any]) -> dict[str, Any]:
    """A non-streamed chat completion through the client's request path and error
    mapping (the integration itself only streams; the worker serves both)."""
    return await client._request("POST", "/v1/chat/completions", {**body, "stream": False})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def transport(fingerprint: str | None = None) -> dict[str, Any]:
    """HTTPS pinned to `fingerprint`, or plain HTTP (a client without TLS support: nothing)."""
    if "fingerprint" not in inspect.signature(HearthClient).parameters:
        return {}
    return {"fingerprint": fingerprint} if fingerprint else {"plain_http": True}


def client_for(
    session: aiohttp.ClientSession, worker: WorkerProcess, token: str | None = None
) -> HearthClient:
    return HearthClient(
        session,
        "127.0.0.1",
        worker.port,
        token or worker.token,
        **transport(getattr(worker, "fingerprint", None)),
    )


def fake(session: aiohttp.ClientSession, port: int, token: str | None = "t") -> HearthClient:
    """A client of the misbehaving plain-HTTP server below."""
    return HearthClient(session, "127.0.0.1", port, token, **transport())


async def collect(deltas: AsyncIterator[ChatDelta]) -> list[ChatDelta]:
    return [delta async for delta in deltas]


# --- real workers ----------------------------------------------------------------


async def test_wrong_token_is_an_auth_error(
    session: aiohttp.ClientSession, chat_worker: WorkerProcess
) -> None:
    client = client_for(session, chat_worker, token="hearth_not-a-token")
    assert (await client.health())["status"] == "ok"  # health needs no token
    with pytest.raises(HearthAuthError):
        await client.info()
    with pytest.raises(HearthAuthError):
        await client.capacity()
    with pytest.raises(HearthAuthError):
        await client.chat_stream({"messages": HELLO, "max_tokens": 4})
    no_token = HearthClient(
        session,
        "127.0.0.1",
        chat_worker.port,
        **transport(getattr(chat_worker, "fingerprint", None)),
    )
    with pytest.raises(HearthAuthError):
        await no_token.info()


async def test_unknown_model_is_a_request_error(
    session: aiohttp.ClientSession, chat_worker: WorkerProcess
) -> None:
    client = client_for(session, chat_worker)
    body = {"model": "no-such-model", "messages": HELLO, "max_tokens": 4}
    with pytest.raises(HearthRequestError) as streamed:
        await client.chat_stream(body)
    assert streamed.value.status == 404
    assert streamed.value.code == "model_not_found"
    assert "no-such-model" in str(streamed.value)
    with pytest.raises(HearthRequestError) as plain:
        await complete(client, body)
    assert (plain.value.status, plain.value.code) == (404, "model_not_found")
    # A bad parameter names itself too.
    with pytest.raises(HearthRequestError) as bad:
        await complete(client, {"messages": HELLO, "max_tokens": 0})
    assert bad.value.status == 400


async def test_busy_worker_says_when_to_retry(
    session: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """With its one slot taken and its queue full, the worker answers 429 + Retry-After."""
    worker = start_worker(
        [tiny_chat_model], tmp_path, extra=["--max-running", "1", "--max-queued", "1"]
    )
    try:
        client = client_for(session, worker)
        model = (await client.info()).chat_models[0]
        body = {"model": model, "messages": HELLO, "max_tokens": HOLD_TOKENS}
        holder = await client.chat_stream(body)  # holds the slot while it is not read
        first = await anext(holder)
        assert first.content or first.finish_reason
        queued = asyncio.create_task(complete(client, {**body, "max_tokens": 4}))
        for _ in range(200):
            if (await client.capacity()).queued == 1:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the second request never queued")
        with pytest.raises(HearthBusyError) as streamed:
            await client.chat_stream(body)
        assert streamed.value.retry_after is not None
        assert streamed.value.retry_after >= 1
        with pytest.raises(HearthBusyError) as plain:
            await complete(client, body)
        assert plain.value.retry_after is not None and plain.value.retry_after >= 1
        await holder.aclose()  # the client goes away; the slot frees, the queued one runs
        answer = await asyncio.wait_for(queued, 60)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        await worker.astop()


async def test_nothing_listening_is_a_connection_error(session: aiohttp.ClientSession) -> None:
    client = fake(session, free_port())
    for call in (client.health, client.info, client.capacity):
        with pytest.raises(HearthConnectionError):
            await call()
    with pytest.raises(HearthConnectionError):
        await client.chat_stream({"messages": HELLO})


def test_ipv6_base_url() -> None:
    client = HearthClient(None, "::1", 8765)  # type: ignore[arg-type]
    assert client.base_url.endswith("://[::1]:8765")


# --- a misbehaving server ----------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[int]]]:
    """Serve the given routes ("METHOD /path": handler) on 127.0.0.1; returns the port."""
    runners: list[web.AppRunner] = []

    async def start(routes: dict[str, Handler]) -> int:
        app = web.Application()
        for route, handler in routes.items():
            method, path = route.split(" ", 1)
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


def fixed(
    status: int = 200,
    body: str = "",
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers, content_type=content_type)

    return handler


def sse(*events: str, close_early: bool = False, stall: asyncio.Event | None = None) -> Handler:
    """A chat stream of raw `data:` payloads; optionally cut off or stalled midway."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(f"data: {event}\n\n".encode())
        if stall is not None:
            stall.set()
            await asyncio.sleep(3600)  # cancelled when the client goes away
        if close_early:
            assert request.transport is not None
            request.transport.close()  # no final chunk: the body is incomplete
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handler


def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "check"),
    [
        (500, '{"error": {"code": "internal_error", "message": "boom"}}', None,
         HearthConnectionError, lambda e: "500" in str(e) and "boom" in str(e)),
        (502, "<html>bad gateway</html>", None, HearthConnectionError, lambda e: "502" in str(e)),
        (400, "not json", None, HearthRequestError,
         lambda e: e.status == 400 and e.code == "" and e.args[0] == "Bad Request"),
        (404, '{"error": "just a string"}', None, HearthRequestError,
         lambda e: e.status == 404 and e.code == ""),
        (429, "{}", {"Retry-After": "soon"}, HearthBusyError, lambda e: e.retry_after is None),
        (429, "{}", {"Retry-After": "2.5"}, HearthBusyError, lambda e: e.retry_after == 2.5),
        (401, "", None, HearthAuthError, lambda e: True),
        (200, "not json", None, HearthConnectionError, lambda e: True),
        (200, "[1, 2]", None, HearthConnectionError, lambda e: "Unexpected answer" in str(e)),
        (200, '{"name": "no node id"}', None, HearthConnectionError,
         lambda e: "info" in str(e)),
    ],
)  # fmt: skip
async def test_bad_answers_to_info(
    session: aiohttp.ClientSession,
    serve: Callable[[dict[str, Handler]], Awaitable[int]],
    status: int,
    body: str,
    headers: dict[str, str] | None,
    error: type[Exception],
    check: Callable[[Any], bool],
) -> None:
    port = await serve({"GET /v1/info": fixed(status, body, headers)})
    with pytest.raises(error) as raised:
        await fake(session, port).info()
    assert check(raised.value), repr(raised.value)


async def test_bad_capacity_shape(
    session: aiohttp.ClientSession, serve: Callable[[dict[str, Handler]], Awaitable[int]]
) -> None:
    port = await serve({"GET /v1/capacity": fixed(body='{"node_id": "x", "running": "many"}')})
    with pytest.raises(HearthConnectionError, match="capacity"):
        await fake(session, port).capacity()


async def test_stream_errors_before_it_starts(
    session: aiohttp.ClientSession, serve: Callable[[dict[str, Handler]], Awaitable[int]]
) -> None:
    """Errors before the first event are raised by chat_stream itself (so callers fail over)."""
    port = await serve(
        {"POST /v1/chat/completions": fixed(500, '{"error": {"message": "model crashed"}}')}
    )
    with pytest.raises(HearthConnectionError, match="model crashed"):
        await fake(session, port).chat_stream({"messages": HELLO})


async def test_stream_with_an_invalid_event(
    session: aiohttp.ClientSession, serve: Callable[[dict[str, Handler]], Awaitable[int]]
) -> None:
    port = await serve({"POST /v1/chat/completions": sse(chunk({"content": "Hel"}), "{not json")})
    deltas = await fake(session, port).chat_stream({"messages": HELLO})
    assert (await anext(deltas)).content == "Hel"
    with pytest.raises(HearthConnectionError, match="Bad event"):
        await anext(deltas)


async def test_stream_cut_off_midway(
    session: aiohttp.ClientSession, serve: Callable[[dict[str, Handler]], Awaitable[int]]
) -> None:
    port = await serve(
        {"POST /v1/chat/completions": sse(chunk({"content": "Hel"}), close_early=True)}
    )
    deltas = await fake(session, port).chat_stream({"messages": HELLO})
    with pytest.raises(HearthConnectionError):
        await collect(deltas)


async def test_stream_assembles_tool_calls_and_skips_noise(
    session: aiohttp.ClientSession, serve: Callable[[dict[str, Handler]], Awaitable[int]]
) -> None:
    """Fragments of two tool calls, interleaved by index, become two whole calls at the end."""
    events = [
        chunk({"role": "assistant"}),
        chunk({"content": "On it."}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "Hass"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "HassTurnOn"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"name": '}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"name": "TurnOff", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"lamp"}'}}]}),
        json.dumps({"choices": []}),
        chunk({}, finish="tool_calls"),
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": a comment line\n\nevent: ping\n\n")
        for event in events:
            await response.write(f"data:{event}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    port = await serve({"POST /v1/chat/completions": handler})
    deltas = await collect(await fake(session, port).chat_stream({"messages": HELLO}))
    assert [d.content for d in deltas if d.content] == ["On it."]
    last = deltas[-1]
    assert last.finish_reason == "tool_calls"
    assert last.tool_calls == [
        {"id": "a", "name": "HassTurnOn", "arguments": '{"name": "lamp"}'},
        {"id": "b", "name": "HassTurnOff", "arguments": "{}"},
    ]


async def test_cancelled_stream_closes_the_connection(
    session: aiohttp.ClientSession, serve: Callable[[dict[str, Handler]], Awaitable[int]]
) -> None:
    """A consumer that is cancelled mid-answer drops the connection (the worker stops)."""
    stalled = asyncio.Event()
    gone = asyncio.Event()
    inner = sse(chunk({"content": "Hel"}), stall=stalled)

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await inner(request)
        except asyncio.CancelledError:
            gone.set()  # aiohttp cancels the handler when the client disconnects
            raise

    port = await serve({"POST /v1/chat/completions": handler})
    deltas = await fake(session, port).chat_stream({"messages": HELLO})
    assert (await anext(deltas)).content == "Hel"
    await stalled.wait()
    reader = asyncio.create_task(anext(deltas))
    await asyncio.sleep(0.05)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await asyncio.wait_for(gone.wait(), 10)
