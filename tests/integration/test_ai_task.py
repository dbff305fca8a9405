"""The household's AI Task entity: only where Home Assistant has ai_task (the 2026.2.3 leg)."""

from __future__ import annotations

import pytest
import voluptuous as vol
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from worker_process import WorkerProcess

from custom_components.hearth import PLATFORMS

from .conftest import entry_for, setup_entry

ai_task = pytest.importorskip("homeassistant.components.ai_task")


def test_platform_offered_where_ai_task_exists() -> None:
    assert "ai_task" in PLATFORMS


async def test_generate_data(hass: HomeAssistant, taught_worker: WorkerProcess) -> None:
    await setup_entry(hass, entry_for(taught_worker))
    assert hass.states.get("ai_task.hearth") is not None
    result = await ai_task.async_generate_data(
        hass, task_name="greeting", entity_id="ai_task.hearth", instructions="hello"
    )
    assert result.data == "Hello from Hearth!"


async def test_structured_answer_that_is_not_json(
    hass: HomeAssistant, taught_worker: WorkerProcess
) -> None:
    await setup_entry(hass, entry_for(taught_worker))
    with pytest.raises(HomeAssistantError) as err:
        await ai_task.async_generate_data(
            hass,
            task_name="greeting",
            entity_id="ai_task.hearth",
            instructions="hello",
            structure=vol.Schema({vol.Required("greeting"): str}),
        )
    assert err.value.translation_key == "bad_structure"
