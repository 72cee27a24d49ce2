"""Cardano invoices through the proxy, against a local Blockfrost-compatible backend.

Transactions are built and signed with pycardano in the test; the backend
checks submissions like a node (inputs, value, witnesses).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from pycardano import Transaction, TransactionWitnessSet, VerificationKeyWitness

from ledger.verify import verify
from tests.billing.test_cardano_rail import lovelace, new_wallet, pay
from tests.support.blockfrost_server import BlockfrostServer, blockfrost_server  # noqa: F401
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream


@pytest.fixture
async def setup(
    db_url: str, tmp_path, blockfrost_server: BlockfrostServer, upstream: Upstream
) -> AsyncIterator[tuple]:
    provider, partner = new_wallet(), new_wallet()
    tw = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        cardano_backend_url=blockfrost_server.url,
        cardano_project_id=blockfrost_server.project_id,
        cardano_pay_to=provider.bech32,
        cardano_network="preprod",
        cardano_rate="100",  # 0.05 USDC -> 5 ADA
        cardano_split_outputs=f"{partner.bech32}=1000",
        cardano_confirmations=1,
        invoice_mint_rate_limit=100_000,
    )
    p = await tw.key("prov", "provider")
    sid = await tw.service(p, upstream.url, price="0.05", allow_anonymous=True)
    yield tw, sid, provider, partner
    await tw.close()


async def _invoice(tw: InProcess, sid: str) -> dict:
    st, body, _ = await tw.call(sid, "ok", None, headers={"X-Payment-Chain": "cardano"})
    assert st == 402, body
    return json.loads(body)["detail"]


async def _retry(tw: InProcess, sid: str, inv: dict, payment: str) -> tuple[int, dict | bytes]:
    st, body, _ = await tw.call(
        sid, "ok", None, headers={"X-Invoice-Id": inv["invoiceId"], "X-Payment": payment}
    )
    return st, json.loads(body) if body.startswith(b"{") else body


async def test_signed_cbor_with_right_outputs_is_accepted_and_submitted(
    setup, blockfrost_server: BlockfrostServer, upstream: Upstream
):
    tw, sid, provider, partner = setup
    inv = await _invoice(tw, sid)
    assert (
        inv["chain"] == "cardano-preprod"
        and inv["asset"] == "ADA"
        and inv["amountUnits"] == "5000000"
    )
    assert inv["extra"]["outputs"] == [
        {"address": partner.bech32, "unit": "lovelace", "amount": "500000"}
    ]
    tx = pay(
        blockfrost_server,
        new_wallet(),
        [(provider.bech32, lovelace(5_000_000)), (partner.bech32, lovelace(500_000))],
    )
    st, body = await _retry(tw, sid, inv, tx.to_cbor_hex())
    assert st == 200, body
    assert blockfrost_server.submitted and blockfrost_server.submitted[-1].tx_id == str(tx.id)
    store = tw.rt.store
    dep = await store.fetchrow("SELECT asset, amount FROM transfers WHERE kind = 'invoice_deposit'")
    assert (dep["asset"], dep["amount"]) == ("ADA", 5_000_000)
    assert (await verify(store)).ok


async def test_cardano_refusals(setup, blockfrost_server: BlockfrostServer, upstream: Upstream):
    tw, sid, provider, partner = setup
    hits = upstream.hits
    # a missing split output
    inv = await _invoice(tw, sid)
    tx = pay(blockfrost_server, new_wallet(), [(provider.bech32, lovelace(5_000_000))])
    st, body = await _retry(tw, sid, inv, tx.to_cbor_hex())
    assert st == 402 and body["error"]["code"] == "missing_split_output"
    # a wrong amount
    inv = await _invoice(tw, sid)
    tx = pay(
        blockfrost_server,
        new_wallet(),
        [(provider.bech32, lovelace(4_999_999)), (partner.bech32, lovelace(500_000))],
    )
    st, body = await _retry(tw, sid, inv, tx.to_cbor_hex())
    assert st == 402 and body["error"]["code"] == "wrong_amount"
    # a bad witness signature: signed by someone else over the same body
    inv = await _invoice(tw, sid)
    good = pay(
        blockfrost_server,
        new_wallet(),
        [(provider.bech32, lovelace(5_000_000)), (partner.bech32, lovelace(500_000))],
    )
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
    st, body = await _retry(tw, sid, inv, forged.to_cbor_hex())
    assert st == 402 and body["error"]["code"] == "bad_witness"
    assert upstream.hits == hits
    assert not blockfrost_server.submitted


async def test_tx_hash_path_is_verified_against_the_backend(
    setup, blockfrost_server: BlockfrostServer, upstream: Upstream
):
    tw, sid, provider, partner = setup
    inv = await _invoice(tw, sid)
    tx = pay(
        blockfrost_server,
        new_wallet(),
        [(provider.bech32, lovelace(5_000_000)), (partner.bech32, lovelace(500_000))],
    )
    tx_id = str(tx.id)
    await tw.rt.payments.invoices.cardano_rail.submit(
        tx.to_cbor_hex()
    )  # the payer submits it themselves
    st, body = await _retry(tw, sid, inv, tx_id)  # still in the mempool
    assert st == 402 and body["error"]["code"] == "tx_not_found"
    blockfrost_server.advance(1)
    st, body = await _retry(tw, sid, inv, tx_id)
    assert st == 200, body
    # the same transaction cannot pay another invoice
    inv2 = await _invoice(tw, sid)
    st, body = await _retry(tw, sid, inv2, tx_id)
    assert st == 409 and body["error"]["code"] == "payment_already_used"
    assert (await verify(tw.rt.store)).ok
