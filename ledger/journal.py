"""Accounts and transfers: the vocabulary of the double-entry journal.

A transfer moves ``amount`` out of its debit account into its credit account,
so an account's balance is what was credited to it minus what was debited
from it, and the balances of one asset always add up to zero. Money entering
the system comes out of ``world`` (which therefore goes negative).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import NamedTuple


class Account(NamedTuple):
    id: str
    kind: str
    owner: str | None
    asset: str


def wallet(owner: str, asset: str) -> Account:
    return Account(f"wallet:{owner}:{asset}", "wallet", owner, asset)


def earnings(provider: str, asset: str) -> Account:
    return Account(f"earnings:{provider}:{asset}", "earnings", provider, asset)


def debt(owner: str, asset: str) -> Account:
    """What an owner owes: card money taken back (refund, chargeback) after it was
    spent. Negative while owed; it goes back to zero as later credits pay it."""
    return Account(f"debt:{owner}:{asset}", "debt", owner, asset)


def fees(asset: str) -> Account:
    return Account(f"fees:{asset}", "fees", None, asset)


def world(asset: str) -> Account:
    return Account(f"world:{asset}", "world", None, asset)


def holding(asset: str) -> Account:
    """Where held (authorized, not yet captured) money waits."""
    return Account(f"holding:{asset}", "holding", None, asset)


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    debit: Account
    credit: Account
    amount: int
    kind: str
    idempotency_key: str
    usage_id: str | None = None
    payment_id: str | None = None
    hold_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.amount, int) or self.amount <= 0:
            raise ValueError(f"transfer amount must be a positive integer, got {self.amount!r}")
        if self.debit.asset != self.credit.asset:
            raise ValueError("a transfer cannot cross assets")

    @property
    def asset(self) -> str:
        return self.debit.asset


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_PROCESS = os.urandom(6).hex()
_SEQ = itertools.count()


def _new_process() -> None:
    global _PROCESS, _SEQ
    _PROCESS, _SEQ = os.urandom(6).hex(), itertools.count()


os.register_at_fork(after_in_child=_new_process)


def new_id(prefix: str) -> str:
    """Time-ordered ids: index-friendly on inserts, unique without coordination
    (a random per-process part and a counter: no system call per id)."""
    return f"{prefix}_{time.time_ns() // 1_000_000:011x}{_PROCESS}{next(_SEQ) & 0xFFFFFFFF:08x}"
