"""Issue 19, items 1-4: a device's trust state (root chain, revocations per root, trusted
time) only moves forward, and no sequence of genuine statements bricks a device.

Each test is a timeline that failed on the code before the trust-state rewrite (its
docstring says how) and holds now. Signers here are certified for ten years, so the
timelines do not depend on the date the suite runs.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from edgeseal.agent.service import Agent
from edgeseal.core.config import OtaConfig, load_config
from edgeseal.core.encoding import canonical_json, utcnow
from edgeseal.core.errors import SignatureError, TrustError
from edgeseal.core.reader import BundleFile, VerifyPolicy
from edgeseal.core.trust import TrustAnchor
from edgeseal.ota.messages import OtaMessageError, chunk_digests, make_message, verify_message
from edgeseal.ota.updater import Updater
from helpers import NOW
from security.conftest import MODEL, _provision

YEARS = 3650


def _signer(ring, name, roles=("pack",)):
    ring.new_signer(name, roles=list(roles), model_patterns=["*"], days=YEARS, now=NOW)


def _restart(device):
    device.agent.close()
    device.agent = Agent(device.home, load_config(text=""))
    return device.agent.load_all()


def _offer(signer_and_cert, *, seq, now, rotations=(), revocations=None):
    signer, cert = signer_and_cert
    digests, size, sha = chunk_digests(b"x" * 5000, 2048)
    return make_message(
        signer,
        cert,
        action="install",
        seq=seq,
        to=("device", "dev-home"),
        model=MODEL,
        version=9,
        bundle_id="ab" * 16,
        now=now,
        revocations=revocations,
        rotations=rotations,
        size=size,
        sha256=sha,
        chunk_bytes=2048,
        chunks=digests,
    )


# --- item 1: revoke, then rotate the root ------------------------------------------------


def test_revoke_then_rotate_the_root_keeps_devices_installing_and_serving(fresh):
    """Timeline, the incident response of docs/threat-model.md in order: revoke 'rogue';
    ship v3 carrying the list; rotate the root; certify 'release2'; pack v4. Before: the
    device checked its stored list against the rotated root, so v4, every later install
    and every start failed with SignatureError; ``keys revoke`` failed the same way and
    ``pack`` kept shipping the old root's list. Now the keyring issues the list again
    under the new root, the device checks each stored list against the root that signed
    it, and the rogue stays revoked."""
    ring = fresh.fleet.ring
    _signer(ring, "rogue")
    rogue_id = ring.certificate_payload("rogue")["keyid"]
    ring.revoke("rogue", reason="key stolen", now=NOW)
    fresh.agent.install(fresh.bundle(3, seed=3))
    ring.rotate_root()
    _signer(ring, "release2")
    assert fresh.agent.install(fresh.bundle(4, seed=4, signer="release2"))["version"] == 4
    # The workstation revokes under the new root (it raised SignatureError before).
    _signer(ring, "rogue2")
    assert ring.revoke("rogue2", reason="lost laptop", now=NOW) == 3
    assert fresh.agent.install(fresh.bundle(5, seed=5, signer="release2"))["version"] == 5
    assert _restart(fresh) == {MODEL: "serving v5"}
    revoked = fresh.home.trust_state().revoked()
    assert rogue_id in revoked and ring.certificate_payload("rogue2")["keyid"] in revoked
    # A thief of rogue2 packing without the list is refused: the device knows it.
    stolen = fresh.raw_bundle(6, seed=6, signer="rogue2", rotations=ring.rotations())
    before = fresh.snapshot()
    with pytest.raises(TrustError, match="revoked: lost laptop"):
        fresh.agent.install(stolen)
    fresh.assert_unchanged(before)


def test_a_home_kept_by_an_older_agent_reads_its_old_roots_list_after_a_rotation(fresh):
    """An older agent kept one list (a JSON object) in trust/revocations.json, signed by
    the root before a rotation: it is read as that root's list, not as the current
    root's (before: SignatureError on every install and start)."""
    ring = fresh.fleet.ring
    _signer(ring, "rogue")
    ring.revoke("rogue", reason="key stolen", now=NOW)
    fresh.agent.install(fresh.bundle(3, seed=3))
    path = fresh.home.path / "trust" / "revocations.json"
    path.write_bytes(canonical_json(ring.revocations()))  # the old format: one object
    ring.rotate_root()
    _signer(ring, "release2")
    assert fresh.agent.install(fresh.bundle(4, seed=4, signer="release2"))["version"] == 4
    assert ring.certificate_payload("rogue")["keyid"] in fresh.home.trust_state().revoked()


def test_a_keyring_rotated_by_an_older_edgeseal_still_ships_installable_bundles(fresh):
    """An older ``keys rotate-root`` left the list signed by the old root and ``pack``
    kept shipping it: every bundle after the rotation was refused (SignatureError) and
    ``keys revoke`` failed. Now a device does not take a former root's list (it refuses
    nothing more than a bundle with no list), and ``keys revoke`` reads the former
    root's list and issues the next one under the new root."""
    ring = fresh.fleet.ring
    _signer(ring, "rogue")
    ring.revoke("rogue", reason="key stolen", now=NOW)
    fresh.agent.install(fresh.bundle(3, seed=3))
    old_list = ring.revocations()
    ring.rotate_root()
    (ring.path / "revocations.json").write_bytes(canonical_json(old_list))
    _signer(ring, "release2")
    assert fresh.agent.install(fresh.bundle(4, seed=4, signer="release2"))["version"] == 4
    _signer(ring, "rogue2")
    assert ring.revoke("rogue2", reason="lost laptop", now=NOW) == 2
    assert fresh.agent.install(fresh.bundle(5, seed=5, signer="release2"))["version"] == 5
    revoked = fresh.home.trust_state().revoked()
    assert {ring.certificate_payload(n)["keyid"] for n in ("rogue", "rogue2")} <= set(revoked)


# --- item 2: a pack signer carrying part of the chain ------------------------------------


def test_a_pack_signer_carrying_part_of_the_chain_cannot_corrupt_trust_state(fresh):
    """Timeline: the device follows the root to v2. The root rotates to v3; a pack signer
    of v3 seals a bundle whose trust block carries only [r3] (rotation statements are
    public). Before: the device took it and replaced trust/rotations.json with [r3], so
    its own chain no longer verified: the honest v4 bundle was refused ("skips version
    2") and after a restart nothing served. Now the device merges: its chain is [r2, r3]
    and the honest v4 bundle installs, also after a restart."""
    ring = fresh.fleet.ring
    ring.rotate_root()
    _signer(ring, "release2")
    fresh.agent.install(fresh.bundle(3, seed=3, signer="release2"))
    assert fresh.home.anchor().version == 2
    ring.rotate_root()
    _signer(ring, "release3")
    r3 = ring.rotations()[-1]
    partial = fresh.raw_bundle(
        4, seed=4, signer="release3", rotations=[r3], revocations=ring.revocations()
    )
    assert fresh.agent.install(partial)["version"] == 4  # a genuine signer: taken
    assert fresh.home.anchor().version == 3
    assert _restart(fresh) == {MODEL: "serving v4"}
    ring.rotate_root()
    _signer(ring, "release4")
    assert fresh.agent.install(fresh.bundle(5, seed=5, signer="release4"))["version"] == 5
    assert _restart(fresh) == {MODEL: "serving v5"}
    assert fresh.home.anchor().version == 4


# --- item 3: rotations reach re-provisioned devices and OTA-only fleets ------------------


def test_a_device_provisioned_with_a_rotated_root_follows_the_chain(fleet, tmp_path):
    """The keyring is at root v3; a device is provisioned with that root.pub (pinned as
    version 1). Before: every bundle carrying the keyring's chain [r2, r3] was refused
    ("does not chain from the trusted root"), and so was ``verify --root root.pub``.
    Now the pinned root finds its place in the chain (the statement that introduced it,
    which it signed) and follows it from there; the first root stays refused."""
    ring = fleet.ring
    ring.rotate_root()
    ring.rotate_root()
    _signer(ring, "release3")
    device = _provision(fleet, tmp_path / "device")
    try:
        bundle = device.bundle(1, seed=1, signer="release3")
        assert device.agent.install(bundle)["version"] == 1
        assert device.home.anchor().version == 3
        assert _restart(device) == {MODEL: "serving v1"}
        # What `edgeseal verify --root root.pub` does.
        pinned = TrustAnchor.from_pem_files([ring.root_pub_path.read_bytes()])
        with BundleFile.open(bundle) as bf:
            assert bf.verify(VerifyPolicy(anchor=pinned, now=NOW)).anchor.version == 3
        old_root_signed = device.raw_bundle(2, seed=2, signer="release", rotations=[])
        before = device.snapshot()
        with pytest.raises(SignatureError):
            device.agent.install(old_root_signed)
        device.assert_unchanged(before)
    finally:
        device.close()


def test_an_offer_carries_the_rotation_a_device_has_not_followed_yet(device):
    """The root rotates; a deploy signer of the new root sends an offer to a device that
    has only ever seen the first root (an OTA-only fleet: no bundle carried the
    rotation yet). Before: OTA messages carried no rotation statements and the offer was
    refused. Now it carries the keyring's chain; the device follows it and keeps it."""
    ring = device.fleet.ring
    ring.rotate_root()
    _signer(ring, "deploy2", roles=("deploy",))
    deployer = ring.load_signer("deploy2")
    home = device.home
    anchor = home.anchor()
    assert anchor.version == 1
    bare = _offer(deployer, seq=1, now=utcnow())
    with pytest.raises(OtaMessageError, match="not signed by a trusted key"):
        verify_message(bare, anchor=anchor, known_revocations=None, now=utcnow())
    wire = _offer(deployer, seq=2, now=utcnow(), rotations=ring.rotations())
    msg = verify_message(wire, anchor=anchor, known_revocations=None, now=utcnow())
    assert msg.trust is not None and msg.trust.version == 2
    home.remember(msg.trust)  # what the updater does with every verified message
    assert home.anchor().version == 2


# --- item 4: offers ratcheting trusted time -----------------------------------------------


def test_offers_cannot_ratchet_trusted_time_forward(device):
    """A deploy signer sends 300 offers, each issued as far ahead of the device's trusted
    time as it still takes (the skew, 5 minutes). Before: each one moved trusted time to
    its issue time, 300 of them 25 hours ahead (2,200: a week), after which genuine
    offers and freshly packed bundles were refused. Now trusted time never goes past the
    device's own clock plus the skew."""
    ring = device.fleet.ring
    _signer(ring, "deployer", roles=("deploy",))
    deployer = ring.load_signer("deployer")
    home = device.home
    skew = timedelta(minutes=5)
    for seq in range(1, 301):
        now = home.trusted_now()
        wire = _offer(deployer, seq=seq, now=now + skew - timedelta(seconds=1))
        msg = verify_message(wire, anchor=home.anchor(), known_revocations=None, now=now)
        home.advance_trusted_time(msg.issued)  # what the updater does with a taken offer
    assert home.trusted_now() <= utcnow() + skew
    # A genuine offer issued now is still taken.
    verify_message(
        _offer(deployer, seq=301, now=utcnow()),
        anchor=home.anchor(),
        known_revocations=None,
        now=home.trusted_now(),
    )


class _Link:
    """The updater's side of the broker, recording what it publishes (no broker)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def fetch(self, bundle_id, indices) -> None:
        pass

    def publish_status(self, status) -> None:
        pass

    def publish_event(self, event) -> None:
        self.events.append(dict(event))


def test_the_updater_follows_a_rotation_from_an_offer_and_offers_do_not_ratchet_time(fresh):
    """The same two items through the device's updater (``handle_control``), as the MQTT
    channel calls it: an offer of a deploy signer of the rotated root, carrying the
    keyring's chain, is taken and the device keeps the rotation; 100 further offers,
    each issued at the edge of the skew, leave trusted time no further than the device's
    clock plus the skew."""
    ring = fresh.fleet.ring
    ring.rotate_root()
    _signer(ring, "deploy2", roles=("deploy",))
    updater = Updater(fresh.agent, OtaConfig(), "dev-home", _Link())
    try:
        _offers_through(updater, fresh, ring)
    finally:
        updater.close()


def _offers_through(updater, fresh, ring):
    deployer = ring.load_signer("deploy2")
    skew = timedelta(seconds=fresh.agent.config.device.clock_skew)
    wire = _offer(deployer, seq=1, now=utcnow(), rotations=ring.rotations())
    assert updater.handle_control(wire).verdict != "refuse", updater.last_refusal
    assert fresh.home.anchor().version == 2
    for seq in range(2, 102):
        issued = fresh.home.trusted_now() + skew - timedelta(seconds=1)
        decision = updater.handle_control(
            _offer(deployer, seq=seq, now=issued, rotations=ring.rotations())
        )
        assert decision.verdict != "refuse", updater.last_refusal
    assert fresh.home.trusted_now() <= utcnow() + skew
