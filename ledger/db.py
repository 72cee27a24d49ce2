"""One small storage interface over PostgreSQL (asyncpg) and SQLite.

Queries are written once, with ``$1``-style parameters; SQLite receives them
as ``?1``. Both backends hand out the same ``Tx`` with ``execute``, ``fetch``,
``fetchrow``, ``fetchval`` and ``transfer`` (the one ledger primitive that
differs: PostgreSQL runs it as a stored function in one round trip).

``run_batch`` is what the group-commit writer calls: many callers' operations
in one transaction. If the batch fails as a whole (one operation hit a unique
key, say), each operation is retried alone so that one bad apple only fails
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar

from ledger.journal import Transfer, now_ms

T = TypeVar("T")
Row = Mapping[str, Any]
Op = Callable[["Tx"], Awaitable[Any]]


class DuplicateError(Exception):
    """A unique key already exists (an idempotency key, a payment reference...)."""


class Tx(Protocol):
    async def execute(self, sql: str, *args: Any) -> int: ...
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def transfer(self, t: Transfer, *, guard: bool = False, now: int | None = None) -> bool: ...


class Store:
    kind: str = ""

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    def transaction(self) -> contextlib.AbstractAsyncContextManager[Tx]: ...
    async def run_batch(self, ops: Sequence[Op]) -> list[Any]:
        """Run ops in one transaction; a failed op's slot holds its exception."""
        try:
            async with self.transaction() as tx:
                return [await op(tx) for op in ops]
        except Exception as exc:
            if len(ops) == 1:
                return [exc]
        return [await _run_alone(self, op) for op in ops]

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self.reader() as tx:
            return await tx.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self.reader() as tx:
            return await tx.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.reader() as tx:
            return await tx.fetchval(sql, *args)

    def reader(self) -> contextlib.AbstractAsyncContextManager[Tx]:
        return self.transaction()

    async def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now."""
        await self._ensure_migration_table()
        applied = {r["version"] for r in await self.fetch("SELECT version FROM schema_migrations")}
        done: list[int] = []
        for version, sql in _migrations(self.kind):
            if version in applied:
                continue
            async with self.transaction() as tx:
                await self._exec_script(tx, sql)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    version,
                    now_ms(),
                )
            done.append(version)
        return done

    async def _ensure_migration_table(self) -> None:
        await self.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )

    async def _exec_script(self, tx: Tx, sql: str) -> None:
        raise NotImplementedError


def _migrations(kind: str) -> list[tuple[int, str]]:
    folder = resources.files("ledger") / "migrations"
    by_version: dict[int, list[str]] = {}
    # The portable file of a version first, then its dialect's extras.
    names = sorted(
        (p.name for p in folder.iterdir() if p.name.endswith(".sql")),
        key=lambda n: (n.split("_", 1)[0], n.count("."), n),
    )
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[1] != kind:
            continue  # another dialect's extras
        version = int(name.split("_", 1)[0])
        by_version.setdefault(version, []).append((folder / name).read_text())
    return [(v, "\n".join(sqls)) for v, sqls in sorted(by_version.items())]


def open_store(database_url: str) -> Store:
    if database_url.startswith(("postgres://", "postgresql://")):
        return PostgresStore(database_url)
    if database_url.startswith("sqlite:///"):
        return SQLiteStore(database_url[len("sqlite:///"):])
    raise ValueError(f"unsupported database URL: {database_url}")


# --------------------------------------------------------------------------- PostgreSQL


class _PgTx:
    __slots__ = ("conn",)

    def __init__(self, conn: Any):
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self.conn.execute(sql, *args)
        try:
            return int(status.rsplit(" ", 1)[-1])
        except ValueError:
            return 0

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self.conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self.conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(sql, *args)

    async def transfer(self, t: Transfer, *, guard: bool = False, now: int | None = None) -> bool:
        d, c = t.debit, t.credit
        return await self.conn.fetchval(
            "SELECT tollway_transfer($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
            t.id, t.asset, d.id, d.kind, d.owner, c.id, c.kind, c.owner, t.amount, t.kind,
            t.usage_id, t.payment_id, t.hold_id, t.idempotency_key, guard, now or now_ms(),
        )


class PostgresStore(Store):
    kind = "postgres"

    def __init__(self, dsn: str, min_size: int = 2, max_size: int = 16):
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.pool: Any = None

    async def connect(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=self.min_size, max_size=self.max_size, command_timeout=30
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        import asyncpg

        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    yield _PgTx(conn)
            except asyncpg.UniqueViolationError as exc:
                raise DuplicateError(str(exc)) from exc

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[Tx]:
        async with self.pool.acquire() as conn:
            yield _PgTx(conn)

    async def _exec_script(self, tx: Tx, sql: str) -> None:
        await tx.conn.execute(sql)  # type: ignore[attr-defined]


async def _run_alone(store: Store, op: Op) -> Any:
    try:
        async with store.transaction() as tx:
            return await op(tx)
    except Exception as exc:  # handed back to the one caller whose op failed
        return exc


# --------------------------------------------------------------------------- SQLite

_PARAM = re.compile(r"\$(\d+)")
_sql_cache: dict[str, str] = {}


def _sqlite_sql(sql: str) -> str:
    out = _sql_cache.get(sql)
    if out is None:
        out = _sql_cache[sql] = _PARAM.sub(r"?\1", sql)
    return out


class _SqliteTx:
    """Runs synchronously on the event loop thread.

    SQLite calls for these small statements take microseconds; hopping to a
    thread per statement would cost more than it saves. The store's lock keeps
    one transaction at a time on the connection.
    """

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            return self.db.execute(_sqlite_sql(sql), args).rowcount
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise DuplicateError(str(exc)) from exc
            raise

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self.db.execute(_sqlite_sql(sql), args).fetchall()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return self.db.execute(_sqlite_sql(sql), args).fetchone()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self.db.execute(_sqlite_sql(sql), args).fetchone()
        return None if row is None else row[0]

    async def transfer(self, t: Transfer, *, guard: bool = False, now: int | None = None) -> bool:
        db, d, c = self.db, t.debit, t.credit
        now = now or now_ms()
        if guard:
            cur = db.execute(
                "UPDATE accounts SET balance = balance - ?1 WHERE id = ?2 AND balance >= ?1",
                (t.amount, d.id),
            )
            if cur.rowcount == 0:
                return False
        else:
            db.execute(_UPSERT, (d.id, t.asset, d.kind, d.owner, -t.amount, now))
        db.execute(_UPSERT, (c.id, t.asset, c.kind, c.owner, t.amount, now))
        try:
            db.execute(
                "INSERT INTO transfers (id, asset, debit_account, credit_account, amount, kind,"
                " usage_id, payment_id, hold_id, idempotency_key, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (t.id, t.asset, d.id, c.id, t.amount, t.kind, t.usage_id, t.payment_id,
                 t.hold_id, t.idempotency_key, now),
            )
        except sqlite3.IntegrityError as exc:
            raise DuplicateError(str(exc)) from exc
        return True


_UPSERT = (
    "INSERT INTO accounts (id, asset, kind, owner_id, balance, created_at) VALUES (?,?,?,?,?,?)"
    " ON CONFLICT (id) DO UPDATE SET balance = balance + excluded.balance"
)


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str):
        self.path = path
        self.db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode keeps the database consistent on power loss and
        # durable across process crashes; only the last commits before an OS
        # crash can be lost. The embedded mode trades that for speed.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA foreign_keys=ON")
        self.db = db

    async def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        assert self.db is not None, "store not connected"
        async with self._lock:
            # IMMEDIATE takes the write lock up front, so two processes on one
            # file serialize instead of failing later with SQLITE_BUSY.
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            else:
                self.db.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[Tx]:
        assert self.db is not None, "store not connected"
        async with self._lock:
            yield _SqliteTx(self.db)

    async def _exec_script(self, tx: Tx, sql: str) -> None:
        # executescript would COMMIT our transaction; run statement by statement.
        assert self.db is not None
        for stmt in _split_sql(sql):
            self.db.execute(stmt)


def _split_sql(sql: str) -> list[str]:
    """Split a script on semicolons, keeping trigger bodies (BEGIN ... END;) whole."""
    out, buf = [], []
    for line in sql.splitlines():
        if line.strip().startswith("--") or not line.strip():
            continue
        buf.append(line)
        joined = "\n".join(buf)
        if joined.rstrip().endswith(";") and sqlite3.complete_statement(joined):
            out.append(joined)
            buf = []
    if buf and "\n".join(buf).strip():
        out.append("\n".join(buf))
    return out
