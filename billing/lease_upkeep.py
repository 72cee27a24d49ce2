"""Lease upkeep: renewing leases in use, answering recalls, closing the idle.

A mixin of ``billing.leases.LeaseBook``: the keeper task runs it every
``recall_check_seconds``; shutdown runs ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from billing.lease_model import Lease, LeasePolicy
from ledger import leases
from ledger.journal import now_ms
from ledger.writer import GroupCommitWriter

log = logging.getLogger("tollway.billing")


class LeaseUpkeep:
    writer: GroupCommitWriter
    policy: LeasePolicy
    _by_id: dict[str, Lease]
    _not_before: dict[tuple[str, str, bool], float]
    _dirty: set[Lease]
    _tasks: list[asyncio.Task[None]]
    _posts: set[asyncio.Future[None]]
    _closing: bool

    async def flush(self, timeout: float | None = None) -> None: ...

    def _forget(self, lease: Lease) -> None: ...

    async def _keeper(self) -> None:
        while True:
            await asyncio.sleep(self.policy.recall_check_seconds)
            try:
                await self._check_recalls()
                await self.upkeep()
            except Exception as exc:
                log.debug("lease upkeep: %r", exc)

    async def _check_recalls(self) -> None:
        """Another worker found the wallet (or the free calls) empty while a lease of
        ours held some: stop spending from it; upkeep closes it once it is quiet."""
        live = [x for x in self._by_id.values() if not x.closing]
        if not live:
            return
        async with self.writer.store.reader() as tx:
            hit = await leases.recalled(
                tx, [x.id for x in live if not x.free], [x.id for x in live if x.free]
            )
        until = time.monotonic() + self.policy.recall_backoff_seconds
        shrinks = []
        for lease in live:
            if lease.id in hit:
                lease.closing = True
                # The buyer's money is contended: exact holds for a while.
                self._not_before[(lease.buyer_id, lease.key, lease.free)] = until
                if lease.spent and lease.size > lease.spent:
                    shrinks.append(self._shrink(lease))
        await asyncio.gather(*shrinks)

    async def _shrink(self, lease: Lease) -> None:
        """Give back at once what the lease's calls did not take; what they took stays
        until they finish (a long call must not hold the rest hostage)."""
        size, keep, now = lease.size, lease.spent, now_ms()
        if lease.free:
            op: Any = lambda tx: leases.shrink_free(tx, lease.id, size, keep)  # noqa: E731
        else:
            op = lambda tx: leases.shrink_balance(tx, lease.id, size, keep, now)  # noqa: E731
        try:
            if await self.writer.submit(op):
                lease.size = keep
        except Exception as exc:
            log.warning("lease %s not shrunk: %r", lease.id, exc)

    async def upkeep(self, *, closing: bool = False) -> None:
        """Renew leases in use before they expire; close the idle and the spent."""
        now = time.monotonic()
        # Leases with calls running are renewed about every second, so another
        # worker can tell a live lease (worth waiting for) from a dead worker's.
        soon = now_ms() + int(self.policy.ttl_seconds * 1000) - 1500
        to_close = []
        for lease in list(self._by_id.values()):
            quiet = lease.in_flight == 0 and not lease.unposted and not lease.posting
            spent = lease.size - lease.spent < lease.unit
            idle = now - lease.last_used > self.policy.idle_seconds
            if quiet and (closing or lease.closing or spent or idle):
                lease.closing = True
                to_close.append(lease)
            elif lease.in_flight and lease.expires_at_ms < soon:
                self._dirty.add(lease)  # an empty batch renews it
        if self._dirty:
            await self.flush(timeout=2.0)
        await asyncio.gather(*(self._close(lease) for lease in to_close))

    async def _close(self, lease: Lease) -> None:
        now = now_ms()
        close = leases.close_free if lease.free else leases.close_balance
        try:
            await self.writer.submit(lambda tx: close(tx, lease.id, now))
        except Exception as exc:
            # Not closed now: it expires back by itself.
            log.warning("lease %s not closed: %r", lease.id, exc)
        self._forget(lease)

    async def close(self, wait_seconds: float = 5.0) -> None:
        """At shutdown: post what is finished and give every lease back."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks = []
        deadline = time.monotonic() + wait_seconds
        while True:
            await self.flush(timeout=max(0.1, deadline - time.monotonic()))
            if all(lease.in_flight == 0 for lease in self._by_id.values()):
                break
            if time.monotonic() > deadline:
                break  # calls still running: their leases expire back
            await asyncio.sleep(0.05)
        await self.upkeep(closing=True)
        for post in list(self._posts):
            post.cancel()  # the database is away: what is not posted expires back
