"""Concurrent first use of a fresh database never deadlocks a caller (issue 11).

Every account (wallets, earnings, fees, holding) is created by the first call
that touches it, while other writers lock accounts in id order. Rows are made
before they are locked, so 20 fresh PostgreSQL databases, each hit at once by
many buyers of many providers through four group-commit flushers, give no 5xx.
"""

from __future__ import annotations

import asyncio

from ledger.verify import verify
from tests.support import services
from tests.support.tollway import start_inprocess
from tests.support.upstream import Upstream

ROUNDS = 20


async def test_twenty_fresh_databases_under_concurrent_first_use_give_no_5xx(
    tmp_path, upstream: Upstream
):
    statuses: list[int] = []
    for _ in range(ROUNDS):
        url = await services.create_pg_database()
        tw = await start_inprocess(url, tmp=str(tmp_path), ledger_writers=4)
        try:
            sids = []
            for p in range(4):
                pkey = await tw.key(f"prov{p}", "provider")
                sids.append(await tw.service(pkey, upstream.url, price="0.01", free=1))
            buyers = [await tw.key(f"buyer{b}") for b in range(8)]
            for b in range(8):
                await tw.credit(f"buyer{b}", "1.00")
            calls = [
                tw.call(sids[(i + j) % 4], "ok", buyers[i]) for i in range(8) for j in range(6)
            ]
            statuses += [st for st, _, _ in await asyncio.gather(*calls)]
            report = await verify(tw.rt.store)
            assert report.ok, report.render()
        finally:
            await tw.close()
            await services.drop_pg_database(url)
    assert len(statuses) == ROUNDS * 48
    assert set(statuses) == {200}, sorted(set(statuses))
