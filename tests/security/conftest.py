"""The attack suite's fixtures: a provisioned device with its agent, bundles made to order
(packed, re-signed, spliced), and a snapshot of everything an attack must leave alone.

Every negative test takes a :class:`Snapshot` before the attack and asserts after it that
the device is exactly as it was: every file under the device home (slots, journal,
version floors, trusted time, followed rotations, known revocations) byte for byte, the
floors and journals as read back, and the serving model's identity and its answer to the
same input.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import Limits, load_config
from edgeseal.core.encoding import canonical_json
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import generate_private_key, load_public_key
from edgeseal.core.layout import HEADER_LEN, Header, parse_header
from edgeseal.core.writer import signed_message
from edgeseal.packager.pack import pack_model
from edgeseal.packager.samples import make_onnx_classifier
from helpers import NOW

MODEL = "clf"
DEVICE = "dev-home"


def probe_input() -> np.ndarray:
    """Rows inside the sample classifier's profile (its golden inputs are standard normal)."""
    return (np.random.default_rng(7).standard_normal((4, 8)) * 0.5).astype(np.float32)


# --- bundles made to order -------------------------------------------------------------


@dataclass
class Parts:
    """A bundle cut at its regions; manifest and trust parsed."""

    header: Header
    manifest: dict[str, Any]
    trust: dict[str, Any]
    signature: bytes
    payload: bytes

    @classmethod
    def of(cls, data: bytes) -> Parts:
        h = parse_header(data[:HEADER_LEN], file_len=len(data), limits=Limits())
        return cls(
            h,
            json.loads(data[h.manifest_offset : h.trust_offset]),
            json.loads(data[h.trust_offset : h.signature_offset]),
            data[h.signature_offset : h.payload_offset],
            data[h.payload_offset :],
        )


def resign(
    data: bytes,
    signer: Any,
    certificate: dict[str, Any] | None = None,
    *,
    manifest: Callable[[dict[str, Any]], None] | None = None,
    trust: Callable[[dict[str, Any]], None] | None = None,
    payload: bytes | None = None,
) -> bytes:
    """What an attacker holding ``signer``'s key can make of a bundle: edit the manifest,
    the trust block or the payload, then sign it all again (with its certificate)."""
    parts = Parts.of(data)
    if certificate is not None:
        parts.trust["signer"] = certificate
        parts.manifest["signer"] = signer.key_id
    if manifest:
        manifest(parts.manifest)
    if trust:
        trust(parts.trust)
    body = parts.payload if payload is None else payload
    m, t = canonical_json(parts.manifest), canonical_json(parts.trust)
    header = Header(1, len(m), len(t), 64, len(body)).to_bytes()
    return header + m + t + signer.sign(signed_message(header, m, t)) + body


# --- the device --------------------------------------------------------------------------


@dataclass
class Snapshot:
    files: dict[str, bytes]
    floors: dict[str, int]
    journals: dict[str, dict[str, Any]]
    served: dict[str, Any]


class Device:
    """A provisioned device home, its agent, and the fleet that packs for it."""

    def __init__(self, fleet: Any, home: DeviceHome, config_text: str = "") -> None:
        self.fleet = fleet
        self.home = home
        self.config_text = config_text
        self.agent = Agent(home, load_config(text=config_text))
        self._models: dict[int, Path] = {}

    # bundles
    def model_file(self, seed: int) -> Path:
        if seed not in self._models:
            p = self.fleet.tmp / f"clf-{seed}.onnx"
            p.write_bytes(make_onnx_classifier(seed=seed))
            self._models[seed] = p
        return self._models[seed]

    def bundle(self, version: int, *, seed: int = 1, name: str = MODEL, **kw: Any) -> Path:
        kw.setdefault("to", (DEVICE,))
        out, _ = self.fleet.pack(self.model_file(seed), name=name, version=version, **kw)
        return Path(out)

    def raw_bundle(
        self,
        version: int,
        *,
        seed: int = 1,
        signer: str = "release",
        revocations: dict[str, Any] | None = None,
        rotations: list[dict[str, Any]] | None = None,
        now: datetime = NOW,
        **kw: Any,
    ) -> Path:
        """Packed without the keyring's current revocations and rotations (what a stolen
        signer key produces when its owner has already revoked it)."""
        sgn, cert = self.fleet.ring.load_signer(signer)
        out = (
            self.fleet.tmp / f"raw-{signer}-{version}-{len(list(self.fleet.tmp.glob('*.esb')))}.esb"
        )
        pack_model(
            self.model_file(seed),
            out,
            name=kw.pop("name", MODEL),
            version=version,
            signer=sgn,
            certificate=cert,
            devices=[self.fleet.ring.device(DEVICE)],
            now=now,
            revocations=revocations,
            root_rotations=rotations or [],
            **kw,
        )
        return out

    def write(self, data: bytes, name: str) -> Path:
        p = self.fleet.tmp / name
        p.write_bytes(data)
        return p

    # state
    def infer(self, name: str = MODEL) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        r = self.agent.infer(name, {"input": probe_input()})
        return dict(r.model), {k: np.array(v) for k, v in r.outputs.items()}

    def snapshot(self) -> Snapshot:
        files = {
            str(p.relative_to(self.home.path)): p.read_bytes()
            for p in sorted(self.home.path.rglob("*"))
            if p.is_file()
        }
        models = self.agent.store.models()
        return Snapshot(
            files=files,
            floors={m: self.agent.store.floors.get(m) for m in [*models, MODEL]},
            journals={m: self.agent.store.journal(m).to_obj() for m in models},
            served={m: self.infer(m) for m in sorted(self.agent.serving)},
        )

    def assert_unchanged(self, before: Snapshot) -> None:
        after = self.snapshot()
        changed = sorted(
            k
            for k in set(before.files) | set(after.files)
            if before.files.get(k) != after.files.get(k)
        )
        assert not changed, f"files changed by a refused attack: {changed}"
        assert after.floors == before.floors
        assert after.journals == before.journals
        assert set(after.served) == set(before.served)
        for name, (identity, outputs) in before.served.items():
            now_identity, now_outputs = after.served[name]
            assert now_identity == identity
            assert set(now_outputs) == set(outputs)
            for k, v in outputs.items():
                np.testing.assert_array_equal(now_outputs[k], v)

    def assert_serving_unchanged(self, before: Snapshot) -> None:
        """For attacks that need a stolen signer key and fail only when the staged copy is
        opened (decryption, golden vectors): staging consumes the free slot (A/B), so the
        fallback is given up and marked failed; everything else is as it was."""
        after = self.snapshot()
        kept = [k for k in before.files if not k.startswith("models/")]
        for m, j in before.journals.items():
            kept.append(f"models/{m}/slot-{j['active']}.esb")
            now = after.journals[m]
            assert (now["active"], now["staged"]) == (j["active"], None)
            assert now["slots"][j["active"]] == j["slots"][j["active"]]
            assert now["fallback"] is None
            assert all(
                v["state"].startswith("failed") for k, v in now["slots"].items() if k != j["active"]
            )
        changed = [k for k in kept if before.files.get(k) != after.files.get(k)]
        assert not changed, f"files changed by a refused attack: {changed}"
        assert after.floors == before.floors
        for name, (identity, outputs) in before.served.items():
            assert after.served[name][0] == identity
            for k, v in outputs.items():
                np.testing.assert_array_equal(after.served[name][1][k], v)

    def close(self) -> None:
        self.agent.close()


def _provision(fleet: Any, path: Path) -> Device:
    home = DeviceHome(path)
    info = home.init(root_public_keys=[fleet.ring.root_pub_path.read_bytes()])
    fleet.ring.add_device(
        DEVICE, load_public_key(info["public_key"].encode(), "device"), target=None
    )
    return Device(fleet, home)


def _serve_v2(device: Device) -> Device:
    device.agent.install(device.bundle(1, seed=1))
    device.agent.install(device.bundle(2, seed=2))
    j = device.agent.store.journal(MODEL)
    assert (j.active, j.fallback, device.agent.store.floors.get(MODEL)) == ("b", "a", 1)
    return device


@pytest.fixture
def device(fleet: Any, tmp_path: Path) -> Any:
    """A provisioned device (registered as dev-home) whose agent serves nothing yet."""
    d = _provision(fleet, tmp_path / "device")
    yield d
    d.close()


@pytest.fixture
def fresh(device: Device) -> Device:
    """A device of its own serving clf v2 (slot b) with v1 as its fallback (slot a), floor
    1: for attacks that change the fleet's keys or the device's state on purpose."""
    return _serve_v2(device)


class ModuleFleet:
    """The part of the shared ``fleet`` fixture the attack suite needs, made once per
    module (packing and installing dominate the suite's time)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ring = Keyring(tmp / "keys")
        self.ring.init_root()
        self.ring.new_signer(
            "release", roles=["pack"], model_patterns=["*"], days=365, now=NOW - timedelta(days=1)
        )

    def pack(
        self, model: Path, *, name: str, version: int, signer: str = "release", **kw: Any
    ) -> tuple[Path, Any]:
        sgn, cert = self.ring.load_signer(signer)
        to = kw.pop("to")
        out = self.tmp / f"{name}-{version}-{len(list(self.tmp.glob('*.esb')))}.esb"
        result = pack_model(
            model,
            out,
            name=name,
            version=version,
            signer=sgn,
            certificate=cert,
            devices=[self.ring.device(d) for d in to],
            now=NOW,
            revocations=self.ring.revocations(),
            root_rotations=self.ring.rotations(),
            **kw,
        )
        return out, result


@dataclass
class _World:
    fleet: ModuleFleet
    device: Device
    baseline: Snapshot
    builds: int = 1


@pytest.fixture(scope="module")
def _world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    fleet = ModuleFleet(tmp_path_factory.mktemp("attack-fleet"))
    fleet.ring.add_device("dev-a", generate_private_key().public_key(), target=None)
    device = _serve_v2(_provision(fleet, tmp_path_factory.mktemp("device")))
    world = _World(fleet, device, device.snapshot())
    yield world
    world.device.close()


@pytest.fixture
def serving(_world: _World, tmp_path_factory: pytest.TempPathFactory) -> Device:
    """A device serving clf v2 (slot b) with v1 as its fallback (slot a); floor 1.

    Shared by the tests of a module whose attacks must change nothing: each test proves
    that, and should one fail to, the next test gets a newly provisioned device."""
    try:
        _world.device.assert_unchanged(_world.baseline)
    except AssertionError:
        _world.device.close()
        _world.device = _serve_v2(_provision(_world.fleet, tmp_path_factory.mktemp("device")))
        _world.baseline = _world.device.snapshot()
        _world.builds += 1
    return _world.device
