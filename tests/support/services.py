"""Real PostgreSQL databases and Redis databases for tests.

Nothing here skips: if a service cannot be reached the test session stops
with a message saying which one and how to start it (./scripts/test does).
"""

from __future__ import annotations

import asyncio
import os
import secrets

import asyncpg
import redis.asyncio as aioredis

PG_ADMIN = os.environ.get("TOLLWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("TOLLWAY_TEST_REDIS", "redis://127.0.0.1:6379")
# Per test run: two suites on one server never drop or lock each other's template.
TEMPLATE = f"tollway_tpl_{os.getpid()}_{secrets.token_hex(4)}"


def _db_url(name: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def check_services() -> list[str]:
    problems = []
    try:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        await conn.close()
    except Exception as exc:
        problems.append(f"PostgreSQL at {PG_ADMIN} is not reachable ({exc!r})")
    try:
        r = aioredis.from_url(REDIS_BASE, socket_connect_timeout=3)
        await r.ping()
        await r.aclose()
    except Exception as exc:
        problems.append(f"Redis at {REDIS_BASE} is not reachable ({exc!r})")
    return problems


_template_ready = False


async def _ensure_template() -> None:
    """A migrated template database: each test's database is a cheap copy of it."""
    global _template_ready
    if _template_ready:
        return
    from ledger.db import PostgresStore

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await conn.close()
    store = PostgresStore(_db_url(TEMPLATE), min_size=1, max_size=2)
    await store.connect()
    await store.migrate()
    await store.close()
    _template_ready = True


async def create_pg_database() -> str:
    await _ensure_template()
    name = f"tollway_t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        for _ in range(20):
            try:
                await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
                break
            except asyncpg.ObjectInUseError:  # template briefly busy
                await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return _db_url(name)


async def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


async def drop_template() -> None:
    """End of the run: the template this run made (and only it) goes."""
    if not _template_ready:
        return
    await drop_pg_database(_db_url(TEMPLATE))


def fresh_redis_url() -> str:
    """A Redis URL of this test's own: the client name carries a random tag that
    Tollway's test launchers turn into a key prefix (``redis_prefix_of``), so no
    test reads another's counters and nothing is flushed."""
    return f"{REDIS_BASE}/0?client_name=twtest{secrets.token_hex(6)}"


def redis_prefix_of(redis_url: str) -> str:
    tag = redis_url.rpartition("client_name=")[2] or "twtest"
    return f"tollway:{tag}:"
