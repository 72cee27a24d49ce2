"""The Cardano rail against real pycardano transactions and a local Blockfrost server.

Transactions are built and signed here with pycardano (fresh ed25519 keys, real
body hashes, real vkey witnesses). The backend is tests/support/blockfrost_server,
which checks submissions like a node (inputs, value, witnesses), so a payment the
rail accepts is one a chain would accept too.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest
from pycardano import (
    Address,
    Asset,
    AssetName,
    MultiAsset,
    Network,
    PaymentSigningKey,
    PaymentVerificationKey,
    ScriptHash,
    Transaction,
    TransactionBody,
    TransactionId,
    TransactionInput,
    TransactionOutput,
    TransactionWitnessSet,
    Value,
    VerificationKeyWitness,
)
from pycardano.cip import cip8

from billing.errors import PaymentRejected, UpstreamRailError
from billing.payer_proof import invoice_message
from billing.rails.cardano import (
    CardanoAsset,
    CardanoRail,
    ExpectedPayment,
    RequiredOutput,
    verify_signed_cbor,
)
from billing.rails.cardano_identity import normalize_cardano_address, payment_key_hash, verify_cip8
from tests.support.blockfrost_server import BlockfrostServer, blockfrost_server  # noqa: F401

NETWORK = "preprod"
POLICY = "a1" * 28  # the invoiced token's policy
OTHER_POLICY = "b2" * 28  # a token with the same name under another policy: worthless
TOKEN_NAME = b"TOLL".hex()
TOKEN = CardanoAsset(POLICY, TOKEN_NAME)
FAKE_TOKEN = CardanoAsset(OTHER_POLICY, TOKEN_NAME)
FEE = 200_000


# ---------------------------------------------------------------------------- helpers


@dataclass
class Wallet:
    skey: PaymentSigningKey
    vkey: PaymentVerificationKey
    address: Address

    @property
    def bech32(self) -> str:
        return str(self.address)


def new_wallet() -> Wallet:
    skey = PaymentSigningKey.generate()
    vkey = skey.to_verification_key()
    return Wallet(skey, vkey, Address(payment_part=vkey.hash(), network=Network.TESTNET))


def value(amounts: Mapping[str, int]) -> Value:
    """``{unit: qty}`` (unit = "lovelace" or policy+name hex) -> pycardano Value."""
    multi = MultiAsset()
    for unit, qty in amounts.items():
        if unit == "lovelace":
            continue
        policy = ScriptHash(bytes.fromhex(unit[:56]))
        multi.setdefault(policy, Asset())[AssetName(bytes.fromhex(unit[56:]))] = qty
    return Value(amounts.get("lovelace", 0), multi)


def sign(body: TransactionBody, *signers: Wallet) -> TransactionWitnessSet:
    body_hash = body.hash()
    return TransactionWitnessSet(
        vkey_witnesses=[VerificationKeyWitness(w.vkey, w.skey.sign(body_hash)) for w in signers]
    )


def pay(
    server: BlockfrostServer,
    payer: Wallet,
    outputs: list[tuple[str, Mapping[str, int]]],
    *,
    extra_funds: Mapping[str, int] | None = None,
) -> Transaction:
    """Fund ``payer`` on the test chain, then build and sign a balanced payment tx.

    The payer is funded with exactly what the outputs need plus fee plus 5 ADA of
    change, so the server's value-conservation check passes.
    """
    need: dict[str, int] = {"lovelace": FEE + 5_000_000}
    for _, amounts in outputs:
        for unit, qty in amounts.items():
            need[unit] = need.get(unit, 0) + qty
    for unit, qty in (extra_funds or {}).items():
        need[unit] = need.get(unit, 0) + qty
    funding_hash, index = server.fund(payer.bech32, need)
    change = dict(need)
    for _, amounts in outputs:
        for unit, qty in amounts.items():
            change[unit] -= qty
    change["lovelace"] -= FEE
    body = TransactionBody(
        inputs=[TransactionInput(TransactionId(bytes.fromhex(funding_hash)), index)],
        outputs=[TransactionOutput(Address.from_primitive(a), value(v)) for a, v in outputs]
        + [TransactionOutput(payer.address, value({u: q for u, q in change.items() if q}))],
        fee=FEE,
    )
    return Transaction(body, sign(body, payer))


def lovelace(n: int) -> dict[str, int]:
    return {"lovelace": n}


def by(wallet: Wallet, not_before_unix: int = 0) -> dict[str, Any]:
    """``verify_tx_hash``'s payer arguments: paid by ``wallet``, after ``not_before_unix``."""
    return {"payer": wallet.bech32, "not_before_unix": not_before_unix}


# For refusals that come before the payer is looked at (outputs, hash, backend trouble).
SOMEONE = by(new_wallet())


def sign_message(wallet: Wallet, message: str) -> tuple[str, str]:
    """What a CIP-30 wallet's ``signData`` returns: (COSE_Sign1 hex, COSE_Key hex)."""
    signed = cip8.sign(message, wallet.skey, attach_cose_key=True, network=Network.TESTNET)
    assert isinstance(signed, dict)
    return signed["signature"], signed["key"]


def rejected_code(excinfo: pytest.ExceptionInfo[PaymentRejected]) -> str:
    return excinfo.value.code


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def provider() -> Wallet:
    return new_wallet()


@pytest.fixture
def partner() -> Wallet:
    return new_wallet()


@pytest.fixture
def payer() -> Wallet:
    return new_wallet()


@pytest.fixture
def ada_invoice(provider: Wallet, partner: Wallet) -> ExpectedPayment:
    """10 ADA to the provider plus a 1.5 ADA revenue-share split to the partner."""
    return ExpectedPayment(
        pay_to=provider.bech32,
        asset=CardanoAsset.lovelace(),
        amount=10_000_000,
        split_outputs=(RequiredOutput(partner.bech32, CardanoAsset.lovelace(), 1_500_000),),
    )


@pytest.fixture
async def rail(blockfrost_server: BlockfrostServer) -> AsyncIterator[CardanoRail]:
    async with CardanoRail(
        blockfrost_server.url, blockfrost_server.project_id, network=NETWORK
    ) as rail:
        yield rail


# ---------------------------------------------------------------------------- signed CBOR


async def test_signed_cbor_with_right_outputs_is_accepted_and_submitted(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    tx = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_500_000))],
    )
    tx_id, outputs = await rail.verify_and_submit(tx.to_cbor_hex(), ada_invoice, payer=payer.bech32)

    assert tx_id == str(tx.id)
    assert [o.address for o in outputs[:2]] == [provider.bech32, partner.bech32]
    assert outputs[0].amounts == {"lovelace": 10_000_000}
    # The backend recorded exactly these bytes, and it is the tx the payer signed.
    assert [s.tx_id for s in blockfrost_server.submitted] == [tx_id]
    assert blockfrost_server.submitted[0].cbor == bytes.fromhex(tx.to_cbor_hex())
    assert ("POST", "/api/v0/tx/submit") in blockfrost_server.requests

    # Once in a block, the same payment also verifies through the tx-hash path.
    blockfrost_server.advance(1)
    confirmed = await rail.verify_tx_hash(tx_id, ada_invoice, min_confirmations=1, **by(payer))
    assert confirmed.tx_id == tx_id and confirmed.confirmations == 1


async def test_native_asset_payment_is_accepted(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
) -> None:
    invoice = ExpectedPayment(provider.bech32, TOKEN, 250)
    tx = pay(
        blockfrost_server, payer, [(provider.bech32, {"lovelace": 1_200_000, TOKEN.unit: 250})]
    )
    tx_id, outputs = await rail.verify_and_submit(tx.to_cbor_hex(), invoice, payer=payer.bech32)
    assert outputs[0].amount_of(TOKEN) == 250
    assert blockfrost_server.submitted[-1].tx_id == tx_id


@pytest.mark.parametrize(
    ("paid", "code"),
    [
        # same name, other policy: a token anyone can mint
        ({"lovelace": 1_200_000, FAKE_TOKEN.unit: 250}, "wrong_asset"),
        # right policy, other name
        ({"lovelace": 1_200_000, POLICY + b"TOLX".hex(): 250}, "wrong_asset"),
        # lovelace instead of the token, even a lot of it
        ({"lovelace": 900_000_000}, "wrong_asset"),
        ({"lovelace": 1_200_000, TOKEN.unit: 249}, "wrong_amount"),
    ],
)
async def test_wrong_native_asset_or_amount_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    paid: dict[str, int],
    code: str,
) -> None:
    invoice = ExpectedPayment(provider.bech32, TOKEN, 250)
    tx = pay(blockfrost_server, payer, [(provider.bech32, paid)])
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(tx.to_cbor_hex(), invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == code
    assert blockfrost_server.submitted == []  # refused before it reached the chain


async def test_token_invoice_is_not_paid_by_lovelace_to_the_address(
    blockfrost_server: BlockfrostServer,
    payer: Wallet,
    provider: Wallet,
) -> None:
    # The mirror case: an ADA invoice is not paid by tokens.
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, {TOKEN.unit: 5_000_000})])
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(tx.to_cbor_hex(), invoice, NETWORK)
    assert rejected_code(excinfo) == "wrong_asset"


async def test_wrong_amount_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    tx = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(9_999_999)), (partner.bech32, lovelace(1_500_000))],
    )
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(tx.to_cbor_hex(), ada_invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == "wrong_amount"
    assert blockfrost_server.submitted == []


async def test_missing_split_output_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    # All of it to the provider, nothing to the partner.
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(11_500_000))])
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(tx.to_cbor_hex(), ada_invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == "missing_split_output"

    # A split output that is present but short is refused the same way.
    tx = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_499_999))],
    )
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(tx.to_cbor_hex(), ada_invoice, NETWORK)
    assert rejected_code(excinfo) == "missing_split_output"
    assert blockfrost_server.submitted == []


async def test_one_output_cannot_pay_both_the_invoice_and_a_split_to_the_same_address(
    blockfrost_server: BlockfrostServer,
    payer: Wallet,
    provider: Wallet,
) -> None:
    invoice = ExpectedPayment(
        provider.bech32,
        CardanoAsset.lovelace(),
        5_000_000,
        split_outputs=(RequiredOutput(provider.bech32, CardanoAsset.lovelace(), 3_000_000),),
    )
    short = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(short.to_cbor_hex(), invoice, NETWORK)
    assert rejected_code(excinfo) == "missing_split_output"

    # Two outputs to the same address add up.
    enough = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(5_000_000)), (provider.bech32, lovelace(3_000_000))],
    )
    tx_id, _ = verify_signed_cbor(enough.to_cbor_hex(), invoice, NETWORK)
    assert tx_id == str(enough.id)


async def test_payment_to_another_address_is_refused(
    blockfrost_server: BlockfrostServer,
    payer: Wallet,
    provider: Wallet,
) -> None:
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    # Same payment key on mainnet is another address (and another chain).
    mainnet_twin = Address(payment_part=provider.vkey.hash(), network=Network.MAINNET)
    for recipient in (new_wallet().bech32, str(mainnet_twin)):
        tx = pay(blockfrost_server, payer, [(recipient, lovelace(50_000_000))])
        with pytest.raises(PaymentRejected) as excinfo:
            verify_signed_cbor(tx.to_cbor_hex(), invoice, NETWORK)
        assert rejected_code(excinfo) == "wrong_recipient"


async def test_witness_signed_over_another_body_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    good = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_500_000))],
    )
    # A cheaper body, signed by the payer; its witness is then attached to the good body.
    cheap_body = TransactionBody(
        inputs=good.transaction_body.inputs,
        outputs=[TransactionOutput(provider.address, value(lovelace(1)))],
        fee=FEE,
    )
    forged = Transaction(good.transaction_body, sign(cheap_body, payer))
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(forged.to_cbor_hex(), ada_invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == "bad_witness"
    assert blockfrost_server.submitted == []


async def test_flipped_signature_byte_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    tx = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_500_000))],
    )
    # A second, valid witness does not excuse a bad one.
    witnesses = sign(tx.transaction_body, payer, new_wallet())
    bad = bytearray(witnesses.vkey_witnesses[1].signature)
    bad[17] ^= 0x01
    witnesses.vkey_witnesses[1] = VerificationKeyWitness(
        witnesses.vkey_witnesses[1].vkey, bytes(bad)
    )
    tampered = Transaction(tx.transaction_body, witnesses)
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(tampered.to_cbor_hex(), ada_invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == "bad_witness"
    assert blockfrost_server.submitted == []


async def test_required_signer_without_witness_and_unsigned_tx_are_refused(
    blockfrost_server: BlockfrostServer,
    payer: Wallet,
    provider: Wallet,
) -> None:
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    body = tx.transaction_body
    body.required_signers = [new_wallet().vkey.hash()]
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(Transaction(body, sign(body, payer)).to_cbor_hex(), invoice, NETWORK)
    assert rejected_code(excinfo) == "missing_witness"

    unsigned = Transaction(tx.transaction_body, TransactionWitnessSet())
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(unsigned.to_cbor_hex(), invoice, NETWORK)
    assert rejected_code(excinfo) == "missing_witness"


async def test_witness_for_the_spent_input_is_enforced_at_submit(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
) -> None:
    """Who owns an input cannot be known offline; the node refuses at submit, and the
    rail turns that into a rejection of the payment. Here the payer signs and owns
    one input, but the other input's owner did not sign."""
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    other = new_wallet()
    other_utxo, index = blockfrost_server.fund(other.bech32, 2_000_000)
    body = tx.transaction_body
    body.inputs = [*body.inputs, TransactionInput(TransactionId(bytes.fromhex(other_utxo)), index)]
    body.outputs = [*body.outputs, TransactionOutput(other.address, value(lovelace(2_000_000)))]
    half_signed = Transaction(body, sign(body, payer))
    verify_signed_cbor(half_signed.to_cbor_hex(), invoice, NETWORK)  # offline: fine
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(half_signed.to_cbor_hex(), invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == "submit_rejected"
    assert "MissingVKeyWitnesses" in excinfo.value.message


async def test_signed_cbor_not_signed_by_the_payer_is_refused_before_submit(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
) -> None:
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(tx.to_cbor_hex(), invoice, payer=new_wallet().bech32)
    assert rejected_code(excinfo) == "payer_mismatch"
    # The payer's own input, but the payer's key did not sign: refused here, not by the node.
    other_key = Transaction(tx.transaction_body, sign(tx.transaction_body, new_wallet()))
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(other_key.to_cbor_hex(), invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == "payer_mismatch"
    assert "did not sign" in excinfo.value.message
    assert blockfrost_server.submitted == []


async def test_a_strangers_extra_witness_does_not_make_them_the_payer(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
) -> None:
    """Anyone who has seen a transaction can sign its body hash and add that witness:
    the node accepts a superfluous witness, so only an input of the payer's counts."""
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    stranger = new_wallet()
    both = Transaction(tx.transaction_body, sign(tx.transaction_body, payer, stranger))
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(both.to_cbor_hex(), invoice, payer=stranger.bech32)
    assert rejected_code(excinfo) == "payer_mismatch"
    assert blockfrost_server.submitted == []
    # The same bytes are the payer's payment, and the node takes them.
    tx_id, _ = await rail.verify_and_submit(both.to_cbor_hex(), invoice, payer=payer.bech32)
    assert blockfrost_server.submitted[-1].tx_id == tx_id == str(tx.id)


async def test_resubmitting_a_spent_payment_is_refused_by_the_node(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
) -> None:
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    await rail.verify_and_submit(tx.to_cbor_hex(), invoice, payer=payer.bech32)
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_and_submit(tx.to_cbor_hex(), invoice, payer=payer.bech32)
    assert rejected_code(excinfo) == "submit_rejected"
    assert len(blockfrost_server.submitted) == 1


@pytest.mark.parametrize(
    "payload",
    ["", "zz", "abc", "00", "84a0a0f5f6" + "00", "8400", "deadbeef", "84" + "81" * 500 + "00"],
)
async def test_malformed_cbor_is_refused(payload: str, provider: Wallet) -> None:
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 1)
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(payload, invoice, NETWORK)
    assert rejected_code(excinfo) == "malformed_cbor"


async def test_invalid_flag_and_foreign_network_id_are_refused(
    blockfrost_server: BlockfrostServer,
    payer: Wallet,
    provider: Wallet,
) -> None:
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    flagged = Transaction(tx.transaction_body, tx.transaction_witness_set, valid=False)
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(flagged.to_cbor_hex(), invoice, NETWORK)
    assert rejected_code(excinfo) == "invalid_transaction"

    body = tx.transaction_body
    body.network_id = Network.MAINNET
    with pytest.raises(PaymentRejected) as excinfo:
        verify_signed_cbor(Transaction(body, sign(body, payer)).to_cbor_hex(), invoice, NETWORK)
    assert rejected_code(excinfo) == "wrong_network"


async def test_tx_id_is_hashed_from_the_body_bytes_as_sent(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
) -> None:
    """A wallet may encode the body differently from pycardano (here: map keys in
    reverse order). The id and the signatures are over those bytes, not a re-encoding."""
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    tx = pay(blockfrost_server, payer, [(provider.bech32, lovelace(5_000_000))])
    body_map = cbor2.loads(tx.transaction_body.to_cbor())
    odd_body = cbor2.dumps(dict(reversed(list(body_map.items()))))
    assert odd_body != tx.transaction_body.to_cbor()
    import hashlib

    odd_hash = hashlib.blake2b(odd_body, digest_size=32).digest()
    witness_set = cbor2.dumps({0: [[payer.vkey.payload, payer.skey.sign(odd_hash)]]})
    raw = b"\x84" + odd_body + witness_set + b"\xf5\xf6"

    tx_id, _ = await rail.verify_and_submit(raw.hex(), invoice, payer=payer.bech32)
    assert tx_id == odd_hash.hex() != str(tx.id)
    assert blockfrost_server.submitted[-1].tx_id == tx_id


# ---------------------------------------------------------------------------- tx hash


async def test_tx_hash_is_verified_against_the_backend(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    tx = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_500_000))],
    )
    tx_id = await rail.submit(tx.to_cbor_hex())
    assert tx_id == str(tx.id)

    # In the mempool only: the indexer does not know it yet.
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_tx_hash(tx_id, ada_invoice, min_confirmations=3, **by(payer))
    assert rejected_code(excinfo) == "tx_not_found"

    blockfrost_server.advance(1)  # in a block: 1 confirmation
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_tx_hash(tx_id, ada_invoice, min_confirmations=3, **by(payer))
    assert rejected_code(excinfo) == "insufficient_confirmations"

    blockfrost_server.advance(2)
    confirmed = await rail.verify_tx_hash(
        tx_id.upper(), ada_invoice, min_confirmations=3, **by(payer)
    )
    assert confirmed.tx_id == tx_id
    assert confirmed.confirmations == 3
    assert confirmed.block_height == blockfrost_server.tip_height - 2
    assert confirmed.outputs[1].address == partner.bech32
    assert confirmed.outputs[1].amounts == {"lovelace": 1_500_000}


async def _mined(server: BlockfrostServer, rail: CardanoRail, tx: Transaction) -> str:
    tx_id = await rail.submit(tx.to_cbor_hex())
    server.advance(1)
    return tx_id


async def test_tx_hash_older_than_the_invoice_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    tx = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_500_000))],
    )
    tx_id = await _mined(blockfrost_server, rail, tx)
    block_time = (await rail.verify_tx_hash(tx_id, ada_invoice, 1, **by(payer))).block_time
    for not_before in (block_time, block_time + 3_600):
        with pytest.raises(PaymentRejected) as excinfo:
            await rail.verify_tx_hash(tx_id, ada_invoice, 1, **by(payer, not_before))
        assert rejected_code(excinfo) == "tx_before_invoice"
    confirmed = await rail.verify_tx_hash(tx_id, ada_invoice, 1, **by(payer, block_time - 1))
    assert confirmed.block_time == block_time


async def test_tx_hash_not_spent_by_the_payer_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    tx = pay(
        blockfrost_server,
        payer,
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_500_000))],
    )
    tx_id = await _mined(blockfrost_server, rail, tx)
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_tx_hash(tx_id, ada_invoice, 1, **by(new_wallet()))
    assert rejected_code(excinfo) == "payer_mismatch"
    # The payer is a payment key, whatever address spells it: with a stake part,
    # or on another network, it is the same holder.
    staked = Address(payment_part=payer.vkey.hash(), staking_part=new_wallet().vkey.hash())
    for spelling in (staked, Address(payment_part=payer.vkey.hash(), network=Network.MAINNET)):
        confirmed = await rail.verify_tx_hash(
            tx_id, ada_invoice, 1, payer=str(spelling), not_before_unix=0
        )
        assert confirmed.tx_id == tx_id


async def test_a_reference_input_of_the_payer_does_not_make_them_the_payer(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    payer: Wallet,
    provider: Wallet,
) -> None:
    """A reference input is only read (CIP-31): someone else's transaction that reads a
    UTxO of the payer's was not made by the payer."""
    invoice = ExpectedPayment(provider.bech32, CardanoAsset.lovelace(), 5_000_000)
    payers_utxo, index = blockfrost_server.fund(payer.bech32, 3_000_000)
    someone = new_wallet()
    body = pay(
        blockfrost_server, someone, [(provider.bech32, lovelace(5_000_000))]
    ).transaction_body
    body.reference_inputs = [TransactionInput(TransactionId(bytes.fromhex(payers_utxo)), index)]
    tx_id = await _mined(blockfrost_server, rail, Transaction(body, sign(body, someone)))
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_tx_hash(tx_id, invoice, 1, **by(payer))
    assert rejected_code(excinfo) == "payer_mismatch"
    assert (await rail.verify_tx_hash(tx_id, invoice, 1, **by(someone))).tx_id == tx_id


async def test_unknown_or_malformed_tx_hash_is_refused(
    rail: CardanoRail, ada_invoice: ExpectedPayment
) -> None:
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_tx_hash(os.urandom(32).hex(), ada_invoice, min_confirmations=1, **SOMEONE)
    assert rejected_code(excinfo) == "tx_not_found"
    for bad in ("../blocks/latest", "ab" * 31, "zz" * 32):
        with pytest.raises(PaymentRejected) as excinfo:
            await rail.verify_tx_hash(bad, ada_invoice, min_confirmations=1, **SOMEONE)
        assert rejected_code(excinfo) == "malformed_tx_hash"


@pytest.mark.parametrize(
    ("outputs", "code"),
    [
        ("no_split", "missing_split_output"),
        ("short", "wrong_amount"),
        ("fake_token", "wrong_asset"),
        ("elsewhere", "wrong_recipient"),
    ],
)
async def test_tx_hash_with_wrong_outputs_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
    outputs: str,
    code: str,
) -> None:
    chosen = {
        "no_split": [(provider.bech32, lovelace(11_500_000))],
        "short": [(provider.bech32, lovelace(9_000_000)), (partner.bech32, lovelace(1_500_000))],
        "fake_token": [(provider.bech32, {FAKE_TOKEN.unit: 10_000_000})],
        "elsewhere": [(new_wallet().bech32, lovelace(20_000_000))],
    }[outputs]
    tx_hash = blockfrost_server.add_transaction(chosen)
    blockfrost_server.advance(5)
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_tx_hash(tx_hash, ada_invoice, min_confirmations=1, **SOMEONE)
    assert rejected_code(excinfo) == code


async def test_tx_hash_of_failed_script_tx_is_refused(
    blockfrost_server: BlockfrostServer,
    rail: CardanoRail,
    provider: Wallet,
    partner: Wallet,
    ada_invoice: ExpectedPayment,
) -> None:
    tx_hash = blockfrost_server.add_transaction(
        [(provider.bech32, lovelace(10_000_000)), (partner.bech32, lovelace(1_500_000))],
        valid_contract=False,
    )
    with pytest.raises(PaymentRejected) as excinfo:
        await rail.verify_tx_hash(tx_hash, ada_invoice, min_confirmations=1, **SOMEONE)
    assert rejected_code(excinfo) == "invalid_transaction"


# ---------------------------------------------------------------------------- backend trouble


async def test_wrong_project_id_or_dead_backend_is_an_upstream_error(
    blockfrost_server: BlockfrostServer,
    ada_invoice: ExpectedPayment,
) -> None:
    async with CardanoRail(blockfrost_server.url, "not-the-key", network=NETWORK) as rail:
        with pytest.raises(UpstreamRailError):
            await rail.verify_tx_hash("ab" * 32, ada_invoice, min_confirmations=1, **SOMEONE)
        with pytest.raises(UpstreamRailError):
            await rail.submit("84a0a0f5f6")

    dead_url = blockfrost_server.url
    await blockfrost_server.stop()
    async with CardanoRail(dead_url, blockfrost_server.project_id, network=NETWORK) as rail:
        with pytest.raises(UpstreamRailError):
            await rail.verify_tx_hash("ab" * 32, ada_invoice, min_confirmations=1, **SOMEONE)


async def test_server_requires_project_id_like_blockfrost(
    blockfrost_server: BlockfrostServer,
) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(blockfrost_server.url + "/blocks/latest") as resp:
            assert resp.status == 403
            assert (await resp.json())["status_code"] == 403
        async with session.get(
            blockfrost_server.url + "/blocks/latest",
            headers={"project_id": blockfrost_server.project_id},
        ) as resp:
            block = await resp.json()
            assert block["height"] == blockfrost_server.tip_height
            assert block["confirmations"] == 0


# ---------------------------------------------------------------------------- descriptions


def test_invoice_descriptions_parse_units_and_refuse_floats(partner: Wallet) -> None:
    split = RequiredOutput.from_dict(
        {"address": partner.bech32, "unit": TOKEN.unit.upper(), "amount": "42"}
    )
    assert split.asset == TOKEN and split.amount == 42
    by_parts = RequiredOutput.from_dict(
        {"address": partner.bech32, "policyId": POLICY, "assetName": TOKEN_NAME, "amount": 42}
    )
    assert by_parts == split
    assert RequiredOutput.from_dict({"address": partner.bech32, "amount": 7}).asset.is_lovelace
    with pytest.raises((TypeError, ValueError)):
        RequiredOutput.from_dict({"address": partner.bech32, "amount": 1.5})
    with pytest.raises(ValueError):
        ExpectedPayment("addr_test1notanaddress", CardanoAsset.lovelace(), 1)
    with pytest.raises(ValueError):
        CardanoAsset("abc", "")


def test_expected_payment_from_invoice_detail(provider: Wallet, partner: Wallet) -> None:
    detail = {
        "version": "0.1",
        "invoiceId": "inv_1",
        "chain": "cardano-preprod",
        "asset": "ADA",
        "amountUnits": "10000000",
        "decimals": 6,
        "payTo": provider.bech32,
        "timeout": 300,
        "extra": {
            "partner": "p",
            "batchTarget": 100,
            "outputs": [{"address": partner.bech32, "amount": "1500000"}],
        },
    }
    expected = ExpectedPayment.from_invoice_detail(detail)
    assert expected == ExpectedPayment(
        provider.bech32,
        CardanoAsset.lovelace(),
        10_000_000,
        (RequiredOutput(partner.bech32, CardanoAsset.lovelace(), 1_500_000),),
    )
    token = ExpectedPayment.from_invoice_detail(
        {"asset": TOKEN.unit, "amountUnits": "250", "payTo": provider.bech32}
    )
    assert token.asset == TOKEN and token.split_outputs == ()


# ---------------------------------------------------------------------------- payer identity

MESSAGE = invoice_message("inv_test", "addr_test1payer")


def test_cip8_signature_of_the_payer_verifies(payer: Wallet) -> None:
    sig, key = sign_message(payer, MESSAGE)
    assert verify_cip8(payer.bech32, MESSAGE, sig, key)
    # The tagged COSE_Sign1 some wallets send, and the address as CIP-30 hex bytes.
    assert verify_cip8(payer.address.to_primitive().hex(), MESSAGE, "d2" + sig, key)
    # Without a separate COSE key, the key travels in the kid header.
    in_header = cip8.sign(MESSAGE, payer.skey, network=Network.TESTNET)
    assert isinstance(in_header, str)
    assert verify_cip8(payer.bech32, MESSAGE, in_header, None)
    # Same payment key with a stake part: the same payer.
    staked = Address(payment_part=payer.vkey.hash(), staking_part=new_wallet().vkey.hash())
    assert verify_cip8(str(staked), MESSAGE, sig, key)


def test_cip8_signature_of_another_message_is_refused(payer: Wallet) -> None:
    sig, key = sign_message(payer, MESSAGE)
    assert not verify_cip8(payer.bech32, MESSAGE + " ", sig, key)
    assert not verify_cip8(payer.bech32, invoice_message("inv_other", payer.bech32), sig, key)


def test_cip8_signature_checked_against_another_address_is_refused(payer: Wallet) -> None:
    sig, key = sign_message(payer, MESSAGE)
    victim = new_wallet()
    assert not verify_cip8(victim.bech32, MESSAGE, sig, key)
    # Nor can the signer borrow the victim's COSE key: the signature is not the victim's.
    _, victims_key = sign_message(victim, "anything")
    assert not verify_cip8(victim.bech32, MESSAGE, sig, victims_key)
    # A script address has no key to sign with.
    script = Address(payment_part=ScriptHash(payer.vkey.hash().payload), network=Network.TESTNET)
    assert not verify_cip8(str(script), MESSAGE, sig, key)


@pytest.mark.parametrize(
    ("signature", "key"),
    [
        ("", None),
        ("zz", None),
        ("84", None),
        ("d2", "a4"),
        ("84a0a0f6f6", None),
        (os.urandom(64).hex(), None),
        ("ab" * 10_000, None),
        ("GOOD", "zz"),
        ("GOOD", os.urandom(40).hex()),
        ("GOOD", "a4010103272006215820" + "00" * 31),
    ],
)
def test_cip8_garbage_is_refused_without_raising(
    payer: Wallet, signature: str, key: str | None
) -> None:
    good_sig, _ = sign_message(payer, MESSAGE)
    signature = good_sig if signature == "GOOD" else signature
    assert verify_cip8(payer.bech32, MESSAGE, signature, key) is False
    assert verify_cip8("not an address", MESSAGE, good_sig, None) is False
    assert verify_cip8(None, MESSAGE, good_sig, None) is False  # type: ignore[arg-type]


def test_payer_addresses_are_normalized_to_bech32(payer: Wallet) -> None:
    assert normalize_cardano_address(payer.bech32) == payer.bech32
    assert normalize_cardano_address(f"  {payer.bech32}\n") == payer.bech32
    assert normalize_cardano_address(payer.address.to_primitive().hex()) == payer.bech32
    assert payment_key_hash(payer.bech32) == payer.vkey.hash().payload
    script = Address(payment_part=ScriptHash(b"\x07" * 28), network=Network.TESTNET)
    reward = Address(staking_part=payer.vkey.hash(), network=Network.TESTNET)
    for bad in ("", "addr_test1notanaddress", "0x" + "ab" * 20, "abc", str(script), str(reward)):
        assert normalize_cardano_address(bad) is None, bad
