"""Money belongs to whoever proves it (issue 10), tried as a thief would.

- Derived and reserved owner ids cannot be minted; a wallet claims its own by
  Sign-In with Ethereum, then spends and withdraws it.
- A stranger's invoice is never paid by someone else's transfer, and the
  victim's own retry or deposit claim still works afterwards.
- The transaction that settled an x402 payment, presented at once as an invoice
  payment or a deposit claim on a node that mines a block a second, never
  credits twice.
- An x402 authorization that would expire while the upstream works, or that
  was offered for another resource, is refused before the upstream is called.

The chain is eth-tester behind a local JSON-RPC server (web3's real HTTP
provider in Tollway); the token is our EIP-3009 contract.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header

from ledger import journal as j
from ledger.verify import verify
from tests.billing.test_wallets import claim, wallet_units
from tests.proxy.test_payments_evm import official, payer_signature
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer
from tests.support.tollway import InProcess, sign_in, start_inprocess
from tests.support.upstream import Upstream

PRICE = 10_000  # 0.01 USDC


@pytest.fixture(scope="module")
def usdc(chain: EvmChain) -> str:
    return chain.deploy_token("USD Coin", "2")


def _settings(node: JsonRpcServer, chain: EvmChain, usdc: str, merchant: str) -> dict:
    gas, hot = chain.new_account(), chain.new_account()
    chain.mint(usdc, hot.address, 1_000_000_000)
    return {
        "evm_rpc_url": node.url,
        "evm_chain_id": chain.chain_id,
        "evm_token_address": usdc,
        "evm_pay_to": merchant,
        "evm_gas_private_key": gas.key.hex(),
        "evm_hot_wallet_private_key": hot.key.hex(),
        "evm_confirmations": 1,
        "invoice_mint_rate_limit": 100_000,
    }


@pytest.fixture
def merchant() -> str:
    return Account.create().address


@pytest.fixture
async def tw(
    db_url: str, tmp_path, node: JsonRpcServer, chain: EvmChain, usdc: str, merchant: str
) -> AsyncIterator[InProcess]:
    t = await start_inprocess(db_url, tmp=str(tmp_path), **_settings(node, chain, usdc, merchant))
    yield t
    await t.close()


def funded(chain: EvmChain, usdc: str, amount: int = 10_000_000) -> LocalAccount:
    acct = chain.new_account()
    chain.mint(usdc, acct.address, amount)
    return acct


async def _service(tw: InProcess, up: Upstream, name: str = "svc") -> str:
    p = await tw.key(f"prov-{name}", "provider")
    return await tw.service(p, up.url, price="0.01", allow_anonymous=True, name=name)


async def _ledger_ok(tw: InProcess) -> None:
    rep = await verify(tw.rt.store)
    assert rep.ok, rep.render()


async def _invoice(tw: InProcess, sid: str, wallet: str, **headers: str) -> dict:
    st, body, _ = await tw.call(sid, "ok", None, headers={"X-Wallet-Address": wallet, **headers})
    assert st == 402, body
    return json.loads(body)["detail"]


async def _pay(tw: InProcess, sid: str, inv: dict, tx: str, signature: str) -> tuple[int, dict]:
    h = {"X-Invoice-Id": inv["invoiceId"], "X-Payment": tx, "X-Payer-Signature": signature}
    st, raw, _ = await tw.call(sid, "ok", None, headers=h)
    return st, (json.loads(raw) if raw.startswith(b"{") else {})


# --------------------------------------------------------------------------- owner ids


async def test_derived_and_reserved_owner_ids_are_claimed_only_with_proof(
    tw: InProcess, upstream: Upstream, chain: EvmChain, usdc: str, merchant: str
):
    sid = await _service(tw, upstream)
    victim = funded(chain, usdc)
    wallet_owner = f"tollway:{victim.address.lower()}"

    # The victim pays a batch of 10 calls without a key and uses 3: 7 calls' worth stays.
    inv = await _invoice(tw, sid, victim.address, **{"X-Batch-Target": "10"})
    tx = chain.transfer_token(usdc, victim, merchant, 10 * PRICE)
    sig = payer_signature(victim, inv)
    assert (await _pay(tw, sid, inv, tx, sig))[0] == 200
    draw = {"X-Invoice-Id": inv["invoiceId"], "X-Payer-Signature": sig}
    for _ in range(2):
        assert (await tw.call(sid, "ok", None, headers=draw))[0] == 200
    assert await wallet_units(tw, wallet_owner) == 7 * PRICE

    # A plain mint of any derived or reserved id is refused, whatever the case.
    for owner in (
        wallet_owner,
        wallet_owner.upper(),
        f"invoice:{inv['invoiceId']}",
        f"x402:{victim.address.lower()}",
        "admin",
        "Admin",
    ):
        st, body, _ = await tw.api("POST", "/api/v1/keys", json={"owner_id": owner})
        assert st == 403 and body["error"]["code"] == "owner_id_reserved", (owner, body)
    # nor does a thief's own key lend the right
    thief_key = await tw.key("thief")
    st, body, _ = await tw.api("POST", "/api/v1/keys", thief_key, json={"owner_id": wallet_owner})
    assert st == 403, body

    # A thief asks for the victim's challenge and signs it with another key: refused.
    thief = Account.create()
    st, ch, _ = await tw.api(
        "POST", "/api/v1/auth/challenge", json={"address": victim.address, "chain": "evm"}
    )
    assert st == 201 and ch["owner_id"] == wallet_owner
    forged = "0x" + thief.sign_message(encode_defunct(text=ch["message"])).signature.hex()
    st, body, _ = await tw.api(
        "POST", "/api/v1/auth/verify", json={"message": ch["message"], "signature": forged}
    )
    assert st == 401 and body["error"]["code"] == "invalid_wallet_signature"
    # A message the server never issued (the thief's own text, signed by the victim's
    # key would be needed anyway) is refused too.
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/auth/verify",
        json={"message": ch["message"].replace("Nonce: ", "Nonce: 0"), "signature": forged},
    )
    assert st == 401

    # The victim signs the challenge: a key for the wallet's owner id, and only once.
    good = "0x" + victim.sign_message(encode_defunct(text=ch["message"])).signature.hex()
    st, k, _ = await tw.api(
        "POST", "/api/v1/auth/verify", json={"message": ch["message"], "signature": good}
    )
    assert st == 201 and k["owner_id"] == wallet_owner and k["rate_limit"] == 60
    st, body, _ = await tw.api(
        "POST", "/api/v1/auth/verify", json={"message": ch["message"], "signature": good}
    )
    assert st == 401  # a replayed signature claims nothing
    key = f"{k['key_id']}:{k['secret']}"

    # The owner spends it on a call with the key, then withdraws the rest on chain.
    st, _, h = await tw.call(sid, "ok", key)
    assert st == 200 and h["X-ACF-Amount"] == "0.01"
    assert await wallet_units(tw, wallet_owner) == 6 * PRICE
    before = chain.token_balance(usdc, victim.address)
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/withdraw",
        key,
        json={"amount": "0.06", "to_address": victim.address},
    )
    assert st == 200 and body["withdrawal"]["status"] == "paid", body
    assert chain.token_balance(usdc, victim.address) == before + 6 * PRICE
    assert await wallet_units(tw, wallet_owner) == 0
    await _ledger_ok(tw)


async def test_keys_minted_without_an_admin_get_the_default_rate_limit(tw: InProcess):
    st, body, _ = await tw.api(
        "POST", "/api/v1/keys", json={"owner_id": "greedy", "rate_limit": 10**9}
    )
    assert st == 201 and body["rate_limit"] == 60
    st, body, _ = await tw.api(
        "POST", "/api/v1/keys", tw.admin, json={"owner_id": "granted", "rate_limit": 5000}
    )
    assert st == 201 and body["rate_limit"] == 5000


# --------------------------------------------------------------------------- invoices


async def test_a_strangers_transfer_never_pays_your_invoice(
    tw: InProcess, upstream: Upstream, chain: EvmChain, usdc: str, merchant: str
):
    sid = await _service(tw, upstream)
    victim, stranger = funded(chain, usdc), funded(chain, usdc)
    victim_inv = await _invoice(tw, sid, victim.address)
    paid = chain.transfer_token(usdc, victim, merchant, PRICE)  # pays the victim's invoice
    deposit = chain.transfer_token(usdc, victim, merchant, 5 * PRICE)  # a plain deposit
    hits = upstream.hits

    for tx in (paid, deposit):
        # the stranger's own invoice, own signature, the victim's transfer
        own = await _invoice(tw, sid, stranger.address)
        st, body = await _pay(tw, sid, own, tx, payer_signature(stranger, own))
        assert (st, body["error"]["code"]) == (402, "payer_mismatch"), body
        # the stranger names the victim as payer, but cannot sign for them
        named = await _invoice(tw, sid, victim.address)
        forged = stranger.sign_message(encode_defunct(text=named["payerMessage"])).signature.hex()
        st, body = await _pay(tw, sid, named, tx, forged)
        assert (st, body["error"]["code"]) == (402, "invalid_payer_signature"), body
        # and cannot reuse the victim's signature of another invoice
        st, body = await _pay(tw, sid, named, tx, payer_signature(victim, victim_inv))
        assert (st, body["error"]["code"]) == (402, "invalid_payer_signature"), body
    assert upstream.hits == hits
    assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM payments") == 0

    # The victim's own retry and deposit claim still succeed, each once.
    st, body = await _pay(tw, sid, victim_inv, paid, payer_signature(victim, victim_inv))
    assert st == 200, body
    vkey = await tw.key("victim")
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/wallet/deposit",
        vkey,
        json={"tx_hash": deposit, "signature": claim("victim", deposit, victim)},
    )
    assert st == 201 and body["amount_units"] == 5 * PRICE, body
    assert await wallet_units(tw, "victim") == 5 * PRICE
    assert await wallet_units(tw, f"tollway:{stranger.address.lower()}") == 0
    await _ledger_ok(tw)


# --------------------------------------------------------------------------- x402


async def test_x402_settlement_presented_at_once_elsewhere_never_credits_twice(
    pg_url: str,
    tmp_path,
    node: JsonRpcServer,
    chain: EvmChain,
    usdc: str,
    upstream: Upstream,
):
    """20 rounds on a node that mines a block a second: while an x402 call settles, the
    payer watches the chain and presents the settlement's transaction, the moment it
    is mined and over and over until the call is answered, as the payment of its own
    invoice and as a signed deposit claim. Only the x402 credit may ever happen."""
    merchant = Account.create().address
    settings = _settings(node, chain, usdc, merchant)
    gas = Account.from_key(settings["evm_gas_private_key"]).address
    tw = await start_inprocess(pg_url, tmp=str(tmp_path), **settings)
    rounds = 20
    try:
        sid = await _service(tw, upstream)
        payer = funded(chain, usdc)
        claimer_key = await tw.key("claimer")
        url = f"{tw.base}/api/v1/proxy/{sid}/ok"
        refused: list[int] = []
        chain.start_interval_mining(1.0)
        try:
            async with httpx.AsyncClient(timeout=60) as plain:
                for _ in range(rounds):
                    inv = await _invoice(tw, sid, payer.address)
                    r402 = await plain.get(url)
                    req = decode_payment_required_header(r402.headers["PAYMENT-REQUIRED"])
                    header = encode_payment_signature_header(
                        await official(payer).create_payment_payload(req)
                    )
                    seen = chain.block_number()
                    call = asyncio.ensure_future(
                        plain.get(url, headers={"PAYMENT-SIGNATURE": header})
                    )
                    settlement: str | None = None
                    while True:
                        done = call.done()
                        settlement = settlement or _mined_tx_from(chain, gas, seen)
                        if settlement is not None:
                            st, _ = await _pay(
                                tw, sid, inv, settlement, payer_signature(payer, inv)
                            )
                            refused.append(st)
                            st, _, _ = await tw.api(
                                "POST",
                                "/api/v1/wallet/deposit",
                                claimer_key,
                                json={
                                    "tx_hash": settlement,
                                    "signature": claim("claimer", settlement, payer),
                                },
                            )
                            refused.append(st)
                        if done:
                            break
                        await asyncio.sleep(0.02)
                    assert (await call).status_code == 200
                    assert settlement is not None
        finally:
            chain.stop_interval_mining()
        store = tw.rt.store
        assert 200 not in refused and 201 not in refused, refused
        # One credit per payment: the x402 deposits, and nothing else from outside.
        credits = await store.fetch(
            "SELECT kind, COUNT(*) AS n, SUM(amount) AS total FROM transfers"
            " WHERE debit_account = $1 GROUP BY kind",
            j.world("USDC").id,
        )
        assert [(r["kind"], int(r["n"]), int(r["total"])) for r in credits] == [
            ("x402_deposit", rounds, rounds * PRICE)
        ]
        assert await wallet_units(tw, "claimer") == 0
        assert await store.fetchval("SELECT COUNT(*) FROM invoices WHERE status = 'paid'") == 0
        assert chain.token_balance(usdc, merchant) == rounds * PRICE
        await _ledger_ok(tw)
    finally:
        await tw.close()


def _mined_tx_from(chain: EvmChain, sender: str, after_block: int) -> str | None:
    """The first transaction ``sender`` got mined after ``after_block``, as the payer would
    see it on a block explorer."""
    with chain.lock:
        head = int(chain.w3.eth.block_number)
        for n in range(after_block + 1, head + 1):
            for t in chain.w3.eth.get_block(n, full_transactions=True)["transactions"]:
                if t["from"] == sender:
                    return "0x" + bytes(t["hash"]).hex()
    return None


async def test_x402_authorization_must_outlive_the_upstream_and_pay_its_own_resource(
    tw: InProcess, upstream: Upstream, chain: EvmChain, usdc: str, merchant: str
):
    a = await _service(tw, upstream, "a")
    b = await _service(tw, upstream, "b")
    payer = funded(chain, usdc)
    url_a = f"{tw.base}/api/v1/proxy/{a}/ok"
    url_b = f"{tw.base}/api/v1/proxy/{b}/ok"
    async with httpx.AsyncClient() as plain:
        req = decode_payment_required_header((await plain.get(url_a)).headers["PAYMENT-REQUIRED"])
        # The settle margin plus the upstream's 5 s connect and 30 s read timeouts: 41 s.
        short = req.model_copy(deep=True)
        short.accepts[0].max_timeout_seconds = 30
        hits = upstream.hits
        header = encode_payment_signature_header(
            await official(payer).create_payment_payload(short)
        )
        r = await plain.get(url_a, headers={"PAYMENT-SIGNATURE": header})
        assert (
            r.status_code == 402 and r.json()["error"]["code"] == "authorization_expires_too_soon"
        )

        # Offered for A, same price and payTo as B: refused on B, still good on A.
        header = encode_payment_signature_header(await official(payer).create_payment_payload(req))
        r = await plain.get(url_b, headers={"PAYMENT-SIGNATURE": header})
        assert r.status_code == 402 and r.json()["error"]["code"] == "resource_mismatch", r.text
        assert upstream.hits == hits
        r = await plain.get(url_a, headers={"PAYMENT-SIGNATURE": header})
        assert r.status_code == 200, r.text
    assert upstream.hits == hits + 1
    assert chain.token_balance(usdc, merchant) == PRICE
    await _ledger_ok(tw)


# --------------------------------------------------------------------------- review findings


async def test_sign_in_names_this_servers_origin_never_the_request_host(
    tw: InProcess, chain: EvmChain, usdc: str
):
    """A phishing site that asks for a challenge with its own Host gets a message naming
    this server; a wallet would refuse to sign it on the phishing page."""
    victim = funded(chain, usdc)
    origin = tw.rt.settings.public_origin
    st, ch, _ = await tw.api(
        "POST",
        "/api/v1/auth/challenge",
        headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"},
        json={"address": victim.address},
    )
    assert st == 201
    assert ch["message"].startswith(origin.split("://")[1] + " wants you to sign in")
    assert "evil.example" not in ch["message"] and f"URI: {origin}" in ch["message"]
    # a message for another origin, even one this server stored, claims nothing
    await tw.rt.store.execute(
        "UPDATE wallet_challenges SET message = replace(message, $2, 'evil.example')"
        " WHERE nonce = $1",
        ch["nonce"],
        origin.split("://")[1],
    )
    tampered = ch["message"].replace(origin.split("://")[1], "evil.example")
    sig = "0x" + victim.sign_message(encode_defunct(text=tampered)).signature.hex()
    st, body, _ = await tw.api(
        "POST", "/api/v1/auth/verify", json={"message": tampered, "signature": sig}
    )
    assert st == 401, body


async def test_a_batch_draw_is_bounded_by_its_batch_and_keyed_batches_need_the_key(
    tw: InProcess, upstream: Upstream, chain: EvmChain, usdc: str, merchant: str
):
    """The invoice id and payer signature draw at most the batch, never the owner's
    other money, and never reach the upstream."""
    sid = await _service(tw, upstream)
    payer = funded(chain, usdc)
    # an anonymous batch of 3: the paying call and 2 draws, then 402, although
    # the wallet gets more money meanwhile
    inv = await _invoice(tw, sid, payer.address, **{"X-Batch-Target": "3"})
    tx = chain.transfer_token(usdc, payer, merchant, 3 * PRICE)
    sig = payer_signature(payer, inv)
    assert (await _pay(tw, sid, inv, tx, sig))[0] == 200
    seen = upstream.seen[-1].headers
    private = {"x-payer-signature", "x-invoice-id", "x-payment", "x-batch-target"}
    assert not private & {k.lower() for k, _ in seen}
    await tw.credit(f"tollway:{payer.address.lower()}", "1.00")
    draw = {"X-Invoice-Id": inv["invoiceId"], "X-Payer-Signature": sig}
    assert [(await tw.call(sid, "ok", None, headers=draw))[0] for _ in range(3)] == [
        200,
        200,
        402,
    ]
    # a draw whose call fails is given back
    inv = await _invoice(tw, sid, payer.address, **{"X-Batch-Target": "2"})
    tx = chain.transfer_token(usdc, payer, merchant, 2 * PRICE)
    sig = payer_signature(payer, inv)
    assert (await _pay(tw, sid, inv, tx, sig))[0] == 200
    draw = {"X-Invoice-Id": inv["invoiceId"], "X-Payer-Signature": sig}
    st, _, _ = await tw.call(sid, "status/503", None, headers=draw)
    assert st == 503
    assert (await tw.call(sid, "ok", None, headers=draw))[0] == 200
    assert (await tw.call(sid, "ok", None, headers=draw))[0] == 402

    # bought with a key: drawn only with a key of that owner
    alice = await tw.key("alice")
    h = {"X-Wallet-Address": payer.address, "X-Batch-Target": "3"}
    st, body, _ = await tw.call(sid, "ok", alice, headers=h)
    inv = json.loads(body)["detail"]
    tx = chain.transfer_token(usdc, payer, merchant, 3 * PRICE)
    sig = payer_signature(payer, inv)
    st, _, _ = await tw.call(
        sid,
        "ok",
        alice,
        headers={"X-Invoice-Id": inv["invoiceId"], "X-Payment": tx, "X-Payer-Signature": sig},
    )
    assert st == 200
    draw = {"X-Invoice-Id": inv["invoiceId"], "X-Payer-Signature": sig}
    st, body, _ = await tw.call(sid, "ok", None, headers=draw)
    assert st == 402 and json.loads(body)["error"]["code"] == "owner_key_required"
    assert (await tw.call(sid, "ok", alice, headers=draw))[0] == 200
    await _ledger_ok(tw)


async def test_an_x402_upload_cannot_outlast_its_authorization(
    tmp_path, db_url: str, node: JsonRpcServer, chain: EvmChain, usdc: str, upstream: Upstream
):
    """validBefore covers the upstream's timeouts and the margin; the body must arrive
    before the rest runs out, or the call ends 408 unpaid and the upstream never runs."""
    from tests.proxy.test_bad_input import _send_in_segments

    merchant = Account.create().address
    settings = _settings(node, chain, usdc, merchant)
    tw = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        upstream_connect_timeout=1.0,
        upstream_read_timeout=2.0,
        **settings,
    )
    try:
        sid = await _service(tw, upstream)
        payer = funded(chain, usdc)
        url = f"{tw.base}/api/v1/proxy/{sid}/echo/slow"
        async with httpx.AsyncClient() as plain:
            req = decode_payment_required_header((await plain.get(url)).headers["PAYMENT-REQUIRED"])
        req.accepts[0].max_timeout_seconds = 11  # floor: 1 + 2 + 6 = 9 s, leaving 2 s to upload
        header = encode_payment_signature_header(await official(payer).create_payment_payload(req))
        hits = upstream.hits
        st, raw = await _send_in_segments(
            tw.base,
            "POST",
            f"/api/v1/proxy/{sid}/echo/slow",
            {"PAYMENT-SIGNATURE": header},
            b"x" * 160,
            pieces=16,
            pause=0.3,
        )
        assert st == 408, raw
        assert upstream.hits == hits
        assert chain.token_balance(usdc, merchant) == 0
        assert await tw.rt.store.fetchval("SELECT COUNT(*) FROM transfers") == 0
        await _ledger_ok(tw)
    finally:
        await tw.close()


async def test_money_granted_to_an_unminted_owner_id_is_not_for_the_first_minter(
    tw: InProcess,
):
    await tw.credit("carol", "5.00")
    st, body, _ = await tw.api("POST", "/api/v1/keys", json={"owner_id": "carol"})
    assert st == 409 and body["error"]["code"] == "owner_taken", body
    carol = await tw.key("carol")  # the admin's grant hands it its first key
    st, bal, _ = await tw.api("GET", "/api/v1/wallet/balance", carol)
    assert st == 200 and bal["balances"][0]["available_units"] == 5_000_000
    # a grant to a wallet owner id in checksum case is the wallet's own, lower-cased
    wallet = Account.create()
    await tw.credit(f"tollway:{wallet.address}", "1.00")
    assert await wallet_units(tw, f"tollway:{wallet.address.lower()}") == 1_000_000
    key = await sign_in(tw, wallet)
    st, bal, _ = await tw.api("GET", "/api/v1/wallet/balance", key)
    assert bal["balances"][0]["available_units"] == 1_000_000


async def test_expired_sign_in_challenges_are_swept(tmp_path, db_url: str):
    tw = await start_inprocess(db_url, tmp=str(tmp_path), hold_sweep_interval_seconds=0.2)
    try:
        for _ in range(5):
            st, _, _ = await tw.api(
                "POST", "/api/v1/auth/challenge", json={"address": Account.create().address}
            )
            assert st == 201
        store = tw.rt.store
        assert await store.fetchval("SELECT COUNT(*) FROM wallet_challenges") == 5
        await store.execute("UPDATE wallet_challenges SET expires_at = 1")
        for _ in range(50):
            if await store.fetchval("SELECT COUNT(*) FROM wallet_challenges") == 0:
                break
            await asyncio.sleep(0.1)
        assert await store.fetchval("SELECT COUNT(*) FROM wallet_challenges") == 0
    finally:
        await tw.close()
