"""On-chain wallets end to end: deposits and withdrawals through the API, on the
in-process EVM chain reached over real JSON-RPC, on SQLite and PostgreSQL.

Acceptance (issue 5):
- deposits of an unverified, foreign-token or already-used transaction are refused,
  and a real transfer credits exactly its amount;
- 20 concurrent withdrawals against a balance that covers 5 give exactly 5 payouts
  (the token balances on chain prove it) and the balance never goes negative;
- a payout that fails on chain voids its hold;
- ``ledger verify`` is clean after each.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from ledger import journal as j
from ledger.verify import verify
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer
from tests.support.tollway import InProcess, start_inprocess

USDC = 10**6  # token units per whole token (6 decimals, like the ledger asset)


@pytest.fixture(scope="module")
def chain() -> EvmChain:
    return EvmChain()


@pytest.fixture(scope="module")
def node(chain: EvmChain) -> Iterator[JsonRpcServer]:
    with JsonRpcServer(chain) as server:
        yield server


@pytest.fixture(scope="module")
def usdc(chain: EvmChain) -> str:
    return chain.deploy_token("USD Coin", "2")


@pytest.fixture(scope="module")
def other_token(chain: EvmChain) -> str:
    return chain.deploy_token("Other Coin", "1", symbol="OTH")


@pytest.fixture
def deposit_address() -> str:
    return Account.create().address


@pytest.fixture
def hot_wallet(chain: EvmChain, usdc: str) -> LocalAccount:
    acct = chain.new_account()
    chain.mint(usdc, acct.address, 1_000 * USDC)
    return acct


def evm_settings(node: JsonRpcServer, chain: EvmChain, usdc: str, pay_to: str, hot: LocalAccount) -> dict:
    return {
        "evm_rpc_url": node.url,
        "evm_chain_id": chain.chain_id,
        "evm_token_address": usdc,
        "evm_pay_to": pay_to,
        "evm_hot_wallet_private_key": hot.key.hex(),
        "evm_confirmations": 1,
    }


@pytest.fixture
async def tw(
    db_url: str, tmp_path, node: JsonRpcServer, chain: EvmChain, usdc: str,
    deposit_address: str, hot_wallet: LocalAccount,
) -> AsyncIterator[InProcess]:
    t = await start_inprocess(
        db_url, tmp=str(tmp_path), **evm_settings(node, chain, usdc, deposit_address, hot_wallet)
    )
    yield t
    await t.close()


async def buyer_key(tw: InProcess, owner: str, wallet_address: str | None = None) -> str:
    body = {"owner_id": owner, "role": "buyer", "rate_limit": 100_000}
    if wallet_address:
        body["wallet_address"] = wallet_address
    st, data, _ = await tw.api("POST", "/api/v1/keys", json=body)
    assert st == 201, data
    return f"{data['key_id']}:{data['secret']}"


async def wallet_units(tw: InProcess, owner: str) -> int:
    v = await tw.rt.store.fetchval(
        "SELECT balance FROM accounts WHERE id = $1", j.wallet(owner, "USDC").id
    )
    return int(v or 0)


async def assert_ledger_clean(tw: InProcess) -> None:
    report = await verify(tw.rt.store)
    assert report.ok, report.render()


# --------------------------------------------------------------------------- deposits


async def test_real_transfer_credits_exactly_its_amount_once(
    tw: InProcess, chain: EvmChain, usdc: str, deposit_address: str
) -> None:
    payer = chain.new_account()
    chain.mint(usdc, payer.address, 10 * USDC)
    key = await buyer_key(tw, "alice", payer.address)
    tx = chain.transfer_token(usdc, payer, deposit_address, 2_345_678)

    # The client's figure is not what gets credited: the chain's is.
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/deposit", key, json={"tx_hash": tx, "amount": "999.00", "chain": "evm"}
    )
    assert st == 201, body
    assert body["amount"] == "2.345678" and body["amount_units"] == 2_345_678
    assert body["payer"] == payer.address and "note" in body
    assert await wallet_units(tw, "alice") == 2_345_678

    # Already used: sequentially, and by concurrent replays.
    st, body, _ = await tw.api("POST", "/api/v1/wallet/deposit", key, json={"tx_hash": tx})
    assert st == 409 and body["error"]["code"] == "tx_already_used"
    tx2 = chain.transfer_token(usdc, payer, deposit_address, 1_000_000)
    results = await asyncio.gather(
        *(tw.api("POST", "/api/v1/wallet/deposit", key, json={"tx_hash": tx2}) for _ in range(8))
    )
    statuses = sorted(r[0] for r in results)
    assert statuses == [201] + [409] * 7, statuses
    assert await wallet_units(tw, "alice") == 3_345_678
    rows = await tw.rt.store.fetch("SELECT rail, external_ref, amount FROM payments ORDER BY amount")
    assert [(r["rail"], r["external_ref"], r["amount"]) for r in rows] == [
        (f"eip155:{chain.chain_id}", tx2.lower(), 1_000_000),
        (f"eip155:{chain.chain_id}", tx.lower(), 2_345_678),
    ]
    await assert_ledger_clean(tw)


async def test_unverified_foreign_and_misdirected_deposits_are_refused(
    tw: InProcess, chain: EvmChain, usdc: str, other_token: str, deposit_address: str
) -> None:
    payer = chain.new_account()
    chain.mint(usdc, payer.address, 10 * USDC)
    chain.mint(other_token, payer.address, 10 * USDC)
    key = await buyer_key(tw, "bob", payer.address)

    async def refused(tx_hash: str, code: str, status: int = 422) -> None:
        st, body, _ = await tw.api("POST", "/api/v1/wallet/deposit", key, json={"tx_hash": tx_hash})
        assert st == status and body["error"]["code"] == code, body

    # A hash the chain never saw.
    await refused("0x" + secrets.token_hex(32), "tx_not_found")
    # Not even a hash.
    await refused("0x1234", "invalid_tx_hash")
    # Another token to the right address.
    await refused(chain.transfer_token(other_token, payer, deposit_address, 5 * USDC), "wrong_token")
    # The right token to someone else.
    await refused(chain.transfer_token(usdc, payer, Account.create().address, USDC), "wrong_recipient")
    # A transfer that reverted on chain (more than the payer holds, mined with fixed gas).
    await refused(chain.transfer_token(usdc, payer, deposit_address, 10**12, gas=200_000), "tx_failed")
    # A real deposit sent by someone else's wallet: not bob's to claim.
    stranger = chain.new_account()
    chain.mint(usdc, stranger.address, USDC)
    await refused(chain.transfer_token(usdc, stranger, deposit_address, USDC), "payer_not_registered", 403)
    # A buyer with no registered address cannot claim deposits at all.
    anon = await buyer_key(tw, "anon")
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/deposit", anon,
        json={"tx_hash": chain.transfer_token(usdc, payer, deposit_address, USDC)},
    )
    assert st == 422 and body["error"]["code"] == "wallet_address_required"
    # A chain we do not serve.
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/deposit", key, json={"tx_hash": "0x" + "1" * 64, "chain": "solana"}
    )
    assert st == 422 and body["error"]["field"] == "chain"

    assert await wallet_units(tw, "bob") == 0
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM payments") == 0
    await assert_ledger_clean(tw)


# --------------------------------------------------------------------------- withdrawals


async def test_twenty_concurrent_withdrawals_against_five_pay_exactly_five(
    tw: InProcess, chain: EvmChain, usdc: str, hot_wallet: LocalAccount
) -> None:
    key = await buyer_key(tw, "carol")
    await tw.credit("carol", "5.00")
    recipient = Account.create().address
    hot_before = chain.token_balance(usdc, hot_wallet.address)

    # Sample the balance all along: it must never be seen below zero.
    seen: list[int] = []
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            seen.append(await wallet_units(tw, "carol"))
            await asyncio.sleep(0.005)

    sampling = asyncio.create_task(sampler())
    results = await asyncio.gather(
        *(
            tw.api("POST", "/api/v1/wallet/withdraw", key,
                   json={"amount": "1.00", "to_address": recipient, "chain": "evm"})
            for _ in range(20)
        )
    )
    done.set()
    await sampling

    statuses = [r[0] for r in results]
    assert statuses.count(200) == 5 and statuses.count(402) == 15, statuses
    for st, body, _ in results:
        if st == 402:
            assert body["error"]["code"] == "insufficient_balance"
        else:
            assert body["withdrawal"]["status"] == "paid" and body["withdrawal"]["tx_hash"]
    # The chain proves it: exactly five payouts of 1.00 left the hot wallet.
    assert chain.token_balance(usdc, recipient) == 5 * USDC
    assert chain.token_balance(usdc, hot_wallet.address) == hot_before - 5 * USDC
    tx_hashes = {body["withdrawal"]["tx_hash"] for st, body, _ in results if st == 200}
    assert len(tx_hashes) == 5
    for h in tx_hashes:
        assert chain.receipt(h)["status"] == 1
    assert min(seen) >= 0 and await wallet_units(tw, "carol") == 0
    holds = await tw.rt.store.fetch("SELECT status FROM holds")
    assert [h["status"] for h in holds] == ["posted"] * 5
    await assert_ledger_clean(tw)


async def test_failed_payout_voids_its_hold(
    db_url: str, tmp_path, node: JsonRpcServer, chain: EvmChain, usdc: str, deposit_address: str
) -> None:
    # A hot wallet holding fewer tokens than asked: the token transfer reverts.
    poor = chain.new_account()
    chain.mint(usdc, poor.address, USDC // 2)
    tw = await start_inprocess(
        db_url, tmp=str(tmp_path), **evm_settings(node, chain, usdc, deposit_address, poor)
    )
    try:
        key = await buyer_key(tw, "dave")
        await tw.credit("dave", "3.00")
        recipient = Account.create().address
        st, body, _ = await tw.api(
            "POST", "/api/v1/wallet/withdraw", key, json={"amount": "2.00", "to_address": recipient}
        )
        assert st == 502 and body["error"]["code"] == "payout_failed", body
        wid = body["error"]["withdrawal_id"]
        assert chain.token_balance(usdc, recipient) == 0
        assert chain.token_balance(usdc, poor.address) == USDC // 2
        assert await wallet_units(tw, "dave") == 3 * USDC
        hold = await tw.rt.store.fetchrow("SELECT status, amount FROM holds")
        assert hold["status"] == "voided" and hold["amount"] == 2 * USDC
        st, body, _ = await tw.api("GET", "/api/v1/wallet/withdrawals", key)
        assert [(w["id"], w["status"]) for w in body["withdrawals"]] == [(wid, "failed")]
        kinds = [r["kind"] for r in await tw.rt.store.fetch(
            "SELECT kind FROM transfers WHERE hold_id IS NOT NULL ORDER BY created_at, kind"
        )]
        assert sorted(kinds) == ["hold", "withdrawal_void"]

        # A payout that fits still goes through after the failure.
        st, body, _ = await tw.api(
            "POST", "/api/v1/wallet/withdraw", key, json={"amount": "0.25", "to_address": recipient}
        )
        assert st == 200, body
        assert chain.token_balance(usdc, recipient) == USDC // 4
        assert await wallet_units(tw, "dave") == 3 * USDC - USDC // 4
        await assert_ledger_clean(tw)
    finally:
        await tw.close()


async def test_withdrawal_input_is_checked_before_any_hold(tw: InProcess) -> None:
    key = await buyer_key(tw, "erin")
    await tw.credit("erin", "1.00")
    cases = [
        ({"amount": "0.5", "to_address": "not-an-address"}, 422, "invalid_address"),
        ({"amount": 0.5, "to_address": Account.create().address}, 422, "validation_error"),
        ({"amount": "0", "to_address": Account.create().address}, 422, "validation_error"),
        ({"amount": "0.5"}, 422, "validation_error"),
        ({"amount": "0.5", "to_address": Account.create().address, "source": "earnings"}, 422,
         "validation_error"),
        ({"amount": "0.5", "to_address": Account.create().address, "method": "paypal"}, 422,
         "validation_error"),
    ]
    for body, status, code in cases:
        st, data, _ = await tw.api("POST", "/api/v1/wallet/withdraw", key, json=body)
        assert (st, data["error"]["code"]) == (status, code), (body, data)
    assert await wallet_units(tw, "erin") == USDC
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM holds") == 0
    await assert_ledger_clean(tw)


async def _start_node_without_receipts(target_url: str) -> tuple[web.AppRunner, str, aiohttp.ClientSession]:
    """A JSON-RPC front that forwards everything to the real node except receipt
    lookups, which fail as an overloaded node fails: the payout is broadcast and
    mined, but Tollway cannot learn it."""
    session = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        req = json.loads(body)
        methods = {r.get("method") for r in (req if isinstance(req, list) else [req])}
        if "eth_getTransactionReceipt" in methods:
            return web.Response(status=503, text="node overloaded")
        async with session.post(target_url, data=body, headers={"Content-Type": "application/json"}) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/", session


async def test_unknown_payout_outcome_keeps_the_hold_and_reconciles_from_chain(
    db_url: str, tmp_path, node: JsonRpcServer, chain: EvmChain, usdc: str,
    deposit_address: str, hot_wallet: LocalAccount,
) -> None:
    runner, flaky_url, session = await _start_node_without_receipts(node.url)
    settings = evm_settings(node, chain, usdc, deposit_address, hot_wallet)
    settings["evm_rpc_url"] = flaky_url
    tw = await start_inprocess(db_url, tmp=str(tmp_path), **settings)
    try:
        key = await buyer_key(tw, "frank")
        await tw.credit("frank", "4.00")
        recipient = Account.create().address
        st, body, _ = await tw.api(
            "POST", "/api/v1/wallet/withdraw", key, json={"amount": "1.50", "to_address": recipient}
        )
        # The transfer did happen on chain, but Tollway could not see it: it must
        # neither refund (that would pay twice) nor call it done.
        assert st == 202 and body["withdrawal"]["status"] == "unknown", body
        assert chain.token_balance(usdc, recipient) == 1_500_000
        assert await wallet_units(tw, "frank") == 2_500_000
        hold = await tw.rt.store.fetchrow("SELECT status FROM holds")
        assert hold["status"] == "pending"
        await assert_ledger_clean(tw)

        # Reconciliation reads the token's Transfer logs and posts the hold.
        assert await tw.rt.evm_wallets.reconcile_all() == 1  # type: ignore[attr-defined]
        st, body, _ = await tw.api("GET", "/api/v1/wallet/withdrawals", key)
        (w,) = body["withdrawals"]
        assert w["status"] == "paid" and w["tx_hash"]
        assert chain.receipt(w["tx_hash"])["status"] == 1
        assert await wallet_units(tw, "frank") == 2_500_000
        assert (await tw.rt.store.fetchrow("SELECT status FROM holds"))["status"] == "posted"
        # A second pass finds nothing left to settle.
        assert await tw.rt.evm_wallets.reconcile_all() == 0  # type: ignore[attr-defined]
        await assert_ledger_clean(tw)
    finally:
        await tw.close()
        await session.close()
        await runner.cleanup()
