"""Stripe money for wallets: top-ups, webhooks, auto top-up, and Connect payouts.

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
- A Connect payout debits the wallet first (guarded: never below zero), then
  asks Stripe for the transfer; a refused transfer is reversed by a new journal
  entry; an unknown outcome is looked up by transfer group before deciding.
  From a provider's earnings it pays settlements (see ``billing.settlements``):
  its amount is their net, they are claimed (``paying``) in the debit's
  transaction, completed with the Stripe transfer id when the transfer is
  made, and unpaid again in the transaction that reverses the debit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from billing import settlements as stl
from billing.errors import BillingError, PayoutFailed, UpstreamRailError
from billing.rails.stripe_rail import (
    ChargeDeclined,
    CheckoutSession,
    CreditEvent,
    SetupCompletedEvent,
    StripeRail,
)
from billing.wallets import (
    DEBITED,
    PAID,
    REVERSED,
    UNKNOWN,
    InsufficientBalance,
    InsufficientEarnings,
    get_withdrawal,
    settlement_plan,
)
from ledger import journal as j
from ledger import ops
from ledger.db import Row, Store, Tx
from ledger.journal import Account, Transfer, new_id, now_ms
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
    connect_refresh_url: str
    connect_return_url: str
    # How often the worker looks for triggered rows (it is also woken in-process).
    poll_seconds: float = 0.5
    # How often the in-memory set of owners with auto top-up is reloaded, so a
    # change made through another process reaches this one's finish hook.
    refresh_seconds: float = 5.0
    # A claim older than this is taken to be from a dead worker and retried (same key).
    stale_claim_seconds: float = 300.0
    # After an unknown charge outcome, retry (same idempotency key) after this long.
    unknown_retry_seconds: float = 30.0
    # A Connect transfer with an unknown outcome that Stripe does not list after
    # this long never happened (any request in flight has long finished): reverse it.
    connect_unknown_grace_seconds: float = 600.0
    # How often unknown Connect transfers are looked up at Stripe (one list call each).
    connect_reconcile_seconds: float = 30.0
    # The asset's decimals (settlement.completed events render amounts).
    decimals: int = 6


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
        self._last_connect_pass = 0.0
        self._inflight: set[asyncio.Task[Any]] = set()

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
                owner_id, customer_id, now,
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
                event.event_id, etype, now,
            )
            if not fresh:
                return "duplicate"
            if isinstance(event, CreditEvent):
                if event.currency != cfg.currency:
                    # Money in a currency we do not book: never guess a rate.
                    outcome = "ignored_currency"
                else:
                    credited = await credit_payment_intent(
                        tx, event.owner_id, event.payment_intent_id,
                        event.amount_cents * cfg.units_per_cent, cfg.asset,
                        {"event_id": event.event_id, "event_type": event.event_type}, now,
                    )
                    outcome = "credited" if credited else "already_credited"
            elif isinstance(event, SetupCompletedEvent):
                await tx.execute(
                    "INSERT INTO stripe_customers (owner_id, customer_id, card_saved, created_at,"
                    " updated_at) VALUES ($1, $2, 1, $3, $3) ON CONFLICT (owner_id) DO UPDATE SET"
                    " customer_id = excluded.customer_id, card_saved = 1,"
                    " updated_at = excluded.updated_at",
                    event.owner_id, event.customer_id, now,
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
            raise BillingError("amount must be greater than zero", code="invalid_amount", status=422)
        if enabled:
            row = await self._customer_row(owner_id)
            if row is None or not row["customer_id"] or not row["card_saved"]:
                raise BillingError(
                    "save a card first (POST /api/v1/wallet/setup-payment-method)",
                    code="no_payment_method", status=409,
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
                owner_id, asset, threshold, amount, 1 if enabled else 0, now,
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
            owner, asset, now, j.wallet(owner, asset).id,
        )
        if n:
            # Set before commit: the worker may look too early and find nothing, in
            # which case its next poll picks the row up. Never a wait on this path.
            self._wake.set()

    # ------------------------------------------------------------------ the worker

    async def run(self) -> None:
        """The background worker: auto top-up charges and Connect reconciliation."""
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
            now, stale,
        )
        done = 0
        for r in rows:
            if await self.charge_owner(str(r["owner_id"])):
                done += 1
        if time.monotonic() - self._last_connect_pass >= self.config.connect_reconcile_seconds:
            self._last_connect_pass = time.monotonic()
            await self.reconcile_connect()
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
                owner_id, now, stale,
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
                str(customer["customer_id"]), None, cents_of(units, cfg.units_per_cent),
                cfg.currency, f"tollway-autotopup:{owner_id}:{episode}", owner_id=owner_id,
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
                owner_id, IDLE, cooldown_until=until, last_error=f"{exc.code}: {exc.message}",
                payment_intent_id=getattr(exc, "payment_intent_id", None),
            )
            return True
        if charge.status == "succeeded":
            done_at = now_ms()

            async def credit(tx: Tx) -> None:
                await credit_payment_intent(
                    tx, owner_id, charge.payment_intent_id, units, asset,
                    {"source": "auto_topup", "episode": episode}, done_at,
                )
                await tx.execute(
                    "UPDATE auto_topups SET state = 'idle', payment_intent_id = $2,"
                    " last_error = NULL, updated_at = $3 WHERE owner_id = $1",
                    owner_id, charge.payment_intent_id, done_at,
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
                owner_id, IDLE, cooldown_until=until, payment_intent_id=charge.payment_intent_id,
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

    # ------------------------------------------------------------------ Connect

    async def connect_onboarding(self, owner_id: str) -> dict[str, str]:
        row = await self._customer_row(owner_id)
        account_id = str(row["connect_account_id"]) if row is not None and row["connect_account_id"] else None
        if account_id is None:
            created = await self.rail.create_connect_account(
                owner_id, idempotency_key=f"tollway-connect:{owner_id}"
            )
            now = now_ms()

            async def op(tx: Tx) -> str:
                await tx.execute(
                    "INSERT INTO stripe_customers (owner_id, connect_account_id, created_at,"
                    " updated_at) VALUES ($1, $2, $3, $3) ON CONFLICT (owner_id) DO UPDATE SET"
                    " connect_account_id = COALESCE(stripe_customers.connect_account_id,"
                    " excluded.connect_account_id), updated_at = excluded.updated_at",
                    owner_id, created, now,
                )
                return str(
                    await tx.fetchval(
                        "SELECT connect_account_id FROM stripe_customers WHERE owner_id = $1",
                        owner_id,
                    )
                )

            account_id = await self.writer.submit(op)
        url = await self.rail.onboarding_link(
            account_id, self.config.connect_refresh_url, self.config.connect_return_url
        )
        return {"account_id": account_id, "url": url}

    async def connect_account(self, owner_id: str) -> str | None:
        row = await self._customer_row(owner_id)
        return str(row["connect_account_id"]) if row is not None and row["connect_account_id"] else None

    async def connect_status(self, owner_id: str) -> dict[str, Any]:
        account_id = await self.connect_account(owner_id)
        if account_id is None:
            return {"connected": False, "account_id": None, "charges_enabled": False,
                    "payouts_enabled": False, "details_submitted": False}
        st = await self.rail.connect_status(account_id)
        return {"connected": True, "account_id": st.account_id,
                "charges_enabled": st.charges_enabled, "payouts_enabled": st.payouts_enabled,
                "details_submitted": st.details_submitted}

    async def withdraw_to_connect(
        self, owner_id: str, source: Account, units: int | None,
        *, plan: stl.PayoutPlan | None = None,
    ) -> Row:
        """Debit first, transfer, and reverse the debit if Stripe refuses the transfer.

        From earnings, ``plan`` names the settlements paid and ``units`` is their
        net (planned here from ``units`` when not given).
        """
        cfg = self.config
        account_id = await self.connect_account(owner_id)
        if account_id is None:
            raise BillingError("no Connect account: POST /api/v1/stripe/connect first",
                               code="connect_not_onboarded", status=409)
        plan, units = await settlement_plan(self.store, owner_id, source, source.asset, units, plan)
        cents = cents_of(units, cfg.units_per_cent)
        wid, now = new_id("wd"), now_ms()

        async def debit(tx: Tx) -> bool:
            if plan is not None:
                await stl.claim_payout(tx, owner_id, source.asset, wid, plan, now)
            ok = await tx.transfer(
                Transfer(new_id("tr"), source, j.world(source.asset), units, "connect_payout",
                         f"connect_payout:{wid}"),
                guard=True, now=now,
            )
            if not ok and plan is not None:
                # Raised so the claim rolls back with the refused debit.
                raise InsufficientEarnings("the provider's earnings do not cover these settlements")
            if ok:
                await tx.execute(
                    "INSERT INTO withdrawals (id, owner_id, method, asset, amount, source_account,"
                    " destination, status, created_at, updated_at)"
                    " VALUES ($1, $2, 'stripe_connect', $3, $4, $5, $6, $7, $8, $8)",
                    wid, owner_id, source.asset, units, source.id, account_id, DEBITED, now,
                )
            return ok

        if not await self.writer.submit(debit):
            raise InsufficientBalance("the balance does not cover this withdrawal")
        task = asyncio.get_running_loop().create_task(self._transfer(wid, account_id, cents))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _transfer(self, wid: str, account_id: str, cents: int) -> Row:
        try:
            transfer_id = await self.rail.transfer_to_connect(
                account_id, cents, self.config.currency, f"tollway-withdrawal:{wid}",
                transfer_group=wid, metadata={"withdrawal_id": wid},
            )
        except PayoutFailed as exc:
            await self._reverse(wid, exc.message)
        except UpstreamRailError as exc:
            await self._connect_unknown(wid, exc.message)
        except BillingError as exc:
            # Refused before anything moved (our credentials, a bad request).
            await self._reverse(wid, f"{exc.code}: {exc.message}")
        else:
            await self._connect_paid(wid, transfer_id)
        w = await get_withdrawal(self.store, wid)
        assert w is not None
        return w

    async def _connect_paid(self, wid: str, transfer_id: str) -> None:
        now = now_ms()
        decimals = self.config.decimals

        async def op(tx: Tx) -> None:
            n = await tx.execute(
                "UPDATE withdrawals SET status = $2, transfer_id = $3, error = NULL, updated_at = $4"
                " WHERE id = $1 AND status IN ('debited', 'unknown')",
                wid, PAID, transfer_id, now,
            )
            if n:
                # The settlements it pays are paid, by this transfer.
                await stl.complete_payout(tx, wid, transfer_id, now, decimals)

        await self.writer.submit(op)

    async def _reverse(self, wid: str, error: str) -> None:
        now = now_ms()

        async def op(tx: Tx) -> None:
            # The status flip is the guard: a debit is reversed at most once.
            n = await tx.execute(
                "UPDATE withdrawals SET status = $2, error = $3, updated_at = $4"
                " WHERE id = $1 AND status IN ('debited', 'unknown')",
                wid, REVERSED, error[:500], now,
            )
            if not n:
                return
            w = await tx.fetchrow(
                "SELECT asset, amount, source_account FROM withdrawals WHERE id = $1", wid
            )
            assert w is not None
            kind, owner, _ = str(w["source_account"]).split(":", 2)
            await tx.transfer(
                Transfer(new_id("tr"), j.world(w["asset"]),
                         Account(w["source_account"], kind, owner, w["asset"]), int(w["amount"]),
                         "connect_payout_reversal", f"connect_reversal:{wid}"),
                now=now,
            )
            # The settlements it was to pay are unpaid again, with their money back.
            await stl.release_payout(tx, wid)

        await self.writer.submit(op)

    async def _connect_unknown(self, wid: str, error: str) -> None:
        # Stripe may have made the transfer: look before deciding anything.
        try:
            found = await self.rail.find_transfers(wid)
        except BillingError:
            found = []
        if found:
            await self._connect_paid(wid, found[0])
            return
        now = now_ms()
        await self.writer.submit(
            lambda tx: tx.execute(
                "UPDATE withdrawals SET status = $2, error = $3, updated_at = $4"
                " WHERE id = $1 AND status = 'debited'",
                wid, UNKNOWN, error[:500], now,
            )
        )

    async def reconcile_connect(self) -> None:
        """Settle Connect payouts whose outcome was unknown (see ``_connect_unknown``)."""
        rows = await self.store.fetch(
            "SELECT id, updated_at FROM withdrawals WHERE method = 'stripe_connect'"
            " AND status = 'unknown' LIMIT 50"
        )
        grace_ms = int(self.config.connect_unknown_grace_seconds * 1000)
        for r in rows:
            try:
                found = await self.rail.find_transfers(str(r["id"]))
            except BillingError:
                return  # Stripe still unreachable; next pass
            if found:
                await self._connect_paid(str(r["id"]), found[0])
            elif now_ms() - int(r["updated_at"]) >= grace_ms:
                await self._reverse(str(r["id"]), "transfer never appeared at Stripe")

    async def close(self) -> None:
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=30)
        await self.rail.aclose()


async def credit_payment_intent(
    tx: Tx, owner_id: str, payment_intent_id: str, units: int, asset: str,
    detail: dict[str, Any], now: int,
) -> bool:
    """Credit one Stripe payment, once ever: keyed by its PaymentIntent id.

    Returns False when the PaymentIntent was already credited (by the other
    webhook of the same payment, a redelivery, or the auto top-up worker).
    """
    payment_id = new_id("pay")
    inserted = await tx.execute(
        "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status, detail,"
        " created_at) VALUES ($1, $2, $3, $4, $5, $6, 'credited', $7, $8)"
        " ON CONFLICT (rail, external_ref) DO NOTHING",
        payment_id, STRIPE_RAIL, payment_intent_id, owner_id, asset, units, json.dumps(detail), now,
    )
    if not inserted:
        return False
    await tx.transfer(
        Transfer(new_id("tr"), j.world(asset), j.wallet(owner_id, asset), units, "stripe_topup",
                 f"stripe:{payment_intent_id}", payment_id=payment_id),
        now=now,
    )
    # An auto top-up that was waiting for this payment is over.
    await tx.execute(
        "UPDATE auto_topups SET state = 'idle', updated_at = $3"
        " WHERE owner_id = $1 AND payment_intent_id = $2 AND state = 'processing'",
        owner_id, payment_intent_id, now,
    )
    return True
