"""The provider portal (ACF: Provider Portal): a provider's own services, figures and keys.

Figures come from ``billing.portal`` (the journal and the usage records);
amounts go out as decimal strings with their integer units beside them.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import aiohttp
from aiohttp import web

from billing import portal
from billing import settlements as st
from billing.money import format_amount
from config.netpolicy import AddressForbidden, check_url
from ledger.journal import now_ms
from ledger.registry import KeyRecord, Service
from proxy.auth import require_role
from proxy.errors import ApiError, json_response
from proxy.runtime import RT, Runtime
from proxy.validation import query_int

# A reachability test waits at most this long (or the upstream timeouts, if shorter).
TEST_TIMEOUT_SECONDS = 10.0


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")


async def _provider(rt: Runtime, request: web.Request) -> KeyRecord:
    key = await rt.keys.authenticate(request)
    require_role(key, "provider")
    return key


async def _own_service(rt: Runtime, request: web.Request, key: KeyRecord) -> Service:
    svc = await rt.registry.get_service(request.match_info["service_id"])
    if svc is None:
        raise ApiError(404, "service_not_found", "no such service")
    if svc.provider_id != key.owner_id:
        raise ApiError(403, "forbidden", "Not your service")
    return svc


def _money(rt: Runtime, units: int) -> str:
    return format_amount(units, rt.settings.asset_decimals)


def _earnings_view(rt: Runtime, e: dict[str, int]) -> dict[str, Any]:
    return {
        "total_earned": _money(rt, e["earned"]),
        "total_paid_out": _money(rt, e["paid_out"]),
        "balance": _money(rt, e["balance"]),
        "total_settled": _money(rt, e["settled_unpaid"] + e["settled_paid"]),
        "pending_settlement": _money(rt, e["unsettled"]),
        "settled_unpaid": _money(rt, e["settled_unpaid"]),
        "units": e,
    }


async def dashboard(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    asset = rt.settings.default_asset
    mine, _ = await rt.registry.list_services(status=None, provider_id=key.owner_id, limit=10_000)
    u = await portal.usage_totals(rt.store, key.owner_id, asset)
    e = await portal.earnings(rt.store, key.owner_id, asset)
    out: dict[str, Any] = {
        "provider_id": key.owner_id,
        "asset": asset,
        "total_services": sum(1 for x in mine if x.status != "removed"),
        "active_services": sum(1 for x in mine if x.status == "active"),
        "total_calls": u["calls"],
        "charged_calls": u["charged_calls"],
        "total_revenue": _money(rt, u["revenue"]),
        "total_revenue_units": u["revenue"],
        "settlements": e["settlements"],
    }
    out.update(_earnings_view(rt, e))
    return json_response(out)


async def services(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    items, _ = await rt.registry.list_services(status=None, provider_id=key.owner_id, limit=10_000)
    stats = await portal.per_service(rt.store, key.owner_id, rt.settings.default_asset)
    out = []
    for s in items:
        x = stats.get(
            s.id,
            {
                "calls": 0,
                "charged_calls": 0,
                "revenue": 0,
                "success_rate": None,
                "avg_latency_ms": None,
            },
        )
        out.append(
            {
                "id": s.id,
                "name": s.name,
                "description": s.description,
                "endpoint": s.endpoint,
                "price_per_call": _money(rt, s.price_units),
                "status": s.status,
                "category": s.category,
                "total_calls": x["calls"],
                "charged_calls": x["charged_calls"],
                "total_revenue": _money(rt, x["revenue"]),
                "total_revenue_units": x["revenue"],
                "avg_latency_ms": x["avg_latency_ms"],
                "success_rate": x["success_rate"],
                "created_at": _iso(s.created_at),
            }
        )
    return json_response({"services": out, "count": len(out)})


async def analytics(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    svc = await _own_service(rt, request, key)
    days = query_int(request.query.get("days"), "days", 30, 1, 366)
    asset = svc.asset
    u = await portal.usage_totals(rt.store, key.owner_id, asset, svc.id)
    today = now_ms() // portal.DAY_MS
    series = await portal.daily(rt.store, svc.id, asset, (today - days + 1) * portal.DAY_MS)
    return json_response(
        {
            "service_id": svc.id,
            "service_name": svc.name,
            "total_calls": u["calls"],
            "charged_calls": u["charged_calls"],
            "total_revenue": _money(rt, u["revenue"]),
            "total_revenue_units": u["revenue"],
            "avg_latency_ms": u["avg_latency_ms"],
            "success_rate": u["success_rate"],
            "unique_buyers": u["unique_buyers"],
            "first_call": _iso(u["first_call"]),
            "last_call": _iso(u["last_call"]),
            "days": days,
            "daily": [
                {
                    "date": dt.date.fromordinal(
                        dt.date(1970, 1, 1).toordinal() + d["day"]
                    ).isoformat(),
                    "calls": d["calls"],
                    "charged_calls": d["charged_calls"],
                    "revenue": _money(rt, d["revenue"]),
                    "revenue_units": d["revenue"],
                }
                for d in series
            ],
        }
    )


async def earnings(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    asset = rt.settings.default_asset
    e = await portal.earnings(rt.store, key.owner_id, asset)
    rows = await st.list_settlements(rt.store, provider_id=key.owner_id, status=None, limit=100)
    out: dict[str, Any] = {"provider_id": key.owner_id, "asset": asset}
    out.update(_earnings_view(rt, e))
    out["settlements"] = [st.render(r, rt.settings.asset_decimals) for r in rows]
    return json_response(out)


async def keys(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    recs = await rt.registry.keys_of(key.owner_id)
    return json_response(
        {
            "keys": [
                {
                    "key_id": k.key_id,
                    "role": k.role,
                    "rate_limit": k.rate_limit,
                    "wallet_address": k.wallet_address,
                    "status": k.status,
                    "created_at": _iso(k.created_at),
                    "expires_at": None,
                }
                for k in recs
            ],
            "count": len(recs),
        }
    )


async def revoke_key(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    key_id = request.match_info["key_id"]
    rec = await rt.registry.get_key(key_id)
    if rec is None:
        raise ApiError(404, "key_not_found", "no such key")
    if rec.owner_id != key.owner_id:
        raise ApiError(403, "forbidden", "Not your key")
    await rt.registry.revoke_key(key_id, key.owner_id)  # already revoked: nothing to do
    # This process stops accepting it at once; others within key_cache_ttl_seconds.
    rt.keys.forget(key_id)
    return json_response({"status": "revoked", "key_id": key_id})


async def test_endpoint(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    svc = await _own_service(rt, request, key)
    out: dict[str, Any] = {
        "service_id": svc.id,
        "endpoint": svc.endpoint,
        "reachable": False,
        "latency_ms": 0,
        "status_code": 0,
        "error": "",
    }
    why = check_url(svc.endpoint, allow_private=rt.settings.allow_private_upstreams)
    if why:
        out["error"] = f"refused by the network policy: {why}"
        return json_response(out)
    s = rt.settings
    timeout = min(TEST_TIMEOUT_SECONDS, s.upstream_connect_timeout + s.upstream_read_timeout)
    t0 = time.perf_counter()
    try:
        # The proxy's own session: its resolver applies the SSRF policy at connect time too.
        async with rt.session.get(
            svc.endpoint, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            out["status_code"] = resp.status
            out["reachable"] = True
    except TimeoutError:
        out["error"] = "Connection timed out"
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, AddressForbidden):
            out["error"] = f"refused by the network policy: {exc.os_error}"
        else:
            out["error"] = f"cannot connect: {exc.os_error}"
    except (aiohttp.ClientError, OSError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["latency_ms"] = round((time.perf_counter() - t0) * 1000)
    return json_response(out)


async def onboarding(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await _provider(rt, request)
    done = await portal.onboarding(rt.store, key.owner_id)
    labels = {
        "create_api_key": "Create API key",
        "register_service": "Register your first service",
        "activate_service": "Activate a service",
        "first_traffic": "Receive first API call",
        "first_settlement": "Complete first settlement",
    }
    steps = {k: {"completed": done[k], "label": v} for k, v in labels.items()}
    n = sum(1 for v in done.values() if v)
    return json_response(
        {
            "provider_id": key.owner_id,
            "steps": steps,
            "completed_steps": n,
            "total_steps": len(steps),
            "completion_pct": round(100.0 * n / len(steps), 1),
        }
    )


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/provider/dashboard", dashboard),
    ("GET", "/provider/services", services),
    ("GET", "/provider/services/{service_id}/analytics", analytics),
    ("POST", "/provider/services/{service_id}/test", test_endpoint),
    ("GET", "/provider/earnings", earnings),
    ("GET", "/provider/keys", keys),
    ("DELETE", "/provider/keys/{key_id}", revoke_key),
    ("GET", "/provider/onboarding", onboarding),
]
