"""Encrypted on the wire: pinned certificates, the pairing proof against a man in the
middle, and the address policy (PRIVACY.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pairing_vectors
import pytest
from aiohttp import web
from hearth_worker.tls import ensure_certificate
from homeassistant import config_entries
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry
from worker_process import WorkerProcess, cli, insecure_ssl

from custom_components.hearth import pairing
from custom_components.hearth.addresses import address_allowed
from custom_components.hearth.const import CONF_CODE, CONF_FINGERPRINT, DOMAIN

from .conftest import entry_for, pairing_code, restart, setup_entry


async def start_manual(hass: HomeAssistant, port: int) -> str:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert result["step_id"] == "pair", result
    return str(result["flow_id"])


async def test_man_in_the_middle_gets_nothing(
    hass: HomeAssistant, fresh_worker: WorkerProcess, tmp_path: Path
) -> None:
    """A TLS proxy with its own certificate relays everything to the real worker and
    reads all the plaintext Home Assistant sends: it learns no code, and no token is
    issued (the proof is bound to the proxy's fingerprint, so the worker refuses it)."""
    mitm = ensure_certificate(tmp_path / "mitm", "mitm")
    seen_from_ha = bytearray()

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: bytearray | None
    ) -> None:
        try:
            while data := await reader.read(65536):
                if log is not None:
                    log.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", fresh_worker.port, ssl=insecure_ssl()
        )
        await asyncio.gather(pipe(reader, up_writer, seen_from_ha), pipe(up_reader, writer, None))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=mitm.server_context())
    try:
        port = proxy.sockets[0].getsockname()[1]
        code = pairing_code(fresh_worker)
        flow_id = await start_manual(hass, port)
        result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: code})
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {"base": "wrong_code"}
    finally:
        proxy.close()
        await proxy.wait_closed()
    plaintext = bytes(seen_from_ha)
    assert b"/v1/pair" in plaintext  # the proxy did see the exchange in clear
    for form in (code, code.replace("-", ""), code.lower()):
        assert form.encode() not in plaintext
    assert cli(fresh_worker.state_dir, "tokens", "list").strip() == ""
    record = json.loads((fresh_worker.state_dir / "pairing.json").read_text())
    assert record["failures"] == 1  # counted as a wrong code (rate limits apply)
    assert not hass.config_entries.async_entries(DOMAIN)
    # The same code, typed against the real worker, pairs and pins its own certificate.
    flow_id = await start_manual(hass, fresh_worker.port)
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: code})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_FINGERPRINT] == fresh_worker.fingerprint != mitm.fingerprint_hex
    await hass.async_block_till_done()
    assert await hass.config_entries.async_unload(result["result"].entry_id)


async def test_worker_that_cannot_prove_the_code_is_refused(
    hass: HomeAssistant, tmp_path: Path
) -> None:
    """An impostor that hands out a token without knowing the code gets no entry."""
    cert = ensure_certificate(tmp_path / "impostor", "impostor")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": "0", "api_version": 1})

    async def challenge(request: web.Request) -> web.Response:
        return web.json_response({"protocol": "hearth-pair-v1", "salt": "00" * 16})

    async def pair(request: web.Request) -> web.Response:
        return web.json_response(
            {"token": "hearth_fake", "token_id": "t", "node_id": "n", "proof": "00" * 32}
        )

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/pair", challenge)
    app.router.add_post("/v1/pair", pair)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cert.server_context())
    await site.start()
    try:
        flow_id = await start_manual(hass, runner.addresses[0][1])
        result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: "ABCD-1234"})
        assert result["errors"] == {"base": "not_proven"}
        assert not hass.config_entries.async_entries(DOMAIN)
    finally:
        await runner.cleanup()


async def test_changed_certificate_needs_pairing_again(
    hass: HomeAssistant, own_worker: WorkerProcess
) -> None:
    """A worker with another certificate is never silently accepted: repair + reauth."""
    entry = entry_for(own_worker)
    await setup_entry(hass, entry)
    assert entry.state is config_entries.ConfigEntryState.LOADED
    pinned = entry.data[CONF_FINGERPRINT]

    own_worker.stop()
    for name in ("tls-cert.pem", "tls-key.pem"):
        (own_worker.state_dir / name).unlink()
    await hass.async_add_executor_job(restart, own_worker)
    assert own_worker.fingerprint != pinned

    await entry.runtime_data.coordinator.async_refresh()
    await hass.async_block_till_done()
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"token_rejected_{entry.entry_id}")
    assert issue is not None and issue.translation_key == "certificate_changed"
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert [flow["step_id"] for flow in flows] == ["reauth_confirm"]

    result = await hass.config_entries.flow.async_configure(
        flows[0]["flow_id"], {CONF_CODE: pairing_code(own_worker)}
    )
    assert result["reason"] == "reauth_successful"
    assert entry.data[CONF_FINGERPRINT] == own_worker.fingerprint
    await hass.async_block_till_done()
    assert entry.state is config_entries.ConfigEntryState.LOADED
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_entry_without_pinned_certificate_pairs_again(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    """An entry from before HTTPS (no fingerprint) is not trusted blindly."""
    entry = entry_for(chat_worker)
    data = {k: v for k, v in entry.data.items() if k != CONF_FINGERPRINT}
    legacy = MockConfigEntry(domain=DOMAIN, unique_id=entry.unique_id, data=data)
    legacy.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(legacy.entry_id)
    await hass.async_block_till_done()
    assert legacy.state is config_entries.ConfigEntryState.SETUP_ERROR
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert [flow["step_id"] for flow in flows] == ["reauth_confirm"]
    assert legacy.data[CONF_TOKEN] == chat_worker.token


@pytest.mark.parametrize(
    ("address", "home"),
    [
        ("10.1.2.3", True),
        ("172.16.0.9", True),
        ("172.31.255.1", True),
        ("192.168.1.20", True),
        ("127.0.0.1", True),
        ("169.254.10.1", True),
        ("::1", True),
        ("fd12:3456::1", True),
        ("fe80::1%eth0", True),
        ("::ffff:192.168.1.2", True),
        ("172.32.0.1", False),
        ("100.64.0.1", False),  # CGNAT: maybe the ISP's network
        ("8.8.8.8", False),
        ("203.0.113.9", False),
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("224.0.0.251", False),
        ("not-an-address", False),
    ],
)
def test_address_policy(address: str, home: bool) -> None:
    assert address_allowed(address) is home
    if address not in ("0.0.0.0", "224.0.0.251", "not-an-address"):
        assert address_allowed(address, allow_public=True)


def test_pairing_proof_matches_the_shared_vectors() -> None:
    """The integration's side of the pairing proof derives what the vectors say (the
    worker's side is checked against the same file in tests/worker/test_pairing.py)."""
    for v in pairing_vectors.load():
        key = pairing.pairing_key(v.code, v.salt, v.fingerprint, v.nonce)
        assert key == v.key, v
        assert pairing.client_proof(key, v.fingerprint, v.nonce) == v.client_proof
        assert pairing.worker_proof(key, v.fingerprint, v.nonce, v.token, v.node_id) == (
            v.worker_proof
        )
