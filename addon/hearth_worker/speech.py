"""Text to speech on the worker: ``POST /v1/audio/speech`` with Piper voices.

A Piper voice is a folder in the models directory (``--models-dir``), or given
with ``--model``, holding the voice's ``*.onnx`` and ``*.onnx.json`` and a
``hearth-model.json`` of kind ``tts`` (``import_piper_voice`` writes it).
``/v1/models`` lists each voice with its languages, speaker and sample rate.

Piper is GPL-3.0-or-later (it bundles espeak-ng); the worker is Apache-2.0. So the
worker never imports it: each voice is spoken by a child process
(``piper_child.py``, started with this Python, talking through its stdin and
stdout only, no socket), started in the background when the worker starts (a
voice added later: at its first request) and kept warm.

A request's text is cut into sentences; each is synthesized, resampled to the rate
asked for (numpy: a windowed-sinc low-pass when going down, then linear
interpolation) and sent as soon as it is ready, while the next one is synthesized.
WAV answers start with a header of unknown (streaming) length, then the PCM. The
worker keeps no text or audio: nothing is written to disk, nothing logged above
DEBUG, and the DEBUG lines say only sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import struct
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

from . import api_types as types
from .capacity import SpeechCosts
from .validation import ApiError, model_not_found, parse_json_object, validate_body
from .voices import (
    Voice,
    import_piper_voice,
    read_voice,
    scan_voices,
)

_LOGGER = logging.getLogger(__name__)

MAX_INPUT_CHARS = types.MAX_SPEECH_INPUT_CHARS  # OpenAI's limit for `input`
CHILD = Path(__file__).with_name("piper_child.py")
START_TIMEOUT_S = 120.0
# A sentence ends at . ! ? (or a line break) followed by space; decimals stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")


class SpeechError(Exception):
    """The voice's process failed or could not be started."""


# -- audio ------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """The text's sentences, in order, none empty."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part and part.strip()]


def _lowpass(x: npt.NDArray[np.float64], cutoff: float, taps: int = 63) -> npt.NDArray[np.float64]:
    """A windowed-sinc low-pass; ``cutoff`` in cycles per sample (below 0.5)."""
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
    h /= h.sum()
    return np.asarray(np.convolve(x, h, mode="same"), dtype=np.float64)


def resample(pcm: bytes, src_rate: int, dst_rate: int) -> bytes:
    """16-bit little-endian mono PCM from ``src_rate`` to ``dst_rate``."""
    if src_rate == dst_rate or not pcm:
        return pcm
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if dst_rate < src_rate:  # no aliasing: cut what the new rate cannot hold
        x = _lowpass(x, 0.45 * dst_rate / src_rate)
    count = round(len(x) * dst_rate / src_rate)
    positions = np.arange(count) * (src_rate / dst_rate)
    y = np.interp(positions, np.arange(len(x)), x)
    return bytes(np.clip(np.rint(y), -32768, 32767).astype("<i2").tobytes())


def wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header whose lengths are unknown (0xFFFFFFFF): a stream."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )


async def stream_speech(
    synthesize: Callable[[str], Awaitable[bytes]],
    sentences: list[str],
    *,
    src_rate: int,
    dst_rate: int,
    response_format: str,
) -> AsyncGenerator[bytes]:
    """The answer's bytes: (a WAV header, then) each sentence's PCM as soon as it is
    ready, the next sentence being synthesized while this one is sent."""
    if response_format == "wav":
        yield wav_header(dst_rate)
    if not sentences:
        return
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[bytes] = asyncio.ensure_future(synthesize(sentences[0]))
    try:
        for index in range(len(sentences)):
            pcm = await asyncio.shield(pending)  # a listener gone: the child ends it
            if index + 1 < len(sentences):
                pending = asyncio.ensure_future(synthesize(sentences[index + 1]))
            yield await loop.run_in_executor(None, resample, pcm, src_rate, dst_rate)
    finally:
        if not pending.done():
            # The listener went away: the sentence under way ends in the child (so
            # its process stays in step), its audio is dropped.
            pending.add_done_callback(_drop_result)


def _drop_result(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


# -- the Piper process --------------------------------------------------------------


class PiperProcess:
    """One voice's child process (``piper_child.py``): one sentence at a time."""

    def __init__(self, voice: Voice) -> None:
        self.voice = voice
        self.sample_rate = voice.sample_rate
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def _read_frame(self) -> tuple[bytes, bytes]:
        assert self._process is not None and self._process.stdout is not None
        head = await self._process.stdout.readexactly(5)
        size = struct.unpack(">I", head[1:])[0]
        payload = await self._process.stdout.readexactly(size) if size else b""
        return head[:1], payload

    async def _start(self) -> None:
        started = time.perf_counter()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # isolated: no user site, no PYTHON* variables, not the worker's cwd
            str(CHILD),
            "--model",
            str(self.voice.onnx),
            "--config",
            str(self.voice.config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # Piper's own messages may quote the text
            cwd=str(self.voice.path),
        )
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                kind, payload = await self._read_frame()
        except (TimeoutError, asyncio.IncompleteReadError) as err:
            await self._kill()
            raise SpeechError(
                f"The Piper process for {self.voice.name} did not start (is piper-tts installed?)"
            ) from err
        if kind != b"R":
            await self._kill()
            raise SpeechError(f"The Piper process for {self.voice.name} did not start")
        self.sample_rate = int(json.loads(payload)["sample_rate"])
        _LOGGER.info(
            "Voice %s ready in %.1f s (Piper process %d)",
            self.voice.name,
            time.perf_counter() - started,
            self._process.pid,
        )

    async def start(self) -> None:
        """Load the voice (if not yet); it stays warm for the next requests."""
        async with self._lock:
            if self._process is None or self._process.returncode is not None:
                await self._start()

    async def synthesize(self, text: str, length_scale: float | None = None) -> bytes:
        """One piece of text as 16-bit mono PCM at the voice's rate."""
        async with self._lock:
            if self._process is None or self._process.returncode is not None:
                await self._start()
            assert self._process is not None and self._process.stdin is not None
            audio = bytearray()
            try:
                line = json.dumps({"text": text, "length_scale": length_scale}) + "\n"
                self._process.stdin.write(line.encode())
                await self._process.stdin.drain()
                while True:
                    kind, payload = await self._read_frame()
                    if kind == b"A":
                        audio += payload
                    elif kind == b"E":
                        return bytes(audio)
                    else:
                        raise SpeechError(
                            f"Piper could not speak this ({payload.decode(errors='replace')})"
                        )
            except (OSError, asyncio.IncompleteReadError) as err:
                await self._kill()
                raise SpeechError(f"The Piper process for {self.voice.name} ended") from err
            except asyncio.CancelledError:
                await self._kill()  # out of step with the child: start afresh next time
                raise

    async def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def close(self) -> None:
        async with self._lock:
            process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()  # the child ends at the end of its input
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


# -- HTTP -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechRequest:
    model: str
    input: str
    voice: str | None
    response_format: str
    sample_rate: int | None
    speed: float


def parse_speech_request(data: dict[str, Any]) -> SpeechRequest:
    """OpenAI's ``audio.speech.create`` body, with Hearth's ``sample_rate``
    (``api_types.SpeechRequest``, which openapi.yaml declares); a 400 naming the
    parameter for anything this worker cannot do."""
    req = validate_body(types.SpeechRequest, data)
    return SpeechRequest(
        model=req.model,
        input=req.input,
        voice=req.voice,
        response_format=req.response_format or "wav",
        sample_rate=req.sample_rate,
        speed=1.0 if req.speed is None else float(req.speed),
    )


class SpeechHost:
    """The voices a worker serves and their Piper processes."""

    def __init__(
        self,
        models_dir: Path | None,
        folders: list[Path] = [],  # noqa: B006
        costs: SpeechCosts | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.folders = list(folders)
        self.costs = costs  # each answer's time to first audio and real-time factor
        self._processes: dict[str, PiperProcess] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def voices(self) -> dict[str, Voice]:
        """The voices in the models directory now (a folder added is served at once)."""
        return scan_voices(self.models_dir, self.folders)

    def models_json(self) -> list[dict[str, Any]]:
        return [voice.model_json() for voice in self.voices.values()]

    def is_warm(self, name: str) -> bool:
        """Whether the voice's Piper process is running (its next answer starts at once)."""
        process = self._processes.get(name)
        return process is not None and process.running

    def process(self, voice: Voice) -> PiperProcess:
        """The voice's process (not started yet when new)."""
        process = self._processes.get(voice.name)
        if process is None or process.voice != voice:
            if process is not None:  # the folder changed: the old one ends when idle
                self._retire(process)
            process = self._processes[voice.name] = PiperProcess(voice)
        return process

    def prune(self, voices: dict[str, Voice]) -> None:
        """End the processes of voices no longer in the models directory."""
        for name in [name for name in self._processes if name not in voices]:
            self._retire(self._processes.pop(name))

    def _retire(self, process: PiperProcess) -> None:
        task = asyncio.get_running_loop().create_task(process.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def warm_up(self) -> None:
        """Start every voice's process (at the worker's start: the first answer is fast)."""
        loop = asyncio.get_running_loop()
        voices = await loop.run_in_executor(None, lambda: self.voices)
        for voice in voices.values():
            try:
                await self.process(voice).start()
            except SpeechError as err:
                _LOGGER.warning("%s", err)

    async def close(self) -> None:
        for process in list(self._processes.values()):
            await process.close()
        self._processes.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/audio/speech``."""
        # The body's limits are the other endpoints' (depth, numbers, Unicode text).
        req = parse_speech_request(parse_json_object(await request.read()))
        loop = asyncio.get_running_loop()
        voices = await loop.run_in_executor(None, lambda: self.voices)
        self.prune(voices)
        voice = voices.get(req.model)
        if voice is None:
            raise model_not_found(req.model, "speech", voices)
        if req.voice not in (None, voice.speaker, voice.name):
            raise ApiError(
                400,
                f"Voice {req.voice!r} is not one of {req.model!r}'s (voices: [{voice.speaker!r}])",
                param="voice",
            )
        piper = self.process(voice)
        try:
            await piper.start()
        except SpeechError as err:
            raise ApiError(503, str(err), code="voice_unavailable", type_="server_error") from err
        rate = req.sample_rate or piper.sample_rate
        sentences = split_sentences(req.input)
        _LOGGER.debug("Speaking %d characters in %d sentence(s)", len(req.input), len(sentences))
        length_scale = None if req.speed == 1.0 else 1.0 / req.speed
        content_type = "audio/wav" if req.response_format == "wav" else "audio/pcm"
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type,
                "X-Hearth-Sample-Rate": str(rate),
                "Cache-Control": "no-store",
            }
        )
        response.enable_chunked_encoding()

        started = time.perf_counter()
        timing = {"first_audio_s": math.nan, "synthesis_s": 0.0, "samples": 0.0}

        async def synthesize(sentence: str) -> bytes:
            begun = time.perf_counter()
            pcm = await piper.synthesize(sentence, length_scale)
            done = time.perf_counter()
            if math.isnan(timing["first_audio_s"]):
                timing["first_audio_s"] = done - started
            timing["synthesis_s"] += done - begun
            timing["samples"] += len(pcm) // 2
            return pcm

        chunks = stream_speech(
            synthesize,
            sentences,
            src_rate=piper.sample_rate,
            dst_rate=rate,
            response_format=req.response_format,
        )
        try:
            async for chunk in chunks:
                if not response.prepared:
                    await response.prepare(request)
                await response.write(chunk)
        except SpeechError as err:
            if not response.prepared:
                raise ApiError(
                    503, str(err), code="voice_unavailable", type_="server_error"
                ) from err
            _LOGGER.warning("Speech ended early: %s", err)  # the answer is cut short
        finally:
            await chunks.aclose()
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        if self.costs is not None:
            self.costs.record_tts(
                voice.name,
                first_audio_s=timing["first_audio_s"],
                audio_s=timing["samples"] / piper.sample_rate,
                synthesis_s=timing["synthesis_s"],
            )
        return response


SPEECH_HOST = web.AppKey("hearth_speech", SpeechHost)


def install(
    app: web.Application,
    models_dir: Path | None,
    folders: list[Path] = [],  # noqa: B006
    costs: SpeechCosts | None = None,
) -> SpeechHost:
    """Serve ``POST /v1/audio/speech`` in ``app`` (behind its auth middleware), with
    the voices in ``models_dir`` and those among ``folders`` (``--model``; other
    folders are the registry's): their processes start with the app (in the
    background) and end with it."""
    host = SpeechHost(models_dir, folders, costs)
    app[SPEECH_HOST] = host
    app.router.add_post("/v1/audio/speech", host.handle)

    async def _close(app: web.Application) -> AsyncIterator[None]:
        warming = asyncio.get_running_loop().create_task(host.warm_up())
        yield
        warming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warming
        with contextlib.suppress(Exception):
            await host.close()

    app.cleanup_ctx.append(_close)
    return host


def models_json(app: web.Application) -> list[dict[str, Any]]:
    """The voices as /v1/models lists them (none when speech is not installed)."""
    host = app.get(SPEECH_HOST)
    return host.models_json() if host is not None else []


def main(argv: list[str] | None = None) -> None:
    """``python -m hearth_worker.speech VOICE.onnx MODELS_DIR/NAME``: import a Piper voice."""
    import argparse  # noqa: PLC0415 - only for this command

    parser = argparse.ArgumentParser(
        prog="python -m hearth_worker.speech",
        description="Put a Piper voice (.onnx with its .onnx.json) into a model folder and "
        "write its hearth-model.json; a folder in the worker's --models-dir (or given with "
        "--model) is served.",
    )
    parser.add_argument("voice", type=Path, help="the voice's .onnx, or a folder with one")
    parser.add_argument("out", type=Path, help="the model folder to make")
    parser.add_argument("--name", help="the model id (default: the file's name)")
    args = parser.parse_args(argv)
    try:
        out = import_piper_voice(args.voice, args.out, args.name)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    voice = read_voice(out)
    assert voice is not None
    print(f"{voice.name}: {voice.speaker}, {voice.languages}, {voice.sample_rate} Hz -> {out}")


if __name__ == "__main__":
    main()
