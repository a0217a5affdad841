"""The fleet simulator: N devices running the real agent and the real MQTT update channel,
against a real broker. For tests, the demo and the scale benchmark. Provisional API.

Each simulated device is a real device in miniature: its own home (device key in a
software key store, pinned root, model store with slots and journal, trusted time), its
own TLS key and certificate from the fleet CA (the broker's ACL keys on the CN), its own
:class:`~edgeseal.agent.service.Agent` and :class:`~edgeseal.ota.channel.MqttChannel`
(one paho connection). Devices share processes, and within a process they share threads:
one network loop drives every device's paho connection (:class:`~edgeseal.ota.mqtt.NetLoop`)
and a small pool runs the devices' update steps (:class:`~edgeseal.ota.channel.StepPool`,
``FleetSpec.pool_threads``), each device's steps in order and never two at once; the pool
size caps how many devices verify and open models at once. ``processes=0``
runs them all in this process (tests: faults and restarts are method calls);
``processes=k`` starts k worker processes (``python -m edgeseal.ota.simulate``) that
split the devices, so a 2-core machine can drive a thousand of them.

Faults (:class:`~edgeseal.ota.updater.Faults` text per device): ``drop-after-chunks=N``
(the connection drops mid-download), ``corrupt-chunk=N``, ``fail-health``,
``kill-at=STATE`` and ``kill-after-chunks=N``. In a shared process a *kill* abandons that
one device at once (its worker stops where it is, its connection drops without a
DISCONNECT, nothing is flushed or closed cleanly) and the device is started again from
its home after ``restart_delay`` seconds, as a rebooted board would be.

The tree::

    <root>/devices/<id>/          the device home (device.json, device.key, models/, ota/)
    <root>/devices/<id>/ota/tls.key, tls.pem
    <root>/fleet.json             the devices, their groups, the broker and the CA file
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeseal.agent import preflight as _preflight
from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import Config, load_config
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import load_public_key
from edgeseal.ota.channel import MqttChannel, StepPool
from edgeseal.ota.enroll import FleetCA, make_csr
from edgeseal.ota.mqtt import NetLoop
from edgeseal.ota.topics import check_level
from edgeseal.ota.updater import Faults

__all__ = ["DeviceKilled", "FleetSpec", "SimDevice", "SimFleet", "provision_fleet"]

log = logging.getLogger("edgeseal.ota.simulate")


class DeviceKilled(BaseException):
    """Raised inside one simulated device's worker by a kill fault: it unwinds that
    device's thread (not an ``Exception``, so the channel's step guard does not catch
    it) and nothing else."""


@dataclass(frozen=True)
class FleetSpec:
    """Everything a worker process needs to run its share of the fleet (JSON)."""

    root: str
    broker: str
    ca_file: str
    devices: tuple[str, ...]
    groups: tuple[str, ...] = ("sim",)
    topic_prefix: str = "edgeseal/v1"
    protocol: str = "5"
    faults: Mapping[str, str] = field(default_factory=dict)
    #: Keep the committed model open (serving). False frees it after the commit: the
    #: device still reports its slots, but a fleet of thousands fits in memory.
    keep_serving: bool = True
    chunk_timeout: float = 5.0
    window: int = 8
    keepalive: int = 30
    report_interval: float = 30.0
    restart_delay: float = 1.0
    #: Threads per process that run the devices' update steps (verify, stage, open and
    #: golden-check included): also the cap on how many do that at once.
    pool_threads: int = 4
    #: ``"each"``: every device runs the pre-flight child for its staged bundle, as real
    #: devices do. ``"once"``: a process runs it once per distinct (graph, shapes, limits,
    #: runtime) request and reuses the verdict for its other devices (a benchmark economy:
    #: the devices of a process receive the same bundle; say so when reporting figures).
    preflight: str = "each"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FleetSpec:
        obj = json.loads(text)
        obj["devices"] = tuple(obj["devices"])
        obj["groups"] = tuple(obj["groups"])
        return cls(**obj)

    def home(self, device: str) -> Path:
        return Path(self.root) / "devices" / check_level(device, "device id")

    def config_text(self, device: str) -> str:
        home = self.home(device)
        ota = {
            "broker": self.broker,
            "groups": list(self.groups),
            "topic_prefix": self.topic_prefix,
            "protocol": self.protocol,
            "ca_file": self.ca_file,
            "cert_file": str(home / "ota" / "tls.pem"),
            "key_file": str(home / "ota" / "tls.key"),
            "chunk_timeout": self.chunk_timeout,
            "window": self.window,
            "keepalive": self.keepalive,
        }
        lines = [f"{k} = {json.dumps(v)}" for k, v in ota.items()]
        return (
            f'[device]\nid = "{device}"\n[agent]\nchannels = ["mqtt"]\n'
            f'socket = "{home}/agent.sock"\n[ota]\n' + "\n".join(lines) + "\n"
        )


def provision_fleet(
    root: Path,
    count: int,
    *,
    ring: Keyring,
    ca: FleetCA,
    prefix: str = "sim",
    start: int = 0,
) -> list[str]:
    """Provision ``count`` device homes under ``root/devices`` (ids ``<prefix>-0000``...),
    each with its TLS certificate from ``ca``, and register their public keys in the
    workstation's keyring (so bundles are wrapped for them). Homes that exist are kept."""
    ids = [check_level(f"{prefix}-{i:04d}", "device id") for i in range(start, start + count)]
    known = {d.id for d in ring.devices()}
    for dev in ids:
        home = Path(root) / "devices" / dev
        if not (home / "device.json").exists():
            info = DeviceHome(home).init(
                root_public_keys=[ring.root_pub_path.read_bytes()], device_id=dev
            )
        else:
            info = DeviceHome(home).info()
        tls = home / "ota"
        if not (tls / "tls.pem").exists():
            tls.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = ca.issue_device(make_csr(dev, tls / "tls.key"), expected_id=dev)
            (tls / "tls.pem").write_bytes(pem)
        if dev not in known:
            key = load_public_key(info["public_key"].encode(), dev)
            ring.add_device(dev, key, target=None, key_store="software")
    return ids


class SharedPreflight(_preflight.Preflight):
    """The real pre-flight child, run once per distinct request in this process: the
    verdict (or the refusal) for identical graph bytes, weight shapes, limits and runtime
    settings is reused. For the simulator's ``preflight="once"`` only."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._verdicts: dict[str, BaseException | None] = {}
        self._running: dict[str, threading.Lock] = {}
        self.children = 0
        self.reused = 0

    def check(self, **kwargs: Any) -> None:
        key = hashlib.sha256(kwargs["graph"]).hexdigest() + repr(
            (
                kwargs["model_format"],
                [(e.name, e.dtype, tuple(e.shape)) for e in kwargs["weights"]],
                kwargs["limits"],
                kwargs["runtime"],
            )
        )
        with self._lock:
            gate = self._running.setdefault(key, threading.Lock())
        with gate:
            if key in self._verdicts:
                self.reused += 1
                err = self._verdicts[key]
                if err is not None:
                    raise err
                return
            self.children += 1
            try:
                super().check(**kwargs)
            except _preflight.ModelRejectedError as e:
                self._verdicts[key] = e
                raise
            self._verdicts[key] = None


class SimDevice:
    """One simulated device in this process: a real Agent and MqttChannel on its home."""

    def __init__(
        self,
        spec: FleetSpec,
        device: str,
        faults: Faults | None = None,
        *,
        loop: NetLoop | None = None,
        pool: StepPool | None = None,
    ) -> None:
        self.spec = spec
        self.loop = loop
        self.pool = pool
        self.id = device
        self.home = spec.home(device)
        self.config: Config = load_config(text=spec.config_text(device))
        self.faults = faults
        self.agent: Agent | None = None
        self.channel: MqttChannel | None = None
        self.killed = threading.Event()
        self.lives = 0

    def start(self) -> SimDevice:
        self.killed.clear()
        self.lives += 1
        agent = Agent(DeviceHome(self.home), self.config)
        agent.load_all()
        if not self.spec.keep_serving:
            agent.listeners.append(self._unserve)
        channel = MqttChannel(
            self.config, faults=self.faults, kill=self._kill, loop=self.loop, pool=self.pool
        )
        channel.report_interval = self.spec.report_interval
        self.agent, self.channel = agent, channel
        channel.start(agent)
        self.faults = None  # a fault fires in the first life only
        return self

    def _unserve(self, event: str, model: str, details: Mapping[str, Any]) -> None:
        if event == "installed" and self.agent is not None:
            sm = self.agent.serving.pop(model, None)
            if sm is not None:
                sm.close()

    def _kill(self, why: str) -> None:
        log.warning("%s: %s (abandoning the device)", self.id, why)
        self.killed.set()
        if self.channel is not None:
            self.channel._stopping.set()
            if self.channel.conn is not None:
                self.channel.conn.abandon()
        raise DeviceKilled(why)

    @property
    def connected(self) -> bool:
        c = self.channel
        return bool(c and c.conn and c.conn.connected.is_set() and c.conn.subscribed.is_set())

    def wait_connected(self, timeout: float) -> bool:
        c = self.channel
        return bool(c and c.conn and c.conn.wait_connected(timeout))

    def abandon(self) -> None:
        """The device dies: what a kill leaves (open files closed, memory freed)."""
        ch, agent = self.channel, self.agent
        if ch is not None:
            ch._stopping.set()
            if ch.conn is not None:
                ch.conn.abandon()
            ch.wait_idle(timeout=10)
            if ch.updater is not None and ch.updater.download is not None:
                with contextlib.suppress(OSError):
                    os.close(ch.updater.download.fd)
                ch.updater.download = None
        if agent is not None:
            agent.close()
        self.channel = self.agent = None

    def restart(self) -> SimDevice:
        self.abandon()
        return self.start()

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.stop()
        if self.agent is not None:
            self.agent.close()
        self.channel = self.agent = None

    def model_status(self, model: str) -> dict[str, Any]:
        if self.channel is None or self.channel.updater is None:
            return {}
        st = self.channel.updater.status()
        return dict(st["models"].get(model, {}))


def _quiet_kills(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is not None and issubclass(args.exc_type, DeviceKilled):
        return
    _default_hook(args)


_default_hook = threading.excepthook


class SimFleet:
    """A fleet of simulated devices: in this process (``processes=0``) or split over
    worker processes."""

    def __init__(self, spec: FleetSpec, *, processes: int = 0) -> None:
        self.spec = spec
        self.processes = processes
        self.devices: dict[str, SimDevice] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self.offline: set[str] = set()
        self.loop: NetLoop | None = None
        self.pool: StepPool | None = None
        self._saved_preflight: _preflight.Preflight | None = None

    def start(self, *, wait: float = 120.0, offline: Sequence[str] = ()) -> SimFleet:
        """Start every device (those in ``offline`` stay off until :meth:`bring_online`)
        and wait until they are connected and subscribed."""
        self.offline = set(offline)
        if self.processes:
            self._start_processes(wait)
            return self
        threading.excepthook = _quiet_kills
        if self.spec.preflight == "once":
            self._saved_preflight = _preflight._DEFAULT
            _preflight._DEFAULT = SharedPreflight()  # see FleetSpec.preflight
        elif self.spec.preflight != "each":
            raise ValueError(f"FleetSpec.preflight: 'each' or 'once', not {self.spec.preflight!r}")
        self.loop = NetLoop(name="sim-mqtt")
        self.pool = StepPool(max(1, self.spec.pool_threads), name="sim-ota")
        for dev in self.spec.devices:
            text = self.spec.faults.get(dev, "")
            sim = SimDevice(
                self.spec,
                dev,
                Faults.from_text(text) if text else None,
                loop=self.loop,
                pool=self.pool,
            )
            self.devices[dev] = sim
            if dev not in self.offline:
                sim.start()
        deadline = time.monotonic() + wait
        for dev, sim in self.devices.items():
            if dev not in self.offline and not sim.wait_connected(deadline - time.monotonic()):
                raise TimeoutError(f"simulated device {dev} did not connect")
        self._watch = threading.Thread(target=self._supervise, daemon=True, name="sim-watch")
        self._watch.start()
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for sim in list(self.devices.values()):
                if sim.killed.is_set() and sim.id not in self.offline:
                    sim.killed.clear()
                    time.sleep(self.spec.restart_delay)
                    log.warning("%s: starting again from its home", sim.id)
                    try:
                        sim.restart()
                    except Exception:
                        log.exception("%s could not start again", sim.id)

    def bring_online(self, device: str) -> SimDevice:
        self.offline.discard(device)
        sim = self.devices[device]
        if sim.channel is None:
            sim.start()
        return sim

    def take_offline(self, device: str) -> None:
        """The device loses power: abandoned as by a kill, and not started again."""
        self.offline.add(device)
        self.devices[device].abandon()

    def kill(self, device: str) -> None:
        """Kill one device now (it is started again from its home)."""
        sim = self.devices[device]
        sim.abandon()
        sim.killed.set()

    def _start_processes(self, wait: float) -> None:
        spec_path = Path(self.spec.root) / "fleet.json"
        spec_path.write_text(self.spec.to_json())
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for part in range(self.processes):
            self._procs.append(
                subprocess.Popen(  # noqa: S603 - our own module, fixed argv
                    [
                        sys.executable,
                        "-m",
                        "edgeseal.ota.simulate",
                        "--spec",
                        str(spec_path),
                        "--part",
                        str(part),
                        "--parts",
                        str(self.processes),
                    ],
                    stdout=subprocess.PIPE,
                    env=env,
                )
            )
        deadline = time.monotonic() + wait
        for p in self._procs:
            assert p.stdout is not None
            line = b""
            while time.monotonic() < deadline and not line.startswith(b"ready"):
                line = p.stdout.readline()
                if not line and p.poll() is not None:
                    raise RuntimeError(f"a simulator process exited with {p.returncode}")
            if not line.startswith(b"ready"):
                raise TimeoutError("simulator processes did not get their devices online")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs] or [os.getpid()]

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=5)
        for p in self._procs:
            p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self._procs.clear()
        for sim in self.devices.values():
            sim.stop()
        if self.pool is not None:
            self.pool.stop()
        if self.loop is not None:
            self.loop.stop()
        self.pool = self.loop = None
        if self._saved_preflight is not None:
            _preflight._DEFAULT = self._saved_preflight
            self._saved_preflight = None
        threading.excepthook = _default_hook

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def states(self, model: str) -> dict[str, str]:
        """In-process only: each device's update state for ``model``."""
        return {d: s.model_status(model).get("state", "idle") for d, s in self.devices.items()}


def _part(devices: Sequence[str], part: int, parts: int) -> list[str]:
    return [d for i, d in enumerate(devices) if i % parts == part]


@contextlib.contextmanager
def _serving(spec: FleetSpec) -> Iterator[SimFleet]:
    fleet = SimFleet(spec)
    try:
        yield fleet.start(wait=600)
    finally:
        fleet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """A worker process: run part ``--part`` of ``--parts`` of the fleet in ``--spec``
    until SIGTERM; prints ``ready`` once its devices are online."""
    ap = argparse.ArgumentParser(prog="python -m edgeseal.ota.simulate")
    ap.add_argument("--spec", required=True, type=Path)
    ap.add_argument("--part", type=int, default=0)
    ap.add_argument("--parts", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    spec = FleetSpec.from_json(args.spec.read_text())
    mine = FleetSpec(
        **{**asdict(spec), "devices": tuple(_part(spec.devices, args.part, args.parts))}
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with _serving(mine):
        sys.stdout.write(f"ready {len(mine.devices)}\n")
        sys.stdout.flush()
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
