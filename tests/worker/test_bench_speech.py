"""scripts/bench/speech.py's fail-over figure: how the audio is cut as a microphone
sends it, and what ``stt_failover_ms`` is made of (the bench itself runs real
workers and Home Assistant: minutes; here its pure parts)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import model_fixtures
import pytest
from worker_process import WorkerProcess

BENCH_PY = model_fixtures.REPO / "scripts" / "bench" / "speech.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("hearth_bench_speech", BENCH_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mic_chunks_cut_the_audio_as_it_is_spoken(bench: Any) -> None:
    pcm = bytes(range(256)) * 40  # 10240 bytes: 5120 samples, 0.32 s at 16 kHz
    chunks = bench.mic_chunks(pcm, chunk=4096)
    assert b"".join(piece for _, piece in chunks) == pcm
    assert [len(piece) for _, piece in chunks] == [4096, 4096, 2048]
    # each chunk is sent once it has been spoken: its end, in seconds of audio
    assert [due for due, _ in chunks] == [0.128, 0.256, 0.32]
    assert bench.mic_chunks(b"") == []
    assert bench.mic_chunks(pcm)[0] == (0.064, pcm[:2048])  # 64 ms by default


def test_failover_figure_is_the_median_of_each_commands_extra_time(bench: Any) -> None:
    # per command: the time with the first worker killed minus its time without
    normal = [1500.0, 1800.0, 1600.0, 2500.0]
    failover = [1900.0, 1900.0, 2600.0, 2700.0]  # extra: 400, 100, 1000, 200
    assert bench.failover_extra_ms(normal, failover) == 300.0
    # a fail-over that happened to be faster than its own normal run counts as such
    assert bench.failover_extra_ms([2000.0], [1800.0]) == -200.0
    with pytest.raises(ValueError):
        bench.failover_extra_ms([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        bench.failover_extra_ms([], [])


def test_a_restarted_worker_counts_as_settled_after_its_own_self_check(
    bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fail-over's next command waits for the killed worker's self-check after its
    new start (its transcriptions would take the cores from the measurement), and for
    its measured STT costs (the router's deadline)."""
    log = tmp_path / "worker.log"
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    worker = WorkerProcess("https://127.0.0.1:9", 9, tmp_path, log, process)
    costs: dict[str, Any] = {"kind": "stt", "stt_fixed_ms": None}
    voice = {"kind": "tts", "loaded": True}
    monkeypatch.setattr(bench, "worker_json", lambda _w, path: {"models": {"w": costs, "v": voice}})
    started = "INFO hearth_worker: Hearth worker 0.1.0 listening on https://127.0.0.1:9\n"
    checked = "INFO hearth_worker.transcription: Speech self-check with v and w: 2/2\n"
    log.write_text(started + checked)
    assert not bench.stt_settled(worker)  # no costs yet
    costs["stt_fixed_ms"] = 900.0
    assert bench.stt_settled(worker)
    log.write_text(started + checked + started)  # started again: its check to come
    assert not bench.stt_settled(worker)
    log.write_text(started + checked + started + checked)
    assert bench.stt_settled(worker)
