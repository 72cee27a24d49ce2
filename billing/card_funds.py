"""Card money: it settles before it can leave, and a refund or chargeback takes it back.

A stolen card can top up a wallet, withdraw the money as USDC and then charge
back. So money that came in by card (a Stripe PaymentIntent credited by
``billing.topups.credit_payment_intent``) pays for calls at once but cannot
leave the wallet, on chain or through Stripe Connect, until it has settled:

- Each card payment has a ``card_funds`` row written with its credit, holding
  when it settles (``card_settle_seconds`` after the credit; a later change of
  the setting applies to later payments). A withdrawal from a wallet may take
  ``balance - unsettled card money`` at most (floored at zero), where unsettled
  card money is what young card payments brought in, less what was already
  taken back from them. Spending on calls comes out of that same balance, so a
  withdrawal never takes card money that is still settling.
- The check runs inside the withdrawal's own ledger transaction, after the
  wallet's account row is locked (``_lock``): two concurrent withdrawals, in
  any number of processes, read the balance one after the other, so they
  cannot both pass on the same money.

Refunds and disputes take the card money back, and give it back when Stripe
does (a refund that failed or was canceled, a dispute won or funds reinstated).
Each refund and dispute is tracked by its Stripe id and status
(``card_reversals``); what is taken back is what they take now, never more than
the payment (``card_funds.reversed``), and each event acts once (``stripe_events``).
Taking back: what the wallet holds goes out (wallet -> world, ``card_reversal``),
what was already spent becomes a debt (debt -> world, ``card_reversal_debt``; the
owner's ``debt`` account is negative while owed, every asset still sums to zero).
Giving back: the debt first (world -> debt, ``card_reinstatement_debt``), then the
wallet (world -> wallet, ``card_reinstatement``).

While an owner owes a debt, the wallet is frozen: withdrawals of both kinds are
refused (403 ``wallet_frozen``), and later credits (card top-ups, chain
deposits, admin credits, Connect payouts given back) pay the debt first
(wallet -> debt, ``debt_repayment``) in the transaction of the credit, until it
is paid. Calls are not refused by a separate check: the reversal takes the
whole balance, so a frozen wallet is at zero and prepaid calls get 402 until a
credit is larger than the debt. Money of calls in flight at the reversal
(pending holds) is not in the balance and comes back to the wallet if the call
is not charged; the next credit pays the debt with it too. (Invoice deposits
are spent on their call at once, so they are left out.)

Lock order: every change to an owner's debt takes the owner's wallet row first
(reversal and repayment alike), so reading the debt while holding that lock
sees a value nobody can change before the commit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

from billing.errors import BillingError
from billing.money import format_amount
from ledger import journal as j
from ledger.db import Tx
from ledger.journal import Account, Transfer, new_id

REFUND = "refund"
DISPUTE = "dispute"


class WalletFrozen(BillingError):
    """The owner owes card money taken back: nothing leaves the wallet until it is paid."""

    status = 403
    code = "wallet_frozen"


class CardFundsSettling(BillingError):
    """The withdrawal would take card money that has not settled yet."""

    status = 409
    code = "card_funds_settling"

    def __init__(self, message: str, *, withdrawable: int, settles_at: int) -> None:
        super().__init__(message)
        self.withdrawable = withdrawable
        self.settles_at = settles_at


# --------------------------------------------------------------------------- reads


async def _lock(tx: Tx, *accounts: Account) -> None:
    # A no-op UPDATE takes the row lock on PostgreSQL, as SELECT ... FOR UPDATE
    # would, in SQL SQLite also runs (its transactions are exclusive already).
    # In id order, as the write-out locks, so writers do not deadlock.
    for acct_id in sorted({a.id for a in accounts}):
        await tx.execute("UPDATE accounts SET balance = balance WHERE id = $1", acct_id)


async def _move(
    tx: Tx,
    debit: Account,
    credit: Account,
    amount: int,
    kind: str,
    key: str,
    now: int,
    *,
    payment_id: str | None = None,
    guard: bool = False,
) -> bool:
    t = Transfer(new_id("tr"), debit, credit, amount, kind, key, payment_id=payment_id)
    return await tx.transfer(t, guard=guard, now=now)


async def _balance(tx: Tx, account: Account) -> int:
    return int(await tx.fetchval("SELECT balance FROM accounts WHERE id = $1", account.id) or 0)


async def debt_owed(tx: Tx, owner_id: str, asset: str) -> int:
    """What the owner owes (zero or more)."""
    return max(0, -(await _balance(tx, j.debt(owner_id, asset))))


async def unsettled(tx: Tx, owner_id: str, asset: str, now: int) -> tuple[int, int]:
    """Card money of the owner still settling, and when the next part of it settles."""
    row = await tx.fetchrow(
        "SELECT COALESCE(SUM(amount - reversed), 0) AS total, MIN(settles_at) AS next"
        " FROM card_funds WHERE owner_id = $1 AND asset = $2 AND settles_at > $3"
        " AND payment_id IS NOT NULL",
        owner_id,
        asset,
        now,
    )
    if row is None:
        return 0, 0
    return int(row["total"] or 0), int(row["next"] or 0)


# --------------------------------------------------------------------------- withdrawals


async def guard_withdrawal(
    tx: Tx, source: Account, counter: Account, amount: int, now: int, decimals: int
) -> None:
    """Refuse a wallet withdrawal that is frozen or would take unsettled card money.

    Call it in the withdrawal's transaction, before its guarded debit of
    ``source`` (to ``counter``, locked together in id order). A withdrawal of
    more than the whole balance is left to that guard (402). Earnings hold no
    card money (settlements leave out charges paid with card money still
    settling), but an owner in debt takes nothing out of them either.
    """
    if source.kind not in ("wallet", "earnings") or source.owner is None:
        return
    owner, asset = source.owner, source.asset
    await _lock(tx, source, counter)
    owed = await debt_owed(tx, owner, asset)
    if owed:
        raise WalletFrozen(
            f"the wallet is frozen: {format_amount(owed, decimals)} {asset} of card money"
            " taken back (refund or dispute) had already been spent; top up to pay it"
        )
    if source.kind != "wallet":
        return
    balance = await _balance(tx, source)
    young, next_at = await unsettled(tx, owner, asset, now)
    withdrawable = max(0, balance - young)
    if young and withdrawable < amount <= balance:
        when = dt.datetime.fromtimestamp(next_at / 1000, tz=dt.UTC).isoformat(timespec="seconds")
        raise CardFundsSettling(
            f"{format_amount(withdrawable, decimals)} {asset} is withdrawable now:"
            f" {format_amount(young, decimals)} {asset} came in by card and is still"
            f" settling (the next part settles at {when})",
            withdrawable=withdrawable,
            settles_at=next_at,
        )


# --------------------------------------------------------------------------- credits


async def card_credited(
    tx: Tx,
    payment_intent_id: str,
    payment_id: str,
    owner_id: str,
    asset: str,
    amount: int,
    settle_ms: int,
    now: int,
) -> None:
    """Record a card payment in the transaction of its one credit (already made).

    Then applies a refund or dispute that arrived before it, and pays the
    owner's debt from the wallet.
    """
    await tx.execute(
        "INSERT INTO card_funds (payment_intent_id, payment_id, owner_id, asset, amount,"
        " settles_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)"
        " ON CONFLICT (payment_intent_id) DO UPDATE SET payment_id = excluded.payment_id,"
        " owner_id = excluded.owner_id, asset = excluded.asset, amount = excluded.amount,"
        " settles_at = excluded.settles_at, updated_at = excluded.updated_at"
        " WHERE card_funds.payment_id IS NULL",
        payment_intent_id,
        payment_id,
        owner_id,
        asset,
        amount,
        now + settle_ms,
        now,
    )
    await _apply_reversal(tx, payment_intent_id, now)
    await settle_debt(tx, owner_id, asset, now, ref=payment_id)


async def settle_debt(tx: Tx, owner_id: str, asset: str, now: int, *, ref: str) -> int:
    """Pay the owner's debt from the wallet, as far as the wallet goes; returns what was paid.

    Call it right after a credit, in its transaction; ``ref`` (the payment id, or
    the credit's transfer id) makes the repayment's journal key, so it must be
    new: call it once per credit, never for a replayed one.
    """
    wallet = j.wallet(owner_id, asset)
    await _lock(tx, wallet)
    owed = await debt_owed(tx, owner_id, asset)
    if not owed:
        return 0
    pay = min(owed, await _balance(tx, wallet))
    if pay <= 0:
        return 0
    debt = j.debt(owner_id, asset)
    ok = await _move(
        tx, wallet, debt, pay, "debt_repayment", f"debt_repayment:{ref}", now, guard=True
    )
    return pay if ok else 0


# --------------------------------------------------------------------------- reversals


class Part(NamedTuple):
    """One refund or dispute of a card payment as an event shows it, in ledger units."""

    part_id: str  # Stripe's id of the refund (re_...) or dispute (dp_...)
    kind: str  # REFUND or DISPUTE
    amount: int  # what the refund or dispute is for
    taken: int  # what it takes back now: 0 once a refund failed or a dispute was won
    status: str
    final: bool  # a status Stripe does not leave (refund failed or canceled, dispute closed)


async def reverse_card_payment(
    tx: Tx,
    payment_intent_id: str,
    now: int,
    *,
    parts: Sequence[Part] = (),
    refunded_total: int | None = None,
) -> str:
    """Record what an event says about the refunds and disputes of a card payment, then
    take back or give back the difference in the ledger; returns the webhook outcome.

    ``refunded_total`` is the charge's ``amount_refunded`` when the event carries it
    (``charge.refunded``): it counts refunds the event does not list. Run it in the
    transaction that records the event id, so one event acts once.
    """
    await tx.execute(
        "INSERT INTO card_funds (payment_intent_id, created_at, updated_at) VALUES ($1, $2, $2)"
        " ON CONFLICT (payment_intent_id) DO NOTHING",
        payment_intent_id,
        now,
    )
    # The UPDATE locks the row first: two events about one payment (any process)
    # go one by one, so each reads the parts the other wrote.
    await tx.execute(
        "UPDATE card_funds SET refunded = CASE WHEN $2 > refunded THEN $2 ELSE refunded END,"
        " updated_at = $3 WHERE payment_intent_id = $1",
        payment_intent_id,
        refunded_total or 0,
        now,
    )
    for part in parts:
        await _record_part(tx, payment_intent_id, part, now)
    back = any(p.taken < p.amount for p in parts)
    outcome = await _apply_reversal(tx, payment_intent_id, now)
    if outcome == "unchanged":
        return "already_reinstated" if back else "already_reversed"
    return outcome


async def _record_part(tx: Tx, payment_intent_id: str, part: Part, now: int) -> None:
    # Stripe does not order events: once a part has ended (refund failed, dispute
    # closed), an older snapshot (still pending, still open) changes nothing; of two
    # closing snapshots, the one with more funds reinstated is the later one.
    await tx.execute(
        "INSERT INTO card_reversals (payment_intent_id, part_id, kind, status, amount, taken,"
        " final, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"
        " ON CONFLICT (payment_intent_id, part_id) DO UPDATE SET status = excluded.status,"
        " amount = excluded.amount, taken = excluded.taken, final = excluded.final,"
        " updated_at = excluded.updated_at WHERE card_reversals.final = 0"
        " OR (excluded.final = 1 AND excluded.taken < card_reversals.taken)",
        payment_intent_id,
        part.part_id,
        part.kind,
        part.status,
        part.amount,
        part.taken,
        1 if part.final else 0,
        now,
    )


async def _target(tx: Tx, payment_intent_id: str, amount: int, refunded: int, disputed: int) -> int:
    """What is to be taken back from the payment now: what its refunds and disputes
    take, never more than the payment."""
    rows = await tx.fetch(
        "SELECT kind, COALESCE(SUM(taken), 0) AS taken, COALESCE(SUM(amount), 0) AS amount"
        " FROM card_reversals WHERE payment_intent_id = $1 GROUP BY kind",
        payment_intent_id,
    )
    by_kind = {str(r["kind"]): (int(r["taken"]), int(r["amount"])) for r in rows}
    total = 0
    # ``refunded`` (the highest amount_refunded seen) and ``disputed`` (what was
    # recorded before parts were tracked, 0012) also count refunds and disputes
    # that are known by no id: whatever of them the known parts do not explain.
    for kind, aggregate in ((REFUND, refunded), (DISPUTE, disputed)):
        taken, known = by_kind.get(kind, (0, 0))
        total += taken + max(0, aggregate - known)
    return min(amount, total)


async def _apply_reversal(tx: Tx, payment_intent_id: str, now: int) -> str:
    row = await tx.fetchrow(
        "SELECT payment_id, owner_id, asset, amount, refunded, disputed, reversed, steps"
        " FROM card_funds WHERE payment_intent_id = $1",
        payment_intent_id,
    )
    if row is None:
        return "not_a_card_payment"
    if row["payment_id"] is None:
        return "reversal_pending"  # the credit applies it when it comes
    amount, done = int(row["amount"]), int(row["reversed"])
    target = await _target(
        tx, payment_intent_id, amount, int(row["refunded"]), int(row["disputed"])
    )
    if target == done:
        return "unchanged"
    # A refund that failed lowers the target again, so a total can repeat: each
    # step of one payment has its own number for its journal keys.
    step = int(row["steps"]) + 1
    await tx.execute(
        "UPDATE card_funds SET reversed = $2, steps = $3, updated_at = $4"
        " WHERE payment_intent_id = $1",
        payment_intent_id,
        target,
        step,
        now,
    )
    owner, asset, payment_id = str(row["owner_id"]), str(row["asset"]), str(row["payment_id"])
    wallet = j.wallet(owner, asset)
    # The wallet first: the lock that guards the owner's debt (see the module notes).
    await _lock(tx, wallet)
    key = f"{payment_intent_id}:s{step}"
    if target > done:
        await _take_back(tx, owner, asset, payment_id, target - done, key, now)
        return "reversed"
    await _give_back(tx, owner, asset, done - target, key, now)
    return "reinstated"


async def _take_back(
    tx: Tx, owner: str, asset: str, payment_id: str, take: int, key: str, now: int
) -> None:
    wallet, world, debt = j.wallet(owner, asset), j.world(asset), j.debt(owner, asset)
    from_wallet = min(take, await _balance(tx, wallet))
    if from_wallet > 0:
        ok = await _move(
            tx,
            wallet,
            world,
            from_wallet,
            "card_reversal",
            f"card_reversal:{key}",
            now,
            payment_id=payment_id,
            guard=True,
        )
        from_wallet = from_wallet if ok else 0
    if take > from_wallet:
        rest = take - from_wallet
        kind = "card_reversal_debt"
        await _move(tx, debt, world, rest, kind, f"card_debt:{key}", now, payment_id=payment_id)


async def _give_back(tx: Tx, owner: str, asset: str, give: int, key: str, now: int) -> None:
    """Money Stripe returned to the platform goes back to the owner: to the debt first.

    No ``payment_id`` on these: a credit out of ``world`` that names a payment is
    that payment's one credit (``ledger verify``), and this is no new payment.
    """
    world, debt = j.world(asset), j.debt(owner, asset)
    to_debt = min(give, await debt_owed(tx, owner, asset))
    if to_debt > 0:
        kind = "card_reinstatement_debt"
        await _move(tx, world, debt, to_debt, kind, f"{kind}:{key}", now)
    if give > to_debt:
        kind = "card_reinstatement"
        await _move(tx, world, j.wallet(owner, asset), give - to_debt, kind, f"{kind}:{key}", now)
