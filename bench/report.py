"""Render a bench/run JSON result as Markdown (the tables of bench/RESULTS.md).

python -m bench.report bench/results/<ts>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def render(res: dict) -> str:
    m = res["machine"]
    out = [
        f"Run `{res['started_at']}` (git {m.get('git_head', '?')}, "
        f"{m.get('tollway_tree_dirty_files', '?')} uncommitted files in the Tollway packages), "
        f"{res['elapsed_s']:.0f} s, load tool {res['load_tool']}, "
        f"{res['settings']['connections']} connections, "
        f"{res['settings']['duration']:g} s per point after "
        f"{res['settings']['warmup']:g} s of warm-up.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPUs (nproc) | {m['nproc']} ({m['cpu_model']}) |",
        f"| memory | {m['mem_total_mb']} MB |",
        f"| kernel | {m['kernel']} |",
        f"| Python | {m['python']}, aiohttp {m.get('aiohttp')}, uvloop {m.get('uvloop')}, "
        f"asyncpg {m.get('asyncpg')}, redis-py {m.get('redis')} |",
        f"| load generator | {m.get('wrk', 'none')}; Python open-loop generator "
        "(bench/loadgen.py) |",
        "| load average at start | "
        + ", ".join(f"{x:.2f}" for x in m.get("loadavg_at_start", []))
        + " |",
        "",
        f"Pinning: {res['pinning']['note']}",
        "",
        "### Closed loop (wrk): peak throughput",
        "",
        "| proxy | scenario | req/s | p50 ms | p99 ms | vs bare (mean of the bare rows "
        "around it) | CPU % server / pg / redis / other on the server's core "
        "(of one core) | status |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    bare = res.get("bare_rps")
    rows = []
    if res.get("bare", {}).get("scenarios", {}).get("pass"):
        rows.append(("bare", "pass-through", res["bare"]["scenarios"]["pass"], bare))
    for name, t in res.get("tollway", {}).items():
        ref = t.get("bare_ref_rps") or bare
        for sc in ("free", "prepaid", "402"):
            if sc in t.get("scenarios", {}):
                rows.append((name, sc, t["scenarios"][sc], ref))
        after = res.get(f"bare_after_{name}", {}).get("scenarios", {}).get("pass")
        if after:
            rows.append(("bare", "pass-through", after, after["rps"]))
    for label, sc, r, ref in rows:
        c = r.get("cpu_pct", {})
        cpu = (
            f"{f(c.get('server'), '.0f')} / {f(c.get('postgres'), '.0f')} / "
            f"{f(c.get('redis'), '.0f')} / {f(r.get('server_core_other_pct'), '.0f')}"
        )
        st = (
            "ok"
            if r.get("status_ok", True)
            else f"**unexpected statuses** ({r.get('non_2xx_3xx')} non-2xx)"
        )
        if r.get("load_cores_saturated"):
            st += "; load core >= 90% busy"
        out.append(
            f"| {label} | {sc} | {r['rps']:.0f} | {f(r['p50_ms'])} | {f(r['p99_ms'])} | "
            f"{f(r['rps'] / ref if ref else None, '.3f')} | {cpu} | {st} |"
        )
    out += [
        "",
        "### Fixed rate (open loop): latency at half of peak",
        "",
        "| proxy | offered req/s | achieved | p50 ms | p99 ms | p99 - bare p99 (mean of the bare "
        "rows around it) | server CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def bare_row(h: dict) -> None:
        out.append(
            f"| bare pass-through | {h['target_rps']:.0f} | {h['rps']:.0f} | "
            f"{f(h['p50_ms'])} | {f(h['p99_ms'])} | - | "
            f"{f(h.get('cpu_pct', {}).get('server'), '.0f')} |"
        )

    bh = res.get("bare", {}).get("scenarios", {}).get("half_load")
    if bh:
        bare_row(bh)
    for name, t in res.get("tollway", {}).items():
        ref = t.get("bare_half_p99_ref", bh["p99_ms"] if bh else None)
        for key, lab in (
            ("half_load", "prepaid, bare's half peak"),
            ("half_own_peak", "prepaid, half its own peak"),
        ):
            h = t.get("scenarios", {}).get(key)
            if not h:
                continue
            d = h["p99_ms"] - ref if ref is not None and h.get("p99_ms") is not None else None
            sat = " (saturated)" if h.get("saturated") else ""
            out.append(
                f"| {name} {lab} | {h['target_rps']:.0f} | {h['rps']:.0f}{sat} | "
                f"{f(h['p50_ms'])} | {f(h['p99_ms'])} | {f(d)} | "
                f"{f(h.get('cpu_pct', {}).get('server'), '.0f')} |"
            )
        after = res.get(f"bare_after_{name}", {}).get("scenarios", {}).get("half_load")
        if after:
            bare_row(after)
    out += [
        "",
        "### SSE: time to first body byte",
        "",
        "| path | p50 ms | p99 ms | p50 - direct |",
        "|---|---:|---:|---:|",
    ]
    d = res.get("direct", {}).get("sse", {})
    sse_rows = [("direct", d), ("bare", res.get("bare", {}).get("scenarios", {}).get("sse"))]
    sse_rows += [(n, t.get("scenarios", {}).get("sse")) for n, t in res.get("tollway", {}).items()]
    for n, r in sse_rows:
        if r:
            out.append(
                f"| {n} | {f(r['ttfb_p50_ms'], '.3f')} | {f(r['ttfb_p99_ms'], '.3f')} | "
                f"{f(r['ttfb_p50_ms'] - d['ttfb_p50_ms'] if d else None, '.3f')} |"
            )
    gib = res["settings"]["large_bytes"] / 2**30
    out += [
        "",
        f"### Large body: {gib:.2f} GiB generated by the upstream",
        "",
        "| path | MB/s | bytes | peak RSS MB | RSS before MB |",
        "|---|---:|---:|---:|---:|",
    ]
    lrows = [
        ("direct (curl from upstream)", res.get("direct", {}).get("large")),
        ("bare", res.get("bare", {}).get("scenarios", {}).get("large")),
    ]
    lrows += [(n, t.get("scenarios", {}).get("large")) for n, t in res.get("tollway", {}).items()]
    for n, r in lrows:
        if r:
            rss = r.get("rss", {})
            out.append(
                f"| {n} | {f(r['mb_per_s'], '.0f')} | {r['bytes']} | "
                f"{f(rss.get('peak_rss_mb'), '.1f')} | "
                f"{f(rss.get('peak_pid_rss_before_mb'), '.1f')} |"
            )
    out += ["", "### Targets", "", "| target | mode | value | met |", "|---|---|---|---|"]
    for t in res.get("targets", []):
        val = t.get("value", t.get("value_ms", t.get("value_mb", t.get("value_us"))))
        met = (
            ("yes" if t["met"] else "no")
            if t.get("informational")
            else ("**MET**" if t["met"] else "**MISSED**")
        )
        out.append(f"| {t['target']} | {t['mode']} | {val} | {met} |")
    errs = [(n, e) for n, t in res.get("tollway", {}).items() for e in t.get("errors", [])]
    logs = [
        (n, t.get("log_counts"))
        for n, t in res.get("tollway", {}).items()
        if t.get("log_counts", {}).get("tracebacks")
    ]
    if errs or logs or res.get("errors"):
        out += ["", "### Errors seen", ""]
        out += [f"- {n}: {e}" for n, e in errs]
        out += [f"- {n}: server log has {c}" for n, c in logs]
        out += [f"- run: {e}" for e in res.get("errors", [])]
    return "\n".join(out) + "\n"


def main() -> None:
    print(render(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
