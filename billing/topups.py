"""Stripe money for wallets: top-ups, webhooks and auto top-up.

Connect onboarding and payouts live in ``billing.connect_payouts``.

- A top-up is a Checkout Session; the wallet is credited only by a verified
  webhook (or a succeeded off-session PaymentIntent), keyed by the PaymentIntent
  id in ``payments``: ``checkout.session.completed`` and
  ``payment_intent.succeeded`` of one payment, or one event delivered twice,
  credit once. Event ids are recorded too, so a redelivery does nothing at all.
- Auto top-up never makes the hot path wait on Stripe. The metering finish hook
  (inside the charge's own transaction) only flips the owner's row from
  ``idle`` to ``triggered`` with one conditional UPDATE; a background worker
  claims triggered rows (another conditional UPDATE, so one worker in one
  process wins) and makes the off-session charge with an idempotency key per
  episode. A decline starts a cooldown; an unknown outcome is retried later with
  the same key, which Stripe answers with the first result.
- Card money settles before it can leave, and ``charge.refunded`` and
  ``charge.dispute.created`` take it back (a debt for what was spent), once per
  event and never more than the payment: see ``billing.card_funds``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from billing import card_funds
from billing.errors import BillingError, UpstreamRailError
from billing.rails.stripe_rail import (
    ChargeDeclined,
    CheckoutSession,
    CreditEvent,
    ReversalEvent,
    SetupCompletedEvent,
    StripeRail,
)
from ledger import journal as j
from ledger import ops
from ledger.db import Row, Store, Tx
from ledger.journal import Transfer, new_id, now_ms
from ledger.writer import GroupCommitWriter

log = logging.getLogger("tollway.topups")

STRIPE_RAIL = "stripe"

# Auto top-up states (see 0003_wallets.sql).
IDLE = "idle"
TRIGGERED = "triggered"
CHARGING = "charging"
PROCESSING = "processing"


@dataclass(frozen=True, slots=True)
class TopupConfig:
    asset: str
    currency: str
    units_per_cent: int
    cooldown_seconds: int
    # How long card money must wait before it can leave a wallet (billing.card_funds).
    card_settle_seconds: int = 7 * 86_400
    # How often the worker looks for triggered rows (it is also woken in-process).
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
    """Everything Stripe does for wallets. One per process; start ``run`` as a task."""

    def __init__(
        self, store: Store, writer: GroupCommitWriter, rail: StripeRail, config: TopupConfig
    ) -> None:
        self.store = store
        self.writer = writer
        self.rail = rail
        self.config = config
        # Owners with auto top-up enabled. The finish hook checks this first, so a
        # call of anyone else costs one set lookup and no SQL.
        self.auto_owners: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self._last_refresh = 0.0

    # ------------------------------------------------------------------ customers

    async def _customer_row(self, owner_id: str) -> Row | None:
        return await self.store.fetchrow(
            "SELECT * FROM stripe_customers WHERE owner_id = $1", owner_id
        )

    async def _ensure_customer(self, owner_id: str) -> str:
        row = await self._customer_row(owner_id)
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
        row = await self._customer_row(owner_id)
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
                    outcome = await card_funds.reverse_card_payment(
                        tx,
                        event.payment_intent_id,
                        event.kind,
                        event.amount_cents * cfg.units_per_cent,
                        now,
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

    # ------------------------------------------------------------------ auto top-up config

    async def configure_auto_topup(
        self, owner_id: str, *, threshold: int, amount: int, enabled: bool
    ) -> dict[str, Any]:
        cents_of(amount, self.config.units_per_cent)
        if amount <= 0:
            raise BillingError(
                "amount must be greater than zero", code="invalid_amount", status=422
            )
        if enabled:
            row = await self._customer_row(owner_id)
            if row is None or not row["customer_id"] or not row["card_saved"]:
                raise BillingError(
                    "save a card first (POST /api/v1/wallet/setup-payment-method)",
                    code="no_payment_method",
                    status=409,
                )
        now = now_ms()
        asset = self.config.asset

        async def op(tx: Tx) -> None:
            # The state machine fields are left alone: reconfiguring never starts
            # or cancels a charge in flight.
            await tx.execute(
                "INSERT INTO auto_topups (owner_id, asset, threshold, amount, enabled, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner_id) DO UPDATE SET"
                " asset = excluded.asset, threshold = excluded.threshold,"
                " amount = excluded.amount, enabled = excluded.enabled,"
                " updated_at = excluded.updated_at",
                owner_id,
                asset,
                threshold,
                amount,
                1 if enabled else 0,
                now,
            )

        await self.writer.submit(op)
        owners = set(self.auto_owners)
        if enabled:
            owners.add(owner_id)
        else:
            owners.discard(owner_id)
        self.auto_owners = frozenset(owners)
        state = await self.auto_topup_state(owner_id)
        assert state is not None
        return state

    async def auto_topup_state(self, owner_id: str) -> dict[str, Any] | None:
        r = await self.store.fetchrow("SELECT * FROM auto_topups WHERE owner_id = $1", owner_id)
        if r is None:
            return None
        return {
            "enabled": bool(r["enabled"]),
            "asset": r["asset"],
            "threshold": int(r["threshold"]),
            "amount": int(r["amount"]),
            "state": r["state"],
            "cooldown_until": int(r["cooldown_until"]) or None,
            "last_payment_intent": r["payment_intent_id"],
            "last_error": r["last_error"],
        }

    async def refresh_auto_owners(self) -> None:
        rows = await self.store.fetch("SELECT owner_id FROM auto_topups WHERE enabled = 1")
        self.auto_owners = frozenset(str(r["owner_id"]) for r in rows)
        self._last_refresh = time.monotonic()

    # ------------------------------------------------------------------ the finish hook

    async def finish_hook(self, tx: Tx, outcome: ops.Outcome, charged: int) -> None:
        """Runs inside each finished call's transaction: must stay near-free.

        For an owner without auto top-up it is a set lookup. Otherwise one
        conditional UPDATE moves ``idle`` to ``triggered`` when the balance after
        this charge is below the threshold and no cooldown runs; concurrent
        charges (any process) serialize on the row, so only one of them wins and
        one episode starts.
        """
        if charged <= 0:
            return
        owner = outcome.usage.buyer_id
        if owner not in self.auto_owners:
            return
        asset = outcome.usage.asset
        now = now_ms()
        n = await tx.execute(
            "UPDATE auto_topups SET state = 'triggered', episode = episode + 1, retry_at = $3,"
            " last_error = NULL, updated_at = $3"
            " WHERE owner_id = $1 AND asset = $2 AND enabled = 1 AND state = 'idle'"
            " AND cooldown_until <= $3"
            " AND threshold > COALESCE((SELECT balance FROM accounts WHERE id = $4), 0)",
            owner,
            asset,
            now,
            j.wallet(owner, asset).id,
        )
        if n:
            # Set before commit: the worker may look too early and find nothing, in
            # which case its next poll picks the row up. Never a wait on this path.
            self._wake.set()

    # ------------------------------------------------------------------ the worker

    async def run(self) -> None:
        """The background worker: auto top-up charges."""
        while True:
            try:
                if time.monotonic() - self._last_refresh >= self.config.refresh_seconds:
                    await self.refresh_auto_owners()
                await self.work_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("auto top-up worker pass failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.poll_seconds)
            except TimeoutError:
                pass

    async def work_once(self) -> int:
        """Run every due auto top-up; returns how many this pass handled."""
        now = now_ms()
        stale = now - int(self.config.stale_claim_seconds * 1000)
        rows = await self.store.fetch(
            "SELECT owner_id FROM auto_topups WHERE enabled = 1 AND"
            " ((state = 'triggered' AND retry_at <= $1) OR (state = 'charging' AND claimed_at < $2))"
            " LIMIT 100",
            now,
            stale,
        )
        done = 0
        for r in rows:
            if await self.charge_owner(str(r["owner_id"])):
                done += 1
        return done

    async def charge_owner(self, owner_id: str) -> bool:
        """Claim this owner's triggered top-up and make its off-session charge."""
        now = now_ms()
        stale = now - int(self.config.stale_claim_seconds * 1000)

        async def claim(tx: Tx) -> Row | None:
            return await tx.fetchrow(
                "UPDATE auto_topups SET state = 'charging', claimed_at = $2, updated_at = $2"
                " WHERE owner_id = $1 AND enabled = 1 AND"
                " ((state = 'triggered' AND retry_at <= $2) OR (state = 'charging' AND claimed_at < $3))"
                " RETURNING episode, amount, asset",
                owner_id,
                now,
                stale,
            )

        claimed = await self.writer.submit(claim)
        if claimed is None:
            return False  # another worker (or process) took it
        episode, units, asset = int(claimed["episode"]), int(claimed["amount"]), claimed["asset"]
        cfg = self.config
        customer = await self._customer_row(owner_id)
        try:
            if customer is None or not customer["customer_id"]:
                raise ChargeDeclined("no Stripe customer for this owner", stripe_code="no_customer")
            charge = await self.rail.charge_off_session(
                str(customer["customer_id"]),
                None,
                cents_of(units, cfg.units_per_cent),
                cfg.currency,
                f"tollway-autotopup:{owner_id}:{episode}",
                owner_id=owner_id,
            )
        except UpstreamRailError as exc:
            # Outcome unknown: retry this same episode (same key) later.
            retry = now_ms() + int(cfg.unknown_retry_seconds * 1000)
            await self._set_state(owner_id, TRIGGERED, retry_at=retry, last_error=exc.message)
            return True
        except BillingError as exc:
            # Declined (or refused outright): cool down, then a later charge may retry.
            until = now_ms() + cfg.cooldown_seconds * 1000
            await self._set_state(
                owner_id,
                IDLE,
                cooldown_until=until,
                last_error=f"{exc.code}: {exc.message}",
                payment_intent_id=getattr(exc, "payment_intent_id", None),
            )
            return True
        if charge.status == "succeeded":
            done_at = now_ms()

            async def credit(tx: Tx) -> None:
                await credit_payment_intent(
                    tx,
                    owner_id,
                    charge.payment_intent_id,
                    units,
                    asset,
                    {"source": "auto_topup", "episode": episode},
                    done_at,
                    settle_seconds=cfg.card_settle_seconds,
                )
                await tx.execute(
                    "UPDATE auto_topups SET state = 'idle', payment_intent_id = $2,"
                    " last_error = NULL, updated_at = $3 WHERE owner_id = $1",
                    owner_id,
                    charge.payment_intent_id,
                    done_at,
                )

            await self.writer.submit(credit)
        elif charge.status == "processing":
            # Stripe is still working: the payment_intent.succeeded webhook credits it
            # and returns the row to idle (see credit_payment_intent).
            await self._set_state(owner_id, PROCESSING, payment_intent_id=charge.payment_intent_id)
        else:
            # requires_action etc.: an off-session charge cannot finish without the customer.
            until = now_ms() + cfg.cooldown_seconds * 1000
            await self._set_state(
                owner_id,
                IDLE,
                cooldown_until=until,
                payment_intent_id=charge.payment_intent_id,
                last_error=f"payment intent {charge.status}",
            )
        return True

    async def _set_state(self, owner_id: str, state: str, **cols: Any) -> None:
        now = now_ms()
        sets, args = ["state = $2", "updated_at = $3"], [owner_id, state, now]
        for name, value in cols.items():
            args.append(value)
            sets.append(f"{name} = ${len(args)}")
        sql = f"UPDATE auto_topups SET {', '.join(sets)} WHERE owner_id = $1"
        await self.writer.submit(lambda tx: tx.execute(sql, *args))

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
    # An auto top-up that was waiting for this payment is over.
    await tx.execute(
        "UPDATE auto_topups SET state = 'idle', updated_at = $3"
        " WHERE owner_id = $1 AND payment_intent_id = $2 AND state = 'processing'",
        owner_id,
        payment_intent_id,
        now,
    )
    return True
