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

A refund (``charge.refunded``) or dispute (``charge.dispute.created``) takes the
card money back, once per event (``stripe_events``) and never more than the
payment in total (``card_funds.reversed``): what the wallet still holds goes
back out (wallet -> world, ``card_reversal``) and the part already spent is
recorded as a debt (debt -> world, ``card_reversal_debt``; the owner's ``debt``
account is negative while the money is owed, and every asset still sums to zero).

While an owner owes a debt, the wallet is frozen: withdrawals of both kinds are
refused (403 ``wallet_frozen``), and later credits, card top-ups and chain
deposits, pay the debt first (wallet -> debt, ``debt_repayment``) in the
transaction of the credit, until it is paid. Calls are not refused by a
separate check: the reversal takes the whole balance, so a frozen wallet is at
zero and prepaid calls get 402 until a credit is larger than the debt. Money
of calls in flight at the reversal (pending holds) is not in the balance and
comes back to the wallet if the call is not charged; the next credit pays the
debt with it too.

Lock order: every change to an owner's debt takes the owner's wallet row first
(reversal and repayment alike), so reading the debt while holding that lock
sees a value nobody can change before the commit.
"""

from __future__ import annotations

import datetime as dt

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

    Call it right after a credit, in its transaction; ``ref`` (the payment id)
    makes the repayment's journal key.
    """
    wallet = j.wallet(owner_id, asset)
    await _lock(tx, wallet)
    owed = await debt_owed(tx, owner_id, asset)
    if not owed:
        return 0
    pay = min(owed, await _balance(tx, wallet))
    if pay <= 0:
        return 0
    ok = await tx.transfer(
        Transfer(
            new_id("tr"),
            wallet,
            j.debt(owner_id, asset),
            pay,
            "debt_repayment",
            f"debt_repayment:{ref}",
        ),
        guard=True,
        now=now,
    )
    return pay if ok else 0


# --------------------------------------------------------------------------- reversals


async def reverse_card_payment(
    tx: Tx, payment_intent_id: str, kind: str, amount: int, now: int
) -> str:
    """Take card money back for a refund (``amount``: the charge's cumulative refunded
    amount) or a dispute (the disputed amount); returns the webhook outcome.

    Run it in the transaction that records the event id, so one event acts once.
    """
    column = "refunded" if kind == REFUND else "disputed"
    await tx.execute(
        "INSERT INTO card_funds (payment_intent_id, created_at, updated_at) VALUES ($1, $2, $2)"
        " ON CONFLICT (payment_intent_id) DO NOTHING",
        payment_intent_id,
        now,
    )
    # The highest figure seen wins: Stripe's amount_refunded is a running total
    # and a charge has one dispute, so a repeat or a late older event adds nothing.
    # The UPDATE also locks the row: two reversals of one payment go one by one.
    await tx.execute(
        f"UPDATE card_funds SET {column} = CASE WHEN {column} < $2 THEN $2 ELSE {column} END,"
        " updated_at = $3 WHERE payment_intent_id = $1",
        payment_intent_id,
        amount,
        now,
    )
    return await _apply_reversal(tx, payment_intent_id, now)


async def _apply_reversal(tx: Tx, payment_intent_id: str, now: int) -> str:
    row = await tx.fetchrow(
        "SELECT payment_id, owner_id, asset, amount, refunded, disputed, reversed"
        " FROM card_funds WHERE payment_intent_id = $1",
        payment_intent_id,
    )
    if row is None:
        return "not_a_card_payment"
    if row["payment_id"] is None:
        return "reversal_pending"  # the credit applies it when it comes
    amount, done = int(row["amount"]), int(row["reversed"])
    target = min(amount, int(row["refunded"]) + int(row["disputed"]))
    take = target - done
    if take <= 0:
        return "already_reversed"
    await tx.execute(
        "UPDATE card_funds SET reversed = $2, updated_at = $3 WHERE payment_intent_id = $1",
        payment_intent_id,
        target,
        now,
    )
    owner, asset, payment_id = str(row["owner_id"]), str(row["asset"]), str(row["payment_id"])
    wallet, world = j.wallet(owner, asset), j.world(asset)
    # The wallet first: the lock that guards the owner's debt (see the module notes).
    await _lock(tx, wallet)
    from_wallet = min(take, await _balance(tx, wallet))
    # The target total is new each time (it only grows): a key per reversal step.
    if from_wallet > 0 and not await tx.transfer(
        Transfer(
            new_id("tr"),
            wallet,
            world,
            from_wallet,
            "card_reversal",
            f"card_reversal:{payment_intent_id}:{target}",
            payment_id=payment_id,
        ),
        guard=True,
        now=now,
    ):
        from_wallet = 0
    if take > from_wallet:
        await tx.transfer(
            Transfer(
                new_id("tr"),
                j.debt(owner, asset),
                world,
                take - from_wallet,
                "card_reversal_debt",
                f"card_debt:{payment_intent_id}:{target}",
                payment_id=payment_id,
            ),
            now=now,
        )
    return "reversed"
