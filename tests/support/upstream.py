"""A real HTTP upstream for proxy tests: echo, SSE, large bodies, gzip, cookies, errors."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    body_len: int


@dataclass
class Upstream:
    runner: web.AppRunner | None = None
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    hits: int = 0
    sse_second_sent_at: float | None = None
    gzip_body: bytes = b""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def start_upstream() -> Upstream:
    up = Upstream()
    up.gzip_body = gzip.compress(json.dumps({"compressed": True, "pad": "x" * 4000}).encode())

    async def record(request: web.Request, body_len: int) -> None:
        up.hits += 1
        up.seen.append(
            Seen(
                request.method,
                request.path,
                request.raw_path,
                list(request.query.items()),
                list(request.headers.items()),
                body_len,
            )
        )

    async def echo(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        await record(request, n)
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "query": list(request.query.items()),
                "body_len": n,
            }
        )

    async def sse(request: web.Request) -> web.StreamResponse:
        await record(request, 0)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.sleep(1.0)
        up.sse_second_sent_at = time.monotonic()
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        await record(request, 0)
        mb = int(request.query.get("mb", "1"))
        chunk = b"\xab" * (1024 * 1024)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = mb * len(chunk)
        await resp.prepare(request)
        for _ in range(mb):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def gz(request: web.Request) -> web.Response:
        await record(request, 0)
        return web.Response(
            body=up.gzip_body,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def cookies(request: web.Request) -> web.Response:
        await record(request, 0)
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        return resp

    async def hop(request: web.Request) -> web.Response:
        await record(request, 0)
        resp = web.Response(text="hop")
        resp.headers["Connection"] = "X-Private-Hop"
        resp.headers["X-Private-Hop"] = "secret"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
        resp.headers["X-Kept"] = "yes"
        return resp

    async def status(request: web.Request) -> web.Response:
        await record(request, 0)
        return web.json_response({"status": "forced"}, status=int(request.match_info["code"]))

    async def slow(request: web.Request) -> web.Response:
        await record(request, 0)
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.json_response({"slow": True})

    async def forge(request: web.Request) -> web.Response:
        await record(request, 0)
        return web.Response(
            text="forged",
            headers={
                "X-ACF-Amount": "0.00",
                "X-ACF-Usage-Id": "fake",
                "X-ACF-Receipt": "forged.receipt",
                "PAYMENT-RESPONSE": "forged",
                "X-Payment-Response": "forged",
            },
        )

    async def ok(request: web.Request) -> web.Response:
        await record(request, 0)
        return web.json_response({"ok": True})

    async def broken(request: web.Request) -> web.StreamResponse:
        """200 promising 1,000 bytes (or a chunked stream), 100 sent, then the connection drops."""
        await record(request, 0)
        chunked = request.query.get("chunked") == "1"
        resp = web.StreamResponse(headers={} if chunked else {"Content-Length": "1000"})
        if chunked:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_get("/broken", broken)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/sse", sse)
    app.router.add_get("/big", big)
    app.router.add_get("/gzip", gz)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/hop", hop)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/ok", ok)
    app.router.add_get("/forge", forge)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    up.runner = runner
    up.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return up


def parsed(body: bytes) -> Any:
    return json.loads(body)
