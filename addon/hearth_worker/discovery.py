"""Advertise this worker on the local network as ``_hearth._tcp.local.`` (mDNS / DNS-SD).

The TXT record says who the worker is, whether it is paired and whether it serves
https or (``--plain-http``) http; it never holds a secret. Home Assistant's
integration browses for the type, then talks to the worker's HTTP API
(``/v1/info``) for everything else.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import unicodedata
from types import TracebackType
from typing import Any

import ifaddr
from zeroconf import InterfaceChoice, IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_hearth._tcp.local."
TXT_VERSION = "1"
DEFAULT_INSTANCE_NAME = "Hearth worker"

# A DNS label holds 63 bytes; leave room for the "-N" zeroconf appends on a name conflict.
_INSTANCE_MAX_BYTES = 56
_LABEL_MAX_BYTES = 63
_TXT_ENTRY_MAX_BYTES = 255


def instance_name(name: str) -> str:
    """A DNS-SD instance label from a display name: printable, no dots, <= 56 bytes."""
    cleaned = "".join(
        " " if unicodedata.category(ch)[0] in "CZ" else ch
        for ch in unicodedata.normalize("NFC", name)
    )
    cleaned = " ".join(cleaned.replace(".", "-").split())
    encoded = cleaned.encode("utf-8")[:_INSTANCE_MAX_BYTES]
    cleaned = encoded.decode("utf-8", errors="ignore").strip()
    return cleaned or DEFAULT_INSTANCE_NAME


def host_label(node_id: str) -> str:
    """The worker's own mDNS host name label, unique per node: ``hearth-<node id>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", node_id.lower()).strip("-")
    if not slug:
        slug = hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:16]
    return f"hearth-{slug}"[:_LABEL_MAX_BYTES].rstrip("-")


def host_ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses that others can reach: no loopback, no link-local."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ip.is_IPv4 or not isinstance(ip.ip, str):
                continue
            address = ipaddress.IPv4Address(ip.ip)
            if address.is_loopback or address.is_link_local or address.is_unspecified:
                continue
            if ip.ip not in found:
                found.append(ip.ip)
    return found


class Advertiser:
    """Keeps one ``_hearth._tcp.local.`` service registered while running.

    ``addresses=None`` advertises all of the host's non-loopback IPv4 addresses and
    listens on every interface; a list restricts both to those addresses. The instance
    name comes from ``name``; if another host already uses it, zeroconf picks a free
    one (``name-2``...). The host name is derived from ``node_id``, so it never clashes.
    """

    def __init__(
        self,
        *,
        node_id: str,
        name: str,
        port: int,
        version: str,
        api_version: int,
        paired: bool,
        addresses: list[str] | None = None,
        scheme: str = "https",
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if addresses is not None:
            for address in addresses:
                ipaddress.IPv4Address(address)  # ValueError for anything else
        self._node_id = node_id
        self._instance = instance_name(name)
        self._server = f"{host_label(node_id)}.local."
        self._port = port
        self._version = version
        self._api_version = api_version
        self._paired = paired
        self._scheme = scheme
        self._addresses = list(addresses) if addresses is not None else None
        self._zeroconf: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._broadcasts: set[asyncio.Future[Any]] = set()
        self._lock = asyncio.Lock()
        self.properties()  # fail early on an oversized TXT entry

    @property
    def service_name(self) -> str | None:
        """The registered full service name (may differ from ``name`` after a conflict)."""
        return self._info.name if self._info is not None else None

    @property
    def running(self) -> bool:
        return self._zeroconf is not None

    def properties(self) -> dict[str, str]:
        """The TXT record."""
        txt = {
            "txtvers": TXT_VERSION,
            "id": self._node_id,
            "version": self._version,
            "api": str(self._api_version),
            "paired": "true" if self._paired else "false",
            # https: pin the certificate at pairing (never trusted from this record).
            "scheme": self._scheme,
        }
        for key, value in txt.items():
            if len(f"{key}={value}".encode()) > _TXT_ENTRY_MAX_BYTES:
                raise ValueError(f"TXT entry {key!r} is longer than 255 bytes")
        return txt

    def _build_info(self, full_name: str, addresses: list[str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            full_name,
            port=self._port,
            properties=self.properties(),
            server=self._server,
            parsed_addresses=addresses,
        )

    def _track(self, broadcast: Any) -> None:
        if isinstance(broadcast, asyncio.Future):
            self._broadcasts.add(broadcast)
            broadcast.add_done_callback(self._broadcasts.discard)

    async def start(self) -> None:
        """Register the service (probes for a free name, then announces it)."""
        async with self._lock:
            if self._zeroconf is not None:
                return
            if self._addresses is None:
                addresses = host_ipv4_addresses()
                interfaces: InterfaceChoice | list[str] = InterfaceChoice.All
            else:
                addresses = list(self._addresses)
                interfaces = list(self._addresses)
            if not addresses:
                _LOGGER.warning("No IPv4 address to advertise; mDNS clients cannot reach us")
            zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            info = self._build_info(f"{self._instance}.{SERVICE_TYPE}", addresses)
            try:
                broadcast = await zeroconf.async_register_service(info, allow_name_change=True)
            except BaseException:
                await zeroconf.async_close()
                raise
            self._zeroconf, self._info = zeroconf, info
            self._track(broadcast)
            _LOGGER.info("Advertising %s on %s port %d", info.name, addresses, self._port)

    async def update(self, *, paired: bool) -> None:
        """Change the pairing state and re-announce the TXT record."""
        async with self._lock:
            self._paired = paired
            if self._zeroconf is None or self._info is None:
                return
            info = self._build_info(self._info.name, self._info.parsed_addresses())
            broadcast = await self._zeroconf.async_update_service(info)
            self._info = info
            self._track(broadcast)
            _LOGGER.debug("Re-announced %s (paired=%s)", info.name, paired)

    async def stop(self) -> None:
        """Unregister (goodbye packets, awaited) and close. Safe to call twice."""
        async with self._lock:
            zeroconf, info = self._zeroconf, self._info
            self._zeroconf = self._info = None
            if zeroconf is None:
                return
            for pending in list(self._broadcasts):
                pending.cancel()
            self._broadcasts.clear()
            try:
                if info is not None:
                    goodbye = await zeroconf.async_unregister_service(info)
                    await goodbye
            finally:
                await zeroconf.async_close()
            _LOGGER.info("Stopped advertising %s", info.name if info else self._instance)

    async def __aenter__(self) -> Advertiser:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
