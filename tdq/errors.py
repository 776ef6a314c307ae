"""Exceptions shared across tdq's layers."""

from __future__ import annotations


class ConfigError(ValueError):
    """Raised when a config field holds a value tdq cannot use; the message names the field."""
