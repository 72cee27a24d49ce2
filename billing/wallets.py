"""Wallets: balances and journal lines, on-chain deposits and on-chain withdrawals.

Money moves only on verified events, exactly once:

- A deposit credits what the chain says arrived (the amount of the pinned token
  sent to the platform's deposit address), never what the client claims, and one
  transaction hash credits once, ever: the ``payments`` row (``UNIQUE(rail,
  external_ref)``) and the credit transfer commit together.
- A withdrawal first places a guarded hold (wallet -> holding; the guard is the
  same conditional UPDATE the metering hot path uses, so concurrent withdrawals,
  in any number of processes, never overdraw), then pays on chain from the hot
  wallet, then posts the hold (holding -> world) or voids it (holding -> wallet).
  When the payout's outcome is unknown (broadcast may or may not have happened)
  the hold stays pending and the withdrawal is marked ``unknown``: refunding it
  blindly could pay twice. ``reconcile_onchain`` settles it from the chain's logs.
- A withdrawal from a provider's earnings pays settlements (see
  ``billing.settlements``): its amount is the net of the settled-but-unpaid
  settlements it pays, they are claimed (``paying``) in the hold's
  transaction, completed with the payout's tx hash in the transaction that
  posts the hold, and unpaid again in the one that voids it. Without such
  settlements nothing leaves earnings.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from billing import card_funds
from billing import settlements as stl
from billing.errors import BillingError, PaymentRejected, PayoutFailed, UpstreamRailError
from ledger import journal as j
from ledger.db import Row, Store, Tx
from ledger.journal import Account, Transfer, new_id, now_ms
from ledger.writer import GroupCommitWriter

if TYPE_CHECKING:
    from billing.rails.evm import EvmClient

log = logging.getLogger("tollway.wallets")

# The ERC-20 Transfer event topic (keccak of "Transfer(address,address,uint256)").
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


# eth_utils and web3 cost ~40 MB of memory per process: loaded on first use,
# which only happens when EVM wallets are configured.
def is_address(value: Any) -> bool:
    from eth_utils import is_address as _is_address

    return bool(_is_address(value))


def to_checksum_address(value: str) -> str:
    from eth_utils import to_checksum_address as _to_checksum

    return str(_to_checksum(value))


def deposit_claim_message(owner_id: str, tx_hash: str) -> str:
    """What the sender of a deposit signs (EIP-191 personal_sign) to claim it.

    A wallet address written on an API key proves nothing (anyone can write
    anyone's address); a signature by the transfer's sender does.
    """
    return f"Tollway deposit\nowner: {owner_id}\ntx: {tx_hash.lower()}"


def recover_claim_signer(owner_id: str, tx_hash: str, signature: str) -> str | None:
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        msg = encode_defunct(text=deposit_claim_message(owner_id, tx_hash))
        return str(Account.recover_message(msg, signature=signature))
    except Exception:  # malformed signature of any kind
        return None


def evm_rail(chain_id: int) -> str:
    """``payments.rail`` of a token transfer on this chain: the CAIP-2 id, as the invoice
    rail writes it, so one transaction pays an invoice or a deposit, never both."""
    return f"eip155:{chain_id}"


# Withdrawal holds must never be voided by the expired-hold sweeper: a payout may be
# in flight (or its outcome unknown), and a sweep refund would let the money leave
# twice. They are resolved only here, so their expiry is set out of reach.
_WITHDRAWAL_HOLD_TTL_MS = 100 * 365 * 86_400_000

# PayoutFailed codes from EvmClient.send_token that prove nothing was sent (or the
# transaction reverted on chain): the hold can be voided. Any other failure may
# have broadcast a transaction, so the outcome is unknown.
_PAYOUT_DEFINITELY_FAILED = frozenset(
    {"payout_reverted", "tx_reverted", "payout_not_configured", "invalid_amount"}
)

# Withdrawal statuses.
SENDING = "sending"
PAID = "paid"
FAILED = "failed"
UNKNOWN = "unknown"
DEBITED = "debited"  # Connect: the wallet was debited, the transfer is being made
REVERSED = "reversed"  # Connect: the transfer failed and the debit was reversed


class InsufficientBalance(BillingError):
    status = 402
    code = "insufficient_balance"


class InsufficientEarnings(BillingError):
    """Earnings do not cover the net of the settlements a payout pays (never expected:
    settlements are the only way out of earnings)."""

    status = 409
    code = "insufficient_earnings"


class WalletNotConfigured(BillingError):
    """The rail this flow needs is not configured on this deployment."""

    status = 503
    code = "not_configured"


# --------------------------------------------------------------------------- reads


def source_account(owner_id: str, source: str, asset: str) -> Account:
    """The account a withdrawal draws on: the wallet, or a provider's earnings."""
    if source == "earnings":
        return j.earnings(owner_id, asset)
    return j.wallet(owner_id, asset)


async def balances(store: Store, owner_id: str) -> list[dict[str, Any]]:
    """Per asset: the wallet (available), earnings, and what is held right now.

    ``available`` counts the rest of the owner's balance leases (``leased``): money a
    worker took out of the wallet to admit calls from memory, still the owner's.
    Calls a worker admitted but has not posted yet (its next batch, milliseconds
    away) are not subtracted."""
    rows = await store.fetch(
        "SELECT id, kind, asset, balance FROM accounts WHERE owner_id = $1 ORDER BY asset, kind",
        owner_id,
    )
    held_rows = await store.fetch(
        "SELECT h.asset,"
        " SUM(CASE WHEN h.kind = 'lease' THEN 0 ELSE h.amount END) AS total,"
        " SUM(CASE WHEN h.kind = 'lease' THEN h.amount - h.captured ELSE 0 END) AS leased"
        " FROM holds h JOIN accounts a ON a.id = h.account_id"
        " WHERE a.owner_id = $1 AND h.status = 'pending' GROUP BY h.asset",
        owner_id,
    )
    held = {r["asset"]: int(r["total"] or 0) for r in held_rows}
    leased = {r["asset"]: int(r["leased"] or 0) for r in held_rows}
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = out.setdefault(r["asset"], {"asset": r["asset"], "available": 0, "earnings": 0})
        if r["kind"] == "wallet":
            entry["available"] = int(r["balance"])
        elif r["kind"] == "earnings":
            entry["earnings"] = int(r["balance"])
    for asset in held:
        out.setdefault(asset, {"asset": asset, "available": 0, "earnings": 0})
    for asset, entry in out.items():
        entry["held"] = held.get(asset, 0)
        entry["leased"] = leased.get(asset, 0)
        entry["available"] += entry["leased"]
    return list(out.values())


_LINES_WHERE = (
    " FROM transfers t WHERE t.debit_account IN (SELECT id FROM accounts WHERE owner_id = $1)"
    " OR t.credit_account IN (SELECT id FROM accounts WHERE owner_id = $1)"
)


async def journal_lines(
    store: Store, owner_id: str, *, limit: int, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """The owner's journal lines, newest first, each seen from the owner's side."""
    rows = await store.fetch(
        "SELECT t.id, t.asset, t.debit_account, t.credit_account, t.amount, t.kind, t.usage_id,"
        " t.payment_id, t.hold_id, t.created_at"
        + _LINES_WHERE
        + " ORDER BY t.created_at DESC, t.id DESC LIMIT $2 OFFSET $3",
        owner_id,
        limit,
        offset,
    )
    total = int(await store.fetchval("SELECT COUNT(*)" + _LINES_WHERE, owner_id) or 0)
    return [_line(owner_id, r) for r in rows], total


def _line(owner_id: str, r: Row) -> dict[str, Any]:
    # An account id is "<kind>:<owner>:<asset>"; the owner's side decides the sign.
    credit_owner = _owner_of(r["credit_account"])
    mine_is_credit = credit_owner == owner_id
    account = r["credit_account"] if mine_is_credit else r["debit_account"]
    counter = r["debit_account"] if mine_is_credit else r["credit_account"]
    amount = int(r["amount"])
    return {
        "id": r["id"],
        "kind": r["kind"],
        "asset": r["asset"],
        "account": account.split(":", 1)[0],
        "direction": "credit" if mine_is_credit else "debit",
        "amount": amount if mine_is_credit else -amount,
        "counterparty": counter.split(":", 1)[0],
        "usage_id": r["usage_id"],
        "payment_id": r["payment_id"],
        "hold_id": r["hold_id"],
        "created_at": int(r["created_at"]),
    }


def _owner_of(account_id: str) -> str | None:
    parts = account_id.split(":")
    return parts[1] if len(parts) == 3 else None


# --------------------------------------------------------------------------- withdrawal rows


async def get_withdrawal(store: Store, withdrawal_id: str) -> Row | None:
    return await store.fetchrow("SELECT * FROM withdrawals WHERE id = $1", withdrawal_id)


async def list_withdrawals(store: Store, owner_id: str, limit: int = 50) -> list[Row]:
    return await store.fetch(
        "SELECT * FROM withdrawals WHERE owner_id = $1 ORDER BY created_at DESC LIMIT $2",
        owner_id,
        limit,
    )


async def _set_status(tx: Tx, wid: str, status: str, now: int, **cols: Any) -> None:
    sets = ["status = $2", "updated_at = $3"]
    args: list[Any] = [wid, status, now]
    for name, value in cols.items():
        args.append(value)
        sets.append(f"{name} = ${len(args)}")
    await tx.execute(f"UPDATE withdrawals SET {', '.join(sets)} WHERE id = $1", *args)


async def _resolve_hold(tx: Tx, hold_id: str, status: str, now: int) -> bool:
    n = await tx.execute(
        "UPDATE holds SET status = $2, resolved_at = $3 WHERE id = $1 AND status = 'pending'",
        hold_id,
        status,
        now,
    )
    return n == 1


async def post_withdrawal_hold(
    tx: Tx, w: Row, tx_hash: str | None, now: int, decimals: int = 6
) -> bool:
    """The payout happened: the held money leaves the system (holding -> world), and the
    settlements it pays are completed with its tx hash (the withdrawal id without one)."""
    if not await _resolve_hold(tx, w["hold_id"], "posted", now):
        return False
    await tx.transfer(
        Transfer(
            new_id("tr"),
            j.holding(w["asset"]),
            j.world(w["asset"]),
            int(w["amount"]),
            "withdrawal",
            f"withdrawal:{w['id']}",
            hold_id=w["hold_id"],
        ),
        now=now,
    )
    await _set_status(tx, w["id"], PAID, now, tx_hash=tx_hash, error=None)
    await stl.complete_payout(tx, w["id"], tx_hash or w["id"], now, decimals)
    return True


async def void_withdrawal_hold(tx: Tx, w: Row, error: str, now: int) -> bool:
    """The payout did not happen: the held money goes back where it came from, and the
    settlements it was to pay are unpaid again."""
    if not await _resolve_hold(tx, w["hold_id"], "voided", now):
        return False
    await stl.release_payout(tx, w["id"])
    source = _account_from_id(w["source_account"], w["asset"])
    await tx.transfer(
        Transfer(
            new_id("tr"),
            j.holding(w["asset"]),
            source,
            int(w["amount"]),
            "withdrawal_void",
            f"void:{w['hold_id']}",
            hold_id=w["hold_id"],
        ),
        now=now,
    )
    await _set_status(tx, w["id"], FAILED, now, error=error[:500])
    return True


def _account_from_id(account_id: str, asset: str) -> Account:
    """``kind:owner:asset``, where the owner may itself hold colons (``tollway:0x…``)."""
    kind, _, rest = account_id.partition(":")
    owner = rest.removesuffix(f":{asset}")
    return Account(account_id, kind, owner, asset)


# --------------------------------------------------------------------------- the EVM wallet


@dataclass(frozen=True, slots=True)
class EvmWalletConfig:
    token: str
    pay_to: str | None  # the platform's deposit address; None turns deposits off
    confirmations: int
    chain_id: int
    asset: str  # the ledger asset the token is booked as (same smallest unit)
    decimals: int = 6  # the asset's decimals (settlement.completed events render amounts)


def chain_names(chain_id: int) -> set[str]:
    """What a client may put in ``chain``: "evm", the id, or its CAIP-2 form."""
    names = {"evm"}
    if chain_id:
        names |= {str(chain_id), f"eip155:{chain_id}"}
    return names


class EvmWallets:
    """Deposits to and withdrawals from one EVM chain, in one token."""

    def __init__(
        self,
        store: Store,
        writer: GroupCommitWriter,
        evm: EvmClient,
        config: EvmWalletConfig,
    ) -> None:
        self.store = store
        self.writer = writer
        self.evm = evm
        self.config = config
        # Payouts run as their own tasks so that a caller who goes away (client
        # disconnect cancels the handler) never abandons a payout half-way.
        self._inflight: set[asyncio.Task[Any]] = set()

    @property
    def can_withdraw(self) -> bool:
        return self.evm.hot_wallet is not None

    # -- deposits ------------------------------------------------------------------

    async def deposit(
        self, owner_id: str, tx_hash: str, payer_addresses: list[str]
    ) -> dict[str, Any]:
        """Credit the verified amount of ``tx_hash`` to ``owner_id``'s wallet, once ever.

        ``payer_addresses`` are the addresses the owner proved to control (the
        route recovers the signer of a claim message): the transfer must come
        from one of them, or anyone who saw the transaction on chain could
        claim someone else's deposit.
        """
        cfg = self.config
        if cfg.pay_to is None:
            raise WalletNotConfigured("deposits are off: no deposit address is configured")
        if not payer_addresses:
            raise BillingError(
                "sign the deposit claim with the wallet you sent the transfer from",
                code="signature_required",
                status=422,
            )
        ref, rail = tx_hash.lower(), evm_rail(cfg.chain_id)
        # Cheap refusal before any chain round trip; the insert below is the real guard.
        if await self.store.fetchval(
            "SELECT 1 FROM payments WHERE rail = $1 AND external_ref = $2", rail, ref
        ):
            raise BillingError(
                "this transaction was already used", code="tx_already_used", status=409
            )
        try:
            got = await self.evm.verify_token_transfer(
                tx_hash,
                token=cfg.token,
                pay_to=cfg.pay_to,
                min_amount=1,
                not_before_unix=0,
                min_confirmations=cfg.confirmations,
                # Only what the signer sent, in a transaction of its own: tokens of
                # others moved in the same transaction are not the signer's deposit.
                sender=payer_addresses[0] if len(payer_addresses) == 1 else None,
            )
        except PaymentRejected as exc:
            if exc.code == "payer_mismatch":
                raise BillingError(
                    "the transfer was not sent by the address that signed this deposit claim",
                    code="payer_not_signer",
                    status=403,
                ) from exc
            # Not a payment for this deposit address: a client error, not "payment required".
            raise BillingError(exc.message, code=exc.code, status=422) from exc
        allowed = {to_checksum_address(a) for a in payer_addresses if is_address(a)}
        if got.payer not in allowed:
            raise BillingError(
                "the transfer was not sent by the address that signed this deposit claim",
                code="payer_not_signer",
                status=403,
            )
        payment_id = new_id("pay")
        detail = json.dumps({"payer": got.payer, "block": got.block_number, "token": cfg.token})
        now = now_ms()

        async def op(tx: Tx) -> bool:
            inserted = await tx.execute(
                "INSERT INTO payments (id, rail, external_ref, owner_id, asset, amount, status,"
                " detail, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'credited', $7, $8)"
                " ON CONFLICT (rail, external_ref) DO NOTHING",
                payment_id,
                rail,
                got.tx_hash,
                owner_id,
                cfg.asset,
                got.amount,
                detail,
                now,
            )
            if not inserted:
                return False
            await tx.transfer(
                Transfer(
                    new_id("tr"),
                    j.world(cfg.asset),
                    j.wallet(owner_id, cfg.asset),
                    got.amount,
                    "deposit",
                    f"deposit:{rail}:{got.tx_hash}",
                    payment_id=payment_id,
                ),
                now=now,
            )
            await card_funds.settle_debt(tx, owner_id, cfg.asset, now, ref=payment_id)
            return True

        if not await self.writer.submit(op):
            raise BillingError(
                "this transaction was already used", code="tx_already_used", status=409
            )
        return {
            "payment_id": payment_id,
            "tx_hash": got.tx_hash,
            "payer": got.payer,
            "asset": cfg.asset,
            "amount": got.amount,
            "block_number": got.block_number,
        }

    # -- withdrawals ---------------------------------------------------------------

    async def withdraw(
        self,
        owner_id: str,
        source: Account,
        amount: int | None,
        to_address: str,
        *,
        plan: stl.PayoutPlan | None = None,
    ) -> Row:
        """Hold, pay on chain, then post or void. Returns the final withdrawal row.

        From earnings, ``plan`` names the settlements paid (``stl.plan_payout``)
        and the amount is their net; without one, the oldest unpaid settlements
        whose net is exactly ``amount`` are planned here.
        """
        if not self.can_withdraw:
            raise WalletNotConfigured("on-chain withdrawals are off: no hot wallet is configured")
        if not isinstance(to_address, str) or not is_address(to_address):
            raise BillingError(
                "to_address is not an EVM address", code="invalid_address", status=422
            )
        to = to_checksum_address(to_address)
        asset = self.config.asset
        plan, amount = await settlement_plan(self.store, owner_id, source, asset, amount, plan)
        wid, hold_id, now = new_id("wd"), "hw" + new_id("wd"), now_ms()

        async def hold(tx: Tx) -> bool:
            if plan is not None:
                # Claimed before the debit (the lock order of PATCH pay: settlement, then
                # account); any refusal below raises, so claim and debit roll back together.
                await stl.claim_payout(tx, owner_id, asset, wid, plan, now)
            await card_funds.guard_withdrawal(
                tx, source, j.holding(asset), amount, now, self.config.decimals
            )
            ok = await tx.transfer(
                Transfer(
                    new_id("tr"),
                    source,
                    j.holding(asset),
                    amount,
                    "hold",
                    f"hold:{hold_id}",
                    hold_id=hold_id,
                ),
                guard=True,
                now=now,
            )
            if not ok:
                if plan is not None:
                    raise InsufficientEarnings(
                        "the provider's earnings do not cover these settlements"
                    )
                return False
            await tx.execute(
                "INSERT INTO holds (id, account_id, asset, amount, status, usage_id, expires_at,"
                " created_at) VALUES ($1, $2, $3, $4, 'pending', NULL, $5, $6)",
                hold_id,
                source.id,
                asset,
                amount,
                now + _WITHDRAWAL_HOLD_TTL_MS,
                now,
            )
            await tx.execute(
                "INSERT INTO withdrawals (id, owner_id, method, asset, amount, source_account,"
                " destination, chain, status, hold_id, created_at, updated_at)"
                " VALUES ($1, $2, 'onchain', $3, $4, $5, $6, $7, $8, $9, $10, $10)",
                wid,
                owner_id,
                asset,
                amount,
                source.id,
                to,
                str(self.config.chain_id),
                SENDING,
                hold_id,
                now,
            )
            return True

        if not await self.writer.submit(hold):
            raise InsufficientBalance("the balance does not cover this withdrawal")
        task = asyncio.get_running_loop().create_task(self._pay(wid))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _pay(self, wid: str) -> Row:
        w = await get_withdrawal(self.store, wid)
        assert w is not None
        try:
            # Where to start looking if the outcome must be reconciled from logs.
            from_block = int(await self.evm.w3.eth.block_number)
            await self.writer.submit(
                lambda tx: tx.execute(
                    "UPDATE withdrawals SET from_block = $2 WHERE id = $1", wid, from_block
                )
            )
        except Exception as exc:  # nothing was sent yet: any failure is clean
            return await self._void(w, f"EVM node unreachable: {exc}")
        try:
            tx_hash = await self.evm.send_token(
                w["destination"], int(w["amount"]), token=self.config.token
            )
        except PayoutFailed as exc:
            if exc.code in _PAYOUT_DEFINITELY_FAILED:
                return await self._void(w, f"{exc.code}: {exc.message}")
            return await self._unknown(w, f"{exc.code}: {exc.message}")
        except UpstreamRailError as exc:
            # Raised by the chain-id check before signing: nothing was broadcast.
            return await self._void(w, f"{exc.code}: {exc.message}")
        except Exception as exc:  # anything else after the call started: do not guess
            log.exception("payout %s ended unexpectedly", wid)
            return await self._unknown(w, f"unexpected: {exc}")
        await self._post(w, tx_hash.lower())
        return await self._reload(wid)

    async def _post(self, w: Row, tx_hash: str | None) -> None:
        now = now_ms()
        decimals = self.config.decimals
        await self.writer.submit(lambda tx: post_withdrawal_hold(tx, w, tx_hash, now, decimals))

    async def _void(self, w: Row, error: str) -> Row:
        now = now_ms()
        await self.writer.submit(lambda tx: void_withdrawal_hold(tx, w, error, now))
        return await self._reload(w["id"])

    async def _unknown(self, w: Row, error: str) -> Row:
        log.error("payout %s outcome unknown, left for reconciliation: %s", w["id"], error)
        now = now_ms()
        await self.writer.submit(
            lambda tx: _set_status(tx, w["id"], UNKNOWN, now, error=error[:500])
        )
        return await self._reload(w["id"])

    async def _reload(self, wid: str) -> Row:
        w = await get_withdrawal(self.store, wid)
        assert w is not None
        return w

    async def reconcile_onchain(self, wid: str) -> Row:
        """Settle an ``unknown`` payout from the chain: post it if its transfer is on chain.

        Looks for a Transfer of the token from the hot wallet to the destination for
        exactly the amount, mined since the withdrawal started, whose transaction no
        other withdrawal claims. Found: post. Not found: leave it ``unknown`` (the
        transaction may still be pending somewhere); an operator decides, with
        ``resolve_unknown``, once the hot wallet's nonce shows nothing is in flight.
        """
        w = await self._reload(wid)
        if w["status"] != UNKNOWN or w["method"] != "onchain" or self.evm.hot_wallet is None:
            return w
        logs = await self.evm.w3.eth.get_logs(
            {
                "address": to_checksum_address(self.config.token),
                "fromBlock": int(w["from_block"] or 0),
                "toBlock": "latest",
                "topics": [
                    TRANSFER_TOPIC,
                    _address_topic(self.evm.hot_wallet.address),
                    _address_topic(w["destination"]),
                ],
            }
        )
        for entry in logs:
            if entry.get("removed") or _log_value(entry["data"]) != int(w["amount"]):
                continue
            tx_hash = _hex_str(entry["transactionHash"])
            if await self.store.fetchval("SELECT 1 FROM withdrawals WHERE tx_hash = $1", tx_hash):
                continue  # another withdrawal's payout
            await self._post(w, tx_hash)
            break
        return await self._reload(wid)

    async def resolve_unknown(self, wid: str, *, paid: bool, tx_hash: str | None = None) -> Row:
        """An operator's decision on an ``unknown`` payout, after checking the chain."""
        w = await self._reload(wid)
        if w["status"] != UNKNOWN:
            raise BillingError(
                f"withdrawal is {w['status']}, not unknown", code="not_unknown", status=409
            )
        now = now_ms()
        if paid:
            await self._post(w, tx_hash.lower() if tx_hash else None)
        else:
            await self.writer.submit(
                lambda tx: void_withdrawal_hold(tx, w, "voided by operator", now)
            )
        return await self._reload(wid)

    async def reconcile_all(self) -> int:
        """One reconciliation pass over every ``unknown`` on-chain payout; returns how many settled."""
        rows = await self.store.fetch(
            "SELECT id FROM withdrawals WHERE method = 'onchain' AND status = $1 LIMIT 100", UNKNOWN
        )
        settled = 0
        for r in rows:
            if (await self.reconcile_onchain(str(r["id"])))["status"] != UNKNOWN:
                settled += 1
        return settled

    async def run_reconciler(self, interval: float = 30.0) -> None:
        """Background task: settle unknown payouts as their transfers show up on chain."""
        while True:
            try:
                await self.reconcile_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("withdrawal reconciliation pass failed")
            await asyncio.sleep(interval)

    async def drain(self, timeout: float = 30.0) -> None:
        """Let in-flight payouts record their outcome before the store closes."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)

    async def close(self) -> None:
        await self.drain()
        await self.evm.close()


def _address_topic(address: str) -> str:
    """An address as an indexed event topic: left-padded to 32 bytes."""
    return "0x" + "0" * 24 + to_checksum_address(address)[2:].lower()


def _hex_str(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    text = str(value).lower()
    return text if text.startswith("0x") else "0x" + text


def _log_value(data: Any) -> int:
    return int(_hex_str(data), 16)


async def settlement_plan(
    store: Store,
    owner_id: str,
    source: Account,
    asset: str,
    amount: int | None,
    plan: stl.PayoutPlan | None,
) -> tuple[stl.PayoutPlan | None, int]:
    """The settlements a withdrawal pays, and its amount: (None, amount) from a wallet.

    Earnings leave only against settled-but-unpaid settlements, whose net is
    the amount; a wallet withdrawal pays none and needs an amount.
    """
    if source.kind != "earnings":
        if plan is not None:
            raise BillingError(
                "only a withdrawal from earnings pays settlements",
                code="validation_error",
                status=422,
            )
        if amount is None or amount <= 0:
            raise BillingError(
                "amount must be greater than zero", code="invalid_amount", status=422
            )
        return None, amount
    if plan is None:
        plan = await stl.plan_payout(store, owner_id, asset, amount=amount)
    elif amount is not None and amount != plan.amount:
        raise BillingError(
            f"amount {amount} is not the net of these settlements ({plan.amount})",
            code="amount_mismatch",
            status=422,
        )
    return plan, plan.amount


def withdrawal_view(w: Row) -> dict[str, Any]:
    return {
        "id": w["id"],
        "method": w["method"],
        "status": w["status"],
        "asset": w["asset"],
        "amount": int(w["amount"]),
        "source": w["source_account"].split(":", 1)[0],
        "destination": w["destination"],
        "chain": w["chain"],
        "tx_hash": w["tx_hash"],
        "transfer_id": w["transfer_id"],
        "error": w["error"],
        "created_at": int(w["created_at"]),
        "updated_at": int(w["updated_at"]),
    }
