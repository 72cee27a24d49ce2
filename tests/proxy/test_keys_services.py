"""Keys (hashing, 401, 403), the service registry, the SSRF policy."""

from __future__ import annotations

import json
import secrets

from ledger.journal import now_ms
from ledger.registry import Service
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream


async def test_secrets_are_stored_only_as_hashes(tollway: InProcess):
    st, data, _ = await tollway.api("POST", "/api/v1/keys", json={"owner_id": "alice"})
    assert st == 201 and data["secret"].startswith("sec_")
    rows = await tollway.rt.store.fetch("SELECT * FROM api_keys")
    dumped = json.dumps([dict(r) for r in rows], default=str)
    assert data["secret"] not in dumped
    assert data["secret"][4:] not in dumped
    assert all(r["secret_hash"].startswith("sha256$") for r in rows)
    st, v, _ = await tollway.api(
        "POST", "/api/v1/keys/validate", json={"key_id": data["key_id"], "secret": data["secret"]}
    )
    assert st == 200 and v == {
        "valid": True,
        "owner_id": "alice",
        "role": "buyer",
        "rate_limit": 60,
    }


async def test_wrong_secret_and_malformed_credentials_get_401(
    tollway: InProcess, upstream: Upstream
):
    key = await tollway.key("alice")
    key_id = key.split(":")[0]
    for auth in (f"{key_id}:sec_wrong", "acf_unknown:sec_x", "no-colon"):
        st, data, _ = await tollway.api("GET", "/api/v1/usage/me", auth)
        assert st == 401 and data["error"]["code"] == "unauthorized"
    st, data, _ = await tollway.api(
        "GET", "/api/v1/usage/me", headers={"Authorization": f"Basic {key}"}
    )
    assert st == 401
    st, data, _ = await tollway.api(
        "POST", "/api/v1/keys/validate", json={"key_id": key_id, "secret": "nope"}
    )
    assert st == 401
    st, _, _ = await tollway.api("GET", "/api/v1/usage/me", headers={"api-key": key})
    assert st == 200


async def test_role_rules(tollway: InProcess, upstream: Upstream):
    buyer = await tollway.key("bob")
    # provider and admin keys need an admin key
    for auth in (None, buyer):
        st, data, _ = await tollway.api(
            "POST", "/api/v1/keys", auth, json={"owner_id": "p", "role": "provider"}
        )
        assert st == 403 and data["error"]["code"] == "forbidden"
    # a buyer cannot register services
    st, _, _ = await tollway.api(
        "POST",
        "/api/v1/services",
        buyer,
        json={"name": "x", "endpoint": upstream.url, "price_per_call": "0"},
    )
    assert st == 403
    # nobody mints a key for someone else's existing owner id
    st, _, _ = await tollway.api("POST", "/api/v1/keys", json={"owner_id": "bob"})
    assert st == 403
    st, _, _ = await tollway.api("POST", "/api/v1/keys", buyer, json={"owner_id": "bob"})
    assert st == 201
    # only the owning provider changes a service
    p1 = await tollway.key("prov1", "provider")
    p2 = await tollway.key("prov2", "provider")
    sid = await tollway.service(p1, upstream.url, price="0.05")
    for method, body in (("PATCH", {"price_per_call": "0"}), ("DELETE", None)):
        st, data, _ = await tollway.api(method, f"/api/v1/services/{sid}", p2, json=body)
        assert st == 403, data
    st, data, _ = await tollway.api(
        "PATCH", f"/api/v1/services/{sid}", p1, json={"price_per_call": "0.10"}
    )
    assert st == 200 and data["pricing"]["price_per_call"] == "0.10"
    # admin endpoints
    st, _, _ = await tollway.api(
        "POST",
        "/api/v1/admin/credit",
        p1,
        headers={"Idempotency-Key": "k"},
        json={"owner_id": "bob", "amount": "1"},
    )
    assert st == 403


async def test_service_validation(tollway: InProcess, upstream: Upstream):
    p = await tollway.key("prov", "provider")
    good = {"name": "s", "endpoint": upstream.url, "price_per_call": "0.05"}
    cases = [
        ({"endpoint": "ftp://example.com"}, "endpoint"),
        ({"endpoint": "not a url"}, "endpoint"),
        ({"price_per_call": "-1"}, "price_per_call"),
        ({"price_per_call": "0.0000001"}, "price_per_call"),
        ({"price_per_call": 0.05}, "price_per_call"),
        ({"price_per_call": "1e3"}, "price_per_call"),
        ({"payment_method": "cash"}, "payment_method"),
        ({"free_tier_calls": -1}, "free_tier_calls"),
        ({"name": ""}, "name"),
        ({"tags": "nlp"}, "tags"),
    ]
    for change, field in cases:
        st, data, _ = await tollway.api("POST", "/api/v1/services", p, json={**good, **change})
        assert st == 422, (change, data)
        assert data["error"]["code"] == "validation_error" and data["error"]["field"] == field
    st, data, _ = await tollway.api(
        "POST",
        "/api/v1/services",
        p,
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert st == 400 and data["error"]["code"] == "invalid_json"
    st, data, _ = await tollway.api(
        "POST",
        "/api/v1/services",
        p,
        json={
            **good,
            "price_per_call": "0.123456",
            "tags": ["a"],
            "category": "ai",
            "free_tier_calls": 3,
        },
    )
    assert st == 201
    assert data["pricing"] == {
        "price_per_call": "0.123456",
        "price_units": 123456,
        "currency": "USDC",
        "payment_method": "x402",
        "free_tier_calls": 3,
    }
    row = await tollway.rt.store.fetchrow(
        "SELECT price_units FROM services WHERE id = $1", data["id"]
    )
    assert row["price_units"] == 123456


async def test_list_get_patch_delete(tollway: InProcess, upstream: Upstream):
    p = await tollway.key("prov", "provider")
    ids = []
    for i in range(5):
        st, data, _ = await tollway.api(
            "POST",
            "/api/v1/services",
            p,
            json={
                "name": f"Service {i}",
                "description": "sentiment" if i % 2 else "vision",
                "endpoint": upstream.url,
                "price_per_call": "0.01",
                "category": "ai" if i < 3 else "data",
            },
        )
        ids.append(data["id"])
    st, data, _ = await tollway.api("GET", "/api/v1/services?category=ai")
    assert data["count"] == 3 and data["total"] == 3
    st, data, _ = await tollway.api("GET", "/api/v1/services?query=sentiment")
    assert {s["id"] for s in data["services"]} == {ids[1], ids[3]}
    st, full, _ = await tollway.api("GET", "/api/v1/services")
    assert {s["id"] for s in full["services"]} == set(ids)
    st, data, _ = await tollway.api("GET", "/api/v1/services?limit=2&offset=2")
    assert [s["id"] for s in data["services"]] == [s["id"] for s in full["services"]][2:4] and data[
        "total"
    ] == 5
    assert "endpoint" not in data["services"][0]  # upstream addresses are not public
    st, data, _ = await tollway.api("GET", "/api/v1/services?limit=0")
    assert st == 400
    st, data, _ = await tollway.api("DELETE", f"/api/v1/services/{ids[0]}", p)
    assert st == 200 and data == {"status": "removed", "id": ids[0]}
    st, data, _ = await tollway.api("GET", "/api/v1/services?status=removed")
    assert [s["id"] for s in data["services"]] == [ids[0]]
    st, data, _ = await tollway.api("GET", f"/api/v1/services/{ids[1]}", p)
    assert data["endpoint"] == upstream.url
    st, data, _ = await tollway.api("GET", "/api/v1/services/nope")
    assert st == 404


async def test_ssrf_registration_refuses_private_addresses(tmp_path):
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/s.db", tmp=str(tmp_path), allow_private_upstreams=False
    )
    try:
        p = await tw.key("prov", "provider")
        for ep in (
            "http://127.0.0.1:8080",
            "http://10.1.2.3/api",
            "http://169.254.169.254/latest",
            "http://localhost:9000",
            "http://[::1]:80",
            "http://192.168.1.1",
            "http://224.0.0.1",
            "http://[::ffff:127.0.0.1]/",
            "http://100.100.100.200/latest/meta-data/",
            "http://100.64.0.1/",
            "http://192.0.2.10/",
        ):
            st, data, _ = await tw.api(
                "POST",
                "/api/v1/services",
                p,
                json={"name": "x", "endpoint": ep, "price_per_call": "0"},
            )
            assert st == 422 and data["error"]["field"] == "endpoint", ep
        st, data, _ = await tw.api(
            "POST",
            "/api/v1/services",
            p,
            json={"name": "x", "endpoint": "https://api.example.com/v1", "price_per_call": "0"},
        )
        assert st == 201
    finally:
        await tw.close()
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/s2.db", tmp=str(tmp_path), allow_private_upstreams=True
    )
    try:
        p = await tw.key("prov", "provider")
        for ep in ("http://127.0.0.1:8080", "http://10.1.2.3/api", "http://169.254.169.254/latest"):
            st, _, _ = await tw.api(
                "POST",
                "/api/v1/services",
                p,
                json={"name": "x", "endpoint": ep, "price_per_call": "0"},
            )
            assert st == 201, ep
    finally:
        await tw.close()


async def test_ssrf_name_resolving_to_loopback_is_refused_at_connect_time(
    tmp_path, upstream: Upstream
):
    """A service stored while its name looked public (DNS changed since): the
    connect-time resolver check refuses it and the upstream never sees a request."""
    tw = await start_inprocess(
        f"sqlite:///{tmp_path}/r.db", tmp=str(tmp_path), allow_private_upstreams=False
    )
    try:
        await tw.key("prov", "provider")
        b = await tw.key("buyer")
        now = now_ms()
        for host in ("localhost", "localhost."):
            sid = "svc-" + secrets.token_hex(4)
            await tw.rt.registry.create_service(
                Service(
                    id=sid,
                    provider_id="prov",
                    name="rebind",
                    description="",
                    endpoint=f"http://{host}:{upstream.port}",
                    price_units=0,
                    asset="USDC",
                    payment_method="x402",
                    free_tier_calls=0,
                    allow_anonymous=False,
                    category="",
                    tags=[],
                    status="active",
                    created_at=now,
                    updated_at=now,
                )
            )
            st, body, _ = await tw.call(sid, "ok", b)
            assert st == 502 and json.loads(body)["error"]["code"] == "upstream_forbidden", body
        assert upstream.hits == 0
        # The resolver itself: a public-looking name whose answer is loopback is dropped.
        from config.netpolicy import AddressForbidden, PolicyResolver

        class Rebinding:
            async def resolve(self, host, port=0, family=0):
                return [
                    {
                        "hostname": host,
                        "host": "127.0.0.1",
                        "port": port,
                        "family": 2,
                        "proto": 0,
                        "flags": 0,
                    }
                ]

            async def close(self):
                pass

        r = PolicyResolver(False, inner=Rebinding())  # type: ignore[arg-type]
        try:
            await r.resolve("rebind.example.com", 80)
            raise AssertionError("should refuse")
        except AddressForbidden:
            pass
    finally:
        await tw.close()


async def test_concurrent_first_mints_for_one_owner_id_give_one_key(tollway: InProcess):
    import asyncio

    results = await asyncio.gather(
        *(tollway.api("POST", "/api/v1/keys", json={"owner_id": "newbie"}) for _ in range(10))
    )
    statuses = sorted(r[0] for r in results)
    assert statuses.count(201) == 1, statuses
    assert set(statuses) <= {201, 403, 409}
    assert (
        await tollway.rt.store.fetchval("SELECT COUNT(*) FROM api_keys WHERE owner_id = 'newbie'")
        == 1
    )
