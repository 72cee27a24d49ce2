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
          LEFT JOIN (SELECT asset, SUM(amount - captured) AS total FROM holds
                      WHERE status = 'pending' GROUP BY asset) h
                 ON h.asset = a.asset
         WHERE a.kind = 'holding' AND a.balance <> COALESCE(h.total, 0)
        """
    )
    for r in held:
        rep.violations.append(
            f"holding account for {r['asset']} has {r['balance']} but pending holds total {int(r['pending'])}"
        )
    # A lease's captured is what its batches posted: the charges and fees of its calls.
    leases = await store.fetch(
        """
        SELECT h.id, h.captured, h.amount, COALESCE(SUM(t.amount), 0) AS posted
          FROM holds h
          LEFT JOIN transfers t ON t.hold_id = h.id AND t.kind IN ('charge', 'fee')
         WHERE h.kind = 'lease'
         GROUP BY h.id, h.captured, h.amount
        HAVING COALESCE(SUM(t.amount), 0) <> h.captured OR h.captured > h.amount
         LIMIT $1
        """,
        limit,
    )
    for r in leases:
        rep.violations.append(
            f"lease {r['id']} counts {r['captured']} of {r['amount']} captured"
            f" but its calls post {int(r['posted'])}"
        )
    rep.checked["holds_pending"] = int(
        await store.fetchval("SELECT COUNT(*) FROM holds WHERE status = 'pending'")
    )
    await _verify_payments(store, rep, limit)
    return rep


# -- who owns money: payments and the credits they book ----------------------------

# Statuses of a ``payments`` row for money that was received. Every other status
# books no credit of its own: 'reserved' (an x402 authorization being checked),
# 'failed' and 'unknown' (its settlement did not, or may not, have happened),
# 'conflict' (settled in a transaction another payment had already credited) and
# 'x402_settlement' (the chain transaction of an x402 payment: a reference row
# that keeps the transaction from being claimed again, its credit booked under
# the x402 row). Checking "no credit" for all of them, not a list, keeps a new
# status from crediting unseen.
_RECEIVED = "('credited', 'settled')"

# Transfer kinds that bring money in from outside (chain or card), each booked
# with its payments row in one transaction. Credits from ``world`` that are no
# external payment stay out: 'admin_credit' (an operator's grant) and
# 'connect_payout_reversal' (a payout Stripe refused, so the money never left).
_EXTERNAL_CREDIT_KINDS = "('deposit', 'invoice_deposit', 'x402_deposit', 'stripe_topup')"

# A credit is a transfer out of ``world`` into an account that is not world;
# payment_id ties it to its payments row. Kinds come from the accounts table,
# not from parsing ids (owner ids may contain ':').
_CREDITS = """
    SELECT t.id, t.payment_id, t.asset, t.amount, a.id AS account, a.owner_id
      FROM transfers t
      JOIN accounts d ON d.id = t.debit_account AND d.kind = 'world'
      JOIN accounts a ON a.id = t.credit_account AND a.kind <> 'world'
     WHERE t.payment_id IS NOT NULL
"""


def _json_text(store: Store, column: str, key: str) -> str:
    """SQL for the string ``key`` of the JSON object in TEXT ``column``; NULL when
    absent. A row with malformed JSON must become a violation, not abort verify:
    SQLite checks json_valid first; PostgreSQL 15 has no safe cast from text, so it
    reads the value with a regular expression (ids and tx hashes need no escapes)."""
    if store.kind == "postgres":
        return f'substring({column} from \'"{key}"\\s*:\\s*"([^"]*)"\')'
    return f"CASE WHEN json_valid({column}) THEN json_extract({column}, '$.{key}') END"


async def _verify_payments(store: Store, rep: Report, limit: int) -> None:
    # 1. Money received credits exactly once; every other row never credits.
    counts = await store.fetch(
        f"""
        SELECT p.id, p.rail, p.external_ref, p.status, COALESCE(c.n, 0) AS n
          FROM payments p
          LEFT JOIN (SELECT payment_id, COUNT(*) AS n FROM ({_CREDITS}) x GROUP BY payment_id) c
                 ON c.payment_id = p.id
         WHERE (p.status IN {_RECEIVED} AND COALESCE(c.n, 0) <> 1)
            OR (p.status NOT IN {_RECEIVED} AND COALESCE(c.n, 0) > 0)
         ORDER BY p.id
         LIMIT $1
        """,
        limit,
    )
    for r in counts:
        where = f"payment {r['id']} ({r['rail']}, {r['external_ref']})"
        if r["status"] in ("credited", "settled"):
            rep.violations.append(f"{where} has {int(r['n'])} credits")
        else:
            rep.violations.append(
                f"{where} has {int(r['n'])} credits but its status {r['status']!r} carries none"
            )
    rep.checked["payments"] = int(await store.fetchval("SELECT COUNT(*) FROM payments"))

    # The reference row of an x402 payment's chain transaction points at that
    # payment, which must have been settled for the same money.
    ref = _json_text(store, "s.detail", "x402_payment")
    settlements = await store.fetch(
        f"""
        SELECT s.id, s.rail, s.external_ref, {ref} AS x402_payment, x.id AS found,
               x.rail AS x_rail, x.status AS x_status, s.asset, s.amount,
               x.asset AS x_asset, x.amount AS x_amount
          FROM payments s
          LEFT JOIN payments x ON x.id = {ref}
         WHERE s.status = 'x402_settlement'
           AND (x.id IS NULL OR x.rail <> 'x402' OR x.status <> 'settled'
                OR x.asset <> s.asset OR x.amount <> s.amount)
         ORDER BY s.id
         LIMIT $1
        """,
        limit,
    )
    for r in settlements:
        where = f"x402 settlement {r['id']} ({r['rail']}, {r['external_ref']})"
        if r["found"] is None:
            rep.violations.append(
                f"{where} names x402 payment {r['x402_payment']} that does not exist"
            )
        else:
            rep.violations.append(
                f"{where} for {r['amount']} {r['asset']} names {r['x_rail']} payment"
                f" {r['found']} ({r['x_status']}) for {r['x_amount']} {r['x_asset']}"
            )
    rep.checked["x402_settlements"] = int(
        await store.fetchval("SELECT COUNT(*) FROM payments WHERE status = 'x402_settlement'")
    )

    # ... and no other payment credits that same transaction: the reference row
    # is written with ON CONFLICT DO NOTHING, so a deposit or invoice that
    # claimed the transaction first would leave two credits for one transfer.
    # Every rail stores chain transaction hashes in lower case, so the stored
    # column is compared as it is (an index or SQLite's automatic one can serve).
    tx = _json_text(store, "x.detail", "tx")
    twice = await store.fetch(
        f"""
        SELECT x.id, {tx} AS tx, o.id AS other, o.rail
          FROM payments x
          JOIN payments o ON o.external_ref = LOWER({tx}) AND o.id <> x.id
         WHERE x.rail = 'x402' AND x.status = 'settled' AND o.status IN {_RECEIVED}
         ORDER BY x.id
         LIMIT $1
        """,
        limit,
    )
    for r in twice:
        rep.violations.append(
            f"x402 payment {r['id']} settled by transaction {r['tx']},"
            f" which payment {r['other']} ({r['rail']}) also credits"
        )

    # 2. Money from chain or card is credited only with its payments row.
    orphans = await store.fetch(
        f"""
        SELECT t.id, t.kind FROM transfers t
         WHERE t.kind IN {_EXTERNAL_CREDIT_KINDS}
           AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = t.payment_id)
         ORDER BY t.id
         LIMIT $1
        """,
        limit,
    )
    for r in orphans:
        rep.violations.append(f"credit {r['id']} of kind {r['kind']} has no payments row")
    rep.checked["external_credits"] = int(
        await store.fetchval(
            f"SELECT COUNT(*) FROM transfers WHERE kind IN {_EXTERNAL_CREDIT_KINDS}"
        )
    )

    # 3. A payment credits the owner it names, in its asset and amount. One
    # older form is the same owner: x402 rows written before payers were bound
    # named the payer's bare address and credited its derived owner
    # 'x402:<address>' (no migration rewrote them); today they name the owner.
    same_owner = (
        "(c.owner_id = p.owner_id OR (p.rail = 'x402' AND c.owner_id = 'x402:' || p.owner_id))"
    )
    owners = await store.fetch(
        f"""
        SELECT c.id, c.payment_id, c.owner_id AS credited, c.asset, c.amount,
               p.owner_id AS named, p.asset AS p_asset, p.amount AS p_amount,
               CASE WHEN {same_owner} THEN 1 ELSE 0 END AS owner_ok
          FROM ({_CREDITS}) c
          JOIN payments p ON p.id = c.payment_id
         WHERE c.owner_id IS NULL OR p.owner_id IS NULL OR NOT {same_owner}
            OR c.asset <> p.asset OR c.amount <> p.amount
         ORDER BY c.id
         LIMIT $1
        """,
        limit,
    )
    for r in owners:
        if not r["owner_ok"]:
            rep.violations.append(
                f"payment {r['payment_id']} names owner {r['named']} but credits {r['credited']}"
            )
        else:
            rep.violations.append(
                f"payment {r['payment_id']} is for {r['p_amount']} {r['p_asset']}"
                f" but credit {r['id']} books {r['amount']} {r['asset']}"
            )
    rep.checked["payment_credits"] = int(
        await store.fetchval(f"SELECT COUNT(*) FROM ({_CREDITS}) c")
    )
