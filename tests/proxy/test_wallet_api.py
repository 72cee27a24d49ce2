"""The wallet API's edge: own wallet only, pagination, decimal strings, error shapes,
and 503 answers when a rail is not configured. On SQLite and PostgreSQL."""

from __future__ import annotations

import json

from eth_account import Account

from ledger.verify import verify
from tests.support.stripe_server import StripeServer, stripe_server_fixture
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream

__all__ = ["stripe_server_fixture"]  # registers the ``stripe_server`` fixture here


async def test_balance_and_transactions_show_only_the_callers_wallet(
    tollway: InProcess, upstream: Upstream
) -> None:
    tw = tollway
    prov = await tw.key("prov", "provider")
    sid = await tw.service(prov, upstream.url, price="0.10")
    alice = await tw.key("alice")
    bob = await tw.key("bob")
    await tw.credit("alice", "2.00")
    await tw.credit("bob", "7.00")
    for _ in range(5):
        st, _, _ = await tw.call(sid, "ok", alice)
        assert st == 200

    st, body, _ = await tw.api("GET", "/api/v1/wallet/balance", alice)
    assert st == 200 and body["owner_id"] == "alice"
    (usdc,) = body["balances"]
    assert (usdc["asset"], usdc["available"], usdc["held"]) == ("USDC", "1.50", "0.00")
    # Newest first, ending with the admin credit (6 lines: under the limit of 10).
    assert [line["kind"] for line in body["recent"]] == ["hold"] * 5 + ["admin_credit"]
    assert all(line["account"] == "wallet" for line in body["recent"])

    # 1 credit + 5 x (hold) = 6 lines touching alice's wallet.
    st, page1, _ = await tw.api("GET", "/api/v1/wallet/transactions?page=1&page_size=4", alice)
    st, page2, _ = await tw.api("GET", "/api/v1/wallet/transactions?page=2&page_size=4", alice)
    assert page1["total"] == 6 and page1["has_more"] and not page2["has_more"]
    lines = page1["transactions"] + page2["transactions"]
    assert len(lines) == 6 and len({line["id"] for line in lines}) == 6
    assert sum(line["amount_units"] for line in lines) == 1_500_000
    assert lines[-1]["kind"] == "admin_credit" and lines[-1]["amount"] == "2.00"
    assert {line["amount"] for line in lines[:-1]} == {"-0.10"}

    # Bob sees his own wallet, never alice's lines.
    st, body, _ = await tw.api("GET", "/api/v1/wallet/transactions", bob)
    assert body["total"] == 1 and body["transactions"][0]["amount"] == "7.00"
    st, body, _ = await tw.api("GET", "/api/v1/wallet/balance", bob)
    assert body["balances"][0]["available"] == "7.00"

    # The provider's earnings show on the provider's own balance.
    st, body, _ = await tw.api("GET", "/api/v1/wallet/balance", prov)
    assert body["owner_id"] == "prov" and body["balances"][0]["earnings"] == "0.45"

    for path in ("/api/v1/wallet/balance", "/api/v1/wallet/transactions"):
        st, body, _ = await tw.api("GET", path)
        assert st == 401 and body["error"]["code"] == "unauthorized"
    st, body, _ = await tw.api("GET", "/api/v1/wallet/transactions?page_size=1000", alice)
    assert st == 400 and body["error"]["code"] == "invalid_query"
    report = await verify(tw.rt.store)
    assert report.ok, report.render()


async def test_unconfigured_rails_answer_503(tollway: InProcess) -> None:
    key = await tollway.key("carol")
    prov = await tollway.key("prov", "provider")
    cases = [
        (
            "POST",
            "/api/v1/wallet/deposit",
            key,
            {"tx_hash": "0x" + "ab" * 32},
            "evm_not_configured",
        ),
        (
            "POST",
            "/api/v1/wallet/withdraw",
            key,
            {"amount": "1.00", "to_address": Account.create().address},
            "evm_not_configured",
        ),
        (
            "POST",
            "/api/v1/wallet/withdraw",
            key,
            {"amount": "1.00", "method": "stripe_connect"},
            "stripe_not_configured",
        ),
        ("POST", "/api/v1/wallet/topup", key, {"amount": "1.00"}, "stripe_not_configured"),
        ("POST", "/api/v1/wallet/setup-payment-method", key, {}, "stripe_not_configured"),
        (
            "POST",
            "/api/v1/wallet/auto-topup",
            key,
            {"threshold": "1", "amount": "5"},
            "stripe_not_configured",
        ),
        ("POST", "/api/v1/stripe/webhook", None, {"id": "evt_1"}, "stripe_not_configured"),
        ("POST", "/api/v1/stripe/connect", prov, {}, "stripe_not_configured"),
        ("GET", "/api/v1/stripe/connect/status", prov, None, "stripe_not_configured"),
    ]
    for method, path, auth, body, code in cases:
        kw = {"json": body} if body is not None else {}
        st, data, _ = await tollway.api(method, path, auth, **kw)
        assert (st, data["error"]["code"]) == (503, code), (path, data)
        assert data["error"]["message"]


async def test_stripe_edge_validation_and_roles(
    db_url: str, tmp_path, stripe_server: StripeServer
) -> None:
    tw = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        stripe_api_key=stripe_server.api_key,
        stripe_webhook_secret=stripe_server.webhook_secret,
        stripe_api_base=stripe_server.url,
    )
    try:
        buyer = await tw.key("dora")
        for body, field in [
            ({"amount": "1.005"}, "amount"),  # not a whole cent
            ({"amount": 5.0}, "amount"),  # floats are never money
            ({"amount": "-1"}, "amount"),
            ({}, "amount"),
        ]:
            st, data, _ = await tw.api("POST", "/api/v1/wallet/topup", buyer, json=body)
            assert st == 422, data
            if field:
                assert data["error"].get("field", "amount") == field
        # Connect is for providers.
        st, data, _ = await tw.api("POST", "/api/v1/stripe/connect", buyer)
        assert st == 403 and data["error"]["code"] == "forbidden"
        # A Connect payout without an account is refused before any debit.
        prov = await tw.key("prov", "provider")
        await tw.credit("prov", "1.00")
        st, data, _ = await tw.api(
            "POST",
            "/api/v1/wallet/withdraw",
            prov,
            json={"amount": "1.00", "method": "stripe_connect"},
        )
        assert st == 409 and data["error"]["code"] == "connect_not_onboarded"
        # The webhook takes no key but refuses anything unsigned.
        st, data, _ = await tw.api(
            "POST", "/api/v1/stripe/webhook", data=json.dumps({"id": "evt_x", "type": "x"}).encode()
        )
        assert st == 400 and data["error"]["code"] == "invalid_webhook"
        # Auto top-up off by default; GET works before any configuration.
        st, data, _ = await tw.api("GET", "/api/v1/wallet/auto-topup", buyer)
        assert st == 200 and data == {"enabled": False}
        assert stripe_server.requests_to("POST", "/v1/checkout/sessions") == []
        report = await verify(tw.rt.store)
        assert report.ok, report.render()
    finally:
        await tw.close()


async def test_settlement_fields_of_a_withdrawal_are_checked_first(tollway: InProcess) -> None:
    """settlement_id / settlement_ids are validated before any rail or store work;
    naming settlements makes the source earnings, which only providers have."""
    prov = await tollway.key("prov", "provider")
    buyer = await tollway.key("bea")
    cases = [
        (prov, {"settlement_id": "stl_a", "settlement_ids": ["stl_b"]}, "settlement_ids"),
        (prov, {"settlement_ids": "stl_a"}, "settlement_ids"),
        (prov, {"settlement_ids": []}, "settlement_ids"),
        (prov, {"settlement_ids": ["stl_a", "stl_a"]}, "settlement_ids"),
        (prov, {"settlement_id": 7}, "settlement_ids"),
        (prov, {"settlement_id": "stl_a", "source": "wallet", "amount": "1.00"}, "settlement_ids"),
        (buyer, {"settlement_id": "stl_a"}, "source"),
    ]
    for auth, body, field in cases:
        st, data, _ = await tollway.api("POST", "/api/v1/wallet/withdraw", auth, json=body)
        assert (st, data["error"]["code"], data["error"].get("field")) == (
            422,
            "validation_error",
            field,
        ), (body, data)
    # From earnings the amount is optional (the settlements' net); the rail is checked next.
    st, data, _ = await tollway.api(
        "POST", "/api/v1/wallet/withdraw", prov, json={"settlement_id": "stl_a"}
    )
    assert (st, data["error"]["code"]) == (503, "evm_not_configured"), data
    report = await verify(tollway.rt.store)
    assert report.ok, report.render()
