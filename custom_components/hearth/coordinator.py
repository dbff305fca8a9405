"""Polls one worker's capacity, with back-off while it is unreachable.

Besides the interval, a poll is made at once (`async_poll_now`) when the worker
announces itself on the network (config_flow.py, zeroconf) and when a request to it
fails (household.py): a returning worker is seen within a poll's time, not at the
next interval of its back-off, and a lost one as soon as a request notices.

Between polls, the household tells the coordinator when Hearth's own requests to the
worker start and end (`async_set_in_flight`); `load()` is the last snapshot
corrected by them, and the sensors follow it at once (`signal_in_flight`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import datetime

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import ConfigEntryAuthFailed
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.dispatcher import async_dispatcher_send
from homeassistant.helpers.update_coordinator import DataUpdateCoordinator, UpdateFailed
from homeassistant.util import dt as dt_util

from .client import HearthClient
from .const import (
    CONF_ADDON,
    DOMAIN,
    LOGGER,
    MAX_SCAN_INTERVAL,
    SCAN_INTERVAL,
    UNREACHABLE_ISSUE_AFTER,
)
from .worker_api import (
    Capacity,
    HearthAuthError,
    HearthCertificateError,
    HearthError,
    PullInfo,
    WorkerInfo,
)


def addon_url(slug: str) -> str:
    """The add-on's page in Home Assistant (the frontend opens it in place)."""
    return f"homeassistant://hassio/addon/{slug}/info"


def unreachable_issue_id(entry_id: str) -> str:
    return f"unreachable_{entry_id}"


def auth_issue_id(entry_id: str) -> str:
    return f"token_rejected_{entry_id}"


def pull_issue_id(entry_id: str, source: str) -> str:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return f"pull_failed_{entry_id}_{digest}"


@callback
def async_delete_pull_issues(hass: HomeAssistant, entry_id: str) -> None:
    """Forget every failed-pull repair of one worker (its entry unloads or goes)."""
    prefix = f"pull_failed_{entry_id}_"
    for domain, issue_id in list(ir.async_get(hass).issues):
        if domain == DOMAIN and issue_id.startswith(prefix):
            ir.async_delete_issue(hass, DOMAIN, issue_id)


# pull.py's no_space message: "<source> needs 1.2 GB more disk space and <dir> has 0.4 GB free"
_NO_SPACE = re.compile(r"needs (?P<needed>.+?) more disk space and .* has (?P<free>.+?) free")


class HearthCoordinator(DataUpdateCoordinator[Capacity]):
    """Keeps the latest capacity snapshot of one worker.

    DataUpdateCoordinator logs once when updates start failing and once when
    they recover. While the worker is gone, the interval doubles up to
    MAX_SCAN_INTERVAL; after UNREACHABLE_ISSUE_AFTER a repair issue is raised.
    """

    config_entry: ConfigEntry

    def __init__(
        self,
        hass: HomeAssistant,
        entry: ConfigEntry,
        client: HearthClient,
        info: WorkerInfo,
    ) -> None:
        super().__init__(
            hass,
            LOGGER,
            config_entry=entry,
            name=f"Hearth worker {info.name}",
            update_interval=SCAN_INTERVAL,
        )
        self.client = client
        self.info = info
        self.unreachable_since: datetime | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._poll_again = False
        # Hearth's own open requests on the worker, and how many of them were open
        # when the last snapshot arrived (that snapshot counts them already).
        self.in_flight = 0
        self._in_flight_at_snapshot = 0
        # Repairs raised for the worker's failed pulls: source -> issue id.
        self._pull_issues: dict[str, str] = {}

    @property
    def configuration_url(self) -> str | None:
        """Where a person reads and changes the worker's settings: the add-on's page
        for the add-on; none otherwise (a worker serves an API, no page to read)."""
        slug = self.config_entry.data.get(CONF_ADDON)
        return addon_url(str(slug)) if slug else None

    @property
    def signal_in_flight(self) -> str:
        """Dispatcher signal: Hearth's own open requests on this worker changed."""
        return f"{DOMAIN}_in_flight_{self.config_entry.entry_id}"

    @callback
    def async_set_in_flight(self, count: int) -> None:
        """Hearth now has `count` requests open on this worker (household.py calls it)."""
        if count != self.in_flight:
            self.in_flight = count
            async_dispatcher_send(self.hass, self.signal_in_flight)

    def load(self) -> tuple[int, int]:
        """(running, queued) on the worker now, as far as Hearth can tell.

        Other clients' requests as the last snapshot showed them, plus Hearth's own
        open requests now; beyond the worker's parallel slots they wait in its queue.
        """
        capacity = self.data
        others = max(0, capacity.running + capacity.queued - self._in_flight_at_snapshot)
        total = others + self.in_flight
        running = min(total, max(capacity.max_running, capacity.running))
        return running, total - running

    @callback
    def async_poll_now(self) -> asyncio.Task[None]:
        """Poll the worker now, whatever the interval; the task ends after the poll.

        A poll asked for while one runs is made right after it (what it would have
        seen may have changed in between); many asks in the meantime make one poll.
        """
        self._poll_again = True
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = self.config_entry.async_create_task(
                self.hass, self._poll_while_asked(), f"{self.name} poll now", eager_start=False
            )
        return self._poll_task

    async def async_refresh_models(self) -> None:
        """Read the worker's models again (one was added or removed), then poll it.

        The router and the household's choices read `info`; the device's sensors
        read the poll (which also notices a worker that stopped answering).
        """
        try:
            self.info = await self.client.info()
        except HearthError as err:
            LOGGER.debug("Could not read the models of %s: %s", self.config_entry.title, err)
        await self.async_poll_now()

    async def _poll_while_asked(self) -> None:
        while self._poll_again:
            self._poll_again = False
            await self.async_refresh()

    async def _async_update_data(self) -> Capacity:
        try:
            capacity = await self.client.capacity()
        except HearthAuthError as err:
            # A certificate that is not the pinned one is never accepted: pair again.
            key = (
                "certificate_changed"
                if isinstance(err, HearthCertificateError)
                else "token_rejected"
            )
            ir.async_create_issue(
                self.hass,
                DOMAIN,
                auth_issue_id(self.config_entry.entry_id),
                is_fixable=False,
                severity=ir.IssueSeverity.ERROR,
                translation_key=key,
                translation_placeholders={"name": self.config_entry.title},
            )
            raise ConfigEntryAuthFailed(translation_domain=DOMAIN, translation_key=key) from err
        except HearthError as err:
            self._went_away()
            raise UpdateFailed(
                translation_domain=DOMAIN,
                translation_key="worker_unreachable",
                translation_placeholders={"name": self.config_entry.title, "error": str(err)},
            ) from err
        self._in_flight_at_snapshot = self.in_flight
        self._came_back()
        await self._follow_pulls(capacity)
        return capacity

    async def _follow_pulls(self, capacity: Capacity) -> None:
        """Read /v1/info again while the worker pulls (the add-on's hub ids at start-up,
        or the API's) or a repair for a failed pull is open, or when its models
        changed; a failed pull raises a repair, removed once that source's pull is
        done or gone."""
        if (
            self._pull_issues
            or any(p.status == "running" for p in self.info.pulls)
            # Voices are listed in /v1/models, not /v1/info: they change nothing here.
            or {name for name, rates in capacity.models.items() if rates.kind != "tts"}
            != {m.id for m in self.info.models}
        ):
            try:
                self.info = await self.client.info()
            except HearthError as err:
                LOGGER.debug("Could not read the pulls of %s: %s", self.config_entry.title, err)
                return
        latest: dict[str, PullInfo] = {}
        for pull in self.info.pulls:  # oldest first: the last job of a source wins
            latest[pull.source] = pull
        for pull in latest.values():
            if pull.status == "failed":
                self._raise_pull_issue(pull)
        # A repair stays while that source is retried; it goes once the source is
        # pulled, or its jobs are gone (the worker restarted).
        for source in list(self._pull_issues):
            if source not in latest or latest[source].status == "done":
                ir.async_delete_issue(self.hass, DOMAIN, self._pull_issues.pop(source))

    def _raise_pull_issue(self, pull: PullInfo) -> None:
        issue_id = pull_issue_id(self.config_entry.entry_id, pull.source)
        message = pull.error_message or pull.error_code or "unknown error"
        space = _NO_SPACE.search(message) if pull.error_code == "no_space" else None
        if pull.source not in self._pull_issues:
            LOGGER.warning(
                "Hearth worker %s could not pull %s: %s",
                self.config_entry.title,
                pull.source,
                message,
            )
        self._pull_issues[pull.source] = issue_id
        name = self.config_entry.title
        if space is not None:
            ir.async_create_issue(
                self.hass,
                DOMAIN,
                issue_id,
                is_fixable=False,
                severity=ir.IssueSeverity.ERROR,
                translation_key="pull_no_space",
                translation_placeholders={
                    "name": name,
                    "source": pull.source,
                    "needed": space["needed"],
                    "free": space["free"],
                },
            )
            return
        ir.async_create_issue(
            self.hass,
            DOMAIN,
            issue_id,
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key="pull_failed",
            translation_placeholders={
                "name": name,
                "source": pull.source,
                "error": message,
                "code": pull.error_code or "unknown",
            },
        )

    def _went_away(self) -> None:
        now = dt_util.utcnow()
        if self.unreachable_since is None:
            self.unreachable_since = now
        assert self.update_interval is not None
        self.update_interval = min(self.update_interval * 2, MAX_SCAN_INTERVAL)
        if now - self.unreachable_since >= UNREACHABLE_ISSUE_AFTER:
            ir.async_create_issue(
                self.hass,
                DOMAIN,
                unreachable_issue_id(self.config_entry.entry_id),
                is_fixable=False,
                severity=ir.IssueSeverity.WARNING,
                translation_key="worker_unreachable",
                translation_placeholders={
                    "name": self.config_entry.title,
                    "url": self.client.base_url,
                },
            )

    def _came_back(self) -> None:
        if self.unreachable_since is not None:
            self.unreachable_since = None
            ir.async_delete_issue(
                self.hass, DOMAIN, unreachable_issue_id(self.config_entry.entry_id)
            )
        self.update_interval = SCAN_INTERVAL
