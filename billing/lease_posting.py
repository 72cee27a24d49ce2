"""How a lease's finished calls reach the ledger: one operation per batch.

A batch is posted in one transaction: the lease's ``captured`` grows by the
batch's charges (refused once the lease is no longer pending: its calls are
then recorded as served and not charged) and each call gets its usage row,
charge and fee transfers and finish hooks. A batch whose commit went
unanswered (the connection dropped) may have committed: it is retried on its
own, and its retry first looks for its first call's row. A batch that fails
for another reason (one bad row) is posted call by call, so one call never
costs the others their record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from billing.lease_model import Lease
from ledger import leases, ops
from ledger.db import Tx

Hook = Callable[[Tx, ops.Outcome, int], Awaitable[None]]
Op = Callable[[Tx], Awaitable[bool]]


def batch_amount(free: bool, batch: list[ops.Outcome]) -> int:
    """What the batch takes from its lease: money, or free calls served."""
    if free:
        return sum(1 for o in batch if ops.served(o.usage.upstream_status))
    return sum(o.charge for o in batch)


def post_op(
    lease: Lease,
    batch: list[ops.Outcome],
    expires_at: int,
    hooks: list[Hook],
    *,
    maybe_posted: bool = False,
) -> Op:
    lease_id, free = lease.id, lease.free
    amount = batch_amount(free, batch)

    async def op(tx: Tx) -> bool:
        if maybe_posted and await leases.already_posted(tx, batch[0].usage.id):
            return True
        if free:
            alive = await leases.use_free(tx, lease_id, amount, expires_at)
            if not alive and amount:
                # The lease expired (its slots went back) before these free calls were
                # posted: they were served free all the same, so they count against
                # the quota now, and the buyer's next calls pay sooner.
                await leases.count_free_calls(tx, lease.buyer_id, lease.key, amount)
        else:
            alive = await leases.capture(tx, lease_id, amount, expires_at)
        for o in batch:
            if not alive and o.charge > 0:
                o = dataclasses.replace(o, charge=0, fee=0, lease_lost=True)
            charged = await ops.finish(tx, o)
            for hook in hooks:
                await hook(tx, o, charged)
        return alive

    return op


def renew_op(lease_id: str, free: bool, expires_at: int) -> Op:
    """An empty batch: pushes the expiry of a lease whose calls are still running."""

    async def op(tx: Tx) -> bool:
        if free:
            return await leases.use_free(tx, lease_id, 0, expires_at)
        return await leases.capture(tx, lease_id, 0, expires_at)

    return op
