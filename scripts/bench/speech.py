"""Time to first audio for a one-sentence answer: direct Piper vs. through the worker.

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

Medians of ``--runs`` runs each. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import model_fixtures  # noqa: E402
from worker_process import start_worker  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    voice = model_fixtures.piper_voice()
    model = str(json.loads((voice / "hearth-model.json").read_text())["name"])
    with tempfile.TemporaryDirectory(prefix="hearth-bench-speech-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        (models / voice.name).symlink_to(voice, target_is_directory=True)
        worker = start_worker([], Path(tmp) / "worker", extra=["--models-dir", str(models)])
        try:
            assert worker.token is not None
            figures = asyncio.run(
                measure(start_direct(voice), worker.url, worker.token, worker.ssl, model, args.runs)
            )
        finally:
            worker.stop()
    p50 = {key: statistics.median(values) for key, values in figures.items()}
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
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    print(json.dumps(result) if args.json else "")


if __name__ == "__main__":
    main()
