"""A local stand-in for a Blockfrost-compatible Cardano API, on 127.0.0.1.

The real service cannot be reached from tests, so this server speaks the subset
of its HTTP API that the Cardano rail uses, with the real response shapes:

* ``GET  {base}/txs/{hash}``        transaction content (block height/time, valid_contract...)
* ``GET  {base}/txs/{hash}/utxos``  inputs and outputs with ``[{unit, quantity}]`` amounts
* ``GET  {base}/blocks/latest``     the tip block
* ``POST {base}/tx/submit``         raw CBOR (``application/cbor``), answers the tx id as JSON

``base`` is ``/api/v0`` as on blockfrost.io. Every request must carry the
``project_id`` header (403 otherwise, as the real service does).

It behaves like a tiny node + indexer: submitted transactions are decoded with
pycardano and checked the way a node would (inputs exist and are unspent,
value is preserved, every vkey witness signs the body, the owners of the spent
inputs and the required signers have witnesses). Accepted ones wait in the
mempool (``/txs/{hash}`` and ``/txs/{hash}/utxos`` are 404, as on Blockfrost,
which indexes blocks only) until a test "mines" with
:meth:`BlockfrostServer.advance`; then their outputs become UTxOs that later
transactions may spend, and ``/txs/{hash}/utxos`` lists the addresses their
inputs were spent from.

Block times follow :attr:`BlockfrostServer.clock` (wall-clock seconds unless a
test sets it), one second or more apart, so "made after the invoice" is
checked against real times; a test that needs an old transaction sets the
clock back before making it.

Tests seed value with :meth:`fund` (a genesis-like transaction in a block) and
may add arbitrary confirmed transactions with :meth:`add_transaction`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from pycardano import Address, Transaction, TransactionOutput

__all__ = ["BlockfrostServer", "SubmittedTx", "blockfrost_server"]

API_PREFIX = "/api/v0"
LOVELACE = "lovelace"
Amounts = dict[str, int]  # unit ("lovelace" or policy+name hex) -> quantity


@dataclass
class _Output:
    address: str
    amounts: Amounts
    consumed_by: str | None = None


@dataclass
class _Tx:
    hash: str
    inputs: list[tuple[str, int]]
    outputs: list[_Output]
    fee: int = 0
    size: int = 0
    valid_contract: bool = True
    block_height: int | None = None  # None while in the mempool
    # Read, not spent (CIP-31), and forfeited only if scripts fail: listed with flags.
    reference_inputs: list[tuple[str, int]] = field(default_factory=list)
    collateral_inputs: list[tuple[str, int]] = field(default_factory=list)
    index: int = 0


@dataclass
class _Block:
    height: int
    hash: str
    time: int
    slot: int
    previous: str | None
    txs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SubmittedTx:
    """One transaction accepted through ``POST /tx/submit``: its id, exact bytes, decoding."""

    tx_id: str
    cbor: bytes
    tx: Transaction


def _blake2b(data: bytes, size: int) -> bytes:
    return hashlib.blake2b(data, digest_size=size).digest()


def _amount_list(amounts: Mapping[str, int]) -> list[dict[str, str]]:
    # Blockfrost lists lovelace first and quantities as strings.
    units = sorted(amounts, key=lambda u: (u != LOVELACE, u))
    return [{"unit": u, "quantity": str(amounts[u])} for u in units if amounts[u]]


def _value_amounts(out: TransactionOutput) -> Amounts:
    amounts: Amounts = {LOVELACE: out.amount.coin}
    for policy, assets in out.amount.multi_asset.items():
        for name, qty in assets.items():
            unit = policy.payload.hex() + name.payload.hex()
            amounts[unit] = amounts.get(unit, 0) + qty
    return amounts


def _add(total: Amounts, more: Mapping[str, int], sign: int = 1) -> None:
    for unit, qty in more.items():
        total[unit] = total.get(unit, 0) + sign * qty


def _raw_body(tx_bytes: bytes) -> bytes:
    """Body bytes as sent. Kept independent of the rail's walker on purpose: cbor2's
    decoder tells us where the first array element ends."""
    import io

    import cbor2

    stream = io.BytesIO(tx_bytes)
    head = stream.read(1)[0]
    extra = {24: 1, 25: 2, 26: 4, 27: 8}.get(head & 0x1F, 0)
    stream.read(extra)
    start = stream.tell()
    cbor2.CBORDecoder(stream).decode()
    return tx_bytes[start : stream.tell()]


def _refs(inputs: Any) -> list[tuple[str, int]]:
    return [(i.transaction_id.payload.hex(), i.index) for i in inputs or []]


def _error(status: int, error: str, message: str) -> web.Response:
    return web.json_response(
        {"status_code": status, "error": error, "message": message}, status=status
    )


class BlockfrostServer:
    """The local Blockfrost-compatible server. ``await start()`` on the test's loop.

    Attributes tests look at: :attr:`url` (base URL including ``/api/v0``),
    :attr:`project_id`, :attr:`submitted` (accepted submissions in order),
    :attr:`requests` (``(method, path)`` of every request served).
    """

    def __init__(
        self,
        project_id: str = "preprodTollwayTestProject",
        *,
        start_height: int = 1_000,
        start_time: int | None = None,
        check_witnesses: bool = True,
    ) -> None:
        self.project_id = project_id
        # Lets a test submit a tx the rail should have refused, to show the rail
        # (and not this server) is what refuses it.
        self.check_witnesses = check_witnesses
        # Unix seconds for the next block's time; tests may replace it.
        self.clock: Callable[[], float] = time.time
        self.submitted: list[SubmittedTx] = []
        self.requests: list[tuple[str, str]] = []
        self._txs: dict[str, _Tx] = {}
        self._mempool: list[str] = []
        self._blocks: dict[int, _Block] = {}
        self._time = start_time if start_time is not None else int(time.time()) - 3_600
        genesis = _Block(start_height, os.urandom(32).hex(), self._time, start_height * 20, None)
        self._blocks[start_height] = genesis
        self._tip = start_height
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get(API_PREFIX + "/", self._root)
        app.router.add_get(API_PREFIX + "/blocks/latest", self._latest_block)
        app.router.add_get(API_PREFIX + "/txs/{hash}", self._tx)
        app.router.add_get(API_PREFIX + "/txs/{hash}/utxos", self._tx_utxos)
        app.router.add_post(API_PREFIX + "/tx/submit", self._submit)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)  # port 0: the OS picks a free one
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}{API_PREFIX}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> BlockfrostServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ chain control

    @property
    def tip_height(self) -> int:
        return self._tip

    def advance(self, blocks: int = 1) -> int:
        """Make ``blocks`` new blocks; the first takes every mempool transaction. Returns tip.

        This is the test's way to confirm submitted transactions: until then
        the indexer endpoints do not know them.
        """
        for _ in range(blocks):
            prev = self._blocks[self._tip]
            # One block per slot at most, slots one second: times strictly increase.
            self._time = max(prev.time + 1, int(self.clock()))
            block = _Block(
                self._tip + 1,
                os.urandom(32).hex(),
                self._time,
                prev.slot + (self._time - prev.time),
                prev.hash,
            )
            for index, tx_hash in enumerate(self._mempool):
                tx = self._txs[tx_hash]
                tx.block_height, tx.index = block.height, index
                block.txs.append(tx_hash)
            self._mempool.clear()
            self._blocks[block.height] = block
            self._tip = block.height
        return self._tip

    def fund(self, address: str, amounts: Mapping[str, int] | int) -> tuple[str, int]:
        """Create a confirmed UTxO at ``address`` (lovelace int or ``{unit: qty}``).

        Returns ``(tx_hash, output_index)`` to build a spending input from.
        """
        if isinstance(amounts, int):
            amounts = {LOVELACE: amounts}
        tx_hash = self.add_transaction([(address, dict(amounts))])
        return tx_hash, 0

    def add_transaction(
        self,
        outputs: list[tuple[str, Mapping[str, int]]],
        *,
        tx_hash: str | None = None,
        valid_contract: bool = True,
        confirmed: bool = True,
    ) -> str:
        """Put a transaction with these outputs on chain (in a new block) or in the mempool."""
        tx_hash = tx_hash or os.urandom(32).hex()
        self._txs[tx_hash] = _Tx(
            hash=tx_hash,
            inputs=[],
            outputs=[_Output(addr, dict(amounts)) for addr, amounts in outputs],
            valid_contract=valid_contract,
        )
        self._mempool.append(tx_hash)
        if confirmed:
            self.advance(1)
        return tx_hash

    def is_confirmed(self, tx_hash: str) -> bool:
        tx = self._txs.get(tx_hash)
        return tx is not None and tx.block_height is not None

    # ------------------------------------------------------------------ HTTP

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        token = request.headers.get("project_id")
        if token is None:
            return _error(
                403,
                "Forbidden",
                "Missing project token. Please include project_id in your request.",
            )
        if token != self.project_id:
            return _error(403, "Forbidden", "Invalid project token.")
        return await handler(request)

    async def _root(self, request: web.Request) -> web.Response:
        return web.json_response({"url": "https://blockfrost.io/", "version": "0.1.0"})

    def _block_json(self, block: _Block) -> dict[str, Any]:
        return {
            "time": block.time,
            "height": block.height,
            "hash": block.hash,
            "slot": block.slot,
            "epoch": block.slot // 432_000,
            "epoch_slot": block.slot % 432_000,
            "slot_leader": "pool1" + "q" * 51,
            "size": 1_000 + 300 * len(block.txs),
            "tx_count": len(block.txs),
            "output": str(
                sum(o.amounts.get(LOVELACE, 0) for h in block.txs for o in self._txs[h].outputs)
            ),
            "fees": str(sum(self._txs[h].fee for h in block.txs)),
            "block_vrf": "vrf_vk1" + "q" * 52,
            "op_cert": _blake2b(block.hash.encode(), 32).hex(),
            "op_cert_counter": "1",
            "previous_block": block.previous,
            "next_block": self._blocks[block.height + 1].hash
            if block.height + 1 in self._blocks
            else None,
            "confirmations": self._tip - block.height,
        }

    async def _latest_block(self, request: web.Request) -> web.Response:
        return web.json_response(self._block_json(self._blocks[self._tip]))

    def _confirmed_tx(self, request: web.Request) -> _Tx | None:
        tx = self._txs.get(request.match_info["hash"].lower())
        # Blockfrost only knows transactions in blocks; the mempool has its own endpoint.
        return tx if tx is not None and tx.block_height is not None else None

    async def _tx(self, request: web.Request) -> web.Response:
        tx = self._confirmed_tx(request)
        if tx is None:
            return _error(404, "Not Found", "The requested component has not been found.")
        assert tx.block_height is not None
        block = self._blocks[tx.block_height]
        total: Amounts = {}
        for out in tx.outputs:
            _add(total, out.amounts)
        return web.json_response(
            {
                "hash": tx.hash,
                "block": block.hash,
                "block_height": block.height,
                "block_time": block.time,
                "slot": block.slot,
                "index": tx.index,
                "output_amount": _amount_list(total),
                "fees": str(tx.fee),
                "deposit": "0",
                "size": tx.size,
                "invalid_before": None,
                "invalid_hereafter": None,
                "utxo_count": len(tx.inputs) + len(tx.outputs),
                "withdrawal_count": 0,
                "mir_cert_count": 0,
                "delegation_count": 0,
                "stake_cert_count": 0,
                "pool_update_count": 0,
                "pool_retire_count": 0,
                "asset_mint_or_burn_count": 0,
                "redeemer_count": 0,
                "valid_contract": tx.valid_contract,
            }
        )

    async def _tx_utxos(self, request: web.Request) -> web.Response:
        tx = self._confirmed_tx(request)
        if tx is None:
            return _error(404, "Not Found", "The requested component has not been found.")
        inputs = []
        for refs, collateral, reference in (
            (tx.inputs, False, False),
            (tx.collateral_inputs, True, False),
            (tx.reference_inputs, False, True),
        ):
            for src_hash, src_index in refs:
                src = self._txs[src_hash].outputs[src_index]
                inputs.append(
                    {
                        "address": src.address,
                        "amount": _amount_list(src.amounts),
                        "tx_hash": src_hash,
                        "output_index": src_index,
                        "data_hash": None,
                        "inline_datum": None,
                        "reference_script_hash": None,
                        "collateral": collateral,
                        "reference": reference,
                    }
                )
        outputs = [
            {
                "address": out.address,
                "amount": _amount_list(out.amounts),
                "output_index": index,
                "data_hash": None,
                "inline_datum": None,
                "collateral": False,
                "reference_script_hash": None,
                "consumed_by_tx": out.consumed_by,
            }
            for index, out in enumerate(tx.outputs)
        ]
        return web.json_response({"hash": tx.hash, "inputs": inputs, "outputs": outputs})

    async def _submit(self, request: web.Request) -> web.Response:
        if request.content_type != "application/cbor":
            return _error(400, "Bad Request", "Content-Type must be application/cbor")
        raw = await request.read()
        try:
            tx = Transaction.from_cbor(raw)
            body_bytes = _raw_body(raw)
        except Exception as exc:
            return _error(400, "Bad Request", f"transaction submit error: DeserialiseFailure {exc}")
        tx_id = _blake2b(body_bytes, 32).hex()
        problem = self._validate(tx, tx_id, _blake2b(body_bytes, 32))
        if problem:
            return _error(400, "Bad Request", f"transaction submit error: {problem}")
        body = tx.transaction_body
        for inp in body.inputs:
            self._txs[inp.transaction_id.payload.hex()].outputs[inp.index].consumed_by = tx_id
        self._txs[tx_id] = _Tx(
            hash=tx_id,
            inputs=[(i.transaction_id.payload.hex(), i.index) for i in body.inputs],
            outputs=[_Output(str(o.address), _value_amounts(o)) for o in body.outputs],
            fee=body.fee,
            size=len(raw),
            valid_contract=tx.valid is not False,
            reference_inputs=_refs(body.reference_inputs),
            collateral_inputs=_refs(body.collateral),
        )
        self._mempool.append(tx_id)
        self.submitted.append(SubmittedTx(tx_id, raw, tx))
        return web.json_response(tx_id)

    def _validate(self, tx: Transaction, tx_id: str, body_hash: bytes) -> str | None:
        """The node-side checks a test chain needs; a string says why it is refused."""
        if tx_id in self._txs:
            return "transaction already known"
        body = tx.transaction_body
        spent_total: Amounts = {}
        input_owners: set[bytes] = set()
        for inp in body.inputs:
            src_tx = self._txs.get(inp.transaction_id.payload.hex())
            if src_tx is None or inp.index >= len(src_tx.outputs):
                return f"BadInputsUTxO {inp.transaction_id.payload.hex()}#{inp.index}"
            src = src_tx.outputs[inp.index]
            if src.consumed_by is not None:
                return f"BadInputsUTxO {inp.transaction_id.payload.hex()}#{inp.index} (spent)"
            _add(spent_total, src.amounts)
            payment_part = Address.from_primitive(src.address).payment_part
            if payment_part is not None:
                input_owners.add(bytes(payment_part.payload))
        for ref in body.reference_inputs or []:
            src_tx = self._txs.get(ref.transaction_id.payload.hex())
            if src_tx is None or ref.index >= len(src_tx.outputs):
                return f"BadInputsUTxO {ref.transaction_id.payload.hex()}#{ref.index} (reference)"
        produced: Amounts = {LOVELACE: body.fee}
        for out in body.outputs:
            _add(produced, _value_amounts(out))
        if body.mint:
            for policy, assets in body.mint.items():
                for name, qty in assets.items():
                    _add(spent_total, {policy.payload.hex() + name.payload.hex(): qty})
        spent_total = {u: q for u, q in spent_total.items() if q}
        produced = {u: q for u, q in produced.items() if q}
        if spent_total != produced:
            return f"ValueNotConservedUTxO consumed={spent_total} produced={produced}"
        if not self.check_witnesses:
            return None
        signers: set[bytes] = set()
        for witness in tx.transaction_witness_set.vkey_witnesses or []:
            vkey = witness.vkey.payload
            try:
                VerifyKey(vkey).verify(body_hash, witness.signature)
            except (BadSignatureError, ValueError, TypeError):
                return f"InvalidWitnessesUTXOW [{vkey.hex()}]"
            signers.add(_blake2b(vkey, 28))
        required = input_owners | {bytes(h.payload) for h in body.required_signers or []}
        missing = required - signers
        if missing:
            return f"MissingVKeyWitnessesUTXOW {sorted(m.hex() for m in missing)}"
        return None


@pytest.fixture
async def blockfrost_server() -> AsyncIterator[BlockfrostServer]:
    """A started :class:`BlockfrostServer` on the test's loop, stopped afterwards.

    Import it into a conftest (``from tests.support.blockfrost_server import
    blockfrost_server``) or a test module to use it.
    """
    server = BlockfrostServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
