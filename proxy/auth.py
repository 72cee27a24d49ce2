"""API keys: minting, hashing, and the in-memory cache the hot path reads.

Secrets are 240-bit random strings, so a single SHA-256 is enough to store
them safely: a slow KDF protects low-entropy passwords and would only burn
CPU on every call here. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

from ledger.journal import now_ms
from ledger.registry import KeyRecord, Registry
from proxy.errors import ApiError

ROLES = ("buyer", "provider", "admin")


def hash_secret(key_id: str, secret: str) -> str:
    # The key id salts the hash so equal secrets never share a stored value.
    return "sha256$" + hashlib.sha256(f"{key_id}:{secret}".encode()).hexdigest()


def mint_key(
    owner_id: str, role: str, rate_limit: int, wallet_address: str | None
) -> tuple[KeyRecord, str]:
    key_id = "acf_" + secrets.token_hex(8)
    secret = "sec_" + secrets.token_urlsafe(30)
    rec = KeyRecord(
        key_id,
        owner_id,
        role,
        rate_limit,
        wallet_address,
        hash_secret(key_id, secret),
        "active",
        now_ms(),
    )
    return rec, secret


def parse_credentials(request: web.Request) -> tuple[str, str] | None:
    raw = request.headers.get("Authorization")
    if raw is not None:
        scheme, _, value = raw.partition(" ")
        if scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "use Authorization: Bearer key_id:secret")
    else:
        value = request.headers.get("api-key")
        if value is None:
            return None
    if len(value) > 512 or not value.isascii() or not value.isprintable():
        raise ApiError(401, "unauthorized", "credentials must be printable ASCII key_id:secret")
    key_id, sep, secret = value.strip().partition(":")
    if not sep or not key_id or not secret:
        raise ApiError(401, "unauthorized", "credentials must be key_id:secret")
    return key_id, secret


class KeyCache:
    """key_id -> record, refreshed after ``ttl`` seconds so revocations on other
    instances take effect within that time (the same instance drops at once)."""

    def __init__(
        self, registry: Registry, ttl: float, admin_key: str | None, max_negative: int = 10000
    ):
        self.registry = registry
        self.ttl = ttl
        self._entries: dict[str, tuple[KeyRecord, float]] = {}
        # key id -> (the record's hash, the secret that matched it): a repeat call
        # skips the hash. Tied to the record's hash, so a rotated key checks again;
        # the record itself still expires from the cache after ``ttl``.
        self._verified: dict[str, tuple[str, str]] = {}
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._max_negative = max_negative
        self._bootstrap: KeyRecord | None = None
        if admin_key:
            kid, secret = admin_key.split(":", 1)
            self._bootstrap = KeyRecord(
                kid, "admin", "admin", 1_000_000, None, hash_secret(kid, secret), "active", 0
            )

    def forget(self, key_id: str) -> None:
        self._entries.pop(key_id, None)
        self._verified.pop(key_id, None)

    def cached(self, headers: Any) -> bool:
        """Whether the request's key (if any) would be found without a database read."""
        raw = headers.get("Authorization") or headers.get("api-key")
        if raw is None:
            return True
        key_id = raw.partition(" ")[2] if raw[:7].lower() == "bearer " else raw
        key_id = key_id.strip().partition(":")[0]
        if self._bootstrap is not None and key_id == self._bootstrap.key_id:
            return True
        now = time.monotonic()
        hit = self._entries.get(key_id)
        if hit is not None and now - hit[1] < self.ttl:
            return True
        neg = self._negative.get(key_id)
        return neg is not None and now - neg < min(self.ttl, 5.0)

    async def lookup(self, key_id: str) -> KeyRecord | None:
        if self._bootstrap is not None and key_id == self._bootstrap.key_id:
            return self._bootstrap
        now = time.monotonic()
        hit = self._entries.get(key_id)
        if hit is not None and now - hit[1] < self.ttl:
            return hit[0]
        neg = self._negative.get(key_id)
        if neg is not None and now - neg < min(self.ttl, 5.0):
            return None
        rec = await self.registry.get_key(key_id)
        if rec is None:
            # Unknown ids are remembered briefly, so a flood of made-up keys
            # cannot turn into one database read per request.
            self._negative[key_id] = now
            if len(self._negative) > self._max_negative:
                self._negative.popitem(last=False)
            return None
        self._entries[key_id] = (rec, now)
        return rec

    async def authenticate(
        self, request: web.Request, *, required: bool = True
    ) -> KeyRecord | None:
        creds = parse_credentials(request)
        if creds is None:
            if required:
                raise ApiError(401, "unauthorized", "missing API key")
            return None
        key_id, secret = creds
        rec = await self.lookup(key_id)
        seen = self._verified.get(key_id)
        if (
            rec is not None
            and seen is not None
            and seen[0] == rec.secret_hash
            and hmac.compare_digest(seen[1], secret)  # constant time, as the hash check
        ):
            # The same secret, already checked against this very record: no hash.
            if rec.status != "active":
                raise ApiError(401, "unauthorized", "invalid API key")
            return rec
        expected = rec.secret_hash if rec is not None else "sha256$" + "0" * 64
        ok = hmac.compare_digest(expected, hash_secret(key_id, secret))
        if rec is None or not ok or rec.status != "active":
            raise ApiError(401, "unauthorized", "invalid API key")
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified[key_id] = (rec.secret_hash, secret)
        return rec


def require_role(rec: KeyRecord, *roles: str) -> None:
    if rec.role not in roles:
        raise ApiError(403, "forbidden", f"this action needs a {' or '.join(roles)} key")
