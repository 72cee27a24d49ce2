"""Process control for the harness: start children pinned to CPUs, find their process
trees, sample resident memory, and kill everything we started (and only that)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        rest = stat[stat.rfind(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
    except OSError:
        return 0
    rest = st[st.rfind(b")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


def pids_named(*names: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() in names:
                        out.append(int(d))
            except OSError:
                pass
    return out


def cpu_times() -> dict[int, tuple[int, int, int]]:
    """Per-CPU (busy, total, steal) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                vals = [int(x) for x in parts[1:]]
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                steal = vals[7] if len(vals) > 7 else 0
                # user+nice+system+irq+softirq (guest time is already inside user)
                busy = sum(vals[:8]) - idle - steal
                out[int(parts[0][3:])] = (busy, sum(vals[:8]), steal)
    return out


class CpuMeter:
    """CPU used by groups of processes over an interval, in % of one core."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t0 = time.monotonic()
        self.start = {g: {p: cpu_ticks(p) for p in ps} for g, ps in groups.items()}
        self.cpus0 = cpu_times()

    def stop(self) -> dict:
        dt_s = time.monotonic() - self.t0
        out = {}
        for g, ps in self.groups.items():
            used = sum(max(0, cpu_ticks(p) - self.start[g].get(p, 0)) for p in ps)
            out[g] = round(100.0 * used / self.TICK / dt_s, 1) if dt_s > 0 else None
        c1 = cpu_times()
        for c, (b1, t1, s1) in c1.items():
            b0, t0, s0 = self.cpus0.get(c, (0, 0, 0))
            out[f"cpu{c}_busy"] = round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else None
            out[f"cpu{c}_steal"] = round(100.0 * (s1 - s0) / (t1 - t0), 1) if t1 > t0 else None
        return out


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return ""


class RssSampler(threading.Thread):
    """Samples VmRSS of every process in a tree every `interval` seconds."""

    def __init__(self, root_pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root = root_pid
        self.interval = interval
        self.stop_evt = threading.Event()
        self.peak: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.samples = 0

    def run(self) -> None:
        pids = tree(self.root)
        last_scan = time.monotonic()
        while not self.stop_evt.is_set():
            if time.monotonic() - last_scan > 0.5:
                pids = tree(self.root)
                last_scan = time.monotonic()
            for p in pids:
                r = rss_kb(p)
                if r:
                    self.first.setdefault(p, r)
                    if r > self.peak.get(p, 0):
                        self.peak[p] = r
            self.samples += 1
            self.stop_evt.wait(self.interval)

    def stop(self) -> dict:
        self.stop_evt.set()
        self.join(2)
        if not self.peak:
            return {"samples": self.samples}
        top = max(self.peak, key=lambda p: self.peak[p])
        return {
            "samples": self.samples,
            "interval_s": self.interval,
            "peak_rss_mb": self.peak[top] / 1024.0,
            "peak_pid_rss_before_mb": self.first.get(top, 0) / 1024.0,
            "peak_pid_cmd": cmdline(top),
            "per_process_peak_mb": {str(p): v / 1024.0 for p, v in self.peak.items()},
            "tree_peak_sum_mb": sum(self.peak.values()) / 1024.0,
        }


class Procs:
    """Every child the harness starts; each gets its own session so that its whole
    group (e.g. tollway's worker processes) can be signalled."""

    def __init__(self) -> None:
        self.live: list[tuple[str, subprocess.Popen]] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict | None = None,
        cpus: set[int] | None = None,
        log: Path | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it

        def pre() -> None:
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pre,
            cwd=cwd,
        )
        if log:
            out.close()
        self.live.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        pids = tree(p.pid) if p.poll() is None else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if p.poll() is not None and not any(_alive(x) for x in pids):
                break
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for x in pids:  # children that left the group
                try:
                    os.kill(x, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if p.poll() is not None and not any(_alive(x) for x in pids):
                    break
                time.sleep(0.05)
        try:
            p.wait(1)
        except subprocess.TimeoutExpired:
            pass
        self.live = [(n, q) for n, q in self.live if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.live)):
            self.stop(p, grace=3.0)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies, even by SIGKILL, so that nothing
    the harness started outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def die_with_parent() -> None:
    _die_with_parent()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        return st[st.rfind(b")") + 2 : st.rfind(b")") + 3] != b"Z"
    except OSError:
        return False
