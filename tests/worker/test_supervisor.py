"""Supervisor discovery against a small fake Supervisor on 127.0.0.1.

The fake answers as ``supervisor/api/discovery.py`` does (through its ``api_process``
wrapper): ``{"result": "ok", "data": ...}``, or ``{"result": "error", "message": ...}``
with status 400/403/404, and a plain-text 401 from its security middleware.
"""

from __future__ import annotations

import socket
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hearth_worker.supervisor import SupervisorError, announce, withdraw

TOKEN = "supervisor-token-for-tests"


@dataclass
class FakeSupervisor:
    url: str
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    fail_next: tuple[int, Any] | None = None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"result": "error", "message": message}, status=status)


@pytest.fixture
async def supervisor(socket_enabled: None) -> AsyncIterator[FakeSupervisor]:
    state = FakeSupervisor(url="")

    @web.middleware
    async def security(request: web.Request, handler: Any) -> web.StreamResponse:
        state.requests.append(
            (request.method, request.raw_path, request.headers.get("Authorization"))
        )
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized
        if state.fail_next is not None:
            status, body = state.fail_next
            state.fail_next = None
            if isinstance(body, str):
                return web.Response(status=status, text=body)
            return web.json_response(body, status=status)
        response: web.StreamResponse = await handler(request)
        return response

    async def set_discovery(request: web.Request) -> web.Response:
        body = await request.json()
        if set(body) != {"service", "config"} or not isinstance(body["config"], dict):
            return _error(400, "does not match the schema")
        if body["service"] != "hearth":
            return _error(403, "Add-ons must list services they provide via discovery")
        message_id = uuidlib.uuid4().hex
        state.messages[message_id] = body
        return web.json_response({"result": "ok", "data": {"uuid": message_id}})

    async def del_discovery(request: web.Request) -> web.Response:
        if state.messages.pop(request.match_info["uuid"], None) is None:
            return _error(404, "Discovery message not found")
        return web.json_response({"result": "ok", "data": {}})

    app = web.Application(middlewares=[security])
    app.router.add_post("/discovery", set_discovery)
    app.router.add_delete("/discovery/{uuid}", del_discovery)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


CONFIG = {"host": "192.0.2.10", "port": 8787, "node_id": "n-1"}


async def test_announce_and_withdraw(
    supervisor: FakeSupervisor, session: aiohttp.ClientSession
) -> None:
    message_id = await announce(
        session, config=CONFIG, supervisor_url=supervisor.url, supervisor_token=TOKEN
    )
    assert supervisor.messages == {message_id: {"service": "hearth", "config": CONFIG}}
    assert supervisor.requests == [("POST", "/discovery", f"Bearer {TOKEN}")]

    await withdraw(
        session, uuid=message_id, supervisor_url=supervisor.url + "/", supervisor_token=TOKEN
    )
    assert supervisor.messages == {}
    assert supervisor.requests[-1] == ("DELETE", f"/discovery/{message_id}", f"Bearer {TOKEN}")

    # Withdrawing again (e.g. after a Supervisor restart) is not an error.
    await withdraw(session, uuid=message_id, supervisor_url=supervisor.url, supervisor_token=TOKEN)


async def test_wrong_token_is_a_clear_error(
    supervisor: FakeSupervisor, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(SupervisorError, match=r"announce failed \(HTTP 401\)") as err:
        await announce(
            session, config=CONFIG, supervisor_url=supervisor.url, supervisor_token="wrong"
        )
    assert "wrong" not in str(err.value)
    assert supervisor.messages == {}


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (403, {"result": "error", "message": "Add-ons must list services"}, "HTTP 403.*list"),
        (400, {"result": "error", "message": "bad"}, r"HTTP 400\): bad"),
        (200, {"result": "error", "message": "odd"}, r"HTTP 200\): odd"),
        (200, {"result": "ok", "data": {}}, "no discovery uuid"),
        (200, {"result": "ok", "data": {"uuid": ""}}, "no discovery uuid"),
        (200, {"result": "ok"}, "no discovery uuid"),
        (502, "Bad Gateway", r"HTTP 502\)$"),
        (200, "not json", r"HTTP 200\)$"),
    ],
)
async def test_announce_non_ok_answers(
    supervisor: FakeSupervisor,
    session: aiohttp.ClientSession,
    status: int,
    body: Any,
    match: str,
) -> None:
    supervisor.fail_next = (status, body)
    with pytest.raises(SupervisorError, match=match):
        await announce(
            session, config=CONFIG, supervisor_url=supervisor.url, supervisor_token=TOKEN
        )


async def test_withdraw_errors(supervisor: FakeSupervisor, session: aiohttp.ClientSession) -> None:
    supervisor.fail_next = (403, {"result": "error", "message": "Can't remove discovery message"})
    with pytest.raises(SupervisorError, match=r"withdraw failed.*HTTP 403.*remove"):
        await withdraw(session, uuid="abc", supervisor_url=supervisor.url, supervisor_token=TOKEN)
    # The uuid is one path segment, whatever it holds.
    await withdraw(session, uuid="a/../b", supervisor_url=supervisor.url, supervisor_token=TOKEN)
    assert supervisor.requests[-1][1] == "/discovery/a%2F..%2Fb"


async def test_unreachable_supervisor(session: aiohttp.ClientSession, socket_enabled: None) -> None:
    # A port on loopback that nothing listens on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SupervisorError, match="cannot reach the Supervisor"):
        await announce(
            session,
            config=CONFIG,
            supervisor_url=f"http://127.0.0.1:{port}",
            supervisor_token=TOKEN,
        )
