"""Admin credit, usage and health."""

from __future__ import annotations

from aiohttp import web

from billing import card_funds
from billing.money import AmountError, format_amount, parse_amount
from billing.owners import canonical_owner_id
from ledger import journal as j
from ledger import ops
from ledger.db import DuplicateError
from ledger.journal import now_ms
from proxy.auth import require_role
from proxy.errors import ApiError, json_response, read_json
from proxy.runtime import RT, VERSION, Runtime
from proxy.validation import fail, req_str


async def admin_credit(request: web.Request) -> web.Response:
    """Credit a wallet from ``world``: the stand-in for real top-ups (tests, demo, support)."""
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    require_role(key, "admin")
    idem = request.headers.get("Idempotency-Key")
    if not idem or len(idem) > 255:
        raise ApiError(
            400, "idempotency_key_required", "an Idempotency-Key header (1..255 chars) is required"
        )
    data = await read_json(request)
    owner = req_str(data, "owner_id", max_len=128)
    asset = data.get("asset", rt.settings.default_asset)
    if asset != rt.settings.default_asset:
        raise fail("asset", f"asset must be {rt.settings.default_asset}")
    try:
        amount = parse_amount(data.get("amount"), rt.settings.asset_decimals, allow_zero=False)
    except AmountError as e:
        raise fail("amount", str(e)) from None
    owner = canonical_owner_id(owner)
    credit = ops.Credit(owner, asset, amount, "admin_credit", f"admin_credit:{idem}")

    async def op(tx):  # type: ignore[no-untyped-def]
        # The credited id is claimed with the money: a later anonymous mint of it
        # finds it taken instead of inheriting the balance.
        await tx.execute(
            "INSERT INTO owners (owner_id, created_at) VALUES ($1, $2)"
            " ON CONFLICT (owner_id) DO NOTHING",
            owner,
            now_ms(),
        )
        res = await ops.credit(tx, credit)
        if not res["replayed"]:
            # An owner in debt for card money taken back pays it first, as with
            # any credit (billing.card_funds); a replay already did.
            await card_funds.settle_debt(tx, owner, asset, now_ms(), ref=res["transfer_id"])
        return res

    try:
        res = await rt.writer.submit(op)
    except DuplicateError:
        raise ApiError(
            409, "idempotency_conflict", "this Idempotency-Key was used for another credit"
        ) from None
    bal = await rt.store.fetchval(
        "SELECT balance FROM accounts WHERE id = $1", j.wallet(owner, asset).id
    )
    d = rt.settings.asset_decimals
    return json_response(
        {
            "transfer_id": res["transfer_id"],
            "owner_id": owner,
            "asset": asset,
            "amount": format_amount(amount, d),
            "balance": format_amount(int(bal or 0), d),
            "replayed": res["replayed"],
        },
        status=200 if res["replayed"] else 201,
    )


async def usage_me(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    await rt.meter.leases.flush(timeout=2.0)  # this worker's leased calls, posted before the read
    row = await rt.store.fetchrow(
        "SELECT COUNT(*) AS calls, COALESCE(SUM(amount), 0) AS spent, AVG(latency_ms) AS lat,"
        " COALESCE(SUM(free_tier), 0) AS free FROM usage_records WHERE buyer_id = $1",
        key.owner_id,
    )
    d = rt.settings.asset_decimals
    assert row is not None
    return json_response(
        {
            "buyer_id": key.owner_id,
            "total_calls": int(row["calls"]),
            "total_spent_usd": format_amount(int(row["spent"]), d),
            "total_spent_units": int(row["spent"]),
            "free_tier_calls": int(row["free"]),
            "avg_latency_ms": None if row["lat"] is None else round(float(row["lat"]), 1),
        }
    )


async def health(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    status, database = "ok", "ok"
    try:
        await rt.store.fetchval("SELECT 1")
    except Exception:
        status, database = "degraded", "down"
    redis = rt.redis_state
    if redis == "ok" and hasattr(rt.limiter, "ping") and not await rt.limiter.ping():
        redis = "down"
    body = {
        "status": status,
        "version": VERSION,
        "storage": rt.store.kind,
        "database": database,
        "redis": redis,
    }
    if status != "ok":
        return web.json_response(body, status=503, headers={"Retry-After": "2"})
    return json_response(body)
