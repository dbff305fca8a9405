"""Capacity: measured rates, system snapshot and hardware info against the contract."""

from __future__ import annotations

import shutil
import time
from importlib import resources
from typing import Any

import jsonschema
import psutil
import pytest
import yaml
from hearth_worker import capacity
from hearth_worker.capacity import (
    RateTracker,
    hardware_info,
    parse_logind_sessions,
    system_snapshot,
    user_active_from_sessions,
)


def _schemas() -> dict[str, Any]:
    text = resources.files("hearth_worker").joinpath("openapi.yaml").read_text(encoding="utf-8")
    schemas: dict[str, Any] = yaml.safe_load(text)["components"]["schemas"]
    return schemas


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a ``$ref`` to ``#/components/schemas/...`` names; others as they are."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return _resolved(_schemas()[ref.removeprefix("#/components/schemas/")])


def _validate(instance: Any, schema: dict[str, Any]) -> None:
    """Validate against ``schema``, its ``$ref``s (``#/components/schemas/...``) resolved."""
    root = {**schema, "components": {"schemas": _schemas()}}
    jsonschema.Draft202012Validator(root).validate(instance)


# ------------------------------------------------------------------ RateTracker


def test_first_sample_sets_rates_then_ewma() -> None:
    tracker = RateTracker(alpha=0.5)
    tracker.record("m", prompt_tokens=100, prefill_s=1.0, completion_tokens=20, decode_s=2.0)
    assert tracker.snapshot() == {
        "m": {"prefill_tok_s": 100.0, "decode_tok_s": 10.0, "requests_served": 1}
    }
    tracker.record("m", prompt_tokens=300, prefill_s=1.0, completion_tokens=60, decode_s=2.0)
    snap = tracker.snapshot()["m"]
    assert snap["prefill_tok_s"] == pytest.approx(0.5 * 300 + 0.5 * 100)
    assert snap["decode_tok_s"] == pytest.approx(0.5 * 30 + 0.5 * 10)
    assert snap["requests_served"] == 2


def test_default_alpha_is_0_3() -> None:
    tracker = RateTracker()
    for rate in (100.0, 200.0, 50.0):
        tracker.record("m", prompt_tokens=int(rate), prefill_s=1.0, completion_tokens=0, decode_s=0)
    expected = 100.0
    for rate in (200.0, 50.0):
        expected = 0.3 * rate + 0.7 * expected
    assert tracker.snapshot()["m"]["prefill_tok_s"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("prompt_tokens", "prefill_s", "completion_tokens", "decode_s"),
    [
        (0, 1.0, 0, 1.0),
        (10, 0.0, 10, 0.0),
        (-5, 1.0, 10, -1.0),
        (10, float("nan"), 10, float("inf")),
    ],
)
def test_degenerate_samples_are_ignored(
    prompt_tokens: int, prefill_s: float, completion_tokens: int, decode_s: float
) -> None:
    tracker = RateTracker()
    tracker.record("m", prompt_tokens=50, prefill_s=1.0, completion_tokens=10, decode_s=1.0)
    tracker.record(
        "m",
        prompt_tokens=prompt_tokens,
        prefill_s=prefill_s,
        completion_tokens=completion_tokens,
        decode_s=decode_s,
    )
    snap = tracker.snapshot()["m"]
    assert snap["prefill_tok_s"] == 50.0
    assert snap["decode_tok_s"] == 10.0
    assert snap["requests_served"] == 2  # the request was still served


def test_halves_are_independent() -> None:
    tracker = RateTracker()
    # A request cancelled before decoding: prefill counts, decode stays unknown.
    tracker.record("m", prompt_tokens=40, prefill_s=0.5, completion_tokens=0, decode_s=0.0)
    assert tracker.snapshot()["m"] == {
        "prefill_tok_s": 80.0,
        "decode_tok_s": None,
        "requests_served": 1,
    }


def test_seed_and_forget() -> None:
    tracker = RateTracker(alpha=0.5)
    tracker.seed("m", prefill_tok_s=None, decode_tok_s=None)
    assert tracker.snapshot() == {
        "m": {"prefill_tok_s": None, "decode_tok_s": None, "requests_served": 0}
    }
    tracker.seed("m", prefill_tok_s=200.0, decode_tok_s=-1.0)
    assert tracker.snapshot()["m"]["prefill_tok_s"] == 200.0
    assert tracker.snapshot()["m"]["decode_tok_s"] is None
    tracker.record("m", prompt_tokens=100, prefill_s=1.0, completion_tokens=8, decode_s=1.0)
    assert tracker.snapshot()["m"] == {
        "prefill_tok_s": 150.0,
        "decode_tok_s": 8.0,
        "requests_served": 1,
    }
    tracker.seed("m", prefill_tok_s=None, decode_tok_s=20.0)
    assert tracker.snapshot()["m"]["prefill_tok_s"] == 150.0
    assert tracker.snapshot()["m"]["decode_tok_s"] == 20.0
    tracker.forget("m")
    tracker.forget("not-there")
    assert tracker.snapshot() == {}


def test_alpha_is_checked() -> None:
    with pytest.raises(ValueError, match="alpha"):
        RateTracker(alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        RateTracker(alpha=1.5)


def test_snapshot_is_a_copy() -> None:
    tracker = RateTracker()
    tracker.record("m", prompt_tokens=1, prefill_s=1.0, completion_tokens=1, decode_s=1.0)
    snap = tracker.snapshot()
    snap["m"]["requests_served"] = 99
    assert tracker.snapshot()["m"]["requests_served"] == 1


# ------------------------------------------------------------------ contract


def test_capacity_matches_the_openapi_schema() -> None:
    tracker = RateTracker()
    tracker.seed("embed", prefill_tok_s=None, decode_tok_s=None)
    tracker.record("chat", prompt_tokens=64, prefill_s=0.2, completion_tokens=32, decode_s=1.6)
    schema = _schemas()["Capacity"]
    # Chat and embedding models' rates; speech models have costs (test_transcription.py).
    members = schema["properties"]["models"]["additionalProperties"]["anyOf"]
    models_schema = _resolved(next(m for m in members if m["$ref"].endswith("/ModelRates")))
    for rates in tracker.snapshot().values():  # batch_peak_bytes: the host adds it for chat
        assert set(models_schema["required"]) <= set(rates) <= set(models_schema["properties"])
    system = system_snapshot()
    capacity_fields = set(schema["required"])
    assert set(system) <= capacity_fields
    body = {
        "node_id": "n1",
        "running": 0,
        "queued": 0,
        "max_running": 1,
        "max_queued": 4,
        "models": tracker.snapshot(),
        "timestamp": time.time(),
        **system,
    }
    assert set(body) == capacity_fields
    _validate(body, schema)


def test_system_snapshot_types() -> None:
    snap = system_snapshot()
    assert set(snap) == {
        "memory_free_mb",
        "memory_total_mb",
        "cpu_percent",
        "on_battery",
        "battery_percent",
        "user_active",
    }
    assert isinstance(snap["memory_free_mb"], int)
    assert isinstance(snap["memory_total_mb"], int)
    assert 0 <= snap["memory_free_mb"] <= snap["memory_total_mb"]
    assert snap["memory_total_mb"] > 0
    assert isinstance(snap["cpu_percent"], float)
    assert 0.0 <= snap["cpu_percent"] <= 100.0
    assert snap["on_battery"] is None or isinstance(snap["on_battery"], bool)
    assert snap["battery_percent"] is None or isinstance(snap["battery_percent"], float)
    assert snap["user_active"] is None or isinstance(snap["user_active"], bool)


def test_hardware_info_matches_the_openapi_schema() -> None:
    info = hardware_info()
    schema = _resolved(_schemas()["Info"]["properties"]["hardware"])
    assert set(info) == set(schema["properties"])
    _validate(info, schema)
    assert info["cpu_count"] >= 1
    assert info["memory_total_mb"] > 0
    assert info["platform"]
    assert info["machine"]


def test_battery_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    class Battery:
        percent = 57
        secsleft = 0
        power_plugged: bool | None = False

    monkeypatch.setattr(psutil, "sensors_battery", Battery)
    snap = system_snapshot()
    assert snap["on_battery"] is True
    assert snap["battery_percent"] == 57.0
    Battery.power_plugged = None
    assert system_snapshot()["on_battery"] is None
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)
    snap = system_snapshot()
    assert (snap["on_battery"], snap["battery_percent"]) == (None, None)


def test_cpu_model_from_cpuinfo() -> None:
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n"
    assert capacity._cpu_model_from_cpuinfo(x86) == "AMD EPYC 7B13"
    pi = (
        "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\n"
        "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    )
    assert capacity._cpu_model_from_cpuinfo(pi) == "Raspberry Pi 4 Model B Rev 1.4"
    assert capacity._cpu_model_from_cpuinfo("processor\t: 0\nprocessor\t: 1\n") is None


# ------------------------------------------------------------------ user activity (logind)

LIST_SESSIONS = "  2 1000 alice seat0 tty2\nc1  120 gdm   seat0 tty1\n 15 1000 alice       pts/1\n"


def _show(*sessions: dict[str, str]) -> str:
    return "\n\n".join("\n".join(f"{k}={v}" for k, v in s.items()) for s in sessions) + "\n"


GNOME = {"Id": "2", "Type": "wayland", "Class": "user", "Remote": "no", "Active": "yes"}
GREETER = {"Id": "c1", "Type": "wayland", "Class": "greeter", "Remote": "no", "Active": "no"}
SSH = {"Id": "15", "Type": "tty", "Class": "user", "Remote": "yes", "Active": "yes"}


class FakeLoginctl:
    def __init__(self, listing: str | None, show: str | None) -> None:
        self.listing = listing
        self.show = show
        self.calls: list[list[str]] = []
        self.hang = False

    def __call__(self, args: list[str], timeout: float) -> str | None:
        assert timeout <= 1.0
        self.calls.append(args)
        if self.hang:
            raise capacity._CommandTimeout
        if "list-sessions" in args:
            return self.listing
        assert "show-session" in args
        return self.show


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _activity(
    fake: FakeLoginctl, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> capacity._UserActivity:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    return capacity._UserActivity(
        run=fake, clock=clock, platform_name="linux", systemd_booted=lambda: True
    )


def test_logind_parsing() -> None:
    text = _show({**GNOME, "IdleHint": "no", "LockedHint": "no"}, {**SSH, "IdleHint": "no"})
    sessions = parse_logind_sessions(text)
    assert [s["Id"] for s in sessions] == ["2", "15"]
    assert user_active_from_sessions(sessions) is True
    # Idle, locked, remote, greeter or background sessions are nobody at the keyboard.
    assert not user_active_from_sessions([{**GNOME, "IdleHint": "yes", "LockedHint": "no"}])
    assert not user_active_from_sessions([{**GNOME, "IdleHint": "no", "LockedHint": "yes"}])
    assert not user_active_from_sessions([{**GNOME, "IdleHint": "no", "Remote": "yes"}])
    assert not user_active_from_sessions([{**GNOME, "IdleHint": "no", "Active": "no"}])
    assert not user_active_from_sessions([{**GREETER, "IdleHint": "no"}])
    assert not user_active_from_sessions([{**SSH, "IdleHint": "no"}])
    assert not user_active_from_sessions([])


def test_logind_probe_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLoginctl(
        LIST_SESSIONS, _show({**GNOME, "IdleHint": "no"}, {**SSH, "IdleHint": "no"})
    )
    clock = Clock()
    activity = _activity(fake, clock, monkeypatch)
    assert activity.get() is True
    assert len(fake.calls) == 2
    show = fake.calls[1]
    assert show[-3:] == ["2", "c1", "15"]
    assert "IdleHint" in show
    # Cached for ~10 s: no new processes.
    fake.show = _show({**GNOME, "IdleHint": "yes"})
    clock.now += 9.0
    assert activity.get() is True
    assert len(fake.calls) == 2
    clock.now += 2.0
    assert activity.get() is False
    assert len(fake.calls) == 4


def test_logind_no_sessions_and_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLoginctl("", None)
    clock = Clock()
    activity = _activity(fake, clock, monkeypatch)
    assert activity.get() is False  # logind answers: nobody is logged in
    assert len(fake.calls) == 1
    fake.listing = None  # loginctl fails: unknown
    clock.now += 11
    assert activity.get() is None
    fake.listing = LIST_SESSIONS  # show-session fails: unknown
    clock.now += 11
    assert activity.get() is None


def test_logind_hang_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLoginctl(LIST_SESSIONS, _show({**GNOME, "IdleHint": "no"}))
    fake.hang = True
    clock = Clock()
    activity = _activity(fake, clock, monkeypatch)
    assert activity.get() is None
    clock.now += 30
    assert activity.get() is None
    assert len(fake.calls) == 1
    fake.hang = False
    clock.now += 31
    assert activity.get() is True


def test_no_logind_means_unknown_without_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLoginctl(LIST_SESSIONS, _show({**GNOME, "IdleHint": "no"}))
    clock = Clock()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    activity = capacity._UserActivity(run=fake, clock=clock, platform_name="linux")
    assert activity.get() is None
    clock.now += 100
    assert activity.get() is None
    booted = capacity._UserActivity(
        run=fake, clock=clock, platform_name="linux", systemd_booted=lambda: False
    )
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert booted.get() is None
    assert fake.calls == []
    other = capacity._UserActivity(run=fake, clock=clock, platform_name="freebsd14")
    assert other.get() is None


def test_real_command_runner_timeout_and_failure() -> None:
    assert capacity._run_command(["/nonexistent/loginctl"], 0.5) is None
    assert capacity._run_command(["false"], 5.0) is None
    assert capacity._run_command(["echo", "hi"], 30.0) == "hi\n"
    start = time.monotonic()
    with pytest.raises(capacity._CommandTimeout):
        capacity._run_command(["sleep", "60"], 0.2)
    assert time.monotonic() - start < 30  # it did not wait for the command


def test_real_user_activity_is_bounded() -> None:
    """The real probe (the real loginctl, where there is one) cannot hold a snapshot up.

    Bounded by construction, not by a stopwatch: at most two commands, each with
    the short command timeout, then the answer is cached.
    """
    calls: list[tuple[list[str], float]] = []

    def run(args: list[str], timeout: float) -> str | None:
        calls.append((args, timeout))
        return capacity._run_command(args, timeout)

    clock = Clock()
    activity = capacity._UserActivity(run=run, clock=clock)
    value = activity.get()
    assert value is None or isinstance(value, bool)
    assert len(calls) <= 2
    assert all(timeout <= capacity._COMMAND_TIMEOUT_S <= 1.0 for _, timeout in calls)
    clock.now += 1
    assert activity.get() is value
    assert len(calls) <= 2  # cached: no new command
