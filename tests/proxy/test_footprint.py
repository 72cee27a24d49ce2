"""The payment rails' heavy libraries load only when their rail is configured."""

from __future__ import annotations

import subprocess
import sys


def test_plain_start_does_not_import_web3_or_pycardano(tmp_path):
    code = f"""
import asyncio, sys
from aiohttp import web
from config import load
from proxy.app import create_app

async def main():
    s = load(env={{}}, overrides={{"database_url": "sqlite:///{tmp_path}/f.db", "port": 0,
                                   "receipts_dir": "{tmp_path}/rk"}})
    runner = web.AppRunner(create_app(s))
    await runner.setup()
    print(sorted(m for m in ("web3", "pycardano", "x402", "eth_account", "eth_utils") if m in sys.modules))
    await runner.cleanup()

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_transfer_topic_constants_agree():
    from billing import wallets
    from billing.rails import evm

    assert wallets.TRANSFER_TOPIC == evm.TRANSFER_TOPIC
