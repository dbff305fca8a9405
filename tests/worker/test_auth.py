"""Tests for the worker's pairing codes, tokens and wrong-code rate limiting."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hearth_worker.auth import (
    BACKOFF_BASE_S,
    CLIENT_FREE_FAILURES,
    GLOBAL_FREE_FAILURES,
    MAX_CODE_FAILURES,
    AuthStore,
    TokenInfo,
)
from hearth_worker.pairing import PairingError, normalize_code
from local_pairing import pair_locally

CODE_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}$")


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path, clock: FakeClock) -> AuthStore:
    return AuthStore(state_dir, code_ttl_s=900.0, clock=clock)


def wrong_code_for(code: str) -> str:
    """A valid-looking code that differs from ``code``."""
    first = "A" if code[0] != "A" else "B"
    return first + code[1:]


def is_paired(store: AuthStore) -> bool:
    """``store.paired``, unnarrowed (mypy would treat a second check as unreachable)."""
    return store.paired


def pairing_error(store: AuthStore, code: str, client_id: str = "192.0.2.1") -> PairingError:
    with pytest.raises(PairingError) as excinfo:
        pair_locally(store, code, client_id=client_id)
    return excinfo.value


def test_state_dir_created_private(state_dir: Path, clock: FakeClock) -> None:
    AuthStore(state_dir, clock=clock)
    assert state_dir.is_dir()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_pairing_code_shape(store: AuthStore, clock: FakeClock) -> None:
    code = store.new_pairing_code()
    assert CODE_RE.match(code), code
    assert store.pairing_code_expires_at() == clock.now + 900.0


def test_pair_success(store: AuthStore, clock: FakeClock) -> None:
    assert not is_paired(store)
    code = store.new_pairing_code()
    token, info = pair_locally(store, code, client_id="192.0.2.1", client_name="Home Assistant")
    assert token.startswith("hearth_")
    assert len(token) > len("hearth_") + 40
    assert isinstance(info, TokenInfo)
    assert info.name == "Home Assistant"
    assert info.created_at == clock.now
    assert is_paired(store)
    assert store.verify(token) == info
    assert store.list_tokens() == [info]


def test_pair_without_name_names_token_by_client(store: AuthStore) -> None:
    _, info = pair_locally(store, store.new_pairing_code(), client_id="192.0.2.7")
    assert "192.0.2.7" in info.name


def test_code_consumed(store: AuthStore) -> None:
    code = store.new_pairing_code()
    pair_locally(store, code, client_id="192.0.2.1")
    assert pairing_error(store, code).reason == "no_code"
    assert store.pairing_code_expires_at() is None


def test_no_code(store: AuthStore) -> None:
    err = pairing_error(store, "AAAA-AAAA")
    assert err.reason == "no_code"
    assert err.retry_after is None


def test_code_expires(store: AuthStore, clock: FakeClock) -> None:
    code = store.new_pairing_code()
    clock.advance(899.0)
    assert store.pairing_code_expires_at() is not None
    clock.advance(1.0)
    assert store.pairing_code_expires_at() is None
    assert pairing_error(store, code).reason == "expired"


def test_new_code_replaces_previous(store: AuthStore) -> None:
    old = store.new_pairing_code()
    new = store.new_pairing_code()
    if old == new:  # pragma: no cover - 1 in 2**40
        pytest.skip("the same code twice")
    assert pairing_error(store, old).reason == "wrong_code"
    pair_locally(store, new, client_id="192.0.2.1")


def test_wrong_code(store: AuthStore) -> None:
    code = store.new_pairing_code()
    err = pairing_error(store, wrong_code_for(code))
    assert err.reason == "wrong_code"
    assert err.retry_after is None
    # One wrong try does not spoil the code.
    token, _ = pair_locally(store, code, client_id="192.0.2.1")
    assert store.verify(token) is not None


@pytest.mark.parametrize(
    "transform",
    [
        str.lower,
        lambda c: c.replace("-", ""),
        lambda c: c.replace("-", "").lower(),
        lambda c: f"  {c[:2]} {c[2:]} ",
    ],
)
def test_code_case_and_dash_tolerant(store: AuthStore, transform: Callable[[str], str]) -> None:
    code = store.new_pairing_code()
    token, _ = pair_locally(store, transform(code), client_id="192.0.2.1")
    assert store.verify(token) is not None


def test_normalize_code_maps_lookalikes() -> None:
    assert normalize_code("ko1q-oilx") == "K01Q011X"


def test_rate_limit_per_client(store: AuthStore, clock: FakeClock) -> None:
    code = store.new_pairing_code()
    bad = wrong_code_for(code)
    for _ in range(CLIENT_FREE_FAILURES):
        assert pairing_error(store, bad, "192.0.2.1").reason == "wrong_code"

    # Locked out now, even with the right code.
    err = pairing_error(store, code, "192.0.2.1")
    assert err.reason == "rate_limited"
    assert err.retry_after == pytest.approx(BACKOFF_BASE_S)
    clock.advance(0.5)
    err = pairing_error(store, code, "192.0.2.1")
    assert err.retry_after == pytest.approx(BACKOFF_BASE_S - 0.5)

    # Another client is not affected.
    assert pairing_error(store, bad, "192.0.2.2").reason == "wrong_code"

    # Exponential back-off: each further wrong code doubles the wait.
    clock.advance(BACKOFF_BASE_S)
    assert pairing_error(store, bad, "192.0.2.1").reason == "wrong_code"
    err = pairing_error(store, code, "192.0.2.1")
    assert err.reason == "rate_limited"
    assert err.retry_after == pytest.approx(2 * BACKOFF_BASE_S)
    clock.advance(2 * BACKOFF_BASE_S)
    assert pairing_error(store, bad, "192.0.2.1").reason == "wrong_code"
    assert pairing_error(store, code, "192.0.2.1").retry_after == pytest.approx(4 * BACKOFF_BASE_S)

    # Once the wait is over the right code still works.
    clock.advance(4 * BACKOFF_BASE_S)
    token, _ = pair_locally(store, code, client_id="192.0.2.1")
    assert store.verify(token) is not None


def test_rate_limit_global_and_code_invalidated(state_dir: Path, clock: FakeClock) -> None:
    # A long-lived code, so the growing global waits do not outlast it.
    store = AuthStore(state_dir, code_ttl_s=86_400.0, clock=clock)
    code = store.new_pairing_code()
    bad = wrong_code_for(code)
    # Many addresses, one wrong try each: no per-client limit applies.
    for i in range(GLOBAL_FREE_FAILURES):
        assert pairing_error(store, bad, f"198.51.100.{i}").reason == "wrong_code"
    err = pairing_error(store, code, "203.0.113.99")
    assert err.reason == "rate_limited"
    assert err.retry_after == pytest.approx(BACKOFF_BASE_S)

    failures = GLOBAL_FREE_FAILURES
    while failures < MAX_CODE_FAILURES:
        clock.advance(err.retry_after or 0.0)
        assert pairing_error(store, bad, f"198.51.100.{failures}").reason == "wrong_code"
        failures += 1
        if failures < MAX_CODE_FAILURES:
            err = pairing_error(store, code, "203.0.113.99")
            assert err.reason == "rate_limited"
            assert err.retry_after is not None and err.retry_after > 0

    # Too many wrong codes: the code is gone, even the right one is refused.
    assert pairing_error(store, code, "203.0.113.99").reason == "no_code"
    assert store.pairing_code_expires_at() is None
    # A fresh code starts over.
    token, _ = pair_locally(store, store.new_pairing_code(), client_id="203.0.113.99")
    assert store.verify(token) is not None


def test_one_address_cannot_lock_out_everyone(state_dir: Path, clock: FakeClock) -> None:
    """An address guessing for hours neither locks the code for others nor throws it away."""
    store = AuthStore(state_dir, code_ttl_s=86_400.0, clock=clock)
    code = store.new_pairing_code()
    bad = wrong_code_for(code)
    wrong = 0
    while wrong < 2 * MAX_CODE_FAILURES:
        err = pairing_error(store, bad, "198.51.100.7")
        if err.reason == "rate_limited":
            clock.advance(err.retry_after or 1.0)  # the attacker waits out its own lock-out
            continue
        assert err.reason == "wrong_code"
        wrong += 1
    # Still locked out itself, even with the right code...
    assert pairing_error(store, code, "198.51.100.7").reason == "rate_limited"
    # ...while the person with the code, on another address, pairs at once.
    token, _ = pair_locally(store, code, client_id="192.0.2.10")
    assert store.verify(token) is not None


def test_global_failures_shared_across_instances(
    store: AuthStore, state_dir: Path, clock: FakeClock
) -> None:
    code = store.new_pairing_code()
    bad = wrong_code_for(code)
    other = AuthStore(state_dir, clock=clock)
    for i in range(GLOBAL_FREE_FAILURES):
        target = store if i % 2 else other
        assert pairing_error(target, bad, f"198.51.100.{i}").reason == "wrong_code"
    assert pairing_error(store, code, "203.0.113.1").reason == "rate_limited"
    assert pairing_error(other, code, "203.0.113.1").reason == "rate_limited"


def test_code_made_by_another_instance(state_dir: Path, clock: FakeClock) -> None:
    server = AuthStore(state_dir, clock=clock)
    cli = AuthStore(state_dir, clock=clock)
    code = cli.new_pairing_code()
    assert server.pairing_code_expires_at() == clock.now + 900.0
    token, _ = pair_locally(server, code, client_id="192.0.2.1")
    assert cli.verify(token) is not None


def test_create_token_and_revoke(store: AuthStore) -> None:
    token, info = store.create_token("Supervisor")
    assert token.startswith("hearth_")
    assert is_paired(store)
    assert store.verify(token) == info
    assert not store.revoke("no-such-id")
    assert store.revoke(info.token_id)
    assert store.verify(token) is None
    assert not is_paired(store)
    assert not store.revoke(info.token_id)


def test_verify_rejects_unknown(store: AuthStore) -> None:
    token, _ = store.create_token("a")
    assert store.verify("") is None
    assert store.verify("hearth_") is None
    assert store.verify(token + "x") is None
    assert store.verify(token[len("hearth_") :]) is None


def test_several_tokens(store: AuthStore) -> None:
    t1, i1 = store.create_token("one")
    t2, i2 = store.create_token("two")
    assert i1.token_id != i2.token_id
    assert store.verify(t1) == i1
    assert store.verify(t2) == i2
    assert store.revoke(i1.token_id)
    assert store.verify(t1) is None
    assert store.verify(t2) == i2
    assert store.list_tokens() == [i2]


def test_revoke_seen_by_second_instance(state_dir: Path, clock: FakeClock) -> None:
    server = AuthStore(state_dir, clock=clock)
    token, info = pair_locally(server, server.new_pairing_code(), client_id="192.0.2.1")
    assert server.verify(token) == info  # now cached

    cli = AuthStore(state_dir, clock=clock)
    assert [t.token_id for t in cli.list_tokens()] == [info.token_id]
    assert cli.revoke(info.token_id)
    assert server.verify(token) is None
    assert not is_paired(server)

    # And the other way round: a token made elsewhere is accepted at once.
    token2, info2 = cli.create_token("cli")
    assert server.verify(token2) == info2


def test_revoke_from_another_process(state_dir: Path) -> None:
    server = AuthStore(state_dir)
    token, info = server.create_token("ha")
    assert server.verify(token) == info
    script = (
        "import sys; from pathlib import Path; from hearth_worker.auth import AuthStore; "
        "sys.exit(0 if AuthStore(Path(sys.argv[1])).revoke(sys.argv[2]) else 3)"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(state_dir), info.token_id], check=True, timeout=60
    )
    assert server.verify(token) is None


def test_secrets_not_on_disk(store: AuthStore, state_dir: Path) -> None:
    code = store.new_pairing_code()
    raw_code = code.replace("-", "")
    on_disk = "".join(p.read_text() for p in state_dir.iterdir() if p.is_file())
    assert code not in on_disk
    assert raw_code not in on_disk

    token, _ = pair_locally(store, code, client_id="192.0.2.1")
    token2, _ = store.create_token("Supervisor")
    store.new_pairing_code()
    files = [p for p in state_dir.iterdir() if p.is_file()]
    on_disk = "".join(p.read_text() for p in files)
    for secret in (token, token2, token[len("hearth_") :], token2[len("hearth_") :]):
        assert secret not in on_disk
    data = json.loads((state_dir / "tokens.json").read_text())
    hashes = {t["sha256"] for t in data["tokens"]}
    assert hashes == {hashlib.sha256(t.encode()).hexdigest() for t in (token, token2)}
    for path in files:
        if path.name.endswith(".json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # No temporary files left behind.
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_secrets_not_logged(store: AuthStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hearth_worker")
    code = store.new_pairing_code()
    pairing_error(store, wrong_code_for(code))
    token, _ = pair_locally(store, code.lower(), client_id="192.0.2.1", client_name="HA")
    store.verify(token)
    token2, info2 = store.create_token("x")
    store.revoke(info2.token_id)
    text = caplog.text
    assert caplog.records  # the store does log what happened
    for secret in (code, code.replace("-", ""), code.lower(), token, token2):
        assert secret not in text


def test_node_id_stable(state_dir: Path, clock: FakeClock) -> None:
    first = AuthStore(state_dir, clock=clock)
    node_id = first.node_id
    assert re.fullmatch(r"[0-9a-f]{32}", node_id)
    assert first.node_id == node_id
    assert AuthStore(state_dir, clock=clock).node_id == node_id
    assert json.loads((state_dir / "node.json").read_text())["node_id"] == node_id
    assert AuthStore(state_dir.parent / "other", clock=clock).node_id != node_id


def test_corrupt_tokens_file_refuses_and_is_kept(store: AuthStore, state_dir: Path) -> None:
    token, _ = store.create_token("a")
    (state_dir / "tokens.json").write_text("{not json")
    os.utime(state_dir / "tokens.json", ns=(1, 1))  # a different signature for sure
    assert store.verify(token) is None
    assert not is_paired(store)
    with pytest.raises(ValueError):
        store.create_token("b")
    assert (state_dir / "tokens.json").read_text() == "{not json"


def test_corrupt_pairing_file_means_no_code(store: AuthStore, state_dir: Path) -> None:
    code = store.new_pairing_code()
    (state_dir / "pairing.json").write_text("[]")
    assert pairing_error(store, code).reason == "no_code"
    # A new code overwrites it.
    pair_locally(store, store.new_pairing_code(), client_id="192.0.2.1")
