"""The tdq version (its own module, so low layers can record it without importing the package)."""

__version__ = "0.1.0"
