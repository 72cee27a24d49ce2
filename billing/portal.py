"""Queries behind the provider portal.

Every figure is read from the journal (transfers, account balances) and the
usage records, never from counters kept on the side, so the portal cannot
drift from what ``tollway ledger verify`` checks. Amounts are integers here;
the route formats them.

Definitions (per provider and asset):

- ``revenue``: what buyers paid for the provider's calls, the sum of charged
  usage amounts (equal, by the ledger's invariant, to the ``charge`` + ``fee``
  transfers of those calls);
- ``balance``: the provider's earnings account, what is owed and not paid out;
- ``earned``: everything credited to earnings: call-time shares (``charge``)
  corrected by settlement fee adjustments;
- ``paid_out``: ``earned - balance``, whatever left earnings; every way out
  pays settlements (PATCH pay, or a withdrawal on chain or through Connect),
  so it equals ``settlement_payouts`` (completed settlements) plus payouts
  still in flight (settlements ``paying``);
- ``unsettled``: the provider share (``charge`` transfers) of charges no
  settlement holds yet;
- ``settled_unpaid``: net of settlements fixed but not yet paid.

Since settlement payouts are the only way out of earnings, these satisfy
``balance == unsettled + settled_unpaid`` (tested).
"""

from __future__ import annotations

from typing import Any

from ledger import journal as j
from ledger.db import Store

DAY_MS = 86_400_000


def _i(v: Any) -> int:
    return int(v or 0)


async def usage_totals(
    store: Store, provider_id: str, asset: str, service_id: str | None = None
) -> dict[str, Any]:
    args: list[Any] = [provider_id, asset]
    cond = ""
    if service_id is not None:
        args.append(service_id)
        cond = " AND service_id = $3"
    r = await store.fetchrow(
        "SELECT COUNT(*) AS calls,"
        " COALESCE(SUM(CASE WHEN amount > 0 THEN 1 ELSE 0 END), 0) AS charged_calls,"
        " COALESCE(SUM(amount), 0) AS revenue,"
        " COALESCE(SUM(CASE WHEN upstream_status IS NOT NULL AND upstream_status < 500 THEN 1 ELSE 0 END), 0)"
        " AS served,"
        " AVG(latency_ms) AS avg_latency, COUNT(DISTINCT buyer_id) AS buyers,"
        " MIN(created_at) AS first_call, MAX(created_at) AS last_call"
        f" FROM usage_records WHERE provider_id = $1 AND asset = $2{cond}",
        *args,
    )
    assert r is not None
    calls = _i(r["calls"])
    return {
        "calls": calls,
        "charged_calls": _i(r["charged_calls"]),
        "revenue": _i(r["revenue"]),
        "served": _i(r["served"]),
        "success_rate": round(100.0 * _i(r["served"]) / calls, 2) if calls else None,
        "avg_latency_ms": None if r["avg_latency"] is None else round(float(r["avg_latency"]), 1),
        "unique_buyers": _i(r["buyers"]),
        "first_call": None if r["first_call"] is None else int(r["first_call"]),
        "last_call": None if r["last_call"] is None else int(r["last_call"]),
    }


async def per_service(store: Store, provider_id: str, asset: str) -> dict[str, dict[str, Any]]:
    rows = await store.fetch(
        "SELECT service_id, COUNT(*) AS calls,"
        " COALESCE(SUM(CASE WHEN amount > 0 THEN 1 ELSE 0 END), 0) AS charged_calls,"
        " COALESCE(SUM(amount), 0) AS revenue,"
        " COALESCE(SUM(CASE WHEN upstream_status IS NOT NULL AND upstream_status < 500 THEN 1 ELSE 0 END), 0)"
        " AS served, AVG(latency_ms) AS avg_latency"
        " FROM usage_records WHERE provider_id = $1 AND asset = $2 GROUP BY service_id",
        provider_id,
        asset,
    )
    out = {}
    for r in rows:
        calls = _i(r["calls"])
        out[r["service_id"]] = {
            "calls": calls,
            "charged_calls": _i(r["charged_calls"]),
            "revenue": _i(r["revenue"]),
            "success_rate": round(100.0 * _i(r["served"]) / calls, 2) if calls else None,
            "avg_latency_ms": None
            if r["avg_latency"] is None
            else round(float(r["avg_latency"]), 1),
        }
    return out


async def daily(store: Store, service_id: str, asset: str, since_ms: int) -> list[dict[str, Any]]:
    """Calls and revenue per UTC day since ``since_ms`` (days without calls are left out)."""
    rows = await store.fetch(
        "SELECT created_at / 86400000 AS day, COUNT(*) AS calls,"
        " COALESCE(SUM(CASE WHEN amount > 0 THEN 1 ELSE 0 END), 0) AS charged_calls,"
        " COALESCE(SUM(amount), 0) AS revenue"
        " FROM usage_records WHERE service_id = $1 AND asset = $2 AND created_at >= $3"
        " GROUP BY created_at / 86400000 ORDER BY 1",
        service_id,
        asset,
        since_ms,
    )
    return [
        {
            "day": _i(r["day"]),
            "calls": _i(r["calls"]),
            "charged_calls": _i(r["charged_calls"]),
            "revenue": _i(r["revenue"]),
        }
        for r in rows
    ]


async def earnings(store: Store, provider_id: str, asset: str) -> dict[str, int]:
    acct = j.earnings(provider_id, asset).id
    async with store.reader() as tx:
        balance = _i(await tx.fetchval("SELECT balance FROM accounts WHERE id = $1", acct))
        # Earned: call-time shares, corrected by settlement fee adjustments. Whatever
        # else left the account was paid out, by settlement payouts or by any other
        # payout path (withdrawals, Connect payouts), net of their reversals.
        credited = _i(
            await tx.fetchval(
                "SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE credit_account = $1"
                " AND kind IN ('charge', 'settlement_rebate')",
                acct,
            )
        )
        adjusted = _i(
            await tx.fetchval(
                "SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE debit_account = $1 AND kind = 'settlement_fee'",
                acct,
            )
        )
        unsettled = _i(
            await tx.fetchval(
                "SELECT COALESCE(SUM(t.amount), 0) FROM transfers t"
                " WHERE t.credit_account = $1 AND t.kind = 'charge'"
                " AND NOT EXISTS (SELECT 1 FROM settlement_items s WHERE s.usage_id = t.usage_id)",
                acct,
            )
        )
        srow = await tx.fetchrow(
            "SELECT COALESCE(SUM(CASE WHEN status = 'pending' THEN net ELSE 0 END), 0) AS unpaid,"
            " COALESCE(SUM(CASE WHEN status = 'completed' THEN net ELSE 0 END), 0) AS paid,"
            " COALESCE(SUM(CASE WHEN status <> 'processing' THEN gross ELSE 0 END), 0) AS gross,"
            " COALESCE(SUM(CASE WHEN status <> 'processing' THEN fee ELSE 0 END), 0) AS fee,"
            " COUNT(*) AS n"
            " FROM settlements WHERE provider_id = $1 AND asset = $2",
            provider_id,
            asset,
        )
    assert srow is not None
    return {
        "balance": balance,
        "earned": credited - adjusted,
        "paid_out": credited - adjusted - balance,
        # Settlements paid by any path (PATCH pay, an on-chain or Connect withdrawal).
        "settlement_payouts": _i(srow["paid"]),
        "unsettled": unsettled,
        "settled_unpaid": _i(srow["unpaid"]),
        "settled_paid": _i(srow["paid"]),
        "settled_gross": _i(srow["gross"]),
        "settled_fee": _i(srow["fee"]),
        "settlements": _i(srow["n"]),
    }


async def onboarding(store: Store, provider_id: str) -> dict[str, bool]:
    async with store.reader() as tx:
        keys = _i(
            await tx.fetchval(
                "SELECT COUNT(*) FROM api_keys WHERE owner_id = $1 AND status = 'active'",
                provider_id,
            )
        )
        services = _i(
            await tx.fetchval(
                "SELECT COUNT(*) FROM services WHERE provider_id = $1 AND status <> 'removed'",
                provider_id,
            )
        )
        active = _i(
            await tx.fetchval(
                "SELECT COUNT(*) FROM services WHERE provider_id = $1 AND status = 'active'",
                provider_id,
            )
        )
        traffic = await tx.fetchval(
            "SELECT 1 FROM usage_records WHERE provider_id = $1 LIMIT 1", provider_id
        )
        settled = await tx.fetchval(
            "SELECT 1 FROM settlements WHERE provider_id = $1 AND status <> 'processing' LIMIT 1",
            provider_id,
        )
    return {
        "create_api_key": keys > 0,
        "register_service": services > 0,
        "activate_service": active > 0,
        "first_traffic": traffic is not None,
        "first_settlement": settled is not None,
    }
