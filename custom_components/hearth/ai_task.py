"""The household's AI Task entity (Home Assistant 2025.8 and later only).

Home Assistant's `ai_task` component does not exist in older versions, so this
platform is only forwarded where it does (see PLATFORMS in __init__.py), and only
the type check against Home Assistant 2026.2.3 reads this file (scripts/test).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from homeassistant.components import ai_task, conversation
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from .assistant import json_object_from_model
from .const import AI_TASK_UNIQUE_ID, DOMAIN
from .entity import HearthBaseLLMEntity, async_add_household_entity

if TYPE_CHECKING:
    from . import HearthConfigEntry

PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    """The household's primary entry holds the entity; another takes it over later."""
    async_add_household_entity(hass, entry, async_add_entities, HearthTaskEntity)


class HearthTaskEntity(ai_task.AITaskEntity, HearthBaseLLMEntity):
    """Generates data for automations with whichever worker the router picks."""

    _attr_unique_id = AI_TASK_UNIQUE_ID
    _attr_supported_features = ai_task.AITaskEntityFeature.GENERATE_DATA

    async def _async_generate_data(
        self, task: ai_task.GenDataTask, chat_log: conversation.ChatLog
    ) -> ai_task.GenDataTaskResult:
        await self._async_handle_chat_log(chat_log, purpose="task", structure=task.structure)
        last = chat_log.content[-1]
        text = (last.content if isinstance(last, conversation.AssistantContent) else None) or ""
        if not task.structure:
            return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=text)
        data = json_object_from_model(text)
        if data is None:
            raise HomeAssistantError(translation_domain=DOMAIN, translation_key="bad_structure")
        return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=data)
