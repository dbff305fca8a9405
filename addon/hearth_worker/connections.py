"""The worker's listening socket, with limits on what a connection may hold.

aiohttp on its own keeps an idle connection for an hour and waits for request
headers without a deadline, so anyone on the network could hold hundreds of
TLS connections (about 250 KB each) open. Here the worker accepts connections
itself and

* caps connections in total and per source address. A client at its cap
  that connects again has its oldest connection closed gracefully (at once
  when idle, after its current request otherwise), as a client that does not
  reuse connections would want; when the total is reached, the address holding
  the most connections gives up its oldest the same way, if it holds more than
  the newcomer would, so one busy address cannot shut others out. Connections
  being closed count against a hard bound of twice the caps, beyond which a
  newcomer is refused at accept, before any TLS work;
* gives every connection ``header_timeout_s`` from accept to finish its TLS
  handshake and the headers of its first request (later requests on the same
  connection fall under aiohttp's keep-alive timeout, which closes a
  connection that idles or drips a request for longer);
* binds the port early (``bind``), so a port that is taken is reported before
  the models load.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LOGGER = logging.getLogger(__name__)

_WARN_EVERY_S = 60.0
_ACCEPT_RETRY_S = 0.5
# A connection asked to make room finishes its request in progress within this.
EVICT_GRACE_S = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the worker holds, and how long they may take."""

    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 30.0
    max_connections: int = 128
    max_per_client: int = 32
    backlog: int = 128

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not 1 <= self.max_per_client <= self.max_connections:
            raise ValueError("need 1 <= max_per_client <= max_connections")


class BindError(Exception):
    """The worker cannot listen where it was asked to; the message says why, in one line."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (not yet listening); raises BindError."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise BindError(f"cannot listen on {host} port {port}: unknown address") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("", "::"):
            with contextlib.suppress(OSError):  # both IPv6 and IPv4 where the OS allows
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        reasons = {
            errno.EADDRINUSE: "the port is already in use (is another worker running?)",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's",
        }
        reason = reasons.get(err.errno or 0, err.strerror or str(err))
        raise BindError(f"cannot listen on {host} port {port}: {reason}") from err
    return sock


class _Connection:
    """One accepted connection, from accept until it is closed."""

    __slots__ = ("closing", "peer", "protocol", "released", "task", "transport")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.task: asyncio.Task[None] | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.protocol: _Guarded | None = None
        self.released = False
        self.closing = False

    def close_gracefully(self) -> None:
        """Close when idle, or after the request in progress."""
        self.closing = True
        if self.protocol is not None and self.transport is not None:
            self.protocol.close_gracefully()
        else:
            self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            transport = self.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            else:  # pragma: no cover - stream sockets always give write transports
                transport.close()
        elif self.task is not None:
            self.task.cancel()  # still in its TLS handshake


class _Guarded(asyncio.Protocol):
    """Forwards to aiohttp's protocol; closes the connection when its first
    request's headers are not complete by the deadline, and reports its end."""

    def __init__(
        self,
        inner: asyncio.Protocol,
        deadline: float,
        on_lost: Callable[[], None],
    ) -> None:
        self._inner = inner
        self._deadline = deadline
        self._on_lost = on_lost
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None
        self._closing: asyncio.Task[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_at(self._deadline, self._too_slow)
        self._inner.connection_made(transport)

    def close_gracefully(self) -> None:
        """Close at once when idle, else after the request in progress (within a grace).

        aiohttp's handler: ``close()`` ends one that waits for a request, and
        ``shutdown()`` closes the connection after the request in progress."""
        close = getattr(self._inner, "close", None)
        shutdown = getattr(self._inner, "shutdown", None)
        if callable(close) and callable(shutdown) and self._closing is None:
            close()
            self._closing = asyncio.get_running_loop().create_task(shutdown(EVICT_GRACE_S))
        elif self._transport is not None:
            self._transport.close()

    def _too_slow(self) -> None:
        self._timer = None
        _LOGGER.debug("Closing a connection that sent no complete request in time")
        if isinstance(self._transport, asyncio.WriteTransport):
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            window = self._tail + data
            if b"\r\n\r\n" in window or b"\n\n" in window:
                self._timer.cancel()
                self._timer = None
                self._tail = b""
            else:
                self._tail = window[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._inner.connection_lost(exc)
        finally:
            self._on_lost()


class Listener:
    """Accepts connections on ``sock`` for ``protocol_factory`` (aiohttp's server)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        ssl_context: ssl.SSLContext | None,
        limits: ConnectionLimits,
    ) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._limits = limits
        self._by_peer: dict[str, list[_Connection]] = {}
        self._total = 0
        self._accepting: asyncio.Task[None] | None = None
        self._warned_at = -_WARN_EVERY_S

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def connections(self) -> int:
        return self._total

    def start(self) -> None:
        self._sock.listen(self._limits.backlog)
        self._accepting = asyncio.get_running_loop().create_task(
            self._accept_loop(), name="hearth-accept"
        )

    async def close(self) -> None:
        """Stop accepting and drop connections still in their handshake.

        Established connections belong to aiohttp's server from then on (the
        runner's cleanup closes them).
        """
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        self._sock.close()
        pending = [
            conn.task
            for conns in self._by_peer.values()
            for conn in conns
            if conn.transport is None and conn.task is not None
        ]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- accepting -------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self._sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as err:  # out of file descriptors or memory: wait a moment
                self._warn("Cannot accept connections for now: %s", err)
                await asyncio.sleep(_ACCEPT_RETRY_S)
                continue
            peer = str(address[0])
            conn = self._admit(peer)
            if conn is None:
                _refuse(sock)
                continue
            conn.task = loop.create_task(self._open(conn, sock))

    def _admit(self, peer: str) -> _Connection | None:
        limits = self._limits
        mine = self._by_peer.get(peer, [])
        if len(mine) >= 2 * limits.max_per_client or self._total >= 2 * limits.max_connections:
            self._warn(
                "Refusing a connection from %s: %d open from there, %d in all",
                peer,
                len(mine),
                self._total,
            )
            return None
        live = [conn for conn in mine if not conn.closing]
        if len(live) >= limits.max_per_client:
            _LOGGER.debug("%s holds %d connections: closing its oldest", peer, len(live))
            live[0].close_gracefully()
            live.pop(0)
        live_total = sum(not conn.closing for conns in self._by_peer.values() for conn in conns)
        if live_total >= limits.max_connections:
            heaviest = max(
                ([conn for conn in conns if not conn.closing] for conns in self._by_peer.values()),
                key=len,
            )
            if len(heaviest) <= len(live) + 1:
                self._warn(
                    "Refusing a connection from %s: %d connections open (the limit)",
                    peer,
                    live_total,
                )
                return None
            _LOGGER.debug("Connection limit reached: closing the oldest from %s", heaviest[0].peer)
            heaviest[0].close_gracefully()
        conn = _Connection(peer)
        self._by_peer.setdefault(peer, []).append(conn)
        self._total += 1
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.released:
            return
        conn.released = True
        self._total -= 1
        conns = self._by_peer.get(conn.peer)
        if conns is not None:
            with contextlib.suppress(ValueError):
                conns.remove(conn)
            if not conns:
                del self._by_peer[conn.peer]

    async def _open(self, conn: _Connection, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._limits.header_timeout_s
        deadline = loop.time() + timeout

        def protocol() -> asyncio.Protocol:
            conn.protocol = _Guarded(self._factory(), deadline, lambda: self._release(conn))
            return conn.protocol

        try:
            transport, _ = await loop.connect_accepted_socket(
                protocol,
                sock,
                ssl=self._ssl,
                ssl_handshake_timeout=timeout if self._ssl is not None else None,
            )
        except asyncio.CancelledError:
            self._release(conn)
            sock.close()
            raise
        except Exception as err:  # a failed handshake is the client's matter
            self._release(conn)
            sock.close()
            _LOGGER.debug("Connection from %s ended before it was set up: %r", conn.peer, err)
            return
        conn.transport = transport
        if conn.closing:  # asked to close during its handshake
            conn.close()

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            _LOGGER.warning(message, *args)
        else:
            _LOGGER.debug(message, *args)


def _refuse(sock: socket.socket) -> None:
    """Close at once with a reset: no TLS work, no lingering state."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
