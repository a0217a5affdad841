"""The TUF/Uptane attack list applied to OTA, against a real broker and a real device:
each attack is refused (or its data dropped), reported, and nothing the device holds
changes: the serving model, the slots, the floor and the sequence book are as before."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from edgeseal.core.encoding import canonical_json, utcnow
from edgeseal.core.keys import generate_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.ota.messages import encode_chunk, make_message
from edgeseal.ota.server import describe_bundle, sign_offer
from edgeseal.ota.topics import Topics
from helpers import NOW
from ota_world import wait_for

pytestmark = pytest.mark.mqtt
TOPICS = Topics()


@pytest.fixture(scope="module")
def attack_bundles(ws):
    """Extra material: signers that must not be obeyed, a bundle with v2's version but
    other content, and a bundle sealed for another device."""
    start = NOW - timedelta(days=1)
    ring = ws.ring
    if "packer-only" not in ring.signer_names():
        ring.new_signer("packer-only", roles=["pack"], model_patterns=["*"], days=365, now=start)
        ring.new_signer(
            "deploy-det", roles=["deploy"], model_patterns=["det*"], days=365, now=start
        )
        ring.add_device(
            "dev-z", InMemoryKey(generate_private_key()).public_key, target=None,
            key_store="software",
        )  # fmt: skip
        ws.pack("v2-other", 2, "m1", to=("dev-a",))
        ws.pack("v3-for-z", 3, "m1", to=("dev-z",))
    return ws


def _snapshot(dev):
    home = dev.agent.home.path
    j = dev.agent.store.journal("clf")
    sm = dev.agent.serving.get("clf")
    seqs = (home / "ota" / "seqs.json").read_bytes()
    return (
        j.active,
        j.fallback,
        j.staged,
        {k: v.to_obj() for k, v in j.slots.items()},
        dev.agent.store.floors.get("clf"),
        sm.identity if sm else None,
        seqs,
    )


def _refusals(fleet_side):
    return len([e for e in fleet_side.events_of("dev-a") if e.get("event") == "refused"])


@pytest.fixture
def serving_v2(fleet_side, device, attack_bundles):
    dev = device()
    for key in ("v1", "v2"):
        fleet_side.offer(key)
        version = int(key[1])
        wait_for(
            lambda v=version: (
                _serving_version(dev) == v and fleet_side.state("dev-a") == "committed"
            ),
            what=f"{key} committed",
            detail=lambda: (fleet_side.status.get("dev-a"), fleet_side.events_of("dev-a")[-4:]),
        )
    return dev


def _serving_version(dev):
    sm = dev.agent.serving.get("clf")
    return sm.identity["version"] if sm else None


def _signed(ws, signer_name, *, model="clf", version=3, key="v3", now=None, **kw):
    signer, cert = ws.ring.load_signer(signer_name)
    b = describe_bundle(ws.bundles[key], 4096, ws.ring.anchor())
    return make_message(
        signer, cert, action="install", seq=int(utcnow().timestamp() * 1000) + 10**9,
        to=("device", "dev-a"), model=model, version=version, bundle_id=b.bundle_id,
        now=now or utcnow(), size=b.size, sha256=b.sha256, chunk_bytes=4096,
        chunks=b.chunks, **kw,
    )  # fmt: skip


def _huge(ws):
    """A signed offer announcing 3 GiB (the device's default limit is 2 GiB)."""
    signer, cert = ws.ring.load_signer("deployer")
    size, chunk = 3 * 2**30, 8 * 2**20
    return make_message(
        signer, cert, action="install", seq=int(utcnow().timestamp() * 1000) + 10**9,
        to=("device", "dev-a"), model="clf", version=3, bundle_id="ee" * 16, now=utcnow(),
        size=size, sha256="00" * 32, chunk_bytes=chunk, chunks=[b"\0" * 32] * (size // chunk),
    )  # fmt: skip


def _unsigned(ws):
    wire = json.loads(_signed(ws, "deployer"))
    wire["envelope"]["signatures"] = []
    return canonical_json(wire)


def _self_certified(ws):
    """An offer signed by a key whose certificate the attacker signed himself."""
    from edgeseal.core.keys import SoftwareSigner
    from edgeseal.core.trust import make_signer_certificate

    fake_root = SoftwareSigner(generate_private_key())
    key = generate_private_key()
    cert = make_signer_certificate(
        fake_root, key.public_key(), name="mallory", roles=["deploy"], model_patterns=["*"],
        not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=365),
    )  # fmt: skip
    b = describe_bundle(ws.bundles["v3"], 4096, ws.ring.anchor())
    return sign_offer(
        SoftwareSigner(key), cert, b, seq=10**15, to=("device", "dev-a"), now=utcnow()
    )


ATTACKS = {
    # arbitrary software
    "unsigned offer": _unsigned,
    "signer certified by another root": _self_certified,
    "signer without the deploy role": lambda ws: _signed(ws, "packer-only"),
    "signer outside its model patterns": lambda ws: _signed(ws, "deploy-det"),
    # rollback
    "older version": lambda ws: _signed(ws, "deployer", version=1, key="v1"),
    "equal version, other content": lambda ws: _signed(ws, "deployer", version=2, key="v2-other"),
    # indefinite freeze
    "expired offer": lambda ws: _signed(ws, "deployer", now=utcnow() - timedelta(days=8)),
    "offer from the future": lambda ws: _signed(ws, "deployer", now=utcnow() + timedelta(days=2)),
    # fast-forward
    "absurd version number": lambda ws: _signed(ws, "deployer", version=2**63),
    # endless data
    "bundle larger than the device allows": _huge,
    # malformed
    "garbage bytes": lambda ws: b"\x00\xff" * 100,
    "not an object": lambda ws: b"[1, 2, 3]",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_hostile_offer_is_refused_reported_and_changes_nothing(
    attack, serving_v2, fleet_side, attack_bundles
):
    dev = serving_v2
    before, refusals = _snapshot(dev), _refusals(fleet_side)
    fleet_side.send(ATTACKS[attack](attack_bundles), ("device", "dev-a"))
    wait_for(lambda: _refusals(fleet_side) > refusals, what=f"refusal of {attack}")
    assert _snapshot(dev) == before
    assert dev.agent.infer("clf", {"input": attack_bundles.x}).model["version"] == 2


def test_a_replayed_then_reordered_sequence_is_refused(serving_v2, fleet_side, attack_bundles):
    dev = serving_v2
    wire = fleet_side.offer("v3", seq=10**16)  # the newest sequence number is spent here
    wait_for(lambda: dev.agent.serving["clf"].identity["version"] == 3, what="v3")
    before, refusals = _snapshot(dev), _refusals(fleet_side)
    older = fleet_side.order("fall-back", "v3")  # its sequence number is now lower
    wait_for(lambda: _refusals(fleet_side) > refusals, what="a refusal")
    fleet_side.send(wire, ("device", "dev-a"))  # a plain replay is a duplicate: silent
    assert _snapshot(dev) == before and older


def test_chunks_from_another_bundle_or_of_the_wrong_length_are_dropped(
    serving_v2, fleet_side, attack_bundles
):
    """Mix-and-match and endless data on the data plane: the device takes only chunks that
    match the signed offer's digests, however many others arrive."""
    dev = serving_v2
    data = TOPICS.device("dev-a", "data")
    bad = attack_bundles.bundles["v3-bad"].read_bytes()
    v3 = describe_bundle(attack_bundles.bundles["v3"], 4096, attack_bundles.ring.anchor())
    # Flood the data topic first: v3-bad's bytes under v3's id, and over-long chunks.
    for i in range(len(v3.chunks)):
        fleet_side.observer.publish(
            data, encode_chunk(v3.bundle_id, i, bad[i * 4096 : (i + 1) * 4096])
        )
        fleet_side.observer.publish(data, encode_chunk(v3.bundle_id, i, b"\0" * 70_000))
    fleet_side.offer("v3")
    wait_for(lambda: dev.agent.serving["clf"].identity["version"] == 3, what="v3 committed")
    assert dev.channel.updater.counters.chunks_dropped >= 1
    assert dev.agent.infer("clf", {"input": attack_bundles.x}).model["version"] == 3


def test_a_bundle_sealed_for_another_device_is_not_committed(
    serving_v2, fleet_side, attack_bundles
):
    dev = serving_v2
    before = _snapshot(dev)
    fleet_side.offer("v3-for-z")
    wait_for(
        lambda: fleet_side.state("dev-a") == "failed",
        what="the recipient check before staging",
        detail=lambda: fleet_side.status.get("dev-a"),
    )
    assert "NotARecipient" in fleet_side.model_status("dev-a")["reason"]
    after = _snapshot(dev)
    assert after[:3] == before[:3] and after[4:6] == before[4:6]  # slots, floor, serving
    assert dev.agent.infer("clf", {"input": attack_bundles.x}).model["version"] == 2


def test_a_revoked_deploy_signer_is_refused_once_the_revocation_is_known(
    serving_v2, fleet_side, attack_bundles
):
    ws = attack_bundles
    ws.ring.new_signer(
        "deploy-leaked", roles=["deploy"], model_patterns=["*"], days=365,
        now=NOW - timedelta(days=1),
    )  # fmt: skip
    ws.ring.revoke("deploy-leaked", reason="laptop stolen", now=NOW)
    dev = serving_v2
    before, refusals = _snapshot(dev), _refusals(fleet_side)
    # The attacker leaves the revocation list out; the fleet's next message carries it.
    fleet_side.send(
        fleet_side.order("finalize", "v1", revocations=ws.ring.revocations()),
        ("device", "dev-a"),
    )
    fleet_side.send(_signed(ws, "deploy-leaked"), ("device", "dev-a"))
    wait_for(lambda: _refusals(fleet_side) > refusals, what="the refusal")
    assert "revoked" in fleet_side.status["dev-a"]["last_refusal"]
    after = _snapshot(dev)
    assert after[:6] == before[:6]


def test_an_oversized_message_never_reaches_the_device_and_it_keeps_working(
    serving_v2, fleet_side, attack_bundles, broker, ota_pki
):
    """The broker bounds every message (max_packet_size) and drops the connection that
    sent a larger one; the device never sees it and its own bound (4 MiB) is the second
    line. Sent from a connection of its own, as an attacker holding the controller's
    credentials would."""
    from edgeseal.ota.mqtt import MqttConnection

    dev = serving_v2
    ctl = ota_pki["edgeseal-controller"]
    attacker = MqttConnection(
        broker.url, client_id="big-sender", ca_file=str(ota_pki.ca_file),
        cert_file=str(ctl.cert), key_file=str(ctl.key), clean=True, on_message=lambda t, p: None,
    )  # fmt: skip
    attacker.start()
    assert attacker.wait_connected(10)
    attacker.publish(TOPICS.device("dev-a", "control"), b"{" + b" " * (2 * 1024 * 1024) + b"}")
    wait_for(lambda: not attacker.connected.is_set(), what="the broker dropping the sender")
    attacker.stop()
    assert dev.channel.updater.counters.messages_refused == 0  # it never arrived
    fleet_side.offer("v3")
    wait_for(lambda: _serving_version(dev) == 3, what="v3 committed")
