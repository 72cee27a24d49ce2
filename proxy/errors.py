"""The JSON error shape at the edge, and the middleware that guarantees it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from billing.errors import BillingError, UpstreamRailError
from config.redact import scrub
from ledger.db import GuardFailed, store_unavailable
from ledger.writer import WriterOverloaded
from proxy.body import BodyError, parse_json_object, read_whole

log = logging.getLogger("tollway")

REQUEST_ID = "X-Request-Id"

_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    504: "gateway_timeout",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.extra = extra


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    err.update({k: v for k, v in extra.items() if v is not None})
    return web.Response(
        status=status,
        text=json.dumps({"error": err}),
        content_type="application/json",
        headers=headers,
    )


_RID: web.RequestKey[str] = web.RequestKey("tollway_request_id", str)


def request_id(request: web.Request) -> str:
    rid = request.get(_RID)
    if rid is None:
        rid = request.headers.get(REQUEST_ID)
        # Echoed, logged and stored with the usage row: printable ASCII only (a
        # value the database refuses would fail the batch the call is posted in).
        if not rid or len(rid) > 128 or not (rid.isascii() and rid.isprintable()):
            rid = os.urandom(12).hex()
        request[_RID] = rid
    return rid


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _storable(text: str) -> bool:
    """Text a database column takes: no NUL (PostgreSQL refuses it), valid Unicode."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_url_text(request: web.Request) -> None:
    # Path parameters and query values reach lookups as they are; the proxied tail
    # is the upstream's to judge.
    for name, value in request.match_info.items():
        if name != "tail" and (len(value) > 512 or not _storable(value)):
            raise ApiError(404, "not_found", f"no such {name}")
    for value in request.query.values():
        if not _storable(value):
            raise ApiError(400, "invalid_query", "query values must be text without NUL")


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id(request)
    try:
        _check_url_text(request)
        resp = await handler(request)
    except ApiError as e:
        resp = error_response(e.status, e.code, e.message, headers=e.headers, **e.extra)
    except BillingError as e:
        extra = {}
        if getattr(e, "usage_id", None):
            extra["usage_id"] = e.usage_id  # type: ignore[attr-defined]
        if getattr(e, "tx_id", None):
            extra["tx_id"] = e.tx_id  # type: ignore[attr-defined]
        headers = getattr(e, "headers", None)
        message = e.message
        if isinstance(e, UpstreamRailError):
            # A node's error may name its URL, API key included: logged, redacted here.
            log.warning("payment rail error on %s: %s", request.path, scrub(e.message))
            message = scrub(e.message)
        resp = error_response(e.status, e.code, message, headers=headers, **extra)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _REASONS.get(e.status, "error")
        msg = e.text if e.text and not e.text.startswith(f"{e.status}:") else (e.reason or code)
        resp = error_response(
            e.status,
            code,
            msg,
            headers={k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")},
        )
    except Exception as exc:
        if isinstance(exc, (WriterOverloaded, GuardFailed)):
            # A full write queue, or a balance raced past every retry: load, not a fault.
            log.warning("ledger busy on %s %s: %r", request.method, request.path, exc)
            resp = error_response(
                503,
                "ledger_busy",
                "the ledger is busy; retry shortly",
                headers={"Retry-After": "1"},
            )
        elif store_unavailable(exc):
            log.warning("database unavailable on %s %s: %r", request.method, request.path, exc)
            resp = error_response(
                503,
                "store_unavailable",
                "the ledger database is unavailable; retry shortly",
                headers={"Retry-After": "2"},
            )
        else:
            log.exception("unhandled error on %s %s", request.method, request.path)
            resp = error_response(500, "internal_error", "internal error", request_id=rid)
    if not resp.prepared:
        resp.headers[REQUEST_ID] = rid
    return resp


async def read_json(request: web.Request, max_bytes: int = 1 << 20) -> dict[str, Any]:
    try:
        raw = await read_whole(request.content, max_bytes, request.content_length)
        return parse_json_object(raw)
    except BodyError as e:
        raise ApiError(e.status, e.code, e.message) from None


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")
