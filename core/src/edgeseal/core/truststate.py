"""A device's trust state as a value that only moves forward. Pure. Stable API.

The state is what a device knows about whom to trust and when "now" is:

- ``pinned``: the root(s) pinned at provisioning (never changes);
- ``rotations``: the root rotation statements followed from the pinned root, oldest first;
  replaying them from ``pinned`` gives ``anchor``, the root trusted now;
- ``roots``: every root key the chain went through (key id -> version, public key);
- ``revocations``: per root key, the newest revocation list that root signed while it was
  the current root; the signers revoked are the union of them all;
- ``trusted_time``: the latest signed time taken (never moves back).

Incoming statements (a bundle's trust block, an OTA message's) are **verified** from the
state the device has (:meth:`TrustState.follow`, :meth:`TrustState.with_revocations`,
strict: a bad statement is a typed error), and the resulting candidate is **merged**
into what the device holds when it commits (:meth:`TrustState.join`, total: it never
fails and never replaces what the device knows with less). ``join`` is commutative,
associative and idempotent, so the order in which a device persists candidates (a bundle
verified before an OTA message was merged, a restart in between) cannot take anything
back.

Trusted time advances only from signed times, and never further than the device's own
clock plus the allowed skew (:meth:`TrustState.advance_time`): a signer issuing times
ahead of the clock cannot ratchet it forward message by message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.envelope import verify_envelope
from edgeseal.core.errors import SignatureError
from edgeseal.core.keys import key_id
from edgeseal.core.trust import (
    REVOCATIONS_TYPE,
    RevocationList,
    TrustAnchor,
    follow_rotations,
    rotation_root,
    verify_revocations,
)

__all__ = ["TrustState", "advanced_time"]


@dataclass(frozen=True)
class TrustState:
    """What a device trusts now; build with :meth:`pinned_to` or :meth:`restore`."""

    pinned: TrustAnchor
    rotations: tuple[Mapping[str, Any], ...] = ()
    anchor: TrustAnchor = field(default=None)  # type: ignore[assignment]
    #: key id -> (root version, public key) of every root in the chain, pinned ones first.
    roots: Mapping[str, tuple[int, ec.EllipticCurvePublicKey]] = field(default_factory=dict)
    revocations: Mapping[str, RevocationList] = field(default_factory=dict)
    trusted_time: datetime | None = None

    def __post_init__(self) -> None:
        if self.anchor is None:
            object.__setattr__(self, "anchor", self.pinned)
        if not self.roots:
            object.__setattr__(
                self, "roots", {k: (self.pinned.version, v) for k, v in self.pinned.keys.items()}
            )

    # -- building ------------------------------------------------------------------------

    @classmethod
    def pinned_to(cls, anchor: TrustAnchor) -> TrustState:
        return cls(pinned=anchor)

    @classmethod
    def restore(
        cls,
        pinned: TrustAnchor,
        *,
        rotations: Sequence[object] = (),
        revocations: Sequence[object] = (),
        trusted_time: datetime | None = None,
    ) -> TrustState:
        """The state persisted as documents, each verified again (an edited file fails).

        A stored revocation list may be signed by any root in the chain: it was taken
        while that root was current (or, in a home written by an older agent, kept
        after a rotation)."""
        state = cls.pinned_to(pinned).follow(rotations)
        lists = dict(state.revocations)
        for unverified in revocations:
            kid, rl = _verify_under_any(unverified, state.roots)
            if kid not in lists or rl.version > lists[kid].version:
                lists[kid] = rl
        return state._replace(revocations=lists, trusted_time=trusted_time)

    def _replace(self, **changes: Any) -> TrustState:
        return dataclasses.replace(self, **changes)

    # -- verified steps (strict) ---------------------------------------------------------

    def follow(self, unverified_rotations: Sequence[object]) -> TrustState:
        """Follow rotation statements from the current root (V3). Statements already
        followed, or older, are skipped; a statement that should apply but does not
        verify is a :class:`TrustError` / :class:`SignatureError`."""
        anchor, used = follow_rotations(self.anchor, unverified_rotations)
        if not used:
            return self
        roots = dict(self.roots)
        for statement in used:  # every root the chain went through, not only the last
            version, key = rotation_root(statement)
            roots[key_id(key)] = (version, key)
        return self._replace(rotations=(*self.rotations, *used), anchor=anchor, roots=roots)

    def with_revocations(self, unverified_list: object) -> TrustState:
        """Take a revocation list signed by the **current** root (V4). A list signed by a
        root the device has rotated away from is not taken (that key may be the reason
        for the rotation) and changes nothing; a list signed by no root of the chain is a
        :class:`SignatureError`. An older list than the one known for that root changes
        nothing."""
        try:
            verified = verify_revocations(unverified_list, self.anchor)
        except SignatureError:
            former = {k: key for k, (_, key) in self.roots.items() if k not in self.anchor.keys}
            _signed_by(unverified_list, former)  # not a former root's either: refused
            # A former root's list (a keyring rotated by an older edgeseal keeps shipping
            # it): genuine but superseded. It is not taken, and refuses nothing more than
            # a bundle carrying no list.
            return self
        kid = _signed_by(unverified_list, self.anchor.keys)
        known = self.revocations.get(kid)
        if known is not None and verified.version <= known.version:
            return self
        return self._replace(revocations={**self.revocations, kid: verified})

    # -- time ------------------------------------------------------------------------------

    def now(self, clock: datetime) -> datetime:
        """The later of the device's clock and the latest signed time taken."""
        return clock if self.trusted_time is None else max(clock, self.trusted_time)

    def advance_time(self, signed: datetime, *, clock: datetime, skew: timedelta) -> TrustState:
        """Take a signed time (an accepted offer's ``issued``, a committed bundle's
        ``created``), but never beyond ``clock + skew``: the device's own clock bounds how
        far signed data may carry trusted time, so a stream of messages each issued up to
        the skew ahead cannot ratchet it. Never moves back."""
        taken = advanced_time(self.trusted_time, signed, clock=clock, skew=skew)
        return self if taken == self.trusted_time else self._replace(trusted_time=taken)

    # -- merging (total) -----------------------------------------------------------------

    def join(self, other: TrustState) -> TrustState:
        """Merge two states of the same device: the longer chain when one extends the
        other (a fork, which only a root signing two successors can make, keeps this
        one), the newest list per root, the later trusted time. Never fails."""
        if set(other.pinned.keys) != set(self.pinned.keys):
            raise ValueError("joining trust states of different pinned roots")
        mine, theirs = _chain_ids(self.rotations), _chain_ids(other.rotations)
        base = self
        if len(theirs) > len(mine) and theirs[: len(mine)] == mine:
            base = other
        lists = dict(base.revocations)
        for src in (self.revocations, other.revocations):
            for kid, rl in src.items():
                if kid in base.roots and (kid not in lists or rl.version > lists[kid].version):
                    lists[kid] = rl
        times = [t for t in (self.trusted_time, other.trusted_time) if t is not None]
        return base._replace(revocations=lists, trusted_time=max(times) if times else None)

    # -- reading -----------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.anchor.version

    def revoked(self) -> dict[str, str]:
        """Every revoked signer key id (with its reason) over all roots' lists."""
        out: dict[str, str] = {}
        for rl in self.revocations.values():
            out.update(rl.revoked)
        return out

    def effective_revocations(self, extra: RevocationList | None = None) -> RevocationList | None:
        """One list for the checks: every signer that any root's newest list (or ``extra``)
        revokes. Version, issuer and envelope are those of the current root's list when
        there is one."""
        lists = [*self.revocations.values(), *([extra] if extra is not None else [])]
        if not lists:
            return None
        current = next(
            (self.revocations[k] for k in self.anchor.keys if k in self.revocations), lists[-1]
        )
        revoked: dict[str, str] = {}
        for rl in lists:
            revoked.update(rl.revoked)
        return RevocationList(
            version=current.version,
            issued=current.issued,
            issuer=current.issuer,
            revoked=revoked,
            envelope=current.envelope,
        )

    def revocation_documents(self) -> list[dict[str, Any]]:
        """The envelopes to persist, current root's last."""
        order = sorted(self.revocations, key=lambda k: (self.roots[k][0], k))
        return [dict(self.revocations[k].envelope or {}) for k in order]


def advanced_time(
    trusted: datetime | None, signed: datetime, *, clock: datetime, skew: timedelta
) -> datetime | None:
    """Trusted time after taking ``signed``: ``max(trusted, min(signed, clock + skew))``."""
    if signed.tzinfo is None:
        signed = signed.replace(tzinfo=timezone.utc)
    taken = min(signed, clock + skew)
    return taken if trusted is None or taken > trusted else trusted


def _chain_ids(rotations: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(r.get("payload", "")) for r in rotations]


def _signed_by(unverified: object, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> str:
    for kid, key in keys.items():
        try:
            verify_envelope(unverified, REVOCATIONS_TYPE, {kid: key})
        except SignatureError:
            continue
        return kid
    raise SignatureError(f"{REVOCATIONS_TYPE} is not signed by a trusted key")


def _verify_under_any(
    unverified: object, roots: Mapping[str, tuple[int, ec.EllipticCurvePublicKey]]
) -> tuple[str, RevocationList]:
    kid = _signed_by(unverified, {k: key for k, (_, key) in roots.items()})
    version, key = roots[kid]
    return kid, verify_revocations(unverified, TrustAnchor({kid: key}, version))
