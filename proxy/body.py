"""Request bodies read whole and JSON parsed safely.

``StreamReader.read(n)`` returns what has arrived so far, so a body split
across TCP segments came out truncated: it is read to its end here. JSON is
checked before and after parsing for what the parser would let through and
the rest of the stack would not survive: nesting deep enough to exhaust the
C stack (a library that raises the recursion limit turns that into SIGSEGV),
and strings that are not Unicode (lone surrogates from ``\\ud800`` escapes),
which the database drivers refuse later with a 500.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 32
# A JSON string, escapes included: removed before brackets are counted.
_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class BodyError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def too_large(limit: int) -> BodyError:
    return BodyError(413, "payload_too_large", f"request body over {limit} bytes")


async def read_whole(content: Any, limit: int, declared_length: int | None = None) -> bytes:
    """The whole body, however many segments it came in; 413 past ``limit``."""
    if declared_length is not None and declared_length > limit:
        raise too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await content.read(65536)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def nesting_depth_exceeds(raw: bytes, max_depth: int) -> bool:
    brackets = _STRING_RE.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = 0
    for b in brackets:
        if b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    if not raw:
        return {}
    if nesting_depth_exceeds(raw, max_depth):
        raise BodyError(400, "invalid_json", f"JSON nested deeper than {max_depth} levels")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BodyError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BodyError(400, "invalid_json", "request body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BodyError(
            400, "invalid_json", "request body has a string that is not valid Unicode"
        ) from None
    return data
