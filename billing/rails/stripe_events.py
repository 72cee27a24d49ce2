"""Stripe webhooks as Tollway events: what a verified event means for the ledger.

``normalize_event`` turns a Stripe event (already signature-checked by
``StripeRail.parse_webhook``) into one of a few typed events: a card payment
to credit (keyed by its PaymentIntent), refunds and disputes that take money
back or give it back (each by its Stripe id and status), a saved card, or
nothing. Amounts stay in the currency's minor unit; anything we cannot book
is ignored (answered 200: Stripe retries other answers for days).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billing.errors import BillingError

# Metadata key carrying the Tollway owner (wallet owner) on every object we create.
OWNER_KEY = "owner_id"


class WebhookRejected(BillingError):
    """The webhook's signature, timestamp or body is not acceptable: answer 400, credit nothing."""

    status = 400
    code = "invalid_webhook"


@dataclass(frozen=True, slots=True)
class CreditEvent:
    """A verified payment to credit. Key the credit by ``payment_intent_id``: the
    ``checkout.session.completed`` and ``payment_intent.succeeded`` events of one
    payment carry the same id, so one payment credits once whatever arrives.

    ``currency`` is Stripe's lowercase code (``"usd"``); ``amount_cents`` is in its minor unit.
    """

    event_id: str
    payment_intent_id: str
    owner_id: str
    amount_cents: int
    currency: str
    event_type: str = ""


@dataclass(frozen=True, slots=True)
class ReversalPart:
    """One refund or dispute of a charge, as an event shows it (amounts in minor units).

    ``taken_cents`` is what it takes from the platform now: a refund's amount while
    it counts (``pending``, ``requires_action``, ``succeeded``), 0 once it ``failed``
    or was ``canceled`` (Stripe returns the funds to the balance); a dispute's
    amount less the funds reinstated (its ``balance_transactions``), 0 once
    ``won``. ``final`` marks a status Stripe does not leave (refund failed or
    canceled, dispute won or lost), so an older snapshot delivered late is ignored.
    """

    part_id: str
    kind: str
    amount_cents: int
    taken_cents: int
    status: str
    final: bool


@dataclass(frozen=True, slots=True)
class ReversalEvent:
    """Card money taken back by Stripe, or given back: refunds or a dispute (chargeback)
    of the charge of ``payment_intent_id``. ``kind`` is ``"refund"`` or ``"dispute"``.

    ``parts`` are the refunds or the dispute the event shows, each by id and status.
    For ``charge.refunded`` (``cumulative``), ``amount_cents`` is the charge's
    ``amount_refunded``: the running total of its refunds, which also counts refunds
    the event does not list (API versions since 2022-11-15 do not expand them).
    Otherwise it is the one refund's or dispute's amount.
    """

    event_id: str
    payment_intent_id: str
    kind: str
    amount_cents: int
    currency: str
    event_type: str = ""
    parts: tuple[ReversalPart, ...] = ()
    cumulative: bool = False


@dataclass(frozen=True, slots=True)
class SetupCompletedEvent:
    """A setup-mode Checkout finished: the customer now has a saved card for auto top-up."""

    event_id: str
    owner_id: str
    customer_id: str
    setup_intent_id: str | None


@dataclass(frozen=True, slots=True)
class IgnoredEvent:
    """A verified event that moves no money for Tollway; answer 200 so Stripe stops retrying."""

    event_id: str
    type: str
    reason: str = ""


StripeEvent = CreditEvent | ReversalEvent | SetupCompletedEvent | IgnoredEvent


# Far above any one Stripe charge (USD tops out at 99,999,999 cents): a larger figure
# in a signed event is not money we book, and would overflow the ledger's columns.
_MAX_EVENT_CENTS = 10**12


def _int_amount(value: Any) -> int | None:
    """An event's amount in minor units, or None when it is not one we can book
    (not an integer, negative, or absurdly large): such an event is ignored with a
    200, since Stripe retries any other answer for days."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if not 0 <= value <= _MAX_EVENT_CENTS:
        return None
    return value


def _pi_id(value: Any) -> str | None:
    # ``payment_intent`` is an id string, or an object when the event was expanded.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"]
    return None


# Events carrying a Refund object (``charge.refund.updated`` is sent when a refund
# fails or is canceled; the ``refund.*`` ones where the endpoint subscribes to them).
REFUND_EVENTS = ("charge.refund.updated", "refund.created", "refund.updated", "refund.failed")
# Events carrying a Dispute object: funds are withdrawn when it opens and
# reinstated when the merchant wins (``closed`` with status ``won``, and
# ``funds_reinstated``, which also comes for a lost dispute of a partly refunded charge).
DISPUTE_EVENTS = (
    "charge.dispute.created",
    "charge.dispute.updated",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.closed",
    "charge.dispute.funds_reinstated",
)
# A refund in these statuses moved no money in the end: Stripe put it back in the balance.
_REFUND_UNDONE = ("failed", "canceled")
_DISPUTE_CLOSED = ("won", "lost")


def _refund_part(refund: Any) -> ReversalPart | None:
    if not isinstance(refund, dict) or not isinstance(refund.get("id"), str):
        return None
    amount = _int_amount(refund.get("amount"))
    if not amount or amount < 0:
        return None
    status = str(refund.get("status") or "")
    undone = status in _REFUND_UNDONE
    return ReversalPart(refund["id"], "refund", amount, 0 if undone else amount, status, undone)


def _charge_refunded(event_id: str, etype: str, charge: dict[str, Any]) -> StripeEvent:
    pi_id = _pi_id(charge.get("payment_intent"))
    total = _int_amount(charge.get("amount_refunded"))
    currency = charge.get("currency")
    # Only listed when the endpoint's API version (before 2022-11-15) or an
    # expansion includes them; unlisted refunds count through amount_refunded.
    refunds = charge.get("refunds")
    listed = refunds.get("data") if isinstance(refunds, dict) else None
    parts = tuple(p for p in map(_refund_part, listed or ()) if p is not None)
    if not pi_id or total is None or total < 0 or not isinstance(currency, str):
        return IgnoredEvent(event_id, etype, "no payment intent or amount to take back")
    if not total and not parts:
        return IgnoredEvent(event_id, etype, "nothing refunded")
    return ReversalEvent(
        event_id, pi_id, "refund", total, currency.lower(), etype, parts, cumulative=True
    )


def _dispute(event_id: str, etype: str, dispute: dict[str, Any]) -> StripeEvent:
    status = str(dispute.get("status") or "")
    if status.startswith("warning_"):
        # An inquiry: no funds are withdrawn unless it becomes a dispute (a new event).
        return IgnoredEvent(event_id, etype, "inquiry, no funds withdrawn")
    pi_id = _pi_id(dispute.get("payment_intent"))
    amount = _int_amount(dispute.get("amount"))
    currency = dispute.get("currency")
    if not pi_id or not amount or amount < 0 or not isinstance(currency, str):
        return IgnoredEvent(event_id, etype, "no payment intent or amount to take back")
    if not isinstance(dispute.get("id"), str):
        return IgnoredEvent(event_id, etype, "dispute without id")
    currency = currency.lower()
    # Reinstatements are the positive balance transactions; only those in the
    # dispute's own currency can be compared with its amount (a platform settling
    # in another currency keeps the whole amount taken unless the dispute is won).
    reinstated = sum(
        bt["amount"]
        for bt in dispute.get("balance_transactions") or ()
        if isinstance(bt, dict)
        and _int_amount(bt.get("amount")) is not None
        and bt["amount"] > 0
        and str(bt.get("currency") or "").lower() == currency
    )
    taken = 0 if status == "won" else max(0, amount - reinstated)
    part = ReversalPart(dispute["id"], "dispute", amount, taken, status, status in _DISPUTE_CLOSED)
    return ReversalEvent(event_id, pi_id, "dispute", amount, currency, etype, (part,))


def normalize_event(event: dict[str, Any]) -> StripeEvent:
    """Turn a verified Stripe event (as a plain dict) into what billing acts on.

    Public so a stored event (outbox replay, manual re-drive) can be normalized
    without re-verifying its signature.
    """
    event_id = str(event.get("id") or "")
    etype = str(event.get("type") or "")
    if not event_id or not etype:
        raise WebhookRejected("event has no id or type")
    obj = (event.get("data") or {}).get("object") or {}
    metadata = obj.get("metadata") or {}

    if etype in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        owner_id = metadata.get(OWNER_KEY) or obj.get("client_reference_id")
        if obj.get("mode") == "setup":
            if not owner_id or not obj.get("customer"):
                return IgnoredEvent(event_id, etype, "setup session without owner or customer")
            return SetupCompletedEvent(
                event_id, owner_id, str(obj["customer"]), _pi_id(obj.get("setup_intent"))
            )
        if obj.get("mode") != "payment":
            return IgnoredEvent(event_id, etype, f"checkout mode {obj.get('mode')!r}")
        # Delayed methods complete the session unpaid; their async_payment_succeeded
        # (or payment_intent.succeeded) credits later, under the same PaymentIntent id.
        if obj.get("payment_status") != "paid":
            return IgnoredEvent(event_id, etype, f"payment_status {obj.get('payment_status')!r}")
        pi_id = _pi_id(obj.get("payment_intent"))
        amount = _int_amount(obj.get("amount_total"))
        currency = obj.get("currency")
        if not owner_id or not pi_id or not amount or not isinstance(currency, str):
            return IgnoredEvent(event_id, etype, "paid session missing owner, intent or amount")
        return CreditEvent(event_id, pi_id, owner_id, amount, currency.lower(), etype)

    if etype == "payment_intent.succeeded":
        owner_id = metadata.get(OWNER_KEY)
        pi_id = _pi_id(obj.get("id"))
        # amount_received is what was actually captured; it is the credit.
        amount = _int_amount(obj.get("amount_received"))
        if amount is None and "amount_received" not in obj:
            amount = _int_amount(obj.get("amount"))
        currency = obj.get("currency")
        if not owner_id:
            # Not a Tollway payment (or made outside our flows): nothing to credit.
            return IgnoredEvent(event_id, etype, "payment intent without owner metadata")
        if not pi_id or not amount or not isinstance(currency, str):
            return IgnoredEvent(event_id, etype, "payment intent missing id or amount")
        return CreditEvent(event_id, pi_id, owner_id, amount, currency.lower(), etype)

    if etype == "charge.refunded":
        return _charge_refunded(event_id, etype, obj)
    if etype in REFUND_EVENTS:
        part = _refund_part(obj)
        pi_id, currency = _pi_id(obj.get("payment_intent")), obj.get("currency")
        if part is None or not pi_id or not isinstance(currency, str):
            return IgnoredEvent(event_id, etype, "no payment intent or refund")
        return ReversalEvent(
            event_id, pi_id, "refund", part.amount_cents, currency.lower(), etype, (part,)
        )
    if etype in DISPUTE_EVENTS:
        return _dispute(event_id, etype, obj)

    return IgnoredEvent(event_id, etype)
