"""Cardano payment rail: invoice payments in lovelace or a native asset.

Two ways a buyer proves payment of an invoice (``X-Payment``):

* **signed CBOR**: the buyer hands us a fully signed transaction. We decode it
  offline, recompute its id from the exact body bytes, check every key
  witness's signature and the outputs (``billing.rails.cardano_cbor``), check
  it is the payer's, and only then submit it through the backend
  (:meth:`CardanoRail.verify_and_submit`).
* **transaction hash**: the buyer already submitted it. We look it up through
  a Blockfrost-compatible HTTP API and check its outputs, that it was made
  after the invoice, that the payer spent in it, and its confirmations
  (:meth:`CardanoRail.verify_tx_hash`).

Both paths apply the same output rule (``billing.rails.cardano_terms``) and the
same payer rule: the invoice's payer (``billing.payer_proof``) must have spent
one of the transaction's inputs, i.e. an input sits at an address whose payment
key hash is the payer's (``billing.rails.cardano_identity``). The node only
accepts a transaction that the owners of its inputs signed, so that is proof
the payer made it; a key witness alone is not, since anyone may add a
superfluous witness to a transaction they have seen.

What this module does *not* decide: whether the transaction already paid
another invoice (the ledger's unique payment key), whether the invoice is
expired or bound to another request (the invoice store). Those live above.

Billing never imports aiohttp's web layer; the client side is fine.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any, Self

import aiohttp
from pycardano import Network

from billing.errors import PaymentRejected, UpstreamRailError
from billing.rails.cardano_cbor import (
    INVALID_TRANSACTION,
    MALFORMED_CBOR,
    SignedTransaction,
    parse_signed_tx,
    verify_signed_cbor,
)
from billing.rails.cardano_identity import parse_network, payment_key_hash
from billing.rails.cardano_terms import (
    LOVELACE,
    CardanoAsset,
    ConfirmedPayment,
    ExpectedPayment,
    PaidOutput,
    RequiredOutput,
    amount_list,
    check_outputs,
)

__all__ = [
    "LOVELACE",
    "CardanoAsset",
    "CardanoRail",
    "ConfirmedPayment",
    "ExpectedPayment",
    "PaidOutput",
    "RequiredOutput",
    "SignedTransaction",
    "check_outputs",
    "parse_network",
    "parse_signed_tx",
    "verify_signed_cbor",
]

# Rejection codes (PaymentRejected.code). Stable strings: clients and tests match on them.
INSUFFICIENT_CONFIRMATIONS = "insufficient_confirmations"
TX_NOT_FOUND = "tx_not_found"
MALFORMED_TX_HASH = "malformed_tx_hash"
SUBMIT_REJECTED = "submit_rejected"
TX_BEFORE_INVOICE = "tx_before_invoice"
PAYER_MISMATCH = "payer_mismatch"

_TX_HASH = re.compile(r"^[0-9a-f]{64}$")
# Source transactions looked up to find the payer's input in a signed CBOR
# payment; a payer's wallet spends its own UTxOs, so the first few suffice and
# a transaction with hundreds of inputs cannot make us issue hundreds of GETs.
_MAX_INPUT_LOOKUPS = 8


def _payer_key_hash(payer: str) -> bytes:
    key_hash = payment_key_hash(payer)
    if key_hash is None:
        raise PaymentRejected("the invoice's payer address has no payment key", code=PAYER_MISMATCH)
    return key_hash


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
        self, cbor_hex: str | bytes, expected: ExpectedPayment, *, payer: str
    ) -> tuple[str, tuple[PaidOutput, ...]]:
        """Check a signed transaction offline and as ``payer``'s, then :meth:`submit` it.

        The payer's key must witness it, and one of its inputs must sit at the
        payer's payment credential (looked up on the backend before submitting,
        so a stranger's copy of someone else's transaction is never sent on).
        The id the backend reports must be the one we computed; otherwise the
        backend and we disagree on what was paid, and we do not honour it.
        """
        signed = parse_signed_tx(cbor_hex, self.network)
        check_outputs(signed.outputs, expected)
        payer_hash = _payer_key_hash(payer)
        if payer_hash not in signed.signers:
            raise PaymentRejected(
                "the invoice's payer did not sign this transaction", code=PAYER_MISMATCH
            )
        if not await self._spends_from(signed.inputs, payer_hash):
            raise PaymentRejected(
                "no input of this transaction is the invoice payer's (an input still in"
                " the mempool cannot be checked: pay from confirmed UTxOs)",
                code=PAYER_MISMATCH,
            )
        submitted = await self.submit(signed.raw)
        if submitted != signed.tx_id:
            raise UpstreamRailError(
                f"backend reports transaction id {submitted},"
                f" the signed body hashes to {signed.tx_id}"
            )
        return signed.tx_id, signed.outputs

    async def _spends_from(self, inputs: Sequence[tuple[str, int]], key_hash: bytes) -> bool:
        """Whether one of ``inputs`` (unspent outputs of earlier transactions) is ``key_hash``'s."""
        wanted: dict[str, set[int]] = {}
        for tx_hash, index in inputs:
            if _TX_HASH.match(tx_hash):
                wanted.setdefault(tx_hash, set()).add(index)
        for tx_hash in list(wanted)[:_MAX_INPUT_LOOKUPS]:
            utxos = await self._get_json(f"/txs/{tx_hash}/utxos")
            if utxos is None:
                continue  # not in a block (yet): nothing to learn about its owner
            try:
                owners = {int(o["output_index"]): str(o["address"]) for o in utxos["outputs"]}
            except (KeyError, TypeError, ValueError) as exc:
                raise UpstreamRailError(
                    f"Cardano backend answered an unexpected shape: {exc}"
                ) from exc
            if any(payment_key_hash(owners.get(i, "")) == key_hash for i in wanted[tx_hash]):
                return True
        return False

    async def verify_tx_hash(
        self,
        tx_hash: str,
        expected: ExpectedPayment,
        min_confirmations: int,
        *,
        not_before_unix: int,
        payer: str,
    ) -> ConfirmedPayment:
        """Check an on-chain transaction by hash: outputs, time, payer, confirmations.

        The block time must be after ``not_before_unix`` (a transaction made
        before the invoice paid something else), and an input must be spent
        from ``payer``'s payment credential. Confirmations count the block
        holding the transaction as 1 (tip height - tx block height + 1). Every
        check that can never come right is made before confirmations, so such a
        transaction is refused for that reason, not told to wait.
        """
        tx_hash = tx_hash.strip().lower()
        if not _TX_HASH.match(tx_hash):
            # Also keeps arbitrary text out of the backend URL path.
            raise PaymentRejected("not a Cardano transaction hash", code=MALFORMED_TX_HASH)
        payer_hash = _payer_key_hash(payer)

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
                    amounts=amount_list(out["amount"]),
                )
                for out in utxos["outputs"]
                # Collateral return outputs exist only when scripts failed; they pay no invoice.
                if not out.get("collateral", False)
            )
            spent_from = [
                str(inp["address"])
                for inp in utxos["inputs"]
                # A reference input is only read, and collateral is only taken
                # when scripts fail: neither is spent by a valid transaction.
                if not inp.get("reference", False) and not inp.get("collateral", False)
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamRailError(f"Cardano backend answered an unexpected shape: {exc}") from exc

        if not valid_contract:
            raise PaymentRejected(
                "transaction failed script validation; only collateral moved",
                code=INVALID_TRANSACTION,
            )
        check_outputs(outputs, expected)
        if block_time <= not_before_unix:
            raise PaymentRejected(
                "the transaction is older than the invoice; it cannot pay it",
                code=TX_BEFORE_INVOICE,
            )
        if not any(payment_key_hash(addr) == payer_hash for addr in spent_from):
            raise PaymentRejected(
                "the invoice's payer spent nothing in this transaction", code=PAYER_MISMATCH
            )
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
