"""``tollway demo``: a demo upstream, a priced service and a funded buyer key.

Everything runs on 127.0.0.1 in one process on the embedded default (SQLite
under ./data, in-process limiter), so a newcomer sees a metered call with no
servers installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
from typing import Any

import aiohttp
from aiohttp import web

from config import load


async def _demo_upstream() -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "message": "hello from the demo upstream",
                "path": request.path,
                "query": request.query_string,
            }
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: tick {i}\n\n".encode())
            await asyncio.sleep(0.5)
        return resp

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


async def run_demo(args: argparse.Namespace) -> int:
    from proxy.app import create_app

    admin = f"admin_demo:{secrets.token_urlsafe(24)}"
    settings = load(
        getattr(args, "config", None),
        overrides={
            "port": args.port,
            "admin_key": admin,
            "allow_private_upstreams": True,
            "database_url": getattr(args, "database_url", None) or "sqlite:///./data/demo.db",
            "receipts_dir": "./data/demo-receipts",
        },
    )
    upstream, up_port = await _demo_upstream()
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    base = f"http://{settings.host}:{settings.port}"
    try:
        async with aiohttp.ClientSession() as s:

            async def call(
                method: str, path: str, auth: str | None = None, **kw: Any
            ) -> dict[str, Any]:
                headers = kw.pop("headers", {})
                if auth:
                    headers["Authorization"] = f"Bearer {auth}"
                async with s.request(method, base + path, headers=headers, **kw) as r:
                    data = await r.json()
                    if r.status >= 300:
                        raise RuntimeError(f"{method} {path}: {r.status} {data}")
                    return data

            prov = await call(
                "POST",
                "/api/v1/keys",
                admin,
                json={"owner_id": f"demo-provider-{secrets.token_hex(3)}", "role": "provider"},
            )
            pkey = f"{prov['key_id']}:{prov['secret']}"
            svc = await call(
                "POST",
                "/api/v1/services",
                pkey,
                json={
                    "name": "Demo echo",
                    "endpoint": f"http://127.0.0.1:{up_port}",
                    "price_per_call": "0.01",
                    "free_tier_calls": 2,
                    "category": "demo",
                },
            )
            buyer_id = f"demo-buyer-{secrets.token_hex(3)}"
            buyer = await call("POST", "/api/v1/keys", json={"owner_id": buyer_id})
            bkey = f"{buyer['key_id']}:{buyer['secret']}"
            await call(
                "POST",
                "/api/v1/admin/credit",
                admin,
                headers={"Idempotency-Key": f"demo-{buyer_id}"},
                json={"owner_id": buyer_id, "amount": "1.00"},
            )
            url = f"{base}/api/v1/proxy/{svc['id']}/hello?name=agent"
            print("Tollway demo is running (SQLite under ./data, in-process limiter).")
            print(
                f"  service {svc['id']}: 0.01 USDC per call, 2 free calls; buyer {buyer_id} holds 1.00 USDC"
            )
            print("Try a metered call (the first two are free, then 0.01 each):")
            print(f"  curl -i -H 'Authorization: Bearer {bkey}' '{url}'")
            if args.once:
                async with s.get(url, headers={"Authorization": f"Bearer {bkey}"}) as r:
                    body = await r.text()
                    print(f"\nHTTP {r.status}")
                    for h in (
                        "X-ACF-Usage-Id",
                        "X-ACF-Amount",
                        "X-ACF-Free-Tier",
                        "X-ACF-Latency-Ms",
                        "X-Request-Id",
                    ):
                        print(f"{h}: {r.headers.get(h)}")
                    print(body)
                    print(
                        json.dumps(
                            {
                                "status": r.status,
                                "headers": {
                                    k: v for k, v in r.headers.items() if k.startswith("X-")
                                },
                                "body": body,
                            }
                        )
                    )
                return 0
            print("Ctrl-C stops it.")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            return 0
    finally:
        await runner.cleanup()
        await upstream.cleanup()
