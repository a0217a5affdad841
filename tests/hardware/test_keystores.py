"""Key stores against real parts: swtpm for TPM 2.0, SoftHSM2 for PKCS#11.

Each: provision -> pack a bundle to that device on the workstation -> open it on the
device -> inference; a bundle for one key does not open with another.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.agent.opener import open_bundle
from edgeseal.core._hpke import point_bytes
from edgeseal.core.config import Config
from edgeseal.core.errors import DecryptError, KeyStoreError, NotARecipientError
from edgeseal.hardware.pkcs11 import Pkcs11KeyStore
from edgeseal.hardware.tpm import TpmKeyStore
from edgeseal.packager.samples import reference_onnx_classifier

_labels = itertools.count()


def _check_ecdh(store) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    assert store.ecdh(point_bytes(peer.public_key())) == peer.exchange(ec.ECDH(), store.public_key)


def _pack_and_open(fleet, model, store, *, device: str) -> None:
    fleet.ring.add_device(device, store.public_key, target=None, key_store=store.kind)
    bundle, _ = fleet.pack(model, to=(device,))
    x = np.ones((2, 8), np.float32)
    with open_bundle(bundle, key_store=store, policy=fleet.policy(), config=Config()) as m:
        np.testing.assert_allclose(
            m.run({"input": x})["probs"], reference_onnx_classifier(x, seed=1), rtol=1e-5
        )
        assert m.status()["hardware_backed"] is True
    # A bundle for another device does not open with this key.
    other, _ = fleet.pack(model, to=("dev-a",))
    with pytest.raises(NotARecipientError):
        open_bundle(other, key_store=store, policy=fleet.policy(), config=Config())


@pytest.mark.tpm
def test_tpm_key_does_ecdh_inside_the_tpm(swtpm):
    _check_ecdh(TpmKeyStore.create(swtpm.tcti))


@pytest.mark.tpm
def test_tpm_device_opens_a_bundle_packed_for_it(swtpm, fleet, onnx_model, tmp_path):
    store = TpmKeyStore.create(swtpm.tcti)
    store.save(tmp_path / "tpm-key.json")
    loaded = TpmKeyStore.load(tmp_path / "tpm-key.json", tcti=swtpm.tcti)
    assert loaded.key_id == store.key_id
    _pack_and_open(fleet, onnx_model, loaded, device="tpm-dev")


@pytest.mark.tpm
def test_tpm_key_survives_a_tpm_restart(swtpm, tmp_path):
    store = TpmKeyStore.create(swtpm.tcti)
    store.save(tmp_path / "k.json")
    swtpm.restart()
    _check_ecdh(TpmKeyStore.load(tmp_path / "k.json", tcti=swtpm.tcti))


@pytest.mark.tpm
def test_pcr_bound_key_refuses_after_the_pcr_is_extended(swtpm):
    import tpm2_pytss as t

    with t.ESAPI(swtpm.tcti) as ectx:
        ectx.pcr_reset(t.ESYS_TR.PCR16)
    store = TpmKeyStore.create(swtpm.tcti, pcrs=[16])
    _check_ecdh(store)
    with t.ESAPI(swtpm.tcti) as ectx:
        ectx.pcr_event(t.ESYS_TR.PCR16, b"unexpected measurement")
    peer = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(KeyStoreError, match="policy"):
        store.ecdh(point_bytes(peer.public_key()))


@pytest.mark.tpm
def test_a_tpm_key_blob_does_not_load_into_another_tpm(swtpm, tmp_path):
    from edgeseal.hardware.simulators import Swtpm

    store = TpmKeyStore.create(swtpm.tcti)
    store.save(tmp_path / "k.json")
    other = Swtpm.in_tempdir().start()
    try:
        moved = TpmKeyStore.load(tmp_path / "k.json", tcti=other.tcti)
        with pytest.raises(KeyStoreError):
            moved.ecdh(point_bytes(ec.generate_private_key(ec.SECP256R1()).public_key()))
    finally:
        other.remove()


@pytest.mark.pkcs11
def test_pkcs11_key_does_ecdh_on_the_token(softhsm):
    store = Pkcs11KeyStore.create(
        softhsm.module, softhsm.label, softhsm.pin, key_label=f"k{next(_labels)}"
    )
    _check_ecdh(store)


@pytest.mark.pkcs11
def test_pkcs11_device_opens_a_bundle_packed_for_it(softhsm, fleet, onnx_model):
    label = f"dev{next(_labels)}"
    Pkcs11KeyStore.create(softhsm.module, softhsm.label, softhsm.pin, key_label=label)
    store = Pkcs11KeyStore.load(softhsm.module, softhsm.label, softhsm.pin, key_label=label)
    _pack_and_open(fleet, onnx_model, store, device="hsm-dev")


@pytest.mark.pkcs11
def test_pkcs11_wrong_pin_and_unknown_key_are_key_store_errors(softhsm):
    with pytest.raises(KeyStoreError):
        Pkcs11KeyStore.load(softhsm.module, softhsm.label, "0000", key_label="none")
    with pytest.raises(KeyStoreError, match="no single key"):
        Pkcs11KeyStore.load(softhsm.module, softhsm.label, softhsm.pin, key_label="none")


@pytest.mark.pkcs11
def test_a_pkcs11_key_cannot_open_what_was_wrapped_for_another(softhsm, fleet, onnx_model):
    from edgeseal.core.reader import BundleFile, unwrap_content_key

    a = Pkcs11KeyStore.create(
        softhsm.module, softhsm.label, softhsm.pin, key_label=f"a{next(_labels)}"
    )
    b = Pkcs11KeyStore.create(
        softhsm.module, softhsm.label, softhsm.pin, key_label=f"b{next(_labels)}"
    )
    fleet.ring.add_device("hsm-a", a.public_key, target=None)
    bundle, result = fleet.pack(onnx_model, to=("hsm-a",))
    # Forge: present b's key id for a's wrapped key: HPKE refuses.
    from dataclasses import replace

    forged = replace(result.manifest.recipients[0], key_id=b.key_id)
    with BundleFile.open(bundle) as bf:
        vb = bf.verify(fleet.policy())
    manifest = replace(vb.manifest, recipients=(forged,))
    with pytest.raises(DecryptError):
        unwrap_content_key(manifest, b)


@pytest.mark.tpm
def test_a_tpm_with_an_owner_password_needs_it(tmp_path):
    """Jetson provisioning may set an owner password: the store takes it."""
    import tpm2_pytss as t

    from edgeseal.hardware.simulators import Swtpm

    tpm = Swtpm.in_tempdir().start()
    try:
        with t.ESAPI(tpm.tcti) as ectx:
            ectx.hierarchy_change_auth(t.ESYS_TR.OWNER, "owner-secret")
        with pytest.raises(KeyStoreError):
            TpmKeyStore.create(tpm.tcti)
        store = TpmKeyStore.create(tpm.tcti, owner_auth="owner-secret")
        _check_ecdh(store)
    finally:
        tpm.remove()
