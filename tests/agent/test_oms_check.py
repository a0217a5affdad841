"""V15: the agent checks the sealed split-form OMS signature against the plaintext in its
locked buffers before any runtime sees it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.agent import opener
from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import load_config
from edgeseal.core.extras import decode_extras
from edgeseal.core.keys import SoftwareSigner, load_public_key
from edgeseal.core.oms import OmsError, split_signature, verify_split_signature
from edgeseal.core.reader import BundleFile, unwrap_content_key
from edgeseal.packager.pack import PackOptions


@pytest.fixture
def agent(fleet, tmp_path):
    home = DeviceHome(tmp_path / "device")
    info = home.init(root_public_keys=[fleet.ring.root_pub_path.read_bytes()])
    key = load_public_key(info["public_key"].encode(), "device")
    fleet.ring.add_device("dev-home", key, target=None, key_store="software")
    a = Agent(home, load_config(text=""))
    yield a
    a.close()


def _pack(fleet, onnx_model, oms="auto"):
    out, _ = fleet.pack(onnx_model, name="clf", to=("dev-home",), options=PackOptions(oms=oms))
    return out


def test_a_genuine_model_passes_the_oms_check_and_status_says_so(fleet, onnx_model, agent):
    agent.install(_pack(fleet, onnx_model))
    status = agent.model("clf").status()
    assert status["oms"].startswith("verified: graph and weights")


def test_weights_changed_after_decryption_are_refused_before_the_session(
    fleet, onnx_model, agent, monkeypatch
):
    """The section digests (V14) pass; a byte flipped in the locked weights buffer after
    that is caught by the OMS check, and no runtime session is built."""
    bundle = _pack(fleet, onnx_model)
    real = BundleFile.decrypt_section_into
    sessions = []

    def decrypt_then_tamper(self, vb, entry, key, view, progress=None):  # type: ignore[no-untyped-def]
        real(self, vb, entry, key, view, progress=progress)
        if entry.name == "weights":
            view[len(view) - 1] ^= 0x01

    monkeypatch.setattr(BundleFile, "decrypt_section_into", decrypt_then_tamper)
    monkeypatch.setattr(opener, "_session", lambda *a: sessions.append(a))
    with pytest.raises(OmsError, match="weights section in memory"):
        agent.install(bundle)
    assert sessions == [] and "clf" not in agent.serving


def test_check_oms_on_the_buffers_of_an_open_model(fleet, onnx_model, agent):
    agent.install(_pack(fleet, onnx_model))
    opened = agent.model("clf").opened
    assert opener.check_oms(opened.bundle, opened.buffers).startswith("verified")
    graph = opened.buffers["graph"].view
    graph[0] ^= 0x01
    with pytest.raises(OmsError, match="graph section"):
        opener.check_oms(opened.bundle, opened.buffers)
    graph[0] ^= 0x01


def test_a_bundle_packed_without_oms_says_so(fleet, onnx_model, agent):
    agent.install(_pack(fleet, onnx_model, oms="off"))
    assert agent.model("clf").status()["oms"].startswith("not sealed")


def _signed(digests):
    key = ec.generate_private_key(ec.SECP256R1())
    signer = SoftwareSigner(key)
    sig = split_signature("m.onnx", digests, public_key=key.public_key(), sign_raw=signer.sign)
    return key, sig


def test_verify_split_signature_refuses_other_keys_edits_and_other_digests():
    digests = {"graph": "aa" * 32, "weights": "bb" * 32}
    key, sig = _signed(digests)
    assert verify_split_signature(sig, key.public_key(), digests).digests == digests
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(OmsError, match="another key"):
        verify_split_signature(sig, other, digests)
    no_hint = copy.deepcopy(sig)
    no_hint["verificationMaterial"]["publicKey"]["hint"] = ""
    with pytest.raises(OmsError, match="does not verify"):
        verify_split_signature(no_hint, other, digests)
    with pytest.raises(OmsError, match="weights section"):
        verify_split_signature(sig, key.public_key(), {**digests, "weights": "cc" * 32})
    forged = copy.deepcopy(sig)
    forged["dsseEnvelope"]["payload"] = forged["dsseEnvelope"]["payload"][:-8] + "AAAAAAA="
    with pytest.raises(OmsError):
        verify_split_signature(forged, key.public_key(), digests)
    for broken in ({}, {"mediaType": "x"}, None, "text"):
        with pytest.raises(OmsError, match="malformed"):
            verify_split_signature(broken, key.public_key(), digests)


def test_the_sealed_split_signature_names_the_sections_digests(fleet, onnx_model):
    bundle, _ = fleet.pack(onnx_model, name="clf")
    with BundleFile.open(bundle) as bf:
        vb = bf.verify(fleet.policy())
        ck = unwrap_content_key(vb.manifest, fleet.devices["dev-a"])
        extras = decode_extras(bf.read_section(vb, "extras", ck))
    sections = {e.name: e.sha256 for e in vb.manifest.sections}
    st = verify_split_signature(
        extras["oms"]["split"],
        vb.signer.public_key,
        {"graph": sections["graph"], "weights": sections["weights"]},
    )
    assert st.name == onnx_model.name
    assert np.all([len(d) == 64 for d in st.digests.values()])
