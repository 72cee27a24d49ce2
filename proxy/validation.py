"""Field checks for JSON bodies; every failure is a 422 naming the field."""

from __future__ import annotations

from typing import Any

from proxy.errors import ApiError


def fail(field: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", message, field=field)


def req_str(data: dict[str, Any], name: str, *, max_len: int = 1000) -> str:
    v = data.get(name)
    if not isinstance(v, str) or not v.strip():
        raise fail(name, f"{name} is required and must be a non-empty string")
    if len(v) > max_len:
        raise fail(name, f"{name} is longer than {max_len} characters")
    return v.strip()


def opt_str(
    data: dict[str, Any], name: str, *, max_len: int = 1000, default: str | None = None
) -> str | None:
    v = data.get(name, default)
    if v is None:
        return None
    if not isinstance(v, str):
        raise fail(name, f"{name} must be a string")
    if len(v) > max_len:
        raise fail(name, f"{name} is longer than {max_len} characters")
    return v


def opt_int(
    data: dict[str, Any], name: str, default: int, *, lo: int = 0, hi: int = 2**31 - 1
) -> int:
    v = data.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise fail(name, f"{name} must be an integer from {lo} to {hi}")
    return v


def opt_bool(data: dict[str, Any], name: str, default: bool) -> bool:
    v = data.get(name, default)
    if not isinstance(v, bool):
        raise fail(name, f"{name} must be true or false")
    return v


def query_int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ApiError(400, "invalid_query", f"{name} must be an integer") from None
    if not lo <= n <= hi:
        raise ApiError(400, "invalid_query", f"{name} must be from {lo} to {hi}")
    return n


def header_value(headers: Any, name: str, *, max_len: int = 1000) -> str | None:
    """A header as printable ASCII, or a 400: aiohttp keeps undecodable bytes as
    surrogates, which would fail later (hashing, the database) as a 500."""
    v = headers.get(name)
    if v is None:
        return None
    if len(v) > max_len or not v.isascii() or not v.isprintable():
        raise ApiError(
            400, "invalid_header", f"{name} must be printable ASCII of at most {max_len} characters"
        )
    return v
