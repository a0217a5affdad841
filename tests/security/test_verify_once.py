"""A bundle is verified once per install; its copy in the slot is checked against that
verification by digest, so bytes changed between the verification and the copy (or in
the slot before it is opened) are still refused.

The verifier is the real one throughout; the spy only counts calls of its entry point,
:func:`edgeseal.core.reader.verify_prelude`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeseal.agent.store import ModelStore
from edgeseal.core import reader
from edgeseal.core.config import Limits
from edgeseal.core.errors import DigestMismatchError, MalformedBundleError, SignatureError
from edgeseal.core.layout import HEADER_LEN, parse_header
from security.conftest import MODEL


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts calls of the real verifier (V1-V11)."""
    calls: list[str] = []
    real = reader.verify_prelude

    def counting(*args: Any, **kwargs: Any) -> reader.VerifiedBundle:
        vb = real(*args, **kwargs)
        calls.append(f"{vb.manifest.model_name} v{vb.manifest.version}")
        return vb

    monkeypatch.setattr(reader, "verify_prelude", counting)
    return calls


def _flip_at(offset: Callable[[Any, int], int]) -> Callable[[Path], None]:
    def spoil(path: Path) -> None:
        data = bytearray(path.read_bytes())
        header = parse_header(bytes(data[:HEADER_LEN]), file_len=len(data), limits=Limits())
        data[offset(header, len(data))] ^= 0x01
        path.write_bytes(bytes(data))

    return spoil


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-7])


CHANGES = {
    "manifest byte": (_flip_at(lambda h, n: h.manifest_offset + 40), SignatureError),
    "payload byte": (
        _flip_at(lambda h, n: h.payload_offset + (n - h.payload_offset) // 2),
        DigestMismatchError,
    ),
    "cut short": (_truncate, MalformedBundleError),
}


def test_an_install_through_the_agent_verifies_the_bundle_once(fresh, verifications):
    bundle = fresh.bundle(3, seed=3)
    assert fresh.agent.install(bundle)["version"] == 3
    assert verifications == [f"{MODEL} v3"]


def test_an_install_of_a_bundle_verified_by_the_caller_verifies_it_no_more(fresh, verifications):
    """The OTA path: the updater verifies the download (to compare it with the offer)
    and hands that result to stage; nothing verifies it again."""
    bundle = fresh.bundle(3, seed=3)
    vb = fresh.agent.verify(bundle)
    name, _ = fresh.agent.stage(bundle, verified=vb)
    fresh.agent.commit_staged(name, fresh.agent.check_staged(name))
    assert verifications == [f"{MODEL} v3"]


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_bundle_changed_between_its_verification_and_the_copy_is_refused(
    fresh, monkeypatch, change
):
    """Timeline: v3 is verified; before the store copies it into the free slot its bytes
    change on disk; the copy is checked against the verification, refused, and removed:
    the store, the fallback and what serves are as they were."""
    spoil, error = CHANGES[change]
    bundle = fresh.bundle(3, seed=3)
    real_copy_in = ModelStore._copy_in

    def changed_first(src: Path, dest: Path, failed: str) -> Path:
        spoil(src)
        return real_copy_in(src, dest, failed)

    monkeypatch.setattr(ModelStore, "_copy_in", staticmethod(changed_first))
    before = fresh.snapshot()
    with pytest.raises(error):
        fresh.agent.install(bundle)
    fresh.assert_unchanged(before)


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_staged_copy_changed_before_it_is_opened_is_refused(fresh, verifications, change):
    """The carried verification does not trust the slot: a copy changed after staging
    is refused when opened, without a second verification."""
    spoil, error = CHANGES[change]
    before = fresh.snapshot()
    name, _ = fresh.agent.stage(fresh.bundle(3, seed=3))
    journal = fresh.agent.store.journal(name)
    assert journal.staged is not None
    spoil(fresh.agent.store.slot_path(name, journal.staged))
    with pytest.raises(error):
        fresh.agent.check_staged(name)
    assert verifications == [f"{MODEL} v3"]
    fresh.assert_serving_unchanged(before)
