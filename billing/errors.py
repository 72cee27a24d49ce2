"""Errors that billing raises; the proxy maps them to the JSON error shape.

Billing never imports the web layer, so each error carries its own HTTP status
and a stable machine-readable code, and the edge turns it into
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations


class BillingError(Exception):
    status: int = 400
    code: str = "billing_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class PaymentRequired(BillingError):
    status = 402
    code = "payment_required"


class PaymentPending(BillingError):
    """A payment was seen but does not count yet (too few confirmations): retry later."""

    status = 402
    code = "payment_pending"

    def __init__(self, message: str, *, tx_id: str, retry_after_seconds: int):
        super().__init__(message)
        self.tx_id = tx_id
        self.headers = {"Retry-After": str(retry_after_seconds)}


class PaymentRejected(BillingError):
    """A payment was offered but does not pay what was asked (wrong token, amount, signature...)."""

    status = 402
    code = "payment_rejected"


class PaymentConflict(BillingError):
    """The payment was already used, or the invoice is bound to another request."""

    status = 409
    code = "payment_conflict"


class PayoutFailed(BillingError):
    status = 502
    code = "payout_failed"


class UpstreamRailError(BillingError):
    """A chain node, Blockfrost backend or Stripe could not be reached or answered oddly."""

    status = 502
    code = "rail_unavailable"
