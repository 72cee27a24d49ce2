"""x402 pay-per-call: reserve, verify, forward, settle, record.

Order of a paid call (the header is ``PAYMENT-SIGNATURE`` for v2 or
``X-PAYMENT`` for v1):

1. reserve (payer, nonce) in ``payments``: unique, so a replay, or the same
   header sent 20 times at once, gets through once;
2. verify (offer, recipient, exact amount, window, signature, nonce on
   chain, balance) locally or through a facilitator; a failure releases the
   reservation;
3. the proxy forwards the call;
4. only if the upstream answered below 500: settle on chain
   (``transferWithAuthorization``), then in one transaction record the
   deposit (world -> payer's wallet) and the charge (wallet -> provider and
   fee). Otherwise nothing moves and the reservation is released, so the
   unused authorization can be sent again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from billing.errors import BillingError, PaymentConflict, PaymentRejected
from billing.metering import Meter, Ticket
from billing.money import fee_of
from billing.payer_proof import wallet_owner
from ledger import journal as j
from ledger import ops
from ledger.db import DuplicateError, Tx
from ledger.journal import Transfer, new_id, now_ms
from ledger.registry import Service
from ledger.writer import GroupCommitWriter

if TYPE_CHECKING:  # the x402 rail pulls in web3 and pydantic: loaded only when configured
    from billing.rails import x402 as x402r

log = logging.getLogger("tollway.x402")


@dataclass
class X402Call:
    ticket: Ticket
    verified: x402r.VerifiedX402Payment
    payment_id: str
    response_headers: dict[str, str] = field(default_factory=dict)


def check_resource(payload: Any, resource_url: str) -> None:
    """An x402 v2 payment names the resource it was offered for; it pays only that one.

    The EIP-3009 signature covers payer, recipient, amount, window and nonce,
    not the resource, so two services with one price and ``payTo`` would
    otherwise take each other's authorizations. v1 payloads carry no resource
    and are bound only by price and recipient (documented in the README).
    """
    if getattr(payload, "x402_version", 1) < 2:
        return
    resource = getattr(payload, "resource", None)
    url = getattr(resource, "url", None)
    if not isinstance(url, str) or not url:
        raise PaymentRejected(
            "an x402 v2 payment must name the resource it pays for", code="resource_required"
        )
    if urlsplit(url).path != urlsplit(resource_url).path:
        raise PaymentRejected(
            "this authorization was offered for another resource", code="resource_mismatch"
        )


def _claimed_authorization(payload: Any) -> tuple[str, str]:
    """(from, nonce) as the payload claims them, before any check: the reservation key."""
    inner = getattr(payload, "payload", None)
    auth = inner.get("authorization") if isinstance(inner, dict) else None
    if (
        not isinstance(auth, dict)
        or not isinstance(auth.get("from"), str)
        or not isinstance(auth.get("nonce"), str)
    ):
        raise PaymentRejected(
            "x402 payload has no EIP-3009 authorization", code="invalid_payment_header"
        )
    return auth["from"].lower(), auth["nonce"].lower()


class X402Gateway:
    def __init__(
        self,
        processor: Any,
        rails: Sequence[x402r.ExactEvmRail],
        writer: GroupCommitWriter,
        meter: Meter,
        asset: str = "USDC",
        chain_rail: str | None = None,
        min_validity_seconds: int = 0,
        partner: str = "tollway",
    ):
        self.processor = processor
        self.rails = list(rails)
        self.writer = writer
        self.meter = meter
        self.asset = asset
        # "eip155:<node chain id>": the key deposits and invoices use for a
        # transaction, so the settlement's transfer can never be claimed again.
        self.chain_rail = chain_rail
        # Settlement happens after the upstream answers: an authorization must
        # outlive the upstream's timeouts plus the settle margin, or the upstream
        # could run for free on one that expires meanwhile.
        self.min_validity_seconds = min_validity_seconds
        self.partner = partner

    def upload_seconds_left(self, call: X402Call) -> float:
        """How long the request body may take to arrive: the authorization must still be
        valid after it, the upstream's answer and the settlement."""
        return call.verified.valid_before - time.time() - self.min_validity_seconds

    def offer(self, svc: Service, resource_url: str, message: str) -> x402r.X402Offer:
        from billing.rails.x402 import build_offer

        return build_offer(
            self.rails,
            amount=svc.price_units,
            resource_url=resource_url,
            description=svc.name,
            error=message,
        )

    async def accept(
        self,
        header_value: str,
        svc: Service,
        buyer_id: str | None,
        usage_id: str,
        resource_url: str,
    ) -> X402Call:
        if svc.price_units <= 0:
            raise BillingError(
                "this service is free; no payment is needed", code="payment_not_needed", status=400
            )
        from billing.rails.x402 import decode_payment_header

        payload = decode_payment_header(header_value)
        check_resource(payload, resource_url)
        payer, nonce = _claimed_authorization(payload)
        key = f"x402:{payer}:{nonce}"
        payment_id = new_id("pay")
        # Without a key the payer's wallet owns the call, as an invoice's payer does;
        # the verified signer must be this claimed payer, checked below.
        buyer = buyer_id or wallet_owner(self.partner, payer)
        await self._reserve(payment_id, key, buyer, svc.price_units)
        try:
            verified = await self.processor.verify(
                payload, amount=svc.price_units, resource_url=resource_url
            )
            if verified.payer.lower() != payer or verified.nonce.lower() != nonce:
                raise PaymentRejected(
                    "the authorization does not match its claim", code="invalid_signature"
                )
            needed = int(time.time()) + self.min_validity_seconds
            if verified.valid_before < needed:
                raise PaymentRejected(
                    f"the authorization expires before this call can settle: validBefore must be"
                    f" at least {self.min_validity_seconds} s from now",
                    code="authorization_expires_too_soon",
                )
        except BaseException:
            await self._release(payment_id)
            raise
        ticket = Ticket(
            usage_id=usage_id,
            buyer_id=buyer,
            service=svc,
            mode="paid",
            hold_id=None,
            amount=svc.price_units,
            fee=fee_of(svc.price_units, self.meter.fee_bps_for(svc.provider_id)),
            free_tier=False,
            idem_key=None,
        )
        return X402Call(ticket, verified, payment_id)

    async def _reserve(self, payment_id: str, key: str, owner_id: str, amount: int) -> None:
        async def op(tx: Tx) -> bool:
            n = await tx.execute(
                "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status, created_at)"
                " VALUES ($1, 'x402', $2, $3, $4, $5, 'reserved', $6) ON CONFLICT (rail, external_ref) DO NOTHING",
                payment_id,
                key,
                owner_id,
                self.asset,
                amount,
                now_ms(),
            )
            return n == 1

        if not await self.writer.submit(op):
            raise PaymentConflict("this payment was already presented", code="payment_replayed")

    async def _release(self, payment_id: str) -> None:
        async def op(tx: Tx) -> None:
            await tx.execute(
                "DELETE FROM payments WHERE id = $1 AND status = 'reserved'", payment_id
            )

        try:
            await self.writer.submit(op)
        except Exception:  # the reservation then simply stays; the payment is not lost
            log.exception("could not release x402 reservation %s", payment_id)

    async def finish(self, call: X402Call, outcome: ops.Outcome) -> int:
        outcome.usage.payment_method = "x402"
        if outcome.charge <= 0:
            await self._release(call.payment_id)
            return await self.meter.finish(outcome)
        try:
            settlement = await self.processor.settle(call.verified)
        except (BillingError, Exception) as exc:
            log.warning("x402 settlement failed for %s: %s", call.payment_id, exc)
            outcome.charge, outcome.fee = 0, 0
            # A revert or a used nonce moved nothing; a timeout or a dropped
            # connection may have: keep the reservation as "unknown" for an
            # operator to reconcile on chain, never release it for reuse.
            known = (
                isinstance(exc, (PaymentConflict, PaymentRejected))
                and exc.code != "settlement_failed"
            )
            await self._mark(call.payment_id, "failed" if known else "unknown", {"error": str(exc)})
            await self.meter.finish(_unserved(outcome))
            if isinstance(exc, BillingError):
                raise PaymentRejected(
                    f"settlement failed: {exc.message}", code="settlement_failed"
                ) from exc
            raise PaymentRejected("settlement failed", code="settlement_failed") from exc
        call.response_headers[settlement.header_name] = settlement.header_value
        v = call.verified
        asset, buyer, pid = self.asset, call.ticket.buyer_id, call.payment_id
        finish = self.meter.finish_op(outcome)
        detail = json.dumps({"tx": settlement.transaction, "network": v.network, "payer": v.payer})

        chain_rail, tx_ref = self.chain_rail, settlement.transaction.lower()

        async def op(tx: Tx) -> int:
            await tx.execute(
                "UPDATE payments SET status = 'settled', detail = $2 WHERE id = $1", pid, detail
            )
            if chain_rail:
                # The chain transaction is one payment through every door: if a deposit
                # or an invoice holds it already, this credit is refused, never doubled.
                recorded = await tx.execute(
                    "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status,"
                    " detail, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'x402_settlement', $7, $8)"
                    " ON CONFLICT (rail, external_ref) DO NOTHING",
                    new_id("pay"),
                    chain_rail,
                    tx_ref,
                    buyer,
                    asset,
                    v.amount,
                    json.dumps({"x402_payment": pid}),
                    now_ms(),
                )
                if not recorded:
                    raise PaymentConflict(
                        "this settlement's transaction was already credited",
                        code="payment_already_used",
                    )
            await tx.transfer(
                Transfer(
                    new_id("tr"),
                    j.world(asset),
                    j.wallet(buyer, asset),
                    v.amount,
                    "x402_deposit",
                    f"x402:{pid}",
                    payment_id=pid,
                    usage_id=call.ticket.usage_id,
                )
            )
            return await finish(tx)

        try:
            return await self.writer.submit(op)
        except PaymentConflict:
            log.error("x402 payment %s settled in %s, which was already credited", pid, tx_ref)
            await self._mark(pid, "conflict", {"tx": settlement.transaction})
            await self.meter.finish(_unserved(outcome))
            raise

    async def _mark(self, payment_id: str, status: str, detail: dict[str, Any]) -> None:
        async def op(tx: Tx) -> None:
            await tx.execute(
                "UPDATE payments SET status = $2, detail = $3 WHERE id = $1",
                payment_id,
                status,
                json.dumps(detail),
            )

        try:
            await self.writer.submit(op)
        except DuplicateError:  # pragma: no cover
            pass


def _unserved(o: ops.Outcome) -> ops.Outcome:
    o.mode = "paid"
    o.charge = 0
    o.fee = 0
    return o
