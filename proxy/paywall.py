"""The HTTP side of 402 payments: read payment headers, answer 402s.

One 402 answer serves every kind of client at once: the x402 v2
``PAYMENT-REQUIRED`` header, an x402 v1 JSON body (``x402Version``,
``accepts``) and the invoice under ``detail``. x402 v1 clients parse that
body with ``error`` as a string, so on a 402 with payment requirements the
error code is a string and the message sits beside it; every other error
keeps the ``{"error": {"code", "message"}}`` shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from billing.errors import BillingError, PaymentRequired
from billing.invoices import Binding, InvoiceBook, body_hash
from billing.metering import Ticket
from billing.payer_proof import PayerProof
from billing.payments import X402Call, X402Gateway
from ledger import ops
from ledger.registry import KeyRecord, Service
from proxy.body import BodyError, read_whole
from proxy.errors import ApiError
from proxy.ratelimit import Limit
from proxy.validation import header_value

PAYMENT_HEADERS = ("PAYMENT-SIGNATURE", "X-PAYMENT", "X-Invoice-Id")


@dataclass
class PaidCall:
    ticket: Ticket
    x402: X402Call | None = None
    body: bytes | None = None  # the request body, read to check an invoice's binding
    drawn_invoice: str | None = None  # a batch draw, given back if the call is not charged
    response_headers: dict[str, str] = field(default_factory=dict)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body: an invoice binds its hash, and the upstream gets exactly it."""
    if not request.body_exists:
        return b""
    try:
        return await read_whole(request.content, limit, request.content_length)
    except BodyError as e:
        raise ApiError(e.status, e.code, e.message) from None


class _PaymentHeaders:
    """The payment headers, each checked as printable ASCII before it reaches a lookup."""

    def __init__(self, headers: Any):
        self._headers = headers

    def __contains__(self, name: str) -> bool:
        return name in self._headers

    def __getitem__(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def get(self, name: str) -> str | None:
        return header_value(self._headers, name, max_len=_HEADER_LIMITS.get(name, 200))


# Signed Cardano transactions travel in X-Payment; the rest are ids, hashes and signatures.
_HEADER_LIMITS = {
    "X-Payment": 64 * 1024,
    "PAYMENT-SIGNATURE": 16 * 1024,
    "X-PAYMENT": 16 * 1024,
    "X-Payer-Signature": 4096,
    "X-Payer-Key": 1024,
}


class Paywall:
    def __init__(self, rt: Any, x402: X402Gateway | None, invoices: InvoiceBook | None):
        self.rt = rt
        self.x402 = x402
        self.invoices = invoices

    def carries_payment(self, request: web.Request) -> bool:
        h = request.headers
        return any(name in h for name in PAYMENT_HEADERS)

    def _resource_url(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}{request.path}"

    async def accept(
        self, request: web.Request, svc: Service, key: KeyRecord | None, usage_id: str
    ) -> PaidCall | None:
        h = _PaymentHeaders(request.headers)
        x402_value = h.get("PAYMENT-SIGNATURE") or h.get("X-PAYMENT")
        invoice_id = h.get("X-Invoice-Id")
        if invoice_id and self.invoices is not None:
            limit = self.rt.settings.max_body_bytes
            proof = PayerProof(h.get("X-Payer-Signature"), h.get("X-Payer-Key"))
            if h.get("X-Payment"):
                body = await _read_body(request, limit)
                paid = await self.invoices.pay(
                    invoice_id, h["X-Payment"], self._binding(request, body), svc, usage_id, proof
                )
            else:
                body = None
                paid = await self.invoices.draw(
                    invoice_id, svc, usage_id, proof, key.owner_id if key else None
                )
            if paid.reserved.mode != ops.HELD:
                raise PaymentRequired(
                    "the prepaid batch of this invoice is used up; pay a new invoice"
                )
            price = paid.service.price_units
            ticket = Ticket(
                usage_id=usage_id,
                buyer_id=paid.owner_id,
                service=paid.service,
                mode=ops.HELD,
                hold_id=paid.reserved.hold_id,
                amount=price,
                fee=price * self.rt.meter.fee_bps_for(svc.provider_id) // 10_000,
                free_tier=False,
                idem_key=None,
            )
            return PaidCall(ticket, body=body, drawn_invoice=invoice_id if paid.drawn else None)
        if x402_value and self.x402 is not None:
            call = await self.x402.accept(
                x402_value,
                svc,
                key.owner_id if key else None,
                usage_id,
                self._resource_url(request),
            )
            return PaidCall(call.ticket, x402=call)
        if key is None:
            return None  # anonymous and unpaid: the caller answers 402
        raise ApiError(400, "payment_rail_unavailable", "this payment header is not accepted here")

    def _binding(self, request: web.Request, body: bytes) -> Binding:
        return Binding(request.method, request.raw_path, body_hash(body))

    async def finish(self, paid: PaidCall, outcome: ops.Outcome) -> int:
        if paid.x402 is not None:
            charged = await self.x402.finish(paid.x402, outcome)  # type: ignore[union-attr]
            paid.response_headers.update(paid.x402.response_headers)
            return charged
        outcome.usage.payment_method = "invoice"
        charged = await self.rt.meter.finish(outcome)
        if not charged and paid.drawn_invoice is not None and self.invoices is not None:
            await self.invoices.undraw(paid.drawn_invoice)
        return charged

    async def payment_required(
        self, request: web.Request, svc: Service, key: KeyRecord | None, message: str
    ) -> web.Response:
        rt = self.rt
        from proxy.upstream_request import client_ip

        if rt.settings.invoice_mint_rate_limit:
            ip = client_ip(request, rt.settings.trust_forwarded_for)
            d = await rt.limiter.check(
                [Limit("invoice", "mint402:" + ip, rt.settings.invoice_mint_rate_limit)]
            )
            if not d.allowed:
                raise ApiError(
                    429,
                    "rate_limited",
                    "too many payment requests from this address",
                    headers=d.headers(),
                )
        body: dict[str, Any] = {
            "x402Version": 1,
            "error": "payment_required",
            "code": "payment_required",
            "message": message,
            "accepts": [],
        }
        headers = {"Cache-Control": "no-store"}
        if self.x402 is not None and svc.price_units > 0:
            offer = self.x402.offer(svc, self._resource_url(request), message)
            headers["PAYMENT-REQUIRED"] = offer.payment_required_header
            body["accepts"] = offer.v1_body.get("accepts", [])
        if self.invoices is not None and svc.price_units > 0:
            raw = await _read_body(request, rt.settings.max_body_bytes)
            batch = None
            if "X-Batch-Target" in request.headers:
                try:
                    batch = int(request.headers["X-Batch-Target"])
                except ValueError:
                    batch = 0
                if not 1 <= batch <= 100_000:
                    raise ApiError(400, "invalid_batch_target", "X-Batch-Target must be 1..100000")
            ph = _PaymentHeaders(request.headers)
            wallet = ph.get("X-Wallet-Address")
            explicit = batch is not None or "X-Payment-Chain" in request.headers
            if not wallet and not explicit:
                # An invoice is bound to the address that pays it; without one the
                # x402 offer above still answers, and this says how to get an invoice.
                body["invoice"] = {
                    "required": "X-Wallet-Address",
                    "message": "send X-Wallet-Address (the address you will pay from) for an invoice",
                }
                return web.Response(
                    status=402,
                    text=json.dumps(body),
                    content_type="application/json",
                    headers=headers,
                )
            try:
                body["detail"] = await self.invoices.mint(
                    svc,
                    self._binding(request, raw),
                    owner_id=key.owner_id if key else None,
                    wallet_address=wallet,
                    chain=ph.get("X-Payment-Chain"),
                    batch_target=batch,
                )
            except BillingError as e:
                raise ApiError(e.status, e.code, e.message) from None
        return web.Response(
            status=402, text=json.dumps(body), content_type="application/json", headers=headers
        )
