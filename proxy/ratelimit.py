"""Rate limits: GCRA per key and per client IP, in Redis or in process.

One atomic Lua script checks every limit of a request at once (all pass, or
none is charged), on Redis's own clock so all proxy instances agree. Checks
from concurrent requests are sent together in one pipeline: still one script
per request, but one round trip per batch instead of per request.

When Redis is unreachable the limiter falls back to the in-process limiter
with the same limits (policy "local", the default): each instance then limits
on its own, so traffic is at most N times the limit for N instances, never
unlimited. Policy "closed" refuses instead. Redis is tried again after a
short pause; the fallback is visible in /health ("redis": "down") and in
the tollway_ratelimit_fallback_total metric.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tollway.ratelimit")

WINDOW_MS = 60_000

# KEYS: one per limit. ARGV[1]: count of limits, then per limit: limit per minute.
# Returns {allowed (0/1), retry_after_ms, remaining, reset_ms, index of the limit that decided}.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local tats = {}
local worst_remaining, worst_reset, worst_idx = nil, 0, 1
for i = 1, n do
  local limit = tonumber(ARGV[1 + i])
  local interval = 60000 / limit
  local tol = interval * limit
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - tol
  if now < allow_at then
    return {0, math.ceil(allow_at - now), 0, math.ceil(tat - now), i}
  end
  tats[i] = new_tat
  local remaining = math.floor((now + tol - new_tat) / interval)
  if worst_remaining == nil or remaining < worst_remaining then
    worst_remaining, worst_reset, worst_idx = remaining, math.ceil(new_tat - now), i
  end
end
for i = 1, n do
  redis.call('SET', KEYS[i], tats[i], 'PX', math.ceil(tats[i] - now) + 1000)
end
return {1, 0, worst_remaining, worst_reset, worst_idx}
"""


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # "key" or "ip": the policy name in the RateLimit headers
    bucket: str  # the counter's identity, e.g. "k:acf_..." or "ip:1.2.3.4"
    per_minute: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_ms: int
    remaining: int
    reset_ms: int
    limit: Limit | None

    def headers(self) -> dict[str, str]:
        if self.limit is None:
            return {}
        reset_s = max(0, math.ceil(self.reset_ms / 1000))
        h = {
            # draft-ietf-httpapi-ratelimit-headers: structured fields, policy name as key.
            "RateLimit-Policy": f'"{self.limit.name}";q={self.limit.per_minute};w=60',
            "RateLimit": f'"{self.limit.name}";r={max(0, self.remaining)};t={reset_s}',
        }
        if not self.allowed:
            h["Retry-After"] = str(max(1, math.ceil(self.retry_after_ms / 1000)))
        return h


ALLOW = Decision(True, 0, 0, 0, None)


class LocalLimiter:
    """The same GCRA in process memory (one instance, or the Redis fallback)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = 200_000):
        self._tat: dict[str, float] = {}
        self._clock = clock
        self._max = max_buckets

    async def check(self, limits: Sequence[Limit]) -> Decision:
        return self.check_now(limits)

    def check_now(self, limits: Sequence[Limit]) -> Decision:
        if not limits:
            return ALLOW
        now = self._clock() * 1000.0
        new: list[float] = []
        best: Decision | None = None
        for lim in limits:
            interval = WINDOW_MS / lim.per_minute
            tol = interval * lim.per_minute
            tat = max(self._tat.get(lim.bucket, now), now)
            new_tat = tat + interval
            allow_at = new_tat - tol
            if now < allow_at:
                return Decision(False, math.ceil(allow_at - now), 0, math.ceil(tat - now), lim)
            new.append(new_tat)
            remaining = int((now + tol - new_tat) // interval)
            if best is None or remaining < best.remaining:
                best = Decision(True, 0, remaining, math.ceil(new_tat - now), lim)
        for lim, t in zip(limits, new, strict=True):
            self._tat[lim.bucket] = t
        if len(self._tat) > self._max:
            self._evict(now)
        return best or ALLOW

    def _evict(self, now: float) -> None:
        for k in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[k]


class RedisLimiter:
    def __init__(
        self,
        url: str,
        *,
        down_policy: str = "local",
        on_fallback: Callable[[], None] | None = None,
        key_prefix: str = "tollway:",
    ):
        import redis.asyncio as aioredis

        self.client = aioredis.from_url(
            url,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            health_check_interval=0,
            max_connections=64,
        )
        self.down_policy = down_policy
        self.key_prefix = key_prefix
        self.local = LocalLimiter()
        self.on_fallback = on_fallback
        self._sha: str | None = None
        self._down_until = 0.0
        self._pending: list[tuple[Sequence[Limit], asyncio.Future[Decision]]] = []
        self._flushing = False

    @property
    def state(self) -> str:
        return "down" if time.monotonic() < self._down_until else "ok"

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.aclose()

    async def check(self, limits: Sequence[Limit]) -> Decision:
        if not limits:
            return ALLOW
        if time.monotonic() < self._down_until:
            return self._fallback(limits)
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending.append((limits, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    def _fallback(self, limits: Sequence[Limit]) -> Decision:
        if self.on_fallback is not None:
            self.on_fallback()
        if self.down_policy == "closed":
            return Decision(False, 1000, 0, 1000, limits[0])
        return self.local.check_now(limits)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    replies = await self._send(batch)
                except Exception as exc:  # connection refused, timeout: Redis is down
                    log.warning(
                        "redis rate limiter unavailable (%s); using the %s policy",
                        exc,
                        self.down_policy,
                    )
                    self._down_until = time.monotonic() + 1.0
                    for limits, fut in batch:
                        if not fut.done():
                            fut.set_result(self._fallback(limits))
                    continue
                for (limits, fut), r in zip(batch, replies, strict=True):
                    if fut.done():
                        continue
                    if isinstance(r, Exception):
                        fut.set_result(self._fallback(limits))
                    else:
                        fut.set_result(
                            Decision(
                                bool(r[0]), int(r[1]), int(r[2]), int(r[3]), limits[int(r[4]) - 1]
                            )
                        )
        finally:
            self._flushing = False

    async def _send(self, batch: list[tuple[Sequence[Limit], Any]]) -> list[Any]:
        from redis.exceptions import NoScriptError

        if self._sha is None:
            self._sha = await self.client.script_load(GCRA_LUA)
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            for limits, _ in batch:
                keys = [f"{self.key_prefix}rl:{lim.bucket}" for lim in limits]
                pipe.evalsha(
                    self._sha, len(keys), *keys, len(limits), *(lim.per_minute for lim in limits)
                )
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                self._sha = await self.client.script_load(GCRA_LUA)  # Redis restarted and lost it
                continue
            return replies
        return replies
