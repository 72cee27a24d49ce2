"""Invariant checks over the whole ledger (``tollway ledger verify``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ledger.db import Store
from ledger.journal import now_ms


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def render(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.checked.items()]
        if self.ok:
            lines.append("ledger verify: OK")
        else:
            lines.append(f"ledger verify: {len(self.violations)} violation(s)")
            lines += [f"  - {v}" for v in self.violations]
        return "\n".join(lines)


async def verify(store: Store, *, now: int | None = None, limit: int = 50) -> Report:
    rep = Report()
    now = now or now_ms()

    sums = await store.fetch(
        "SELECT asset, SUM(balance) AS total, COUNT(*) AS n FROM accounts GROUP BY asset"
    )
    for r in sums:
        if int(r["total"] or 0) != 0:
            rep.violations.append(f"asset {r['asset']}: balances sum to {int(r['total'])}, not 0")
    rep.checked["accounts"] = sum(int(r["n"]) for r in sums)

    drift = await store.fetch(
        """
        SELECT a.id, a.balance, COALESCE(c.total, 0) - COALESCE(d.total, 0) AS journal
          FROM accounts a
          LEFT JOIN (SELECT credit_account AS id, SUM(amount) AS total FROM transfers GROUP BY credit_account) c
                 ON c.id = a.id
          LEFT JOIN (SELECT debit_account AS id, SUM(amount) AS total FROM transfers GROUP BY debit_account) d
                 ON d.id = a.id
         WHERE a.balance <> COALESCE(c.total, 0) - COALESCE(d.total, 0)
         LIMIT $1
        """,
        limit,
    )
    for r in drift:
        rep.violations.append(
            f"account {r['id']}: balance {r['balance']} but journal says {int(r['journal'])}"
        )
    orphans = await store.fetch(
        """
        SELECT x.id FROM (SELECT debit_account AS id FROM transfers UNION SELECT credit_account FROM transfers) x
         WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = x.id) LIMIT $1
        """,
        limit,
    )
    for r in orphans:
        rep.violations.append(f"journal names account {r['id']} that has no balance row")
    rep.checked["transfers"] = int(await store.fetchval("SELECT COUNT(*) FROM transfers"))

    negative = await store.fetch(
        "SELECT id, balance FROM accounts WHERE kind = 'wallet' AND balance < 0 LIMIT $1", limit
    )
    for r in negative:
        rep.violations.append(f"wallet {r['id']} is negative: {r['balance']}")

    unposted = await store.fetch(
        """
        SELECT u.id, u.amount, COALESCE(SUM(t.amount), 0) AS posted
          FROM usage_records u
          LEFT JOIN transfers t ON t.usage_id = u.id AND t.kind IN ('charge', 'fee')
         WHERE u.amount > 0
         GROUP BY u.id, u.amount
        HAVING COALESCE(SUM(t.amount), 0) <> u.amount
         LIMIT $1
        """,
        limit,
    )
    for r in unposted:
        rep.violations.append(
            f"usage {r['id']} charged {r['amount']} but its transfers post {int(r['posted'])}"
        )
    rep.checked["usage_records"] = int(await store.fetchval("SELECT COUNT(*) FROM usage_records"))

    stale = await store.fetch(
        "SELECT id, expires_at FROM holds WHERE status = 'pending' AND expires_at < $1 LIMIT $2",
        now,
        limit,
    )
    for r in stale:
        rep.violations.append(
            f"hold {r['id']} still pending {now - int(r['expires_at'])} ms past its expiry"
        )

    held = await store.fetch(
        """
        SELECT a.asset, a.balance, COALESCE(h.total, 0) AS pending
          FROM accounts a
          LEFT JOIN (SELECT asset, SUM(amount) AS total FROM holds WHERE status = 'pending' GROUP BY asset) h
                 ON h.asset = a.asset
         WHERE a.kind = 'holding' AND a.balance <> COALESCE(h.total, 0)
        """
    )
    for r in held:
        rep.violations.append(
            f"holding account for {r['asset']} has {r['balance']} but pending holds total {int(r['pending'])}"
        )
    rep.checked["holds_pending"] = int(
        await store.fetchval("SELECT COUNT(*) FROM holds WHERE status = 'pending'")
    )
    return rep
