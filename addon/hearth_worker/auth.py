"""Pairing codes, bearer tokens and wrong-code rate limiting.

Everything lives in one state directory (``/data`` in the add-on):

* ``node.json``: this worker's stable ``node_id``.
* ``pairing.json``: the current pairing code, only as its scrypt verifier
  (``pairing.py``) and salt, with its expiry and the number of wrong attempts
  made against it.
* ``tokens.json``: the paired clients' tokens, only as sha256 hex, each with its
  scope: ``admin`` tokens may also change the machine (pull and remove models).
  Tokens made by pairing are admin; ``create_token`` makes one only when asked.
  A token stored before scopes existed is admin when its name says it came from
  pairing (see ``_legacy_admin``).

Every file is written atomically (temporary file + ``os.replace``) with mode
0600. The CLI (``hearth-worker pair`` / ``tokens revoke``) and the server may
be two processes on the same directory: the server re-reads ``pairing.json``
on every pairing attempt and ``tokens.json`` whenever its stat signature
changes, so a code made or a token revoked by the CLI takes effect on the next
request. Neither a token nor a pairing code is ever logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import pairing
from .pairing import PairingError

if sys.platform != "win32":  # serialises read-modify-write across processes
    import fcntl

_LOGGER = logging.getLogger(__name__)

TOKEN_PREFIX = "hearth_"  # noqa: S105 - a prefix, not a secret
NODE_FILE = "node.json"
PAIRING_FILE = "pairing.json"
TOKENS_FILE = "tokens.json"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1

# Crockford base32: no I, L, O or U, so a code read aloud or off a screen is
# hard to get wrong; the look-alikes are mapped back when a code is entered
# (pairing.normalize_code).
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 8

# Wrong-code rate limiting. Each client (peer address) gets a few free tries,
# then every further wrong code doubles its lock-out. All clients together get
# more free tries before a shared lock-out applies (against an attacker that
# changes address), and the code is thrown away after MAX_CODE_FAILURES. Only
# the first CLIENT_GLOBAL_SHARE wrong codes of one address count towards the
# shared limits: one address alone can neither lock the code for everyone nor
# throw it away, so the person pairing from another address still can.
CLIENT_FREE_FAILURES = 3
CLIENT_GLOBAL_SHARE = CLIENT_FREE_FAILURES
GLOBAL_FREE_FAILURES = 10
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 300.0
MAX_CODE_FAILURES = 20
_MAX_TRACKED_CLIENTS = 1024


@dataclass(frozen=True)
class TokenInfo:
    """What is known about a token, never the token itself."""

    token_id: str
    name: str
    created_at: float  # unix time
    admin: bool = False  # may pull and remove models


# The token the add-on hands Home Assistant through the Supervisor (made anew at
# each start, admin: it stands for pairing there).
SUPERVISOR_TOKEN_NAME = "Home Assistant (Supervisor discovery)"  # noqa: S105
# What pairing names a token: the client's name (Home Assistant sends the first)
# or "paired from <address>".
_PAIRED_NAMES = frozenset({"Home Assistant", SUPERVISOR_TOKEN_NAME})
_PAIRED_PREFIX = "paired from "


def _legacy_admin(name: str) -> bool:
    """The scope of a token stored before scopes existed.

    Such a record holds only its id, name, creation time and hash: whether it came
    from pairing (admin) or from ``tokens create`` (not) shows only in its name.
    Home Assistant pairs as "Home Assistant"; a client pairing without a name gets
    "paired from <address>"; the Supervisor discovery token is made anew at each
    start. Any other name is taken as one given to ``tokens create``: not admin
    (its holder can be made admin again with ``tokens create --admin``).
    """
    return name in _PAIRED_NAMES or name.startswith(_PAIRED_PREFIX)


@dataclass
class _Backoff:
    failures: int = 0
    locked_until: float = 0.0


def _backoff_delay(failures: int, free: int) -> float:
    """Lock-out after the ``failures``-th wrong code (0 while still free)."""
    if failures < free:
        return 0.0
    return float(min(BACKOFF_BASE_S * 2 ** (failures - free), BACKOFF_MAX_S))


def format_code(raw: str) -> str:
    """``K7QF2MXD`` -> ``K7QF-2MXD``."""
    half = len(raw) // 2
    return f"{raw[:half]}-{raw[half:]}"


def _sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically with mode 0600."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o600)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return json.loads(text)


class AuthStore:
    """Pairing and token state of one worker, kept in ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        code_ttl_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dir = Path(state_dir)
        if not self._dir.is_dir():
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dir.chmod(0o700)  # mkdir's mode is masked by the umask
        self._code_ttl_s = code_ttl_s
        self._clock = clock
        self._lock = threading.RLock()
        self._attempt_lock = threading.Lock()  # pairing attempts, one at a time
        self._node_id: str | None = None
        # tokens.json cache: its stat signature and the parsed records.
        self._tokens_sig: tuple[int, int, int, int] | None = None
        self._tokens: list[dict[str, Any]] = []
        # Per-client wrong-code back-off, for the code with this hash only.
        self._clients: OrderedDict[str, _Backoff] = OrderedDict()
        self._clients_code: str | None = None

    @property
    def state_dir(self) -> Path:
        return self._dir

    # -- node id ---------------------------------------------------------

    @property
    def node_id(self) -> str:
        """Random uuid4 hex, made on first use and kept in ``node.json``."""
        if self._node_id is not None:
            return self._node_id
        with self._lock, self._file_lock():
            path = self._dir / NODE_FILE
            data = _read_json(path)
            node_id = data.get("node_id") if isinstance(data, dict) else None
            if not isinstance(node_id, str) or not node_id:
                node_id = uuid.uuid4().hex
                _write_json_atomic(path, {"format_version": FORMAT_VERSION, "node_id": node_id})
                _LOGGER.info("New node id %s", node_id)
            self._node_id = node_id
            return node_id

    # -- pairing codes ---------------------------------------------------

    def new_pairing_code(self) -> str:
        """Make a new pairing code (``XXXX-XXXX``), replacing any previous one.

        Only a salted hash of the code and its expiry are stored; the caller
        shows the returned code to the person pairing.
        """
        raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        salt = secrets.token_bytes(pairing.SALT_BYTES)
        verifier = pairing.code_verifier(raw, salt).hex()
        record = {
            "format_version": FORMAT_VERSION,
            "salt": salt.hex(),
            "verifier": verifier,
            "expires_at": self._clock() + self._code_ttl_s,
            "failures": 0,
            "locked_until": 0.0,
        }
        with self._lock, self._file_lock():
            _write_json_atomic(self._dir / PAIRING_FILE, record)
            self._clients.clear()
            self._clients_code = verifier
        _LOGGER.info("New pairing code made; valid for %d s", round(self._code_ttl_s))
        return format_code(raw)

    def pairing_code_expires_at(self) -> float | None:
        """When the current code expires; None when there is no usable code."""
        with self._lock:
            record = self._load_pairing()
        if record is None or self._clock() >= record["expires_at"]:
            return None
        return float(record["expires_at"])

    def pairing_salt(self) -> str:
        """The current code's salt (hex), public: the first step of the pairing proof.

        Raises PairingError ``no_code`` or ``expired``.
        """
        with self._lock:
            record = self._load_pairing()
        if record is None:
            raise PairingError("no_code")
        if self._clock() >= record["expires_at"]:
            raise PairingError("expired")
        return str(record["salt"])

    def pair_with_proof(
        self,
        *,
        salt: str,
        client_nonce: bytes,
        proof: bytes,
        fingerprint: bytes,
        client_id: str,
        client_name: str | None = None,
    ) -> tuple[str, TokenInfo, bytes]:
        """Check a client's pairing proof (``pairing.py``) and issue a token.

        ``fingerprint`` is this worker's own certificate fingerprint (empty when
        serving plain HTTP). Returns the token, its info and the worker's proof.
        A wrong proof counts as a wrong code. Slow (one scrypt run): call it from
        a thread. Attempts are serialised.
        """

        def check(record: dict[str, Any]) -> bytes | None:
            if not hmac.compare_digest(salt.lower(), record["salt"]):
                raise PairingError("expired")  # the code changed since the client asked
            key = pairing.session_key(bytes.fromhex(record["verifier"]), fingerprint, client_nonce)
            expected = pairing.client_proof(key, fingerprint, client_nonce)
            return key if hmac.compare_digest(expected, proof) else None

        token, info, key = self._attempt(check, client_id=client_id, client_name=client_name)
        return (
            token,
            info,
            pairing.worker_proof(key, fingerprint, client_nonce, token, self.node_id),
        )

    def _attempt(
        self,
        check: Callable[[dict[str, Any]], bytes | None],
        *,
        client_id: str,
        client_name: str | None,
    ) -> tuple[str, TokenInfo, bytes]:
        """One pairing attempt: rate limits, then ``check`` (slow, no lock held), then
        the token or a counted failure. ``check`` returns None for a wrong code."""
        with self._attempt_lock:
            with self._lock, self._file_lock():
                now = self._clock()
                record = self._load_pairing()
                if record is not None and record["verifier"] != self._clients_code:
                    self._clients.clear()  # a new code (maybe made by the CLI)
                    self._clients_code = record["verifier"]
                client = self._clients.get(client_id)
                waits = [0.0]
                if client is not None:
                    waits.append(client.locked_until - now)
                if record is not None:
                    waits.append(float(record["locked_until"]) - now)
                wait = max(waits)
                if wait > 0:
                    _LOGGER.debug(
                        "Pairing attempt from %s rate limited for %.1f s", client_id, wait
                    )
                    raise PairingError("rate_limited", retry_after=wait)
                if record is None:
                    raise PairingError("no_code")
                if now >= record["expires_at"]:
                    raise PairingError("expired")

            result = check(record)  # the slow KDF runs without the store's lock

            with self._lock, self._file_lock():
                current = self._load_pairing()
                if current is None or current["verifier"] != record["verifier"]:
                    raise PairingError("no_code")  # used up or replaced meanwhile
                if result is None:
                    self._count_failure(current, client_id, self._clock())
                    raise PairingError("wrong_code")
                (self._dir / PAIRING_FILE).unlink(missing_ok=True)
                self._clients.clear()
                self._clients_code = None
                name = (client_name or "").strip() or f"{_PAIRED_PREFIX}{client_id}"
                token, info = self._create_token_locked(name, admin=True)
        _LOGGER.info("Paired %r (token id %s)", info.name, info.token_id)
        return token, info, result

    def _count_failure(self, record: dict[str, Any], client_id: str, now: float) -> None:
        client = self._clients.pop(client_id, None) or _Backoff()
        client.failures += 1
        delay = _backoff_delay(client.failures, CLIENT_FREE_FAILURES)
        if delay:
            client.locked_until = now + delay
        self._clients[client_id] = client  # most recent last
        while len(self._clients) > _MAX_TRACKED_CLIENTS:
            self._clients.popitem(last=False)
        if client.failures > CLIENT_GLOBAL_SHARE:
            _LOGGER.warning(
                "Wrong pairing code from %s (%d wrong from there; locked out for %.0f s)",
                client_id,
                client.failures,
                delay,
            )
            return

        failures = int(record["failures"]) + 1
        path = self._dir / PAIRING_FILE
        if failures >= MAX_CODE_FAILURES:
            path.unlink(missing_ok=True)
            self._clients.clear()
            self._clients_code = None
            _LOGGER.warning(
                "Pairing code thrown away after %d wrong attempts; make a new one", failures
            )
            return
        record["failures"] = failures
        global_delay = _backoff_delay(failures, GLOBAL_FREE_FAILURES)
        if global_delay:
            record["locked_until"] = max(float(record["locked_until"]), now + global_delay)
        _write_json_atomic(path, record)
        _LOGGER.warning(
            "Wrong pairing code from %s (%d wrong so far for this code)", client_id, failures
        )

    def _load_pairing(self) -> dict[str, Any] | None:
        path = self._dir / PAIRING_FILE
        try:
            data = _read_json(path)
        except (OSError, ValueError) as err:
            _LOGGER.error("Ignoring unreadable %s: %s", path, err)
            return None
        if data is None:
            return None
        try:
            record: dict[str, Any] = {
                "format_version": int(data.get("format_version", FORMAT_VERSION)),
                "salt": str(data["salt"]),
                "verifier": str(data["verifier"]),
                "expires_at": float(data["expires_at"]),
                "failures": int(data.get("failures", 0)),
                "locked_until": float(data.get("locked_until", 0.0)),
            }
        except (AttributeError, KeyError, TypeError, ValueError):
            _LOGGER.error("Ignoring malformed %s", path)
            return None
        return record

    # -- tokens ------------------------------------------------------------

    @property
    def paired(self) -> bool:
        """Whether any token exists."""
        with self._lock:
            return bool(self._cached_tokens())

    def create_token(self, name: str, *, admin: bool = False) -> tuple[str, TokenInfo]:
        """A new token without a pairing code (Supervisor discovery, the CLI).

        Not admin unless ``admin``: it may use the models, not change them.
        """
        with self._lock, self._file_lock():
            token, info = self._create_token_locked(name, admin=admin)
        _LOGGER.info(
            "Created %stoken %r (token id %s)", "admin " if admin else "", info.name, info.token_id
        )
        return token, info

    def verify(self, token: str) -> TokenInfo | None:
        """The token's info when it is a current token, else None.

        Cheap enough for every request: tokens.json is re-read only when it
        changed on disk (so a revoke by another process applies at once).
        """
        if not token.startswith(TOKEN_PREFIX):
            return None
        given = _sha256_hex(token)
        with self._lock:
            records = self._cached_tokens()
        found: dict[str, Any] | None = None
        for record in records:  # compare against all, in constant time each
            if hmac.compare_digest(given, record["sha256"]):
                found = record
        return None if found is None else _token_info(found)

    def list_tokens(self) -> list[TokenInfo]:
        with self._lock:
            return [_token_info(record) for record in self._cached_tokens()]

    def revoke(self, token_id: str) -> bool:
        """Remove a token; False when there is no token with that id."""
        with self._lock, self._file_lock():
            records = self._load_tokens_strict()
            kept = [record for record in records if record["token_id"] != token_id]
            if len(kept) == len(records):
                return False
            self._save_tokens(kept)
        _LOGGER.info("Revoked token %s", token_id)
        return True

    def _create_token_locked(self, name: str, *, admin: bool) -> tuple[str, TokenInfo]:
        records = self._load_tokens_strict()
        ids = {record["token_id"] for record in records}
        token_id = secrets.token_hex(6)
        while token_id in ids:  # pragma: no cover - 48 random bits
            token_id = secrets.token_hex(6)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = {
            "token_id": token_id,
            "name": name,
            "created_at": self._clock(),
            "sha256": _sha256_hex(token),
            "admin": admin,
        }
        self._save_tokens([*records, record])
        return token, _token_info(record)

    def _tokens_path(self) -> Path:
        return self._dir / TOKENS_FILE

    def _stat_signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = self._tokens_path().stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)

    def _cached_tokens(self) -> list[dict[str, Any]]:
        """The token records, re-read only when the file's signature changed.

        An unreadable file counts as no tokens (every request is refused)
        until it is fixed; it is never overwritten by a read.
        """
        sig = self._stat_signature()
        if sig != self._tokens_sig:
            try:
                self._tokens = self._parse_tokens(_read_json(self._tokens_path()))
            except (OSError, ValueError) as err:
                _LOGGER.error("Refusing all tokens: %s is unreadable: %s", TOKENS_FILE, err)
                self._tokens = []
            self._tokens_sig = sig
        return self._tokens

    def _load_tokens_strict(self) -> list[dict[str, Any]]:
        """The token records read fresh, for a read-modify-write.

        Raises ValueError when the file is corrupt, rather than losing tokens.
        """
        return self._parse_tokens(_read_json(self._tokens_path()))

    @staticmethod
    def _parse_tokens(data: Any) -> list[dict[str, Any]]:
        if data is None:
            return []
        try:
            return [
                {
                    "token_id": str(item["token_id"]),
                    "name": str(item["name"]),
                    "created_at": float(item["created_at"]),
                    "sha256": str(item["sha256"]),
                    "admin": _admin_field(item),
                }
                for item in data["tokens"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed {TOKENS_FILE}: {err!r}") from err

    def _save_tokens(self, records: list[dict[str, Any]]) -> None:
        _write_json_atomic(
            self._tokens_path(), {"format_version": FORMAT_VERSION, "tokens": records}
        )
        self._tokens = records
        self._tokens_sig = self._stat_signature()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An advisory lock on ``state_dir/.lock`` across processes (POSIX)."""
        if sys.platform == "win32":  # pragma: no cover - no flock there
            yield
            return
        fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _token_info(record: dict[str, Any]) -> TokenInfo:
    return TokenInfo(
        token_id=record["token_id"],
        name=record["name"],
        created_at=record["created_at"],
        admin=record["admin"],
    )


def _admin_field(item: dict[str, Any]) -> bool:
    """A stored record's scope; a record from before scopes: see ``_legacy_admin``."""
    if "admin" not in item:
        return _legacy_admin(str(item["name"]))
    value = item["admin"]
    if not isinstance(value, bool):
        raise TypeError(f"'admin' must be true or false, not {value!r}")
    return value
