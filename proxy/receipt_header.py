"""The X-ACF-Receipt header of a charged call: whether to sign one, and signing it."""

from __future__ import annotations

import time

from aiohttp import web

from billing.metering import Ticket
from proxy.runtime import Runtime


def receipt_wanted(mode: str, request: web.Request) -> bool:
    """A signature costs more than the rest of the call's billing: by default it is
    made only for a request that says ``Prefer: receipt`` (RFC 7240)."""
    if mode == "always":
        return True
    if mode == "off":
        return False
    prefer = request.headers.get("Prefer")
    return prefer is not None and any(
        p.split(";", 1)[0].strip().lower() == "receipt" for p in prefer.split(",")
    )


def sign_receipt(rt: Runtime, request: web.Request, t: Ticket, amount: int) -> str:
    from billing.receipts import request_hash

    body_hash = None  # the body streams through unread; the receipt binds method, path and query
    return rt.receipts.sign(  # type: ignore[union-attr]
        t.usage_id,
        t.service.id,
        t.buyer_id,
        amount,
        t.service.asset,
        int(time.time()),
        request_hash(request.method, request.raw_path, body_hash),
    )
