"""Open a bundle into memory and serve inference from it. Stable API.

open_bundle follows docs/bundle-format.md: V1-V11 on the prelude, V12 unwrap through the
device's key store, V13-V14 stream-decrypt each section straight into a locked
:class:`SecretBuffer` and check digests, then build the runtime session from those
buffers. No plaintext byte of the model is written to any file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeseal.agent.memory import SecretBuffer
from edgeseal.agent.runtimes import InferenceSession, OnnxSession, TfliteSession
from edgeseal.core.config import Config
from edgeseal.core.keystore import KeyStore
from edgeseal.core.manifest import Manifest
from edgeseal.core.reader import BundleFile, VerifiedBundle, VerifyPolicy, unwrap_content_key, wipe
from edgeseal.core.weights import parse_weights_index

__all__ = ["OpenedModel", "open_bundle"]

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

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(inputs)

    def status(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model": m.model_name,
            "version": m.version,
            "bundle_id": m.bundle_id,
            "signer": self.bundle.signer.name,
            "key_store": self.key_store_kind,
            "hardware_backed": self.hardware_backed,
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
) -> OpenedModel:
    buffers: dict[str, SecretBuffer] = {}
    with BundleFile.open(path) as bf:
        vb = bf.verify(policy)
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
        session = _session(vb, buffers, config)
    except BaseException:
        for b in buffers.values():
            b.close()
        raise
    return OpenedModel(vb, session, buffers, key_store.kind, key_store.hardware_backed)


def _session(
    vb: VerifiedBundle, buffers: dict[str, SecretBuffer], config: Config
) -> InferenceSession:
    graph = bytes(buffers["graph"].view)
    if vb.manifest.model_format == "tflite":
        return TfliteSession(graph, config.runtime)
    weights = buffers.get("weights")
    entries = parse_weights_index(weights.view) if weights is not None else []
    return OnnxSession(
        graph,
        weights.view if weights else None,
        entries,
        config.runtime,
        providers=vb.manifest.target.execution_providers,
    )
