"""Decimal strings at the API edge, integers in smallest units everywhere else."""

from __future__ import annotations

import re

_DECIMAL = re.compile(r"^(0|[1-9][0-9]*)(?:\.([0-9]+))?$")


class AmountError(ValueError):
    pass


def parse_amount(value: object, decimals: int, *, allow_zero: bool = True) -> int:
    """'0.05' -> 50000 for 6 decimals. Refuses floats, signs, exponents and excess precision."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise AmountError('amount must be a decimal string such as "0.05"')
    # Bounded before any conversion: a 5,000-digit number is refused, not parsed.
    if isinstance(value, int) and not 0 <= value < 2**62:
        raise AmountError("amount is out of range")
    if isinstance(value, str) and len(value) > 64:
        raise AmountError("amount is too long")
    s = str(value).strip()
    m = _DECIMAL.match(s)
    if not m:
        raise AmountError(f"{s!r} is not a non-negative decimal amount")
    whole, frac = m.group(1), m.group(2) or ""
    if len(frac) > decimals:
        raise AmountError(f"{s!r} has more than {decimals} decimal places")
    units = int(whole) * 10**decimals + int(frac.ljust(decimals, "0") or 0)
    if units == 0 and not allow_zero:
        raise AmountError("amount must be greater than zero")
    if units >= 2**62:
        raise AmountError("amount is too large")
    return units


def format_amount(units: int, decimals: int) -> str:
    """50000 -> '0.05' (6 decimals); at least two decimals, no trailing noise beyond that."""
    sign = "-" if units < 0 else ""
    units = abs(units)
    if decimals == 0:
        return f"{sign}{units}"
    whole, frac = divmod(units, 10**decimals)
    frac_s = str(frac).rjust(decimals, "0").rstrip("0")
    if len(frac_s) < 2:
        frac_s = frac_s.ljust(min(2, decimals), "0")
    return f"{sign}{whole}.{frac_s}"


def fee_of(amount: int, bps: int) -> int:
    """The platform's share, rounded down: the provider never loses a unit to rounding."""
    return amount * bps // 10_000
