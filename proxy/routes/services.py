"""The service registry (ACF: Service Registry)."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from billing.money import AmountError, format_amount, parse_amount
from config.netpolicy import check_url
from ledger.journal import now_ms
from ledger.registry import KeyRecord, Service
from proxy.auth import require_role
from proxy.errors import ApiError, json_response, read_json
from proxy.runtime import RT, Runtime
from proxy.validation import fail, opt_bool, opt_int, opt_str, query_int, req_str

PAYMENT_METHODS = ("x402", "prepaid", "invoice", "stripe", "paypal", "nowpayments")
STATUSES = ("active", "paused", "removed")


def render(s: Service, decimals: int, *, owner_view: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": s.id,
        "provider_id": s.provider_id,
        "name": s.name,
        "description": s.description,
        "pricing": {
            "price_per_call": format_amount(s.price_units, decimals),
            "price_units": s.price_units,
            "currency": s.asset,
            "payment_method": s.payment_method,
            "free_tier_calls": s.free_tier_calls,
        },
        "allow_anonymous": s.allow_anonymous,
        "rate_limit": s.rate_limit,
        "status": s.status,
        "category": s.category,
        "tags": s.tags,
        "created_at": _iso(s.created_at),
        "updated_at": _iso(s.updated_at),
    }
    if owner_view:
        # The upstream address is the provider's secret: buyers must come through us.
        out["endpoint"] = s.endpoint
    return out


def _rate_limit(value: Any) -> int | None:
    """Calls per minute from one caller to this service, or None for no limit of its own."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000_000:
        raise fail("rate_limit", "rate_limit must be an integer from 1 to 1000000000, or null")
    return value


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")


def _endpoint(rt: Runtime, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail("endpoint", "endpoint is required")
    why = check_url(value, allow_private=rt.settings.allow_private_upstreams)
    if why:
        raise fail("endpoint", f"endpoint refused: {why}")
    if "?" in value or "#" in value:
        raise fail("endpoint", "endpoint may not carry a query or fragment")
    return value


def _price(rt: Runtime, value: Any) -> int:
    try:
        return parse_amount(value, rt.settings.asset_decimals)
    except AmountError as e:
        raise fail("price_per_call", str(e)) from None


def _tags(value: Any) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > 20
        or not all(isinstance(t, str) and 0 < len(t) <= 50 for t in value)
    ):
        raise fail("tags", "tags must be a list of at most 20 short strings")
    return value


def _method(value: Any) -> str:
    if value not in PAYMENT_METHODS:
        raise fail("payment_method", f"payment_method must be one of {', '.join(PAYMENT_METHODS)}")
    return value


async def _owned(rt: Runtime, request: web.Request) -> tuple[KeyRecord, Service]:
    key = await rt.keys.authenticate(request)
    require_role(key, "provider", "admin")
    svc = await rt.registry.get_service(request.match_info["service_id"])
    if svc is None:
        raise ApiError(404, "service_not_found", "no such service")
    if key.role != "admin" and svc.provider_id != key.owner_id:
        raise ApiError(403, "forbidden", "only the owning provider may change this service")
    return key, svc


async def register(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "provider", "admin")
    data = await read_json(request)
    now = now_ms()
    if "price_per_call" not in data:
        raise fail("price_per_call", "price_per_call is required")
    svc = Service(
        id=str(uuid.uuid4()),
        provider_id=key.owner_id,
        name=req_str(data, "name", max_len=200),
        description=opt_str(data, "description", max_len=5000, default="") or "",
        endpoint=_endpoint(rt, data.get("endpoint")),
        price_units=_price(rt, data.get("price_per_call")),
        asset=rt.settings.default_asset,
        payment_method=_method(data.get("payment_method", "x402")),
        free_tier_calls=opt_int(data, "free_tier_calls", 0, lo=0, hi=2**31 - 1),
        allow_anonymous=opt_bool(data, "allow_anonymous", False),
        category=opt_str(data, "category", max_len=100, default="") or "",
        tags=_tags(data.get("tags", [])),
        status="active",
        created_at=now,
        updated_at=now,
        rate_limit=_rate_limit(data.get("rate_limit")),
    )
    await rt.registry.create_service(svc)
    if key.role == "provider" and key.owner_id not in rt.providers:  # type: ignore[attr-defined]
        rt.providers[key.owner_id] = now  # type: ignore[attr-defined]
    return json_response(render(svc, rt.settings.asset_decimals, owner_view=True), status=201)


async def list_services(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    q = request.query
    status = q.get("status", "active")
    if status not in STATUSES:
        raise ApiError(400, "invalid_query", f"status must be one of {', '.join(STATUSES)}")
    limit = query_int(q.get("limit"), "limit", 50, 1, 100)
    offset = query_int(q.get("offset"), "offset", 0, 0, 10**9)
    items, total = await rt.registry.list_services(
        query=q.get("query") or q.get("q"),
        category=q.get("category"),
        status=status,
        limit=limit,
        offset=offset,
    )
    d = rt.settings.asset_decimals
    return json_response(
        {
            "services": [render(s, d, owner_view=False) for s in items],
            "count": len(items),
            "total": total,
            "offset": offset,
            "limit": limit,
        }
    )


async def get_service(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    svc = await rt.registry.get_service(request.match_info["service_id"])
    if svc is None:
        raise ApiError(404, "service_not_found", "no such service")
    caller = await rt.keys.authenticate(request, required=False)
    owner = caller is not None and (caller.role == "admin" or caller.owner_id == svc.provider_id)
    return json_response(render(svc, rt.settings.asset_decimals, owner_view=owner))


async def patch_service(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    _, svc = await _owned(rt, request)
    data = await read_json(request)
    changes: dict[str, Any] = {}
    for name, value in data.items():
        if name == "name":
            changes["name"] = req_str(data, "name", max_len=200)
        elif name == "description":
            changes["description"] = opt_str(data, "description", max_len=5000) or ""
        elif name == "endpoint":
            changes["endpoint"] = _endpoint(rt, value)
        elif name == "price_per_call":
            changes["price_units"] = _price(rt, value)
        elif name == "status":
            if value not in STATUSES:
                raise fail("status", f"status must be one of {', '.join(STATUSES)}")
            changes["status"] = value
        elif name == "category":
            changes["category"] = opt_str(data, "category", max_len=100) or ""
        elif name == "tags":
            changes["tags"] = _tags(value)
        elif name == "payment_method":
            changes["payment_method"] = _method(value)
        elif name == "free_tier_calls":
            changes["free_tier_calls"] = opt_int(data, "free_tier_calls", 0, lo=0, hi=2**31 - 1)
        elif name == "allow_anonymous":
            changes["allow_anonymous"] = opt_bool(data, "allow_anonymous", False)
        elif name == "rate_limit":
            changes["rate_limit"] = _rate_limit(value)
        else:
            raise fail(name, f"{name} cannot be changed")
    updated = await rt.registry.update_service(svc.id, changes) if changes else svc
    rt.services.forget(svc.id)
    assert updated is not None
    return json_response(render(updated, rt.settings.asset_decimals, owner_view=True))


async def delete_service(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    _, svc = await _owned(rt, request)
    await rt.registry.update_service(svc.id, {"status": "removed"})
    rt.services.forget(svc.id)
    return json_response({"status": "removed", "id": svc.id})
