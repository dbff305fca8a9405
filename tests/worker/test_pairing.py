"""Pairing, tokens and Supervisor discovery through a real worker process."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from worker_process import cli, start_worker

CODE = re.compile(r"Pairing code: ([0-9A-Z]{4}-[0-9A-Z]{4})")


async def test_pairing_flow(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker([tiny_chat_model], tmp_path, token=False, extra=["--no-warmup"])
    try:
        shown = CODE.search(worker.log())
        assert shown, f"a fresh worker shows a pairing code:\n{worker.log()}"
        pair_url = worker.url + "/v1/pair"

        async with http.get(worker.url + "/v1/info") as resp:
            assert resp.status == 401
        async with http.post(pair_url, json={"code": "0000-0000"}) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "wrong_code"
        async with http.post(pair_url, json={"nope": 1}) as resp:
            assert resp.status == 400
        async with http.post(pair_url, data=b"garbage") as resp:
            assert resp.status == 400

        # The CLI's `pair` replaces the code, and the running worker honours it at once.
        new_code = CODE.search(cli(worker.state_dir, "pair"))
        assert new_code
        async with http.post(pair_url, json={"code": shown.group(1)}) as resp:
            assert resp.status == 403
        typed = new_code.group(1).lower().replace("-", "")  # as a person might type it
        async with http.post(
            pair_url, json={"code": typed, "client_name": "Home Assistant"}
        ) as resp:
            assert resp.status == 200
            paired = await resp.json()
        assert paired["token"].startswith("hearth_") and len(paired["token"]) > 40
        headers = {"Authorization": f"Bearer {paired['token']}"}
        async with http.get(worker.url + "/v1/info", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["node_id"] == paired["node_id"]

        # The code is consumed.
        async with http.post(pair_url, json={"code": typed}) as resp:
            assert resp.status == 403

        # Tokens are stored hashed, listed and revoked from the CLI.
        for path in worker.state_dir.iterdir():
            assert paired["token"] not in path.read_text(errors="replace")
        listing = cli(worker.state_dir, "tokens", "list")
        assert paired["token_id"] in listing and "Home Assistant" in listing
        cli(worker.state_dir, "tokens", "revoke", paired["token_id"])
        async with http.get(worker.url + "/v1/info", headers=headers) as resp:
            assert resp.status == 401
        assert paired["token"] not in worker.log()
        assert new_code.group(1) not in worker.log()
    finally:
        assert worker.stop() == 0, worker.log()


async def test_wrong_codes_are_rate_limited(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker([tiny_chat_model], tmp_path, token=False, extra=["--no-warmup"])
    try:
        statuses = []
        for _ in range(6):
            async with http.post(worker.url + "/v1/pair", json={"code": "ZZZZ-ZZZZ"}) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert (await resp.json())["error"]["code"] == "rate_limited"
        assert statuses[0] == 403
        assert statuses[-1] == 429
    finally:
        worker.stop()


async def test_supervisor_discovery(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """In the add-on, the worker announces itself with a fresh token and withdraws on stop."""
    received: list[tuple[str, str, Any]] = []

    async def discovery(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        received.append((request.method, request.headers.get("Authorization", ""), body))
        return web.json_response({"result": "ok", "data": {"uuid": "abc123"}})

    app = web.Application()
    app.router.add_post("/discovery", discovery)
    app.router.add_delete("/discovery/{uuid}", discovery)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    supervisor_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    worker = start_worker(
        [tiny_chat_model],
        tmp_path,
        token=False,
        extra=["--no-warmup", "--supervisor-discovery", "--discovery-host", "local-hearth"],
        env={"SUPERVISOR_URL": supervisor_url, "SUPERVISOR_TOKEN": "supervisor-secret"},
    )
    try:
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        method, auth, body = received[0]
        assert (method, auth) == ("POST", "Bearer supervisor-secret")
        assert body["service"] == "hearth"
        config = body["config"]
        assert config["host"] == "local-hearth"
        assert config["port"] == worker.port
        headers = {"Authorization": f"Bearer {config['token']}"}
        async with http.get(worker.url + "/v1/info", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["node_id"] == config["node_id"]
        assert "Pairing code" not in worker.log()
    finally:
        assert await worker.astop() == 0, worker.log()
        await runner.cleanup()
    assert received[-1][0] == "DELETE"
    # A restart announces a new token and revokes the old one.
    listing = cli(worker.state_dir, "tokens", "list")
    assert listing.count("Supervisor") == 1
