"""Settlements: what a provider is owed for a period, fixed once, paid once.

How the money moves (every step a transfer, so ``tollway ledger verify`` holds):

1. At call time the charge is already split: ``charge`` holding -> earnings
   (the provider's share) and ``fee`` holding -> fees, by the fee rate the
   proxy process knew then (``platform_fee_bps``, or the growth-program
   schedule).
2. A settlement gathers the posted charges of one provider, asset and period
   that no settlement holds yet (``settlement_items`` has the usage id as its
   primary key: a charge belongs to at most one settlement, ever, whatever
   runs concurrently), and takes the fee that the growth-program schedule
   says for the month of each charge: ``gross * bps // 10000`` per charge,
   rounded down like the call-time split. ``net = gross - fee``.
3. The call-time split and the schedule fee can differ (a backdated
   registration, a changed rate, a process that did not know the provider's
   registration yet). The difference is booked when the settlement is fixed:
   earnings -> fees (``settlement_fee``) when the schedule asks more, fees ->
   earnings (``settlement_rebate``) when it asks less. After it, exactly
   ``net`` of these charges sits in the provider's earnings.
4. Paying posts ``payout``: earnings -> world, ``net``, idempotency key
   ``payout:<settlement id>``, guarded so earnings never go below zero.

Settlements are the single record of what a provider is owed and paid: money
leaves earnings only by paying settlements, by one of two paths.

- ``pay`` (``PATCH /settlements/{id}/pay``): a payout made outside Tollway;
  posts the ``payout`` transfer above.
- A withdrawal from earnings (on chain, or a Stripe Connect transfer): it
  names the settlements it pays, or takes the oldest unpaid ones whose nets
  add up to its amount exactly (``plan_payout``); its amount is their net. In
  the transaction of its guarded debit it claims them (``claim_payout``:
  pending -> paying, ``withdrawal_id`` set; a settlement already paying or
  paid refuses the whole withdrawal, so it is never paid twice by either
  path). When the payout is made, ``complete_payout`` marks them completed
  with its tx hash or Stripe transfer id as ``payment_tx`` in the transaction
  that records it; a failed payout (void, reversal) puts them back to
  pending (``release_payout``) in the transaction that returns the money.

So ``earnings == unsettled share + net of pending settlements`` at every
commit: a paying settlement's net has already left earnings.

Settlements are built in chunks, each its own short transaction, so settling
a large ledger never holds the (SQLite) write lock for long and can report
progress; a settlement is ``processing`` until its totals are fixed, and a
repeat of the same request resumes it. Statuses: processing -> pending ->
completed, or pending -> paying -> completed (or back to pending) when a
withdrawal pays it.

Months of the growth program are 30-day periods from the provider's
registration (as at call time in ``proxy.runtime.fee_schedule``): month 1 uses
the first rate, later months the next ones, and the last rate thereafter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from billing.errors import BillingError
from billing.money import format_amount
from billing.webhooks import SETTLEMENT_COMPLETED, enqueue_event
from ledger import journal as j
from ledger.db import Row, Store, Tx
from ledger.journal import Transfer, new_id, now_ms

MONTH_MS = 30 * 86_400_000
PROCESSING, PENDING, PAYING, COMPLETED = "processing", "pending", "paying", "completed"
STATUSES = (PROCESSING, PENDING, PAYING, COMPLETED)
# At most this many settlements in one withdrawal.
MAX_PAYOUT_SETTLEMENTS = 100
CHUNK = 2000

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- the fee schedule


@dataclass(frozen=True, slots=True)
class FeePolicy:
    platform_fee_bps: int
    schedule: tuple[int, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> FeePolicy:
        return cls(int(settings.platform_fee_bps), tuple(int(b) for b in settings.fee_schedule_bps))

    def month_index(self, registered_at: int, at_ms: int) -> int:
        return max(0, (at_ms - registered_at) // MONTH_MS)

    def bps_at(self, registered_at: int | None, at_ms: int) -> int:
        if not self.schedule:
            return self.platform_fee_bps
        if registered_at is None:
            return self.schedule[-1]
        return self.schedule[min(self.month_index(registered_at, at_ms), len(self.schedule) - 1)]

    def sql_bps(self, registered_at: int | None, column: str) -> str:
        """The rate for a charge made at ``column``, as an SQL expression of integer literals."""
        if not self.schedule:
            return str(int(self.platform_fee_bps))
        if registered_at is None or len(self.schedule) == 1:
            return str(int(self.schedule[-1]))
        reg = int(registered_at)
        whens = " ".join(
            f"WHEN {column} < {reg + (k + 1) * MONTH_MS} THEN {int(b)}"
            for k, b in enumerate(self.schedule[:-1])
        )
        return f"(CASE {whens} ELSE {int(self.schedule[-1])} END)"


def rate(bps: int) -> str:
    """Basis points as a fraction string: 500 -> "0.05"."""
    return format_amount(bps, 4)


async def registered_at(store: Store | Tx, provider_id: str) -> int | None:
    v = await store.fetchval(
        "SELECT registered_at FROM providers WHERE provider_id = $1", provider_id
    )
    return None if v is None else int(v)


async def commission(
    store: Store, policy: FeePolicy, provider_id: str, now: int | None = None
) -> dict[str, Any]:
    """The growth-program status of a provider (ACF: Provider Commission Info)."""
    now = now or now_ms()
    reg = await registered_at(store, provider_id)
    bps = policy.bps_at(reg, now)
    out: dict[str, Any] = {
        "provider_id": provider_id,
        "registered": reg is not None,
        "registration_date": _iso(reg) if reg is not None else None,
        "current_rate": rate(bps),
        "current_rate_bps": bps,
        "schedule_bps": list(policy.schedule) or [policy.platform_fee_bps],
        "month_number": None,
        "current_tier": "Standard",
        "next_tier_date": None,
        "next_tier_rate": None,
    }
    if reg is None or not policy.schedule:
        return out
    idx = policy.month_index(reg, now)
    out["month_number"] = idx + 1
    last = len(policy.schedule) - 1
    if idx < last:
        out["current_tier"] = f"Month {idx + 1}" + (" (Free)" if bps == 0 else "")
        out["next_tier_date"] = _iso(reg + (idx + 1) * MONTH_MS)
        out["next_tier_rate"] = rate(policy.schedule[idx + 1])
    else:
        out["current_tier"] = f"Month {last + 1}+ (Standard)" if last else "Standard"
    return out


# --------------------------------------------------------------------------- periods


_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _bad(field: str, message: str) -> BillingError:
    return BillingError(message, code="validation_error", status=422)


def month_bounds(period: str) -> tuple[int, int]:
    """ "2026-03" -> [2026-03-01, 2026-04-01) in UTC milliseconds."""
    m = _MONTH_RE.match(period.strip())
    # Years past 9998 have no following month in datetime; before 1970 holds no usage.
    if not m or not 1 <= int(m.group(2)) <= 12 or not 1970 <= int(m.group(1)) <= 9998:
        raise _bad("period", f"{period!r} is not a YYYY-MM month from 1970 to 9998")
    y, mo = int(m.group(1)), int(m.group(2))
    start = dt.datetime(y, mo, 1, tzinfo=dt.UTC)
    end = dt.datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=dt.UTC)
    return _ms(start), _ms(end)


def _ms(d: dt.datetime) -> int:
    return int(d.timestamp() * 1000)


def _instant(value: Any, field: str, *, end: bool) -> int:
    """An ISO date or datetime (or a YYYY-MM month) as UTC milliseconds.

    The period is half-open, [start, end). A bare date or month as the end
    means "through the end of that day or month", as a person would read it.
    """
    if not isinstance(value, str) or not value.strip():
        raise _bad(field, f"{field} is required (ISO 8601 date or datetime, or YYYY-MM)")
    s = value.strip()
    if _MONTH_RE.match(s):
        a, b = month_bounds(s)
        return b if end else a
    try:
        d = dt.datetime.fromisoformat(s)
    except ValueError:
        raise _bad(field, f"{value!r} is not an ISO 8601 date or datetime") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    try:
        if _DATE_RE.match(s) and end:
            d += dt.timedelta(days=1)
        return _ms(d)
    except (OverflowError, ValueError, OSError):
        raise _bad(field, f"{value!r} is out of range") from None


def parse_period(data: dict[str, Any]) -> tuple[int, int]:
    """{"period": "YYYY-MM"} or {"period_start": ..., "period_end": ...} -> [start, end)."""
    if data.get("period") is not None:
        if not isinstance(data["period"], str):
            raise _bad("period", "period must be a YYYY-MM string")
        return month_bounds(data["period"])
    start = _instant(data.get("period_start"), "period_start", end=False)
    end = _instant(data.get("period_end"), "period_end", end=True)
    if end <= start:
        raise _bad("period_end", "period_end must be after period_start")
    return start, end


def _iso(ms: int) -> str:
    return (
        dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


# --------------------------------------------------------------------------- building


@dataclass(slots=True)
class Result:
    settlement: Row | None  # None: nothing unsettled in the period
    created: bool


# A charge paid while its buyer held card money that has not settled yet is not
# settled (so not paid out) until that money settles: otherwise a stolen card could
# be spent on a colluding provider's service and leave as earnings at once, before
# the chargeback. The clock is the database's own, in ms, on both stores.
CARD_SETTLED = (
    " AND NOT EXISTS (SELECT 1 FROM card_funds c WHERE c.owner_id = u.buyer_id"
    " AND c.asset = u.asset AND c.created_at <= u.created_at AND c.settles_at > {now})"
)

_CANDIDATES = (
    " FROM usage_records u"
    " WHERE u.provider_id = $1 AND u.asset = $2 AND u.amount > 0"
    " AND u.created_at >= $3 AND u.created_at < $4"
    " AND NOT EXISTS (SELECT 1 FROM settlement_items s WHERE s.usage_id = u.id)" + CARD_SETTLED
)


def _candidates() -> str:
    return _CANDIDATES.replace("{now}", str(now_ms()))


async def count_unsettled(store: Store, provider_id: str, asset: str, start: int, end: int) -> int:
    return int(
        await store.fetchval("SELECT COUNT(*)" + _candidates(), provider_id, asset, start, end)
    )


async def providers_with_unsettled(store: Store, asset: str, start: int, end: int) -> list[str]:
    rows = await store.fetch(
        "SELECT DISTINCT u.provider_id FROM usage_records u"
        " WHERE u.asset = $1 AND u.amount > 0 AND u.created_at >= $2 AND u.created_at < $3"
        " AND NOT EXISTS (SELECT 1 FROM settlement_items s WHERE s.usage_id = u.id)"
        + CARD_SETTLED.replace("{now}", str(now_ms()))
        + " ORDER BY u.provider_id",
        asset,
        start,
        end,
    )
    return [r["provider_id"] for r in rows]


async def create_settlement(
    store: Store,
    policy: FeePolicy,
    provider_id: str,
    asset: str,
    start: int,
    end: int,
    *,
    progress: Progress | None = None,
    chunk: int = CHUNK,
) -> Result:
    """Settle the provider's unsettled charges in [start, end); idempotent per request."""
    key = f"{provider_id}|{asset}|{start}|{end}"
    now = now_ms()
    sid = new_id("stl")
    async with store.transaction() as tx:
        inserted = await tx.execute(
            "INSERT INTO settlements (id, provider_id, asset, period_start, period_end, request_key,"
            " status, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'processing', $7)"
            " ON CONFLICT (request_key) DO NOTHING",
            sid,
            provider_id,
            asset,
            start,
            end,
            key,
            now,
        )
        row = await tx.fetchrow("SELECT * FROM settlements WHERE request_key = $1", key)
    assert row is not None
    created = bool(inserted)
    sid = row["id"]
    if row["status"] != PROCESSING:
        return Result(row, False)  # the same request again: the same settlement

    reg = await registered_at(store, provider_id)
    bps_sql = policy.sql_bps(reg, "u.created_at")
    total = await count_unsettled(store, provider_id, asset, start, end)
    done = int(
        await store.fetchval("SELECT COUNT(*) FROM settlement_items WHERE settlement_id = $1", sid)
    )
    total += done
    if progress:
        progress(done, total)
    insert_sql = (
        "INSERT INTO settlement_items (usage_id, settlement_id, gross, call_fee, fee_bps, created_at)"
        " SELECT u.id, $5, SUM(t.amount), SUM(CASE WHEN t.kind = 'fee' THEN t.amount ELSE 0 END),"
        f" {bps_sql}, u.created_at"
        + _candidates().replace(
            " FROM usage_records u",
            " FROM usage_records u JOIN transfers t"
            " ON t.usage_id = u.id AND t.kind IN ('charge', 'fee')",
        )
        + " GROUP BY u.id, u.created_at ORDER BY u.created_at, u.id LIMIT $6"
        " ON CONFLICT (usage_id) DO NOTHING"
    )
    while True:
        async with store.transaction() as tx:
            # Lock the settlement row: items are added only while it is
            # processing, and finalizing waits for a chunk in progress.
            if not await tx.execute(
                "UPDATE settlements SET status = status WHERE id = $1 AND status = 'processing'",
                sid,
            ):
                break
            n = await tx.execute(insert_sql, provider_id, asset, start, end, sid, chunk)
        done += n
        if progress:
            progress(min(done, max(total, done)), max(total, done))
        if n == 0:
            # Candidates that another settlement is taking right now conflict and
            # are skipped; look again once that one commits.
            if await count_unsettled(store, provider_id, asset, start, end) == 0:
                break
            await asyncio.sleep(0.05)
    fixed = await _finalize(store, sid, provider_id, asset)
    return Result(fixed, created and fixed is not None)


async def _finalize(store: Store, sid: str, provider_id: str, asset: str) -> Row | None:
    now = now_ms()
    async with store.transaction() as tx:
        claimed = await tx.execute(
            "UPDATE settlements SET status = 'pending', finalized_at = $2 WHERE id = $1 AND status = 'processing'",
            sid,
            now,
        )
        if claimed:
            agg = await tx.fetchrow(
                "SELECT COUNT(*) AS n, COALESCE(SUM(gross), 0) AS gross, COALESCE(SUM(call_fee), 0) AS call_fee,"
                " COALESCE(SUM(gross * fee_bps / 10000), 0) AS fee FROM settlement_items WHERE settlement_id = $1",
                sid,
            )
            assert agg is not None
            n, gross, call_fee, fee = (int(agg[k]) for k in ("n", "gross", "call_fee", "fee"))
            if n == 0:
                await tx.execute("DELETE FROM settlements WHERE id = $1", sid)
                return None
            await tx.execute(
                "UPDATE settlements SET gross = $2, call_fee = $3, fee = $4, net = $5, call_count = $6"
                " WHERE id = $1",
                sid,
                gross,
                call_fee,
                fee,
                gross - fee,
                n,
            )
            await _book_fee_difference(tx, sid, provider_id, asset, fee - call_fee, now)
        return await tx.fetchrow("SELECT * FROM settlements WHERE id = $1", sid)


async def _book_fee_difference(
    tx: Tx, sid: str, provider_id: str, asset: str, diff: int, now: int
) -> None:
    if diff == 0:
        return
    earn, fees = j.earnings(provider_id, asset), j.fees(asset)
    t = (
        Transfer(new_id("tr"), earn, fees, diff, "settlement_fee", f"settlement_fee:{sid}")
        if diff > 0
        else Transfer(new_id("tr"), fees, earn, -diff, "settlement_rebate", f"settlement_fee:{sid}")
    )
    await tx.transfer(t, now=now)


# --------------------------------------------------------------------------- paying, listing


async def pay(store: Store, sid: str, payment_tx: str, decimals: int) -> Row:
    """Post the payout (earnings -> world, net) and mark the settlement completed; once."""
    now = now_ms()
    async with store.transaction() as tx:
        marked = await tx.execute(
            "UPDATE settlements SET status = 'completed', payment_tx = $2, paid_at = $3"
            " WHERE id = $1 AND status = 'pending'",
            sid,
            payment_tx,
            now,
        )
        row = await tx.fetchrow("SELECT * FROM settlements WHERE id = $1", sid)
        if row is None:
            raise BillingError("no such settlement", code="settlement_not_found", status=404)
        if not marked:
            raise _not_payable(row)
        net, provider, asset = int(row["net"]), row["provider_id"], row["asset"]
        if net > 0:
            ok = await tx.transfer(
                Transfer(
                    new_id("tr"),
                    j.earnings(provider, asset),
                    j.world(asset),
                    net,
                    "payout",
                    f"payout:{sid}",
                    payment_id=None,
                ),
                guard=True,
                now=now,
            )
            if (
                not ok
            ):  # cannot happen while every step above is booked; refuse rather than overdraw
                raise BillingError(
                    "the provider's earnings do not cover this payout",
                    code="insufficient_earnings",
                    status=409,
                )
        await enqueue_event(tx, provider, SETTLEMENT_COMPLETED, render(row, decimals), now=now)
    return row


def _not_payable(row: Row) -> BillingError:
    """Why a settlement that is not ``pending`` cannot be paid (a 409)."""
    sid, status, wid = row["id"], row["status"], row["withdrawal_id"]
    if status == COMPLETED:
        how = f"by withdrawal {wid}" if wid else f"outside Tollway ({row['payment_tx']})"
        return BillingError(
            f"settlement {sid} is already paid {how}", code="already_paid", status=409
        )
    if status == PAYING:
        return BillingError(
            f"settlement {sid} is being paid by withdrawal {wid}",
            code="payout_in_progress",
            status=409,
        )
    return BillingError(
        f"settlement {sid} is still being built", code="settlement_processing", status=409
    )


# --------------------------------------------------------------------------- paid by withdrawals


@dataclass(frozen=True, slots=True)
class PayoutPlan:
    """The settlements one withdrawal from earnings pays, and their net (its amount)."""

    settlement_ids: tuple[str, ...]
    amount: int


async def plan_payout(
    store: Store | Tx,
    provider_id: str,
    asset: str,
    *,
    settlement_ids: list[str] | None = None,
    amount: int | None = None,
) -> PayoutPlan:
    """Which unpaid settlements a payout of the provider's earnings pays.

    - ``settlement_ids`` named: exactly those (each the provider's, in this
      asset, pending); ``amount``, if given, must equal their net.
    - else ``amount``: the oldest pending settlements (by creation) whose nets
      add up to exactly ``amount``.
    - neither: the oldest pending settlement with a net above zero (and any
      older zero-net ones).

    Read-only: ``claim_payout`` takes them, atomically, with the debit.
    """
    if settlement_ids:
        ids = list(settlement_ids)
        if len(set(ids)) != len(ids):
            raise BillingError("settlement_ids has duplicates", code="validation_error", status=422)
        if len(ids) > MAX_PAYOUT_SETTLEMENTS:
            raise BillingError(
                f"at most {MAX_PAYOUT_SETTLEMENTS} settlements per payout",
                code="validation_error",
                status=422,
            )
        marks = ", ".join(f"${i + 1}" for i in range(len(ids)))
        rows = {
            r["id"]: r
            for r in await store.fetch(f"SELECT * FROM settlements WHERE id IN ({marks})", *ids)
        }
        for sid in ids:
            r = rows.get(sid)
            if r is None or r["provider_id"] != provider_id or r["asset"] != asset:
                raise BillingError(
                    f"no such settlement: {sid}", code="settlement_not_found", status=404
                )
            if r["status"] != PENDING:
                raise _not_payable(r)
        total = sum(int(rows[sid]["net"]) for sid in ids)
        if amount is not None and amount != total:
            raise BillingError(
                f"amount {amount} is not the net of these settlements ({total})",
                code="amount_mismatch",
                status=422,
            )
        if total <= 0:
            raise BillingError(
                "these settlements have nothing to pay out (net 0): pay them with"
                " PATCH /settlements/{id}/pay",
                code="nothing_to_pay",
                status=409,
            )
        return PayoutPlan(tuple(ids), total)

    pending = await store.fetch(
        "SELECT id, net FROM settlements WHERE provider_id = $1 AND asset = $2 AND status = 'pending'"
        " ORDER BY created_at, id LIMIT $3",
        provider_id,
        asset,
        MAX_PAYOUT_SETTLEMENTS,
    )
    if not pending:
        raise BillingError(
            "no settled-but-unpaid settlement to pay: earnings are paid out only"
            " against settlements",
            code="no_unpaid_settlement",
            status=409,
        )
    target = amount
    if target is None:
        target = next((int(r["net"]) for r in pending if int(r["net"]) > 0), 0)
        if target == 0:
            raise BillingError(
                "the unpaid settlements have nothing to pay out (net 0)",
                code="nothing_to_pay",
                status=409,
            )
    taken: list[str] = []
    total = 0
    for r in pending:
        if total == target:
            break
        taken.append(r["id"])
        total += int(r["net"])
        if total > target:
            break
    if total != target:
        nets = ", ".join(str(int(r["net"])) for r in pending[:5])
        raise BillingError(
            f"no run of the oldest unpaid settlements has a net of exactly {target}"
            f" (their nets, oldest first: {nets}{', ...' if len(pending) > 5 else ''});"
            " name them with settlement_id(s) or withdraw their exact net",
            code="no_matching_settlement",
            status=409,
        )
    return PayoutPlan(tuple(taken), total)


async def claim_payout(
    tx: Tx, provider_id: str, asset: str, withdrawal_id: str, plan: PayoutPlan, now: int
) -> None:
    """Mark the plan's settlements ``paying`` for this withdrawal, in the debit's transaction.

    Raises (so the caller's transaction, debit included, rolls back) when any
    of them is no longer pending: paid or being paid meanwhile by the other path.
    """
    ids = list(plan.settlement_ids)
    marks = ", ".join(f"${i + 4}" for i in range(len(ids)))
    n = await tx.execute(
        f"UPDATE settlements SET status = 'paying', withdrawal_id = $1"
        f" WHERE provider_id = $2 AND asset = $3 AND status = 'pending' AND id IN ({marks})",
        withdrawal_id,
        provider_id,
        asset,
        *ids,
    )
    rows = await tx.fetch(
        f"SELECT * FROM settlements WHERE id IN ({', '.join(f'${i + 1}' for i in range(len(ids)))})",
        *ids,
    )
    if n != len(ids):
        for r in rows:
            if r["withdrawal_id"] != withdrawal_id or r["status"] != PAYING:
                raise _not_payable(r)
        raise BillingError(
            "a settlement of this payout changed meanwhile", code="settlement_changed", status=409
        )
    if sum(int(r["net"]) for r in rows) != plan.amount:  # nets are fixed once pending
        raise BillingError(
            "the settlements' net changed meanwhile", code="settlement_changed", status=409
        )
    for r in rows:
        await tx.execute(
            "INSERT INTO withdrawal_settlements (withdrawal_id, settlement_id, net, created_at)"
            " VALUES ($1, $2, $3, $4)",
            withdrawal_id,
            r["id"],
            int(r["net"]),
            now,
        )


async def complete_payout(
    tx: Tx, withdrawal_id: str, payment_ref: str, now: int, decimals: int
) -> int:
    """The withdrawal's payout was made: its settlements are completed, paid by ``payment_ref``.

    Runs in the transaction that records the payout; queues ``settlement.completed``
    for each. Returns how many it completed (0 for a withdrawal from a wallet).
    """
    rows = await tx.fetch(
        "UPDATE settlements SET status = 'completed', payment_tx = $2, paid_at = $3"
        " WHERE withdrawal_id = $1 AND status = 'paying' RETURNING *",
        withdrawal_id,
        payment_ref,
        now,
    )
    for r in rows:
        await enqueue_event(
            tx, r["provider_id"], SETTLEMENT_COMPLETED, render(r, decimals), now=now
        )
    return len(rows)


async def release_payout(tx: Tx, withdrawal_id: str) -> int:
    """The withdrawal's payout failed: its settlements are unpaid again (in the refund's transaction)."""
    return await tx.execute(
        "UPDATE settlements SET status = 'pending', withdrawal_id = NULL"
        " WHERE withdrawal_id = $1 AND status = 'paying'",
        withdrawal_id,
    )


async def payout_settlement_ids(store: Store, withdrawal_ids: list[str]) -> dict[str, list[str]]:
    """The settlements each withdrawal was made for (empty for a withdrawal from a wallet)."""
    out: dict[str, list[str]] = {w: [] for w in withdrawal_ids}
    if not withdrawal_ids:
        return out
    marks = ", ".join(f"${i + 1}" for i in range(len(withdrawal_ids)))
    for r in await store.fetch(
        f"SELECT withdrawal_id, settlement_id FROM withdrawal_settlements WHERE withdrawal_id IN ({marks})"
        " ORDER BY created_at, settlement_id",
        *withdrawal_ids,
    ):
        out[r["withdrawal_id"]].append(r["settlement_id"])
    return out


async def get(store: Store, sid: str) -> Row | None:
    return await store.fetchrow("SELECT * FROM settlements WHERE id = $1", sid)


async def list_settlements(
    store: Store, *, provider_id: str | None, status: str | None, limit: int
) -> list[Row]:
    where, args = [], []
    if provider_id is not None:
        args.append(provider_id)
        where.append(f"provider_id = ${len(args)}")
    if status is not None:
        args.append(status)
        where.append(f"status = ${len(args)}")
    args.append(limit)
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    return await store.fetch(
        f"SELECT * FROM settlements{cond} ORDER BY created_at DESC, id DESC LIMIT ${len(args)}",
        *args,
    )


def render(r: Row, decimals: int) -> dict[str, Any]:
    gross, fee, net, call_fee = int(r["gross"]), int(r["fee"]), int(r["net"]), int(r["call_fee"])
    return {
        "id": r["id"],
        "provider_id": r["provider_id"],
        "asset": r["asset"],
        "period_start": _iso(int(r["period_start"])),
        "period_end": _iso(int(r["period_end"])),
        "total_amount": format_amount(gross, decimals),
        "platform_fee": format_amount(fee, decimals),
        "net_amount": format_amount(net, decimals),
        "total_units": gross,
        "fee_units": fee,
        "net_units": net,
        # What the call-time split already took, and what settling moved on top.
        "fee_at_call_units": call_fee,
        "fee_adjustment_units": fee - call_fee,
        "call_count": int(r["call_count"]),
        "status": r["status"],
        "payment_tx": r["payment_tx"],
        # The withdrawal that pays or paid it; None when paid outside Tollway.
        "withdrawal_id": r["withdrawal_id"],
        "created_at": _iso(int(r["created_at"])),
        "paid_at": _iso(int(r["paid_at"])) if r["paid_at"] is not None else None,
    }
