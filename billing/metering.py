"""How a call is paid: free tier, a hold on the prepaid balance, or a 402.

``begin`` runs before the upstream is called and ``finish`` after it answered
(or failed). Both go through the group-commit writer, so each is one share of
a batched transaction; neither ever reads or writes the store on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from billing.errors import BillingError, PaymentRequired
from billing.leases import Lease, LeaseBook, LeasePolicy
from billing.money import fee_of
from ledger import leases, ops
from ledger.db import Tx, wallet_credit_epoch
from ledger.journal import now_ms
from ledger.registry import Service
from ledger.writer import GroupCommitWriter

_RECALLED = "recalled"


class IdempotencyConflict(BillingError):
    status = 409
    code = "idempotency_conflict"

    def __init__(self, message: str, usage_id: str | None = None):
        super().__init__(message)
        self.usage_id = usage_id


@dataclass(slots=True)
class Ticket:
    usage_id: str
    buyer_id: str
    service: Service
    mode: str
    hold_id: str | None
    amount: int
    fee: int
    free_tier: bool
    idem_key: str | None
    # When the hold was placed (monotonic seconds): how long it has left.
    reserved_at: float = field(default_factory=time.monotonic)
    lease: Lease | None = None  # the worker's lease this call was admitted from

    @property
    def paid_by_balance(self) -> bool:
        return self.mode in (ops.HELD, ops.LEASED)


class Meter:
    def __init__(
        self,
        writer: GroupCommitWriter,
        *,
        hold_ttl_ms: int,
        idem_window_ms: int,
        fee_bps_for: Callable[[str], int],
        lease_policy: LeasePolicy | None = None,
        refusal_memo_seconds: float = 1.0,
    ):
        self.writer = writer
        # Run inside the same transaction as each finished call (webhook outbox
        # rows, auto top-up triggers): atomic with the charge, and no extra commit.
        self.finish_hooks: list[Callable[[Tx, ops.Outcome, int], Awaitable[None]]] = []
        self.hold_ttl_ms = hold_ttl_ms
        self.idem_window_ms = idem_window_ms
        self.fee_bps_for = fee_bps_for
        self.leases = LeaseBook(writer, lease_policy or LeasePolicy(calls=0), self.finish_hooks)
        # (buyer, service) -> when a refusal was decided and the credit epoch then: the
        # same call is answered 402 from memory for a moment, with no ledger round.
        self.refusal_memo_seconds = refusal_memo_seconds
        self._refused: dict[tuple[str, str], tuple[float, int]] = {}

    def _leased(self, buyer_id: str, service: Service, usage_id: str) -> Ticket | None:
        book = self.leases
        price = service.price_units
        if service.free_tier_calls > 0:
            lease = book.take(buyer_id, service.id, 1, True)
            if lease is not None:
                return Ticket(
                    usage_id,
                    buyer_id,
                    service,
                    ops.FREE_LEASED,
                    lease.id,
                    0,
                    0,
                    True,
                    None,
                    lease=lease,
                )
            return None
        if price <= 0:
            return None
        lease = book.take(buyer_id, service.asset, price, False)
        if lease is None:
            return None
        return Ticket(
            usage_id,
            buyer_id,
            service,
            ops.LEASED,
            lease.id,
            price,
            fee_of(price, self.fee_bps_for(service.provider_id)),
            False,
            None,
            lease=lease,
        )

    async def _lease_begin(self, buyer_id: str, service: Service, usage_id: str) -> Ticket | None:
        ticket = self._leased(buyer_id, service, usage_id)
        if ticket is not None:
            return ticket
        book = self.leases
        free = service.free_tier_calls > 0
        key = service.id if free else service.asset
        if (free or service.price_units > 0) and book.wants_lease(buyer_id, key, free):
            await book.open(
                buyer_id, key, 1 if free else service.price_units, free, service.free_tier_calls
            )
            return self._leased(buyer_id, service, usage_id)
        return None

    async def begin(
        self,
        buyer_id: str,
        service: Service,
        usage_id: str,
        idem_key: str | None = None,
        *,
        exact: bool = False,
    ) -> Ticket:
        """``exact``: a hold of its own, captured before the answer completes (a call
        that asks for a signed receipt), never a lease."""
        if idem_key is None and service.free_tier_calls <= 0 and service.price_units <= 0:
            # Nothing to reserve or remember: skip the store entirely.
            return Ticket(usage_id, buyer_id, service, ops.NO_CHARGE, None, 0, 0, False, None)
        epoch = wallet_credit_epoch()  # before the ledger round: a credit during it counts
        if idem_key is None and not exact:
            ticket = await self._lease_begin(buyer_id, service, usage_id)
            if ticket is not None:
                return ticket
            memo = self._refused.get((buyer_id, service.id))
            if memo is not None:
                if (
                    memo[1] == wallet_credit_epoch()
                    and time.monotonic() - memo[0] < self.refusal_memo_seconds
                ):
                    raise PaymentRequired(
                        "no free-tier calls left and the prepaid balance is too low"
                    )
                del self._refused[(buyer_id, service.id)]
        res = ops.Reservation(
            usage_id,
            buyer_id,
            service.id,
            service.free_tier_calls,
            service.price_units,
            service.asset,
            self.hold_ttl_ms,
        )
        window = self.idem_window_ms
        stale = self.hold_ttl_ms

        policy = self.leases.policy
        leasing = policy.enabled
        # A lease its worker renews (every batch) expires after this; one that
        # expires sooner was not renewed for a while: its worker may be dead.
        stale_ms = int((policy.idle_seconds + 2 * policy.recall_check_seconds + 2) * 1000)
        live_ms = int(policy.ttl_seconds * 1000) - stale_ms

        recall = [leasing]

        async def op(tx: Tx) -> tuple[str, str | None, ops.Reserved | None]:
            if idem_key is not None:
                state, prior = await ops.claim_idempotency(
                    tx, buyer_id, idem_key, window, stale_ms=stale
                )
                if state != ops.CLAIMED:
                    return state, prior, None
            if recall[0] and res.free_quota > 0 and res.price > 0:
                # Free calls left, but in another worker's lease: wait for them
                # rather than charge for a call that should be free.
                now = now_ms()
                if await leases.recall_free(
                    tx, buyer_id, service.id, res.free_quota, now, now + live_ms
                ):
                    if idem_key is not None:
                        await ops.release_idempotency(tx, buyer_id, idem_key)
                    return _RECALLED, None, None
            reserved = await ops.reserve(tx, res)
            if reserved.mode == ops.INSUFFICIENT:
                if idem_key is not None:
                    await ops.release_idempotency(tx, buyer_id, idem_key)
                now = now_ms()
                if recall[0] and await leases.recall_balance(
                    tx, buyer_id, service.asset, now, now + live_ms
                ):
                    # The money is in other workers' leases, which give it back now.
                    return _RECALLED, None, None
            return ops.CLAIMED, None, reserved

        deadline = time.monotonic() + self.leases.policy.recall_wait_seconds
        pause = 0.01
        while True:
            state, prior, reserved = await self.writer.submit(op)
            if state != _RECALLED:
                break
            if time.monotonic() > deadline:
                recall[0] = False  # waited long enough: decide on what the wallet holds now
                continue
            await asyncio.sleep(pause)
            pause = min(0.2, pause * 2)
        if state == ops.IN_FLIGHT:
            raise IdempotencyConflict("a request with this Idempotency-Key is in flight")
        if state == ops.DONE:
            raise IdempotencyConflict("this Idempotency-Key was already used", usage_id=prior)
        assert reserved is not None
        if reserved.mode == ops.INSUFFICIENT:
            if self.refusal_memo_seconds > 0:
                if len(self._refused) > 100_000:
                    self._refused.clear()
                self._refused[(buyer_id, service.id)] = (time.monotonic(), epoch)
            raise PaymentRequired("no free-tier calls left and the prepaid balance is too low")
        amount = service.price_units if reserved.mode == ops.HELD else 0
        return Ticket(
            usage_id=usage_id,
            buyer_id=buyer_id,
            service=service,
            mode=reserved.mode,
            hold_id=reserved.hold_id,
            amount=amount,
            fee=fee_of(amount, self.fee_bps_for(service.provider_id)),
            free_tier=reserved.mode == ops.FREE,
            idem_key=idem_key,
        )

    def outcome(
        self,
        t: Ticket,
        *,
        upstream_status: int | None,
        latency_ms: float | None,
        bytes_in: int,
        bytes_out: int,
        request_id: str | None,
    ) -> ops.Outcome:
        served = ops.served(upstream_status)
        usage = ops.Usage(
            id=t.usage_id,
            buyer_id=t.buyer_id,
            service_id=t.service.id,
            provider_id=t.service.provider_id,
            asset=t.service.asset,
            payment_method="free_tier" if t.free_tier else ("prepaid" if t.amount else "none"),
            upstream_status=upstream_status,
            latency_ms=latency_ms,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            request_id=request_id,
        )
        return ops.Outcome(
            usage=usage,
            mode=t.mode,
            hold_id=t.hold_id,
            held=t.amount,
            charge=t.amount if served else 0,
            fee=t.fee if served else 0,
            free_tier=t.free_tier,
            idem_key=t.idem_key,
        )

    async def finish(self, o: ops.Outcome, lease: Lease | None = None) -> int:
        if lease is not None:
            return self.leases.finish(lease, o)  # posted with the lease's next batch
        return await self.writer.submit(self.finish_op(o))

    def finish_op(self, o: ops.Outcome) -> Callable[[Tx], Awaitable[int]]:
        hooks = self.finish_hooks

        async def op(tx: Tx) -> int:
            charged = await ops.finish(tx, o)
            for hook in hooks:
                await hook(tx, o, charged)
            return charged

        return op

    async def expire_holds(self, now_ms: int) -> int:
        total = 0
        while True:
            n = await self.writer.submit(lambda tx: ops.expire_holds(tx, now_ms))
            total += n
            if n < 500:
                return total

    async def expire_leases(self, now_ms: int) -> int:
        """Give back the leases of workers that died (balance and free calls)."""
        total = 0
        for expire in (leases.expire_balance, leases.expire_free):
            while True:
                n = await self.writer.submit(lambda tx, f=expire: f(tx, now_ms))  # type: ignore[misc]
                total += n
                if n < 500:
                    break
        return total
