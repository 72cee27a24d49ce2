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

import abc
import asyncio
import contextlib
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ledger.journal import Transfer, now_ms

T = TypeVar("T")
Row = Mapping[str, Any]
Op = Callable[["Tx"], Awaitable[Any]]


def store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached (down, restarting, out of
    connections), as opposed to a fault of the operation: callers answer 503 and retry."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return True
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return False
    return isinstance(
        exc,
        (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.TooManyConnectionsError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.CrashShutdownError,
        ),
    ) or (isinstance(exc, sqlite3.OperationalError) and "disk I/O" in str(exc))


class DuplicateError(Exception):
    """A unique key already exists (an idempotency key, a payment reference...)."""


class GuardFailed(Exception):
    """A guarded balance would go below zero at commit: another process spent
    it since this transaction read it. The operations are rerun alone."""


class HoldRaced(GuardFailed):
    """A hold assumed pending was resolved by someone else (the expiry sweeper,
    another process) before this transaction wrote its resolution."""


class Tx(Protocol):
    async def execute(self, sql: str, *args: Any) -> int: ...
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...
    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def transfer(
        self, t: Transfer, *, guard: bool = False, now: int | None = None
    ) -> bool: ...
    async def insert_later(self, table: str, sql: str, *args: Any) -> None: ...
    async def resolve_hold(self, hold_id: str, status: str, now: int) -> bool: ...


class Store(abc.ABC):
    kind: str = ""

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(
        self, optimistic: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Tx]: ...

    async def run_batch(self, ops: Sequence[Op]) -> list[Any]:
        """Run ops in one transaction; a failed op's slot holds its exception."""
        try:
            async with self.transaction(optimistic=True) as tx:  # type: ignore[call-arg]
                return [await op(tx) for op in ops]
        except Exception as exc:
            # A lone op's own failure is its answer, unless a retry may succeed: a
            # deadlock or serialization failure is the database's, not the op's.
            if len(ops) == 1 and not (isinstance(exc, GuardFailed) or _retryable(exc)):
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

    @abc.abstractmethod
    async def _exec_script(self, tx: Tx, sql: str) -> None:
        """Run a migration script inside ``tx`` (each backend splits it its own way)."""


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
        return SQLiteStore(database_url[len("sqlite:///") :])
    raise ValueError(f"unsupported database URL: {database_url}")


# --------------------------------------------------------------------------- write-behind

_INSERT_TRANSFER = (
    "INSERT INTO transfers (id, asset, debit_account, credit_account, amount, kind,"
    " usage_id, payment_id, hold_id, idempotency_key, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)
_UPSERT_BALANCE = (
    "INSERT INTO accounts (id, asset, kind, owner_id, balance, created_at) VALUES ($1, $2, $3, $4, $5, $6)"
    " ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + excluded.balance"
)
# SQL statements sent to the database by this process (BEGIN and COMMIT count):
# the capacity model's "statements per call" (proxy.metrics exports it).
_statements = [0]


def statements_sent() -> int:
    return _statements[0]


# Bumped by every transfer into a wallet made in this process (a credit, a void,
# a lease's rest): a refusal remembered before it may be stale.
_wallet_credits = [0]


def wallet_credit_epoch() -> int:
    return _wallet_credits[0]


def note_wallet_credit() -> None:
    """Something a refusal depended on came back (free calls, say)."""
    _wallet_credits[0] += 1


# Tables whose rows a transaction may still hold in memory; a statement that
# names one of them sees the buffered rows written first.
_BUFFERED_TABLES = ("accounts", "transfers")


class _BufferedTx:
    """A transaction that buffers journal rows and balance changes until it
    needs them.

    ``transfer`` is the hot operation: every metered call makes three to
    five of them, and most touch the same few accounts (the holding account,
    the fee account, a provider's earnings). Instead of three statements per
    transfer, the transaction keeps the new journal rows and the net change
    per account in memory and writes them with two ``executemany`` calls when
    it commits, or earlier, the moment any statement names ``accounts`` or
    ``transfers``. A guarded debit reads the account's balance once per
    transaction and then checks in memory. Where other transactions may
    write at the same time (PostgreSQL), the write-out locks every touched
    account in id order (no deadlocks between writers) and checks each
    guarded account again: if another process spent the money meanwhile,
    ``GuardFailed`` rolls the batch back and its operations run again alone.
    A repeated idempotency key fails at the insert, which fails the
    transaction the same way.
    """

    __slots__ = ("_rows", "_deltas", "_known", "_later", "_guarded", "_resolutions", "optimistic")

    def __init__(self, optimistic: bool = False) -> None:
        self._rows: list[tuple[Any, ...]] = []
        self._deltas: dict[str, list[Any]] = {}
        self._known: dict[str, int] = {}
        self._later: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        self._guarded: set[str] = set()
        self._resolutions: list[tuple[str, str, int]] = []
        # In a group-commit batch, hold resolutions are assumed to succeed and
        # checked together at write-out (HoldRaced if one did not); alone, each
        # is written at once and its answer is exact.
        self.optimistic = optimistic

    # backend hooks
    async def _exec(self, sql: str, args: tuple[Any, ...]) -> int: ...
    async def _rows_of(self, sql: str, args: tuple[Any, ...]) -> list[Row]: ...
    async def _row_of(self, sql: str, args: tuple[Any, ...]) -> Row | None: ...
    async def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None: ...
    async def _read_balance(self, account_id: str) -> int | None: ...

    async def _lock_balances(self, deltas: list[tuple[str, list[Any]]]) -> dict[str, int] | None:
        """Lock the accounts of ``deltas`` (sorted by id) in that order and return
        their balances; None where the backend's transaction is already exclusive
        (nothing to recheck)."""
        return None

    async def _resolve_many(self, items: list[tuple[str, str, int]]) -> int: ...

    async def resolve_hold(self, hold_id: str, status: str, now: int) -> bool:
        """Move a pending hold to ``status``; False if it is no longer pending."""
        if self.optimistic:
            self._resolutions.append((hold_id, status, now))
            return True
        if self._resolutions or any(k[0] == "holds" for k in self._later):
            await self._sync_for("holds")
            await self._write_resolutions()
        return await self._resolve_many([(hold_id, status, now)]) == 1

    async def _write_resolutions(self) -> None:
        if self._resolutions:
            items, self._resolutions = self._resolutions, []
            if await self._resolve_many(items) != len(items):
                raise HoldRaced("a hold was resolved by another transaction first")

    async def _sync_for(self, sql: str) -> None:
        if (self._rows or self._deltas) and any(t in sql for t in _BUFFERED_TABLES):
            await self.flush()
            return
        if self._later:
            for key in [k for k in self._later if k[0] in sql]:
                await self._many(key[1], self._later.pop(key))
        if self._resolutions and "holds" in sql:
            await self._write_resolutions()

    async def insert_later(self, table: str, sql: str, *args: Any) -> None:
        """An INSERT nobody in this transaction reads back (usage records):
        written with the others of its kind in one executemany at commit."""
        self._later.setdefault((table, sql), []).append(args)

    async def flush(self) -> None:
        if self._later:
            later, self._later = self._later, {}
            for (_, sql), rows in later.items():
                await self._many(sql, rows)
        await self._write_resolutions()
        if self._deltas:
            # Sorted, so concurrent transactions lock account rows in one order.
            deltas = sorted(self._deltas.items())
            self._deltas = {}
            current = await self._lock_balances(deltas)
            if current is not None:
                for k, v in deltas:
                    if k in self._guarded and v[3] < 0 and current.get(k, 0) + v[3] < 0:
                        raise GuardFailed(f"{k} would go below zero")
            await self._many(_UPSERT_BALANCE, [(k, *v) for k, v in deltas])
            self._guarded.clear()
        if self._rows:
            rows, self._rows = self._rows, []
            await self._many(_INSERT_TRANSFER, rows)
        self._known.clear()

    async def execute(self, sql: str, *args: Any) -> int:
        await self._sync_for(sql)
        return await self._exec(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        await self._sync_for(sql)
        return await self._rows_of(sql, args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        await self._sync_for(sql)
        return await self._row_of(sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    def _delta(self, acct: Any, asset: str, amount: int, now: int) -> None:
        d = self._deltas.get(acct.id)
        if d is None:
            self._deltas[acct.id] = [asset, acct.kind, acct.owner, amount, now]
        else:
            d[3] += amount
        if acct.id in self._known:
            self._known[acct.id] += amount

    async def transfer(self, t: Transfer, *, guard: bool = False, now: int | None = None) -> bool:
        d, c = t.debit, t.credit
        now = now or now_ms()
        if guard:
            self._guarded.add(d.id)
            bal = self._known.get(d.id)
            if bal is None:
                stored = await self._read_balance(d.id)
                pending = self._deltas.get(d.id)
                # No row yet: only what this transaction credited can be spent.
                bal = (stored or 0) + (pending[3] if pending else 0)
                self._known[d.id] = bal
            if bal < t.amount:
                return False
        self._delta(d, t.asset, -t.amount, now)
        self._delta(c, t.asset, t.amount, now)
        if c.kind == "wallet":
            _wallet_credits[0] += 1
        self._rows.append(
            (
                t.id,
                t.asset,
                d.id,
                c.id,
                t.amount,
                t.kind,
                t.usage_id,
                t.payment_id,
                t.hold_id,
                t.idempotency_key,
                now,
            )
        )
        return True


# --------------------------------------------------------------------------- PostgreSQL


class _PgTx(_BufferedTx):
    __slots__ = ("conn", "existing")

    def __init__(self, conn: Any, existing: set[str], optimistic: bool = False):
        super().__init__(optimistic)
        self.conn = conn
        self.existing = existing  # account ids known to exist in this database

    async def _resolve_many(self, items: list[tuple[str, str, int]]) -> int:
        ids, statuses, ats = zip(*items, strict=True)
        _statements[0] += 1
        status = await self.conn.execute(
            "UPDATE holds AS h SET status = u.status, resolved_at = u.at"
            " FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(id, status, at)"
            " WHERE h.id = u.id AND h.status = 'pending'",
            list(ids),
            list(statuses),
            list(ats),
        )
        return int(status.rsplit(" ", 1)[-1])

    async def _exec(self, sql: str, args: tuple[Any, ...]) -> int:
        _statements[0] += 1
        status = await self.conn.execute(sql, *args)
        try:
            return int(status.rsplit(" ", 1)[-1])
        except ValueError:
            return 0

    async def _rows_of(self, sql: str, args: tuple[Any, ...]) -> list[Row]:
        _statements[0] += 1
        return await self.conn.fetch(sql, *args)

    async def _row_of(self, sql: str, args: tuple[Any, ...]) -> Row | None:
        _statements[0] += 1
        return await self.conn.fetchrow(sql, *args)

    async def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        bulk = _PG_BULK.get(sql)
        if bulk is not None and len(rows) > 1:
            # One statement for the whole batch (executemany runs one per row).
            _statements[0] += 1
            await self.conn.execute(bulk, *map(list, zip(*rows, strict=True)))
        else:
            _statements[0] += len(rows)
            await self.conn.executemany(sql, rows)

    async def _read_balance(self, account_id: str) -> int | None:
        # No lock here: the write-out locks and rechecks (see _BufferedTx), so
        # two writers spending from one wallet do not queue behind each other
        # for a whole batch.
        _statements[0] += 1
        return await self.conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id)

    async def _lock_balances(self, deltas: list[tuple[str, list[Any]]]) -> dict[str, int] | None:
        # Rows first, then locks: an account another process is creating right now
        # would otherwise be locked (by its insert) out of id order, and two writers
        # could each wait on a row the other holds. Rows once made are never
        # removed, so each process creates a given account at most once.
        new = [(k, v[0], v[1], v[2], v[4]) for k, v in deltas if k not in self.existing]
        if new:
            _statements[0] += len(new)
            await self.conn.executemany(_CREATE_ACCOUNT, new)
        ids = [k for k, _ in deltas]
        _statements[0] += 1
        rows = await self.conn.fetch(
            "SELECT id, balance FROM accounts WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
            ids,
        )
        if new and len(self.existing) < 1_000_000:
            self.existing.update(k for k, *_ in new)
        return {r["id"]: int(r["balance"]) for r in rows}


def _unnest(table: str, columns: str, types: str, tail: str = "") -> str:
    args = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types.split(), 1))
    return f"INSERT INTO {table} ({columns}) SELECT * FROM unnest({args}){tail}"


# The batch inserts of the hot path, as one statement each on PostgreSQL.
_PG_BULK = {
    _INSERT_TRANSFER: _unnest(
        "transfers",
        "id, asset, debit_account, credit_account, amount, kind, usage_id, payment_id,"
        " hold_id, idempotency_key, created_at",
        "text text text text bigint text text text text text bigint",
    ),
    _UPSERT_BALANCE: _unnest(
        "accounts",
        "id, asset, kind, owner_id, balance, created_at",
        "text text text text bigint bigint",
        " ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + excluded.balance",
    ),
}


def register_bulk_insert(sql: str, table: str, columns: str, types: str) -> None:
    """Let ``insert_later`` rows of ``sql`` go out as one unnest statement on PostgreSQL."""
    _PG_BULK[sql] = _unnest(table, columns, types)


_CREATE_ACCOUNT = (
    "INSERT INTO accounts (id, asset, kind, owner_id, balance, created_at)"
    " VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (id) DO NOTHING"
)


class PostgresStore(Store):
    kind = "postgres"

    def __init__(self, dsn: str, min_size: int = 2, max_size: int = 16):
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.pool: Any = None
        # Account ids seen created here (a miss costs one idempotent insert).
        self._existing_accounts: set[str] = set()

    async def connect(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            command_timeout=30,
            # A database that is down answers at once or not at all: seconds, not a minute.
            timeout=5,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    @contextlib.asynccontextmanager
    async def transaction(self, optimistic: bool = False) -> AsyncIterator[Tx]:
        import asyncpg

        async with self.pool.acquire() as conn:
            try:
                _statements[0] += 2  # BEGIN, COMMIT
                async with conn.transaction():
                    tx = _PgTx(conn, self._existing_accounts, optimistic)
                    yield tx
                    await tx.flush()
            except asyncpg.UniqueViolationError as exc:
                raise DuplicateError(str(exc)) from exc

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[Tx]:
        async with self.pool.acquire() as conn:
            yield _PgTx(conn, self._existing_accounts)

    async def _exec_script(self, tx: Tx, sql: str) -> None:
        await tx.conn.execute(sql)  # type: ignore[attr-defined]


_RETRYABLE = ("deadlock", "could not serialize", "SQLITE_BUSY", "database is locked")


def _retryable(exc: BaseException) -> bool:
    return any(m in str(exc) for m in _RETRYABLE)


async def _run_alone(store: Store, op: Op) -> Any:
    for attempt in range(5):
        try:
            async with store.transaction() as tx:
                return await op(tx)
        except Exception as exc:  # handed back to the one caller whose op failed
            retry = isinstance(exc, GuardFailed) or _retryable(exc)
            if attempt < 4 and retry:
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            return exc
    return None  # pragma: no cover


# --------------------------------------------------------------------------- SQLite

_PARAM = re.compile(r"\$(\d+)")
_sql_cache: dict[str, str] = {}


def _sqlite_sql(sql: str) -> str:
    out = _sql_cache.get(sql)
    if out is None:
        out = _sql_cache[sql] = _PARAM.sub(r"?\1", sql)
    return out


class _SqliteTx(_BufferedTx):
    """Runs synchronously on the event loop thread.

    SQLite calls for these small statements take microseconds; hopping to a
    thread per statement would cost more than it saves. The store's lock keeps
    one transaction at a time on the connection, and BEGIN IMMEDIATE keeps
    other processes out, so a balance read stays true until the commit.
    """

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection, optimistic: bool = False):
        super().__init__(optimistic)
        self.db = db

    async def _resolve_many(self, items: list[tuple[str, str, int]]) -> int:
        n = 0
        for hold_id, status, at in items:
            n += self.db.execute(
                "UPDATE holds SET status = ?, resolved_at = ? WHERE id = ? AND status = 'pending'",
                (status, at, hold_id),
            ).rowcount
        return n

    async def _exec(self, sql: str, args: tuple[Any, ...]) -> int:
        _statements[0] += 1
        try:
            return self.db.execute(_sqlite_sql(sql), args).rowcount
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise DuplicateError(str(exc)) from exc
            raise

    async def _rows_of(self, sql: str, args: tuple[Any, ...]) -> list[Row]:
        _statements[0] += 1
        return self.db.execute(_sqlite_sql(sql), args).fetchall()

    async def _row_of(self, sql: str, args: tuple[Any, ...]) -> Row | None:
        _statements[0] += 1
        return self.db.execute(_sqlite_sql(sql), args).fetchone()

    async def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        _statements[0] += len(rows)
        try:
            self.db.executemany(_sqlite_sql(sql), rows)
        except sqlite3.IntegrityError as exc:
            raise DuplicateError(str(exc)) from exc

    async def _read_balance(self, account_id: str) -> int | None:
        row = self.db.execute("SELECT balance FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return None if row is None else int(row[0])


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
        # Checkpoints copy the WAL into the database file and fsync it; left
        # to SQLite they run inside a commit on the event loop. A thread does
        # them instead (sqlite3 releases the GIL while it works).
        db.execute("PRAGMA wal_autocheckpoint=0")
        self.db = db
        if self.path != ":memory:":
            self._stop = threading.Event()
            self._checkpointer = threading.Thread(
                target=_checkpoint_loop,
                args=(self.path, self._stop),
                name="sqlite-checkpoint",
                daemon=True,
            )
            self._checkpointer.start()

    async def close(self) -> None:
        if getattr(self, "_checkpointer", None) is not None:
            self._stop.set()
            await asyncio.to_thread(self._checkpointer.join, 5)
            self._checkpointer = None
        if self.db is not None:
            self.db.close()
            self.db = None

    @contextlib.asynccontextmanager
    async def transaction(self, optimistic: bool = False) -> AsyncIterator[Tx]:
        assert self.db is not None, "store not connected"
        async with self._lock:
            # IMMEDIATE takes the write lock up front, so two processes on one
            # file serialize instead of failing later with SQLITE_BUSY.
            self.db.execute("BEGIN IMMEDIATE")
            _statements[0] += 2  # BEGIN, COMMIT
            tx = _SqliteTx(self.db, optimistic)
            try:
                yield tx
                await tx.flush()
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


def _checkpoint_loop(path: str, stop: threading.Event, interval: float = 0.5) -> None:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=1000")
    try:
        while not stop.wait(interval):
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass  # busy or locked: the next round gets it
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
    finally:
        conn.close()


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
