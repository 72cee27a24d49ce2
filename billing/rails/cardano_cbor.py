"""Signed Cardano transactions, checked offline: exact body bytes, id, witnesses, outputs.

The transaction id is blake2b-256 over the body *exactly as signed*, and every
vkey witness signs that hash. A wallet may encode the body differently from
pycardano (map order, definite or indefinite lengths, set tags), so re-encoding
pycardano's decoding could change the id; the body's raw bytes are sliced out
of the transaction with a small CBOR walker instead.

Not checkable offline: who owns the inputs, whether they are unspent, fees
and the validity interval. The node checks those at submit, which must
therefore always follow before a payment is honoured
(:meth:`billing.rails.cardano.CardanoRail.verify_and_submit`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pycardano import Network, Transaction

from billing.errors import PaymentRejected
from billing.rails.cardano_identity import parse_network
from billing.rails.cardano_terms import LOVELACE, ExpectedPayment, PaidOutput, check_outputs

__all__ = ["SignedTransaction", "parse_signed_tx", "verify_signed_cbor"]

# Rejection codes (PaymentRejected.code). Stable strings: clients and tests match on them.
WRONG_NETWORK = "wrong_network"
BAD_WITNESS = "bad_witness"
MISSING_WITNESS = "missing_witness"
INVALID_TRANSACTION = "invalid_transaction"
MALFORMED_CBOR = "malformed_cbor"

_HEX = re.compile(r"^[0-9a-f]*$")
# A signed transaction is tiny (protocol max is 16 KiB); refuse giant inputs before decoding.
_MAX_TX_BYTES = 64 * 1024
# Nesting deeper than this is never a real transaction; bounds our recursive walker.
_MAX_CBOR_DEPTH = 64


@dataclass(frozen=True, slots=True)
class SignedTransaction:
    """A signed transaction whose id and every key witness were checked offline."""

    tx_id: str
    raw: bytes  # exactly the bytes to submit
    outputs: tuple[PaidOutput, ...]
    # Key hashes of the vkey witnesses, each verified against the body hash.
    signers: frozenset[bytes]
    # The (transaction id, index) pairs it spends; reference and collateral
    # inputs are not spent by a valid transaction and are left out.
    inputs: tuple[tuple[str, int], ...]


# --------------------------------------------------------------------------- CBOR


def _cbor_item_end(data: bytes, pos: int, depth: int = 0) -> int:
    """Offset just past the CBOR data item starting at ``pos``.

    Needed because the transaction id is blake2b-256 over the body *exactly as
    signed*; re-encoding pycardano's decoded body may change bytes (map order,
    definite vs indefinite lengths, set tags) and so the id. We slice the raw body
    out instead of trusting a round trip.
    """
    if depth > _MAX_CBOR_DEPTH:
        raise ValueError("CBOR nested too deeply")
    if pos >= len(data):
        raise ValueError("truncated CBOR")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        arg: int | None = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise ValueError("truncated CBOR")
        arg = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    elif info == 31 and major in (2, 3, 4, 5):
        arg = None  # indefinite length, ends with a 0xff break
    else:
        raise ValueError(f"invalid CBOR initial byte 0x{initial:02x}")

    if major in (0, 1, 7):
        return pos
    if major in (2, 3):
        if arg is not None:
            end = pos + arg
            if end > len(data):
                raise ValueError("truncated CBOR")
            return end
        while True:  # indefinite string: definite chunks of the same major type
            if pos >= len(data):
                raise ValueError("truncated CBOR")
            if data[pos] == 0xFF:
                return pos + 1
            if data[pos] >> 5 != major:
                raise ValueError("bad chunk in indefinite string")
            pos = _cbor_item_end(data, pos, depth + 1)
    if major == 6:
        return _cbor_item_end(data, pos, depth + 1)
    # arrays (4) and maps (5)
    per_entry = 1 if major == 4 else 2
    if arg is not None:
        for _ in range(arg * per_entry):
            pos = _cbor_item_end(data, pos, depth + 1)
        return pos
    while True:
        if pos >= len(data):
            raise ValueError("truncated CBOR")
        if data[pos] == 0xFF:
            return pos + 1
        for _ in range(per_entry):
            pos = _cbor_item_end(data, pos, depth + 1)


def _raw_body(tx_bytes: bytes) -> bytes:
    """The transaction body's original bytes: first element of the top-level array."""
    if not tx_bytes or tx_bytes[0] >> 5 != 4:
        raise ValueError("a transaction is a CBOR array")
    first = 1 + {24: 1, 25: 2, 26: 4, 27: 8}.get(tx_bytes[0] & 0x1F, 0)
    if tx_bytes[0] & 0x1F == 31:
        first = 1
    body_end = _cbor_item_end(tx_bytes, first)
    if _cbor_item_end(tx_bytes, 0) != len(tx_bytes):
        raise ValueError("trailing bytes after the transaction")
    return tx_bytes[first:body_end]


def _summarize_pycardano_outputs(tx: Transaction) -> tuple[PaidOutput, ...]:
    summary = []
    for index, out in enumerate(tx.transaction_body.outputs):
        amounts: dict[str, int] = {}
        if out.amount.coin:
            amounts[LOVELACE] = out.amount.coin
        for policy, assets in out.amount.multi_asset.items():
            for name, qty in assets.items():
                unit = policy.payload.hex() + name.payload.hex()
                amounts[unit] = amounts.get(unit, 0) + qty
        summary.append(PaidOutput(index=index, address=str(out.address), amounts=amounts))
    return tuple(summary)


def _verify_ed25519(vkey: object, signature: object, message: bytes) -> bool:
    # Hostile CBOR may put an int where bytes belong; bytes(huge_int) would allocate it.
    if not isinstance(vkey, bytes) or not isinstance(signature, bytes):
        return False
    try:
        VerifyKey(vkey).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------- signed transactions


def _decode_hex(cbor_hex: str | bytes) -> bytes:
    if isinstance(cbor_hex, bytes):
        raw = cbor_hex
    else:
        text = cbor_hex.strip().lower()
        if len(text) > 2 * _MAX_TX_BYTES or len(text) % 2 or not _HEX.match(text):
            raise PaymentRejected("payment is not hex-encoded CBOR", code=MALFORMED_CBOR)
        raw = bytes.fromhex(text)
    if not raw or len(raw) > _MAX_TX_BYTES:
        raise PaymentRejected("payment is not a transaction of sane size", code=MALFORMED_CBOR)
    return raw


def parse_signed_tx(cbor_hex: str | bytes, network: str | Network) -> SignedTransaction:
    """Decode a signed transaction and check what can be checked without a chain.

    Checks: it decodes (pycardano), its id is recomputed from the raw body bytes,
    every vkey (and Byron bootstrap) witness signs that body hash, every
    ``required_signers`` key hash has a witness, it is marked valid (not a
    collateral-forfeiting script failure) and the body's network id (if set)
    is ``network``. The outputs are summarized, not judged.
    """
    net = parse_network(network)
    raw = _decode_hex(cbor_hex)
    try:
        body_bytes = _raw_body(raw)
        tx = Transaction.from_cbor(raw)
        if not isinstance(tx, Transaction):
            raise TypeError("not a transaction")
    except Exception as exc:  # pycardano/cbor2 raise many types on hostile input
        raise PaymentRejected(
            f"payment is not a decodable Cardano transaction: {exc}", code=MALFORMED_CBOR
        ) from exc

    body_hash = hashlib.blake2b(body_bytes, digest_size=32).digest()
    body = tx.transaction_body
    witnesses = tx.transaction_witness_set

    if tx.valid is False:
        # is_valid=false: scripts fail on purpose, only collateral moves; outputs never appear.
        raise PaymentRejected("transaction is flagged invalid", code=INVALID_TRANSACTION)
    if body.network_id is not None and body.network_id != net:
        raise PaymentRejected(
            f"transaction is for {body.network_id.name.lower()}", code=WRONG_NETWORK
        )

    signer_hashes: set[bytes] = set()
    vkey_witnesses = list(witnesses.vkey_witnesses or [])
    for witness in vkey_witnesses:
        vkey = witness.vkey.payload
        if (
            not isinstance(vkey, bytes)
            or len(vkey) != 32
            or not _verify_ed25519(vkey, witness.signature, body_hash)
        ):
            shown = vkey.hex()[:16] if isinstance(vkey, bytes) else "?"
            raise PaymentRejected(
                f"witness {shown}... does not sign this transaction", code=BAD_WITNESS
            )
        signer_hashes.add(hashlib.blake2b(vkey, digest_size=28).digest())
    bootstrap = list(witnesses.bootstrap_witness or [])
    for witness in bootstrap:
        # Byron witness: [vkey, signature, chain_code, attributes]; same ed25519 over the body hash.
        try:
            vkey, signature = witness[0], witness[1]
        except Exception as exc:
            raise PaymentRejected("malformed bootstrap witness", code=BAD_WITNESS) from exc
        if not _verify_ed25519(vkey, signature, body_hash):
            raise PaymentRejected("a bootstrap witness does not sign this body", code=BAD_WITNESS)
    if not vkey_witnesses and not bootstrap and not witnesses.native_scripts:
        raise PaymentRejected("transaction carries no signatures", code=MISSING_WITNESS)
    for required in body.required_signers or []:
        if bytes(required.payload) not in signer_hashes:
            raise PaymentRejected(
                f"required signer {bytes(required.payload).hex()} has no witness",
                code=MISSING_WITNESS,
            )
    try:
        inputs = tuple((bytes(i.transaction_id.payload).hex(), int(i.index)) for i in body.inputs)
    except Exception as exc:  # decoded, but not inputs a node would read
        raise PaymentRejected("malformed transaction inputs", code=MALFORMED_CBOR) from exc
    return SignedTransaction(
        tx_id=body_hash.hex(),
        raw=raw,
        outputs=_summarize_pycardano_outputs(tx),
        signers=frozenset(signer_hashes),
        inputs=inputs,
    )


def verify_signed_cbor(
    cbor_hex: str | bytes, expected: ExpectedPayment, network: str | Network
) -> tuple[str, tuple[PaidOutput, ...]]:
    """:func:`parse_signed_tx`, then the outputs must pay ``expected`` (:func:`check_outputs`);
    returns ``(tx_id, outputs)``."""
    signed = parse_signed_tx(cbor_hex, network)
    check_outputs(signed.outputs, expected)
    return signed.tx_id, signed.outputs
