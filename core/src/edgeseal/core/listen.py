"""A TCP address to listen on, written ``HOST:PORT``. Stable API.

Used for ``[agent] metrics_listen`` and ``agent run --metrics-listen``. The host is an
IP address literal (IPv6 in brackets, ``[::1]:9464``) or ``localhost``; no name is
resolved. A bare ``PORT`` or ``:PORT`` means loopback, never every interface: exposing
the listener beyond the machine takes writing a non-loopback host out in full
(``0.0.0.0:9464``). Port 0 lets the kernel choose a free port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from edgeseal.core.errors import ConfigError

__all__ = ["ListenAddress"]

#: Longest text accepted as an address (an IPv6 literal in brackets and a port fit).
MAX_ADDRESS_CHARS = 64


@dataclass(frozen=True)
class ListenAddress:
    """A host (an IP literal) and a port; checks itself when built."""

    host: str
    port: int

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"listen host {self.host!r} is not an IP address") from None
        if isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"listen port {self.port!r} is not between 0 and 65535")

    @classmethod
    def parse(cls, text: str, *, where: str = "listen address") -> ListenAddress:
        """``text`` as an address; :class:`ConfigError` naming ``where`` and the value."""
        bad = f"{where} {text[:MAX_ADDRESS_CHARS]!r} is not HOST:PORT"
        if not text or len(text) > MAX_ADDRESS_CHARS or not text.isascii():
            raise ConfigError(f"{bad} (for example 127.0.0.1:9464)")
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = "", text
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{bad} (write an IPv6 host in brackets: [::1]:9464)")
        if host in ("", "localhost"):
            host = "127.0.0.1"
        if not (port.isdigit() and len(port) <= 5):
            raise ConfigError(f"{bad} (the port must be a number from 0 to 65535)")
        try:
            return cls(host, int(port))
        except ConfigError as e:
            raise ConfigError(f"{bad}: {e}") from None

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect."""
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def family_is_ipv6(self) -> bool:
        return ipaddress.ip_address(self.host).version == 6

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family_is_ipv6 else f"{self.host}:{self.port}"
