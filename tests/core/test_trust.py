"""The chain of trust: pinned root, rotation, signer scope and validity, revocation."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edgeseal.core.errors import (
    ExpiredError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    TrustError,
)
from edgeseal.core.keyring import Keyring
from edgeseal.core.reader import BundleFile
from edgeseal.core.trust import TrustAnchor, verify_revocations
from helpers import NOW


def verify(fleet, path, **policy):
    with BundleFile.open(path) as bf:
        return bf.verify(fleet.policy(**policy))


def test_a_bundle_from_an_unknown_root_is_rejected(fleet, onnx_model, tmp_path):
    bundle, _ = fleet.pack(onnx_model)
    stranger = Keyring(tmp_path / "other")
    stranger.init_root()
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        verify(fleet, bundle, anchor=stranger.anchor())


def test_an_expired_bundle_is_rejected_at_install_but_served_without_a_clock(fleet, onnx_model):
    bundle, _ = fleet.pack(onnx_model, validity=timedelta(days=2))
    verify(fleet, bundle)
    with pytest.raises(ExpiredError, match="expired"):
        verify(fleet, bundle, now=NOW + timedelta(days=3))
    assert verify(fleet, bundle, now=None).manifest.version == 1  # serving: no time checks


def test_a_bundle_from_the_future_is_rejected(fleet, onnx_model):
    bundle, _ = fleet.pack(onnx_model)
    with pytest.raises(ExpiredError):
        verify(fleet, bundle, now=NOW - timedelta(hours=2))


def test_an_expired_signer_certificate_is_rejected(fleet, onnx_model):
    fleet.ring.new_signer(
        "short", roles=["pack"], model_patterns=["*"], days=1, now=NOW - timedelta(days=10)
    )
    bundle, _ = fleet.pack(onnx_model, signer="short", validity=timedelta(days=30))
    with pytest.raises(ExpiredError, match="signer certificate"):
        verify(fleet, bundle)


def test_a_revoked_signer_is_rejected_once_the_list_travels(fleet, onnx_model):
    before, _ = fleet.pack(onnx_model)
    fleet.ring.revoke("release", reason="key leaked", now=NOW)
    after, _ = fleet.pack(onnx_model, version=2)
    with pytest.raises(TrustError, match="revoked: key leaked"):
        verify(fleet, after)
    # A device that has seen the list refuses older bundles of that signer too.
    revs = verify_revocations(fleet.ring.revocations(), fleet.ring.anchor())
    with pytest.raises(TrustError, match="revoked"):
        verify(fleet, before, known_revocations=revs)


def test_a_signer_outside_its_model_scope_is_refused_by_the_device(fleet, onnx_model):
    from edgeseal.core.writer import seal_bundle

    fleet.ring.new_signer(
        "vision", roles=["pack"], model_patterns=["vision-*"], days=30, now=NOW - timedelta(days=1)
    )
    sgn, cert = fleet.ring.load_signer("vision")
    # The packager refuses up front ...
    with pytest.raises(TrustError, match="may not sign model"):
        fleet.pack(onnx_model, signer="vision", name="audio-kws")
    # ... and a bundle sealed around that check is refused by the device.
    out = fleet.tmp / "scope.esb"
    from edgeseal.core.writer import RecipientKey

    seal_bundle(
        out,
        sections={"graph": b"x"},
        model_name="audio-kws",
        version=1,
        model_format="onnx",
        inputs=(),
        outputs=(),
        signer=sgn,
        certificate=cert,
        recipients=[RecipientKey("dev-a", fleet.devices["dev-a"].public_key)],
        created=NOW,
        expires=NOW + timedelta(days=1),
    )
    with pytest.raises(TrustError, match="may not sign model 'audio-kws'"):
        verify(fleet, out)


def test_a_deploy_only_signer_cannot_pack(fleet, onnx_model):
    fleet.ring.new_signer(
        "ops", roles=["deploy"], model_patterns=["*"], days=30, now=NOW - timedelta(days=1)
    )
    with pytest.raises(TrustError, match="lacks the 'pack' role"):
        fleet.pack(onnx_model, signer="ops")


def test_devices_follow_a_root_rotation_and_refuse_the_old_root_after_it(fleet, onnx_model):
    old_anchor = fleet.ring.anchor()
    fleet.ring.rotate_root()
    fleet.ring.new_signer(
        "release2", roles=["pack"], model_patterns=["*"], days=30, now=NOW - timedelta(days=1)
    )
    bundle, _ = fleet.pack(onnx_model, signer="release2")
    vb = verify(fleet, bundle, anchor=old_anchor)  # pinned old root follows the statement
    assert vb.anchor.version == 2
    # A certificate signed by the old root no longer verifies under the rotated root.
    stale, _ = fleet.pack(onnx_model, signer="release")
    with pytest.raises(SignatureError):
        verify(fleet, stale, anchor=old_anchor)


def test_a_rotation_that_skips_a_version_is_refused(fleet):
    from edgeseal.core.keys import SoftwareSigner, generate_private_key
    from edgeseal.core.trust import apply_rotations, make_rotation

    root = fleet.ring.root_signer()
    statement = make_rotation(root, SoftwareSigner(generate_private_key()), version=3)
    with pytest.raises(TrustError, match="skips"):
        apply_rotations(fleet.ring.anchor(), [statement])


def test_a_rotation_signed_only_by_the_new_key_is_refused(fleet):
    from edgeseal.core.keys import SoftwareSigner, generate_private_key
    from edgeseal.core.trust import apply_rotations, make_rotation

    attacker = SoftwareSigner(generate_private_key())
    statement = make_rotation(attacker, SoftwareSigner(generate_private_key()), version=2)
    with pytest.raises((TrustError, SignatureError)):
        apply_rotations(fleet.ring.anchor(), [statement])


def test_below_the_floor_is_a_rollback(fleet, onnx_model):
    bundle, _ = fleet.pack(onnx_model, version=3)
    verify(fleet, bundle, floor=3)
    with pytest.raises(RollbackError, match="below this device's floor 4"):
        verify(fleet, bundle, floor=4)


def test_wrong_architecture_or_agent_version_is_a_target_mismatch(fleet, onnx_model):
    from edgeseal.core.targets import get_target

    bundle, _ = fleet.pack(onnx_model, target=get_target("jetson"))
    verify(fleet, bundle, architecture="aarch64")
    with pytest.raises(TargetMismatchError, match="aarch64"):
        verify(fleet, bundle, architecture="x86_64")
    with pytest.raises(TargetMismatchError, match="agent"):
        verify(fleet, bundle, agent_version="0.0.9")


def test_trust_anchor_needs_a_key():
    with pytest.raises(ValueError):
        TrustAnchor({})
