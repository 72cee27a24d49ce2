"""Stripe Connect: provider onboarding and payouts to connected accounts.

- A Connect payout debits the source first (guarded: never below zero), then
  asks Stripe for the transfer; a refused transfer is reversed by a new journal
  entry; an unknown outcome is looked up by transfer group before deciding.
- From a wallet, the debit's transaction also refuses a frozen wallet and card
  money that has not settled (``billing.card_funds.guard_withdrawal``); a
  reversed debit that credits the wallet back pays the owner's debt first.
- From a provider's earnings it pays settlements (see ``billing.settlements``):
  its amount is their net, they are claimed (``paying``) in the debit's
  transaction, completed with the Stripe transfer id when the transfer is
  made, and unpaid again in the transaction that reverses the debit.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from billing import card_funds
from billing import settlements as stl
from billing.errors import BillingError, PayoutFailed, UpstreamRailError
from billing.rails.stripe_rail import StripeRail
from billing.topups import cents_of
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
from ledger.db import Row, Store, Tx
from ledger.journal import Account, Transfer, new_id, now_ms
from ledger.writer import GroupCommitWriter

log = logging.getLogger("tollway.connect")


@dataclass(frozen=True, slots=True)
class ConnectConfig:
    currency: str
    units_per_cent: int
    refresh_url: str
    return_url: str
    # The asset's decimals (settlement.completed events and error messages render amounts).
    decimals: int = 6
    # A transfer with an unknown outcome that Stripe does not list after this
    # long never happened (any request in flight has long finished): reverse it.
    unknown_grace_seconds: float = 600.0
    # How often unknown transfers are looked up at Stripe (one list call each).
    reconcile_seconds: float = 30.0


class ConnectPayouts:
    """Connect onboarding and payouts. One per process; start ``run`` as a task."""

    def __init__(
        self, store: Store, writer: GroupCommitWriter, rail: StripeRail, config: ConnectConfig
    ) -> None:
        self.store = store
        self.writer = writer
        self.rail = rail
        self.config = config
        # Transfers run as their own tasks so that a caller who goes away never
        # abandons a payout half-way.
        self._inflight: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ onboarding

    async def account(self, owner_id: str) -> str | None:
        v = await self.store.fetchval(
            "SELECT connect_account_id FROM stripe_customers WHERE owner_id = $1", owner_id
        )
        return str(v) if v else None

    async def onboarding(self, owner_id: str) -> dict[str, str]:
        account_id = await self.account(owner_id)
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
                    owner_id,
                    created,
                    now,
                )
                return str(
                    await tx.fetchval(
                        "SELECT connect_account_id FROM stripe_customers WHERE owner_id = $1",
                        owner_id,
                    )
                )

            account_id = await self.writer.submit(op)
        url = await self.rail.onboarding_link(
            account_id, self.config.refresh_url, self.config.return_url
        )
        return {"account_id": account_id, "url": url}

    async def status(self, owner_id: str) -> dict[str, Any]:
        account_id = await self.account(owner_id)
        if account_id is None:
            return {
                "connected": False,
                "account_id": None,
                "charges_enabled": False,
                "payouts_enabled": False,
                "details_submitted": False,
            }
        st = await self.rail.connect_status(account_id)
        return {
            "connected": True,
            "account_id": st.account_id,
            "charges_enabled": st.charges_enabled,
            "payouts_enabled": st.payouts_enabled,
            "details_submitted": st.details_submitted,
        }

    # ------------------------------------------------------------------ payouts

    async def withdraw(
        self,
        owner_id: str,
        source: Account,
        units: int | None,
        *,
        plan: stl.PayoutPlan | None = None,
    ) -> Row:
        """Debit first, transfer, and reverse the debit if Stripe refuses the transfer.

        From earnings, ``plan`` names the settlements paid and ``units`` is their
        net (planned here from ``units`` when not given).
        """
        cfg = self.config
        account_id = await self.account(owner_id)
        if account_id is None:
            raise BillingError(
                "no Connect account: POST /api/v1/stripe/connect first",
                code="connect_not_onboarded",
                status=409,
            )
        plan, units = await settlement_plan(self.store, owner_id, source, source.asset, units, plan)
        cents = cents_of(units, cfg.units_per_cent)
        wid, now = new_id("wd"), now_ms()

        async def debit(tx: Tx) -> bool:
            world = j.world(source.asset)
            if plan is not None:
                await stl.claim_payout(tx, owner_id, source.asset, wid, plan, now)
            await card_funds.guard_withdrawal(tx, source, world, units, now, cfg.decimals)
            ok = await tx.transfer(
                Transfer(
                    new_id("tr"), source, world, units, "connect_payout", f"connect_payout:{wid}"
                ),
                guard=True,
                now=now,
            )
            if not ok and plan is not None:
                # Raised so the claim rolls back with the refused debit.
                raise InsufficientEarnings("the provider's earnings do not cover these settlements")
            if ok:
                await tx.execute(
                    "INSERT INTO withdrawals (id, owner_id, method, asset, amount, source_account,"
                    " destination, status, created_at, updated_at)"
                    " VALUES ($1, $2, 'stripe_connect', $3, $4, $5, $6, $7, $8, $8)",
                    wid,
                    owner_id,
                    source.asset,
                    units,
                    source.id,
                    account_id,
                    DEBITED,
                    now,
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
                account_id,
                cents,
                self.config.currency,
                f"tollway-withdrawal:{wid}",
                transfer_group=wid,
                metadata={"withdrawal_id": wid},
            )
        except PayoutFailed as exc:
            await self._reverse(wid, exc.message)
        except UpstreamRailError as exc:
            await self._unknown(wid, exc.message)
        except BillingError as exc:
            # Refused before anything moved (our credentials, a bad request).
            await self._reverse(wid, f"{exc.code}: {exc.message}")
        else:
            await self._paid(wid, transfer_id)
        w = await get_withdrawal(self.store, wid)
        assert w is not None
        return w

    async def _paid(self, wid: str, transfer_id: str) -> None:
        now = now_ms()
        decimals = self.config.decimals

        async def op(tx: Tx) -> None:
            n = await tx.execute(
                "UPDATE withdrawals SET status = $2, transfer_id = $3, error = NULL, updated_at = $4"
                " WHERE id = $1 AND status IN ('debited', 'unknown')",
                wid,
                PAID,
                transfer_id,
                now,
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
                wid,
                REVERSED,
                error[:500],
                now,
            )
            if not n:
                return
            w = await tx.fetchrow(
                "SELECT asset, amount, source_account FROM withdrawals WHERE id = $1", wid
            )
            assert w is not None
            # kind:owner:asset, where the owner may itself hold colons (tollway:0x…)
            kind, _, rest = str(w["source_account"]).partition(":")
            owner = rest.removesuffix(f":{w['asset']}")
            await tx.transfer(
                Transfer(
                    new_id("tr"),
                    j.world(w["asset"]),
                    Account(w["source_account"], kind, owner, w["asset"]),
                    int(w["amount"]),
                    "connect_payout_reversal",
                    f"connect_reversal:{wid}",
                ),
                now=now,
            )
            if kind == "wallet":
                # Money back in a wallet whose owner fell into debt meanwhile (a
                # refund or dispute while the transfer was pending) pays that first.
                await card_funds.settle_debt(
                    tx, owner, w["asset"], now, ref=f"connect_reversal:{wid}"
                )
            # The settlements it was to pay are unpaid again, with their money back.
            await stl.release_payout(tx, wid)

        await self.writer.submit(op)

    async def _unknown(self, wid: str, error: str) -> None:
        # Stripe may have made the transfer: look before deciding anything.
        try:
            found = await self.rail.find_transfers(wid)
        except BillingError:
            found = []
        if found:
            await self._paid(wid, found[0])
            return
        now = now_ms()
        await self.writer.submit(
            lambda tx: tx.execute(
                "UPDATE withdrawals SET status = $2, error = $3, updated_at = $4"
                " WHERE id = $1 AND status = 'debited'",
                wid,
                UNKNOWN,
                error[:500],
                now,
            )
        )

    async def reconcile(self) -> None:
        """Settle payouts whose outcome was unknown (see ``_unknown``)."""
        rows = await self.store.fetch(
            "SELECT id, updated_at FROM withdrawals WHERE method = 'stripe_connect'"
            " AND status = 'unknown' LIMIT 50"
        )
        grace_ms = int(self.config.unknown_grace_seconds * 1000)
        for r in rows:
            try:
                found = await self.rail.find_transfers(str(r["id"]))
            except BillingError:
                return  # Stripe still unreachable; next pass
            if found:
                await self._paid(str(r["id"]), found[0])
            elif now_ms() - int(r["updated_at"]) >= grace_ms:
                await self._reverse(str(r["id"]), "transfer never appeared at Stripe")

    async def run(self) -> None:
        """The background reconciler of unknown payouts: a pass at start, then periodically."""
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Connect reconciliation pass failed")
            await asyncio.sleep(self.config.reconcile_seconds)

    async def close(self) -> None:
        """Let transfers in flight record their outcome (the rail is closed by its owner)."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=30)
