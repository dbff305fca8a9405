"""What the flows show a person, against the fake worker (the fast tier): the add-on's
discovery card and device link the add-on's page; an abort for a different worker says
which worker was expected and which answered; the household form neither shows nor
keeps an LLM API that Home Assistant no longer has."""

from __future__ import annotations

from typing import Any

import pytest
from fake_worker import FakeWorker
from homeassistant import config_entries
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import llm
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.hearth.client import HearthClient
from custom_components.hearth.config_flow import filter_invalid_llm_apis
from custom_components.hearth.const import CONF_ADDON, CONF_CODE, CONF_LLM_HASS_API, DOMAIN
from custom_components.hearth.household import Household
from custom_components.hearth.worker_api import HearthConnectionError

from .conftest import setup_entry, suggested

SLUG = "a1b2c3d4_hearth"
ADDON_PAGE = f"homeassistant://hassio/addon/{SLUG}/info"


def addon_discovery(fake: FakeWorker, node_id: str | None = None) -> HassioServiceInfo:
    """What the Supervisor hands over when the add-on announces its worker."""
    return HassioServiceInfo(
        config={
            "host": fake.host,
            "port": fake.port,
            "token": fake.token,
            "node_id": node_id or fake.node_id,
            "scheme": "https",
            "fingerprint": fake.fingerprint,
        },
        name="Hearth",
        slug=SLUG,
        uuid="0123456789abcdef",
    )


def assert_wrong_worker(result: Any, fake: FakeWorker, name: str, expected_id: str) -> None:
    """The flow aborted: `fake` answered where the worker `name` (`expected_id`) was expected."""
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_worker"
    assert result["description_placeholders"] == {
        "name": name,
        "expected_id": expected_id,
        "answered": fake.name,
        "answered_id": fake.node_id,
        "url": fake.url,
    }


async def test_addon_card_and_device_link_the_addon(hass: HomeAssistant, fake: FakeWorker) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=addon_discovery(fake),
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "hassio_confirm"
    # The discovery card's link (the frontend reads the flow's context).
    (progress,) = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert progress["context"]["configuration_url"] == ADDON_PAGE

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_ADDON] == SLUG
    await hass.async_block_till_done()
    device = dr.async_get(hass).async_get_device(identifiers={(DOMAIN, fake.node_id)})
    assert device is not None
    assert device.configuration_url == ADDON_PAGE
    # The add-on runs on the Home Assistant host: speech goes there only when no other
    # worker can take it (router.rank_speech).
    worker = Household.get(hass).workers[result["result"].entry_id]
    assert worker.speech_state().on_home_assistant_host
    assert "home_assistant_host" in worker.speech_state().flagged()
    assert await hass.config_entries.async_unload(result["result"].entry_id)


async def test_addon_rediscovery_links_an_older_entry(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    """An add-on entry made before entries kept the slug gets it at the next discovery."""
    entry = MockConfigEntry(domain=DOMAIN, unique_id=fake.node_id, data=fake.entry_data())
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=addon_discovery(fake),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_ADDON] == SLUG
    await hass.async_block_till_done()
    await hass.config_entries.async_unload(entry.entry_id)


async def test_addon_announcing_another_worker_says_which(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    """The add-on announced one node; another answers at its address: nothing is set up."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": config_entries.SOURCE_HASSIO},
        data=addon_discovery(fake, node_id="announced-node"),
    )
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert_wrong_worker(result, fake, "Hearth", "announced-node")
    assert not hass.config_entries.async_entries(DOMAIN)


def kitchen_entry(fake: FakeWorker) -> MockConfigEntry:
    """An entry for another worker ("Kitchen"), pointed at the fake's address."""
    return MockConfigEntry(
        domain=DOMAIN,
        title="Kitchen",
        unique_id="kitchen-node",
        data={**fake.entry_data(), "node_id": "kitchen-node"},
    )


async def test_reauth_reaching_another_worker_says_which(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    entry = kitchen_entry(fake)
    entry.add_to_hass(hass)
    result = await entry.start_reauth_flow(hass)
    assert result["step_id"] == "reauth_confirm"
    tokens = set(fake.tokens)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_CODE: fake.show_pairing_code()}
    )
    assert_wrong_worker(result, fake, "Kitchen", "kitchen-node")
    # Nothing was kept: the token the other worker issued is given back, the entry unchanged.
    assert fake.tokens == tokens
    assert entry.data[CONF_TOKEN] == fake.token
    assert entry.unique_id == "kitchen-node"


async def test_reauth_reaching_another_worker_aborts_even_if_giving_back_fails(
    hass: HomeAssistant, fake: FakeWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other worker's token cannot be given back (it went away meanwhile): the flow
    still aborts with wrong_worker and the entry stays as it was."""

    async def unreachable(self: HearthClient) -> None:
        raise HearthConnectionError("gone")

    monkeypatch.setattr(HearthClient, "revoke_token", unreachable)
    entry = kitchen_entry(fake)
    entry.add_to_hass(hass)
    result = await entry.start_reauth_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_CODE: fake.show_pairing_code()}
    )
    assert_wrong_worker(result, fake, "Kitchen", "kitchen-node")
    assert entry.data[CONF_TOKEN] == fake.token


async def test_reconfigure_reaching_another_worker_says_which(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    entry = kitchen_entry(fake)
    entry.add_to_hass(hass)
    hass.config_entries.async_update_entry(entry, data={**entry.data, CONF_PORT: 1})
    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: fake.host, CONF_PORT: fake.port}
    )
    assert_wrong_worker(result, fake, "Kitchen", "kitchen-node")
    assert entry.data[CONF_PORT] == 1


class GoneAPI(llm.API):
    """An LLM API whose integration is removed during the test."""

    async def async_get_api_instance(self, llm_context: llm.LLMContext) -> llm.APIInstance:
        raise NotImplementedError


async def test_household_form_drops_llm_apis_that_are_gone(
    hass: HomeAssistant, fake: FakeWorker
) -> None:
    unregister = llm.async_register_api(hass, GoneAPI(hass=hass, id="gone_api", name="Gone"))
    entry = MockConfigEntry(
        domain=DOMAIN, title=fake.name, unique_id=fake.node_id, data=fake.entry_data()
    )
    await setup_entry(hass, entry)
    household = Household.get(hass)
    await household.async_update_settings(
        {**household.settings, CONF_LLM_HASS_API: [llm.LLM_API_ASSIST, "gone_api"]}
    )
    assert filter_invalid_llm_apis(hass, ["gone_api", llm.LLM_API_ASSIST]) == [
        "gone_api",
        llm.LLM_API_ASSIST,
    ]
    unregister()  # its integration was removed
    assert filter_invalid_llm_apis(hass, ["gone_api", llm.LLM_API_ASSIST]) == [llm.LLM_API_ASSIST]
    assert filter_invalid_llm_apis(hass, None) == []
    # One id as a string, as older settings may hold it.
    assert filter_invalid_llm_apis(hass, llm.LLM_API_ASSIST) == [llm.LLM_API_ASSIST]
    assert filter_invalid_llm_apis(hass, "gone_api") == []

    menu = await hass.config_entries.options.async_init(entry.entry_id)
    form = await hass.config_entries.options.async_configure(
        menu["flow_id"], {"next_step_id": "household"}
    )
    assert form["step_id"] == "household"
    shown = suggested(dict(form))
    assert shown[CONF_LLM_HASS_API] == [llm.LLM_API_ASSIST]  # not offered back
    options = form["data_schema"].schema[CONF_LLM_HASS_API].config["options"]
    assert [option["value"] for option in options] == [llm.LLM_API_ASSIST]
    # Saved as the form shows it (what the frontend sends back): the gone id is not kept.
    result = await hass.config_entries.options.async_configure(
        form["flow_id"], {k: v for k, v in shown.items() if v is not None}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert household.settings[CONF_LLM_HASS_API] == [llm.LLM_API_ASSIST]
    assert await hass.config_entries.async_unload(entry.entry_id)
