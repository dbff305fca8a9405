"""Base entities: one device per worker; the household's LLM entities (conversation, ai_task)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import voluptuous as vol
from homeassistant.components import conversation
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import Entity
from homeassistant.helpers.entity_platform import AddEntitiesCallback
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .assistant import async_run_chat_log, json_schema
from .const import DOMAIN, HOUSEHOLD_DEVICE_ID
from .coordinator import HearthCoordinator
from .household import Household
from .router import offered_languages

if TYPE_CHECKING:
    from . import HearthConfigEntry

HOUSEHOLD_DEVICE = DeviceInfo(
    identifiers={(DOMAIN, HOUSEHOLD_DEVICE_ID)},
    name="Hearth",
    manufacturer="Hearth",
    model="Household assistant",
    entry_type=DeviceEntryType.SERVICE,
)


class HearthWorkerEntity(CoordinatorEntity[HearthCoordinator]):
    """An entity of one worker's device."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: HearthCoordinator, key: str) -> None:
        super().__init__(coordinator)
        info = coordinator.info
        self._attr_unique_id = f"{info.node_id}_{key}"
        self._attr_translation_key = key
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, info.node_id)},
            name=info.name,
            manufacturer="Hearth",
            model="Hearth worker",
            sw_version=info.version,
            configuration_url=coordinator.configuration_url,
        )


@callback
def async_add_household_entity(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
    entity_class: Callable[[Household], Entity],
) -> None:
    """The household's primary entry holds the entity; another takes it over later."""
    household = Household.get(hass)
    household.add_household_entities(
        entry.entry_id, lambda: async_add_entities([entity_class(household)])
    )


class HearthBaseLLMEntity(Entity):
    """An entity of the household's device answered by whichever worker the router picks."""

    _attr_has_entity_name = True
    _attr_name = None
    _attr_device_info = HOUSEHOLD_DEVICE

    def __init__(self, household: Household) -> None:
        self.household = household

    async def _async_handle_chat_log(
        self,
        chat_log: conversation.ChatLog,
        *,
        purpose: str,
        language: str | None = None,
        structure: vol.Schema | None = None,
    ) -> None:
        """Let the household's workers answer the chat log (see async_run_chat_log).

        `language`: a person reads the answer as it streams. `structure`: the answer
        is one JSON object of that shape; workers with guidance decode under its
        schema, so it always parses.
        """
        extra: str | None = None
        response_format: dict[str, Any] | None = None
        if structure is not None:
            schema = _closed(json_schema(structure))
            extra = (
                f"Answer with one JSON object only, matching this JSON schema: {json.dumps(schema)}"
            )
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "task", "schema": schema},
            }
        await async_run_chat_log(
            self.hass,
            self.household,
            chat_log,
            self.entity_id,
            extra_instructions=extra,
            language=language,
            purpose=purpose,
            response_format=response_format,
        )


class HearthSpeechEntity(Entity):
    """A speech entity of the household's device (speech-to-text, text-to-speech): the
    workers' speech models together; available while an online worker offers its kind."""

    _attr_has_entity_name = True
    _attr_device_info = HOUSEHOLD_DEVICE
    _attr_should_poll = False
    speech_kind: str  # router.STT or router.TTS

    def __init__(self, household: Household) -> None:
        self.household = household

    async def async_added_to_hass(self) -> None:
        await super().async_added_to_hass()
        self.async_on_remove(self.household.async_add_speech_listener(self._offers_changed))

    @callback
    def _offers_changed(self) -> None:
        if self.hass is not None and self.entity_id:
            self.async_write_ha_state()

    @property
    def available(self) -> bool:
        return bool(self.household.speech_models(self.speech_kind))

    def offered_languages(self) -> list[str]:
        """The languages the online workers offer for this kind (never empty: Home
        Assistant needs one; while none is offered the entity is unavailable)."""
        models = self.household.speech_models(self.speech_kind)
        return offered_languages(models) or [self.hass.config.language]


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
