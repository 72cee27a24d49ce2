"""The README's demo command, and memory while streaming a large body."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from tests.support.tollway import free_port, start_processes
from tests.support.upstream import Upstream


def test_demo_call_carries_billing_headers(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo", "--once", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "curl -i -H 'Authorization: Bearer acf_" in r.stdout
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["status"] == 200
    assert json.loads(result["body"])["message"] == "hello from the demo upstream"
    headers = {k.lower(): v for k, v in result["headers"].items()}
    for name in (
        "x-acf-usage-id",
        "x-acf-amount",
        "x-acf-free-tier",
        "x-acf-latency-ms",
        "x-request-id",
    ):
        assert headers.get(name), name
    assert headers["x-acf-free-tier"] == "true" and headers["x-acf-amount"] == "0.00"
    assert (tmp_path / "data" / "demo.db").exists()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def test_200mb_body_streams_with_flat_memory(tmp_path, upstream: Upstream):
    tw = await start_processes(f"sqlite:///{tmp_path}/m.db", None, str(tmp_path))
    try:
        p = await tw.key("prov", "provider")
        sid = await tw.service(p, upstream.url)
        b = await tw.key("buyer")
        pid = tw.procs[0].pid
        await tw.call(sid, "ok", b)  # warm: imports, pools
        base_rss = _rss_kb(pid)
        peak = base_rss
        received = 0

        async def sample():
            nonlocal peak
            while True:
                peak = max(peak, _rss_kb(pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        async with tw.session.get(
            f"{tw.base}/api/v1/proxy/{sid}/big?mb=200", headers={"Authorization": f"Bearer {b}"}
        ) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(1 << 20):
                received += len(chunk)
        sampler.cancel()
        assert received == 200 * 1024 * 1024
        growth_mb = (peak - base_rss) / 1024
        assert growth_mb < 50, f"RSS grew by {growth_mb:.1f} MB"
    finally:
        await tw.close()
