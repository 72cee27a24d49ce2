"""Webhooks: subscription rules (https, SSRF, limit), signed deliveries of every event,
retries with backoff into a visible dead-letter state, and delivery exactly once
across a receiver outage and a proxy restart."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from billing.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    PAYMENT_COMPLETED,
    SIGNATURE_HEADER,
    backoff_ms,
    enqueue_event,
    standard_headers,
    standard_secret,
    verify_signature,
)
from config.netpolicy import forbidden_address
from ledger.db import Store, open_store
from tests.support.tollway import free_port, start_inprocess, start_processes
from tests.support.upstream import Upstream

SECRET = "whsec_test_secret_0123456789"


@dataclass
class Receiver:
    """A real HTTP webhook receiver on 127.0.0.1."""

    port: int
    answer: int = 200
    received: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            self.received.append(
                {"body": body, "headers": dict(request.headers), "at": time.monotonic()}
            )
            return web.Response(status=self.answer, text="ok")

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def events(self) -> list[str]:
        return [r["headers"][EVENT_HEADER] for r in self.received]


async def until(pred, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll an (async) predicate until it is truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def check_signed(r: dict[str, Any], secret: str = SECRET) -> dict[str, Any]:
    h = r["headers"]
    assert h["Content-Type"] == "application/json"
    assert verify_signature(secret, r["body"], h[SIGNATURE_HEADER])
    # and per Standard Webhooks, checked by that library as a receiver would
    Webhook(standard_secret(secret)).verify(r["body"], dict(h))
    doc = json.loads(r["body"])
    assert doc["event"] == h[EVENT_HEADER] and doc["delivery_id"] == h[DELIVERY_HEADER]
    return doc


def test_a_replayed_standard_webhook_is_refused_by_its_receiver():
    """The id and timestamp are signed with the body: a delivery captured and sent
    again later fails the receiver's tolerance, and a moved timestamp the signature."""
    import datetime as dt

    from standardwebhooks.webhooks import WebhookVerificationError

    body = json.dumps({"event": "service.called", "delivery_id": "whd_1"})
    receiver = Webhook(standard_secret(SECRET))
    now = dt.datetime.now(dt.UTC)
    receiver.verify(body, standard_headers(SECRET, "whd_1", body, now))
    old = standard_headers(SECRET, "whd_1", body, now - dt.timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError):
        receiver.verify(body, old)
    moved = dict(old, **{"webhook-timestamp": str(int(now.timestamp()))})
    with pytest.raises(WebhookVerificationError):
        receiver.verify(body, moved)
    with pytest.raises(WebhookVerificationError):
        Webhook(standard_secret(SECRET + "x")).verify(
            body, standard_headers(SECRET, "whd_1", body, now)
        )


def test_backoff_doubles_from_the_base():
    assert [backoff_ms(1.0, n) for n in (1, 2, 3, 4)] == [1000, 2000, 4000, 8000]


async def test_subscribe_rules(db_url: str, tmp_path):
    tw = await start_inprocess(
        db_url, tmp=str(tmp_path), allow_private_upstreams=False, webhook_max_per_owner=3
    )
    try:
        p = await tw.key("prov", "provider")
        other = await tw.key("other")

        async def sub(url: str, events: Any = ("service.called",), key: str = p, **extra: Any):
            body = {
                "url": url,
                "events": list(events) if isinstance(events, tuple) else events,
                **extra,
            }
            return await tw.api("POST", "/api/v1/webhooks", key, json=body)

        assert (await sub("https://hooks.example.com/a"))[0] == 201
        for bad in (
            "http://hooks.example.com/a",
            "https://127.0.0.1/a",
            "https://localhost/a",
            "https://10.1.2.3/",
            "https://[::1]/a",
            "ftp://hooks.example.com/",
            "https://user:pw@hooks.example.com/",
            "nope",
        ):
            st, err, _ = await sub(bad)
            assert st == 422 and err["error"]["code"] == "validation_error", (bad, err)
        assert (await sub("https://hooks.example.com/a", events=["nope.event"]))[0] == 422
        assert (await sub("https://hooks.example.com/a", events=[]))[0] == 422
        assert (await sub("https://hooks.example.com/a", secret="short"))[0] == 422
        assert (
            await tw.api(
                "POST", "/api/v1/webhooks", None, json={"url": "https://hooks.example.com/"}
            )
        )[0] == 401

        st, given, _ = await sub(
            "https://hooks.example.com/b",
            events=["settlement.completed", "service.called"],
            secret=SECRET,
        )
        assert st == 201 and given["secret"] == SECRET
        assert (
            given["events"] == ["service.called", "settlement.completed"]
            and given["active"] is True
        )
        st, made, _ = await sub("https://hooks.example.com/c")
        assert made["secret"].startswith("whsec_") and len(made["secret"]) > 30
        st, err, _ = await sub("https://hooks.example.com/d")
        assert st == 409 and err["error"]["code"] == "webhook_limit_reached"

        st, listed, _ = await tw.api("GET", "/api/v1/webhooks", p)
        assert (
            st == 200
            and listed["count"] == 3
            and all("secret" not in w for w in listed["webhooks"])
        )
        assert (await tw.api("GET", "/api/v1/webhooks", other))[1]["count"] == 0
        assert (await tw.api("DELETE", f"/api/v1/webhooks/{made['id']}", other))[0] == 403
        assert (await tw.api("DELETE", "/api/v1/webhooks/wh_nope", p))[0] == 404
        st, gone, _ = await tw.api("DELETE", f"/api/v1/webhooks/{made['id']}", p)
        assert st == 200 and gone == {"status": "deleted", "webhook_id": made["id"]}
        assert (await tw.api("DELETE", f"/api/v1/webhooks/{made['id']}", p))[0] == 404
        assert (await sub("https://hooks.example.com/d"))[0] == 201  # room again
    finally:
        await tw.close()


async def test_every_event_is_delivered_signed(db_url: str, tmp_path, upstream: Upstream):
    rx = await Receiver(free_port()).start()
    brx = await Receiver(free_port()).start()
    tw = await start_inprocess(db_url, tmp=str(tmp_path), webhook_allow_http=True)
    try:
        store = tw.rt.store
        p = await tw.key("prov", "provider")
        quiet = await tw.key("quiet", "provider")
        sid = await tw.service(p, upstream.url, price="0.10")
        quiet_sid = await tw.service(quiet, upstream.url, price="0.10")
        b = await tw.key("buyer")
        await tw.credit("buyer", "1.00")
        st, hook, _ = await tw.api(
            "POST",
            "/api/v1/webhooks",
            p,
            json={
                "url": rx.url,
                "events": ["service.called", "settlement.completed"],
                "secret": SECRET,
            },
        )
        assert st == 201
        st, bhook, _ = await tw.api(
            "POST",
            "/api/v1/webhooks",
            b,
            json={
                "url": brx.url,
                "events": ["service.called", "payment.completed"],
                "secret": SECRET + "b",
            },
        )
        assert st == 201

        # A provider nobody listens to: nothing is queued for its calls.
        await tw.call(quiet_sid, "ok", b)
        before = int(await store.fetchval("SELECT COUNT(*) FROM webhook_deliveries"))
        assert before == 1  # only the buyer's own service.called

        st, _, h = await tw.call(sid, "ok", b)
        assert st == 200
        await until(
            lambda: len(rx.received) == 1 and len(brx.received) == 2,
            what="service.called deliveries",
        )
        doc = check_signed(rx.received[0])
        assert doc["event"] == "service.called" and doc["webhook_id"] == hook["id"]
        pl = doc["payload"]
        assert (pl["usage_id"], pl["service_id"], pl["buyer_id"], pl["provider_id"]) == (
            h["X-ACF-Usage-Id"],
            sid,
            "buyer",
            "prov",
        )
        assert (pl["amount"], pl["amount_units"], pl["asset"], pl["status_code"]) == (
            "0.10",
            100_000,
            "USDC",
            200,
        )
        # The buyer hears of both its calls (delivered concurrently: in any order).
        bdocs = [check_signed(r, SECRET + "b") for r in brx.received]
        assert h["X-ACF-Usage-Id"] in {d["payload"]["usage_id"] for d in bdocs}
        assert {d["webhook_id"] for d in bdocs} == {bhook["id"]}
        assert {d["payload"]["service_id"] for d in bdocs} == {sid, quiet_sid}

        # payment.completed: the helper other features call inside their own transaction.
        async with store.transaction() as tx:
            n = await enqueue_event(
                tx, "buyer", PAYMENT_COMPLETED, {"amount": "1.00", "rail": "stripe"}
            )
        assert n == 1
        await until(lambda: len(brx.received) == 3, what="payment.completed")
        assert check_signed(brx.received[2], SECRET + "b")["payload"] == {
            "amount": "1.00",
            "rail": "stripe",
        }
        # Rolled back with its transaction: never sent.
        try:
            async with store.transaction() as tx:
                await enqueue_event(tx, "buyer", PAYMENT_COMPLETED, {"amount": "9.99"})
                raise RuntimeError("the top-up failed")
        except RuntimeError:
            pass

        # settlement.completed when the payout is posted.
        st, s, _ = await tw.api(
            "POST",
            "/api/v1/settlements",
            tw.admin,
            json={"provider_id": "prov", "period": time.strftime("%Y-%m", time.gmtime())},
        )
        assert st == 201, s
        assert (
            await tw.api(
                "PATCH", f"/api/v1/settlements/{s['id']}/pay", tw.admin, json={"payment_tx": "0x1"}
            )
        )[0] == 200
        await until(lambda: "settlement.completed" in rx.events(), what="settlement.completed")
        sdoc = check_signed(rx.received[-1])
        assert sdoc["payload"]["id"] == s["id"] and sdoc["payload"]["net_amount"] == s["net_amount"]

        async def settled() -> bool:
            n = await store.fetchval(
                "SELECT COUNT(*) FROM webhook_deliveries WHERE status <> 'delivered'"
            )
            return int(n) == 0

        await until(settled, what="every delivery recorded as delivered")
        rows = await store.fetch("SELECT status FROM webhook_deliveries")
        assert {r["status"] for r in rows} == {"delivered"} and len(rows) == len(rx.received) + len(
            brx.received
        )
        assert len(brx.received) == 3 and rx.events() == ["service.called", "settlement.completed"]
        st, mine, _ = await tw.api("GET", "/api/v1/webhooks/deliveries?status=delivered", p)
        assert st == 200 and mine["count"] == 2
    finally:
        await tw.close()
        await rx.close()
        await brx.close()


async def test_failures_back_off_into_a_visible_dead_letter(
    db_url: str, tmp_path, upstream: Upstream
):
    rx = await Receiver(free_port(), answer=500).start()
    tw = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        webhook_allow_http=True,
        webhook_max_attempts=3,
        webhook_backoff_base_seconds=0.2,
        webhook_poll_interval_seconds=0.05,
    )
    try:
        p = await tw.key("prov", "provider")
        other = await tw.key("other", "provider")
        sid = await tw.service(p, upstream.url, price="0.10")
        b = await tw.key("buyer")
        await tw.credit("buyer", "1.00")
        st, _, _ = await tw.api(
            "POST",
            "/api/v1/webhooks",
            p,
            json={"url": rx.url, "events": ["service.called"], "secret": SECRET},
        )
        assert st == 201
        assert (await tw.call(sid, "ok", b))[0] == 200

        async def dead() -> list[dict[str, Any]]:
            _st, d, _ = await tw.api("GET", "/api/v1/webhooks/deliveries?status=dead", p)
            return d["deliveries"]

        [d] = await until(dead, what="the dead letter")
        assert d["attempts"] == 3 and d["last_status"] == 500 and "500" in d["last_error"]
        assert len(rx.received) == 3
        # Backoff: 0.2 s after the first failure, 0.4 s after the second.
        gaps = [b2["at"] - b1["at"] for b1, b2 in zip(rx.received, rx.received[1:], strict=False)]
        assert gaps[0] >= 0.19 and gaps[1] >= 0.39, gaps
        assert {x["delivery_id"] for x in [check_signed(r) for r in rx.received]} == {d["id"]}
        assert (await tw.api("GET", "/api/v1/webhooks/deliveries?status=dead", other))[1][
            "count"
        ] == 0
        assert (await tw.api("GET", "/api/v1/webhooks/deliveries?status=bogus", p))[0] == 400

        # The owner sends it again once the receiver is fixed.
        rx.answer = 200
        assert (await tw.api("POST", f"/api/v1/webhooks/deliveries/{d['id']}/retry", other))[
            0
        ] == 404
        assert (await tw.api("POST", f"/api/v1/webhooks/deliveries/{d['id']}/retry", p))[0] == 202
        await until(lambda: len(rx.received) == 4, what="the redelivery")

        async def delivered() -> list[str]:
            # The receiver has the request before the worker records its answer.
            _st, done, _ = await tw.api("GET", "/api/v1/webhooks/deliveries?status=delivered", p)
            return [x["id"] for x in done["deliveries"]]

        assert await until(delivered, what="the delivery recorded") == [d["id"]]
    finally:
        await tw.close()
        await rx.close()


async def test_connect_time_policy_refuses_a_name_that_resolves_to_loopback(
    db_url: str, tmp_path, upstream: Upstream
):
    host = socket.gethostname()
    # This host's own name resolves to a loopback or private address here (127.0.0.1 in /etc/hosts).
    assert forbidden_address(socket.gethostbyname(host)), (
        "the test needs a host name resolving to a private address"
    )
    rx = await Receiver(free_port()).start()
    tw = await start_inprocess(
        db_url,
        tmp=str(tmp_path),
        webhook_allow_http=True,
        allow_private_upstreams=False,
        webhook_max_attempts=1,
    )
    try:
        p = await tw.key("prov", "provider")
        st, hook, _ = await tw.api(
            "POST",
            "/api/v1/webhooks",
            p,
            json={
                "url": f"http://{host}:{rx.port}/hook",
                "events": ["payment.completed"],
                "secret": SECRET,
            },
        )
        assert st == 201, hook  # a name passes the literal check at subscribe time
        async with tw.rt.store.transaction() as tx:
            await enqueue_event(tx, "prov", PAYMENT_COMPLETED, {"amount": "1.00"})

        async def dead() -> list[dict[str, Any]]:
            return (await tw.api("GET", "/api/v1/webhooks/deliveries?status=dead", p))[1][
                "deliveries"
            ]

        [d] = await until(dead, what="the refused delivery")
        assert "network policy" in d["last_error"] and rx.received == []
    finally:
        await tw.close()
        await rx.close()


async def _delivery(db_url: str) -> dict[str, Any] | None:
    s: Store = open_store(db_url)
    await s.connect()
    try:
        r = await s.fetchrow("SELECT * FROM webhook_deliveries")
        return None if r is None else dict(r)
    finally:
        await s.close()


async def test_receiver_down_3s_and_proxy_restarted_event_delivered_exactly_once(
    db_url: str, tmp_path, upstream: Upstream
):
    rx = Receiver(free_port())  # not listening yet: connections are refused
    settings = {"webhook_allow_http": "true", "webhook_poll_interval_seconds": 0.1}
    tw = await start_processes(db_url, None, str(tmp_path), **settings)
    tw2 = None
    try:
        p = await tw.key("prov", "provider")
        sid = await tw.service(p, upstream.url, price="0.10")
        st, hook, _ = await tw.api(
            "POST",
            "/api/v1/webhooks",
            p,
            json={"url": rx.url, "events": ["service.called"], "secret": SECRET},
        )
        assert st == 201
        b = await tw.key("buyer")
        await tw.credit("buyer", "1.00")
        st, _, h = await tw.call(sid, "ok", b)
        t0 = time.monotonic()
        assert st == 200

        # The first attempt fails against the closed port; then the proxy restarts.
        first = await until(lambda: _attempted(db_url), what="a first failed attempt")
        assert first["status"] == "pending" and "connect" in first["last_error"]
        await tw.close()
        tw2 = await start_processes(db_url, None, str(tmp_path), **settings)

        await asyncio.sleep(max(0.0, t0 + 3.0 - time.monotonic()))  # the outage lasts 3 s
        await rx.start()
        await until(lambda: rx.received, timeout=30, what="the delivery")
        row = await until(lambda: _delivered(db_url), timeout=10, what="the delivered state")

        [got] = rx.received
        doc = check_signed(got)
        assert (
            doc["event"] == "service.called" and doc["payload"]["usage_id"] == h["X-ACF-Usage-Id"]
        )
        assert got["headers"][DELIVERY_HEADER] == row["id"] and doc["webhook_id"] == hook["id"]
        assert got["at"] >= t0 + 3.0 and int(row["attempts"]) >= 2
    finally:
        await tw.close()
        if tw2 is not None:
            await tw2.close()
        await rx.close()
    assert len(rx.received) == 1  # and nothing more after both processes stopped


async def _attempted(db_url: str) -> dict[str, Any] | None:
    d = await _delivery(db_url)
    return d if d is not None and int(d["attempts"]) >= 1 else None


async def _delivered(db_url: str) -> dict[str, Any] | None:
    d = await _delivery(db_url)
    return d if d is not None and d["status"] == "delivered" else None
