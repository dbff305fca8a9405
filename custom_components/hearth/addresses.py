"""Where a worker may be: the address policy, and a host resolved to an allowed address.

By default only private, link-local and loopback addresses (`address_allowed`);
the client sends every request to the address checked here (PRIVACY.md).
No Home Assistant imports (tests/integration/test_pure_modules.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from .worker_api import HearthAddressError, HearthConnectionError

# Where a worker may be by default: the home network. CGNAT (100.64.0.0/10) is
# not in it: it may be the ISP's network (Tailscale users allow it explicitly).
HOME_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def address_allowed(address: str, allow_public: bool = False) -> bool:
    """Whether the integration may talk to this IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    return allow_public or any(ip in net for net in HOME_NETWORKS)


async def async_resolve(host: str, port: int, allow_public: bool = False) -> str:
    """The first of `host`'s IP addresses the policy allows.

    Raises HearthConnectionError when `host` does not resolve, HearthAddressError
    when none of its addresses is allowed.
    """
    try:
        found = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as err:
            raise HearthConnectionError(f"Cannot resolve {host}: {err}") from err
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in found:
        if address_allowed(address, allow_public):
            return address
    raise HearthAddressError(
        f"{host} ({', '.join(found)}) is not a private, link-local or loopback"
        " address: allow other addresses explicitly to use it"
    )
