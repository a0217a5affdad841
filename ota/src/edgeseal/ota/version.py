"""The OTA part's version. Its modules arrive with the OTA issues (docs/roadmap in README)."""

__version__ = "0.1.0"
