"""The request Tollway sends upstream: which headers pass, the body it streams.

The buyer's credentials and payment material are Tollway's alone and never
reach an upstream; hop-by-hop headers never cross the proxy; the body streams
through with its size limit and an upload deadline enforced as it arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from proxy.cookies import cookies_for_service
from proxy.errors import REQUEST_ID

PAYMENT_RESPONSE = frozenset(("payment-response", "x-payment-response"))
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    )
)
# Never forwarded upstream: the buyer's credentials and payment material are for us only.
PRIVATE_REQUEST = HOP_BY_HOP | frozenset(
    (
        "host",
        "authorization",
        "api-key",
        "x-payment",
        "payment-signature",
        "x-invoice-id",
        "x-wallet-address",
        "x-payer-signature",
        "x-payer-key",
        "x-payment-chain",
        "x-batch-target",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "content-length",
    )
)


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class RequestBody:
    """Streams the request body upstream, counting and enforcing the size
    limit and an upload deadline.

    The deadline matters for money: the call's hold is placed before the body
    is read, and a body trickled in for longer than the hold lives would let
    the hold expire and the call go unpaid.
    """

    __slots__ = ("content", "limit", "count", "too_large", "too_slow", "deadline")

    def __init__(self, content: Any, limit: int, max_seconds: float):
        self.content, self.limit, self.count = content, limit, 0
        self.too_large = self.too_slow = False
        self.deadline = time.monotonic() + max_seconds

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        while True:
            try:
                # A stalled upload hits the deadline too, not only a trickled one.
                async with asyncio.timeout_at(_loop_deadline(self.deadline)):
                    chunk = await self.content.readany()
            except TimeoutError:
                self.too_slow = True
                raise BodyTooSlow() from None
            if not chunk:
                return
            self.count += len(chunk)
            if self.count > self.limit:
                self.too_large = True
                raise BodyTooLarge()
            yield chunk


def _loop_deadline(monotonic_deadline: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


def tail_of(raw_path: str) -> str:
    """The still-encoded path after /proxy/{service_id}/."""
    q = raw_path.find("?")
    path = raw_path if q < 0 else raw_path[:q]
    i = path.find("/proxy/")
    rest = path[i + 7 :]
    slash = rest.find("/")
    return "" if slash < 0 else rest[slash + 1 :]


def escapes(tail: str) -> bool:
    """True when the tail could climb out of the service's base path once an
    upstream decodes it, however many times (%2e%2e, %252e%252e, backslashes)."""
    seen = tail
    for _ in range(4):
        parts = seen.replace("\\", "/").split("/")
        if any(p in ("..", ".") for p in parts) or "\x00" in seen:
            return True
        nxt = unquote(seen)
        if nxt == seen:
            return False
        seen = nxt
    return True  # still changing after four decodings: refuse rather than guess


def client_ip(request: web.Request, trust_forwarded: bool) -> str:
    if trust_forwarded:
        xff = request.headers.get("X-Forwarded-For")
        if xff:
            return xff.rsplit(",", 1)[-1].strip()
    return request.remote or "unknown"


def upstream_headers(
    request: web.Request, ip: str, rid: str, cookie_prefix: str = ""
) -> CIMultiDict[str]:
    drop = PRIVATE_REQUEST
    conn = request.headers.get("Connection")
    if conn:
        drop = drop | {t.strip().lower() for t in conn.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in request.headers.items():
        kl = k.lower()
        if kl == "cookie":
            v = cookies_for_service(v, cookie_prefix)  # type: ignore[assignment]
            if v is None:
                continue
        if kl not in drop:
            out.add(k, v)
    prior = request.headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {ip}" if prior else ip
    out["X-Forwarded-Proto"] = request.scheme
    out[REQUEST_ID] = rid
    if request.content_length is not None:
        out["Content-Length"] = str(request.content_length)
    return out
