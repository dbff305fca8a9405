"""The household's AI Task entity (Home Assistant 2025.8 and later only).

Home Assistant's `ai_task` component does not exist in older versions, so this
platform is only forwarded where it does (see PLATFORMS in __init__.py), and the
component is imported dynamically to keep type checking clean on both.
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any

from homeassistant.components import conversation
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddEntitiesCallback
from voluptuous_openapi import convert  # type: ignore[import-untyped,unused-ignore]

from .assistant import HOUSEHOLD_DEVICE, async_run_chat_log, parse_json_object
from .cluster import Cluster
from .const import AI_TASK_UNIQUE_ID, DOMAIN

if TYPE_CHECKING:
    from . import HearthConfigEntry

ai_task: Any = importlib.import_module("homeassistant.components.ai_task")

PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    """The household's primary entry holds the entity; another takes it over later."""
    cluster = Cluster.get(hass)
    cluster.add_household_entities(
        entry.entry_id, lambda: async_add_entities([HearthTaskEntity(cluster)])
    )


class HearthTaskEntity(ai_task.AITaskEntity):  # type: ignore[misc]
    """Generates data for automations with whichever worker the router picks."""

    _attr_has_entity_name = True
    _attr_name = None
    _attr_unique_id = AI_TASK_UNIQUE_ID
    _attr_device_info = HOUSEHOLD_DEVICE
    _attr_supported_features = ai_task.AITaskEntityFeature.GENERATE_DATA

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def _async_generate_data(self, task: Any, chat_log: conversation.ChatLog) -> Any:
        extra = None
        response_format = None
        if task.structure:
            schema = _closed(convert(task.structure))
            extra = (
                f"Answer with one JSON object only, matching this JSON schema: {json.dumps(schema)}"
            )
            # Workers with guidance decode under this schema: the answer always parses.
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "task", "schema": schema},
            }
        await async_run_chat_log(
            self.hass,
            self.cluster,
            chat_log,
            self.entity_id,
            extra_instructions=extra,
            kind="task",
            response_format=response_format,
        )
        last = chat_log.content[-1]
        text = (last.content if isinstance(last, conversation.AssistantContent) else None) or ""
        if not task.structure:
            return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=text)
        data = parse_json_object(text)
        if data is None:
            raise HomeAssistantError(translation_domain=DOMAIN, translation_key="bad_structure")
        return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=data)


def _closed(schema: Any) -> Any:
    """The JSON schema of a voluptuous structure, with its objects closed to keys it does
    not name (voluptuous refuses extra keys by default; JSON schema allows them)."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if closed.get("type") == "object" and "properties" in closed:
        closed.setdefault("additionalProperties", False)
    return closed
