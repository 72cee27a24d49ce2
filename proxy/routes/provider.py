"""Routes of this feature (see FEATURE_MODULES in proxy.app)."""

from __future__ import annotations

from typing import Any

ROUTES: list[tuple[str, str, Any]] = []
