"""Live capacity of this machine: measured model rates, memory, power and user activity.

Everything here is plain Python (no Home Assistant), cheap to call from the event loop,
and returns JSON-ready values in the shapes of the ``Capacity`` and ``Info.hardware``
schemas of ``openapi.yaml``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

_MIB = 1024 * 1024

# Prime psutil's CPU counter so that the first non-blocking reading means something.
with contextlib.suppress(Exception):
    psutil.cpu_percent(None)


# --------------------------------------------------------------------------- rates


class _ModelRates:
    __slots__ = ("decode_tok_s", "prefill_tok_s", "requests_served")

    def __init__(self) -> None:
        self.prefill_tok_s: float | None = None
        self.decode_tok_s: float | None = None
        self.requests_served = 0


def _rate(tokens: int, seconds: float) -> float | None:
    """Tokens per second, or None for a degenerate sample."""
    if tokens <= 0 or not math.isfinite(seconds) or seconds <= 0:
        return None
    value = tokens / seconds
    return value if math.isfinite(value) else None


def _valid_rate(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


class RateTracker:
    """Measured prefill and decode rates per model, exponentially weighted.

    The first sample of a model sets its rate; each later one moves it by
    ``alpha`` towards the new sample (``new = alpha * sample + (1 - alpha) * old``).
    Prefill and decode are weighted independently, and a degenerate half of a sample
    (no tokens, or no time) is ignored. Every ``record`` counts as one request served.
    Thread-safe: engines may record from their worker threads.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self._alpha = alpha
        self._models: dict[str, _ModelRates] = {}
        self._lock = threading.Lock()

    def _ewma(self, old: float | None, sample: float | None) -> float | None:
        if sample is None:
            return old
        if old is None:
            return sample
        return self._alpha * sample + (1.0 - self._alpha) * old

    def record(
        self,
        model_id: str,
        *,
        prompt_tokens: int,
        prefill_s: float,
        completion_tokens: int,
        decode_s: float,
    ) -> None:
        """Add one served request's timings."""
        prefill = _rate(prompt_tokens, prefill_s)
        decode = _rate(completion_tokens, decode_s)
        with self._lock:
            rates = self._models.setdefault(model_id, _ModelRates())
            rates.prefill_tok_s = self._ewma(rates.prefill_tok_s, prefill)
            rates.decode_tok_s = self._ewma(rates.decode_tok_s, decode)
            rates.requests_served += 1

    def seed(
        self, model_id: str, *, prefill_tok_s: float | None, decode_tok_s: float | None
    ) -> None:
        """Set starting rates (from a warm-up run); None or a non-positive rate keeps
        the current value. The model is listed from now on, even with no rates."""
        prefill = _valid_rate(prefill_tok_s)
        decode = _valid_rate(decode_tok_s)
        with self._lock:
            rates = self._models.setdefault(model_id, _ModelRates())
            if prefill is not None:
                rates.prefill_tok_s = prefill
            if decode is not None:
                rates.decode_tok_s = decode

    def forget(self, model_id: str) -> None:
        """Drop a model (when it is unloaded)."""
        with self._lock:
            self._models.pop(model_id, None)

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """``{model_id: {"prefill_tok_s", "decode_tok_s", "requests_served"}}``."""
        with self._lock:
            return {
                model_id: {
                    "prefill_tok_s": _round(rates.prefill_tok_s),
                    "decode_tok_s": _round(rates.decode_tok_s),
                    "requests_served": rates.requests_served,
                }
                for model_id, rates in self._models.items()
            }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --------------------------------------------------------------------------- speech costs


class _SttCosts:
    """Exponentially weighted moments of (audio seconds, milliseconds) samples: a line
    through them is the fixed cost and the cost per second of audio."""

    __slots__ = ("fixed_ms", "mx", "mxx", "mxy", "my", "per_audio_s_ms", "requests_served")

    def __init__(self) -> None:
        self.mx = self.my = self.mxx = self.mxy = math.nan
        self.fixed_ms: float | None = None
        self.per_audio_s_ms: float | None = None
        self.requests_served = 0


class _TtsCosts:
    __slots__ = ("first_audio_ms", "requests_served", "rtf")

    def __init__(self) -> None:
        self.first_audio_ms: float | None = None
        self.rtf: float | None = None
        self.requests_served = 0


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) and v >= 0 for v in values)


class SpeechCosts:
    """Measured costs of the speech models, from real jobs and the worker's self-check.

    Speech to text: ``stt_fixed_ms + stt_ms_per_audio_s * audio_s`` is the time from
    the end of the audio to its text. Each job is one sample (audio seconds,
    milliseconds); the means of x, y, x*x and x*y are weighted exponentially (the
    first sample sets them, each later one moves them by ``alpha``) and the line
    through them is fitted. Until the samples span ``min_spread_s`` seconds of audio
    (a standard deviation) the slope is unknown: the last one fitted is kept (None
    at first, and the fixed cost None with it).

    Text to speech: ``tts_first_audio_ms`` (from the request to its first audio) and
    ``tts_rtf`` (seconds of synthesis per second of audio), each weighted
    exponentially as ``RateTracker``'s rates. All None until measured. Thread-safe.
    """

    def __init__(self, alpha: float = 0.3, min_spread_s: float = 0.5) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self._alpha = alpha
        self._min_var = min_spread_s * min_spread_s
        self._stt: dict[str, _SttCosts] = {}
        self._tts: dict[str, _TtsCosts] = {}
        self._lock = threading.Lock()

    def _ewma(self, old: float, sample: float) -> float:
        return sample if math.isnan(old) else self._alpha * sample + (1 - self._alpha) * old

    def record_stt(self, model_id: str, *, audio_s: float, elapsed_s: float) -> None:
        """One transcription: ``audio_s`` seconds of audio took ``elapsed_s``."""
        if not _finite(audio_s, elapsed_s):
            return
        x, y = audio_s, elapsed_s * 1000.0
        with self._lock:
            costs = self._stt.setdefault(model_id, _SttCosts())
            costs.requests_served += 1
            costs.mx = self._ewma(costs.mx, x)
            costs.my = self._ewma(costs.my, y)
            costs.mxx = self._ewma(costs.mxx, x * x)
            costs.mxy = self._ewma(costs.mxy, x * y)
            var = costs.mxx - costs.mx * costs.mx
            if var >= self._min_var:
                costs.per_audio_s_ms = max(0.0, (costs.mxy - costs.mx * costs.my) / var)
            if costs.per_audio_s_ms is not None:
                costs.fixed_ms = max(0.0, costs.my - costs.per_audio_s_ms * costs.mx)

    def record_tts(
        self, model_id: str, *, first_audio_s: float, audio_s: float, synthesis_s: float
    ) -> None:
        """One answer spoken: its first audio after ``first_audio_s``; ``audio_s``
        seconds of audio took ``synthesis_s`` of synthesis in all."""
        with self._lock:
            costs = self._tts.setdefault(model_id, _TtsCosts())
            costs.requests_served += 1
            if _finite(first_audio_s):
                sample = first_audio_s * 1000.0
                old = costs.first_audio_ms
                costs.first_audio_ms = (
                    sample if old is None else self._alpha * sample + (1 - self._alpha) * old
                )
            if _finite(audio_s, synthesis_s) and audio_s > 0:
                rtf = synthesis_s / audio_s
                costs.rtf = rtf if costs.rtf is None else self._ewma(costs.rtf, rtf)

    def estimate_stt_s(self, model_id: str, audio_s: float) -> float | None:
        """The expected seconds to transcribe ``audio_s`` of audio; None until measured."""
        with self._lock:
            costs = self._stt.get(model_id)
            if costs is None or costs.fixed_ms is None or costs.per_audio_s_ms is None:
                return None
            return (costs.fixed_ms + costs.per_audio_s_ms * audio_s) / 1000.0

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._stt.pop(model_id, None)
            self._tts.pop(model_id, None)

    def stt(self, model_id: str) -> dict[str, Any]:
        """A speech-to-text model's entry in the capacity snapshot's ``models``."""
        with self._lock:
            costs = self._stt.get(model_id) or _SttCosts()
            return {
                "kind": "stt",
                "stt_fixed_ms": _round(costs.fixed_ms),
                "stt_ms_per_audio_s": _round(costs.per_audio_s_ms),
                "requests_served": costs.requests_served,
            }

    def tts(self, model_id: str) -> dict[str, Any]:
        """A voice's entry in the capacity snapshot's ``models``."""
        with self._lock:
            costs = self._tts.get(model_id) or _TtsCosts()
            return {
                "kind": "tts",
                "tts_first_audio_ms": _round(costs.first_audio_ms),
                "tts_rtf": _round(costs.rtf),
                "requests_served": costs.requests_served,
            }


# --------------------------------------------------------------------------- user activity

_RunCommand = Callable[[list[str], float], "str | None"]

_COMMAND_TIMEOUT_S = 0.5
_CACHE_S = 10.0
_CACHE_AFTER_TIMEOUT_S = 60.0  # a hanging bus: ask much less often
_IDLE_THRESHOLD_S = 300.0  # where the OS gives an idle time rather than a hint
_GRAPHICAL_TYPES = frozenset({"x11", "wayland", "mir"})
_LOGIND_PROPERTIES = ("Id", "Type", "Class", "Remote", "Active", "State", "IdleHint", "LockedHint")


class _CommandTimeout(Exception):
    pass


def _run_command(args: list[str], timeout: float) -> str | None:
    """stdout of a short command, None when it fails; _CommandTimeout when it hangs."""
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        )
    except subprocess.TimeoutExpired as err:
        raise _CommandTimeout from err
    except (OSError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_logind_sessions(show_output: str) -> list[dict[str, str]]:
    """Split ``loginctl show-session ID...`` output into one dict per session."""
    sessions: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in [*show_output.splitlines(), ""]:
        line = raw.strip()
        if not line:
            if current:
                sessions.append(current)
                current = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            current[key] = value
    return sessions


def user_active_from_sessions(sessions: list[dict[str, str]]) -> bool:
    """True when a local graphical user session is in front, not idle and not locked."""
    for session in sessions:
        if session.get("Type") not in _GRAPHICAL_TYPES:
            continue
        if session.get("Remote") == "yes" or session.get("Class", "user") != "user":
            continue
        if session.get("Active") == "no" or session.get("State") in {"closing", "lingering"}:
            continue
        if session.get("IdleHint") == "no" and session.get("LockedHint") != "yes":
            return True
    return False


class _UserActivity:
    """Cached answer to "is someone using this machine?" (None: the OS does not tell)."""

    def __init__(
        self,
        *,
        run: _RunCommand = _run_command,
        clock: Callable[[], float] = time.monotonic,
        platform_name: str = sys.platform,
        systemd_booted: Callable[[], bool] = lambda: Path("/run/systemd/system").is_dir(),
    ) -> None:
        self._run = run
        self._systemd_booted = systemd_booted
        self._clock = clock
        self._platform = platform_name
        self._lock = threading.Lock()
        self._value: bool | None = None
        self._valid_until = -math.inf
        self._unavailable = False

    def get(self) -> bool | None:
        with self._lock:
            now = self._clock()
            if self._unavailable or now < self._valid_until:
                return self._value
            ttl = _CACHE_S
            try:
                self._value = self._probe()
            except _CommandTimeout:
                self._value = None
                ttl = _CACHE_AFTER_TIMEOUT_S
            self._valid_until = now + ttl
            return self._value

    def _probe(self) -> bool | None:
        if self._platform.startswith("linux"):
            return self._probe_logind()
        if self._platform == "win32":
            idle = _windows_idle_s()
            return None if idle is None else idle < _IDLE_THRESHOLD_S
        if self._platform == "darwin":
            return self._probe_macos()
        self._unavailable = True
        return None

    def _probe_logind(self) -> bool | None:
        loginctl = shutil.which("loginctl")
        if loginctl is None or not self._systemd_booted():
            self._unavailable = True
            return None
        listing = self._run(
            [loginctl, "--no-pager", "--no-legend", "list-sessions"], _COMMAND_TIMEOUT_S
        )
        if listing is None:
            return None  # logind not answering: ask again later
        ids = [line.split()[0] for line in listing.splitlines() if line.strip()]
        if not ids:
            return False
        props = [arg for name in _LOGIND_PROPERTIES for arg in ("-p", name)]
        shown = self._run(
            [loginctl, "--no-pager", "show-session", *props, *ids], _COMMAND_TIMEOUT_S
        )
        if shown is None:
            return None
        return user_active_from_sessions(parse_logind_sessions(shown))

    def _probe_macos(self) -> bool | None:
        ioreg = shutil.which("ioreg")
        if ioreg is None:
            self._unavailable = True
            return None
        out = self._run(
            [ioreg, "-c", "IOHIDSystem", "-d", "4", "-r", "-k", "HIDIdleTime"], _COMMAND_TIMEOUT_S
        )
        match = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', out or "")
        if match is None:
            return None
        return int(match.group(1)) / 1e9 < _IDLE_THRESHOLD_S


if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    class _LastInputInfo(ctypes.Structure):
        _fields_ = (("cbSize", wintypes.UINT), ("dwTime", wintypes.DWORD))

    def _windows_idle_s() -> float | None:
        """Seconds since the last keyboard or mouse input (GetLastInputInfo)."""
        info = _LastInputInfo()
        info.cbSize = ctypes.sizeof(_LastInputInfo)
        if not ctypes.windll.user32.GetLastInputInfo(ctypes.byref(info)):
            return None
        tick = int(ctypes.windll.kernel32.GetTickCount()) & 0xFFFFFFFF
        return float((tick - int(info.dwTime)) & 0xFFFFFFFF) / 1000.0

else:

    def _windows_idle_s() -> float | None:
        return None


_user_activity = _UserActivity()


# --------------------------------------------------------------------------- snapshots


def _battery() -> tuple[bool | None, float | None]:
    sensors = getattr(psutil, "sensors_battery", None)
    if sensors is None:
        return None, None
    try:
        battery = sensors()
    except Exception:  # a sensor read must never break a capacity report
        return None, None
    if battery is None:
        return None, None
    plugged = battery.power_plugged
    on_battery = None if plugged is None else not plugged
    percent = battery.percent
    return on_battery, (float(percent) if percent is not None and math.isfinite(percent) else None)


def system_snapshot() -> dict[str, Any]:
    """Memory, CPU load, power and user activity, as in the ``Capacity`` schema."""
    memory = psutil.virtual_memory()
    on_battery, battery_percent = _battery()
    return {
        "memory_free_mb": int(memory.available // _MIB),
        "memory_total_mb": int(memory.total // _MIB),
        "cpu_percent": float(psutil.cpu_percent(None)),
        "on_battery": on_battery,
        "battery_percent": battery_percent,
        "user_active": _user_activity.get(),
    }


def _cpu_count() -> int:
    """CPUs this process may use (affinity / container limits where the OS says)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        with contextlib.suppress(OSError):
            return len(affinity(0)) or 1
    return os.cpu_count() or 1


_CPUINFO_KEYS = ("model name", "cpu model", "hardware", "model", "processor")


def _cpu_model_from_cpuinfo(text: str) -> str | None:
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and value and key in _CPUINFO_KEYS and key not in found:
            found[key] = value
    for key in _CPUINFO_KEYS:
        value = found.get(key, "")
        if key == "processor" and value.isdigit():
            continue  # x86 numbers its processors under this key
        if value:
            return value
    return None


@functools.cache
def _cpu_model() -> str | None:
    model: str | None = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            model = _cpu_model_from_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    elif sys.platform == "darwin":
        with contextlib.suppress(_CommandTimeout):
            out = _run_command(["/usr/sbin/sysctl", "-n", "machdep.cpu.brand_string"], 1.0)
            model = out.strip() if out else None
    if not model:
        processor = platform.processor().strip()
        trivial = {"", platform.machine().lower(), "arm", "i386", "unknown"}
        model = None if processor.lower() in trivial else processor
    return model


def hardware_info() -> dict[str, Any]:
    """The ``Info.hardware`` object: what this machine is."""
    return {
        "cpu_count": _cpu_count(),
        "memory_total_mb": int(psutil.virtual_memory().total // _MIB),
        "platform": platform.system() or sys.platform,
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
    }
