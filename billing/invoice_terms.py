"""What an invoice asks for: the request it is bound to and each chain's payment terms."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Binding:
    method: str
    path: str
    body_hash: str


@dataclass(frozen=True)
class EvmTerms:
    chain_id: int
    token: str
    pay_to: str
    confirmations: int
    decimals: int = 6
    asset: str = "USDC"

    @property
    def chain(self) -> str:
        return f"eip155:{self.chain_id}"


@dataclass(frozen=True)
class CardanoTerms:
    network: str
    pay_to: str
    unit: str  # "lovelace" or policy id + asset name hex
    rate: Fraction  # Cardano units per ledger unit of the service price
    splits: tuple[tuple[str, int], ...]  # (address, basis points of the invoice amount)
    confirmations: int
    decimals: int = 6

    @property
    def chain(self) -> str:
        return f"cardano-{self.network}"

    @property
    def asset(self) -> str:
        return "ADA" if self.unit == "lovelace" else self.unit
