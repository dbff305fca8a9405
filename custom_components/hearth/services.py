"""The hearth.ask action: ask the household's LLM from an automation."""

from __future__ import annotations

from typing import Any

import voluptuous as vol
from homeassistant.core import (
    HomeAssistant,
    ServiceCall,
    ServiceResponse,
    SupportsResponse,
    callback,
)
from homeassistant.helpers import config_validation as cv

from .const import CONF_MAX_TOKENS, CONF_TEMPERATURE, DEFAULT_MAX_TOKENS, DOMAIN, SERVICE_ASK

ATTR_PROMPT = "prompt"
ATTR_INSTRUCTIONS = "instructions"
ATTR_MAX_TOKENS = "max_tokens"

ASK_SCHEMA = vol.Schema(
    {
        vol.Required(ATTR_PROMPT): cv.string,
        vol.Optional(ATTR_INSTRUCTIONS): cv.string,
        vol.Optional(ATTR_MAX_TOKENS): vol.All(vol.Coerce(int), vol.Range(min=1, max=8192)),
    }
)


@callback
def async_setup_services(hass: HomeAssistant) -> None:
    """Register hearth.ask."""

    async def async_ask(call: ServiceCall) -> ServiceResponse:
        from . import get_cluster  # noqa: PLC0415 - avoids an import cycle

        cluster = get_cluster(hass)
        messages: list[dict[str, Any]] = []
        if instructions := call.data.get(ATTR_INSTRUCTIONS):
            messages.append({"role": "system", "content": instructions})
        messages.append({"role": "user", "content": call.data[ATTR_PROMPT]})
        body = {
            "messages": messages,
            "max_tokens": call.data.get(ATTR_MAX_TOKENS)
            or int(cluster.settings.get(CONF_MAX_TOKENS) or DEFAULT_MAX_TOKENS),
            "temperature": float(cluster.settings.get(CONF_TEMPERATURE) or 0.0),
        }
        answer, worker = await cluster.async_ask(body)
        return {"answer": answer, "worker": worker.name}

    hass.services.async_register(
        DOMAIN,
        SERVICE_ASK,
        async_ask,
        schema=ASK_SCHEMA,
        supports_response=SupportsResponse.ONLY,
    )
