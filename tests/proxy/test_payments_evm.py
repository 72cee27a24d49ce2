"""402 payments on EVM through the proxy: x402 (official client, v2 and v1) and invoices.

The chain is eth-tester in this process behind a local JSON-RPC HTTP server,
so Tollway uses web3's real HTTP provider; the token is our EIP-3009 contract.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import register_exact_evm_client

from billing.payer_proof import invoice_message
from ledger.verify import verify
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer
from tests.support.tollway import InProcess, sign_in, start_inprocess
from tests.support.upstream import Upstream

PRICE = 10_000  # 0.01 USDC


@pytest.fixture(scope="module")
def tokens(chain: EvmChain) -> dict[str, str]:
    return {
        "usdc": chain.deploy_token("USD Coin", "2"),
        "usdc_bs": chain.deploy_token("USD Coin", "2", domain_chain_id=84532),
        "other": chain.deploy_token("Other Coin", "1", symbol="OTH"),
    }


@pytest.fixture
def merchant() -> str:
    return Account.create().address


@pytest.fixture
async def tw(
    db_url: str,
    tmp_path,
    node: JsonRpcServer,
    chain: EvmChain,
    tokens: dict[str, str],
    merchant: str,
) -> AsyncIterator[InProcess]:
    gas = chain.new_account()
    t = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        evm_rpc_url=node.url,
        evm_token_address=tokens["usdc"],
        evm_pay_to=merchant,
        evm_gas_private_key=gas.key.hex(),
        x402_tokens=f"{chain.chain_id}:{tokens['usdc']},84532:{tokens['usdc_bs']}",
        evm_confirmations=1,
        invoice_mint_rate_limit=100_000,
    )
    yield t
    await t.close()


def payer_with_funds(
    chain: EvmChain, tokens: dict[str, str], amount: int = 10_000_000
) -> LocalAccount:
    acct = chain.new_account()
    for t in tokens.values():
        chain.mint(t, acct.address, amount)
    return acct


def official(account: LocalAccount) -> x402Client:
    c = x402Client()
    register_exact_evm_client(c, account)
    c.set_spend_controls(False)  # our test token is not on the client's list of known assets
    return c


async def _service(tw: InProcess, up: Upstream, price: str = "0.01") -> str:
    p = await tw.key("prov", "provider")
    return await tw.service(p, up.url, price=price, allow_anonymous=True)


async def _ledger_ok(tw: InProcess) -> None:
    rep = await verify(tw.rt.store)
    assert rep.ok, rep.render()


async def test_official_client_pays_v2_and_replay_is_refused(
    tw: InProcess, upstream: Upstream, chain: EvmChain, tokens, merchant
):
    sid = await _service(tw, upstream)
    payer = payer_with_funds(chain, tokens)
    url = f"{tw.base}/api/v1/proxy/{sid}/echo/paid"
    # the official client's own transport: it sees our 402, pays and retries by itself
    async with x402HttpxClient(official(payer)) as client:
        r = await client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["X-ACF-Amount"] == "0.01"
    settle = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
    assert settle["success"] is True and settle["transaction"].startswith("0x")
    assert chain.token_balance(tokens["usdc"], merchant) == PRICE
    assert chain.token_balance(tokens["usdc"], payer.address) == 10_000_000 - PRICE

    # the ledger shows the deposit and the charge
    store = tw.rt.store
    kinds = [
        r["kind"]
        for r in await store.fetch(
            "SELECT kind FROM transfers WHERE usage_id = $1 ORDER BY kind",
            r.headers["X-ACF-Usage-Id"],
        )
    ]
    assert kinds == ["charge", "fee", "x402_deposit"]
    pay = await store.fetchrow("SELECT status, owner_id FROM payments WHERE rail = 'x402'")
    # the payer's wallet owns it: only the wallet's signature claims that owner id
    assert pay["status"] == "settled" and pay["owner_id"] == f"tollway:{payer.address.lower()}"

    # the same PAYMENT-SIGNATURE again: refused before the upstream
    async with httpx.AsyncClient() as plain:
        r402 = await plain.get(url)
        assert r402.status_code == 402 and r402.headers["Cache-Control"] == "no-store"
        req = decode_payment_required_header(r402.headers["PAYMENT-REQUIRED"])
        header = encode_payment_signature_header(await official(payer).create_payment_payload(req))
        ok = await plain.get(url, headers={"PAYMENT-SIGNATURE": header})
        assert ok.status_code == 200
        hits = upstream.hits
        replay = await plain.get(url, headers={"PAYMENT-SIGNATURE": header})
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "payment_replayed"
    assert upstream.hits == hits
    assert chain.token_balance(tokens["usdc"], merchant) == 2 * PRICE
    # the settlement's own transfer cannot be claimed again as a wallet deposit
    await _deposit_refused(tw, payer, settle["transaction"])
    await _ledger_ok(tw)


async def _deposit_refused(tw: InProcess, payer: LocalAccount, tx: str) -> None:
    from eth_account.messages import encode_defunct

    from billing.wallets import deposit_claim_message

    key = await tw.key("claimer")
    sig = payer.sign_message(
        encode_defunct(text=deposit_claim_message("claimer", tx))
    ).signature.hex()
    st, body, _ = await tw.api(
        "POST", "/api/v1/wallet/deposit", key, json={"tx_hash": tx, "signature": sig}
    )
    assert st == 409 and body["error"]["code"] == "tx_already_used", body


async def test_official_client_pays_v1_from_the_json_body(
    tw: InProcess, upstream: Upstream, chain: EvmChain, tokens, merchant
):
    sid = await _service(tw, upstream)
    payer = payer_with_funds(chain, tokens)
    url = f"{tw.base}/api/v1/proxy/{sid}/echo/v1"
    async with httpx.AsyncClient() as plain:
        r402 = await plain.get(url)
        assert r402.status_code == 402
        body = r402.json()
        assert body["x402Version"] == 1 and body["accepts"][0]["network"] == "base-sepolia"
        # invoice clients learn how to get one: an invoice is bound to the paying address
        assert body["invoice"]["required"] == "X-Wallet-Address" and "detail" not in body
        # the official client's v1 path reads the JSON body (no v2 header given to it)
        http_client = x402HTTPClient(official(payer))
        required = http_client.get_payment_required_response(lambda name: None, r402.content)
        payload = await http_client.create_payment_payload(required)
        header = encode_payment_signature_header(payload)
        r = await plain.get(url, headers={"X-PAYMENT": header})
        assert r.status_code == 200, r.text
        assert "X-PAYMENT-RESPONSE" in r.headers
        replay = await plain.get(url, headers={"X-PAYMENT": header})
        assert replay.status_code == 409
    assert chain.token_balance(tokens["usdc_bs"], merchant) == PRICE
    await _ledger_ok(tw)


async def test_upstream_500_is_neither_settled_nor_charged(
    tw: InProcess, upstream: Upstream, chain: EvmChain, tokens, merchant
):
    sid = await _service(tw, upstream)
    payer = payer_with_funds(chain, tokens)
    async with httpx.AsyncClient() as plain:
        r402 = await plain.get(f"{tw.base}/api/v1/proxy/{sid}/status/500")
        req = decode_payment_required_header(r402.headers["PAYMENT-REQUIRED"])
        payload = await official(payer).create_payment_payload(req)
        header = encode_payment_signature_header(payload)
        r = await plain.get(
            f"{tw.base}/api/v1/proxy/{sid}/status/500", headers={"PAYMENT-SIGNATURE": header}
        )
    assert r.status_code == 500 and "PAYMENT-RESPONSE" not in r.headers
    assert r.headers["X-ACF-Amount"] == "0.00"
    assert chain.token_balance(tokens["usdc"], merchant) == 0
    assert chain.token_balance(tokens["usdc"], payer.address) == 10_000_000
    store = tw.rt.store
    assert await store.fetchval("SELECT COUNT(*) FROM transfers") == 0
    assert await store.fetchval("SELECT COUNT(*) FROM payments") == 0  # reservation released
    usage = await store.fetchrow("SELECT amount, outcome FROM usage_records")
    assert usage["amount"] == 0 and usage["outcome"] == "voided"
    await _ledger_ok(tw)


async def test_same_payment_header_20_times_at_once_reaches_upstream_once(
    tw: InProcess, upstream: Upstream, chain: EvmChain, tokens, merchant
):
    sid = await _service(tw, upstream)
    payer = payer_with_funds(chain, tokens)
    url = f"{tw.base}/api/v1/proxy/{sid}/ok"
    async with httpx.AsyncClient() as plain:
        r402 = await plain.get(url)
        req = decode_payment_required_header(r402.headers["PAYMENT-REQUIRED"])
        header = encode_payment_signature_header(await official(payer).create_payment_payload(req))
        results = await asyncio.gather(
            *(plain.get(url, headers={"PAYMENT-SIGNATURE": header}) for _ in range(20))
        )
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) == 1 and statuses.count(409) == 19, statuses
    assert upstream.hits == 1
    assert chain.token_balance(tokens["usdc"], merchant) == PRICE
    await _ledger_ok(tw)


# ------------------------------------------------------------------------- invoices


def payer_signature(payer: LocalAccount, inv: dict) -> str:
    """The retry's X-Payer-Signature: the payer's EIP-191 signature of the invoice message."""
    message = invoice_message(inv["invoiceId"], payer.address.lower())
    assert inv["payerMessage"] == message
    return payer.sign_message(encode_defunct(text=message)).signature.hex()


async def _invoice(
    tw: InProcess,
    sid: str,
    key: str | None,
    payer: LocalAccount,
    path: str = "echo/inv",
    **headers: str,
) -> dict:
    h = {"X-Wallet-Address": payer.address, **headers}
    if key:
        h["Authorization"] = f"Bearer {key}"
    st, body, _ = await tw.call(sid, path, None, method="POST", data=b'{"q": 1}', headers=h)
    assert st == 402, body
    return json.loads(body)["detail"]


async def _pay_invoice(
    tw: InProcess,
    sid: str,
    key: str | None,
    inv: dict,
    tx: str,
    payer: LocalAccount,
    path: str = "echo/inv",
    body: bytes = b'{"q": 1}',
    **headers: str,
):
    h = {
        "X-Invoice-Id": inv["invoiceId"],
        "X-Payment": tx,
        "X-Payer-Signature": payer_signature(payer, inv),
        **headers,
    }
    if key:
        h["Authorization"] = f"Bearer {key}"
    st, raw, hdrs = await tw.call(sid, path, None, method="POST", data=body, headers=h)
    return st, (json.loads(raw) if raw.startswith(b"{") else raw), hdrs


async def test_evm_invoice_paid_by_a_real_transfer(
    tw: InProcess, upstream: Upstream, chain: EvmChain, tokens, merchant
):
    sid = await _service(tw, upstream, price="0.05")
    buyer = await tw.key("buyer")
    payer = payer_with_funds(chain, tokens)
    inv = await _invoice(tw, sid, buyer, payer)
    assert (
        inv["chain"] == f"eip155:{chain.chain_id}"
        and inv["amountUnits"] == "50000"
        and inv["payTo"] == merchant
    )
    assert inv["decimals"] == 6 and inv["extra"]["token"] == tokens["usdc"]
    tx = chain.transfer_token(tokens["usdc"], payer, merchant, 50_000)
    st, data, h = await _pay_invoice(tw, sid, buyer, inv, tx, payer)
    assert st == 200, data
    assert data["body_len"] == len(b'{"q": 1}')
    assert h["X-ACF-Amount"] == "0.05"
    status = (await tw.api("GET", f"/payments/status/{inv['invoiceId']}"))[1]
    assert status["status"] == "paid" and status["paymentTx"] == tx.lower()

    # the same transaction offered for a second invoice
    inv2 = await _invoice(tw, sid, buyer, payer)
    st, data, _ = await _pay_invoice(tw, sid, buyer, inv2, tx, payer)
    assert st == 409 and data["error"]["code"] == "payment_already_used"
    # the same invoice twice
    st, data, _ = await _pay_invoice(tw, sid, buyer, inv, tx, payer)
    assert st == 409 and data["error"]["code"] == "invoice_already_used"
    # nor can it be claimed as a wallet deposit
    await _deposit_refused(tw, payer, tx)
    await _ledger_ok(tw)


async def test_evm_invoice_refusals(
    tmp_path,
    db_url: str,
    node: JsonRpcServer,
    chain: EvmChain,
    tokens,
    merchant,
    upstream: Upstream,
):
    gas = chain.new_account()
    tw = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        evm_rpc_url=node.url,
        evm_token_address=tokens["usdc"],
        evm_pay_to=merchant,
        evm_gas_private_key=gas.key.hex(),
        invoice_ttl_seconds=2,
        invoice_mint_rate_limit=100_000,
    )
    try:
        sid = await _service(tw, upstream, price="0.05")
        buyer = await tw.key("buyer")
        payer = payer_with_funds(chain, tokens)
        cases = [
            (chain.transfer_token(tokens["other"], payer, merchant, 50_000), 402, "wrong_token"),
            (
                chain.transfer_token(tokens["usdc"], payer, merchant, 49_999),
                402,
                "amount_too_small",
            ),
            (
                chain.transfer_token(tokens["usdc"], payer, Account.create().address, 50_000),
                402,
                "wrong_recipient",
            ),
            ("0x" + "ab" * 32, 402, "tx_not_found"),
        ]
        hits = upstream.hits
        for tx, status, code in cases:
            inv = await _invoice(tw, sid, buyer, payer)
            st, data, _ = await _pay_invoice(tw, sid, buyer, inv, tx, payer)
            assert (st, data["error"]["code"]) == (status, code), data
        # a retry that carries another request than the one that minted the invoice
        inv = await _invoice(tw, sid, buyer, payer)
        good = chain.transfer_token(tokens["usdc"], payer, merchant, 50_000)
        st, data, _ = await _pay_invoice(tw, sid, buyer, inv, good, payer, body=b'{"q": 2}')
        assert st == 409 and data["error"]["code"] == "invoice_request_mismatch"
        # an expired invoice
        inv = await _invoice(tw, sid, buyer, payer)
        await asyncio.sleep(2.2)
        st, data, _ = await _pay_invoice(tw, sid, buyer, inv, good, payer)
        assert st == 402 and data["error"]["code"] == "invoice_expired"
        assert upstream.hits == hits  # nothing reached the upstream
        assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM transfers") == 0
    finally:
        await tw.close()


async def test_batch_invoice_covers_100_calls_then_402(
    tw: InProcess, upstream: Upstream, chain: EvmChain, tokens, merchant
):
    sid = await _service(tw, upstream, price="0.01")
    payer = payer_with_funds(chain, tokens)
    wallet = payer.address
    st, body, _ = await tw.call(sid, "ok", None, headers={"X-Batch-Target": "100"})
    assert (
        st == 400
        and json.loads(body)["error"]["code"] == "wallet_address_required_for_prepaid_batches"
    )
    st, body, _ = await tw.call(
        sid, "ok", None, headers={"X-Batch-Target": "100", "X-Wallet-Address": wallet}
    )
    inv = json.loads(body)["detail"]
    assert inv["extra"]["batchTarget"] == 100 and inv["amountUnits"] == str(100 * PRICE)
    tx = chain.transfer_token(tokens["usdc"], payer, merchant, 100 * PRICE)
    sig = payer_signature(payer, inv)
    st, _, _ = await tw.call(
        sid,
        "ok",
        None,
        headers={"X-Invoice-Id": inv["invoiceId"], "X-Payment": tx, "X-Payer-Signature": sig},
    )
    assert st == 200
    draw = {"X-Invoice-Id": inv["invoiceId"], "X-Payer-Signature": sig}
    results = await asyncio.gather(*(tw.call(sid, "ok", None, headers=draw) for _ in range(99)))
    assert [r[0] for r in results] == [200] * 99
    st, body, _ = await tw.call(sid, "ok", None, headers=draw)
    assert st == 402, body
    assert upstream.hits == 100
    # the batch's balance answers to the wallet's own key, claimed by signing in
    wallet_key = await sign_in(tw, payer)
    st, bal, _ = await tw.api("GET", f"/payments/balance?partner=tollway&wallet={wallet}")
    assert st == 401
    st, bal, _ = await tw.api(
        "GET", f"/payments/balance?partner=tollway&wallet={wallet}", await tw.key("nosy")
    )
    assert st == 403
    st, bal, _ = await tw.api(
        "GET", f"/payments/balance?partner=tollway&wallet={wallet}", wallet_key
    )
    assert st == 200 and bal["balances"] == [
        {"asset": "USDC", "amountUnits": "0", "amount": "0.00"}
    ]
    # another wallet cannot draw from this batch: it cannot sign for the payer
    other = Account.create()
    forged = other.sign_message(encode_defunct(text=inv["payerMessage"])).signature.hex()
    st, body, _ = await tw.call(
        sid, "ok", None, headers={"X-Invoice-Id": inv["invoiceId"], "X-Payer-Signature": forged}
    )
    assert st == 402 and json.loads(body)["error"]["code"] == "invalid_payer_signature"
    st, body, _ = await tw.call(sid, "ok", None, headers={"X-Invoice-Id": inv["invoiceId"]})
    assert st == 402 and json.loads(body)["error"]["code"] == "payer_signature_required"
    await _ledger_ok(tw)


async def test_invoice_minting_is_rate_limited_per_ip(
    tmp_path, node: JsonRpcServer, chain: EvmChain, tokens, merchant, upstream: Upstream
):
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/m.db",
        tmp=str(tmp_path),
        evm_rpc_url=node.url,
        evm_token_address=tokens["usdc"],
        evm_pay_to=merchant,
        invoice_mint_rate_limit=5,
    )
    try:
        sid = await _service(tw, upstream)
        wallet = {"X-Wallet-Address": Account.create().address}
        results = [(await tw.call(sid, "ok", None, headers=wallet))[0] for _ in range(8)]
        assert results.count(402) == 5 and results.count(429) == 3
        assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM invoices") == 5
    finally:
        await tw.close()
