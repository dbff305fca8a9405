"""The household's speech-to-text entity: the workers' models together, routed.

One entity for the household (not one per worker): the languages are what the online
workers' speech-to-text models offer together (their /v1/models). Home Assistant
streams the utterance (16 kHz, 16-bit, mono PCM) while the person speaks; it goes on
to the worker the router picks at once, and is kept here: a worker that fails, or is
slower than its measured costs allow, is replaced by the next one with the same
audio, and the first answer wins (household.async_transcribe).

Home Assistant 2025.4.4 and 2026.2.3 have no partial-results variant of
`async_process_audio_stream`; only the final text is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import replace
from typing import TYPE_CHECKING

from homeassistant.components import stt
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from . import router
from .const import LOGGER, STT_UNIQUE_ID
from .entity import HearthSpeechEntity, async_add_household_entity

if TYPE_CHECKING:
    from . import HearthConfigEntry

PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    """The household's primary entry holds the entity; another takes it over later."""
    async_add_household_entity(hass, entry, async_add_entities, HearthSpeechToTextEntity)


class HearthSpeechToTextEntity(stt.SpeechToTextEntity, HearthSpeechEntity):
    """Transcribes with the household workers' models, on whichever the router picks."""

    _attr_translation_key = "speech_to_text"
    _attr_unique_id = STT_UNIQUE_ID
    speech_kind = router.STT

    @property
    def supported_languages(self) -> list[str]:
        return self.offered_languages()

    @property
    def supported_formats(self) -> list[stt.AudioFormats]:
        return [stt.AudioFormats.WAV]

    @property
    def supported_codecs(self) -> list[stt.AudioCodecs]:
        return [stt.AudioCodecs.PCM]

    @property
    def supported_bit_rates(self) -> list[stt.AudioBitRates]:
        return [stt.AudioBitRates.BITRATE_16]

    @property
    def supported_sample_rates(self) -> list[stt.AudioSampleRates]:
        return [stt.AudioSampleRates.SAMPLERATE_16000]

    @property
    def supported_channels(self) -> list[stt.AudioChannels]:
        return [stt.AudioChannels.CHANNEL_MONO]

    @callback
    def check_metadata(self, metadata: stt.SpeechMetadata) -> bool:
        """As Home Assistant checks it, a regional language ("en-US") counting as its
        base language ("en") when only that is offered: Whisper's languages are bare."""
        offered = self.supported_languages
        language = router.language_tag(metadata.language)
        if language not in offered and language.split("-")[0] in offered:
            metadata = replace(metadata, language=language.split("-")[0])
        return super().check_metadata(metadata)

    async def async_process_audio_stream(
        self, metadata: stt.SpeechMetadata, stream: AsyncIterable[bytes]
    ) -> stt.SpeechResult:
        """The utterance's text (raw PCM streamed in), or an error result."""
        try:
            answer = await self.household.async_transcribe(stream, metadata.language)
        except HomeAssistantError as err:
            LOGGER.warning("No worker could transcribe the audio: %s", err)
            return stt.SpeechResult(None, stt.SpeechResultState.ERROR)
        return stt.SpeechResult(answer.text, stt.SpeechResultState.SUCCESS)
