"""Foundation acceptance: forwarding, streaming, header hygiene, error shapes."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from proxy.cookies import cookie_prefix
from tests.support.tollway import InProcess
from tests.support.upstream import Upstream


async def _setup(tw: InProcess, up: Upstream, **svc) -> tuple[str, str]:
    pkey = await tw.key("prov", "provider")
    sid = await tw.service(pkey, up.url, **svc)
    bkey = await tw.key("buyer")
    return sid, bkey


async def test_call_returns_upstream_body_with_billing_headers(
    tollway: InProcess, upstream: Upstream
):
    sid, bkey = await _setup(tollway, upstream)
    st, body, h = await tollway.call(sid, "echo/a/b?x=1", bkey, headers={"X-Request-Id": "req-123"})
    assert st == 200
    data = json.loads(body)
    assert data["path"] == "/echo/a/b"
    for name in ("X-ACF-Usage-Id", "X-ACF-Amount", "X-ACF-Free-Tier", "X-ACF-Latency-Ms"):
        assert h.get(name), name
    assert h["X-Request-Id"] == "req-123"
    assert {k.lower(): v for k, v in upstream.seen[-1].headers}["x-request-id"] == "req-123"
    # made when absent, and echoed
    st, _, h2 = await tollway.call(sid, "echo", bkey)
    assert len(h2["X-Request-Id"]) >= 16


async def test_method_query_and_body_pass_through(tollway: InProcess, upstream: Upstream):
    sid, bkey = await _setup(tollway, upstream)
    payload = b"x" * 300_000
    st, body, _ = await tollway.call(
        sid, "echo/p?a=1&b=2&a=3&empty=", bkey, method="PUT", data=payload
    )
    assert st == 200
    data = json.loads(body)
    assert data["method"] == "PUT"
    assert data["query"] == [["a", "1"], ["b", "2"], ["a", "3"], ["empty", ""]]
    assert data["raw_path"] == "/echo/p?a=1&b=2&a=3&empty="
    assert data["body_len"] == len(payload)

    async def gen():
        for _ in range(10):
            yield b"y" * 10_000

    st, body, _ = await tollway.call(sid, "echo/chunked", bkey, method="POST", data=gen())
    assert st == 200 and json.loads(body)["body_len"] == 100_000


async def test_sse_first_event_arrives_before_second_is_sent(
    tollway: InProcess, upstream: Upstream
):
    sid, bkey = await _setup(tollway, upstream)
    async with tollway.session.get(
        f"{tollway.base}/api/v1/proxy/{sid}/sse", headers={"Authorization": f"Bearer {bkey}"}
    ) as r:
        assert r.status == 200
        assert r.headers["X-ACF-Usage-Id"]
        first = await r.content.readuntil(b"\n\n")
        got_first = time.monotonic()
        assert first == b"data: first\n\n"
        rest = await r.content.read()
    assert rest == b"data: second\n\n"
    assert upstream.sse_second_sent_at is not None
    assert got_first < upstream.sse_second_sent_at


async def test_hop_by_hop_stripped_and_credentials_never_reach_upstream(
    tollway: InProcess, upstream: Upstream
):
    sid, bkey = await _setup(tollway, upstream)
    st, _, h = await tollway.call(
        sid,
        "hop",
        None,
        headers={
            "Authorization": f"Bearer {bkey}",
            "api-key": "should-not-leak",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Custom": "kept",
        },
    )
    assert st == 200
    sent = {k.lower(): v for k, v in upstream.seen[-1].headers}
    assert "authorization" not in sent and "api-key" not in sent
    assert "x-drop-me" not in sent and "keep-alive" not in sent and "te" not in sent
    assert sent["x-custom"] == "kept"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert "X-Private-Hop" not in h and "Keep-Alive" not in h and "Proxy-Authenticate" not in h
    assert h["X-Kept"] == "yes"
    # the api-key header authenticates as well, and is stripped too
    st, _, _ = await tollway.call(sid, "echo", None, headers={"api-key": bkey})
    assert st == 200
    assert "api-key" not in {k.lower() for k, _ in upstream.seen[-1].headers}


async def test_gzip_body_is_byte_identical_and_cookies_repeat(
    tollway: InProcess, upstream: Upstream
):
    sid, bkey = await _setup(tollway, upstream)
    st, body, h = await tollway.call(sid, "gzip", bkey, headers={"Accept-Encoding": "gzip"})
    assert st == 200
    assert h["Content-Encoding"] == "gzip"
    assert body == upstream.gzip_body
    st, _, h = await tollway.call(sid, "cookies", bkey)
    p, path = cookie_prefix(sid), f"/api/v1/proxy/{sid}/"
    assert h.getall("Set-Cookie") == [f"{p}a=1; Path={path}", f"{p}b=2; Path={path}"]


async def test_a_cookie_set_by_one_service_never_reaches_another(
    tollway: InProcess, upstream: Upstream
):
    pkey = await tollway.key("prov", "provider")
    a = await tollway.service(pkey, upstream.url, name="a")
    b = await tollway.service(pkey, upstream.url, name="b")
    bkey = await tollway.key("buyer")
    st, _, h = await tollway.call(a, "cookies", bkey)
    assert st == 200
    set_by_a = [c.split(";")[0] for c in h.getall("Set-Cookie")]
    # a client that ignores Path and sends every cookie it holds, plus one of its own
    jar = "; ".join([*set_by_a, "session=buyer-secret"])
    st, _, _ = await tollway.call(b, "echo/b", bkey, headers={"Cookie": jar})
    assert st == 200
    assert "cookie" not in {k.lower() for k, _ in upstream.seen[-1].headers}
    st, _, _ = await tollway.call(a, "echo/a", bkey, headers={"Cookie": jar})
    assert st == 200
    sent = [v for k, v in upstream.seen[-1].headers if k.lower() == "cookie"]
    assert sent == ["a=1; b=2"]  # A gets its own cookies back, under their own names


async def test_error_cases_have_json_shape(tollway: InProcess, upstream: Upstream):
    pkey = await tollway.key("prov", "provider")
    sid = await tollway.service(pkey, upstream.url)
    bkey = await tollway.key("buyer")

    async def err(st_expected: int, code: str, *args, **kw):
        st, body, _ = await tollway.call(*args, **kw)
        assert st == st_expected, body
        e = json.loads(body)["error"]
        assert e["code"] == code and e["message"]

    await err(404, "service_not_found", "no-such-service", "x", bkey)
    st, _, _ = await tollway.api(
        "PATCH", f"/api/v1/services/{sid}", pkey, json={"status": "paused"}
    )
    assert st == 200
    await err(409, "service_paused", sid, "echo", bkey)
    await tollway.api("PATCH", f"/api/v1/services/{sid}", pkey, json={"status": "active"})
    for bad in (
        "../keys",
        "a/../../b",
        "%2e%2e/x",
        "a/%2E%2E/%2e%2e/x",
        "%252e%252e/x",
        "a/..%2fb",
        "..%5cx",
    ):
        await err(400, "invalid_path", sid, bad, bkey)
    assert all(".." not in s.path for s in upstream.seen)
    # over the limit by Content-Length, and by a chunked body that never states its size
    tw_limit = tollway.rt.settings.max_body_bytes
    await err(
        413, "payload_too_large", sid, "echo", bkey, method="POST", data=b"z" * (tw_limit + 1)
    )

    async def endless():
        for _ in range(tw_limit // 65536 + 5):
            yield b"q" * 65536

    await err(413, "payload_too_large", sid, "echo", bkey, method="POST", data=endless())
    # removed: 404
    await tollway.api("DELETE", f"/api/v1/services/{sid}", pkey)
    await err(404, "service_not_found", sid, "echo", bkey)


async def test_unreachable_and_timeout(tollway: InProcess, upstream: Upstream):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    pkey = await tollway.key("prov", "provider")
    dead = await tollway.service(pkey, f"http://127.0.0.1:{dead_port}")
    bkey = await tollway.key("buyer")
    st, body, _ = await tollway.call(dead, "x", bkey)
    assert st == 502 and json.loads(body)["error"]["code"] == "upstream_unreachable"


async def test_timeout_gives_504(tmp_path, upstream: Upstream):
    from tests.support.tollway import start_inprocess

    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/t.db", tmp=str(tmp_path), upstream_read_timeout=0.5
    )
    try:
        pkey = await tw.key("prov", "provider")
        sid = await tw.service(pkey, upstream.url)
        bkey = await tw.key("buyer")
        st, body, _ = await tw.call(sid, "slow?s=3", bkey)
        assert st == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    finally:
        await tw.close()


async def test_api_alias_without_version(tollway: InProcess, upstream: Upstream):
    sid, bkey = await _setup(tollway, upstream)
    async with tollway.session.get(
        f"{tollway.base}/api/proxy/{sid}/echo", headers={"Authorization": f"Bearer {bkey}"}
    ) as r:
        assert r.status == 200
    st, data, _ = await tollway.api("GET", f"/api/services/{sid}")
    assert st == 200 and data["id"] == sid


async def test_cors_preflight(tmp_path, upstream: Upstream):
    from tests.support.tollway import start_inprocess

    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/c.db", tmp=str(tmp_path), cors_origins="https://app.example"
    )
    try:
        async with tw.session.options(
            f"{tw.base}/api/v1/services",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        ) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    finally:
        await tw.close()


async def test_client_gone_before_headers_is_not_charged(tollway: InProcess, upstream: Upstream):
    sid, bkey = await _setup(tollway, upstream, price="0.50")
    await tollway.credit("buyer", "1.00")
    with_timeout = aiohttp.ClientTimeout(total=0.3)
    try:
        async with aiohttp.ClientSession(timeout=with_timeout) as s:
            async with s.get(
                f"{tollway.base}/api/v1/proxy/{sid}/slow?s=1",
                headers={"Authorization": f"Bearer {bkey}"},
            ) as r:
                await r.read()
    except TimeoutError:
        pass
    store = tollway.rt.store
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not await store.fetchval(
        "SELECT COUNT(*) FROM usage_records"
    ):
        await asyncio.sleep(0.05)
    usage = await store.fetchrow("SELECT amount, outcome, upstream_status FROM usage_records")
    assert (usage["amount"], usage["outcome"], usage["upstream_status"]) == (0, "voided", 499)
    assert await store.fetchval("SELECT status FROM holds") == "voided"
    st, _, h = await tollway.call(sid, "echo", bkey)
    assert st == 200 and h["X-ACF-Amount"] == "0.50"
    from ledger import journal as jj

    assert (
        await store.fetchval(
            "SELECT balance FROM accounts WHERE id = $1", jj.wallet("buyer", "USDC").id
        )
        == 500_000
    )


async def test_upstream_cannot_forge_billing_or_payment_headers(
    tollway: InProcess, upstream: Upstream
):
    sid, bkey = await _setup(tollway, upstream, price="0.25")
    await tollway.credit("buyer", "1.00")
    st, body, h = await tollway.call(sid, "forge", bkey)
    assert st == 200 and body == b"forged"
    assert h.getall("X-ACF-Amount") == ["0.25"]
    assert h["X-ACF-Usage-Id"] != "fake" and h.get("X-ACF-Receipt") != "forged.receipt"
    assert "PAYMENT-RESPONSE" not in h and "X-Payment-Response" not in h


async def test_a_body_trickled_past_the_upload_window_is_refused_and_not_charged(
    tmp_path, upstream: Upstream
):
    from tests.support.tollway import start_inprocess

    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/slow.db",
        tmp=str(tmp_path),
        upstream_connect_timeout=0.5,
        upstream_read_timeout=1.0,
        hold_ttl_seconds=3,
    )
    try:
        sid, bkey = await _setup(tw, upstream, price="0.50")
        await tw.credit("buyer", "1.00")

        async def trickle():
            for _ in range(6):
                yield b"x" * 10
                await asyncio.sleep(0.3)

        st, body, h = await tw.call(sid, "echo", bkey, method="POST", data=trickle())
        assert st == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        store = tw.rt.store
        from ledger import journal as jj

        assert (
            await store.fetchval(
                "SELECT balance FROM accounts WHERE id = $1", jj.wallet("buyer", "USDC").id
            )
            == 1_000_000
        )
        assert await store.fetchval("SELECT status FROM holds") == "voided"
    finally:
        await tw.close()


async def test_headers_say_what_was_really_charged_when_the_hold_expired(
    tmp_path, upstream: Upstream
):
    """A slow upstream answering after the hold expired: served, but not
    charged; the headers and the absent receipt say so."""
    from tests.support.tollway import start_inprocess

    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/exp.db",
        tmp=str(tmp_path),
        upstream_connect_timeout=0.5,
        upstream_read_timeout=5.0,
        hold_ttl_seconds=6,
        hold_sweep_interval_seconds=0.2,
    )
    try:
        sid, bkey = await _setup(tw, upstream, price="0.50")
        await tw.credit("buyer", "1.00")

        # Expire the hold while the upstream thinks (as a crashed peer's sweeper would).
        async def expire_soon():
            await asyncio.sleep(0.5)
            await tw.rt.store.execute("UPDATE holds SET expires_at = 0 WHERE status = 'pending'")

        task = asyncio.ensure_future(expire_soon())
        st, _, h = await tw.call(sid, "slow?s=1.5", bkey)
        await task
        assert st == 200
        assert h["X-ACF-Amount"] == "0.00" and "X-ACF-Receipt" not in h
        assert await tw.rt.store.fetchval("SELECT outcome FROM usage_records") == "hold_expired"
    finally:
        await tw.close()
