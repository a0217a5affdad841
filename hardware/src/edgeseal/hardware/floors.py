"""Version floors: the lowest model version a device still accepts, per model name.

A floor only ever rises. Two stores behind one interface:

- :class:`TpmFloors`: a TPM 2.0 NV *counter* per model name, which nothing (not even the
  owner) can move backwards. A new counter does not start at 0 (it continues from the
  highest counter the TPM ever had), so the floor is the counter's distance from a base
  recorded at creation in a write-once NV index (``WRITEDEFINE`` + write lock). Raising a
  floor by ``k`` costs ``k`` increments, so a raise is capped (``max_step``): model
  versions are small consecutive integers, and a version far ahead is a fast-forward.
- :class:`FileFloors`: a JSON file written atomically (write, fsync, rename, fsync dir):
  weaker, since root can edit it; labelled so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgeseal.core.errors import KeyStoreError, RollbackError
from edgeseal.core.files import atomic_write
from edgeseal.core.manifest import validate_name
from edgeseal.hardware.tpm import _esapi, _tss

__all__ = ["FileFloors", "TpmFloors", "VersionFloors"]

#: NV index range edgeseal uses (owner-defined indices 0x01000000-0x01BFFFFF).
NV_BASE = 0x01A40000
NV_SLOTS = 0x8000
MAX_STEP = 4096


class VersionFloors(Protocol):
    kind: str
    hardware_backed: bool

    def get(self, model: str) -> int:
        """The floor for ``model`` (0: no version seen yet)."""
        ...

    def raise_to(self, model: str, floor: int) -> int:
        """Raise the floor to ``floor`` (never lowers); returns the floor now in force."""
        ...


@dataclass
class FileFloors:
    path: Path
    kind: str = "file"
    hardware_backed: bool = False
    label: str = "file (not hardware-backed: root on the device can lower it)"

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise KeyStoreError(f"version floors file {self.path} is corrupt: {e}") from e
        return {str(k): int(v) for k, v in data.items()}

    def get(self, model: str) -> int:
        return self._read().get(validate_name(model, "model name"), 0)

    def raise_to(self, model: str, floor: int) -> int:
        floors = self._read()
        current = floors.get(validate_name(model, "model name"), 0)
        if floor > current:
            floors[model] = floor
            atomic_write(self.path, json.dumps(floors, sort_keys=True).encode(), mode=0o600)
            return floor
        return current


@dataclass
class TpmFloors:
    tcti: str
    owner_auth: str | None = field(default=None, repr=False)
    max_step: int = MAX_STEP
    kind: str = "tpm"
    hardware_backed: bool = True
    label: str = "TPM 2.0 NV counters (hardware-backed)"

    @staticmethod
    def indices(model: str) -> tuple[int, int, bytes]:
        """(counter index, base index, name tag) for a model name."""
        digest = hashlib.sha256(validate_name(model, "model name").encode()).digest()
        slot = int.from_bytes(digest[:2], "big") % NV_SLOTS
        return NV_BASE + 2 * slot, NV_BASE + 2 * slot + 1, digest[:8]

    @contextlib.contextmanager
    def _ctx(self) -> Iterator[Any]:
        with _esapi(self.tcti, self.owner_auth) as ectx:
            yield ectx

    def _handle(self, ectx: Any, index: int) -> Any | None:
        t = _tss()
        try:
            return ectx.tr_from_tpmpublic(index)
        except t.TSS2_Exception:
            return None

    def _read_u64(self, ectx: Any, handle: Any, size: int = 8) -> bytes:
        t = _tss()
        data = ectx.nv_read(handle, size, 0, auth_handle=t.ESYS_TR.OWNER)
        return bytes(data)

    def _create(self, ectx: Any, model: str) -> tuple[Any, Any]:
        t = _tss()
        nv = t.TPMA_NV
        counter_ix, base_ix, tag = self.indices(model)
        counter = ectx.nv_define_space(
            b"",
            t.TPM2B_NV_PUBLIC(
                nvPublic=t.TPMS_NV_PUBLIC(
                    nvIndex=counter_ix,
                    nameAlg=t.TPM2_ALG.SHA256,
                    dataSize=8,
                    attributes=nv.OWNERWRITE
                    | nv.OWNERREAD
                    | nv.NO_DA
                    | (t.TPM2_NT.COUNTER << nv.TPM2_NT_SHIFT),
                )
            ),
            auth_handle=t.ESYS_TR.OWNER,
        )
        ectx.nv_increment(counter, auth_handle=t.ESYS_TR.OWNER)  # a counter reads only after one
        start = self._read_u64(ectx, counter)
        base = ectx.nv_define_space(
            b"",
            t.TPM2B_NV_PUBLIC(
                nvPublic=t.TPMS_NV_PUBLIC(
                    nvIndex=base_ix,
                    nameAlg=t.TPM2_ALG.SHA256,
                    dataSize=16,
                    attributes=nv.OWNERWRITE | nv.OWNERREAD | nv.NO_DA | nv.WRITEDEFINE,
                )
            ),
            auth_handle=t.ESYS_TR.OWNER,
        )
        ectx.nv_write(base, start + tag, 0, auth_handle=t.ESYS_TR.OWNER)
        ectx.nv_write_lock(base, auth_handle=t.ESYS_TR.OWNER)  # write-once from now on
        return counter, base

    def _open(self, ectx: Any, model: str, *, create: bool) -> tuple[Any, int] | None:
        counter_ix, base_ix, tag = self.indices(model)
        counter, base = self._handle(ectx, counter_ix), self._handle(ectx, base_ix)
        if counter is None or base is None:
            if not create:
                return None
            if counter is not None or base is not None:
                raise KeyStoreError(
                    f"TPM floor for {model!r} is half-defined (index "
                    f"{counter_ix:#x}); refusing to guess"
                )
            counter, base = self._create(ectx, model)
        stored = self._read_u64(ectx, base, 16)
        if stored[8:] != tag:
            raise KeyStoreError(f"TPM NV index {base_ix:#x} belongs to another model name")
        value = int.from_bytes(self._read_u64(ectx, counter), "big")
        return counter, value - int.from_bytes(stored[:8], "big")

    def get(self, model: str) -> int:
        with self._ctx() as ectx:
            opened = self._open(ectx, model, create=False)
            return 0 if opened is None else opened[1]

    def raise_to(self, model: str, floor: int) -> int:
        t = _tss()
        with self._ctx() as ectx:
            opened = self._open(ectx, model, create=True)
            assert opened is not None
            counter, current = opened
            steps = floor - current
            if steps <= 0:
                return current
            if steps > self.max_step:
                raise RollbackError(
                    f"refusing to raise the floor of {model!r} from {current} to {floor} "
                    f"(more than {self.max_step} versions ahead: a fast-forward?)"
                )
            for _ in range(steps):
                ectx.nv_increment(counter, auth_handle=t.ESYS_TR.OWNER)
            return floor
