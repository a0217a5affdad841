"""The MQTT update channel: the agent's ``mqtt`` channel (entry point group
``edgeseal.agent.channels``), started by ``edgeseal agent run`` when the config says
``[agent] channels = ["mqtt"]`` and ``[ota] broker = "mqtts://..."``.

One paho connection feeds one worker thread, which runs the :class:`Updater`: control
messages, chunks, agent events and a once-a-second tick, in arrival order. The status is
published on every transition and again every ``report_interval`` seconds, so the fleet
sees OOD rates and quarantines move between updates.

A process that runs many devices (the fleet simulator) gives each channel a shared
:class:`~edgeseal.ota.mqtt.NetLoop` and :class:`StepPool` instead: no thread per device,
each device's steps still run one at a time and in arrival order.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgeseal.agent.service import Agent
from edgeseal.core.config import Config
from edgeseal.core.encoding import canonical_json
from edgeseal.core.errors import ConfigError
from edgeseal.ota.messages import fetch_request
from edgeseal.ota.mqtt import MqttConnection, NetLoop
from edgeseal.ota.topics import Topics, check_level
from edgeseal.ota.updater import Faults, Updater

__all__ = ["MqttChannel", "StepPool", "make_channel"]

log = logging.getLogger("edgeseal.ota")

TICK = 1.0


class _MqttLink:
    def __init__(self, conn: MqttConnection, topics: Topics, device_id: str) -> None:
        self.conn = conn
        self.fetch_topic = topics.device(device_id, "fetch")
        self.status_topic = topics.device(device_id, "status")
        self.events_topic = topics.device(device_id, "events")

    def fetch(self, bundle_id: str, indices: Sequence[int]) -> None:
        self.conn.publish(self.fetch_topic, fetch_request(bundle_id, indices))

    def publish_status(self, status: Mapping[str, Any]) -> None:
        self.conn.publish(self.status_topic, canonical_json(dict(status)), retain=True)

    def publish_event(self, event: Mapping[str, Any]) -> None:
        self.conn.publish(self.events_topic, canonical_json(dict(event)))


class StepPool:
    """A few threads that run many channels' updater steps. A channel is queued here when
    it has work and is not already queued or running, so its steps never overlap and keep
    their order; a ticker posts each channel's once-a-second tick."""

    def __init__(self, threads: int = 4, *, name: str = "edgeseal-ota-pool") -> None:
        self._ready: queue.Queue[MqttChannel | None] = queue.Queue()
        self._channels: set[MqttChannel] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        self._threads.append(threading.Thread(target=self._tick, name=f"{name}-tick", daemon=True))
        for t in self._threads:
            t.start()

    def attach(self, channel: MqttChannel) -> None:
        with self._lock:
            self._channels.add(channel)

    def detach(self, channel: MqttChannel) -> None:
        with self._lock:
            self._channels.discard(channel)

    def schedule(self, channel: MqttChannel) -> None:
        self._ready.put(channel)

    def _work(self) -> None:
        while True:
            channel = self._ready.get()
            if channel is None:
                return
            try:
                channel._drain()
            except BaseException:  # a killed simulated device unwinds its step, not the pool
                if not channel._stopping.is_set():
                    log.exception("an OTA channel's step failed")

    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            with self._lock:
                channels = list(self._channels)
            for ch in channels:
                ch._post("tick", None)

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads[:-1]:
            self._ready.put(None)
        for t in self._threads:
            t.join(timeout=10)


class MqttChannel:
    name = "mqtt"
    #: Seconds between status reports when nothing changes.
    report_interval = 30.0

    def __init__(
        self,
        config: Config,
        *,
        faults: Faults | None = None,
        kill: Callable[[str], None] | None = None,
        loop: NetLoop | None = None,
        pool: StepPool | None = None,
    ) -> None:
        if not config.ota.broker:
            raise ConfigError('agent.channels names "mqtt" but [ota] broker is not set')
        self.config = config
        self.faults = faults
        self.kill = kill
        self.topics = Topics(config.ota.topic_prefix)
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.updater: Updater | None = None
        self.conn: MqttConnection | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.loop = loop
        self.pool = pool
        self._pending: deque[tuple[str, Any]] = deque()
        self._plock = threading.Lock()
        self._scheduled = False
        self._step_lock = threading.Lock()
        self._reported = time.monotonic()

    def _post(self, kind: str, item: Any) -> None:
        if self.pool is None:
            self.queue.put((kind, item))
            return
        with self._plock:
            if kind == "tick" and self._pending:
                return  # busy: the tick would only repeat what the next step does
            self._pending.append((kind, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.pool.schedule(self)

    def _drain(self) -> None:
        """Pool mode: run this channel's pending steps (a bounded batch, then requeue)."""
        assert self.pool is not None
        with self._step_lock:
            for _ in range(16):
                with self._plock:
                    if not self._pending or self._stopping.is_set():
                        self._scheduled = False
                        return
                    kind, item = self._pending.popleft()
                if kind == "begin":
                    self._begin()
                else:
                    self._step(kind, item)
        with self._plock:
            if not self._pending or self._stopping.is_set():
                self._scheduled = False
                return
        self.pool.schedule(self)

    def start(self, agent: Agent) -> None:
        device_id = self.config.device.id or str(agent.home.info().get("device_id", ""))
        check_level(device_id, "device id")
        ota = self.config.ota
        control = self.topics.device(device_id, "control")
        data = self.topics.device(device_id, "data")
        subs = [control, data, *(self.topics.group(g) for g in ota.groups)]

        def on_message(topic: str, payload: bytes) -> None:
            if not payload:
                return  # a retained message cleared (the controller withdrew an offer)
            self._post("chunk" if topic == data else "control", payload)

        self.conn = MqttConnection(
            ota.broker,
            client_id=device_id,
            ca_file=ota.ca_file,
            cert_file=ota.cert_file,
            key_file=ota.key_file,
            protocol=ota.protocol,
            keepalive=ota.keepalive,
            subscriptions=subs,
            on_message=on_message,
            on_connect=lambda: self._post("connected", None),
            loop=self.loop,
        )
        link = _MqttLink(self.conn, self.topics, device_id)
        self.updater = Updater(agent, ota, device_id, link, faults=self.faults, kill=self.kill)
        self.updater.kick = lambda: self._post("tick", None)
        agent.listeners.append(lambda e, m, d: self._post("agent", (e, m, d)))
        if self.pool is not None:
            self.pool.attach(self)
            self._post("begin", None)
            return
        self._thread = threading.Thread(target=self._run, name="edgeseal-ota", daemon=True)
        self._thread.start()

    def _begin(self) -> None:
        updater, conn = self.updater, self.conn
        assert updater is not None and conn is not None
        try:
            updater.resume()
        except Exception:
            log.exception("resuming the update failed")
        conn.start()
        self._reported = time.monotonic()

    def _step(self, kind: str, item: Any) -> None:
        updater, conn = self.updater, self.conn
        assert updater is not None and conn is not None
        if kind == "tick" and time.monotonic() - self._reported >= self.report_interval:
            kind, self._reported = "report", time.monotonic()
        try:
            self._dispatch(updater, kind, item)
        except ConnectionAbortedError:
            conn.drop()
        except Exception:  # never let one bad step stop the channel
            log.exception("OTA step %s failed", kind)

    def _run(self) -> None:
        self._begin()
        while not self._stopping.is_set():
            try:
                kind, item = self.queue.get(timeout=TICK)
            except queue.Empty:
                kind, item = "tick", None
            self._step(kind, item)

    def _dispatch(self, updater: Updater, kind: str, item: Any) -> None:
        if kind == "control":
            updater.handle_control(item)
        elif kind == "chunk":
            updater.handle_chunk(item)
        elif kind == "agent":
            updater.on_agent_event(*item)
        elif kind == "report":
            updater.report()
            updater.tick()
        elif kind == "connected":
            if updater.download is not None:
                updater.download.asked.clear()  # what was in flight is lost with the link
            updater.report()
            updater.tick()
        else:
            updater.tick()

    def wait_idle(self, timeout: float = 30) -> None:
        """After ``_stopping`` is set: wait until no step of this channel is running."""
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        elif self.pool is not None:
            self.pool.detach(self)
            if self._step_lock.acquire(timeout=timeout):
                self._step_lock.release()

    def stop(self) -> None:
        self._stopping.set()
        self.wait_idle()
        if self.updater is not None:
            self.updater.close()
        if self.conn is not None:
            self.conn.stop()

    def status(self) -> dict[str, Any]:
        if self.updater is None:
            return {"state": "not started"}
        out = self.updater.status()
        if self.conn is not None:
            out["connected"] = self.conn.connected.is_set()
            out["bytes_in"] = self.conn.bytes_in
            out["bytes_out"] = self.conn.bytes_out
        return out


def make_channel(config: Config) -> MqttChannel:
    """The entry point's factory. Fault injection comes only from the named environment
    variable, for tests and the fleet simulator."""
    faults = Faults.from_text(os.environ.get("EDGESEAL_UNSAFE_OTA_FAULTS", ""))
    return MqttChannel(config, faults=faults)
