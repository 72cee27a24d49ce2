"""Leases: a slice of a buyer's balance, or of its free calls, reserved at once.

A balance lease is a hold of kind ``lease``: one guarded transfer moves the
slice out of the buyer's wallet into the holding account, exactly like a
call's hold, so whatever a worker does in memory afterwards it can never spend
money the wallet did not have. Calls spent from it are posted in batches
(``capture``): each call keeps its own usage row and charge/fee transfers, and
the lease's ``captured`` grows by their sum in the same transaction, under a
condition that fails once the lease is no longer pending. Its rest goes back to
the wallet when the worker closes it, or when it expires because the worker
died (``expire``), so a batch that lost that race posts nothing.

A free-tier lease does the same with free calls: ``free_tier_usage.used`` grows
by the slots taken, and the slots not used come back at close or expiry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger import journal as j
from ledger.db import Tx, note_wallet_credit
from ledger.journal import Transfer, new_id

LEASE = "lease"


@dataclass(slots=True)
class Granted:
    id: str
    amount: int  # money units for a balance lease, calls for a free-tier lease
    expires_at: int


async def open_balance(
    tx: Tx,
    buyer_id: str,
    asset: str,
    *,
    want: int,
    floor: int,
    share: int,
    ttl_ms: int,
    now: int,
) -> Granted | None:
    """Lease ``min(want, balance // share)`` of the wallet, or nothing when that is
    under ``floor`` (a low balance is spent by exact per-call holds instead)."""
    wallet = j.wallet(buyer_id, asset)
    balance = int(await tx.fetchval("SELECT balance FROM accounts WHERE id = $1", wallet.id) or 0)
    amount = min(want, balance // max(1, share))
    if amount < max(1, floor):
        return None
    lease_id = new_id("lse")
    ok = await tx.transfer(
        Transfer(
            new_id("tr"),
            wallet,
            j.holding(asset),
            amount,
            "hold",
            f"hold:{lease_id}",
            hold_id=lease_id,
        ),
        guard=True,
        now=now,
    )
    if not ok:
        return None
    await tx.insert_later(
        "holds",
        "INSERT INTO holds (id, account_id, asset, amount, status, usage_id, expires_at,"
        " created_at, kind) VALUES ($1, $2, $3, $4, 'pending', NULL, $5, $6, 'lease')",
        lease_id,
        wallet.id,
        asset,
        amount,
        now + ttl_ms,
        now,
    )
    return Granted(lease_id, amount, now + ttl_ms)


async def capture(tx: Tx, lease_id: str, amount: int, expires_at: int) -> bool:
    """Count ``amount`` as posted out of the lease and push its expiry to
    ``expires_at``; False when the lease is no longer pending (it expired or was
    closed first), in which case the caller must post nothing from it."""
    n = await tx.execute(
        "UPDATE holds SET captured = captured + $2,"
        # Never earlier: a batch retried after a newer one must not shorten the lease.
        " expires_at = CASE WHEN expires_at > $3 THEN expires_at ELSE $3 END"
        " WHERE id = $1 AND status = 'pending' AND captured + $2 <= amount",
        lease_id,
        amount,
        expires_at,
    )
    return n == 1


async def shrink_balance(tx: Tx, lease_id: str, size: int, keep: int, now: int) -> int:
    """Cut a recalled lease from ``size`` down to ``keep`` (what its worker's calls
    took) and give the difference back to the wallet at once, so money does not
    wait behind a long call in flight. Returns what went back (0 if it had moved on)."""
    row = await tx.fetchrow(
        "UPDATE holds SET amount = $3"
        " WHERE id = $1 AND status = 'pending' AND kind = 'lease' AND amount = $2"
        " AND captured <= $3 RETURNING account_id, asset",
        lease_id,
        size,
        keep,
    )
    if row is None or size <= keep:
        return 0
    await tx.transfer(
        Transfer(
            new_id("tr"),
            j.holding(row["asset"]),
            _wallet_of(row["account_id"], row["asset"]),
            size - keep,
            "release",
            f"shrink:{lease_id}",
            hold_id=lease_id,
        ),
        now=now,
    )
    return size - keep


async def shrink_free(tx: Tx, lease_id: str, size: int, keep: int) -> int:
    row = await tx.fetchrow(
        "UPDATE free_tier_leases SET slots = $3"
        " WHERE id = $1 AND status = 'pending' AND slots = $2 AND used <= $3"
        " RETURNING buyer_id, service_id",
        lease_id,
        size,
        keep,
    )
    if row is None or size <= keep:
        return 0
    await _free_calls_back(tx, row["buyer_id"], row["service_id"], size - keep)
    return size - keep


async def _free_calls_back(tx: Tx, buyer_id: str, service_id: str, calls: int) -> None:
    note_wallet_credit()  # free calls back: a remembered refusal may be stale
    await tx.execute(
        "UPDATE free_tier_usage SET used = used - $3"
        " WHERE buyer_id = $1 AND service_id = $2 AND used >= $3",
        buyer_id,
        service_id,
        calls,
    )


async def already_posted(tx: Tx, usage_id: str) -> bool:
    """Whether a batch whose commit went unanswered did commit (its first call's row)."""
    return await tx.fetchval("SELECT 1 FROM usage_records WHERE id = $1", usage_id) is not None


async def close_balance(tx: Tx, lease_id: str, now: int, *, status: str = "closed") -> int:
    """Resolve the lease and give its rest back to the wallet; returns the rest
    (0 when someone else resolved it first)."""
    row = await tx.fetchrow(
        "UPDATE holds SET status = $2, resolved_at = $3"
        " WHERE id = $1 AND status = 'pending' AND kind = 'lease'"
        " RETURNING account_id, asset, amount - captured AS rest",
        lease_id,
        status,
        now,
    )
    if row is None:
        return 0
    rest = int(row["rest"])
    if rest > 0:
        await tx.transfer(
            Transfer(
                new_id("tr"),
                j.holding(row["asset"]),
                _wallet_of(row["account_id"], row["asset"]),
                rest,
                "release" if status == "closed" else "expire",
                f"release:{lease_id}",
                hold_id=lease_id,
            ),
            now=now,
        )
    return rest


async def expire_balance(tx: Tx, now: int, limit: int = 500) -> int:
    """Give back the rest of leases past their expiry: their worker died."""
    ids = await _past_expiry(tx, "holds", " AND kind = 'lease'", now, limit)
    for lease_id in ids:
        # The rest is read by the resolving UPDATE itself: a batch that captured
        # from this lease a moment ago is either in it or refused after it.
        await close_balance(tx, lease_id, now, status="expired")
    return len(ids)


async def _past_expiry(tx: Tx, table: str, where: str, now: int, limit: int) -> list[str]:
    rows = await tx.fetch(
        f"SELECT id FROM {table} WHERE status = 'pending'{where} AND expires_at < $1"
        " ORDER BY expires_at LIMIT $2",
        now,
        limit,
    )
    return [r["id"] for r in rows]


def _wallet_of(account_id: str, asset: str) -> j.Account:
    # wallet:{owner}:{asset}; owners may themselves contain ':'
    return j.wallet(account_id[len("wallet:") : -len(asset) - 1], asset)


# --------------------------------------------------------------------------- free calls


async def open_free(
    tx: Tx,
    buyer_id: str,
    service_id: str,
    quota: int,
    *,
    want: int,
    floor: int,
    share: int,
    ttl_ms: int,
    now: int,
) -> Granted | None:
    """Take ``min(want, left // share)`` free calls at once, or nothing when that
    is under ``floor`` (the last free calls are counted one by one)."""
    used = await tx.fetchval(
        "SELECT used FROM free_tier_usage WHERE buyer_id = $1 AND service_id = $2",
        buyer_id,
        service_id,
    )
    if used is None:
        await tx.execute(
            "INSERT INTO free_tier_usage (buyer_id, service_id, used) VALUES ($1, $2, 0)"
            " ON CONFLICT (buyer_id, service_id) DO NOTHING",
            buyer_id,
            service_id,
        )
        used = 0
    slots = min(want, (quota - int(used)) // max(1, share))
    if slots < max(1, floor):
        return None
    # Conditional: another worker may have taken slots since the read.
    taken = await tx.execute(
        "UPDATE free_tier_usage SET used = used + $3"
        " WHERE buyer_id = $1 AND service_id = $2 AND used + $3 <= $4",
        buyer_id,
        service_id,
        slots,
        quota,
    )
    if taken != 1:
        return None
    lease_id = new_id("fls")
    await tx.execute(
        "INSERT INTO free_tier_leases (id, buyer_id, service_id, slots, used, status,"
        " expires_at, created_at) VALUES ($1, $2, $3, $4, 0, 'pending', $5, $6)",
        lease_id,
        buyer_id,
        service_id,
        slots,
        now + ttl_ms,
        now,
    )
    return Granted(lease_id, slots, now + ttl_ms)


async def use_free(tx: Tx, lease_id: str, calls: int, expires_at: int) -> bool:
    n = await tx.execute(
        "UPDATE free_tier_leases SET used = used + $2,"
        " expires_at = CASE WHEN expires_at > $3 THEN expires_at ELSE $3 END"
        " WHERE id = $1 AND status = 'pending' AND used + $2 <= slots",
        lease_id,
        calls,
        expires_at,
    )
    return n == 1


async def count_free_calls(tx: Tx, buyer_id: str, service_id: str, calls: int) -> None:
    """Free calls served outside any live lease are still counted (even past the quota)."""
    await tx.execute(
        "UPDATE free_tier_usage SET used = used + $3 WHERE buyer_id = $1 AND service_id = $2",
        buyer_id,
        service_id,
        calls,
    )


async def close_free(tx: Tx, lease_id: str, now: int, *, status: str = "closed") -> int:
    row = await tx.fetchrow(
        "UPDATE free_tier_leases SET status = $2, resolved_at = $3"
        " WHERE id = $1 AND status = 'pending'"
        " RETURNING buyer_id, service_id, slots - used AS rest",
        lease_id,
        status,
        now,
    )
    if row is None:
        return 0
    rest = int(row["rest"])
    if rest > 0:
        await _free_calls_back(tx, row["buyer_id"], row["service_id"], rest)
    return rest


async def expire_free(tx: Tx, now: int, limit: int = 500) -> int:
    ids = await _past_expiry(tx, "free_tier_leases", "", now, limit)
    for lease_id in ids:
        await close_free(tx, lease_id, now, status="expired")
    return len(ids)


# --------------------------------------------------------------------------- recalls

# A recalled lease's worker notices within a tenth of a second and gives back at
# once what its calls do not hold; past this, the rest is theirs until they end.
RECALL_ANSWERED_MS = 1000


async def recall_balance(tx: Tx, buyer_id: str, asset: str, now: int, live_after: int) -> int:
    """Ask the workers holding this wallet's leases to give them back; returns how
    many of them are worth waiting for: renewed lately (expiring after
    ``live_after``), so their worker is alive. 0: the wallet really is short, or
    the money is in a dead worker's lease until it expires."""
    return await tx.execute(
        "UPDATE holds SET recalled_at = COALESCE(recalled_at, $2)"
        " WHERE account_id = $1 AND kind = 'lease' AND status = 'pending' AND expires_at > $3"
        # A lease recalled a while ago has given back what it could: what it still
        # holds belongs to calls in flight, however long they run. Not worth waiting.
        " AND (recalled_at IS NULL OR recalled_at > $4)",
        j.wallet(buyer_id, asset).id,
        now,
        live_after,
        now - RECALL_ANSWERED_MS,
    )


async def recall_free(
    tx: Tx, buyer_id: str, service_id: str, quota: int, now: int, live_after: int
) -> int:
    """When the buyer's free calls on the service are all taken, ask the workers
    holding them in leases to give them back; returns how many leases are pending."""
    used = await tx.fetchval(
        "SELECT used FROM free_tier_usage WHERE buyer_id = $1 AND service_id = $2",
        buyer_id,
        service_id,
    )
    if used is None or int(used) < quota:
        return 0
    return await tx.execute(
        "UPDATE free_tier_leases SET recalled_at = COALESCE(recalled_at, $3)"
        " WHERE buyer_id = $1 AND service_id = $2 AND status = 'pending' AND used < slots"
        " AND expires_at > $4 AND (recalled_at IS NULL OR recalled_at > $5)",
        buyer_id,
        service_id,
        now,
        live_after,
        now - RECALL_ANSWERED_MS,
    )


async def recalled(tx: Tx, balance_ids: list[str], free_ids: list[str]) -> set[str]:
    """Which of these leases another worker recalled (or someone resolved)."""
    out: set[str] = set()
    for table, ids in (("holds", balance_ids), ("free_tier_leases", free_ids)):
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ", ".join(f"${n}" for n in range(1, len(chunk) + 1))
            rows = await tx.fetch(
                f"SELECT id FROM {table} WHERE id IN ({marks})"
                " AND (recalled_at IS NOT NULL OR status <> 'pending')",
                *chunk,
            )
            out.update(r["id"] for r in rows)
    return out
