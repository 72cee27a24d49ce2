"""Rate limits: a sliding window per key, per client IP and per service, in Redis or in process.

The policy a client is told (``RateLimit-Policy: "key";q=60;w=60``) is a
promise: in no 60-second window, wherever it starts, are more than ``q``
calls admitted. The window is kept as counts in 5-second slots; a call is
admitted while the slots of the last 65 seconds (the current slot and the 12
before it) hold fewer than ``q``. Any 60-second window lies within 13
consecutive slots, all of which the last call admitted in it counted, so the
promise holds exactly, at a cost of 13 small counters per limit. (GCRA, used
before, let a burst of ``q`` through and then refilled at once, up to about
twice ``q`` in a rolling minute.)

One atomic Lua script checks every limit of a request at once (all pass, or
none is counted), on Redis's own clock so all proxy instances agree. Checks
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
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tollway.ratelimit")

WINDOW_MS = 60_000
SLOT_MS = 5_000
# The current slot and the 12 before it: every 60 s window fits inside them.
SLOTS = WINDOW_MS // SLOT_MS + 1

# KEYS: one hash per limit (slot index -> count). ARGV[1]: count of limits, then
# per limit: the quota, then how many admissions the caller would take at once.
# Returns {allowed (0/1), retry_after_ms, remaining, reset_ms, index of the limit
# that decided} and, when allowed, {admissions granted, ms until the slot ends}.
WINDOW_LUA = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = math.floor(now / %(slot)d)
local first = slot - %(slots)d + 1
local n = tonumber(ARGV[1])
local want = tonumber(ARGV[n + 2] or '1')
-- Near the slot's end a block would expire before it is spent: one at a time.
if (slot + 1) * %(slot)d - now < tonumber(ARGV[n + 3] or '0') then want = 1 end
local worst_remaining, worst_reset, worst_idx = nil, 0, 1
for i = 1, n do
  local quota = tonumber(ARGV[1 + i])
  local h = redis.call('HGETALL', KEYS[i])
  local total, slots = 0, {}
  for j = 1, #h, 2 do
    local idx, c = tonumber(h[j]), tonumber(h[j + 1])
    if idx < first then
      redis.call('HDEL', KEYS[i], h[j])
    else
      total = total + c
      slots[#slots + 1] = {idx, c}
    end
  end
  table.sort(slots, function(a, b) return a[1] < b[1] end)
  if total >= quota then
    -- the call fits once enough of the oldest slots have left the window
    local left, wait = total, %(window)d
    for _, s in ipairs(slots) do
      left = left - s[2]
      if left < quota then
        wait = (s[1] + %(slots)d) * %(slot)d - now
        break
      end
    end
    return {0, math.max(1, wait), 0, math.max(1, wait), i}
  end
  local remaining = quota - total - 1
  local reset = %(window)d
  if #slots > 0 then reset = (slots[1][1] + %(slots)d) * %(slot)d - now end
  if worst_remaining == nil or remaining < worst_remaining then
    worst_remaining, worst_reset, worst_idx = remaining, reset, i
  end
end
-- Up to ``want`` admissions at once, all counted in this slot: the caller spends
-- them before the slot ends, so each is where it would have been counted alone.
local grant = math.max(1, math.min(want, worst_remaining + 1))
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], slot, grant)
  redis.call('PEXPIRE', KEYS[i], %(window)d + 2 * %(slot)d)
end
return {1, 0, worst_remaining - grant + 1, worst_reset, worst_idx, grant, (slot + 1) * %(slot)d - now}
""".replace("%(slot)d", str(SLOT_MS))
    .replace("%(slots)d", str(SLOTS))
    .replace("%(window)d", str(WINDOW_MS))
)


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

# Limits this high (calls per minute, every limit of the request) are checked a
# block of admissions at a time: one script run admits up to
# quota // TOKEN_SHARE of them (at most TOKEN_BLOCK), spent in memory until the
# 5-second slot they were counted in ends. Unused ones are lost with their slot,
# so the limit only gets stricter. Lower limits are counted call by call.
TOKEN_MIN_QUOTA = 600
TOKEN_SHARE = 100
TOKEN_BLOCK = 256
# Admissions are spent this long before their slot ends on Redis's clock, counted
# from when the request was sent (clock rate differences over five seconds).
TOKEN_MARGIN_SECONDS = 0.1
# Within this much of a slot's end no block is granted (it would die unspent).
_BLOCK_CUTOFF_MS = 500


@dataclass(slots=True)
class _Tokens:
    left: int
    until: float  # monotonic
    remaining: int
    reset_ms: int
    limit: Limit


class LocalLimiter:
    """The same sliding window in process memory (one instance, or the Redis fallback)."""

    def __init__(self, clock: Callable[[], float] = time.time, max_buckets: int = 200_000):
        self._slots: dict[str, dict[int, int]] = {}
        self._clock = clock
        self._max = max_buckets

    async def check(self, limits: Sequence[Limit]) -> Decision:
        return self.check_now(limits)

    def check_now(self, limits: Sequence[Limit]) -> Decision:
        if not limits:
            return ALLOW
        now = int(self._clock() * 1000)
        slot = now // SLOT_MS
        first = slot - SLOTS + 1
        best: Decision | None = None
        for lim in limits:
            counts = self._slots.get(lim.bucket)
            if counts:
                for idx in [k for k in counts if k < first]:
                    del counts[idx]
            live = sorted((counts or {}).items())
            total = sum(c for _, c in live)
            if total >= lim.per_minute:
                left, wait = total, WINDOW_MS
                for idx, c in live:
                    left -= c
                    if left < lim.per_minute:
                        wait = (idx + SLOTS) * SLOT_MS - now
                        break
                return Decision(False, max(1, wait), 0, max(1, wait), lim)
            remaining = lim.per_minute - total - 1
            reset = (live[0][0] + SLOTS) * SLOT_MS - now if live else WINDOW_MS
            if best is None or remaining < best.remaining:
                best = Decision(True, 0, remaining, reset, lim)
        for lim in limits:
            counts = self._slots.setdefault(lim.bucket, {})
            counts[slot] = counts.get(slot, 0) + 1
        if len(self._slots) > self._max:
            self._evict(first)
        return best or ALLOW

    def _evict(self, first: int) -> None:
        for k in [k for k, c in self._slots.items() if max(c, default=first - 1) < first]:
            del self._slots[k]


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
        self._pending: list[tuple[Sequence[Limit], int, asyncio.Future[Decision]]] = []
        self._flushing = False
        self._tokens: dict[tuple[str, ...], _Tokens] = {}
        self._refills: dict[tuple[str, ...], asyncio.Future[Decision]] = {}
        self.scripts_sent = 0  # script runs (the capacity model's Redis commands per call)

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
        now = time.monotonic()
        if now < self._down_until:
            return self._fallback(limits)
        want = 1
        if all(lim.per_minute >= TOKEN_MIN_QUOTA for lim in limits):
            key = tuple(lim.bucket for lim in limits)
            while True:
                tokens = self._tokens.get(key)
                if tokens is not None and tokens.left > 0 and now < tokens.until:
                    tokens.left -= 1
                    return Decision(
                        True, 0, tokens.remaining + tokens.left, tokens.reset_ms, tokens.limit
                    )
                refill = self._refills.get(key)
                if refill is None or refill.done():
                    break
                # One block at a time per set of limits; its answer is the waiters'
                # answer too when it is a refusal, or when Redis went away meanwhile.
                answer = await asyncio.shield(refill)
                if not answer.allowed:
                    return answer
                now = time.monotonic()
                if now < self._down_until:
                    return self._fallback(limits)
            want = min(TOKEN_BLOCK, max(1, min(lim.per_minute for lim in limits) // TOKEN_SHARE))
            fut = self._ask(limits, want)
            self._refills[key] = fut
            fut.add_done_callback(functools.partial(self._refilled, key))
            return await asyncio.shield(fut)
        return await self._ask(limits, 1)

    def _refilled(self, key: tuple[str, ...], fut: asyncio.Future[Decision]) -> None:
        if self._refills.get(key) is fut:
            del self._refills[key]

    def _ask(self, limits: Sequence[Limit], want: int) -> asyncio.Future[Decision]:
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending.append((limits, want, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return fut

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
                # Admission blocks expire by the send time: the script ran after it,
                # so a reply that comes back late cannot stretch a block past its slot.
                sent = time.monotonic()
                try:
                    replies = await self._send(batch)
                except Exception as exc:  # connection refused, timeout: Redis is down
                    log.warning(
                        "redis rate limiter unavailable (%s); using the %s policy",
                        exc,
                        self.down_policy,
                    )
                    self._down_until = time.monotonic() + 1.0
                    for limits, _, fut in batch:
                        if not fut.done():
                            fut.set_result(self._fallback(limits))
                    continue
                for (limits, want, fut), r in zip(batch, replies, strict=True):
                    if fut.done():
                        continue
                    if isinstance(r, Exception):
                        fut.set_result(self._fallback(limits))
                        continue
                    limit = limits[int(r[4]) - 1]
                    d = Decision(bool(r[0]), int(r[1]), int(r[2]), int(r[3]), limit)
                    if d.allowed and want > 1 and len(r) > 6 and int(r[5]) > 1:
                        if len(self._tokens) > 100_000:
                            self._tokens.clear()
                        self._tokens[tuple(lim.bucket for lim in limits)] = _Tokens(
                            int(r[5]) - 1,  # this call takes the first
                            sent + int(r[6]) / 1000 - TOKEN_MARGIN_SECONDS,
                            d.remaining,
                            d.reset_ms,
                            limit,
                        )
                    fut.set_result(d)
        finally:
            self._flushing = False

    async def _send(self, batch: list[tuple[Sequence[Limit], int, Any]]) -> list[Any]:
        from redis.exceptions import NoScriptError

        self.scripts_sent += len(batch)  # attempted: a Redis that never answers counts too
        if self._sha is None:
            self._sha = await self.client.script_load(WINDOW_LUA)
        for attempt in (0, 1):
            pipe = self.client.pipeline(transaction=False)
            for limits, want, _ in batch:
                # "rw:" (sliding window hashes), never the GCRA strings under "rl:".
                keys = [f"{self.key_prefix}rw:{lim.bucket}" for lim in limits]
                pipe.evalsha(
                    self._sha,
                    len(keys),
                    *keys,
                    len(limits),
                    *(lim.per_minute for lim in limits),
                    want,
                    _BLOCK_CUTOFF_MS,
                )
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                self._sha = await self.client.script_load(WINDOW_LUA)  # Redis restarted and lost it
                continue
            return replies
        return replies
