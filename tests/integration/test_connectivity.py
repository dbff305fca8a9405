"""Connections and availability: one TLS connection per worker, readable log lines, a
worker's going and coming seen at once, and its token revoked with its entry.

Real worker processes on 127.0.0.1 and a real Home Assistant throughout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from unittest.mock import patch

import aiohttp
import pytest
from fake_worker import FakeWorker
from hearth_worker.tls import ensure_certificate
from homeassistant import config_entries
from homeassistant.const import STATE_OFF, STATE_ON
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry
from relay import CountingRelay
from worker_process import WorkerProcess, tls_closed

from custom_components.hearth import coordinator as coordinator_module
from custom_components.hearth.client import HearthClient, describe
from custom_components.hearth.const import (
    CONF_FINGERPRINT,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    DOMAIN,
)
from custom_components.hearth.household import Household
from custom_components.hearth.worker_api import HearthCertificateError, HearthConnectionError

from .conftest import entry_for, restart, setup_entry, worker_info, zeroconf_announcement

CHAT = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 4,
}


@pytest.fixture
def slow_polls() -> Iterator[None]:
    """Polling every hour: only the immediate re-polls can notice anything in a test."""
    hour = timedelta(hours=1)
    with (
        patch.object(coordinator_module, "SCAN_INTERVAL", hour),
        patch.object(coordinator_module, "MAX_SCAN_INTERVAL", hour),
    ):
        yield


# --- one TLS session per worker ------------------------------------------------


async def test_requests_share_one_connection(
    hass: HomeAssistant, chat_worker: WorkerProcess, slow_polls: None
) -> None:
    """Set-up, polls and chats (streamed and not) all go over one TLS connection.

    Before: a new certificate pin per request, so aiohttp's pool (keyed by it) never
    reused a connection: one TLS handshake per request.
    """
    relay = CountingRelay(chat_worker.port)
    await relay.start()
    try:
        entry = entry_for(chat_worker)
        entry.add_to_hass(hass)
        hass.config_entries.async_update_entry(entry, data={**entry.data, "port": relay.port})
        assert await hass.config_entries.async_setup(entry.entry_id)
        await hass.async_block_till_done()
        coordinator = entry.runtime_data.coordinator
        client = entry.runtime_data.coordinator.client
        for _ in range(3):
            await coordinator.async_refresh()
            assert coordinator.last_update_success
        await client.info()
        assert [delta async for delta in await client.chat_stream(CHAT)]
        deltas = await client.chat_stream(CHAT)
        assert [delta async for delta in deltas]
        await coordinator.async_refresh()
        # info + first poll at set-up, 4 polls, info, 2 chats: 9 requests, 1 connection.
        assert relay.accepted == 1
        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
    finally:
        await relay.close()
        await tls_closed()


async def test_a_stream_whose_end_comes_late_keeps_its_connection(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    """A chat stream's connection goes back to the pool even when the stream's last
    bytes (the end of the chunked body) come a moment after its `[DONE]`.

    Before: the client stopped reading at `[DONE]` and released the response at once;
    aiohttp closes a connection whose body is not read to its end, so the next request
    made a new TLS connection whenever the end came in a later packet (it failed
    `test_requests_share_one_connection` on a busy CI machine).
    """
    fake.end_delay_s = 0.2
    relay = CountingRelay(fake.port)
    await relay.start()
    client = HearthClient(
        async_get_clientsession(hass),
        "127.0.0.1",
        relay.port,
        fake.token,
        fingerprint=fake.fingerprint,
    )
    body = {**CHAT, "model": fake.model}
    try:
        for _ in range(2):
            deltas = [delta async for delta in await client.chat_stream(body)]
            assert "".join(d.content for d in deltas) == fake.answer
            assert deltas[-1].finish_reason == "stop"
        await client.capacity()
        assert relay.accepted == 1
    finally:
        await relay.close()


async def test_a_pooled_connection_is_only_reused_for_its_own_pin(
    hass: HomeAssistant, chat_worker: WorkerProcess, fresh_worker: WorkerProcess
) -> None:
    """Pinning is unchanged: a client pinned to another certificate never gets the
    connection another client opened to the same address, and is refused there."""
    assert fresh_worker.fingerprint != chat_worker.fingerprint
    relay = CountingRelay(chat_worker.port)
    await relay.start()
    session = async_get_clientsession(hass)

    def pinned_to(fingerprint: str | None) -> HearthClient:
        """A client of the worker behind the relay, pinned to `fingerprint`."""
        return HearthClient(
            session, "127.0.0.1", relay.port, chat_worker.token, fingerprint=fingerprint
        )

    try:
        right = pinned_to(chat_worker.fingerprint)
        other = pinned_to(fresh_worker.fingerprint)
        await right.capacity()
        await right.capacity()
        assert relay.accepted == 1
        with pytest.raises(HearthCertificateError):
            await other.capacity()
        assert relay.accepted == 2  # its own connection, refused after the handshake
        # A new client object with the right pin shares the first connection.
        again = pinned_to(chat_worker.fingerprint)
        await again.capacity()
        assert relay.accepted == 2
    finally:
        await relay.close()
        await tls_closed()


# --- log lines ----------------------------------------------------------------


async def test_log_lines_name_the_worker_not_object_reprs(
    hass: HomeAssistant, own_worker: WorkerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that went away: every log line says who and where, in words."""
    caplog.set_level(logging.DEBUG)
    entry = entry_for(own_worker, title="Kitchen laptop")
    await setup_entry(hass, entry)
    await own_worker.astop()
    caplog.clear()
    with pytest.raises(HomeAssistantError):
        await hass.services.async_call(
            DOMAIN, "ask", {"prompt": "hello"}, blocking=True, return_response=True
        )
    await entry.runtime_data.coordinator.async_refresh()
    await hass.async_block_till_done()
    text = "\n".join(
        [record.getMessage() for record in caplog.records]
        + [record.exc_text or "" for record in caplog.records]
    )
    assert f"127.0.0.1:{own_worker.port}" in text
    assert "Kitchen laptop" in text
    assert "object at 0x" not in text
    assert "Fingerprint" not in text


async def test_error_descriptions_have_no_reprs(hass: HomeAssistant) -> None:
    """The connection error aiohttp raises, described: host, port and reason only."""
    session = async_get_clientsession(hass)
    client = HearthClient(session, "127.0.0.1", 9, "t", fingerprint="ab" * 32)
    with pytest.raises(HearthConnectionError) as caught:
        await client.capacity()
    cause = caught.value.__cause__
    assert isinstance(cause, aiohttp.ClientConnectorError)
    assert "object at 0x" not in str(caught.value)
    assert "object at 0x" not in str(cause)  # even aiohttp's own text (the pin's repr)
    assert describe(cause).startswith("cannot connect to 127.0.0.1:9: ")
    assert describe(TimeoutError()) == "timed out"
    assert describe(aiohttp.ServerDisconnectedError()) == "the worker closed the connection"
    assert describe(ValueError("bad")) == "ValueError: bad"
    assert describe(ValueError()) == "ValueError"


# --- a worker's going and coming, seen at once ---------------------------------


def online_sensor(hass: HomeAssistant, worker: WorkerProcess) -> str:
    node_id = worker_info(worker)["node_id"]
    entity_id = er.async_get(hass).async_get_entity_id("binary_sensor", DOMAIN, f"{node_id}_online")
    assert entity_id is not None
    return entity_id


def announcement(worker: WorkerProcess, node_id: str) -> ZeroconfServiceInfo:
    """What Home Assistant's zeroconf hands the flow when a worker announces itself."""
    return zeroconf_announcement(
        worker, {"txtvers": "1", "id": node_id, "paired": "true", "scheme": "https"}
    )


async def ask(hass: HomeAssistant) -> bool:
    """hearth.ask; True once a worker answered (its text may be anything)."""
    response = await hass.services.async_call(
        DOMAIN, "ask", {"prompt": "hello", "max_tokens": 4}, blocking=True, return_response=True
    )
    assert response is not None
    return isinstance(response["answer"], str)


async def lose_worker(hass: HomeAssistant, worker: WorkerProcess, online: str) -> None:
    """Stop the worker; the next request fails and Home Assistant knows at once."""
    assert hass.states.get(online).state == STATE_ON
    await worker.astop()
    with pytest.raises(HomeAssistantError):
        await ask(hass)
    await hass.async_block_till_done()
    # No poll was due (hourly): the failed request made one.
    assert hass.states.get(online).state == STATE_OFF


async def quiet_household(hass: HomeAssistant) -> None:
    household = Household.get(hass)
    await household.async_update_settings({CONF_LLM_HASS_API: [], CONF_MAX_TOKENS: 4})


async def lost_and_restarted(
    hass: HomeAssistant, worker: WorkerProcess
) -> tuple[MockConfigEntry, str]:
    """`worker` set up, seen offline after it stopped, then started again (Home Assistant
    not told): its entry and its online sensor's entity id."""
    entry = entry_for(worker)
    await setup_entry(hass, entry)
    await quiet_household(hass)
    online = online_sensor(hass, worker)
    await lose_worker(hass, worker, online)
    await hass.async_add_executor_job(restart, worker)
    return entry, online


async def test_announced_worker_is_back_at_once(
    hass: HomeAssistant, own_worker: WorkerProcess, slow_polls: None
) -> None:
    """Lost: seen on the first failed request. Back: seen on its mDNS announcement,
    and it takes requests right away (before: 52-58 s, the poll's back-off)."""
    entry, online = await lost_and_restarted(hass, own_worker)
    answering = time.monotonic()  # the worker answers from here on
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=announcement(own_worker, str(entry.unique_id)),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    await hass.async_block_till_done()
    assert hass.states.get(online).state == STATE_ON
    assert await ask(hass)
    took = time.monotonic() - answering
    print(f"worker answering -> online in Home Assistant and answering a request: {took:.2f} s")
    assert took < 30  # generous on a loaded machine; the mechanism waits for nothing
    assert entry.runtime_data.coordinator.update_interval == timedelta(hours=1)


async def test_request_polls_offline_workers_first(
    hass: HomeAssistant, own_worker: WorkerProcess, slow_polls: None
) -> None:
    """No announcement (a manual entry on another subnet): a request that finds no
    worker online polls the offline ones and a returning one answers it."""
    _, online = await lost_and_restarted(hass, own_worker)
    assert hass.states.get(online).state == STATE_OFF  # nobody has looked yet
    assert await ask(hass)
    assert hass.states.get(online).state == STATE_ON


async def test_announcement_of_a_worker_online_polls_it(
    hass: HomeAssistant, own_worker: WorkerProcess, slow_polls: None
) -> None:
    """An announcement at the known address of a loaded entry polls it (no reload)."""
    entry = entry_for(own_worker)
    await setup_entry(hass, entry)
    coordinator = entry.runtime_data.coordinator
    before = coordinator.data
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=announcement(own_worker, str(entry.unique_id)),
    )
    assert result["reason"] == "already_configured"
    await hass.async_block_till_done()
    assert coordinator.data is not before  # a fresh snapshot
    assert entry.runtime_data.coordinator is coordinator  # the same entry, not reloaded


# --- tokens end with their entry -------------------------------------------------


def status_with_token(worker: WorkerProcess, token: str | None) -> int:
    request = urllib.request.Request(
        worker.url + "/v1/info", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=worker.ssl) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


async def test_removing_the_entry_revokes_its_token(
    hass: HomeAssistant, own_worker: WorkerProcess
) -> None:
    entry = entry_for(own_worker)
    await setup_entry(hass, entry)
    token = own_worker.token
    assert await hass.async_add_executor_job(status_with_token, own_worker, token) == 200
    assert (await hass.config_entries.async_remove(entry.entry_id))["require_restart"] is False
    await hass.async_block_till_done()
    assert await hass.async_add_executor_job(status_with_token, own_worker, token) == 401
    assert not hass.config_entries.async_entries(DOMAIN)


async def test_removal_goes_on_when_the_worker_is_gone(
    hass: HomeAssistant, own_worker: WorkerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    entry = entry_for(own_worker, title="Kitchen laptop")
    await setup_entry(hass, entry)
    await own_worker.astop()
    await hass.config_entries.async_remove(entry.entry_id)
    await hass.async_block_till_done()
    assert not hass.config_entries.async_entries(DOMAIN)
    assert "Could not revoke Home Assistant's token on the removed worker Kitchen laptop" in (
        caplog.text
    )


async def test_removal_is_bounded_by_a_silent_worker(
    hass: HomeAssistant,
    own_worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """A worker that completes the TLS handshake and then never answers holds removal
    at most REVOKE_TIMEOUT (shortened here to 0.2 s; the request's own bound is 10 s)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    cert = ensure_certificate(tmp_path / "silent", "silent")
    silent = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=cert.server_context())
    try:
        entry = entry_for(own_worker)
        await setup_entry(hass, entry)
        assert await hass.config_entries.async_unload(entry.entry_id)
        hass.config_entries.async_update_entry(
            entry,
            data={
                **entry.data,
                "port": silent.sockets[0].getsockname()[1],
                CONF_FINGERPRINT: cert.fingerprint_hex,
            },
        )
        started = time.monotonic()
        with patch("custom_components.hearth.REVOKE_TIMEOUT", 0.2):
            await hass.config_entries.async_remove(entry.entry_id)
        took = time.monotonic() - started
        assert not hass.config_entries.async_entries(DOMAIN)
        assert held  # the request did reach the silent worker
        assert "timed out" in caplog.text
        assert took < 5  # generous: unbounded, the request's own 10 s would pass
    finally:
        silent.close()
        for writer in held:
            writer.close()
        with suppress(Exception):
            await silent.wait_closed()
        await tls_closed()
