"""Stripe wallet flows end to end against the local Stripe API stand-in, on SQLite
and PostgreSQL: the SDK really sends its requests to ``stripe_server`` and the
webhooks are signed exactly as Stripe signs them.

Acceptance (issue 5):
- the same webhook twice, or checkout.session.completed + payment_intent.succeeded
  of one payment, credit once; a forged signature and an old timestamp get 400 and
  credit nothing;
- 50 concurrent calls that cross the auto top-up threshold give exactly one
  off-session PaymentIntent;
- a failed Connect transfer reverses its debit;
- a Connect payout of earnings pays settlements, once, and a failed one leaves them unpaid;
- ``ledger verify`` is clean after each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ledger import journal as j
from ledger.journal import now_ms
from ledger.verify import verify
from tests.support.stripe_server import StripeServer, sign_webhook, stripe_server_fixture
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream

__all__ = ["stripe_server_fixture"]  # registers the ``stripe_server`` fixture here

UNITS_PER_CENT = 10_000


def stripe_settings(server: StripeServer) -> dict[str, Any]:
    return {
        "stripe_api_key": server.api_key,
        "stripe_webhook_secret": server.webhook_secret,
        "stripe_api_base": server.url,
    }


@pytest.fixture
async def tw(db_url: str, tmp_path, stripe_server: StripeServer) -> AsyncIterator[InProcess]:
    t = await start_inprocess(db_url, tmp=str(tmp_path), **stripe_settings(stripe_server))
    yield t
    await t.close()


async def wallet_units(tw: InProcess, owner: str) -> int:
    v = await tw.rt.store.fetchval(
        "SELECT balance FROM accounts WHERE id = $1", j.wallet(owner, "USDC").id
    )
    return int(v or 0)


async def assert_ledger_clean(tw: InProcess) -> None:
    report = await verify(tw.rt.store)
    assert report.ok, report.render()


async def deliver(tw: InProcess, body: bytes, sig: str) -> tuple[int, Any]:
    st, data, _ = await tw.api(
        "POST",
        "/api/v1/stripe/webhook",
        data=body,
        headers={"Stripe-Signature": sig, "Content-Type": "application/json"},
    )
    return st, data


async def wait_for(predicate: Any, *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll an async predicate until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = await predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def save_card(tw: InProcess, server: StripeServer, key: str, owner: str) -> str:
    """The setup-mode Checkout flow: session, the customer saves a card, the webhook."""
    st, body, _ = await tw.api("POST", "/api/v1/wallet/setup-payment-method", key)
    assert st == 201, body
    server.complete_setup(body["session_id"])
    event = server.make_event("checkout.session.completed", server.sessions[body["session_id"]])
    st, data = await deliver(tw, *server.signed(event))
    assert st == 200 and data["outcome"] == "card_saved", data
    return body["customer_id"]


# --------------------------------------------------------------------------- top-up webhooks


async def test_one_payment_credits_once_whatever_events_arrive(
    tw: InProcess, stripe_server: StripeServer
) -> None:
    key = await tw.key("alice")
    st, body, _ = await tw.api("POST", "/api/v1/wallet/topup", key, json={"amount": "10.00"})
    assert st == 201 and body["url"].startswith(stripe_server.url), body
    # What the SDK really sent: our amount in cents, our owner on both objects.
    (req,) = stripe_server.requests_to("POST", "/v1/checkout/sessions")
    assert req.form["mode"] == "payment"
    assert req.form["line_items"][0]["price_data"]["unit_amount"] == "1000"
    assert req.form["metadata"]["owner_id"] == "alice"
    assert req.form["payment_intent_data"]["metadata"]["owner_id"] == "alice"

    pi = stripe_server.complete_checkout(body["session_id"])
    completed = stripe_server.checkout_completed_event(body["session_id"])
    succeeded = stripe_server.payment_intent_succeeded_event(pi["id"])

    # The same event delivered twice (Stripe retries), concurrently and after.
    first = await asyncio.gather(*(deliver(tw, *stripe_server.signed(completed)) for _ in range(3)))
    outcomes = sorted(d["outcome"] for _, d in first)
    assert [s for s, _ in first] == [200, 200, 200]
    assert outcomes == ["credited", "duplicate", "duplicate"], outcomes
    st, data = await deliver(tw, *stripe_server.signed(completed))
    assert (st, data["outcome"]) == (200, "duplicate")
    # The other event of the same payment: known PaymentIntent, no second credit.
    st, data = await deliver(tw, *stripe_server.signed(succeeded))
    assert (st, data["outcome"]) == (200, "already_credited")

    assert await wallet_units(tw, "alice") == 1000 * UNITS_PER_CENT
    rows = await tw.rt.store.fetch("SELECT rail, external_ref, amount FROM payments")
    assert [(r["rail"], r["external_ref"], r["amount"]) for r in rows] == [
        ("stripe", pi["id"], 1000 * UNITS_PER_CENT)
    ]
    st, bal, _ = await tw.api("GET", "/api/v1/wallet/balance", key)
    assert bal["balances"][0]["available"] == "10.00"
    assert bal["recent"][0]["kind"] == "stripe_topup"
    await assert_ledger_clean(tw)


async def test_payment_intent_first_then_checkout_credits_once(
    tw: InProcess, stripe_server: StripeServer
) -> None:
    key = await tw.key("bob")
    st, body, _ = await tw.api("POST", "/api/v1/wallet/topup", key, json={"amount": "2.50"})
    assert st == 201
    pi = stripe_server.complete_checkout(body["session_id"])
    # Stripe does not order events: payment_intent.succeeded may come first.
    st, data = await deliver(
        tw, *stripe_server.signed(stripe_server.payment_intent_succeeded_event(pi["id"]))
    )
    assert data["outcome"] == "credited"
    st, data = await deliver(
        tw, *stripe_server.signed(stripe_server.checkout_completed_event(body["session_id"]))
    )
    assert data["outcome"] == "already_credited"
    assert await wallet_units(tw, "bob") == 250 * UNITS_PER_CENT
    await assert_ledger_clean(tw)


async def test_forged_or_stale_webhooks_get_400_and_credit_nothing(
    tw: InProcess, stripe_server: StripeServer
) -> None:
    key = await tw.key("mallory")
    st, body, _ = await tw.api("POST", "/api/v1/wallet/topup", key, json={"amount": "100.00"})
    stripe_server.complete_checkout(body["session_id"])
    event = stripe_server.checkout_completed_event(body["session_id"])
    payload, good_sig = stripe_server.signed(event)

    forged = sign_webhook(payload, "whsec_not_the_real_secret")
    old = sign_webhook(payload, stripe_server.webhook_secret, timestamp=int(time.time()) - 3600)
    tampered = payload.replace(b'"amount_total": 10000', b'"amount_total": 99999999')
    assert tampered != payload
    for body_bytes, sig in [(payload, forged), (payload, old), (tampered, good_sig), (payload, "")]:
        st, data = await deliver(tw, body_bytes, sig)
        assert st == 400 and data["error"]["code"] == "invalid_webhook", data
    assert await wallet_units(tw, "mallory") == 0
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM stripe_events") == 0
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM payments") == 0
    # The genuine delivery of the same event still credits (it was never consumed).
    st, data = await deliver(tw, payload, good_sig)
    assert (st, data["outcome"]) == (200, "credited")
    assert await wallet_units(tw, "mallory") == 10000 * UNITS_PER_CENT
    await assert_ledger_clean(tw)


# --------------------------------------------------------------------------- auto top-up


async def _auto_topup_buyer(
    tw: InProcess,
    server: StripeServer,
    upstream: Upstream,
    *,
    credit: str,
    price: str,
    threshold: str,
    amount: str,
) -> tuple[str, str]:
    prov = await tw.key("prov", "provider")
    sid = await tw.service(prov, upstream.url, price=price)
    key = await tw.key("auto")
    await tw.credit("auto", credit)
    # Without a saved card auto top-up cannot be enabled.
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/auto-topup",
        key,
        json={"threshold": threshold, "amount": amount, "enabled": True},
    )
    assert st == 409 and body["error"]["code"] == "no_payment_method"
    await save_card(tw, server, key, "auto")
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/auto-topup",
        key,
        json={"threshold": threshold, "amount": amount, "enabled": True},
    )
    assert st == 200 and body["enabled"] and body["state"] == "idle", body
    return sid, key


async def test_fifty_concurrent_calls_crossing_the_threshold_make_one_payment_intent(
    tw: InProcess, stripe_server: StripeServer, upstream: Upstream
) -> None:
    sid, key = await _auto_topup_buyer(
        tw, stripe_server, upstream, credit="1.00", price="0.01", threshold="0.80", amount="5.00"
    )
    results = await asyncio.gather(*(tw.call(sid, "ok", key) for _ in range(50)))
    assert [r[0] for r in results] == [200] * 50

    async def topped_up() -> dict | None:
        _, body, _ = await tw.api("GET", "/api/v1/wallet/auto-topup", key)
        return body if body["state"] == "idle" and body["last_payment_intent"] else None

    state = await wait_for(topped_up, what="the auto top-up to finish")
    intents = stripe_server.requests_to("POST", "/v1/payment_intents")
    assert len(intents) == 1, [r.form for r in intents]
    sent = intents[0]
    assert sent.form["off_session"] == "true" and sent.form["confirm"] == "true"
    assert sent.form["amount"] == "500" and sent.form["metadata"]["owner_id"] == "auto"
    assert sent.idempotency_key == "tollway-autotopup:auto:1"
    assert state["last_payment_intent"] in stripe_server.payment_intents
    # 1.00 - 50 x 0.01 + 5.00
    assert await wallet_units(tw, "auto") == 5_500_000
    # The PaymentIntent's own webhook arrives later: it must not credit again.
    event = stripe_server.payment_intent_succeeded_event(state["last_payment_intent"])
    st, data = await deliver(tw, *stripe_server.signed(event))
    assert (st, data["outcome"]) == (200, "already_credited")
    assert await wallet_units(tw, "auto") == 5_500_000
    await assert_ledger_clean(tw)


async def test_declined_auto_topup_cools_down(
    tw: InProcess, stripe_server: StripeServer, upstream: Upstream
) -> None:
    sid, key = await _auto_topup_buyer(
        tw, stripe_server, upstream, credit="0.10", price="0.01", threshold="0.08", amount="1.00"
    )
    stripe_server.fail_next_payment_intent()
    for _ in range(3):
        st, _, _ = await tw.call(sid, "ok", key)
        assert st == 200

    async def declined() -> dict | None:
        _, body, _ = await tw.api("GET", "/api/v1/wallet/auto-topup", key)
        return body if body["cooldown_until"] else None

    state = await wait_for(declined, what="the declined charge to be recorded")
    assert state["state"] == "idle" and state["last_error"].startswith("charge_declined")
    # More charges below the threshold during the cooldown start no new episode.
    for _ in range(3):
        st, _, _ = await tw.call(sid, "ok", key)
        assert st == 200
    row = await tw.rt.store.fetchrow(
        "SELECT state, episode FROM auto_topups WHERE owner_id = 'auto'"
    )
    assert (row["state"], row["episode"]) == ("idle", 1)
    assert len(stripe_server.requests_to("POST", "/v1/payment_intents")) == 1
    assert await wallet_units(tw, "auto") == 40_000
    await assert_ledger_clean(tw)


# --------------------------------------------------------------------------- Connect


async def test_failed_connect_transfer_reverses_its_debit(
    tw: InProcess, stripe_server: StripeServer
) -> None:
    prov = await tw.key("acme", "provider")
    st, body, _ = await tw.api("GET", "/api/v1/stripe/connect/status", prov)
    assert st == 200 and body["connected"] is False
    st, body, _ = await tw.api("POST", "/api/v1/stripe/connect", prov)
    assert st == 201 and body["url"].startswith(stripe_server.url), body
    account_id = body["account_id"]
    stripe_server.complete_onboarding(account_id)
    st, body, _ = await tw.api("GET", "/api/v1/stripe/connect/status", prov)
    assert body["connected"] and body["payouts_enabled"] and body["account_id"] == account_id
    await tw.credit("acme", "10.00")

    stripe_server.fail_next_transfer()
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/withdraw", prov, json={"amount": "3.00", "method": "stripe_connect"}
    )
    assert st == 502 and body["error"]["code"] == "payout_failed", body
    assert await wallet_units(tw, "acme") == 10 * 10**6
    wid = body["error"]["withdrawal_id"]
    kinds = [
        r["kind"]
        for r in await tw.rt.store.fetch(
            "SELECT kind FROM transfers WHERE idempotency_key IN ($1, $2)",
            f"connect_payout:{wid}",
            f"connect_reversal:{wid}",
        )
    ]
    assert sorted(kinds) == ["connect_payout", "connect_payout_reversal"]
    assert stripe_server.transfers == {}
    (sent,) = stripe_server.requests_to("POST", "/v1/transfers")
    assert sent.form["amount"] == "300" and sent.form["destination"] == account_id
    assert sent.form["transfer_group"] == wid

    # The next one goes through: debited once, transferred once.
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/withdraw", prov, json={"amount": "3.00", "method": "stripe_connect"}
    )
    assert st == 200 and body["withdrawal"]["status"] == "paid", body
    (transfer,) = stripe_server.transfers.values()
    assert transfer["amount"] == 300 and body["withdrawal"]["transfer_id"] == transfer["id"]
    assert await wallet_units(tw, "acme") == 7 * 10**6
    # More than the balance: refused before anything reaches Stripe.
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/withdraw", prov, json={"amount": "8.00", "method": "stripe_connect"}
    )
    assert st == 402 and body["error"]["code"] == "insufficient_balance"
    assert len(stripe_server.requests_to("POST", "/v1/transfers")) == 2
    await assert_ledger_clean(tw)


async def test_connect_outage_is_looked_up_not_reversed_blindly(
    tw: InProcess, stripe_server: StripeServer
) -> None:
    prov = await tw.key("acme", "provider")
    st, body, _ = await tw.api("POST", "/api/v1/stripe/connect", prov)
    stripe_server.complete_onboarding(body["account_id"])
    await tw.credit("acme", "5.00")
    # Stripe answers 5xx (the SDK retries with the same key and gets the saved 5xx).
    stripe_server.fail_next_transfer(status=500, error_type="api_error", code="", message="boom")
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/withdraw", prov, json={"amount": "1.00", "method": "stripe_connect"}
    )
    assert st == 202 and body["withdrawal"]["status"] == "unknown", body
    # The money stays out of the wallet until the outcome is known.
    assert await wallet_units(tw, "acme") == 4 * 10**6
    assert stripe_server.requests_to("GET", "/v1/transfers")
    await assert_ledger_clean(tw)

    # Reconciliation: still no transfer at Stripe once any request in flight must
    # have finished (grace shortened here instead of waiting ten minutes): reverse.
    connect = tw.rt.connect_payouts  # type: ignore[attr-defined]
    connect.config = dataclasses.replace(connect.config, unknown_grace_seconds=0)
    await connect.reconcile()
    st, body, _ = await tw.api("GET", "/api/v1/wallet/withdrawals", prov)
    assert [w["status"] for w in body["withdrawals"]] == ["reversed"]
    assert await wallet_units(tw, "acme") == 5 * 10**6
    await assert_ledger_clean(tw)


# --------------------------------------------------------------------------- Connect payouts of earnings pay settlements

DAY = 86_400_000


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat().replace("+00:00", "Z")


async def _connected_provider(
    tw: InProcess, server: StripeServer, upstream: Upstream, owner: str, calls: int
) -> tuple[str, str, dict]:
    """A provider onboarded to Connect, with ``calls`` paid calls of 0.10 settled (net 0.09 each)."""
    prov = await tw.key(owner, "provider")
    st, body, _ = await tw.api("POST", "/api/v1/stripe/connect", prov)
    assert st == 201, body
    server.complete_onboarding(body["account_id"])
    sid = await tw.service(prov, upstream.url, price="0.10")
    buyer = await tw.key(f"buyer_of_{owner}")
    await tw.credit(f"buyer_of_{owner}", "20.00")
    for _ in range(calls):
        assert (await tw.call(sid, "ok", buyer))[0] == 200
    now = now_ms()
    st, s, _ = await tw.api(
        "POST",
        "/api/v1/settlements",
        tw.admin,
        json={"provider_id": owner, "period_start": _iso(now - DAY), "period_end": _iso(now + DAY)},
    )
    assert st == 201 and s["net_units"] == calls * 90_000, s
    return prov, body["account_id"], s


async def earnings_units(tw: InProcess, owner: str) -> int:
    v = await tw.rt.store.fetchval(
        "SELECT balance FROM accounts WHERE id = $1", j.earnings(owner, "USDC").id
    )
    return int(v or 0)


async def test_connect_payout_of_earnings_pays_settlement_and_a_failed_one_leaves_it_unpaid(
    tw: InProcess, stripe_server: StripeServer, upstream: Upstream
) -> None:
    prov, account_id, s1 = await _connected_provider(tw, stripe_server, upstream, "conn", 5)
    net = s1["net_units"]
    assert await earnings_units(tw, "conn") == net

    # The transfer fails: the debit is reversed, the settlement is unpaid again.
    stripe_server.fail_next_transfer()
    st, err, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        prov,
        json={"settlement_id": s1["id"], "method": "stripe_connect"},
    )
    assert st == 502 and err["error"]["code"] == "payout_failed", err
    assert err["error"]["settlement_ids"] == [s1["id"]]
    assert await earnings_units(tw, "conn") == net
    st, back, _ = await tw.api("GET", f"/api/v1/settlements/{s1['id']}", prov)
    assert (back["status"], back["payment_tx"], back["withdrawal_id"]) == ("pending", None, None)
    assert stripe_server.transfers == {}
    await assert_ledger_clean(tw)

    # Again: the transfer is made for exactly the net, and it pays the settlement.
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        prov,
        json={"source": "earnings", "method": "stripe_connect"},
    )
    assert st == 200, body
    w = body["withdrawal"]
    (transfer,) = stripe_server.transfers.values()
    assert transfer["amount"] == net // UNITS_PER_CENT and transfer["destination"] == account_id
    assert (w["status"], w["source"], w["amount_units"], w["settlement_ids"], w["transfer_id"]) == (
        "paid",
        "earnings",
        net,
        [s1["id"]],
        transfer["id"],
    )
    st, paid, _ = await tw.api("GET", f"/api/v1/settlements/{s1['id']}", prov)
    assert (paid["status"], paid["payment_tx"], paid["withdrawal_id"]) == (
        "completed",
        transfer["id"],
        w["id"],
    )
    assert await earnings_units(tw, "conn") == 0
    # Paid by the Connect payout: PATCH pay and another payout are refused.
    st, err, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "0x1"}
    )
    assert st == 409 and err["error"]["code"] == "already_paid", err
    st, err, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        prov,
        json={"settlement_id": s1["id"], "method": "stripe_connect"},
    )
    assert st == 409 and err["error"]["code"] == "already_paid", err
    assert len(stripe_server.requests_to("POST", "/v1/transfers")) == 2
    await assert_ledger_clean(tw)


async def test_connect_payout_needs_an_unpaid_settlement_and_patch_pay_first_wins(
    tw: InProcess, stripe_server: StripeServer, upstream: Upstream
) -> None:
    prov, _, s1 = await _connected_provider(tw, stripe_server, upstream, "conn2", 3)
    st, _, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "ach-9"}
    )
    assert st == 200
    # Earnings from calls not settled yet cannot be paid out by any request.
    buyer = await tw.key("late_buyer")
    await tw.credit("late_buyer", "1.00")
    service_id = await tw.rt.store.fetchval("SELECT id FROM services WHERE provider_id = 'conn2'")
    assert (await tw.call(service_id, "ok", buyer))[0] == 200
    assert await earnings_units(tw, "conn2") == 90_000
    for body in (
        {"settlement_id": s1["id"]},
        {"source": "earnings", "amount": "0.09"},
        {"source": "earnings"},
    ):
        st, err, _ = await tw.api(
            "POST", "/api/v1/wallet/withdraw", prov, json={"method": "stripe_connect", **body}
        )
        assert st == 409 and err["error"]["code"] in ("already_paid", "no_unpaid_settlement"), (
            body,
            err,
        )
    assert stripe_server.requests_to("POST", "/v1/transfers") == []
    assert await earnings_units(tw, "conn2") == 90_000
    st, s, _ = await tw.api("GET", f"/api/v1/settlements/{s1['id']}", prov)
    assert (s["status"], s["payment_tx"], s["withdrawal_id"]) == ("completed", "ach-9", None)
    await assert_ledger_clean(tw)


async def test_connect_outage_keeps_the_settlement_paying_then_reversal_unpays_it(
    tw: InProcess, stripe_server: StripeServer, upstream: Upstream
) -> None:
    prov, _, s1 = await _connected_provider(tw, stripe_server, upstream, "conn3", 2)
    stripe_server.fail_next_transfer(status=500, error_type="api_error", code="", message="boom")
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        prov,
        json={"settlement_id": s1["id"], "method": "stripe_connect"},
    )
    assert st == 202 and body["withdrawal"]["status"] == "unknown", body
    st, s, _ = await tw.api("GET", f"/api/v1/settlements/{s1['id']}", prov)
    assert s["status"] == "paying"
    st, err, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "x"}
    )
    assert st == 409 and err["error"]["code"] == "payout_in_progress"
    assert await earnings_units(tw, "conn3") == 0
    await assert_ledger_clean(tw)

    connect = tw.rt.connect_payouts  # type: ignore[attr-defined]
    connect.config = dataclasses.replace(connect.config, unknown_grace_seconds=0)
    await connect.reconcile()
    st, s, _ = await tw.api("GET", f"/api/v1/settlements/{s1['id']}", prov)
    assert (s["status"], s["withdrawal_id"]) == ("pending", None)
    assert await earnings_units(tw, "conn3") == s1["net_units"]
    await assert_ledger_clean(tw)


async def test_signed_events_with_amounts_we_cannot_book_are_ignored_not_500(
    tw: InProcess, stripe_server: StripeServer
) -> None:
    """A correctly signed event whose amount is 0, negative or past any column: 200
    and ignored (Stripe retries any other answer for days), nothing credited."""
    import json as _json

    key = await tw.key("odd")
    st, body, _ = await tw.api("POST", "/api/v1/wallet/topup", key, json={"amount": "1.00"})
    stripe_server.complete_checkout(body["session_id"])
    event = stripe_server.checkout_completed_event(body["session_id"])
    for n, amount in enumerate((0, -100, 10**30)):
        odd = _json.loads(_json.dumps(event))
        odd["id"] = f"{event['id']}_{n}"
        odd["data"]["object"]["amount_total"] = amount
        pi = stripe_server.payment_intent_succeeded_event(odd["data"]["object"]["payment_intent"])
        pi["id"] = f"{pi['id']}_{n}"
        pi["data"]["object"]["amount_received"] = amount
        for e in (odd, pi):
            st, data = await deliver(tw, *stripe_server.signed(e))
            assert st == 200 and data["outcome"] == "ignored", (amount, data)
    assert await wallet_units(tw, "odd") == 0
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM payments") == 0
    await assert_ledger_clean(tw)
