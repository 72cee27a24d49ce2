"""Run Tollway for tests: in the test's event loop, or as real `tollway serve` processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from config import load
from proxy.app import create_app
from proxy.runtime import RT, Runtime
from tests.support import services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Client:
    base: str
    admin: str
    session: aiohttp.ClientSession

    async def api(
        self, method: str, path: str, auth: str | None = None, **kw: Any
    ) -> tuple[int, Any, Any]:
        headers = dict(kw.pop("headers", {}) or {})
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            raw = await r.read()
            try:
                import json

                data = json.loads(raw) if raw else None
            except ValueError:
                data = raw
            return r.status, data, r.headers

    async def key(self, owner: str, role: str = "buyer", rate_limit: int = 100_000) -> str:
        # Minted with the admin's grant: only an admin sets a key's rate limit.
        auth = self.admin
        st, data, _ = await self.api(
            "POST",
            "/api/v1/keys",
            auth,
            json={"owner_id": owner, "role": role, "rate_limit": rate_limit},
        )
        assert st == 201, data
        return f"{data['key_id']}:{data['secret']}"

    async def service(
        self, pkey: str, endpoint: str, price: str = "0", free: int = 0, **extra: Any
    ) -> str:
        body = {
            "name": "svc",
            "endpoint": endpoint,
            "price_per_call": price,
            "free_tier_calls": free,
        }
        body.update(extra)
        st, data, _ = await self.api("POST", "/api/v1/services", pkey, json=body)
        assert st == 201, data
        return data["id"]

    async def credit(self, owner: str, amount: str) -> None:
        st, data, _ = await self.api(
            "POST",
            "/api/v1/admin/credit",
            self.admin,
            headers={"Idempotency-Key": secrets.token_hex(8)},
            json={"owner_id": owner, "amount": amount},
        )
        assert st == 201, data

    async def call(
        self, service_id: str, path: str, key: str | None, method: str = "GET", **kw: Any
    ) -> tuple[int, bytes, Any]:
        headers = dict(kw.pop("headers", {}) or {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        from yarl import URL

        # encoded=True: send the path exactly as written (no dot-segment folding by the client)
        url = URL(f"{self.base}/api/v1/proxy/{service_id}/{path}", encoded=True)
        async with self.session.request(method, url, headers=headers, **kw) as r:
            return r.status, await r.read(), r.headers


@dataclass
class InProcess(Client):
    runner: web.AppRunner | None = None
    app: web.Application | None = None

    @property
    def rt(self) -> Runtime:
        assert self.app is not None
        return self.app[RT]

    async def call(
        self, service_id: str, path: str, key: str | None, method: str = "GET", **kw: Any
    ) -> tuple[int, bytes, Any]:
        out = await super().call(service_id, path, key, method, **kw)
        await self.posted()
        return out

    async def posted(self) -> None:
        """Wait for the worker's next lease batch: a test reading the ledger directly
        sees leased calls the moment a client of the API would."""
        await self.rt.meter.leases.flush()

    async def close(self) -> None:
        await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def start_inprocess(
    database_url: str, redis_url: str | None = None, tmp: str | None = None, **overrides: Any
) -> InProcess:
    admin = f"admin_t:{secrets.token_hex(12)}"
    port = free_port()
    opts: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "admin_key": admin,
        "allow_private_upstreams": True,
        "port": port,
        "ip_rate_limit": 0,
        "receipts_dir": os.path.join(tmp or "/tmp", f"receipts-{secrets.token_hex(4)}"),
    }
    if redis_url:
        opts["redis_key_prefix"] = services.redis_prefix_of(redis_url)
    opts.update(overrides)
    settings = load(env={}, overrides=opts)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # The configured port, so the server's public origin (wallet sign-in) is its own.
    site = web.TCPSite(runner, "127.0.0.1", settings.port, backlog=2048)
    await site.start()
    return InProcess(
        base=f"http://127.0.0.1:{port}", admin=admin, session=new_session(), runner=runner, app=app
    )


@dataclass
class Processes(Client):
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)

    async def close(self) -> None:
        await self.session.close()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def tollway_env(
    database_url: str, redis_url: str | None, admin: str, port: int, **settings: Any
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TOLLWAY_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        TOLLWAY_DATABASE_URL=database_url,
        TOLLWAY_ADMIN_KEY=admin,
        TOLLWAY_PORT=str(port),
        TOLLWAY_HOST="127.0.0.1",
        TOLLWAY_ALLOW_PRIVATE_UPSTREAMS="true",
        TOLLWAY_IP_RATE_LIMIT="0",
        TOLLWAY_LOG_LEVEL="warning",
    )
    if redis_url:
        env["TOLLWAY_REDIS_URL"] = redis_url
        env["TOLLWAY_REDIS_KEY_PREFIX"] = services.redis_prefix_of(redis_url)
    for k, v in settings.items():
        env[f"TOLLWAY_{k.upper()}"] = str(v)
    return env


def spawn(env: dict[str, str], log_path: str, *extra: str) -> subprocess.Popen[bytes]:
    logf = open(log_path, "ab")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", *extra],
        env=env,
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def wait_healthy(
    base: str, timeout: float = 30.0, procs: list[subprocess.Popen[bytes]] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            for p in procs or []:
                if p.poll() is not None:
                    raise RuntimeError(f"tollway process exited with {p.returncode}")
            try:
                async with s.get(base + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"tollway at {base} did not become healthy")


async def start_processes(
    database_url: str,
    redis_url: str | None,
    tmp: str,
    *,
    instances: int = 1,
    workers: int = 1,
    **settings: Any,
) -> Processes:
    """``instances`` separate `tollway serve` processes (separate ports), each with ``workers``."""
    admin = f"admin_t:{secrets.token_hex(12)}"
    settings.setdefault("receipts_dir", os.path.join(tmp, "receipts"))
    procs, bases, logs = [], [], []
    env0: dict[str, str] = {}
    for i in range(instances):
        port = free_port()
        env0 = tollway_env(database_url, redis_url, admin, port, workers=workers, **settings)
        log_path = os.path.join(tmp, f"tollway-{i}.log")
        procs.append(spawn(env0, log_path))
        bases.append(f"http://127.0.0.1:{port}")
        logs.append(log_path)
        if i == 0:
            # The first instance migrates the database; the others start after it.
            await wait_healthy(bases[0], procs=procs)
    for b in bases:
        await wait_healthy(b, procs=procs)
    p = Processes(
        base=bases[0], admin=admin, session=new_session(), procs=procs, env=env0, logs=logs
    )
    p.bases = bases  # type: ignore[attr-defined]
    return p


async def sign_in(tw: Client, account: Any, chain: str = "evm") -> str:
    """Claim ``account``'s wallet owner with Sign-In with Ethereum; returns its new key."""
    from eth_account.messages import encode_defunct

    st, ch, _ = await tw.api(
        "POST", "/api/v1/auth/challenge", json={"address": account.address, "chain": chain}
    )
    assert st == 201, ch
    sig = "0x" + account.sign_message(encode_defunct(text=ch["message"])).signature.hex()
    st, k, _ = await tw.api(
        "POST", "/api/v1/auth/verify", json={"message": ch["message"], "signature": sig}
    )
    assert st == 201, k
    return f"{k['key_id']}:{k['secret']}"
