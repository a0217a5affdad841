"""The agent's version, as bundles' ``min_agent_version`` compares it."""

__version__ = "0.1.0"
