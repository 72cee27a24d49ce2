"""Shared fixtures: real PostgreSQL and Redis (never skipped), stores, upstreams, proxies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from ledger.db import Store, open_store
from tests.support import services
from tests.support.tollway import InProcess, start_inprocess
from tests.support.upstream import Upstream, start_upstream


def pytest_sessionstart(session: pytest.Session) -> None:
    problems = asyncio.run(services.check_services())
    if problems:
        raise pytest.UsageError(
            "Tollway's tests need real PostgreSQL and Redis; run ./scripts/test, which starts them.\n  "
            + "\n  ".join(problems)
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    asyncio.run(services.drop_template())


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await services.create_pg_database()
    yield url
    await services.drop_pg_database(url)


@pytest.fixture
def redis_url() -> str:
    return services.fresh_redis_url()


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/tollway.db"
    else:
        url = await services.create_pg_database()
        yield url
        await services.drop_pg_database(url)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = open_store(db_url)
    await s.connect()
    await s.migrate()
    yield s
    await s.close()


# One in-process EVM chain per test module (fresh state, deployed once), behind
# a local JSON-RPC HTTP server so code under test uses web3's real HTTP provider.
@pytest.fixture(scope="module")
def chain():
    from tests.support.evm_chain import EvmChain

    return EvmChain()


@pytest.fixture(scope="module")
def node(chain):
    from tests.support.jsonrpc_server import JsonRpcServer

    with JsonRpcServer(chain) as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    await up.close()


@pytest.fixture
async def tollway(db_url: str, tmp_path) -> AsyncIterator[InProcess]:
    tw = await start_inprocess(db_url, tmp=str(tmp_path))
    yield tw
    await tw.close()


@pytest.fixture
async def tollway_sqlite(tmp_path) -> AsyncIterator[InProcess]:
    tw = await start_inprocess(f"sqlite:///{tmp_path}/tw.db", tmp=str(tmp_path))
    yield tw
    await tw.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    os.environ.setdefault("TOLLWAY_TESTING", "1")
