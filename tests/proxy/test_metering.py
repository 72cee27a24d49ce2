"""Metering acceptance: exact charges under concurrency, across processes, through crashes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import aiohttp
import pytest

from ledger import journal as j
from ledger.db import open_store
from tests.support import services
from tests.support.tollway import (
    Client,
    InProcess,
    spawn,
    start_inprocess,
    start_processes,
    wait_healthy,
)
from tests.support.upstream import Upstream


def ledger_verify(db_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "ledger", "verify", "--database-url", db_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def wallet_balance(db_url: str, owner: str) -> int:
    s = open_store(db_url)
    await s.connect()
    try:
        return int(
            await s.fetchval(
                "SELECT balance FROM accounts WHERE id = $1", j.wallet(owner, "USDC").id
            )
            or 0
        )
    finally:
        await s.close()


async def _spread(
    tw: Client, bases: list[str], sid: str, path: str, key: str, n: int, **kw
) -> list[tuple[int, bytes, dict]]:
    async def one(i: int):
        base = bases[i % len(bases)]
        async with tw.session.get(
            f"{base}/api/v1/proxy/{sid}/{path}",
            headers={"Authorization": f"Bearer {key}", **kw.get("headers", {})},
        ) as r:
            return r.status, await r.read(), dict(r.headers)

    return await asyncio.gather(*(one(i) for i in range(n)))


async def _priced(
    tw: Client,
    up: Upstream,
    price: str,
    free: int = 0,
    credit: str | None = None,
    rate_limit: int = 100_000,
):
    p = await tw.key("prov", "provider")
    sid = await tw.service(p, up.url, price=price, free=free)
    b = await tw.key("buyer", rate_limit=rate_limit)
    if credit:
        await tw.credit("buyer", credit)
    return sid, b


async def test_two_processes_never_overdraw(
    tmp_path, db_url: str, redis_url: str, upstream: Upstream
):
    """Two instances, leases on (the defaults): 100 calls' worth, 200 calls, on both stores."""
    pg_url = db_url  # the name the body below uses; SQLite too (one file, two processes)
    redis = redis_url if db_url.startswith("postgres") else None
    tw = await start_processes(db_url, redis, str(tmp_path), instances=2)
    try:
        sid, b = await _priced(tw, upstream, "0.10", credit="10.00")
        results = await _spread(tw, tw.bases, sid, "ok", b, 200)  # type: ignore[attr-defined]
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 100 and statuses.count(402) == 100, statuses
        assert upstream.hits == 100
        for st, body, h in results:
            if st == 402:
                assert json.loads(body)["error"]["code"] == "payment_required"
            else:
                assert h["X-ACF-Amount"] == "0.10" and h["X-ACF-Free-Tier"] == "false"
        assert await wallet_balance(pg_url, "buyer") == 0
    finally:
        await tw.close()
    r = ledger_verify(pg_url)
    assert r.returncode == 0, r.stdout
    s = open_store(db_url)
    await s.connect()
    try:  # the calls were admitted from leases (balance 100 calls' worth, hot buyer)
        assert await s.fetchval("SELECT COUNT(*) FROM holds WHERE kind = 'lease'") >= 1
    finally:
        await s.close()


async def test_one_process_on_sqlite_never_overdraws(tollway_sqlite: InProcess, upstream: Upstream):
    tw = tollway_sqlite
    sid, b = await _priced(tw, upstream, "0.10", credit="10.00")
    results = await _spread(tw, [tw.base], sid, "ok", b, 200)
    statuses = [r[0] for r in results]
    assert statuses.count(200) == 100 and statuses.count(402) == 100
    assert upstream.hits == 100
    url = tw.rt.settings.database_url
    assert (
        await tw.rt.store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("buyer", "USDC").id
        )
        == 0
    )
    r = ledger_verify(url)
    assert r.returncode == 0, r.stdout


async def test_free_tier_of_50_gives_exactly_50(tollway: InProcess, upstream: Upstream):
    sid, b = await _priced(tollway, upstream, "0.10", free=50)
    results = await _spread(tollway, [tollway.base], sid, "ok", b, 200)
    free = [r for r in results if r[0] == 200 and r[2]["X-ACF-Free-Tier"] == "true"]
    assert len(free) == 50
    assert sum(1 for r in results if r[0] == 402) == 150
    assert upstream.hits == 50
    st, usage, _ = await tollway.api("GET", "/api/v1/usage/me", b)
    assert (
        usage["total_calls"] == 50
        and usage["free_tier_calls"] == 50
        and usage["total_spent_usd"] == "0.00"
    )


async def test_failed_upstreams_charge_nothing(tmp_path, db_url: str, upstream: Upstream):
    tw = await start_inprocess(
        db_url, tmp=str(tmp_path), upstream_read_timeout=0.5, hold_ttl_seconds=30
    )
    try:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        p = await tw.key("prov", "provider")
        live = await tw.service(p, upstream.url, price="0.25")
        gone = await tw.service(p, f"http://127.0.0.1:{dead}", price="0.25")
        b = await tw.key("buyer")
        await tw.credit("buyer", "1.00")
        cases = [
            (live, "status/500", 500),
            (live, "status/503", 503),
            (live, "slow?s=3", 504),
            (gone, "x", 502),
        ]
        for sid, path, expected in cases:
            st, _, h = await tw.call(sid, path, b)
            assert st == expected
            if st in (500, 503):
                assert h["X-ACF-Amount"] == "0.00"
        store = tw.rt.store
        assert (
            await store.fetchval(
                "SELECT balance FROM accounts WHERE id = $1", j.wallet("buyer", "USDC").id
            )
            == 1_000_000
        )
        holds = await store.fetch("SELECT status FROM holds")
        assert [h["status"] for h in holds] == ["voided"] * 4
        usage = await store.fetch(
            "SELECT amount, outcome, upstream_status FROM usage_records ORDER BY created_at"
        )
        assert [u["amount"] for u in usage] == [0, 0, 0, 0]
        assert [u["upstream_status"] for u in usage] == [500, 503, None, None]
        # a 4xx is an answer: it is charged
        st, _, h = await tw.call(live, "status/404", b)
        assert st == 404 and h["X-ACF-Amount"] == "0.25"
    finally:
        await tw.close()
    assert ledger_verify(db_url).returncode == 0


async def test_a_body_the_upstream_breaks_off_is_not_charged(
    tmp_path, db_url: str, upstream: Upstream
):
    """200 with Content-Length 1000 and 100 bytes sent, or a chunked stream without its
    end: the upstream failed, so the hold is voided. A complete body is charged."""
    tw = await start_inprocess(db_url, tmp=str(tmp_path))
    try:
        p = await tw.key("prov", "provider")
        sid = await tw.service(p, upstream.url, price="0.25")
        b = await tw.key("buyer")
        await tw.credit("buyer", "1.00")
        for path in ("broken", "broken?chunked=1"):
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await tw.call(sid, path, b)
        st, _, _ = await tw.call(sid, "ok", b)
        assert st == 200
        store = tw.rt.store
        usage = await store.fetch(
            "SELECT amount, upstream_status FROM usage_records ORDER BY created_at"
        )
        assert [(u["amount"], u["upstream_status"]) for u in usage] == [
            (0, 502),
            (0, 502),
            (250_000, 200),
        ]
        balance = await store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("buyer", "USDC").id
        )
        assert balance == 750_000
        holds = await store.fetch("SELECT status FROM holds ORDER BY created_at")
        assert [h["status"] for h in holds] == ["voided", "voided", "posted"]
    finally:
        await tw.close()
    assert ledger_verify(db_url).returncode == 0


async def test_rate_limit_across_two_instances(
    tmp_path, pg_url: str, redis_url: str, upstream: Upstream
):
    tw = await start_processes(pg_url, redis_url, str(tmp_path), instances=2)
    try:
        sid, b = await _priced(tw, upstream, "0", rate_limit=60)
        results = await _spread(tw, tw.bases, sid, "ok", b, 300)  # type: ignore[attr-defined]
        passed = [r for r in results if r[0] == 200]
        limited = [r for r in results if r[0] == 429]
        assert len(passed) <= 60 and len(passed) + len(limited) == 300
        assert len(passed) >= 55  # the limit is a limit, not a refusal of everything
        for _st, body, h in limited:
            assert int(h["Retry-After"]) >= 1
            assert re.fullmatch(r'"key";r=\d+;t=\d+', h["RateLimit"]), h["RateLimit"]
            assert h["RateLimit-Policy"] == '"key";q=60;w=60'
            assert json.loads(body)["error"]["code"] == "rate_limited"
    finally:
        await tw.close()


async def test_redis_down_falls_back_to_local_limits(tmp_path, upstream: Upstream):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/r.db", f"redis://127.0.0.1:{dead}/0", tmp=str(tmp_path)
    )
    try:
        sid, b = await _priced(tw, upstream, "0", rate_limit=10)
        results = await _spread(tw, [tw.base], sid, "ok", b, 40)
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 10 and statuses.count(429) == 30
        st, health, _ = await tw.api("GET", "/health")
        assert health["redis"] == "down" and health["status"] == "ok"
        async with tw.session.get(tw.base + "/metrics") as r:
            text = await r.text()
        assert _metric(text, "tollway_ratelimit_fallback_total") >= 40
    finally:
        await tw.close()


async def test_idempotency_key_charges_once(tollway: InProcess, upstream: Upstream):
    sid, b = await _priced(tollway, upstream, "0.10", credit="10.00")
    results = await _spread(
        tollway, [tollway.base], sid, "ok", b, 20, headers={"Idempotency-Key": "order-42"}
    )
    ok = [r for r in results if r[0] == 200]
    conflicts = [r for r in results if r[0] == 409]
    assert len(ok) == 1 and len(conflicts) == 19
    assert upstream.hits == 1
    usage_id = ok[0][2]["X-ACF-Usage-Id"]
    # after completion, a duplicate names the original usage
    st, body, _ = await tollway.call(sid, "ok", b, headers={"Idempotency-Key": "order-42"})
    assert st == 409 and json.loads(body)["error"]["usage_id"] == usage_id
    store = tollway.rt.store
    assert await store.fetchval("SELECT COUNT(*) FROM transfers WHERE kind = 'charge'") == 1
    assert (
        await store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("buyer", "USDC").id
        )
        == 9_900_000
    )
    # another buyer may use the same key
    b2 = await tollway.key("buyer2")
    await tollway.credit("buyer2", "1.00")
    st, _, _ = await tollway.call(sid, "ok", b2, headers={"Idempotency-Key": "order-42"})
    assert st == 200
    # a failed call releases its key so the client can retry
    st, _, _ = await tollway.call(sid, "status/502", b, headers={"Idempotency-Key": "order-43"})
    assert st == 502
    st, _, _ = await tollway.call(sid, "ok", b, headers={"Idempotency-Key": "order-43"})
    assert st == 200


@pytest.mark.parametrize(
    "mode",
    ["exact-holds-postgres", "leases-postgres", "leases-sqlite"],
)
async def test_sigkill_mid_traffic_leaves_a_clean_ledger(
    mode: str, tmp_path, redis_url: str, upstream: Upstream
):
    """1,000 paid calls, 50 at a time, and a SIGKILL after 300: with exact holds, and
    with balance leases outstanding (a lease from the first call on), on both stores."""
    leased = mode.startswith("leases")
    db_url = (
        f"sqlite:///{tmp_path}/tollway.db"
        if mode.endswith("sqlite")
        else await services.create_pg_database()
    )
    settings = dict(
        upstream_connect_timeout=1,
        upstream_read_timeout=2,
        hold_ttl_seconds=4,
        hold_sweep_interval_seconds=0.5,
        lease_calls=64 if leased else 0,
        lease_after_calls=1,
        lease_ttl_seconds=5,
        lease_idle_seconds=1,
    )
    expiry = max(settings["hold_ttl_seconds"], settings["lease_ttl_seconds"])
    redis = redis_url if db_url.startswith("postgres") else None
    tw = await start_processes(db_url, redis, str(tmp_path), **settings)
    try:
        sid, b = await _priced(tw, upstream, "0.001", credit="100.00")
        total, concurrency = 1000, 50
        started = completed = 0
        in_flight_at_kill = None
        statuses: list[int] = []
        sem = asyncio.Semaphore(concurrency)
        proc = tw.procs[0]

        async def one(i: int):
            nonlocal started, completed, in_flight_at_kill
            async with sem:
                started += 1
                try:
                    async with tw.session.get(
                        f"{tw.base}/api/v1/proxy/{sid}/ok", headers={"Authorization": f"Bearer {b}"}
                    ) as r:
                        await r.read()
                        statuses.append(r.status)
                except (TimeoutError, aiohttp.ClientError):
                    statuses.append(-1)
                finally:
                    completed += 1
                if completed == 300 and in_flight_at_kill is None:
                    in_flight_at_kill = started - completed
                    os.kill(proc.pid, signal.SIGKILL)

        await asyncio.gather(*(one(i) for i in range(total)))
        proc.wait(timeout=10)
        served_by_upstream = upstream.hits
        # restart and wait past the expiry so the sweeper gives back the orphans
        env = dict(tw.env)
        tw.procs.append(spawn(env, os.path.join(str(tmp_path), "restart.log")))
        await wait_healthy(tw.base, procs=tw.procs[1:])
        await asyncio.sleep(expiry + 2)
        async with tw.session.get(tw.base + "/metrics") as r:
            text = await r.text()
            expired_metric = _metric(text, "tollway_holds_expired_total")
            leases_expired_metric = _metric(text, "tollway_leases_expired_total")
    finally:
        await tw.close()
    try:
        r = ledger_verify(db_url)
        assert r.returncode == 0, r.stdout
        s = open_store(db_url)
        await s.connect()
        try:
            charged = int(await s.fetchval("SELECT COUNT(*) FROM usage_records WHERE amount > 0"))
            double = await s.fetch(
                "SELECT usage_id, COUNT(*) FROM transfers WHERE kind = 'charge'"
                " GROUP BY usage_id HAVING COUNT(*) > 1"
            )
            charge_sum = int(
                await s.fetchval(
                    "SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE kind IN ('charge', 'fee')"
                )
            )
            pending = int(await s.fetchval("SELECT COUNT(*) FROM holds WHERE status = 'pending'"))
            expired = int(
                await s.fetchval(
                    "SELECT COUNT(*) FROM holds WHERE status = 'expired' AND kind = 'call'"
                )
            )
            leases_expired = int(
                await s.fetchval(
                    "SELECT COUNT(*) FROM holds WHERE status = 'expired' AND kind = 'lease'"
                )
            )
            # What the dead worker's leases still held when they expired back.
            expired_rest = int(
                await s.fetchval(
                    "SELECT COALESCE(SUM(amount - captured), 0) FROM holds"
                    " WHERE status = 'expired' AND kind = 'lease'"
                )
            )
            wallet = int(
                await s.fetchval(
                    "SELECT balance FROM accounts WHERE id = $1", j.wallet("buyer", "USDC").id
                )
            )
        finally:
            await s.close()
    finally:
        if db_url.startswith("postgres"):
            await services.drop_pg_database(db_url)
    assert in_flight_at_kill is not None
    assert not double
    assert charged <= served_by_upstream
    # Calls served but never charged: in flight at the kill, or (with leases) admitted
    # from a lease of the dead worker and not yet posted, whose money the lease gave back.
    lost_bound = in_flight_at_kill + expired_rest // 1000
    assert charged >= served_by_upstream - lost_bound, (
        charged,
        served_by_upstream,
        in_flight_at_kill,
        expired_rest,
    )
    assert charge_sum == charged * 1000
    assert wallet == 100_000_000 - charge_sum  # the buyer has every unit not charged
    assert pending == 0
    assert expired == expired_metric  # the restarted process voided the orphans and counted them
    assert leases_expired == leases_expired_metric
    if leased:
        assert leases_expired >= 1  # the dead worker's leases came back by expiry
    else:
        assert leases_expired == 0
    assert statuses.count(200) <= charged + (served_by_upstream - charged)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


async def test_metrics_are_whole_with_two_workers(
    tmp_path, pg_url: str, redis_url: str, upstream: Upstream
):
    tw = await start_processes(pg_url, redis_url, str(tmp_path), workers=2)
    try:
        sid, b = await _priced(tw, upstream, "0.01", credit="0.50", rate_limit=80)
        results = await _spread(tw, [tw.base], sid, "ok", b, 100)
        statuses = [r[0] for r in results]
        charged, unpaid, limited = statuses.count(200), statuses.count(402), statuses.count(429)
        assert charged == 50 and limited == 20 and unpaid == 30, statuses
        for _ in range(6):  # whichever worker answers, the counts are whole
            async with tw.session.get(tw.base + "/metrics", headers={"Connection": "close"}) as r:
                text = await r.text()
            assert _metric(text, "tollway_requests_total", service=sid, outcome="charged") == 50
            assert (
                _metric(text, "tollway_requests_total", service=sid, outcome="payment_required")
                == 30
            )
            assert _metric(text, "tollway_rate_limited_total", limit="key") == 20
            assert _metric(text, "tollway_charged_units_total", asset="USDC") == 50 * 10_000
            assert _metric(text, "tollway_upstream_latency_seconds_count") == 50
            assert _metric(text, "tollway_proxy_overhead_seconds_count") == 50
            assert _metric(text, "tollway_ledger_batch_size_count") >= 1
            assert (
                _metric(text, "tollway_ledger_batch_size_sum") >= 130
            )  # begin + finish for the calls, credit
            assert _metric(text, "tollway_ledger_commit_seconds_count") >= 1
            assert "tollway_ledger_queue_depth" in text
            assert "tollway_holds_expired_total" in text
    finally:
        await tw.close()


async def test_a_full_ledger_queue_answers_503_never_500(tmp_path, upstream: Upstream):
    """Overload: past ledger_queue_max waiting operations a call is refused at once with
    503 and Retry-After (bounded memory, an honest answer), and the books stay whole."""
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/q.db", tmp=str(tmp_path), ledger_queue_max=4, ledger_batch_max=1
    )
    try:
        sid, b = await _priced(tw, upstream, "0.01", credit="10.00")
        results = await _spread(tw, [tw.base], sid, "ok", b, 200)
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 503}, set(statuses)
        assert statuses.count(503) > 0 and statuses.count(200) > 0
        for st, body, h in results:
            if st == 503:
                assert (
                    h["Retry-After"] == "1" and json.loads(body)["error"]["code"] == "ledger_busy"
                )
        served = statuses.count(200)
        balance = await tw.rt.store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("buyer", "USDC").id
        )
        assert int(balance) == 10_000_000 - 10_000 * served
    finally:
        await tw.close()
    assert ledger_verify(f"sqlite:///{tmp_path}/q.db").returncode == 0
