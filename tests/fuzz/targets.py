"""Fuzz targets: one function per parser edgeseal runs on bytes from outside.

Each target takes ``bytes`` and either returns (the input was accepted, and what it was
accepted as is checked) or raises an :class:`EdgesealError` subclass. Any other exception,
and any :class:`PropertyViolation`, is a finding. The same functions are driven by atheris
(``tests/fuzz/run.py``), by the pure-Python fallback engine in the same file, and by the
corpus and regression replay in ``tests/fuzz/test_fuzz_replay.py``.

Targets (docs/fuzzing.md):

- ``prelude``: a whole bundle as it arrives, before anything is trusted (V1-V11).
- ``manifest``: manifest bytes, *re-signed* with the fixed test signer so every mutation
  gets past the signature (V7-V11), then key unwrap and decryption when it verifies.
- ``chunk``: chunk decryption (STREAM open, HPKE unwrap, and a whole section through
  ``BundleFile.decrypt_section_into`` with chunk digests that match the fuzzed bytes).
- ``api_body``: the local API's body decoder (``decode_arrays``: .npz and JSON).
- ``api_request``: a raw HTTP/1.1 request to the local API's request handler, served by a
  real agent with a real model.

The world the targets run in is fixed: keys are derived from constants, the clock is
:data:`NOW`, and the sample bundle is the checked-in seed ``corpus/prelude/valid.esb``
(written by ``make_corpus.py``), so corpus files and regression cases mean the same thing
on every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import socket
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core import _hpke
from edgeseal.core._stream import AES_256_GCM, CHACHA20_POLY1305, SectionCipher
from edgeseal.core.config import Limits
from edgeseal.core.errors import EdgesealError
from edgeseal.core.keys import SoftwareSigner, verify_raw_signature
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.layout import HEADER_LEN, Header, parse_header
from edgeseal.core.manifest import SectionEntry
from edgeseal.core.reader import BundleFile, VerifiedBundle, VerifyPolicy, verify_prelude
from edgeseal.core.trust import (
    TrustAnchor,
    make_revocations,
    make_rotation,
    make_signer_certificate,
)
from edgeseal.core.writer import RecipientKey, content_key_info, seal_bundle, signed_message

__all__ = ["NOW", "TARGETS", "PropertyViolation", "World", "world"]

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"
SEED_BUNDLE = CORPUS / "prelude" / "valid.esb"

NOW = datetime(2026, 11, 1, 12, 0, 0, tzinfo=timezone.utc)
#: Small limits so that "never allocates beyond the limits" is cheap to check.
LIMITS = Limits(
    max_manifest_bytes=256 * 1024,
    max_trust_bytes=64 * 1024,
    max_section_bytes=64 * 1024,
    max_chunk_bytes=4096,
    max_sections=3,
    max_recipients=64,
)
#: Plaintexts of the sample bundle's sections (the manifest's digests pin them).
GRAPH = bytes(range(256)) * 3 + b"graph-end"
WEIGHTS = hashlib.sha256(b"weights").digest() * 40
CHUNK = 128


class PropertyViolation(AssertionError):  # noqa: N818 - a finding, named as the fuzzers say
    """The input was accepted, but what it was accepted as breaks a promise."""


def _key(seed: int) -> ec.EllipticCurvePrivateKey:
    """A fixed P-256 key: test material only, derived from a small constant."""
    digest = hashlib.sha256(b"edgeseal-fuzz-key-%d" % seed).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") >> 8, ec.SECP256R1())


@dataclasses.dataclass(frozen=True)
class World:
    """The fixed keys, sample bundle and policy every bundle target runs against."""

    root1: SoftwareSigner
    root2: SoftwareSigner
    signer: SoftwareSigner
    device: InMemoryKey
    bundle: bytes
    header: Header
    manifest: bytes
    trust: bytes
    payload: bytes
    content_key: bytes
    policy: VerifyPolicy
    verified: VerifiedBundle

    def resign(self, manifest: bytes, *, payload: bytes | None = None) -> bytes:
        """A bundle with this manifest, signed by the test signer, with the sample trust
        block and payload."""
        payload = self.payload if payload is None else payload
        header = Header(1, len(manifest), len(self.trust), 64, len(payload)).to_bytes()
        sig = self.signer.sign(signed_message(header, manifest, self.trust))
        return header + manifest + self.trust + sig + payload


def build_sample_bundle(out: Path) -> None:
    """Seal the sample bundle (run by make_corpus.py; the result is checked in).

    Root 1 is pinned; the trust block carries a rotation to root 2, a revocation list
    signed by root 2 and a signer certificate issued by root 2, so V3-V5 all run.
    """
    root1, root2 = SoftwareSigner(_key(1)), SoftwareSigner(_key(2))
    signer, device = SoftwareSigner(_key(3)), InMemoryKey(_key(4))
    other = InMemoryKey(_key(5))
    cert = make_signer_certificate(
        root2,
        signer.public_key,
        name="fuzz-signer",
        roles=["pack"],
        model_patterns=["fuzz-*"],
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=3650),
    )
    revoked = {SoftwareSigner(_key(6)).key_id: "key compromise"}
    seal_bundle(
        out,
        sections={"graph": GRAPH, "weights": WEIGHTS},
        model_name="fuzz-model",
        version=3,
        model_format="onnx",
        inputs=[],
        outputs=[],
        signer=signer,
        certificate=cert,
        recipients=[
            RecipientKey("dev-fuzz", device.public_key),
            RecipientKey("dev-x", other.public_key),
        ],
        created=NOW - timedelta(hours=1),
        expires=NOW + timedelta(days=3650),
        chunk_size=CHUNK,
        revocations=make_revocations(root2, version=2, revoked=revoked, issued=NOW),
        root_rotations=[make_rotation(root1, root2, version=2)],
        extra={"note": "fuzz sample"},
    )


@functools.lru_cache(maxsize=1)
def world() -> World:
    root1, root2 = SoftwareSigner(_key(1)), SoftwareSigner(_key(2))
    signer, device = SoftwareSigner(_key(3)), InMemoryKey(_key(4))
    if SEED_BUNDLE.exists():
        bundle = SEED_BUNDLE.read_bytes()
    else:  # a fresh checkout without the corpus: same keys, a new bundle id
        with tempfile.TemporaryDirectory() as d:
            build_sample_bundle(Path(d) / "b.esb")
            bundle = (Path(d) / "b.esb").read_bytes()
    policy = VerifyPolicy(
        anchor=TrustAnchor.from_public_keys([root1.public_key]),
        now=NOW,
        floor=2,
        architecture="x86_64",
        agent_version="0.1.0",
        runtimes=("onnxruntime", "litert"),
        limits=LIMITS,
    )
    h = parse_header(bundle[:HEADER_LEN], file_len=len(bundle), limits=LIMITS)
    verified = verify_prelude(bundle, file_len=len(bundle), policy=policy)
    recipient = verified.manifest.recipient_for(device.key_id)
    assert recipient is not None
    content_key = _hpke.open_with_ecdh(
        recipient.sealed_key,
        ecdh=device.ecdh,
        recipient_point=_hpke.point_bytes(device.public_key),
        info=content_key_info(verified.manifest.bundle_id),
    )
    return World(
        root1=root1,
        root2=root2,
        signer=signer,
        device=device,
        bundle=bundle,
        header=h,
        manifest=bundle[h.manifest_offset : h.trust_offset],
        trust=bundle[h.trust_offset : h.signature_offset],
        payload=bundle[h.payload_offset :],
        content_key=content_key,
        policy=policy,
        verified=verified,
    )


# --- bundle targets ---------------------------------------------------------------------


def _check_verified(w: World, data: bytes, vb: VerifiedBundle) -> None:
    """What an accepted prelude must be: genuinely signed, within limits, self-consistent."""
    h = vb.header
    if h.total_len != len(data) or h.manifest_len > LIMITS.max_manifest_bytes:
        raise PropertyViolation("accepted a header whose lengths do not hold")
    message = signed_message(
        data[:HEADER_LEN], vb.manifest_bytes, data[h.trust_offset : h.signature_offset]
    )
    if not verify_raw_signature(
        vb.signer.public_key, data[h.signature_offset : h.payload_offset], message
    ):
        raise PropertyViolation("accepted a bundle whose signature does not verify")
    if vb.signer.key_id != w.signer.key_id:
        raise PropertyViolation("accepted a signer other than the only certified one")
    m = vb.manifest
    if sum(s.sealed_size for s in m.sections) != h.payload_len:
        raise PropertyViolation("accepted sections that do not fill the payload")
    if (
        m.version < (w.policy.floor or 0)
        or not m.created <= NOW + w.policy.clock_skew
        or m.expires <= NOW
    ):
        raise PropertyViolation("accepted a bundle the policy refuses")
    m.to_obj()  # an accepted manifest can always be written back


def _decrypt_all(w: World, data: bytes, vb: VerifiedBundle, key: bytes) -> None:
    bf = BundleFile(io.BytesIO(data), len(data))  # type: ignore[arg-type]
    for entry in vb.manifest.sections:
        out = bytearray(entry.plaintext_size)
        try:
            bf.decrypt_section_into(vb, entry, key, memoryview(out))
        except EdgesealError:
            if any(out):
                raise PropertyViolation("a failed section left plaintext in its buffer") from None
            raise
        expected = {"graph": GRAPH, "weights": WEIGHTS}.get(entry.name)
        if bytes(out) != expected:
            raise PropertyViolation(f"section {entry.name} decrypted to something never sealed")


def fuzz_prelude(data: bytes) -> None:
    """V1-V11 on a whole bundle: header, lengths, framing, trust chain, signature."""
    w = world()
    vb = verify_prelude(data, file_len=len(data), policy=w.policy)
    _check_verified(w, data, vb)
    if vb.manifest.bundle_id == w.verified.manifest.bundle_id:
        _decrypt_all(w, data, vb, w.content_key)


def fuzz_manifest(data: bytes) -> None:
    """V7-V14 behind a valid signature: the manifest bytes are re-signed with the test
    signer (the attacker who holds a signer key), then verified; when they verify, the
    content key is unwrapped from the fuzzed recipient list and every section decrypted."""
    w = world()
    if not 0 < len(data) <= LIMITS.max_manifest_bytes:
        return
    bundle = w.resign(data)
    vb = verify_prelude(bundle, file_len=len(bundle), policy=w.policy)
    _check_verified(w, bundle, vb)
    recipient = vb.manifest.recipient_for(w.device.key_id)
    if recipient is None:
        return
    key = _hpke.open_with_ecdh(
        recipient.sealed_key,
        ecdh=w.device.ecdh,
        recipient_point=_hpke.point_bytes(w.device.public_key),
        info=content_key_info(vb.manifest.bundle_id),
    )
    if key != w.content_key:
        raise PropertyViolation("a fuzzed recipient entry unwrapped to a different key")
    _decrypt_all(w, bundle, vb, key)


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4].ljust(4, b"\0"), "big")


def fuzz_chunk(data: bytes) -> None:
    """Chunk decryption. ``data[0] % 3`` picks the mode:

    0. STREAM open of one chunk: ``data[1]`` cipher, ``[2:6]`` index, ``[6:10]`` plaintext
       size (mod 4096), ``[10:12]`` chunk size, the rest is the sealed chunk.
    1. HPKE unwrap of a sealed content key (the rest) through the device's key store.
    2. A whole section through ``BundleFile.decrypt_section_into`` whose manifest lists the
       digests of the fuzzed chunks (so V13 passes and the AEAD sees them): ``[1:3]``
       plaintext size (mod 2048), the rest is the sealed section.
    """
    if not data:
        return
    w = world()
    mode = data[0] % 3
    if mode == 0:
        cipher = (AES_256_GCM, CHACHA20_POLY1305)[data[1] % 2] if len(data) > 1 else AES_256_GCM
        index, size = _u32(data, 2), _u32(data, 6) % 4096
        chunk_size = max(1, int.from_bytes(data[10:12].ljust(2, b"\0"), "big"))
        sc = SectionCipher(
            w.content_key,
            bundle_id=w.verified.manifest.bundle_id,
            section="graph",
            plaintext_size=size,
            chunk_size=chunk_size,
            cipher=cipher,
        )
        n = sc.plaintext_len(index) if index < sc.count else 0
        out = bytearray(max(0, n))
        sc.open_into(index, data[12:], memoryview(out))
        sealed = sc.seal(index, bytes(out))
        if sealed != data[12:]:
            raise PropertyViolation("a chunk opened that is not the sealing of what it opened to")
    elif mode == 1:
        key = _hpke.open_with_ecdh(
            data[1:],
            ecdh=w.device.ecdh,
            recipient_point=_hpke.point_bytes(w.device.public_key),
            info=content_key_info(w.verified.manifest.bundle_id),
        )
        if key != w.content_key:
            raise PropertyViolation("a fuzzed sealed key unwrapped to a different key")
    else:
        _fuzz_section(w, int.from_bytes(data[1:3].ljust(2, b"\0"), "big") % 2048, data[3:])


def _fuzz_section(w: World, size: int, sealed: bytes) -> None:
    m = w.verified.manifest
    sc = SectionCipher(
        w.content_key, bundle_id=m.bundle_id, section="graph", plaintext_size=size,
        chunk_size=m.chunk_size, cipher=m.cipher,
    )  # fmt: skip
    digests, pos = [], 0
    for i in range(sc.count):
        piece = sealed[pos : pos + sc.plaintext_len(i) + 16]
        digests.append(hashlib.sha256(piece).hexdigest())
        pos += sc.plaintext_len(i) + 16
    entry = SectionEntry(
        "graph", size, hashlib.sha256(GRAPH[:size]).hexdigest(), 0, pos, tuple(digests)
    )
    manifest = dataclasses.replace(m, sections=(entry,))
    vb = dataclasses.replace(
        w.verified, manifest=manifest, header=dataclasses.replace(w.header, payload_len=pos)
    )
    blob = bytes(w.header.payload_offset) + sealed
    out = bytearray(size)
    bf = BundleFile(io.BytesIO(blob), len(blob))  # type: ignore[arg-type]
    try:
        bf.decrypt_section_into(vb, entry, w.content_key, memoryview(out))
    except EdgesealError:
        if any(out):
            raise PropertyViolation("a failed section left plaintext in its buffer") from None
        raise
    if bytes(out) != GRAPH[:size]:
        raise PropertyViolation("a section decrypted to something never sealed")


# --- local API targets (agent) ------------------------------------------------------------

API_CONTENT_TYPES = (
    "application/x-npz",
    "application/json",
    "text/plain",
    "application/vnd.edgeseal.tensors",  # replaced by api.TENSORS where the API has it
)


def fuzz_api_body(data: bytes) -> None:
    """The body decoder of ``POST /v1/models/<name>/infer``: ``data[0] % 4`` picks the
    content type (npz, JSON, other, the API's tensor encoding), the rest is the body.
    The decoded arrays must not be much larger than the body (a small request must not
    make the agent allocate gigabytes)."""
    from edgeseal.agent import api

    if not data:
        return
    body = data[1:]
    ctype = API_CONTENT_TYPES[data[0] % 4]
    if data[0] % 4 == 3:
        ctype = getattr(api, "TENSORS", ctype)
    arrays = api.decode_arrays(body, ctype)
    total = sum(int(a.nbytes) for a in arrays.values())
    if total > 1024 * 1024 + 64 * len(body):
        raise PropertyViolation(f"a {len(body)}-byte body decoded to {total} bytes of arrays")


@dataclasses.dataclass
class _ApiWorld:
    api: Any
    socket_path: Path
    tmp: tempfile.TemporaryDirectory[str]


@functools.lru_cache(maxsize=1)
def _api_world() -> _ApiWorld:
    """A real agent serving a real (small) model behind its real unix-socket API."""
    from edgeseal.agent.api import ApiServer
    from edgeseal.agent.device import DeviceHome
    from edgeseal.agent.service import Agent
    from edgeseal.core.config import load_config
    from edgeseal.core.keyring import Keyring
    from edgeseal.core.keys import load_public_key
    from edgeseal.packager.pack import pack_model
    from edgeseal.packager.samples import make_onnx_classifier

    tmp = tempfile.TemporaryDirectory(prefix="esfz-")
    d = Path(tmp.name)
    ring = Keyring(d / "keys")
    ring.init_root()
    ring.new_signer("rel", roles=["pack"], model_patterns=["*"], days=3650, now=NOW)
    home = DeviceHome(d / "device")
    info = home.init(root_public_keys=[ring.root_pub_path.read_bytes()])
    ring.add_device("dev-api", load_public_key(info["public_key"].encode()), target=None)
    (d / "m.onnx").write_bytes(make_onnx_classifier(seed=1))
    sgn, cert = ring.load_signer("rel")
    pack_model(d / "m.onnx", d / "m.esb", name="clf", version=1, signer=sgn,
               certificate=cert, devices=[ring.device("dev-api")])  # fmt: skip
    agent = Agent(home, load_config(text="[agent]\nmax_rows = 64\nmax_body_bytes = 1048576\n"))
    agent.install(d / "m.esb")
    api = ApiServer(agent, d / "api.sock")
    api.start()
    return _ApiWorld(api, d / "api.sock", tmp)


def _exchange(path: Path, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise PropertyViolation(f"the API neither answered nor closed in {timeout} s") from None
        return b"".join(chunks)


def fuzz_api_request(data: bytes) -> None:
    """Raw bytes (one or more HTTP/1.1 requests) sent to the agent's unix socket; the
    agent is a black box here, so the target survives rewrites of the handler. The API
    must answer or close within 10 s, never answer 500 (its catch-all for an unexpected
    exception), and keep serving: a health check on a new connection still gets 200."""
    aw = _api_world()
    answer = _exchange(aw.socket_path, data)
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and line[9:12] == b"500":
            detail = answer[answer.find(b"{") :][:300]
            known = [f"{t.__name__}:" for t in KNOWN_FINDINGS["api_body"]]
            # A2: Content-Length "3\xb28" passes str.isdigit() ("²" is a digit) but not int()
            known.append("ValueError: invalid literal for int() with base 10:")
            if any(f'"message": "{k}'.encode() in detail for k in known):
                raise KnownFindingError(detail)
            raise PropertyViolation(f"the API answered 500: {detail!r}")
    health = _exchange(aw.socket_path, b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
    if not health.startswith(b"HTTP/1.1 200"):
        raise PropertyViolation(f"the API stopped serving after this input: {health[:200]!r}")


#: Findings reported but not fixed yet (docs/fuzzing.md, "Findings"). Their regression
#: cases replay as strict xfails, and the fuzz engines step over them so a run reaches
#: further. Remove an entry when its fix lands (the strict xfail then fails, as a
#: reminder). A1-A3 (the local API's body parsing and Content-Length) are fixed.
KNOWN_FINDINGS: dict[str, tuple[type[BaseException], ...]] = {"api_body": (), "api_request": ()}

#: Regression cases of those findings start with one of these ids.
UNFIXED: tuple[str, ...] = ()


class KnownFindingError(Exception):
    """A 500 from the API whose cause is a finding in :data:`KNOWN_FINDINGS`."""


# --- OTA control messages, fetch requests and chunk frames ------------------------------

OTA_NOW = datetime(2026, 11, 1, 12, 0, 0, tzinfo=timezone.utc)


@functools.cache
def _ota_world() -> tuple[Any, SoftwareSigner, dict[str, Any]]:
    """A pinned root and a deploy signer it certified (test material only)."""
    from edgeseal.core.trust import TrustAnchor, make_signer_certificate

    root, deployer = SoftwareSigner(_key(101)), SoftwareSigner(_key(102))
    cert = make_signer_certificate(
        root, deployer.public_key, name="fuzz-deploy", roles=["deploy"],
        model_patterns=["clf*"], not_before=OTA_NOW - timedelta(days=1),
        not_after=OTA_NOW + timedelta(days=365),
    )  # fmt: skip
    return TrustAnchor.from_public_keys([root.public_key]), deployer, cert


def fuzz_ota_message(data: bytes) -> None:
    """The device's side of OTA messages. ``data[0] % 4`` picks:

    0. ``verify_message`` on the raw wire bytes (before any signature is trusted);
    1. the rest is a *payload*, signed with the test deploy signer so it gets past the
       signature: field parsing, then the device's decision (``judge``) on what verified;
    2. a chunk server's ``parse_fetch``;  3. a device's ``decode_chunk``.
    """
    from edgeseal.core.encoding import canonical_json
    from edgeseal.core.envelope import pae
    from edgeseal.ota.decide import SeqBook, SlotView, judge
    from edgeseal.ota.messages import (
        MESSAGE_TYPE,
        decode_chunk,
        parse_fetch,
        verify_message,
    )

    if not data:
        return
    anchor, deployer, cert = _ota_world()
    mode, rest = data[0] % 4, data[1:]
    if mode == 2:
        parse_fetch(rest)
        return
    if mode == 3:
        decode_chunk(rest)
        return
    wire = rest
    if mode == 1:
        from edgeseal.core.encoding import b64e

        sig = b64e(deployer.sign(pae(MESSAGE_TYPE, rest)))
        envelope = {
            "payloadType": MESSAGE_TYPE,
            "payload": b64e(rest),
            "signatures": [{"keyid": deployer.key_id, "sig": sig}],
        }
        wire = canonical_json({"envelope": envelope, "certificate": cert})
    msg = verify_message(wire, anchor=anchor, known_revocations=None, now=OTA_NOW)
    decision = judge(
        msg, device_id="dev-a", groups=("lab",), seqs=SeqBook(),
        slots=SlotView(active=(1, "ab" * 16), fallback=None, floor=1),
    )  # fmt: skip
    if decision.verdict not in {"accept", "ignore", "refuse"}:
        raise PropertyViolation(f"judge returned {decision!r}")


TargetFn = Callable[[bytes], None]
TARGETS: dict[str, TargetFn] = {
    "ota_message": fuzz_ota_message,
    "prelude": fuzz_prelude,
    "manifest": fuzz_manifest,
    "chunk": fuzz_chunk,
    "api_body": fuzz_api_body,
    "api_request": fuzz_api_request,
}


def prepare(target: str) -> None:
    """Build what a target runs against (keys, sample bundle, agent) ahead of timing."""
    world()
    if target == "api_request":
        _api_world()


def run_one(target: str, data: bytes) -> str:
    """Run one input; return the name of the typed error it raised (``"ok"`` if none).
    Anything else propagates: that is a finding."""
    try:
        TARGETS[target](data)
    except EdgesealError as e:
        return type(e).__name__
    return "ok"


def corpus_files(target: str, *, regressions: bool = True) -> list[Path]:
    dirs = [CORPUS / target] + ([REGRESSIONS / target] if regressions else [])
    return sorted(
        p
        for d in dirs
        if d.is_dir()
        for p in d.iterdir()
        if p.is_file() and not p.name.startswith(".")
    )
