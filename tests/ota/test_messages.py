"""Signed control messages and the device's decision on them (pure: no broker)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from edgeseal.core.encoding import b64d, b64e, canonical_json, utcnow
from edgeseal.core.errors import ExpiredError, TrustError
from edgeseal.ota.decide import SeqBook, SlotView, judge, resume_step
from edgeseal.ota.messages import (
    OtaMessageError,
    chunk_digests,
    decode_chunk,
    encode_chunk,
    make_message,
    parse_fetch,
    verify_message,
)
from helpers import NOW

BID = "ab" * 16
OTHER = "cd" * 16


@pytest.fixture
def deployer(fleet):
    fleet.ring.new_signer(
        "deployer", roles=["deploy"], model_patterns=["clf*"], days=365, now=NOW - timedelta(days=1)
    )
    return fleet.ring.load_signer("deployer")


def _offer(deployer, *, seq=1, to=("device", "dev-a"), model="clf", version=2, bid=BID, **kw):
    signer, cert = deployer
    digests, size, sha = chunk_digests(b"x" * 5000, 2048)
    fields = {"size": size, "sha256": sha, "chunk_bytes": 2048, "chunks": digests}
    fields.update(kw.pop("fields", {}))
    return make_message(
        signer,
        cert,
        action=kw.pop("action", "install"),
        seq=seq,
        to=to,
        model=model,
        version=version,
        bundle_id=bid,
        now=kw.pop("now", utcnow()),
        **fields,
        **kw,
    )


def _verify(fleet, wire, **kw):
    return verify_message(
        wire, anchor=fleet.ring.anchor(), known_revocations=None, now=utcnow(), **kw
    )


def test_a_signed_offer_verifies_with_its_chunk_digests(fleet, deployer):
    msg = _verify(fleet, _offer(deployer))
    assert (msg.action, msg.model, msg.version, msg.to) == (
        "install",
        "clf",
        2,
        ("device", "dev-a"),
    )
    assert msg.chunk_count == 3 and msg.chunk_length(2) == 5000 - 4096


def test_an_offer_signed_by_a_pack_only_signer_is_refused(fleet):
    signer, cert = fleet.ring.load_signer("release")  # roles: pack
    digests, size, sha = chunk_digests(b"y" * 3000, 1024)
    wire = make_message(
        signer, cert, action="install", seq=1, to=("device", "dev-a"), model="clf",
        version=1, bundle_id=BID, now=utcnow(), size=size, sha256=sha, chunk_bytes=1024,
        chunks=digests,
    )  # fmt: skip
    with pytest.raises(TrustError, match="deploy role"):
        _verify(fleet, wire)


def test_an_offer_for_a_model_outside_the_signers_patterns_is_refused(fleet, deployer):
    with pytest.raises(TrustError, match="outside its patterns"):
        _verify(fleet, _offer(deployer, model="detector"))


def test_a_tampered_offer_fails_its_signature(fleet, deployer):
    wire = json.loads(_offer(deployer))
    payload = json.loads(b64d(wire["envelope"]["payload"], "p"))
    payload["version"] = 99
    wire["envelope"]["payload"] = b64e(canonical_json(payload))
    with pytest.raises(OtaMessageError, match="signature"):
        _verify(fleet, canonical_json(wire))


def test_an_expired_offer_and_one_from_the_future_are_refused(fleet, deployer):
    with pytest.raises(ExpiredError):
        _verify(fleet, _offer(deployer, now=utcnow() - timedelta(days=8)))
    with pytest.raises(OtaMessageError, match="future"):
        _verify(fleet, _offer(deployer, now=utcnow() + timedelta(hours=2)))


def test_a_revoked_deploy_signer_is_refused(fleet, deployer):
    wire = _offer(deployer)
    fleet.ring.revoke("deployer", reason="key leaked", now=NOW)
    known = fleet.ring.revocations()
    with pytest.raises(TrustError, match="revoked"):
        from edgeseal.core.trust import verify_revocations

        verify_message(
            wire,
            anchor=fleet.ring.anchor(),
            known_revocations=verify_revocations(known, fleet.ring.anchor()),
            now=utcnow(),
        )


def test_digest_list_of_the_wrong_length_and_oversized_bundles_are_refused(fleet, deployer):
    with pytest.raises(OtaMessageError, match="chunk digests"):
        _verify(fleet, _offer(deployer, fields={"size": 9000}))
    with pytest.raises(OtaMessageError, match="over this device's limit"):
        _verify(fleet, _offer(deployer), max_bundle_bytes=4000)


def test_garbage_and_oversized_messages_are_refused_with_one_error_type(fleet):
    for wire in (b"", b"not json", b"[]", b'{"envelope": 1}', b"{" * 100_000):
        with pytest.raises((OtaMessageError, TrustError)):
            _verify(fleet, wire)
    with pytest.raises(OtaMessageError, match="over the limit"):
        _verify(fleet, b" " * (5 * 1024 * 1024))


def test_chunk_frames_round_trip_and_bad_frames_are_refused():
    frame = decode_chunk(encode_chunk(BID, 7, b"data"))
    assert (frame.bundle_id, frame.index, frame.data) == (BID, 7, b"data")
    for bad in (b"", b"ESC0" + bytes(20), b"short"):
        with pytest.raises(OtaMessageError):
            decode_chunk(bad)


def test_fetch_requests_are_bounded():
    assert parse_fetch(canonical_json({"bundle_id": BID, "chunks": [0, 1]})) == (BID, [0, 1])
    for bad in (
        {"bundle_id": "../x", "chunks": [0]},
        {"bundle_id": BID, "chunks": list(range(1000))},
        {"bundle_id": BID, "chunks": [-1]},
        {"bundle_id": BID, "chunks": [True]},
    ):
        with pytest.raises(OtaMessageError):
            parse_fetch(canonical_json(bad))


# --- the device's decision -------------------------------------------------------------


def _judge(fleet, deployer, wire, *, seqs=None, slots=None, groups=("lab",)):
    return judge(
        _verify(fleet, wire),
        device_id="dev-a",
        groups=groups,
        seqs=seqs or SeqBook(),
        slots=slots or SlotView(),
    )


def test_a_new_offer_is_accepted_and_a_duplicate_ignored(fleet, deployer):
    wire = _offer(deployer)
    msg = _verify(fleet, wire)
    assert _judge(fleet, deployer, wire).verdict == "accept"
    book = SeqBook().record(msg)
    assert _judge(fleet, deployer, wire, seqs=book).verdict == "ignore"


def test_a_replayed_sequence_number_is_refused(fleet, deployer):
    book = SeqBook().record(_verify(fleet, _offer(deployer, seq=5)))
    d = _judge(fleet, deployer, _offer(deployer, seq=4, version=3), seqs=book)
    assert d.verdict == "refuse" and "replay" in d.reason


def test_offers_for_another_device_or_group_are_refused(fleet, deployer):
    assert _judge(fleet, deployer, _offer(deployer, to=("device", "dev-b"))).verdict == "refuse"
    assert _judge(fleet, deployer, _offer(deployer, to=("group", "north"))).verdict == "refuse"
    assert _judge(fleet, deployer, _offer(deployer, to=("group", "lab"))).verdict == "accept"


def test_downgrades_and_equal_versions_with_other_content_are_refused(fleet, deployer):
    slots = SlotView(active=(3, OTHER), floor=2)
    for version, bid in ((2, BID), (3, BID), (1, BID)):
        d = _judge(fleet, deployer, _offer(deployer, version=version, bid=bid), slots=slots)
        assert d.verdict == "refuse", (version, d)
    same = _judge(fleet, deployer, _offer(deployer, version=3, bid=OTHER), slots=slots)
    assert same.verdict == "ignore"


def test_a_late_order_about_another_version_is_ignored(fleet, deployer):
    order = _offer(deployer, action="fall-back", version=2, fields={})
    d = _judge(fleet, deployer, order, slots=SlotView(active=(3, OTHER), fallback=(2, BID)))
    assert d.verdict == "ignore" and "stale" in d.reason
    ok = _judge(fleet, deployer, order, slots=SlotView(active=(2, BID), fallback=(1, OTHER)))
    assert ok.verdict == "accept"


def test_a_fall_back_order_about_the_update_in_progress_stops_it(fleet, deployer):
    """A halted rollout orders back a device still downloading or on trial: the order is
    about the pending version, not the active one, and is taken (else that device would
    commit the halted version later). Another pending version keeps the order stale."""
    order = _offer(deployer, action="fall-back", version=2, fields={})
    pending = SlotView(active=(1, OTHER), pending=(2, BID))
    d = _judge(fleet, deployer, order, slots=pending)
    assert d.verdict == "accept" and "in progress" in d.reason
    other = SlotView(active=(1, OTHER), pending=(3, "cd" * 16))
    assert _judge(fleet, deployer, order, slots=other).verdict == "ignore"
    finalize = _offer(deployer, action="finalize", version=2, fields={})
    assert _judge(fleet, deployer, finalize, slots=pending).verdict == "ignore"


def test_an_interrupted_update_resumes_at_the_right_step():
    assert (
        resume_step("downloading", staged=False, active_bundle=None, offer_bundle=BID) == "download"
    )
    assert resume_step("verifying", staged=False, active_bundle=None, offer_bundle=BID) == "verify"
    assert resume_step("staged", staged=True, active_bundle=OTHER, offer_bundle=BID) == "test"
    assert resume_step("testing", staged=True, active_bundle=OTHER, offer_bundle=BID) == "test"
    assert resume_step("testing", staged=False, active_bundle=BID, offer_bundle=BID) == (
        "report-committed"
    )
    assert resume_step("committed", staged=False, active_bundle=BID, offer_bundle=BID) == "rest"
