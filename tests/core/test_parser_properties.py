"""Whatever the bytes, the parsers that run before decryption raise only edgeseal's typed
errors (hypothesis). Manifests and trust blocks are also fuzzed *re-signed* with the real
signer, so the fuzzing reaches the checks behind the signature."""

from __future__ import annotations

import contextlib
import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeseal.core.config import Limits
from edgeseal.core.encoding import canonical_json
from edgeseal.core.errors import EdgesealError
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import generate_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.layout import HEADER_LEN, Header, parse_header
from edgeseal.core.reader import VerifyPolicy, verify_prelude
from edgeseal.core.trust import (
    TrustAnchor,
    apply_rotations,
    verify_revocations,
    verify_signer_certificate,
)
from edgeseal.core.weights import build_weights_section, parse_weights_index
from edgeseal.core.writer import signed_message
from edgeseal.packager.pack import pack_model
from edgeseal.packager.samples import make_onnx_classifier
from helpers import NOW

FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


class Sample:
    """One real bundle, its signer and a policy to check variants against."""

    def __init__(self, tmp: Path) -> None:
        ring = Keyring(tmp / "keys")
        ring.init_root()
        ring.new_signer(
            "fuzz", roles=["pack"], model_patterns=["*"], days=30, now=NOW - timedelta(days=1)
        )
        device = InMemoryKey(generate_private_key())
        ring.add_device("dev-f", device.public_key, target=None)
        self.signer, cert = ring.load_signer("fuzz")
        (tmp / "m.onnx").write_bytes(make_onnx_classifier())
        pack_model(
            tmp / "m.onnx",
            tmp / "m.esb",
            name="fuzzed",
            version=1,
            signer=self.signer,
            certificate=cert,
            devices=ring.devices(),
            now=NOW,
            chunk_size=256,
        )
        self.data = (tmp / "m.esb").read_bytes()
        self.header = parse_header(self.data[:HEADER_LEN], file_len=len(self.data), limits=Limits())
        h = self.header
        self.manifest = json.loads(self.data[h.manifest_offset : h.trust_offset])
        self.trust = self.data[h.trust_offset : h.signature_offset]
        self.payload = self.data[h.payload_offset :]
        self.policy = VerifyPolicy(anchor=ring.anchor(), now=NOW)

    def resigned(self, manifest: bytes, trust: bytes | None = None) -> bytes:
        trust = self.trust if trust is None else trust
        header = Header(1, len(manifest), len(trust), 64, len(self.payload)).to_bytes()
        sig = self.signer.sign(signed_message(header, manifest, trust))
        return header + manifest + trust + sig + self.payload

    def check(self, data: bytes) -> None:
        with contextlib.suppress(EdgesealError):
            verify_prelude(data, file_len=len(data), policy=self.policy)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Sample:
    return Sample(tmp_path_factory.mktemp("fuzz"))


@FAST
@given(st.binary(max_size=200), st.integers(0, 2**40))
def test_header_parser_raises_only_typed_errors(data, file_len):
    try:
        h = parse_header(data, file_len=file_len, limits=Limits())
    except EdgesealError:
        return
    assert h.total_len == file_len
    assert 0 < h.manifest_len <= Limits().max_manifest_bytes


@FAST
@given(st.data())
def test_random_overwrites_of_a_real_prelude_raise_only_typed_errors(sample, data):
    buf = bytearray(sample.data[: sample.header.payload_offset])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos : pos + 4] = data.draw(st.binary(min_size=1, max_size=4))
    sample.check(bytes(buf) + sample.payload)


@FAST
@given(st.binary(max_size=400))
def test_arbitrary_bytes_after_a_valid_magic_raise_only_typed_errors(sample, tail):
    sample.check(sample.data[:8] + tail)


def _mutate(obj: Any, path: list[Any], value: Any) -> Any:
    out = copy.deepcopy(obj)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()


def _paths(obj: Any, prefix: list[Any] | None = None) -> list[list[Any]]:
    prefix = prefix or []
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append([*prefix, k])
            out += _paths(v, [*prefix, k])
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out.append([*prefix, i])
            out += _paths(v, [*prefix, i])
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_resigned_manifest_mutations_raise_only_typed_errors(sample, data):
    paths = _paths(sample.manifest)
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.just(_DELETE) | json_values)
    manifest = _mutate(sample.manifest, path, value)
    sample.check(sample.resigned(canonical_json(manifest)))


@FAST
@given(json_values)
def test_resigned_arbitrary_manifests_raise_only_typed_errors(sample, doc):
    sample.check(sample.resigned(json.dumps(doc).encode()))


@FAST
@given(st.data())
def test_resigned_trust_block_mutations_raise_only_typed_errors(sample, data):
    trust = json.loads(sample.trust)
    path = data.draw(st.sampled_from(_paths(trust)))
    mutated = _mutate(trust, path, data.draw(st.just(_DELETE) | json_values))
    sample.check(sample.resigned(canonical_json(sample.manifest), canonical_json(mutated)))


@FAST
@given(json_values)
def test_trust_documents_of_any_shape_raise_only_typed_errors(doc):
    anchor = TrustAnchor.from_public_keys([generate_private_key().public_key()])
    for call in (
        lambda: apply_rotations(anchor, [doc]),
        lambda: apply_rotations(anchor, doc if isinstance(doc, list) else [doc]),
        lambda: verify_revocations(doc, anchor),
        lambda: verify_signer_certificate(doc, anchor, now=NOW, revocations=None),
    ):
        with contextlib.suppress(EdgesealError):
            call()


@FAST
@given(st.binary(max_size=300))
def test_weights_index_of_any_bytes_raises_only_typed_errors(data):
    try:
        entries = parse_weights_index(memoryview(data))
    except EdgesealError:
        return
    for e in entries:
        assert e.offset + e.nbytes <= len(data)


@FAST
@given(st.data())
def test_mutated_weights_indexes_stay_inside_the_buffer(data):
    section = build_weights_section(
        [("w", "float32", (4, 4), bytes(64)), ("b", "int8", (3,), bytes(3))]
    )
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, min(len(section), 200) - 1))
        section[pos] = data.draw(st.integers(0, 255))
    try:
        entries = parse_weights_index(memoryview(section))
    except EdgesealError:
        return
    for e in entries:
        assert e.offset + e.nbytes <= len(section)


def test_the_resigning_harness_produces_bundles_that_verify(sample):
    """Without this, the re-signed fuzzing above could be stopping at the signature."""
    data = sample.resigned(canonical_json(sample.manifest))
    vb = verify_prelude(data, file_len=len(data), policy=sample.policy)
    assert vb.manifest.model_name == "fuzzed"
    renamed = _mutate(sample.manifest, ["model", "version"], 2)
    data = sample.resigned(canonical_json(renamed))
    assert verify_prelude(data, file_len=len(data), policy=sample.policy).manifest.version == 2


def test_unknown_manifest_fields_are_kept_and_ignored(sample):
    manifest = {**sample.manifest, "provenance_v9": {"builder": "future-packer"}}
    data = sample.resigned(canonical_json(manifest))
    vb = verify_prelude(data, file_len=len(data), policy=sample.policy)
    assert vb.manifest.extra == {"provenance_v9": {"builder": "future-packer"}}
    assert vb.manifest.to_obj()["provenance_v9"] == {"builder": "future-packer"}


def test_an_unknown_format_version_is_refused(sample):
    from edgeseal.core.errors import UnsupportedFormatError

    data = bytearray(sample.data)
    data[8:10] = (2).to_bytes(2, "big")
    with pytest.raises(UnsupportedFormatError, match="version 2"):
        verify_prelude(bytes(data), file_len=len(data), policy=sample.policy)


def test_every_verification_step_in_the_spec_is_cited_in_the_code():
    root = Path(__file__).resolve().parents[2]
    spec = (root / "docs/bundle-format.md").read_text()
    code = "".join(
        p.read_text()
        for d in ("core/src/edgeseal/core", "agent/src/edgeseal/agent")  # V15 runs in the agent
        for p in (root / d).glob("*.py")
    )
    import re

    steps = sorted(set(re.findall(r"^\| (V\d+) \|", spec, re.M)), key=lambda s: int(s[1:]))
    assert steps == [f"V{i}" for i in range(1, 16)]
    for step in steps:
        assert re.search(rf"# {step}\b", code), f"{step} is not cited in the code"
