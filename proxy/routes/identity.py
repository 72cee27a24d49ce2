"""Wallet sign-in: a key for a wallet's own owner id, given that wallet's signature.

``POST /auth/challenge`` ``{"address", "chain"}`` answers a message to sign (an
EIP-4361 message on EVM, the same text for CIP-8 on Cardano). ``POST
/auth/verify`` ``{"message", "signature", "key"}`` checks it, spends the
challenge, and mints a buyer key for the wallet's owner id, which holds what
its invoices and x402 payments left (see ``billing.wallet_signin``).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from billing.wallet_signin import WalletSignIn
from proxy.auth import mint_key
from proxy.errors import ApiError, json_response, read_json
from proxy.ratelimit import Limit
from proxy.routes.keys import DEFAULT_RATE_LIMIT
from proxy.runtime import RT, Runtime
from proxy.upstream_request import client_ip
from proxy.validation import opt_str, req_str


async def _signin(rt: Runtime) -> WalletSignIn:
    s = rt.settings
    evm = getattr(rt, "evm_client", None)
    chain_id = s.evm_chain_id or (await evm.chain_id() if evm is not None else None)
    return WalletSignIn(
        rt.store,
        rt.writer,
        partner=s.invoice_partner,
        evm_chain_id=chain_id,
        cardano_network=s.cardano_network if s.cardano_backend_url else None,
    )


async def _limit(request: web.Request, rt: Runtime) -> None:
    if not rt.settings.ip_rate_limit:
        return
    ip = client_ip(request, rt.settings.trust_forwarded_for)
    d = await rt.limiter.check(
        [Limit("ip", "signin:" + ip, max(1, rt.settings.ip_rate_limit // 10))]
    )
    if not d.allowed:
        raise ApiError(
            429, "rate_limited", "too many sign-ins from this address", headers=d.headers()
        )


async def challenge(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    await _limit(request, rt)
    data = await read_json(request)
    address = req_str(data, "address", max_len=200)
    chain = opt_str(data, "chain", max_len=40)
    origin = rt.settings.public_origin
    c = await (await _signin(rt)).challenge(
        address, chain, domain=origin.split("://", 1)[1], uri=origin
    )
    return json_response(
        {
            "nonce": c.nonce,
            "chain": c.chain,
            "address": c.address,
            "owner_id": c.owner_id,
            "message": c.message,
            "expires_at": c.expires_at,
        },
        status=201,
    )


async def verify(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    await _limit(request, rt)
    data = await read_json(request)
    message = req_str(data, "message", max_len=4000)
    signature = req_str(data, "signature", max_len=4000)
    key = opt_str(data, "key", max_len=4000)
    origin = rt.settings.public_origin
    proven = await (await _signin(rt)).verify(
        message, signature, key, domain=origin.split("://", 1)[1], uri=origin
    )
    rec, secret = mint_key(proven.owner_id, "buyer", DEFAULT_RATE_LIMIT, proven.address)
    existing = await rt.registry.keys_of(proven.owner_id)
    if any(k.role != "buyer" for k in existing):
        raise ApiError(409, "role_conflict", "this wallet's owner id holds keys of another role")
    await rt.registry.create_key(rec)
    body: dict[str, Any] = {
        "key_id": rec.key_id,
        "secret": secret,
        "owner_id": proven.owner_id,
        "address": proven.address,
        "chain": proven.chain,
        "role": "buyer",
        "rate_limit": rec.rate_limit,
        "message": "Save the secret: it cannot be retrieved again.",
    }
    return json_response(body, status=201)


ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/auth/challenge", challenge),
    ("POST", "/auth/verify", verify),
]


async def on_startup(app: web.Application, rt: Runtime) -> None:
    s = rt.settings
    if s.public_url is None and s.host not in ("127.0.0.1", "localhost", "::1"):
        # Wallets compare a sign-in message's domain with the page that asks for it.
        logging.getLogger("tollway.identity").warning(
            "public_url is not set: wallet sign-in messages will name %s; set it to the"
            " origin buyers use (https://api.example.com)",
            s.public_origin,
        )
