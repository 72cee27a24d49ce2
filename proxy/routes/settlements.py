"""Settlements (ACF: Settlements) and the growth-program commission (ACF: Admin).

The money rules live in ``billing.settlements``; this module is the HTTP edge:
auth, parsing and the JSON shapes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from billing import settlements as st
from proxy.auth import require_role
from proxy.errors import ApiError, json_response, read_json
from proxy.runtime import RT, Runtime
from proxy.validation import fail, query_int, req_str


async def create(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "admin")
    data = await read_json(request)
    provider_id = req_str(data, "provider_id", max_len=128)
    asset = data.get("asset", rt.settings.default_asset)
    if asset != rt.settings.default_asset:
        raise fail("asset", f"asset must be {rt.settings.default_asset}")
    start, end = st.parse_period(data)
    res = await st.create_settlement(
        rt.store, st.FeePolicy.from_settings(rt.settings), provider_id, asset, start, end
    )
    if res.settlement is None:
        raise ApiError(
            422, "nothing_to_settle", "no unsettled charges for this provider in this period"
        )
    out = st.render(res.settlement, rt.settings.asset_decimals)
    out["replayed"] = not res.created
    return json_response(out, status=201 if res.created else 200)


async def list_all(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "provider", "admin")
    q = request.query
    status = q.get("status")
    if status is not None and status not in st.STATUSES:
        raise ApiError(400, "invalid_query", f"status must be one of {', '.join(st.STATUSES)}")
    limit = query_int(q.get("limit"), "limit", 50, 1, 100)
    if key.role == "admin":
        provider_id = q.get("provider_id")
    else:
        # Providers see only their own, whatever they ask for.
        if q.get("provider_id") not in (None, key.owner_id):
            raise ApiError(403, "forbidden", "providers see only their own settlements")
        provider_id = key.owner_id
    rows = await st.list_settlements(rt.store, provider_id=provider_id, status=status, limit=limit)
    d = rt.settings.asset_decimals
    return json_response({"settlements": [st.render(r, d) for r in rows], "count": len(rows)})


async def get_one(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "provider", "admin")
    row = await st.get(rt.store, request.match_info["settlement_id"])
    if row is None or (key.role != "admin" and row["provider_id"] != key.owner_id):
        raise ApiError(404, "settlement_not_found", "no such settlement")
    return json_response(st.render(row, rt.settings.asset_decimals))


async def pay(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "admin")
    data = await read_json(request)
    payment_tx = req_str(data, "payment_tx", max_len=256)
    row = await st.pay(
        rt.store, request.match_info["settlement_id"], payment_tx, rt.settings.asset_decimals
    )
    return json_response(
        {
            "status": st.COMPLETED,
            "payment_tx": payment_tx,
            "settlement_id": row["id"],
            "net_amount": st.render(row, rt.settings.asset_decimals)["net_amount"],
        }
    )


async def commission(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "admin")
    info = await st.commission(
        rt.store, st.FeePolicy.from_settings(rt.settings), request.match_info["provider_id"]
    )
    return json_response(info)


ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/settlements", create),
    ("GET", "/settlements", list_all),
    ("GET", "/settlements/{settlement_id}", get_one),
    ("PATCH", "/settlements/{settlement_id}/pay", pay),
    ("GET", "/admin/providers/{provider_id}/commission", commission),
]
