"""Bad input gets a clear 4xx, never a 5xx, a crash or unbounded memory (issue 11).

Deep JSON to every JSON route (with an EVM rail loaded, whose py_ecc raises the
recursion limit, and without), bodies that arrive in several TCP segments,
strings and headers that are not valid text, numbers past any column, and a
flood of made-up service ids against a real `tollway serve` process.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest
from eth_account import Account

from ledger.verify import verify
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer
from tests.support.tollway import InProcess, start_inprocess, start_processes
from tests.support.upstream import Upstream

DEEP = 100_000


@pytest.fixture(scope="module")
def usdc(chain: EvmChain) -> str:
    return chain.deploy_token("USD Coin", "2")


@pytest.fixture(params=["evm", "plain"])
async def any_tw(
    request: pytest.FixtureRequest, tmp_path, node: JsonRpcServer, chain: EvmChain, usdc: str
) -> AsyncIterator[InProcess]:
    extra = {}
    if request.param == "evm":
        extra = {
            "evm_rpc_url": node.url,
            "evm_token_address": usdc,
            "evm_pay_to": Account.create().address,
            "evm_gas_private_key": chain.new_account().key.hex(),
        }
    t = await start_inprocess(f"sqlite:///{tmp_path}/t.db", tmp=str(tmp_path), **extra)
    yield t
    await t.close()


def _json_routes(tw: InProcess) -> list[tuple[str, str]]:
    out = []
    for route in tw.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method not in ("POST", "PATCH", "PUT") or not path or "/proxy/" in path:
            continue
        out.append((route.method, re.sub(r"\{[^}]+\}", "x", path)))
    return sorted(set(out))


async def test_deep_json_to_every_json_route_is_a_4xx(any_tw: InProcess):
    tw = any_tw
    routes = _json_routes(tw)
    assert len(routes) >= 15, routes
    deep = b"[" * DEEP + b"]" * DEEP
    deep_obj = b'{"a":' * DEEP + b"1" + b"}" * DEEP
    for method, path in routes:
        for body in (deep, deep_obj):
            for auth in (None, tw.admin):
                st, data, _ = await tw.api(method, path, auth, data=body)
                # A rail this server does not run answers 503 "not configured" whatever
                # the body: an honest answer, not a server error.
                unconfigured = st == 503 and data["error"]["code"].endswith("not_configured")
                assert 400 <= st < 500 or unconfigured, (method, path, st, data)
    # still up, and a normal request works
    st, data, _ = await tw.api("POST", "/api/v1/keys", json={"owner_id": "alive"})
    assert st == 201, data


async def test_strings_and_headers_that_are_not_text_get_4xx(tollway: InProcess):
    tw = tollway
    st, data, _ = await tw.api(
        "POST", "/api/v1/keys", data=b'{"owner_id": "\\ud800"}', headers={"Content-Type": "x"}
    )
    assert st == 400 and data["error"]["code"] == "invalid_json", data
    prov = await tw.key("prov", "provider")
    for header in ("Authorization", "api-key"):
        value = b"Bearer acf_\xff\xfe:sec" if header == "Authorization" else b"acf_\xff:sec"
        st = await _raw_status(tw.base, "GET", "/api/v1/usage/me", {header: value})
        assert st == 401, (header, st)
    sid = await tw.service(prov, "http://127.0.0.1:9/", price="0")
    buyer = await tw.key("buyer")
    st = await _raw_status(
        tw.base,
        "GET",
        f"/api/v1/proxy/{sid}/x",
        {"Authorization": f"Bearer {buyer}".encode(), "Idempotency-Key": b"k\xff\xfe"},
    )
    assert st == 400
    # numbers past what any column or asset holds
    st, data, _ = await tw.api(
        "POST",
        "/api/v1/admin/credit",
        tw.admin,
        headers={"Idempotency-Key": "big"},
        json={"owner_id": "buyer", "amount": "9" * 5000},
    )
    assert st == 422, data
    st, data, _ = await tw.api(
        "POST",
        "/api/v1/services",
        prov,
        json={
            "name": "n",
            "endpoint": "http://127.0.0.1:9/",
            "price_per_call": "0",
            "free_tier_calls": 2**31,
        },
    )
    assert st == 422, data
    for period in (
        {"period": "9999-12"},
        {"period": "0000-01"},
        {"period_start": "2026-01-01", "period_end": "9999-12-31"},
    ):
        st, data, _ = await tw.api(
            "POST", "/api/v1/settlements", tw.admin, json={"provider_id": "prov", **period}
        )
        assert st == 422, (period, data)
    assert (await verify(tw.rt.store)).ok


async def _raw_status(base: str, method: str, path: str, headers: dict[str, bytes]) -> int:
    """Send raw header bytes (aiohttp's client refuses non-text headers)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
    for k, v in headers.items():
        head += k.encode() + b": " + v + b"\r\n"
    writer.write(head + b"Content-Length: 0\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def _send_in_segments(
    base: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    pieces: int = 4,
    pause: float = 0.05,
) -> tuple[int, bytes]:
    """One request whose body arrives in ``pieces`` TCP segments, a pause between each."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    step = max(1, len(body) // pieces)
    for i in range(0, len(body), step):
        await asyncio.sleep(pause)
        if writer.is_closing():
            break
        try:
            writer.write(body[i : i + step])
            await writer.drain()
        except ConnectionError:
            break  # the server answered early and closed
    raw = await reader.read()
    writer.close()
    head_raw, _, rest = raw.partition(b"\r\n\r\n")
    return int(head_raw.split()[1]), rest


async def test_json_in_several_segments_is_read_whole(tollway: InProcess):
    body = json.dumps({"owner_id": "segmented", "role": "buyer"}).encode()
    st, raw = await _send_in_segments(
        tollway.base, "POST", "/api/v1/keys", {"Content-Type": "application/json"}, body
    )
    assert st == 201, raw


async def test_invoice_bodies_in_several_segments_are_read_whole(
    tmp_path, node: JsonRpcServer, chain: EvmChain, usdc: str, upstream: Upstream
):
    from eth_account.messages import encode_defunct

    merchant = Account.create().address
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/inv.db",
        tmp=str(tmp_path),
        evm_rpc_url=node.url,
        evm_token_address=usdc,
        evm_pay_to=merchant,
        evm_confirmations=1,
        invoice_mint_rate_limit=1000,
    )
    try:
        prov = await tw.key("prov", "provider")
        sid = await tw.service(prov, upstream.url, price="0.01", allow_anonymous=True)
        payer = chain.new_account()
        chain.mint(usdc, payer.address, 10**6)
        body = json.dumps({"q": "x" * 20_000}).encode()
        path = f"/api/v1/proxy/{sid}/echo/seg"
        st, raw = await _send_in_segments(
            tw.base, "POST", path, {"X-Wallet-Address": payer.address}, body
        )
        assert st == 402, raw
        inv = json.loads(raw)["detail"]
        tx = chain.transfer_token(usdc, payer, merchant, 10_000)
        sig = payer.sign_message(encode_defunct(text=inv["payerMessage"])).signature.hex()
        headers = {"X-Invoice-Id": inv["invoiceId"], "X-Payment": tx, "X-Payer-Signature": sig}
        st, raw = await _send_in_segments(tw.base, "POST", path, headers, body, pieces=8)
        assert st == 200, raw
        assert json.loads(raw)["body_len"] == len(body)  # the upstream got all of it
        assert (await verify(tw.rt.store)).ok
    finally:
        await tw.close()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
async def test_ten_thousand_unknown_long_service_ids_cost_little_memory(tmp_path):
    tw = await start_processes(f"sqlite:///{tmp_path}/m.db", None, str(tmp_path))
    try:
        pid = tw.procs[0].pid
        conn = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def hit(i: int) -> int:
                sid = f"{i:08d}" + secrets.token_hex(3996)
                async with s.get(f"{tw.base}/api/v1/proxy/{sid}/x") as r:
                    await r.read()
                    return r.status

            # warm the process, then measure
            await asyncio.gather(*(hit(i) for i in range(200)))
            before = _rss_kb(pid)
            statuses: list[int] = []
            for start in range(0, 10_000, 500):
                statuses += await asyncio.gather(*(hit(i) for i in range(start, start + 500)))
            after = _rss_kb(pid)
        assert set(statuses) <= {401, 404}, set(statuses)
        assert after - before < 20 * 1024, (before, after)
    finally:
        await tw.close()


async def test_the_ip_limit_comes_before_lookups_keyed_by_caller_input(tmp_path):
    """Made-up service and key ids are counted against the IP limit before they are
    looked up: a flood of them gets 429, not a database read each."""
    tw = await start_inprocess(f"sqlite:///{tmp_path}/ip.db", tmp=str(tmp_path), ip_rate_limit=5)
    try:
        statuses = []
        for i in range(8):
            st, _, _ = await tw.api("GET", f"/api/v1/proxy/made-up-{i}/x")
            statuses.append(st)
        assert statuses[:5] == [404] * 5 and statuses[5:] == [429] * 3, statuses
        st, _, h = await tw.api("GET", "/api/v1/proxy/other/x", "acf_nope:sec_nope")
        assert st == 429 and int(h["Retry-After"]) >= 1
    finally:
        await tw.close()
