"""The household: every loaded worker, the shared assistant settings, routing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers.storage import Store
from homeassistant.util.hass_dict import HassKey

from . import router
from .client import TRANSCRIBE_TIMEOUT, HearthClient, StreamTimeouts
from .const import (
    CONF_ADDON,
    CONF_CHAT_MODEL,
    CONF_EMBEDDING_MODEL,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_NOT_ON_BATTERY,
    CONF_ONLY_WHEN_IDLE,
    CONF_PROMPT,
    CONF_TEMPERATURE,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DOMAIN,
    LOGGER,
    REMOVED_SETTINGS,
    REPOLL_TIMEOUT,
    SETTINGS_STORAGE_KEY,
    STORAGE_VERSION,
)
from .worker_api import (
    ChatDelta,
    HearthBusyError,
    HearthConnectionError,
    HearthError,
    HearthRequestError,
    SpeechModel,
)

if TYPE_CHECKING:
    from .coordinator import HearthCoordinator

DEFAULT_SETTINGS: dict[str, Any] = {
    CONF_PROMPT: None,
    CONF_LLM_HASS_API: ["assist"],
    CONF_MAX_TOKENS: DEFAULT_MAX_TOKENS,
    CONF_TEMPERATURE: DEFAULT_TEMPERATURE,
    CONF_CHAT_MODEL: None,
}


def _known(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings without those Hearth no longer has (a stored old key changes nothing)."""
    return {key: value for key, value in settings.items() if key not in REMOVED_SETTINGS}


class NoWorkerError(HomeAssistantError):
    """No worker could answer; carries a translated message key."""

    def __init__(self) -> None:
        super().__init__(translation_domain=DOMAIN, translation_key="no_worker")


class AnswerCutOffError(HomeAssistantError):
    """A worker broke off mid-answer; the deltas it sent before were passed on."""

    def __init__(self, worker_name: str) -> None:
        super().__init__(
            translation_domain=DOMAIN,
            translation_key="answer_cut_off",
            translation_placeholders={"name": worker_name},
        )


class RequestNotServableError(ServiceValidationError):
    """No worker can serve the request because of the request itself, not availability.

    A ServiceValidationError: the caller's input is the cause, so Home Assistant
    answers with the translated reason and logs no traceback.
    """


class RequestTooLongError(RequestNotServableError):
    """The request does not fit the context of any model that was asked."""

    def __init__(self, details: str) -> None:
        super().__init__(
            translation_domain=DOMAIN,
            translation_key="request_too_long",
            translation_placeholders={"details": details},
        )


class MessageTooLongError(RequestNotServableError):
    """Refused before any worker is asked: longer than any household model could read."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            translation_domain=DOMAIN,
            translation_key="message_too_long",
            translation_placeholders={"length": str(length), "limit": str(limit)},
        )


class RequestRefusedError(RequestNotServableError):
    """Every worker that answered refused the request (unknown model, bad arguments)."""

    def __init__(self, worker_name: str, details: str) -> None:
        super().__init__(
            translation_domain=DOMAIN,
            translation_key="request_refused",
            translation_placeholders={"name": worker_name, "details": details},
        )


# A request is refused before any worker sees it when it is longer, in characters,
# than the largest context of the household's chat models could hold even at
# CHARS_PER_TOKEN_CEILING characters a token (real text averages about 4), and
# never longer than MAX_PROMPT_CHARS: what no worker can answer costs nothing.
CHARS_PER_TOKEN_CEILING: Final = 8
MAX_PROMPT_CHARS: Final = 512_000
# Worker error codes that mean "this request is too long" (see the worker's API).
_TOO_LONG_CODES: Final = frozenset({"context_length_exceeded", "body_too_large"})


# Speech (see router.rank_speech). A worker's speech models are read again at most
# this often (seconds) while it stays online, and whenever it comes back.
SPEECH_MODELS_MAX_AGE_S: Final = 300.0
# Bounds of one text-to-speech request (a sentence or a short answer): seconds to
# the first audio, between two pieces, in all.
SPEECH_TIMEOUTS: Final = StreamTimeouts(first_token=20.0, between_tokens=10.0, total=60.0)
# What Home Assistant sends to speech-to-text: 16 kHz, 16-bit, mono PCM.
STT_SAMPLE_RATE: Final = 16000
STT_BYTES_PER_S: Final = STT_SAMPLE_RATE * 2


def refusal_error(refusals: list[tuple[str, HearthRequestError]]) -> RequestNotServableError:
    """The error for a request every answering worker refused: too long, else the reason."""
    for _name, err in refusals:
        if err.code in _TOO_LONG_CODES or err.status == 413:
            return RequestTooLongError(str(err) or err.code)
    name, err = refusals[-1]
    return RequestRefusedError(name, str(err) or err.code or f"HTTP {err.status}")


@dataclass
class WorkerHandle:
    """One loaded worker, as the household sees it."""

    entry_id: str
    name: str
    client: HearthClient
    coordinator: HearthCoordinator
    # Its speech models (GET /v1/models), read when it joins or comes back, and now and
    # then (a voice put into its models folder is served at once).
    speech_models: list[SpeechModel] = field(default_factory=list)

    def speech_state(self) -> router.SpeechWorkerState:
        """This worker as plain routing data for speech jobs (see router.rank_speech)."""
        capacity = self.coordinator.data if self.coordinator.last_update_success else None
        rates = capacity.models if capacity else {}
        models = []
        for model in self.speech_models:
            rate = rates.get(model.id)
            measured = rate is not None and (
                rate.stt_fixed_ms is not None or rate.tts_first_audio_ms is not None
            )
            if rate is None:
                warm = False
            elif rate.loaded is not None:
                warm = rate.loaded
            else:
                warm = rate.requests_served > 0 or measured
            models.append(
                router.SpeechModelState(
                    model=model.id,
                    kind=model.kind,
                    languages=model.languages,
                    voices=model.voices,
                    sample_rate=model.sample_rate,
                    warm=warm,
                    stt_fixed_ms=rate.stt_fixed_ms if rate else None,
                    stt_ms_per_audio_s=rate.stt_ms_per_audio_s if rate else None,
                    tts_first_audio_ms=rate.tts_first_audio_ms if rate else None,
                    tts_rtf=rate.tts_rtf if rate else None,
                )
            )
        options = self.coordinator.config_entry.options
        return router.SpeechWorkerState(
            worker_id=self.entry_id,
            models=tuple(models),
            online=capacity is not None,
            chat_running=(capacity.running + capacity.queued) if capacity else 0,
            on_battery=capacity.on_battery if capacity else None,
            user_active=capacity.user_active if capacity else None,
            only_when_idle=bool(options.get(CONF_ONLY_WHEN_IDLE, False)),
            not_on_battery=bool(options.get(CONF_NOT_ON_BATTERY, False)),
            on_home_assistant_host=bool(self.coordinator.config_entry.data.get(CONF_ADDON)),
        )

    def embedding_models(self) -> list[str]:
        """The embedding models this worker serves, in the order it lists them."""
        return [m.id for m in self.coordinator.info.models if m.kind == "embedding"]

    def state(self, model_ids: Collection[str] | None = None) -> router.WorkerState:
        """This worker as plain routing data.

        `model_ids`: the models a request may use (default: its chat models; an
        embedding request passes its embedding models, which the router ranks alike).
        """
        info = self.coordinator.info
        capacity = self.coordinator.data if self.coordinator.last_update_success else None
        rates = capacity.models if capacity else {}
        models = {
            name: router.ModelRate(
                rates[name].prefill_tok_s if name in rates else None,
                rates[name].decode_tok_s if name in rates else None,
            )
            for name in (info.chat_models if model_ids is None else model_ids)
        }
        options = self.coordinator.config_entry.options
        only_when_idle = bool(options.get(CONF_ONLY_WHEN_IDLE, False))
        not_on_battery = bool(options.get(CONF_NOT_ON_BATTERY, False))
        if capacity is None:
            return router.WorkerState(
                self.entry_id,
                models,
                online=False,
                only_when_idle=only_when_idle,
                not_on_battery=not_on_battery,
            )
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
            memory_free_mb=capacity.memory_free_mb,
            warm_keys=capacity.warm_keys,
            only_when_idle=only_when_idle,
            not_on_battery=not_on_battery,
        )


def prompt_chars(body: dict[str, Any]) -> int:
    """A chat request's prompt size in characters (messages and tools)."""
    return len(json.dumps([body.get("messages"), body.get("tools")], ensure_ascii=False))


def household_prefix(body: dict[str, Any]) -> tuple[str, int] | None:
    """The request's household prefix: its key and its size in tokens, roughly.

    The part every member's request starts with (assistant.py lays it out so):
    the first message when it is a system message, and the tools. The key is
    the SHA-256 (hex) of both as canonical JSON; the worker cannot compute it
    (it sees token ids), it keeps the key the request brings (X-Hearth-Prefix).
    None: no system message first.
    """
    messages = body.get("messages") or []
    first = messages[0] if messages else None
    if not isinstance(first, dict) or first.get("role") != "system":
        return None
    part = [first.get("content"), body.get("tools") or []]
    canonical = json.dumps(part, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    key = hashlib.sha256(canonical.encode()).hexdigest()
    return key, max(1, len(json.dumps(part)) // 4)


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A chat request's prompt size in tokens, roughly (4 characters a token), for routing."""
    return max(1, len(json.dumps([body.get("messages"), body.get("tools")])) // 4)


def _embedding_request(prompt_tokens: int) -> router.RouteRequest:
    """An embedding request as routing sees it: a prompt and no answer to wait for."""
    return router.RouteRequest(prompt_tokens=prompt_tokens, max_new_tokens=0, purpose="embedding")


async def _first_delta(deltas: AsyncGenerator[ChatDelta]) -> ChatDelta:
    """The first delta of an answer (its first text or tool call, or its end)."""
    first = await anext(deltas, None)
    if first is None:
        raise HearthConnectionError("Chat stream ended with nothing")
    return first


@dataclass
class ChatStream:
    """An accepted chat request: who answers and the answer's deltas."""

    worker: WorkerHandle
    model: str
    deltas: AsyncIterator[ChatDelta]


@dataclass
class AskResult:
    """A collected answer; `cut_off` is set when the worker broke off mid-answer."""

    answer: str
    worker: WorkerHandle
    cut_off: AnswerCutOffError | None = None

    @property
    def partial(self) -> bool:
        return self.cut_off is not None


@dataclass
class Completion:
    """A whole answer's deltas, collected before anyone saw them (see async_complete)."""

    deltas: list[ChatDelta]
    worker: WorkerHandle
    cut_off: AnswerCutOffError | None = None

    @property
    def text(self) -> str:
        return "".join(delta.content for delta in self.deltas)


class Utterance:
    """The audio of one utterance as it streams in, kept so that every worker asked
    gets all of it (Home Assistant keeps the utterance; the workers keep nothing)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended_at: float | None = None  # loop time when the last chunk came
        self._more = asyncio.Event()

    @property
    def seconds(self) -> float:
        """Seconds of audio so far."""
        return self.size / STT_BYTES_PER_S

    def _changed(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    async def pump(self, source: AsyncIterable[bytes]) -> None:
        """Read the whole utterance from `source` (as Home Assistant streams it)."""
        try:
            async for chunk in source:
                if chunk:
                    self.chunks.append(chunk)
                    self.size += len(chunk)
                    self._changed()
        finally:
            self.ended_at = asyncio.get_running_loop().time()
            self._changed()

    async def ended(self) -> None:
        """Wait for the utterance's end."""
        while self.ended_at is None:
            await self._more.wait()

    async def replay(self) -> AsyncGenerator[bytes]:
        """All the audio from its start: what came already at once, the rest as it comes."""
        index = 0
        while True:
            while index < len(self.chunks):
                yield self.chunks[index]
                index += 1
            if self.ended_at is not None:
                return
            await self._more.wait()


@dataclass
class SpeechAnswer:
    """A finished speech job: the text heard, or the PCM spoken, and who did it."""

    worker: WorkerHandle
    model: str
    text: str = ""
    pcm: bytes = b""
    sample_rate: int = 0


@dataclass
class Household:
    """Household state: one per Home Assistant, made in `async_setup` (`Household.get`)."""

    hass: HomeAssistant
    store: Store[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SETTINGS))
    workers: dict[str, WorkerHandle] = field(default_factory=dict)
    primary_entry_id: str | None = None
    # Bounds of every chat stream (const.py); tests shorten them.
    timeouts: StreamTimeouts = field(default_factory=StreamTimeouts)
    # entry id -> callbacks that add the household entities (agent, AI task) to that entry
    _household_adders: dict[str, list[Callable[[], None]]] = field(default_factory=dict)
    # The routing policy's memory: reservations, stickiness, circuit breakers.
    routing: router.Router = field(default_factory=router.Router)
    # entry id -> stops telling `routing` about that worker's fresh snapshots
    _snapshot_listeners: dict[str, Callable[[], None]] = field(default_factory=dict)
    # Bounds of each text-to-speech request, and of each transcription (seconds).
    speech_timeouts: StreamTimeouts = SPEECH_TIMEOUTS
    transcribe_timeout: float = TRANSCRIBE_TIMEOUT
    # Called when what the workers offer for speech changes (models, online or not).
    _speech_listeners: list[Callable[[], None]] = field(default_factory=list)
    # entry id -> when its speech models were read (time.monotonic()); online or not.
    _speech_read_at: dict[str, float] = field(default_factory=dict)
    _online: dict[str, bool] = field(default_factory=dict)

    @classmethod
    async def async_create(cls, hass: HomeAssistant) -> Household:
        """Load the household's settings and keep the household in `hass.data`."""
        store: Store[dict[str, Any]] = Store(hass, STORAGE_VERSION, SETTINGS_STORAGE_KEY)
        household = cls(hass, store)
        if stored := await store.async_load():
            household.settings.update(_known(stored))
        hass.data[DATA_HOUSEHOLD] = household
        return household

    @staticmethod
    def get(hass: HomeAssistant) -> Household:
        """The household (made in the integration's `async_setup`)."""
        return hass.data[DATA_HOUSEHOLD]

    async def async_update_settings(self, settings: dict[str, Any]) -> None:
        """Change the household-wide assistant settings."""
        self.settings = {**DEFAULT_SETTINGS, **_known(settings)}
        await self.store.async_save(self.settings)

    @callback
    def add_worker(self, handle: WorkerHandle) -> None:
        self.workers[handle.entry_id] = handle
        entry_id = handle.entry_id

        @callback
        def snapshot_arrived() -> None:
            if handle.coordinator.last_update_success:
                self.routing.observe_snapshot(entry_id)
            self._speech_snapshot(handle)

        if stop := self._snapshot_listeners.pop(entry_id, None):
            stop()
        self._snapshot_listeners[entry_id] = handle.coordinator.async_add_listener(snapshot_arrived)
        self.routing.observe_snapshot(entry_id)
        self._online.pop(entry_id, None)
        self._speech_snapshot(handle)
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
        if stop := self._snapshot_listeners.pop(entry_id, None):
            stop()
        self.routing.forget(entry_id)
        self._online.pop(entry_id, None)
        self._speech_read_at.pop(entry_id, None)
        self._speech_changed()
        if self.primary_entry_id != entry_id:
            return None
        self.primary_entry_id = next(iter(self.workers), None)
        if self.primary_entry_id is not None:
            for adder in self._household_adders.get(self.primary_entry_id, []):
                adder()
        return self.primary_entry_id

    def candidates(self, request: router.RouteRequest) -> list[router.Candidate]:
        """Workers to try for `request`, best first (see router.Router.rank)."""
        states = [w.state() for w in self.workers.values()]
        ranked = self.routing.rank(states, request)
        if not ranked and request.model is not None:
            # The preferred model is nowhere: any chat model beats no answer.
            ranked = self.routing.rank(states, replace(request, model=None))
        return ranked

    async def async_candidates(self, request: router.RouteRequest) -> list[router.Candidate]:
        """As `candidates`; when none is online, the offline workers are polled first.

        A worker that came back since its last poll takes the request instead of it
        failing with "no worker" until the next poll of its back-off. The polls wait
        at most REPOLL_TIMEOUT: a worker that answers takes far less.
        """
        if ranked := self.candidates(request):
            return ranked
        offline = [w for w in self.workers.values() if not w.coordinator.last_update_success]
        if not offline:
            return ranked
        LOGGER.debug("No worker is online: polling %s", ", ".join(w.name for w in offline))
        polls = [w.coordinator.async_poll_now() for w in offline]
        await asyncio.wait(polls, timeout=REPOLL_TIMEOUT)
        return self.candidates(request)

    async def async_open_chat(
        self,
        body: dict[str, Any],
        *,
        conversation_id: str | None = None,
        purpose: str = "chat",
        exclude: Collection[str] = (),
    ) -> ChatStream:
        """Send a chat request to the best worker, failing over before the first token.

        A worker counts as answering once its first text or tool call (or an empty,
        finished answer) has arrived. Before that, anything — refused connection,
        5xx, 429, a 4xx, a timeout, a stream that ends early — moves on to the next
        candidate. After it, a failure ends the stream with AnswerCutOffError.

        Each try is reserved against its worker until the answer is over, so that
        requests arriving together spread out (router.Router); `conversation_id`
        keeps a conversation on the worker of its previous turn; `purpose` groups
        requests with similar answer lengths ("voice", "task"); workers in `exclude`
        (entry ids) are not asked.

        Raises MessageTooLongError, before any worker is asked, for a request longer
        than prompt_char_limit(); when no worker answers, RequestNotServableError if
        a worker refused the request itself (too long for its model, bad arguments:
        its 4xx), else NoWorkerError (nobody could be reached, or all were busy).
        """
        if (length := prompt_chars(body)) > (limit := self.prompt_char_limit()):
            raise MessageTooLongError(length, limit)
        prefix = household_prefix(body)
        request = router.RouteRequest(
            model=self.settings.get(CONF_CHAT_MODEL) or None,
            prompt_tokens=estimate_prompt_tokens(body),
            max_new_tokens=int(body.get("max_tokens") or DEFAULT_MAX_TOKENS),
            conversation_id=conversation_id,
            purpose=purpose,
            prefix_key=prefix[0] if prefix else None,
            prefix_tokens=prefix[1] if prefix else 0,
        )
        refusals: list[tuple[str, HearthRequestError]] = []
        for candidate in await self.async_candidates(request):
            worker = self.workers.get(candidate.worker_id)
            if worker is None or candidate.worker_id in exclude:
                continue
            deltas: AsyncGenerator[ChatDelta] | None = None
            reservation = self._reserve(candidate, request)
            try:
                deltas = await worker.client.chat_stream(
                    {**body, "model": candidate.model},
                    self.timeouts,
                    request.prefix_key,
                )
                first = await _first_delta(deltas)
            except HearthBusyError as err:
                self._release(reservation)
                LOGGER.debug("Worker %s is busy, trying the next: %s", worker.name, err)
                continue
            except HearthRequestError as err:
                # The request itself (too long for this model, bad arguments): another
                # worker may still take it; if none does, the user hears this reason.
                self._release(reservation)
                LOGGER.info("Worker %s refused the request: %s", worker.name, err)
                refusals.append((worker.name, err))
                continue
            except HearthError as err:
                self._release(reservation)
                if deltas is not None:
                    await deltas.aclose()
                self._worker_failed(worker, err, answering=False)
                continue
            except BaseException:
                self._release(reservation)
                if deltas is not None:
                    await deltas.aclose()
                raise
            return ChatStream(
                worker, candidate.model, self._relay(worker, first, deltas, reservation)
            )
        if refusals:
            raise refusal_error(refusals)
        raise NoWorkerError

    # --- speech ---------------------------------------------------------------------

    @callback
    def async_add_speech_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` whenever what the workers offer for speech may have changed."""
        self._speech_listeners.append(listener)

        @callback
        def remove() -> None:
            if listener in self._speech_listeners:
                self._speech_listeners.remove(listener)

        return remove

    @callback
    def _speech_changed(self) -> None:
        for listener in list(self._speech_listeners):
            listener()

    @callback
    def _speech_snapshot(self, handle: WorkerHandle) -> None:
        """A poll of `handle` ended: read its speech models when it joined or came back
        (or they are old); tell the speech entities when it went or came."""
        entry_id = handle.entry_id
        online = handle.coordinator.last_update_success
        was = self._online.get(entry_id)
        self._online[entry_id] = online
        age = time.monotonic() - self._speech_read_at.get(entry_id, -SPEECH_MODELS_MAX_AGE_S)
        if online and (was is not True or age >= SPEECH_MODELS_MAX_AGE_S):
            self._speech_read_at[entry_id] = time.monotonic()
            handle.coordinator.config_entry.async_create_task(
                self.hass,
                self._async_read_speech_models(handle),
                f"Hearth: speech models of {handle.name}",
                eager_start=True,
            )
        elif was is not None and was != online:
            self._speech_changed()

    async def _async_read_speech_models(self, handle: WorkerHandle) -> None:
        try:
            models = await handle.client.speech_models()
        except HearthError as err:
            LOGGER.debug("Could not read the speech models of %s: %s", handle.name, err)
            self._speech_read_at.pop(handle.entry_id, None)  # again at the next poll
            return
        if self.workers.get(handle.entry_id) is not handle:
            return  # it left meanwhile
        handle.speech_models = models
        self._speech_changed()

    def speech_models(self, kind: str) -> list[router.SpeechModelState]:
        """The speech models of `kind` the online workers offer together (each model id
        once: the first worker's), in the order the workers list them."""
        seen: dict[str, router.SpeechModelState] = {}
        for worker in self.workers.values():
            state = worker.speech_state()
            if not state.online:
                continue
            for model in state.models:
                if model.kind == kind and model.model not in seen:
                    seen[model.model] = model
        return list(seen.values())

    def speech_candidates(self, request: router.SpeechRequest) -> list[router.SpeechCandidate]:
        """Workers for a speech job, best first (router.Router.rank_speech)."""
        states = [w.speech_state() for w in self.workers.values()]
        ranked = self.routing.rank_speech(states, request)
        if not ranked and request.model is not None:
            # The model asked for is nowhere now: any of its kind for the language.
            ranked = self.routing.rank_speech(states, replace(request, model=None))
        return ranked

    async def async_transcribe(
        self,
        audio: AsyncIterable[bytes],
        language: str | None,
        *,
        model: str | None = None,
    ) -> SpeechAnswer:
        """The text of an utterance streamed in (16 kHz 16-bit mono PCM), failing over.

        The audio goes to the best worker as it arrives, and is kept (`Utterance`):
        when that worker fails (connection, 5xx, a timeout), is busy (429) or refuses
        (4xx), the same audio goes to the next one; when it is slower than its own
        measured costs allow (the candidate's deadline after the audio's end), the
        next one gets the audio too and the first answer wins. Each worker runs one
        transcription of ours at a time (router.Router.begin_speech).

        Raises NoWorkerError when nobody answered, RequestRefusedError when every
        worker that answered refused the audio, and what the audio's source raised
        when it broke off.
        """
        utterance = Utterance()
        pump = asyncio.ensure_future(utterance.pump(audio))
        tried: set[str] = set()
        running: dict[asyncio.Task[str], router.SpeechCandidate] = {}
        started: dict[asyncio.Task[str], float] = {}
        hedged: set[asyncio.Task[str]] = set()
        refusals: list[tuple[str, HearthRequestError]] = []
        loop = asyncio.get_running_loop()

        def start_next() -> bool:
            request = router.SpeechRequest(
                router.STT,
                language=language,
                model=model,
                audio_s=max(utterance.seconds, 1.0),
            )
            for candidate in self.speech_candidates(request):
                worker = self.workers.get(candidate.worker_id)
                if worker is None or candidate.worker_id in tried:
                    continue
                tried.add(candidate.worker_id)
                self.routing.begin_speech(candidate.worker_id, router.STT)
                task = asyncio.ensure_future(
                    worker.client.transcribe_stream(
                        candidate.model,
                        utterance.replay(),
                        router.iso_language(language),
                        within_s=self.transcribe_timeout,
                    )
                )
                running[task] = candidate
                started[task] = loop.time()
                LOGGER.debug("Transcribing on %s (%s)", worker.name, candidate.reasons)
                return True
            return False

        def overdue_at() -> float | None:
            """When the newest attempt is overdue (None: not yet known, or never)."""
            if utterance.ended_at is None or not running:
                return None
            task = max(running, key=lambda t: started[t])
            deadline = running[task].deadline_s
            if deadline is None or task in hedged:
                return None
            return max(utterance.ended_at, started[task]) + deadline

        try:
            if not start_next():
                raise NoWorkerError
            while running:
                waits: set[asyncio.Future[Any]] = set(running)
                if utterance.ended_at is None:
                    waits.add(pump)
                due = overdue_at()
                timeout = None if due is None else max(0.0, due - loop.time())
                done, _ = await asyncio.wait(
                    waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if pump in done and (failed := pump.exception()) is not None:
                    raise failed  # the audio broke off: no text to give for it
                if not done and due is not None:
                    newest = max(running, key=lambda t: started[t])
                    hedged.add(newest)
                    worker_name = self._name(running[newest].worker_id)
                    if start_next():
                        LOGGER.info(
                            "Worker %s is slower than expected: the next one transcribes too",
                            worker_name,
                        )
                    continue
                for task in [t for t in running if t in done]:
                    candidate = running.pop(task)
                    self.routing.end_speech(candidate.worker_id, router.STT)
                    worker = self.workers.get(candidate.worker_id)
                    try:
                        text = task.result()
                    except HearthBusyError as err:
                        LOGGER.debug("Worker %s is busy, trying the next: %s", candidate, err)
                    except HearthRequestError as err:
                        LOGGER.info("Worker %s refused the audio: %s", candidate.worker_id, err)
                        refusals.append((self._name(candidate.worker_id), err))
                    except HearthError as err:
                        if worker is not None:
                            self._worker_failed(worker, err, answering=False)
                    else:
                        if worker is None:
                            continue
                        self._worker_answered(worker)
                        return SpeechAnswer(worker, candidate.model, text=text)
                    if not running and not start_next():
                        break
            if refusals:
                raise refusal_error(refusals)
            raise NoWorkerError
        finally:
            for task, candidate in running.items():
                task.cancel()
                self.routing.end_speech(candidate.worker_id, router.STT)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            if not pump.done():
                pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    def _name(self, entry_id: str) -> str:
        worker = self.workers.get(entry_id)
        return worker.name if worker is not None else entry_id

    def speech_sample_rate(self, language: str | None, model: str | None = None) -> int:
        """The sample rate of the voice `async_speak` would use first now (its own)."""
        ranked = self.speech_candidates(router.SpeechRequest(router.TTS, language, model))
        for candidate in ranked:
            for voice in self.speech_models(router.TTS):
                if voice.model == candidate.model:
                    return voice.sample_rate
        return router.DEFAULT_TTS_SAMPLE_RATE

    async def async_speak(
        self,
        text: str,
        language: str | None,
        *,
        model: str | None = None,
        voice: str | None = None,
        sample_rate: int | None = None,
    ) -> SpeechAnswer:
        """`text` spoken by the best worker (router.rank_speech), as raw PCM, failing over.

        The whole audio is collected before it is returned, so a worker that fails
        midway (connection, timeout) costs nothing but time: the next one speaks the
        text. `sample_rate`: the rate wanted (the worker resamples); None: the
        voice's own. Raises NoWorkerError when nobody spoke it,
        RequestRefusedError when every worker that answered refused it.
        """
        request = router.SpeechRequest(
            router.TTS, language=language, model=model, text_chars=len(text)
        )
        refusals: list[tuple[str, HearthRequestError]] = []
        for candidate in await self._async_speech_candidates(request):
            worker = self.workers.get(candidate.worker_id)
            if worker is None:
                continue
            rate = sample_rate or next(
                (m.sample_rate for m in worker.speech_models if m.id == candidate.model),
                router.DEFAULT_TTS_SAMPLE_RATE,
            )
            spoken_by = next((m for m in worker.speech_models if m.id == candidate.model), None)
            chosen_voice = voice if spoken_by is None or voice in spoken_by.voices else None
            self.routing.begin_speech(candidate.worker_id, router.TTS)
            try:
                pcm = await worker.client.speak(
                    candidate.model,
                    text,
                    sample_rate=rate,
                    voice=chosen_voice,
                    timeouts=self.speech_timeouts,
                )
            except HearthBusyError as err:
                LOGGER.debug("Worker %s is busy, trying the next: %s", worker.name, err)
                continue
            except HearthRequestError as err:
                LOGGER.info("Worker %s refused to speak: %s", worker.name, err)
                refusals.append((worker.name, err))
                continue
            except HearthError as err:
                self._worker_failed(worker, err, answering=False)
                continue
            finally:
                self.routing.end_speech(candidate.worker_id, router.TTS)
            self._worker_answered(worker)
            return SpeechAnswer(worker, candidate.model, pcm=pcm, sample_rate=rate)
        if refusals:
            raise refusal_error(refusals)
        raise NoWorkerError

    async def _async_speech_candidates(
        self, request: router.SpeechRequest
    ) -> list[router.SpeechCandidate]:
        """As `speech_candidates`; when none is online, the offline workers are polled
        first (as for chat: see async_candidates)."""
        if ranked := self.speech_candidates(request):
            return ranked
        offline = [w for w in self.workers.values() if not w.coordinator.last_update_success]
        if offline:
            polls = [w.coordinator.async_poll_now() for w in offline]
            await asyncio.wait(polls, timeout=REPOLL_TIMEOUT)
        return self.speech_candidates(request)

    def embedding_candidates(self, prompt_tokens: int = 1) -> list[router.Candidate]:
        """Online workers with an embedding model, best first (see router.Router.rank).

        Those serving the household's chosen embedding model (CONF_EMBEDDING_MODEL)
        come first, with that model; then the others, each with the first embedding
        model it lists. Reservations, household flags and circuit breakers count as
        for chat (an embedding reservation also counts against the worker's chat).
        """
        states = [
            w.state(models) for w in self.workers.values() if (models := w.embedding_models())
        ]
        request = _embedding_request(prompt_tokens)
        ranked: list[router.Candidate] = []
        if wanted := self.settings.get(CONF_EMBEDDING_MODEL):
            ranked = self.routing.rank(states, replace(request, model=str(wanted)))
        chosen = {candidate.worker_id for candidate in ranked}
        return ranked + [c for c in self.routing.rank(states, request) if c.worker_id not in chosen]

    def embedding_model(self) -> str | None:
        """The model `async_embed` would use first now; None: no online worker has one."""
        ranked = self.embedding_candidates()
        return ranked[0].model if ranked else None

    async def async_embed(
        self, texts: list[str], *, per_try_s: float | None = None
    ) -> tuple[str, list[list[float]]]:
        """Embeddings of `texts` from the best worker with an embedding model, failing over.

        Routed like chat (`embedding_candidates`): each try is reserved against its
        worker until it ends. A busy worker (429) or one that refuses the request
        (4xx) is passed over; one that fails (connection, 5xx, a malformed answer)
        opens its circuit breaker and is polled; an answer closes it. A try that
        outlives `per_try_s` (seconds; None: the client's own bound) is passed over
        without opening the breaker: that deadline is the caller's (a prompt waits
        little for relevance), not a sign the worker is gone. Offline workers are
        neither asked nor polled, for the same reason.

        Returns the model that answered and one vector per text. Raises
        NoWorkerError when no worker answered, RequestNotServableError when every
        worker that answered refused the request.
        """
        request = _embedding_request(max(1, sum(len(text) for text in texts) // 4))
        refusals: list[tuple[str, HearthRequestError]] = []
        for candidate in self.embedding_candidates(request.prompt_tokens):
            worker = self.workers.get(candidate.worker_id)
            if worker is None:
                continue
            reservation = self._reserve(candidate, replace(request, model=candidate.model))
            try:
                async with asyncio.timeout(per_try_s):
                    vectors = await worker.client.embeddings(candidate.model, texts)
            except HearthBusyError as err:
                LOGGER.debug("Worker %s is busy, trying the next: %s", worker.name, err)
                continue
            except HearthRequestError as err:
                LOGGER.info("Worker %s refused the embedding request: %s", worker.name, err)
                refusals.append((worker.name, err))
                continue
            except HearthError as err:
                self._worker_failed(worker, err, answering=False)
                continue
            except TimeoutError:
                LOGGER.debug("No embeddings from %s within %s s", worker.name, per_try_s)
                continue
            finally:
                self._release(reservation)
            self._worker_answered(worker)
            return candidate.model, vectors
        if refusals:
            raise refusal_error(refusals)
        raise NoWorkerError

    def largest_context(self) -> int:
        """The longest context (tokens) of any chat model in the household; 0 if unknown."""
        return max(
            (
                model.context_length
                for worker in self.workers.values()
                for model in worker.coordinator.info.models
                if model.kind == "chat"
            ),
            default=0,
        )

    def prompt_char_limit(self) -> int:
        """The longest request, in characters, that any household model might read."""
        if context := self.largest_context():
            return min(MAX_PROMPT_CHARS, context * CHARS_PER_TOKEN_CEILING)
        return MAX_PROMPT_CHARS

    async def _relay(
        self,
        worker: WorkerHandle,
        first: ChatDelta,
        deltas: AsyncGenerator[ChatDelta],
        reservation: router.Reservation,
    ) -> AsyncGenerator[ChatDelta]:
        """The answer after the peeked first delta; a failure becomes AnswerCutOffError.

        The reservation is released however the answer ends; only a whole answer
        tells the router how long answers of its purpose are.
        """
        completion_tokens: int | None = None
        cached_tokens: int | None = None
        try:
            yield first
            completion_tokens, cached_tokens = first.completion_tokens, first.cached_tokens
            async for delta in deltas:
                completion_tokens = delta.completion_tokens or completion_tokens
                if delta.cached_tokens is not None:
                    cached_tokens = delta.cached_tokens
                yield delta
        except HearthError as err:
            completion_tokens = None
            self._worker_failed(worker, err, answering=True)
            raise AnswerCutOffError(worker.name) from err
        else:
            self._worker_answered(worker)
        finally:
            self._release(
                reservation, completion_tokens=completion_tokens, cached_tokens=cached_tokens
            )
            await deltas.aclose()

    def _reserve(
        self, candidate: router.Candidate, request: router.RouteRequest
    ) -> router.Reservation:
        """Count a request against its worker until `_release` (router, sensors)."""
        reservation = self.routing.reserve(candidate, request)
        self._in_flight_changed(candidate.worker_id)
        return reservation

    def _release(
        self,
        reservation: router.Reservation,
        *,
        completion_tokens: int | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """The request is over; idempotent (see router.Router.release)."""
        self.routing.release(
            reservation, completion_tokens=completion_tokens, cached_tokens=cached_tokens
        )
        self._in_flight_changed(reservation.worker_id)

    @callback
    def _in_flight_changed(self, entry_id: str) -> None:
        """The worker's sensors show a request starting or ending at once, not at a poll."""
        if (worker := self.workers.get(entry_id)) is not None:
            worker.coordinator.async_set_in_flight(self.routing.in_flight(entry_id))

    # The one place where the household learns how a worker did with a chat request.
    def _worker_failed(self, worker: WorkerHandle, err: HearthError, *, answering: bool) -> None:
        self.routing.report_failure(worker.entry_id)  # the circuit breaker backs off
        worker.coordinator.async_poll_now()  # is it gone? known at once, not at the next poll
        if answering:
            LOGGER.warning("Worker %s broke off mid-answer: %s", worker.name, err)
        else:
            LOGGER.warning("Worker %s failed, trying the next: %s", worker.name, err)

    def _worker_answered(self, worker: WorkerHandle) -> None:
        self.routing.report_success(worker.entry_id)
        LOGGER.debug("Worker %s answered", worker.name)

    async def async_complete(
        self,
        body: dict[str, Any],
        *,
        purpose: str = "task",
        conversation_id: str | None = None,
    ) -> Completion:
        """Collect a whole answer before anyone sees it; a cut-off answer is asked again.

        For callers that pass nothing on while the answer comes (hearth.ask, AI
        tasks): a worker that breaks off mid-answer costs nobody anything yet, so the
        request goes to the next worker (never the ones that broke off). When every
        worker broke off, the longest partial answer is returned with `cut_off` set.
        Raises as async_open_chat when no worker produced anything.
        """
        broke_off: list[str] = []
        best: Completion | None = None
        while True:
            try:
                stream = await self.async_open_chat(
                    body, purpose=purpose, conversation_id=conversation_id, exclude=broke_off
                )
            except (NoWorkerError, RequestNotServableError):
                if best is not None:
                    return best
                raise
            deltas: list[ChatDelta] = []
            try:
                async for delta in stream.deltas:
                    deltas.append(delta)
            except AnswerCutOffError as err:
                broke_off.append(stream.worker.entry_id)
                partial = Completion(deltas, stream.worker, err)
                if best is None or len(partial.text) >= len(best.text):
                    best = partial
                LOGGER.info(
                    "Asking again: worker %s broke off before the answer was passed on",
                    stream.worker.name,
                )
                continue
            return Completion(deltas, stream.worker)

    async def async_ask(self, body: dict[str, Any], *, purpose: str = "task") -> AskResult:
        """Ask once and collect the whole answer text (see async_complete).

        Raises NoWorkerError or RequestNotServableError when no worker produced
        anything; when every worker broke off mid-answer, a partial result
        (`cut_off` set) with the longest answer one sent.
        """
        done = await self.async_complete(body, purpose=purpose)
        return AskResult(done.text.strip(), done.worker, done.cut_off)


DATA_HOUSEHOLD: HassKey[Household] = HassKey(DOMAIN)
