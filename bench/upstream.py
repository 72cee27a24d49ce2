"""The fast upstream the benchmark proxies to (aiohttp, one process).

Endpoints (any method):
  /json                a small JSON answer (~60 bytes), like a cheap API call
  /sse                 text/event-stream: the first event at once, then N more
                       (?n=, default 2) 10 ms apart, then the stream ends
  /large/{nbytes}      a body of nbytes generated on the fly in 256 KiB chunks
                       (never stored; 1 GiB costs no memory), with Content-Length
Also /health.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

SMALL = json.dumps({"ok": True, "result": {"answer": 42, "unit": "widgets"}}).encode()
CHUNK = b"x" * (256 * 1024)


async def small(request: web.Request) -> web.Response:
    if request.can_read_body:
        await request.read()
    return web.Response(body=SMALL, content_type="application/json")


async def sse(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "2"))
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    await resp.write(b'event: message\ndata: {"seq": 0}\n\n')
    for i in range(1, n + 1):
        await asyncio.sleep(0.010)
        await resp.write(b'event: message\ndata: {"seq": %d}\n\n' % i)
    await resp.write_eof()
    return resp


async def large(request: web.Request) -> web.StreamResponse:
    total = int(request.match_info["nbytes"])
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = total
    await resp.prepare(request)
    view = memoryview(CHUNK)
    left = total
    while left > 0:
        n = min(left, len(CHUNK))
        await resp.write(view[:n])
        left -= n
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/json", small)
    app.router.add_route("*", "/sse", sse)
    app.router.add_route("*", "/large/{nbytes:\\d+}", large)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
