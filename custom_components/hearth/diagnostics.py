"""Diagnostics for one worker entry (the token is redacted)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from homeassistant.components.diagnostics import async_redact_data
from homeassistant.const import CONF_TOKEN
from homeassistant.core import HomeAssistant

from .const import CONF_PROMPT, CONF_TOKEN_ID
from .household import Household
from .preferences import DATA_PREFERENCES

if TYPE_CHECKING:
    from . import HearthConfigEntry

TO_REDACT = {CONF_TOKEN, CONF_TOKEN_ID, CONF_PROMPT}


async def async_get_config_entry_diagnostics(
    hass: HomeAssistant, entry: HearthConfigEntry
) -> dict[str, Any]:
    coordinator = entry.runtime_data.coordinator
    household = Household.get(hass)
    capacity = coordinator.data
    return {
        "entry": async_redact_data(dict(entry.data), TO_REDACT),
        "info": asdict(coordinator.info),
        "online": coordinator.last_update_success,
        "capacity": capacity.raw if capacity else None,
        "household": {
            "primary": household.primary_entry_id == entry.entry_id,
            "workers": len(household.workers),
            "settings": async_redact_data(household.settings, TO_REDACT),
            "preferences": preferences_diagnostics(hass),
        },
    }


def preferences_diagnostics(hass: HomeAssistant) -> dict[str, Any]:
    """What the preference store holds, as counts and categories only.

    Diagnostics are made to be shared: no preference text, no member name or key
    (a key names a person); members are listed by size, not by who they are.
    """
    prefs = hass.data.get(DATA_PREFERENCES)
    if prefs is None:
        return {}
    shapes: list[tuple[int, dict[str, int]]] = sorted(
        (
            (
                len(member["items"]),
                dict(sorted(Counter(i["category"] for i in member["items"]).items())),
            )
            for member in prefs.members.values()
        ),
        key=lambda shape: (-shape[0], sorted(shape[1].items())),
    )
    members = [{"count": count, "categories": categories} for count, categories in shapes]
    return {
        "store": prefs.store.path,
        "readable": prefs.corrupt is None,
        "problem": prefs.corrupt,
        "member_count": len(members),
        "preference_count": sum(count for count, _ in shapes),
        "members": members,
    }
