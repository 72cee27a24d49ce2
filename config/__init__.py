"""Settings and the network policy every outbound connection obeys."""

from __future__ import annotations

from config.settings import Settings, SettingsError, load, validate

__all__ = ["Settings", "SettingsError", "load", "validate"]
