"""bench/run: the whole Tollway benchmark in one command (see bench/README.md)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import procs as P
from bench import tollway_ctl as T

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PY = sys.executable

ALL_MODES = {
    "sqlite-1w": T.Mode("sqlite-1w", "sqlite", 1),
    "sqlite-2w": T.Mode("sqlite-2w", "sqlite", 2),
    "pg-redis-1w": T.Mode("pg-redis-1w", "pg", 1),
    "pg-redis-2w": T.Mode("pg-redis-2w", "pg", 2),
    # The worker curve's last point: more workers than cores, sharing them with
    # the load generator and PostgreSQL.
    "pg-redis-4w": T.Mode("pg-redis-4w", "pg", 4),
}


class Budget(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mem_total_mb": _meminfo_mb(),
        "loadavg_at_start": os.getloadavg(),
    }
    for mod in ("aiohttp", "uvloop", "asyncpg", "redis"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    wrk = shutil.which("wrk")
    if wrk:
        r = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=5)
        first = (r.stdout + r.stderr).splitlines()[0] if (r.stdout + r.stderr) else wrk
        info["wrk"] = " ".join(first.split()[:3])
    try:
        info["git_head"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--",
                "config",
                "ledger",
                "billing",
                "proxy",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        info["tollway_tree_dirty_files"] = len(dirty.splitlines())
    except Exception:
        pass
    return info


def _meminfo_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def plan_cpus(no_pin: bool) -> dict:
    """Which CPUs the proxy under test gets, and which the rest (upstream, load generator,
    harness) gets. On 2 cores: a 1-process proxy owns CPU A; everything else shares CPU B.
    A 2-worker proxy gets both cores (it cannot have two to itself), so it competes with
    the load generator and the upstream on B."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return {
            "pinned": False,
            "server_1w": None,
            "server_2w": None,
            "load": None,
            "note": "no CPU pinning: everything shares all cores",
        }
    if len(cpus) == 2:
        return {
            "pinned": True,
            "server_1w": {cpus[0]},
            "server_2w": set(cpus),
            "load": {cpus[1]},
            "note": (
                f"2 cores: 1-process proxies pinned to CPU {cpus[0]}; the upstream, "
                f"wrk (1 thread), the Python load generator and this harness share "
                f"CPU {cpus[1]}; 2-worker Tollway runs on both CPUs and so competes "
                f"with the load generator and upstream on CPU {cpus[1]}. "
                f"PostgreSQL and Redis are system services and are not pinned."
            ),
        }
    n = len(cpus)
    return {
        "pinned": True,
        "server_1w": {cpus[0]},
        "server_2w": {cpus[0], cpus[1]},
        "load": set(cpus[2:]),
        "note": f"{n} cores: proxy on CPU {cpus[0]} (1w) or {cpus[0]},{cpus[1]} (2w); "
        f"load and upstream on {cpus[2:]}",
    }


# ----------------------------------------------------------------------------- load


class Driver:
    def __init__(self, args, deadline: float) -> None:
        self.args = args
        self.deadline = deadline
        self.wrk = shutil.which("wrk") if not args.no_wrk else None
        self.watch_root: int | None = None  # the proxy under test; its tree is metered
        self.upstream_pid: int | None = None
        self.server_cpus: set[int] | None = None

    def _meter(self) -> P.CpuMeter | None:
        if not self.watch_root:
            return None
        return P.CpuMeter(
            {
                "server": P.tree(self.watch_root),
                "postgres": P.pids_named("postgres"),
                "redis": P.pids_named("redis-server"),
                "upstream": [self.upstream_pid] if self.upstream_pid else [],
            }
        )

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise Budget(
                f"skipped {what}: {self.left():.0f}s of the time budget left, needs ~{seconds:.0f}s"
            )

    def closed(self, url: str, headers: list[str], expect: int) -> dict:
        a = self.args
        self.need(a.warmup + a.duration + 3, "load point")
        if self.wrk:
            self._wrk(url, headers, a.warmup, warm=True)
            meter = self._meter()
            res = self._wrk(url, headers, a.duration)
        else:
            meter = self._meter()
            res = self._loadgen_closed(url, headers)
        if meter:
            res["cpu_pct"] = c = meter.stop()
            srv = sorted(self.server_cpus or [])
            if len(srv) == 1 and c.get(f"cpu{srv[0]}_busy") is not None:
                # CPU time on the server's own core that the server did not use: other
                # processes (PostgreSQL, Redis, anything else on the machine) or steal
                other = c[f"cpu{srv[0]}_busy"] - c["server"] + (c.get(f"cpu{srv[0]}_steal") or 0)
                res["server_core_other_pct"] = round(max(0.0, other), 1)
                loads = [k for k in c if k.endswith("_busy") and k != f"cpu{srv[0]}_busy"]
                # the load side (wrk + upstream) out of CPU: the server was not the limit
                res["load_cores_saturated"] = bool(loads) and all(
                    (c[k] or 0) >= 90.0 for k in loads
                )
        res["expect_status"] = expect
        if expect == 200:
            res["status_ok"] = res.get("non_2xx_3xx", 0) == 0 and not res.get("socket_errors")
        else:
            res["status_ok"] = res.get("non_2xx_3xx", 0) >= 0.99 * res["requests"] > 0
        return res

    def _wrk(self, url: str, headers: list[str], duration: float, warm: bool = False) -> dict:
        a = self.args
        cmd = [
            self.wrk,
            f"-t{a.wrk_threads}",
            f"-c{a.connections}",
            f"-d{duration:g}s",
            "--timeout",
            "5s",
            "-s",
            str(HERE / "report.lua"),
        ]
        for h in headers:
            cmd += ["-H", h]
        cmd.append(url)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 20)
        if warm:
            return {}
        m = re.search(r"^WRKJSON (\{.*\})$", r.stdout, re.M)
        if not m:
            raise RuntimeError(f"wrk gave no result: {r.stdout[-500:]} {r.stderr[-500:]}")
        j = json.loads(m.group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
        lat = j["latency_us"]
        errs = {k: v for k, v in j["errors"].items() if v and k != "status"}
        secs = j["duration_us"] / 1e6
        return {
            "tool": "wrk",
            "connections": a.connections,
            "threads": a.wrk_threads,
            "duration_s": secs,
            "requests": j["requests"],
            "rps": j["requests"] / secs,
            "p50_ms": lat["p50"] / 1000,
            "p90_ms": lat["p90"] / 1000,
            "p99_ms": lat["p99"] / 1000,
            "p999_ms": lat["p999"] / 1000,
            "max_ms": lat["max"] / 1000,
            "mean_ms": lat["mean"] / 1000,
            "non_2xx_3xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errs,
            "mb_read": j["bytes"] / 1e6,
        }

    def _loadgen(self, argv: list[str], timeout: float) -> dict:
        r = subprocess.run(
            [PY, "-m", "bench.loadgen", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        if r.returncode != 0:
            raise RuntimeError(f"loadgen failed: {r.stderr[-800:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def _loadgen_closed(self, url: str, headers: list[str]) -> dict:
        a = self.args
        argv = [
            "closed",
            "--url",
            url,
            "-c",
            str(a.connections),
            "--duration",
            str(a.duration),
            "--warmup",
            str(a.warmup),
        ]
        for h in headers:
            argv += ["-H", h]
        j = self._loadgen(argv, a.duration + a.warmup + 30)
        return self._flat(j, "loadgen-closed")

    @staticmethod
    def _flat(j: dict, tool: str) -> dict:
        lat = j["latency_ms"]
        ok = sum(v for k, v in j["statuses"].items() if k.startswith(("2", "3")))
        return {
            "tool": tool,
            "connections": j["connections"],
            "duration_s": j["duration_s"],
            "requests": j["requests"],
            "rps": j["rps"],
            "p50_ms": lat.get("p50"),
            "p90_ms": lat.get("p90"),
            "p99_ms": lat.get("p99"),
            "p999_ms": lat.get("p999"),
            "max_ms": lat.get("max"),
            "mean_ms": lat.get("mean"),
            "non_2xx_3xx": j["requests"] - ok,
            "statuses": j["statuses"],
            "socket_errors": {k: v for k, v in j["errors"].items() if v},
            **(
                {"target_rps": j["target_rps"], "max_backlog": j["max_backlog"]}
                if "target_rps" in j
                else {}
            ),
            "loadgen_cpu_pct": j.get("cpu_pct"),
        }

    def fixed_rate(self, url: str, headers: list[str], rate: float) -> dict:
        a = self.args
        self.need(a.warmup + a.duration + 3, "fixed-rate point")
        argv = [
            "rate",
            "--url",
            url,
            "--rate",
            f"{rate:.1f}",
            "-c",
            str(a.connections),
            "--drain",
            "3",
            "--duration",
            str(a.duration),
            "--warmup",
            str(a.warmup),
        ]
        for h in headers:
            argv += ["-H", h]
        meter = self._meter()
        res = self._flat(self._loadgen(argv, a.duration + a.warmup + 30), "loadgen-fixed-rate")
        if meter:
            res["cpu_pct"] = meter.stop()
            res["cpu_pct_note"] = "averaged over warm-up, measurement and drain"
        # a server that cannot keep up builds a backlog: its latency grows without bound
        res["saturated"] = res["rps"] < 0.95 * rate or res.get("p99_ms") is None
        res["status_ok"] = (
            res["non_2xx_3xx"] == 0 and not res["socket_errors"] and not res["saturated"]
        )
        return res

    def ttfb(self, url: str, headers: list[str]) -> dict:
        a = self.args
        self.need(a.sse_count * 0.05 + 5, "SSE point")
        argv = ["ttfb", "--url", url, "--count", str(a.sse_count)]
        for h in headers:
            argv += ["-H", h]
        j = self._loadgen(argv, a.sse_count * 0.5 + 30)
        return {
            "count": a.sse_count,
            "ttfb_p50_ms": j["ttfb_ms"].get("p50"),
            "ttfb_p99_ms": j["ttfb_ms"].get("p99"),
            "ttfb_mean_ms": j["ttfb_ms"].get("mean"),
            "headers_p50_ms": j["headers_ms"].get("p50"),
            "total_p50_ms": j["total_ms"].get("p50"),
            "statuses": j["statuses"],
            "errors": j["errors"],
            "status_ok": set(j["statuses"]) == {"200"} and not j["errors"],
            "what": "time from request written to first SSE body byte read, one keep-alive "
            "connection, sequential requests; the upstream sends its first event at once",
        }

    def large(self, url: str, headers: list[str], server_pid: int | None) -> dict:
        a = self.args
        self.need(20, "large-body point")
        sampler = P.RssSampler(server_pid) if server_pid else None
        before = {}
        if server_pid:
            before = {str(p): P.rss_kb(p) / 1024 for p in P.tree(server_pid)}
            sampler.start()
        curl = shutil.which("curl")
        t0 = time.monotonic()
        if curl:
            cmd = [
                curl,
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                str(a.large_timeout),
                "-w",
                "%{http_code} %{size_download} %{time_starttransfer} %{time_total}",
            ]
            for h in headers:
                cmd += ["-H", h]
            r = subprocess.run(
                cmd + [url], capture_output=True, text=True, timeout=a.large_timeout + 10
            )
            code, size, tstart, ttotal = r.stdout.split()
            code, size, ttotal, ttfb = int(code), int(size), float(ttotal), float(tstart)
        else:
            code, size, ttotal = self._py_download(url, headers)
            ttfb = None
        wall = time.monotonic() - t0
        mem = sampler.stop() if sampler else {}
        res = {
            "bytes_expected": a.large_bytes,
            "bytes": size,
            "status": code,
            "seconds": ttotal,
            "mb_per_s": size / ttotal / 1e6 if ttotal else None,
            "first_byte_s": ttfb,
            "wall_s": wall,
            "status_ok": code == 200 and size == a.large_bytes,
            "client": "curl" if curl else "python urllib",
        }
        if mem:
            res["rss"] = {**mem, "before_mb": before}
            res["peak_rss_mb"] = mem.get("peak_rss_mb")
        return res

    def _py_download(self, url: str, headers: list[str]) -> tuple[int, int, float]:
        import urllib.request

        req = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
        t0 = time.monotonic()
        n = 0
        with urllib.request.urlopen(req, timeout=self.args.large_timeout) as r:
            while True:
                b = r.read(1 << 20)
                if not b:
                    break
                n += len(b)
            code = r.status
        return code, n, time.monotonic() - t0


# ----------------------------------------------------------------------------- runs


def run_bare(
    drv: Driver,
    procs: P.Procs,
    upstream: str,
    cpus: dict,
    workdir: Path,
    rate: float | None,
    label: str,
    full: bool,
) -> dict:
    port = P.free_port()
    base = f"http://127.0.0.1:{port}"
    p = procs.start(
        label,
        [PY, "-m", "bench.bare_proxy", "--port", str(port), "--upstream", upstream],
        cpus=cpus["server_1w"],
        log=workdir / f"{label}.log",
        cwd=str(ROOT),
    )
    out: dict = {
        "kind": "bare aiohttp pass-through (uvloop, one shared ClientSession)",
        "pid": p.pid,
    }
    drv.watch_root = p.pid
    drv.server_cpus = cpus["server_1w"]
    try:
        out["startup_s"] = T.wait_health(base, p, 20)
        out["scenarios"] = {"pass": drv.closed(f"{base}/proxy/json", [], 200)}
        if full:
            # The first peak sets the fixed rate of every half-load point: take the better
            # of two tries, so that a burst of other work on the machine does not set it.
            again = drv.closed(f"{base}/proxy/json", [], 200)
            out["pass_tries_rps"] = [out["scenarios"]["pass"]["rps"], again["rps"]]
            if again["rps"] > out["scenarios"]["pass"]["rps"]:
                out["scenarios"]["pass"] = again
        log(f"{label}: pass-through {out['scenarios']['pass']['rps']:.0f} req/s")
        half = rate or out["scenarios"]["pass"]["rps"] / 2
        out["scenarios"]["half_load"] = drv.fixed_rate(f"{base}/proxy/json", [], half)
        if full:
            out["scenarios"]["sse"] = drv.ttfb(f"{base}/proxy/sse", [])
            out["scenarios"]["large"] = drv.large(
                f"{base}/proxy/large/{drv.args.large_bytes}", [], p.pid
            )
    finally:
        procs.stop(p)
    return out


def run_tollway(
    drv: Driver,
    procs: P.Procs,
    mode: T.Mode,
    upstream: str,
    cpus: dict,
    workdir: Path,
    half_rate: float,
    stamp: str,
    args,
) -> dict:
    inst = T.TollwayInstance(mode, workdir, args.pg_url, args.redis_url, args.redis_db, stamp)
    out: dict = {
        "mode": mode.name,
        "db": mode.db,
        "workers": mode.workers,
        "scenarios": {},
        "errors": [],
    }
    port = P.free_port()
    base = f"http://127.0.0.1:{port}"
    p = None
    try:
        drv.need(35, f"Tollway {mode.name}")
        env = inst.env(port)
        out["database_url"] = inst.db_url
        out["redis_url"] = env.get("TOLLWAY_REDIS_URL")
        scpus = cpus["server_1w"] if mode.workers == 1 else cpus["server_2w"]
        p = procs.start(
            f"tollway-{mode.name}",
            inst.command(port),
            env=env,
            cpus=scpus,
            log=inst.log,
            cwd=str(ROOT),
        )
        out["pid"] = p.pid
        drv.watch_root = p.pid
        drv.server_cpus = scpus
        out["startup_s"] = T.wait_health(base, p, args.startup_timeout)
        out["processes"] = len(P.tree(p.pid))
        s = T.setup(base, inst.admin, upstream)
        out["setup_notes"] = s.notes
        free = (s.url(s.svc_free, "json"), [T.bearer(s.buyer_free)], 200)
        paid = (s.url(s.svc_paid, "json"), [T.bearer(s.buyer_rich)], 200)
        unpaid = (s.url(s.svc_paid, "json"), [T.bearer(s.buyer_poor)], 402)
        probes = {}
        for name, (url, hdrs, want) in {"free": free, "prepaid": paid, "402": unpaid}.items():
            st, h, body = T.http("GET", url, headers=dict([hdrs[0].split(": ", 1)]))
            probes[name] = {
                "status": st,
                "expected": want,
                "headers": {
                    k: v for k, v in h.items() if k.lower().startswith(("x-", "payment", "www-"))
                },
                "body": body if st != 200 else None,
            }
        out["probes"] = probes
        for name, (url, hdrs, want) in {"free": free, "prepaid": paid, "402": unpaid}.items():
            if probes[name]["status"] != want:
                out["errors"].append(
                    f"{name}: probe answered {probes[name]['status']}, "
                    f"expected {want}: {str(probes[name]['body'])[:300]}"
                )
                continue
            try:
                m0 = scrape_metrics(base)
                out["scenarios"][name] = drv.closed(url, hdrs, want)
                out["scenarios"][name]["ledger_metrics"] = metrics_delta(m0, scrape_metrics(base))
                r = out["scenarios"][name]
                log(
                    f"{mode.name}: {name} {r['rps']:.0f} req/s p99 {r['p99_ms']:.2f} ms"
                    + ("" if r["status_ok"] else "  (UNEXPECTED STATUSES)")
                )
            except Budget:
                raise
            except Exception as e:
                out["errors"].append(f"{name}: {e}")
        if probes["prepaid"]["status"] == 200:
            own = out["scenarios"].get("prepaid", {}).get("rps")
            for name, fn in (
                ("half_load", lambda: drv.fixed_rate(paid[0], paid[1], half_rate)),
                (
                    "half_own_peak",
                    lambda: (
                        drv.fixed_rate(paid[0], paid[1], own / 2)
                        if own and mode.workers == 1
                        else None
                    ),
                ),
                ("sse", lambda: drv.ttfb(s.url(s.svc_paid, "sse"), paid[1])),
                (
                    "large",
                    lambda: drv.large(
                        s.url(s.svc_paid, f"large/{args.large_bytes}"), paid[1], p.pid
                    ),
                ),
            ):
                try:
                    r = fn()
                    if r is not None:
                        out["scenarios"][name] = r
                except Budget:
                    raise
                except Exception as e:
                    out["errors"].append(f"{name}: {e}")
    except Budget as e:
        out["errors"].append(str(e))
    except Exception as e:
        out["errors"].append(f"{type(e).__name__}: {e}")
        out["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if p is not None:
            out["exit_code_before_stop"] = p.poll()
            procs.stop(p)
            try:
                text = inst.log.read_text(errors="replace")
                out["log_tail"] = text[-3000:]
                out["log_counts"] = {
                    "ERROR lines": sum(1 for ln in text.splitlines() if " ERROR " in ln),
                    "tracebacks": text.count("Traceback (most recent call last)"),
                    "deadlocks": text.count("DeadlockDetectedError"),
                }
            except OSError:
                pass
        inst.cleanup()
    return out


def scrape_metrics(base: str) -> dict[str, float]:
    """Tollway's /metrics (Prometheus text): the ledger's histogram sums and counts."""
    import urllib.request

    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=3) as r:
            text = r.read().decode("utf-8", "replace")
    except Exception:
        return out
    for line in text.splitlines():
        if line.startswith(("tollway_ledger", "tollway_requests_total")) and (
            "_sum" in line or "_count" in line or "_total" in line
        ):
            name, _, val = line.rpartition(" ")
            try:
                out[name] = float(val)
            except ValueError:
                pass
    return out


def metrics_delta(m0: dict, m1: dict) -> dict:
    """Mean of each ledger histogram over the load point (one worker's view when N > 1)."""
    out = {}
    sent = m1.get("tollway_ledger_statements_total", 0) - m0.get(
        "tollway_ledger_statements_total", 0
    )
    calls = sum(v - m0.get(k, 0) for k, v in m1.items() if k.startswith("tollway_requests_total"))
    if calls > 0:
        # Over every worker (the counters are whole in multiprocess mode).
        out["ledger_statements"] = sent
        out["calls"] = calls
        out["statements_per_call"] = round(sent / calls, 4)
    for name, v1 in m1.items():
        if name.endswith("_sum"):
            base = name[: -len("_sum")]
            c1, c0 = m1.get(base + "_count", 0), m0.get(base + "_count", 0)
            if c1 > c0:
                out[base + "_mean"] = round((v1 - m0.get(name, 0)) / (c1 - c0), 6)
                out[base + "_count"] = c1 - c0
    return out


def deps_ok(args) -> dict:
    ok = {"pg": True, "redis": True}
    try:
        T.pg_admin("SELECT 1", args.pg_url.rstrip("/"))
    except Exception as e:
        ok["pg"] = False
        ok["pg_error"] = str(e)[:200]
    try:
        import redis

        redis.Redis.from_url(
            f"{args.redis_url.rstrip('/')}/{args.redis_db}", socket_timeout=2
        ).ping()
    except Exception as e:
        ok["redis"] = False
        ok["redis_error"] = str(e)[:200]
    return ok


# ----------------------------------------------------------------------------- report


def targets(res: dict) -> list[dict]:
    out = []
    bare = res.get("bare", {}).get("scenarios", {})
    bare_rps = res.get("bare_rps")
    direct_sse = res.get("direct", {}).get("sse", {})
    for name, m in res.get("tollway", {}).items():
        sc = m.get("scenarios", {})
        ref = m.get("bare_ref_rps") or bare_rps
        if m.get("workers") == 1 and "prepaid" in sc and ref:
            ratio = sc["prepaid"]["rps"] / ref
            out.append(
                {
                    "target": "prepaid req/s >= 0.8 x bare (one process)",
                    "mode": name,
                    "value": round(ratio, 3),
                    "limit": 0.8,
                    "met": ratio >= 0.8,
                }
            )
        if m.get("workers") == 1 and ref:
            for scen, limit in (("free", 0.8), ("402", 1.0)):
                if scen in sc:
                    ratio = sc[scen]["rps"] / ref
                    out.append(
                        {
                            "target": f"{scen} req/s >= {limit} x bare (one process)",
                            "mode": name,
                            "value": round(ratio, 3),
                            "limit": limit,
                            "met": ratio >= limit,
                        }
                    )
        if m.get("db") == "pg" and "prepaid" in sc:
            pre = sc["prepaid"]
            spc = pre.get("ledger_metrics", {}).get("statements_per_call")
            if spc is not None:
                out.append(
                    {
                        "target": "PostgreSQL statements per prepaid call <= 0.2 (Tollway's counter)",
                        "mode": name,
                        "value": spc,
                        "limit": 0.2,
                        "met": spc <= 0.2,
                    }
                )
            pg_pct = pre.get("cpu_pct", {}).get("postgres")
            if pg_pct is not None and pre.get("rps"):
                us = pg_pct / 100 / pre["rps"] * 1e6
                out.append(
                    {
                        "target": "PostgreSQL CPU per prepaid call <= 50 us",
                        "mode": name,
                        "value_us": round(us, 1),
                        "limit_us": 50,
                        "met": us <= 50,
                    }
                )
            one = res.get("tollway", {}).get("pg-redis-1w", {}).get("scenarios", {})
            if m.get("workers", 1) > 1 and "prepaid" in one:
                ratio = pre["rps"] / one["prepaid"]["rps"]
                out.append(
                    {
                        "target": f"prepaid req/s, {m['workers']} workers vs 1 >= 1.0",
                        "mode": name,
                        "value": round(ratio, 3),
                        "limit": 1.0,
                        "met": ratio >= 1.0,
                    }
                )
        if "large" in sc and sc["large"].get("rss", {}).get("before_mb"):
            idle = max(sc["large"]["rss"]["before_mb"].values())
            out.append(
                {
                    "target": "idle RSS per worker <= 60 MB (before the large body)",
                    "mode": name,
                    "value_mb": round(idle, 1),
                    "limit_mb": 60,
                    "met": idle <= 60,
                }
            )
        for key, label, info in (
            (
                "half_load",
                "added p99 at half of peak <= 2 ms (prepaid, at half of the bare proxy's peak)",
                False,
            ),
            (
                "half_own_peak",
                "(info) added p99 at half of its OWN prepaid peak vs bare at half of bare's peak",
                True,
            ),
        ):
            h = sc.get(key)
            ref_p99 = m.get("bare_half_p99_ref", bare.get("half_load", {}).get("p99_ms"))
            if not h or ref_p99 is None:
                continue
            if h.get("p99_ms") is None or h.get("saturated"):
                val: object = (
                    f"saturated: achieved {h['rps']:.0f}/s of {h.get('target_rps', 0):.0f}/s"
                )
                met = False
            else:
                val = round(h["p99_ms"] - ref_p99, 3)
                met = val <= 2.0 and h["status_ok"]
            out.append(
                {
                    "target": label,
                    "mode": name,
                    "value_ms": val,
                    "limit_ms": 2.0,
                    "met": met,
                    "rate": h.get("target_rps"),
                    "informational": info,
                }
            )
        if "sse" in sc and direct_sse.get("ttfb_p50_ms") is not None:
            d = sc["sse"]["ttfb_p50_ms"] - direct_sse["ttfb_p50_ms"]
            d99 = sc["sse"]["ttfb_p99_ms"] - direct_sse["ttfb_p99_ms"]
            out.append(
                {
                    "target": "SSE TTFB within 5 ms of direct (p50; p99 shown)",
                    "mode": name,
                    "value_ms": round(d, 3),
                    "p99_delta_ms": round(d99, 3),
                    "limit_ms": 5.0,
                    "met": d <= 5.0 and sc["sse"]["status_ok"],
                }
            )
        if "large" in sc and sc["large"].get("peak_rss_mb") is not None:
            v = sc["large"]["peak_rss_mb"]
            gib = sc["large"]["bytes_expected"] / 2**30
            out.append(
                {
                    "target": f"peak RSS streaming {gib:.2g} GiB < 100 MB",
                    "mode": name,
                    "value_mb": round(v, 1),
                    "limit_mb": 100,
                    "met": v < 100 and sc["large"]["status_ok"],
                    "bytes": sc["large"]["bytes"],
                }
            )
    return out


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(res: dict) -> None:
    bare_rps = res.get("bare_rps")
    print()
    print(res["pinning"]["note"])
    print(
        "The load generator (wrk, 1 thread) runs on the same machine and takes CPU from "
        "the upstream and, for 2-worker modes, from Tollway; figures are relative, "
        "compare ratios measured in this run, not absolute numbers across machines. "
        "The bare proxy is measured before and after each Tollway mode; a mode's ratio is "
        "to the mean of those two. 'other' = % of the one-process server's own core used by "
        "something else (PostgreSQL, Redis, other work on the machine, hypervisor steal): "
        "large values mean a disturbed point. LOAD = the load generator's core was >= 90% "
        "busy: the load side, not the server, may have set the figure."
    )
    print()
    hdr = (
        f"{'target':<14} {'scenario':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs bare':>8}  {'status':<10} {'CPU% srv/pg/rd':>14} {'other':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    rows = []
    if res.get("bare", {}).get("scenarios", {}).get("pass"):
        rows.append(("bare", "pass", res["bare"]["scenarios"]["pass"], bare_rps))
    for name, m in res.get("tollway", {}).items():
        ref = m.get("bare_ref_rps") or bare_rps
        for sc in ("free", "prepaid", "402"):
            if sc in m.get("scenarios", {}):
                rows.append((name, sc, m["scenarios"][sc], ref))
        if not m.get("scenarios"):
            rows.append((name, "FAILED", None, None))
        after = res.get(f"bare_after_{name}", {}).get("scenarios", {}).get("pass")
        if after:
            rows.append(("bare", "pass", after, after["rps"]))
    for label, sc, r, ref in rows:
        if r is None:
            print(f"{label:<14} {sc:<10}")
            continue
        ratio = r["rps"] / ref if ref else None
        st = "ok" if r.get("status_ok", True) else "BAD STATUS"
        if r.get("load_cores_saturated"):
            st += ",LOAD"
        cpu = r.get("cpu_pct", {})
        cpus = (
            f"{fmt(cpu.get('server'), '.0f')}/{fmt(cpu.get('postgres'), '.0f')}"
            f"/{fmt(cpu.get('redis'), '.0f')}"
            if cpu
            else "-"
        )
        print(
            f"{label:<14} {sc:<10} {r['rps']:>9.0f} {fmt(r['p50_ms']):>8} "
            f"{fmt(r['p99_ms']):>8} {fmt(ratio, '.3f'):>8}  {st:<10} {cpus:>14} "
            f"{fmt(r.get('server_core_other_pct'), '.0f'):>6}"
        )
    print()
    print(
        "Fixed rate, open loop (latency from the 1 ms tick each request fell due, like "
        "wrk2); bare: "
        "pass-through at half its peak; Tollway: prepaid call at that same rate, then at "
        "half of its own prepaid peak. 'added p99' is to the mean of the bare rows around it:"
    )
    b = res.get("bare", {}).get("scenarios", {}).get("half_load")
    if b:
        print(
            f"  {'bare':<14} {b['target_rps']:>7.0f}/s  p50 {fmt(b['p50_ms'])}  "
            f"p99 {fmt(b['p99_ms'])} ms  achieved {b['rps']:.0f}/s"
        )
    for name, m in res.get("tollway", {}).items():
        ref = m.get("bare_half_p99_ref", b["p99_ms"] if b else None)
        for key in ("half_load", "half_own_peak"):
            h = m.get("scenarios", {}).get(key)
            if h:
                d = h["p99_ms"] - ref if ref is not None and h["p99_ms"] is not None else None
                print(
                    f"  {name:<14} {h['target_rps']:>7.0f}/s  p50 {fmt(h['p50_ms'])}  "
                    f"p99 {fmt(h['p99_ms'])} ms  achieved {h['rps']:.0f}/s  "
                    f"added p99 {fmt(d)} ms"
                    + ("  (own half peak)" if key != "half_load" else "")
                    + ("  SATURATED" if h.get("saturated") else "")
                )
        after = res.get(f"bare_after_{name}", {}).get("scenarios", {}).get("half_load")
        if after:
            print(
                f"  {'bare':<14} {after['target_rps']:>7.0f}/s  p50 {fmt(after['p50_ms'])}  "
                f"p99 {fmt(after['p99_ms'])} ms  achieved {after['rps']:.0f}/s"
            )
    print()
    print("SSE time to first body byte (p50 / p99 ms):")
    for label, r in [
        ("direct", res.get("direct", {}).get("sse")),
        ("bare", res.get("bare", {}).get("scenarios", {}).get("sse")),
    ] + [(n, m.get("scenarios", {}).get("sse")) for n, m in res.get("tollway", {}).items()]:
        if r:
            print(f"  {label:<14} {fmt(r['ttfb_p50_ms'], '.3f')} / {fmt(r['ttfb_p99_ms'], '.3f')}")
    print()
    print(f"Large body ({res['settings']['large_bytes'] / 2**30:.2f} GiB, generated upstream):")
    for label, r in [
        ("direct", res.get("direct", {}).get("large")),
        ("bare", res.get("bare", {}).get("scenarios", {}).get("large")),
    ] + [(n, m.get("scenarios", {}).get("large")) for n, m in res.get("tollway", {}).items()]:
        if r:
            extra = ""
            if r.get("rss"):
                extra = (
                    f"  peak RSS {r['rss']['peak_rss_mb']:.1f} MB "
                    f"(that process before: {r['rss']['peak_pid_rss_before_mb']:.1f} MB)"
                )
            print(
                f"  {label:<14} {fmt(r['mb_per_s'], '.0f')} MB/s  status {r['status']}  "
                f"bytes {r['bytes']}{extra}"
            )
    print()
    print("Targets:")
    for t in res.get("targets", []):
        val = t.get("value", t.get("value_ms", t.get("value_mb", t.get("value_us"))))
        tag = (
            ("met " if t["met"] else "miss")
            if t.get("informational")
            else ("MET " if t["met"] else "MISS")
        )
        print(f"  [{tag}] {t['mode']:<12} {t['target']}: {val}")
    errs = [(n, e) for n, m in res.get("tollway", {}).items() for e in m.get("errors", [])]
    errs += [("run", e) for e in res.get("errors", [])]
    if errs:
        print()
        print("Errors:")
        for n, e in errs:
            print(f"  {n}: {e}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    ap.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help="comma list of Tollway modes, or 'none' (default: all five)",
    )
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per load point")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--no-wrk", action="store_true", help="use the Python closed-loop generator")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--sse-count", type=int, default=100)
    ap.add_argument("--large-bytes", type=int, default=1 << 30)
    ap.add_argument("--large-timeout", type=float, default=60.0)
    ap.add_argument("--budget", type=float, default=360.0, help="hard wall-clock limit, s")
    ap.add_argument("--startup-timeout", type=float, default=60.0)
    ap.add_argument(
        "--pg-url", default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
    )
    ap.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
    )
    ap.add_argument("--redis-db", type=int, default=int(os.environ.get("BENCH_REDIS_DB", "13")))
    ap.add_argument(
        "--no-bare-between",
        action="store_true",
        help="do not re-measure the bare proxy after each Tollway mode",
    )
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<ts>.json)")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    deadline = t_start + args.budget - 8  # keep time to stop everything and write the JSON
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / f"{stamp}.tmp"  # logs; *.tmp is git-ignored
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) if args.out else RESULTS / f"{stamp}.json"

    def on_signal(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(args.budget) + 5)  # last resort; the Driver budget normally ends first
    P.die_with_parent()  # if bench/run (or timeout) is killed, so are we, and our children

    cpus = plan_cpus(args.no_pin)
    machine = machine_info()  # before pinning: it records the CPUs this run may use
    if cpus["load"]:
        os.sched_setaffinity(0, cpus["load"])  # harness, wrk, loadgen, curl inherit this
    modes = [] if args.modes == "none" else [ALL_MODES[m] for m in args.modes.split(",") if m]
    res: dict = {
        "started_at": stamp,
        "machine": machine,
        "pinning": {k: (sorted(v) if isinstance(v, set) else v) for k, v in cpus.items()},
        "settings": {k: v for k, v in vars(args).items()},
        "load_tool": "wrk" if shutil.which("wrk") and not args.no_wrk else "loadgen-closed",
        "errors": [],
        "tollway": {},
    }
    drv = Driver(args, deadline)
    procs = P.Procs()
    log(
        f"results -> {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}"
        f"; logs in {workdir.relative_to(ROOT)}; budget {args.budget:.0f}s"
    )
    log(cpus["note"])
    rc = 0
    try:
        up_port = P.free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        up = procs.start(
            "upstream",
            [PY, "-m", "bench.upstream", "--port", str(up_port)],
            cpus=cpus["load"],
            log=workdir / "upstream.log",
            cwd=str(ROOT),
        )
        T.wait_health(upstream, up, 20)
        drv.upstream_pid = up.pid
        res["direct"] = {
            "sse": drv.ttfb(f"{upstream}/sse", []),
            "large": drv.large(f"{upstream}/large/{args.large_bytes}", [], None),
        }
        log(
            f"direct SSE TTFB p50 {res['direct']['sse']['ttfb_p50_ms']:.3f} ms; direct large "
            f"{res['direct']['large']['mb_per_s']:.0f} MB/s"
        )
        res["bare"] = run_bare(drv, procs, upstream, cpus, workdir, None, "bare", True)
        res["bare_rps"] = res["bare"]["scenarios"]["pass"]["rps"]
        half = res["bare_rps"] / 2
        res["half_load_rate"] = half
        dep = deps_ok(args) if any(m.db == "pg" for m in modes) else {}
        res["deps"] = dep
        # The bare proxy is measured again after every Tollway mode; each mode's ratios use
        # the mean of the bare figures just before and just after it (drift on a shared
        # machine is large: other work comes and goes during a run).
        res["bare_series"] = [res["bare_rps"]]
        res["bare_half_p99_series"] = [res["bare"]["scenarios"]["half_load"]["p99_ms"]]
        for m in modes:
            if m.db == "pg" and not (dep.get("pg") and dep.get("redis")):
                res["tollway"][m.name] = {
                    "mode": m.name,
                    "errors": [f"skipped: PostgreSQL/Redis not reachable: {dep}"],
                    "scenarios": {},
                }
                continue
            log(f"Tollway {m.name}: starting")
            res["tollway"][m.name] = run_tollway(
                drv, procs, m, upstream, cpus, workdir, half, stamp, args
            )
            for e in res["tollway"][m.name]["errors"]:
                log(f"{m.name}: {e}")
            before = res["bare_series"][-1]
            hb = res["bare_half_p99_series"][-1]
            res["tollway"][m.name]["bare_half_p99_before"] = hb
            res["tollway"][m.name]["bare_half_p99_ref"] = hb
            res["tollway"][m.name]["bare_before_rps"] = before
            res["tollway"][m.name]["bare_ref_rps"] = before
            if not args.no_bare_between:
                try:
                    label = f"bare_after_{m.name}"
                    res[label] = run_bare(drv, procs, upstream, cpus, workdir, half, label, False)
                    after = res[label]["scenarios"]["pass"]["rps"]
                    res["bare_series"].append(after)
                    res["tollway"][m.name]["bare_after_rps"] = after
                    res["tollway"][m.name]["bare_ref_rps"] = (before + after) / 2
                    res["tollway"][m.name]["bare_after_rps"] = after
                    hl = res[label]["scenarios"].get("half_load", {}).get("p99_ms")
                    if hl is not None:
                        res["bare_half_p99_series"].append(hl)
                        res["tollway"][m.name]["bare_half_p99_after"] = hl
                        res["tollway"][m.name]["bare_half_p99_ref"] = (hb + hl) / 2
                except Budget as e:
                    res["errors"].append(str(e))
    except Budget as e:
        res["errors"].append(str(e))
    except SystemExit as e:
        res["errors"].append(f"aborted: {e}")
        rc = 2
    except Exception as e:
        res["errors"].append(f"{type(e).__name__}: {e}")
        res["traceback"] = traceback.format_exc()[-3000:]
        rc = 1
    finally:
        signal.alarm(0)
        procs.stop_all()
        res["elapsed_s"] = time.monotonic() - t_start
        try:
            res["targets"] = targets(res)
        except Exception as e:
            res["targets"] = []
            res["errors"].append(f"target evaluation failed: {type(e).__name__}: {e}")
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str))
        tmp.replace(out_path)
    print_report(res)
    print()
    log(f"wrote {out_path} in {res['elapsed_s']:.0f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
