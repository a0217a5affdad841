"""Open a bundle into memory and serve inference from it. Stable API.

open_bundle follows docs/bundle-format.md: V1-V11 on the prelude, V12 unwrap through the
device's key store, V13-V14 stream-decrypt each section straight into a locked
:class:`SecretBuffer` and check digests, V15 check the sealed OMS signature against those
buffers, then build the runtime session from them. No plaintext byte of the model is
written to any file.

Before the runtime in this process sees the graph, a child process checks it and loads
it (:mod:`edgeseal.agent.preflight`), so a malicious graph is refused and a runtime crash
costs a failed open, not the process.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseal.agent.memory import LockedBytes, SecretBuffer
from edgeseal.agent.preflight import Preflight, default_preflight
from edgeseal.agent.runtimes import InferenceSession, OnnxSession, TfliteSession
from edgeseal.agent.trtcache import EngineCache
from edgeseal.core.config import Config
from edgeseal.core.extras import decode_extras
from edgeseal.core.keystore import KeyStore
from edgeseal.core.manifest import Manifest
from edgeseal.core.oms import OmsError, verify_split_signature
from edgeseal.core.reader import (
    BundleFile,
    VerifiedBundle,
    VerifyPolicy,
    check_policy,
    unwrap_content_key,
    wipe,
)
from edgeseal.core.weights import parse_weights_index

__all__ = ["OmsError", "OpenedModel", "check_oms", "open_bundle"]

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


@dataclass
class OpenedModel:
    """A verified model serving from memory. Close it to wipe its plaintext."""

    bundle: VerifiedBundle
    session: InferenceSession
    buffers: dict[str, SecretBuffer] = field(default_factory=dict)
    key_store_kind: str = "software"
    hardware_backed: bool = False
    #: What the OMS check on open found (see :func:`check_oms`).
    oms: str = "not checked"

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(inputs)

    def section_view(self, name: str) -> memoryview | None:
        """Section ``name``'s plaintext as serving reads it: the runtime's own copy where
        it reads one (LiteRT's model bytes, for a TFLite ``graph``), else its locked
        buffer; None for a section not held. What the digest re-check hashes."""
        own = self.session.own_sections().get(name)
        if own is not None:
            return memoryview(own)
        buf = self.buffers.get(name)
        return buf.view if buf is not None else None

    def status(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model": m.model_name,
            "version": m.version,
            "bundle_id": m.bundle_id,
            "signer": self.bundle.signer.name,
            "key_store": self.key_store_kind,
            "hardware_backed": self.hardware_backed,
            "oms": self.oms,
            "memory": {name: b.status().to_obj() for name, b in self.buffers.items()},
            **self.session.status(),
        }

    def close(self) -> None:
        self.session.close()
        for b in self.buffers.values():
            b.close()
        self.buffers.clear()

    def __enter__(self) -> OpenedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bundle(
    path: Path,
    *,
    key_store: KeyStore,
    policy: VerifyPolicy,
    config: Config,
    progress: Progress | None = None,
    preflight: Preflight | None = None,
    engine_cache_dir: Path | None = None,
    verified: VerifiedBundle | None = None,
) -> OpenedModel:
    """Open ``path`` into memory and build its session. ``engine_cache_dir`` is where
    this model's sealed TensorRT engine caches live (the agent's model store); without
    it, TensorRT runs with its engine cache off.

    ``verified``: ``path`` is a copy of this bundle, verified from another file moments
    ago (the agent's staged slot): it is checked against it by digest instead of being
    verified again (:meth:`~edgeseal.core.reader.BundleFile.check_copy_of`), and V8-V10
    are checked again against ``policy``."""
    buffers: dict[str, SecretBuffer] = {}
    with BundleFile.open(path) as bf:
        if verified is None:
            vb = bf.verify(policy)  # V1-V11
        else:
            # V1 and V6 by digest comparison with the verified prelude; V13-V14 below
            # check every chunk and section of this copy against the verified manifest.
            bf.check_copy_of(verified)
            check_policy(verified.manifest, policy)  # V8-V10, with this open's policy
            vb = verified
        content_key = unwrap_content_key(vb.manifest, key_store)
        try:
            for entry in vb.manifest.sections:
                buf = SecretBuffer(entry.plaintext_size)
                buffers[entry.name] = buf
                bf.decrypt_section_into(vb, entry, content_key, buf.view, progress=progress)
        except BaseException:
            for b in buffers.values():
                b.close()
            raise
        finally:
            wipe(content_key)
    try:
        oms_status = check_oms(vb, buffers)  # V15, before any runtime sees the plaintext
        cache = None
        if config.runtime.trt_engine_cache and engine_cache_dir is not None:
            cache = EngineCache(
                engine_cache_dir,
                vb.manifest.bundle_id,
                key_store,
                config.runtime.trt_engine_cache_max_bytes,
                ram_base=config.runtime.trt_engine_cache_ram_dir,
            )
        session = _session(vb, buffers, config, preflight or default_preflight(), cache)
    except BaseException:
        for b in buffers.values():
            b.close()
        raise
    opened = OpenedModel(vb, session, buffers, key_store.kind, key_store.hardware_backed)
    opened.oms = oms_status
    return opened


def check_oms(vb: VerifiedBundle, buffers: Mapping[str, SecretBuffer]) -> str:
    """V15: the sealed OMS signature, checked against the plaintext in memory, before any
    runtime sees it; a mismatch raises :class:`OmsError` and the model is refused.

    ONNX: the ``split`` signature covers the ``graph`` and ``weights`` sections exactly
    as they sit in the locked buffers. TFLite: the ``graph`` section is the model file,
    so the file signature (``bundle``) is checked against it. Returns what was checked,
    for status."""
    extras_buf = buffers.get("extras")
    extras = decode_extras(extras_buf.view) if extras_buf is not None else {}
    block = extras.get("oms")
    if not isinstance(block, dict):
        return "not sealed (packed with --no-oms)"
    signer = vb.signer.public_key
    graph = buffers.get("graph")
    if graph is None:
        raise OmsError("the bundle has no graph section for its OMS signature to cover")
    if vb.manifest.model_format == "tflite":
        if "bundle" not in block:
            raise OmsError("the OMS block holds no signature of the model file")
        verify_split_signature(block["bundle"], signer, {".": _sha256(graph.view)})
        return "verified: the model file (graph section) matches its OMS signature"
    if "split" not in block:
        # Sealed before split-form signatures existed: its file signature covers bytes
        # the device does not hold. The bundle signature still covers every section.
        return "not checkable from memory (bundle sealed without a split-form signature)"
    weights = buffers.get("weights")
    digests = {
        "graph": _sha256(graph.view),
        "weights": _sha256(weights.view) if weights is not None else _sha256(b""),
    }
    verify_split_signature(block["split"], signer, digests)
    return "verified: graph and weights in memory match the split-form OMS signature"


def _sha256(data: memoryview | bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _session(
    vb: VerifiedBundle,
    buffers: dict[str, SecretBuffer],
    config: Config,
    preflight: Preflight,
    engine_cache: EngineCache | None = None,
) -> InferenceSession:
    fmt = vb.manifest.model_format
    if fmt == "tflite":
        # The graph section is the whole model, weights included, and LiteRT takes it only
        # as bytes, which it keeps: one copy, in locked pages left out of core dumps.
        model = LockedBytes(buffers["graph"].view)
        try:
            preflight.check(
                model_format=fmt,
                graph=model.data,
                weights=[],
                limits=config.limits,
                runtime=config.runtime,
            )
            return TfliteSession(model, config.runtime)
        except BaseException:
            model.close()
            raise
    graph = bytes(buffers["graph"].view)  # ONNX: the graph without its weights
    weights = buffers.get("weights")
    entries = parse_weights_index(weights.view) if weights is not None else []
    preflight.check(
        model_format=fmt,
        graph=graph,
        weights=entries,
        limits=config.limits,
        runtime=config.runtime,
    )
    return OnnxSession(
        graph,
        weights.view if weights else None,
        entries,
        config.runtime,
        providers=vb.manifest.target.execution_providers,
        engine_cache=engine_cache,
    )
