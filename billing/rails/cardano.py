"""Cardano payment rail: invoice payments in lovelace or a native asset.

Two ways a buyer proves payment of an invoice (``X-Payment``):

* **signed CBOR**: the buyer hands us a fully signed transaction. We decode it
  offline, recompute its id from the exact body bytes, check every key
  witness's signature and the outputs, and only then submit it through the
  backend. :func:`verify_signed_cbor` + :meth:`CardanoRail.submit` (or
  :meth:`CardanoRail.verify_and_submit`).
* **transaction hash**: the buyer already submitted it. We look it up through
  a Blockfrost-compatible HTTP API and check its outputs and confirmations
  (:meth:`CardanoRail.verify_tx_hash`).

Both paths apply the same output rule (:func:`check_outputs`): the ``pay_to``
address must receive at least the amount in exactly the invoiced asset
(lovelace, or one policy id + asset name; any other asset does not count), and
every split output of the invoice (``extra.outputs``) must be present with at
least its amount. Requirements that name the same address and asset add up, so
one output cannot be counted twice.

What this module does *not* decide: whether the transaction already paid
another invoice (the ledger's unique payment key), whether the invoice is
expired or bound to another request (the invoice store). Those live above.

Billing never imports aiohttp's web layer; the client side is fine.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pycardano import Address, Network, Transaction

from billing.errors import PaymentRejected, UpstreamRailError

__all__ = [
    "LOVELACE",
    "CardanoAsset",
    "CardanoRail",
    "ConfirmedPayment",
    "ExpectedPayment",
    "PaidOutput",
    "RequiredOutput",
    "check_outputs",
    "parse_network",
    "verify_signed_cbor",
]

LOVELACE = "lovelace"

# Rejection codes (PaymentRejected.code). Stable strings: clients and tests match on them.
WRONG_AMOUNT = "wrong_amount"
MISSING_SPLIT_OUTPUT = "missing_split_output"
WRONG_ASSET = "wrong_asset"
WRONG_RECIPIENT = "wrong_recipient"
WRONG_NETWORK = "wrong_network"
BAD_WITNESS = "bad_witness"
MISSING_WITNESS = "missing_witness"
INVALID_TRANSACTION = "invalid_transaction"
INSUFFICIENT_CONFIRMATIONS = "insufficient_confirmations"
TX_NOT_FOUND = "tx_not_found"
MALFORMED_CBOR = "malformed_cbor"
MALFORMED_TX_HASH = "malformed_tx_hash"
SUBMIT_REJECTED = "submit_rejected"

_HEX = re.compile(r"^[0-9a-f]*$")
_TX_HASH = re.compile(r"^[0-9a-f]{64}$")
# A signed transaction is tiny (protocol max is 16 KiB); refuse giant inputs before decoding.
_MAX_TX_BYTES = 64 * 1024
# Nesting deeper than this is never a real transaction; bounds our recursive walker.
_MAX_CBOR_DEPTH = 64


# --------------------------------------------------------------------------- assets, expectations


@dataclass(frozen=True, slots=True)
class CardanoAsset:
    """Lovelace (both fields empty) or a native asset: policy id (56 hex) + asset name (hex).

    The Blockfrost "unit" string is ``"lovelace"`` or ``policy_id + asset_name_hex``;
    :attr:`unit` and :meth:`from_unit` convert. Policy and name are kept apart because
    the invoice pins both: a token with the right name under another policy is a
    different (worthless) asset.
    """

    policy_id: str = ""
    asset_name: str = ""

    def __post_init__(self) -> None:
        policy = self.policy_id.lower()
        name = self.asset_name.lower()
        if not policy:
            if name:
                raise ValueError("an asset name needs a policy id")
        elif len(policy) != 56 or not _HEX.match(policy):
            raise ValueError(f"policy id must be 56 hex characters: {self.policy_id!r}")
        if len(name) > 64 or len(name) % 2 or not _HEX.match(name):
            raise ValueError(f"asset name must be at most 32 bytes of hex: {self.asset_name!r}")
        object.__setattr__(self, "policy_id", policy)
        object.__setattr__(self, "asset_name", name)

    @classmethod
    def lovelace(cls) -> CardanoAsset:
        return cls()

    @classmethod
    def from_unit(cls, unit: str) -> CardanoAsset:
        """Parse a Blockfrost unit (``lovelace`` or policy id hex followed by asset name hex)."""
        unit = unit.strip().lower()
        if unit == LOVELACE:
            return cls()
        if len(unit) < 56:
            raise ValueError(f"not a Cardano asset unit: {unit!r}")
        return cls(unit[:56], unit[56:])

    @property
    def is_lovelace(self) -> bool:
        return not self.policy_id

    @property
    def unit(self) -> str:
        return LOVELACE if self.is_lovelace else self.policy_id + self.asset_name

    def __str__(self) -> str:
        return self.unit


@dataclass(frozen=True, slots=True)
class RequiredOutput:
    """One split output an invoice demands (an entry of ``extra.outputs``)."""

    address: str
    asset: CardanoAsset
    amount: int

    def __post_init__(self) -> None:
        _check_amount(self.amount)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> RequiredOutput:
        """Build from ``{"address", "amount", "unit"?}`` (unit defaults to lovelace).

        Also accepts ``policyId`` + ``assetName`` instead of ``unit``. The amount may be
        an int or a string of digits, never a float (money rules).
        """
        if "policyId" in entry:
            asset = CardanoAsset(str(entry["policyId"]), str(entry.get("assetName", "")))
        else:
            asset = CardanoAsset.from_unit(str(entry.get("unit", LOVELACE)))
        return cls(str(entry["address"]), asset, _int_amount(entry["amount"]))


@dataclass(frozen=True, slots=True)
class ExpectedPayment:
    """What an invoice asks for: ``amount`` of ``asset`` to ``pay_to``, plus split outputs."""

    pay_to: str
    asset: CardanoAsset
    amount: int
    split_outputs: tuple[RequiredOutput, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_amount(self.amount)
        # Accept any sequence from callers but keep the frozen object hashable.
        object.__setattr__(self, "split_outputs", tuple(self.split_outputs))
        # Fail at invoice time, not at payment time, on an unparseable address.
        for addr in (self.pay_to, *(o.address for o in self.split_outputs)):
            _parse_address(addr)

    @classmethod
    def from_invoice_detail(cls, detail: Mapping[str, Any]) -> ExpectedPayment:
        """Build from the 402 invoice's ``detail`` object (t-backend guide shape).

        ``asset`` is ``"ADA"``/``"lovelace"`` or a Blockfrost unit (policy id + asset
        name hex); ``amountUnits`` is a digit string in the asset's smallest unit;
        ``extra.outputs`` entries go through :meth:`RequiredOutput.from_dict`.
        """
        asset_label = str(detail["asset"])
        asset = (
            CardanoAsset.lovelace()
            if asset_label.lower() in {"ada", LOVELACE}
            else CardanoAsset.from_unit(asset_label)
        )
        extra = detail.get("extra") or {}
        return cls(
            pay_to=str(detail["payTo"]),
            asset=asset,
            amount=_int_amount(detail["amountUnits"]),
            split_outputs=tuple(RequiredOutput.from_dict(o) for o in extra.get("outputs") or ()),
        )


@dataclass(frozen=True, slots=True)
class PaidOutput:
    """One output of a payment transaction: address (bech32) and amounts per unit."""

    index: int
    address: str
    amounts: Mapping[str, int]

    def amount_of(self, asset: CardanoAsset) -> int:
        return self.amounts.get(asset.unit, 0)


@dataclass(frozen=True, slots=True)
class ConfirmedPayment:
    """Result of :meth:`CardanoRail.verify_tx_hash`."""

    tx_id: str
    outputs: tuple[PaidOutput, ...]
    block_height: int
    block_time: int  # unix seconds; lets the caller require "after the invoice was minted"
    confirmations: int


# --------------------------------------------------------------------------- helpers


def _check_amount(amount: int) -> None:
    # bool is an int subclass; True lovelace is a bug, not a price.
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError(f"amount must be a positive integer, got {amount!r}")


def _int_amount(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"amount must be an integer or a digit string, got {value!r}")
    if isinstance(value, str):
        if not value.isdigit():
            raise ValueError(f"amount must be a digit string, got {value!r}")
        value = int(value)
    return value


def _parse_address(addr: str) -> Address:
    try:
        return Address.from_primitive(addr)
    except Exception as exc:  # pycardano raises several types for bad bech32
        raise ValueError(f"not a Shelley-era Cardano address: {addr!r}") from exc


def _address_key(addr: str) -> bytes | str:
    """Canonical comparison key for an address: its raw bytes.

    Comparing bytes (not strings) makes the check independent of bech32 spelling;
    the header byte inside carries the network, so a testnet address never
    matches a mainnet one. Addresses pycardano cannot parse (Byron) compare as text
    and so can only match an identical string, which no invoice will contain.
    """
    try:
        return bytes(Address.from_primitive(addr).to_primitive())
    except Exception:
        return addr


def parse_network(network: str | Network) -> Network:
    """``mainnet`` -> MAINNET; ``preprod``/``preview``/``testnet`` (any case, with or without
    a ``cardano-`` prefix as in the invoice's ``chain``) -> TESTNET."""
    if isinstance(network, Network):
        return network
    name = network.strip().lower().removeprefix("cardano-").removeprefix("cardano:")
    if name == "mainnet":
        return Network.MAINNET
    if name in {"testnet", "preprod", "preview", "sanchonet"}:
        return Network.TESTNET
    raise ValueError(f"unknown Cardano network: {network!r}")


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


# --------------------------------------------------------------------------- the output rule


def check_outputs(outputs: Sequence[PaidOutput], expected: ExpectedPayment) -> None:
    """Raise :class:`PaymentRejected` unless ``outputs`` pay everything ``expected`` asks.

    Order of checks gives the most useful code: the main payment first (recipient,
    then asset, then amount), then each split output, then the combined totals
    (when a split output shares address and asset with ``pay_to`` or with another
    split, one output must not satisfy both).
    """
    paid: dict[tuple[bytes | str, str], int] = {}
    paid_addresses: dict[bytes | str, set[str]] = {}
    for out in outputs:
        key = _address_key(out.address)
        units = paid_addresses.setdefault(key, set())
        for unit, qty in out.amounts.items():
            if qty > 0:
                paid[(key, unit)] = paid.get((key, unit), 0) + qty
                units.add(unit)

    pay_to = _address_key(expected.pay_to)
    unit = expected.asset.unit
    got = paid.get((pay_to, unit), 0)
    if got < expected.amount:
        if pay_to not in paid_addresses:
            raise PaymentRejected(
                f"no output pays the invoice address {expected.pay_to}", code=WRONG_RECIPIENT
            )
        if got == 0:
            found = ", ".join(sorted(paid_addresses[pay_to])) or "nothing"
            raise PaymentRejected(
                f"the invoice address receives {found}, not {unit}", code=WRONG_ASSET
            )
        raise PaymentRejected(
            f"the invoice address receives {got} of {unit}, the invoice asks {expected.amount}",
            code=WRONG_AMOUNT,
        )

    needed: dict[tuple[bytes | str, str], int] = {(pay_to, unit): expected.amount}
    for split in expected.split_outputs:
        key = (_address_key(split.address), split.asset.unit)
        have = paid.get(key, 0)
        if have < split.amount:
            raise PaymentRejected(
                f"split output to {split.address} needs {split.amount} of {split.asset.unit},"
                f" the transaction pays {have}",
                code=MISSING_SPLIT_OUTPUT,
            )
        needed[key] = needed.get(key, 0) + split.amount
    for key, total in needed.items():
        if paid.get(key, 0) < total:
            raise PaymentRejected(
                f"outputs to one address in {key[1]} pay {paid.get(key, 0)}, the invoice's"
                f" payment and split outputs there add up to {total}",
                code=MISSING_SPLIT_OUTPUT,
            )


# --------------------------------------------------------------------------- signed CBOR (offline)


def verify_signed_cbor(
    cbor_hex: str | bytes, expected: ExpectedPayment, network: str | Network
) -> tuple[str, tuple[PaidOutput, ...]]:
    """Check a signed transaction offline; return ``(tx_id, outputs)``.

    Checks: it decodes (pycardano), its id is recomputed from the raw body bytes,
    every vkey (and Byron bootstrap) witness signs that body hash, every
    ``required_signers`` key hash has a witness, it is marked valid (not a
    collateral-forfeiting script failure), the body's network id (if set) is
    ``network``, and the outputs pay ``expected`` (:func:`check_outputs`).

    Not checkable offline: that the witnesses cover the *inputs'* owners, that the
    inputs are unspent, fees and validity interval. The node checks those at
    :meth:`CardanoRail.submit`, which must therefore always follow before the
    payment is honoured.
    """
    net = parse_network(network)
    if isinstance(cbor_hex, bytes):
        raw = cbor_hex
    else:
        text = cbor_hex.strip().lower()
        if len(text) > 2 * _MAX_TX_BYTES or len(text) % 2 or not _HEX.match(text):
            raise PaymentRejected("payment is not hex-encoded CBOR", code=MALFORMED_CBOR)
        raw = bytes.fromhex(text)
    if not raw or len(raw) > _MAX_TX_BYTES:
        raise PaymentRejected("payment is not a transaction of sane size", code=MALFORMED_CBOR)

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
    tx_id = body_hash.hex()
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
            raise PaymentRejected(
                f"witness {vkey.hex()[:16]}... does not sign this transaction", code=BAD_WITNESS
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

    outputs = _summarize_pycardano_outputs(tx)
    check_outputs(outputs, expected)
    return tx_id, outputs


# --------------------------------------------------------------------------- backend client


class CardanoRail:
    """The Cardano rail bound to one Blockfrost-compatible backend.

    One :class:`aiohttp.ClientSession` per rail object, made on first use (so on
    the running loop) and reused; call :meth:`close` (or use ``async with``).
    """

    def __init__(
        self,
        base_url: str,
        project_id: str,
        *,
        network: str | Network = "mainnet",
        timeout: float = 10.0,
    ) -> None:
        # base_url includes the API prefix, e.g. https://cardano-mainnet.blockfrost.io/api/v0
        self.base_url = base_url.rstrip("/")
        self.project_id = project_id
        self.network = parse_network(network)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers={"project_id": self.project_id}
            )
        return self._session

    # ---- HTTP

    async def _get_json(self, path: str) -> Any | None:
        """GET a backend path; ``None`` on 404, :class:`UpstreamRailError` on anything odd."""
        url = self.base_url + path
        try:
            async with self._client().get(url) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    raise UpstreamRailError(
                        f"Cardano backend answered {resp.status} for GET {path}: {text}"
                    )
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamRailError(f"Cardano backend unreachable for GET {path}: {exc}") from exc

    async def submit(self, cbor_hex: str | bytes) -> str:
        """POST the transaction (raw bytes, ``application/cbor``) to ``/tx/submit``; return its id.

        A 400 is the node refusing the transaction (spent inputs, missing input
        witness, bad fee, expired): that is the payer's fault, so PaymentRejected.
        Everything else (auth, mempool full, 5xx, network) is UpstreamRailError.
        """
        try:
            raw = bytes.fromhex(cbor_hex.strip()) if isinstance(cbor_hex, str) else cbor_hex
        except ValueError as exc:
            raise PaymentRejected("payment is not hex-encoded CBOR", code=MALFORMED_CBOR) from exc
        url = self.base_url + "/tx/submit"
        try:
            async with self._client().post(
                url, data=raw, headers={"Content-Type": "application/cbor"}
            ) as resp:
                if resp.status == 400:
                    detail = await _error_message(resp)
                    raise PaymentRejected(
                        f"the node refused the transaction: {detail}", code=SUBMIT_REJECTED
                    )
                if resp.status != 200:
                    detail = await _error_message(resp)
                    raise UpstreamRailError(
                        f"Cardano backend answered {resp.status} to submit: {detail}"
                    )
                tx_id = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamRailError(f"Cardano backend unreachable for submit: {exc}") from exc
        if not isinstance(tx_id, str) or not _TX_HASH.match(tx_id.lower()):
            raise UpstreamRailError(f"Cardano backend returned no transaction id: {tx_id!r}")
        return tx_id.lower()

    async def verify_and_submit(
        self, cbor_hex: str | bytes, expected: ExpectedPayment
    ) -> tuple[str, tuple[PaidOutput, ...]]:
        """:func:`verify_signed_cbor` on this rail's network, then :meth:`submit`.

        The id the backend reports must be the one we computed; otherwise the
        backend and we disagree on what was paid, and we do not honour it.
        """
        tx_id, outputs = verify_signed_cbor(cbor_hex, expected, self.network)
        submitted = await self.submit(cbor_hex)
        if submitted != tx_id:
            raise UpstreamRailError(
                f"backend reports transaction id {submitted}, the signed body hashes to {tx_id}"
            )
        return tx_id, outputs

    async def verify_tx_hash(
        self, tx_hash: str, expected: ExpectedPayment, min_confirmations: int
    ) -> ConfirmedPayment:
        """Check an on-chain transaction by hash: outputs, script validity, confirmations.

        Confirmations count the block holding the transaction as 1 (tip height -
        tx block height + 1). Outputs are checked before confirmations so that a
        transaction that can never pay is refused for that reason, not told to wait.
        """
        tx_hash = tx_hash.strip().lower()
        if not _TX_HASH.match(tx_hash):
            # Also keeps arbitrary text out of the backend URL path.
            raise PaymentRejected("not a Cardano transaction hash", code=MALFORMED_TX_HASH)

        tx, utxos, tip = await asyncio.gather(
            self._get_json(f"/txs/{tx_hash}"),
            self._get_json(f"/txs/{tx_hash}/utxos"),
            self._get_json("/blocks/latest"),
        )
        if tx is None or utxos is None:
            raise PaymentRejected(f"transaction {tx_hash} is not on chain (yet)", code=TX_NOT_FOUND)
        if tip is None:
            raise UpstreamRailError("Cardano backend has no latest block")
        try:
            block_height = int(tx["block_height"])
            block_time = int(tx["block_time"])
            valid_contract = bool(tx.get("valid_contract", True))
            tip_height = int(tip["height"])
            outputs = tuple(
                PaidOutput(
                    index=int(out["output_index"]),
                    address=str(out["address"]),
                    amounts=_amount_list(out["amount"]),
                )
                for out in utxos["outputs"]
                # Collateral return outputs exist only when scripts failed; they pay no invoice.
                if not out.get("collateral", False)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamRailError(f"Cardano backend answered an unexpected shape: {exc}") from exc

        if not valid_contract:
            raise PaymentRejected(
                "transaction failed script validation; only collateral moved",
                code=INVALID_TRANSACTION,
            )
        check_outputs(outputs, expected)
        confirmations = tip_height - block_height + 1
        if confirmations < min_confirmations:
            raise PaymentRejected(
                f"transaction has {max(confirmations, 0)} confirmations,"
                f" {min_confirmations} required",
                code=INSUFFICIENT_CONFIRMATIONS,
            )
        return ConfirmedPayment(
            tx_id=tx_hash,
            outputs=outputs,
            block_height=block_height,
            block_time=block_time,
            confirmations=confirmations,
        )


def _amount_list(amounts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Blockfrost ``[{unit, quantity}]`` (quantities as digit strings) -> ``{unit: int}``."""
    result: dict[str, int] = {}
    for entry in amounts:
        unit = str(entry["unit"]).lower()
        qty = _int_amount(entry["quantity"])
        result[unit] = result.get(unit, 0) + qty
    return result


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    """Blockfrost errors are ``{"status_code", "error", "message"}``; fall back to text."""
    text = await resp.text()
    try:
        body = await resp.json(content_type=None)
    except ValueError:
        return text[:300]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:300]
    return text[:300]
