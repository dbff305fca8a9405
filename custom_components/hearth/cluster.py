"""The household: every loaded worker, the shared assistant settings, routing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.storage import Store

from . import router
from .client import ChatDelta, HearthClient, HearthError, HearthRequestError
from .const import (
    CONF_CHAT_MODEL,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_PREFER_LOCAL_INTENTS,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DOMAIN,
    LOGGER,
    STORAGE_KEY,
    STORAGE_VERSION,
)

if TYPE_CHECKING:
    from .coordinator import HearthCoordinator

DEFAULT_SETTINGS: dict[str, Any] = {
    CONF_PROMPT: None,
    CONF_LLM_HASS_API: ["assist"],
    CONF_PREFER_LOCAL_INTENTS: True,
    CONF_MAX_TOKENS: DEFAULT_MAX_TOKENS,
    CONF_TEMPERATURE: DEFAULT_TEMPERATURE,
    CONF_CHAT_MODEL: None,
}


class NoWorkerError(HomeAssistantError):
    """No worker could answer; carries a translated message key."""

    def __init__(self) -> None:
        super().__init__(translation_domain=DOMAIN, translation_key="no_worker")


@dataclass
class WorkerHandle:
    """One loaded worker, as the cluster sees it."""

    entry_id: str
    name: str
    client: HearthClient
    coordinator: HearthCoordinator

    def state(self) -> router.WorkerState:
        """This worker as plain routing data."""
        info = self.coordinator.info
        capacity = self.coordinator.data if self.coordinator.last_update_success else None
        rates = capacity.models if capacity else {}
        models = {
            name: router.ModelRate(
                rates[name].prefill_tok_s if name in rates else None,
                rates[name].decode_tok_s if name in rates else None,
            )
            for name in info.chat_models
        }
        if capacity is None:
            return router.WorkerState(self.entry_id, models, online=False)
        return router.WorkerState(
            worker_id=self.entry_id,
            chat_models=models,
            online=True,
            running=capacity.running,
            queued=capacity.queued,
            max_running=capacity.max_running,
            max_queued=capacity.max_queued,
            on_battery=capacity.on_battery,
            user_active=capacity.user_active,
        )


@dataclass
class ChatStream:
    """An accepted chat request: who answers and the answer's deltas."""

    worker: WorkerHandle
    model: str
    deltas: AsyncIterator[ChatDelta]


@dataclass
class Cluster:
    """Household state, kept in hass.data[DOMAIN]."""

    hass: HomeAssistant
    store: Store[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    workers: dict[str, WorkerHandle] = field(default_factory=dict)
    primary_entry_id: str | None = None
    # entry id -> callbacks that add the household entities (agent, AI task) to that entry
    _household_adders: dict[str, list[Callable[[], None]]] = field(default_factory=dict)

    @classmethod
    async def async_create(cls, hass: HomeAssistant) -> Cluster:
        store: Store[dict[str, Any]] = Store(hass, STORAGE_VERSION, STORAGE_KEY)
        cluster = cls(hass, store)
        if stored := await store.async_load():
            cluster.settings.update(stored)
        return cluster

    async def async_update_settings(self, settings: dict[str, Any]) -> None:
        """Change the household-wide assistant settings."""
        self.settings = {**DEFAULT_SETTINGS, **settings}
        await self.store.async_save(self.settings)

    @callback
    def add_worker(self, handle: WorkerHandle) -> None:
        self.workers[handle.entry_id] = handle
        if self.primary_entry_id is None:
            self.primary_entry_id = handle.entry_id

    @callback
    def add_household_entities(self, entry_id: str, adder: Callable[[], None]) -> None:
        """Register how an entry's platform adds a household entity; add it if primary."""
        self._household_adders.setdefault(entry_id, []).append(adder)
        if entry_id == self.primary_entry_id:
            adder()

    @callback
    def remove_worker(self, entry_id: str) -> str | None:
        """Forget a worker; if it held the household entities, the next one takes them."""
        self.workers.pop(entry_id, None)
        self._household_adders.pop(entry_id, None)
        if self.primary_entry_id != entry_id:
            return None
        self.primary_entry_id = next(iter(self.workers), None)
        if self.primary_entry_id is not None:
            for adder in self._household_adders.get(self.primary_entry_id, []):
                adder()
        return self.primary_entry_id

    def candidates(self, request: router.RouteRequest) -> list[router.Candidate]:
        ranked = router.rank((w.state() for w in self.workers.values()), request)
        if not ranked and request.model is not None:
            # The preferred model is nowhere: any chat model beats no answer.
            ranked = router.rank(
                (w.state() for w in self.workers.values()),
                router.RouteRequest(None, request.prompt_tokens, request.max_new_tokens),
            )
        return ranked

    async def async_open_chat(
        self, body: dict[str, Any], *, prompt_tokens: int = 256
    ) -> ChatStream:
        """Send a chat request to the best worker, failing over before the first token."""
        request = router.RouteRequest(
            model=self.settings.get(CONF_CHAT_MODEL) or None,
            prompt_tokens=prompt_tokens,
            max_new_tokens=int(body.get("max_tokens") or DEFAULT_MAX_TOKENS),
        )
        for candidate in self.candidates(request):
            worker = self.workers[candidate.worker_id]
            try:
                deltas = await worker.client.chat_stream({**body, "model": candidate.model})
            except HearthRequestError as err:
                LOGGER.warning("Worker %s refused the request: %s", worker.name, err)
                continue
            except HearthError as err:
                LOGGER.debug("Worker %s failed, trying the next: %s", worker.name, err)
                continue
            return ChatStream(worker, candidate.model, deltas)
        raise NoWorkerError

    async def async_ask(self, body: dict[str, Any]) -> tuple[str, WorkerHandle]:
        """Ask once and collect the whole answer text."""
        stream = await self.async_open_chat(body)
        parts: list[str] = []
        try:
            async for delta in stream.deltas:
                parts.append(delta.content)
        except HearthError as err:
            LOGGER.warning("Worker %s broke off: %s", stream.worker.name, err)
            raise NoWorkerError from err
        return "".join(parts).strip(), stream.worker
