"""POST /keys and /keys/validate (ACF: Authentication)."""

from __future__ import annotations

import hmac

from aiohttp import web

from billing.owners import self_chosen_refusal
from ledger.db import DuplicateError
from proxy.auth import ROLES, hash_secret, mint_key
from proxy.errors import ApiError, json_response, read_json
from proxy.ratelimit import Limit
from proxy.runtime import RT, Runtime
from proxy.upstream_request import client_ip
from proxy.validation import opt_str, req_str

# Per minute, for every key minted without an admin's grant.
DEFAULT_RATE_LIMIT = 60


async def create_key(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    data = await read_json(request)
    owner_id = req_str(data, "owner_id", max_len=128)
    role = data.get("role", "buyer")
    if role not in ROLES:
        raise ApiError(
            422, "validation_error", f"role must be one of {', '.join(ROLES)}", field="role"
        )
    rate_limit = data.get("rate_limit", DEFAULT_RATE_LIMIT)
    if (
        not isinstance(rate_limit, int)
        or isinstance(rate_limit, bool)
        or not 1 <= rate_limit <= 1_000_000_000
    ):
        raise ApiError(
            422, "validation_error", "rate_limit must be an integer from 1", field="rate_limit"
        )
    wallet_address = opt_str(data, "wallet_address", max_len=128)

    caller = await rt.keys.authenticate(request, required=False)
    is_admin = caller is not None and caller.role == "admin"
    if not is_admin:
        # Buyers do not choose their own limits: only an admin grants another.
        rate_limit = (
            min(rate_limit, caller.rate_limit) if caller is not None else DEFAULT_RATE_LIMIT
        )
        refusal = self_chosen_refusal(owner_id)
        if refusal is not None and (caller is None or caller.owner_id != owner_id):
            raise ApiError(403, "owner_id_reserved", refusal, field="owner_id")
    existing = await rt.registry.keys_of(owner_id)
    if role in ("provider", "admin"):
        if caller is None or caller.role != "admin":
            raise ApiError(403, "forbidden", f"{role} keys are created with an admin key")
    elif existing:
        # A new key for an existing owner spends that owner's wallet: only the
        # owner (or an admin) may mint it.
        if caller is None or (caller.owner_id != owner_id and caller.role != "admin"):
            raise ApiError(
                403, "forbidden", "this owner_id exists; authenticate as its owner to add a key"
            )
    if (
        existing
        and any(k.role != role for k in existing)
        and (caller is None or caller.role != "admin")
    ):
        raise ApiError(409, "role_conflict", "this owner_id already holds keys of another role")
    # Every new owner id costs a mint from this address, whoever asks: free tiers
    # and default limits are per owner, so owner ids must not be free to mass-produce.
    if not is_admin and not existing and rt.settings.ip_rate_limit:
        d = await rt.limiter.check(
            [
                Limit(
                    "ip",
                    "mint:" + client_ip(request, rt.settings.trust_forwarded_for),
                    max(1, rt.settings.ip_rate_limit // 10),
                )
            ]
        )
        if not d.allowed:
            raise ApiError(
                429, "rate_limited", "too many keys created from this address", headers=d.headers()
            )

    rec, secret = mint_key(owner_id, role, rate_limit, wallet_address)
    try:
        # Without keys, an owner id that exists (credited by an admin, say) is still
        # taken: only an admin's grant may hand it a first key.
        created = await rt.registry.create_key(rec, new_owner=not existing and not is_admin)
    except DuplicateError:  # pragma: no cover - 64 random bits
        raise ApiError(409, "conflict", "key id collision, retry") from None
    if not created:
        raise ApiError(409, "owner_taken", "this owner_id is taken")
    if role == "provider" and owner_id not in rt.providers:  # type: ignore[attr-defined]
        rt.providers[owner_id] = rec.created_at  # type: ignore[attr-defined]
    return json_response(
        {
            "key_id": rec.key_id,
            "secret": secret,
            "owner_id": owner_id,
            "role": role,
            "rate_limit": rate_limit,
            "message": "Save the secret: it cannot be retrieved again.",
        },
        status=201,
    )


async def validate_key(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    data = await read_json(request)
    key_id = req_str(data, "key_id", max_len=128)
    secret = req_str(data, "secret", max_len=256)
    rec = await rt.keys.lookup(key_id)
    ok = rec is not None and hmac.compare_digest(rec.secret_hash, hash_secret(key_id, secret))
    if not ok or rec is None or rec.status != "active":
        raise ApiError(401, "unauthorized", "invalid credentials")
    return json_response(
        {"valid": True, "owner_id": rec.owner_id, "role": rec.role, "rate_limit": rec.rate_limit}
    )
