"""Fleet side of the data plane: answer devices' chunk requests, and publish offers.

The chunk server subscribes to every device's ``fetch`` topic and answers each request
on that device's ``data`` topic, reading the bundle file with ``pread`` (bundles are
ciphertext; nothing here decrypts). Requests are bounded (chunks per request, known
bundles only), so a device cannot make the server read anything else. Several servers
can share the load with an MQTT 5 shared subscription (``$share/<group>/...``).

Data frames go out at QoS 0: a device asks again for what has not come within its
``chunk_timeout``, so a broker acknowledgement per chunk would only add round trips.
``publishers`` connections (picked by a hash of the device id) carry the frames, so
encrypting and writing them runs on several network threads. The first is also the one
that takes the requests, at QoS 1: the broker has at most its in-flight limit of requests
unacknowledged towards the server, and the acknowledgements queue behind the frames that
connection is still writing. That is the back-pressure: without it (requests at QoS 0 on a
connection of their own) the server outran 1,000 simulated devices, queued gigabytes and
the devices' re-asks quadrupled the data sent.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgeseal.core.keys import Signer
from edgeseal.core.reader import BundleFile, VerifyPolicy
from edgeseal.core.trust import TrustAnchor
from edgeseal.ota.messages import (
    OtaMessageError,
    Trial,
    chunk_digests,
    encode_chunk,
    make_message,
    parse_fetch,
)
from edgeseal.ota.mqtt import MqttConnection
from edgeseal.ota.topics import Topics

__all__ = ["BundleOffer", "ChunkServer", "describe_bundle", "sign_offer"]

log = logging.getLogger("edgeseal.ota.server")


@dataclass(frozen=True)
class BundleOffer:
    """What an offer says about a bundle file."""

    path: Path
    model: str
    version: int
    bundle_id: str
    size: int
    sha256: str
    chunk_bytes: int
    chunks: tuple[bytes, ...]
    #: The devices the bundle is sealed to (only they can decrypt it).
    recipients: frozenset[str] = frozenset()


def describe_bundle(path: Path, chunk_bytes: int, anchor: TrustAnchor) -> BundleOffer:
    """Verify a bundle against the fleet's root (so nothing unsigned is offered; each device
    verifies it again) and hash its transport chunks."""
    with BundleFile.open(path) as bf:
        m = bf.verify(VerifyPolicy(anchor=anchor, now=None)).manifest
        model, version, bundle_id = m.model_name, m.version, m.bundle_id
        recipients = frozenset(r.device for r in m.recipients)
    with path.open("rb") as f:
        digests, size, sha = chunk_digests(f, chunk_bytes)
    return BundleOffer(
        path, model, version, bundle_id, size, sha, chunk_bytes, tuple(digests), recipients
    )


def sign_offer(
    signer: Signer,
    certificate: dict[str, Any],
    bundle: BundleOffer,
    *,
    seq: int,
    to: tuple[str, str],
    now: datetime,
    rollout: str = "",
    url: str = "",
    breaking: bool = False,
    trial: Mapping[str, Any] | None = None,
    revocations: dict[str, Any] | None = None,
    rotations: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """An offer of ``bundle``; ``trial`` (optional): ``{"seconds", "max_error_rate",
    "max_ood_rate", "min_requests"}``, a trial window on live traffic before commit."""
    extra: dict[str, Any] = {"rollout": rollout, "breaking": breaking}
    if url:
        extra["url"] = url
    if trial is not None:
        extra["trial"] = Trial.from_obj(dict(trial)).to_obj()  # refuse a bad one here too
    return make_message(
        signer,
        certificate,
        action="install",
        seq=seq,
        to=to,
        model=bundle.model,
        version=bundle.version,
        bundle_id=bundle.bundle_id,
        now=now,
        revocations=revocations,
        rotations=rotations,
        size=bundle.size,
        sha256=bundle.sha256,
        chunk_bytes=bundle.chunk_bytes,
        chunks=bundle.chunks,
        **extra,
    )


class ChunkServer:
    """Serves the chunks of the bundles it is given to whichever device asks."""

    def __init__(
        self,
        conn_factory: Any,
        topics: Topics,
        *,
        max_chunks_per_request: int = 64,
        publishers: int = 2,
        data_qos: int = 0,
    ) -> None:
        self.topics = topics
        self.max_chunks = max_chunks_per_request
        self.data_qos = data_qos
        self._bundles: dict[str, tuple[int, BundleOffer]] = {}
        self._lock = threading.Lock()
        self.chunks_sent = 0
        self.bytes_sent = 0
        self.requests_refused = 0
        self.conn: MqttConnection = conn_factory(
            subscriptions=[topics.all_devices("fetch")], on_message=self._on_message
        )
        #: The connections that carry data frames (the request connection is the first).
        self.publishers: list[MqttConnection] = [self.conn] + [
            conn_factory(subscriptions=[], on_message=_ignore) for _ in range(publishers - 1)
        ]

    def add(self, bundle: BundleOffer) -> None:
        with self._lock:
            if bundle.bundle_id not in self._bundles:
                fd = os.open(bundle.path, os.O_RDONLY)
                self._bundles[bundle.bundle_id] = (fd, bundle)

    def start(self) -> None:
        for c in self.publishers:
            c.start()

    def wait_connected(self, timeout: float) -> bool:
        return all(c.wait_connected(timeout) for c in self.publishers)

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_device(topic)
        if parsed is None:
            return
        device_id, _ = parsed
        try:
            bundle_id, indices = parse_fetch(payload, max_chunks=self.max_chunks)
        except OtaMessageError as e:
            self.requests_refused += 1
            log.warning("bad fetch request from %s: %s", device_id, e)
            return
        with self._lock:
            entry = self._bundles.get(bundle_id)
        if entry is None:
            self.requests_refused += 1
            return
        fd, b = entry
        data_topic = self.topics.device(device_id, "data")
        conn = self.publishers[zlib.crc32(device_id.encode()) % len(self.publishers)]
        for i in indices:
            if i >= len(b.chunks):
                self.requests_refused += 1
                continue
            piece = os.pread(fd, b.chunk_bytes, i * b.chunk_bytes)
            frame = encode_chunk(b.bundle_id, i, piece)
            conn.publish(data_topic, frame, qos=self.data_qos)
            self.chunks_sent += 1
            self.bytes_sent += len(frame)

    def stop(self) -> None:
        for c in self.publishers:
            c.stop()
        with self._lock:
            for fd, _ in self._bundles.values():
                os.close(fd)
            self._bundles.clear()


def _ignore(_topic: str, _payload: bytes) -> None:
    return None
