"""Stripe routes: top-up, saved card, auto top-up, the webhook, and Connect onboarding.

The rail, the ``Topups``, ``AutoTopups`` and ``ConnectPayouts`` services are
built at start-up only when Stripe is configured (api key and webhook secret);
otherwise every route here answers 503 with a clear JSON error. The auto
top-up worker and the Connect reconciler run as background tasks of this
process and the finish hook is added to the meter here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from billing.auto_topups import AutoTopups
from billing.connect_payouts import ConnectConfig, ConnectPayouts
from billing.money import AmountError, format_amount, parse_amount
from billing.rails.stripe_rail import StripeRail, StripeRailConfig
from billing.topups import TopupConfig, Topups
from ledger.registry import KeyRecord
from proxy.auth import require_role
from proxy.errors import ApiError, json_response, read_json
from proxy.runtime import RT, Runtime
from proxy.validation import fail, opt_bool

log = logging.getLogger("tollway.stripe")


def _not_configured() -> ApiError:
    return ApiError(
        503,
        "stripe_not_configured",
        "Stripe is not configured on this server (stripe_api_key, stripe_webhook_secret)",
    )


def topups_of(rt: Runtime) -> Topups:
    t: Topups | None = getattr(rt, "topups", None)
    if t is None:
        raise _not_configured()
    return t


def auto_topups_of(rt: Runtime) -> AutoTopups:
    a: AutoTopups | None = getattr(rt, "auto_topups", None)
    if a is None:
        raise _not_configured()
    return a


def connect_payouts_of(rt: Runtime) -> ConnectPayouts:
    c: ConnectPayouts | None = getattr(rt, "connect_payouts", None)
    if c is None:
        raise _not_configured()
    return c


async def _caller(request: web.Request, *roles: str) -> tuple[Runtime, Topups, KeyRecord]:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, *(roles or ("buyer", "provider")))
    return rt, topups_of(rt), key


def _units(rt: Runtime, data: dict[str, Any], name: str, *, allow_zero: bool = False) -> int:
    if name not in data:
        raise fail(name, f"{name} is required")
    try:
        return parse_amount(data.get(name), rt.settings.asset_decimals, allow_zero=allow_zero)
    except AmountError as e:
        raise fail(name, str(e)) from None


def _fmt(rt: Runtime, units: int) -> str:
    return format_amount(units, rt.settings.asset_decimals)


# --------------------------------------------------------------------------- wallet side


async def topup(request: web.Request) -> web.Response:
    rt, topups, key = await _caller(request)
    data = await read_json(request)
    units = _units(rt, data, "amount")
    session = await topups.create_topup(key.owner_id, units)
    return json_response(
        {
            "session_id": session.session_id,
            "url": session.url,
            "amount": _fmt(rt, units),
            "currency": rt.settings.stripe_currency,
        },
        status=201,
    )


async def setup_payment_method(request: web.Request) -> web.Response:
    _, topups, key = await _caller(request)
    return json_response(await topups.setup_payment_method(key.owner_id), status=201)


def _auto_view(rt: Runtime, state: dict[str, Any] | None) -> dict[str, Any]:
    if state is None:
        return {"enabled": False}
    out = dict(state)
    out["threshold"] = _fmt(rt, state["threshold"])
    out["amount"] = _fmt(rt, state["amount"])
    return out


async def configure_auto_topup(request: web.Request) -> web.Response:
    rt, _, key = await _caller(request)
    data = await read_json(request)
    state = await auto_topups_of(rt).configure_auto_topup(
        key.owner_id,
        threshold=_units(rt, data, "threshold", allow_zero=True),
        amount=_units(rt, data, "amount"),
        enabled=opt_bool(data, "enabled", True),
    )
    return json_response(_auto_view(rt, state))


async def get_auto_topup(request: web.Request) -> web.Response:
    rt, _, key = await _caller(request)
    state = await auto_topups_of(rt).auto_topup_state(key.owner_id)
    return json_response(_auto_view(rt, state))


# --------------------------------------------------------------------------- webhook


async def webhook(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    topups = topups_of(rt)
    # The signature covers the exact bytes: read them raw, never re-serialize.
    payload = await request.read()
    result = await topups.handle_webhook(payload, request.headers.get("Stripe-Signature"))
    return json_response({"received": True, **result})


# --------------------------------------------------------------------------- Connect


async def connect(request: web.Request) -> web.Response:
    rt, _, key = await _caller(request, "provider")
    return json_response(await connect_payouts_of(rt).onboarding(key.owner_id), status=201)


async def connect_status(request: web.Request) -> web.Response:
    rt, _, key = await _caller(request, "provider")
    return json_response(await connect_payouts_of(rt).status(key.owner_id))


# --------------------------------------------------------------------------- lifecycle


async def on_startup(app: web.Application, rt: Runtime) -> None:
    s = rt.settings
    rt.topups = None  # type: ignore[attr-defined]
    rt.auto_topups = None  # type: ignore[attr-defined]
    rt.connect_payouts = None  # type: ignore[attr-defined]
    if not (s.stripe_api_key and s.stripe_webhook_secret):
        return
    values: dict[str, Any] = {
        "api_key": s.stripe_api_key,
        "webhook_secret": s.stripe_webhook_secret,
        "success_url": s.stripe_success_url,
        "cancel_url": s.stripe_cancel_url,
    }
    if s.stripe_api_base:
        values["api_base"] = s.stripe_api_base
    rail = StripeRail(StripeRailConfig(**values))
    topups = Topups(
        rt.store,
        rt.writer,
        rail,
        TopupConfig(
            asset=s.default_asset,
            currency=s.stripe_currency.lower(),
            units_per_cent=s.stripe_units_per_cent,
            cooldown_seconds=s.auto_topup_cooldown_seconds,
            card_settle_seconds=s.card_settle_seconds,
        ),
    )
    connect = ConnectPayouts(
        rt.store,
        rt.writer,
        rail,
        ConnectConfig(
            currency=s.stripe_currency.lower(),
            units_per_cent=s.stripe_units_per_cent,
            refresh_url=s.stripe_connect_refresh_url,
            return_url=s.stripe_connect_return_url,
            decimals=s.asset_decimals,
        ),
    )
    auto = AutoTopups(topups)
    await auto.refresh_auto_owners()
    rt.topups = topups  # type: ignore[attr-defined]
    rt.auto_topups = auto  # type: ignore[attr-defined]
    rt.connect_payouts = connect  # type: ignore[attr-defined]
    rt.meter.finish_hooks.append(auto.finish_hook)
    # Auto top-up watches the wallet itself after each charge: its owners' calls
    # take exact holds, so the wallet is not lowered ahead of time by a lease.
    rt.meter.leases.lease_allowed = lambda owner: owner not in auto.auto_owners
    loop = asyncio.get_running_loop()
    rt.topups_worker = loop.create_task(  # type: ignore[attr-defined]
        auto.run(), name="auto-topup-worker"
    )
    rt.connect_worker = loop.create_task(  # type: ignore[attr-defined]
        connect.run(), name="connect-reconciler"
    )


async def on_cleanup(app: web.Application, rt: Runtime) -> None:
    topups: Topups | None = getattr(rt, "topups", None)
    if topups is None:
        return
    for worker in (rt.topups_worker, rt.connect_worker):  # type: ignore[attr-defined]
        worker.cancel()
        try:
            await worker
        except asyncio.CancelledError:
            pass
    # Transfers in flight record their outcome before the shared rail closes.
    await rt.connect_payouts.close()  # type: ignore[attr-defined]
    await topups.close()


ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/wallet/topup", topup),
    ("POST", "/wallet/setup-payment-method", setup_payment_method),
    ("POST", "/wallet/auto-topup", configure_auto_topup),
    ("GET", "/wallet/auto-topup", get_auto_topup),
    ("POST", "/stripe/webhook", webhook),
    ("POST", "/stripe/connect", connect),
    ("GET", "/stripe/connect/status", connect_status),
]
