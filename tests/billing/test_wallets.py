"""On-chain wallets end to end: deposits and withdrawals through the API, on the
in-process EVM chain reached over real JSON-RPC, on SQLite and PostgreSQL.

Acceptance (issue 5):
- deposits of an unverified, foreign-token or already-used transaction are refused,
  and a real transfer credits exactly its amount;
- 20 concurrent withdrawals against a balance that covers 5 give exactly 5 payouts
  (the token balances on chain prove it) and the balance never goes negative;
- a payout that fails on chain voids its hold;
- ``ledger verify`` is clean after each.

And a payout of a provider's earnings pays settled-but-unpaid settlements (never
anything else), once, by a withdrawal or by PATCH /settlements/{id}/pay, never both;
a failed payout leaves them unpaid and the earnings intact.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from ledger import journal as j
from ledger.journal import now_ms
from ledger.verify import verify
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream

USDC = 10**6  # token units per whole token (6 decimals, like the ledger asset)


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


def evm_settings(
    node: JsonRpcServer, chain: EvmChain, usdc: str, pay_to: str, hot: LocalAccount
) -> dict:
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
    db_url: str,
    tmp_path,
    node: JsonRpcServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    hot_wallet: LocalAccount,
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
    # The admin's grant: a buyer's own mint gets the default rate limit.
    st, data, _ = await tw.api("POST", "/api/v1/keys", tw.admin, json=body)
    assert st == 201, data
    return f"{data['key_id']}:{data['secret']}"


def claim(owner: str, tx: str, signer) -> str:
    """The sender's EIP-191 signature of the deposit claim for ``owner``."""
    from eth_account.messages import encode_defunct

    from billing.wallets import deposit_claim_message

    return signer.sign_message(
        encode_defunct(text=deposit_claim_message(owner, tx))
    ).signature.hex()


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
        "POST",
        "/api/v1/wallet/deposit",
        key,
        json={
            "tx_hash": tx,
            "amount": "999.00",
            "chain": "evm",
            "signature": claim("alice", tx, payer),
        },
    )
    assert st == 201, body
    assert body["amount"] == "2.345678" and body["amount_units"] == 2_345_678
    assert body["payer"] == payer.address and "note" in body
    assert await wallet_units(tw, "alice") == 2_345_678

    # Already used: sequentially, and by concurrent replays.
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/deposit",
        key,
        json={"tx_hash": tx, "signature": claim("alice", tx, payer)},
    )
    assert st == 409 and body["error"]["code"] == "tx_already_used"
    tx2 = chain.transfer_token(usdc, payer, deposit_address, 1_000_000)
    results = await asyncio.gather(
        *(
            tw.api(
                "POST",
                "/api/v1/wallet/deposit",
                key,
                json={"tx_hash": tx2, "signature": claim("alice", tx2, payer)},
            )
            for _ in range(8)
        )
    )
    statuses = sorted(r[0] for r in results)
    assert statuses == [201] + [409] * 7, statuses
    assert await wallet_units(tw, "alice") == 3_345_678
    rows = await tw.rt.store.fetch(
        "SELECT rail, external_ref, amount FROM payments ORDER BY amount"
    )
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
        st, body, _ = await tw.api(
            "POST",
            "/api/v1/wallet/deposit",
            key,
            json={"tx_hash": tx_hash, "signature": claim("bob", tx_hash, payer)},
        )
        assert st == status and body["error"]["code"] == code, body

    # A hash the chain never saw.
    await refused("0x" + secrets.token_hex(32), "tx_not_found")
    # Not even a hash.
    await refused("0x1234", "invalid_tx_hash")
    # Another token to the right address.
    await refused(
        chain.transfer_token(other_token, payer, deposit_address, 5 * USDC), "wrong_token"
    )
    # The right token to someone else.
    await refused(
        chain.transfer_token(usdc, payer, Account.create().address, USDC), "wrong_recipient"
    )
    # A transfer that reverted on chain (more than the payer holds, mined with fixed gas).
    await refused(
        chain.transfer_token(usdc, payer, deposit_address, 10**12, gas=200_000), "tx_failed"
    )
    # A real deposit sent by someone else's wallet: not bob's to claim.
    stranger = chain.new_account()
    chain.mint(usdc, stranger.address, USDC)
    await refused(
        chain.transfer_token(usdc, stranger, deposit_address, USDC), "payer_not_signer", 403
    )
    # Without a signature by the sender, a claim proves nothing: a wallet
    # address written on a key is not enough (anyone can write anyone's).
    mallory = await buyer_key(tw, "mallory", payer.address)
    victim_tx = chain.transfer_token(usdc, payer, deposit_address, USDC)
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/deposit", mallory, json={"tx_hash": victim_tx}
    )
    assert st == 422 and body["error"]["code"] == "signature_required"
    # A signature made for another owner does not transfer to mallory.
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/deposit",
        mallory,
        json={"tx_hash": victim_tx, "signature": claim("bob", victim_tx, payer)},
    )
    assert st == 403 and body["error"]["code"] == "payer_not_signer"
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
            tw.api(
                "POST",
                "/api/v1/wallet/withdraw",
                key,
                json={"amount": "1.00", "to_address": recipient, "chain": "evm"},
            )
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
        kinds = [
            r["kind"]
            for r in await tw.rt.store.fetch(
                "SELECT kind FROM transfers WHERE hold_id IS NOT NULL ORDER BY created_at, kind"
            )
        ]
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
        (
            {"amount": "0.5", "to_address": Account.create().address, "source": "earnings"},
            422,
            "validation_error",
        ),
        (
            {"amount": "0.5", "to_address": Account.create().address, "method": "paypal"},
            422,
            "validation_error",
        ),
    ]
    for body, status, code in cases:
        st, data, _ = await tw.api("POST", "/api/v1/wallet/withdraw", key, json=body)
        assert (st, data["error"]["code"]) == (status, code), (body, data)
    assert await wallet_units(tw, "erin") == USDC
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM holds") == 0
    await assert_ledger_clean(tw)


async def _start_node_without_receipts(
    target_url: str,
) -> tuple[web.AppRunner, str, aiohttp.ClientSession]:
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
        async with session.post(
            target_url, data=body, headers={"Content-Type": "application/json"}
        ) as r:
            return web.Response(
                status=r.status, body=await r.read(), content_type="application/json"
            )

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/", session


async def test_unknown_payout_outcome_keeps_the_hold_and_reconciles_from_chain(
    db_url: str,
    tmp_path,
    node: JsonRpcServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    hot_wallet: LocalAccount,
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


# --------------------------------------------------------------------------- payouts of earnings pay settlements

DAY = 86_400_000


class Provider:
    """A provider with earnings from real paid calls, settled through the API."""

    def __init__(self, tw: InProcess, owner: str, key: str, service: str, buyer: str) -> None:
        self.tw, self.owner, self.key, self.service, self.buyer = tw, owner, key, service, buyer
        self.periods = 0

    @classmethod
    async def make(
        cls, tw: InProcess, upstream: Upstream, owner: str, price: str = "0.10"
    ) -> Provider:
        key = await tw.key(owner, "provider")
        service = await tw.service(key, upstream.url, price=price)
        buyer = await tw.key(f"buyer_of_{owner}")
        await tw.credit(f"buyer_of_{owner}", "50.00")
        return cls(tw, owner, key, service, buyer)

    async def earn(self, calls: int) -> None:
        for _ in range(calls):
            st, _, _ = await self.tw.call(self.service, "ok", self.buyer)
            assert st == 200

    async def settle(self) -> dict:
        """Settle everything unsettled (each settlement a new, wider period around now)."""
        self.periods += 1
        now = now_ms()
        body = {
            "provider_id": self.owner,
            "period_start": _iso(now - self.periods * DAY),
            "period_end": _iso(now + self.periods * DAY),
        }
        st, s, _ = await self.tw.api("POST", "/api/v1/settlements", self.tw.admin, json=body)
        assert st == 201 and s["status"] == "pending", s
        return s

    async def earnings(self) -> int:
        v = await self.tw.rt.store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", j.earnings(self.owner, "USDC").id
        )
        return int(v or 0)

    async def earnings_holds(self) -> int:
        return int(
            await self.tw.rt.store.fetchval(
                "SELECT COUNT(*) FROM holds WHERE account_id = $1",
                j.earnings(self.owner, "USDC").id,
            )
        )

    async def settlement(self, sid: str) -> dict:
        st, s, _ = await self.tw.api("GET", f"/api/v1/settlements/{sid}", self.key)
        assert st == 200, s
        return s

    async def withdraw(self, **body: object) -> tuple[int, dict]:
        st, data, _ = await self.tw.api(
            "POST", "/api/v1/wallet/withdraw", self.key, json={"chain": "evm", **body}
        )
        return st, data

    async def subscribe_settlement_events(self) -> None:
        """A webhook subscription row, so settlement.completed events are queued in the outbox."""
        await self.tw.rt.store.execute(
            "INSERT INTO webhooks (id, owner_id, url, events, secret, active, created_at)"
            " VALUES ($1, $2, 'https://hooks.invalid/x', $3, 'whsec', 1, $4)",
            f"wh_{self.owner}",
            self.owner,
            json.dumps(["settlement.completed"]),
            now_ms(),
        )

    async def completed_events(self) -> list[dict]:
        rows = await self.tw.rt.store.fetch(
            "SELECT body FROM webhook_deliveries WHERE owner_id = $1 AND event = 'settlement.completed'"
            " ORDER BY created_at",
            self.owner,
        )
        return [json.loads(r["body"])["payload"] for r in rows]


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat().replace("+00:00", "Z")


async def test_earnings_withdrawal_pays_its_settlement_and_patch_pay_then_gets_409(
    tw: InProcess, upstream: Upstream, chain: EvmChain, usdc: str
) -> None:
    p = await Provider.make(tw, upstream, "prov_w")
    await p.subscribe_settlement_events()
    await p.earn(3)
    s1 = await p.settle()
    assert s1["net_units"] == 3 * 90_000  # 0.10 a call, 10% fee
    recipient = Account.create().address

    st, body = await p.withdraw(settlement_id=s1["id"], to_address=recipient)
    assert st == 200, body
    w = body["withdrawal"]
    assert (w["status"], w["source"], w["amount_units"], w["settlement_ids"]) == (
        "paid",
        "earnings",
        s1["net_units"],
        [s1["id"]],
    )
    assert chain.token_balance(usdc, recipient) == s1["net_units"]
    paid = await p.settlement(s1["id"])
    assert (paid["status"], paid["payment_tx"], paid["withdrawal_id"]) == (
        "completed",
        w["tx_hash"],
        w["id"],
    )
    assert paid["paid_at"] is not None
    assert await p.earnings() == 0
    (event,) = await p.completed_events()
    assert (event["id"], event["status"], event["payment_tx"]) == (
        s1["id"],
        "completed",
        w["tx_hash"],
    )

    # Paid by the withdrawal: paying it outside Tollway too is refused, and so is a second withdrawal.
    st, err, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "0xdd"}
    )
    assert (
        st == 409 and err["error"]["code"] == "already_paid" and w["id"] in err["error"]["message"]
    )
    st, err = await p.withdraw(settlement_id=s1["id"], to_address=recipient)
    assert st == 409 and err["error"]["code"] == "already_paid", err
    assert (await p.settlement(s1["id"]))["payment_tx"] == w["tx_hash"]

    # No payout from earnings without an unpaid settlement covering it: unsettled
    # earnings stay where they are, whatever the amount asked.
    await p.earn(2)
    assert await p.earnings() == 180_000
    for ask in ({"amount": "0.18"}, {"amount": "0.09"}, {}):
        st, err = await p.withdraw(source="earnings", to_address=recipient, **ask)
        assert st == 409 and err["error"]["code"] == "no_unpaid_settlement", (ask, err)
    s2 = await p.settle()
    await p.earn(1)
    s3 = await p.settle()
    assert (s2["net_units"], s3["net_units"]) == (180_000, 90_000)
    # The amount must be the net of the oldest unpaid settlements, exactly.
    for ask in ("0.09", "0.20", "0.30"):
        st, err = await p.withdraw(source="earnings", amount=ask, to_address=recipient)
        assert st == 409 and err["error"]["code"] == "no_matching_settlement", (ask, err)
    # Named settlements: an amount, if given, must be their net.
    st, err = await p.withdraw(
        settlement_ids=[s2["id"], s3["id"]], amount="0.26", to_address=recipient
    )
    assert st == 422 and err["error"]["code"] == "amount_mismatch", err
    # Another provider's settlement is not found; a buyer has no earnings; a wallet pays no settlement.
    other = await tw.key("prov_other", "provider")
    st, err, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        other,
        json={"settlement_id": s2["id"], "to_address": recipient},
    )
    assert st == 404 and err["error"]["code"] == "settlement_not_found", err
    st, err, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        p.buyer,
        json={"settlement_id": s2["id"], "to_address": recipient},
    )
    assert st == 422 and err["error"]["field"] == "source", err
    st, err = await p.withdraw(
        source="wallet", settlement_id=s2["id"], amount="0.18", to_address=recipient
    )
    assert st == 422 and err["error"]["field"] == "settlement_ids", err
    assert chain.token_balance(usdc, recipient) == s1["net_units"]
    assert await p.earnings_holds() == 1

    # The amount of the two oldest unpaid settlements pays both, in one payout.
    st, body = await p.withdraw(source="earnings", amount="0.27", to_address=recipient)
    assert st == 200, body
    w2 = body["withdrawal"]
    assert w2["amount_units"] == 270_000 and sorted(w2["settlement_ids"]) == sorted(
        [s2["id"], s3["id"]]
    )
    for s in (s2, s3):
        got = await p.settlement(s["id"])
        assert (got["status"], got["payment_tx"], got["withdrawal_id"]) == (
            "completed",
            w2["tx_hash"],
            w2["id"],
        )
    assert await p.earnings() == 0
    assert chain.token_balance(usdc, recipient) == 540_000
    assert {e["id"] for e in await p.completed_events()} == {s1["id"], s2["id"], s3["id"]}
    st, listed, _ = await tw.api("GET", "/api/v1/wallet/withdrawals", p.key)
    assert {x["id"]: sorted(x["settlement_ids"]) for x in listed["withdrawals"]} == {
        w["id"]: [s1["id"]],
        w2["id"]: sorted([s2["id"], s3["id"]]),
    }
    await assert_ledger_clean(tw)


async def test_patch_pay_first_then_the_withdrawal_is_refused(
    tw: InProcess, upstream: Upstream, chain: EvmChain, usdc: str
) -> None:
    p = await Provider.make(tw, upstream, "prov_p")
    await p.earn(2)
    s1 = await p.settle()
    st, _, _ = await tw.api(
        "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "bank-7"}
    )
    assert st == 200
    assert await p.earnings() == 0
    recipient = Account.create().address
    st, err = await p.withdraw(settlement_id=s1["id"], to_address=recipient)
    assert (
        st == 409 and err["error"]["code"] == "already_paid" and "bank-7" in err["error"]["message"]
    ), err
    st, err = await p.withdraw(source="earnings", amount=s1["net_amount"], to_address=recipient)
    assert st == 409 and err["error"]["code"] == "no_unpaid_settlement", err
    paid = await p.settlement(s1["id"])
    assert (paid["status"], paid["payment_tx"], paid["withdrawal_id"]) == (
        "completed",
        "bank-7",
        None,
    )
    assert chain.token_balance(usdc, recipient) == 0
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM withdrawals") == 0
    assert await p.earnings_holds() == 0
    await assert_ledger_clean(tw)


async def test_concurrent_withdrawals_and_patch_pay_one_settlement_once(
    tw: InProcess, upstream: Upstream, chain: EvmChain, usdc: str
) -> None:
    p = await Provider.make(tw, upstream, "prov_c")
    await p.earn(4)
    s1 = await p.settle()
    await p.earn(1)  # unsettled: must never leave earnings
    recipient = Account.create().address
    attempts = [p.withdraw(settlement_id=s1["id"], to_address=recipient) for _ in range(6)]
    attempts += [
        p.withdraw(source="earnings", amount=s1["net_amount"], to_address=recipient)
        for _ in range(4)
    ]

    async def patch() -> tuple[int, dict]:
        st, data, _ = await tw.api(
            "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "manual"}
        )
        return st, data

    results = await asyncio.gather(*attempts, patch(), patch())
    wins = [r for r in results if r[0] == 200]
    assert len(wins) == 1, results
    for st, data in results:
        if st != 200:
            assert st == 409 and data["error"]["code"] in (
                "already_paid",
                "payout_in_progress",
                "no_unpaid_settlement",
                "settlement_changed",
            ), data
    paid = await p.settlement(s1["id"])
    assert paid["status"] == "completed"
    by_withdrawal = "withdrawal" in wins[0][1]
    assert chain.token_balance(usdc, recipient) == (s1["net_units"] if by_withdrawal else 0)
    assert await p.earnings() == 90_000
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM withdrawals WHERE status = 'paid'") == (
        1 if by_withdrawal else 0
    )
    await assert_ledger_clean(tw)


async def test_failed_onchain_payout_leaves_the_settlement_unpaid_and_earnings_intact(
    db_url: str,
    tmp_path,
    node: JsonRpcServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    upstream: Upstream,
) -> None:
    poor = chain.new_account()
    chain.mint(usdc, poor.address, 1_000)  # far less than any settlement
    tw = await start_inprocess(
        db_url, tmp=str(tmp_path), **evm_settings(node, chain, usdc, deposit_address, poor)
    )
    try:
        p = await Provider.make(tw, upstream, "prov_f")
        await p.subscribe_settlement_events()
        await p.earn(2)
        s1 = await p.settle()
        recipient = Account.create().address
        st, err = await p.withdraw(settlement_id=s1["id"], to_address=recipient)
        assert st == 502 and err["error"]["code"] == "payout_failed", err
        assert err["error"]["settlement_ids"] == [s1["id"]]
        wid = err["error"]["withdrawal_id"]
        assert chain.token_balance(usdc, recipient) == 0
        back = await p.settlement(s1["id"])
        assert (back["status"], back["payment_tx"], back["withdrawal_id"], back["paid_at"]) == (
            "pending",
            None,
            None,
            None,
        )
        assert await p.earnings() == s1["net_units"]
        assert await p.completed_events() == []
        st, listed, _ = await tw.api("GET", "/api/v1/wallet/withdrawals", p.key)
        assert [(x["id"], x["status"], x["settlement_ids"]) for x in listed["withdrawals"]] == [
            (wid, "failed", [s1["id"]])
        ]
        await assert_ledger_clean(tw)

        # Unpaid again: it can be paid, once, by either path.
        st, paid, _ = await tw.api(
            "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "wire-1"}
        )
        assert st == 200, paid
        assert await p.earnings() == 0
        assert [e["payment_tx"] for e in await p.completed_events()] == ["wire-1"]
        await assert_ledger_clean(tw)
    finally:
        await tw.close()


async def test_unknown_payout_keeps_the_settlement_paying_until_reconciled(
    db_url: str,
    tmp_path,
    node: JsonRpcServer,
    chain: EvmChain,
    usdc: str,
    deposit_address: str,
    hot_wallet: LocalAccount,
    upstream: Upstream,
) -> None:
    runner, flaky_url, session = await _start_node_without_receipts(node.url)
    settings = evm_settings(node, chain, usdc, deposit_address, hot_wallet)
    settings["evm_rpc_url"] = flaky_url
    tw = await start_inprocess(db_url, tmp=str(tmp_path), **settings)
    try:
        p = await Provider.make(tw, upstream, "prov_u")
        await p.earn(1)
        s1 = await p.settle()
        recipient = Account.create().address
        st, body = await p.withdraw(settlement_id=s1["id"], to_address=recipient)
        assert st == 202 and body["withdrawal"]["status"] == "unknown", body
        paying = await p.settlement(s1["id"])
        assert (paying["status"], paying["withdrawal_id"]) == ("paying", body["withdrawal"]["id"])
        st, err, _ = await tw.api(
            "PATCH", f"/api/v1/settlements/{s1['id']}/pay", tw.admin, json={"payment_tx": "x"}
        )
        assert st == 409 and err["error"]["code"] == "payout_in_progress", err
        assert await p.earnings() == 0
        await assert_ledger_clean(tw)

        assert await tw.rt.evm_wallets.reconcile_all() == 1  # type: ignore[attr-defined]
        done = await p.settlement(s1["id"])
        (w,) = (await tw.api("GET", "/api/v1/wallet/withdrawals", p.key))[1]["withdrawals"]
        assert (done["status"], done["payment_tx"]) == ("completed", w["tx_hash"])
        assert chain.token_balance(usdc, recipient) == s1["net_units"]
        await assert_ledger_clean(tw)
    finally:
        await tw.close()
        await session.close()
        await runner.cleanup()
