"""A property-based fuzzer over every route (issue 11): zero 5xx, a clean ledger after.

Hypothesis draws the route, the path parameters, the query, the JSON body
(known field names with values of every type and size, unknown fields,
non-JSON, strings that are not Unicode) and the credentials (none, garbage,
a buyer's, a provider's, the admin's). The server is a real in-process
Tollway, with an EVM rail on the in-process chain, on SQLite and PostgreSQL.
Bounded: a fixed number of examples per store, no deadline per example.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from typing import Any
from urllib.parse import quote

import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.verify import verify
from tests.support.evm_chain import EvmChain
from tests.support.jsonrpc_server import JsonRpcServer
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import start_upstream

EXAMPLES = int(os.environ.get("TOLLWAY_FUZZ_EXAMPLES", "400"))

FIELDS = [
    "address",
    "amount",
    "asset",
    "category",
    "chain",
    "description",
    "endpoint",
    "events",
    "key",
    "key_id",
    "message",
    "method",
    "name",
    "owner_id",
    "payment_method",
    "payment_tx",
    "price_per_call",
    "provider_id",
    "rate_limit",
    "role",
    "secret",
    "settlement_id",
    "settlement_ids",
    "signature",
    "source",
    "tags",
    "to_address",
    "tx_hash",
    "url",
    "wallet_address",
    "free_tier_calls",
    "allow_anonymous",
    "period",
    "period_start",
    "period_end",
    "status",
    "threshold",
    "enabled",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["0.01", "-1", "1e9", "9" * 80, "2026-13", "9999-12", "0x" + "ab" * 32, ""]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=6).map(
        lambda d: json.dumps(d).encode()
    ),
    st.sampled_from(
        [b"", b"null", b"[]", b"{", b'{"owner_id": "\\ud800x"}', b"\xff\xfe", b"1" * 5000]
    ),
    st.binary(max_size=200),
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Idempotency-Key": st.text(
            alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=300
        ),
        "X-Batch-Target": st.sampled_from(["0", "5", "x", "100001", "9" * 50]),
        "X-Wallet-Address": st.sampled_from(["0x" + "12" * 20, "bogus", "addr1xyz"]),
        "X-Invoice-Id": st.sampled_from(["inv_missing", "x" * 300]),
        "X-Payment": st.sampled_from(["0x" + "cd" * 32, "zz"]),
        "PAYMENT-SIGNATURE": st.sampled_from(["e30=", "not base64", "eyJ4NDAyVmVyc2lvbiI6Mn0="]),
    },
)


class Server:
    """Tollway and its upstream on an event loop of their own, for a synchronous fuzzer."""

    def __init__(self, db_url: str, tmp: str, evm: dict[str, Any]):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tw: InProcess = self.run(self._start(db_url, tmp, evm))

    async def _start(self, db_url: str, tmp: str, evm: dict[str, Any]) -> InProcess:
        self.up = await start_upstream()
        tw = await start_inprocess(db_url, tmp=tmp, **evm)
        self.provider = await tw.key("prov", "provider")
        self.buyer = await tw.key("buyer")
        await tw.credit("buyer", "5.00")
        self.sid = await tw.service(
            self.provider, self.up.url, price="0.01", free=2, allow_anonymous=True
        )
        return tw

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.run(self.tw.close())
        self.run(self.up.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def _routes(tw: InProcess) -> list[tuple[str, str]]:
    out = set()
    for route in tw.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and route.method in ("GET", "POST", "PATCH", "PUT", "DELETE"):
            out.add((route.method, path))
    return sorted(out)


@pytest.fixture(scope="module")
def usdc(chain: EvmChain) -> str:
    return chain.deploy_token("USD Coin", "2")


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
def test_no_route_answers_5xx_to_anything(
    store_kind: str, tmp_path, node: JsonRpcServer, chain: EvmChain, usdc: str
):
    if store_kind == "sqlite":
        db_url = f"sqlite:///{tmp_path}/fuzz.db"
        drop = None
    else:
        from tests.support import services

        db_url = asyncio.run(services.create_pg_database())
        drop = db_url
    evm = {
        "evm_rpc_url": node.url,
        "evm_token_address": usdc,
        "evm_pay_to": Account.create().address,
        "evm_gas_private_key": chain.new_account().key.hex(),
        "invoice_mint_rate_limit": 0,
    }
    server = Server(db_url, str(tmp_path), evm)
    failures: list[str] = []
    try:
        routes = _routes(server.tw)
        assert len(routes) >= 30, routes
        creds = {
            "none": None,
            "garbage": "acf_nope:sec_nope",
            "buyer": server.buyer,
            "provider": server.provider,
            "admin": server.tw.admin,
        }

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=os.environ.get("TOLLWAY_FUZZ_RANDOM") is None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(
            route=st.sampled_from(routes),
            param=st.one_of(
                st.just(server.sid),
                st.text(max_size=30),
                st.sampled_from(["x" * 500, "..", "%00", "inv_missing"]),
            ),
            tail=st.text(max_size=20),
            query=st.dictionaries(
                st.sampled_from(["page", "page_size", "limit", "offset", "wallet", "period", "q"]),
                st.text(max_size=12) | st.integers().map(str),
                max_size=3,
            ),
            body=bodies,
            who=st.sampled_from(sorted(creds)),
            extra=headers,
        )
        def probe(route, param, tail, query, body, who, extra) -> None:
            method, template = route
            path = re.sub(r"\{tail[^}]*\}", quote(tail, safe="/"), template)
            path = re.sub(r"\{[^}]+\}", quote(param, safe="") or "x", path)
            if query:
                path += "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items())
            h = dict(extra)
            if method in ("POST", "PATCH", "PUT"):
                h["Content-Type"] = "application/json"
            st_, data, _ = server.run(server.tw.api(method, path, creds[who], data=body, headers=h))
            unconfigured = (
                st_ == 503
                and isinstance(data, dict)
                and str(data.get("error", {}).get("code", "")).endswith("not_configured")
            )
            if st_ >= 500 and not unconfigured and not (st_ in (502, 504) and "/proxy/" in path):
                failures.append(f"{method} {path} as {who}: {st_} {data!r:.300}")
            assert not failures, failures[-1]

        probe()
        report = server.run(verify(server.tw.rt.store))
        assert report.ok, report.render()
    finally:
        server.close()
        if drop:
            from tests.support import services

            asyncio.run(services.drop_pg_database(drop))
