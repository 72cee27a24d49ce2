"""Nonces of the addresses Tollway sends from (hot wallet, gas key), safe across processes.

Two workers sending from one address must never sign the same nonce: one of the
transactions would be refused and its payout end ``unknown``. On one host a file
lock per address serializes lookup and broadcast; across hosts, a nonce the node
says is taken is looked up and signed again (nothing of the refused one was sent).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile

NONCE_ATTEMPTS = 4
NONCE_TAKEN = (
    "nonce too low",
    "already known",
    "replacement transaction underpriced",
    "invalid transaction nonce",
)


def nonce_taken(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(m in text for m in NONCE_TAKEN)


class HostNonceLock:
    """Serializes nonce lookup and broadcast for one address across the processes of
    one host (``--workers N``) with an advisory file lock; across hosts the node's
    refusal of a taken nonce is retried above."""

    def __init__(self, address: str):
        folder = os.path.join(tempfile.gettempdir(), "tollway-nonces")
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, address.lower())
        self.fd = -1

    async def __aenter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                await asyncio.sleep(0.01)  # another worker is sending from this address

    async def __aexit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
