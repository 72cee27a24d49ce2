"""A worker's leases: the common call of a hot buyer decided in memory.

A buyer that calls often (``after_calls`` calls within a second in this
process) gets a balance lease: one ledger transaction moves a slice of its
wallet into a hold of kind ``lease`` (``ledger.leases``). Its calls are then
admitted by subtracting the price from the slice in memory, and written in
batches: every ``flush_seconds`` the finished calls go to the group-commit
writer, one operation per lease (its usage rows, its charge and fee transfers,
and the lease's ``captured`` in one transaction). Free-tier calls work the same
way with a lease of free calls.

Why this cannot overspend: the slice left the wallet before any call used it,
so the sum over all workers' leases never exceeds what the wallet held, and a
worker admits a call only while its own slice covers the price. A slice is at
most ``1/share`` of what the wallet holds, so other workers still find money;
when that is less than ``min_calls`` calls, calls fall back to exact per-call
holds. A lease nobody used for ``idle_seconds`` is closed and its rest goes
back; a worker that dies stops renewing its leases, which then expire back like
holds (``ttl_seconds``), and a batch that comes after the expiry posts nothing.

What a crash costs: the calls finished since the last batch are never charged
(the buyer keeps that money). No call is ever charged twice or from money the
buyer did not have.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from billing.lease_model import Lease, LeasePolicy
from billing.lease_posting import Hook, post_op, renew_op
from billing.lease_upkeep import LeaseUpkeep
from ledger import leases, ops
from ledger.db import Tx, store_unavailable
from ledger.journal import now_ms
from ledger.writer import GroupCommitWriter, WriterOverloaded

log = logging.getLogger("tollway.billing")


class LeaseBook(LeaseUpkeep):
    def __init__(
        self,
        writer: GroupCommitWriter,
        policy: LeasePolicy,
        hooks: list[Hook],
        *,
        lease_allowed: Callable[[str], bool] = lambda owner: True,
    ):
        self.writer = writer
        self.policy = policy
        self.hooks = hooks  # the Meter's finish hooks, run for each posted call
        self.lease_allowed = lease_allowed
        self._leases: dict[tuple[str, str, bool], list[Lease]] = {}
        self._by_id: dict[str, Lease] = {}
        self._recent: dict[tuple[str, str, bool], list[float]] = {}
        self._not_before: dict[tuple[str, str, bool], float] = {}
        self._opening: dict[tuple[str, str, bool], asyncio.Future[Lease | None]] = {}
        self._dirty: set[Lease] = set()
        self._posts: set[asyncio.Future[None]] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.lost_calls = (
            0  # served, never charged: posted after their lease expired, or unpostable
        )
        self._margin_ms = int(policy.ttl_seconds * 1000 / 3)
        self._retired: list[Lease] = []

    # ------------------------------------------------------------------ the hot path

    def take(self, buyer_id: str, key: str, amount: int, free: bool) -> Lease | None:
        """Spend ``amount`` (or one free call) from a lease of this worker, in memory."""
        group = self._leases.get((buyer_id, key, free))
        if not group:
            return None
        now = now_ms()
        for lease in group:
            if lease.covers(amount, now, self._margin_ms):
                lease.spent += amount
                lease.in_flight += 1
                lease.last_used = time.monotonic()
                return lease
        return None

    def wants_lease(self, buyer_id: str, key: str, free: bool) -> bool:
        """Count this call; True when the buyer is hot enough for a lease here."""
        if not self.policy.enabled or self._closing:
            return False
        k = (buyer_id, key, free)
        now = time.monotonic()
        if self._not_before.get(k, 0.0) > now:
            return False
        window = self._recent.get(k)
        if window is None or now - window[0] > 1.0:
            if len(self._recent) > 100_000:
                self._recent.clear()  # bounded: a flood of distinct buyers resets it
            self._recent[k] = [now, 1.0]
            return self.policy.after_calls <= 1 and self.lease_allowed(buyer_id)
        window[1] += 1
        return window[1] >= self.policy.after_calls and self.lease_allowed(buyer_id)

    async def open(
        self, buyer_id: str, key: str, unit: int, free: bool, quota: int = 0
    ) -> Lease | None:
        """Open a lease (one writer round; concurrent callers share it)."""
        k = (buyer_id, key, free)
        pending = self._opening.get(k)
        if pending is not None:
            return await asyncio.shield(pending)
        # A task of its own: a caller that goes away (client gone) must not leave
        # behind a lease the ledger holds and this worker does not know of.
        task = asyncio.ensure_future(self._open_and_keep(k, unit, quota))
        self._opening[k] = task
        return await asyncio.shield(task)

    async def _open_and_keep(self, k: tuple[str, str, bool], unit: int, quota: int) -> Lease | None:
        buyer_id, key, free = k
        # A buyer that spends a lease within a couple of seconds gets a bigger one
        # next (up to 256 times the base): fewer opens, each still at most 1/share.
        now = time.monotonic()
        recent = [x for x in self._leases.get(k, ()) if now - x.opened_at < 2.0]
        calls = self.policy.calls
        if recent:
            calls = min(max(x.calls for x in recent) * 4, self.policy.calls * 256)
        try:
            lease = await self._open(buyer_id, key, unit, free, quota, calls)
        except Exception as exc:
            log.warning("lease for %s not opened: %r", buyer_id, exc)
            lease = None
        finally:
            self._opening.pop(k, None)
        if lease is None:
            # Too little left for a lease: exact holds for a while, no retry per call.
            self._not_before[k] = time.monotonic() + 1.0
        else:
            self._leases.setdefault(k, []).append(lease)
            self._by_id[lease.id] = lease
            self._start()
        return lease

    async def _open(
        self, buyer_id: str, key: str, unit: int, free: bool, quota: int, calls: int
    ) -> Lease | None:
        p = self.policy
        ttl_ms = int(p.ttl_seconds * 1000)
        now = now_ms()
        if free:

            async def op(tx: Tx) -> leases.Granted | None:
                return await leases.open_free(
                    tx,
                    buyer_id,
                    key,
                    quota,
                    want=calls,
                    floor=p.min_calls,
                    share=p.share,
                    ttl_ms=ttl_ms,
                    now=now,
                )

        else:

            async def op(tx: Tx) -> leases.Granted | None:
                return await leases.open_balance(
                    tx,
                    buyer_id,
                    key,
                    want=unit * calls,
                    floor=unit * p.min_calls,
                    share=p.share,
                    ttl_ms=ttl_ms,
                    now=now,
                )

        granted = await self.writer.submit(op)
        if granted is None:
            return None
        return Lease(
            granted.id,
            buyer_id,
            key,
            granted.amount,
            granted.expires_at,
            1 if free else unit,
            free=free,
            last_used=time.monotonic(),
            calls=calls,
        )

    def finish(self, lease: Lease, o: ops.Outcome) -> int:
        """A leased call ended: queue its record for the next batch. Returns the charge."""
        lease.in_flight -= 1
        # A failed call gives back what it took.
        if lease.free:
            if not ops.served(o.usage.upstream_status):
                lease.spent -= 1
        elif o.charge <= 0:
            lease.spent -= o.held
        lease.unposted.append(o)
        self._dirty.add(lease)
        self._wake.set()
        return o.charge

    # ------------------------------------------------------------------ batches

    def _start(self) -> None:
        if not self._tasks and not self._closing:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._flusher(), name="lease-flusher"),
                loop.create_task(self._keeper(), name="lease-keeper"),
            ]

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let a batch gather: the calls of the next few milliseconds share it.
            await asyncio.sleep(self.policy.flush_seconds)
            await self.flush()

    async def flush(self, timeout: float | None = None) -> None:
        """Post every finished call now; returns once this worker's calls finished so
        far are committed (or given up), or after ``timeout`` seconds."""
        dirty, self._dirty = self._dirty, set()
        waiting = list(self._posts)
        if dirty:
            expires = now_ms() + int(self.policy.ttl_seconds * 1000)
            for lease in dirty:
                batch, lease.unposted = lease.unposted, []
                # Counted as posting from the hand-off on: upkeep must not close the
                # lease before the task has even started.
                if not lease.posting:
                    lease.posting_since = time.monotonic()
                lease.posting += 1
                post = asyncio.ensure_future(self._post(lease, batch, expires))
                self._posts.add(post)
                post.add_done_callback(self._posts.discard)
                waiting.append(post)
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)

    async def _post(self, lease: Lease, batch: list[ops.Outcome], expires: int) -> None:
        try:
            if batch:
                alive = await self._post_batch(lease, batch, expires)
            else:
                alive = await self.writer.submit(renew_op(lease.id, lease.free, expires))
        except Exception as exc:
            log.error("lease %s: %d calls not posted: %r", lease.id, len(batch), exc)
            self.lost_calls += len(batch)
            alive = True
        finally:
            lease.posting -= 1
            if not lease.posting:
                lease.posting_since = 0.0
        if alive:
            lease.expires_at_ms = max(lease.expires_at_ms, expires)
        else:
            self.lost_calls += sum(1 for o in batch if o.charge > 0)
            log.warning("lease %s expired before %d calls were posted", lease.id, len(batch))
            self._retire(lease)

    async def _post_batch(self, lease: Lease, batch: list[ops.Outcome], expires: int) -> bool:
        maybe_posted, pause = False, 0.05
        give_up = time.monotonic() + 300
        while True:
            op = post_op(lease, batch, expires, self.hooks, maybe_posted=maybe_posted)
            try:
                return await self.writer.submit(op)
            except Exception as exc:
                if not (isinstance(exc, WriterOverloaded) or store_unavailable(exc)):
                    break
                if time.monotonic() > give_up:
                    raise
                # The database is away: the commit may or may not have happened.
                maybe_posted = maybe_posted or not isinstance(exc, WriterOverloaded)
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)
        # One call the ledger refuses must not cost the others their record.
        alive = True
        for o in batch:
            one = post_op(lease, [o], expires, self.hooks, maybe_posted=True)
            try:
                alive = await self.writer.submit(one) and alive
            except Exception as exc:
                log.error("usage %s (lease %s) not recorded: %r", o.usage.id, lease.id, exc)
                self.lost_calls += 1
        return alive

    def _retire(self, lease: Lease) -> None:
        """Stop using a lease; it is closed once its calls are done (a no-op when it
        already expired in the ledger)."""
        lease.dead = True
        lease.closing = True

    def _forget(self, lease: Lease) -> None:
        self._by_id.pop(lease.id, None)
        k = (lease.buyer_id, lease.key, lease.free)
        group = self._leases.get(k)
        if group is not None and lease in group:
            group.remove(lease)
            if not group:
                del self._leases[k]
