"""``ledger verify`` knows who owns money: each payment credits once, its owner, with
its row. Every test runs on SQLite and on PostgreSQL; the ledgers are written by
hand through the store's own transaction API, as billing writes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger import journal as j
from ledger import ops
from ledger.db import Store, Tx
from ledger.journal import Transfer, new_id, now_ms
from ledger.verify import Report, verify

ROOT = Path(__file__).resolve().parents[2]
CHAIN = "eip155:8453"
TX = "0x" + "ab" * 32
TX_AS_SETTLED = "0x" + "AB" * 32  # as a settlement may spell it; payments store hashes lower-case


async def _payment(
    tx: Tx,
    owner: str | None,
    amount: int,
    *,
    rail: str = CHAIN,
    ref: str | None = None,
    status: str = "credited",
    asset: str = "USDC",
    detail: dict[str, str] | None = None,
) -> str:
    pid = new_id("pay")
    await tx.execute(
        "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status, detail,"
        " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        pid,
        rail,
        ref or f"0x{pid}",
        owner,
        asset,
        amount,
        status,
        json.dumps(detail or {}),
        now_ms(),
    )
    return pid


async def _credit(
    tx: Tx,
    owner: str,
    amount: int,
    payment_id: str | None,
    kind: str = "deposit",
    asset: str = "USDC",
) -> str:
    tid = new_id("tr")
    await tx.transfer(
        Transfer(
            tid,
            j.world(asset),
            j.wallet(owner, asset),
            amount,
            kind,
            f"{kind}:{tid}",
            payment_id=payment_id,
        )
    )
    return tid


async def _only(store: Store, *expected: str) -> Report:
    """verify finds exactly these violations (the balance checks stay clean:
    every ledger here is written through the real transfer API)."""
    rep = await verify(store)
    assert rep.violations == list(expected), rep.render()
    return rep


async def test_a_clean_credited_payment_is_ok(store: Store):
    async with store.transaction() as tx:
        pid = await _payment(tx, "alice", 5_000_000, ref=TX)
        await _credit(tx, "alice", 5_000_000, pid)
        # money with no external payment behind it is no chain or card credit
        await ops.credit(tx, ops.Credit("alice", "USDC", 10, "admin_credit", "grant-1"))
        # rows that received nothing carry no credit, and need none
        for status in ("reserved", "failed", "unknown"):
            await _payment(tx, "alice", 7, rail="x402", status=status)
    rep = await _only(store)
    assert rep.checked["payments"] == 4
    assert rep.checked["external_credits"] == 1 and rep.checked["payment_credits"] == 1


async def test_one_payment_credited_twice_is_a_violation(store: Store):
    async with store.transaction() as tx:
        pid = await _payment(tx, "alice", 100, ref=TX)
        await _credit(tx, "alice", 100, pid)
        await _credit(tx, "alice", 100, pid)
    await _only(store, f"payment {pid} ({CHAIN}, {TX}) has 2 credits")


async def test_money_received_without_its_credit_is_a_violation(store: Store):
    async with store.transaction() as tx:
        pid = await _payment(tx, "alice", 100, rail="stripe", ref="pi_1", status="credited")
        xid = await _payment(tx, "alice", 100, rail="x402", ref="x402:0xa:1", status="settled")
    await _only(
        store,
        f"payment {pid} (stripe, pi_1) has 0 credits",
        f"payment {xid} (x402, x402:0xa:1) has 0 credits",
    )


@pytest.mark.parametrize("status", ["reserved", "failed", "unknown", "conflict"])
async def test_a_row_that_received_nothing_must_not_credit(store: Store, status: str):
    async with store.transaction() as tx:
        pid = await _payment(tx, "alice", 100, rail="x402", ref="x402:0xa:1", status=status)
        await _credit(tx, "alice", 100, pid, kind="x402_deposit")
    await _only(
        store,
        f"payment {pid} (x402, x402:0xa:1) has 1 credits but its status {status!r} carries none",
    )


@pytest.mark.parametrize(
    ("kind", "dangling"),
    [
        ("deposit", False),
        ("invoice_deposit", False),
        ("x402_deposit", True),
        ("stripe_topup", True),
    ],
)
async def test_a_chain_or_card_credit_without_its_payments_row_is_a_violation(
    store: Store, kind: str, dangling: bool
):
    async with store.transaction() as tx:
        # no payment_id at all, or one that names no row
        tid = await _credit(tx, "alice", 100, new_id("pay") if dangling else None, kind=kind)
    await _only(store, f"credit {tid} of kind {kind} has no payments row")


async def test_a_payment_naming_one_owner_that_credits_another_is_a_violation(store: Store):
    async with store.transaction() as tx:
        pid = await _payment(tx, "alice", 100, ref=TX)
        await _credit(tx, "bob", 100, pid)
    await _only(store, f"payment {pid} names owner alice but credits bob")


async def test_owner_ids_with_colons_are_compared_whole(store: Store):
    # "tollway:0xab" and "tollway:0xcd" share what a split on ':' would read as the owner
    async with store.transaction() as tx:
        ok = await _payment(tx, "tollway:0xab", 100)
        await _credit(tx, "tollway:0xab", 100, ok)
        bad = await _payment(tx, "tollway:0xab", 100)
        await _credit(tx, "tollway:0xcd", 100, bad)
    await _only(store, f"payment {bad} names owner tollway:0xab but credits tollway:0xcd")


async def test_a_credit_of_another_amount_or_asset_is_a_violation(store: Store):
    async with store.transaction() as tx:
        more = await _payment(tx, "alice", 100)
        t1 = await _credit(tx, "alice", 150, more)
        other = await _payment(tx, "alice", 100, asset="ADA")
        t2 = await _credit(tx, "alice", 100, other, asset="USDC")
    await _only(
        store,
        f"payment {more} is for 100 USDC but credit {t1} books 150 USDC",
        f"payment {other} is for 100 ADA but credit {t2} books 100 USDC",
    )


async def test_an_anonymous_x402_row_of_the_older_form_credits_its_payer(store: Store):
    # Before payers were bound, an x402 row named the bare address and credited 'x402:<address>'.
    async with store.transaction() as tx:
        pid = await _payment(tx, "0xab", 100, rail="x402", ref="x402:0xab:1", status="settled")
        await _credit(tx, "x402:0xab", 100, pid, kind="x402_deposit")
        # ... which is no licence for any other rail
        dep = await _payment(tx, "0xab", 100)
        await _credit(tx, "x402:0xab", 100, dep)
    await _only(store, f"payment {dep} names owner 0xab but credits x402:0xab")


async def _x402_settled(tx: Tx, owner: str = "kate") -> str:
    """An x402 payment as billing books it: the settled row and its one credit."""
    pid = await _payment(tx, owner, 100, rail="x402", ref=f"x402:0xab:{owner}", status="settled")
    await tx.execute(
        "UPDATE payments SET detail = $2 WHERE id = $1",
        pid,
        json.dumps({"tx": TX_AS_SETTLED, "network": CHAIN, "payer": "0xAb"}),
    )
    await _credit(tx, owner, 100, pid, kind="x402_deposit")
    return pid


async def test_an_x402_settlement_row_without_a_credit_is_ok(store: Store):
    async with store.transaction() as tx:
        xid = await _x402_settled(tx)
        await _payment(
            tx, "kate", 100, ref=TX, status="x402_settlement", detail={"x402_payment": xid}
        )
    rep = await _only(store)
    assert rep.checked["x402_settlements"] == 1 and rep.checked["payment_credits"] == 1


async def test_an_x402_settlement_row_with_a_credit_is_a_violation(store: Store):
    async with store.transaction() as tx:
        xid = await _x402_settled(tx)
        sid = await _payment(
            tx, "kate", 100, ref=TX, status="x402_settlement", detail={"x402_payment": xid}
        )
        await _credit(tx, "kate", 100, sid)
    await _only(
        store,
        f"payment {sid} ({CHAIN}, {TX}) has 1 credits but its status 'x402_settlement' carries none",
    )


async def test_an_x402_settlement_row_must_name_its_settled_payment(store: Store):
    async with store.transaction() as tx:
        ghost = new_id("pay")
        s1 = await _payment(
            tx, "kate", 100, ref=TX, status="x402_settlement", detail={"x402_payment": ghost}
        )
        reserved = await _payment(tx, "kate", 100, rail="x402", status="reserved")
        s2 = await _payment(
            tx,
            "kate",
            100,
            ref="0x" + "cd" * 32,
            status="x402_settlement",
            detail={"x402_payment": reserved},
        )
        # a detail that is not JSON is reported, it does not stop verify
        s3 = await _payment(tx, "kate", 100, ref="0x" + "ef" * 32, status="x402_settlement")
        await tx.execute("UPDATE payments SET detail = 'not json' WHERE id = $1", s3)
    rep = await verify(store)
    assert rep.violations == [
        f"x402 settlement {s1} ({CHAIN}, {TX}) names x402 payment {ghost} that does not exist",
        f"x402 settlement {s2} ({CHAIN}, 0x{'cd' * 32}) for 100 USDC names x402 payment"
        f" {reserved} (reserved) for 100 USDC",
        f"x402 settlement {s3} ({CHAIN}, 0x{'ef' * 32}) names x402 payment None that does not exist",
    ], rep.render()


async def test_a_chain_transaction_credited_by_x402_and_again_as_a_deposit(store: Store):
    # The race billing now refuses: a deposit claim recorded the settlement's
    # transaction before the x402 credit, so no reference row could be written.
    async with store.transaction() as tx:
        xid = await _x402_settled(tx)
        dep = await _payment(tx, "kate", 100, ref=TX)
        await _credit(tx, "kate", 100, dep)
    await _only(
        store,
        f"x402 payment {xid} settled by transaction {TX_AS_SETTLED}, which payment {dep} ({CHAIN}) also credits",
    )


async def test_cli_exits_1_on_a_double_credit(store: Store, db_url: str):
    async with store.transaction() as tx:
        pid = await _payment(tx, "alice", 100, ref=TX)
        await _credit(tx, "alice", 100, pid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    argv = [sys.executable, "-m", "proxy.cli", "ledger", "verify", "--database-url", db_url]
    clean = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0 and "ledger verify: OK" in clean.stdout, clean.stderr
    async with store.transaction() as tx:
        await _credit(tx, "alice", 100, pid)
    bad = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"payment {pid} ({CHAIN}, {TX}) has 2 credits" in bad.stdout
