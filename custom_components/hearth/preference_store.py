"""The preference store on disk: one versioned file, checked before it is read, never emptied.

`.storage/hearth.preferences` is a Home Assistant `Store`, written with
`atomic_writes=True` (a temporary file in the same folder, fsynced, renamed over
the old one). A file that is not valid JSON or not the expected shape is never
loaded, emptied or overwritten: a repair issue says so and writes are refused
until the file is fixed by hand (checked again on every write) or set aside by
wiping everything (`async_set_aside`, which keeps the damaged file beside it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.storage import Store
from homeassistant.util import dt as dt_util

from .const import DOMAIN, LOGGER

# The file's name under .storage: existing households' data is there, never rename it.
PREFERENCES_STORAGE_KEY: Final = "hearth.preferences"
STORAGE_VERSION: Final = 1
STORAGE_MINOR_VERSION: Final = 1
ISSUE_CORRUPT: Final = "preferences_corrupt"

# What a stored item's category may be.
CATEGORIES: Final = (
    "units",
    "diet",
    "recipe_sites",
    "sources_cite",
    "sources_avoid",
    "language",
    "tone",
    "other",
)


class DamagedStoreError(Exception):
    """What is wrong with a preference store file."""


class PreferencesCorruptError(HomeAssistantError):
    """The preference store could not be read; writes are refused."""

    def __init__(self, path: str) -> None:
        super().__init__(
            translation_domain=DOMAIN,
            translation_key="preferences_corrupt",
            translation_placeholders={"path": path},
        )


class _VersionedStore(Store[dict[str, Any]]):
    """The Store, with its migration hook."""

    async def _async_migrate_func(
        self, old_major_version: int, old_minor_version: int, old_data: dict[str, Any]
    ) -> dict[str, Any]:
        if old_major_version > STORAGE_VERSION:
            raise NotImplementedError("written by a newer version of Hearth")
        # Version 1.1 is the first; later versions migrate from old_data here.
        return old_data


def validated(data: Any) -> dict[str, dict[str, Any]]:
    """The stored members, checked; raises DamagedStoreError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("members"), dict):
        raise DamagedStoreError("expected an object with 'members'")
    members: dict[str, dict[str, Any]] = {}
    # Members are named by position (never by key or name): the reason is shown in
    # a repair issue and in diagnostics.
    for number, (key, member) in enumerate(data["members"].items(), 1):
        if not isinstance(member, dict) or not isinstance(member.get("items"), list):
            raise DamagedStoreError(f"member number {number} has no 'items' list")
        for item in member["items"]:
            if (
                not isinstance(item, dict)
                or not all(
                    isinstance(item.get(k), str)
                    for k in ("id", "category", "value", "created_at", "updated_at")
                )
                or item["category"] not in CATEGORIES
            ):
                raise DamagedStoreError(f"member number {number} has a malformed item")
        members[str(key)] = {"name": str(member.get("name") or key), "items": member["items"]}
    return members


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def check_envelope(text: str) -> None:
    """A storage file's outer shape; raises DamagedStoreError (or ValueError: bad JSON)."""
    envelope = json.loads(text)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("version"), int):
        raise DamagedStoreError("not a Home Assistant storage file")
    if "data" not in envelope:
        raise DamagedStoreError("no 'data'")
    if envelope["version"] > STORAGE_VERSION:
        raise DamagedStoreError("written by a newer version of Hearth")


class PreferenceStore:
    """The members' stored preferences (`members`), and why the file cannot be read."""

    def __init__(self, hass: HomeAssistant) -> None:
        self.hass = hass
        self._store = _VersionedStore(
            hass,
            STORAGE_VERSION,
            PREFERENCES_STORAGE_KEY,
            minor_version=STORAGE_MINOR_VERSION,
            atomic_writes=True,
        )
        # member key -> {"name": ..., "items": [{id, category, value, created_at, updated_at}]}
        self.members: dict[str, dict[str, Any]] = {}
        self.corrupt: str | None = None  # why the store could not be read

    @property
    def path(self) -> str:
        """The file, under the configuration's .storage folder."""
        return str(self._store.path)

    async def async_load(self) -> None:
        """Read the file; on a damaged one, raise the repair issue and keep it as it is.

        The file is checked before `Store` reads it: `Store` would move a file
        with invalid JSON aside and start empty, which is what must not happen.
        """
        try:
            text = await self.hass.async_add_executor_job(_read_text, self.path)
            if text is not None:
                check_envelope(text)
            stored = await self._store.async_load()
            members = validated(stored) if stored is not None else {}
        except (
            DamagedStoreError,
            ValueError,
            TypeError,
            KeyError,
            NotImplementedError,
            HomeAssistantError,
        ) as err:
            self._set_corrupt(str(err) or type(err).__name__)
            return
        self.members = members
        if self.corrupt is not None:
            LOGGER.info("The preference store can be read again")
        self.corrupt = None
        ir.async_delete_issue(self.hass, DOMAIN, ISSUE_CORRUPT)

    def _set_corrupt(self, reason: str) -> None:
        LOGGER.error(
            "The preference store %s cannot be read (%s); preferences are not used "
            "and not written until it is fixed or wiped",
            self.path,
            reason,
        )
        self.corrupt = reason
        self.members = {}
        ir.async_create_issue(
            self.hass,
            DOMAIN,
            ISSUE_CORRUPT,
            is_fixable=False,
            is_persistent=False,
            severity=ir.IssueSeverity.ERROR,
            translation_key=ISSUE_CORRUPT,
            translation_placeholders={"path": self.path, "reason": reason},
        )

    async def async_writable(self) -> None:
        """Refuse writes (PreferencesCorruptError) while the file is damaged, unless it
        was fixed meanwhile."""
        if self.corrupt is not None:
            await self.async_load()
        if self.corrupt is not None:
            raise PreferencesCorruptError(self.path)

    async def async_save(self) -> None:
        await self._store.async_save({"members": self.members})

    async def async_set_aside(self) -> None:
        """Keep the damaged file beside the store, as `<name>.corrupt.<time>`; start empty."""
        kept = f"{self.path}.corrupt.{dt_util.utcnow().strftime('%Y%m%dT%H%M%S')}"
        await self.hass.async_add_executor_job(os.replace, self.path, kept)
        LOGGER.warning("The damaged preference store was kept as %s", kept)
        self.corrupt = None
        self.members = {}
        ir.async_delete_issue(self.hass, DOMAIN, ISSUE_CORRUPT)
        await self.async_save()
