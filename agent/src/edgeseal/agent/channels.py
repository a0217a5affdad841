"""The interface an update channel implements, and how the agent finds channels.

A channel delivers new bundles and orders (fall back, quarantine) to the agent. It gets
the :class:`~edgeseal.agent.service.Agent` and uses only its public methods: ``stage``,
``check_staged``, ``commit_staged``, ``discard_staged`` (or ``install``, which is the
four in a row), ``fall_back``, ``store.journal``/``store.set_channel_state`` to persist
its own progress, and ``listeners`` to hear of quarantines. The agent never imports a
channel: each is an entry point in the group ``edgeseal.agent.channels`` whose object is
a factory ``(config: Config) -> UpdateChannel``, started when ``agent.channels`` in the
config names it (the OTA part registers ``mqtt``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from edgeseal.core.config import Config
from edgeseal.core.errors import ConfigError

if TYPE_CHECKING:
    from edgeseal.agent.service import Agent

__all__ = ["GROUP", "UpdateChannel", "load_channels"]

GROUP = "edgeseal.agent.channels"


@runtime_checkable
class UpdateChannel(Protocol):
    name: str

    def start(self, agent: Agent) -> None:
        """Begin receiving (in its own threads); return promptly."""
        ...

    def stop(self) -> None:
        """Stop receiving; the agent keeps serving."""
        ...

    def status(self) -> dict[str, Any]: ...


def load_channels(names: Sequence[str], config: Config) -> list[UpdateChannel]:
    """Build the channels the config names; an unknown name is a config error."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    channels = []
    for name in names:
        ep = found.get(name)
        if ep is None:
            known = ", ".join(sorted(found)) or "none installed"
            raise ConfigError(f"agent.channels names {name!r}, which is not installed ({known})")
        factory: Callable[[Config], UpdateChannel] = ep.load()
        channel = factory(config)
        if not isinstance(channel, UpdateChannel):
            raise ConfigError(f"update channel {name!r} does not implement UpdateChannel")
        channels.append(channel)
    return channels
