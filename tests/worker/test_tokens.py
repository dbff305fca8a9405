"""A client can revoke its own token (`DELETE /v1/tokens/self`), against a real worker."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from hearth_worker.auth import AuthStore
from test_api import check_schema
from worker_process import cli, start_worker

SELF = "/v1/tokens/self"


async def test_delete_tokens_self_revokes_exactly_the_presented_token(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker([tiny_chat_model], tmp_path, extra=["--no-warmup"])
    try:
        other, other_info = AuthStore(worker.state_dir).create_token("another client")
        mine = worker.headers
        theirs = {"Authorization": f"Bearer {other}"}

        async with http.delete(worker.url + SELF) as resp:
            assert resp.status == 401
            check_schema(await resp.json(), "Error")
        async with http.delete(
            worker.url + SELF, headers={"Authorization": "Bearer hearth_not-a-token"}
        ) as resp:
            assert resp.status == 401

        async with http.delete(worker.url + SELF, headers=mine) as resp:
            assert resp.status == 204
            assert await resp.read() == b""
        async with http.get(worker.url + "/v1/info", headers=mine) as resp:
            assert resp.status == 401
        async with http.delete(worker.url + SELF, headers=mine) as resp:
            assert resp.status == 401  # already gone

        # The other client's token is untouched.
        async with http.get(worker.url + "/v1/info", headers=theirs) as resp:
            assert resp.status == 200
        listed = cli(worker.state_dir, "tokens", "list")
        assert other_info.token_id in listed
        assert len(listed.strip().splitlines()) == 1
    finally:
        assert await worker.astop() == 0, worker.log()
