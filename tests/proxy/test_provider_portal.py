"""The provider portal: every figure equals the ledger's for a generated history of calls,
before and after settlements and payouts; keys, endpoint tests and onboarding."""

from __future__ import annotations

import random
import socket
from typing import Any

from ledger import journal as j
from ledger.db import Store
from ledger.journal import now_ms
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream


async def ledger_revenue(store: Store, provider: str, service: str | None = None) -> int:
    """What buyers paid for the provider's calls, from the journal (charge + fee transfers)."""
    cond, args = (
        ("", [provider]) if service is None else (" AND u.service_id = $2", [provider, service])
    )
    return int(
        await store.fetchval(
            "SELECT COALESCE(SUM(t.amount), 0) FROM transfers t JOIN usage_records u ON u.id = t.usage_id"
            f" WHERE u.provider_id = $1 AND t.kind IN ('charge', 'fee'){cond}",
            *args,
        )
    )


async def ledger_share(store: Store, provider: str, since_usage: set[str] | None = None) -> int:
    rows = await store.fetch(
        "SELECT usage_id, amount FROM transfers WHERE credit_account = $1 AND kind = 'charge'",
        j.earnings(provider, "USDC").id,
    )
    return sum(
        int(r["amount"]) for r in rows if since_usage is None or r["usage_id"] in since_usage
    )


async def balance(store: Store, account: str) -> int:
    return int(await store.fetchval("SELECT balance FROM accounts WHERE id = $1", account) or 0)


async def generate(
    tw: InProcess, services: list[str], buyers: list[str], n: int, rng: random.Random
) -> dict[str, int]:
    """n calls: mostly served, some upstream failures (uncharged), some 404s (served, charged)."""
    outcomes = {"ok": 0, "fail": 0, "404": 0}
    for _ in range(n):
        sid, key = rng.choice(services), rng.choice(buyers)
        kind = rng.choices(["ok", "fail", "404"], weights=[8, 1, 1])[0]
        path = {"ok": "ok", "fail": "status/502", "404": "status/404"}[kind]
        st, _, _ = await tw.call(sid, path, key)
        assert st in (200, 404, 502)
        outcomes[kind] += 1
    return outcomes


async def test_portal_figures_equal_the_ledger(tollway: InProcess, upstream: Upstream):
    tw, store = tollway, tollway.rt.store
    rng = random.Random(6)
    p = await tw.key("prov", "provider")
    rival = await tw.key("rival", "provider")
    services = [
        await tw.service(p, upstream.url, price="0.10"),
        await tw.service(p, upstream.url, price="0.033333", free=3),
        await tw.service(p, upstream.url, price="1.5"),
    ]
    rival_sid = await tw.service(rival, upstream.url, price="0.20")
    buyers = []
    for i in range(4):
        buyers.append(await tw.key(f"buyer{i}"))
        await tw.credit(f"buyer{i}", "50.00")
    await generate(tw, services, buyers, 80, rng)
    await generate(tw, [rival_sid], buyers, 5, rng)

    async def check(expect_unsettled: int | None = None) -> dict[str, Any]:
        st, dash, _ = await tw.api("GET", "/api/v1/provider/dashboard", p)
        assert st == 200
        calls = int(
            await store.fetchval("SELECT COUNT(*) FROM usage_records WHERE provider_id = 'prov'")
        )
        assert dash["total_calls"] == calls == 80
        assert dash["total_revenue_units"] == await ledger_revenue(store, "prov")
        assert dash["total_services"] == 3 and dash["active_services"] == 3
        earn = await balance(store, j.earnings("prov", "USDC").id)
        u = dash["units"]
        assert u["balance"] == earn
        paid = int(
            await store.fetchval(
                "SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE kind = 'payout' AND debit_account = $1",
                j.earnings("prov", "USDC").id,
            )
        )
        assert u["paid_out"] == paid and u["earned"] == earn + paid
        assert u["balance"] == u["unsettled"] + u["settled_unpaid"]
        if expect_unsettled is not None:
            assert u["unsettled"] == expect_unsettled

        st, svcs, _ = await tw.api("GET", "/api/v1/provider/services", p)
        assert st == 200 and {s["id"] for s in svcs["services"]} == set(services)
        for s in svcs["services"]:
            n = int(
                await store.fetchval(
                    "SELECT COUNT(*) FROM usage_records WHERE service_id = $1", s["id"]
                )
            )
            assert s["total_calls"] == n
            assert s["total_revenue_units"] == await ledger_revenue(store, "prov", s["id"])
            st, a, _ = await tw.api("GET", f"/api/v1/provider/services/{s['id']}/analytics", p)
            assert (
                st == 200
                and a["total_calls"] == n
                and a["total_revenue_units"] == s["total_revenue_units"]
            )
            assert sum(d["calls"] for d in a["daily"]) == n
            assert sum(d["revenue_units"] for d in a["daily"]) == a["total_revenue_units"]
            row = await store.fetchrow(
                "SELECT COUNT(DISTINCT buyer_id) AS b, SUM(CASE WHEN upstream_status < 500 THEN 1 ELSE 0 END) AS ok"
                " FROM usage_records WHERE service_id = $1",
                s["id"],
            )
            assert a["unique_buyers"] == int(row["b"])
            assert a["success_rate"] == round(100.0 * int(row["ok"]) / n, 2)
        assert (
            sum(s["total_revenue_units"] for s in svcs["services"]) == dash["total_revenue_units"]
        )
        return dash

    before = await check()
    # Nothing settled yet: everything the provider earned at call time is pending.
    assert (
        before["units"]["unsettled"]
        == await ledger_share(store, "prov")
        == before["units"]["balance"]
    )

    st, s1, _ = await tw.api(
        "POST", "/api/v1/settlements", tw.admin, json={"provider_id": "prov", "period": _month()}
    )
    assert st == 201, s1
    settled_ids = {
        r["usage_id"] for r in await store.fetch("SELECT usage_id FROM settlement_items")
    }
    mid = await check(expect_unsettled=0)
    assert mid["units"]["settled_unpaid"] == s1["net_units"]

    # More traffic after the settlement: only it is pending.
    st, _, late = await tw.call(services[0], "ok", buyers[0])
    assert st == 200 and late["X-ACF-Amount"] == "0.10"
    new_ids = {
        r["id"]
        for r in await store.fetch(
            "SELECT id FROM usage_records WHERE provider_id = 'prov' AND amount > 0"
        )
    } - settled_ids
    assert new_ids == {late["X-ACF-Usage-Id"]}
    st, e, _ = await tw.api("GET", "/api/v1/provider/earnings", p)
    assert e["units"]["unsettled"] == await ledger_share(store, "prov", new_ids) > 0
    assert e["units"]["balance"] == e["units"]["unsettled"] + s1["net_units"]
    assert [x["id"] for x in e["settlements"]] == [s1["id"]]

    st, _, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "0xp"}
    )
    assert st == 200
    st, e, _ = await tw.api("GET", "/api/v1/provider/earnings", p)
    assert (
        e["units"]["paid_out"] == s1["net_units"] and e["units"]["settled_paid"] == s1["net_units"]
    )
    assert (
        e["units"]["balance"]
        == e["units"]["unsettled"]
        == await balance(store, j.earnings("prov", "USDC").id)
    )
    assert e["total_paid_out"] == s1["net_amount"] and e["settlements"][0]["status"] == "completed"

    # The rival's figures are its own.
    st, rd, _ = await tw.api("GET", "/api/v1/provider/dashboard", rival)
    assert rd["total_calls"] == 5 and rd["total_revenue_units"] == await ledger_revenue(
        store, "rival"
    )
    assert (await tw.api("GET", f"/api/v1/provider/services/{services[0]}/analytics", rival))[
        0
    ] == 403
    assert (await tw.api("GET", "/api/v1/provider/services/nope/analytics", p))[0] == 404
    assert (await tw.api("GET", "/api/v1/provider/dashboard", buyers[0]))[0] == 403
    assert (await tw.api("GET", "/api/v1/provider/dashboard", None))[0] == 401


def _month() -> str:
    import time

    return time.strftime("%Y-%m", time.gmtime(now_ms() / 1000))


async def test_keys_endpoint_test_and_onboarding(
    tollway: InProcess, upstream: Upstream, tmp_path, db_url: str
):
    tw = tollway
    p = await tw.key("prov", "provider")
    st, ob, _ = await tw.api("GET", "/api/v1/provider/onboarding", p)
    assert st == 200 and ob["completed_steps"] == 1 and ob["total_steps"] == 5
    assert (
        ob["steps"]["create_api_key"]["completed"]
        and not ob["steps"]["register_service"]["completed"]
    )

    # Keys: listed without secrets; a provider revokes its own, and it stops working at once.
    st, second, _ = await tw.api(
        "POST", "/api/v1/keys", tw.admin, json={"owner_id": "prov", "role": "provider"}
    )
    p2 = f"{second['key_id']}:{second['secret']}"
    other = await tw.key("other", "provider")
    st, ks, _ = await tw.api("GET", "/api/v1/provider/keys", p2)
    assert st == 200 and ks["count"] == 2
    assert all("secret" not in k and "secret_hash" not in k for k in ks["keys"])
    assert {k["key_id"] for k in ks["keys"]} == {p.split(":")[0], second["key_id"]}
    assert (await tw.api("DELETE", f"/api/v1/provider/keys/{other.split(':')[0]}", p))[0] == 403
    assert (await tw.api("DELETE", "/api/v1/provider/keys/acf_nope", p))[0] == 404
    st, rv, _ = await tw.api("DELETE", f"/api/v1/provider/keys/{second['key_id']}", p)
    assert st == 200 and rv == {"status": "revoked", "key_id": second["key_id"]}
    assert (await tw.api("GET", "/api/v1/provider/keys", p2))[0] == 401
    st, ks, _ = await tw.api("GET", "/api/v1/provider/keys", p)
    assert {k["key_id"]: k["status"] for k in ks["keys"]}[second["key_id"]] == "revoked"

    # Endpoint tests: reachable, unreachable, and refused by the SSRF policy.
    live = await tw.service(p, upstream.url + "/ok", price="0.10")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = await tw.service(p, f"http://127.0.0.1:{dead_port}", price="0.10")
    st, t, _ = await tw.api("POST", f"/api/v1/provider/services/{live}/test", p)
    assert st == 200 and t["reachable"] is True and t["status_code"] == 200 and t["error"] == ""
    st, t, _ = await tw.api("POST", f"/api/v1/provider/services/{dead}/test", p)
    assert st == 200 and t["reachable"] is False and t["status_code"] == 0 and t["error"]
    assert (await tw.api("POST", f"/api/v1/provider/services/{live}/test", other))[0] == 403
    strict = await start_inprocess(db_url, tmp=str(tmp_path), allow_private_upstreams=False)
    try:
        st, t, _ = await strict.api("POST", f"/api/v1/provider/services/{live}/test", p)
        assert st == 200 and t["reachable"] is False and "network policy" in t["error"]
    finally:
        await strict.close()
    assert upstream.hits == 1  # the refused test never reached it

    b = await tw.key("buyer")
    await tw.credit("buyer", "1.00")
    traffic = await tw.service(p, upstream.url, price="0.10")
    assert (await tw.call(traffic, "ok", b))[0] == 200
    st, _, _ = await tw.api(
        "POST", "/api/v1/settlements", tw.admin, json={"provider_id": "prov", "period": _month()}
    )
    assert st == 201
    st, ob, _ = await tw.api("GET", "/api/v1/provider/onboarding", p)
    assert ob["completed_steps"] == 5 and ob["completion_pct"] == 100.0
