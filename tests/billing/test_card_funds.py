"""Card money (issue 10) end to end, on SQLite and PostgreSQL: Stripe top-ups through
the local Stripe API (webhooks signed as Stripe signs them), deposits and withdrawals
on the in-process EVM chain over JSON-RPC, Connect payouts through the Stripe stand-in.

- card money pays for calls at once, but leaves a wallet (on chain or by Connect)
  only once it has settled (``card_settle_seconds``); a wallet funded by chain and
  card can send the chain part; concurrent withdrawals never take more than that;
- ``charge.refunded`` and ``charge.dispute.created`` take the card money back, once
  per event and never more than the charge: the wallet goes to zero, what was
  already spent is a debt, the wallet is frozen for withdrawals until later credits
  (card, chain, admin, a Connect payout given back) have paid the debt;
- a won dispute (``charge.dispute.closed``, ``.funds_reinstated``) and a failed or
  canceled refund give the money back, the debt first, once, never more than taken;
- ``ledger verify`` is clean after each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from ledger import journal as j
from tests.billing.test_topups import (
    UNITS_PER_CENT,
    assert_ledger_clean,
    deliver,
    stripe_settings,
    wallet_units,
)
from tests.billing.test_wallets import (
    USDC,
    claim,
    deposit_address,
    evm_settings,
    hot_wallet,
    usdc,
)
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer
from tests.support.stripe_server import StripeServer, stripe_server_fixture
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream

# Fixtures used here, registered by importing them.
__all__ = ["deposit_address", "hot_wallet", "stripe_server_fixture", "usdc"]

Start = Callable[..., Awaitable[InProcess]]


@pytest.fixture
async def start(
    db_url: str,
    tmp_path,
    node: JsonRpcServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    hot_wallet: LocalAccount,
    stripe_server: StripeServer,
) -> AsyncIterator[Start]:
    """Starts Tollway with EVM wallets and Stripe, plus the given settings."""
    started: list[InProcess] = []

    async def _start(**settings: Any) -> InProcess:
        t = await start_inprocess(
            db_url,
            tmp=str(tmp_path),
            **evm_settings(node, chain, usdc, deposit_address, hot_wallet),
            **stripe_settings(stripe_server),
            **settings,
        )
        started.append(t)
        return t

    yield _start
    for t in started:
        await t.close()


class Owner:
    """A provider-role owner (so Connect works) with a wallet fed by card and chain."""

    def __init__(
        self,
        tw: InProcess,
        server: StripeServer,
        chain: EvmChain,
        usdc: str,
        deposit: str,
        owner: str,
        key: str,
    ) -> None:
        self.tw, self.server, self.chain, self.usdc, self.deposit_to = (
            tw,
            server,
            chain,
            usdc,
            deposit,
        )
        self.owner, self.key = owner, key
        self.recipient = Account.create().address

    @classmethod
    async def make(
        cls,
        tw: InProcess,
        server: StripeServer,
        chain: EvmChain,
        usdc: str,
        deposit: str,
        owner: str,
    ) -> Owner:
        key = await tw.key(owner, "provider")
        st, body, _ = await tw.api("POST", "/api/v1/stripe/connect", key)
        assert st == 201, body
        server.complete_onboarding(body["account_id"])
        return cls(tw, server, chain, usdc, deposit, owner, key)

    async def checkout(self, amount: str) -> tuple[str, dict]:
        """A paid Checkout top-up whose webhook is not delivered yet: (PaymentIntent, event)."""
        st, body, _ = await self.tw.api(
            "POST", "/api/v1/wallet/topup", self.key, json={"amount": amount}
        )
        assert st == 201, body
        pi = self.server.complete_checkout(body["session_id"])
        return pi["id"], self.server.checkout_completed_event(body["session_id"])

    async def chain_deposit(self, units: int) -> None:
        payer = self.chain.new_account()
        self.chain.mint(self.usdc, payer.address, units)
        tx = self.chain.transfer_token(self.usdc, payer, self.deposit_to, units)
        st, body, _ = await self.tw.api(
            "POST",
            "/api/v1/wallet/deposit",
            self.key,
            json={"tx_hash": tx, "signature": claim(self.owner, tx, payer)},
        )
        assert st == 201 and body["amount_units"] == units, body

    async def withdraw(self, amount: str, method: str = "onchain") -> tuple[int, dict]:
        body: dict[str, Any] = {"amount": amount, "method": method}
        if method == "onchain":
            body["to_address"] = self.recipient
        st, data, _ = await self.tw.api("POST", "/api/v1/wallet/withdraw", self.key, json=body)
        return st, data

    async def wallet(self) -> int:
        return await wallet_units(self.tw, self.owner)

    async def debt(self) -> int:
        v = await self.tw.rt.store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.debt(self.owner, "USDC").id
        )
        return -int(v or 0)

    def sent_on_chain(self) -> int:
        return self.chain.token_balance(self.usdc, self.recipient)

    def sent_by_connect(self) -> int:
        """Cents transferred to Connect accounts, as ledger units."""
        return sum(t["amount"] for t in self.server.transfers.values()) * UNITS_PER_CENT

    async def refunded_event(self, pi: str, cents: int | None = None) -> dict:
        self.server.refund(pi, cents)
        return self.server.charge_refunded_event(pi)

    async def deliver(self, event: dict) -> str:
        st, data = await deliver(self.tw, *self.server.signed(event))
        assert st == 200, data
        return data["outcome"]

    async def topup(self, amount: str) -> str:
        """A paid Checkout top-up, credited by its webhook; returns the PaymentIntent id."""
        pi, event = await self.checkout(amount)
        assert await self.deliver(event) == "credited"
        return pi


async def priced_service(tw: InProcess, upstream: Upstream, price: str = "1.00") -> str:
    prov = await tw.key("svc_provider", "provider")
    return await tw.service(prov, upstream.url, price=price)


async def spend(tw: InProcess, owner: Owner, service: str, calls: int) -> None:
    for _ in range(calls):
        st, body, _ = await tw.call(service, "ok", owner.key)
        assert st == 200, body


def settling(st: int, data: dict, withdrawable: int) -> bool:
    err = data.get("error") or {}
    return (
        st == 409
        and err.get("code") == "card_funds_settling"
        and err.get("withdrawable_units") == withdrawable
        and f"{err.get('withdrawable')} USDC is withdrawable now" in err.get("message", "")
    )


def frozen(st: int, data: dict) -> bool:
    return st == 403 and (data.get("error") or {}).get("code") == "wallet_frozen"


async def kinds_total(tw: InProcess, kind: str) -> int:
    v = await tw.rt.store.fetchval("SELECT SUM(amount) FROM transfers WHERE kind = $1", kind)
    return int(v or 0)


# --------------------------------------------------------------------------- settling


async def test_card_money_leaves_neither_on_chain_nor_by_connect_until_it_settles(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start(card_settle_seconds=2)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "cardy")
    await o.topup("5.00")
    for method in ("onchain", "stripe_connect"):
        st, data = await o.withdraw("1.00", method)
        assert settling(st, data, 0), data
    assert (o.sent_on_chain(), o.sent_by_connect()) == (0, 0)
    assert stripe_server.requests_to("POST", "/v1/transfers") == []
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM withdrawals") == 0
    # It pays for calls at once.
    service = await priced_service(tw, upstream)
    await spend(tw, o, service, 1)
    assert await o.wallet() == 4 * USDC
    # More than the whole balance is the balance's refusal, as before.
    st, data = await o.withdraw("9.00")
    assert st == 402 and data["error"]["code"] == "insufficient_balance", data
    await assert_ledger_clean(tw)

    # Once settled (a real clock, two seconds) it can leave both ways.
    st, data = await o.withdraw("1.00")
    await asyncio.sleep(max(0.0, data["error"]["settles_at"] / 1000 - time.time()) + 0.2)
    st, data = await o.withdraw("1.00")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    st, data = await o.withdraw("1.50", "stripe_connect")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    assert (o.sent_on_chain(), o.sent_by_connect()) == (USDC, 1_500_000)
    assert await o.wallet() == 1_500_000
    await assert_ledger_clean(tw)


async def test_chain_deposit_plus_card_topup_can_withdraw_the_chain_part_only(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start()  # the default period: a week
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "mixed")
    await o.chain_deposit(3 * USDC)
    await o.topup("5.00")
    for method in ("onchain", "stripe_connect"):
        st, data = await o.withdraw("3.50", method)
        assert settling(st, data, 3 * USDC), data
        assert "5.00 USDC came in by card" in data["error"]["message"]
    # Spending comes out of the same balance: what can leave shrinks with it.
    service = await priced_service(tw, upstream)
    await spend(tw, o, service, 2)
    st, data = await o.withdraw("1.50")
    assert settling(st, data, USDC), data
    st, data = await o.withdraw("0.60")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    st, data = await o.withdraw("0.40", "stripe_connect")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    st, data = await o.withdraw("0.01")
    assert settling(st, data, 0), data
    assert (o.sent_on_chain(), o.sent_by_connect()) == (600_000, 400_000)
    assert await o.wallet() == 5 * USDC
    await assert_ledger_clean(tw)


async def test_concurrent_withdrawals_cannot_exceed_the_withdrawable_amount(
    start: Start, stripe_server: StripeServer, chain: EvmChain, usdc: str, deposit_address: str
) -> None:
    tw = await start()
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "racer")
    await o.chain_deposit(3 * USDC)
    await o.topup("5.00")
    results = await asyncio.gather(
        *(o.withdraw("1.00", m) for m in ["onchain", "stripe_connect"] * 6)
    )
    statuses = sorted(st for st, _ in results)
    assert statuses == [200] * 3 + [409] * 9, results
    for st, data in results:
        if st == 409:
            assert data["error"]["code"] == "card_funds_settling", data
    # The chain and Stripe prove it: 3.00 left in all, the card's 5.00 stayed.
    assert o.sent_on_chain() + o.sent_by_connect() == 3 * USDC
    assert await o.wallet() == 5 * USDC
    await assert_ledger_clean(tw)


# --------------------------------------------------------------------------- refunds and disputes


async def test_refund_after_spending_records_the_debt_freezes_and_credits_pay_it_first(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    # No settling period here, so what stops a withdrawal below is the freeze alone.
    tw = await start(card_settle_seconds=0)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "refundee")
    service = await priced_service(tw, upstream)
    pi = await o.topup("10.00")
    await spend(tw, o, service, 3)
    assert await o.wallet() == 7 * USDC

    refunded = await o.refunded_event(pi)
    assert await o.deliver(refunded) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 3 * USDC)
    assert await kinds_total(tw, "card_reversal") == 7 * USDC
    assert await kinds_total(tw, "card_reversal_debt") == 3 * USDC
    # Frozen: nothing leaves, and with the balance at zero prepaid calls get 402.
    for method in ("onchain", "stripe_connect"):
        assert frozen(*(await o.withdraw("0.01", method)))
    assert (await tw.call(service, "ok", o.key))[0] == 402
    await assert_ledger_clean(tw)

    # The same event again (Stripe retries), or a new event about the same refund,
    # takes nothing more.
    assert await o.deliver(refunded) == "duplicate"
    again = stripe_server.charge_refunded_event(pi)
    assert await o.deliver(again) == "already_reversed"
    assert (await o.wallet(), await o.debt()) == (0, 3 * USDC)
    # No payments rows for reversals: the one card payment's row only.
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM payments") == 1

    # Later credits pay the debt first: a chain deposit, then a card top-up.
    await o.chain_deposit(USDC)
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    assert frozen(*(await o.withdraw("0.01")))
    await o.topup("5.00")
    assert (await o.wallet(), await o.debt()) == (3 * USDC, 0)
    assert await kinds_total(tw, "debt_repayment") == 3 * USDC
    # Paid: unfrozen.
    st, data = await o.withdraw("1.00")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    st, data = await o.withdraw("1.00", "stripe_connect")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    assert await o.wallet() == USDC
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM payments") == 3
    await assert_ledger_clean(tw)


async def test_dispute_after_spending_records_the_debt_and_freezes_the_wallet(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start()
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "disputer")
    service = await priced_service(tw, upstream)
    await o.chain_deposit(2 * USDC)
    pi = await o.topup("4.00")
    await spend(tw, o, service, 1)
    assert await o.wallet() == 5 * USDC

    # An inquiry withdraws no funds: nothing happens yet.
    inquiry = stripe_server.open_dispute(pi, status="warning_needs_response")
    assert await o.deliver(stripe_server.dispute_created_event(inquiry["id"])) == "ignored"
    dispute = stripe_server.open_dispute(pi)
    event = stripe_server.dispute_created_event(dispute["id"])
    assert await o.deliver(event) == "reversed"
    # The chargeback takes the whole balance (chain money too) up to the charge:
    # 4.00 of 5.00, so nothing was owed.
    assert (await o.wallet(), await o.debt()) == (USDC, 0)
    assert await o.deliver(event) == "duplicate"
    await spend(tw, o, service, 1)
    await assert_ledger_clean(tw)

    # Now one that was spent: a second card payment, spent, then disputed.
    pi2 = await o.topup("3.00")
    await spend(tw, o, service, 2)
    assert await o.wallet() == USDC
    dispute2 = stripe_server.open_dispute(pi2)
    assert await o.deliver(stripe_server.dispute_created_event(dispute2["id"])) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    for method in ("onchain", "stripe_connect"):
        assert frozen(*(await o.withdraw("0.01", method)))
    assert (await tw.call(service, "ok", o.key))[0] == 402
    await assert_ledger_clean(tw)

    # A top-up pays the debt first and unfreezes; its remainder is card money,
    # which settles before it can leave (the default week).
    await o.topup("2.50")
    assert (await o.wallet(), await o.debt()) == (500_000, 0)
    st, data = await o.withdraw("0.50")
    assert settling(st, data, 0), data
    assert (o.sent_on_chain(), o.sent_by_connect()) == (0, 0)
    await assert_ledger_clean(tw)


async def test_refund_then_dispute_of_one_charge_never_take_back_more_than_the_charge(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start()
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "twice")
    service = await priced_service(tw, upstream)
    pi = await o.topup("10.00")
    # Two partial refunds; Stripe's amount_refunded is their running total.
    first = await o.refunded_event(pi, 400)
    second = await o.refunded_event(pi, 100)
    assert await o.deliver(second) == "reversed"  # out of order: the later one first
    assert await o.wallet() == 5 * USDC
    assert await o.deliver(first) == "already_reversed"
    assert await o.wallet() == 5 * USDC
    await spend(tw, o, service, 2)
    # Then a dispute of the whole charge: only what is left of it can come back.
    dispute = stripe_server.open_dispute(pi)
    assert await o.deliver(stripe_server.dispute_created_event(dispute["id"])) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    # Another dispute event and a full refund on top: nothing more.
    dispute_b = stripe_server.open_dispute(pi)
    assert await o.deliver(stripe_server.dispute_created_event(dispute_b["id"])) == (
        "already_reversed"
    )
    assert await o.deliver(await o.refunded_event(pi)) == "already_reversed"
    taken = await kinds_total(tw, "card_reversal") + await kinds_total(tw, "card_reversal_debt")
    assert taken == 10 * USDC
    row = await tw.rt.store.fetchrow(
        "SELECT amount, reversed FROM card_funds WHERE payment_intent_id = $1", pi
    )
    assert (row["amount"], row["reversed"]) == (10 * USDC, 10 * USDC)
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    await assert_ledger_clean(tw)


async def test_a_refund_that_arrives_before_its_credit_is_applied_by_the_credit(
    start: Start, stripe_server: StripeServer, chain: EvmChain, usdc: str, deposit_address: str
) -> None:
    tw = await start()
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "early")
    pi, completed = await o.checkout("6.00")
    # Stripe does not order events: the refund's may come before the payment's.
    assert await o.deliver(await o.refunded_event(pi, 250)) == "reversal_pending"
    assert await o.wallet() == 0
    assert await o.deliver(completed) == "credited"
    assert (await o.wallet(), await o.debt()) == (3_500_000, 0)
    assert await o.deliver(stripe_server.payment_intent_succeeded_event(pi)) == ("already_credited")
    assert await o.wallet() == 3_500_000
    await assert_ledger_clean(tw)
    # A refund that failed before the credit came takes nothing when it comes.
    pi2, completed2 = await o.checkout("2.00")
    assert await o.deliver(await o.refunded_event(pi2)) == "reversal_pending"
    refund_id = latest_refund(stripe_server, pi2)
    stripe_server.fail_refund(refund_id)
    assert await o.deliver(stripe_server.refund_event(refund_id)) == "reversal_pending"
    assert await o.deliver(completed2) == "credited"
    assert (await o.wallet(), await o.debt()) == (5_500_000, 0)
    assert await card_row(tw, pi2) == (2 * USDC, 0)
    assert await kinds_total(tw, "card_reinstatement") == 0
    await assert_ledger_clean(tw)


# --------------------------------------------------------------------------- money given back


def latest_refund(server: StripeServer, pi: str) -> str:
    charge = server.charges[server.payment_intents[pi]["latest_charge"]]
    return charge["refunds"]["data"][0]["id"]


async def card_row(tw: InProcess, pi: str) -> tuple[int, int]:
    row = await tw.rt.store.fetchrow(
        "SELECT amount, reversed FROM card_funds WHERE payment_intent_id = $1", pi
    )
    return int(row["amount"]), int(row["reversed"])


@pytest.mark.parametrize(
    "first,second",
    [
        ("charge.dispute.closed", "charge.dispute.funds_reinstated"),
        ("charge.dispute.funds_reinstated", "charge.dispute.closed"),
    ],
)
async def test_won_dispute_after_spending_pays_the_debt_first_then_the_wallet_once(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
    first: str,
    second: str,
) -> None:
    tw = await start(card_settle_seconds=0)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "winner")
    service = await priced_service(tw, upstream)
    pi = await o.topup("10.00")
    await spend(tw, o, service, 3)
    dispute = stripe_server.open_dispute(pi)
    created = stripe_server.dispute_created_event(dispute["id"])
    assert await o.deliver(created) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 3 * USDC)
    # A chain deposit pays part of the debt meanwhile.
    await o.chain_deposit(USDC)
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    assert frozen(*(await o.withdraw("0.01")))
    await assert_ledger_clean(tw)

    # The merchant wins: Stripe reinstates the 10.00. The 2.00 still owed is paid
    # from it first, the wallet gets the rest: 10 - 3 spent + 1 deposited.
    stripe_server.close_dispute(dispute["id"], won=True)
    won = stripe_server.dispute_event(dispute["id"], first)
    assert await o.deliver(won) == "reinstated"
    assert (await o.wallet(), await o.debt()) == (8 * USDC, 0)
    assert await kinds_total(tw, "card_reinstatement_debt") == 2 * USDC
    assert await kinds_total(tw, "card_reinstatement") == 8 * USDC
    assert await card_row(tw, pi) == (10 * USDC, 0)
    await assert_ledger_clean(tw)

    # Once: the same delivery again, the other event of the win, and the opening
    # event delivered late (Stripe does not order events) give or take nothing.
    assert await o.deliver(won) == "duplicate"
    assert await o.deliver(stripe_server.dispute_event(dispute["id"], second)) == (
        "already_reinstated"
    )
    assert await o.deliver(
        stripe_server.make_event(created["type"], created["data"]["object"])
    ) == ("already_reversed")
    assert (await o.wallet(), await o.debt()) == (8 * USDC, 0)
    assert await kinds_total(tw, "card_reinstatement") == 8 * USDC
    # Unfrozen: it can leave again (no settling period here).
    st, data = await o.withdraw("1.00")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    assert await o.wallet() == 7 * USDC
    await assert_ledger_clean(tw)


async def test_lost_dispute_of_a_partly_refunded_charge_reinstates_only_the_overlap(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start(card_settle_seconds=0)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "partly")
    service = await priced_service(tw, upstream)
    pi = await o.topup("10.00")
    assert await o.deliver(await o.refunded_event(pi, 300)) == "reversed"
    await spend(tw, o, service, 2)
    assert await o.wallet() == 5 * USDC
    # The cardholder disputes the whole 10.00 although 3.00 came back by refund:
    # never more than the charge is taken.
    dispute = stripe_server.open_dispute(pi)
    assert await o.deliver(stripe_server.dispute_created_event(dispute["id"])) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    # Lost, "partially won": Stripe reinstates the refunded 3.00, which was never
    # taken twice here, so nothing comes back and the debt stays.
    stripe_server.close_dispute(dispute["id"], won=False, reinstated=300)
    event = stripe_server.dispute_event(dispute["id"], "charge.dispute.funds_reinstated")
    assert await o.deliver(event) == "already_reinstated"
    closed = stripe_server.dispute_event(dispute["id"], "charge.dispute.closed")
    assert await o.deliver(closed) == "already_reinstated"
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    assert await card_row(tw, pi) == (10 * USDC, 10 * USDC)
    assert await kinds_total(tw, "card_reinstatement") == 0
    await assert_ledger_clean(tw)


async def test_failed_or_canceled_refund_gives_its_amount_back_debt_first(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start(card_settle_seconds=0)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "bounced")
    service = await priced_service(tw, upstream)
    pi = await o.topup("10.00")
    await spend(tw, o, service, 2)
    refunded = await o.refunded_event(pi)
    assert await o.deliver(refunded) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    for method in ("onchain", "stripe_connect"):
        assert frozen(*(await o.withdraw("0.01", method)))

    # The card was closed: the refund fails and Stripe gets the 10.00 back.
    refund_id = latest_refund(stripe_server, pi)
    stripe_server.fail_refund(refund_id)
    # Two events of the failure at once (charge.refund.updated, refund.failed): once.
    updated = stripe_server.refund_event(refund_id)
    also = stripe_server.refund_event(refund_id, "refund.failed")
    outcomes = await asyncio.gather(o.deliver(updated), o.deliver(also))
    assert sorted(outcomes) == ["already_reinstated", "reinstated"]
    assert (await o.wallet(), await o.debt()) == (8 * USDC, 0)
    assert await kinds_total(tw, "card_reinstatement_debt") == 2 * USDC
    assert await kinds_total(tw, "card_reinstatement") == 8 * USDC
    await assert_ledger_clean(tw)
    # Once: a redelivery, and the refund's charge.refunded (still "succeeded")
    # delivered after the failure change nothing.
    assert await o.deliver(updated) == "duplicate"
    late = stripe_server.make_event("charge.refunded", refunded["data"]["object"])
    assert await o.deliver(late) == "already_reversed"
    assert (await o.wallet(), await o.debt()) == (8 * USDC, 0)
    st, data = await o.withdraw("1.00")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data

    # A refund that waited for action and was canceled gives back likewise.
    assert await o.wallet() == 7 * USDC
    stripe_server.refund(pi, 400, status="requires_action")
    assert await o.deliver(stripe_server.charge_refunded_event(pi)) == "reversed"
    assert await o.wallet() == 3 * USDC
    canceled = latest_refund(stripe_server, pi)
    stripe_server.fail_refund(canceled, status="canceled")
    assert await o.deliver(stripe_server.refund_event(canceled)) == "reinstated"
    assert (await o.wallet(), await o.debt()) == (7 * USDC, 0)
    assert await card_row(tw, pi) == (10 * USDC, 0)
    await assert_ledger_clean(tw)


async def test_refund_failed_refund_and_new_refund_never_take_more_than_the_charge(
    start: Start, stripe_server: StripeServer, chain: EvmChain, usdc: str, deposit_address: str
) -> None:
    tw = await start()
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "again")
    pi = await o.topup("10.00")
    first = await o.refunded_event(pi)
    assert await o.deliver(first) == "reversed"
    refund_id = latest_refund(stripe_server, pi)
    stripe_server.fail_refund(refund_id)
    assert await o.deliver(stripe_server.refund_event(refund_id)) == "reinstated"
    assert await o.wallet() == 10 * USDC
    # The merchant refunds again (to another card): the whole charge once more.
    second = await o.refunded_event(pi)
    assert await o.deliver(second) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 0)
    assert await card_row(tw, pi) == (10 * USDC, 10 * USDC)
    # Nothing on top: the first charge.refunded again (a new event id with the old
    # snapshot), the running total alone (an API version that lists no refunds),
    # a dispute of the whole charge.
    stale = stripe_server.make_event("charge.refunded", first["data"]["object"])
    assert await o.deliver(stale) == "already_reversed"
    bare = stripe_server.make_event(
        "charge.refunded", {**second["data"]["object"], "refunds": None}
    )
    assert await o.deliver(bare) == "already_reversed"
    dispute = stripe_server.open_dispute(pi)
    assert await o.deliver(stripe_server.dispute_created_event(dispute["id"])) == (
        "already_reversed"
    )
    taken = await kinds_total(tw, "card_reversal") + await kinds_total(tw, "card_reversal_debt")
    given = await kinds_total(tw, "card_reinstatement") + await kinds_total(
        tw, "card_reinstatement_debt"
    )
    assert (taken, given) == (20 * USDC, 10 * USDC)
    assert (await o.wallet(), await o.debt()) == (0, 0)
    rows = await tw.rt.store.fetch(
        "SELECT part_id, kind, status, taken FROM card_reversals WHERE payment_intent_id = $1"
        " ORDER BY kind, taken",
        pi,
    )
    assert [(r["kind"], r["status"], r["taken"]) for r in rows] == [
        ("dispute", "needs_response", 10 * USDC),
        ("refund", "failed", 0),
        ("refund", "succeeded", 10 * USDC),
    ]
    await assert_ledger_clean(tw)


# --------------------------------------------------------------------------- other credits pay the debt


async def test_admin_credit_to_an_owner_in_debt_pays_the_debt_first(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start(card_settle_seconds=0)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "granted")
    service = await priced_service(tw, upstream)
    pi = await o.topup("10.00")
    await spend(tw, o, service, 3)
    assert await o.deliver(await o.refunded_event(pi)) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 3 * USDC)

    async def admin_credit(amount: str, idem: str) -> tuple[int, dict]:
        st, body, _ = await tw.api(
            "POST",
            "/api/v1/admin/credit",
            tw.admin,
            headers={"Idempotency-Key": idem},
            json={"owner_id": o.owner, "amount": amount},
        )
        return st, body

    st, body = await admin_credit("1.00", "grant-1")
    assert st == 201 and body["balance"] == "0.00", body
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    assert frozen(*(await o.withdraw("0.01")))
    st, body = await admin_credit("5.00", "grant-2")
    assert st == 201 and body["balance"] == "3.00", body
    assert (await o.wallet(), await o.debt()) == (3 * USDC, 0)
    # A replay credits nothing and repays nothing.
    st, body = await admin_credit("5.00", "grant-2")
    assert st == 200 and body["replayed"] and body["balance"] == "3.00", body
    assert await kinds_total(tw, "debt_repayment") == 3 * USDC
    assert await kinds_total(tw, "admin_credit") == 6 * USDC
    st, data = await o.withdraw("1.00")
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    await assert_ledger_clean(tw)


async def test_connect_payout_given_back_to_an_owner_in_debt_pays_the_debt_first(
    start: Start,
    stripe_server: StripeServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    tw = await start(card_settle_seconds=0)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "payoutee")
    service = await priced_service(tw, upstream)
    pi = await o.topup("10.00")
    await spend(tw, o, service, 2)
    # Stripe is down: the payout's outcome is unknown, its 5.00 is out of the wallet.
    stripe_server.fail_next_transfer(status=500, error_type="api_error", code="", message="boom")
    st, data = await o.withdraw("5.00", "stripe_connect")
    assert st == 202 and data["withdrawal"]["status"] == "unknown", data
    assert await o.wallet() == 3 * USDC
    # Meanwhile the card payment is disputed: 3.00 from the wallet, 7.00 owed.
    dispute = stripe_server.open_dispute(pi)
    assert await o.deliver(stripe_server.dispute_created_event(dispute["id"])) == "reversed"
    assert (await o.wallet(), await o.debt()) == (0, 7 * USDC)
    await assert_ledger_clean(tw)

    # The transfer never happened: the payout is reversed, and the 5.00 that comes
    # back pays the debt before anything else.
    connect = tw.rt.connect_payouts  # type: ignore[attr-defined]
    connect.config = dataclasses.replace(connect.config, unknown_grace_seconds=0)
    await connect.reconcile()
    st, body, _ = await tw.api("GET", "/api/v1/wallet/withdrawals", o.key)
    assert [w["status"] for w in body["withdrawals"]] == ["reversed"], body
    assert (await o.wallet(), await o.debt()) == (0, 2 * USDC)
    assert await kinds_total(tw, "connect_payout_reversal") == 5 * USDC
    assert await kinds_total(tw, "debt_repayment") == 5 * USDC
    assert o.sent_by_connect() == 0
    assert frozen(*(await o.withdraw("0.01", "stripe_connect")))
    await assert_ledger_clean(tw)
