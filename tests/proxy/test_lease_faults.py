"""Leases at their worst moments: one bad row in a batch, a commit whose answer is
lost, a worker cut off from the database, a long call holding a lease, a free call
in another worker's lease, streams whose size is known only at the end.

Each was found by an adversarial review (issue 12) and is kept here as the test
that fails if it comes back.
"""

from __future__ import annotations

import asyncio
import json
import time

from yarl import URL

from billing.lease_posting import post_op
from ledger import ops
from tests.proxy.test_metering import _priced, ledger_verify
from tests.support.tcp_fault import TcpFault
from tests.support.tollway import Client, start_inprocess
from tests.support.upstream import Upstream

HOT = dict(lease_after_calls=1, lease_calls=64)


async def _raw_get(base: str, path: str, key: str, request_id: bytes) -> int:
    """A request with a header value no client library would send (a non-UTF-8 byte)."""
    u = URL(base)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    writer.write(
        b"GET "
        + path.encode()
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\nX-Request-Id: "
        + request_id
        + b"\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1])


async def test_an_unstorable_request_id_costs_no_call_its_record(
    tmp_path, db_url: str, upstream: Upstream
):
    tw = await start_inprocess(db_url, None, str(tmp_path), **HOT)
    try:
        sid, key = await _priced(tw, upstream, "0.01", credit="1.00")
        path = f"/api/v1/proxy/{sid}/ok"

        async def honest(i: int) -> int:
            await asyncio.sleep(0.001 * i)
            return (await Client.call(tw, sid, "ok", key))[0]

        for _ in range(3):  # each round: one poisoned call and 20 honest ones, one batch
            sts = await asyncio.gather(
                _raw_get(tw.base, path, key, b"\xff\xfe"), *(honest(i) for i in range(20))
            )
            assert set(sts) == {200}, sts
            await tw.posted()
        rows = await tw.rt.store.fetchval("SELECT COUNT(*) FROM usage_records")
        charged = await tw.rt.store.fetchval("SELECT SUM(amount) FROM usage_records")
        assert upstream.hits == 63 and rows == 63 and charged == 63 * 10_000
        assert tw.rt.meter.leases.lost_calls == 0
    finally:
        await tw.close()
    assert ledger_verify(db_url).returncode == 0


async def test_a_batch_retried_after_its_commit_posts_nothing_twice(
    tmp_path, db_url: str, upstream: Upstream
):
    """A batch whose commit may have happened (the connection dropped) is retried with
    a check for its first row: the same batch posted again books nothing twice."""
    tw = await start_inprocess(db_url, None, str(tmp_path), **HOT)
    try:
        sid, key = await _priced(tw, upstream, "0.01", credit="1.00")
        for _ in range(5):
            await tw.call(sid, "ok", key)
        lease = next(iter(tw.rt.meter.leases._by_id.values()))
        svc = await tw.rt.services.get(sid)
        assert svc is not None
        t = tw.rt.meter._leased("buyer", svc, "use_retry_check")
        assert t is not None and t.lease is lease
        o = tw.rt.meter.outcome(
            t, upstream_status=200, latency_ms=1.0, bytes_in=0, bytes_out=2, request_id="r"
        )
        lease.in_flight -= 1  # posted by hand below instead of through the book
        expires = lease.expires_at_ms
        first = post_op(lease, [o], expires, [], maybe_posted=True)
        again = post_op(lease, [o], expires, [], maybe_posted=True)
        assert await tw.rt.writer.submit(first) is True
        assert await tw.rt.writer.submit(again) is True  # found posted: nothing booked
        n = await tw.rt.store.fetchval(
            "SELECT COUNT(*) FROM transfers WHERE usage_id = 'use_retry_check'"
        )
        captured = await tw.rt.store.fetchval("SELECT captured FROM holds WHERE id = $1", lease.id)
        charges = await tw.rt.store.fetchval(
            "SELECT SUM(amount) FROM transfers WHERE hold_id = $1 AND kind IN ('charge', 'fee')",
            lease.id,
        )
        assert n == 2 and captured == charges  # one charge and one fee, once
    finally:
        await tw.close()
    assert ledger_verify(db_url).returncode == 0


async def test_a_worker_cut_off_from_the_database_stops_admitting_from_its_lease(
    tmp_path, pg_url: str, upstream: Upstream
):
    settings = dict(
        lease_after_calls=1,
        lease_calls=64,
        lease_share=2,
        lease_ttl_seconds=5,
        lease_idle_seconds=2,
        hold_sweep_interval_seconds=0.5,
    )
    fault = await TcpFault("127.0.0.1", 5432).start()
    a_url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{fault.port}")
    a = await start_inprocess(a_url, None, str(tmp_path), **settings)
    b = await start_inprocess(pg_url, None, str(tmp_path), **settings)
    try:
        sid, key = await _priced(b, upstream, "0.01", credit="1.00")  # 100 calls' worth
        assert (await a.call(sid, "ok", key))[0] == 200  # A leases half
        await fault.cut()  # A's batches can no longer commit
        a_ok = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < settings["lease_ttl_seconds"] + 2:
            st, _, _ = await Client.call(a, sid, "ok", key)
            a_ok += st == 200
            await asyncio.sleep(0.1)
        # B spends everything the wallet has, including A's lease once it expired back.
        b_sts = [(await b.call(sid, "ok", key))[0] for _ in range(120)]
        assert b_sts.count(402) > 0
        charged = await b.rt.store.fetchval("SELECT SUM(amount) FROM usage_records")
    finally:
        await a.close()  # still cut off: what it could not post expires back
        await b.close()
        await fault.close()
    assert charged <= 1_000_000  # never more than the balance
    # A admitted from memory only until its batches stalled (about a second, at
    # 10 calls/s), not for the lease's whole life: the calls it served unposted
    # are the whole loss, and the buyer never spent money it did not have.
    assert a_ok <= 15, a_ok
    assert ledger_verify(pg_url).returncode == 0


async def test_a_recalled_lease_gives_back_what_its_calls_did_not_take(
    tmp_path, pg_url: str, upstream: Upstream
):
    s = dict(lease_after_calls=1, lease_calls=64, lease_share=2, lease_min_calls=8)
    a = await start_inprocess(pg_url, None, str(tmp_path), **s)
    b = await start_inprocess(pg_url, None, str(tmp_path), **s)
    b.admin = a.admin
    try:
        sid, key = await _priced(a, upstream, "0.01", credit="0.20")  # 20 calls' worth
        long = asyncio.create_task(Client.call(b, sid, "slow?s=6", key))  # B leases 10
        await asyncio.sleep(0.5)
        sts = [(await a.call(sid, "ok", key))[0] for _ in range(19)]
        # A spends its share, then recalls B's lease: B keeps the one call in
        # flight and gives the other nine calls' worth back at once.
        assert sts == [200] * 19, sts
        st, _, h = await long
        assert st == 200 and h["X-ACF-Amount"] == "0.01"
        assert (await a.call(sid, "ok", key))[0] == 402  # all 20 spent, none more
    finally:
        await a.close()
        await b.close()
    assert ledger_verify(pg_url).returncode == 0


async def test_free_calls_in_another_lease_do_not_turn_a_paid_call_into_a_402(
    tmp_path, upstream: Upstream
):
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/t.db",
        None,
        str(tmp_path),
        lease_after_calls=1,
        lease_calls=16,
        lease_share=2,
        lease_min_calls=4,
    )
    try:
        sid, key = await _priced(tw, upstream, "0.01", free=20, credit="1.00")
        slow = [asyncio.create_task(tw.call(sid, "slow?s=4", key)) for _ in range(10)]
        await asyncio.sleep(0.3)
        quick = [(await tw.call(sid, "ok", key))[0] for _ in range(10)]
        assert quick == [200] * 10
        # The free calls are all taken (some by calls still running): this one is paid.
        st, body, h = await tw.call(sid, "ok", key)
        assert st == 200, json.loads(body)
        assert h["X-ACF-Amount"] == "0.01" and h["X-ACF-Free-Tier"] == "false"
        assert [r[0] for r in await asyncio.gather(*slow)] == [200] * 10
        used = await tw.rt.store.fetchval("SELECT used FROM free_tier_usage")
        assert used == 20
    finally:
        await tw.close()


async def test_leased_streams_record_the_bytes_they_sent(tmp_path, db_url: str, upstream: Upstream):
    tw = await start_inprocess(db_url, None, str(tmp_path), **HOT)
    try:
        sid, key = await _priced(tw, upstream, "0.01", credit="1.00")
        for _ in range(3):
            st, body, _ = await tw.call(sid, "sse", key)
            assert st == 200
        rows = await tw.rt.store.fetch("SELECT hold_id, bytes_out FROM usage_records")
        assert len(rows) == 3 and all(r["bytes_out"] == len(body) for r in rows)
        assert any(r["hold_id"].startswith("lse") for r in rows)  # leased calls among them
    finally:
        await tw.close()


def test_outcome_modes_are_known():
    assert ops.LEASED != ops.HELD and ops.FREE_LEASED != ops.FREE
