"""Text to speech on the worker with the real Piper voice (en_US joe-medium).

The voice is spoken by a child process (Piper is GPL-3.0-or-later; the worker never
imports it). These tests speak household commands through a real worker process
(HTTPS with a pinned certificate, tokens) and through ``hearth_worker.speech``
directly; the voice loads once per module (~2 s), each answer takes well under a
second.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import httpx
import model_fixtures
import numpy as np
import openai
import pytest
from hearth_worker import speech, voices
from hearth_worker.validation import ApiError
from test_api import check_schema
from worker_process import WorkerProcess, start_worker, start_worker_serving

COMMAND = "Turn on the kitchen light."
ANSWER = "The kitchen light is on. The hallway light is off. Anything else?"


@pytest.fixture(scope="module")
def piper_voice() -> Path:
    return model_fixtures.piper_voice()


@pytest.fixture(scope="module")
def voice_id(piper_voice: Path) -> str:
    return str(json.loads((piper_voice / "hearth-model.json").read_text())["name"])


@pytest.fixture(scope="module")
def speech_worker(
    piper_voice: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker whose models directory holds the voice (a link: no 63 MB copy)."""
    worker = start_worker_serving([piper_voice], tmp_path_factory.mktemp("speech-worker"))
    yield worker
    assert worker.stop() == 0, worker.log()


def _wav(data: bytes) -> tuple[int, np.ndarray]:
    """A streamed WAV's rate and samples; checks the header as a player reads it."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    fmt_size, audio_format, channels, rate, byte_rate, align, bits = struct.unpack(
        "<IHHIIHH", data[16:36]
    )
    assert (fmt_size, audio_format, channels, bits, align) == (16, 1, 1, 16, 2)
    assert byte_rate == rate * 2 and data[36:40] == b"data"
    with wave.open(io.BytesIO(data)) as reader:  # Python's own reader accepts it too
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (
            rate,
            1,
            2,
        )
    samples = np.frombuffer(data[44:], dtype="<i2")
    return rate, samples


def _plausible_speech(samples: np.ndarray, rate: int, words: int) -> None:
    """Spoken words take ~0.15-1 s each; speech is not silence."""
    seconds = len(samples) / rate
    assert 0.15 * words <= seconds <= 1.0 * words + 1.0, seconds
    assert int(np.abs(samples.astype(np.int32)).max()) > 1000


# -- through a real worker ---------------------------------------------------------------


async def test_openai_client_speaks_a_household_command_as_wav(
    speech_worker: WorkerProcess, voice_id: str
) -> None:
    async with openai.AsyncOpenAI(
        base_url=speech_worker.url + "/v1",
        api_key=speech_worker.token,
        http_client=httpx.AsyncClient(verify=speech_worker.ssl),
    ) as client:
        answer = await client.audio.speech.create(
            model=voice_id,
            voice="joe",
            input=COMMAND,
            response_format="wav",
            extra_body={"sample_rate": 16000},
        )
        data = answer.content
        assert answer.response.headers["content-type"] == "audio/wav"
    rate, samples = _wav(data)
    assert rate == 16000
    _plausible_speech(samples, rate, words=5)


async def test_pcm_at_the_voice_rate_and_resampled(
    speech_worker: WorkerProcess, voice_id: str, http: aiohttp.ClientSession
) -> None:
    lengths = {}
    for rate in (22050, 16000):
        async with http.post(
            speech_worker.url + "/v1/audio/speech",
            json={
                "model": voice_id,
                "input": COMMAND,
                "voice": "joe",
                "response_format": "pcm",
                "sample_rate": rate,
            },
            headers=speech_worker.headers,
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Hearth-Sample-Rate"] == str(rate)
            data = await resp.read()
        assert len(data) % 2 == 0 and data[:4] != b"RIFF"
        samples = np.frombuffer(data, dtype="<i2")
        _plausible_speech(samples, rate, words=5)
        lengths[rate] = len(samples) / rate
    # The same words (Piper's noise makes each rendering a little different).
    assert abs(lengths[22050] - lengths[16000]) < 0.5 * lengths[22050]


async def test_other_formats_are_a_400_naming_the_parameter(
    speech_worker: WorkerProcess, voice_id: str, http: aiohttp.ClientSession
) -> None:
    for body, param in [
        ({"response_format": "mp3"}, "response_format"),
        ({"response_format": "opus"}, "response_format"),
        ({"sample_rate": 4000}, "sample_rate"),
        ({"voice": "alloy"}, "voice"),
        ({"input": ""}, "input"),
    ]:
        async with http.post(
            speech_worker.url + "/v1/audio/speech",
            json={"model": voice_id, "input": COMMAND, **body},
            headers=speech_worker.headers,
        ) as resp:
            assert resp.status == 400, body
            error = (await resp.json())["error"]
            assert error["param"] == param
            if param == "response_format":
                assert "'wav' or 'pcm'" in error["message"]
    async with http.post(
        speech_worker.url + "/v1/audio/speech",
        json={"model": "no-such-voice", "input": COMMAND},
        headers=speech_worker.headers,
    ) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["param"] == "model"


async def test_a_listener_going_away_leaves_the_voice_warm(
    speech_worker: WorkerProcess, voice_id: str, http: aiohttp.ClientSession
) -> None:
    """Hanging up mid-answer: the sentence under way ends in Piper, whose process stays."""
    body = {"model": voice_id, "input": " ".join([ANSWER] * 5), "response_format": "pcm"}
    async with http.post(
        speech_worker.url + "/v1/audio/speech", json=body, headers=speech_worker.headers
    ) as resp:
        assert resp.status == 200
        assert await resp.content.readany()
        resp.close()  # hang up after the first audio
    async with http.post(
        speech_worker.url + "/v1/audio/speech",
        json={**body, "input": COMMAND},
        headers=speech_worker.headers,
    ) as resp:
        assert resp.status == 200
        _plausible_speech(np.frombuffer(await resp.read(), dtype="<i2"), 22050, words=5)
    assert speech_worker.log().count("Voice en_US-joe-medium ready") == 1, speech_worker.log()


async def test_no_token_is_a_401(
    speech_worker: WorkerProcess, voice_id: str, http: aiohttp.ClientSession
) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        async with http.post(
            speech_worker.url + "/v1/audio/speech",
            json={"model": voice_id, "input": COMMAND},
            headers=headers,
        ) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_token"


async def test_voices_are_listed_as_speech_models(
    speech_worker: WorkerProcess, voice_id: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(speech_worker.url + "/v1/models", headers=speech_worker.headers) as resp:
        models = {m["id"]: m for m in (await resp.json())["data"]}
    assert models[voice_id]["object"] == "model"
    hearth = models[voice_id]["hearth"]
    assert hearth["kind"] == "tts"
    assert hearth["languages"] == ["en_US"]
    assert hearth["voice"] == "joe"
    assert hearth["sample_rate"] == 22050
    assert set(hearth["response_formats"]) == {"wav", "pcm"}


async def test_the_voices_listing_matches_the_spec(
    speech_worker: WorkerProcess, voice_id: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(speech_worker.url + "/v1/models", headers=speech_worker.headers) as resp:
        listing = await resp.json()
    assert voice_id in {m["id"] for m in listing["data"]}
    check_schema(listing, "ModelList")


async def test_the_worker_keeps_no_text_or_audio(
    speech_worker: WorkerProcess, voice_id: str, http: aiohttp.ClientSession
) -> None:
    secret = "Unlock the garden shed for Beatrix."
    before = sorted(
        p.relative_to(speech_worker.state_dir) for p in speech_worker.state_dir.rglob("*")
    )
    voice_files = sorted(p.name for p in model_fixtures.piper_voice().iterdir())
    async with http.post(
        speech_worker.url + "/v1/audio/speech",
        json={"model": voice_id, "input": secret, "response_format": "pcm"},
        headers=speech_worker.headers,
    ) as resp:
        assert resp.status == 200
        assert len(await resp.read()) > 0
    after = sorted(
        p.relative_to(speech_worker.state_dir) for p in speech_worker.state_dir.rglob("*")
    )
    assert after == before
    assert sorted(p.name for p in model_fixtures.piper_voice().iterdir()) == voice_files
    assert "Beatrix" not in speech_worker.log() and "garden" not in speech_worker.log()
    workdir = speech_worker.state_dir.parent
    assert list((workdir / "home").rglob("*")) == [] and list((workdir / "tmp").rglob("*")) == []


# -- hearth_worker.speech itself -----------------------------------------------------------


@pytest.fixture
async def piper(piper_voice: Path) -> AsyncIterator[speech.PiperProcess]:
    voice = voices.read_voice(piper_voice)
    assert voice is not None
    process = speech.PiperProcess(voice)
    await process.start()
    yield process
    await process.close()


async def test_the_first_sentence_is_sent_before_the_answer_is_synthesized(
    piper: speech.PiperProcess,
) -> None:
    """Sentence 2 is held (an event) until sentence 1's audio has come out of the stream."""
    for fmt in ("pcm", "wav"):
        await _first_sentence_first(piper, fmt)


async def _first_sentence_first(piper: speech.PiperProcess, fmt: str) -> None:
    sentences = speech.split_sentences(ANSWER)
    assert len(sentences) == 3
    first_audio_out = asyncio.Event()
    synthesized: list[str] = []

    async def gated(sentence: str) -> bytes:
        if sentence != sentences[0]:
            await asyncio.wait_for(first_audio_out.wait(), 60)  # never set: streaming broke
        audio = await piper.synthesize(sentence)
        synthesized.append(sentence)
        return audio

    stream = speech.stream_speech(
        gated, sentences, src_rate=piper.sample_rate, dst_rate=16000, response_format=fmt
    )
    chunks = []
    if fmt == "wav":
        chunks.append(await anext(stream))
        assert len(chunks[0]) == 44 and synthesized == []  # the header comes first
    chunks.append(await anext(stream))
    assert synthesized == [sentences[0]]  # audio out, the rest not yet spoken
    first_audio_out.set()
    chunks += [chunk async for chunk in stream]
    assert synthesized == sentences
    audio = b"".join(chunks)
    if fmt == "wav":
        rate, samples = _wav(audio)
        assert rate == 16000
    else:
        samples = np.frombuffer(audio, dtype="<i2")
    _plausible_speech(samples, 16000, words=13)


async def test_the_voice_process_comes_back_after_it_dies(piper: speech.PiperProcess) -> None:
    process = piper._process
    assert process is not None
    process.kill()
    await process.wait()
    assert len(await piper.synthesize(COMMAND)) > piper.sample_rate  # over 0.5 s of audio
    assert piper._process is not None and piper._process.pid != process.pid


async def test_voices_are_warm_at_start_and_end_with_the_worker(
    speech_worker: WorkerProcess,
) -> None:
    """The worker starts its voices' processes itself, before any request."""
    fresh = start_worker(
        [],
        speech_worker.state_dir.parent.parent / "warm-start",
        extra=["--models-dir", str(speech_worker.state_dir.parent / "models")],
    )
    try:
        for _ in range(1200):  # the voice loads in a few seconds; 60 s on a loaded machine
            ready = re.search(
                r"Voice en_US-joe-medium ready .*\(Piper process (\d+)\)", fresh.log()
            )
            if ready:
                break
            await asyncio.sleep(0.05)
        assert ready, fresh.log()
    finally:
        assert await fresh.astop() == 0, fresh.log()
    child = Path(f"/proc/{ready.group(1)}")
    for _ in range(200):  # the worker waits for its child as it stops
        if not child.exists():
            break
        await asyncio.sleep(0.05)
    assert not child.exists()


async def test_a_voice_given_with_model_is_served(
    piper_voice: Path, voice_id: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The add-on passes every folder of /share/hearth/models with --model: a voice
    among them is served as a voice (it used to stop the worker from starting)."""
    worker = start_worker([piper_voice], tmp_path / "fixed-voice")
    try:
        async with http.get(worker.url + "/v1/models", headers=worker.headers) as resp:
            assert resp.status == 200
            listed = {m["id"]: m for m in (await resp.json())["data"]}
        assert listed[voice_id]["hearth"]["kind"] == "tts"
        async with http.post(
            worker.url + "/v1/audio/speech",
            json={"model": voice_id, "input": COMMAND, "response_format": "pcm"},
            headers=worker.headers,
        ) as resp:
            assert resp.status == 200, await resp.text()
            samples = np.frombuffer(await resp.read(), dtype="<i2")
        _plausible_speech(samples, int(resp.headers["X-Hearth-Sample-Rate"]), words=5)
        assert "unknown kind" not in worker.log(), worker.log()
    finally:
        assert await worker.astop() == 0, worker.log()


def test_voices_in_the_models_directory_start_no_warning(speech_worker: WorkerProcess) -> None:
    assert "unknown kind" not in speech_worker.log(), speech_worker.log()
    assert "Skipping" not in speech_worker.log(), speech_worker.log()


async def test_a_voice_removed_from_the_folder_ends_its_process(piper_voice: Path) -> None:
    host = speech.SpeechHost(None, [piper_voice])
    voice = host.voices["en_US-joe-medium"]
    process = host.process(voice)
    await process.start()
    child = process._process
    assert child is not None and child.returncode is None
    host.prune({})  # the folder is gone: its process ends without waiting for close()
    await asyncio.wait_for(child.wait(), 30)
    assert host._processes == {}
    await host.close()


def test_the_worker_never_imports_piper() -> None:
    """GPL-3.0 Piper runs only in its child process; the worker's modules leave it out."""
    code = (
        "import sys, hearth_worker.server, hearth_worker.speech, hearth_worker.cli\n"
        "assert not [m for m in sys.modules if m == 'piper' or m.startswith('piper.')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_import_writes_a_voice_manifest(piper_voice: Path, tmp_path: Path) -> None:
    out = voices.import_piper_voice(
        piper_voice / "en_US-joe-medium.onnx", tmp_path / "voice", name="joe"
    )
    voice = voices.read_voice(out)
    assert voice is not None
    assert (voice.name, voice.speaker, voice.sample_rate) == ("joe", "joe", 22050)
    assert voice.languages == ["en_US"]
    manifest = json.loads((out / "hearth-model.json").read_text())
    assert manifest["kind"] == "tts"
    assert {f["path"] for f in manifest["files"]} == {
        "en_US-joe-medium.onnx",
        "en_US-joe-medium.onnx.json",
    }
    with pytest.raises(ValueError, match="exactly one"):
        voices.import_piper_voice(tmp_path, tmp_path / "other")
    assert voices.read_voice(tmp_path) is None  # not a voice folder


def test_import_command(piper_voice: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "joe"
    done = subprocess.run(
        [sys.executable, "-m", "hearth_worker.speech", str(piper_voice), str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "en_US-joe-medium: joe, ['en_US'], 22050 Hz" in done.stdout
    assert voices.scan_voices(tmp_path / "models").keys() == {"en_US-joe-medium"}
    bad = subprocess.run(
        [sys.executable, "-m", "hearth_worker.speech", str(tmp_path / "nothing.onnx"), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert bad.returncode == 2 and "is a .onnx file with its .onnx.json" in bad.stderr


def test_sentences() -> None:
    assert speech.split_sentences(ANSWER) == [
        "The kitchen light is on.",
        "The hallway light is off.",
        "Anything else?",
    ]
    assert speech.split_sentences("It is 21.5 degrees.\nDone!") == [
        "It is 21.5 degrees.",
        "Done!",
    ]
    assert speech.split_sentences("  ") == []


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 8000, 48000])
def test_resampling_keeps_pitch_and_length(rate: int) -> None:
    src = 22050
    t = np.arange(src) / src  # one second of 440 Hz
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    out = np.frombuffer(speech.resample(tone, src, rate), dtype="<i2")
    assert len(out) == rate
    spectrum = np.abs(np.fft.rfft(out.astype(np.float64)))
    assert abs(int(np.argmax(spectrum)) - 440) <= 2  # bins of 1 Hz
    assert 6000 < np.abs(out[rate // 4 : -rate // 4]).max() <= 8500


def test_downsampling_removes_what_the_new_rate_cannot_hold() -> None:
    src = 22050
    t = np.arange(src) / src
    high = (8000 * np.sin(2 * np.pi * 10000 * t)).astype("<i2").tobytes()  # over 8 kHz
    out = np.frombuffer(speech.resample(high, src, 16000), dtype="<i2")
    assert np.abs(out[1000:-1000]).max() < 800  # not folded back as a loud 6 kHz tone


def test_parse_refuses_what_it_cannot_do() -> None:
    good = {"model": "m", "input": "Hello."}
    assert speech.parse_speech_request(good).response_format == "wav"
    for extra, param in [
        ({"response_format": "mp3"}, "response_format"),
        ({"response_format": "flac"}, "response_format"),
        ({"sample_rate": 16000.5}, "sample_rate"),
        ({"sample_rate": True}, "sample_rate"),
        ({"sample_rate": 96000}, "sample_rate"),
        ({"speed": 10}, "speed"),
        ({"stream_format": "sse"}, "stream_format"),
        ({"input": "x" * (speech.MAX_INPUT_CHARS + 1)}, "input"),
        ({"model": ""}, "model"),
    ]:
        with pytest.raises(ApiError) as caught:
            speech.parse_speech_request({**good, **extra})
        assert (caught.value.status, caught.value.param) == (400, param)
