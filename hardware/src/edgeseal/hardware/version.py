"""The hardware part's version."""

__version__ = "0.1.0"
