"""Auto top-up: an off-session card charge when a balance falls below its threshold.

Never makes the hot path wait on Stripe. The metering finish hook (inside the
charge's own transaction) only flips the owner's row from ``idle`` to
``triggered`` with one conditional UPDATE; a background worker claims
triggered rows (another conditional UPDATE, so one worker in one process wins)
and makes the off-session charge with an idempotency key per episode. A decline
starts a cooldown; an unknown outcome is retried later with the same key, which
Stripe answers with the first result. A charge Stripe is still processing is
credited by its ``payment_intent.succeeded`` webhook
(``billing.topups.credit_payment_intent``, which also ends the episode).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from billing.errors import BillingError, UpstreamRailError
from billing.rails.stripe_rail import ChargeDeclined
from billing.topups import Topups, cents_of, credit_payment_intent
from ledger import journal as j
from ledger import ops
from ledger.db import Row, Tx
from ledger.journal import now_ms

log = logging.getLogger("tollway.auto_topups")

# Auto top-up states (see 0003_wallets.sql).
IDLE = "idle"
TRIGGERED = "triggered"
CHARGING = "charging"
PROCESSING = "processing"


class AutoTopups:
    """Auto top-up for the wallets of one ``Topups``. One per process; start ``run`` as a task."""

    def __init__(self, topups: Topups) -> None:
        self.topups = topups
        self.store = topups.store
        self.writer = topups.writer
        self.rail = topups.rail
        self.config = topups.config
        # Owners with auto top-up enabled. The finish hook checks this first, so a
        # call of anyone else costs one set lookup and no SQL.
        self.auto_owners: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self._last_refresh = 0.0

    async def configure_auto_topup(
        self, owner_id: str, *, threshold: int, amount: int, enabled: bool
    ) -> dict[str, Any]:
        cents_of(amount, self.config.units_per_cent)
        if amount <= 0:
            raise BillingError(
                "amount must be greater than zero", code="invalid_amount", status=422
            )
        if enabled:
            row = await self.topups.customer_row(owner_id)
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
        customer = await self.topups.customer_row(owner_id)
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
