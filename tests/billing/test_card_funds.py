"""Card money (issue 10) end to end, on SQLite and PostgreSQL: Stripe top-ups through
the local Stripe API (webhooks signed as Stripe signs them), deposits and withdrawals
on the in-process EVM chain over JSON-RPC, Connect payouts through the Stripe stand-in.

- card money pays for calls at once, but leaves a wallet (on chain or by Connect)
  only once it has settled (``card_settle_seconds``); a wallet funded by chain and
  card can send the chain part; concurrent withdrawals never take more than that;
- ``charge.refunded`` and ``charge.dispute.created`` take the card money back, once
  per event and never more than the charge: the wallet goes to zero, what was
  already spent is a debt, the wallet is frozen for withdrawals until later credits
  (card or chain) have paid the debt;
- ``ledger verify`` is clean after each.
"""

from __future__ import annotations

import asyncio
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
