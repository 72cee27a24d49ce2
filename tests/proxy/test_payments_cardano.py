"""Cardano invoices through the proxy, against a local Blockfrost-compatible backend.

Transactions are built and signed with pycardano in the test; the backend
checks submissions like a node (inputs, value, witnesses) and knows a
transaction only once a test mines a block with it. Invoices are bound to
their payer: the 402 is asked for with ``X-Wallet-Address``, the retry is
signed by that address (CIP-8, ``X-Payer-Signature`` + ``X-Payer-Key``) and the
transaction must spend from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pycardano import Transaction, TransactionWitnessSet, VerificationKeyWitness

from ledger.verify import verify
from tests.billing.test_cardano_rail import Wallet, lovelace, new_wallet, pay, sign, sign_message
from tests.support.blockfrost_server import BlockfrostServer, blockfrost_server  # noqa: F401
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream


@dataclass
class Env:
    tw: InProcess
    sid: str
    provider: Wallet
    partner: Wallet


async def _start(
    db_url: str, tmp_path: Any, server: BlockfrostServer, upstream: Upstream, confirmations: int
) -> Env:
    provider, partner = new_wallet(), new_wallet()
    tw = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        cardano_backend_url=server.url,
        cardano_project_id=server.project_id,
        cardano_pay_to=provider.bech32,
        cardano_network="preprod",
        cardano_rate="100",  # 0.05 USDC -> 5 ADA
        cardano_split_outputs=f"{partner.bech32}=1000",
        cardano_confirmations=confirmations,
        invoice_mint_rate_limit=100_000,
    )
    p = await tw.key("prov", "provider")
    sid = await tw.service(p, upstream.url, price="0.05", allow_anonymous=True)
    return Env(tw, sid, provider, partner)


@pytest.fixture
async def setup(
    db_url: str, tmp_path, blockfrost_server: BlockfrostServer, upstream: Upstream
) -> AsyncIterator[Env]:
    """One confirmation required: signed CBOR is submitted, then paid by its hash."""
    env = await _start(db_url, tmp_path, blockfrost_server, upstream, confirmations=1)
    yield env
    await env.tw.close()


@pytest.fixture
async def instant(
    db_url: str, tmp_path, blockfrost_server: BlockfrostServer, upstream: Upstream
) -> AsyncIterator[Env]:
    """No confirmations required: accepted signed CBOR pays at once."""
    env = await _start(db_url, tmp_path, blockfrost_server, upstream, confirmations=0)
    yield env
    await env.tw.close()


async def _invoice(env: Env, payer: Wallet | str) -> dict:
    address = payer if isinstance(payer, str) else payer.bech32
    st, body, _ = await env.tw.call(
        env.sid, "ok", None, headers={"X-Payment-Chain": "cardano", "X-Wallet-Address": address}
    )
    assert st == 402, body
    detail = json.loads(body)["detail"]
    assert detail["payer"] == address
    return detail


async def _retry(env: Env, inv: dict, payment: str, signer: Wallet) -> tuple[int, Any, Any]:
    """The retry as a CIP-30 wallet sends it: ``signer`` signs the invoice's payer message."""
    signature, key = sign_message(signer, inv["payerMessage"])
    st, body, headers = await env.tw.call(
        env.sid,
        "ok",
        None,
        headers={
            "X-Invoice-Id": inv["invoiceId"],
            "X-Payment": payment,
            "X-Payer-Signature": signature,
            "X-Payer-Key": key,
        },
    )
    return st, json.loads(body) if body.startswith(b"{") else body, headers


def _payment(server: BlockfrostServer, env: Env, payer: Wallet) -> Transaction:
    """A transaction from ``payer`` paying the invoice's terms (5 ADA + 0.5 ADA split)."""
    return pay(
        server,
        payer,
        [(env.provider.bech32, lovelace(5_000_000)), (env.partner.bech32, lovelace(500_000))],
    )


async def _status(env: Env, inv: dict) -> str:
    status = await env.tw.rt.payments.invoices.status(inv["invoiceId"])
    assert status is not None
    return str(status["status"])


async def _deposits(env: Env) -> list[tuple[str, int]]:
    rows = await env.tw.rt.store.fetch(
        "SELECT credit_account, amount FROM transfers WHERE kind = 'invoice_deposit'"
    )
    return [(r["credit_account"], int(r["amount"])) for r in rows]


def _wallet_account(payer: Wallet) -> str:
    return f"wallet:tollway:{payer.bech32}:ADA"


async def _ledger_clean(env: Env) -> None:
    report = await verify(env.tw.rt.store)
    assert report.ok, report.violations


# ---------------------------------------------------------------------------- paying


async def test_signed_cbor_counts_only_once_confirmed_then_its_hash_pays_once(
    setup: Env, blockfrost_server: BlockfrostServer, upstream: Upstream
):
    env, payer = setup, new_wallet()
    inv = await _invoice(env, payer)
    assert (
        inv["chain"] == "cardano-preprod"
        and inv["asset"] == "ADA"
        and inv["amountUnits"] == "5000000"
    )
    assert inv["extra"]["outputs"] == [
        {"address": env.partner.bech32, "unit": "lovelace", "amount": "500000"}
    ]
    hits = upstream.hits
    tx = _payment(blockfrost_server, env, payer)
    tx_id = str(tx.id)

    st, body, headers = await _retry(env, inv, tx.to_cbor_hex(), payer)
    assert st == 402 and body["error"]["code"] == "payment_pending", body
    assert body["error"]["tx_id"] == tx_id and int(headers["Retry-After"]) > 0
    assert [s.tx_id for s in blockfrost_server.submitted] == [tx_id]
    # Submitted is not on chain: nothing is counted, nothing is served.
    assert await _status(env, inv) == "open"
    assert await _deposits(env) == []
    assert upstream.hits == hits

    st, body, _ = await _retry(env, inv, tx_id, payer)  # still in the mempool
    assert st == 402 and body["error"]["code"] == "tx_not_found"
    assert await _deposits(env) == []

    blockfrost_server.advance(1)
    st, body, _ = await _retry(env, inv, tx_id, payer)
    assert st == 200, body
    assert upstream.hits == hits + 1
    assert await _status(env, inv) == "paid"
    assert await _deposits(env) == [(_wallet_account(payer), 5_000_000)]

    # Once: neither this invoice again nor another invoice of the same payer.
    st, body, _ = await _retry(env, inv, tx_id, payer)
    assert st == 409 and body["error"]["code"] == "invoice_already_used"
    inv2 = await _invoice(env, payer)
    st, body, _ = await _retry(env, inv2, tx_id, payer)
    assert st == 409 and body["error"]["code"] == "payment_already_used"
    assert await _deposits(env) == [(_wallet_account(payer), 5_000_000)]
    assert upstream.hits == hits + 1
    await _ledger_clean(env)


async def test_signed_cbor_pays_at_once_when_no_confirmations_are_required(
    instant: Env, blockfrost_server: BlockfrostServer
):
    env, payer = instant, new_wallet()
    inv = await _invoice(env, payer)
    tx = _payment(blockfrost_server, env, payer)
    st, body, _ = await _retry(env, inv, tx.to_cbor_hex(), payer)
    assert st == 200, body
    assert blockfrost_server.submitted[-1].tx_id == str(tx.id)
    assert await _deposits(env) == [(_wallet_account(payer), 5_000_000)]
    await _ledger_clean(env)


async def test_tx_hash_path_is_verified_against_the_backend(
    setup: Env, blockfrost_server: BlockfrostServer
):
    env, payer = setup, new_wallet()
    inv = await _invoice(env, payer)
    tx = _payment(blockfrost_server, env, payer)
    tx_id = await env.tw.rt.payments.invoices.cardano_rail.submit(tx.to_cbor_hex())
    st, body, _ = await _retry(env, inv, tx_id, payer)  # still in the mempool
    assert st == 402 and body["error"]["code"] == "tx_not_found"
    blockfrost_server.advance(1)
    st, body, _ = await _retry(env, inv, tx_id, payer)
    assert st == 200, body
    await _ledger_clean(env)


# ---------------------------------------------------------------------------- refusals


async def test_cardano_transaction_older_than_its_invoice_is_refused(
    setup: Env, blockfrost_server: BlockfrostServer, upstream: Upstream
):
    env, payer = setup, new_wallet()
    # The payer's transaction was mined ten minutes ago...
    blockfrost_server.clock = lambda: time.time() - 600
    tx = _payment(blockfrost_server, env, payer)
    tx_id = await env.tw.rt.payments.invoices.cardano_rail.submit(tx.to_cbor_hex())
    blockfrost_server.advance(3)
    blockfrost_server.clock = time.time
    # ...so it paid for something else, not for an invoice minted now.
    hits = upstream.hits
    inv = await _invoice(env, payer)
    st, body, _ = await _retry(env, inv, tx_id, payer)
    assert st == 402 and body["error"]["code"] == "tx_before_invoice", body
    assert await _status(env, inv) == "open"
    assert await _deposits(env) == []
    assert upstream.hits == hits
    await _ledger_clean(env)


async def test_stranger_cannot_claim_a_victims_cardano_payment(
    setup: Env, blockfrost_server: BlockfrostServer, upstream: Upstream
):
    env, victim, stranger = setup, new_wallet(), new_wallet()
    # Both invoices exist before the victim pays, so the time check cannot tell them apart.
    victims = await _invoice(env, victim)
    strangers = await _invoice(env, stranger)
    naming_victim = await _invoice(env, victim)  # the stranger names the victim's address
    hits = upstream.hits
    tx = _payment(blockfrost_server, env, victim)
    tx_id = str(tx.id)

    # The victim's signed transaction, with a witness of the stranger's added:
    # valid signatures, but nothing in it is the stranger's.
    both = Transaction(tx.transaction_body, sign(tx.transaction_body, victim, stranger))
    st, body, _ = await _retry(env, strangers, both.to_cbor_hex(), stranger)
    assert st == 402 and body["error"]["code"] == "payer_mismatch", body
    assert blockfrost_server.submitted == []  # never sent on for the stranger

    await env.tw.rt.payments.invoices.cardano_rail.submit(tx.to_cbor_hex())
    blockfrost_server.advance(1)
    # The victim's hash on the stranger's own invoice, signed by the stranger.
    st, body, _ = await _retry(env, strangers, tx_id, stranger)
    assert st == 402 and body["error"]["code"] == "payer_mismatch", body
    # The victim's address on the stranger's invoice: the stranger cannot sign for it.
    st, body, _ = await _retry(env, naming_victim, tx_id, stranger)
    assert st == 402 and body["error"]["code"] == "invalid_payer_signature", body
    assert upstream.hits == hits
    assert await _deposits(env) == []
    assert {await _status(env, i) for i in (victims, strangers, naming_victim)} == {"open"}

    # After all that, the victim's own retry pays the victim's invoice.
    st, body, _ = await _retry(env, victims, tx_id, victim)
    assert st == 200, body
    assert upstream.hits == hits + 1
    assert await _status(env, victims) == "paid"
    assert await _deposits(env) == [(_wallet_account(victim), 5_000_000)]
    await _ledger_clean(env)


async def test_cardano_refusals(
    setup: Env, blockfrost_server: BlockfrostServer, upstream: Upstream
):
    env = setup
    hits = upstream.hits
    # a missing split output
    payer = new_wallet()
    inv = await _invoice(env, payer)
    tx = pay(blockfrost_server, payer, [(env.provider.bech32, lovelace(5_000_000))])
    st, body, _ = await _retry(env, inv, tx.to_cbor_hex(), payer)
    assert st == 402 and body["error"]["code"] == "missing_split_output"
    # a wrong amount
    payer = new_wallet()
    inv = await _invoice(env, payer)
    tx = pay(
        blockfrost_server,
        payer,
        [(env.provider.bech32, lovelace(4_999_999)), (env.partner.bech32, lovelace(500_000))],
    )
    st, body, _ = await _retry(env, inv, tx.to_cbor_hex(), payer)
    assert st == 402 and body["error"]["code"] == "wrong_amount"
    # a bad witness signature: signed by someone else over the same body
    payer = new_wallet()
    inv = await _invoice(env, payer)
    good = _payment(blockfrost_server, env, payer)
    intruder = new_wallet()
    forged = Transaction(
        good.transaction_body,
        TransactionWitnessSet(
            vkey_witnesses=[
                VerificationKeyWitness(
                    good.transaction_witness_set.vkey_witnesses[0].vkey,
                    intruder.skey.sign(good.transaction_body.hash()),
                )
            ]
        ),
    )
    st, body, _ = await _retry(env, inv, forged.to_cbor_hex(), payer)
    assert st == 402 and body["error"]["code"] == "bad_witness"
    # no signature, and a malformed payer address on the 402
    st, body, _ = await env.tw.call(
        env.sid, "ok", None, headers={"X-Invoice-Id": inv["invoiceId"], "X-Payment": "ab" * 32}
    )
    assert st == 402 and json.loads(body)["error"]["code"] == "payer_signature_required"
    st, body, _ = await env.tw.call(
        env.sid,
        "ok",
        None,
        headers={"X-Payment-Chain": "cardano", "X-Wallet-Address": "addr_test1notanaddress"},
    )
    assert st == 400 and json.loads(body)["error"]["code"] == "invalid_wallet_address"
    assert upstream.hits == hits
    assert not blockfrost_server.submitted
    assert await _deposits(env) == []
    await _ledger_clean(env)


async def test_cardano_wallet_signs_in_with_cip8_and_only_its_own_key_works(
    setup: Env, blockfrost_server: BlockfrostServer
):
    """A Cardano payer's wallet owner id is claimed with a CIP-8 signature of a fresh
    challenge; another wallet's signature, or a replay, claims nothing."""
    tw = setup.tw
    payer, thief = new_wallet(), new_wallet()
    st, body, _ = await tw.api("POST", "/api/v1/keys", json={"owner_id": f"tollway:{payer.bech32}"})
    assert st == 403 and body["error"]["code"] == "owner_id_reserved"
    st, ch, _ = await tw.api(
        "POST", "/api/v1/auth/challenge", json={"address": payer.bech32, "chain": "cardano"}
    )
    assert st == 201 and ch["owner_id"] == f"tollway:{payer.bech32}", ch
    forged_sig, forged_key = sign_message(thief, ch["message"])
    st, body, _ = await tw.api(
        "POST",
        "/api/v1/auth/verify",
        json={"message": ch["message"], "signature": forged_sig, "key": forged_key},
    )
    assert st == 401 and body["error"]["code"] == "invalid_wallet_signature"
    signature, key = sign_message(payer, ch["message"])
    proof = {"message": ch["message"], "signature": signature, "key": key}
    st, k, _ = await tw.api("POST", "/api/v1/auth/verify", json=proof)
    assert st == 201 and k["owner_id"] == f"tollway:{payer.bech32}", k
    st, _, _ = await tw.api("POST", "/api/v1/auth/verify", json=proof)
    assert st == 401  # each challenge is used once
    st, bal, _ = await tw.api(
        "GET", f"/payments/balance?wallet={payer.bech32}", f"{k['key_id']}:{k['secret']}"
    )
    assert st == 200 and bal["wallet"] == payer.bech32


async def test_a_payment_submitted_in_time_pays_even_if_it_confirms_after_expiry(
    db_url: str, tmp_path, blockfrost_server: BlockfrostServer, upstream: Upstream
):
    """The buyer's signed CBOR is submitted while the invoice is open; the block (or
    the buyer's retry, after a network drop) comes after the invoice's expiry. The
    payment was made in time, so it pays the invoice, once."""
    import asyncio

    env = await _start(db_url, tmp_path, blockfrost_server, upstream, confirmations=1)
    env.tw.rt.payments.invoices.ttl_ms = 3000
    try:
        payer = new_wallet()
        inv = await _invoice(env, payer)
        tx = _payment(blockfrost_server, env, payer)
        st, body, _ = await _retry(env, inv, tx.to_cbor_hex(), payer)
        assert st == 402 and body["error"]["code"] == "payment_pending", body
        await asyncio.sleep(3.5)
        blockfrost_server.advance(1)
        st, body, _ = await _retry(env, inv, str(tx.id), payer)
        assert st == 200, body
        st, body, _ = await _retry(env, inv, str(tx.id), payer)
        assert st == 409, body
        # an invoice whose payment was made after its expiry still refuses it
        late = await _invoice(env, payer)
        await asyncio.sleep(3.5)
        tx2 = _payment(blockfrost_server, env, payer)
        tx2_id = await env.tw.rt.payments.invoices.cardano_rail.submit(tx2.to_cbor_hex())
        blockfrost_server.advance(1)
        st, body, _ = await _retry(env, late, tx2_id, payer)
        assert st == 402 and body["error"]["code"] == "invoice_expired", body
        assert len(await _deposits(env)) == 1
        await _ledger_clean(env)
    finally:
        await env.tw.close()
