"""Webhooks: subscriptions, a durable outbox, and the worker that delivers it.

Events are written to ``webhook_deliveries`` inside the transaction of what
caused them (a charged call, a top-up, a payout), so an event exists exactly
when its cause committed, and the proxied call never waits for a receiver.
A background worker in every proxy process claims due rows, POSTs them and
records the result:

- claim: a conditional UPDATE that moves ``next_attempt_at`` past a lease and
  writes a claim token (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite
  serializes writers anyway). A process that dies mid-delivery leaves the row
  to be claimed again when its lease runs out, so nothing is lost on a crash
  or a restart;
- success (2xx): ``delivered``, only by the claim holder;
- failure: retried after ``base * 2**(attempt-1)`` seconds (1 s, 2 s, 4 s...);
  after ``max_attempts`` the row is ``dead`` and its owner can list it.

Delivery is at least once (nothing can be exactly once across a network); the
``X-ACF-Delivery-Id`` header lets a receiver drop the rare duplicate (a crash
between the receiver's 200 and our commit). Bodies are signed with
HMAC-SHA256 over the exact bytes sent (``X-ACF-Signature``, hex, for ACF
clients), and per Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``, made by the ``standardwebhooks`` library): the id and
timestamp are signed with the body, so a receiver that checks the timestamp's
tolerance refuses a replayed delivery. Its key is the subscription's secret
as bytes; the receiver configures it as ``standard_secret``
(``whsec_`` + base64 of those bytes), returned at creation.

Billing layer: aiohttp's client only, never its web layer.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from billing.errors import BillingError
from billing.money import format_amount
from config.netpolicy import AddressForbidden, PolicyResolver, check_url
from ledger import ops
from ledger.db import Store, Tx
from ledger.journal import new_id, now_ms

log = logging.getLogger("tollway.webhooks")

SERVICE_CALLED = "service.called"
PAYMENT_COMPLETED = "payment.completed"
SETTLEMENT_COMPLETED = "settlement.completed"
EVENTS = (SERVICE_CALLED, PAYMENT_COMPLETED, SETTLEMENT_COMPLETED)

SIGNATURE_HEADER = "X-ACF-Signature"
EVENT_HEADER = "X-ACF-Event"
DELIVERY_HEADER = "X-ACF-Delivery-Id"

PENDING, DELIVERED, DEAD, CANCELLED = "pending", "delivered", "dead", "cancelled"
DELIVERY_STATUSES = (PENDING, DELIVERED, DEAD, CANCELLED)

# How often each process re-reads which owners subscribe to service.called
# (subscriptions made through another process reach this one within this time).
SUBSCRIBER_REFRESH_SECONDS = 5.0
SECRET_MIN, SECRET_MAX = 16, 256
URL_MAX = 2048


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, body), signature)


def standard_secret(secret: str) -> str:
    """The subscription's secret as a Standard Webhooks receiver configures it."""
    return "whsec_" + base64.b64encode(secret.encode("utf-8")).decode("ascii")


def standard_headers(secret: str, delivery_id: str, body: str, now: dt.datetime) -> dict[str, str]:
    from standardwebhooks.webhooks import Webhook

    signature = Webhook(standard_secret(secret)).sign(msg_id=delivery_id, timestamp=now, data=body)
    return {
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- subscriptions


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    owner_id: str
    url: str
    events: list[str]
    active: bool
    created_at: int

    def render(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner_id": self.owner_id,
            "url": self.url,
            "events": self.events,
            "active": self.active,
            "created_at": _iso(self.created_at),
        }


def _sub(r: Any) -> Subscription:
    return Subscription(
        r["id"],
        r["owner_id"],
        r["url"],
        json.loads(r["events"]),
        bool(r["active"]),
        int(r["created_at"]),
    )


def check_webhook_url(url: Any, *, allow_http: bool, allow_private: bool) -> str:
    """The URL if acceptable; raises a 422 BillingError saying why not."""
    if not isinstance(url, str) or not url:
        raise BillingError("url is required", code="validation_error", status=422)
    if len(url) > URL_MAX:
        raise BillingError(
            f"url is longer than {URL_MAX} characters", code="validation_error", status=422
        )
    schemes = ("https", "http") if allow_http else ("https",)
    why = check_url(url, allow_private=allow_private, schemes=schemes)
    if why:
        raise BillingError(f"url refused: {why}", code="validation_error", status=422)
    return url


def check_events(events: Any) -> list[str]:
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise BillingError(
            "events must be a non-empty list of event names", code="validation_error", status=422
        )
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise BillingError(
            f"unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}",
            code="validation_error",
            status=422,
        )
    return sorted(set(events))


def check_secret(secret: Any) -> str:
    """A provided secret, or a new random one when none is given."""
    if secret is None:
        return "whsec_" + secrets.token_urlsafe(32)
    if not isinstance(secret, str) or not SECRET_MIN <= len(secret) <= SECRET_MAX:
        raise BillingError(
            f"secret must be a string of {SECRET_MIN} to {SECRET_MAX} characters",
            code="validation_error",
            status=422,
        )
    return secret


async def subscribe(
    store: Store, owner_id: str, url: str, events: list[str], secret: str, *, max_per_owner: int
) -> Subscription:
    now = now_ms()
    sid = new_id("wh")
    async with store.transaction() as tx:
        if store.kind == "postgres":
            # Count-then-insert is only a limit if subscribes of one owner take turns.
            await tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "webhooks:" + owner_id)
        n = await tx.fetchval(
            "SELECT COUNT(*) FROM webhooks WHERE owner_id = $1 AND active = 1", owner_id
        )
        if int(n) >= max_per_owner:
            raise BillingError(
                f"at most {max_per_owner} webhooks per owner",
                code="webhook_limit_reached",
                status=409,
            )
        await tx.execute(
            "INSERT INTO webhooks (id, owner_id, url, events, secret, active, created_at)"
            " VALUES ($1, $2, $3, $4, $5, 1, $6)",
            sid,
            owner_id,
            url,
            json.dumps(events),
            secret,
            now,
        )
    return Subscription(sid, owner_id, url, events, True, now)


async def list_subscriptions(store: Store, owner_id: str) -> list[Subscription]:
    rows = await store.fetch(
        "SELECT * FROM webhooks WHERE owner_id = $1 AND active = 1 ORDER BY created_at, id",
        owner_id,
    )
    return [_sub(r) for r in rows]


async def unsubscribe(store: Store, owner_id: str, webhook_id: str) -> None:
    """Deactivate; its undelivered events are cancelled (the owner asked for no more)."""
    async with store.transaction() as tx:
        row = await tx.fetchrow("SELECT owner_id, active FROM webhooks WHERE id = $1", webhook_id)
        if row is None or not row["active"]:
            raise BillingError("no such webhook", code="webhook_not_found", status=404)
        if row["owner_id"] != owner_id:
            raise BillingError("not your webhook", code="forbidden", status=403)
        await tx.execute(
            "UPDATE webhooks SET active = 0, deleted_at = $2 WHERE id = $1", webhook_id, now_ms()
        )
        await tx.execute(
            "UPDATE webhook_deliveries SET status = 'cancelled', claim = NULL"
            " WHERE webhook_id = $1 AND status = 'pending'",
            webhook_id,
        )


# --------------------------------------------------------------------------- the outbox


async def enqueue_event(
    tx: Tx, owner_id: str, event: str, payload: dict[str, Any], *, now: int | None = None
) -> int:
    """Queue ``event`` for every active subscription of ``owner_id`` to it.

    Call it inside the transaction of what caused the event (a top-up, a payout):
    the event is then queued if and only if that commits. Returns how many
    deliveries were queued (0 when the owner subscribes to nothing).
    """
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    rows = await tx.fetch(
        "SELECT id, events FROM webhooks WHERE owner_id = $1 AND active = 1", owner_id
    )
    now = now or now_ms()
    queued = 0
    for r in rows:
        if event not in json.loads(r["events"]):
            continue
        did = new_id("whd")
        body = json.dumps(
            {
                "event": event,
                "payload": payload,
                "timestamp": _iso(now),
                "webhook_id": r["id"],
                "delivery_id": did,
            },
            separators=(",", ":"),
            sort_keys=True,
        )
        await tx.execute(
            "INSERT INTO webhook_deliveries (id, webhook_id, owner_id, event, body, status, attempts,"
            " next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6)",
            did,
            r["id"],
            owner_id,
            event,
            body,
            now,
        )
        queued += 1
    return queued


class SubscriberCache:
    """Owners with an active service.called subscription, per process.

    The finish hook runs inside every charge transaction; this set lets it skip
    the outbox query entirely for the common case of nobody listening. It is
    refreshed when this process subscribes or unsubscribes, and every
    ``SUBSCRIBER_REFRESH_SECONDS`` for changes made through other processes.
    """

    def __init__(self, store: Store):
        self.store = store
        self.owners: frozenset[str] = frozenset()

    async def refresh(self) -> None:
        rows = await self.store.fetch(
            "SELECT DISTINCT owner_id FROM webhooks WHERE active = 1 AND events LIKE $1",
            f'%"{SERVICE_CALLED}"%',
        )
        self.owners = frozenset(r["owner_id"] for r in rows)

    def add(self, owner_id: str) -> None:
        self.owners = self.owners | {owner_id}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SUBSCRIBER_REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception:
                log.exception("webhook subscriber refresh failed")


def service_called_hook(
    cache: SubscriberCache, decimals: int
) -> Callable[[Tx, ops.Outcome, int], Awaitable[None]]:
    """A Meter finish hook: queue service.called for the provider and the buyer."""

    async def hook(tx: Tx, o: ops.Outcome, charged: int) -> None:
        u = o.usage
        owners = cache.owners
        targets = [x for x in dict.fromkeys((u.provider_id, u.buyer_id)) if x in owners]
        if not targets:
            return  # the common case: one set lookup, no SQL
        payload = {
            "usage_id": u.id,
            "service_id": u.service_id,
            "buyer_id": u.buyer_id,
            "provider_id": u.provider_id,
            "amount": format_amount(charged, decimals),
            "amount_units": charged,
            "asset": u.asset,
            "payment_method": u.payment_method,
            "free_tier": bool(
                o.free_tier
                and charged == 0
                and u.upstream_status is not None
                and u.upstream_status < 500
            ),
            "status_code": u.upstream_status,
            "latency_ms": u.latency_ms,
        }
        for owner in targets:
            await enqueue_event(tx, owner, SERVICE_CALLED, payload)

    return hook


# --------------------------------------------------------------------------- deliveries (owner's view)


def render_delivery(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"],
        "webhook_id": r["webhook_id"],
        "event": r["event"],
        "status": r["status"],
        "attempts": int(r["attempts"]),
        "next_attempt_at": _iso(int(r["next_attempt_at"])) if r["status"] == PENDING else None,
        "last_status": r["last_status"],
        "last_error": r["last_error"],
        "created_at": _iso(int(r["created_at"])),
        "delivered_at": _iso(int(r["delivered_at"])) if r["delivered_at"] is not None else None,
        "body": json.loads(r["body"]),
    }


async def list_deliveries(
    store: Store, owner_id: str, status: str | None, limit: int
) -> list[dict[str, Any]]:
    if status is not None and status not in DELIVERY_STATUSES:
        raise BillingError(
            f"status must be one of {', '.join(DELIVERY_STATUSES)}", code="invalid_query"
        )
    args: list[Any] = [owner_id]
    cond = ""
    if status:
        args.append(status)
        cond = " AND status = $2"
    args.append(limit)
    rows = await store.fetch(
        f"SELECT * FROM webhook_deliveries WHERE owner_id = $1{cond}"
        f" ORDER BY created_at DESC, id DESC LIMIT ${len(args)}",
        *args,
    )
    return [render_delivery(r) for r in rows]


async def redrive(store: Store, owner_id: str, delivery_id: str) -> None:
    """Send a dead delivery again (its attempts start over) if its webhook is still active."""
    async with store.transaction() as tx:
        row = await tx.fetchrow(
            "SELECT d.owner_id, d.status, w.active FROM webhook_deliveries d"
            " JOIN webhooks w ON w.id = d.webhook_id WHERE d.id = $1",
            delivery_id,
        )
        if row is None or row["owner_id"] != owner_id:
            raise BillingError("no such delivery", code="delivery_not_found", status=404)
        if row["status"] != DEAD or not row["active"]:
            raise BillingError(
                "only dead deliveries of an active webhook can be retried",
                code="conflict",
                status=409,
            )
        await tx.execute(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2,"
            " claim = NULL WHERE id = $1 AND status = 'dead'",
            delivery_id,
            now_ms(),
        )


# --------------------------------------------------------------------------- the worker


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    max_attempts: int
    backoff_base: float
    timeout: float
    poll_interval: float
    allow_private: bool
    batch: int = 32


def backoff_ms(base_seconds: float, attempts_made: int) -> int:
    """Wait after the n-th failed attempt: base * 2**(n-1) (1 s, 2 s, 4 s, ...)."""
    return int(base_seconds * 1000 * (2 ** max(0, attempts_made - 1)))


class DeliveryWorker:
    def __init__(self, store: Store, cfg: WorkerConfig):
        self.store = store
        self.cfg = cfg
        # A claim outlives the longest attempt, so only a dead process's claims expire.
        self.lease_ms = int((2 * cfg.timeout + 10) * 1000)
        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False

    def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=64,
            resolver=PolicyResolver(self.cfg.allow_private),
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhook-worker")

    async def stop(self) -> None:
        """Stop claiming, let attempts in flight finish (each has its timeout), give back the rest."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass  # what we asked for
            except Exception:
                log.exception("webhook worker ended with an error")
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.cfg.timeout + 1)
            for t in self._inflight:
                t.cancel()
        try:
            # Rows still claimed by us become due at once for the next process.
            await self.store.execute(
                "UPDATE webhook_deliveries SET claim = NULL, next_attempt_at = $2"
                " WHERE claim = $1 AND status = 'pending'",
                self.token,
                now_ms(),
            )
        except Exception:
            log.exception("could not release webhook claims (they expire with their lease)")
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                n = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook worker pass failed")
                n = 0
            if n < self.cfg.batch:
                await asyncio.sleep(self.cfg.poll_interval)

    async def run_once(self) -> int:
        """Claim due rows and start their attempts; returns how many were claimed."""
        now = now_ms()
        # A read first: polling an idle outbox must not take SQLite's write lock.
        due = await self.store.fetchval(
            "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'"
        )
        if due is None or int(due) > now:
            return 0
        rows = await self._claim(now)
        for r in rows:
            t = asyncio.get_running_loop().create_task(self._attempt(r))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)
        return len(rows)

    async def _claim(self, now: int) -> list[Any]:
        skip = " FOR UPDATE SKIP LOCKED" if self.store.kind == "postgres" else ""
        async with self.store.transaction() as tx:
            return await tx.fetch(
                "UPDATE webhook_deliveries SET claim = $1, next_attempt_at = $2"
                " WHERE id IN (SELECT id FROM webhook_deliveries WHERE status = 'pending'"
                f" AND next_attempt_at <= $3 ORDER BY next_attempt_at LIMIT $4{skip})"
                " AND status = 'pending' AND next_attempt_at <= $3"
                " RETURNING id, webhook_id, event, body, attempts",
                self.token,
                now + self.lease_ms,
                now,
                self.cfg.batch,
            )

    async def _attempt(self, r: Any) -> None:
        hook = await self.store.fetchrow(
            "SELECT url, secret, active FROM webhooks WHERE id = $1", r["webhook_id"]
        )
        if hook is None or not hook["active"]:
            await self.store.execute(
                "UPDATE webhook_deliveries SET status = 'cancelled', claim = NULL WHERE id = $1 AND claim = $2",
                r["id"],
                self.token,
            )
            return
        body = r["body"].encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(hook["secret"], body),
            EVENT_HEADER: r["event"],
            DELIVERY_HEADER: r["id"],
            "User-Agent": "Tollway-Webhooks/1",
            # Signed at each attempt: its timestamp is when it was sent.
            **standard_headers(hook["secret"], r["id"], r["body"], dt.datetime.now(dt.UTC)),
        }
        status: int | None = None
        error: str | None = None
        assert self._session is not None
        try:
            async with self._session.post(
                hook["url"], data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                await resp.content.read(4096)  # a little of the answer, to reuse the connection
            if not 200 <= status < 300:
                error = f"receiver answered {status}"
        except TimeoutError:
            error = f"timed out after {self.cfg.timeout} s"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressForbidden):
                error = f"refused by the network policy: {exc.os_error}"
            else:
                error = f"cannot connect: {exc.os_error}"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        await self._record(r, status, error)

    async def _record(self, r: Any, status: int | None, error: str | None) -> None:
        now = now_ms()
        attempts = int(r["attempts"]) + 1
        if error is None:
            n = await self.store.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', attempts = $3, last_status = $4,"
                " last_error = NULL, delivered_at = $5, claim = NULL WHERE id = $1 AND claim = $2",
                r["id"],
                self.token,
                attempts,
                status,
                now,
            )
        elif attempts >= self.cfg.max_attempts:
            n = await self.store.execute(
                "UPDATE webhook_deliveries SET status = 'dead', attempts = $3, last_status = $4,"
                " last_error = $5, claim = NULL WHERE id = $1 AND claim = $2",
                r["id"],
                self.token,
                attempts,
                status,
                error[:500],
            )
        else:
            n = await self.store.execute(
                "UPDATE webhook_deliveries SET attempts = $3, last_status = $4, last_error = $5,"
                " next_attempt_at = $6, claim = NULL WHERE id = $1 AND claim = $2",
                r["id"],
                self.token,
                attempts,
                status,
                error[:500],
                now + backoff_ms(self.cfg.backoff_base, attempts),
            )
        if n != 1:
            log.warning("webhook delivery %s: claim lost before its result was recorded", r["id"])
