"""The Stripe rail against the local Stripe API server.

Every test drives the real ``stripe`` SDK through ``StripeRail`` and asserts on
the HTTP requests the SDK actually sent (``stripe_server.requests``), and on
webhooks signed exactly as Stripe signs them.
"""

from __future__ import annotations

import json
import time

import pytest
import stripe

from billing.errors import BillingError, PaymentRejected, PayoutFailed, UpstreamRailError
from billing.rails.stripe_rail import (
    ChargeDeclined,
    CheckoutSession,
    ConnectStatus,
    CreditEvent,
    IgnoredEvent,
    OffSessionCharge,
    ReversalEvent,
    ReversalPart,
    SetupCompletedEvent,
    StripeRail,
    WebhookRejected,
)
from tests.support.stripe_server import (  # noqa: F401  (fixtures)
    StripeServer,
    event_payload,
    parse_stripe_form,
    rail_config_for,
    sign_webhook,
    stripe_rail_fixture,
    stripe_server_fixture,
)

OWNER = "own_3f9c2a"


# ----------------------------------------------------------------- top-up Checkout


async def test_topup_session_sends_amount_currency_metadata_and_mode(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    result = await stripe_rail.create_topup_session(OWNER, 2500, "USD")

    assert isinstance(result, CheckoutSession)
    session_id, url = result
    assert session_id.startswith("cs_") and session_id in stripe_server.sessions
    assert url == stripe_server.sessions[session_id]["url"]

    [req] = stripe_server.requests_to("POST", "/v1/checkout/sessions")
    assert req.headers["Authorization"] == f"Bearer {stripe_server.api_key}"
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert req.headers["Idempotency-Key"]  # the SDK always sends one on POST
    # The SDK went through its aiohttp client: the call never blocked the event loop.
    assert json.loads(req.headers["X-Stripe-Client-User-Agent"])["httplib"] == "aiohttp"
    form = req.form
    assert form["mode"] == "payment"
    [item] = form["line_items"]
    assert item["quantity"] == "1"
    assert item["price_data"]["unit_amount"] == "2500"
    assert item["price_data"]["currency"] == "usd"  # normalized to Stripe's lowercase
    assert form["metadata"]["owner_id"] == OWNER
    assert form["payment_intent_data"]["metadata"]["owner_id"] == OWNER
    assert form["client_reference_id"] == OWNER
    assert form["success_url"] == stripe_rail.config.success_url
    assert form["cancel_url"] == stripe_rail.config.cancel_url
    # What the server made of it: the amount Stripe will charge is ours.
    assert stripe_server.sessions[session_id]["amount_total"] == 2500


@pytest.mark.parametrize("amount", [0, -5, 12.5, "100", True])
async def test_topup_refuses_non_positive_or_non_integer_amounts(
    stripe_rail: StripeRail, stripe_server: StripeServer, amount: object
) -> None:
    with pytest.raises(BillingError) as info:
        await stripe_rail.create_topup_session(OWNER, amount, "usd")  # type: ignore[arg-type]
    assert info.value.code == "invalid_amount"
    assert stripe_server.requests == []  # refused before any round trip


async def test_topup_with_an_unknown_customer_maps_stripe_error(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    with pytest.raises(BillingError) as info:
        await stripe_rail.create_topup_session(OWNER, 500, "usd", customer_id="cus_nope")
    assert info.value.status == 404


async def test_wrong_api_key_is_a_rail_error_not_the_callers(stripe_server: StripeServer) -> None:
    async with StripeRail(rail_config_for(stripe_server, api_key="sk_test_wrong")) as rail:
        with pytest.raises(UpstreamRailError):
            await rail.create_topup_session(OWNER, 500, "usd")
    [req] = stripe_server.requests
    assert req.status == 401


# ----------------------------------------------------------------- setup Checkout


async def test_setup_session_creates_customer_then_setup_mode_checkout(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    setup = await stripe_rail.create_setup_session(OWNER, None)

    assert setup.customer_id in stripe_server.customers
    assert setup.url == stripe_server.sessions[setup.session_id]["url"]
    [cust_req] = stripe_server.requests_to("POST", "/v1/customers")
    assert cust_req.form["metadata"]["owner_id"] == OWNER
    [sess_req] = stripe_server.requests_to("POST", "/v1/checkout/sessions")
    assert sess_req.form["mode"] == "setup"
    assert sess_req.form["customer"] == setup.customer_id
    assert sess_req.form["payment_method_types"] == ["card"]
    assert sess_req.form["setup_intent_data"]["metadata"]["owner_id"] == OWNER
    assert "line_items" not in sess_req.form


async def test_setup_session_reuses_an_existing_customer(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    customer_id = await stripe_rail.create_customer(OWNER)
    stripe_server.requests.clear()

    setup = await stripe_rail.create_setup_session(OWNER, customer_id)

    assert setup.customer_id == customer_id
    assert stripe_server.requests_to("POST", "/v1/customers") == []


async def test_setup_completed_webhook_reports_customer(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    setup = await stripe_rail.create_setup_session(OWNER, None)
    stripe_server.complete_setup(setup.session_id)

    body, sig = stripe_server.signed(stripe_server.checkout_completed_event(setup.session_id))
    event = stripe_rail.parse_webhook(body, sig)

    assert isinstance(event, SetupCompletedEvent)
    assert event.owner_id == OWNER
    assert event.customer_id == setup.customer_id
    assert event.setup_intent_id and event.setup_intent_id.startswith("seti_")


# ----------------------------------------------------------------- webhooks


async def _paid_topup(
    rail: StripeRail, server: StripeServer, amount: int = 2500
) -> tuple[str, str]:
    """A top-up the customer has paid: returns (session id, PaymentIntent id)."""
    session_id, _url = await rail.create_topup_session(OWNER, amount, "usd")
    pi = server.complete_checkout(session_id)
    return session_id, pi["id"]


async def test_checkout_completed_and_payment_intent_succeeded_key_the_same_payment(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    session_id, pi_id = await _paid_topup(stripe_rail, stripe_server)

    body1, sig1 = stripe_server.signed(stripe_server.checkout_completed_event(session_id))
    body2, sig2 = stripe_server.signed(stripe_server.payment_intent_succeeded_event(pi_id))
    e1 = stripe_rail.parse_webhook(body1, sig1)
    e2 = stripe_rail.parse_webhook(body2, sig2)

    assert isinstance(e1, CreditEvent) and isinstance(e2, CreditEvent)
    assert e1.event_type == "checkout.session.completed"
    assert e2.event_type == "payment_intent.succeeded"
    assert e1.event_id != e2.event_id
    # The credit key: one payment, one id, whichever event arrives first.
    assert e1.payment_intent_id == e2.payment_intent_id == pi_id
    assert (e1.owner_id, e1.amount_cents, e1.currency) == (OWNER, 2500, "usd")
    assert (e2.owner_id, e2.amount_cents, e2.currency) == (OWNER, 2500, "usd")


async def test_the_same_delivery_twice_parses_to_the_same_event(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    session_id, _ = await _paid_topup(stripe_rail, stripe_server)
    body, sig = stripe_server.signed(stripe_server.checkout_completed_event(session_id))

    assert stripe_rail.parse_webhook(body, sig) == stripe_rail.parse_webhook(body, sig)


async def test_forged_signature_is_refused(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    session_id, _ = await _paid_topup(stripe_rail, stripe_server)
    body = event_payload(stripe_server.checkout_completed_event(session_id))

    forged = sign_webhook(body, "whsec_not_the_endpoint_secret")
    with pytest.raises(WebhookRejected) as info:
        stripe_rail.parse_webhook(body, forged)
    assert info.value.status == 400

    # A genuine signature over a different body: the amount was tampered with.
    genuine = sign_webhook(body, stripe_server.webhook_secret)
    tampered = body.replace(b'"amount_total": 2500', b'"amount_total": 9999999')
    assert tampered != body
    with pytest.raises(WebhookRejected):
        stripe_rail.parse_webhook(tampered, genuine)

    for header in ("", "garbage", "t=notanumber,v1=abc", f"t={int(time.time())}"):
        with pytest.raises(WebhookRejected):
            stripe_rail.parse_webhook(body, header)


async def test_old_timestamp_is_refused(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    session_id, _ = await _paid_topup(stripe_rail, stripe_server)
    event = stripe_server.checkout_completed_event(session_id)
    tolerance = stripe.Webhook.DEFAULT_TOLERANCE

    body, stale = stripe_server.signed(event, timestamp=int(time.time()) - tolerance - 60)
    with pytest.raises(WebhookRejected) as info:
        stripe_rail.parse_webhook(body, stale)
    assert info.value.status == 400

    # Inside the tolerance the same body is accepted.
    body, recent = stripe_server.signed(event, timestamp=int(time.time()) - 60)
    assert isinstance(stripe_rail.parse_webhook(body, recent), CreditEvent)


async def test_signature_helper_matches_the_sdk_scheme() -> None:
    body = b'{"id": "evt_1", "object": "event"}'
    ts = 1_700_000_000
    assert sign_webhook(body, "whsec_x", ts) == stripe.WebhookSignature.generate_signature_header(
        body.decode(), "whsec_x", timestamp=ts
    )


async def test_unpaid_session_and_other_events_are_ignored(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    session_id, _url = await stripe_rail.create_topup_session(OWNER, 700, "usd")
    # Completed but unpaid (a delayed payment method): nothing to credit yet.
    stripe_server.sessions[session_id].update(status="complete", payment_status="unpaid")
    body, sig = stripe_server.signed(stripe_server.checkout_completed_event(session_id))
    unpaid = stripe_rail.parse_webhook(body, sig)
    assert isinstance(unpaid, IgnoredEvent)
    assert unpaid.type == "checkout.session.completed"

    other = stripe_server.make_event("customer.created", {"id": "cus_1", "object": "customer"})
    body, sig = stripe_server.signed(other)
    ignored = stripe_rail.parse_webhook(body, sig)
    assert ignored == IgnoredEvent(other["id"], "customer.created")


async def test_payment_intent_without_owner_is_ignored(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    # A payment made outside Tollway's flows on the same Stripe account.
    pi = {
        "id": "pi_foreign",
        "object": "payment_intent",
        "amount": 100,
        "amount_received": 100,
        "currency": "usd",
        "metadata": {},
        "status": "succeeded",
    }
    body, sig = stripe_server.signed(stripe_server.make_event("payment_intent.succeeded", pi))
    assert isinstance(stripe_rail.parse_webhook(body, sig), IgnoredEvent)


async def test_refunds_and_disputes_parse_to_reversals_of_the_payment_intent(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    _, pi_id = await _paid_topup(stripe_rail, stripe_server, 2500)

    def parsed(event: dict) -> object:
        return stripe_rail.parse_webhook(*stripe_server.signed(event))

    re_1000 = stripe_server.refund(pi_id, 1000)["refunds"]["data"][0]["id"]
    first = stripe_server.charge_refunded_event(pi_id)
    re_500 = stripe_server.refund(pi_id, 500)["refunds"]["data"][0]["id"]
    second = stripe_server.charge_refunded_event(pi_id)
    part_1000 = ReversalPart(re_1000, "refund", 1000, 1000, "succeeded", False)
    part_500 = ReversalPart(re_500, "refund", 500, 500, "succeeded", False)
    # amount_refunded is the charge's running total; each listed refund is a part.
    assert parsed(first) == ReversalEvent(
        first["id"], pi_id, "refund", 1000, "usd", "charge.refunded", (part_1000,), True
    )
    assert parsed(second) == ReversalEvent(
        second["id"], pi_id, "refund", 1500, "usd", "charge.refunded", (part_500, part_1000), True
    )
    dispute = stripe_server.open_dispute(pi_id)
    event = stripe_server.dispute_created_event(dispute["id"])
    dp = ReversalPart(dispute["id"], "dispute", 2500, 2500, "needs_response", False)
    assert parsed(event) == ReversalEvent(
        event["id"], pi_id, "dispute", 2500, "usd", "charge.dispute.created", (dp,)
    )
    # An inquiry withdraws no funds; a charge made outside PaymentIntents names none.
    inquiry = stripe_server.open_dispute(pi_id, status="warning_needs_response")
    assert isinstance(parsed(stripe_server.dispute_created_event(inquiry["id"])), IgnoredEvent)
    legacy = {
        "id": "ch_legacy",
        "object": "charge",
        "amount": 100,
        "amount_refunded": 100,
        "currency": "usd",
        "payment_intent": None,
    }
    assert isinstance(parsed(stripe_server.make_event("charge.refunded", legacy)), IgnoredEvent)


async def test_failed_refunds_and_won_disputes_parse_to_parts_that_take_nothing(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    _, pi_id = await _paid_topup(stripe_rail, stripe_server, 2500)

    def parsed(event: dict) -> object:
        return stripe_rail.parse_webhook(*stripe_server.signed(event))

    charge = stripe_server.refund(pi_id, 1000)
    refund_id = charge["refunds"]["data"][0]["id"]
    stripe_server.fail_refund(refund_id)
    # charge.refund.updated carries the Refund (with what changed); refund.failed too.
    updated = stripe_server.refund_event(refund_id)
    assert updated["data"]["previous_attributes"]["status"] == "succeeded"
    gone = ReversalPart(refund_id, "refund", 1000, 0, "failed", True)
    assert parsed(updated) == ReversalEvent(
        updated["id"], pi_id, "refund", 1000, "usd", "charge.refund.updated", (gone,)
    )
    failed = stripe_server.refund_event(refund_id, "refund.failed")
    assert parsed(failed) == ReversalEvent(
        failed["id"], pi_id, "refund", 1000, "usd", "refund.failed", (gone,)
    )
    # A charge.refunded sent after the failure lists the refund as failed, and the
    # charge's amount_refunded no longer counts it.
    after = parsed(stripe_server.charge_refunded_event(pi_id))
    assert isinstance(after, ReversalEvent) and (after.amount_cents, after.parts) == (0, (gone,))
    # On an API version that does not list refunds, the running total alone.
    charge = stripe_server.refund(pi_id, 300)
    bare = stripe_server.make_event("charge.refunded", {**charge, "refunds": None})
    assert parsed(bare) == ReversalEvent(
        bare["id"], pi_id, "refund", 300, "usd", "charge.refunded", (), True
    )

    dispute = stripe_server.open_dispute(pi_id)
    stripe_server.close_dispute(dispute["id"], won=True)
    won = ReversalPart(dispute["id"], "dispute", 2500, 0, "won", True)
    for etype in ("charge.dispute.closed", "charge.dispute.funds_reinstated"):
        event = stripe_server.dispute_event(dispute["id"], etype)
        # Funds withdrawn, then reinstated: two balance transactions.
        assert [bt["amount"] for bt in event["data"]["object"]["balance_transactions"]] == [
            -2500,
            2500,
        ]
        assert parsed(event) == ReversalEvent(
            event["id"], pi_id, "dispute", 2500, "usd", etype, (won,)
        )
    # Lost, but the refunded part of a partly refunded charge comes back: the
    # dispute takes the rest.
    _, pi2 = await _paid_topup(stripe_rail, stripe_server, 2000)
    lost = stripe_server.open_dispute(pi2)
    stripe_server.close_dispute(lost["id"], won=False, reinstated=500)
    event = stripe_server.dispute_event(lost["id"], "charge.dispute.funds_reinstated")
    part = ReversalPart(lost["id"], "dispute", 2000, 1500, "lost", True)
    assert parsed(event) == ReversalEvent(
        event["id"], pi2, "dispute", 2000, "usd", "charge.dispute.funds_reinstated", (part,)
    )


async def test_signed_body_that_is_not_an_event_is_refused(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    for body in (b"not json", json.dumps({"id": "evt_1", "object": "event"}).encode()):
        sig = sign_webhook(body, stripe_server.webhook_secret)
        with pytest.raises(WebhookRejected):
            stripe_rail.parse_webhook(body, sig)


# ----------------------------------------------------------------- off-session charges


async def _customer_with_card(rail: StripeRail, server: StripeServer) -> tuple[str, str]:
    setup = await rail.create_setup_session(OWNER, None)
    pm_id = server.complete_setup(setup.session_id)
    server.requests.clear()
    return setup.customer_id, pm_id


async def test_off_session_charge_sends_idempotency_key_and_confirms(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    customer_id, pm_id = await _customer_with_card(stripe_rail, stripe_server)

    charge = await stripe_rail.charge_off_session(
        customer_id, pm_id, 2000, "usd", "autotopup-own_3f9c2a-ep1", owner_id=OWNER
    )

    assert isinstance(charge, OffSessionCharge)
    assert charge.status == "succeeded"
    [req] = stripe_server.requests_to("POST", "/v1/payment_intents")
    assert req.headers["Idempotency-Key"] == "autotopup-own_3f9c2a-ep1"
    assert req.form["amount"] == "2000"
    assert req.form["currency"] == "usd"
    assert req.form["customer"] == customer_id
    assert req.form["payment_method"] == pm_id
    assert req.form["confirm"] == "true"
    assert req.form["off_session"] == "true"
    assert req.form["metadata"]["owner_id"] == OWNER

    # Its payment_intent.succeeded webhook is attributed like a Checkout top-up.
    body, sig = stripe_server.signed(
        stripe_server.payment_intent_succeeded_event(charge.payment_intent_id)
    )
    event = stripe_rail.parse_webhook(body, sig)
    assert isinstance(event, CreditEvent)
    assert (event.payment_intent_id, event.owner_id, event.amount_cents) == (
        charge.payment_intent_id,
        OWNER,
        2000,
    )


async def test_off_session_charge_retried_with_the_same_key_charges_once(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    customer_id, pm_id = await _customer_with_card(stripe_rail, stripe_server)

    first = await stripe_rail.charge_off_session(
        customer_id, pm_id, 2000, "usd", "episode-7", owner_id=OWNER
    )
    again = await stripe_rail.charge_off_session(
        customer_id, pm_id, 2000, "usd", "episode-7", owner_id=OWNER
    )

    assert first == again
    assert len(stripe_server.payment_intents) == 1


async def test_off_session_charge_without_payment_method_uses_the_saved_card(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    customer_id, pm_id = await _customer_with_card(stripe_rail, stripe_server)

    await stripe_rail.charge_off_session(customer_id, None, 1500, "usd", "ep-2", owner_id=OWNER)

    [lookup] = stripe_server.requests_to("GET", "/v1/payment_methods")
    assert lookup.query == {"customer": customer_id, "type": "card", "limit": "1"}
    [req] = stripe_server.requests_to("POST", "/v1/payment_intents")
    assert req.form["payment_method"] == pm_id


async def test_off_session_charge_without_any_card_is_declined_locally(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    customer_id = await stripe_rail.create_customer(OWNER)
    with pytest.raises(ChargeDeclined):
        await stripe_rail.charge_off_session(customer_id, None, 1500, "usd", "ep-3", owner_id=OWNER)
    assert stripe_server.requests_to("POST", "/v1/payment_intents") == []


async def test_declined_off_session_charge_raises_charge_declined(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    customer_id, pm_id = await _customer_with_card(stripe_rail, stripe_server)
    stripe_server.fail_next_payment_intent(decline_code="insufficient_funds")

    with pytest.raises(ChargeDeclined) as info:
        await stripe_rail.charge_off_session(
            customer_id, pm_id, 2000, "usd", "ep-4", owner_id=OWNER
        )

    assert isinstance(info.value, PaymentRejected) and info.value.status == 402
    assert info.value.decline_code == "insufficient_funds"
    assert info.value.stripe_code == "card_declined"
    assert info.value.payment_intent_id in stripe_server.payment_intents
    [req] = stripe_server.requests_to("POST", "/v1/payment_intents")
    assert req.status == 402 and req.headers["Idempotency-Key"] == "ep-4"


# ----------------------------------------------------------------- Connect


async def test_connect_account_link_and_status(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    account_id = await stripe_rail.create_connect_account(OWNER)

    [acct_req] = stripe_server.requests_to("POST", "/v1/accounts")
    assert acct_req.form["type"] == "express"
    assert acct_req.form["country"] == "US"
    assert acct_req.form["capabilities"]["transfers"]["requested"] == "true"
    assert acct_req.form["metadata"]["owner_id"] == OWNER

    url = await stripe_rail.onboarding_link(
        account_id, "http://127.0.0.1/connect/refresh", "http://127.0.0.1/connect/return"
    )
    assert url.startswith(stripe_server.url)
    [link_req] = stripe_server.requests_to("POST", "/v1/account_links")
    assert link_req.form == {
        "account": account_id,
        "type": "account_onboarding",
        "refresh_url": "http://127.0.0.1/connect/refresh",
        "return_url": "http://127.0.0.1/connect/return",
    }

    assert await stripe_rail.connect_status(account_id) == ConnectStatus(
        account_id, False, False, False
    )
    stripe_server.complete_onboarding(account_id)
    assert await stripe_rail.connect_status(account_id) == ConnectStatus(
        account_id, True, True, True
    )
    assert stripe_server.requests_to("GET", f"/v1/accounts/{account_id}")


async def test_connect_status_of_unknown_account_is_404(stripe_rail: StripeRail) -> None:
    with pytest.raises(BillingError) as info:
        await stripe_rail.connect_status("acct_missing")
    assert info.value.status == 404


async def _onboarded_account(rail: StripeRail, server: StripeServer) -> str:
    account_id = await rail.create_connect_account(OWNER)
    server.complete_onboarding(account_id)
    server.requests.clear()
    return account_id


async def test_transfer_to_connect_sends_idempotency_key(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    account_id = await _onboarded_account(stripe_rail, stripe_server)

    transfer_id = await stripe_rail.transfer_to_connect(
        account_id, 4200, "usd", "payout-w1", metadata={"withdrawal_id": "w1"}
    )

    assert stripe_server.transfers[transfer_id]["destination"] == account_id
    [req] = stripe_server.requests_to("POST", "/v1/transfers")
    assert req.headers["Idempotency-Key"] == "payout-w1"
    assert req.form == {
        "amount": "4200",
        "currency": "usd",
        "destination": account_id,
        "metadata": {"withdrawal_id": "w1"},
    }
    # The same key again is the same transfer, not a second payout.
    again = await stripe_rail.transfer_to_connect(
        account_id, 4200, "usd", "payout-w1", metadata={"withdrawal_id": "w1"}
    )
    assert again == transfer_id and len(stripe_server.transfers) == 1


async def test_refused_transfer_raises_payout_failed(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    account_id = await _onboarded_account(stripe_rail, stripe_server)
    stripe_server.fail_next_transfer()

    with pytest.raises(PayoutFailed) as info:
        await stripe_rail.transfer_to_connect(account_id, 4200, "usd", "payout-w2")

    assert info.value.stripe_code == "balance_insufficient"  # type: ignore[attr-defined]
    assert stripe_server.transfers == {}
    [req] = stripe_server.requests_to("POST", "/v1/transfers")
    assert req.status == 400


async def test_transfer_hitting_a_stripe_outage_is_outcome_unknown(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    account_id = await _onboarded_account(stripe_rail, stripe_server)
    stripe_server.fail_next_transfer(
        code="api_error", message="Internal error", status=500, error_type="api_error"
    )
    with pytest.raises(UpstreamRailError) as info:
        await stripe_rail.transfer_to_connect(
            account_id, 4200, "usd", "payout-w5", transfer_group="wd_5"
        )
    assert not isinstance(info.value, PayoutFailed)
    # Reconciling: nothing was transferred under that group.
    assert await stripe_rail.find_transfers("wd_5") == []

    # Once a transfer exists, the lookup finds it.
    tid = await stripe_rail.transfer_to_connect(
        account_id, 4200, "usd", "payout-w6", transfer_group="wd_6"
    )
    assert await stripe_rail.find_transfers("wd_6") == [tid]
    [lookup, _] = stripe_server.requests_to("GET", "/v1/transfers")
    assert lookup.query == {"transfer_group": "wd_5", "limit": "10"}


async def test_transfer_to_an_account_not_onboarded_raises_payout_failed(
    stripe_rail: StripeRail, stripe_server: StripeServer
) -> None:
    account_id = await stripe_rail.create_connect_account(OWNER)
    with pytest.raises(PayoutFailed):
        await stripe_rail.transfer_to_connect(account_id, 100, "usd", "payout-w3")
    assert stripe_server.transfers == {}


async def test_transfer_with_stripe_unreachable_is_outcome_unknown(
    stripe_server: StripeServer,
) -> None:
    config = rail_config_for(stripe_server)
    await stripe_server.close()  # nothing listens on that port any more
    async with StripeRail(config) as rail:
        with pytest.raises(UpstreamRailError) as info:
            await rail.transfer_to_connect("acct_x", 100, "usd", "payout-w4")
    # Not PayoutFailed: the caller must not reverse a debit it cannot prove unpaid.
    assert not isinstance(info.value, PayoutFailed)


# ----------------------------------------------------------------- the stand-in itself


def test_form_decoding_matches_stripe_bracket_encoding() -> None:
    pairs = [
        ("mode", "payment"),
        ("line_items[0][price_data][unit_amount]", "5"),
        ("line_items[0][quantity]", "1"),
        ("line_items[1][quantity]", "2"),
        ("metadata[owner_id]", "o"),
        ("payment_method_types[0]", "card"),
    ]
    assert parse_stripe_form(pairs) == {
        "mode": "payment",
        "line_items": [{"price_data": {"unit_amount": "5"}, "quantity": "1"}, {"quantity": "2"}],
        "metadata": {"owner_id": "o"},
        "payment_method_types": ["card"],
    }
