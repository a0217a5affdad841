"""One MQTT connection (paho-mqtt), configured the way every edgeseal party uses it.

TLS with a client certificate (the broker takes the certificate's CN as the user name),
MQTT 5 or 3.1.1, a persistent session (QoS 1 messages sent while offline are delivered on
reconnect), automatic reconnection with back-off. Incoming messages go to one callback;
the caller queues them for its own worker thread, so nothing slow runs on paho's network
thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeseal.core.errors import ConfigError, EdgesealError

__all__ = ["BrokerAddress", "ChannelError", "MqttConnection"]

log = logging.getLogger("edgeseal.ota.mqtt")

SESSION_EXPIRY = 7 * 24 * 3600


class ChannelError(EdgesealError):
    """The MQTT connection cannot be set up (bad URL, unreadable certificates)."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
            raise ConfigError(f"broker URL {url!r} must look like mqtts://host:8883")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls)


class MqttConnection:
    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        protocol: str = "5",
        keepalive: int = 30,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[str, bytes], None],
        on_connect: Callable[[], None] | None = None,
        clean: bool = False,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.v5 = protocol == "5"
        self.subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connect = on_connect
        self.connected = threading.Event()
        #: Set once the broker has acknowledged this connection's subscriptions.
        self.subscribed = threading.Event()
        self.keepalive = keepalive
        self.clean = clean
        if self.v5:
            self.client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
            )
        else:
            self.client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=paho.MQTTv311,
                clean_session=clean,
            )
        if self.address.tls:
            try:
                ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
                if cert_file:
                    ctx.load_cert_chain(cert_file, key_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ChannelError(f"cannot load the TLS files for {url}: {e}") from e
            self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(1, 30)
        self.client.max_inflight_messages_set(64)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_message = self._message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.bytes_in = 0
        self.bytes_out = 0

    # -- paho callbacks (network thread) ------------------------------------------------

    def _connected(
        self, client: paho.Client, _u: object, _f: object, rc: object, _p: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("broker refused the connection: %s", rc)
            return
        if self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])
        self.connected.set()
        if self._on_connect is not None:
            self._on_connect()

    def _disconnected(
        self, _c: paho.Client, _u: object, _f: object, rc: object, _p: object
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.info("disconnected from the broker: %s", rc)

    def _message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        self.bytes_in += len(message.payload)
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:  # a bad message must not stop the network thread
            log.exception("handling a message on %s failed", message.topic)

    # -- use ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (and keep reconnecting)."""
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self.clean else SESSION_EXPIRY
            self.client.connect_async(
                self.address.host,
                self.address.port,
                keepalive=self.keepalive,
                clean_start=self.clean,
                properties=props,
            )
        else:
            self.client.connect_async(
                self.address.host, self.address.port, keepalive=self.keepalive
            )
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Connected and, when there are subscriptions, subscribed."""
        if not self.connected.wait(timeout):
            return False
        return not self.subscriptions or self.subscribed.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.bytes_out += len(payload)
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def drop(self) -> None:
        """Break the connection as a network fault would (paho reconnects by itself)."""
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
