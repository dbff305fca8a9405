"""Speech jobs are routed as a class of their own (router.rank_speech, household.py).

The policy first, as plain data (no Home Assistant): free workers before those with
chat work in flight, one speech-to-text job per worker, warm models, languages,
household flags, circuit breakers, the deadline after which the same audio goes to
the next worker. Then the household with real workers: text-to-speech goes to a
worker without chat work (the one generating the answer is left to it), the
transcription client streams audio in, and an utterance survives its worker dying.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from homeassistant.core import HomeAssistant
from speech_commands import normalize
from worker_process import WorkerProcess

from custom_components.hearth import router
from custom_components.hearth.client import L16_CONTENT_TYPE, HearthClient
from custom_components.hearth.household import Household, NoWorkerError, Utterance
from custom_components.hearth.router import (
    COLD_START_S,
    SLOW_FACTOR,
    SLOW_SLACK_S,
    STT,
    TTS,
    BreakerState,
    Router,
    SpeechModelState,
    SpeechRequest,
    SpeechWorkerState,
    iso_language,
    language_tag,
    offered_languages,
    rank_speech,
    speech_deadline,
    speech_seconds,
)
from custom_components.hearth.worker_api import (
    HearthBusyError,
    HearthConnectionError,
    HearthRequestError,
    parse_capacity,
    parse_speech_models,
)

from .conftest import restart, speech_settled
from .test_speech_entities import TranscribeTap, as_microphone, heard_rendering, set_up

WHISPER = SpeechModelState("whisper", STT, ("en",), warm=True)
VOICE = SpeechModelState("joe", TTS, ("en_US",), ("joe",), 22050, warm=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def speech_worker(name: str, *models: SpeechModelState, **kwargs: Any) -> SpeechWorkerState:
    return SpeechWorkerState(name, models or (WHISPER, VOICE), **kwargs)


def ids(ranked: list[router.SpeechCandidate]) -> list[str]:
    return [c.worker_id for c in ranked]


# -- the policy ---------------------------------------------------------------------------


def test_speech_is_not_queued_behind_chat() -> None:
    """A worker with chat work in flight (by its snapshot, or ours) comes after a free
    one, whatever their estimates; it still answers when no other worker can."""
    fast_busy = speech_worker("a", replace(WHISPER, stt_fixed_ms=100, stt_ms_per_audio_s=10))
    slow_free = speech_worker("b", replace(WHISPER, stt_fixed_ms=900, stt_ms_per_audio_s=400))
    request = SpeechRequest(STT, "en")
    assert ids(rank_speech([fast_busy, slow_free], request)) == ["a", "b"]
    busy = replace(fast_busy, chat_running=1)
    ranked = rank_speech([busy, slow_free], request)
    assert ids(ranked) == ["b", "a"]
    assert "chat_in_flight" in ranked[1].reasons
    assert ids(rank_speech([fast_busy, slow_free], request, own_chat={"a": 1})) == ["b", "a"]
    assert ids(rank_speech([busy], request)) == ["a"]  # better than nothing


def test_one_transcription_per_worker_at_a_time() -> None:
    routing = Router(Clock())
    workers = [speech_worker("a"), speech_worker("b")]
    request = SpeechRequest(STT, "en")
    assert ids(routing.rank_speech(workers, request)) == ["a", "b"]
    routing.begin_speech("a", STT)
    assert ids(routing.rank_speech(workers, request)) == ["b", "a"]
    assert ids(routing.rank_speech(workers, SpeechRequest(TTS, "en"))) == ["a", "b"]
    routing.begin_speech("b", STT)
    assert set(ids(routing.rank_speech(workers, request))) == {"a", "b"}
    routing.end_speech("a", STT)
    assert ids(routing.rank_speech(workers, request)) == ["a", "b"]
    routing.forget("b")
    assert routing.speech_in_flight("b", STT) == 0


def test_our_chat_requests_keep_speech_away() -> None:
    """Within a voice turn the worker generating the answer holds our chat reservation:
    the answer's speech goes to another worker while one is free."""
    routing = Router(Clock())
    workers = [speech_worker("a"), speech_worker("b")]
    routing.reserve(router.Candidate("a", "chat", 1.0), router.RouteRequest())
    assert ids(routing.rank_speech(workers, SpeechRequest(TTS, "en"))) == ["b", "a"]
    avoided = rank_speech(workers, SpeechRequest(TTS, "en", avoid="b"))
    assert ids(avoided) == ["a", "b"] and "answering" in avoided[1].reasons


def test_warm_models_are_preferred() -> None:
    cold = speech_worker("a", replace(WHISPER, warm=False))
    warm = speech_worker("b", WHISPER)
    request = SpeechRequest(STT, "en", audio_s=2.0)
    ranked = rank_speech([cold, warm], request)
    assert ids(ranked) == ["b", "a"] and "cold" in ranked[1].reasons
    assert ranked[1].estimated_s == pytest.approx(ranked[0].estimated_s + COLD_START_S)
    # The cheaper warm model of a worker is its pick.
    both = speech_worker("c", replace(WHISPER, model="big", warm=False), WHISPER)
    assert router.pick_speech_model(both, request) == WHISPER


def test_measured_costs_rank_and_set_the_deadline() -> None:
    measured = replace(WHISPER, stt_fixed_ms=500.0, stt_ms_per_audio_s=100.0)
    request = SpeechRequest(STT, "en", audio_s=3.0)
    assert speech_seconds(measured, request) == pytest.approx(0.8)
    assert speech_deadline(measured, request) == pytest.approx(SLOW_FACTOR * 0.8 + SLOW_SLACK_S)
    assert speech_deadline(WHISPER, request) is None  # nothing measured: no deadline
    voice = replace(VOICE, tts_first_audio_ms=150.0, tts_rtf=0.1)
    assert speech_seconds(voice, SpeechRequest(TTS)) == pytest.approx(0.15)
    assert speech_deadline(voice, SpeechRequest(TTS)) is None
    ranked = rank_speech([speech_worker("a", WHISPER), speech_worker("b", measured)], request)
    assert ids(ranked) == ["b", "a"] and ranked[0].deadline_s is not None


def test_languages_and_models() -> None:
    german = SpeechModelState("thorsten", TTS, ("de_DE",), ("thorsten",), warm=True)
    workers = [speech_worker("a", VOICE), speech_worker("b", german)]
    assert ids(rank_speech(workers, SpeechRequest(TTS, "de-DE"))) == ["b"]
    assert ids(rank_speech(workers, SpeechRequest(TTS, "en"))) == ["a"]
    assert ids(rank_speech(workers, SpeechRequest(TTS, "fr"))) == []
    assert ids(rank_speech(workers, SpeechRequest(TTS, None, model="thorsten"))) == ["b"]
    assert ids(rank_speech(workers, SpeechRequest(STT, "en"))) == []
    assert offered_languages([VOICE, german]) == ["de", "de-DE", "en", "en-US"]
    assert language_tag("EN_us") == "en-US" and iso_language("en-US") == "en"
    assert iso_language(None) is None


def test_flags_and_breakers_rank_last() -> None:
    workers = [
        speech_worker("flagged", only_when_idle=True, user_active=True),
        speech_worker("broken"),
        speech_worker("fine"),
        speech_worker("offline", online=False),
    ]
    ranked = rank_speech(workers, SpeechRequest(STT, "en"), breakers={"broken": BreakerState.OPEN})
    assert ids(ranked) == ["fine", "flagged", "broken"]
    routing = Router(Clock())
    routing.report_failure("fine")
    assert ids(routing.rank_speech(workers, SpeechRequest(STT, "en")))[-1] == "fine"


def test_the_home_assistant_host_speaks_only_when_no_other_worker_can() -> None:
    """The add-on's worker (on the Home Assistant host, often a small board) comes after
    every other worker, a busy one included, however fast it is; alone, it serves."""
    host = speech_worker(
        "addon",
        replace(WHISPER, stt_fixed_ms=50, stt_ms_per_audio_s=10),
        on_home_assistant_host=True,
    )
    busy = speech_worker(
        "desktop", replace(WHISPER, stt_fixed_ms=900, stt_ms_per_audio_s=400), chat_running=1
    )
    ranked = rank_speech([host, busy], SpeechRequest(STT, "en"))
    assert ids(ranked) == ["desktop", "addon"]
    assert "home_assistant_host" in ranked[1].reasons
    assert ids(rank_speech([host], SpeechRequest(STT, "en"))) == ["addon"]


def test_speech_models_and_costs_are_parsed() -> None:
    models = parse_speech_models(
        {
            "data": [
                {"id": "chat", "object": "model", "hearth": {"kind": "chat"}},
                {
                    "id": "en_US-joe-medium",
                    "hearth": {
                        "kind": "tts",
                        "languages": ["en_US"],
                        "voices": ["joe"],
                        "sample_rate": 22050,
                    },
                },
                {"id": "whisper-base", "kind": "stt", "languages": ["en", "de"]},
            ]
        }
    )
    assert [(m.id, m.kind, m.languages, m.sample_rate) for m in models] == [
        ("en_US-joe-medium", "tts", ("en_US",), 22050),
        ("whisper-base", "stt", ("en", "de"), 16000),
    ]
    with pytest.raises(HearthConnectionError):
        parse_speech_models({"data": [{"kind": "stt"}]})
    capacity = parse_capacity(
        {
            "node_id": "n",
            "running": 0,
            "queued": 0,
            "max_running": 1,
            "max_queued": 0,
            "memory_free_mb": 1,
            "memory_total_mb": 2,
            "models": {
                "whisper-base": {
                    "kind": "stt",
                    "loaded": True,
                    "stt_fixed_ms": 300,
                    "stt_ms_per_audio_s": 50.5,
                }
            },
        }
    )
    rates = capacity.models["whisper-base"]
    assert (rates.kind, rates.loaded, rates.stt_fixed_ms, rates.stt_ms_per_audio_s) == (
        "stt",
        True,
        300.0,
        50.5,
    )


# -- the household with real workers -------------------------------------------------------


def entry_id(household: Household, name: str) -> str:
    return next(w.entry_id for w in household.workers.values() if w.name == name)


@pytest.mark.slow  # real models
async def test_speech_goes_to_the_worker_not_generating_the_answer(
    hass: HomeAssistant, speech_workers: dict[str, WorkerProcess]
) -> None:
    household = await set_up(hass, speech_workers)
    for busy, free in (("Alpha", "Beta"), ("Beta", "Alpha")):
        # What async_open_chat holds while a worker streams the answer.
        reservation = household.routing.reserve(
            router.Candidate(entry_id(household, busy), "chat", 1.0), router.RouteRequest()
        )
        answer = await household.async_speak("The light is on.", "en-US")
        household.routing.release(reservation)
        assert answer.worker.name == free
        assert answer.sample_rate == 22050 and len(answer.pcm) > 22050  # over half a second


@pytest.mark.slow  # real models
async def test_speech_fails_over_to_the_next_worker(
    hass: HomeAssistant, speech_workers: dict[str, WorkerProcess]
) -> None:
    """A worker that died since its last poll: the next one speaks the text."""
    household = await set_up(hass, speech_workers)
    first = household.speech_candidates(SpeechRequest(TTS, "en-US"))[0].worker_id
    dead = household.workers[first].name
    os.kill(speech_workers[dead].process.pid, signal.SIGKILL)
    speech_workers[dead].process.wait()
    try:
        answer = await household.async_speak("Good morning.", "en-US", sample_rate=16000)
        assert answer.worker.name != dead and answer.sample_rate == 16000
        assert household.routing.breaker_state(first) is BreakerState.OPEN
    finally:
        restart(speech_workers[dead])
        # Its start-up work (voices, the speech self-check) done before the next test,
        # not on the two cores while later tests run.
        await hass.async_add_executor_job(speech_settled, speech_workers[dead])


@pytest.mark.slow  # real models
async def test_no_voice_no_speech(
    hass: HomeAssistant, speech_workers: dict[str, WorkerProcess]
) -> None:
    household = await set_up(hass, speech_workers)
    with pytest.raises(NoWorkerError):
        await household.async_speak("Bonjour.", "fr-FR")
    with pytest.raises(NoWorkerError):
        await household.async_transcribe(audio_of(b"\0\0" * 1600), "xx")


# -- streaming audio in ---------------------------------------------------------------------


async def audio_of(*chunks: bytes, gate: asyncio.Event | None = None) -> AsyncGenerator[bytes]:
    """Audio as Home Assistant streams it; after the first chunk, waits for `gate`."""
    for index, chunk in enumerate(chunks):
        if index == 1 and gate is not None:
            await gate.wait()
        yield chunk


async def test_utterance_replays_everything_to_each_reader() -> None:
    gate = asyncio.Event()
    utterance = Utterance()
    pump = asyncio.ensure_future(utterance.pump(audio_of(b"ab", b"cd", b"ef", gate=gate)))
    first = utterance.replay()
    assert await anext(first) == b"ab"
    gate.set()
    await pump
    assert [chunk async for chunk in first] == [b"cd", b"ef"]
    assert [chunk async for chunk in utterance.replay()] == [b"ab", b"cd", b"ef"]
    assert utterance.seconds == pytest.approx(6 / 32000) and utterance.ended_at is not None


class Transcriber:
    """A stand-in for a worker's POST /v1/audio/transcriptions on 127.0.0.1 (plain HTTP),
    to check the client's side of the contract: what arrives, and how."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        pieces = [piece async for piece in request.content.iter_any()]
        self.requests.append(
            {
                "query": dict(request.query),
                "content_type": request.headers.get("Content-Type"),
                "chunked": request.headers.get("Transfer-Encoding") == "chunked",
                "authorization": request.headers.get("Authorization"),
                "audio": b"".join(pieces),
            }
        )
        if self.status == 429:
            return web.json_response(
                {"error": {"message": "busy", "type": "rate_limit", "code": "busy"}},
                status=429,
                headers={"Retry-After": "1"},
            )
        if self.status == 400:
            return web.json_response(
                {
                    "error": {
                        "message": "audio/ogg is not taken",
                        "type": "invalid_request_error",
                        "code": "unsupported_audio_format",
                    }
                },
                status=400,
            )
        return web.json_response({"text": f"{len(b''.join(pieces))} bytes"})

    async def __aenter__(self) -> Transcriber:
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *args: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def transcriber() -> AsyncIterator[Transcriber]:
    async with Transcriber() as server:
        yield server


async def test_client_streams_audio_in_as_it_is_spoken(transcriber: Transcriber) -> None:
    """The body is chunked audio/L16, sent while the audio still comes (the second
    chunk is held back until the first reached the server); model and language go
    as query parameters; the token as for chat."""
    gate = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        client = HearthClient(session, "127.0.0.1", transcriber.port, "tok", plain_http=True)
        speech = asyncio.ensure_future(
            client.transcribe_stream(
                "whisper-base", audio_of(b"\1\0" * 800, b"\2\0" * 800, gate=gate), "en"
            )
        )
        await asyncio.sleep(0.2)  # the first chunk is on its way; the answer waits for the rest
        assert not speech.done()
        gate.set()
        assert await speech == "3200 bytes"
        seen = transcriber.requests[0]
        assert seen["query"] == {"model": "whisper-base", "language": "en"}
        assert seen["content_type"] == L16_CONTENT_TYPE and seen["chunked"]
        assert seen["authorization"] == "Bearer tok"
        assert seen["audio"] == b"\1\0" * 800 + b"\2\0" * 800

        transcriber.status = 429
        with pytest.raises(HearthBusyError) as busy:
            await client.transcribe_stream("whisper-base", audio_of(b"\0\0"))
        assert busy.value.retry_after == 1.0
        assert transcriber.requests[-1]["query"] == {"model": "whisper-base"}
        transcriber.status = 400
        with pytest.raises(HearthRequestError) as refused:
            await client.transcribe_stream("whisper-base", audio_of(b"\0\0"))
        assert refused.value.code == "unsupported_audio_format"


async def test_client_transcription_is_bounded(transcriber: Transcriber) -> None:
    never = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        client = HearthClient(session, "127.0.0.1", transcriber.port, "tok", plain_http=True)
        with pytest.raises(HearthConnectionError, match=r"within 0\.3 s"):
            await client.transcribe_stream(
                "whisper-base", audio_of(b"\0\0", b"\0\0", gate=never), within_s=0.3
            )


@pytest.mark.slow  # real models
async def test_a_voice_in_capacity_reads_no_info_at_each_poll(
    hass: HomeAssistant, speech_workers: dict[str, WorkerProcess]
) -> None:
    """/v1/capacity lists the voices (their costs), /v1/info does not: a poll seeing
    them reads /v1/info again only when the models really changed."""
    household = await set_up(hass, speech_workers)
    worker = next(iter(household.workers.values()))
    reads: list[str] = []
    real = worker.client.info

    async def info() -> Any:
        reads.append("info")
        return await real()

    worker.client.info = info  # type: ignore[method-assign]
    for _ in range(3):
        await worker.coordinator.async_refresh()
    assert worker.coordinator.last_update_success
    assert any(rates.kind == "tts" for rates in worker.coordinator.data.models.values())
    assert reads == []


# Closing the connection to the frozen worker leaves asyncio's SSL shutdown timer (30 s)
# running: nothing answers there until it is thawed. The harness cancels it.
@pytest.mark.slow  # real models
@pytest.mark.parametrize("expected_lingering_timers", [True])
async def test_a_slow_transcription_gets_company_and_the_first_answer_wins(
    hass: HomeAssistant, speech_workers: dict[str, WorkerProcess]
) -> None:
    """The worker transcribing freezes (SIGSTOP) while the person speaks: once it is
    slower than its own measured costs allow, the same audio goes to the other worker,
    whose answer is taken; the frozen one is not counted as failed."""
    household = await set_up(hass, speech_workers)
    command = "Turn on the kitchen light."
    pcm = await heard_rendering(household, command)
    request = SpeechRequest(STT, "en", audio_s=len(pcm) / 32000)
    async with asyncio.timeout(60):  # each worker's self-check at start measures its costs
        while not all(c.deadline_s for c in household.speech_candidates(request)):
            for worker in household.workers.values():
                await worker.coordinator.async_refresh()
            await asyncio.sleep(0.2)
    tap = TranscribeTap(household)
    frozen: list[int] = []

    async def freeze_first() -> None:
        while not tap.asked:  # the first worker is asked once the first chunk is in
            await asyncio.sleep(0.01)
        frozen.append(speech_workers[tap.asked[0]].process.pid)
        os.kill(frozen[0], signal.SIGSTOP)

    try:
        async with asyncio.timeout(90):
            answer = await household.async_transcribe(
                as_microphone(pcm, after_first=freeze_first), "en"
            )
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert len(tap.asked) == 2 and answer.worker.name == tap.asked[1] != tap.asked[0]
    assert normalize(answer.text) == normalize(command)
    slow = entry_id(household, tap.asked[0])
    assert household.routing.breaker_state(slow) is BreakerState.CLOSED
    assert household.routing.speech_in_flight(slow, STT) == 0


@pytest.mark.slow  # real models
async def test_audio_that_breaks_off_fails_the_transcription(
    hass: HomeAssistant, speech_workers: dict[str, WorkerProcess]
) -> None:
    """The audio's source fails mid-utterance (a satellite gone): no text is made up
    from the part that came; the error reaches the caller, no job stays open."""
    household = await set_up(hass, speech_workers)

    async def broken() -> AsyncGenerator[bytes]:
        yield b"\0\0" * 1600
        raise ConnectionResetError("the satellite went away")

    with pytest.raises(ConnectionResetError):
        await household.async_transcribe(broken(), "en")
    for worker in household.workers.values():
        assert household.routing.speech_in_flight(worker.entry_id, STT) == 0
