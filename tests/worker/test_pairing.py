"""Pairing, tokens and Supervisor discovery through a real worker process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pairing_vectors
from aiohttp import web
from hearth_worker import pairing
from hearth_worker.pairing import normalize_code, pair_remote
from worker_process import WorkerProcess, cli, fake_supervisor, start_worker

CODE = re.compile(r"Pairing code: ([0-9A-Z]{4}-[0-9A-Z]{4})")


def test_pairing_proof_matches_the_shared_vectors() -> None:
    """The worker's side of the pairing proof derives what the vectors say (the
    integration's side is checked against the same file in tests/integration/test_transport.py)."""
    for v in pairing_vectors.load():
        verifier = pairing.code_verifier(normalize_code(v.code), v.salt)
        key = pairing.session_key(verifier, v.fingerprint, v.nonce)
        assert key == v.key, v
        assert pairing.client_proof(key, v.fingerprint, v.nonce) == v.client_proof
        proof = pairing.worker_proof(key, v.fingerprint, v.nonce, v.token, v.node_id)
        assert proof == v.worker_proof


async def proof_body(
    http: aiohttp.ClientSession,
    worker: WorkerProcess,
    code: str,
    *,
    fingerprint: bytes | None = None,
    client_name: str | None = None,
) -> tuple[dict[str, Any], bytes, bytes]:
    """A POST /v1/pair body proving `code`, bound to `fingerprint` (default: the worker's).

    Returns the body, the session key and the fingerprint used.
    """
    async with http.get(worker.url + "/v1/pair") as resp:
        assert resp.status == 200, await resp.text()
        challenge = await resp.json()
    assert challenge["protocol"] == pairing.PROTOCOL
    seen = bytes.fromhex(worker.fingerprint or "") if fingerprint is None else fingerprint
    nonce = secrets.token_bytes(pairing.NONCE_BYTES)
    verifier = pairing.code_verifier(normalize_code(code), bytes.fromhex(challenge["salt"]))
    key = pairing.session_key(verifier, seen, nonce)
    body: dict[str, Any] = {
        "salt": challenge["salt"],
        "client_nonce": nonce.hex(),
        "proof": pairing.client_proof(key, seen, nonce).hex(),
    }
    if client_name is not None:
        body["client_name"] = client_name
    return body, key, seen


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
        body, _, _ = await proof_body(http, worker, "0000-0000")
        async with http.post(pair_url, json=body) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "wrong_code"
        # The code itself is never accepted on the wire, right or wrong.
        async with http.post(pair_url, json={"code": shown.group(1)}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "code_not_accepted"
        async with http.post(pair_url, json={"nope": 1}) as resp:
            assert resp.status == 400
        async with http.post(pair_url, json={**body, "proof": "zz"}) as resp:
            assert resp.status == 400
        async with http.post(pair_url, data=b"garbage") as resp:
            assert resp.status == 400

        # The CLI's `pair` replaces the code, and the running worker honours it at once.
        new_code = CODE.search(cli(worker.state_dir, "pair"))
        assert new_code
        async with http.post(pair_url, json=body) as resp:  # made for the old code's salt
            assert resp.status == 403
        body, _, _ = await proof_body(http, worker, shown.group(1))
        async with http.post(pair_url, json=body) as resp:
            assert resp.status == 403
        typed = new_code.group(1).lower().replace("-", "")  # as a person might type it
        body, key, seen = await proof_body(http, worker, typed, client_name="Home Assistant")
        async with http.post(pair_url, json=body, ssl=worker.ssl) as resp:
            assert resp.status == 200
            paired = await resp.json()
        assert paired["token"].startswith("hearth_") and len(paired["token"]) > 40
        # The worker proves it knows the code too, bound to the token it issued.
        nonce = bytes.fromhex(body["client_nonce"])
        assert bytes.fromhex(paired["proof"]) == pairing.worker_proof(
            key, seen, nonce, paired["token"], paired["node_id"]
        )
        headers = {"Authorization": f"Bearer {paired['token']}"}
        async with http.get(worker.url + "/v1/info", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["node_id"] == paired["node_id"]

        # The code is consumed.
        async with http.get(pair_url) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "no_code"
        async with http.post(pair_url, json=body) as resp:
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


async def test_proof_bound_to_another_certificate_is_refused(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """A man in the middle shows the client its own certificate: the right code, bound to
    that fingerprint, is refused by the real worker and counts as a wrong code."""
    worker = start_worker([tiny_chat_model], tmp_path, token=False, extra=["--no-warmup"])
    try:
        code = CODE.search(cli(worker.state_dir, "pair"))
        assert code
        middleman = hashlib.sha256(b"the middleman's certificate").digest()
        body, _, _ = await proof_body(http, worker, code.group(1), fingerprint=middleman)
        async with http.post(worker.url + "/v1/pair", json=body) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "wrong_code"
            assert "token" not in await resp.text()
        record = json.loads((worker.state_dir / "pairing.json").read_text())
        assert record["failures"] == 1
        assert code.group(1).replace("-", "") not in json.dumps(record)
        # The same code with the worker's real fingerprint still pairs.
        paired = await asyncio.to_thread(pair_remote, worker.url, code.group(1), "tests")
        assert paired.fingerprint.hex() == worker.fingerprint
    finally:
        assert worker.stop() == 0, worker.log()


async def test_plain_http_worker_pairs_without_sending_the_code(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        [tiny_chat_model], tmp_path, token=False, plain_http=True, extra=["--no-warmup"]
    )
    try:
        assert worker.url.startswith("http://") and worker.fingerprint is None
        assert "plain HTTP" in worker.log()
        code = CODE.search(cli(worker.state_dir, "pair"))
        assert code
        async with http.post(worker.url + "/v1/pair", json={"code": code.group(1)}) as resp:
            assert resp.status == 400
        paired = await asyncio.to_thread(pair_remote, worker.url, code.group(1), "tests")
        assert paired.fingerprint == b""
        headers = {"Authorization": f"Bearer {paired.token}"}
        async with http.get(worker.url + "/v1/info", headers=headers) as resp:
            assert resp.status == 200
    finally:
        assert worker.stop() == 0, worker.log()


async def test_certificate_made_once_and_cli(tiny_chat_model: Path, tmp_path: Path) -> None:
    worker = start_worker([tiny_chat_model], tmp_path, extra=["--no-warmup"])
    try:
        first = worker.fingerprint
        assert first and (worker.state_dir / "tls-key.pem").stat().st_mode & 0o777 == 0o600
        shown = cli(worker.state_dir, "cert")
        assert str(worker.cert_path) in shown
        assert first.upper() == shown.split("fingerprint: ")[1].strip().replace(":", "")
        assert worker.fingerprint.upper() in worker.log().replace(":", "")
    finally:
        assert worker.stop() == 0, worker.log()
    # A restart keeps the certificate (clients pinned it).
    again = start_worker([tiny_chat_model], tmp_path, token=False, extra=["--no-warmup"])
    try:
        assert again.fingerprint == first
        token = cli(again.state_dir, "tokens", "create", "my script").strip().splitlines()[-1]
        request = urllib.request.Request(
            again.url + "/v1/info", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, context=again.ssl, timeout=10) as response:
            assert response.status == 200
    finally:
        assert again.stop() == 0, again.log()


async def test_wrong_codes_are_rate_limited(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker([tiny_chat_model], tmp_path, token=False, extra=["--no-warmup"])
    try:
        statuses = []
        # The proofs first (each costs a key derivation): the attempts then come back to
        # back, well inside the lock-out however slow the machine is.
        bodies = [(await proof_body(http, worker, "ZZZZ-ZZZZ"))[0] for _ in range(6)]
        for body in bodies:
            async with http.post(worker.url + "/v1/pair", json=body) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert int(resp.headers["Retry-After"]) >= 1
                    assert (await resp.json())["error"]["code"] == "rate_limited"
        assert statuses[0] == 403
        assert statuses[-1] == 429
    finally:
        worker.stop()


async def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for `check` (generously: a loaded machine is slow), failing with `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_supervisor_discovery(
    http: aiohttp.ClientSession, tiny_chat_model: Path, tmp_path: Path
) -> None:
    """In the add-on, the worker announces itself with a fresh token and withdraws on stop.

    A restart announces a new token and revokes the old one.
    """
    received: list[tuple[str, str, str, Any]] = []  # method, path, Authorization, body

    async def discovery(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        auth = request.headers.get("Authorization", "")
        received.append((request.method, request.path, auth, body))
        return web.json_response({"result": "ok", "data": {"uuid": f"uuid{len(received)}"}})

    def posts() -> list[tuple[str, str, str, Any]]:
        return [r for r in received if r[0] == "POST"]

    def start() -> WorkerProcess:
        return start_worker(
            [tiny_chat_model],
            tmp_path,  # the same state dir each time
            token=False,
            extra=["--no-warmup", "--supervisor-discovery", "--discovery-host", "local-hearth"],
            env={"SUPERVISOR_URL": supervisor_url, "SUPERVISOR_TOKEN": "supervisor-secret"},
        )

    async def status_with(worker: WorkerProcess, token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(worker.url + "/v1/info", headers=headers) as resp:
            return resp.status

    tokens: list[str] = []
    async with fake_supervisor(discovery) as supervisor_url:
        for run in (1, 2):
            worker = start()
            try:
                await until(lambda n=run: len(posts()) == n, f"announcement {run}")
                _, path, auth, body = posts()[-1]
                assert (path, auth) == ("/discovery", "Bearer supervisor-secret")
                assert body["service"] == "hearth"
                config = body["config"]
                assert config["host"] == "local-hearth"
                assert config["port"] == worker.port
                # The Supervisor channel is trusted: it carries the certificate to pin.
                assert config["scheme"] == "https"
                assert config["fingerprint"] == worker.fingerprint
                tokens.append(config["token"])
                async with http.get(
                    worker.url + "/v1/info", headers={"Authorization": f"Bearer {tokens[-1]}"}
                ) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["node_id"] == config["node_id"]
                assert "Pairing code" not in worker.log()
                if run == 2:
                    # Rotated: a new token; the one announced before no longer opens anything.
                    assert tokens[1] != tokens[0]
                    assert await status_with(worker, tokens[0]) == 401
            finally:
                assert await worker.astop() == 0, worker.log()
            # Stopping withdraws this run's announcement (uuid<n>: the n-th request).
            announced = f"/discovery/uuid{received.index(posts()[-1]) + 1}"
            assert received[-1][:3] == ("DELETE", announced, "Bearer supervisor-secret")
        assert [r[0] for r in received] == ["POST", "DELETE", "POST", "DELETE"]
    listing = cli(tmp_path / "state", "tokens", "list")
    assert listing.count("Supervisor") == 1
