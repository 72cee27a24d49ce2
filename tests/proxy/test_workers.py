"""`--workers N`: a killed worker leaves no live metrics behind, and the metrics folder
the supervisor made is gone when it stops (issue 11)."""

from __future__ import annotations

import asyncio
import glob
import os
import signal

from tests.support.tollway import start_processes


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


async def test_a_killed_worker_is_marked_dead_and_the_metrics_folder_removed(tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env_tmp = {"TMPDIR": str(tmpdir)}
    old = {k: os.environ.get(k) for k in env_tmp}
    os.environ.update(env_tmp)
    try:
        tw = await start_processes(f"sqlite:///{tmp_path}/w.db", None, str(tmp_path), workers=2)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    supervisor = tw.procs[0].pid
    try:
        (folder,) = glob.glob(str(tmpdir / "tollway-metrics-*"))
        for _ in range(50):
            workers = _children(supervisor)
            if len(workers) == 2 and all(
                glob.glob(f"{folder}/gauge_livesum_{w}.db") for w in workers
            ):
                break
            await tw.api("GET", "/health")
            await asyncio.sleep(0.1)
        victim = workers[0]
        assert glob.glob(f"{folder}/gauge_livesum_{victim}.db")
        os.kill(victim, signal.SIGKILL)
        for _ in range(100):
            now = _children(supervisor)
            if victim not in now and len(now) == 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert victim not in _children(supervisor)
        assert not glob.glob(f"{folder}/gauge_livesum_{victim}.db")
        st, _, _ = await tw.api("GET", "/metrics")
        assert st == 200
    finally:
        await tw.close()
    assert not os.path.exists(folder)
