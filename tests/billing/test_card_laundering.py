"""Card money cannot leave as earnings before it settles (second review of issue 10).

A stolen card tops up, is spent on the buyer's own (or a colluding) service, and
the operator's routine settlement runs: the charges paid with unsettled card
money are left out of the settlement until that money settles, so nothing can
be paid out from them; and an owner in debt takes nothing out of earnings.
"""

from __future__ import annotations

import asyncio
import time

from tests.billing.test_card_funds import (  # noqa: F401  (fixtures)
    Owner,
    deposit_address,
    hot_wallet,
    start,
    stripe_server_fixture,
    usdc,
)
from tests.billing.test_wallets import USDC


def _period(now: float) -> dict[str, str]:
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return {
        "period_start": time.strftime(fmt, time.gmtime(now - 3600)),
        "period_end": time.strftime(fmt, time.gmtime(now + 3600)),
    }


async def test_card_money_spent_on_own_service_is_not_settled_until_it_settles(
    start, stripe_server, chain, usdc, deposit_address, upstream
) -> None:
    tw = await start(fee_schedule_bps=[0, 1000], card_settle_seconds=3)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "launder")
    await o.topup("10.00")
    service = await tw.service(o.key, upstream.url, price="1.00")
    for _ in range(10):
        st, body, _ = await tw.call(service, "ok", o.key)
        assert st == 200, body
    assert await o.wallet() == 0
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/settlements",
        tw.admin,
        json={"provider_id": "launder", **_period(time.time())},
    )
    assert st == 422 and body["error"]["code"] == "nothing_to_settle", body
    await asyncio.sleep(3.2)  # the card money settles
    st, stl, _ = await tw.api(
        "POST",
        "/api/v1/settlements",
        tw.admin,
        json={"provider_id": "launder", **_period(time.time())},
    )
    assert st == 201 and stl["total_units"] == 10 * USDC and stl["call_count"] == 10, stl
    st, data, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        o.key,
        json={"source": "earnings", "settlement_id": stl["id"], "to_address": o.recipient},
    )
    assert st == 200 and data["withdrawal"]["status"] == "paid", data
    assert o.sent_on_chain() == 10 * USDC


async def test_an_owner_in_debt_takes_nothing_out_of_earnings(
    start, stripe_server, chain, usdc, deposit_address, upstream
) -> None:
    tw = await start(fee_schedule_bps=[0, 1000], card_settle_seconds=0)
    o = await Owner.make(tw, stripe_server, chain, usdc, deposit_address, "indebted")
    pi = await o.topup("10.00")
    service = await tw.service(o.key, upstream.url, price="1.00")
    for _ in range(10):
        assert (await tw.call(service, "ok", o.key))[0] == 200
    st, stl, _ = await tw.api(
        "POST",
        "/api/v1/settlements",
        tw.admin,
        json={"provider_id": "indebted", **_period(time.time())},
    )
    assert st == 201, stl
    dispute = stripe_server.open_dispute(pi)
    assert await o.deliver(stripe_server.dispute_created_event(dispute["id"])) == "reversed"
    assert await o.debt() == 10 * USDC
    st, data, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        o.key,
        json={"source": "earnings", "settlement_id": stl["id"], "to_address": o.recipient},
    )
    assert st == 403 and data["error"]["code"] == "wallet_frozen", data
    assert o.sent_on_chain() == 0
