"""The hot path: ANY /api/v1/proxy/{service_id}/{path}.

Order of work, cheapest refusal first: service (cached), key (cached), rate
limits (one Redis round trip, shared with concurrent requests), path and size
checks, then the billing decision (one share of a group commit), then the
upstream call through the shared pooled session. Bodies stream both ways and
are never read whole; billing headers go out before the first body byte.

Money rule: the hold is captured only when the upstream answered below 500
and the client was still there when the headers came; on any failure before
that it is voided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from billing.errors import BillingError, PaymentRequired
from billing.metering import Ticket
from billing.money import format_amount
from config.netpolicy import AddressForbidden
from ledger.db import store_unavailable
from ledger.journal import new_id
from ledger.ops import CLIENT_GONE
from ledger.ops import served as ops_served
from proxy import metrics
from proxy.capture import UPSTREAM_BROKEN, DeferredCapture, captured_before_completion
from proxy.cookies import cookie_prefix, scope_set_cookie, service_path
from proxy.errors import REQUEST_ID, ApiError, request_id
from proxy.ratelimit import Limit
from proxy.receipt_header import receipt_wanted, sign_receipt
from proxy.runtime import RT, Runtime
from proxy.upstream_request import (
    HOP_BY_HOP,
    PAYMENT_RESPONSE,
    RequestBody,
    client_ip,
    escapes,
    tail_of,
    upstream_headers,
)

log = logging.getLogger("tollway.proxy")

# A hold with less life than this left is captured before the headers go out.
_HOLD_MARGIN_SECONDS = 10.0


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    rt: Runtime = request.app[RT]
    t0 = time.perf_counter()
    rid = request_id(request)
    sid = request.match_info["service_id"]

    ip = client_ip(request, rt.settings.trust_forwarded_for)
    ip_limit = (
        Limit("ip", "ip:" + ip, rt.settings.ip_rate_limit) if rt.settings.ip_rate_limit else None
    )
    if ip_limit is not None and not (rt.services.cached(sid) and rt.keys.cached(request.headers)):
        # A lookup keyed by the caller's input (an unknown service or key id) may
        # reach the database: the IP limit is counted first. Known ids, the common
        # case, keep the single limiter round trip below.
        early = await rt.limiter.check([ip_limit])
        if not early.allowed:
            metrics.RATE_LIMITED.labels("ip").inc()
            raise ApiError(429, "rate_limited", "rate limit exceeded", headers=early.headers())
        ip_limit = None
    key = await rt.keys.authenticate(request, required=False)
    svc = await rt.services.get(sid)
    if svc is None or svc.status == "removed":
        raise ApiError(404, "service_not_found", f"no service {sid}")
    if svc.status == "paused":
        raise ApiError(409, "service_paused", "this service is paused by its provider")
    if key is None and not (svc.allow_anonymous and rt.payments is not None):
        raise ApiError(401, "unauthorized", "missing API key")

    limits = []
    if key is not None:
        limits.append(Limit("key", "k:" + key.key_id, key.rate_limit))
    if ip_limit is not None:
        limits.append(ip_limit)
    if svc.rate_limit:
        caller = key.key_id if key is not None else "ip:" + ip
        limits.append(Limit("service", f"s:{svc.id}:{caller}", svc.rate_limit))
    decision = await rt.limiter.check(limits)
    if not decision.allowed:
        metrics.RATE_LIMITED.labels(decision.limit.name if decision.limit else "?").inc()
        raise ApiError(429, "rate_limited", "rate limit exceeded", headers=decision.headers())

    tail = tail_of(request.raw_path)
    if escapes(tail):
        raise ApiError(400, "invalid_path", "the path may not leave the service's base path")
    if request.content_length is not None and request.content_length > rt.settings.max_body_bytes:
        raise ApiError(
            413, "payload_too_large", f"request body over {rt.settings.max_body_bytes} bytes"
        )
    target = rt.services.target(svc)
    if target.forbidden:
        raise ApiError(502, "upstream_forbidden", target.forbidden)

    usage_id = new_id("use")
    idem = request.headers.get("Idempotency-Key")
    if idem is not None and not (0 < len(idem) <= 255 and idem.isascii() and idem.isprintable()):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1..255 printable ASCII characters",
        )

    # A signed receipt states a committed charge: such a call takes an exact hold.
    want_receipt = rt.receipts is not None and receipt_wanted(rt.settings.receipts, request)
    paid = None
    if rt.payments is not None and (key is None or rt.payments.carries_payment(request)):
        # A payment carried on this request (x402 header or invoice): the payments layer decides.
        paid = await rt.payments.accept(request, svc, key, usage_id)
        if paid is None:
            metrics.REQUESTS.labels(svc.id, "payment_required").inc()
            return await rt.payments.payment_required(request, svc, key, "payment required")
        ticket = paid.ticket
    else:
        assert key is not None
        try:
            ticket = await rt.meter.begin(key.owner_id, svc, usage_id, idem, exact=want_receipt)
        except PaymentRequired as exc:
            metrics.REQUESTS.labels(svc.id, "payment_required").inc()
            if rt.payments is not None:
                return await rt.payments.payment_required(request, svc, key, str(exc))
            raise

    q = request.raw_path.find("?")
    url = target.base + tail + (request.raw_path[q:] if q >= 0 else "")
    s = rt.settings
    # The upload must end well within the hold's life (the upstream may still
    # take its connect and read timeouts after it).
    upload_window = s.hold_ttl_seconds - s.upstream_connect_timeout - s.upstream_read_timeout
    upload_seconds = max(1.0, upload_window / 2)
    if paid is not None and paid.x402 is not None:
        # A body trickled in past the authorization's life would let the upstream
        # work for a payment that can no longer settle.
        upload_seconds = min(upload_seconds, rt.payments.x402.upload_seconds_left(paid.x402))
    body: Any = (
        RequestBody(request.content, s.max_body_bytes, upload_seconds)
        if request.body_exists
        else None
    )
    if paid is not None and paid.body is not None:
        body = paid.body  # already read whole to check an invoice's binding
    t_up = time.perf_counter()
    try:
        up = await rt.session.request(
            request.method,
            URL(url, encoded=True),
            headers=upstream_headers(request, ip, rid, cookie_prefix(svc.id)),
            data=body,
            allow_redirects=False,
        )
    except BaseException as exc:
        status, code, msg = _upstream_failure(exc, body if isinstance(body, RequestBody) else None)
        await _settle(rt, request, ticket, paid, None, t_up, body, 0, rid)
        rt.counters.inc(svc.id, code)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ApiError(status, code, msg) from None

    latency = time.perf_counter() - t_up
    transport = request.transport
    if transport is None or transport.is_closing():
        # The client left before the upstream answered: nothing is charged.
        up.release()
        await _settle(rt, request, ticket, paid, CLIENT_GONE, t_up, body, 0, rid, latency=latency)
        rt.counters.inc(svc.id, "client_gone")
        return web.Response(status=499)

    served = ops_served(up.status)  # a 5xx or an upstream's own 499 is not charged
    known_len = up.content_length

    def settle_as(status: int, *, strict: bool = False) -> Any:
        return _settle(
            rt,
            request,
            ticket,
            paid,
            status,
            t_up,
            body,
            known_len or 0,
            rid,
            latency=latency,
            strict=strict,
        )

    pending: DeferredCapture | None = None
    # A call admitted from this worker's lease is recorded once its body is through
    # (in memory; its batch posts it): with the bytes it really sent, and voided
    # if the upstream breaks the body off.
    leased = served and ticket.lease is not None
    hold_left = rt.settings.hold_ttl_seconds - (time.monotonic() - ticket.reserved_at)
    if leased:
        charged = ticket.amount
    elif paid is None and served and hold_left > _HOLD_MARGIN_SECONDS and not want_receipt:
        # The hold secures the money and has time left, so the headers need not
        # wait: the capture starts when the upstream's body is complete (a body
        # the upstream breaks off is voided, never charged) and the bytes that
        # complete it wait for the commit. A stream still running when the hold
        # nears its expiry is captured then.
        pending = DeferredCapture(
            lambda: settle_as(up.status, strict=True), hold_left - _HOLD_MARGIN_SECONDS
        )
        charged = ticket.amount
    else:
        # A payment carried on the request settles first (its response header
        # names the transaction); so does a call whose hold is about to expire,
        # and an upstream error (voided at once).
        try:
            charged = await settle_as(up.status, strict=served)
        except BillingError:
            up.release()  # x402 settlement failed: the response is not delivered unpaid
            raise
        except Exception as exc:
            # The charge could not be recorded (the database is down): the answer is
            # not delivered either, and the hold expires back to the buyer.
            up.release()
            if store_unavailable(exc):
                raise ApiError(
                    503,
                    "store_unavailable",
                    "the ledger database is unavailable; retry shortly",
                    headers={"Retry-After": "2"},
                ) from None
            raise
    try:
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        h = resp.headers
        conn = up.headers.get("Connection")
        drop = HOP_BY_HOP if not conn else HOP_BY_HOP | {t.strip().lower() for t in conn.split(",")}
        for k, v in up.headers.items():
            kl = k.lower()
            if kl == "set-cookie":
                scoped = scope_set_cookie(
                    v, cookie_prefix(svc.id), service_path(request.path, svc.id)
                )
                if scoped is not None:
                    h.add(k, scoped)
                continue
            # Billing and payment headers are ours alone: an upstream cannot forge them.
            if kl not in drop and not kl.startswith("x-acf-") and kl not in PAYMENT_RESPONSE:
                h.add(k, v)
        decimals = rt.settings.asset_decimals
        h["X-ACF-Usage-Id"] = ticket.usage_id
        h["X-ACF-Amount"] = format_amount(charged, decimals)
        h["X-ACF-Free-Tier"] = "true" if ticket.free_tier and served else "false"
        h["X-ACF-Latency-Ms"] = f"{latency * 1000:.1f}"
        h[REQUEST_ID] = rid
        h.update(decision.headers())  # the tightest limit's policy and what is left of it
        if charged and want_receipt:
            h["X-ACF-Receipt"] = sign_receipt(rt, request, ticket, charged)
        if paid is not None and paid.response_headers:
            h.update(paid.response_headers)
        rt.counters.inc(
            svc.id,
            "charged"
            if charged
            else (
                "free"
                if ticket.free_tier and served
                else ("upstream_error" if not served else "no_charge")
            ),
        )
        metrics.UPSTREAM_LATENCY.observe(latency)
        metrics.OVERHEAD.observe(t_up - t0)
    except BaseException:
        # Nothing was delivered: a leased call gives its money back to the lease
        # (it would otherwise stay in flight, and the lease renewed, for good).
        up.release()
        if leased:
            await _settle(rt, request, ticket, None, UPSTREAM_BROKEN, t_up, body, 0, rid)
        raise

    sent = 0
    try:
        await resp.prepare(request)
        chunks = up.content.iter_any()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # The upstream broke its body off: the call failed, so it is not charged.
                log.info("upstream body of %s broke off: %r", ticket.usage_id, exc)
                if leased:
                    leased = False
                    await _settle(rt, request, ticket, None, UPSTREAM_BROKEN, t_up, body, sent, rid)
                if pending is not None:
                    await asyncio.shield(pending.start(lambda: settle_as(UPSTREAM_BROKEN)))
                    pending = None
                rt.counters.inc(svc.id, "upstream_broken")
                if request.transport is not None:
                    request.transport.close()
                return resp
            sent += len(chunk)
            if pending is not None and known_len is not None and sent >= known_len:
                captured, pending = pending, None
                if not await captured_before_completion(captured, request, ticket):
                    return resp  # before the bytes that complete the body
            await resp.write(chunk)
        if pending is not None:
            captured, pending = pending, None
            if not await captured_before_completion(captured, request, ticket):
                return resp  # before the end of a chunked (e.g. SSE) stream
        if leased:
            leased = False
            await _settle(
                rt, request, ticket, None, up.status, t_up, body, sent, rid, latency=latency
            )
    except (ConnectionResetError, aiohttp.ClientError, asyncio.CancelledError) as exc:
        # The client left mid-body: the call was answered and stays charged.
        log.info("stream %s ended early: %r", ticket.usage_id, exc)
        up.release()
        if isinstance(exc, asyncio.CancelledError):
            raise
        if request.transport is not None:
            request.transport.close()
        return resp
    finally:
        up.release()
        if leased:
            # The client left mid-body: the call was answered and is charged.
            await _settle(
                rt, request, ticket, None, up.status, t_up, body, sent, rid, latency=latency
            )
        if pending is not None:
            # The client left mid-body: charged, if the capture can commit at all
            # (if not, the hold expires back to the buyer; it was logged).
            with contextlib.suppress(Exception):
                await asyncio.shield(pending.start())
    counted = body.count if isinstance(body, RequestBody) else (len(body) if body else 0)
    if ticket.lease is None and (
        known_len is None
        or (isinstance(body, RequestBody) and counted != (request.content_length or counted))
    ):
        rt.amend_usage(ticket.usage_id, counted, sent)
    await resp.write_eof()
    return resp


def _upstream_failure(exc: BaseException, body: RequestBody | None) -> tuple[int, str, str]:
    if body is not None and body.too_large:
        return 413, "payload_too_large", "request body over the limit"
    if body is not None and body.too_slow:
        return 408, "request_timeout", "the request body took too long to arrive"
    if isinstance(exc, asyncio.TimeoutError):
        return 504, "upstream_timeout", "the upstream did not answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, AddressForbidden):
        return 502, "upstream_forbidden", "the upstream resolves to a forbidden address"
    if isinstance(exc, asyncio.CancelledError):
        return 499, "client_gone", "client disconnected"
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return 502, "upstream_unreachable", "the upstream could not be reached"
    log.exception("unexpected upstream failure", exc_info=exc)
    return 502, "upstream_error", "the upstream call failed"


async def _settle(
    rt: Runtime,
    request: web.Request,
    ticket: Ticket,
    paid: Any,
    status: int | None,
    t_up: float,
    body: Any,
    bytes_out: int,
    rid: str,
    *,
    latency: float | None = None,
    strict: bool = False,
) -> int:
    """Record the call; returns what was really charged (0 when the hold had
    already expired, whatever the ticket said). With ``strict``, a record that
    could not be written raises instead of answering 0."""
    outcome = rt.meter.outcome(
        ticket,
        upstream_status=status,
        latency_ms=None if latency is None else round(latency * 1000, 3),
        bytes_in=request.content_length
        or (body.count if isinstance(body, RequestBody) else len(body or b"")),
        bytes_out=bytes_out,
        request_id=rid,
    )
    try:
        if paid is not None:
            charged = await rt.payments.finish(paid, outcome)
        else:
            charged = await rt.meter.finish(outcome, ticket.lease)
    except BillingError:
        raise
    except Exception as exc:
        # The hold stays pending and the sweeper voids it at expiry: the buyer
        # is never charged for a call whose record could not be written.
        log.error("could not record usage %s: %r", ticket.usage_id, exc)
        if strict:
            raise
        return 0
    if charged:
        metrics.CHARGED.labels(ticket.service.asset).inc(charged)
        rt.after_charge(ticket, charged)
    return int(charged or 0)
