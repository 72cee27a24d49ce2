"""Stored API keys and services (the registry), and their row shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ledger.db import Row, Store
from ledger.journal import now_ms


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    owner_id: str
    role: str
    rate_limit: int
    wallet_address: str | None
    secret_hash: str
    status: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    provider_id: str
    name: str
    description: str
    endpoint: str
    price_units: int
    asset: str
    payment_method: str
    free_tier_calls: int
    allow_anonymous: bool
    category: str
    tags: list[str] = field(default_factory=list)
    status: str = "active"
    created_at: int = 0
    updated_at: int = 0
    rate_limit: int | None = None  # calls per minute from one caller; None: no own limit


def _key(r: Row) -> KeyRecord:
    return KeyRecord(
        r["key_id"],
        r["owner_id"],
        r["role"],
        int(r["rate_limit"]),
        r["wallet_address"],
        r["secret_hash"],
        r["status"],
        int(r["created_at"]),
    )


def _service(r: Row) -> Service:
    return Service(
        id=r["id"],
        provider_id=r["provider_id"],
        name=r["name"],
        description=r["description"],
        endpoint=r["endpoint"],
        price_units=int(r["price_units"]),
        asset=r["asset"],
        payment_method=r["payment_method"],
        free_tier_calls=int(r["free_tier_calls"]),
        allow_anonymous=bool(r["allow_anonymous"]),
        category=r["category"],
        tags=json.loads(r["tags"]),
        status=r["status"],
        created_at=int(r["created_at"]),
        updated_at=int(r["updated_at"]),
        rate_limit=None if r["rate_limit"] is None else int(r["rate_limit"]),
    )


class Registry:
    def __init__(self, store: Store):
        self.store = store

    # ------------------------------------------------------------------ keys
    async def create_key(self, rec: KeyRecord, *, new_owner: bool = False) -> bool:
        """Store a key. With ``new_owner``, the key's owner id must not exist
        yet; returns False (storing nothing) when another mint claimed it first."""
        async with self.store.transaction() as tx:
            claimed = await tx.execute(
                "INSERT INTO owners (owner_id, created_at) VALUES ($1, $2)"
                " ON CONFLICT (owner_id) DO NOTHING",
                rec.owner_id,
                rec.created_at,
            )
            if new_owner and not claimed:
                return False
            await tx.execute(
                "INSERT INTO api_keys (key_id, owner_id, role, rate_limit, wallet_address, secret_hash,"
                " status, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
                rec.key_id,
                rec.owner_id,
                rec.role,
                rec.rate_limit,
                rec.wallet_address,
                rec.secret_hash,
                rec.status,
                rec.created_at,
            )
            if rec.role == "provider":
                await tx.execute(
                    "INSERT INTO providers (provider_id, registered_at) VALUES ($1, $2)"
                    " ON CONFLICT (provider_id) DO NOTHING",
                    rec.owner_id,
                    rec.created_at,
                )
        return True

    async def get_key(self, key_id: str) -> KeyRecord | None:
        r = await self.store.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
        return None if r is None else _key(r)

    async def keys_of(self, owner_id: str) -> list[KeyRecord]:
        rows = await self.store.fetch(
            "SELECT * FROM api_keys WHERE owner_id = $1 ORDER BY created_at", owner_id
        )
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str, owner_id: str) -> bool:
        n = await self.store.execute(
            "UPDATE api_keys SET status = 'revoked' WHERE key_id = $1 AND owner_id = $2 AND status = 'active'",
            key_id,
            owner_id,
        )
        return n == 1

    # ------------------------------------------------------------------ services
    async def create_service(self, s: Service) -> None:
        await self.store.execute(
            "INSERT INTO services (id, provider_id, name, description, endpoint, price_units, asset,"
            " payment_method, free_tier_calls, allow_anonymous, category, tags, status, created_at,"
            " updated_at, rate_limit) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
            s.id,
            s.provider_id,
            s.name,
            s.description,
            s.endpoint,
            s.price_units,
            s.asset,
            s.payment_method,
            s.free_tier_calls,
            1 if s.allow_anonymous else 0,
            s.category,
            json.dumps(s.tags),
            s.status,
            s.created_at,
            s.updated_at,
            s.rate_limit,
        )

    async def get_service(self, service_id: str) -> Service | None:
        r = await self.store.fetchrow("SELECT * FROM services WHERE id = $1", service_id)
        return None if r is None else _service(r)

    async def update_service(self, service_id: str, changes: dict[str, Any]) -> Service | None:
        cols = {
            "name",
            "description",
            "endpoint",
            "price_units",
            "payment_method",
            "free_tier_calls",
            "allow_anonymous",
            "category",
            "tags",
            "status",
            "rate_limit",
        }
        sets, args = [], []
        for k, v in changes.items():
            if k not in cols:
                raise ValueError(f"cannot change {k}")
            if k == "tags":
                v = json.dumps(v)
            if k == "allow_anonymous":
                v = 1 if v else 0
            args.append(v)
            sets.append(f"{k} = ${len(args)}")
        args.append(now_ms())
        sets.append(f"updated_at = ${len(args)}")
        args.append(service_id)
        await self.store.execute(
            f"UPDATE services SET {', '.join(sets)} WHERE id = ${len(args)}", *args
        )
        return await self.get_service(service_id)

    async def list_services(
        self,
        *,
        query: str | None = None,
        category: str | None = None,
        status: str | None = "active",
        provider_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Service], int]:
        where, args = [], []
        if status:
            args.append(status)
            where.append(f"status = ${len(args)}")
        if category:
            args.append(category)
            where.append(f"category = ${len(args)}")
        if provider_id:
            args.append(provider_id)
            where.append(f"provider_id = ${len(args)}")
        if query:
            args.append(f"%{query.lower()}%")
            where.append(f"(LOWER(name) LIKE ${len(args)} OR LOWER(description) LIKE ${len(args)})")
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        total = await self.store.fetchval(f"SELECT COUNT(*) FROM services{cond}", *args)
        args += [limit, offset]
        rows = await self.store.fetch(
            f"SELECT * FROM services{cond} ORDER BY created_at, id LIMIT ${len(args) - 1} OFFSET ${len(args)}",
            *args,
        )
        return [_service(r) for r in rows], int(total)
