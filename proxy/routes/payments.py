"""402 payments: rails built at start from settings, and the invoice status endpoints."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Any

from aiohttp import web

from billing.invoice_terms import CardanoTerms, EvmTerms
from billing.invoices import InvoiceBook
from billing.payments import X402Gateway
from proxy.errors import ApiError, json_response
from proxy.paywall import Paywall
from proxy.runtime import RT, Runtime

log = logging.getLogger("tollway.payments")
# Time a settlement takes after the upstream answers (broadcast and one block).
X402_SETTLE_MARGIN_SECONDS = 6
_CLOSERS: web.AppKey[list[Any]] = web.AppKey("tollway_payment_closers", list)


async def invoice_status(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    book = rt.payments.invoices if rt.payments is not None else None
    if book is None:
        raise ApiError(404, "invoices_disabled", "invoice payments are not configured")
    status = await book.status(request.match_info["invoice_id"])
    if status is None:
        raise ApiError(404, "invoice_not_found", "no such invoice")
    return json_response(status)


async def batch_balance(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    book = rt.payments.invoices if rt.payments is not None else None
    if book is None:
        raise ApiError(404, "invoices_disabled", "invoice payments are not configured")
    partner = request.query.get("partner") or book.partner
    wallet = request.query.get("wallet")
    if not wallet or len(wallet) > 200:
        raise ApiError(400, "invalid_query", "wallet is required")
    # A wallet's balance answers only to that wallet (a key it claimed by signing
    # in, see /auth/challenge) or to an admin: an open lookup lists funded wallets.
    key = await rt.keys.authenticate(request)
    owners = {f"{partner}:{wallet}", f"{partner}:{wallet.strip().lower()}"}
    if key.role != "admin" and key.owner_id not in owners:
        raise ApiError(403, "forbidden", "only this wallet's own key or an admin may read it")
    return json_response(await book.balance(partner, wallet))


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/payments/status/{invoice_id}", invoice_status),
    ("GET", "/payments/balance", batch_balance),
]
# The invoice guide's clients call these without the /api prefix.
RAW_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/payments/status/{invoice_id}", invoice_status),
    ("GET", "/payments/balance", batch_balance),
]


async def on_startup(app: web.Application, rt: Runtime) -> None:
    s = rt.settings
    evm_client = None
    x402 = None
    evm_terms = None
    if s.evm_rpc_url:
        from billing.rails.evm import EvmClient

        evm_client = EvmClient(
            s.evm_rpc_url,
            expected_chain_id=s.evm_chain_id or None,
            gas_key=s.evm_gas_private_key,
            hot_wallet_key=s.evm_hot_wallet_private_key,
            payout_token=s.evm_token_address,
        )
        node_chain = await evm_client.chain_id()
        tokens = [(int(c), a) for c, _, a in (t.partition(":") for t in s.x402_tokens)]
        if not tokens and s.evm_token_address:
            tokens = [(node_chain, s.evm_token_address)]
        if s.evm_pay_to and tokens:
            from billing.rails import x402 as x402r

            rails = []
            for domain_chain, token in tokens:
                md = await evm_client.token_metadata(token)
                rails.append(
                    x402r.ExactEvmRail(
                        chain_id=domain_chain,
                        asset=token,
                        pay_to=s.evm_pay_to,
                        token_name=md.name,
                        token_version=md.version,
                        decimals=md.decimals,
                    )
                )
            if s.x402_facilitator_url:
                processor: Any = x402r.FacilitatorX402Processor(s.x402_facilitator_url, rails)
            else:
                processor = x402r.LocalX402Processor(rails, {r.chain_id: evm_client for r in rails})
            x402 = X402Gateway(
                processor,
                rails,
                rt.writer,
                rt.meter,
                asset=s.default_asset,
                chain_rail=f"eip155:{node_chain}",
                min_validity_seconds=math.ceil(s.upstream_connect_timeout + s.upstream_read_timeout)
                + X402_SETTLE_MARGIN_SECONDS,
                partner=s.invoice_partner,
            )
            if s.evm_token_address:
                evm_terms = EvmTerms(
                    node_chain,
                    s.evm_token_address,
                    s.evm_pay_to,
                    s.evm_confirmations,
                    decimals=s.asset_decimals,
                    asset=s.default_asset,
                )
    cardano_terms = cardano_rail = None
    if s.cardano_backend_url and s.cardano_pay_to:
        from billing.rails.cardano import CardanoRail

        cardano_rail = CardanoRail(
            s.cardano_backend_url, s.cardano_project_id or "", network=s.cardano_network
        )
        splits = tuple(
            (e.rpartition("=")[0], int(e.rpartition("=")[2])) for e in s.cardano_split_outputs
        )
        cardano_terms = CardanoTerms(
            s.cardano_network,
            s.cardano_pay_to,
            s.cardano_asset,
            Fraction(s.cardano_rate),
            splits,
            s.cardano_confirmations,
        )
    book = None
    if evm_terms is not None or cardano_terms is not None:
        book = InvoiceBook(
            rt.store,
            rt.writer,
            partner=s.invoice_partner,
            ttl_ms=s.invoice_ttl_seconds * 1000,
            hold_ttl_ms=s.hold_ttl_seconds * 1000,
            default_batch=s.invoice_batch_target,
            batch_ttl_ms=s.invoice_batch_ttl_seconds * 1000,
            evm=evm_terms,
            evm_client=evm_client,
            cardano=cardano_terms,
            cardano_rail=cardano_rail,
        )
    rt.evm_client = evm_client  # type: ignore[attr-defined]
    if x402 is not None or book is not None:
        rt.payments = Paywall(rt, x402, book)
        log.info(
            "payments: x402 %s, invoices on %s",
            "on" if x402 else "off",
            book.chains if book else [],
        )
    app[_CLOSERS] = [
        c for c in (evm_client, cardano_rail, getattr(x402, "processor", None)) if c is not None
    ]


async def on_cleanup(app: web.Application, rt: Runtime) -> None:
    for c in app.get(_CLOSERS, []):
        close = getattr(c, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.exception("closing %r", c)
