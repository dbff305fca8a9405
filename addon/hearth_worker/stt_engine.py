"""Speech to text with Whisper on onnxruntime-genai.

A Whisper model folder (scripts/export_model: kind ``stt``, format
``genai-whisper``) holds the genai builder's encoder and decoder, its
``genai_config.json``, ``audio_processor_config.json`` (the log-mel spectrogram,
computed by genai's multimodal processor) and the tokenizer. `WhisperEngine`
loads one; `transcribe()` takes 16 kHz 16-bit little-endian mono PCM and returns
the text. It is blocking (about a second and a half of CPU for a command on a
2-core machine, most of it the encoder) and runs in an executor; one
transcription at a time per engine.

The audio stays in memory: the PCM gets a WAV header and goes to genai as bytes
(``og.Audios.open_bytes``), nothing is written to disk or logged (DEBUG lines say
sizes and times only).

Language: given (ISO 639-1, "en"; a region, "en-US", is dropped), it is the
decoder's prompt; not given, the model picks it: the first decoding step's logits
over the language tokens, then the prompt goes on with that language. An
English-only model (whisper-*.en: no language tokens) hears English only. Decoding is
greedy, without timestamps, and bounded by the audio's length (`max_new_tokens`),
so a model that loops on noise stops soon.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og

from .manifest import MANIFEST_NAME, ManifestError, load_manifest

_LOGGER = logging.getLogger(__name__)

FORMAT = "genai-whisper"
SAMPLE_RATE = 16000
MAX_AUDIO_S = 30.0  # Whisper hears 30 s windows; the HTTP layer refuses longer audio
# New tokens allowed: a fixed margin plus this many per second of audio (people say
# about 3 words, 4-5 tokens, a second; Whisper on noise can repeat itself until
# its context is full).
TOKENS_FIXED = 16
TOKENS_PER_AUDIO_S = 12
_START = "<|startoftranscript|>"
_TASK = "<|transcribe|>"
_NO_TIMESTAMPS = "<|notimestamps|>"


class UnsupportedLanguageError(ValueError):
    """The model does not know the language asked for."""


def pcm_to_wav(pcm: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM as an in-memory WAV file."""
    size = len(pcm)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", size)
        + pcm
    )


def language_code(language: str) -> str:
    """ "en-US", "EN", "en_us" -> "en"."""
    return language.strip().replace("_", "-").split("-")[0].lower()


def max_new_tokens(audio_s: float) -> int:
    return TOKENS_FIXED + math.ceil(audio_s * TOKENS_PER_AUDIO_S)


def session_options(threads: int) -> dict[str, Any]:
    """The encoder's and the decoder's onnxruntime session options (genai_config's
    ``session_options``: any key but genai's own is a session config entry).

    No spin-waiting: the encoder's and the decoder's thread pools take turns (each
    would spin on the cores while the other works), and on a small machine the
    worker's other models and other processes share the cores (measured, 2 cores
    under load, 48 commands interleaved: p50 2428 ms spinning, 2184 ms not)."""
    return {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": "0"}


def _config(model_dir: Path, threads: int) -> og.Config:
    config = og.Config(str(model_dir))
    config.clear_providers()
    options = {"session_options": session_options(threads)}
    config.overlay(json.dumps({"model": {"encoder": options, "decoder": options}}))
    return config


class WhisperEngine:
    """One Whisper model loaded with onnxruntime-genai."""

    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        model_dir: Path,
        *,
        name: str,
        languages: list[str],
        threads: int | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.name = name
        self.languages = languages
        self.threads = threads or os.cpu_count() or 1
        self._model = og.Model(_config(model_dir, self.threads))
        self._processor = self._model.create_multimodal_processor()
        self._tokenizer = og.Tokenizer(self._model)
        self._context = int(self._read_genai_config()["model"]["context_length"])
        # An English-only model (whisper-*.en) has no language or task tokens.
        self._multilingual = self._single_token("<|en|>") is not None
        self._language_ids = (
            {code: self._token_id(f"<|{code}|>") for code in languages}
            if self._multilingual
            else {code: -1 for code in languages}
        )
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: Path, *, threads: int | None = None) -> WhisperEngine:
        """The Whisper model in ``model_dir`` (hearth-model.json of kind "stt",
        format "genai-whisper"). Raises ManifestError for any other folder."""
        manifest = load_manifest(model_dir)
        data = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        if manifest.kind != "stt" or data.get("format") != FORMAT:
            raise ManifestError(
                f"{model_dir} is not a Whisper model (kind {manifest.kind!r}, "
                f"format {data.get('format')!r}; expected 'stt', {FORMAT!r})"
            )
        languages = [str(code) for code in data.get("languages") or []]
        if not languages:
            raise ManifestError(f"{model_dir / MANIFEST_NAME} lists no languages")
        started = time.perf_counter()
        engine = cls(model_dir, name=manifest.name, languages=languages, threads=threads)
        _LOGGER.info(
            "Speech-to-text model %s loaded in %.1f s (%d languages)",
            manifest.name,
            time.perf_counter() - started,
            len(languages),
        )
        return engine

    def _read_genai_config(self) -> dict[str, Any]:
        data = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ManifestError(f"{self.model_dir}: genai_config.json is not an object")
        return data

    def _single_token(self, token: str) -> int | None:
        ids = [int(i) for i in self._tokenizer.encode(token)]
        return ids[0] if len(ids) == 1 else None

    def _token_id(self, token: str) -> int:
        found = self._single_token(token)
        if found is None:
            raise ManifestError(f"{self.model_dir}: the tokenizer has no token {token}")
        return found

    def transcribe(self, pcm: bytes, language: str | None = None) -> str:
        """The text said in ``pcm`` (16 kHz, 16-bit little-endian, mono; at most
        MAX_AUDIO_S). ``language``: an ISO 639-1 code, None to detect it."""
        if len(pcm) % 2:
            raise ValueError("16-bit PCM has an even number of bytes")
        audio_s = len(pcm) / 2 / SAMPLE_RATE
        if audio_s > MAX_AUDIO_S:
            raise ValueError(f"audio longer than {MAX_AUDIO_S:g} s ({audio_s:.1f} s)")
        code = None
        if language is not None:
            code = language_code(language)
            if code not in self._language_ids:
                raise UnsupportedLanguageError(
                    f"{self.name} does not know the language {language!r}"
                )
        if not pcm:
            return ""
        with self._lock:
            started = time.perf_counter()
            text = self._transcribe(pcm, code, audio_s)
        _LOGGER.debug(
            "Transcribed %.2f s of audio in %.0f ms (%d characters)",
            audio_s,
            (time.perf_counter() - started) * 1000,
            len(text),
        )
        return text

    def _transcribe(self, pcm: bytes, code: str | None, audio_s: float) -> str:
        audios = og.Audios.open_bytes(pcm_to_wav(pcm))
        if not self._multilingual:
            prompt, code = _START + _NO_TIMESTAMPS, self.languages[0]
        elif code is None:
            prompt = _START
        else:
            prompt = f"{_START}<|{code}|>{_TASK}{_NO_TIMESTAMPS}"
        inputs = self._processor(prompt, audios=audios)
        params = og.GeneratorParams(self._model)
        prompt_tokens = 4  # at most
        params.set_search_options(
            do_sample=False,
            batch_size=1,
            max_length=min(self._context, prompt_tokens + max_new_tokens(audio_s)),
        )
        generator = og.Generator(self._model, params)
        generator.set_inputs(inputs)
        if code is None:
            # The first step's logits, over the languages only (the encoder runs here).
            logits = np.asarray(generator.get_logits()).reshape(-1)
            codes = list(self._language_ids)
            scores = [float(logits[self._language_ids[c]]) for c in codes]
            code = codes[int(np.argmax(scores))]
            generator.append_tokens(
                [self._language_ids[code], self._token_id(_TASK), self._token_id(_NO_TIMESTAMPS)]
            )
        while not generator.is_done():
            generator.generate_next_token()
        text = str(self._processor.decode(generator.get_sequence(0)))
        return text.strip()

    def warm_up(self) -> float:
        """Run the model once on a second of silence (the first run sets up buffers
        and kernels); returns the milliseconds it took."""
        started = time.perf_counter()
        self.transcribe(bytes(2 * SAMPLE_RATE), self.languages[0])
        return (time.perf_counter() - started) * 1000
