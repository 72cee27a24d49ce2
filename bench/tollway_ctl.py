"""Start a Tollway instance for the bench and set it up through its management API:
a provider, three buyers' keys, a free-tier and a priced service, a credited wallet."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HUGE = 1_000_000_000


def http(
    method: str,
    url: str,
    body: dict | None = None,
    headers: dict | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict, object]:
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, hdrs = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    try:
        parsed: object = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw[:500].decode("latin-1")
    return status, hdrs, parsed


def tollway_bin() -> str:
    if os.environ.get("BENCH_TOLLWAY_BIN"):  # another build, or a stand-in while developing
        return os.environ["BENCH_TOLLWAY_BIN"]
    for cand in (ROOT / ".venv" / "bin" / "tollway", Path(sys.executable).parent / "tollway"):
        if cand.exists():
            return str(cand)
    found = shutil.which("tollway")
    if not found:
        raise RuntimeError("tollway console script not found (.venv/bin/tollway)")
    return found


def pg_admin(sql: str, base_url: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(f"{base_url}/postgres", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def redis_forget(url: str, prefix: str) -> None:
    """Delete this run's keys only: the Redis may be shared with other programs."""
    import redis

    r = redis.Redis.from_url(url, socket_timeout=5)
    for key in r.scan_iter(match=prefix + "*", count=1000):
        r.delete(key)
    r.close()


@dataclass
class Mode:
    name: str
    db: str  # "sqlite" | "pg"
    workers: int


@dataclass
class Setup:
    base: str
    admin: str
    provider: str = ""
    buyer_rich: str = ""
    buyer_free: str = ""
    buyer_poor: str = ""
    svc_free: str = ""
    svc_paid: str = ""
    notes: list[str] = field(default_factory=list)

    def url(self, svc: str, path: str) -> str:
        return f"{self.base}/api/v1/proxy/{svc}/{path}"


class TollwayInstance:
    def __init__(
        self, mode: Mode, workdir: Path, pg_base: str, redis_base: str, redis_db: int, stamp: str
    ) -> None:
        self.mode = mode
        self.workdir = workdir
        self.pg_base = pg_base.rstrip("/")
        self.redis_url = f"{redis_base.rstrip('/')}/{redis_db}"
        self.dbname = f"tollway_bench_{stamp}_{mode.name}".replace("-", "_").lower()
        self.redis_prefix = f"tollway-bench:{stamp}:{mode.name}:"
        self.port = 0
        self.admin = f"benchadmin:{secrets.token_hex(16)}"
        self.log = workdir / f"tollway-{mode.name}.log"
        self.db_url = ""

    def env(self, port: int) -> dict:
        self.port = port
        env = dict(os.environ)
        env.update(
            {
                "TOLLWAY_HOST": "127.0.0.1",
                "TOLLWAY_PORT": str(port),
                "TOLLWAY_WORKERS": str(self.mode.workers),
                "TOLLWAY_ADMIN_KEY": self.admin,
                "TOLLWAY_ALLOW_PRIVATE_UPSTREAMS": "true",
                "TOLLWAY_IP_RATE_LIMIT": "0",
            }
        )
        env.pop("TOLLWAY_REDIS_URL", None)
        if self.mode.db == "sqlite":
            db = self.workdir / f"{self.mode.name}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
            self.db_url = f"sqlite:///{db}"
        else:
            pg_admin(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)', self.pg_base)
            pg_admin(f'CREATE DATABASE "{self.dbname}"', self.pg_base)
            self.db_url = f"{self.pg_base}/{self.dbname}"
            env["TOLLWAY_REDIS_URL"] = self.redis_url
            env["TOLLWAY_REDIS_KEY_PREFIX"] = self.redis_prefix
        env["TOLLWAY_DATABASE_URL"] = self.db_url
        return env

    def command(self, port: int) -> list[str]:
        return [
            tollway_bin(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(self.mode.workers),
        ]

    def cleanup(self) -> None:
        if self.mode.db == "pg":
            try:
                pg_admin(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)', self.pg_base)
            except Exception:
                pass
            try:
                redis_forget(self.redis_url, self.redis_prefix)
            except Exception:
                pass
        else:
            db = self.workdir / f"{self.mode.name}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)


def wait_health(base: str, proc, timeout: float) -> float:
    t0 = time.monotonic()
    ok_in_a_row = 0
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before /health")
        try:
            status, _, _ = http("GET", f"{base}/health", timeout=1)
            ok_in_a_row = ok_in_a_row + 1 if status == 200 else 0
        except (OSError, urllib.error.URLError):
            ok_in_a_row = 0
        if ok_in_a_row >= 3:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"/health not 200 within {timeout:.0f}s")


def _expect(status: int, body: object, want: int, what: str) -> dict:
    if status != want or not isinstance(body, dict):
        raise RuntimeError(f"{what}: HTTP {status}, expected {want}: {str(body)[:300]}")
    return body


def _key(body: dict) -> str:
    return f"{body['key_id']}:{body['secret']}"


def setup(base: str, admin: str, upstream: str) -> Setup:
    s = Setup(base=base, admin=admin)
    api = f"{base}/api/v1"
    adm = {"Authorization": f"Bearer {admin}"}
    tag = secrets.token_hex(4)

    def key(owner: str, role: str, auth: dict | None) -> str:
        st, _, b = http(
            "POST", f"{api}/keys", {"owner_id": owner, "role": role, "rate_limit": HUGE}, auth
        )
        if st in (400, 422):  # a ceiling on rate_limit: retry with a still-large value
            s.notes.append(f"rate_limit {HUGE} refused ({st}); used 1000000")
            st, _, b = http(
                "POST",
                f"{api}/keys",
                {"owner_id": owner, "role": role, "rate_limit": 1_000_000},
                auth,
            )
        if st in (401, 403) and auth is None:
            s.notes.append("buyer key creation needed the admin key")
            st, _, b = http(
                "POST", f"{api}/keys", {"owner_id": owner, "role": role, "rate_limit": HUGE}, adm
            )
        return _key(_expect(st, b, 201, f"POST /keys ({role} {owner})"))

    s.provider = key(f"bench-provider-{tag}", "provider", adm)
    rich_owner = f"bench-buyer-rich-{tag}"
    s.buyer_rich = key(rich_owner, "buyer", adm)
    s.buyer_free = key(f"bench-buyer-free-{tag}", "buyer", adm)
    s.buyer_poor = key(f"bench-buyer-poor-{tag}", "buyer", adm)
    prov = {"Authorization": f"Bearer {s.provider}"}
    st, _, b = http(
        "POST",
        f"{api}/services",
        {
            "name": f"bench-free-{tag}",
            "endpoint": upstream,
            "price_per_call": "0.000001",
            "free_tier_calls": HUGE,
        },
        prov,
    )
    s.svc_free = str(_expect(st, b, 201, "POST /services (free tier)")["id"])
    st, _, b = http(
        "POST",
        f"{api}/services",
        {
            "name": f"bench-paid-{tag}",
            "endpoint": upstream,
            "price_per_call": "0.000001",
            "free_tier_calls": 0,
        },
        prov,
    )
    s.svc_paid = str(_expect(st, b, 201, "POST /services (priced)")["id"])
    st, _, b = http(
        "POST",
        f"{api}/admin/credit",
        {"owner_id": rich_owner, "amount": "1000.00", "asset": "USDC"},
        {**adm, "Idempotency-Key": str(uuid.uuid4())},
    )
    if st not in (200, 201):
        raise RuntimeError(f"POST /admin/credit: HTTP {st}: {str(b)[:300]}")
    return s


def bearer(k: str) -> str:
    return f"Authorization: Bearer {k}"
