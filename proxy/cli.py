"""The ``tollway`` command: serve, migrate, demo, ledger verify, settle, receipt verify."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from config import Settings, SettingsError, load
from config.redact import redact_url, scrub


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "workers": getattr(args, "workers", None),
        "database_url": getattr(args, "database_url", None),
    }
    overrides.update(extra)
    return load(getattr(args, "config", None), overrides=overrides)


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)


# --------------------------------------------------------------------------- serve


async def _serve_one(settings: Settings, *, reuse_port: bool) -> None:
    from aiohttp import web

    from proxy.app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port, backlog=2048)
    await site.start()
    logging.getLogger("tollway").info(
        "tollway %s listening on http://%s:%d (storage %s, redis %s)",
        os.getpid(),
        settings.host,
        settings.port,
        settings.storage_kind,
        redact_url(settings.redis_url),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.worker_child or settings.workers == 1:
        _run(_serve_one(settings, reuse_port=args.worker_child))
        return 0
    return _supervise(settings, args)


def _supervise(settings: Settings, args: argparse.Namespace) -> int:
    """Run N worker processes on one port (SO_REUSEPORT); restart any that dies."""
    made_metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made_metrics_dir = tempfile.mkdtemp(prefix="tollway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made_metrics_dir
    try:
        return _run_workers(settings, args)
    finally:
        if made_metrics_dir is not None:
            shutil.rmtree(made_metrics_dir, ignore_errors=True)


def _worker_exited(pid: int) -> None:
    """A dead worker's live gauges leave the shared metrics (its counters stay summed)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except Exception:
        logging.getLogger("tollway").exception("could not mark worker %d dead in metrics", pid)


def _run_workers(settings: Settings, args: argparse.Namespace) -> int:
    _run(_migrate(settings))  # once, before workers race for it
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--worker-child"]
    for flag in ("config", "host", "port", "database_url"):
        v = getattr(args, flag, None)
        if v is not None:
            argv += [f"--{flag.replace('_', '-')}", str(v)]
    children: list[subprocess.Popen[bytes]] = [
        subprocess.Popen(argv) for _ in range(settings.workers)
    ]
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while True:
        if stopping:
            for c in children:
                try:
                    c.wait(timeout=35)
                except subprocess.TimeoutExpired:
                    c.kill()
                    c.wait()
                _worker_exited(c.pid)
            return 0
        for i, c in enumerate(children):
            if c.poll() is not None and not stopping:
                logging.getLogger("tollway").warning(
                    "worker %d exited with %s; restarting", c.pid, c.returncode
                )
                _worker_exited(c.pid)
                time.sleep(0.5)
                children[i] = subprocess.Popen(argv)
        time.sleep(0.2)


# --------------------------------------------------------------------------- migrate, ledger


async def _migrate(settings: Settings) -> list[int]:
    from ledger.db import open_store

    store = open_store(settings.database_url)
    await store.connect()
    try:
        return await store.migrate()
    finally:
        await store.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    done = _run(_migrate(settings))
    print(f"applied migrations: {done}" if done else "schema is up to date")
    return 0


class StartError(Exception):
    """A runtime failure before the command could do its work: one line, exit 2."""


def _existing_sqlite(database_url: str) -> None:
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        if path != ":memory:" and not os.path.exists(path):
            raise StartError(f"no database at {path}")


async def _verify(settings: Settings) -> Any:
    from ledger.db import open_store
    from ledger.verify import verify

    # Verifying checks a ledger that exists; it never makes a new, empty one.
    _existing_sqlite(settings.database_url)
    store = open_store(settings.database_url)
    try:
        await store.connect()
    except Exception as e:
        raise StartError(
            f"cannot open {redact_url(settings.database_url)}: {scrub(str(e))}"
        ) from None
    try:
        await store.migrate()
        return await verify(store)
    finally:
        await store.close()


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    report = _run(_verify(settings))
    print(report.render())
    return 0 if report.ok else 1


def cmd_receipt_verify(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from billing.receipts import receipt_verify_main

    return receipt_verify_main(list(rest))


# --------------------------------------------------------------------------- settle


class _Bar:
    """A plain-text progress bar on stderr, no dependency: redrawn in place on a
    terminal, a line per tenth otherwise (logs stay readable)."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width = label, width
        self.tty = sys.stderr.isatty()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        frac = 1.0 if total <= 0 else min(1.0, done / total)
        step = int(frac * 10)
        if not self.tty and step == self._last:
            return
        self._last = step
        filled = int(frac * self.width)
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and frac >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def _settle(settings: Settings, period: str, provider: str | None, asset: str | None) -> int:
    from billing import settlements as st
    from billing.errors import BillingError
    from billing.money import format_amount
    from ledger.db import open_store

    try:
        start, end = st.month_bounds(period)
    except BillingError as e:
        print(f"tollway settle: {e.message}", file=sys.stderr)
        return 2
    asset = asset or settings.default_asset
    store = open_store(settings.database_url)
    await store.connect()
    try:
        await store.migrate()
        policy = st.FeePolicy.from_settings(settings)
        providers = (
            [provider] if provider else await st.providers_with_unsettled(store, asset, start, end)
        )
        if not providers:
            print(f"nothing to settle for {period}")
            return 0
        d = settings.asset_decimals
        for pid in providers:
            res = await st.create_settlement(
                store, policy, pid, asset, start, end, progress=_Bar(f"settling {pid}")
            )
            if res.settlement is None:
                print(f"{pid}: nothing to settle for {period}")
                continue
            r = res.settlement
            print(
                f"{pid}: settlement {r['id']} {'created' if res.created else 'exists'}:"
                f" {int(r['call_count'])} charges, gross {format_amount(int(r['gross']), d)},"
                f" fee {format_amount(int(r['fee']), d)}, net {format_amount(int(r['net']), d)} {asset}"
                f" ({r['status']})"
            )
        return 0
    finally:
        await store.close()


def cmd_settle(args: argparse.Namespace) -> int:
    settings = _settings(args)
    return _run(_settle(settings, args.period, args.provider, args.asset))


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return _run(run_demo(args))


# --------------------------------------------------------------------------- entry


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--database-url", dest="database_url")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tollway", description="Tollway, a payment-metering reverse proxy"
    )
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    _common(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)

    m = sub.add_parser("migrate", help="apply database migrations")
    _common(m)

    d = sub.add_parser("demo", help="run a demo upstream, service and key, and print a curl line")
    _common(d)
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--once", action="store_true", help="make one metered call, print it, and exit")

    lg = sub.add_parser("ledger", help="ledger tools")
    lsub = lg.add_subparsers(dest="ledger_command", required=True)
    v = lsub.add_parser("verify", help="check the ledger's invariants; exit 1 on any violation")
    _common(v)

    st = sub.add_parser("settle", help="settle providers' unsettled charges of a month")
    _common(st)
    st.add_argument("--period", required=True, help="the month, YYYY-MM (UTC)")
    st.add_argument(
        "--provider", help="one provider (default: every provider with unsettled charges)"
    )
    st.add_argument("--asset", help="asset to settle (default: the default asset)")

    r = sub.add_parser("receipt", help="receipt tools")
    rsub = r.add_subparsers(dest="receipt_command", required=True)
    rsub.add_parser(
        "verify",
        help="verify a receipt offline: tollway receipt verify RECEIPT --keys FILE|URL",
        add_help=False,
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["receipt", "verify"]:
        return cmd_receipt_verify(argparse.Namespace(), argv[2:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "migrate":
            return cmd_migrate(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "ledger":
            return cmd_ledger_verify(args)
        if args.command == "settle":
            return cmd_settle(args)
    except SettingsError as e:
        print(f"tollway: {e}", file=sys.stderr)
        return 2
    except StartError as e:
        print(f"tollway: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # The database unreachable, the port taken...: one line an operator can act on.
        logging.getLogger("tollway").debug("command failed", exc_info=True)
        print(f"tollway: {type(e).__name__}: {scrub(str(e)) or 'failed'}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
