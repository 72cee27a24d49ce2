"""Invoice payments: the 402 invoice, paid on chain, retried with proof.

An invoice is minted with a 402 answer and bound to that request (method,
path with query, body hash) and to its payer: the address named in
``X-Wallet-Address`` (see ``billing.payer_proof``). The retry carries
``X-Invoice-Id``, ``X-Payment`` (an EVM transaction hash, a Cardano
transaction hash, or a signed Cardano transaction in CBOR) and
``X-Payer-Signature``. The payment is verified on its chain, sent by the
payer, then consumed in one transaction: the payment's (rail, tx) becomes
unique in ``payments`` (one payment pays once, ever, through any door), the
invoice flips from open to paid, the amount received is credited to the
invoice's owner and this call's price is held from it.

The owner is the minting key's owner, or, for an anonymous call, the
payer's wallet owner ``{partner}:{address}``, which only a signature of that
wallet can claim (``proxy.routes.identity``). So a batch invoice
(``batchTarget`` > 1) leaves the rest in the payer's own wallet; later calls
draw from it with the paid invoice id and the payer's signature.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from billing.errors import BillingError, PaymentConflict, PaymentRejected, PaymentRequired
from billing.invoice_chains import verify_on_chain
from billing.invoice_terms import Binding, CardanoTerms, EvmTerms
from billing.money import format_amount
from billing.payer_proof import (
    PayerProof,
    check_payer_signature,
    invoice_message,
    normalize_payer,
    wallet_owner,
)
from ledger import journal as j
from ledger import ops
from ledger.db import Row, Store, Tx
from ledger.journal import Transfer, new_id, now_ms
from ledger.registry import Service
from ledger.writer import GroupCommitWriter

INVOICE_VERSION = "0.1"


def _payer_of(inv: Row) -> str:
    payer = inv["wallet_address"]
    if not payer:
        raise PaymentRejected(
            "this invoice names no payer; request a new one", code="invoice_without_payer"
        )
    return str(payer)


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass
class PaidInvoice:
    invoice: Row
    owner_id: str
    service: Service  # priced in the invoice's asset
    reserved: ops.Reserved
    payment_id: str | None = None
    credited: int = 0
    drawn: bool = False  # a later call of a batch (counted on the invoice)


@dataclass
class InvoiceBook:
    store: Store
    writer: GroupCommitWriter
    partner: str
    ttl_ms: int
    hold_ttl_ms: int
    default_batch: int
    batch_ttl_ms: int = 30 * 86_400_000
    evm: EvmTerms | None = None
    evm_client: Any = None
    cardano: CardanoTerms | None = None
    cardano_rail: Any = None
    _chains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._chains = [t.chain for t in (self.evm, self.cardano) if t is not None]

    @property
    def chains(self) -> list[str]:
        return list(self._chains)

    def _terms(self, chain: str) -> EvmTerms | CardanoTerms:
        c = chain.lower()
        t: EvmTerms | CardanoTerms | None = None
        if c.startswith("cardano"):
            t = self.cardano
        elif c.startswith(("eip155", "evm")):
            t = self.evm
        if t is not None:
            return t
        raise BillingError(
            f"no invoice rail for chain {chain!r}; offered: {', '.join(self._chains)}",
            code="unsupported_chain",
            status=400,
        )

    # ------------------------------------------------------------------ minting

    async def mint(
        self,
        svc: Service,
        binding: Binding,
        *,
        owner_id: str | None,
        wallet_address: str | None,
        chain: str | None = None,
        batch_target: int | None = None,
    ) -> dict[str, Any]:
        terms = self._terms(chain) if chain else (self.evm or self.cardano)
        assert terms is not None
        batch = batch_target or self.default_batch
        if batch > 1 and not wallet_address:
            raise BillingError(
                "a prepaid batch needs X-Wallet-Address to know whose balance to credit",
                code="wallet_address_required_for_prepaid_batches",
                status=400,
            )
        payer = normalize_payer(terms.chain, wallet_address)
        if isinstance(terms, CardanoTerms):
            price = math.ceil(svc.price_units * terms.rate)
            token = terms.unit
        else:
            price = svc.price_units
            token = terms.token
        amount = price * batch
        outputs = []
        if isinstance(terms, CardanoTerms):
            outputs = [
                {"address": addr, "unit": terms.unit, "amount": str(max(1, amount * bps // 10_000))}
                for addr, bps in terms.splits
            ]
        inv_id = "inv_" + secrets.token_urlsafe(18)
        now = now_ms()
        if owner_id is None:
            owner_id = wallet_owner(self.partner, payer)
        await self.store.execute(
            "INSERT INTO invoices (id, service_id, chain, asset, token, amount, decimals, price, batch_target,"
            " pay_to, outputs, partner, wallet_address, owner_id, req_method, req_path, req_body_hash, status,"
            " created_at, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,'open',$18,$19)",
            inv_id,
            svc.id,
            terms.chain,
            terms.asset,
            token,
            amount,
            terms.decimals,
            price,
            batch,
            terms.pay_to,
            json.dumps(outputs),
            self.partner,
            payer,
            owner_id,
            binding.method,
            binding.path,
            binding.body_hash,
            now,
            now + self.ttl_ms,
        )
        row = await self.store.fetchrow("SELECT * FROM invoices WHERE id = $1", inv_id)
        assert row is not None
        return self.detail(row)

    def detail(self, inv: Row) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "partner": inv["partner"],
            "batchTarget": int(inv["batch_target"]),
            "outputs": json.loads(inv["outputs"]),
        }
        if inv["chain"].startswith("cardano"):
            extra["lovelace"] = inv["token"] == "lovelace"
        else:
            extra["token"] = inv["token"]
        return {
            "version": INVOICE_VERSION,
            "invoiceId": inv["id"],
            "chain": inv["chain"],
            "asset": inv["asset"],
            "amountUnits": str(inv["amount"]),
            "decimals": int(inv["decimals"]),
            "payTo": inv["pay_to"],
            "timeout": max(0, (int(inv["expires_at"]) - now_ms()) // 1000),
            "payer": inv["wallet_address"],
            # What X-Payer-Signature signs on the retry (see billing.payer_proof).
            "payerMessage": invoice_message(inv["id"], inv["wallet_address"] or ""),
            "extra": extra,
        }

    # ------------------------------------------------------------------ paying

    async def get(self, invoice_id: str) -> Row | None:
        return await self.store.fetchrow("SELECT * FROM invoices WHERE id = $1", invoice_id)

    async def pay(
        self,
        invoice_id: str,
        payment: str,
        binding: Binding,
        svc: Service,
        usage_id: str,
        proof: PayerProof,
    ) -> PaidInvoice:
        inv = await self.get(invoice_id)
        if inv is None or inv["service_id"] != svc.id:
            raise PaymentRejected("unknown invoice for this service", code="invoice_not_found")
        if inv["status"] == "paid":
            raise PaymentConflict("this invoice is already paid", code="invoice_already_used")
        if (inv["req_method"], inv["req_path"], inv["req_body_hash"]) != (
            binding.method,
            binding.path,
            binding.body_hash,
        ):
            raise PaymentConflict(
                "this invoice was minted for another request (method, path or body differ)",
                code="invoice_request_mismatch",
            )
        payer = _payer_of(inv)
        # The signature first: a stranger is refused before any chain lookup.
        check_payer_signature(inv["chain"], invoice_id, payer, proof)
        rail, tx_ref, received, paid_at = await verify_on_chain(self, inv, payment.strip(), payer)
        # Expiry is judged by when the payment was made (its block, or our submission),
        # not by when the retry arrives: a buyer whose network dropped still gets the call.
        if paid_at > int(inv["expires_at"]):
            raise PaymentRejected(
                "the invoice had expired when this payment was made; request a new one",
                code="invoice_expired",
            )
        priced = replace(svc, price_units=int(inv["price"]), asset=inv["asset"], free_tier_calls=0)
        owner, asset, price = inv["owner_id"], inv["asset"], int(inv["price"])
        hold_ttl, batch_ttl = self.hold_ttl_ms, self.batch_ttl_ms
        payment_id = new_id("pay")

        async def consume(tx: Tx) -> ops.Reserved:
            now = now_ms()
            taken = await tx.fetchval(
                "SELECT id FROM payments WHERE rail = $1 AND external_ref = $2", rail, tx_ref
            )
            if taken is not None:
                raise PaymentConflict(
                    "this transaction already paid an invoice", code="payment_already_used"
                )
            await tx.execute(
                "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status, detail, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, 'credited', $7, $8)",
                payment_id,
                rail,
                tx_ref,
                owner,
                asset,
                received,
                json.dumps({"invoice": invoice_id, "payer": payer}),
                now,
            )
            flipped = await tx.execute(
                "UPDATE invoices SET status = 'paid', payment_id = $2, paid_at = $3,"
                " draws_until = $4 WHERE id = $1 AND status = 'open'",
                invoice_id,
                payment_id,
                now,
                now + batch_ttl,
            )
            if flipped != 1:
                raise PaymentConflict("this invoice is already paid", code="invoice_already_used")
            await tx.transfer(
                Transfer(
                    new_id("tr"),
                    j.world(asset),
                    j.wallet(owner, asset),
                    received,
                    "invoice_deposit",
                    f"invoice:{invoice_id}",
                    payment_id=payment_id,
                ),
                now=now,
            )
            return await ops.reserve(
                tx, ops.Reservation(usage_id, owner, svc.id, 0, price, asset, hold_ttl)
            )

        try:
            reserved = await self.writer.submit(consume)
        except Exception as exc:
            if "unique" in str(exc).lower() or "duplicate" in type(exc).__name__.lower():
                raise PaymentConflict(
                    "this transaction already paid an invoice", code="payment_already_used"
                ) from None
            raise
        return PaidInvoice(inv, owner, priced, reserved, payment_id, received)

    async def draw(
        self,
        invoice_id: str,
        svc: Service,
        usage_id: str,
        proof: PayerProof,
        caller_owner: str | None,
    ) -> PaidInvoice:
        """A later call of a paid batch, by its invoice id and its payer's signature.

        A batch is drawn at most ``batch_target - 1`` times after the paying call
        and only until ``draws_until``: the id and signature are a bearer
        credential for that batch, not for the owner's wallet. An invoice minted
        with a key is drawn only with a key of the same owner.
        """
        inv = await self.get(invoice_id)
        if inv is None or inv["service_id"] != svc.id:
            raise PaymentRejected("unknown invoice for this service", code="invoice_not_found")
        if inv["status"] != "paid":
            raise PaymentRejected(
                "this invoice is not paid; send X-Payment with it", code="invoice_unpaid"
            )
        payer, owner = _payer_of(inv), str(inv["owner_id"])
        if owner != wallet_owner(str(inv["partner"]), payer) and caller_owner != owner:
            raise PaymentRejected(
                "this batch was bought with an API key: draw from it with a key of its owner",
                code="owner_key_required",
            )
        check_payer_signature(inv["chain"], invoice_id, payer, proof)
        priced = replace(svc, price_units=int(inv["price"]), asset=inv["asset"], free_tier_calls=0)
        r = ops.Reservation(
            usage_id, owner, svc.id, 0, int(inv["price"]), inv["asset"], self.hold_ttl_ms
        )
        batch, now = int(inv["batch_target"]), now_ms()

        async def op(tx: Tx) -> ops.Reserved:
            counted = await tx.execute(
                "UPDATE invoices SET draws_used = draws_used + 1"
                " WHERE id = $1 AND draws_used < $2 AND draws_until >= $3",
                invoice_id,
                batch - 1,
                now,
            )
            if counted != 1:
                raise PaymentRequired("the prepaid batch of this invoice is used up or expired")
            reserved = await ops.reserve(tx, r)
            if reserved.mode != ops.HELD:
                raise PaymentRequired("the prepaid batch of this invoice is used up")
            return reserved

        reserved = await self.writer.submit(op)
        return PaidInvoice(inv, owner, priced, reserved, drawn=True)

    async def undraw(self, invoice_id: str) -> None:
        """A draw whose call was not charged (the upstream failed) is given back."""

        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE invoices SET draws_used = draws_used - 1 WHERE id = $1 AND draws_used > 0",
                invoice_id,
            )

        await self.writer.submit(op)

    # ------------------------------------------------------------------ status

    async def status(self, invoice_id: str) -> dict[str, Any] | None:
        inv = await self.get(invoice_id)
        if inv is None:
            return None
        status = inv["status"]
        if status == "open" and int(inv["expires_at"]) < now_ms():
            status = "expired"
        out = self.detail(inv)
        out.update({"status": status, "serviceId": inv["service_id"], "paidAt": inv["paid_at"]})
        if inv["payment_id"]:
            ref = await self.store.fetchval(
                "SELECT external_ref FROM payments WHERE id = $1", inv["payment_id"]
            )
            out["paymentTx"] = ref
        return out

    async def balance(self, partner: str, wallet: str) -> dict[str, Any]:
        owner = f"{partner}:{wallet}"
        if wallet.lower().startswith("0x"):
            owner = f"{partner}:{wallet.lower()}"
        rows = await self.store.fetch(
            "SELECT asset, balance FROM accounts WHERE kind = 'wallet' AND owner_id = $1 ORDER BY asset",
            owner,
        )
        decimals = {t.asset: t.decimals for t in (self.evm, self.cardano) if t is not None}
        return {
            "partner": partner,
            "wallet": wallet,
            "balances": [
                {
                    "asset": r["asset"],
                    "amountUnits": str(r["balance"]),
                    "amount": format_amount(int(r["balance"]), decimals.get(r["asset"], 6)),
                }
                for r in rows
            ],
        }
