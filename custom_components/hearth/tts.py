"""The household's text-to-speech entity: the workers' voices together, routed.

One entity for the household (not one per worker): the voices are what the online
workers offer together (their /v1/models), and each request goes to the worker the
router picks for speech (router.rank_speech: never queued behind chat work when
another worker is free, so within a voice turn the answer's speech goes to another
worker than the one still generating it, when one is free).

Streamed (`async_stream_tts_audio`, what the voice pipeline uses): the answer's
text is cut into sentences as it arrives; each sentence is sent to a worker as soon
as it is complete and the next one is asked for while the previous one plays
(`LOOKAHEAD` sentences at once). The audio is one WAV stream: a header of unknown
length, then 16-bit mono PCM at one rate for every sentence (the workers resample).
A worker that fails on a sentence costs that sentence's time only: the next worker
speaks it (household.async_speak). One-shot (`async_get_tts_audio`, as `tts.speak`
may use): the whole message, one WAV with its lengths.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import wave
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from homeassistant.components import tts
from homeassistant.components.tts.entity import TTSAudioRequest, TTSAudioResponse
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from . import router
from .const import TTS_UNIQUE_ID
from .entity import HearthSpeechEntity, async_add_household_entity
from .household import SpeechAnswer

if TYPE_CHECKING:
    from . import HearthConfigEntry

PARALLEL_UPDATES = 0

# Sentences asked for at once: the one playing and the next.
LOOKAHEAD = 2
# A sentence ends at . ! ? … (after closing quotes or brackets) followed by white
# space, or at a line break; "3.5" stays whole (as the worker cuts).
_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*\s+|\n+")


async def sentences(text: AsyncIterable[str]) -> AsyncGenerator[str]:
    """The sentences of a text that streams in, each as soon as it is complete."""
    buffer = ""
    async for chunk in text:
        buffer += chunk
        while match := _SENTENCE_END.search(buffer):
            sentence, buffer = buffer[: match.end()].strip(), buffer[match.end() :]
            if sentence:
                yield sentence
    if rest := buffer.strip():
        yield rest


async def spoken(
    parts: AsyncIterable[str],
    speak: Callable[[str], Awaitable[SpeechAnswer]],
    lookahead: int = LOOKAHEAD,
) -> AsyncGenerator[bytes]:
    """Each part's audio in order, as soon as it is ready; up to `lookahead` parts are
    asked for at once (the next while the previous one plays)."""
    slots = asyncio.Semaphore(max(1, lookahead))
    queue: asyncio.Queue[asyncio.Task[SpeechAnswer] | BaseException | None] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for part in parts:
                await slots.acquire()
                queue.put_nowait(asyncio.ensure_future(speak(part)))
        except Exception as err:  # handed to the listener, raised there
            queue.put_nowait(err)
            return
        queue.put_nowait(None)

    producer = asyncio.ensure_future(produce())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            try:
                answer = await item
            finally:
                slots.release()
            yield answer.pcm
    finally:
        producer.cancel()
        left: list[asyncio.Future[Any]] = [producer]
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, asyncio.Task):
                item.cancel()
                left.append(item)
        await asyncio.gather(*left, return_exceptions=True)


def wav_header(sample_rate: int) -> bytes:
    """The header of a 16-bit mono WAV stream whose length is not known yet."""
    with io.BytesIO() as data:
        writer: wave.Wave_write = wave.open(data, "wb")  # noqa: SIM115 - closed below
        with writer:
            writer.setframerate(sample_rate)
            writer.setsampwidth(2)
            writer.setnchannels(1)
        return data.getvalue()


def wav(pcm: bytes, sample_rate: int) -> bytes:
    """A 16-bit mono WAV file holding `pcm`."""
    with io.BytesIO() as data:
        writer: wave.Wave_write = wave.open(data, "wb")  # noqa: SIM115 - closed below
        with writer:
            writer.setframerate(sample_rate)
            writer.setsampwidth(2)
            writer.setnchannels(1)
            writer.writeframes(pcm)
        return data.getvalue()


async def async_setup_entry(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    """The household's primary entry holds the entity; another takes it over later."""
    async_add_household_entity(hass, entry, async_add_entities, HearthTextToSpeechEntity)


class HearthTextToSpeechEntity(tts.TextToSpeechEntity, HearthSpeechEntity):
    """Speaks with the household workers' voices, on whichever worker the router picks."""

    _attr_translation_key = "text_to_speech"
    _attr_unique_id = TTS_UNIQUE_ID
    speech_kind = router.TTS

    @property
    def supported_languages(self) -> list[str]:
        return self.offered_languages()

    @property
    def supported_options(self) -> list[str]:
        return [tts.ATTR_VOICE]  # a voice id is a speech model's id

    @property
    def default_language(self) -> str:
        languages = self.supported_languages
        own = self.hass.config.language
        if own in languages:
            return own
        base = own.split("-")[0]
        return base if base in languages else languages[0]

    @callback
    def async_get_supported_voices(self, language: str) -> list[tts.Voice] | None:
        """The voices (speech models) offering `language`; the voice id is the model's."""
        return [
            tts.Voice(model.model, ", ".join(model.voices) or model.model)
            for model in self.household.speech_models(router.TTS)
            if model.offers(language)
        ]

    def _model(self, options: dict[str, Any]) -> str | None:
        voice = options.get(tts.ATTR_VOICE)
        return str(voice) if voice else None

    async def async_get_tts_audio(
        self, message: str, language: str, options: dict[str, Any]
    ) -> tts.TtsAudioType:
        """The whole message as one WAV file (a worker that fails: the next speaks it)."""
        answer = await self.household.async_speak(message, language, model=self._model(options))
        return "wav", wav(answer.pcm, answer.sample_rate)

    async def async_stream_tts_audio(self, request: TTSAudioRequest) -> TTSAudioResponse:
        """Speak the text as it streams in, sentence by sentence (see the module)."""
        model = self._model(request.options)
        rate = self.household.speech_sample_rate(request.language, model)

        async def speak(sentence: str) -> SpeechAnswer:
            return await self.household.async_speak(
                sentence, request.language, model=model, sample_rate=rate
            )

        async def audio() -> AsyncGenerator[bytes]:
            yield wav_header(rate)
            chunks = spoken(sentences(request.message_gen), speak)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                with contextlib.suppress(Exception):
                    await chunks.aclose()

        return TTSAudioResponse("wav", audio())
