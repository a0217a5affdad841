"""One MQTT connection (paho-mqtt), configured the way every edgeseal party uses it.

TLS with a client certificate (the broker takes the certificate's CN as the user name),
MQTT 5 or 3.1.1, a persistent session (QoS 1 messages sent while offline are delivered on
reconnect), automatic reconnection with back-off. Incoming messages go to one callback;
the caller queues them for its own worker thread, so nothing slow runs on paho's network
thread.

By default each connection has its own network thread (paho's ``loop_start``). A process
that holds many connections (the fleet simulator) passes a :class:`NetLoop` instead: one
thread drives all of them from one selector, with the same reconnection and keepalive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeseal.core.errors import ConfigError, EdgesealError

__all__ = ["BrokerAddress", "ChannelError", "MqttConnection", "NetLoop"]

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
        loop: NetLoop | None = None,
        sub_qos: int = 1,
        live_only: bool = False,
    ) -> None:
        """``live_only``: pass on only what is published while subscribed, never the
        retained message a topic holds (an observer that must not mistake an old status
        for news)."""
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
        self.loop = loop
        self.sub_qos = sub_qos
        self.live_only = live_only
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
        if loop is not None:
            # paho then never writes from the publishing thread: the loop does.
            self.client.on_socket_register_write = lambda *_: None
            self.client.on_socket_unregister_write = lambda *_: None
            self.client.on_socket_close = lambda _c, _u, sock: loop._forget(sock)
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
            client.subscribe([(t, self.sub_qos) for t in self.subscriptions])
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
        if self.live_only and message.retain:
            return
        self.bytes_in += len(message.payload)
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:  # a bad message must not stop the network thread
            log.exception("handling a message on %s failed", message.topic)

    # -- use ------------------------------------------------------------------------------

    def _connect_args(self) -> dict[str, object]:
        kw: dict[str, object] = {"keepalive": self.keepalive}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self.clean else SESSION_EXPIRY
            kw.update(clean_start=self.clean, properties=props)
        return kw

    def start(self) -> None:
        """Connect in the background (and keep reconnecting)."""
        if self.loop is not None:
            self.loop.add(self)
            return
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

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        """Queue a message; paho sends it (again after a reconnect, for QoS 1) and the
        returned info says when the broker has acknowledged it."""
        self.bytes_out += len(payload)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if self.loop is not None:
            self.loop.want_write(self)
        return info

    def drop(self) -> None:
        """Break the connection as a network fault would (paho reconnects by itself)."""
        sock = self.client.socket()
        if sock is None:
            return
        if self.loop is not None:
            with contextlib.suppress(OSError, AttributeError):
                # the loop sees the connection end, and reconnects
                sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        else:
            sock.close()

    def abandon(self) -> None:
        """Stop at once, as a device losing power would: no DISCONNECT, no reconnecting."""
        if self.loop is not None:
            self.loop.remove(self, graceful=False)
        else:
            self.drop()
            self._loop_stop()

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.remove(self, graceful=True)
            return
        self.client.disconnect()
        self._loop_stop()

    def _loop_stop(self) -> None:
        """paho's ``loop_stop`` checks its network thread, then joins it; the thread clears
        itself when it ends (after ``disconnect`` or a dropped socket), so the join can meet
        ``None`` (eclipse-paho/paho.mqtt.python#872). Either way the thread is gone."""
        with contextlib.suppress(AttributeError):
            self.client.loop_stop()


class NetLoop:
    """One network thread for many :class:`MqttConnection`\\ s (``loop=`` when making them):
    a selector over their sockets, paho's ``loop_read``/``loop_write``/``loop_misc`` on the
    ready ones, reconnection with the same back-off as paho's own loop (1 s doubling to
    30 s). Connecting (TCP and TLS handshake) happens on this thread. Publishing from any
    thread is safe: the connection tells the loop it has something to write."""

    MISC_EVERY = 1.0

    def __init__(self, name: str = "edgeseal-mqtt-loop") -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []
        self._dirty: set[MqttConnection] = set()
        self._conns: set[MqttConnection] = set()
        self._socks: dict[MqttConnection, socket.socket] = {}
        self._retry: dict[MqttConnection, tuple[float, float]] = {}
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._sel.register(self._r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- from any thread ----------------------------------------------------------------

    def _wake(self) -> None:
        if threading.current_thread() is not self._thread:
            with contextlib.suppress(BlockingIOError):
                os.write(self._w, b"x")

    def call(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def add(self, conn: MqttConnection) -> None:
        self.call(lambda: self._connect(conn, first=True))

    def remove(self, conn: MqttConnection, *, graceful: bool) -> None:
        done = threading.Event()

        def go() -> None:
            try:
                self._remove(conn, graceful)
            finally:
                done.set()

        if threading.current_thread() is self._thread:
            go()
            return
        self.call(go)
        done.wait(10)

    def want_write(self, conn: MqttConnection) -> None:
        with self._lock:
            self._dirty.add(conn)
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout=10)

    # -- the loop thread ------------------------------------------------------------------

    def _connect(self, conn: MqttConnection, *, first: bool = False) -> None:
        if first:
            self._conns.add(conn)
        elif conn not in self._conns:
            return
        self._retry.pop(conn, None)
        try:
            if first:
                conn.client.connect(conn.address.host, conn.address.port, **conn._connect_args())  # type: ignore[arg-type]
            else:
                conn.client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as e:
            log.info("connecting to %s: %s (will retry)", conn.address.host, e)
            self._lost(conn)
            return
        sock = conn.client.socket()
        if sock is None:
            self._lost(conn)
            return
        self._socks[conn] = sock  # type: ignore[assignment]
        self._sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _forget(self, sock: object) -> None:
        """paho is closing ``sock`` (on this thread): stop watching it first."""
        with contextlib.suppress(KeyError, ValueError):
            key = self._sel.unregister(sock)  # type: ignore[arg-type]
            self._socks.pop(key.data, None)

    def _lost(self, conn: MqttConnection) -> None:
        sock = self._socks.pop(conn, None)
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        if conn not in self._conns:
            return
        if conn.client.socket() is not None:
            with contextlib.suppress(Exception):
                conn.client._sock_close()  # paho's own cleanup
        conn.connected.clear()
        conn.subscribed.clear()
        _, delay = self._retry.get(conn, (0.0, 0.5))
        delay = min(delay * 2, 30.0)
        self._retry[conn] = (time.monotonic() + delay, delay)

    def _remove(self, conn: MqttConnection, graceful: bool) -> None:
        self._conns.discard(conn)
        self._retry.pop(conn, None)
        sock = self._socks.pop(conn, None)
        if graceful and sock is not None:
            with contextlib.suppress(Exception):
                conn.client.disconnect()
                conn.client.loop_write()
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()
        conn.connected.clear()
        conn.subscribed.clear()

    def _update(self, conn: MqttConnection) -> None:
        sock = self._socks.get(conn)
        if sock is None:
            return
        events = selectors.EVENT_READ
        if conn.client.want_write():
            events |= selectors.EVENT_WRITE
        with contextlib.suppress(KeyError, ValueError):
            if self._sel.get_key(sock).events != events:
                self._sel.modify(sock, events, conn)

    def _serve(self, conn: MqttConnection, mask: int) -> None:
        client = conn.client
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        if mask & selectors.EVENT_READ:
            rc = client.loop_read()
            sock = client.socket()
            n = 0
            while rc == ok and isinstance(sock, ssl.SSLSocket) and sock.pending() and n < 64:
                rc, n = client.loop_read(), n + 1
            if rc != ok:
                self._lost(conn)
                return
        if (mask & selectors.EVENT_WRITE or client.want_write()) and client.loop_write() != ok:
            self._lost(conn)
            return
        self._update(conn)

    def _pending_work(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            dirty, self._dirty = self._dirty, set()
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("MQTT loop call failed")
        for conn in dirty:
            if conn in self._socks:
                self._serve(conn, 0)

    def _misc(self) -> None:
        """Keepalive and timeouts for every connection; reconnect those whose time came."""
        for conn in list(self._socks):
            if conn.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._lost(conn)
            else:
                self._update(conn)

    def _run(self) -> None:
        misc_at = time.monotonic() + self.MISC_EVERY
        while not self._stopping:
            self._pending_work()
            now = time.monotonic()
            wake = min([misc_at, *(t for t, _ in self._retry.values())])
            try:
                ready = self._sel.select(max(0.0, min(wake - now, self.MISC_EVERY)))
            except OSError:
                ready = []
            for key, mask in ready:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._r, 4096):
                            pass
                    continue
                try:
                    self._serve(key.data, mask)
                except Exception:
                    log.exception("MQTT loop: serving a connection failed")
                    self._lost(key.data)
            now = time.monotonic()
            if now >= misc_at:
                misc_at = now + self.MISC_EVERY
                self._misc()
            for conn, (at, _) in list(self._retry.items()):
                if at <= now:
                    self._connect(conn)
        for conn in list(self._conns):
            self._remove(conn, graceful=True)
        self._sel.close()
        os.close(self._r)
        os.close(self._w)
