"""The capture of a streamed call: when it commits, and what a failed commit means.

A call with a hold sends its headers at once; the capture starts when the
upstream's body is complete, as a void when the upstream breaks it off, or at
a deadline before the hold would expire. The bytes that complete the answer
wait for its commit, so a complete answer always has its charge in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from billing.metering import Ticket

log = logging.getLogger("tollway.proxy")


async def captured_before_completion(
    capture: DeferredCapture, request: web.Request, ticket: Ticket
) -> bool:
    """Commit the capture before the response completes. If it cannot commit (the
    database is down), the response is cut short: a complete answer always has its
    charge in the ledger, and the hold, never captured, expires back to the buyer."""
    try:
        await capture.start()
        return True
    except Exception:
        log.warning("charge of %s not committed: the response is cut short", ticket.usage_id)
        if request.transport is not None:
            request.transport.close()
        return False


# Recorded for a response whose body the upstream broke off (short of its
# Content-Length, or a chunked stream without its end): a failed call, not charged.
UPSTREAM_BROKEN = 502


class DeferredCapture:
    """A hold's capture that starts once: when the body completes, when the upstream
    breaks it (then as a void), or at a deadline before the hold would expire."""

    __slots__ = ("_default", "_task", "_timer")

    def __init__(self, default: Callable[[], Awaitable[int]], deadline_seconds: float):
        self._default = default
        self._task: asyncio.Future[int] | None = None
        self._timer = asyncio.get_running_loop().call_later(max(0.0, deadline_seconds), self.start)

    def start(self, settle: Callable[[], Awaitable[int]] | None = None) -> asyncio.Future[int]:
        if self._task is None:
            self._timer.cancel()
            self._task = asyncio.ensure_future((settle or self._default)())
        return self._task

    def __await__(self) -> Any:
        return self.start().__await__()
