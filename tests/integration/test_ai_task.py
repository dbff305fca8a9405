"""The household's AI Task entity: only where Home Assistant has ai_task (the 2026.2.3 leg)."""

from __future__ import annotations

from pathlib import Path

import pytest
import voluptuous as vol
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from worker_process import WorkerProcess, start_worker

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


async def test_structured_answer_holds_to_the_schema(
    hass: HomeAssistant, taught_worker: WorkerProcess
) -> None:
    """The worker decodes under the task's schema (response_format): the answer parses,
    though the taught model never saw JSON (a yes/no schema, so that its answer ends)."""
    await setup_entry(hass, entry_for(taught_worker))
    result = await ai_task.async_generate_data(
        hass,
        task_name="light",
        entity_id="ai_task.hearth",
        instructions="hello",
        structure=vol.Schema({vol.Required("on"): bool}),
    )
    assert isinstance(result.data, dict), result.data
    assert set(result.data) == {"on"}
    assert isinstance(result.data["on"], bool)


async def test_structured_answer_that_is_not_json(
    hass: HomeAssistant, taught_chat_model: Path, tmp_path: Path
) -> None:
    """A worker without guidance answers in words: a translated error, not a crash."""
    worker = start_worker(
        [taught_chat_model], tmp_path / "worker", env={"HEARTH_WORKER_GUIDANCE": "off"}
    )
    try:
        await setup_entry(hass, entry_for(worker))
        with pytest.raises(HomeAssistantError) as err:
            await ai_task.async_generate_data(
                hass,
                task_name="greeting",
                entity_id="ai_task.hearth",
                instructions="hello",
                structure=vol.Schema({vol.Required("greeting"): str}),
            )
        assert err.value.translation_key == "bad_structure"
    finally:
        worker.stop()
