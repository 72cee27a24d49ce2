"""What a Cardano invoice asks for and what a transaction paid: assets, outputs, the rule.

The output rule (:func:`check_outputs`), shared by the signed-CBOR and the
transaction-hash paths: the ``pay_to`` address must receive at least the amount
in exactly the invoiced asset (lovelace, or one policy id + asset name; any
other asset does not count), and every split output of the invoice
(``extra.outputs``) must be present with at least its amount. Requirements that
name the same address and asset add up, so one output cannot be counted twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from billing.errors import PaymentRejected
from billing.rails.cardano_identity import address_key, parse_address

__all__ = [
    "LOVELACE",
    "CardanoAsset",
    "ConfirmedPayment",
    "ExpectedPayment",
    "PaidOutput",
    "RequiredOutput",
    "amount_list",
    "check_outputs",
]

LOVELACE = "lovelace"

# Rejection codes (PaymentRejected.code). Stable strings: clients and tests match on them.
WRONG_AMOUNT = "wrong_amount"
MISSING_SPLIT_OUTPUT = "missing_split_output"
WRONG_ASSET = "wrong_asset"
WRONG_RECIPIENT = "wrong_recipient"

_HEX = re.compile(r"^[0-9a-f]*$")


# --------------------------------------------------------------------------- assets, expectations


@dataclass(frozen=True, slots=True)
class CardanoAsset:
    """Lovelace (both fields empty) or a native asset: policy id (56 hex) + asset name (hex).

    The Blockfrost "unit" string is ``"lovelace"`` or ``policy_id + asset_name_hex``;
    :attr:`unit` and :meth:`from_unit` convert. Policy and name are kept apart because
    the invoice pins both: a token with the right name under another policy is a
    different (worthless) asset.
    """

    policy_id: str = ""
    asset_name: str = ""

    def __post_init__(self) -> None:
        policy = self.policy_id.lower()
        name = self.asset_name.lower()
        if not policy:
            if name:
                raise ValueError("an asset name needs a policy id")
        elif len(policy) != 56 or not _HEX.match(policy):
            raise ValueError(f"policy id must be 56 hex characters: {self.policy_id!r}")
        if len(name) > 64 or len(name) % 2 or not _HEX.match(name):
            raise ValueError(f"asset name must be at most 32 bytes of hex: {self.asset_name!r}")
        object.__setattr__(self, "policy_id", policy)
        object.__setattr__(self, "asset_name", name)

    @classmethod
    def lovelace(cls) -> CardanoAsset:
        return cls()

    @classmethod
    def from_unit(cls, unit: str) -> CardanoAsset:
        """Parse a Blockfrost unit (``lovelace`` or policy id hex followed by asset name hex)."""
        unit = unit.strip().lower()
        if unit == LOVELACE:
            return cls()
        if len(unit) < 56:
            raise ValueError(f"not a Cardano asset unit: {unit!r}")
        return cls(unit[:56], unit[56:])

    @property
    def is_lovelace(self) -> bool:
        return not self.policy_id

    @property
    def unit(self) -> str:
        return LOVELACE if self.is_lovelace else self.policy_id + self.asset_name

    def __str__(self) -> str:
        return self.unit


@dataclass(frozen=True, slots=True)
class RequiredOutput:
    """One split output an invoice demands (an entry of ``extra.outputs``)."""

    address: str
    asset: CardanoAsset
    amount: int

    def __post_init__(self) -> None:
        _check_amount(self.amount)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> RequiredOutput:
        """Build from ``{"address", "amount", "unit"?}`` (unit defaults to lovelace).

        Also accepts ``policyId`` + ``assetName`` instead of ``unit``. The amount may be
        an int or a string of digits, never a float (money rules).
        """
        if "policyId" in entry:
            asset = CardanoAsset(str(entry["policyId"]), str(entry.get("assetName", "")))
        else:
            asset = CardanoAsset.from_unit(str(entry.get("unit", LOVELACE)))
        return cls(str(entry["address"]), asset, _int_amount(entry["amount"]))


@dataclass(frozen=True, slots=True)
class ExpectedPayment:
    """What an invoice asks for: ``amount`` of ``asset`` to ``pay_to``, plus split outputs."""

    pay_to: str
    asset: CardanoAsset
    amount: int
    split_outputs: tuple[RequiredOutput, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_amount(self.amount)
        # Accept any sequence from callers but keep the frozen object hashable.
        object.__setattr__(self, "split_outputs", tuple(self.split_outputs))
        # Fail at invoice time, not at payment time, on an unparseable address.
        for addr in (self.pay_to, *(o.address for o in self.split_outputs)):
            parse_address(addr)

    @classmethod
    def from_invoice_detail(cls, detail: Mapping[str, Any]) -> ExpectedPayment:
        """Build from the 402 invoice's ``detail`` object (t-backend guide shape).

        ``asset`` is ``"ADA"``/``"lovelace"`` or a Blockfrost unit (policy id + asset
        name hex); ``amountUnits`` is a digit string in the asset's smallest unit;
        ``extra.outputs`` entries go through :meth:`RequiredOutput.from_dict`.
        """
        asset_label = str(detail["asset"])
        asset = (
            CardanoAsset.lovelace()
            if asset_label.lower() in {"ada", LOVELACE}
            else CardanoAsset.from_unit(asset_label)
        )
        extra = detail.get("extra") or {}
        return cls(
            pay_to=str(detail["payTo"]),
            asset=asset,
            amount=_int_amount(detail["amountUnits"]),
            split_outputs=tuple(RequiredOutput.from_dict(o) for o in extra.get("outputs") or ()),
        )


@dataclass(frozen=True, slots=True)
class PaidOutput:
    """One output of a payment transaction: address (bech32) and amounts per unit."""

    index: int
    address: str
    amounts: Mapping[str, int]

    def amount_of(self, asset: CardanoAsset) -> int:
        return self.amounts.get(asset.unit, 0)


@dataclass(frozen=True, slots=True)
class ConfirmedPayment:
    """Result of :meth:`CardanoRail.verify_tx_hash`."""

    tx_id: str
    outputs: tuple[PaidOutput, ...]
    block_height: int
    block_time: int  # unix seconds; lets the caller require "after the invoice was minted"
    confirmations: int


# --------------------------------------------------------------------------- amounts


def _check_amount(amount: int) -> None:
    # bool is an int subclass; True lovelace is a bug, not a price.
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError(f"amount must be a positive integer, got {amount!r}")


def _int_amount(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"amount must be an integer or a digit string, got {value!r}")
    if isinstance(value, str):
        if not value.isdigit():
            raise ValueError(f"amount must be a digit string, got {value!r}")
        value = int(value)
    return value


def amount_list(amounts: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Blockfrost ``[{unit, quantity}]`` (quantities as digit strings) -> ``{unit: int}``."""
    result: dict[str, int] = {}
    for entry in amounts:
        unit = str(entry["unit"]).lower()
        qty = _int_amount(entry["quantity"])
        result[unit] = result.get(unit, 0) + qty
    return result


# --------------------------------------------------------------------------- the output rule


def check_outputs(outputs: Sequence[PaidOutput], expected: ExpectedPayment) -> None:
    """Raise :class:`PaymentRejected` unless ``outputs`` pay everything ``expected`` asks.

    Order of checks gives the most useful code: the main payment first (recipient,
    then asset, then amount), then each split output, then the combined totals
    (when a split output shares address and asset with ``pay_to`` or with another
    split, one output must not satisfy both).
    """
    paid: dict[tuple[bytes | str, str], int] = {}
    paid_addresses: dict[bytes | str, set[str]] = {}
    for out in outputs:
        key = address_key(out.address)
        units = paid_addresses.setdefault(key, set())
        for unit, qty in out.amounts.items():
            if qty > 0:
                paid[(key, unit)] = paid.get((key, unit), 0) + qty
                units.add(unit)

    pay_to = address_key(expected.pay_to)
    unit = expected.asset.unit
    got = paid.get((pay_to, unit), 0)
    if got < expected.amount:
        if pay_to not in paid_addresses:
            raise PaymentRejected(
                f"no output pays the invoice address {expected.pay_to}", code=WRONG_RECIPIENT
            )
        if got == 0:
            found = ", ".join(sorted(paid_addresses[pay_to])) or "nothing"
            raise PaymentRejected(
                f"the invoice address receives {found}, not {unit}", code=WRONG_ASSET
            )
        raise PaymentRejected(
            f"the invoice address receives {got} of {unit}, the invoice asks {expected.amount}",
            code=WRONG_AMOUNT,
        )

    needed: dict[tuple[bytes | str, str], int] = {(pay_to, unit): expected.amount}
    for split in expected.split_outputs:
        key = (address_key(split.address), split.asset.unit)
        have = paid.get(key, 0)
        if have < split.amount:
            raise PaymentRejected(
                f"split output to {split.address} needs {split.amount} of {split.asset.unit},"
                f" the transaction pays {have}",
                code=MISSING_SPLIT_OUTPUT,
            )
        needed[key] = needed.get(key, 0) + split.amount
    for key, total in needed.items():
        if paid.get(key, 0) < total:
            raise PaymentRejected(
                f"outputs to one address in {key[1]} pay {paid.get(key, 0)}, the invoice's"
                f" payment and split outputs there add up to {total}",
                code=MISSING_SPLIT_OUTPUT,
            )
