"""Settlements: totals equal the ledger, no charge is ever settled twice, one payout each,
the growth-program fee is booked exactly, and the ledger verifies clean afterwards."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

from billing.settlements import MONTH_MS
from ledger import journal as j
from ledger import ops
from ledger.db import Store
from ledger.journal import now_ms
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream

DAY = 86_400_000


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ledger_verify(db_url: str) -> subprocess.CompletedProcess[str]:
    return cli("ledger", "verify", "--database-url", db_url)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat().replace("+00:00", "Z")


async def ledger_sums(
    store: Store, provider: str, usage_ids: list[str] | None = None
) -> dict[str, int]:
    """gross / call fee / provider share / count of the provider's posted charges, from the journal."""
    rows = await store.fetch(
        "SELECT u.id, t.kind, t.amount FROM usage_records u JOIN transfers t ON t.usage_id = u.id"
        " WHERE u.provider_id = $1 AND u.amount > 0 AND t.kind IN ('charge', 'fee')",
        provider,
    )
    sel = set(usage_ids) if usage_ids is not None else None
    out = {"gross": 0, "fee": 0, "share": 0}
    ids = set()
    for r in rows:
        if sel is not None and r["id"] not in sel:
            continue
        ids.add(r["id"])
        out["gross"] += int(r["amount"])
        out["fee" if r["kind"] == "fee" else "share"] += int(r["amount"])
    out["count"] = len(ids)
    return out


async def charged_ids(store: Store, provider: str) -> list[str]:
    return [
        r["id"]
        for r in await store.fetch(
            "SELECT id FROM usage_records WHERE provider_id = $1 AND amount > 0", provider
        )
    ]


async def balance(store: Store, account_id: str) -> int:
    return int(await store.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id) or 0)


async def test_settlement_totals_equal_the_ledger_and_never_double_count(
    tollway: InProcess, upstream: Upstream
):
    tw, store = tollway, tollway.rt.store
    p = await tw.key("prov", "provider")
    other = await tw.key("other", "provider")
    a = await tw.service(p, upstream.url, price="0.10")
    b = await tw.service(
        p, upstream.url, price="0.000015"
    )  # fee 1.5 units: rounds down at call time
    free = await tw.service(p, upstream.url, price="0.20", free=2)
    buyer = await tw.key("buyer")
    await tw.credit("buyer", "10.00")
    for sid, path, n in [(a, "ok", 6), (b, "ok", 4), (a, "status/500", 2), (free, "ok", 3)]:
        for _ in range(n):
            await tw.call(sid, path, buyer)
    first_batch = await charged_ids(store, "prov")
    assert len(first_batch) == 6 + 4 + 1  # failed calls and free-tier calls charge nothing

    now = now_ms()
    body = {"provider_id": "prov", "period_start": iso(now - DAY), "period_end": iso(now + DAY)}
    st, s1, _ = await tw.api("POST", "/api/v1/settlements", tw.admin, json=body)
    assert st == 201, s1
    want = await ledger_sums(store, "prov")
    assert (s1["total_units"], s1["fee_units"], s1["net_units"], s1["call_count"]) == (
        want["gross"],
        want["fee"],
        want["share"],
        want["count"],
    )
    assert s1["total_units"] == 6 * 100_000 + 4 * 15 + 200_000 and s1["total_amount"] == "0.80006"
    assert s1["status"] == "pending" and s1["fee_adjustment_units"] == 0

    # The same request again: the same settlement, nothing counted again.
    st, again, _ = await tw.api("POST", "/api/v1/settlements", tw.admin, json=body)
    assert st == 200 and again["id"] == s1["id"] and again["replayed"] is True
    assert again["call_count"] == s1["call_count"] and again["total_units"] == s1["total_units"]

    # New charges, then a wider, overlapping period: only the new ones.
    for _ in range(3):
        await tw.call(a, "ok", buyer)
    new_ids = sorted(set(await charged_ids(store, "prov")) - set(first_batch))
    assert len(new_ids) == 3
    wide = {
        "provider_id": "prov",
        "period_start": iso(now - 2 * DAY),
        "period_end": iso(now + 2 * DAY),
    }
    st, s2, _ = await tw.api("POST", "/api/v1/settlements", tw.admin, json=wide)
    assert st == 201, s2
    want2 = await ledger_sums(store, "prov", new_ids)
    assert (s2["total_units"], s2["fee_units"], s2["net_units"], s2["call_count"]) == (
        want2["gross"],
        want2["fee"],
        want2["share"],
        3,
    )

    # Yet another overlapping period (a month) finds nothing left.
    st, err, _ = await tw.api(
        "POST",
        "/api/v1/settlements",
        tw.admin,
        json={
            "provider_id": "prov",
            "period_start": iso(now - 20 * DAY),
            "period_end": iso(now + 20 * DAY),
        },
    )
    assert st == 422 and err["error"]["code"] == "nothing_to_settle"
    items = await store.fetch("SELECT usage_id, settlement_id FROM settlement_items")
    assert sorted(r["usage_id"] for r in items) == sorted(await charged_ids(store, "prov"))
    total = await ledger_sums(store, "prov")
    assert s1["total_units"] + s2["total_units"] == total["gross"]

    # Visibility: providers their own, admins all, buyers none; only admins create.
    assert (await tw.api("POST", "/api/v1/settlements", p, json=body))[0] == 403
    st, mine, _ = await tw.api("GET", "/api/v1/settlements", p)
    assert st == 200 and {x["id"] for x in mine["settlements"]} == {s1["id"], s2["id"]}
    st, theirs, _ = await tw.api("GET", "/api/v1/settlements", other)
    assert st == 200 and theirs["count"] == 0
    assert (await tw.api("GET", "/api/v1/settlements?provider_id=prov", other))[0] == 403
    assert (await tw.api("GET", f"/api/v1/settlements/{s1['id']}", other))[0] == 404
    st, all_, _ = await tw.api(
        "GET", "/api/v1/settlements?provider_id=prov&status=pending", tw.admin
    )
    assert st == 200 and all_["count"] == 2
    assert (await tw.api("GET", "/api/v1/settlements", buyer))[0] == 403

    # Paying: the payout posts once; twice is 409; unknown is 404.
    earn = j.earnings("prov", "USDC").id
    assert await balance(store, earn) == total["share"]
    st, paid, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "0xaa"}
    )
    assert st == 200 and paid == {
        "status": "completed",
        "payment_tx": "0xaa",
        "settlement_id": s1["id"],
        "net_amount": s1["net_amount"],
    }
    st, dup, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "0xbb"}
    )
    assert st == 409 and dup["error"]["code"] == "already_paid"
    assert (
        await tw.api(
            "PATCH", "/api/v1/settlements/stl_nope/pay", tw.admin, json={"payment_tx": "0x"}
        )
    )[0] == 404
    assert (
        await tw.api("PATCH", f"/api/v1/settlements/{s2['id']}/pay", p, json={"payment_tx": "0x"})
    )[0] == 403
    assert (await tw.api("PATCH", f"/api/v1/settlements/{s2['id']}/pay", tw.admin, json={}))[
        0
    ] == 422
    st, _, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s2['id']}/pay", tw.admin, json={"payment_tx": "0xcc"}
    )
    assert st == 200
    payouts = await store.fetch(
        "SELECT amount, idempotency_key FROM transfers WHERE kind = 'payout'"
    )
    assert sorted(r["idempotency_key"] for r in payouts) == sorted(
        [f"payout:{s1['id']}", f"payout:{s2['id']}"]
    )
    assert sum(int(r["amount"]) for r in payouts) == total["share"]
    assert await balance(store, earn) == 0
    st, listed, _ = await tw.api("GET", f"/api/v1/settlements/{s1['id']}", p)
    assert listed["status"] == "completed" and listed["payment_tx"] == "0xaa"

    r = ledger_verify(tw.rt.settings.database_url)
    assert r.returncode == 0, r.stdout


async def test_growth_program_fee_is_booked_exactly(db_url: str, tmp_path, upstream: Upstream):
    """Schedule 0% / 5% / 10% by 30-day month. The call-time split and the schedule
    can disagree; the difference is a transfer at settlement, in either direction."""
    sched = {"fee_schedule_bps": [0, 500, 1000]}
    tw = await start_inprocess(db_url, tmp=str(tmp_path), **sched)
    try:
        pa = await tw.key("prov_a", "provider")
        pb = await tw.key("prov_b", "provider")
        sa = await tw.service(pa, upstream.url, price="0.10")
        sb = await tw.service(pb, upstream.url, price="0.10")
        await tw.rt.store.execute(
            "UPDATE providers SET registered_at = $1 WHERE provider_id = 'prov_b'",
            now_ms() - 100 * DAY,
        )
    finally:
        await tw.close()
    # A restart loads prov_b's (backdated) registration: its calls pay 10% at call time.
    tw = await start_inprocess(db_url, tmp=str(tmp_path), **sched)
    try:
        store = tw.rt.store
        buyer = await tw.key("buyer")
        await tw.credit("buyer", "5.00")
        for sid in (sa, sa, sa, sb, sb):
            assert (await tw.call(sid, "ok", buyer))[0] == 200
        assert (await ledger_sums(store, "prov_a"))["fee"] == 0  # month 1: free
        assert (await ledger_sums(store, "prov_b"))["fee"] == 20_000
        # Registration records are corrected: prov_a is in its second month, prov_b in its first.
        reg_a = now_ms() - 45 * DAY
        await store.execute(
            "UPDATE providers SET registered_at = $1 WHERE provider_id = 'prov_a'", reg_a
        )
        await store.execute(
            "UPDATE providers SET registered_at = $1 WHERE provider_id = 'prov_b'", now_ms()
        )

        st, c, _ = await tw.api("GET", "/api/v1/admin/providers/prov_a/commission", tw.admin)
        assert st == 200 and c["registered"] is True
        assert (
            c["month_number"],
            c["current_rate"],
            c["current_rate_bps"],
            c["next_tier_rate"],
        ) == (2, "0.05", 500, "0.10")
        assert c["next_tier_date"] == iso(reg_a + 2 * MONTH_MS)[:19] + "Z"
        assert c["schedule_bps"] == [0, 500, 1000]
        assert (await tw.api("GET", "/api/v1/admin/providers/prov_a/commission", pa))[0] == 403
        st, c0, _ = await tw.api("GET", "/api/v1/admin/providers/nobody/commission", tw.admin)
        assert c0["registered"] is False and c0["current_rate"] == "0.10"

        fees_acct = j.fees("USDC").id
        now = now_ms()
        span = {"period_start": iso(now - DAY), "period_end": iso(now + DAY)}
        st, a, _ = await tw.api(
            "POST", "/api/v1/settlements", tw.admin, json={"provider_id": "prov_a", **span}
        )
        assert st == 201, a
        assert (a["total_units"], a["fee_units"], a["net_units"], a["fee_at_call_units"]) == (
            300_000,
            15_000,
            285_000,
            0,
        )
        assert a["fee_adjustment_units"] == 15_000 and a["platform_fee"] == "0.015"
        st, b, _ = await tw.api(
            "POST", "/api/v1/settlements", tw.admin, json={"provider_id": "prov_b", **span}
        )
        assert (b["total_units"], b["fee_units"], b["net_units"], b["fee_at_call_units"]) == (
            200_000,
            0,
            200_000,
            20_000,
        )
        assert b["fee_adjustment_units"] == -20_000
        # After settling, each provider's earnings hold exactly the net; fees exactly the fees.
        assert await balance(store, j.earnings("prov_a", "USDC").id) == 285_000
        assert await balance(store, j.earnings("prov_b", "USDC").id) == 200_000
        assert await balance(store, fees_acct) == 15_000
        kinds = {
            r["kind"]: int(r["amount"])
            for r in await store.fetch(
                "SELECT kind, amount FROM transfers WHERE kind IN ('settlement_fee', 'settlement_rebate')"
            )
        }
        assert kinds == {"settlement_fee": 15_000, "settlement_rebate": 20_000}
        for s in (a, b):
            st, _, _ = await tw.api(
                "PATCH",
                f"/api/v1/settlements/{s['id']}/pay",
                tw.admin,
                json={"payment_tx": "t-" + s["id"]},
            )
            assert st == 200
        assert await balance(store, j.earnings("prov_a", "USDC").id) == 0
        assert await balance(store, j.earnings("prov_b", "USDC").id) == 0
        assert await balance(store, j.world("USDC").id) == -5_000_000 + 485_000
    finally:
        await tw.close()
    r = ledger_verify(db_url)
    assert r.returncode == 0, r.stdout


async def _generate(
    store: Store, provider: str, n: int, month_start: int, price: int, fee: int
) -> None:
    """n posted charges spread over one 30-day window, through the real ledger operations."""
    await store.execute(
        "INSERT INTO providers (provider_id, registered_at) VALUES ($1, $2)"
        " ON CONFLICT (provider_id) DO NOTHING",
        provider,
        month_start - 400 * DAY,
    )
    buyer = f"gen_buyer_{provider}"
    async with store.transaction() as tx:
        await ops.credit(
            tx,
            ops.Credit(buyer, "USDC", price * n, "admin_credit", f"gen:{provider}:{month_start}"),
        )
    step = (28 * DAY) // n
    for lo in range(0, n, 500):

        async def batch(tx, lo=lo):
            for i in range(lo, min(n, lo + 500)):
                u = ops.Usage(
                    id=f"use_{provider}_{month_start}_{i:06d}",
                    buyer_id=buyer,
                    service_id=f"svc_{provider}",
                    provider_id=provider,
                    asset="USDC",
                    payment_method="prepaid",
                    upstream_status=200,
                    latency_ms=1.0,
                    created_at=month_start + i * step,
                )
                await ops.finish(
                    tx,
                    ops.Outcome(
                        usage=u,
                        mode="paid",
                        hold_id=None,
                        held=price,
                        charge=price,
                        fee=fee,
                        free_tier=False,
                    ),
                )

        async with store.transaction() as tx:
            await batch(tx)


async def test_cli_settles_a_large_ledger_with_a_progress_bar(store: Store, db_url: str):
    march = int(dt.datetime(2025, 3, 1, tzinfo=dt.UTC).timestamp() * 1000)
    april = int(dt.datetime(2025, 4, 1, tzinfo=dt.UTC).timestamp() * 1000)
    await _generate(store, "p_big", 2500, march, 70_000, 7_000)
    await _generate(store, "p_small", 40, march, 33_333, 3_333)
    await _generate(store, "p_big", 10, april, 70_000, 7_000)  # next month: not in this settlement

    r = cli("settle", "--period", "2025-03", "--database-url", db_url)
    assert r.returncode == 0, r.stderr
    assert "settling p_big [" in r.stderr and "] 2500/2500" in r.stderr and "#" * 30 in r.stderr
    lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines()}
    assert set(lines) == {"p_big", "p_small"}
    assert "2500 charges, gross 175.00, fee 17.50, net 157.50 USDC (pending)" in lines["p_big"]
    rows = {x["provider_id"]: x for x in await store.fetch("SELECT * FROM settlements")}
    assert int(rows["p_big"]["call_count"]) == 2500 and int(rows["p_small"]["call_count"]) == 40
    for pid in ("p_big", "p_small"):
        ids = [
            x["id"]
            for x in await store.fetch(
                "SELECT id FROM usage_records WHERE provider_id = $1 AND created_at >= $2 AND created_at < $3",
                pid,
                march,
                april,
            )
        ]
        want = await ledger_sums(store, pid, ids)
        got = rows[pid]
        assert (int(got["gross"]), int(got["fee"]), int(got["net"]), int(got["call_count"])) == (
            want["gross"],
            want["fee"],
            want["share"],
            want["count"],
        )

    again = cli("settle", "--period", "2025-03", "--database-url", db_url)
    assert again.returncode == 0 and again.stdout.strip() == "nothing to settle for 2025-03"
    one = cli("settle", "--period", "2025-03", "--provider", "p_big", "--database-url", db_url)
    assert one.returncode == 0 and "exists" in one.stdout and rows["p_big"]["id"] in one.stdout
    assert int(await store.fetchval("SELECT COUNT(*) FROM settlements")) == 2
    april_run = cli(
        "settle", "--period", "2025-04", "--provider", "p_big", "--database-url", db_url
    )
    assert "10 charges" in april_run.stdout
    assert cli("settle", "--period", "2025-3", "--database-url", db_url).returncode == 2
    r = ledger_verify(db_url)
    assert r.returncode == 0, r.stdout


async def test_concurrent_overlapping_settlements_never_share_a_charge(store: Store):
    """Six settlements of overlapping periods (two of them the same request) built at
    once, in small interleaved chunks: every charge lands in exactly one."""
    import asyncio

    from billing.settlements import FeePolicy, create_settlement

    def ms(*ymd: int) -> int:
        return int(dt.datetime(*ymd, tzinfo=dt.UTC).timestamp() * 1000)

    march, april = ms(2025, 3, 1), ms(2025, 4, 1)
    await _generate(store, "p_race", 600, march, 10_000, 1_000)
    periods = [
        (march, april),
        (march, ms(2025, 3, 15)),
        (ms(2025, 3, 10), april),
        (ms(2025, 1, 1), ms(2026, 1, 1)),
        (march, april),
        (ms(2025, 3, 20), ms(2025, 3, 25)),
    ]
    policy = FeePolicy(1000)
    results = await asyncio.gather(
        *(create_settlement(store, policy, "p_race", "USDC", a, b, chunk=25) for a, b in periods)
    )
    made = {r.settlement["id"]: r.settlement for r in results if r.settlement is not None}
    same = [results[0].settlement, results[4].settlement]  # the same request twice: one settlement
    assert same[0] is None and same[1] is None or same[0]["id"] == same[1]["id"]
    items = await store.fetch("SELECT usage_id, settlement_id, gross FROM settlement_items")
    assert len(items) == len({r["usage_id"] for r in items}) == 600
    for sid, s in made.items():
        mine = [r["usage_id"] for r in items if r["settlement_id"] == sid]
        want = await ledger_sums(store, "p_race", mine)
        assert (int(s["gross"]), int(s["fee"]), int(s["net"]), int(s["call_count"])) == (
            want["gross"],
            want["fee"],
            want["share"],
            want["count"],
        )
    assert sum(int(s["call_count"]) for s in made.values()) == 600
    assert all(s["status"] == "pending" for s in made.values())


async def test_payouts_of_earnings_take_unpaid_settlements_exactly_once(store: Store):
    """The billing rules under the withdrawal routes: which settlements a payout of
    earnings pays (named, or the oldest whose nets add up to its amount exactly),
    claimed with its debit, completed or released with its outcome; PATCH pay and a
    payout never both pay one settlement."""
    import pytest

    from billing import settlements as stl
    from billing.errors import BillingError
    from ledger.journal import Transfer, new_id

    def ms(*ymd: int) -> int:
        return int(dt.datetime(*ymd, tzinfo=dt.UTC).timestamp() * 1000)

    months = [ms(2025, 1, 1), ms(2025, 2, 1), ms(2025, 3, 1), ms(2025, 4, 1)]
    for m, n in zip(months[:3], (3, 2, 4), strict=True):
        await _generate(store, "p_pay", n, m, 10_000, 1_000)
    policy = stl.FeePolicy(1000)
    s1, s2, s3 = [
        (await stl.create_settlement(store, policy, "p_pay", "USDC", a, b)).settlement
        for a, b in zip(months, months[1:], strict=False)
    ]
    assert [int(s["net"]) for s in (s1, s2, s3)] == [27_000, 18_000, 36_000]
    earn = j.earnings("p_pay", "USDC")

    async def refused(code: str, **kw) -> None:
        with pytest.raises(BillingError) as e:
            await stl.plan_payout(store, "p_pay", "USDC", **kw)
        assert e.value.code == code, e.value.message

    assert await stl.plan_payout(store, "p_pay", "USDC") == stl.PayoutPlan((s1["id"],), 27_000)
    assert await stl.plan_payout(store, "p_pay", "USDC", amount=45_000) == stl.PayoutPlan(
        (s1["id"], s2["id"]), 45_000
    )
    assert await stl.plan_payout(
        store, "p_pay", "USDC", settlement_ids=[s3["id"], s2["id"]]
    ) == stl.PayoutPlan((s3["id"], s2["id"]), 54_000)
    await refused("no_matching_settlement", amount=18_000)  # s2 alone is not the oldest
    await refused("no_matching_settlement", amount=30_000)
    await refused("amount_mismatch", settlement_ids=[s1["id"]], amount=1)
    await refused("settlement_not_found", settlement_ids=["stl_nope"])
    with pytest.raises(BillingError) as e:
        await stl.plan_payout(store, "someone_else", "USDC", settlement_ids=[s1["id"]])
    assert e.value.code == "settlement_not_found"

    async def claim_and_debit(wid: str, plan: stl.PayoutPlan) -> None:
        async with store.transaction() as tx:
            await stl.claim_payout(tx, "p_pay", "USDC", wid, plan, now_ms())
            assert await tx.transfer(
                Transfer(
                    new_id("tr"),
                    earn,
                    j.world("USDC"),
                    plan.amount,
                    "connect_payout",
                    f"connect_payout:{wid}",
                ),
                guard=True,
            )

    async def status(s) -> tuple[str, str | None, str | None]:
        r = await stl.get(store, s["id"])
        return r["status"], r["withdrawal_id"], r["payment_tx"]

    plan = await stl.plan_payout(store, "p_pay", "USDC", amount=45_000)
    await claim_and_debit("wd_a", plan)
    assert await status(s1) == await status(s2) == ("paying", "wd_a", None)
    # Being paid: neither PATCH pay nor another payout may pay it, and a failed claim debits nothing.
    with pytest.raises(BillingError) as e:
        await stl.pay(store, s1["id"], "0xmanual", 6)
    assert e.value.code == "payout_in_progress"
    with pytest.raises(BillingError) as e:
        await claim_and_debit("wd_b", plan)
    assert e.value.code == "payout_in_progress"
    assert await balance(store, earn.id) == 36_000
    await refused("payout_in_progress", settlement_ids=[s2["id"]])
    # Failed: unpaid again (the caller returns the money in the same transaction).
    async with store.transaction() as tx:
        assert await stl.release_payout(tx, "wd_a") == 2
        await tx.transfer(
            Transfer(
                new_id("tr"),
                j.world("USDC"),
                earn,
                45_000,
                "connect_payout_reversal",
                "connect_reversal:wd_a",
            )
        )
    assert await status(s1) == ("pending", None, None)
    # Again, and made: completed with the payout's reference.
    await claim_and_debit("wd_c", plan)
    async with store.transaction() as tx:
        assert await stl.complete_payout(tx, "wd_c", "tr_123", now_ms(), 6) == 2
        assert await stl.release_payout(tx, "wd_c") == 0  # a completed payout is never released
    assert await status(s1) == await status(s2) == ("completed", "wd_c", "tr_123")
    with pytest.raises(BillingError) as e:
        await stl.pay(store, s2["id"], "0xmanual", 6)
    assert e.value.code == "already_paid" and "wd_c" in e.value.message
    assert await stl.payout_settlement_ids(store, ["wd_a", "wd_c", "wd_x"]) == {
        "wd_a": sorted([s1["id"], s2["id"]]),
        "wd_c": sorted([s1["id"], s2["id"]]),
        "wd_x": [],
    }
    # What is left: s3, paid outside Tollway; then nothing.
    await stl.pay(store, s3["id"], "wire", 6)
    await refused("no_unpaid_settlement")
    assert await balance(store, earn.id) == 0
    from ledger.verify import verify

    report = await verify(store)
    assert report.ok, report.render()
