"""Every config-flow path, against real worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import time
from ipaddress import ip_address
from pathlib import Path
from unittest.mock import patch

import pytest
from hearth_worker.pairing import pair_remote
from homeassistant import config_entries
from homeassistant.config_entries import ConfigFlowResult
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry
from worker_process import WorkerProcess, free_port, start_worker

from custom_components.hearth.const import (
    CONF_ALLOW_PUBLIC,
    CONF_CHAT_MODEL,
    CONF_CODE,
    CONF_FINGERPRINT,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_NODE_ID,
    CONF_NOT_ON_BATTERY,
    CONF_ONLY_WHEN_IDLE,
    CONF_PLAIN_HTTP,
    CONF_TEMPERATURE,
    DOMAIN,
)
from custom_components.hearth.household import Household
from custom_components.hearth.worker_api import HearthError

from .conftest import entry_for, pairing_code, worker_info, zeroconf_announcement


def node_id_of(worker: WorkerProcess) -> str:
    return str(json.loads((worker.state_dir / "node.json").read_text())["node_id"])


def zeroconf_info(worker: WorkerProcess, node_id: str | None) -> ZeroconfServiceInfo:
    properties = {
        "txtvers": "1",
        "version": "0.1.0",
        "api": "1",
        "paired": "false",
        "scheme": "https",
    }
    if node_id:
        properties["id"] = node_id
    return zeroconf_announcement(worker, properties)


async def start_manual(hass: HomeAssistant, port: int, **options: bool) -> str:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: port, **options}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "pair"
    return str(result["flow_id"])


async def test_manual_pairs_with_code(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    flow_id = await start_manual(hass, fresh_worker.port)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_CODE: pairing_code(fresh_worker)}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    data = result["data"]
    assert data[CONF_HOST] == "127.0.0.1"
    assert data[CONF_PORT] == fresh_worker.port
    assert data[CONF_NODE_ID] == node_id_of(fresh_worker)
    assert result["result"].unique_id == node_id_of(fresh_worker)
    # The certificate is pinned; HTTPS and the home network only, by default.
    assert data[CONF_FINGERPRINT] == fresh_worker.fingerprint
    assert data[CONF_PLAIN_HTTP] is False
    assert data[CONF_ALLOW_PUBLIC] is False
    # The token really works.
    fresh_worker.token = data[CONF_TOKEN]
    assert worker_info(fresh_worker)["node_id"] == data[CONF_NODE_ID]


async def test_manual_cannot_connect(hass: HomeAssistant) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: free_port()}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}


async def test_wrong_code_then_right(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    code = pairing_code(fresh_worker)
    flow_id = await start_manual(hass, fresh_worker.port)
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: "WRONG000"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "wrong_code"}
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: code})
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_expired_code(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    code = pairing_code(fresh_worker)
    path = fresh_worker.state_dir / "pairing.json"
    record = json.loads(path.read_text())
    record["expires_at"] = time.time() - 1
    path.write_text(json.dumps(record))
    flow_id = await start_manual(hass, fresh_worker.port)
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: code})
    assert result["errors"] == {"base": "expired_code"}


async def test_no_code(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    # Use up the worker's code (an unpaired worker shows one when it starts).
    await hass.async_add_executor_job(
        pair_remote, fresh_worker.url, pairing_code(fresh_worker), "other"
    )
    flow_id = await start_manual(hass, fresh_worker.port)
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: "ABCD1234"})
    assert result["errors"] == {"base": "no_code"}


async def test_rate_limited(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    pairing_code(fresh_worker)
    flow_id = await start_manual(hass, fresh_worker.port)
    errors = []
    for _ in range(4):
        result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: "WRONG000"})
        errors.append(result["errors"]["base"])
    # Three free tries per client, then a lock-out.
    assert errors == ["wrong_code"] * 3 + ["rate_limited"]
    assert int(result["description_placeholders"]["retry_after"]) >= 1


async def test_pair_cannot_connect(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    code = pairing_code(fresh_worker)
    flow_id = await start_manual(hass, fresh_worker.port)
    fresh_worker.stop()
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: code})
    assert result["errors"] == {"base": "cannot_connect"}


async def test_pair_unexpected_error(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    flow_id = await start_manual(hass, fresh_worker.port)
    with patch(
        "custom_components.hearth.config_flow.HearthClient.pair", side_effect=RuntimeError("boom")
    ):
        result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: "X"})
    assert result["errors"] == {"base": "unknown"}


async def test_title_falls_back_when_info_fails(
    hass: HomeAssistant, fresh_worker: WorkerProcess
) -> None:
    flow_id = await start_manual(hass, fresh_worker.port)
    with patch(
        "custom_components.hearth.config_flow.HearthClient.info",
        side_effect=HearthError,
    ):
        result = await hass.config_entries.flow.async_configure(
            flow_id, {CONF_CODE: pairing_code(fresh_worker)}
        )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "127.0.0.1"


async def test_manual_already_configured_updates_address(
    hass: HomeAssistant, fresh_worker: WorkerProcess
) -> None:

    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=node_id_of(fresh_worker),
        data={CONF_HOST: "192.0.2.1", CONF_PORT: 1, CONF_TOKEN: "old", CONF_NODE_ID: "x"},
    )
    entry.add_to_hass(hass)
    flow_id = await start_manual(hass, fresh_worker.port)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_CODE: pairing_code(fresh_worker)}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_HOST] == "127.0.0.1"
    assert entry.data[CONF_PORT] == fresh_worker.port
    assert entry.data[CONF_TOKEN] != "old"
    await hass.async_block_till_done()


async def test_zeroconf_pairs(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=zeroconf_info(fresh_worker, node_id_of(fresh_worker)),
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "pair"
    assert result["description_placeholders"]["name"] == "kitchen-laptop"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_CODE: pairing_code(fresh_worker)}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["result"].unique_id == node_id_of(fresh_worker)


async def test_zeroconf_not_hearth(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=zeroconf_info(fresh_worker, None),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_hearth"


async def test_zeroconf_known_worker_new_address(
    hass: HomeAssistant, fresh_worker: WorkerProcess
) -> None:
    """A real move: the worker at the announced address presents the pinned certificate."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=node_id_of(fresh_worker),
        data={
            CONF_HOST: "192.0.2.1",
            CONF_PORT: 1,
            CONF_TOKEN: "t",
            CONF_NODE_ID: "x",
            CONF_FINGERPRINT: fresh_worker.fingerprint,
        },
    )
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=zeroconf_info(fresh_worker, node_id_of(fresh_worker)),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_HOST] == "127.0.0.1"
    assert entry.data[CONF_PORT] == fresh_worker.port
    assert entry.data[CONF_TOKEN] == "t"
    await hass.async_block_till_done()


async def test_zeroconf_moved_worker_same_certificate_new_port(
    hass: HomeAssistant, own_worker: WorkerProcess, tiny_chat_model: Path
) -> None:
    """A paired, loaded worker restarted on another port: the entry follows it."""
    entry = entry_for(own_worker)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    await own_worker.astop()
    # The same state dir (same node id, same certificate), another free port.
    moved = start_worker([tiny_chat_model], own_worker.state_dir.parent, token=False)
    try:
        assert moved.port != own_worker.port
        assert moved.fingerprint == entry.data[CONF_FINGERPRINT]
        result = await hass.config_entries.flow.async_init(
            DOMAIN,
            context={"source": config_entries.SOURCE_ZEROCONF},
            data=zeroconf_info(moved, str(entry.unique_id)),
        )
        assert result["reason"] == "already_configured"
        assert entry.data[CONF_PORT] == moved.port
        await hass.async_block_till_done()  # reloaded at the new address
        assert entry.state is config_entries.ConfigEntryState.LOADED
        assert entry.runtime_data.coordinator.client.port == moved.port
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        moved.stop()


async def test_zeroconf_spoofed_worker_cannot_take_a_paired_entry(
    hass: HomeAssistant,
    chat_worker: WorkerProcess,
    fresh_worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another real worker (its own certificate) announced with a paired worker's id:
    the entry keeps its address, and the token never goes there."""
    caplog.set_level(logging.DEBUG, logger="custom_components.hearth")
    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    before = dict(entry.data)
    assert fresh_worker.fingerprint != chat_worker.fingerprint
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=zeroconf_info(fresh_worker, str(entry.unique_id)),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert dict(entry.data) == before
    assert "not the paired certificate there" in caplog.text
    assert chat_worker.token is not None
    assert chat_worker.token not in fresh_worker.log()
    await hass.async_block_till_done()


@pytest.mark.parametrize(
    "data",
    [
        {CONF_FINGERPRINT: None},  # nothing pinned: only pairing again moves it
        {CONF_FINGERPRINT: None, CONF_PLAIN_HTTP: True},
    ],
)
async def test_zeroconf_unverifiable_entry_keeps_its_address(
    hass: HomeAssistant, fresh_worker: WorkerProcess, data: dict[str, object]
) -> None:
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=node_id_of(fresh_worker),
        data={CONF_HOST: "192.0.2.1", CONF_PORT: 1, CONF_TOKEN: "t", **data},
    )
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=zeroconf_info(fresh_worker, node_id_of(fresh_worker)),
    )
    assert result["reason"] == "already_configured"
    assert (entry.data[CONF_HOST], entry.data[CONF_PORT]) == ("192.0.2.1", 1)


async def test_zeroconf_known_worker_unreachable_or_unchanged(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    """Nothing answers at the announced address: ignored. An announcement at the known
    address of an entry that is not loaded changes nothing."""
    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    before = dict(entry.data)
    gone = zeroconf_info(chat_worker, str(entry.unique_id))
    gone.port = free_port()
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_ZEROCONF}, data=gone
    )
    assert result["reason"] == "already_configured"
    assert dict(entry.data) == before
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_ZEROCONF},
        data=zeroconf_info(chat_worker, str(entry.unique_id)),
    )
    assert result["reason"] == "already_configured"
    assert dict(entry.data) == before
    assert entry.state is config_entries.ConfigEntryState.NOT_LOADED


def hassio_info(worker: WorkerProcess, token: str | None, node_id: str) -> HassioServiceInfo:
    return HassioServiceInfo(
        config={
            "host": "127.0.0.1",
            "port": worker.port,
            "token": token,
            "node_id": node_id,
            "scheme": "https",
            "fingerprint": worker.fingerprint,
        },
        name="Hearth worker",
        slug="hearth",
        uuid="0123456789abcdef",
    )


async def test_hassio_sets_up_without_code(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:
    node_id = worker_info(chat_worker)["node_id"]
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=hassio_info(chat_worker, chat_worker.token, node_id),
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "hassio_confirm"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["result"].unique_id == node_id
    assert result["data"][CONF_TOKEN] == chat_worker.token
    # The add-on's certificate, handed over through the (trusted) Supervisor, is pinned.
    assert result["data"][CONF_FINGERPRINT] == chat_worker.fingerprint


async def test_hassio_bad_config(hass: HomeAssistant) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=HassioServiceInfo(config={"host": "x"}, name="n", slug="s", uuid="u"),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_hearth"
    # An announcement without a certificate to pin (and not plain HTTP) is refused too.
    config = {"host": "x", "port": 1, "token": "t", "node_id": "n", "scheme": "https"}
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=HassioServiceInfo(config=config, name="n", slug="s", uuid="u"),
    )
    assert result["reason"] == "not_hearth"


@pytest.mark.parametrize(("token", "reason"), [("bad-token", "invalid_auth"), (None, "")])
async def test_hassio_confirm_fails(
    hass: HomeAssistant, fresh_worker: WorkerProcess, token: str | None, reason: str
) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=hassio_info(fresh_worker, token or "t", node_id_of(fresh_worker)),
    )
    if token is None:
        fresh_worker.stop()
        reason = "cannot_connect"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == reason


async def test_hassio_known_worker_updates(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:

    node_id = worker_info(chat_worker)["node_id"]
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=node_id,
        data={CONF_HOST: "192.0.2.1", CONF_PORT: 1, CONF_TOKEN: "old", CONF_NODE_ID: node_id},
    )
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=hassio_info(chat_worker, chat_worker.token, node_id),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_PORT] == chat_worker.port
    assert entry.data[CONF_TOKEN] == chat_worker.token
    await hass.async_block_till_done()


async def test_reauth(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:

    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=node_id_of(fresh_worker),
        data={
            CONF_HOST: "127.0.0.1",
            CONF_PORT: fresh_worker.port,
            CONF_TOKEN: "revoked",
            CONF_NODE_ID: node_id_of(fresh_worker),
            CONF_FINGERPRINT: fresh_worker.fingerprint,
        },
    )
    entry.add_to_hass(hass)
    # Setting up with a rejected token starts reauthentication by itself.
    assert not await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert len(flows) == 1
    flow_id = flows[0]["flow_id"]
    assert flows[0]["step_id"] == "reauth_confirm"

    code = pairing_code(fresh_worker)
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: "WRONG000"})
    assert result["errors"] == {"base": "wrong_code"}
    result = await hass.config_entries.flow.async_configure(flow_id, {CONF_CODE: code})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert entry.data[CONF_TOKEN] != "revoked"
    assert entry.data[CONF_FINGERPRINT] == fresh_worker.fingerprint
    await hass.async_block_till_done()
    assert entry.state is config_entries.ConfigEntryState.LOADED


async def test_reauth_wrong_worker(hass: HomeAssistant, fresh_worker: WorkerProcess) -> None:

    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id="another-node",
        data={CONF_HOST: "127.0.0.1", CONF_PORT: fresh_worker.port, CONF_TOKEN: "t"},
    )
    entry.add_to_hass(hass)
    result = await entry.start_reauth_flow(hass)
    assert result["step_id"] == "reauth_confirm"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_CODE: pairing_code(fresh_worker)}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_worker"
    # Which worker was expected and which answered (test_flow_links.py has the rest).
    placeholders = result["description_placeholders"]
    assert placeholders["expected_id"] == "another-node"
    assert placeholders["answered_id"] == node_id_of(fresh_worker)


async def test_reconfigure(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:

    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    entry_data = dict(entry.data)
    hass.config_entries.async_update_entry(
        entry, data={**entry_data, CONF_HOST: "192.0.2.1", CONF_PORT: 1}
    )
    result = await entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: free_port()}
    )
    assert result["errors"] == {"base": "cannot_connect"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: chat_worker.port}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.data[CONF_PORT] == chat_worker.port
    await hass.async_block_till_done()
    assert entry.state is config_entries.ConfigEntryState.LOADED
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_reconfigure_rejected_token_and_wrong_worker(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id="another-node",
        data={
            CONF_HOST: "192.0.2.1",
            CONF_PORT: 1,
            CONF_TOKEN: "bad",
            CONF_FINGERPRINT: chat_worker.fingerprint,
        },
    )
    entry.add_to_hass(hass)
    result = await entry.start_reconfigure_flow(hass)
    user_input = {CONF_HOST: "127.0.0.1", CONF_PORT: chat_worker.port}
    result = await hass.config_entries.flow.async_configure(result["flow_id"], user_input)
    assert result["errors"] == {"base": "invalid_auth"}
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_TOKEN: chat_worker.token}
    )
    result = await hass.config_entries.flow.async_configure(result["flow_id"], user_input)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_worker"
    placeholders = result["description_placeholders"]
    assert placeholders["expected_id"] == "another-node"
    assert placeholders["answered_id"] == worker_info(chat_worker)["node_id"]


async def test_options_are_household_wide(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:

    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()

    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "init"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": "household"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "household"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            CONF_LLM_HASS_API: ["assist"],
            CONF_MAX_TOKENS: 64,
            CONF_TEMPERATURE: 0.5,
            CONF_CHAT_MODEL: "tiny-chat",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    settings = Household.get(hass).settings
    assert settings[CONF_MAX_TOKENS] == 64
    assert "prefer_local_intents" not in settings  # Home Assistant's pipeline has it
    assert settings[CONF_CHAT_MODEL] == "tiny-chat"
    assert settings["prompt"] is None
    assert await hass.config_entries.async_unload(entry.entry_id)


async def open_worker_options(hass: HomeAssistant, entry_id: str) -> ConfigFlowResult:
    """The options menu's "This worker" form."""
    result = await hass.config_entries.options.async_init(entry_id)
    assert result["type"] is FlowResultType.MENU
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": "worker"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "worker"
    return result


async def test_options_worker_routing_flags(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    """ "Only when idle" and "not on battery" are the entry's own options, read by routing."""
    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    handle = Household.get(hass).workers[entry.entry_id]
    assert handle.state().only_when_idle is False
    assert handle.state().not_on_battery is False
    assert handle.state().memory_free_mb is not None

    result = await open_worker_options(hass, entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_ONLY_WHEN_IDLE: True, CONF_NOT_ON_BATTERY: True}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {CONF_ONLY_WHEN_IDLE: True, CONF_NOT_ON_BATTERY: True}
    assert CONF_ONLY_WHEN_IDLE not in Household.get(hass).settings
    state = handle.state()
    assert state.only_when_idle is True
    assert state.not_on_battery is True

    # The form shows them as set; clearing one keeps the other.
    result = await open_worker_options(hass, entry.entry_id)
    schema = result["data_schema"].schema
    suggested = {
        str(key): key.description.get("suggested_value") for key in schema if key.description
    }
    assert suggested[CONF_ONLY_WHEN_IDLE] is True
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_NOT_ON_BATTERY: True}
    )
    assert entry.options == {CONF_ONLY_WHEN_IDLE: False, CONF_NOT_ON_BATTERY: True}
    assert handle.state().only_when_idle is False
    assert await hass.config_entries.async_unload(entry.entry_id)


# --- transport: address policy, plain HTTP, pinned certificates -------------------


async def test_manual_refuses_address_outside_home(hass: HomeAssistant) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "203.0.113.9", CONF_PORT: 8765}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "address_not_allowed"}


async def test_manual_allow_public_is_stored(
    hass: HomeAssistant, fresh_worker: WorkerProcess
) -> None:
    flow_id = await start_manual(hass, fresh_worker.port, allow_public_address=True)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_CODE: pairing_code(fresh_worker)}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_ALLOW_PUBLIC] is True


async def test_manual_plain_http_only_when_chosen(
    hass: HomeAssistant, tiny_chat_model: Path, tmp_path: Path
) -> None:
    worker = start_worker(
        [tiny_chat_model], tmp_path, token=False, plain_http=True, extra=["--no-warmup"]
    )
    try:
        # Not chosen: the plain-HTTP worker is unreachable over HTTPS, never used in clear.
        result = await hass.config_entries.flow.async_init(
            DOMAIN, context={"source": config_entries.SOURCE_USER}
        )
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: worker.port}
        )
        assert result["errors"] == {"base": "cannot_connect"}
        flow_id = await start_manual(hass, worker.port, plain_http=True)
        result = await hass.config_entries.flow.async_configure(
            flow_id, {CONF_CODE: pairing_code(worker)}
        )
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert result["data"][CONF_PLAIN_HTTP] is True
        assert result["data"][CONF_FINGERPRINT] is None
        await hass.async_block_till_done()
        assert result["result"].state is config_entries.ConfigEntryState.LOADED
        assert await hass.config_entries.async_unload(result["result"].entry_id)
    finally:
        worker.stop()


async def test_zeroconf_plain_http_is_not_offered(
    hass: HomeAssistant, fresh_worker: WorkerProcess
) -> None:
    info = zeroconf_info(fresh_worker, node_id_of(fresh_worker))
    info.properties["scheme"] = "http"
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_ZEROCONF}, data=info
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "plain_http_discovered"


async def test_zeroconf_address_outside_home(
    hass: HomeAssistant, fresh_worker: WorkerProcess
) -> None:
    info = zeroconf_info(fresh_worker, node_id_of(fresh_worker))
    info.ip_address = ip_address("203.0.113.9")
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_ZEROCONF}, data=info
    )
    assert result["step_id"] == "pair"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_CODE: "ABCD-1234"}
    )
    assert result["errors"] == {"base": "address_not_allowed"}


async def test_reconfigure_checks_certificate_and_address(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data={**entry.data, CONF_FINGERPRINT: "00" * 32})
    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: chat_worker.port}
    )
    assert result["errors"] == {"base": "certificate_mismatch"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "203.0.113.9", CONF_PORT: chat_worker.port}
    )
    assert result["errors"] == {"base": "address_not_allowed"}
