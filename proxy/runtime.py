"""Everything one proxy process holds for its lifetime, built once at start.

The shared upstream session, the store and its group-commit writer, the
caches, the limiter and the billing objects live here, so the hot path does
no per-request construction.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from billing.leases import LeasePolicy
from billing.metering import Meter, Ticket
from billing.wallet_signin import expire_challenges
from config import Settings
from config.netpolicy import PolicyResolver, check_url
from ledger.db import Store, Tx, open_store
from ledger.journal import now_ms
from ledger.registry import Registry, Service
from ledger.writer import GroupCommitWriter
from proxy import metrics
from proxy.auth import KeyCache
from proxy.ratelimit import LocalLimiter, RedisLimiter

log = logging.getLogger("tollway")

VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class Target:
    base: str  # endpoint with exactly one trailing slash
    forbidden: str | None  # why a literal address is refused, if it is


# Service ids are UUIDs; anything else is refused before a lookup.
SERVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ServiceCache:
    """id -> Service. Invalidated at once on change in this process; other
    processes see changes within ``ttl`` seconds."""

    def __init__(
        self, registry: Registry, ttl: float, allow_private: bool, max_misses: int = 10_000
    ):
        self.registry, self.ttl, self.allow_private = registry, ttl, allow_private
        self._entries: dict[str, tuple[Service, float]] = {}
        # Unknown ids come from the caller: kept apart, few, and short-lived, so a
        # flood of made-up ids costs neither memory nor one database read each.
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._max_misses = max_misses
        self._targets: dict[tuple[str, str], Target] = {}

    def cached(self, service_id: str) -> bool:
        """Whether ``get`` would answer from memory (no database read)."""
        now = time.monotonic()
        hit = self._entries.get(service_id)
        if hit is not None and now - hit[1] < self.ttl:
            return True
        missed = self._misses.get(service_id)
        return missed is not None and now - missed < self.ttl

    async def get(self, service_id: str) -> Service | None:
        if not SERVICE_ID_RE.match(service_id):
            return None
        now = time.monotonic()
        hit = self._entries.get(service_id)
        if hit is not None and now - hit[1] < self.ttl:
            return hit[0]
        missed = self._misses.get(service_id)
        if missed is not None and now - missed < self.ttl:
            return None
        svc = await self.registry.get_service(service_id)
        if svc is None:
            self._misses[service_id] = now
            self._misses.move_to_end(service_id)
            while len(self._misses) > self._max_misses:
                self._misses.popitem(last=False)
            return None
        self._misses.pop(service_id, None)
        self._entries[service_id] = (svc, now)
        return svc

    def forget(self, service_id: str) -> None:
        self._entries.pop(service_id, None)
        self._misses.pop(service_id, None)

    def target(self, svc: Service) -> Target:
        k = (svc.id, svc.endpoint)
        t = self._targets.get(k)
        if t is None:
            t = self._targets[k] = Target(
                svc.endpoint.rstrip("/") + "/",
                check_url(svc.endpoint, allow_private=self.allow_private),
            )
        return t


RT: web.AppKey[Runtime] = web.AppKey("tollway_runtime", object)  # type: ignore[arg-type]


@dataclass
class Runtime:
    settings: Settings
    store: Store
    registry: Registry
    writer: GroupCommitWriter
    meter: Meter
    keys: KeyCache
    services: ServiceCache
    limiter: Any
    session: aiohttp.ClientSession
    counters: metrics.RequestCounters = field(default_factory=metrics.RequestCounters)
    payments: Any = None  # billing payments (402 rails); None when no rail is configured
    receipts: Any = None
    charge_hooks: list[Callable[[Ticket, int], None]] = field(default_factory=list)
    background: list[asyncio.Task[Any]] = field(default_factory=list)

    def after_charge(self, ticket: Ticket, amount: int) -> None:
        for hook in self.charge_hooks:
            try:
                hook(ticket, amount)
            except Exception:
                log.exception("charge hook failed")

    def amend_usage(self, usage_id: str, bytes_in: int, bytes_out: int) -> None:
        """Byte counts known only after the stream ended; queued, not awaited."""

        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE usage_records SET bytes_in = $2, bytes_out = $3 WHERE id = $1",
                usage_id,
                bytes_in,
                bytes_out,
            )

        self.writer.submit_nowait(op)

    @property
    def redis_state(self) -> str:
        if isinstance(self.limiter, RedisLimiter):
            return self.limiter.state
        return "absent"


def fee_schedule(
    settings: Settings, registered_at: Callable[[str], int | None]
) -> Callable[[str], int]:
    """The platform fee in basis points for a provider, by its month since registration."""
    sched = settings.fee_schedule_bps

    def fee_bps(provider_id: str) -> int:
        if not sched:
            return settings.platform_fee_bps
        reg = registered_at(provider_id)
        if reg is None:
            return sched[-1]
        month = max(0, (now_ms() - reg) // (30 * 86_400_000))
        return sched[min(month, len(sched) - 1)]

    return fee_bps


async def build_runtime(settings: Settings, store: Store | None = None) -> Runtime:
    store = store or open_store(settings.database_url)
    if getattr(store, "pool", None) is None and getattr(store, "db", None) is None:
        await store.connect()
    await store.migrate()
    registry = Registry(store)
    writers = settings.ledger_writers or (2 if store.kind == "postgres" else 1)
    writer = GroupCommitWriter(
        store,
        max_batch=settings.ledger_batch_max,
        observer=metrics.observe_batch,
        concurrency=writers,
        max_queue=settings.ledger_queue_max,
    )
    writer.start()
    providers: dict[str, int] = {
        r["provider_id"]: int(r["registered_at"])
        for r in await store.fetch("SELECT provider_id, registered_at FROM providers")
    }
    meter = Meter(
        writer,
        hold_ttl_ms=settings.hold_ttl_seconds * 1000,
        idem_window_ms=settings.idempotency_window_seconds * 1000,
        fee_bps_for=fee_schedule(settings, providers.get),
        lease_policy=LeasePolicy(
            calls=settings.lease_calls,
            share=settings.lease_share,
            min_calls=settings.lease_min_calls,
            after_calls=settings.lease_after_calls,
            idle_seconds=settings.lease_idle_seconds,
            ttl_seconds=settings.lease_ttl_seconds,
            flush_seconds=settings.lease_flush_ms / 1000,
        ),
        refusal_memo_seconds=settings.refusal_memo_seconds,
    )
    if settings.redis_url:
        limiter: Any = RedisLimiter(
            settings.redis_url,
            down_policy=settings.redis_down_policy,
            key_prefix=settings.redis_key_prefix,
            on_fallback=metrics.RATELIMIT_FALLBACK.inc,
        )
    else:
        limiter = LocalLimiter()
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_pool_size,
        limit_per_host=0,
        ttl_dns_cache=10,
        resolver=PolicyResolver(settings.allow_private_upstreams),
        enable_cleanup_closed=True,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.upstream_connect_timeout,
            sock_read=settings.upstream_read_timeout,
        ),
        # Bytes pass through untouched: no decompression, no cookies shared
        # between buyers, no headers the buyer did not send.
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )
    rt = Runtime(
        settings=settings,
        store=store,
        registry=registry,
        writer=writer,
        meter=meter,
        keys=KeyCache(registry, settings.key_cache_ttl_seconds, settings.admin_key),
        services=ServiceCache(
            registry, settings.service_cache_ttl_seconds, settings.allow_private_upstreams
        ),
        limiter=limiter,
        session=session,
    )
    rt.providers = providers  # type: ignore[attr-defined]
    try:
        from billing.receipts import ReceiptSigner

        rt.receipts = ReceiptSigner(settings.receipts_dir)
    except Exception:
        log.exception("receipt signing is off: the key directory could not be used")
    return rt


async def sweep_expired_holds(rt: Runtime, interval: float = 10.0) -> None:
    """Void holds whose call never finished, give back the leases of workers that
    stopped, drop stale sign-in challenges; at start and then periodically."""
    while True:
        n = await _sweep("expired-hold", lambda: rt.meter.expire_holds(now_ms()))
        if n:
            metrics.HOLDS_EXPIRED.inc(n)
            log.warning("voided %d expired hold(s)", n)
        n = await _sweep("expired-lease", lambda: rt.meter.expire_leases(now_ms()))
        if n:
            metrics.LEASES_EXPIRED.inc(n)
            log.warning("gave back %d expired lease(s) of a worker that stopped", n)
        await _sweep(
            "expired-challenge",
            lambda: rt.writer.submit(lambda tx: expire_challenges(tx, now_ms())),
        )
        await asyncio.sleep(interval)


async def _sweep(what: str, run: Callable[[], Awaitable[Any]]) -> Any:
    """One sweep; a failure is logged and the next round tries again."""
    try:
        return await run()
    except Exception:
        log.exception("%s sweep failed", what)
        return 0


async def close_runtime(rt: Runtime) -> None:
    for t in rt.background:
        t.cancel()
    for t in rt.background:
        try:
            await t
        except (asyncio.CancelledError, Exception):
            pass
    await rt.session.close()
    await rt.meter.leases.close()  # posts the last calls and gives every lease back
    await rt.writer.close()
    if isinstance(rt.limiter, RedisLimiter):
        await rt.limiter.close()
    if rt.payments is not None and hasattr(rt.payments, "close"):
        await rt.payments.close()
    await rt.store.close()
