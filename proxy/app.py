"""The aiohttp application factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_cors
from aiohttp import web

from config import Settings
from ledger.db import Store
from proxy import metrics
from proxy.errors import edge_middleware
from proxy.forwarder import proxy_handler
from proxy.routes import account, keys, services
from proxy.runtime import RT, build_runtime, close_runtime, sweep_expired_holds

log = logging.getLogger("tollway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")

# (method, path under the API prefix, handler); every one is served under
# /api/v1 and under /api (ai-factory's unversioned alias).
API_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/keys", keys.create_key),
    ("POST", "/keys/validate", keys.validate_key),
    ("POST", "/services", services.register),
    ("GET", "/services", services.list_services),
    ("GET", "/services/{service_id}", services.get_service),
    ("PATCH", "/services/{service_id}", services.patch_service),
    ("DELETE", "/services/{service_id}", services.delete_service),
    ("POST", "/admin/credit", account.admin_credit),
    ("GET", "/usage/me", account.usage_me),
]

# Feature modules: each defines ROUTES (method, path under the API prefix,
# handler), and may define RAW_ROUTES (absolute paths), on_startup(app, rt)
# and on_cleanup(app, rt). Adding a feature never touches this factory.
FEATURE_MODULES = (
    "proxy.routes.payments",
    "proxy.routes.wallet",
    "proxy.routes.stripe_routes",
    "proxy.routes.settlements",
    "proxy.routes.webhooks",
    "proxy.routes.provider",
    "proxy.routes.identity",
)


def _features() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in FEATURE_MODULES]


def create_app(settings: Settings, *, store: Store | None = None) -> web.Application:
    app = web.Application(middlewares=[edge_middleware], client_max_size=settings.max_body_bytes)
    features = _features()
    extra: list[tuple[str, str, Handler]] = [r for f in features for r in getattr(f, "ROUTES", [])]
    routes: list[tuple[str, str, Handler]] = []
    for prefix in ("/api/v1", "/api"):
        for method, path, handler in API_ROUTES + extra:
            routes.append((method, prefix + path, handler))
        for method in PROXY_METHODS:
            routes.append((method, prefix + "/proxy/{service_id}/{path:.*}", proxy_handler))
            routes.append((method, prefix + "/proxy/{service_id}", proxy_handler))
    for f in features:
        routes.extend(getattr(f, "RAW_ROUTES", []))
    routes.append(("GET", "/health", account.health))
    routes.append(("GET", "/metrics", metrics.metrics_handler))
    added = [app.router.add_route(m, p, h) for m, p, h in routes]
    try:
        from billing.receipts import WELL_KNOWN_PATH

        app.router.add_get(WELL_KNOWN_PATH, _receipt_keys)
    except ImportError:  # pragma: no cover
        pass

    if settings.cors_origins:
        defaults = {
            origin: aiohttp_cors.ResourceOptions(
                allow_credentials=False, expose_headers="*", allow_headers="*", allow_methods="*"
            )
            for origin in settings.cors_origins
        }
        cors = aiohttp_cors.setup(app, defaults=defaults)
        for r in added:
            cors.add(r)

    async def startup(app: web.Application) -> None:
        rt = await build_runtime(settings, store)
        app[RT] = rt
        for f in features:
            if hasattr(f, "on_startup"):
                await f.on_startup(app, rt)
        rt.background.append(
            asyncio.get_running_loop().create_task(
                sweep_expired_holds(rt, settings.hold_sweep_interval_seconds)
            )
        )

    async def cleanup(app: web.Application) -> None:
        if RT in app:
            for f in reversed(features):
                if hasattr(f, "on_cleanup"):
                    await f.on_cleanup(app, app[RT])
            await close_runtime(app[RT])

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app


async def _receipt_keys(request: web.Request) -> web.Response:
    rt = request.app[RT]
    if rt.receipts is None:
        return web.json_response({"keys": []})
    return web.json_response(rt.receipts.public_keys_document())
