"""The TUF/Uptane attack list against bundles, through the agent's real install path.

Each attack is refused with its typed error *and* leaves the device as it was: the same
files under the device home byte for byte (slots, journal, floors, trusted time, trust
state), and the serving model answering the same input with the same output
(``Device.assert_unchanged``). The device under attack serves clf v2 with v1 as its
fallback (fixture ``serving``); the attacker's means are named in each docstring.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from edgeseal.agent.service import Agent
from edgeseal.agent.store import MAX_VERSION_STEP
from edgeseal.core.config import load_config
from edgeseal.core.errors import (
    DecryptError,
    DigestMismatchError,
    ExpiredError,
    MalformedBundleError,
    NotARecipientError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    TrustError,
)
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import SoftwareSigner, generate_private_key
from edgeseal.core.targets import get_target
from edgeseal.core.trust import make_rotation
from helpers import NOW
from security.conftest import MODEL, Parts, resign


def _refused(device, bundle, error, match=None):
    before = device.snapshot()
    with pytest.raises(error, match=match):
        device.agent.install(bundle)
    device.assert_unchanged(before)


def _refused_after_staging(device, bundle, error, match=None):
    """Attacks that need the signer's key and fail only when the staged copy is opened."""
    before = device.snapshot()
    with pytest.raises(error, match=match):
        device.agent.install(bundle)
    device.assert_serving_unchanged(before)


# --- arbitrary software ---------------------------------------------------------------


def test_unsigned_bundle_is_refused_and_nothing_changes(serving):
    """Network attacker: a real bundle whose signature is zeroed."""
    data = bytearray(serving.bundle(3).read_bytes())
    parts = Parts.of(bytes(data))
    data[parts.header.signature_offset : parts.header.payload_offset] = bytes(64)
    _refused(serving, serving.write(bytes(data), "unsigned.esb"), SignatureError, "signature")


def test_bundle_signed_under_another_root_is_refused_and_nothing_changes(serving, tmp_path):
    """An attacker with their own root and signer packs for the device's public key."""
    other = Keyring(tmp_path / "attacker")
    other.init_root()
    other.new_signer("evil", roles=["pack"], model_patterns=["*"], days=30, now=NOW)
    sgn, cert = other.load_signer("evil")
    forged = resign(serving.bundle(3).read_bytes(), sgn, cert)
    _refused(serving, serving.write(forged, "other-root.esb"), SignatureError, "trusted key")


def test_signer_outside_model_scope_is_refused_and_nothing_changes(serving):
    """A stolen key of a signer certified only for vision-* models signs a clf bundle."""
    serving.fleet.ring.new_signer(
        "vision", roles=["pack"], model_patterns=["vision-*"], days=30, now=NOW
    )
    sgn, cert = serving.fleet.ring.load_signer("vision")
    forged = resign(serving.bundle(3).read_bytes(), sgn, cert)
    _refused(serving, serving.write(forged, "scope.esb"), TrustError, "may not sign model 'clf'")


def test_signer_without_pack_role_is_refused_and_nothing_changes(serving):
    """A stolen deploy-only key (it may send offers, never make bundles) signs a bundle."""
    serving.fleet.ring.new_signer("ops", roles=["deploy"], model_patterns=["*"], days=30, now=NOW)
    sgn, cert = serving.fleet.ring.load_signer("ops")
    forged = resign(serving.bundle(3).read_bytes(), sgn, cert)
    _refused(serving, serving.write(forged, "deploy-only.esb"), TrustError, "lacks the 'pack'")


def test_manifest_edited_after_signing_is_refused_and_nothing_changes(serving):
    """Network attacker raises the version in the manifest without the signer's key."""
    data = serving.bundle(3).read_bytes()
    parts = Parts.of(data)
    at = data.index(b'"version":3', parts.header.manifest_offset)
    tampered = data[:at] + b'"version":9' + data[at + 11 :]
    _refused(serving, serving.write(tampered, "edited.esb"), SignatureError)


# --- rollback -------------------------------------------------------------------------


def test_older_version_than_serving_is_refused_and_nothing_changes(serving):
    """A validly signed v1 with new content, at the floor (1) but below the serving v2."""
    _refused(serving, serving.bundle(1, seed=3), RollbackError, "older than the serving v2")


def test_version_below_the_floor_is_refused_even_after_a_restart(fresh):
    """v3 lifts the floor to 2; the old, genuine v1 bundle replayed after the agent
    restarts is refused: the floor lives on disk, not in the process."""
    v1 = fresh.agent.store.slot_path(MODEL, "a").read_bytes()
    fresh.agent.install(fresh.bundle(3, seed=3))
    assert fresh.agent.store.floors.get(MODEL) == 2
    fresh.agent.close()
    fresh.agent = Agent(fresh.home, load_config(text=""))
    fresh.agent.load_all()
    _refused(fresh, fresh.write(v1, "replayed-v1.esb"), RollbackError, "below")


def test_equal_version_with_different_content_is_refused_and_nothing_changes(serving):
    """A second, different v2 (same version number, other weights) cannot replace v2."""
    _refused(serving, serving.bundle(2, seed=3), RollbackError, "already serving")


# --- indefinite freeze ------------------------------------------------------------------


def _device_clock(monkeypatch: pytest.MonkeyPatch, at: datetime) -> None:
    """The device's own clock reads ``at`` (the injected clock of edgeseal.agent.device)."""
    monkeypatch.setattr("edgeseal.agent.device.utcnow", lambda: at)


def test_expired_bundle_is_refused_and_nothing_changes(serving, monkeypatch):
    """A v3 that expired two days after NOW, replayed three weeks later."""
    stale = serving.bundle(3, validity=timedelta(days=2))
    _device_clock(monkeypatch, NOW + timedelta(days=21))
    _refused(serving, stale, ExpiredError, "expired")


def test_a_clock_set_back_cannot_revive_an_expired_bundle(fresh, monkeypatch):
    """The device saw signed time NOW+10d (a bundle it installed); its clock is then set
    back to 1970 (a dead RTC battery, or an attacker). A bundle that expired at NOW+5d
    stays expired: trusted time never moves backwards."""
    _device_clock(monkeypatch, NOW + timedelta(days=10))
    fresh.agent.install(fresh.raw_bundle(3, seed=3, now=NOW + timedelta(days=10)))
    stale = fresh.raw_bundle(4, seed=4, validity=timedelta(days=5))
    _device_clock(monkeypatch, datetime(1970, 1, 1, tzinfo=timezone.utc))
    assert fresh.home.trusted_now() == NOW + timedelta(days=10)
    _refused(fresh, stale, ExpiredError, "expired")


def test_a_clock_far_ahead_refuses_installs_but_keeps_serving_and_recovers(fresh, monkeypatch):
    """The clock jumps ten years ahead: installs are refused (nothing signed is valid then),
    the installed model still serves, also after a restart (expiry is an install check),
    and trusted time is not dragged forward by the clock, so setting it right recovers."""
    v3 = fresh.bundle(3, seed=3)
    future = datetime.now(timezone.utc) + timedelta(days=3650)
    monkeypatch.setattr("edgeseal.agent.device.utcnow", lambda: future)
    _refused(fresh, v3, ExpiredError)
    fresh.agent.reload()
    before = fresh.snapshot()
    assert before.served[MODEL][0]["version"] == 2
    monkeypatch.undo()
    assert fresh.agent.install(v3)["version"] == 3


# --- fast-forward -----------------------------------------------------------------------


@pytest.mark.parametrize("ahead", [MAX_VERSION_STEP + 1, 2**31 - 2])
def test_absurd_version_is_refused_as_fast_forward_and_nothing_changes(serving, ahead):
    """A stolen pack key signs version floor+4097 or 2^31-1: installing it would lift the
    floor out of reach of every genuine release (and TPM counters cannot go back)."""
    floor = serving.agent.store.floors.get(MODEL)
    _refused(serving, serving.bundle(floor + ahead, seed=3), RollbackError, "fast-forward")


@pytest.mark.parametrize("version", [2**31, 2**63, -1, 0])
def test_version_outside_the_format_is_refused_and_nothing_changes(serving, version):
    """Re-signed with the stolen key, a manifest version beyond 1..2^31-1 is malformed."""
    sgn, _ = serving.fleet.ring.load_signer("release")

    def edit(m):
        m["model"]["version"] = version

    forged = resign(serving.bundle(3).read_bytes(), sgn, manifest=edit)
    _refused(serving, serving.write(forged, "ff.esb"), MalformedBundleError, "version")


# --- endless data -----------------------------------------------------------------------


def test_a_gigabyte_of_trailing_data_is_refused_without_reading_it(serving):
    """A mirror appends 1 GiB (sparse) to a genuine bundle: the length check (V1) refuses
    it before anything is read or copied into the store."""
    path = serving.bundle(3)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + (1 << 30))
    start = time.monotonic()
    _refused(serving, path, MalformedBundleError, "trailing data")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("offset", "value"),
    [(12, (1 << 32) - 1), (16, (1 << 32) - 1), (24, 1 << 62)],
    ids=["manifest-4GiB", "trust-4GiB", "payload-4EiB"],
)
def test_header_lengths_beyond_the_limits_are_refused_before_allocation(serving, offset, value):
    """The header claims a 4 GiB manifest or trust block, or a 4 EiB payload."""
    data = bytearray(serving.bundle(3).read_bytes())
    width = 8 if offset == 24 else 4
    data[offset : offset + width] = value.to_bytes(width, "big")
    _refused(serving, serving.write(bytes(data), "long.esb"), MalformedBundleError, "limit")


def test_a_section_longer_than_its_chunking_is_refused_and_nothing_changes(serving):
    """With the stolen key, a section's sealed size is declared 4 KiB longer (the extra
    bytes present in the payload): V11 refuses the layout before any chunk is read."""
    sgn, _ = serving.fleet.ring.load_signer("release")
    data = serving.bundle(3).read_bytes()

    def edit(m):
        m["sections"][-1]["sealed_size"] += 4096

    forged = resign(data, sgn, manifest=edit, payload=Parts.of(data).payload + bytes(4096))
    _refused(serving, serving.write(forged, "long-section.esb"), MalformedBundleError, "sealed")


def test_chunks_larger_than_declared_are_refused_and_nothing_changes(serving):
    """With the stolen key, chunk_size is declared 1 byte: the chunk digests and sealed
    sizes no longer add up (a reader never reads past the declared chunk)."""
    sgn, _ = serving.fleet.ring.load_signer("release")

    def edit(m):
        m["chunk_size"] = 1

    forged = resign(serving.bundle(3).read_bytes(), sgn, manifest=edit)
    _refused(serving, serving.write(forged, "chunks.esb"), MalformedBundleError)


def test_a_truncated_bundle_is_refused_and_nothing_changes(serving):
    data = serving.bundle(3).read_bytes()
    _refused(serving, serving.write(data[:-1], "short.esb"), MalformedBundleError, "truncated")


# --- mix and match ----------------------------------------------------------------------


def _section(parts, name):
    entry = next(s for s in parts.manifest["sections"] if s["name"] == name)
    return entry["offset"], entry["offset"] + entry["sealed_size"]


def test_chunks_from_another_bundle_are_refused_and_nothing_changes(serving):
    """A mirror splices the weights chunks of another genuine v3 into this v3."""
    a, b = serving.bundle(3, seed=3).read_bytes(), serving.bundle(3, seed=4).read_bytes()
    pa, pb = Parts.of(a), Parts.of(b)
    (sa, ea), (sb, eb) = _section(pa, "weights"), _section(pb, "weights")
    assert ea - sa == eb - sb
    start = pa.header.payload_offset
    spliced = a[: start + sa] + b[pb.header.payload_offset + sb : pb.header.payload_offset + eb]
    spliced += a[start + ea :]
    assert len(spliced) == len(a)
    _refused(serving, serving.write(spliced, "spliced.esb"), DigestMismatchError, "chunk 0")


def test_recipients_from_another_bundle_fail_to_unwrap_and_nothing_changes(fresh):
    """Even the signer cannot move a wrapped key between bundles: HPKE binds each to its
    bundle id."""
    sgn, _ = fresh.fleet.ring.load_signer("release")
    a, b = fresh.bundle(3, seed=3).read_bytes(), fresh.bundle(3, seed=4).read_bytes()
    theirs = Parts.of(b).manifest["recipients"]

    def edit(m):
        m["recipients"] = theirs

    forged = resign(a, sgn, manifest=edit)
    _refused_after_staging(fresh, fresh.write(forged, "recipients.esb"), DecryptError)


def test_sections_from_another_bundle_fail_to_open_and_nothing_changes(fresh):
    """The signer lists another bundle's sections, digests and payload under this bundle
    id: the section keys are derived from the bundle id, so nothing opens."""
    sgn, _ = fresh.fleet.ring.load_signer("release")
    a, b = fresh.bundle(3, seed=3).read_bytes(), fresh.bundle(3, seed=4).read_bytes()
    pb = Parts.of(b)

    def edit(m):
        m["sections"] = pb.manifest["sections"]
        m["recipients"] = Parts.of(a).manifest["recipients"]

    forged = resign(a, sgn, manifest=edit, payload=pb.payload)
    _refused_after_staging(fresh, fresh.write(forged, "sections.esb"), DecryptError)


# --- wrong device -----------------------------------------------------------------------


def test_a_bundle_for_another_device_is_refused_and_nothing_changes(serving):
    _refused(serving, serving.bundle(3, to=("dev-a",)), NotARecipientError)


def test_another_devices_wrapped_key_relabelled_for_this_device_fails(fresh):
    """With the stolen key, dev-a's wrapped content key is relabelled with this device's
    key id: the device's ECDH cannot open a key sealed to another public key."""
    sgn, _ = fresh.fleet.ring.load_signer("release")
    mine = fresh.agent.key_store.key_id

    def edit(m):
        m["recipients"][0]["keyid"] = mine

    forged = resign(fresh.bundle(3, to=("dev-a",)).read_bytes(), sgn, manifest=edit)
    _refused_after_staging(fresh, fresh.write(forged, "relabelled.esb"), DecryptError)


def test_a_bundle_for_another_architecture_is_refused_and_nothing_changes(serving):
    jetson = get_target("jetson")
    _refused(serving, serving.bundle(3, target=jetson), TargetMismatchError, "aarch64")


# --- key compromise ---------------------------------------------------------------------


def _revoked_device(fresh):
    """The root revokes 'rogue'; the device learns the list from the next genuine bundle."""
    ring = fresh.fleet.ring
    ring.new_signer("rogue", roles=["pack"], model_patterns=["*"], days=30, now=NOW)
    ring.revoke("rogue", reason="key stolen", now=NOW)
    fresh.agent.install(fresh.bundle(3, seed=3))
    assert (fresh.home.path / "trust" / "revocations.json").exists()
    return ring


def test_a_revoked_signer_is_refused_once_the_device_knows_the_list(fresh):
    """The thief packs without the revocation list; the device remembers it anyway."""
    _revoked_device(fresh)
    stolen = fresh.raw_bundle(4, seed=4, signer="rogue", revocations=None)
    _refused(fresh, stolen, TrustError, "revoked: key stolen")


def test_an_older_revocation_list_cannot_unrevoke_a_signer(fresh):
    """The thief carries the root's *previous* list (genuinely signed, not naming them)."""
    ring = fresh.fleet.ring
    ring.new_signer("other", roles=["pack"], model_patterns=["*"], days=30, now=NOW)
    ring.revoke("other", reason="retired", now=NOW)
    old_list = ring.revocations()
    _revoked_device(fresh)
    stolen = fresh.raw_bundle(4, seed=4, signer="rogue", revocations=old_list)
    _refused(fresh, stolen, TrustError, "revoked")


def test_after_a_root_rotation_the_old_root_is_refused_also_after_a_restart(fresh):
    """The root is rotated (old root key suspected); the device follows the rotation with
    the next bundle and from then on refuses certificates of the old root, also after
    the agent restarts."""
    ring = fresh.fleet.ring
    ring.rotate_root()
    ring.new_signer("release2", roles=["pack"], model_patterns=["*"], days=30, now=NOW)
    fresh.agent.install(fresh.bundle(3, seed=3, signer="release2"))
    assert fresh.home.anchor().version == 2
    fresh.agent.close()
    fresh.agent = Agent(fresh.home, load_config(text=""))
    fresh.agent.load_all()
    old_root_signed = fresh.raw_bundle(4, seed=4, signer="release", rotations=[])
    _refused(fresh, old_root_signed, SignatureError)


def test_a_forged_root_rotation_is_refused_and_nothing_changes(fresh):
    """An attacker announces their own root as version 2 (signed by their keys only) and
    certifies a signer under it."""
    attacker_root = SoftwareSigner(generate_private_key())
    new_root = SoftwareSigner(generate_private_key())
    statement = make_rotation(attacker_root, new_root, version=2)
    sgn, _ = fresh.fleet.ring.load_signer("release")

    def edit(t):
        t["rotations"] = [statement]

    forged = resign(fresh.bundle(3).read_bytes(), sgn, trust=edit)
    _refused(fresh, fresh.write(forged, "rotation.esb"), (TrustError, SignatureError))
