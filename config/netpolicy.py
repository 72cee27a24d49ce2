"""Which upstream addresses Tollway may connect to (the SSRF policy).

The same policy guards service endpoints, webhook URLs and provider endpoint
tests. It is applied twice: when a URL is registered (literal addresses and
names such as ``localhost``) and again at connect time through a resolver that
drops forbidden addresses, so a name that later resolves to loopback (DNS
rebinding) is refused too.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class AddressForbidden(OSError):
    """Raised at connect time; aiohttp surfaces it as a ClientConnectorError."""


def forbidden_address(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Only globally routable unicast addresses: this also refuses the shared
    # 100.64.0.0/10 range (some clouds' metadata services live there), the
    # documentation and benchmarking ranges, and every private range.
    return not ip.is_global or ip.is_multicast


def check_url(
    url: str, *, allow_private: bool, schemes: tuple[str, ...] = ("http", "https")
) -> str | None:
    """Return why ``url`` is refused, or None when it is acceptable at registration."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in schemes:
        return f"scheme must be one of {', '.join(schemes)}"
    host = parts.hostname
    if not host:
        return "URL has no host"
    try:
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return "invalid port"
    if parts.username or parts.password:
        return "credentials in the URL are not allowed"
    if allow_private:
        return None
    if host.lower().rstrip(".") in LOCAL_NAMES or forbidden_address(host):
        return "private, loopback, link-local and multicast addresses are not allowed"
    return None


class PolicyResolver(AbstractResolver):
    """A resolver that refuses forbidden addresses at connect time."""

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None):
        self._allow_private = allow_private
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: int = socket.AF_INET
    ) -> list[dict[str, Any]]:
        if not self._allow_private and host.lower().rstrip(".") in LOCAL_NAMES:
            raise AddressForbidden(f"{host} is a local name")
        infos = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return infos
        allowed = [i for i in infos if not forbidden_address(i["host"])]
        if not allowed:
            raise AddressForbidden(f"{host} resolves only to forbidden addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()
