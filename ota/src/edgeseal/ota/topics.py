"""The MQTT topic layout, under one versioned prefix (default ``edgeseal/v1``). Stable API.

Per device (``<id>`` is the device id, which is also its certificate's CN and its MQTT
user name, so the broker's ACL can key on it):

    <prefix>/devices/<id>/control   signed offers and orders for this device   fleet -> device
    <prefix>/devices/<id>/fetch     requests for transport chunks               device -> fleet
    <prefix>/devices/<id>/data      the chunks asked for                        fleet -> device
    <prefix>/devices/<id>/status    the device's state (retained)               device -> fleet
    <prefix>/devices/<id>/events    every transition, with its reason           device -> fleet

Per group:

    <prefix>/groups/<group>/control signed offers and orders for a group        fleet -> devices

Ids and group names are single topic levels: no ``/``, ``+``, ``#`` or NUL (the broker's
``%u`` substitution must be a whole level, and a wildcard in a name would widen an ACL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEVICE_KINDS", "Topics", "check_level"]

#: Topic kinds under a device.
DEVICE_KINDS = ("control", "fetch", "data", "status", "events")
_LEVEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_level(value: str, what: str) -> str:
    """``value`` if it is safe as one topic level (and as a certificate CN), else ValueError."""
    if not _LEVEL.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '.', '_' or '-' (1-128)")
    return value


@dataclass(frozen=True)
class Topics:
    prefix: str = "edgeseal/v1"

    def __post_init__(self) -> None:
        parts = self.prefix.split("/")
        if not self.prefix or any(not p or set(p) & {"+", "#", "\0"} for p in parts):
            raise ValueError(f"topic prefix {self.prefix!r} must be plain levels joined by '/'")

    def device(self, device_id: str, kind: str) -> str:
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.prefix}/devices/{check_level(device_id, 'device id')}/{kind}"

    def group(self, group: str) -> str:
        return f"{self.prefix}/groups/{check_level(group, 'group')}/control"

    def all_devices(self, kind: str) -> str:
        """The filter a fleet-side subscriber uses for one kind across devices."""
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.prefix}/devices/+/{kind}"

    def parse_device(self, topic: str) -> tuple[str, str] | None:
        """``(device_id, kind)`` for a device topic under this prefix, else None."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :].split("/")
        if len(rest) != 2 or rest[1] not in DEVICE_KINDS or not _LEVEL.fullmatch(rest[0]):
            return None
        return rest[0], rest[1]
