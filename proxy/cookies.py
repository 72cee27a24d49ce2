"""Cookies scoped to their service behind the proxy's one origin.

Every service is served from the same host, so an upstream's cookie would
otherwise come back on every other service's calls, and the buyer's cookies
would reach every upstream. A cookie set by service S is renamed with S's
prefix and pinned to S's path (``Path=/…/proxy/S/``, no ``Domain``); only
cookies carrying S's prefix are forwarded to S, with the prefix taken off.
The renaming keeps that true for clients that ignore ``Path`` and send every
cookie they hold.
"""

from __future__ import annotations

import functools

_SCOPED_ATTRIBUTES = frozenset({"path", "domain"})


@functools.lru_cache(maxsize=4096)  # per service id; computed on every proxied call
def cookie_prefix(service_id: str) -> str:
    return "tw_" + "".join(c for c in service_id if c.isalnum()) + "_"


def service_path(request_path: str, service_id: str) -> str:
    """``/api/v1/proxy/S/`` for a request under it (whichever API prefix it came by)."""
    marker = f"/proxy/{service_id}"
    i = request_path.find(marker)
    return (request_path[:i] if i >= 0 else "") + marker + "/"


def scope_set_cookie(value: str, prefix: str, path: str) -> str | None:
    """The upstream's Set-Cookie renamed and pinned to its service; None if malformed."""
    first, *attributes = value.split(";")
    name, sep, cookie_value = first.partition("=")
    name = name.strip()
    if not sep or not name:
        return None
    kept = [
        a.strip()
        for a in attributes
        if a.strip() and a.split("=", 1)[0].strip().lower() not in _SCOPED_ATTRIBUTES
    ]
    return "; ".join([f"{prefix}{name}={cookie_value.strip()}", f"Path={path}", *kept])


def cookies_for_service(header: str | None, prefix: str) -> str | None:
    """Of the client's Cookie header, only this service's cookies, under their own names."""
    if not header:
        return None
    pairs = []
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name.startswith(prefix) and len(name) > len(prefix):
            pairs.append(f"{name[len(prefix) :]}={value}")
    return "; ".join(pairs) or None
