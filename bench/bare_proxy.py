"""The baseline: a bare aiohttp pass-through proxy.

One shared, pooled ClientSession; bodies streamed both ways, no buffering; no auth,
no metering. Everything Tollway does beyond forwarding is measured against this.
  ANY /proxy/{tail}  ->  {upstream}/{tail}
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def make_app(upstream: str) -> web.Application:
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        app["session"] = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
        )

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        url = f"{upstream}/{request.match_info['tail']}"
        if request.query_string:
            url += "?" + request.query_string
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        data = request.content if request.can_read_body else None
        async with session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    resp.headers.add(k, v)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.router.add_route("*", "/proxy/{tail:.*}", forward)
    app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        make_app(a.upstream.rstrip("/")), host=a.host, port=a.port, access_log=None, print=None
    )


if __name__ == "__main__":
    main()
