"""The store contract: every test here runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from ledger import journal as j
from ledger import ops
from ledger.db import DuplicateError, Store
from ledger.journal import Transfer, new_id, now_ms
from ledger.verify import verify
from ledger.writer import GroupCommitWriter


def _t(debit, credit, amount, key, kind="test"):
    return Transfer(new_id("tr"), debit, credit, amount, kind, key)


async def test_migrations_are_versioned_and_idempotent(store: Store):
    assert await store.migrate() == []
    from ledger.db import _migrations

    versions = sorted(
        r["version"] for r in await store.fetch("SELECT version FROM schema_migrations")
    )
    assert versions == [v for v, _ in _migrations(store.kind)] and versions[0] == 1


async def test_transfers_balance_and_sum_to_zero(store: Store):
    alice = j.wallet("alice", "USDC")
    async with store.transaction() as tx:
        assert await tx.transfer(_t(j.world("USDC"), alice, 1000, "dep1"))
        assert await tx.transfer(_t(alice, j.earnings("p", "USDC"), 400, "pay1"), guard=True)
        # guarded debit beyond the balance changes nothing
        assert not await tx.transfer(_t(alice, j.earnings("p", "USDC"), 601, "pay2"), guard=True)
    assert await store.fetchval("SELECT balance FROM accounts WHERE id = $1", alice.id) == 600
    assert await store.fetchval("SELECT SUM(balance) FROM accounts") == 0
    assert await store.fetchval("SELECT COUNT(*) FROM transfers") == 2
    assert (await verify(store)).ok


async def test_duplicate_idempotency_key_changes_nothing(store: Store):
    alice = j.wallet("alice", "USDC")
    async with store.transaction() as tx:
        await tx.transfer(_t(j.world("USDC"), alice, 10, "same"))
    with pytest.raises(DuplicateError):
        async with store.transaction() as tx:
            await tx.transfer(_t(j.world("USDC"), alice, 10, "same"))
    assert await store.fetchval("SELECT balance FROM accounts WHERE id = $1", alice.id) == 10
    assert (await verify(store)).ok


async def test_journal_refuses_update_and_delete(store: Store):
    async with store.transaction() as tx:
        await tx.transfer(_t(j.world("USDC"), j.wallet("a", "USDC"), 5, "k"))
    for sql in ("UPDATE transfers SET amount = 1", "DELETE FROM transfers"):
        with pytest.raises(Exception) as e:
            await store.execute(sql)
        assert "append-only" in str(e.value)
    assert await store.fetchval("SELECT SUM(amount) FROM transfers") == 5


async def test_batch_isolates_a_failing_op(store: Store):
    alice = j.wallet("alice", "USDC")

    def credit(key):
        async def op(tx):
            return await tx.transfer(_t(j.world("USDC"), alice, 1, key))

        return op

    async with store.transaction() as tx:
        await tx.transfer(_t(j.world("USDC"), alice, 1, "taken"))
    results = await store.run_batch([credit("a"), credit("taken"), credit("b")])
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], Exception)
    assert await store.fetchval("SELECT balance FROM accounts WHERE id = $1", alice.id) == 3


@pytest.mark.parametrize("writers", [1, 4])
async def test_group_commit_never_overdraws(store: Store, writers: int):
    """200 concurrent holds of 0.10 against 10.00: exactly 100 succeed."""
    w = GroupCommitWriter(store, concurrency=writers, max_batch=16)
    w.start()
    await w.submit(lambda tx: ops.credit(tx, ops.Credit("bob", "USDC", 10_000_000, "test", "c1")))

    async def one(i):
        r = ops.Reservation(f"u{i}", "bob", "svc", 0, 100_000, "USDC", 60_000)
        return (await w.submit(lambda tx: ops.reserve(tx, r))).mode

    modes = await asyncio.gather(*(one(i) for i in range(200)))
    await w.close()
    assert modes.count(ops.HELD) == 100 and modes.count(ops.INSUFFICIENT) == 100
    assert (
        await store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("bob", "USDC").id
        )
        == 0
    )
    assert (await verify(store)).ok


async def test_free_tier_is_exact_under_concurrency(store: Store):
    w = GroupCommitWriter(store)
    w.start()

    async def one(i):
        r = ops.Reservation(f"u{i}", "carol", "svc", 50, 0, "USDC", 60_000)
        return (await w.submit(lambda tx: ops.reserve(tx, r))).mode

    modes = await asyncio.gather(*(one(i) for i in range(200)))
    await w.close()
    assert modes.count(ops.FREE) == 50


def _usage(uid, status):
    return ops.Usage(uid, "bob", "svc", "prov", "USDC", "prepaid", upstream_status=status)


async def test_capture_splits_and_void_returns(store: Store):
    async with store.transaction() as tx:
        await ops.credit(tx, ops.Credit("bob", "USDC", 1000, "test", "c"))
        h1 = await ops.reserve(tx, ops.Reservation("u1", "bob", "svc", 0, 300, "USDC", 60_000))
        h2 = await ops.reserve(tx, ops.Reservation("u2", "bob", "svc", 0, 300, "USDC", 60_000))
    async with store.transaction() as tx:
        charged = await ops.finish(
            tx, ops.Outcome(_usage("u1", 200), ops.HELD, h1.hold_id, 300, 300, 30, False)
        )
        assert charged == 300
        # a second capture of the same hold charges nothing more
        again = await ops.finish(
            tx, ops.Outcome(_usage("u1b", 200), ops.HELD, h1.hold_id, 300, 300, 30, False)
        )
        assert again == 0
        voided = await ops.finish(
            tx, ops.Outcome(_usage("u2", 503), ops.HELD, h2.hold_id, 300, 0, 0, False)
        )
        assert voided == 0
    bal = {r["id"]: r["balance"] for r in await store.fetch("SELECT id, balance FROM accounts")}
    assert bal[j.wallet("bob", "USDC").id] == 700
    assert bal[j.earnings("prov", "USDC").id] == 270
    assert bal[j.fees("USDC").id] == 30
    assert bal[j.holding("USDC").id] == 0
    rows = {
        r["id"]: (r["amount"], r["outcome"])
        for r in await store.fetch("SELECT id, amount, outcome FROM usage_records")
    }
    assert rows["u1"] == (300, "charged") and rows["u2"] == (0, "voided")
    assert (await verify(store)).ok


async def test_expired_holds_are_voided_and_verify_sees_stale_ones(store: Store):
    async with store.transaction() as tx:
        await ops.credit(tx, ops.Credit("bob", "USDC", 1000, "test", "c"))
        h = await ops.reserve(tx, ops.Reservation("u1", "bob", "svc", 0, 400, "USDC", 1))
    await asyncio.sleep(0.01)
    rep = await verify(store)
    assert not rep.ok and any("past its expiry" in v for v in rep.violations)
    async with store.transaction() as tx:
        assert await ops.expire_holds(tx, now_ms()) == 1
        # a late capture of the expired hold charges nothing
        assert (
            await ops.finish(
                tx, ops.Outcome(_usage("u1", 200), ops.HELD, h.hold_id, 400, 400, 0, False)
            )
            == 0
        )
    assert (
        await store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("bob", "USDC").id
        )
        == 1000
    )
    assert (await verify(store)).ok


async def test_idempotency_claims(store: Store):
    async with store.transaction() as tx:
        assert await ops.claim_idempotency(tx, "bob", "k1", 60_000) == (ops.CLAIMED, None)
        assert await ops.claim_idempotency(tx, "bob", "k1", 60_000) == (ops.IN_FLIGHT, None)
        assert await ops.claim_idempotency(tx, "eve", "k1", 60_000) == (ops.CLAIMED, None)
        await tx.execute(
            "UPDATE idempotency_keys SET state = 'done', usage_id = 'u9' WHERE buyer_id = 'bob'"
        )
        assert await ops.claim_idempotency(tx, "bob", "k1", 60_000) == (ops.DONE, "u9")
        # past the window the key is free again
        await tx.execute("UPDATE idempotency_keys SET created_at = 0 WHERE buyer_id = 'bob'")
        assert await ops.claim_idempotency(tx, "bob", "k1", 60_000) == (ops.CLAIMED, None)
        # a claim abandoned in flight (its call crashed) frees up after stale_ms, a done one does not
        assert await ops.claim_idempotency(tx, "bob", "k1", 60_000, stale_ms=1000) == (
            ops.IN_FLIGHT,
            None,
        )
        await tx.execute(
            "UPDATE idempotency_keys SET created_at = created_at - 5000 WHERE buyer_id = 'bob'"
        )
        assert await ops.claim_idempotency(tx, "bob", "k1", 60_000, stale_ms=1000) == (
            ops.CLAIMED,
            None,
        )
        await tx.execute(
            "UPDATE idempotency_keys SET state = 'done', usage_id = 'u1', created_at = created_at - 5000 WHERE buyer_id = 'bob'"
        )
        assert await ops.claim_idempotency(tx, "bob", "k1", 60_000, stale_ms=1000) == (
            ops.DONE,
            "u1",
        )


async def test_verify_reports_each_violation(store: Store):
    async with store.transaction() as tx:
        await ops.credit(tx, ops.Credit("bob", "USDC", 1000, "test", "c"))
    await store.execute(
        "UPDATE accounts SET balance = balance + 5 WHERE id = $1", j.wallet("bob", "USDC").id
    )
    await store.execute(
        "INSERT INTO usage_records (id, buyer_id, service_id, provider_id, amount, asset, free_tier, payment_method,"
        " outcome, created_at) VALUES ('ghost', 'bob', 's', 'p', 7, 'USDC', 0, 'prepaid', 'charged', 0)"
    )
    await store.execute(
        "INSERT INTO accounts (id, asset, kind, owner_id, balance, created_at) VALUES ('wallet:neg:USDC', 'USDC', 'wallet', 'neg', -1, 0)"
    )
    rep = await verify(store)
    text = "\n".join(rep.violations)
    assert "sum to" in text and "journal says" in text and "ghost" in text and "negative" in text


async def test_credit_is_idempotent(store: Store):
    c = ops.Credit("bob", "USDC", 500, "admin_credit", "same-key")
    async with store.transaction() as tx:
        first = await ops.credit(tx, c)
    async with store.transaction() as tx:
        second = await ops.credit(tx, c)
    assert second == {"transfer_id": first["transfer_id"], "replayed": True}
    with pytest.raises(DuplicateError):
        async with store.transaction() as tx:
            await ops.credit(tx, ops.Credit("bob", "USDC", 999, "admin_credit", "same-key"))
    assert (
        await store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.wallet("bob", "USDC").id
        )
        == 500
    )


async def test_a_stale_guarded_read_fails_at_commit_not_below_zero(store: Store):
    """Two transactions read the same 1.00 balance; both spend 0.80. The later
    commit must not leave -0.60: on PostgreSQL it fails with GuardFailed at the
    write-out (SQLite serializes the two transactions instead)."""
    from ledger.db import GuardFailed

    alice = j.wallet("alice", "USDC")
    async with store.transaction() as tx:
        await tx.transfer(_t(j.world("USDC"), alice, 1_000_000, "dep"))

    started = asyncio.Event()
    outcomes: list[object] = []

    async def spend(key: str, wait: bool) -> None:
        try:
            async with store.transaction() as tx:
                ok = await tx.transfer(_t(alice, j.earnings("p", "USDC"), 800_000, key), guard=True)
                started.set()
                if wait:
                    await asyncio.sleep(0.2)  # let the other one commit in between
            outcomes.append(ok)  # after the commit
        except GuardFailed as exc:
            outcomes.append(exc)

    if store.kind == "postgres":
        await asyncio.gather(spend("a", True), _after(started, spend("b", False)))
        assert sum(1 for o in outcomes if o is True) == 1
        assert any(isinstance(o, GuardFailed) for o in outcomes)
    else:
        await spend("a", False)
        await spend("b", False)
        assert outcomes == [True, False]
    assert await store.fetchval("SELECT balance FROM accounts WHERE id = $1", alice.id) == 200_000
    assert (await verify(store)).ok


async def _after(event: asyncio.Event, coro):
    await event.wait()
    return await coro
