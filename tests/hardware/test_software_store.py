"""The software key store: a 0600 file, optionally bound to the machine it was made on."""

from __future__ import annotations

import pytest

from edgeseal.core.errors import KeyFileError
from edgeseal.hardware.software import LABEL, SoftwareKeyStore, machine_secret


def _machine(root, ident: bytes, serial: bytes | None = None):
    (root / "etc").mkdir(parents=True)
    (root / "etc/machine-id").write_bytes(ident + b"\n")
    if serial is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/serial-number").write_bytes(serial + b"\x00")
    return root


def test_software_store_says_it_is_not_hardware_backed(tmp_path):
    store = SoftwareKeyStore.create(tmp_path / "device.key")
    assert store.hardware_backed is False
    assert store.label == LABEL == "software (not hardware-backed)"
    assert (tmp_path / "device.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyFileError, match="already exists"):
        SoftwareKeyStore.create(tmp_path / "device.key")


def test_a_machine_bound_key_opens_only_on_its_machine(tmp_path):
    here = machine_secret(_machine(tmp_path / "a", b"0123456789abcdef0123456789abcdef", b"SER1"))
    elsewhere = machine_secret(_machine(tmp_path / "b", b"fedcba9876543210fedcba9876543210"))
    same_id_other_board = machine_secret(
        _machine(tmp_path / "c", b"0123456789abcdef0123456789abcdef", b"SER2")
    )
    assert len({here, elsewhere, same_id_other_board}) == 3
    store = SoftwareKeyStore.create(tmp_path / "k", passphrase=here)
    assert SoftwareKeyStore.load(tmp_path / "k", passphrase=here).key_id == store.key_id
    for other in (elsewhere, same_id_other_board):
        with pytest.raises(KeyFileError, match="wrong passphrase"):
            SoftwareKeyStore.load(tmp_path / "k", passphrase=other)


def test_no_machine_identity_is_a_clear_error(tmp_path):
    with pytest.raises(KeyFileError, match="machine-id"):
        machine_secret(tmp_path)
