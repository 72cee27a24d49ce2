"""Summarise py-spy's collapsed ("raw") stacks: where the busy CPU time goes.

  python -m bench.stacks results/profile-....txt [--top 25]

Percentages are of the samples py-spy took while the process was busy (idle samples,
i.e. waiting in epoll, are not recorded by default). "self" is time in the function
itself; "total" is time with the function anywhere on the stack.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# first match wins; paths are as py-spy shows them (site-packages stripped)
GROUPS = [
    ("tollway proxy/", r"^(/.*/)?proxy/"),
    ("tollway billing/", r"^(/.*/)?billing/"),
    ("tollway ledger/", r"^(/.*/)?ledger/"),
    ("tollway config/", r"^(/.*/)?config/"),
    ("aiohttp", r"aiohttp/|multidict/|yarl/|propcache/|aiohappyeyeballs/|_http_parser|_websocket"),
    ("asyncpg", r"asyncpg/"),
    ("redis-py", r"redis/"),
    ("sqlite (sqlite3/aiosqlite)", r"sqlite"),
    ("prometheus_client", r"prometheus_client/"),
    ("logging", r"logging/"),
    ("json", r"json/"),
    ("decimal", r"decimal|_pydecimal"),
    ("uuid/secrets/hashlib/hmac", r"uuid|secrets|hashlib|hmac"),
    ("asyncio / uvloop", r"asyncio/|uvloop"),
    ("threading/concurrent", r"threading|concurrent/"),
    ("bench harness", r"bench/"),
    ("python startup (runpy)", r"^<frozen runpy>$"),
]


def parse_frame(fr: str) -> tuple[str, str]:
    m = FRAME.match(fr.strip())
    if not m:
        return fr.strip(), ""
    return m.group("func"), m.group("file") or ""


def group_of(file: str) -> str:
    for name, pat in GROUPS:
        if re.search(pat, file):
            return name
    if file.endswith(".py"):
        return "other python"
    return "native / other"


# Leaves where a thread is blocked, not working. py-spy's idle detection misses some of
# them (a timed Event.wait in a helper thread shows up as "busy"); their samples are
# dropped from the busy-time percentages and counted apart.
WAIT_LEAVES = re.compile(
    r"^(Condition\.wait|Event\.wait|wait|_wait_for_tstate_lock|select|get|sleep|"
    r"_worker|accept|recv|poll|epoll_wait) \((threading|selectors|queue|time|socket|"
    r"concurrent/futures/thread)\.py"
)


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        try:
            cnt = int(n)
        except ValueError:
            continue
        stacks.append((stack.split(";"), cnt))
    return stacks


def summarise(path: Path, top: int = 25) -> dict:
    raw = load(path)
    waiting = sum(c for fr, c in raw if fr and WAIT_LEAVES.match(fr[-1].strip()))
    stacks = [(fr, c) for fr, c in raw if not (fr and WAIT_LEAVES.match(fr[-1].strip()))]
    threads: Counter = Counter()
    for fr, c in stacks:
        head = fr[0].strip() if fr else ""
        threads[head if head.startswith(("thread ", "process ")) else "?"] += c
    total = sum(c for _, c in stacks) or 1
    self_c: Counter = Counter()
    incl_c: Counter = Counter()
    group_self: Counter = Counter()
    group_incl: Counter = Counter()
    for frames, cnt in stacks:
        parsed = [parse_frame(f) for f in frames]
        # drop the thread/process header frame py-spy may put first
        parsed = [p for p in parsed if p[1] or not p[0].startswith(("process ", "thread "))]
        if not parsed:
            continue
        leaf = parsed[-1]
        self_c[f"{leaf[0]} ({leaf[1]})"] += cnt
        group_self[group_of(leaf[1])] += cnt
        seen, seen_g = set(), set()
        for func, file in parsed:
            k = f"{func} ({file})"
            if k not in seen:
                seen.add(k)
                incl_c[k] += cnt
            g = group_of(file)
            if g not in seen_g:
                seen_g.add(g)
                group_incl[g] += cnt
    pct = lambda c: round(100.0 * c / total, 1)  # noqa: E731
    tollway = {k: v for k, v in incl_c.items() if group_of(parse_frame(k)[1]).startswith("tollway")}
    return {
        "file": str(path),
        "samples": total,
        "waiting_samples_dropped": waiting,
        "samples_by_thread": dict(threads.most_common()),
        "self_by_group_pct": {g: pct(c) for g, c in group_self.most_common()},
        "total_by_group_pct": {g: pct(c) for g, c in group_incl.most_common()},
        "top_self_pct": [(k, pct(c)) for k, c in self_c.most_common(top)],
        "top_total_pct": [(k, pct(c)) for k, c in incl_c.most_common(top)],
        "tollway_functions_total_pct": [(k, pct(c)) for k, c in Counter(tollway).most_common(top)],
    }


def to_text(s: dict) -> str:
    out = [
        f"profile {s['file']}: {s['samples']} busy samples "
        f"({s.get('waiting_samples_dropped', 0)} samples blocked in a wait dropped)",
        f"samples by thread: {s.get('samples_by_thread')}",
        "",
        "self time by package (%):",
    ]
    out += [f"  {v:5.1f}  {k}" for k, v in s["self_by_group_pct"].items()]
    out += ["", "time with the package on the stack (%):"]
    out += [f"  {v:5.1f}  {k}" for k, v in s["total_by_group_pct"].items()]
    out += ["", "top functions by self time (%):"]
    out += [f"  {v:5.1f}  {k}" for k, v in s["top_self_pct"]]
    out += ["", "Tollway functions by total time (%):"]
    out += [f"  {v:5.1f}  {k}" for k, v in s["tollway_functions_total_pct"]]
    out += ["", "top functions by total time (%):"]
    out += [f"  {v:5.1f}  {k}" for k, v in s["top_total_pct"]]
    return "\n".join(out) + "\n"


def to_speedscope(path: Path, out: Path) -> None:
    """Write a speedscope.app file (sampled profile) from collapsed stacks."""
    frames: list[dict] = []
    index: dict[str, int] = {}
    samples, weights = [], []
    for stack, cnt in load(path):
        ids = []
        for fr in stack:
            if fr not in index:
                func, file = parse_frame(fr)
                index[fr] = len(frames)
                frames.append({"name": func, "file": file})
            ids.append(index[fr])
        samples.append(ids)
        weights.append(cnt)
    doc = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": frames},
        "profiles": [
            {
                "type": "sampled",
                "name": path.name,
                "unit": "none",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        ],
        "name": path.name,
        "exporter": "bench/stacks.py",
    }
    out.write_text(json.dumps(doc))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    s = summarise(a.file, a.top)
    print(json.dumps(s, indent=2) if a.json else to_text(s))


if __name__ == "__main__":
    main()
