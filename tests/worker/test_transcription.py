"""Speech to text on the worker: ``POST /v1/audio/transcriptions``.

The request forms, audio handling, limits, errors and concurrency run against a
worker in this process whose speech-to-text model is a small stand-in (it answers
what it was given: the model is not the point there). The real Whisper base
(``model_fixtures.whisper_base()``) transcribes what the real Piper voice says,
through a real worker process (HTTPS, tokens), in both forms and streamed in pieces.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
import struct
import threading
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import model_fixtures
import numpy as np
import openai
import pytest
import speech_commands
from aiohttp.test_utils import TestClient, TestServer
from hearth_worker import speech, transcription, voices
from hearth_worker.auth import AuthStore
from hearth_worker.capacity import SpeechCosts
from hearth_worker.manifest import Manifest, ManifestError
from hearth_worker.server import Worker
from hearth_worker.settings import WorkerSettings
from test_api import check_schema
from worker_process import WorkerProcess, start_worker_serving

PATH = "/v1/audio/transcriptions"
STT = "whisper-stand-in"
L16 = "audio/L16; rate=16000; channels=1"


def tone(seconds: float, rate: int = 16000, channels: int = 1, hz: float = 440.0) -> bytes:
    """16-bit PCM of a tone (each channel its own loudness, so a mix-down shows)."""
    t = np.arange(round(seconds * rate)) / rate
    wave_ = np.sin(2 * np.pi * hz * t)
    frames = np.stack([wave_ * 8000 * (c + 1) / channels for c in range(channels)], axis=1)
    return bytes(np.rint(frames).astype("<i2").tobytes())


def wav_bytes(pcm: bytes, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(pcm)
    return out.getvalue()


def wav_header(fmt_tag: int, bits: int, rate: int = 16000, channels: int = 1) -> bytes:
    """A WAV header of unknown length with any format tag and sample size."""
    align = channels * bits // 8
    return (
        b"RIFF\xff\xff\xff\xffWAVEfmt "
        + struct.pack("<IHHIIHH", 16, fmt_tag, channels, rate, rate * align, align, bits)
        + b"data\xff\xff\xff\xff"
    )


class StandIn:
    """A speech-to-text model that tells what it was given (its PCM's size and its
    language), optionally held until ``gate`` is set."""

    languages = ("en", "de")
    sample_rate = 16000

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str | None, int]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def transcribe(self, pcm: bytes, language: str | None) -> str:
        self.calls.append((pcm, language, threading.get_ident()))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        return f" {len(pcm)} bytes in {language} "


InProcess = tuple[TestClient[Any, Any], StandIn, dict[str, str], Worker]


@pytest.fixture
async def in_process(tmp_path: Path) -> AsyncIterator[InProcess]:
    """A worker in this process serving the stand-in; its client, the model, a token's
    headers and the worker."""
    auth = AuthStore(tmp_path / "state")
    token, _ = auth.create_token("tests")
    worker = Worker(WorkerSettings(state_dir=tmp_path / "state", warmup=False), auth)
    folder = tmp_path / STT
    folder.mkdir()
    manifest = Manifest(
        path=folder,
        name=STT,
        kind="stt",
        runtime="genai-whisper",
        quantization="int4",
        context_length=0,
        size_bytes=0,
        files=[],
        embedding=None,
    )
    model = StandIn()
    worker.models.registry._publish(manifest, model, removable=False)  # type: ignore[arg-type]
    async with TestClient(TestServer(worker.build_app())) as client:
        yield client, model, {"Authorization": f"Bearer {token}"}, worker


def form(audio: bytes, **fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in {"model": STT, **fields}.items():
        data.add_field(name, value)
    data.add_field("file", audio, filename="command.wav", content_type="audio/wav")
    return data


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    check_schema(body, "Error")
    assert body["error"]["code"] == code, body
    return dict(body["error"])


# -- the two forms ---------------------------------------------------------------------


async def test_openai_form_with_a_16k_mono_wav(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    pcm = tone(1.5)
    resp = await client.post(PATH, data=form(wav_bytes(pcm), language="en"), headers=headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    check_schema(body, "Transcription")
    assert body == {"text": f"{len(pcm)} bytes in en"}  # stripped
    assert model.calls[0][0] == pcm and model.calls[0][1] == "en"


async def test_the_openai_client_transcribes(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    pcm = tone(1.0)
    async with openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key=headers["Authorization"][7:]
    ) as openai_client:
        answer = await openai_client.audio.transcriptions.create(
            model=STT,
            file=("command.wav", wav_bytes(pcm), "audio/wav"),
            language="de",
            prompt="ignored",
            temperature=0.2,
        )
        assert answer.text == f"{len(pcm)} bytes in de"
        text = await openai_client.audio.transcriptions.create(
            model=STT, file=("command.wav", wav_bytes(pcm)), response_format="text"
        )
        assert str(text).strip() == f"{len(pcm)} bytes in None"
    assert [call[0] for call in model.calls] == [pcm, pcm]


@pytest.mark.parametrize(("rate", "channels"), [(44100, 2), (8000, 1), (48000, 6), (16000, 2)])
async def test_wav_of_any_rate_and_channels_becomes_16k_mono(
    in_process: InProcess, rate: int, channels: int
) -> None:
    client, model, headers, _ = in_process
    pcm = tone(2.0, rate, channels)
    resp = await client.post(PATH, data=form(wav_bytes(pcm, rate, channels)), headers=headers)
    assert resp.status == 200, await resp.text()
    got = model.calls[0][0]
    mono = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels).astype(np.float64).mean(axis=1)
    expected = speech.resample(np.rint(mono).astype("<i2").tobytes(), rate, 16000)
    assert got == expected
    assert len(got) == 2 * 32000  # 2 s at 16 kHz


async def test_raw_l16_streamed_in_small_pieces_with_pauses(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    pcm = tone(2.0)
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(pcm), 3001):  # odd sizes: frames cut between pieces
            sent.append(at)
            yield pcm[at : at + 3001]
            await asyncio.sleep(0.001)

    resp = await client.post(
        PATH,
        params={"model": STT, "language": "en-US"},
        data=chunks(),
        headers={**headers, "Content-Type": L16},
    )
    assert resp.status == 200, await resp.text()
    assert len(sent) > 10
    assert model.calls[0][0] == pcm and model.calls[0][1] == "en"


async def test_raw_wav_streamed_and_l16_parameters_default(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    pcm = tone(1.0, 22050)
    streamed = wav_header(1, 16, 22050) + pcm  # unknown length: to the end of the body

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(streamed), 1000):
            yield streamed[at : at + 1000]

    resp = await client.post(
        PATH,
        params={"model": STT, "response_format": "text"},
        data=chunks(),
        headers={**headers, "Content-Type": "audio/wav"},
    )
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/plain"
    assert model.calls[0][0] == speech.resample(pcm, 22050, 16000)
    plain = tone(0.5)
    resp = await client.post(
        PATH, params={"model": STT}, data=plain, headers={**headers, "Content-Type": "audio/L16"}
    )
    assert resp.status == 200 and model.calls[1][0] == plain


async def test_too_long_audio_is_refused_while_it_is_still_coming(
    in_process: InProcess,
) -> None:
    """31 s of audio, then the client holds its body open: the 400 comes first, so the
    body is read as it arrives and no more than 30 s is kept."""
    client, model, headers, _ = in_process
    pcm = tone(31.0)
    hold = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(pcm), 32000):
            yield pcm[at : at + 32000]
        await hold.wait()  # never set: the answer must come without the body's end
        yield b""

    resp = await asyncio.wait_for(
        client.post(
            PATH, params={"model": STT}, data=chunks(), headers={**headers, "Content-Type": L16}
        ),
        60,
    )
    await _error(resp, 400, "audio_too_long")
    assert model.calls == []
    resp.close()


async def test_exactly_30_s_is_taken_and_a_long_wav_is_refused(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    resp = await client.post(
        PATH, params={"model": STT}, data=tone(30.0), headers={**headers, "Content-Type": L16}
    )
    assert resp.status == 200, await resp.text()
    assert len(model.calls[0][0]) == 30 * 32000
    long_wav = wav_bytes(tone(30.5, 8000, 2), 8000, 2)  # its header says: too long
    await _error(
        await client.post(PATH, data=form(long_wav), headers=headers), 400, "audio_too_long"
    )


def test_the_collector_keeps_at_most_30_s() -> None:
    collector = transcription.PcmCollector(16000, 2)
    collector.feed(bytes(4 * 16000 * 30 - 1))  # 30 s but a byte: the frame waits
    collector.feed(b"\x00")
    assert collector.seconds == 30.0
    with pytest.raises(transcription.ApiError) as err:
        collector.feed(bytes(4))
    assert err.value.code == "audio_too_long"
    assert len(collector.finish(16000)) == 2 * 16000 * 30


# -- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("audio/mpeg", b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(100)),
        ("audio/ogg", b"OggS" + bytes(100)),
        ("application/json", b'{"model": "x"}'),
        ("audio/L16; rate=8000; channels=1", tone(0.5, 8000)),
        ("audio/L16; rate=16000; channels=2", tone(0.5, 16000, 2)),
        ("audio/wav", b"OggS" + bytes(100)),
        ("audio/wav", wav_header(1, 8) + bytes(1000)),  # 8-bit
        ("audio/wav", wav_header(3, 32) + bytes(1000)),  # float
        ("audio/wav", wav_header(1, 24) + bytes(1000)),
        ("audio/wav", wav_header(1, 16, 4000) + bytes(1000)),
    ],
    ids=[
        "mp3",
        "ogg",
        "json",
        "l16-8k",
        "l16-stereo",
        "wav-ogg",
        "wav-8bit",
        "wav-float",
        "wav-24bit",
        "wav-4k",
    ],
)
async def test_other_audio_is_unsupported(
    in_process: InProcess, content_type: str, body: bytes
) -> None:
    client, model, headers, _ = in_process
    resp = await client.post(
        PATH, params={"model": STT}, data=body, headers={**headers, "Content-Type": content_type}
    )
    error = await _error(resp, 400, "unsupported_audio_format")
    assert "16-bit PCM" in error["message"]
    if content_type.startswith("audio/wav") and body[:4] == b"RIFF":  # the form says the same
        resp = await client.post(PATH, data=form(body), headers=headers)
        await _error(resp, 400, "unsupported_audio_format")
    resp = await client.post(PATH, data=form(body[:200]), headers=headers)  # not WAV, or cut
    await _error(resp, 400, "unsupported_audio_format")
    assert model.calls == []


async def test_unknown_models_and_bad_parameters(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    audio = wav_bytes(tone(0.5))
    for name, status, code in (("nope", 404, "model_not_found"), ("", 400, "model_required")):
        resp = await client.post(PATH, data=form(audio, model=name), headers=headers)
        assert (await _error(resp, status, code))["param"] == "model"
    resp = await client.post(
        PATH, params={"model": "nope"}, data=tone(0.5), headers={**headers, "Content-Type": L16}
    )
    assert STT in (await _error(resp, 404, "model_not_found"))["message"]
    resp = await client.post(PATH, data=tone(0.5), headers={**headers, "Content-Type": L16})
    await _error(resp, 400, "model_required")
    resp = await client.post(PATH, data=form(audio, response_format="srt"), headers=headers)
    assert (await _error(resp, 400, "unsupported_response_format"))["param"] == "response_format"
    resp = await client.post(PATH, data=form(audio, language="fr"), headers=headers)
    assert (await _error(resp, 400, "unsupported_language"))["param"] == "language"
    resp = await client.post(PATH, data=form(audio, language="english!"), headers=headers)
    assert (await _error(resp, 400, "invalid_request"))["param"] == "language"
    no_file = aiohttp.FormData({"model": STT})
    no_file.add_field("x", b"", filename="x")  # multipart, without a file field
    resp = await client.post(PATH, data=no_file, headers=headers)
    assert (await _error(resp, 400, "invalid_request"))["param"] == "file"
    assert model.calls == []


async def test_no_token_is_a_401_in_both_forms(in_process: InProcess) -> None:
    client, model, _, _ = in_process
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        resp = await client.post(PATH, data=form(wav_bytes(tone(0.5))), headers=headers)
        await _error(resp, 401, "invalid_token")
        resp = await client.post(
            PATH, params={"model": STT}, data=tone(0.5), headers={**headers, "Content-Type": L16}
        )
        await _error(resp, 401, "invalid_token")
    assert model.calls == []


# -- one job per model, off the event loop ------------------------------------------------


async def test_one_job_at_a_time_and_the_loop_stays_free(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    host = client.app[transcription.TRANSCRIPTION_HOST]
    host.slots.wait_s = 0.01  # a second job waits so long, then gets a 429
    model.gate = threading.Event()
    audio = wav_bytes(tone(0.5))
    first = asyncio.ensure_future(client.post(PATH, data=form(audio), headers=headers))
    assert await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 30)
    resp = await client.get("/v1/health")  # the event loop answers meanwhile
    assert resp.status == 200
    assert model.calls[0][2] != threading.get_ident()  # in an executor thread
    second = await client.post(PATH, data=form(audio), headers=headers)
    error = await _error(second, 429, "busy")
    assert error["type"] == "rate_limit_error"
    assert int(second.headers["Retry-After"]) >= 1
    model.gate.set()
    assert (await first).status == 200
    assert len(model.calls) == 1


async def test_a_second_job_waits_for_the_first(in_process: InProcess) -> None:
    client, model, headers, _ = in_process
    host = client.app[transcription.TRANSCRIPTION_HOST]
    host.slots.wait_s = 60.0
    model.gate = threading.Event()
    audio = wav_bytes(tone(0.5))
    first = asyncio.ensure_future(client.post(PATH, data=form(audio), headers=headers))
    assert await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 30)
    second = asyncio.ensure_future(client.post(PATH, data=form(audio), headers=headers))
    for _ in range(2000):  # until it waits for the model
        if host.slots._slots[STT].waiting:
            break
        await asyncio.sleep(0.005)
    assert host.slots._slots[STT].waiting == 1 and len(model.calls) == 1
    model.gate.set()
    assert (await first).status == 200 and (await second).status == 200
    assert len(model.calls) == 2


async def test_waiting_is_bounded() -> None:
    costs = SpeechCosts()
    slots = transcription.SttSlots(costs, wait_s=60.0, max_waiting=1)
    costs.record_stt("m", audio_s=1.0, elapsed_s=1.0)
    costs.record_stt("m", audio_s=5.0, elapsed_s=3.0)  # 0.5 s + 0.5 s per second: 3 s
    release = asyncio.Event()

    async def job() -> None:
        async with slots.hold("m"):
            await release.wait()

    first = asyncio.ensure_future(job())
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(job())
    await asyncio.sleep(0)
    with pytest.raises(transcription.SttBusy) as busy:
        async with slots.hold("m"):
            pass
    assert busy.value.retry_after == 6  # one job running, one waiting: 2 x 3 s
    release.set()
    await asyncio.gather(first, waiting)
    async with slots.hold("m"):  # free again
        pass


# -- listed, with costs --------------------------------------------------------------------


async def test_listed_as_a_speech_to_text_model(in_process: InProcess) -> None:
    client, _, headers, _ = in_process
    listing = await (await client.get("/v1/models", headers=headers)).json()
    check_schema(listing, "ModelList")
    entry = {m["id"]: m for m in listing["data"]}[STT]
    assert (entry["kind"], entry["languages"], entry["sample_rate"]) == ("stt", ["en", "de"], 16000)
    assert entry["object"] == "model" and entry["owned_by"] == "hearth"
    assert entry["hearth"]["kind"] == "stt" and entry["hearth"]["max_audio_s"] == 30
    info = await (await client.get("/v1/info", headers=headers)).json()
    check_schema(info, "Info")
    assert {m["id"]: m["kind"] for m in info["models"]}[STT] == "stt"


async def test_capacity_lists_the_costs_learned_from_jobs(in_process: InProcess) -> None:
    client, _, headers, worker = in_process
    costs = worker.models.registry.speech_costs
    snapshot = await (await client.get("/v1/capacity", headers=headers)).json()
    check_schema(snapshot, "Capacity")
    assert snapshot["models"][STT] == {
        "kind": "stt",
        "stt_fixed_ms": None,
        "stt_ms_per_audio_s": None,
        "requests_served": 0,
        "loaded": True,
    }
    for seconds in (0.5, 3.0):
        resp = await client.post(PATH, data=form(wav_bytes(tone(seconds))), headers=headers)
        assert resp.status == 200
    snapshot = await (await client.get("/v1/capacity", headers=headers)).json()
    check_schema(snapshot, "Capacity")
    entry = snapshot["models"][STT]
    assert entry["requests_served"] == 2
    assert entry == {**costs.stt(STT), "loaded": True}
    assert entry["stt_fixed_ms"] is not None and entry["stt_ms_per_audio_s"] is not None


# -- speech costs (capacity.SpeechCosts): injected samples, exact arithmetic ---------------


def test_stt_costs_need_two_lengths_then_fit_a_line() -> None:
    costs = SpeechCosts(alpha=0.3)
    assert costs.stt("m") == {
        "kind": "stt",
        "stt_fixed_ms": None,
        "stt_ms_per_audio_s": None,
        "requests_served": 0,
    }
    costs.record_stt("m", audio_s=1.0, elapsed_s=1.0)
    costs.record_stt("m", audio_s=1.2, elapsed_s=1.1)  # 0.1 s apart: no slope yet
    assert costs.stt("m")["stt_fixed_ms"] is None and costs.stt("m")["requests_served"] == 2
    assert costs.estimate_stt_s("m", 3.0) is None
    costs = SpeechCosts(alpha=0.3)
    costs.record_stt("m", audio_s=1.0, elapsed_s=1.0)
    costs.record_stt("m", audio_s=5.0, elapsed_s=3.0)
    # means: x 2.2, y 1600, xx 8.2, xy 5200 -> 500 ms per second, 500 ms fixed
    entry = costs.stt("m")
    assert entry["stt_ms_per_audio_s"] == pytest.approx(500.0)
    assert entry["stt_fixed_ms"] == pytest.approx(500.0)
    assert costs.estimate_stt_s("m", 5.0) == pytest.approx(3.0)
    check_schema(entry, "SttCosts")


def test_stt_costs_move_with_an_exponential_average_and_stay_sane() -> None:
    costs = SpeechCosts(alpha=0.5)
    costs.record_stt("m", audio_s=1.0, elapsed_s=1.0)
    costs.record_stt("m", audio_s=3.0, elapsed_s=2.0)  # x 2, y 1500, xx 5, xy 3500: 500, 500
    assert costs.stt("m")["stt_ms_per_audio_s"] == pytest.approx(500.0)
    for _ in range(30):  # the same length over and over: the spread fades, the slope stays
        costs.record_stt("m", audio_s=2.0, elapsed_s=2.0)
    entry = costs.stt("m")
    assert entry["stt_ms_per_audio_s"] == pytest.approx(500.0)
    assert entry["stt_fixed_ms"] == pytest.approx(1000.0, abs=0.01)  # 2000 - 500 x 2
    shrinking = SpeechCosts(alpha=0.5)
    shrinking.record_stt("m", audio_s=1.0, elapsed_s=2.0)
    shrinking.record_stt("m", audio_s=5.0, elapsed_s=1.0)  # longer but faster: no negatives
    assert shrinking.stt("m")["stt_ms_per_audio_s"] == 0.0
    assert shrinking.stt("m")["stt_fixed_ms"] == pytest.approx(1500.0)
    for bad in (math.nan, math.inf, -1.0):  # degenerate samples change nothing
        shrinking.record_stt("m", audio_s=bad, elapsed_s=1.0)
        shrinking.record_stt("m", audio_s=1.0, elapsed_s=bad)
    assert shrinking.stt("m")["requests_served"] == 2


def test_tts_costs() -> None:
    costs = SpeechCosts(alpha=0.3)
    assert costs.tts("v") == {
        "kind": "tts",
        "tts_first_audio_ms": None,
        "tts_rtf": None,
        "requests_served": 0,
    }
    costs.record_tts("v", first_audio_s=0.2, audio_s=2.0, synthesis_s=0.4)
    costs.record_tts("v", first_audio_s=0.3, audio_s=1.0, synthesis_s=0.3)
    entry = costs.tts("v")
    assert entry["tts_first_audio_ms"] == pytest.approx(0.3 * 300 + 0.7 * 200)
    assert entry["tts_rtf"] == pytest.approx(0.3 * 0.3 + 0.7 * 0.2)
    costs.record_tts("v", first_audio_s=math.nan, audio_s=0.0, synthesis_s=0.1)  # no audio
    assert costs.tts("v") == {**entry, "requests_served": 3}
    check_schema(costs.tts("v"), "TtsCosts")
    costs.forget("v")
    assert costs.tts("v")["requests_served"] == 0


async def _in_process_with_voice(
    tmp_path: Path, *, warmup: bool
) -> tuple[Worker, StandIn, dict[str, str]]:
    """A worker in this process with the real Piper voice and the stand-in model."""
    auth = AuthStore(tmp_path / "state")
    token, _ = auth.create_token("tests")
    voice = model_fixtures.piper_voice()
    worker = Worker(
        WorkerSettings(model_dirs=[voice], state_dir=tmp_path / "state", warmup=warmup), auth
    )
    worker.models.load()
    model = StandIn()
    manifest = Manifest(
        path=voice,  # any folder: the stand-in reads nothing
        name=STT,
        kind="stt",
        runtime="genai-whisper",
        quantization="int4",
        context_length=0,
        size_bytes=0,
        files=[],
        embedding=None,
    )
    worker.models.registry._publish(manifest, model, removable=False)  # type: ignore[arg-type]
    return worker, model, {"Authorization": f"Bearer {token}"}


async def test_spoken_answers_are_measured_for_capacity(tmp_path: Path) -> None:
    worker, model, headers = await _in_process_with_voice(tmp_path, warmup=False)
    async with TestClient(TestServer(worker.build_app())) as client:
        resp = await client.post(
            "/v1/audio/speech",
            json={"model": "en_US-joe-medium", "input": "Hello. The light is on."},
            headers=headers,
        )
        assert resp.status == 200 and len(await resp.read()) > 44
        snapshot = await (await client.get("/v1/capacity", headers=headers)).json()
    check_schema(snapshot, "Capacity")
    voice = snapshot["models"]["en_US-joe-medium"]
    assert voice["kind"] == "tts" and voice["requests_served"] == 1 and voice["loaded"]
    assert voice["tts_first_audio_ms"] > 0 and 0 < voice["tts_rtf"] < 100
    assert snapshot["models"][STT]["requests_served"] == 0  # no self-check without warm-up
    assert model.calls == []


async def test_the_self_check_speaks_and_transcribes_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A voice says the fixed phrase, once and twice with a pause; the model transcribes
    both: the first costs of each, with no user audio."""
    caplog.set_level(logging.INFO, logger="hearth_worker.transcription")
    worker, model, headers = await _in_process_with_voice(tmp_path, warmup=True)
    async with TestClient(TestServer(worker.build_app())) as client:
        for _ in range(1200):  # in the background after the start; 60 s on a loaded machine
            if "Speech self-check" in caplog.text:
                break
            await asyncio.sleep(0.05)
        snapshot = await (await client.get("/v1/capacity", headers=headers)).json()
    assert "Speech self-check with en_US-joe-medium and whisper-stand-in" in caplog.text
    check_schema(snapshot, "Capacity")
    stt = snapshot["models"][STT]
    assert stt["requests_served"] == 2 and stt["stt_ms_per_audio_s"] is not None
    assert snapshot["models"]["en_US-joe-medium"]["requests_served"] == 1
    once, twice = (len(call[0]) / 32000 for call in model.calls)
    assert 0.8 < once < 4 and twice == pytest.approx(2 * once + 0.5)
    assert [call[1] for call in model.calls] == ["en", "en"]


async def test_the_self_check_waits_its_turn(tmp_path: Path) -> None:
    """A request holds the model when the self-check comes: the check waits for it and
    still measures (it used to go without costs, and the router without a deadline)."""
    worker, model, _ = await _in_process_with_voice(tmp_path, warmup=False)
    app = worker.build_app()
    async with TestClient(TestServer(app)):
        host = app[transcription.TRANSCRIPTION_HOST]
        holding, released = asyncio.Event(), asyncio.Event()

        async def request() -> None:
            async with host.slots.hold(STT):
                holding.set()
                await asyncio.sleep(0.6)
                released.set()

        busy = asyncio.create_task(request())
        await holding.wait()
        done = await host._check_when_free(STT, model, b"\0\0" * 16000, "en")  # type: ignore[arg-type]
        await busy
    assert done is not None and released.is_set()
    assert len(model.calls) == 1


# -- keeps nothing ---------------------------------------------------------------------------


async def test_keeps_no_audio_and_logs_only_sizes(
    in_process: InProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, _, headers, _ = in_process
    before = sorted(tmp_path.rglob("*"))
    caplog.set_level(logging.DEBUG)
    pcm = tone(1.0, hz=523.25)
    for request in (
        client.post(PATH, data=form(wav_bytes(pcm), model=STT), headers=headers),
        client.post(
            PATH, params={"model": STT}, data=pcm, headers={**headers, "Content-Type": L16}
        ),
    ):
        assert (await request).status == 200
    answer = f"{len(pcm)} bytes in None"
    assert sorted(tmp_path.rglob("*")) == before
    records = [r for r in caplog.records if r.name.startswith("hearth_worker")]
    assert all(r.levelno <= logging.DEBUG for r in records), records
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert answer not in logged
    assert "Transcribing 32044 bytes received, 1.0 s of audio" in logged


# -- model folders ---------------------------------------------------------------------------


def _broken_stt_folder(parent: Path) -> Path:
    folder = parent / "broken-whisper"
    folder.mkdir(parents=True)
    manifest = {
        "name": "broken-whisper",
        "kind": "stt",
        "format": "genai-whisper",
        "files": [{"path": "encoder.onnx"}],
    }
    (folder / "hearth-model.json").write_text(json.dumps(manifest))
    return folder


def test_a_broken_stt_folder_is_skipped_in_the_models_dir_and_stops_a_model_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _broken_stt_folder(tmp_path / "models")
    served = WorkerSettings(state_dir=tmp_path / "a", models_dir=tmp_path / "models")
    host = Worker(served, AuthStore(tmp_path / "a")).models
    host.load()
    assert host.registry.stt_models == {}
    assert "Skipping" in caplog.text and "encoder.onnx" in caplog.text
    given = WorkerSettings(state_dir=tmp_path / "b", model_dirs=[folder])
    with pytest.raises(ManifestError, match=r"encoder\.onnx"):
        Worker(given, AuthStore(tmp_path / "b")).models.load()


async def test_a_whisper_folder_given_with_model_is_served(tmp_path: Path) -> None:
    """``--model FOLDER`` (the add-on's /share/hearth/models): loaded and listed."""
    whisper = _whisper()
    auth = AuthStore(tmp_path / "state")
    token, _ = auth.create_token("tests", admin=True)
    worker = Worker(
        WorkerSettings(model_dirs=[whisper], state_dir=tmp_path / "state", warmup=False), auth
    )
    worker.models.load()
    headers = {"Authorization": f"Bearer {token}"}
    async with TestClient(TestServer(worker.build_app())) as client:
        listing = await (await client.get("/v1/models", headers=headers)).json()
        check_schema(listing, "ModelList")
        entry = {m["id"]: m for m in listing["data"]}["whisper-base"]
        assert entry["kind"] == "stt" and entry["sample_rate"] == 16000
        assert len(entry["languages"]) == 99 and entry["languages"][0] == "en"
        assert entry["hearth"]["runtime"] == "genai-whisper"
        resp = await client.delete("/v1/models/whisper-base", headers=headers)
        assert (await _error(resp, 409, "model_not_removable"))["message"]


# -- the real models --------------------------------------------------------------------------

# Commands this voice says in a way Whisper base hears (not "Open the garage door.": heard
# as "grouch"/"groush door" in nearly every rendering; tests/speech_commands.py names others).
COMMANDS = [
    "Turn on the kitchen light.",
    "Switch off all the lights downstairs.",
    "Close the blinds in the office.",
]


def _whisper() -> Path:
    whisper_base = getattr(model_fixtures, "whisper_base", None)
    if whisper_base is None:
        pytest.skip("model_fixtures.whisper_base() is not there yet")
    return Path(whisper_base())


@pytest.fixture(scope="module")
def real_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker with the real Whisper base and the real Piper voice in its models
    directory (links: no copies), HOME and TMPDIR of its own (to see they stay empty)."""
    whisper = _whisper()
    voice = model_fixtures.piper_voice()
    worker = start_worker_serving([whisper, voice], tmp_path_factory.mktemp("stt-worker"))
    for _ in range(1200):  # the self-check runs once the worker listens: let it end first
        if "Speech self-check" in worker.log():
            break
        time.sleep(0.1)
    yield worker
    assert worker.stop() == 0, worker.log()


RENDERINGS = 3


@pytest.fixture(scope="module")
def spoken() -> dict[str, list[bytes]]:
    """Each command as the real Piper voice says it, 16 kHz mono PCM: a few renderings
    (Piper's noise makes each a little different, and Whisper base mishears one now
    and then: the bench measures that rate; here a command counts as heard when one of
    its renderings is)."""

    async def speak() -> dict[str, list[bytes]]:
        voice = voices.read_voice(model_fixtures.piper_voice())
        assert voice is not None
        piper = speech.PiperProcess(voice)
        try:
            return {
                text: [
                    speech.resample(await piper.synthesize(text), piper.sample_rate, 16000)
                    for _ in range(RENDERINGS)
                ]
                for text in COMMANDS
            }
        finally:
            await piper.close()

    return asyncio.run(speak())


async def _stt_id(worker: WorkerProcess, http: aiohttp.ClientSession) -> str:
    async with http.get(worker.url + "/v1/models", headers=worker.headers) as resp:
        listing = await resp.json()
    check_schema(listing, "ModelList")
    found = [m for m in listing["data"] if m.get("kind") == "stt"]
    assert len(found) == 1, listing
    assert found[0]["sample_rate"] == 16000 and "en" in found[0]["languages"]
    return str(found[0]["id"])


async def _heard(
    command: str, renderings: list[bytes], send: Callable[[bytes], Awaitable[str]]
) -> tuple[str, bytes]:
    """The first rendering the worker transcribes right, and its text."""
    heard = []
    for pcm in renderings:
        heard.append(await send(pcm))
        if speech_commands.same(command, heard[-1]):
            return heard[-1], pcm
    raise AssertionError(f"{command!r} was heard as {heard}")


async def test_real_whisper_transcribes_piper_in_both_forms(
    real_worker: WorkerProcess, spoken: dict[str, list[bytes]], http: aiohttp.ClientSession
) -> None:
    model = await _stt_id(real_worker, http)
    async with openai.AsyncOpenAI(
        base_url=real_worker.url + "/v1",
        api_key=real_worker.token,
        http_client=httpx.AsyncClient(verify=real_worker.ssl),
    ) as client:

        async def openai_form(pcm: bytes) -> str:
            # A WAV file at the voice's own rate and in stereo: the worker converts it.
            voice = speech.resample(pcm, 16000, 22050)
            stereo = np.repeat(np.frombuffer(voice, dtype="<i2"), 2).tobytes()
            answer = await client.audio.transcriptions.create(
                model=model, file=("command.wav", wav_bytes(stereo, 22050, 2)), language="en"
            )
            return answer.text

        await _heard(COMMANDS[0], spoken[COMMANDS[0]], openai_form)

    async def raw_l16(pcm: bytes) -> str:
        async with http.post(
            real_worker.url + PATH,
            params={"model": model, "language": "en"},
            data=pcm,
            headers={**real_worker.headers, "Content-Type": L16},
        ) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["text"])

    await _heard(COMMANDS[1], spoken[COMMANDS[1]], raw_l16)


async def test_real_whisper_transcribes_a_chunked_stream_sent_with_pauses(
    real_worker: WorkerProcess, spoken: dict[str, list[bytes]], http: aiohttp.ClientSession
) -> None:
    """Home Assistant's way: 16 kHz L16 in small pieces while the person speaks."""
    model = await _stt_id(real_worker, http)

    async def streamed(pcm: bytes) -> str:
        async def pieces() -> AsyncIterator[bytes]:
            for at in range(0, len(pcm), 1280):  # 40 ms of audio each
                yield pcm[at : at + 1280]
                if at % 12800 == 0:
                    await asyncio.sleep(0.05)

        async with http.post(
            real_worker.url + PATH,
            params={"model": model, "language": "en", "response_format": "text"},
            data=pieces(),
            headers={**real_worker.headers, "Content-Type": L16},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "text/plain"
            return await resp.text()

    command = COMMANDS[2]
    await _heard(command, spoken[command], streamed)


async def test_the_self_check_measured_the_speech_costs(
    real_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    model = await _stt_id(real_worker, http)
    assert "Speech self-check with en_US-joe-medium and " in real_worker.log(), real_worker.log()
    # The phrase alone, then said twice in a row: Whisper base now and then drops or
    # changes a word of the doubled one (Piper's rendering differs at each start), so
    # the check is that the self-check heard the phrase at least once.
    found = re.search(r"(\d)/2 transcripts matched", real_worker.log())
    assert found is not None and int(found.group(1)) >= 1, real_worker.log()
    async with http.get(real_worker.url + "/v1/capacity", headers=real_worker.headers) as resp:
        snapshot = await resp.json()
    check_schema(snapshot, "Capacity")
    stt, tts = snapshot["models"][model], snapshot["models"]["en_US-joe-medium"]
    assert stt["kind"] == "stt" and tts["kind"] == "tts"
    assert stt["stt_fixed_ms"] is not None and stt["stt_ms_per_audio_s"] is not None
    assert tts["tts_first_audio_ms"] > 0 and tts["tts_rtf"] > 0


async def test_the_real_worker_keeps_no_audio_or_text(
    real_worker: WorkerProcess, spoken: dict[str, list[bytes]], http: aiohttp.ClientSession
) -> None:
    model = await _stt_id(real_worker, http)
    before = sorted(p.relative_to(real_worker.state_dir) for p in real_worker.state_dir.rglob("*"))
    command = COMMANDS[1]
    async with http.post(
        real_worker.url + PATH,
        params={"model": model, "language": "en"},
        data=spoken[command][0],
        headers={**real_worker.headers, "Content-Type": L16},
    ) as resp:
        assert resp.status == 200
        text = (await resp.json())["text"]
    after = sorted(p.relative_to(real_worker.state_dir) for p in real_worker.state_dir.rglob("*"))
    assert after == before
    workdir = real_worker.state_dir.parent
    assert list((workdir / "home").rglob("*")) == [] and list((workdir / "tmp").rglob("*")) == []
    log = real_worker.log()
    assert text.strip() and text.strip() not in log
    assert "downstairs" not in log.lower()
    # No file the worker could have written holds the text or a piece of the audio.
    audio = spoken[command][0]
    piece = audio[len(audio) // 2 : len(audio) // 2 + 64]
    assert piece.strip(b"\x00")
    for path in [*workdir.glob("*.log"), *real_worker.state_dir.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert piece not in data and text.strip().encode() not in data, path
