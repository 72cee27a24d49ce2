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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from billing.errors import BillingError, PaymentConflict, PaymentRejected
from billing.metering import Meter, Ticket
from billing.money import fee_of
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
    ):
        self.processor = processor
        self.rails = list(rails)
        self.writer = writer
        self.meter = meter
        self.asset = asset
        # "eip155:<node chain id>": the key deposits and invoices use for a
        # transaction, so the settlement's transfer can never be claimed again.
        self.chain_rail = chain_rail

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
        payer, nonce = _claimed_authorization(payload)
        key = f"x402:{payer}:{nonce}"
        payment_id = new_id("pay")
        await self._reserve(payment_id, key, payer, svc.price_units)
        try:
            verified = await self.processor.verify(
                payload, amount=svc.price_units, resource_url=resource_url
            )
            if verified.payer.lower() != payer or verified.nonce.lower() != nonce:
                raise PaymentRejected(
                    "the authorization does not match its claim", code="invalid_signature"
                )
        except BaseException:
            await self._release(payment_id)
            raise
        buyer = buyer_id or f"x402:{verified.payer.lower()}"
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

    async def _reserve(self, payment_id: str, key: str, payer: str, amount: int) -> None:
        async def op(tx: Tx) -> bool:
            n = await tx.execute(
                "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status, created_at)"
                " VALUES ($1, 'x402', $2, $3, $4, $5, 'reserved', $6) ON CONFLICT (rail, external_ref) DO NOTHING",
                payment_id,
                key,
                payer,
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
                await tx.execute(
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

        return await self.writer.submit(op)

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
