"""``edgeseal agent run``: the long-running agent.

Loads the installed bundles, serves the local API (and, when ``[agent] metrics_listen``
names an address, ``GET /metrics`` over TCP), starts the configured update channels,
runs the scheduled integrity checks, reloads on SIGHUP, stops cleanly on SIGTERM/SIGINT,
and tells systemd (``Type=notify``) when it is ready, alive (watchdog)
and stopping, through ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from edgeseal.agent.api import ApiServer
from edgeseal.agent.audit import AuditLog, audit_location
from edgeseal.agent.channels import UpdateChannel, load_channels
from edgeseal.agent.device import DeviceHome
from edgeseal.agent.metrics_http import MetricsListener
from edgeseal.agent.service import Agent
from edgeseal.core.config import Config

__all__ = ["Daemon", "sd_notify", "watchdog_interval"]

log = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send ``state`` to systemd; False when not run under a notify-type unit."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(state.encode())
        except OSError as e:
            # A strict snap may send only with the daemon-notify interface connected.
            hint = (
                f"; connect it: sudo snap connect {os.environ['SNAP_INSTANCE_NAME']}:daemon-notify"
                if isinstance(e, PermissionError) and os.environ.get("SNAP_INSTANCE_NAME")
                else ""
            )
            log.warning("sd_notify failed: %s%s", e, hint)
            return False
    return True


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as systemd asks.

    None when no watchdog is set, or when ``$WATCHDOG_PID`` names another process (the
    variables were inherited, not meant for us), as ``sd_watchdog_enabled(3)`` reads them.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 2e6


class Daemon:
    def __init__(self, home: DeviceHome, config: Config, *, socket_path: Path | None = None):
        self.config = config
        self.agent = Agent(home, config)
        audit_path, audit_counter = audit_location(home.path, config.agent.audit_log)
        self.audit = AuditLog(
            audit_path,
            audit_counter,
            flush_every=config.agent.audit_flush_every,
            max_bytes=config.agent.audit_max_bytes,
        )
        self.api = ApiServer(self.agent, socket_path or Path(config.agent.socket), audit=self.audit)
        self.channels: list[UpdateChannel] = load_channels(config.agent.channels, config)
        address = config.agent.metrics_address
        #: GET /metrics over TCP, every model's series ([agent] metrics_listen); None: off.
        self.metrics: MetricsListener | None = (
            MetricsListener(address, lambda: self.api.metrics_text(lambda _name: True))
            if address is not None
            else None
        )
        self._stop = threading.Event()
        self._reload = threading.Event()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    def _start_serving(self) -> None:
        """Bind the metrics listener (first: an address in use ends the run before
        anything serves), load the models and start the API."""
        if self.metrics is not None:
            try:
                self.metrics.start()
            except BaseException:
                self.agent.close()
                self.audit.close()
                raise
        try:
            loaded = self.agent.load_all()
            for name, state in loaded.items():
                log.info("%s: %s", name, state)
            self.api.start()
        except BaseException:
            if self.metrics is not None:
                self.metrics.stop()
            raise

    def run(self, *, install_signals: bool = True, tick: float = 1.0) -> None:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
        self._start_serving()
        for ch in self.channels:
            ch.start(self.agent)
        ping_every = watchdog_interval(os.environ, os.getpid())
        if ping_every is not None:
            # Wake often enough to ping on time however short WatchdogSec is.
            tick = min(tick, ping_every / 2)
        sd_notify(f"READY=1\nSTATUS=serving {len(self.agent.serving)} model(s)")
        log.info("agent serving on %s", self.api.socket_path)
        last_ping = time.monotonic()
        try:
            while not self._stop.wait(tick):
                if self._reload.is_set():
                    self._reload.clear()
                    sd_notify("RELOADING=1")
                    log.info("reload: %s", self.agent.reload())
                    sd_notify("READY=1")
                self.agent.run_checks()
                if ping_every is not None and time.monotonic() - last_ping >= ping_every:
                    sd_notify("WATCHDOG=1")
                    last_ping = time.monotonic()
        finally:
            sd_notify("STOPPING=1")
            for ch in self.channels:
                ch.stop()
            if self.metrics is not None:
                self.metrics.stop()
            self.api.stop()
            self.agent.close()
            self.audit.close()
            log.info("agent stopped")
