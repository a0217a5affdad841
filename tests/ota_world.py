"""A small OTA world for tests and benchmarks: a workstation keyring, bundles for one
device identity, the fleet side (offers, chunk server, an observer of status and events)
and devices run in-process or as real ``edgeseal agent run`` processes."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import Config, load_config
from edgeseal.core.encoding import utcnow
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import load_public_key
from edgeseal.ota.channel import MqttChannel
from edgeseal.ota.messages import make_message
from edgeseal.ota.mqtt import MqttConnection
from edgeseal.ota.server import BundleOffer, ChunkServer, describe_bundle, sign_offer
from edgeseal.ota.topics import Topics
from edgeseal.ota.updater import Faults
from edgeseal.packager import pack as pack_module
from edgeseal.packager.pack import PackOptions, pack_model
from edgeseal.packager.samples import make_trained_classifier
from helpers import NOW

TOPICS = Topics()


def wait_for(
    pred: Callable[[], Any],
    timeout: float = 60.0,
    what: str = "condition",
    detail: Callable[[], Any] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    more = f"\n{detail()}" if detail else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{more}")


@dataclass
class Workstation:
    root: Path
    ring: Keyring
    bundles: dict[str, Path] = field(default_factory=dict)
    x: np.ndarray | None = None

    @classmethod
    def make(cls, root: Path, devices: list[str]) -> Workstation:
        ring = Keyring(root / "keys")
        ring.init_root()
        start = NOW - timedelta(days=1)
        ring.new_signer("release", roles=["pack"], model_patterns=["*"], days=365, now=start)
        ring.new_signer("deployer", roles=["deploy"], model_patterns=["clf*"], days=365, now=start)
        ws = cls(root, ring)
        template = root / "home-template"
        for dev in devices:
            home = DeviceHome(template / dev)
            info = home.init(root_public_keys=[ring.root_pub_path.read_bytes()], device_id=dev)
            key = load_public_key(info["public_key"].encode(), dev)
            ring.add_device(dev, key, target=None, key_store="software")
        return ws

    def template(self, dev: str) -> Path:
        return self.root / "home-template" / dev

    def make_models(self) -> None:
        d = self.root / "models"
        d.mkdir(exist_ok=True)
        for seed in (1, 2):
            model, ds = make_trained_classifier(seed=seed, hidden=64)
            (d / f"m{seed}.onnx").write_bytes(model)
        np.savez(d / "calib.npz", input=ds.x_train[:200], labels=ds.y_train[:200])
        self.x = ds.x_test[:4].astype(np.float32)

    def pack(
        self, key: str, version: int, model: str = "m1", *, bad_golden: bool = False, to=None
    ) -> Path:
        signer, cert = self.ring.load_signer("release")
        out = self.root / f"{key}.esb"
        devices = self.ring.devices() if to is None else [self.ring.device(d) for d in to]
        with pytest.MonkeyPatch.context() as mp:
            if bad_golden:
                real = pack_module.make_golden

                def wrong(*a: Any, **kw: Any) -> Any:
                    golden = real(*a, **kw)
                    golden["tolerances"]["probs"]["atol"] = -1.0  # nothing reproduces it
                    return golden

                mp.setattr(pack_module, "make_golden", wrong)
                # the packager's own device check would refuse to seal it: skip it
                mp.setattr(pack_module, "check_split_onnx", lambda *a, **kw: None)
            pack_model(
                self.root / "models" / f"{model}.onnx",
                out,
                name="clf",
                version=version,
                signer=signer,
                certificate=cert,
                devices=devices,
                now=NOW,
                options=PackOptions(calibration=self.root / "models" / "calib.npz"),
            )
        self.bundles[key] = out
        return out


class FleetSide:
    """The controller's side in a test: signs offers and orders, serves chunks, and
    records every device's status and events, as published while it watches (never the
    retained status an earlier test's device left on the broker)."""

    def __init__(self, ws: Workstation, broker: Any, ca_file: Path, cert: Path, key: Path) -> None:
        self.ws = ws
        self.seq = itertools.count(int(time.time() * 1000))
        self.status: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.offers: dict[str, BundleOffer] = {}

        def conn(**kw: Any) -> MqttConnection:
            return MqttConnection(
                broker.url,
                client_id=f"ctl-{uuid.uuid4().hex[:8]}",
                ca_file=str(ca_file),
                cert_file=str(cert),
                key_file=str(key),
                clean=True,
                **kw,
            )

        # Live messages only: device statuses are retained, and the ``broker`` fixture
        # lives for a whole module, so a new observer would first be handed the status an
        # earlier test's device left (e.g. "committed" v1) and take it for news.
        self.observer = conn(
            subscriptions=[TOPICS.all_devices("status"), TOPICS.all_devices("events")],
            on_message=self._seen,
            live_only=True,
        )
        self.observer.start()
        self.server = ChunkServer(conn, TOPICS)
        self.server.start()
        assert self.observer.wait_connected(10) and self.server.conn.wait_connected(10)

    def _seen(self, topic: str, payload: bytes) -> None:
        parsed = TOPICS.parse_device(topic)
        if parsed is None or not payload:
            return
        dev, kind = parsed
        obj = json.loads(payload)
        with self._lock:
            if kind == "status":
                self.status[dev] = obj
            else:
                self.events.append((dev, obj))

    def offer(
        self,
        key: str,
        to: tuple[str, str] = ("device", "dev-a"),
        *,
        chunk_bytes: int = 4096,
        seq: int | None = None,
        retain: bool | None = None,
        now: Any = None,
        serve: bool = True,
        **kw: Any,
    ) -> bytes:
        """Offer bundle ``key``; its chunks are served unless ``serve`` is off (then the
        device's download waits, in progress, until :meth:`serve` adds them)."""
        b = describe_bundle(self.ws.bundles[key], chunk_bytes, self.ws.ring.anchor())
        if serve:
            self.server.add(b)
        self.offers[key] = b
        signer, cert = self.ws.ring.load_signer("deployer")
        wire = sign_offer(
            signer,
            cert,
            b,
            seq=next(self.seq) if seq is None else seq,
            to=to,
            now=now or utcnow(),
            **kw,
        )
        self.send(wire, to, retain=retain)
        return wire

    def serve(self, key: str) -> None:
        """Serve the chunks of an offer made with ``serve=False``."""
        self.server.add(self.offers[key])

    def order(
        self, action: str, key: str, to: tuple[str, str] = ("device", "dev-a"), **kw: Any
    ) -> bytes:
        b = self.offers.get(key) or describe_bundle(
            self.ws.bundles[key], 4096, self.ws.ring.anchor()
        )
        signer, cert = self.ws.ring.load_signer("deployer")
        wire = make_message(
            signer,
            cert,
            action=action,
            seq=next(self.seq),
            to=to,
            model=b.model,
            version=b.version,
            bundle_id=b.bundle_id,
            now=utcnow(),
            **kw,
        )
        self.send(wire, to, retain=False)
        return wire

    def send(self, wire: bytes, to: tuple[str, str], *, retain: bool | None = None) -> None:
        topic = TOPICS.device(to[1], "control") if to[0] == "device" else TOPICS.group(to[1])
        self.observer.publish(topic, wire, retain=bool(retain))

    def state(self, dev: str, model: str = "clf") -> str | None:
        with self._lock:
            st = self.status.get(dev)
        if not st:
            return None
        m = st.get("models", {}).get(model)
        return m.get("state") if m else None

    def model_status(self, dev: str, model: str = "clf") -> dict[str, Any]:
        with self._lock:
            return dict(self.status.get(dev, {}).get("models", {}).get(model, {}))

    def events_of(self, dev: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for d, e in self.events if d == dev]

    def close(self) -> None:
        self.server.stop()
        self.observer.stop()


def device_config(
    home: Path, broker: Any, ca_file: Path, cert: Path, key: Path, dev: str, **ota: Any
) -> str:
    values = {
        "broker": broker.url,
        "groups": ["lab"],
        "ca_file": str(ca_file),
        "cert_file": str(cert),
        "key_file": str(key),
        "chunk_timeout": 2.0,
        "keepalive": 5,
        **ota,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return (
        f'[device]\nid = "{dev}"\n[agent]\nchannels = ["mqtt"]\n'
        f'socket = "{home}/agent.sock"\n[ota]\n' + "\n".join(lines) + "\n"
    )


@dataclass
class InProcessDevice:
    agent: Agent
    channel: MqttChannel

    @classmethod
    def start(cls, home: Path, config_text: str, faults: Faults | None = None) -> InProcessDevice:
        cfg: Config = load_config(text=config_text)
        agent = Agent(DeviceHome(home), cfg)
        agent.load_all()
        channel = MqttChannel(cfg, faults=faults)
        channel.start(agent)
        assert channel.conn is not None and channel.conn.wait_connected(20), "device offline"
        return cls(agent, channel)

    def stop(self) -> None:
        self.channel.stop()
        self.agent.close()


def copy_home(ws: Workstation, dev: str, dest: Path) -> Path:
    shutil.copytree(ws.template(dev), dest)
    return dest


def start_daemon(home: Path, config_path: Path, faults: str = "") -> subprocess.Popen[bytes]:
    env = {**os.environ, "EDGESEAL_UNSAFE_OTA_FAULTS": faults}
    log = (home / "daemon.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "edgeseal.core", "agent", "run", "--home", str(home),
         "--config", str(config_path)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def device_child(
    home: str, config_text: str, kill_after: float, want_version: int, out: str
) -> None:
    """A device process for fault trials (run by a multiprocessing forkserver, so it starts
    in milliseconds): serve and take updates; with ``kill_after`` > 0, SIGKILL itself
    after that many seconds, wherever it is. Without, run until ``want_version`` is
    committed (or the update is refused or fails) and write what it serves to ``out``."""
    import signal as _signal

    if kill_after > 0:
        threading.Timer(kill_after, os.kill, (os.getpid(), _signal.SIGKILL)).start()
    t0 = time.monotonic()
    dev = InProcessDevice.start(Path(home), config_text)
    deadline = time.monotonic() + 60
    state = None
    t_update = None
    while time.monotonic() < deadline:
        st = dev.channel.status()["models"].get("clf", {})
        state = st.get("state")
        if t_update is None and st.get("offered") == want_version:
            t_update = time.monotonic() - t0
        if (
            kill_after <= 0
            and st.get("offered") == want_version
            and state
            in (
                "committed",
                "fallen-back",
                "failed",
            )
        ):
            break
        time.sleep(0.02)
    sm = dev.agent.serving.get("clf")
    result = {
        "t_update": t_update,
        "t_done": time.monotonic() - t0,
        "state": state,
        "reason": dev.channel.status()["models"].get("clf", {}).get("reason"),
        "serving": sm.identity["version"] if sm else None,
        "golden": sm.self_check(golden=True, digest=True) if sm else None,
    }
    dev.stop()
    Path(out).write_text(json.dumps(result))
