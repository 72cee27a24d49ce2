"""The wallet API: balance, journal lines, on-chain deposits and withdrawals.

Every route answers for the caller's own wallet only: the owner is the key's
owner, never a field of the request. Amounts are decimal strings here and
integers everywhere below.

A provider's withdrawal from earnings pays settlements (``billing.settlements``):
``settlement_id`` or ``settlement_ids`` name them (``source`` then defaults to
``earnings``), or ``amount`` alone takes the oldest unpaid settlements whose
nets add up to it exactly, or neither takes the oldest unpaid one. The amount
paid is always their net; the withdrawal lists them in ``settlement_ids``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from billing import settlements as stl
from billing.card_funds import CardFundsSettling
from billing.money import AmountError, format_amount, parse_amount
from billing.wallets import (
    FAILED,
    PAID,
    REVERSED,
    UNKNOWN,
    EvmWalletConfig,
    EvmWallets,
    balances,
    chain_names,
    journal_lines,
    list_withdrawals,
    recover_claim_signer,
    source_account,
    withdrawal_view,
)
from ledger.registry import KeyRecord
from proxy.auth import require_role
from proxy.errors import ApiError, json_response, read_json
from proxy.runtime import RT, Runtime
from proxy.validation import fail, opt_str, query_int, req_str

log = logging.getLogger("tollway.wallet")

# Connect payouts are the other withdrawal method; their service lives with the Stripe routes.
CONNECT_METHODS = ("stripe_connect", "stripe", "connect")


def evm_wallets(rt: Runtime) -> EvmWallets:
    w: EvmWallets | None = getattr(rt, "evm_wallets", None)
    if w is None:
        raise ApiError(
            503,
            "evm_not_configured",
            "on-chain wallets are not configured on this server (evm_rpc_url, evm_token_address)",
        )
    return w


async def _caller(request: web.Request) -> tuple[Runtime, KeyRecord]:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "buyer", "provider")
    return rt, key


def _amount(rt: Runtime, data: dict[str, Any], name: str = "amount") -> int:
    try:
        return parse_amount(data.get(name), rt.settings.asset_decimals, allow_zero=False)
    except AmountError as e:
        raise fail(name, str(e)) from None


def _fmt(rt: Runtime, units: int) -> str:
    return format_amount(units, rt.settings.asset_decimals)


def _line_view(rt: Runtime, line: dict[str, Any]) -> dict[str, Any]:
    out = dict(line)
    out["amount_units"] = line["amount"]
    out["amount"] = _fmt(rt, line["amount"])
    return out


def render_withdrawal(
    rt: Runtime, w: Any, settlement_ids: list[str] | None = None
) -> dict[str, Any]:
    out = withdrawal_view(w)
    out["amount_units"] = out["amount"]
    out["amount"] = _fmt(rt, out["amount"])
    # The settlements a payout from earnings pays (empty for a wallet withdrawal).
    out["settlement_ids"] = list(settlement_ids or [])
    return out


async def render_withdrawals(rt: Runtime, rows: list[Any]) -> list[dict[str, Any]]:
    paid = await stl.payout_settlement_ids(rt.store, [str(w["id"]) for w in rows])
    return [render_withdrawal(rt, w, paid[str(w["id"])]) for w in rows]


# --------------------------------------------------------------------------- reads


async def balance(request: web.Request) -> web.Response:
    rt, key = await _caller(request)
    await rt.meter.leases.flush(timeout=2.0)  # this worker's leased calls, posted before the read
    per_asset = await balances(rt.store, key.owner_id)
    if not any(b["asset"] == rt.settings.default_asset for b in per_asset):
        per_asset.insert(
            0,
            {
                "asset": rt.settings.default_asset,
                "available": 0,
                "earnings": 0,
                "held": 0,
                "leased": 0,
            },
        )
    recent, _ = await journal_lines(rt.store, key.owner_id, limit=10)
    return json_response(
        {
            "owner_id": key.owner_id,
            "balances": [
                {
                    "asset": b["asset"],
                    "available": _fmt(rt, b["available"]),
                    "earnings": _fmt(rt, b["earnings"]),
                    "held": _fmt(rt, b["held"]),
                    "available_units": b["available"],
                    "earnings_units": b["earnings"],
                    "held_units": b["held"],
                    "leased": _fmt(rt, b["leased"]),
                    "leased_units": b["leased"],
                }
                for b in per_asset
            ],
            "recent": [_line_view(rt, line) for line in recent],
        }
    )


async def transactions(request: web.Request) -> web.Response:
    rt, key = await _caller(request)
    page = query_int(request.query.get("page"), "page", 1, 1, 10**6)
    size = query_int(request.query.get("page_size"), "page_size", 20, 1, 100)
    lines, total = await journal_lines(rt.store, key.owner_id, limit=size, offset=(page - 1) * size)
    return json_response(
        {
            "transactions": [_line_view(rt, line) for line in lines],
            "page": page,
            "page_size": size,
            "total": total,
            "has_more": page * size < total,
        }
    )


async def withdrawals(request: web.Request) -> web.Response:
    rt, key = await _caller(request)
    rows = await list_withdrawals(rt.store, key.owner_id)
    return json_response({"withdrawals": await render_withdrawals(rt, rows)})


# --------------------------------------------------------------------------- deposits


def _check_chain(rt: Runtime, data: dict[str, Any]) -> None:
    wallets = getattr(rt, "evm_wallets", None)
    chain_id = wallets.config.chain_id if wallets is not None else rt.settings.evm_chain_id
    chain = data.get("chain", "evm")
    if not isinstance(chain, str) or chain.lower() not in chain_names(chain_id):
        names = ", ".join(sorted(chain_names(chain_id)))
        raise fail("chain", f"chain must be one of: {names}")


async def deposit(request: web.Request) -> web.Response:
    rt, key = await _caller(request)
    wallets = evm_wallets(rt)
    data = await read_json(request)
    tx_hash = req_str(data, "tx_hash", max_len=80)
    _check_chain(rt, data)
    # The client's figure is only compared with the chain's, never credited.
    claimed = _amount(rt, data) if data.get("amount") is not None else None
    signature = data.get("signature")
    signers: list[str] = []
    if signature is not None:
        if not isinstance(signature, str) or len(signature) > 200:
            raise fail("signature", "signature must be a hex string")
        signer = recover_claim_signer(key.owner_id, tx_hash, signature)
        if signer is None:
            raise fail(
                "signature", "signature is not a valid EIP-191 signature of the claim message"
            )
        signers.append(signer)
    res = await wallets.deposit(key.owner_id, tx_hash, signers)
    body = {
        "status": "credited",
        "payment_id": res["payment_id"],
        "tx_hash": res["tx_hash"],
        "payer": res["payer"],
        "asset": res["asset"],
        "amount": _fmt(rt, res["amount"]),
        "amount_units": res["amount"],
        "block_number": res["block_number"],
    }
    if claimed is not None and claimed != res["amount"]:
        body["note"] = (
            f"credited the {body['amount']} the chain shows, not the {_fmt(rt, claimed)} claimed"
        )
    return json_response(body, status=201)


# --------------------------------------------------------------------------- withdrawals


def _settlement_ids(data: dict[str, Any]) -> list[str] | None:
    """``settlement_id`` (one) or ``settlement_ids`` (a list), or None."""
    one, many = data.get("settlement_id"), data.get("settlement_ids")
    if one is not None and many is not None:
        raise fail("settlement_ids", "give settlement_id or settlement_ids, not both")
    if one is not None:
        many = [one]
    if many is None:
        return None
    if (
        not isinstance(many, list)
        or not many
        or not all(isinstance(x, str) and x.strip() and len(x) <= 128 for x in many)
    ):
        raise fail("settlement_ids", "settlement_ids must be a non-empty list of settlement ids")
    if len(many) > stl.MAX_PAYOUT_SETTLEMENTS:
        raise fail("settlement_ids", f"at most {stl.MAX_PAYOUT_SETTLEMENTS} settlements per payout")
    if len(set(many)) != len(many):
        raise fail("settlement_ids", "settlement_ids has duplicates")
    return [x.strip() for x in many]


async def withdraw(request: web.Request) -> web.Response:
    rt, key = await _caller(request)
    data = await read_json(request)
    settlement_ids = _settlement_ids(data)
    default_source = "earnings" if settlement_ids else "wallet"
    source_name = opt_str(data, "source", default=default_source, max_len=20) or default_source
    if source_name not in ("wallet", "earnings"):
        raise fail("source", "source must be wallet or earnings")
    if source_name == "earnings" and key.role != "provider":
        raise fail("source", "only providers have earnings to withdraw")
    if settlement_ids and source_name != "earnings":
        raise fail("settlement_ids", "settlements are paid from earnings (source earnings)")
    # From earnings the amount is the settlements' net: optional, checked if given.
    amount = (
        _amount(rt, data) if source_name == "wallet" or data.get("amount") is not None else None
    )
    asset = rt.settings.default_asset
    source = source_account(key.owner_id, source_name, asset)
    method = data.get("method")
    chain = data.get("chain")
    if method is None:
        method = (
            "stripe_connect"
            if isinstance(chain, str) and chain.lower() in CONNECT_METHODS
            else "onchain"
        )
    if method not in CONNECT_METHODS and method != "onchain":
        raise fail("method", "method must be onchain or stripe_connect")
    plan: stl.PayoutPlan | None = None
    if method in CONNECT_METHODS:
        from proxy.routes.stripe_routes import connect_payouts_of

        connect = connect_payouts_of(rt)
        if source_name == "earnings":
            plan = await stl.plan_payout(
                rt.store, key.owner_id, asset, settlement_ids=settlement_ids, amount=amount
            )
        pending = connect.withdraw(key.owner_id, source, amount, plan=plan)
    else:
        wallets = evm_wallets(rt)
        _check_chain(rt, data)
        to_address = req_str(data, "to_address", max_len=100)
        if source_name == "earnings":
            plan = await stl.plan_payout(
                rt.store, key.owner_id, asset, settlement_ids=settlement_ids, amount=amount
            )
        pending = wallets.withdraw(key.owner_id, source, amount, to_address, plan=plan)
    try:
        w = await pending
    except CardFundsSettling as exc:
        # What can leave now, machine-readable beside the message.
        raise ApiError(
            exc.status,
            exc.code,
            exc.message,
            withdrawable=_fmt(rt, exc.withdrawable),
            withdrawable_units=exc.withdrawable,
            settles_at=exc.settles_at,
        ) from None
    paid = list(plan.settlement_ids) if plan is not None else []
    view = render_withdrawal(rt, w, paid)
    if w["status"] == PAID:
        return json_response({"withdrawal": view})
    if w["status"] == UNKNOWN:
        # Accepted, not failed: the money stays out of the wallet until the payout
        # is reconciled, because refunding it now could pay twice.
        return json_response({"withdrawal": view}, status=202)
    if w["status"] in (FAILED, REVERSED):
        what = "hold was voided" if w["status"] == FAILED else "debit was reversed"
        raise ApiError(
            502,
            "payout_failed",
            f"the payout failed and the {what}: {w['error']}",
            withdrawal_id=w["id"],
            settlement_ids=paid,
        )
    return json_response({"withdrawal": view}, status=202)


# --------------------------------------------------------------------------- lifecycle


async def on_startup(app: web.Application, rt: Runtime) -> None:
    s = rt.settings
    rt.evm_wallets = None  # type: ignore[attr-defined]
    if not (s.evm_rpc_url and s.evm_token_address):
        return  # the feature answers 503 with a clear error
    from billing.rails.evm import EvmClient  # web3 is heavy: only when configured

    evm = EvmClient(
        s.evm_rpc_url,
        expected_chain_id=s.evm_chain_id or None,
        hot_wallet_key=s.evm_hot_wallet_private_key,
        payout_token=s.evm_token_address,
    )
    # The node's own chain id keys deposits in `payments`, exactly as invoices
    # and x402 settlements do: one transaction is one payment across all three.
    node_chain = await evm.chain_id()
    config = EvmWalletConfig(
        token=s.evm_token_address,
        pay_to=s.evm_pay_to,
        confirmations=s.evm_confirmations,
        chain_id=node_chain,
        asset=s.default_asset,
        decimals=s.asset_decimals,
    )
    wallets = EvmWallets(rt.store, rt.writer, evm, config)
    rt.evm_wallets = wallets  # type: ignore[attr-defined]
    if wallets.can_withdraw:
        # Settles payouts whose outcome was unknown, from the chain's own logs.
        rt.withdrawal_reconciler = asyncio.get_running_loop().create_task(  # type: ignore[attr-defined]
            wallets.run_reconciler(), name="withdrawal-reconciler"
        )


async def on_cleanup(app: web.Application, rt: Runtime) -> None:
    reconciler: asyncio.Task[Any] | None = getattr(rt, "withdrawal_reconciler", None)
    if reconciler is not None:
        reconciler.cancel()
        try:
            await reconciler
        except asyncio.CancelledError:
            pass
    wallets: EvmWallets | None = getattr(rt, "evm_wallets", None)
    if wallets is not None:
        await wallets.close()


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/wallet/balance", balance),
    ("GET", "/wallet/transactions", transactions),
    ("GET", "/wallet/withdrawals", withdrawals),
    ("POST", "/wallet/deposit", deposit),
    ("POST", "/wallet/withdraw", withdraw),
]
