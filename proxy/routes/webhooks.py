"""Webhook subscriptions and their deliveries (ACF: Webhooks).

Subscribing checks the URL against the SSRF policy (https only unless
``webhook_allow_http``); the delivery worker checks again at connect time.
The outbox, the worker and the service.called hook are in ``billing.webhooks``;
this module wires them into the process (``on_startup``/``on_cleanup``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from billing import webhooks as wh
from proxy.errors import json_response, read_json
from proxy.runtime import RT, Runtime
from proxy.validation import query_int


@dataclass
class WebhookState:
    cache: wh.SubscriberCache
    worker: wh.DeliveryWorker


def state(rt: Runtime) -> WebhookState:
    return rt.webhooks  # type: ignore[attr-defined,no-any-return]


async def subscribe(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    data = await read_json(request)
    s = rt.settings
    url = wh.check_webhook_url(
        data.get("url"), allow_http=s.webhook_allow_http, allow_private=s.allow_private_upstreams
    )
    events = wh.check_events(data.get("events"))
    provided = data.get("secret")
    secret = wh.check_secret(provided)
    sub = await wh.subscribe(
        rt.store, key.owner_id, url, events, secret, max_per_owner=s.webhook_max_per_owner
    )
    if wh.SERVICE_CALLED in events:
        state(rt).cache.add(key.owner_id)
    out = sub.render()
    # Returned once, at creation (a generated one must be saved now); never listed.
    out["secret"] = secret
    out["standard_secret"] = wh.standard_secret(secret)  # for Standard Webhooks libraries
    return json_response(out, status=201)


async def list_own(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    subs = await wh.list_subscriptions(rt.store, key.owner_id)
    return json_response({"webhooks": [x.render() for x in subs], "count": len(subs)})


async def delete(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    webhook_id = request.match_info["webhook_id"]
    await wh.unsubscribe(rt.store, key.owner_id, webhook_id)
    await state(rt).cache.refresh()
    return json_response({"status": "deleted", "webhook_id": webhook_id})


async def deliveries(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    limit = query_int(request.query.get("limit"), "limit", 50, 1, 200)
    items = await wh.list_deliveries(rt.store, key.owner_id, request.query.get("status"), limit)
    return json_response({"deliveries": items, "count": len(items)})


async def retry(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RT]
    key = await rt.keys.authenticate(request)
    did = request.match_info["delivery_id"]
    await wh.redrive(rt.store, key.owner_id, did)
    return json_response({"status": "pending", "delivery_id": did}, status=202)


ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/webhooks", subscribe),
    ("GET", "/webhooks", list_own),
    ("GET", "/webhooks/deliveries", deliveries),
    ("POST", "/webhooks/deliveries/{delivery_id}/retry", retry),
    ("DELETE", "/webhooks/{webhook_id}", delete),
]


async def on_startup(app: web.Application, rt: Runtime) -> None:
    s = rt.settings
    cache = wh.SubscriberCache(rt.store)
    await cache.refresh()
    rt.meter.finish_hooks.append(wh.service_called_hook(cache, s.asset_decimals))
    worker = wh.DeliveryWorker(
        rt.store,
        wh.WorkerConfig(
            max_attempts=s.webhook_max_attempts,
            backoff_base=s.webhook_backoff_base_seconds,
            timeout=s.webhook_timeout_seconds,
            poll_interval=s.webhook_poll_interval_seconds,
            allow_private=s.allow_private_upstreams,
        ),
    )
    worker.start()
    rt.webhooks = WebhookState(cache, worker)  # type: ignore[attr-defined]
    rt.background.append(
        asyncio.get_running_loop().create_task(cache.run(), name="webhook-subscribers")
    )


async def on_cleanup(app: web.Application, rt: Runtime) -> None:
    st = getattr(rt, "webhooks", None)
    if st is not None:
        await st.worker.stop()
