"""Stripe money for wallets: top-ups and webhooks.

Auto top-up (off-session charges) lives in ``billing.auto_topups``, Connect
onboarding and payouts in ``billing.connect_payouts``.

- A top-up is a Checkout Session; the wallet is credited only by a verified
  webhook (or a succeeded off-session PaymentIntent), keyed by the PaymentIntent
  id in ``payments``: ``checkout.session.completed`` and
  ``payment_intent.succeeded`` of one payment, or one event delivered twice,
  credit once. Event ids are recorded too, so a redelivery does nothing at all.
- Card money settles before it can leave; refunds and disputes take it back (a
  debt for what was spent) and failed refunds and won disputes give it back,
  once per event and never more than the payment: see ``billing.card_funds``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from billing import card_funds
from billing.errors import BillingError
from billing.rails.stripe_rail import (
    CheckoutSession,
    CreditEvent,
    ReversalEvent,
    SetupCompletedEvent,
    StripeRail,
)
from ledger import journal as j
from ledger.db import Row, Store, Tx
from ledger.journal import Transfer, new_id, now_ms
from ledger.writer import GroupCommitWriter

log = logging.getLogger("tollway.topups")

STRIPE_RAIL = "stripe"


@dataclass(frozen=True, slots=True)
class TopupConfig:
    asset: str
    currency: str
    units_per_cent: int
    cooldown_seconds: int
    # How long card money must wait before it can leave a wallet (billing.card_funds).
    card_settle_seconds: int = 7 * 86_400
    # Auto top-up (billing.auto_topups): how often the worker looks for triggered
    # rows (it is also woken in-process).
    poll_seconds: float = 0.5
    # How often the in-memory set of owners with auto top-up is reloaded, so a
    # change made through another process reaches this one's finish hook.
    refresh_seconds: float = 5.0
    # A claim older than this is taken to be from a dead worker and retried (same key).
    stale_claim_seconds: float = 300.0
    # After an unknown charge outcome, retry (same idempotency key) after this long.
    unknown_retry_seconds: float = 30.0


def cents_of(units: int, units_per_cent: int) -> int:
    """Ledger units to Stripe cents; refuses fractions of a cent rather than rounding money away."""
    if units % units_per_cent:
        raise BillingError(
            "the amount must be a whole number of cents", code="invalid_amount", status=422
        )
    return units // units_per_cent


class Topups:
    """Stripe top-ups and webhooks for wallets. One per process; ``close`` closes the rail."""

    def __init__(
        self, store: Store, writer: GroupCommitWriter, rail: StripeRail, config: TopupConfig
    ) -> None:
        self.store = store
        self.writer = writer
        self.rail = rail
        self.config = config

    # ------------------------------------------------------------------ customers

    async def customer_row(self, owner_id: str) -> Row | None:
        return await self.store.fetchrow(
            "SELECT * FROM stripe_customers WHERE owner_id = $1", owner_id
        )

    async def _ensure_customer(self, owner_id: str) -> str:
        row = await self.customer_row(owner_id)
        if row is not None and row["customer_id"]:
            return str(row["customer_id"])
        # The idempotency key makes concurrent first calls create one Customer.
        customer_id = await self.rail.create_customer(
            owner_id, idempotency_key=f"tollway-customer:{owner_id}"
        )
        now = now_ms()

        async def op(tx: Tx) -> str:
            await tx.execute(
                "INSERT INTO stripe_customers (owner_id, customer_id, created_at, updated_at)"
                " VALUES ($1, $2, $3, $3) ON CONFLICT (owner_id) DO UPDATE SET"
                " customer_id = COALESCE(stripe_customers.customer_id, excluded.customer_id),"
                " updated_at = excluded.updated_at",
                owner_id,
                customer_id,
                now,
            )
            return str(
                await tx.fetchval(
                    "SELECT customer_id FROM stripe_customers WHERE owner_id = $1", owner_id
                )
            )

        return await self.writer.submit(op)

    # ------------------------------------------------------------------ top-ups

    async def create_topup(self, owner_id: str, units: int) -> CheckoutSession:
        cents = cents_of(units, self.config.units_per_cent)
        row = await self.customer_row(owner_id)
        customer = str(row["customer_id"]) if row is not None and row["customer_id"] else None
        return await self.rail.create_topup_session(
            owner_id, cents, self.config.currency, customer_id=customer
        )

    async def setup_payment_method(self, owner_id: str) -> dict[str, str]:
        customer_id = await self._ensure_customer(owner_id)
        session = await self.rail.create_setup_session(owner_id, customer_id)
        return {"session_id": session.session_id, "url": session.url, "customer_id": customer_id}

    # ------------------------------------------------------------------ webhooks

    async def handle_webhook(self, payload: bytes, sig_header: str | None) -> dict[str, Any]:
        """Verify (raises WebhookRejected, a 400), record the event id, act once."""
        event = self.rail.parse_webhook(payload, sig_header)
        cfg = self.config
        now = now_ms()

        async def op(tx: Tx) -> str:
            etype = getattr(event, "event_type", None) or getattr(event, "type", "")
            if isinstance(event, SetupCompletedEvent):
                etype = "checkout.session.completed"
            fresh = await tx.execute(
                "INSERT INTO stripe_events (event_id, type, outcome, received_at)"
                " VALUES ($1, $2, 'received', $3) ON CONFLICT (event_id) DO NOTHING",
                event.event_id,
                etype,
                now,
            )
            if not fresh:
                return "duplicate"
            if isinstance(event, CreditEvent):
                if event.currency != cfg.currency:
                    # Money in a currency we do not book: never guess a rate.
                    outcome = "ignored_currency"
                else:
                    credited = await credit_payment_intent(
                        tx,
                        event.owner_id,
                        event.payment_intent_id,
                        event.amount_cents * cfg.units_per_cent,
                        cfg.asset,
                        {"event_id": event.event_id, "event_type": event.event_type},
                        now,
                        settle_seconds=cfg.card_settle_seconds,
                    )
                    outcome = "credited" if credited else "already_credited"
            elif isinstance(event, ReversalEvent):
                if event.currency != cfg.currency:
                    outcome = "ignored_currency"
                else:
                    upc = cfg.units_per_cent
                    parts = [
                        card_funds.Part(
                            p.part_id,
                            p.kind,
                            p.amount_cents * upc,
                            p.taken_cents * upc,
                            p.status,
                            p.final,
                        )
                        for p in event.parts
                    ]
                    outcome = await card_funds.reverse_card_payment(
                        tx,
                        event.payment_intent_id,
                        now,
                        parts=parts,
                        refunded_total=event.amount_cents * upc if event.cumulative else None,
                    )
            elif isinstance(event, SetupCompletedEvent):
                await tx.execute(
                    "INSERT INTO stripe_customers (owner_id, customer_id, card_saved, created_at,"
                    " updated_at) VALUES ($1, $2, 1, $3, $3) ON CONFLICT (owner_id) DO UPDATE SET"
                    " customer_id = excluded.customer_id, card_saved = 1,"
                    " updated_at = excluded.updated_at",
                    event.owner_id,
                    event.customer_id,
                    now,
                )
                outcome = "card_saved"
            else:
                outcome = "ignored"
            await tx.execute(
                "UPDATE stripe_events SET outcome = $2 WHERE event_id = $1", event.event_id, outcome
            )
            return outcome

        outcome = await self.writer.submit(op)
        return {"event_id": event.event_id, "outcome": outcome}

    async def close(self) -> None:
        await self.rail.aclose()


async def credit_payment_intent(
    tx: Tx,
    owner_id: str,
    payment_intent_id: str,
    units: int,
    asset: str,
    detail: dict[str, Any],
    now: int,
    *,
    settle_seconds: int,
) -> bool:
    """Credit one Stripe payment, once ever: keyed by its PaymentIntent id.

    Returns False when the PaymentIntent was already credited (by the other
    webhook of the same payment, a redelivery, or the auto top-up worker).
    In the same transaction the payment is recorded as card money settling for
    ``settle_seconds`` and the owner's debt, if any, is paid from it first.
    """
    payment_id = new_id("pay")
    inserted = await tx.execute(
        "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status, detail,"
        " created_at) VALUES ($1, $2, $3, $4, $5, $6, 'credited', $7, $8)"
        " ON CONFLICT (rail, external_ref) DO NOTHING",
        payment_id,
        STRIPE_RAIL,
        payment_intent_id,
        owner_id,
        asset,
        units,
        json.dumps(detail),
        now,
    )
    if not inserted:
        return False
    await tx.transfer(
        Transfer(
            new_id("tr"),
            j.world(asset),
            j.wallet(owner_id, asset),
            units,
            "stripe_topup",
            f"stripe:{payment_intent_id}",
            payment_id=payment_id,
        ),
        now=now,
    )
    await card_funds.card_credited(
        tx, payment_intent_id, payment_id, owner_id, asset, units, settle_seconds * 1000, now
    )
    # An auto top-up that was waiting for this payment is over (billing.auto_topups:
    # the episode ends in the transaction of the credit).
    await tx.execute(
        "UPDATE auto_topups SET state = 'idle', updated_at = $3"
        " WHERE owner_id = $1 AND payment_intent_id = $2 AND state = 'processing'",
        owner_id,
        payment_intent_id,
        now,
    )
    return True
