"""The worker's TLS certificate: self-signed, made on first start, kept in the state dir.

Clients do not trust it through a certificate authority: Hearth pins its SHA-256
fingerprint (the hash of the DER certificate) at pairing, and the pairing exchange
proves that fingerprint belongs to the worker whose code the person typed
(``pairing.py``). Files: ``tls-cert.pem`` (public) and ``tls-key.pem`` (the private
key, mode 0600). Delete both and restart to get a new certificate; paired clients
then refuse the worker until they pair again.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LOGGER = logging.getLogger(__name__)

CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"
VALID_DAYS = 20 * 365  # pinned, never checked against a CA: a long life avoids surprise expiry


@dataclass(frozen=True)
class Certificate:
    """The worker's certificate files and its pinned identity."""

    cert_path: Path
    key_path: Path
    fingerprint: bytes  # SHA-256 of the DER certificate

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()

    @property
    def fingerprint_display(self) -> str:
        """``AB:CD:...``, as browsers show it."""
        return format_fingerprint(self.fingerprint)

    def server_context(self) -> ssl.SSLContext:
        """A server-side context serving this certificate (TLS 1.2 or newer)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def format_fingerprint(fingerprint: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in fingerprint)


def fingerprint_of_pem(pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically with ``mode`` (the file never exists with looser rights)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _create(state_dir: Path, node_id: str, hostnames: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Hearth worker {node_id[:16]}")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys(hostnames) if h]
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(state_dir / KEY_FILE, key_pem, 0o600)
    _write_private(state_dir / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_certificate(
    state_dir: Path, node_id: str, hostnames: list[str] | None = None
) -> Certificate:
    """The state dir's certificate, made first when missing or unusable.

    ``hostnames`` go into the subject alternative names (informational: clients
    pin the fingerprint instead of checking names).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    fingerprint: bytes | None = None
    if cert_path.is_file() and key_path.is_file():
        try:
            fingerprint = fingerprint_of_pem(cert_path.read_bytes())
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
        except (ValueError, OSError, ssl.SSLError) as err:
            _LOGGER.error("Unusable TLS certificate in %s (%s): making a new one", state_dir, err)
            fingerprint = None
    if fingerprint is None:
        _create(state_dir, node_id, hostnames or ["localhost"])
        fingerprint = fingerprint_of_pem(cert_path.read_bytes())
        _LOGGER.info("New TLS certificate, SHA-256 %s", format_fingerprint(fingerprint))
    if key_path.stat().st_mode & 0o077:
        key_path.chmod(0o600)
    return Certificate(cert_path=cert_path, key_path=key_path, fingerprint=fingerprint)
