"""Set-up, unload, sensors, availability, repairs, diagnostics, the household's primary entry."""

from __future__ import annotations

from datetime import timedelta

from freezegun.api import FrozenDateTimeFactory
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_TOKEN, STATE_OFF, STATE_ON, STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import async_fire_time_changed
from worker_process import WorkerProcess, free_port

from custom_components.hearth.const import DOMAIN
from custom_components.hearth.diagnostics import async_get_config_entry_diagnostics
from custom_components.hearth.household import Household

from .conftest import entry_for, restart, setup_entry, worker_info

SENSOR_KEYS = ["running", "queued", "decode_rate", "loaded_models", "memory_free"]


def entity_ids(hass: HomeAssistant, worker: WorkerProcess) -> tuple[str, dict[str, str]]:
    """(online binary sensor, {key: sensor}) of a worker's device."""
    registry = er.async_get(hass)
    node_id = worker_info(worker)["node_id"]
    online = registry.async_get_entity_id("binary_sensor", DOMAIN, f"{node_id}_online")
    assert online is not None
    sensors = {}
    for key in SENSOR_KEYS:
        entity_id = registry.async_get_entity_id("sensor", DOMAIN, f"{node_id}_{key}")
        assert entity_id is not None, key
        sensors[key] = entity_id
    return online, sensors


async def poll(hass: HomeAssistant, freezer: FrozenDateTimeFactory, seconds: float) -> None:
    freezer.tick(timedelta(seconds=seconds))
    async_fire_time_changed(hass)
    await hass.async_block_till_done(wait_background_tasks=True)


async def test_setup_unload_and_sensors(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:
    entry = entry_for(chat_worker)
    await setup_entry(hass, entry)
    assert entry.state is ConfigEntryState.LOADED
    online, sensors = entity_ids(hass, chat_worker)
    assert hass.states.get(online).state == STATE_ON
    assert hass.states.get(sensors["running"]).state == "0"
    assert hass.states.get(sensors["queued"]).state == "0"
    models = hass.states.get(sensors["loaded_models"])
    assert models.state == "1"
    assert models.attributes["models"] == ["tiny-chat"]
    assert float(hass.states.get(sensors["memory_free"]).state) > 0
    # One Hearth agent for the household.
    assert hass.states.get("conversation.hearth") is not None

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    assert DOMAIN in hass.data
    assert not Household.get(hass).workers


async def test_not_ready_when_unreachable(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:
    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data={**entry.data, "port": free_port()})
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY


async def test_token_rejected_starts_reauth(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    entry = entry_for(chat_worker)
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data={**entry.data, CONF_TOKEN: "revoked"})
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert flows[0]["context"]["source"] == "reauth"


async def test_worker_goes_and_comes_back(
    hass: HomeAssistant,
    own_worker: WorkerProcess,
    freezer: FrozenDateTimeFactory,
    caplog: object,
) -> None:
    entry = entry_for(own_worker)
    await setup_entry(hass, entry)
    online, sensors = entity_ids(hass, own_worker)
    assert hass.states.get(online).state == STATE_ON

    own_worker.stop()
    await poll(hass, freezer, 11)
    assert hass.states.get(online).state == STATE_OFF
    for entity_id in sensors.values():
        assert hass.states.get(entity_id).state == STATE_UNAVAILABLE
    coordinator = entry.runtime_data.coordinator
    assert coordinator.update_interval == timedelta(seconds=20)  # backing off

    # Gone for more than five minutes: a repair issue.
    issues = ir.async_get(hass)
    for _ in range(7):
        await poll(hass, freezer, 60)
    assert issues.async_get_issue(DOMAIN, f"unreachable_{entry.entry_id}") is not None
    assert coordinator.update_interval == timedelta(seconds=60)

    restart(own_worker)
    await poll(hass, freezer, 61)
    assert hass.states.get(online).state == STATE_ON
    for entity_id in sensors.values():
        assert hass.states.get(entity_id).state != STATE_UNAVAILABLE
    assert issues.async_get_issue(DOMAIN, f"unreachable_{entry.entry_id}") is None
    assert coordinator.update_interval == timedelta(seconds=10)
    text = str(getattr(caplog, "text", ""))
    assert text.count("Error fetching Hearth worker") == 1
    assert text.count("Fetching Hearth worker") == 1  # "... data recovered"


async def test_revoked_token_while_running(
    hass: HomeAssistant, own_worker: WorkerProcess, freezer: FrozenDateTimeFactory
) -> None:
    entry = entry_for(own_worker)
    await setup_entry(hass, entry)
    # Revoke every token on the worker, as `hearth-worker tokens revoke` would.
    (own_worker.state_dir / "tokens.json").write_text('{"format_version": 1, "tokens": []}')
    await poll(hass, freezer, 11)
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"token_rejected_{entry.entry_id}")
    assert issue is not None
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert flows and flows[0]["context"]["source"] == "reauth"


async def test_diagnostics_redact_token(hass: HomeAssistant, chat_worker: WorkerProcess) -> None:
    entry = entry_for(chat_worker)
    await setup_entry(hass, entry)
    diagnostics = await async_get_config_entry_diagnostics(hass, entry)
    assert diagnostics["entry"][CONF_TOKEN] == "**REDACTED**"
    assert chat_worker.token not in str(diagnostics)
    assert diagnostics["online"] is True
    assert diagnostics["info"]["models"][0]["id"] == "tiny-chat"
    assert diagnostics["household"]["primary"] is True


async def test_second_entry_takes_over_the_agent(
    hass: HomeAssistant, chat_worker: WorkerProcess, own_worker: WorkerProcess
) -> None:
    first = entry_for(chat_worker, "First")
    second = entry_for(own_worker, "Second")
    await setup_entry(hass, first)
    await setup_entry(hass, second)
    household = Household.get(hass)
    assert household.primary_entry_id == first.entry_id
    assert len(household.workers) == 2
    registry = er.async_get(hass)
    agent = registry.async_get("conversation.hearth")
    assert agent is not None
    assert agent.config_entry_id == first.entry_id

    assert await hass.config_entries.async_unload(first.entry_id)
    await hass.async_block_till_done()
    assert household.primary_entry_id == second.entry_id
    assert hass.states.get("conversation.hearth").state != STATE_UNAVAILABLE
    assert registry.async_get("conversation.hearth").config_entry_id == second.entry_id
