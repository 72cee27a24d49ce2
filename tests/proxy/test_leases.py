"""Balance leases: a hot buyer's calls admitted in memory, never past the balance.

The thief's questions, asked of leases: can a buyer whose balance is spread over
two workers' leases spend more than it has (it cannot: a lease is money that left
the wallet first); can a dead worker's lease be spent twice (it comes back only by
expiry, and a batch after the expiry posts nothing); does a refused buyer wait for
money that sits in another worker's lease (it is recalled) instead of getting a 402.
"""

from __future__ import annotations

import asyncio
import os
import signal

from prometheus_client import REGISTRY

from ledger import journal as j
from ledger.db import open_store
from tests.proxy.test_metering import _priced, ledger_verify
from tests.support.tollway import InProcess, free_port, start_inprocess, start_processes
from tests.support.upstream import Upstream

PRICE_UNITS = 10_000  # 0.01 USDC


def _commits() -> float:
    return REGISTRY.get_sample_value("tollway_ledger_commit_seconds_count") or 0.0


async def _calls(tw, base: str, sid: str, key: str, n: int, concurrency: int = 32) -> list[int]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with sem:
            async with tw.session.get(
                f"{base}/api/v1/proxy/{sid}/ok", headers={"Authorization": f"Bearer {key}"}
            ) as r:
                await r.read()
                return r.status

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _ledger(db_url: str, owner: str) -> dict[str, int]:
    s = open_store(db_url)
    await s.connect()
    try:
        return {
            "wallet": int(
                await s.fetchval(
                    "SELECT balance FROM accounts WHERE id = $1", j.wallet(owner, "USDC").id
                )
                or 0
            ),
            "charged": int(
                await s.fetchval(
                    "SELECT COALESCE(SUM(amount), 0) FROM usage_records WHERE buyer_id = $1", owner
                )
            ),
            "leases": int(await s.fetchval("SELECT COUNT(*) FROM holds WHERE kind = 'lease'")),
            "pending": int(await s.fetchval("SELECT COUNT(*) FROM holds WHERE status = 'pending'")),
            "expired_leases": int(
                await s.fetchval(
                    "SELECT COUNT(*) FROM holds WHERE kind = 'lease' AND status = 'expired'"
                )
            ),
            # What expired leases still held when they came back to the wallet.
            "expired_rest": int(
                await s.fetchval(
                    "SELECT COALESCE(SUM(amount - captured), 0) FROM holds"
                    " WHERE kind = 'lease' AND status = 'expired'"
                )
            ),
        }
    finally:
        await s.close()


async def test_balance_spread_over_two_workers_leases_never_overspends_even_when_one_dies(
    tmp_path, pg_url: str, redis_url: str, upstream: Upstream
):
    settings = dict(
        lease_after_calls=1,
        lease_calls=64,
        lease_share=2,  # each worker's lease may take half of what is left
        lease_ttl_seconds=5,
        lease_idle_seconds=1,
        hold_sweep_interval_seconds=0.5,
    )
    tw = await start_processes(pg_url, redis_url, str(tmp_path), instances=2, **settings)
    a, b = tw.bases  # type: ignore[attr-defined]
    try:
        sid, key = await _priced(tw, upstream, "0.01", credit="10.00")  # 1,000 calls' worth
        # Both workers lease part of the balance.
        first = await asyncio.gather(_calls(tw, a, sid, key, 100), _calls(tw, b, sid, key, 100))
        assert all(st == 200 for sts in first for st in sts)
        mid = await _ledger(pg_url, "buyer")
        assert mid["leases"] >= 2 and mid["pending"] >= 2, mid
        # Worker A dies with its lease outstanding; B keeps serving.
        os.kill(tw.procs[0].pid, signal.SIGKILL)
        tw.procs[0].wait(timeout=10)
        statuses = await _calls(tw, b, sid, key, 1200)
        assert statuses.count(402) > 0  # B ran out while A's lease was still out
        # A's lease expires back; B can spend that money, and no more.
        await asyncio.sleep(settings["lease_ttl_seconds"] + 2)
        more = await _calls(tw, b, sid, key, 400)
        assert set(statuses + more) <= {200, 402}
        assert more.count(200) > 0 and more.count(402) > 0
        await asyncio.sleep(settings["lease_idle_seconds"] + 1.5)  # B gives its leases back
        end = await _ledger(pg_url, "buyer")
    finally:
        await tw.close()
    r = ledger_verify(pg_url)
    assert r.returncode == 0, r.stdout
    # Never more than the balance: every charge is covered by money the wallet had.
    assert end["charged"] <= 10_000_000 and end["wallet"] >= 0
    assert end["wallet"] == 10_000_000 - end["charged"]
    assert end["wallet"] < PRICE_UNITS  # and what is left is less than one more call
    assert end["expired_leases"] >= 1 and end["pending"] == 0
    # Calls served and never charged are only those A admitted and had not posted
    # when it died: at most its lease's rest, which went back to the wallet.
    served = upstream.hits
    assert statuses.count(200) + more.count(200) + 200 == served
    assert 0 <= served - end["charged"] // PRICE_UNITS <= end["expired_rest"] // PRICE_UNITS


async def test_leased_calls_match_exact_holds_on_both_stores(
    tmp_path, db_url: str, upstream: Upstream
):
    """The same traffic with leases and with exact holds books the same charges,
    and the balance read through the API is exact after the calls."""
    tw = await start_inprocess(
        db_url, None, str(tmp_path), lease_after_calls=1, lease_calls=32, lease_idle_seconds=0.5
    )
    try:
        sid, key = await _priced(tw, upstream, "0.01", credit="5.00")  # 500 calls' worth
        statuses = await _calls(tw, tw.base, sid, key, 300)
        assert statuses.count(200) == 300
        st, wallet, _ = await tw.api("GET", "/api/v1/wallet/balance", key)
        assert st == 200
        usdc = next(x for x in wallet["balances"] if x["asset"] == "USDC")
        assert usdc["available_units"] == 5_000_000 - 300 * PRICE_UNITS
        assert usdc["leased_units"] > 0  # a lease is out: money still the buyer's
        st, usage, _ = await tw.api("GET", "/api/v1/usage/me", key)
        assert usage["total_calls"] == 300 and usage["total_spent_units"] == 300 * PRICE_UNITS
        # The rest: 200 calls, then 402s, never an overdraw.
        rest = await _calls(tw, tw.base, sid, key, 260)
        assert rest.count(200) == 200 and rest.count(402) == 60
        await asyncio.sleep(1.5)  # idle: the lease closes
        leases = await tw.rt.store.fetchval(
            "SELECT COUNT(*) FROM holds WHERE kind = 'lease' AND status = 'closed'"
        )
        assert leases >= 1
        assert (
            await tw.rt.store.fetchval("SELECT COUNT(*) FROM holds WHERE status = 'pending'") == 0
        )
    finally:
        await tw.close()
    r = ledger_verify(db_url)
    assert r.returncode == 0, r.stdout
    end = await _ledger(db_url, "buyer")
    assert end["wallet"] == 0 and end["charged"] == 5_000_000


async def test_free_tier_exact_across_two_instances_with_free_call_leases(
    tmp_path, db_url: str, redis_url: str, upstream: Upstream
):
    pg_url = db_url  # both stores: SQLite is one file shared by the two processes
    tw = await start_processes(
        db_url,
        redis_url if db_url.startswith("postgres") else None,
        str(tmp_path),
        instances=2,
        lease_after_calls=1,
        lease_calls=16,
        lease_share=2,
        lease_min_calls=4,
    )
    a, b = tw.bases  # type: ignore[attr-defined]
    try:
        sid, key = await _priced(tw, upstream, "0.10", free=120)
        sts = await asyncio.gather(_calls(tw, a, sid, key, 100), _calls(tw, b, sid, key, 100))
        flat = [s for x in sts for s in x]
        # Exactly the 120 free calls, wherever they landed; then 402 (no balance).
        assert flat.count(200) == 120 and flat.count(402) == 80, flat
        assert upstream.hits == 120
    finally:
        await tw.close()
    s = open_store(pg_url)
    await s.connect()
    try:
        leased = await s.fetchval("SELECT COUNT(*) FROM free_tier_leases")
        used = await s.fetchval("SELECT used FROM free_tier_usage")
    finally:
        await s.close()
    assert leased >= 2 and used == 120
    r = ledger_verify(pg_url)
    assert r.returncode == 0, r.stdout


async def test_a_refusal_is_remembered_until_money_arrives(tollway: InProcess, upstream: Upstream):
    sid, key = await _priced(tollway, upstream, "0.10")
    batches_before = _commits()
    statuses = await _calls(tollway, tollway.base, sid, key, 50, concurrency=1)
    assert statuses == [402] * 50
    # Refused from memory: one ledger round for 50 refusals in a row.
    assert _commits() - batches_before <= 2
    await tollway.credit("buyer", "1.00")
    assert await _calls(tollway, tollway.base, sid, key, 1) == [200]


async def test_failed_upstreams_under_a_lease_charge_nothing(
    tmp_path, db_url: str, upstream: Upstream
):
    """500, 503, a timeout and an unreachable upstream, each admitted from a lease:
    nothing is charged, the lease gets the money back, and so does the wallet."""
    tw = await start_inprocess(
        db_url,
        None,
        str(tmp_path),
        upstream_read_timeout=0.5,
        hold_ttl_seconds=30,
        lease_after_calls=1,
        lease_idle_seconds=0.5,
    )
    try:
        dead = free_port()  # nothing listens there
        p = await tw.key("prov", "provider")
        live = await tw.service(p, upstream.url, price="0.25")
        gone = await tw.service(p, f"http://127.0.0.1:{dead}", price="0.25")
        key = await tw.key("buyer")
        await tw.credit("buyer", "100.00")
        cases = [(live, "status/500", 500), (live, "status/503", 503)]
        cases += [(live, "slow?s=3", 504), (gone, "x", 502)]
        for sid, path, expected in cases:
            st, _, h = await tw.call(sid, path, key)
            assert st == expected
            if st in (500, 503):
                assert h["X-ACF-Amount"] == "0.00"
        store = tw.rt.store
        usage = await store.fetch("SELECT amount, hold_id FROM usage_records ORDER BY created_at")
        assert [u["amount"] for u in usage] == [0, 0, 0, 0]
        assert all(u["hold_id"].startswith("lse") for u in usage)  # all admitted from the lease
        assert await store.fetchval("SELECT SUM(captured) FROM holds WHERE kind = 'lease'") == 0
        await asyncio.sleep(1.5)  # idle: the lease closes and gives everything back
        assert await store.fetchval("SELECT COUNT(*) FROM holds WHERE status = 'pending'") == 0
        wallet = await store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("buyer", "USDC").id
        )
        assert wallet == 100_000_000
    finally:
        await tw.close()
    assert ledger_verify(db_url).returncode == 0
