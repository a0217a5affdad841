"""The device's trust state over random timelines (hypothesis): it only moves forward,
and a device never ends where an honest newer bundle or offer is refused.

The world: a keyring that rotates its root (up to version 5), revokes a rogue signer of
its current root (its list is signed by the current root and issued again on every
rotation, as ``Keyring`` does), and packs and offers with a good signer of its current
root, carrying its whole rotation chain and its list. The device starts pinned to some
root of the chain (provisioned with a ``root.pub`` that may already have been rotated,
so it pins it as version 1). Between honest deliveries an attacker who holds a good
signer of any root so far sends bundles carrying any subset, in any order, of the public
statements (rotations, every list ever issued), and offers issued as far ahead as the
device still takes (the ratchet). The device restarts (its state written out as
documents and read back, each verified again), and its clock drifts within the skew.

Each step is what the reader and the OTA verifier do with a trust block (V3, V4, V5's
certificate check), then the commit's merge (``join``); nothing else is modelled, so
these examples run in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeseal.core.errors import EdgesealError
from edgeseal.core.keys import SoftwareSigner, generate_private_key
from edgeseal.core.trust import (
    TrustAnchor,
    make_revocations,
    make_rotation,
    make_signer_certificate,
    verify_signer_certificate,
)
from edgeseal.core.truststate import TrustState
from helpers import NOW

MAX_ROOT = 5
SKEW = timedelta(minutes=5)
VALIDITY = timedelta(days=30)


@dataclass(frozen=True)
class Root:
    version: int
    signer: SoftwareSigner
    rotation: dict[str, Any] | None  # the statement that introduced it (None for v1)
    good: SoftwareSigner
    good_cert: dict[str, Any]
    rogue: SoftwareSigner
    rogue_cert: dict[str, Any]


def _make_roots() -> list[Root]:
    roots: list[Root] = []
    prev: SoftwareSigner | None = None
    for v in range(1, MAX_ROOT + 1):
        key = SoftwareSigner(generate_private_key())
        rotation = make_rotation(prev, key, version=v) if prev is not None else None
        certs = []
        for name in ("good", "rogue"):
            s = SoftwareSigner(generate_private_key())
            cert = make_signer_certificate(
                key,
                s.public_key,
                name=f"{name}-{v}",
                roles=["pack", "deploy"],
                model_patterns=["*"],
                not_before=NOW - timedelta(days=1),
                not_after=NOW + timedelta(days=3650),
            )
            certs.append((s, cert))
        roots.append(Root(v, key, rotation, certs[0][0], certs[0][1], certs[1][0], certs[1][1]))
        prev = key
    return roots


ROOTS = _make_roots()


@dataclass
class World:
    """The workstation (keyring) and real time."""

    root: int = 1  # index + 1 into ROOTS
    list_version: int = 0
    revoked: dict[str, str] = field(default_factory=dict)
    current_list: dict[str, Any] | None = None
    issued_lists: list[dict[str, Any]] = field(default_factory=list)
    real: datetime = NOW

    def rotations(self) -> list[dict[str, Any]]:
        return [r.rotation for r in ROOTS[1 : self.root] if r.rotation is not None]

    def _issue(self) -> None:
        self.list_version += 1
        self.current_list = make_revocations(
            ROOTS[self.root - 1].signer,
            version=self.list_version,
            revoked=self.revoked,
            issued=self.real,
        )
        self.issued_lists.append(self.current_list)

    def rotate(self) -> None:
        if self.root < MAX_ROOT:
            self.root += 1
            if self.current_list is not None:
                self._issue()  # Keyring.rotate_root issues the list again

    def revoke(self) -> None:
        r = ROOTS[self.root - 1]
        self.revoked[r.rogue.key_id] = "stolen"
        self._issue()


def admit(
    state: TrustState,
    rotations: list[Any],
    revocations: Any,
    cert: dict[str, Any],
    *,
    now: datetime,
) -> TrustState:
    """V3, V4 and V5's certificate check, as ``verify_prelude`` and ``verify_message`` do."""
    candidate = state.follow(rotations)
    if revocations is not None:
        candidate = candidate.with_revocations(revocations)
    verify_signer_certificate(
        cert, candidate.anchor, now=now, revocations=candidate.effective_revocations()
    )
    return candidate


def restart(state: TrustState) -> TrustState:
    return TrustState.restore(
        state.pinned,
        rotations=list(state.rotations),
        revocations=state.revocation_documents(),
        trusted_time=state.trusted_time,
    )


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("rotate")),
        st.tuples(st.just("revoke")),
        st.tuples(st.just("honest-bundle")),
        st.tuples(st.just("honest-offer")),
        st.tuples(
            st.just("attacker-bundle"),
            st.integers(0, MAX_ROOT - 1),  # which root's good signer
            st.lists(st.integers(0, MAX_ROOT - 1), max_size=5),  # which rotations, in order
            st.integers(-1, 12),  # which issued list (-1: none)
        ),
        st.tuples(st.just("ratchet"), st.integers(1, 50)),
        st.tuples(st.just("restart")),
        st.tuples(st.just("tick"), st.integers(0, 86_400)),
        st.tuples(st.just("drift"), st.integers(-120, 120)),
    ),
    max_size=25,
)


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(pinned_at=st.integers(1, 3), events=EVENTS)
def test_a_device_never_ends_where_an_honest_newer_bundle_is_refused(pinned_at, events):
    world = World()
    for _ in range(pinned_at - 1):
        world.rotate()
    # Provisioned with the keyring's root.pub of the day: pinned as version 1.
    pinned = TrustAnchor.from_public_keys([ROOTS[world.root - 1].signer.public_key])
    device = TrustState.pinned_to(pinned)
    drift = timedelta(0)

    for event in events:
        kind = event[0]
        clock = world.real + drift
        before = device
        if kind == "rotate":
            world.rotate()
        elif kind == "revoke":
            world.revoke()
        elif kind in ("honest-bundle", "honest-offer"):
            device = _deliver_honest(device, world, clock)
        elif kind == "attacker-bundle":
            _, signer_root, picks, which_list = event
            signer_root = min(signer_root, world.root - 1)
            rots = [ROOTS[i].rotation for i in picks if 0 < i < world.root]
            lists = world.issued_lists
            carried = lists[which_list] if 0 <= which_list < len(lists) else None
            try:
                candidate = admit(
                    device,
                    rots,
                    carried,
                    ROOTS[signer_root].good_cert,
                    now=device.now(clock),
                )
            except EdgesealError:
                pass  # refused: nothing changes
            else:
                device = device.join(candidate)
        elif kind == "ratchet":
            # A deploy signer's offers, each issued as far ahead as the device still takes.
            for _ in range(event[1]):
                issued = device.now(clock) + SKEW
                device = device.advance_time(issued, clock=clock, skew=SKEW)
            assert device.trusted_time is not None
            assert device.trusted_time <= max(clock + SKEW, before.trusted_time or clock)
        elif kind == "restart":
            device = restart(device)
        elif kind == "tick":
            world.real += timedelta(seconds=event[1])
        elif kind == "drift":
            drift = timedelta(seconds=event[1])
        _assert_forward(before, device)

    # However the timeline went, the honest newest bundle and offer are taken now, and
    # after a restart; every rogue the device learned of stays refused.
    clock = world.real + drift
    device = _deliver_honest(device, world, clock)
    device = _deliver_honest(restart(device), world, clock)
    assert device.version == world.root
    assert set(world.revoked) <= set(device.revoked())


def _deliver_honest(device: TrustState, world: World, clock: datetime) -> TrustState:
    """A bundle packed now (valid 30 days) or an offer issued now, from the keyring."""
    good = ROOTS[world.root - 1]
    now = device.now(clock)
    # V8 for a bundle (created now, valid 30 days) or an offer (issued now): judged by
    # trusted time, which the attacker must not have pushed past what is genuine.
    assert world.real <= now + SKEW, "an honest offer or bundle would be 'from the future'"
    assert now < world.real + VALIDITY, "trusted time was pushed past honest expiries"
    candidate = admit(device, world.rotations(), world.current_list, good.good_cert, now=now)
    merged = device.join(candidate).advance_time(world.real, clock=clock, skew=SKEW)
    rogue = good.rogue_cert
    if good.rogue.key_id in world.revoked:
        try:
            admit(merged, [], None, rogue, now=now)
        except EdgesealError:
            pass
        else:
            raise AssertionError("a revoked rogue signer was accepted")
    return merged


def _assert_forward(before: TrustState, after: TrustState) -> None:
    assert after.version >= before.version
    assert set(before.revoked()) <= set(after.revoked())
    if before.trusted_time is not None:
        assert after.trusted_time is not None and after.trusted_time >= before.trusted_time
    if after is before:
        return
    # Restoring what would be written gives the same state back (a restart loses nothing).
    again = restart(after)
    assert again.version == after.version
    assert again.revoked() == after.revoked()
    assert again.trusted_time == after.trusted_time


@given(
    st.lists(st.integers(1, MAX_ROOT - 1), max_size=6),
    st.lists(st.integers(1, MAX_ROOT - 1), max_size=6),
    st.lists(st.integers(1, MAX_ROOT - 1), max_size=6),
)
@settings(max_examples=300, deadline=None)
def test_join_is_commutative_associative_and_idempotent(a, b, c):
    """Candidates merged in any order, any number of times, give the same state."""
    pinned = TrustAnchor.from_public_keys([ROOTS[0].signer.public_key])
    base = TrustState.pinned_to(pinned)

    def candidate(picks: list[int]) -> TrustState:
        upto = max(picks, default=0)
        try:
            return base.follow([ROOTS[i].rotation for i in range(1, upto + 1)])
        except EdgesealError:
            return base

    x, y, z = candidate(a), candidate(b), candidate(c)

    def key(s: TrustState) -> tuple[Any, ...]:
        return (s.version, tuple(r["payload"] for r in s.rotations), s.trusted_time)

    assert key(x.join(y)) == key(y.join(x))
    assert key(x.join(y).join(z)) == key(x.join(y.join(z)))
    assert key(x.join(x)) == key(x)
