"""Speech to text on the worker: ``POST /v1/audio/transcriptions``.

Two request forms, one answer (``{"text": ...}``, or ``text/plain`` with
``response_format=text``):

* OpenAI's: ``multipart/form-data`` with ``file`` (a WAV file: 16-bit PCM, any rate
  from 8 to 192 kHz, 1 to 8 channels), ``model``, ``language``, ``response_format``
  (``prompt`` and ``temperature`` are accepted and ignored);
* streamed raw audio, as Home Assistant sends it while the person speaks:
  ``audio/L16; rate=16000; channels=1`` (16-bit little-endian PCM, as Home Assistant
  sends it) or ``audio/wav``, possibly chunked, with ``model``, ``language`` and
  ``response_format`` as query parameters.

The body is consumed as it arrives: each piece is mixed down to mono at once and
kept, at most ``MAX_AUDIO_S`` seconds of it (beyond: 400 ``audio_too_long``, without
reading on); at the end it is resampled to the model's 16 kHz
(``speech.resample``). Anything but 16-bit PCM is a 400 ``unsupported_audio_format``.

One transcription per model at a time, in an executor (the event loop stays free):
another waits up to ``BUSY_WAIT_S`` (at most ``MAX_WAITING`` of them), else gets a
429 ``busy`` with Retry-After, as chat does when its queue is full; the client (Home
Assistant's router) then asks another worker. Speech is not queued behind chat.

The worker keeps no audio: nothing is written to disk, and nothing is logged above
DEBUG, where only sizes are. At start, where the worker has a voice
(``speech.py``), it speaks a fixed phrase and transcribes it (``SELF_CHECK_PHRASE``,
no user audio) to measure the speech models' costs for /v1/capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError

from . import api_types as types
from .admission import run_to_end
from .capacity import SpeechCosts
from .registry import Held, ModelRegistry, SttEngine
from .speech import SPEECH_HOST, SpeechError, resample
from .validation import ApiError, model_not_found, validate_body

_LOGGER = logging.getLogger(__name__)

MAX_AUDIO_S = types.MAX_TRANSCRIPTION_AUDIO_S
MIN_WAV_RATE = types.MIN_TRANSCRIPTION_RATE
MAX_WAV_RATE = types.MAX_TRANSCRIPTION_RATE
MAX_CHANNELS = 8
L16_RATE = 16000
# Bytes of a WAV file before its audio (its other chunks); of one form field.
MAX_WAV_HEADER_BYTES = 64 * 1024
MAX_FIELD_BYTES = 16 * 1024
# A body that sends nothing for this long is dropped (a person pauses for less).
IDLE_TIMEOUT_S = 20.0
BUSY_WAIT_S = 2.0
MAX_WAITING = 2
# A job's duration until one is measured (for Retry-After).
DEFAULT_JOB_S = 2.0
WAV_TYPES = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
SELF_CHECK_PHRASE = "Turn on the kitchen light."
# While requests keep the model busy, the self-check tries again this often, this long.
SELF_CHECK_RETRY_S = 0.25
SELF_CHECK_TRIES = 480
_WORDS = re.compile(r"[a-z0-9']+")
_PCM_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


def unsupported(message: str, param: str | None = "file") -> ApiError:
    return ApiError(
        400,
        f"{message}. Send 16-bit PCM: a WAV file (any rate from {MIN_WAV_RATE} to "
        f"{MAX_WAV_RATE} Hz, mono or stereo) or audio/L16; rate={L16_RATE}; channels=1",
        code="unsupported_audio_format",
        param=param,
    )


def too_long() -> ApiError:
    return ApiError(
        400,
        f"The audio is longer than {MAX_AUDIO_S} seconds",
        code="audio_too_long",
        param="file",
    )


def normalized_words(text: str) -> list[str]:
    """Lower-case words without punctuation: how transcripts are compared."""
    return _WORDS.findall(text.lower().replace("\u2019", "'"))


# -- audio as it arrives ----------------------------------------------------------------


class PcmCollector:
    """16-bit little-endian PCM of one rate and channel count, fed piece by piece:
    each whole frame is mixed down to mono at once; at most ``MAX_AUDIO_S`` seconds
    are kept (more is ``audio_too_long`` at once)."""

    def __init__(self, rate: int, channels: int) -> None:
        self.rate = rate
        self.channels = channels
        self._frame = 2 * channels
        self._limit = MAX_AUDIO_S * rate  # mono samples
        self._pending = b""  # a frame cut between two pieces
        self._mono = bytearray()

    @property
    def seconds(self) -> float:
        return len(self._mono) / 2 / self.rate

    def feed(self, data: bytes) -> None:
        data = self._pending + data
        whole = len(data) - len(data) % self._frame
        self._pending = data[whole:]
        if not whole:
            return
        if len(self._mono) // 2 + whole // self._frame > self._limit:
            raise too_long()
        if self.channels == 1:
            self._mono += data[:whole]
            return
        frames = np.frombuffer(data[:whole], dtype="<i2").reshape(-1, self.channels)
        mono = np.rint(frames.astype(np.float64).mean(axis=1)).astype("<i2")
        self._mono += mono.tobytes()

    def finish(self, rate: int) -> bytes:
        """The mono audio at ``rate`` (a half frame at the end is dropped)."""
        return resample(bytes(self._mono), self.rate, rate)


def _wav_format(fmt: bytes) -> tuple[int, int]:
    """A WAV ``fmt `` chunk's rate and channels; a 400 unless it is 16-bit PCM."""
    if len(fmt) < 16:
        raise unsupported("The WAV file's format chunk is incomplete")
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE and len(fmt) >= 40:  # WAVE_FORMAT_EXTENSIBLE: the subformat says
        tag = struct.unpack("<H", fmt[24:26])[0] if fmt[26:40] == _PCM_GUID_TAIL else 0
    if tag == 3:
        raise unsupported("The WAV file holds floating-point samples")
    if tag != 1:
        raise unsupported(f"The WAV file is not PCM (format {tag:#06x})")
    if bits != 16:
        raise unsupported(f"The WAV file has {bits}-bit samples")
    if not 1 <= channels <= MAX_CHANNELS:
        raise unsupported(f"The WAV file has {channels} channels")
    if not MIN_WAV_RATE <= rate <= MAX_WAV_RATE:
        raise unsupported(f"The WAV file's rate is {rate} Hz")
    return rate, channels


class WavReader:
    """A WAV file read as it arrives: its chunks up to ``data``, then the audio into a
    ``PcmCollector`` (to the data chunk's end, or the body's when its size is unknown,
    as in a streamed WAV)."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._fmt: bytes | None = None
        self._audio: PcmCollector | None = None
        self._left: int | None = None  # audio bytes still to come (None: to the end)

    def feed(self, data: bytes) -> None:
        if self._audio is None:
            self._head += data
            self._parse_head()
            return
        if self._left is not None:
            data = data[: self._left]
            self._left -= len(data)
        self._audio.feed(data)

    def _parse_head(self) -> None:
        head = self._head
        if len(head) >= 12 and (head[:4] != b"RIFF" or head[8:12] != b"WAVE"):
            raise unsupported("The audio is not a WAV file")
        if len(head) < 4 and not b"RIFF".startswith(bytes(head)):
            raise unsupported("The audio is not a WAV file")
        at = 12
        while len(head) >= at + 8:
            kind, size = head[at : at + 4], struct.unpack("<I", head[at + 4 : at + 8])[0]
            if kind == b"data":
                if self._fmt is None:
                    raise unsupported("The WAV file has no format chunk before its audio")
                rate, channels = _wav_format(self._fmt)
                self._audio = PcmCollector(rate, channels)
                if size not in _UNKNOWN_SIZES:
                    if size // (2 * channels) > MAX_AUDIO_S * rate:
                        raise too_long()
                    self._left = size
                rest = bytes(head[at + 8 :])
                self._head = bytearray()
                self.feed(rest)
                return
            end = at + 8 + size + (size & 1)
            if end > MAX_WAV_HEADER_BYTES:
                raise unsupported("The WAV file has too much before its audio")
            if len(head) < end:
                return  # the rest of this chunk is still coming
            if kind == b"fmt ":
                self._fmt = bytes(head[at + 8 : at + 8 + size])
                _wav_format(self._fmt)  # refused as soon as it is read
            at = end
        if len(head) > MAX_WAV_HEADER_BYTES:
            raise unsupported("The WAV file has too much before its audio")

    @property
    def seconds(self) -> float:
        return 0.0 if self._audio is None else self._audio.seconds

    def finish(self, rate: int) -> bytes:
        if self._audio is None:
            raise unsupported("The WAV file ends before its audio")
        return self._audio.finish(rate)


AudioSink = PcmCollector | WavReader


def raw_sink(content_type: str) -> AudioSink:
    """The reader for a raw body of this Content-Type; a 400 for any other audio."""
    mime = parse_mimetype(content_type)
    kind = f"{mime.type}/{mime.subtype}"
    if kind in WAV_TYPES:
        return WavReader()
    if kind == "audio/l16":
        params = {key.lower(): value.strip() for key, value in mime.parameters.items()}
        rate = params.get("rate", str(L16_RATE))
        channels = params.get("channels", "1")
        if rate != str(L16_RATE) or channels != "1":
            raise unsupported(
                f"audio/L16 is taken at rate={L16_RATE}; channels=1 only "
                f"(got rate={rate}; channels={channels})",
                param=None,
            )
        return PcmCollector(L16_RATE, 1)
    raise unsupported(f"Content-Type {kind!r} is not taken here", param=None)


async def read_into(read: Callable[[], Awaitable[bytes]], sink: AudioSink) -> int:
    """Feed ``sink`` each piece ``read`` gives until the end; the bytes read."""
    total = 0
    while True:
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                piece = await read()
        except TimeoutError as err:
            raise ApiError(
                408,
                f"No audio came for {IDLE_TIMEOUT_S:.0f} seconds",
                code="request_timeout",
            ) from err
        if not piece:
            return total
        total += len(piece)
        sink.feed(piece)


# -- one STT job per model ------------------------------------------------------------


class SttBusy(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"busy, retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Slot:
    lock: asyncio.Lock
    waiting: int = 0


class SttSlots:
    """One transcription per model at a time; a few may wait, briefly."""

    def __init__(
        self,
        costs: SpeechCosts,
        wait_s: float = BUSY_WAIT_S,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.costs = costs
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self._slots: dict[str, _Slot] = {}

    def _retry_after(self, model_id: str, slot: _Slot) -> int:
        job_s = self.costs.estimate_stt_s(model_id, 5.0) or DEFAULT_JOB_S
        return max(1, math.ceil(job_s * (slot.waiting + 1)))

    @contextlib.asynccontextmanager
    async def hold(self, model_id: str, wait_s: float | None = None) -> AsyncIterator[None]:
        """The model's slot, waiting up to ``wait_s``; SttBusy when it stays taken."""
        slot = self._slots.setdefault(model_id, _Slot(asyncio.Lock()))
        if slot.lock.locked():
            if slot.waiting >= self.max_waiting:
                raise SttBusy(self._retry_after(model_id, slot))
            slot.waiting += 1
            try:
                async with asyncio.timeout(self.wait_s if wait_s is None else wait_s):
                    await slot.lock.acquire()
            except TimeoutError as err:
                raise SttBusy(self._retry_after(model_id, slot)) from err
            finally:
                slot.waiting -= 1
        else:
            await slot.lock.acquire()
        try:
            yield
        finally:
            slot.lock.release()


# -- HTTP ---------------------------------------------------------------------------------


def parse_params(values: Mapping[str, str]) -> types.TranscriptionRequest:
    """The request's parameters (form fields, or the query's); others are ignored."""
    if not values.get("model"):
        raise ApiError(
            400,
            "'model' is required: a form field, or with raw audio a query parameter "
            "(/v1/audio/transcriptions?model=...)",
            code="model_required",
            param="model",
        )
    given = {k: v for k, v in values.items() if k in types.TRANSCRIPTION_PARAMS}
    if given.get("language") == "":
        del given["language"]
    return validate_body(types.TranscriptionRequest, given)


async def _field(part: BodyPartReader) -> str:
    """A small form field's text."""
    data = bytearray()
    while chunk := await part.read_chunk(4096):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise ApiError(
                413,
                f"Form field {part.name!r} is too large (at most {MAX_FIELD_BYTES} bytes)",
                code="body_too_large",
                param=part.name,
            )
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"Form field {part.name!r} is not UTF-8", param=part.name) from err


class TranscriptionHost:
    """``POST /v1/audio/transcriptions`` over the registry's speech-to-text models."""

    def __init__(self, registry: ModelRegistry, slots: SttSlots | None = None) -> None:
        self.registry = registry
        self.costs = registry.speech_costs
        self.slots = slots if slots is not None else SttSlots(self.costs)

    def _hold(self, model_id: str) -> Held[SttEngine]:
        try:
            return self.registry.hold_stt(model_id)
        except KeyError as err:
            raise model_not_found(model_id, "speech-to-text", self.registry.stt_models) from err

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/audio/transcriptions``, either form."""
        mime = parse_mimetype(request.headers.get("Content-Type", ""))
        if f"{mime.type}/{mime.subtype}" == "multipart/form-data":
            return await self._multipart(request)
        params = parse_params(request.query)
        with self._hold(params.model) as engine:
            _language(params.language, engine)  # refused before the audio comes
            sink = raw_sink(request.headers.get("Content-Type", ""))
            try:
                size = await read_into(request.content.readany, sink)
            except HttpProcessingError as err:  # a broken chunk
                raise ApiError(400, f"Malformed body: {err.message}") from err
            return await self._answer(params, engine, sink, size)

    async def _multipart(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._read_form(request)
        except _MALFORMED as err:
            message = " ".join(str(err).split())[:200]
            raise ApiError(400, f"Malformed multipart body: {message}") from err

    async def _read_form(self, request: web.Request) -> web.StreamResponse:
        reader = await request.multipart()
        fields: dict[str, str] = {}
        held: Held[SttEngine] | None = None
        sink: WavReader | None = None
        size = 0
        try:
            while True:
                part = await reader.next()
                if part is None:
                    break
                if isinstance(part, MultipartReader):
                    raise ApiError(400, "Nested multipart bodies are not taken here")
                if part.name == "file":
                    if sink is not None:
                        raise ApiError(400, "Send one 'file'", param="file")
                    sink = WavReader()
                    size = await read_into(functools.partial(part.read_chunk, 64 * 1024), sink)
                    continue
                value = await _field(part)
                if part.name is not None and part.name not in fields:
                    fields[part.name] = value
                if part.name == "model" and held is None:
                    held = self._hold(parse_params({"model": value}).model)
                    held.__enter__()  # a removal of the model waits for this request
            params = parse_params(fields)
            if sink is None:
                raise ApiError(400, "'file' is required: the audio, a WAV file", param="file")
            if held is None:
                held = self._hold(params.model)
                held.__enter__()
            return await self._answer(params, held.engine, sink, size)
        finally:
            if held is not None:
                held.__exit__(None, None, None)

    async def _answer(
        self,
        params: types.TranscriptionRequest,
        engine: SttEngine,
        sink: AudioSink,
        size: int,
    ) -> web.StreamResponse:
        language = _language(params.language, engine)
        loop = asyncio.get_running_loop()
        pcm = await run_to_end(loop.run_in_executor(None, sink.finish, engine.sample_rate))
        audio_s = len(pcm) / 2 / engine.sample_rate
        _LOGGER.debug("Transcribing %d bytes received, %.1f s of audio", size, audio_s)
        text = ""
        if pcm:
            try:
                async with self.slots.hold(params.model):
                    started = time.perf_counter()
                    text = await run_to_end(
                        loop.run_in_executor(None, engine.transcribe, pcm, language)
                    )
                    elapsed = time.perf_counter() - started
            except SttBusy as err:
                raise ApiError(
                    429,
                    "This worker is transcribing; try again shortly or use another worker",
                    code="busy",
                    type_="rate_limit_error",
                    headers={"Retry-After": str(err.retry_after)},
                ) from err
            self.costs.record_stt(params.model, audio_s=audio_s, elapsed_s=elapsed)
            _LOGGER.debug("Transcribed in %.0f ms: %d characters", elapsed * 1000, len(text))
        text = text.strip()
        if params.response_format == "text":
            return web.Response(text=text, content_type="text/plain")
        return web.json_response({"text": text})

    # -- the self-check at start ----------------------------------------------------------

    async def self_check(self, app: web.Application) -> None:
        """Speak ``SELF_CHECK_PHRASE`` with a voice of this worker and transcribe it,
        once and twice in a row, with each speech-to-text model: the first costs."""
        stt = self.registry.stt_models
        host = app.get(SPEECH_HOST)
        if not stt or host is None:
            return
        loop = asyncio.get_running_loop()
        voices = await loop.run_in_executor(None, lambda: host.voices)
        if not voices:
            _LOGGER.debug("No voice to check speech to text with: costs come from requests")
            return
        voice = next(iter(voices.values()))
        piper = host.process(voice)
        try:
            await piper.start()
            started = time.perf_counter()
            spoken = await piper.synthesize(SELF_CHECK_PHRASE)
            synthesis_s = time.perf_counter() - started
        except SpeechError as err:
            _LOGGER.warning("Speech self-check: %s", err)
            return
        voice_s = len(spoken) / 2 / piper.sample_rate
        self.costs.record_tts(
            voice.name, first_audio_s=synthesis_s, audio_s=voice_s, synthesis_s=synthesis_s
        )
        expected = normalized_words(SELF_CHECK_PHRASE)
        for model_id, engine in stt.items():
            once = await loop.run_in_executor(
                None, resample, spoken, piper.sample_rate, engine.sample_rate
            )
            pause = bytes(2 * (engine.sample_rate // 2))
            language = _language(_language_of(voice.languages), engine, strict=False)
            matched = 0
            for pcm, times in ((once, 1), (once + pause + once, 2)):
                done = await self._check_when_free(model_id, engine, pcm, language)
                if done is None:
                    break
                text, elapsed = done
                self.costs.record_stt(
                    model_id, audio_s=len(pcm) / 2 / engine.sample_rate, elapsed_s=elapsed
                )
                matched += normalized_words(text) == expected * times
            costs = self.costs.stt(model_id)
            _LOGGER.info(
                "Speech self-check with %s and %s: %s/2 transcripts matched; fixed %s ms, "
                "%s ms per second of audio",
                voice.name,
                model_id,
                matched,
                costs["stt_fixed_ms"],
                costs["stt_ms_per_audio_s"],
            )

    async def _check_when_free(
        self, model_id: str, engine: SttEngine, pcm: bytes, language: str | None
    ) -> tuple[str, float] | None:
        """The self-check's transcription and its seconds, once the model is free:
        requests go first (one arriving meanwhile does not wait for the check), and the
        check waits its turn instead of going without costs. None: never free."""
        loop = asyncio.get_running_loop()
        for _ in range(SELF_CHECK_TRIES):
            try:
                async with self.slots.hold(model_id, wait_s=0):
                    began = time.perf_counter()
                    text = await run_to_end(
                        loop.run_in_executor(None, engine.transcribe, pcm, language)
                    )
                    return text, time.perf_counter() - began
            except SttBusy:
                await asyncio.sleep(SELF_CHECK_RETRY_S)
        return None


def _language_of(languages: list[str]) -> str | None:
    return languages[0] if languages else None


def _language(given: str | None, engine: SttEngine, *, strict: bool = True) -> str | None:
    """ISO 639-1 (``en``; ``en-US`` and ``en_US`` are taken as ``en``), one of the
    model's languages; None: the model finds out."""
    if given is None:
        return None
    code = re.split(r"[-_]", given.strip().lower(), maxsplit=1)[0]
    languages = [str(x).lower() for x in engine.languages]
    if code in languages or not languages:
        return code
    if not strict:
        return None
    raise ApiError(
        400,
        f"Language {given!r} is not one of this model's ({', '.join(languages[:20])}"
        f"{', ...' if len(languages) > 20 else ''})",
        code="unsupported_language",
        param="language",
    )


# What aiohttp's multipart reader raises for a body that is not well-formed.
_MALFORMED = (ValueError, AssertionError, KeyError, IndexError, HttpProcessingError)

TRANSCRIPTION_HOST = web.AppKey("hearth_transcription", TranscriptionHost)


def install(
    app: web.Application, registry: ModelRegistry, slots: SttSlots | None = None
) -> TranscriptionHost:
    """Serve ``POST /v1/audio/transcriptions`` in ``app`` (behind its auth middleware)
    with the registry's speech-to-text models; the self-check runs in the background
    once the app has started (not with ``--no-warmup``)."""
    host = TranscriptionHost(registry, slots)
    app[TRANSCRIPTION_HOST] = host
    app.router.add_post("/v1/audio/transcriptions", host.handle)

    async def _check(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(host.self_check(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    if registry.warmup:
        app.cleanup_ctx.append(_check)
    return host


def models_json(registry: ModelRegistry) -> list[dict[str, Any]]:
    """The speech-to-text models as /v1/models lists them: OpenAI's shape, with the
    contract's ``kind``, ``languages`` and ``sample_rate`` at the top and in ``hearth``."""
    out: list[dict[str, Any]] = []
    manifests = registry.manifests
    for model_id, engine in registry.stt_models.items():
        manifest = manifests[model_id]
        try:
            created = int(manifest.path.stat().st_mtime)
        except OSError:
            created = 0
        details = {
            "kind": "stt",
            "languages": list(engine.languages),
            "sample_rate": int(engine.sample_rate),
        }
        out.append(
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "hearth",
                **details,
                "hearth": {
                    "id": model_id,
                    **details,
                    "runtime": manifest.runtime,
                    "quantization": manifest.quantization,
                    "size_bytes": manifest.size_bytes,
                    "max_audio_s": MAX_AUDIO_S,
                },
            }
        )
    return out


async def capacity_models(app: web.Application, registry: ModelRegistry) -> dict[str, Any]:
    """The speech models' entries in /v1/capacity's ``models``: their measured costs."""
    costs = registry.speech_costs
    models: dict[str, Any] = {
        name: {**costs.stt(name), "loaded": True} for name in registry.stt_models
    }
    host = app.get(SPEECH_HOST)
    if host is not None:
        loop = asyncio.get_running_loop()
        voices = await loop.run_in_executor(None, lambda: host.voices)
        models |= {name: {**costs.tts(name), "loaded": host.is_warm(name)} for name in voices}
    return models
