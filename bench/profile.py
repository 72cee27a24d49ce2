"""bench/profile: run the prepaid scenario against one Tollway process under a sampling
profiler and write the profile, plus a summary of where the busy time goes, to
bench/results/. py-spy (installed into the venv from PyPI if missing) samples the running
server from outside; if py-spy cannot be used, pyinstrument wraps the server instead.

  bench/profile [--mode sqlite-1w|pg-redis-1w|...] [--duration 12] [--native] [--idle]
                [--scenario prepaid|free|402]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench import harness as H
from bench import procs as P
from bench import stacks as S
from bench import tollway_ctl as T

ROOT = H.ROOT
RESULTS = H.RESULTS
PY = sys.executable


def ensure_pyspy() -> str | None:
    cand = Path(PY).parent / "py-spy"
    if cand.exists():
        return str(cand)
    if shutil.which("py-spy"):
        return shutil.which("py-spy")
    H.log("py-spy missing: installing it into the virtualenv from PyPI")
    r = subprocess.run(
        [PY, "-m", "pip", "install", "-q", "py-spy"], capture_output=True, text=True, timeout=180
    )
    if r.returncode == 0 and cand.exists():
        return str(cand)
    H.log(f"py-spy install failed: {r.stderr[-300:]}")
    return None


def ensure_pyinstrument() -> bool:
    try:
        import pyinstrument  # noqa: F401

        return True
    except ImportError:
        r = subprocess.run(
            [PY, "-m", "pip", "install", "-q", "pyinstrument"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        return r.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/profile")
    ap.add_argument("--mode", default="sqlite-1w", choices=list(H.ALL_MODES))
    ap.add_argument("--scenario", default="prepaid", choices=["prepaid", "free", "402"])
    ap.add_argument("--duration", type=float, default=12.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    ap.add_argument(
        "--nonblocking",
        action="store_true",
        help="py-spy --nonblocking: less overhead, but torn stacks",
    )
    ap.add_argument(
        "--idle",
        action="store_true",
        help="py-spy --idle: also count samples where the server waits (I/O)",
    )
    ap.add_argument("--profiler", choices=["py-spy", "pyinstrument"], default="py-spy")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument(
        "--pg-url", default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
    )
    ap.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
    )
    ap.add_argument("--redis-db", type=int, default=int(os.environ.get("BENCH_REDIS_DB", "13")))
    args = ap.parse_args(argv)

    def on_signal(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(args.duration) + 150)
    P.die_with_parent()

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = RESULTS / f"{stamp}-profile.tmp"
    workdir.mkdir(parents=True, exist_ok=True)
    base_name = f"profile-{stamp}-{args.mode}-{args.scenario}"
    cpus = H.plan_cpus(args.no_pin)
    if cpus["load"]:
        os.sched_setaffinity(0, cpus["load"])
    mode = H.ALL_MODES[args.mode]
    profiler = args.profiler
    pyspy = ensure_pyspy() if profiler == "py-spy" else None
    if profiler == "py-spy" and not pyspy:
        profiler = "pyinstrument"
    if profiler == "pyinstrument" and not ensure_pyinstrument():
        H.log("neither py-spy nor pyinstrument is available")
        return 1

    procs = P.Procs()
    inst = T.TollwayInstance(mode, workdir, args.pg_url, args.redis_url, args.redis_db, stamp)
    meta: dict = {
        "mode": mode.name,
        "scenario": args.scenario,
        "profiler": profiler,
        "machine": H.machine_info(),
        "pinning": cpus["note"],
    }
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
        port = P.free_port()
        base = f"http://127.0.0.1:{port}"
        env = inst.env(port)
        cmd = inst.command(port)
        out_ps = RESULTS / f"{base_name}.html"
        if profiler == "pyinstrument":
            cmd = [PY, "-m", "pyinstrument", "-r", "html", "-o", str(out_ps), *cmd]
        scpus = cpus["server_1w"] if mode.workers == 1 else cpus["server_2w"]
        p = procs.start("tollway", cmd, env=env, cpus=scpus, log=inst.log, cwd=str(ROOT))
        T.wait_health(base, p, 60)
        s = T.setup(base, inst.admin, upstream)
        url, hdr = {
            "prepaid": (s.url(s.svc_paid, "json"), T.bearer(s.buyer_rich)),
            "free": (s.url(s.svc_free, "json"), T.bearer(s.buyer_free)),
            "402": (s.url(s.svc_paid, "json"), T.bearer(s.buyer_poor)),
        }[args.scenario]
        st, _, body = T.http("GET", url, headers=dict([hdr.split(": ", 1)]))
        meta["probe_status"] = st
        wrk = shutil.which("wrk")

        def load(seconds: float) -> subprocess.Popen:
            if wrk:
                c = [
                    wrk,
                    "-t1",
                    f"-c{args.connections}",
                    f"-d{seconds:g}s",
                    "-s",
                    str(H.HERE / "report.lua"),
                    "-H",
                    hdr,
                    url,
                ]
            else:
                c = [
                    PY,
                    "-m",
                    "bench.loadgen",
                    "closed",
                    "--url",
                    url,
                    "-H",
                    hdr,
                    "-c",
                    str(args.connections),
                    "--duration",
                    str(seconds),
                    "--warmup",
                    "0",
                ]
            return subprocess.Popen(
                c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
            )

        H.log(f"warm-up 2s ({args.scenario}, probe status {st})")
        load(2).wait(30)
        H.log(f"profiling {args.duration:.0f}s with {profiler}")
        lg = load(args.duration + 1)
        meter = P.CpuMeter(
            {
                "server": P.tree(p.pid),
                "postgres": P.pids_named("postgres"),
                "redis": P.pids_named("redis-server"),
            }
        )
        if profiler == "py-spy":
            raw = RESULTS / f"{base_name}.txt"
            pids = P.tree(p.pid)
            target = p.pid
            pc = [
                pyspy,
                "record",
                "-p",
                str(target),
                "-r",
                str(args.rate),
                "-d",
                str(int(args.duration)),
                "-f",
                "raw",
                "-o",
                str(raw),
                "--threads",
            ]
            if args.nonblocking:
                pc.append("--nonblocking")
            if args.idle:
                pc.append("--idle")
            if mode.workers > 1 or len(pids) > 1:
                pc.append("--subprocesses")
            if args.native:
                pc.append("--native")
            r = subprocess.run(pc, capture_output=True, text=True, timeout=args.duration + 60)
            meta["py_spy"] = (r.stdout + r.stderr)[-600:]
        lg_out, _ = lg.communicate(timeout=args.duration + 30)
        meta["cpu_pct_while_profiling"] = meter.stop()
        meta["load_output"] = lg_out[-1500:]
        m = [ln for ln in lg_out.splitlines() if ln.startswith(("WRKJSON", "{"))]
        if m:
            j = json.loads(m[-1].split(" ", 1)[1] if m[-1].startswith("WRKJSON") else m[-1])
            meta["rps_while_profiling"] = (
                j["requests"] / (j["duration_us"] / 1e6) if "duration_us" in j else j.get("rps")
            )
        if profiler == "py-spy":
            summ = S.summarise(raw)
            meta["summary"] = summ
            (RESULTS / f"{base_name}.summary.txt").write_text(S.to_text(summ))
            S.to_speedscope(raw, RESULTS / f"{base_name}.speedscope.json")
            print(S.to_text(summ))
        else:
            procs.stop(p, grace=15)  # pyinstrument writes its report when the server exits
        H.log(
            f"requests/s while profiling: {meta.get('rps_while_profiling')}; CPU % of one "
            f"core: {meta.get('cpu_pct_while_profiling')}"
        )
    except SystemExit as e:
        meta["error"] = f"aborted: {e}"
        rc = 2
    except Exception as e:
        meta["error"] = f"{type(e).__name__}: {e}"
        rc = 1
    finally:
        signal.alarm(0)
        procs.stop_all()
        inst.cleanup()
        (RESULTS / f"{base_name}.json").write_text(json.dumps(meta, indent=2, default=str))
        H.log(f"wrote bench/results/{base_name}.* " + (meta.get("error") or ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
