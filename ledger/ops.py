"""Ledger operations for one metered call, each an async function of a ``Tx``.

They are built to run inside a group-commit batch: none of them suspends for
anything but its own statements, and each guards itself with a conditional
UPDATE or a unique key, so the same outcome holds however many proxy
processes run them at once:

- ``reserve``: claim a free-tier slot (``used < quota``) or place a hold
  (``balance >= amount``), never both, never past the limit;
- ``finish``: capture the hold (provider share, platform fee, release of any
  rest), or void it; record the usage row; settle the idempotency key;
- ``expire_holds``: void holds whose call never finished (a crash, a kill).

Every transfer carries an idempotency key derived from the hold, so a hold
can be captured or voided once, whatever retries happen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ledger import journal as j
from ledger.db import DuplicateError, Tx, note_wallet_credit, register_bulk_insert
from ledger.journal import Transfer, new_id, now_ms

FREE = "free"
HELD = "held"
NO_CHARGE = "no_charge"  # price 0 and no free tier: nothing to reserve
INSUFFICIENT = "insufficient"
# Spent in memory from a worker's lease (ledger.leases), posted in a batch.
LEASED = "leased"
FREE_LEASED = "free_leased"


@dataclass(slots=True)
class Reservation:
    usage_id: str
    buyer_id: str
    service_id: str
    free_quota: int
    price: int
    asset: str
    hold_ttl_ms: int


@dataclass(slots=True)
class Reserved:
    mode: str
    hold_id: str | None = None
    free_used: int = 0


async def reserve(tx: Tx, r: Reservation) -> Reserved:
    if r.free_quota > 0:
        used = await tx.fetchval(
            "UPDATE free_tier_usage SET used = used + 1"
            " WHERE buyer_id = $1 AND service_id = $2 AND used < $3 RETURNING used",
            r.buyer_id,
            r.service_id,
            r.free_quota,
        )
        if used is None:
            inserted = await tx.execute(
                "INSERT INTO free_tier_usage (buyer_id, service_id, used) VALUES ($1, $2, 1)"
                " ON CONFLICT (buyer_id, service_id) DO NOTHING",
                r.buyer_id,
                r.service_id,
            )
            if inserted:
                used = 1
            else:  # another call created the row first: count against it
                used = await tx.fetchval(
                    "UPDATE free_tier_usage SET used = used + 1"
                    " WHERE buyer_id = $1 AND service_id = $2 AND used < $3 RETURNING used",
                    r.buyer_id,
                    r.service_id,
                    r.free_quota,
                )
        if used is not None:
            return Reserved(FREE, free_used=used)
    if r.price <= 0:
        return Reserved(NO_CHARGE)
    hold_id = "h" + r.usage_id
    now = now_ms()
    ok = await tx.transfer(
        Transfer(
            new_id("tr"),
            j.wallet(r.buyer_id, r.asset),
            j.holding(r.asset),
            r.price,
            "hold",
            f"hold:{hold_id}",
            usage_id=r.usage_id,
            hold_id=hold_id,
        ),
        guard=True,
        now=now,
    )
    if not ok:
        return Reserved(INSUFFICIENT)
    await tx.insert_later(
        "holds",
        "INSERT INTO holds (id, account_id, asset, amount, status, usage_id, expires_at, created_at)"
        " VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7)",
        hold_id,
        j.wallet(r.buyer_id, r.asset).id,
        r.asset,
        r.price,
        r.usage_id,
        now + r.hold_ttl_ms,
        now,
    )
    return Reserved(HELD, hold_id=hold_id)


@dataclass(slots=True)
class Usage:
    id: str
    buyer_id: str
    service_id: str
    provider_id: str
    asset: str
    payment_method: str
    upstream_status: int | None = None
    latency_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    request_id: str | None = None
    created_at: int = field(default_factory=now_ms)


@dataclass(slots=True)
class Outcome:
    """What happened to a call, and what should be charged for it."""

    usage: Usage
    mode: str  # a Reserved mode, or "paid" for calls paid by a payment carried on the request
    hold_id: str | None
    held: int
    charge: int  # 0 voids the hold
    fee: int
    free_tier: bool
    idem_key: str | None = None
    payment_id: str | None = None
    # A leased call whose lease expired before its batch could post it: served,
    # never charged (its money went back to the wallet with the lease's rest).
    lease_lost: bool = False


_INSERT_USAGE = (
    "INSERT INTO usage_records (id, buyer_id, service_id, provider_id, amount, asset, free_tier,"
    " payment_method, outcome, upstream_status, latency_ms, bytes_in, bytes_out, request_id,"
    " hold_id, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)"
)
register_bulk_insert(
    _INSERT_USAGE,
    "usage_records",
    "id, buyer_id, service_id, provider_id, amount, asset, free_tier, payment_method, outcome,"
    " upstream_status, latency_ms, bytes_in, bytes_out, request_id, hold_id, created_at",
    "text text text text bigint text int text text int float8 bigint bigint text text bigint",
)


async def finish(tx: Tx, o: Outcome) -> int:
    """Capture or void; write the usage row. Returns the amount charged."""
    u, now = o.usage, now_ms()
    charged, outcome = 0, "free" if o.free_tier else "no_charge"
    if o.mode == HELD and o.hold_id:
        if o.charge > 0:
            if await _resolve_hold(tx, o.hold_id, "posted", now):
                charged, outcome = o.charge, "charged"
                await _capture(tx, o, u, now)
            else:
                outcome = "hold_expired"  # the sweeper voided it first: not charged
        else:
            outcome = "voided"
            if await _resolve_hold(tx, o.hold_id, "voided", now):
                await tx.transfer(
                    Transfer(
                        new_id("tr"),
                        j.holding(u.asset),
                        j.wallet(u.buyer_id, u.asset),
                        o.held,
                        "void",
                        f"void:{o.hold_id}",
                        usage_id=u.id,
                        hold_id=o.hold_id,
                    ),
                    now=now,
                )
    elif o.mode == FREE and o.charge == 0 and not _served(u):
        # A failed call gives its free-tier slot back.
        outcome = "voided"
        note_wallet_credit()
        await tx.execute(
            "UPDATE free_tier_usage SET used = used - 1"
            " WHERE buyer_id = $1 AND service_id = $2 AND used > 0",
            u.buyer_id,
            u.service_id,
        )
    elif o.mode == LEASED:
        if o.charge > 0:
            charged, outcome = o.charge, "charged"
            await _capture(tx, o, u, now)
        elif o.lease_lost:
            outcome = "hold_expired"
        else:
            outcome = "voided"
    elif o.mode == FREE_LEASED:
        outcome = "free" if _served(u) else "voided"
    elif o.mode == "paid":
        charged = o.charge
        outcome = "charged" if charged else "voided"
        if charged:
            await _capture(tx, o, u, now)
    elif not _served(u):
        outcome = "failed"
    await tx.insert_later(
        "usage_records",
        _INSERT_USAGE,
        u.id,
        u.buyer_id,
        u.service_id,
        u.provider_id,
        charged,
        u.asset,
        1 if (o.free_tier and _served(u)) else 0,
        u.payment_method,
        outcome,
        u.upstream_status,
        u.latency_ms,
        u.bytes_in,
        u.bytes_out,
        u.request_id,
        o.hold_id,
        u.created_at,
    )
    if o.idem_key is not None:
        if _served(u):
            await tx.execute(
                "UPDATE idempotency_keys SET state = 'done', usage_id = $3"
                " WHERE buyer_id = $1 AND idem_key = $2",
                u.buyer_id,
                o.idem_key,
                u.id,
            )
        else:
            # Nothing was charged: let the client retry with the same key.
            await tx.execute(
                "DELETE FROM idempotency_keys WHERE buyer_id = $1 AND idem_key = $2",
                u.buyer_id,
                o.idem_key,
            )
    return charged


# Recorded (as nginx does) when the client left before the upstream's headers:
# the call was not delivered, so it is not charged.
CLIENT_GONE = 499


def served(status: int | None) -> bool:
    return status is not None and status < 500 and status != CLIENT_GONE


def _served(u: Usage) -> bool:
    return served(u.upstream_status)


async def _resolve_hold(tx: Tx, hold_id: str, status: str, now: int) -> bool:
    return await tx.resolve_hold(hold_id, status, now)


async def _capture(tx: Tx, o: Outcome, u: Usage, now: int) -> None:
    """Split the charge into provider earnings and the platform fee."""
    from_hold = o.mode in (HELD, LEASED)
    source = j.holding(u.asset) if from_hold else j.wallet(u.buyer_id, u.asset)
    # A lease pays many calls: each call's transfers are keyed by the call.
    ref = u.id if o.mode == LEASED else (o.hold_id or u.id)
    provider_share = o.charge - o.fee
    if provider_share > 0:
        await tx.transfer(
            Transfer(
                new_id("tr"),
                source,
                j.earnings(u.provider_id, u.asset),
                provider_share,
                "charge",
                f"charge:{ref}",
                usage_id=u.id,
                hold_id=o.hold_id,
                payment_id=o.payment_id,
            ),
            guard=not from_hold,
            now=now,
        )
    if o.fee > 0:
        await tx.transfer(
            Transfer(
                new_id("tr"),
                source,
                j.fees(u.asset),
                o.fee,
                "fee",
                f"fee:{ref}",
                usage_id=u.id,
                hold_id=o.hold_id,
                payment_id=o.payment_id,
            ),
            guard=not from_hold,
            now=now,
        )
    rest = o.held - o.charge
    if o.mode == HELD and rest > 0:
        await tx.transfer(
            Transfer(
                new_id("tr"),
                j.holding(u.asset),
                j.wallet(u.buyer_id, u.asset),
                rest,
                "release",
                f"release:{ref}",
                usage_id=u.id,
                hold_id=o.hold_id,
            ),
            now=now,
        )


async def expire_holds(tx: Tx, now: int, limit: int = 500) -> int:
    """Void holds past their expiry: the call never finished (crash, kill)."""
    rows = await tx.fetch(
        "SELECT id, account_id, asset, amount, usage_id FROM holds"
        " WHERE status = 'pending' AND kind = 'call' AND expires_at < $1"
        " ORDER BY expires_at LIMIT $2",
        now,
        limit,
    )
    count = 0
    for r in rows:
        if not await _resolve_hold(tx, r["id"], "expired", now):
            continue
        # wallet:{owner}:{asset}; owners may themselves contain ':'
        owner = r["account_id"][len("wallet:") : -len(r["asset"]) - 1]
        await tx.transfer(
            Transfer(
                new_id("tr"),
                j.holding(r["asset"]),
                j.wallet(owner, r["asset"]),
                r["amount"],
                "expire",
                f"void:{r['id']}",
                usage_id=r["usage_id"],
                hold_id=r["id"],
            ),
            now=now,
        )
        count += 1
    return count


# --------------------------------------------------------------------------- idempotency keys

CLAIMED = "claimed"
IN_FLIGHT = "in_flight"
DONE = "done"


async def claim_idempotency(
    tx: Tx, buyer_id: str, key: str, window_ms: int, stale_ms: int | None = None
) -> tuple[str, str | None]:
    """Claim (buyer, key) for a new call, or say why not: in flight, or done (with its usage id).

    ``stale_ms``: a claim still in flight after this long belongs to a call
    that died (a crash between the claim and its finish; its hold has expired
    by then), so the key is free again instead of blocking retries for a day.
    """
    now = now_ms()
    inserted = await tx.execute(
        "INSERT INTO idempotency_keys (buyer_id, idem_key, state, created_at) VALUES ($1, $2, 'in_flight', $3)"
        " ON CONFLICT (buyer_id, idem_key) DO NOTHING",
        buyer_id,
        key,
        now,
    )
    if inserted:
        return CLAIMED, None
    # A key older than the window is free again, and so is an abandoned claim.
    renewed = await tx.execute(
        "UPDATE idempotency_keys SET state = 'in_flight', usage_id = NULL, created_at = $3"
        " WHERE buyer_id = $1 AND idem_key = $2"
        " AND (created_at < $4 OR (state = 'in_flight' AND created_at < $5))",
        buyer_id,
        key,
        now,
        now - window_ms,
        now - (stale_ms if stale_ms is not None else window_ms),
    )
    if renewed:
        return CLAIMED, None
    row = await tx.fetchrow(
        "SELECT state, usage_id FROM idempotency_keys WHERE buyer_id = $1 AND idem_key = $2",
        buyer_id,
        key,
    )
    if row is None:  # released between our statements; treat as in flight, the client retries
        return IN_FLIGHT, None
    return (DONE, row["usage_id"]) if row["state"] == DONE else (IN_FLIGHT, None)


async def release_idempotency(tx: Tx, buyer_id: str, key: str) -> None:
    await tx.execute(
        "DELETE FROM idempotency_keys WHERE buyer_id = $1 AND idem_key = $2", buyer_id, key
    )


# --------------------------------------------------------------------------- credits


@dataclass(slots=True)
class Credit:
    owner_id: str
    asset: str
    amount: int
    kind: str
    idempotency_key: str
    payment_id: str | None = None


async def credit(tx: Tx, c: Credit) -> dict[str, Any]:
    """Credit a wallet from ``world``; the same idempotency key credits once, ever."""
    existing = await tx.fetchrow(
        "SELECT id, amount, credit_account FROM transfers WHERE idempotency_key = $1",
        c.idempotency_key,
    )
    if existing is not None:
        if (
            existing["credit_account"] != j.wallet(c.owner_id, c.asset).id
            or existing["amount"] != c.amount
        ):
            raise DuplicateError("idempotency key already used for another credit")
        return {"transfer_id": existing["id"], "replayed": True}
    tid = new_id("tr")
    await tx.transfer(
        Transfer(
            tid,
            j.world(c.asset),
            j.wallet(c.owner_id, c.asset),
            c.amount,
            c.kind,
            c.idempotency_key,
            payment_id=c.payment_id,
        )
    )
    return {"transfer_id": tid, "replayed": False}


async def balance(tx: Tx, account_id: str) -> int:
    v = await tx.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id)
    return int(v or 0)
