"""The Piper child process: speaks for the worker over stdin/stdout.

Piper (``piper-tts``) is GPL-3.0-or-later (it bundles espeak-ng) while the worker is
Apache-2.0, so the worker never imports it: ``speech.py`` starts this file as a
separate program (``python -I piper_child.py --model VOICE.onnx``) and talks to it
through pipes only. Nothing here listens on a socket, writes a file or logs text.

Protocol (one request at a time):

* stdin: one JSON object per line, ``{"text": "...", "length_scale": 1.0}``;
* stdout: frames of one type byte, a 4-byte big-endian length and the payload:
  ``R`` ready (JSON: ``sample_rate``; once, after the voice is loaded and warm),
  ``A`` audio (16-bit little-endian mono PCM at the voice's rate), ``E`` the end of
  the request's audio, ``X`` a failed request (the error's type name).

This file imports only the standard library and ``piper``; it is not imported by the
worker (tests/worker/test_speech.py checks that ``piper`` stays out of it).
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
from typing import BinaryIO

WARMUP_TEXT = "Ready."


def _frame(out: BinaryIO, kind: bytes, payload: bytes = b"") -> None:
    out.write(kind + struct.pack(">I", len(payload)) + payload)
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the voice's .onnx file")
    parser.add_argument("--config", help="its .onnx.json (default: next to it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # nothing of what is spoken is logged

    from piper import PiperVoice, SynthesisConfig  # noqa: PLC0415 - GPL: this process only

    voice = PiperVoice.load(args.model, config_path=args.config)
    for _chunk in voice.synthesize(WARMUP_TEXT):  # the first run is slower: not a user's
        pass
    out = sys.stdout.buffer
    _frame(out, b"R", json.dumps({"sample_rate": voice.config.sample_rate}).encode())
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            scale = request.get("length_scale")
            config = SynthesisConfig(length_scale=float(scale) if scale else None)
            for chunk in voice.synthesize(str(request["text"]), config):
                _frame(out, b"A", chunk.audio_int16_bytes)
        except Exception as err:
            _frame(out, b"X", type(err).__name__.encode())
        else:
            _frame(out, b"E")


if __name__ == "__main__":
    main()
