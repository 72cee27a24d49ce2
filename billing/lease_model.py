"""A worker's view of one lease, and the policy that sizes leases (billing.leases)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ledger import ops

# Past this without a commit, a lease admits no more calls from memory.
STALL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    calls: int = 64  # calls' worth of money (or free calls) per lease; 0: no leases
    share: int = 4  # a lease takes at most 1/share of what is left
    min_calls: int = 8  # below this many calls' worth, exact per-call holds
    after_calls: int = 4  # calls within a second that make a buyer hot
    idle_seconds: float = 2.0
    ttl_seconds: float = 30.0
    flush_seconds: float = 0.025
    recall_check_seconds: float = 0.1  # how soon a recalled lease is noticed
    recall_backoff_seconds: float = 5.0  # no new lease for a buyer whose lease was recalled
    recall_wait_seconds: float = 2.0  # how long a call waits for recalled leases to return

    @property
    def enabled(self) -> bool:
        return self.calls > 0


@dataclass(slots=True, eq=False)
class Lease:
    """One balance lease (``slots`` is None) or free-tier lease, as this worker sees it."""

    id: str
    buyer_id: str
    key: str  # the asset of a balance lease, the service of a free-tier lease
    size: int  # money units, or free calls
    expires_at_ms: int
    unit: int  # the price that sized it (1 for free calls)
    free: bool = False
    spent: int = 0  # taken by calls in flight or finished, less what failed calls gave back
    in_flight: int = 0
    unposted: list[ops.Outcome] = field(default_factory=list)
    posting: int = 0
    posting_since: float = 0.0  # monotonic start of the posts in progress (0: none)
    last_used: float = 0.0
    closing: bool = False
    dead: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    calls: int = 0  # the calls' worth it was sized for

    def covers(self, amount: int, now: int, margin_ms: int) -> bool:
        # Not near its expiry either: a worker cut off from the database stops
        # admitting well before another worker's sweeper gives the lease back.
        return (
            not (self.closing or self.dead)
            and self.size - self.spent >= amount
            and now < self.expires_at_ms - margin_ms
            and not self.stalled()
        )

    def stalled(self) -> bool:
        """Its batches have not committed for a while: the database is away, and
        calls admitted now might never be posted. Calls take exact holds instead
        (which wait for the database, or answer 503)."""
        return bool(self.posting_since) and time.monotonic() - self.posting_since > STALL_SECONDS
