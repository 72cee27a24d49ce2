"""Credentials never reach a log line or an error message."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# scheme://user:password@host... and any URL at all inside free text.
_URL_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str | None) -> str:
    """The URL with its password (and any query, which may hold an API key) masked."""
    if not url:
        return "absent"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = "***" if parts.query else ""
    # Path segments of RPC URLs often carry the provider's API key (…/v2/<key>).
    path = re.sub(r"/[A-Za-z0-9_-]{20,}", "/***", parts.path)
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def scrub(text: str) -> str:
    """Free text (an exception's message) with every URL in it redacted."""
    return _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
