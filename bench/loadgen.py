"""A small HTTP/1.1 load generator that runs in its own process.

Why it exists: wrk (closed loop) measures throughput at saturation, but wrk has no
fixed-rate mode (that is wrk2), and a latency measured at saturation is mostly queueing.
`rate` mode is open loop, like wrk2: requests are *scheduled* at a fixed rate and each
latency is measured from the (1 ms timer) tick at which it fell due, not from when a free
connection happened to send it, so a stall is counted against every request it delays
(no coordinated omission). `closed` mode is the fallback when wrk is missing.
`ttfb` measures time to first body byte of a streaming (SSE) answer.

Protocol handling is deliberately minimal: keep-alive GET/POST, Content-Length or chunked
bodies, reconnect on `Connection: close`. Output: one JSON object on stdout.

  python -m bench.loadgen rate   --url URL --rate 2500 --duration 6 [-c 64] [-H 'K: V']
  python -m bench.loadgen closed --url URL --duration 6 [-c 32]
  python -m bench.loadgen ttfb   --url URL --count 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter, deque
from urllib.parse import urlsplit

perf = time.perf_counter

HEAD, BODY, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER, UNTIL_CLOSE = range(7)


def build_request(url: str, headers: list[str], method: str = "GET", body: bytes = b"") -> tuple:
    u = urlsplit(url)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    lines = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}", "User-Agent: tollway-bench"]
    lines += headers
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return u.hostname, u.port or 80, raw


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    v = sorted(values)
    n = len(v)

    def pct(p: float) -> float:
        return v[min(n - 1, max(0, int(round(p / 100.0 * n + 0.5)) - 1))]

    return {
        "count": n,
        "mean": sum(v) / n,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "p999": pct(99.9),
        "max": v[-1],
    }


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, gen: Gen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = HEAD
        self.need = 0
        self.status = 0
        self.close_after = False
        self.t_intended = 0.0
        self.t_sent = 0.0
        self.t_headers = 0.0
        self.t_first_body = 0.0
        self.body_bytes = 0
        self.busy = False
        self.lost: asyncio.Future | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        if self.busy:
            if self.state == UNTIL_CLOSE:
                self._finish(perf())
            else:
                self.busy = False
                self.gen.on_error(self, "closed")
        self.transport = None
        if self.lost and not self.lost.done():
            self.lost.set_result(None)

    def send(self, intended: float) -> None:
        self.busy = True
        self.state = HEAD
        self.t_intended = intended
        self.t_first_body = 0.0
        self.body_bytes = 0
        self.t_sent = perf()
        self.transport.write(self.gen.raw)

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        now = perf()
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        while pos < end or self.state in (BODY,) and self.need == 0:
            st = self.state
            if st == HEAD:
                i = buf.find(b"\r\n\r\n", pos)
                if i < 0:
                    break
                head = bytes(buf[pos:i]).decode("latin-1")
                pos = i + 4
                self.t_headers = now
                lines = head.split("\r\n")
                self.status = int(lines[0][9:12])
                clen = None
                chunked = False
                self.close_after = False
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    k = k.strip().lower()
                    if k == "content-length":
                        clen = int(v)
                    elif k == "transfer-encoding" and "chunked" in v.lower():
                        chunked = True
                    elif k == "connection" and "close" in v.lower():
                        self.close_after = True
                if chunked:
                    self.state = CHUNK_SIZE
                elif clen is not None:
                    self.state = BODY
                    self.need = clen
                elif self.status in (204, 304) or 100 <= self.status < 200:
                    self.state = BODY
                    self.need = 0
                else:
                    self.state = UNTIL_CLOSE
                    self.close_after = True
            elif st == BODY:
                n = min(end - pos, self.need)
                if n and not self.t_first_body:
                    self.t_first_body = now
                pos += n
                self.need -= n
                self.body_bytes += n
                if self.need == 0:
                    self._finish(now)
                    if pos >= end:
                        break
            elif st == CHUNK_SIZE:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                size = int(bytes(buf[pos:i]).split(b";")[0], 16)
                pos = i + 2
                if size == 0:
                    self.state = TRAILER
                else:
                    self.state = CHUNK_DATA
                    self.need = size
            elif st == CHUNK_DATA:
                n = min(end - pos, self.need)
                if n and not self.t_first_body:
                    self.t_first_body = now
                pos += n
                self.need -= n
                self.body_bytes += n
                if self.need == 0:
                    self.state = CHUNK_CRLF
            elif st == CHUNK_CRLF:
                if end - pos < 2:
                    break
                pos += 2
                self.state = CHUNK_SIZE
            elif st == TRAILER:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                line_empty = i == pos
                pos = i + 2
                if line_empty:
                    self._finish(now)
            elif st == UNTIL_CLOSE:
                n = end - pos
                if n and not self.t_first_body:
                    self.t_first_body = now
                self.body_bytes += n
                pos = end
        del buf[:pos]

    def _finish(self, now: float) -> None:
        self.state = HEAD
        self.busy = False
        if self.close_after and self.transport is not None:
            self.transport.close()
            self.transport = None
        self.gen.on_done(self, now)


class Gen:
    def __init__(
        self, url: str, headers: list[str], connections: int, method: str = "GET", body: bytes = b""
    ) -> None:
        self.host, self.port, self.raw = build_request(url, headers, method, body)
        self.nconn = connections
        self.idle: deque[Conn] = deque()
        self.backlog: deque[float] = deque()
        self.lat: list[float] = []
        self.ttfb: list[float] = []
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self.record_from = 0.0
        self.record_until = float("inf")
        self.completed_in_window = 0
        self.closed_loop = False
        self.stopping = False
        self.inflight = 0
        self.reconnecting = 0
        self.waiter: asyncio.Future | None = None

    async def connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: Conn(self), self.host, self.port)
        return proto

    async def open(self) -> None:
        conns = await asyncio.gather(*(self.connect() for _ in range(self.nconn)))
        self.idle.extend(conns)

    def dispatch(self, intended: float) -> None:
        if self.idle:
            self.inflight += 1
            self.idle.popleft().send(intended)
        else:
            self.backlog.append(intended)

    def on_done(self, conn: Conn, now: float) -> None:
        self.inflight -= 1
        if self.record_from <= conn.t_intended < self.record_until:
            self.lat.append(now - conn.t_intended)
            if conn.t_first_body:
                self.ttfb.append(conn.t_first_body - conn.t_sent)
            self.statuses[conn.status] += 1
            self.completed_in_window += 1
        self._next(conn)

    def on_error(self, conn: Conn, why: str) -> None:
        self.inflight -= 1
        if self.record_from <= conn.t_intended < self.record_until:
            self.errors[why] += 1
        self._next(conn)

    def _next(self, conn: Conn) -> None:
        if self.waiter is not None:
            if conn.transport is not None:
                self.idle.append(conn)
            if not self.waiter.done():
                self.waiter.set_result(conn)
            return
        if conn.transport is None:
            if not self.stopping:
                self.reconnecting += 1
                asyncio.ensure_future(self._reconnect())
            return
        if self.stopping:
            self.idle.append(conn)
        elif self.closed_loop:
            self.inflight += 1
            conn.send(perf())
        elif self.backlog:
            self.inflight += 1
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    async def _reconnect(self) -> None:
        try:
            conn = await self.connect()
        except OSError:
            self.errors["connect"] += 1
            await asyncio.sleep(0.05)
            self.reconnecting -= 1
            if not self.stopping:
                self.reconnecting += 1
                asyncio.ensure_future(self._reconnect())
            return
        self.reconnecting -= 1
        self._next(conn)

    async def drain(self, timeout: float) -> None:
        deadline = perf() + timeout
        while (self.inflight > 0 or self.backlog) and perf() < deadline:
            await asyncio.sleep(0.01)
        self.errors["unfinished"] += self.inflight + len(self.backlog)

    def close(self) -> None:
        for c in list(self.idle):
            if c.transport:
                c.transport.close()


def summary(gen: Gen, mode: str, duration: float, extra: dict) -> dict:
    lat = percentiles([x * 1000.0 for x in gen.lat])
    out = {
        "mode": mode,
        "connections": gen.nconn,
        "duration_s": duration,
        "requests": gen.completed_in_window,
        "rps": gen.completed_in_window / duration if duration else 0.0,
        "statuses": {str(k): v for k, v in sorted(gen.statuses.items())},
        "errors": dict(gen.errors),
        "latency_ms": lat,
    }
    out.update(extra)
    return out


async def run_rate(a) -> dict:
    gen = Gen(a.url, a.header, a.connections, a.method, a.body.encode())
    await gen.open()
    interval = 1.0 / a.rate
    start = perf() + 0.05
    gen.record_from = start + a.warmup
    gen.record_until = gen.record_from + a.duration
    end = gen.record_until
    k = 0
    max_backlog = 0
    while True:
        now = perf()
        if now >= end:
            break
        due = int((now - start) / interval) + 1 if now >= start else 0
        while k < due:
            # The event loop's timers tick in whole milliseconds, so requests that fall due
            # within one tick go out together at the tick; latency counts from that tick
            # (the timer quantum is not the server's fault), including any wait for a free
            # connection (that is).
            gen.dispatch(now if k * interval + start <= now else start + k * interval)
            k += 1
        if len(gen.backlog) > max_backlog:
            max_backlog = len(gen.backlog)
        # sleep to the next due request, at least one timer tick: a shorter sleep
        # busy-spins the loop (uvloop rounds it to 0) and steals the CPU from the servers
        await asyncio.sleep(max(0.001, start + k * interval - perf()))
    gen.stopping = True
    await gen.drain(a.drain)
    gen.close()
    return summary(
        gen,
        "rate",
        a.duration,
        {
            "target_rps": a.rate,
            "max_backlog": max_backlog,
            "latency_from": "timer tick at which the request fell due",
        },
    )


async def run_closed(a) -> dict:
    gen = Gen(a.url, a.header, a.connections, a.method, a.body.encode())
    gen.closed_loop = True
    await gen.open()
    start = perf()
    gen.record_from = start + a.warmup
    gen.record_until = gen.record_from + a.duration
    while gen.idle:
        gen.inflight += 1
        gen.idle.popleft().send(perf())
    await asyncio.sleep(a.warmup + a.duration)
    gen.stopping = True
    await gen.drain(a.drain)
    gen.close()
    return summary(gen, "closed", a.duration, {"latency_from": "actual send time"})


async def run_ttfb(a) -> dict:
    """Sequential requests on one keep-alive connection; time to first body byte."""
    gen = Gen(a.url, a.header, 1, a.method, a.body.encode())
    await gen.open()
    loop = asyncio.get_running_loop()
    heads: list[float] = []
    t0 = perf()
    for i in range(a.count + a.warmup_count):
        gen.record_from = float("inf") if i < a.warmup_count else 0.0
        gen.waiter = loop.create_future()
        if not gen.idle:
            gen.idle.append(await gen.connect())
        gen.inflight += 1
        conn = gen.idle.popleft()
        conn.send(perf())
        await asyncio.wait_for(gen.waiter, a.timeout)
        if i >= a.warmup_count:
            heads.append(conn.t_headers - conn.t_sent)
    gen.stopping = True
    gen.close()
    return {
        "mode": "ttfb",
        "count": a.count,
        "statuses": {str(k): v for k, v in gen.statuses.items()},
        "errors": dict(gen.errors),
        "ttfb_ms": percentiles([x * 1000 for x in gen.ttfb]),
        "headers_ms": percentiles([x * 1000 for x in heads]),
        "total_ms": percentiles([x * 1000 for x in gen.lat]),
        "elapsed_s": perf() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("mode", choices=["rate", "closed", "ttfb"])
    p.add_argument("--url", required=True)
    p.add_argument("-H", "--header", action="append", default=[])
    p.add_argument("--method", default="GET")
    p.add_argument("--body", default="")
    p.add_argument("-c", "--connections", type=int, default=64)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=5.0)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--warmup-count", type=int, default=5)
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    fn = {"rate": run_rate, "closed": run_closed, "ttfb": run_ttfb}[a.mode]
    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(fn(a))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    out["cpu_pct"] = round(100.0 * used / (time.monotonic() - t0), 1)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
