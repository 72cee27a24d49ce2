"""How a call is paid: free tier, a hold on the prepaid balance, or a 402.

``begin`` runs before the upstream is called and ``finish`` after it answered
(or failed). Both go through the group-commit writer, so each is one share of
a batched transaction; neither ever reads or writes the store on its own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from billing.errors import BillingError, PaymentRequired
from billing.money import fee_of
from ledger import ops
from ledger.db import Tx
from ledger.registry import Service
from ledger.writer import GroupCommitWriter


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

    @property
    def paid_by_balance(self) -> bool:
        return self.mode == ops.HELD


class Meter:
    def __init__(
        self,
        writer: GroupCommitWriter,
        *,
        hold_ttl_ms: int,
        idem_window_ms: int,
        fee_bps_for: Callable[[str], int],
    ):
        self.writer = writer
        # Run inside the same transaction as each finished call (webhook outbox
        # rows, auto top-up triggers): atomic with the charge, and no extra commit.
        self.finish_hooks: list[Callable[[Tx, ops.Outcome, int], Awaitable[None]]] = []
        self.hold_ttl_ms = hold_ttl_ms
        self.idem_window_ms = idem_window_ms
        self.fee_bps_for = fee_bps_for

    async def begin(
        self, buyer_id: str, service: Service, usage_id: str, idem_key: str | None = None
    ) -> Ticket:
        if idem_key is None and service.free_tier_calls <= 0 and service.price_units <= 0:
            # Nothing to reserve or remember: skip the store entirely.
            return Ticket(usage_id, buyer_id, service, ops.NO_CHARGE, None, 0, 0, False, None)
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

        async def op(tx: Tx) -> tuple[str, str | None, ops.Reserved | None]:
            if idem_key is not None:
                state, prior = await ops.claim_idempotency(
                    tx, buyer_id, idem_key, window, stale_ms=stale
                )
                if state != ops.CLAIMED:
                    return state, prior, None
            reserved = await ops.reserve(tx, res)
            if reserved.mode == ops.INSUFFICIENT and idem_key is not None:
                await ops.release_idempotency(tx, buyer_id, idem_key)
            return ops.CLAIMED, None, reserved

        state, prior, reserved = await self.writer.submit(op)
        if state == ops.IN_FLIGHT:
            raise IdempotencyConflict("a request with this Idempotency-Key is in flight")
        if state == ops.DONE:
            raise IdempotencyConflict("this Idempotency-Key was already used", usage_id=prior)
        assert reserved is not None
        if reserved.mode == ops.INSUFFICIENT:
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

    async def finish(self, o: ops.Outcome) -> int:
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
