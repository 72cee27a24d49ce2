"""Owner ids: which a caller may choose, and which only proof can claim.

An owner id holds money, so naming one must be as hard as taking that money.
Ids that Tollway derives carry a colon: ``{partner}:{wallet}`` (a wallet's
own balance, from invoices and x402 payments), and the older ``invoice:<id>``
and ``x402:<payer>``. Those, and the reserved names (the bootstrap admin's
``admin`` among them), are never claimed by a plain key mint: a wallet's
owner is claimed with that wallet's signature over a fresh challenge
(``proxy.routes.identity``), and an admin may grant any id.
"""

from __future__ import annotations

import re

# What a buyer may pick for itself: no colon, so never a derived id.
SELF_CHOSEN_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")

RESERVED_OWNER_IDS = frozenset(
    {"admin", "administrator", "root", "system", "platform", "operator", "tollway", "world"}
)


def self_chosen_refusal(owner_id: str) -> str | None:
    """Why ``owner_id`` cannot be claimed without proof, or None if it can."""
    if not SELF_CHOSEN_OWNER_RE.match(owner_id):
        if ":" in owner_id:
            return (
                "owner ids with ':' belong to wallets, invoices or payments;"
                " claim a wallet's with its signature (POST /auth/challenge)"
            )
        return (
            "owner_id may hold letters, digits and . _ @ + - (at most 128), starting alphanumeric"
        )
    if owner_id.lower() in RESERVED_OWNER_IDS:
        return f"owner id {owner_id!r} is reserved"
    return None


_WALLET_OWNER_RE = re.compile(r"^([^:]+):(0x[0-9a-fA-F]{40})$")


def canonical_owner_id(owner_id: str) -> str:
    """A wallet owner id as sign-in derives it (EVM addresses in lower case), so money
    granted to ``tollway:0xAbC…`` is the wallet's, not an id nobody can claim."""
    m = _WALLET_OWNER_RE.match(owner_id)
    return f"{m.group(1)}:{m.group(2).lower()}" if m else owner_id
