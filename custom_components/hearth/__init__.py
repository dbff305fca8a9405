"""Hearth: a private AI assistant served by the household's own computers."""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import CONF_HOST, CONF_PORT, CONF_TOKEN, Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ConfigEntryAuthFailed, ConfigEntryNotReady
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.typing import ConfigType

from .client import HearthClient
from .const import (
    CONF_ALLOW_PUBLIC,
    CONF_FINGERPRINT,
    CONF_PLAIN_HTTP,
    DOMAIN,
    LOGGER,
    REVOKE_TIMEOUT,
)
from .coordinator import (
    HearthCoordinator,
    async_delete_pull_issues,
    auth_issue_id,
    unreachable_issue_id,
)
from .household import Household, WorkerHandle
from .preference_tools import async_register_household_api
from .preferences import DATA_PREFERENCES, Preferences
from .services import async_setup_services
from .worker_api import HearthAuthError, HearthCertificateError, HearthError

CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)

# ai_task exists from Home Assistant 2025.8 on; offer the entity only there.
HAS_AI_TASK = importlib.util.find_spec("homeassistant.components.ai_task") is not None
PLATFORMS: list[Platform | str] = [
    Platform.BINARY_SENSOR,
    Platform.CONVERSATION,
    Platform.SENSOR,
    Platform.STT,
    Platform.TTS,
    *(["ai_task"] if HAS_AI_TASK else []),
]


@dataclass
class HearthRuntimeData:
    """What a loaded entry holds: its worker's coordinator (which holds the client)."""

    coordinator: HearthCoordinator


type HearthConfigEntry = ConfigEntry[HearthRuntimeData]


def _client(hass: HomeAssistant, entry: HearthConfigEntry) -> HearthClient:
    return HearthClient(
        async_get_clientsession(hass),
        entry.data[CONF_HOST],
        entry.data[CONF_PORT],
        entry.data[CONF_TOKEN],
        # Pinned at pairing; an entry without one (made before HTTPS) must pair again.
        fingerprint=entry.data.get(CONF_FINGERPRINT),
        plain_http=bool(entry.data.get(CONF_PLAIN_HTTP, False)),
        allow_public=bool(entry.data.get(CONF_ALLOW_PUBLIC, False)),
    )


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Create the household and register the actions."""
    await Household.async_create(hass)
    hass.data[DATA_PREFERENCES] = await Preferences.async_create(hass)
    async_register_household_api(hass)
    async_setup_services(hass)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: HearthConfigEntry) -> bool:
    """Connect to one worker."""
    client = _client(hass, entry)
    try:
        info = await client.info()
    except HearthAuthError as err:
        raise ConfigEntryAuthFailed(
            translation_domain=DOMAIN,
            translation_key="certificate_changed"
            if isinstance(err, HearthCertificateError)
            else "token_rejected",
        ) from err
    except HearthError as err:
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key="cannot_connect",
            translation_placeholders={"url": client.base_url},
        ) from err
    ir.async_delete_issue(hass, DOMAIN, auth_issue_id(entry.entry_id))

    coordinator = HearthCoordinator(hass, entry, client, info)
    await coordinator.async_config_entry_first_refresh()
    entry.runtime_data = HearthRuntimeData(coordinator)

    household = Household.get(hass)
    household.add_worker(WorkerHandle(entry.entry_id, entry.title, client, coordinator))
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: HearthConfigEntry) -> bool:
    """Disconnect from one worker; hand the household entities on if it held them."""
    if not await hass.config_entries.async_unload_platforms(entry, PLATFORMS):
        return False
    ir.async_delete_issue(hass, DOMAIN, unreachable_issue_id(entry.entry_id))
    async_delete_pull_issues(hass, entry.entry_id)
    # If this entry held the household's agent, the next loaded entry takes it over.
    Household.get(hass).remove_worker(entry.entry_id)
    return True


async def async_remove_entry(hass: HomeAssistant, entry: HearthConfigEntry) -> None:
    """Revoke the removed worker's token on it, and forget its repair issues."""
    ir.async_delete_issue(hass, DOMAIN, auth_issue_id(entry.entry_id))
    ir.async_delete_issue(hass, DOMAIN, unreachable_issue_id(entry.entry_id))
    async_delete_pull_issues(hass, entry.entry_id)
    await _async_revoke_token(hass, entry)


async def _async_revoke_token(hass: HomeAssistant, entry: HearthConfigEntry) -> None:
    """Best effort, bounded by REVOKE_TIMEOUT: removal goes on whatever happens."""
    if not entry.data.get(CONF_TOKEN):
        return
    client = _client(hass, entry)
    try:
        async with asyncio.timeout(REVOKE_TIMEOUT):
            await client.revoke_token()
    except HearthAuthError as err:
        if not isinstance(err, HearthCertificateError):
            LOGGER.debug("The token for %s was no longer valid: %s", entry.title, err)
            return
        problem = str(err)
    except (HearthError, TimeoutError) as err:
        problem = str(err) or "timed out"
    else:
        LOGGER.debug("Revoked Home Assistant's token on the removed worker %s", entry.title)
        return
    LOGGER.warning(
        "Could not revoke Home Assistant's token on the removed worker %s (%s): %s."
        " Revoke it there with `hearth-worker tokens revoke`",
        entry.title,
        client.base_url,
        problem,
    )
