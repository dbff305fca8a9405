"""The options flow is a menu: the household's assistant, this worker, adding and
removing models. Each form changes only what it says (real workers on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hearth_worker.manifest import MANIFEST_NAME
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_PORT
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from pytest_homeassistant_custom_component.common import MockConfigEntry
from worker_process import WorkerProcess, free_port, start_worker

from custom_components.hearth.config_flow import catalog_choices, catalog_label, valid_source
from custom_components.hearth.const import (
    CONF_CHAT_MODEL,
    CONF_EMBEDDING_MODEL,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_NOT_ON_BATTERY,
    CONF_ONLY_WHEN_IDLE,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    DOMAIN,
)
from custom_components.hearth.household import Household
from custom_components.hearth.preferences import DATA_PREFERENCES
from custom_components.hearth.worker_api import parse_catalog

from .conftest import entry_for, setup_entry, suggested

MENU = ["household", "worker", "add_model", "remove_model"]


async def open_menu(hass: HomeAssistant, entry_id: str) -> dict[str, Any]:
    result = await hass.config_entries.options.async_init(entry_id)
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "init"
    return dict(result)


async def open_step(hass: HomeAssistant, entry_id: str, step: str) -> dict[str, Any]:
    menu = await open_menu(hass, entry_id)
    result = await hass.config_entries.options.async_configure(
        menu["flow_id"], {"next_step_id": step}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == step
    return dict(result)


def fields(result: dict[str, Any]) -> set[str]:
    return {str(key) for key in result["data_schema"].schema}


async def test_menu_names_the_worker_and_offers_every_part(
    hass: HomeAssistant, chat_worker: WorkerProcess
) -> None:
    entry = entry_for(chat_worker, "Kitchen laptop")
    await setup_entry(hass, entry)
    menu = await open_menu(hass, entry.entry_id)
    assert list(menu["menu_options"]) == MENU
    assert menu["description_placeholders"] == {"name": "Kitchen laptop"}
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_menu_of_an_unreachable_worker_has_no_model_steps(hass: HomeAssistant) -> None:
    """Adding and removing models talk to the worker: not offered while it is not loaded;
    its own settings and the household's still are."""
    entry = entry_for_port(free_port())
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_RETRY
    menu = await open_menu(hass, entry.entry_id)
    assert list(menu["menu_options"]) == ["household", "worker"]
    result = await hass.config_entries.options.async_configure(
        menu["flow_id"], {"next_step_id": "worker"}
    )
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_NOT_ON_BATTERY: True}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {CONF_ONLY_WHEN_IDLE: False, CONF_NOT_ON_BATTERY: True}
    await hass.config_entries.async_unload(entry.entry_id)


def entry_for_port(port: int) -> MockConfigEntry:
    return MockConfigEntry(
        domain=DOMAIN,
        title="Gone",
        unique_id="gone-node",
        data={
            "host": "127.0.0.1",
            CONF_PORT: port,
            "token": "t",
            "node_id": "gone-node",
            "fingerprint": "00" * 32,
            "plain_http": False,
        },
    )


async def test_household_step_leaves_the_workers_own_settings(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """The household form changes the shared settings and no worker's options; settings
    it does not show (kept by the household) stay; emptied fields are cleared."""
    alpha = entry_for(workers["Alpha"], "Alpha")
    beta = entry_for(workers["Beta"], "Beta")
    for entry in (alpha, beta):
        await setup_entry(hass, entry)
    hass.config_entries.async_update_entry(alpha, options={CONF_ONLY_WHEN_IDLE: True})
    hass.config_entries.async_update_entry(beta, options={CONF_NOT_ON_BATTERY: True})
    household = Household.get(hass)
    await household.async_update_settings(
        {**household.settings, CONF_PROMPT: "Be brief.", "kept_elsewhere": 7}
    )

    form = await open_step(hass, alpha.entry_id, "household")
    assert fields(form) == {
        CONF_PROMPT,
        CONF_LLM_HASS_API,
        CONF_MAX_TOKENS,
        CONF_TEMPERATURE,
        CONF_CHAT_MODEL,
        CONF_EMBEDDING_MODEL,
    }
    assert suggested(form)[CONF_PROMPT] == "Be brief."
    result = await hass.config_entries.options.async_configure(
        form["flow_id"],
        {
            CONF_LLM_HASS_API: ["assist"],
            CONF_MAX_TOKENS: 64,
            CONF_TEMPERATURE: 0.5,
            CONF_CHAT_MODEL: "tiny-chat",
            CONF_EMBEDDING_MODEL: "tiny-embed",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    settings = household.settings
    assert settings[CONF_MAX_TOKENS] == 64
    assert "prefer_local_intents" not in settings  # Home Assistant's pipeline has it
    assert settings[CONF_CHAT_MODEL] == "tiny-chat"
    assert settings[CONF_EMBEDDING_MODEL] == "tiny-embed"
    assert settings[CONF_PROMPT] is None  # left empty: cleared
    assert settings["kept_elsewhere"] == 7
    assert CONF_ONLY_WHEN_IDLE not in settings
    assert alpha.options == {CONF_ONLY_WHEN_IDLE: True}
    assert beta.options == {CONF_NOT_ON_BATTERY: True}
    # Saved: a restart reads the same settings.
    assert (await household.store.async_load())[CONF_EMBEDDING_MODEL] == "tiny-embed"

    # Opened from the other worker, the household form shows the same settings.
    form = await open_step(hass, beta.entry_id, "household")
    shown = suggested(form)
    assert (shown[CONF_MAX_TOKENS], shown[CONF_EMBEDDING_MODEL]) == (64, "tiny-embed")
    for entry in (alpha, beta):
        assert await hass.config_entries.async_unload(entry.entry_id)


async def test_worker_step_changes_this_worker_only(
    hass: HomeAssistant, workers: dict[str, WorkerProcess]
) -> None:
    """The worker form sets this entry's routing flags: not another worker's, not the
    household's settings (before the menu, one form set both)."""
    alpha = entry_for(workers["Alpha"], "Alpha")
    beta = entry_for(workers["Beta"], "Beta")
    for entry in (alpha, beta):
        await setup_entry(hass, entry)
    household = Household.get(hass)
    await household.async_update_settings(
        {**household.settings, CONF_MAX_TOKENS: 99, CONF_CHAT_MODEL: "tiny-chat"}
    )
    before = dict(household.settings)

    form = await open_step(hass, alpha.entry_id, "worker")
    assert fields(form) == {CONF_ONLY_WHEN_IDLE, CONF_NOT_ON_BATTERY}
    assert form["description_placeholders"] == {"name": "Alpha"}
    result = await hass.config_entries.options.async_configure(
        form["flow_id"], {CONF_ONLY_WHEN_IDLE: True}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert alpha.options == {CONF_ONLY_WHEN_IDLE: True, CONF_NOT_ON_BATTERY: False}
    assert beta.options == {}
    assert household.settings == before
    assert household.workers[alpha.entry_id].state().only_when_idle is True
    assert household.workers[beta.entry_id].state().only_when_idle is False

    # Shown as set next time.
    form = await open_step(hass, alpha.entry_id, "worker")
    assert suggested(form) == {CONF_ONLY_WHEN_IDLE: True, CONF_NOT_ON_BATTERY: False}
    for entry in (alpha, beta):
        assert await hass.config_entries.async_unload(entry.entry_id)


def test_hub_ids() -> None:
    good = [
        "microsoft/Phi-4-mini-instruct-onnx",
        "microsoft/Phi-4-mini-instruct-onnx:cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
        "onnx-community/all-MiniLM-L6-v2:onnx",
        "acme/Tiny-chat-onnx:cpu_and_mobile/cpu-fp32-rtn/",
        "a/b",
    ]
    bad = [
        "",
        "phi-4",
        "owner/",
        "/name",
        "owner/name/extra",
        "owner/na me",
        "-owner/name",
        "owner/name-",
        "owner/na..me",
        "owner/na--me",
        "owner/name:",
        "owner/name:../up",
        "owner/name:a//b",
        "owner/name:a\\b",
        "owner/name:a:b",
        "https://huggingface.co/owner/name",
    ]
    assert [s for s in good if not valid_source(s)] == []
    assert [s for s in bad if valid_source(s)] == []


def test_catalog_choices_fit_and_recommended_first() -> None:
    def row(name: str, **kw: Any) -> dict[str, Any]:
        return {
            "id": name.lower(),
            "name": name,
            "source": f"acme/{name}:cpu",
            "kind": "chat",
            "disk_bytes": 10**9,
            "tool_calling": False,
            "fits": True,
            "recommended": False,
            "installed": False,
            **kw,
        }

    catalog = parse_catalog(
        {
            "data": [
                row("Big", disk_bytes=3 * 10**9),
                row("Small", disk_bytes=600 * 10**6, tool_calling=True),
                row("Embed", kind="embedding", disk_bytes=90 * 10**6),
                row("Best", recommended=True, tool_calling=True, disk_bytes=2_345_000_000),
                row("Huge", fits=False),
                row("Have", installed=True),
            ]
        }
    )
    choices = catalog_choices(catalog)
    assert [e.name for e in choices] == ["Best", "Small", "Big", "Embed"]
    assert [catalog_label(e) for e in choices] == [
        "Best (2.3 GB) 🛠 ★",
        "Small (600 MB) 🛠",
        "Big (3.0 GB)",
        "Embed (90 MB) 🔎",
    ]


async def test_household_embedding_model_is_the_one_used(
    hass: HomeAssistant, embedding_model: Path, tmp_path: Path
) -> None:
    """The household's "Embedding model" decides which model ranks preferences (the
    first one found while none is chosen)."""
    second = tmp_path / "second-embed"
    second.mkdir()
    for path in embedding_model.iterdir():
        if path.name != MANIFEST_NAME:
            (second / path.name).symlink_to(path)
    manifest = json.loads((embedding_model / MANIFEST_NAME).read_text(encoding="utf-8"))
    (second / MANIFEST_NAME).write_text(json.dumps({**manifest, "name": "second-embed"}))
    worker = start_worker([embedding_model, second], tmp_path / "worker")
    try:
        entry = entry_for(worker)
        await setup_entry(hass, entry)
        served = [m.id for m in Household.get(hass).workers[entry.entry_id].coordinator.info.models]
        assert served == [manifest["name"], "second-embed"]
        client = Household.get(hass).workers[entry.entry_id].client
        asked: list[str] = []
        real = client.embeddings

        async def recording(model: str, inputs: list[str]) -> list[list[float]]:
            asked.append(model)
            return await real(model, inputs)

        client.embeddings = recording
        prefs = hass.data[DATA_PREFERENCES]
        items = [{"category": "diet", "value": "vegetarian"}]
        assert await prefs.async_similarities("What is for dinner?", items) is not None
        assert asked == [manifest["name"]]

        form = await open_step(hass, entry.entry_id, "household")
        options = form["data_schema"].schema[CONF_EMBEDDING_MODEL].config["options"]
        assert options == sorted([manifest["name"], "second-embed"])
        result = await hass.config_entries.options.async_configure(
            form["flow_id"],
            {
                CONF_MAX_TOKENS: 64,
                CONF_TEMPERATURE: 0.0,
                CONF_EMBEDDING_MODEL: "second-embed",
            },
        )
        assert result["type"] is FlowResultType.CREATE_ENTRY
        asked.clear()
        assert await prefs.async_similarities("What is for lunch?", items) is not None
        assert asked == ["second-embed"]
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await worker.astop()
