"""Model file -> sealed bundle. Stable API.

Reads an ONNX or TFLite model, splits an ONNX graph from its weights, picks the cipher
for the target devices, wraps the content key for each device and signs with a signer
whose certificate must allow the ``pack`` role and the model's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgeseal.core.encoding import b64d, parse_json_object, utcnow
from edgeseal.core.errors import TrustError
from edgeseal.core.keyring import DeviceRecord
from edgeseal.core.keys import Signer
from edgeseal.core.manifest import Manifest, Target
from edgeseal.core.targets import TargetProfile, cipher_for, get_target
from edgeseal.core.writer import RecipientKey, seal_bundle
from edgeseal.packager.onnx_model import ModelError, load_onnx, split_onnx
from edgeseal.packager.tflite_model import is_tflite, tflite_io

__all__ = ["PackResult", "pack_model"]

AGENT_MIN_VERSION = "0.1.0"


@dataclass(frozen=True)
class PackResult:
    manifest: Manifest
    model_bytes: int
    graph_bytes: int
    weights_bytes: int
    cipher: str


def _check_certificate(signer: Signer, certificate: Mapping[str, Any], model_name: str) -> None:
    """Fail on the workstation what the device would refuse (V5, V7)."""
    import fnmatch

    payload = parse_json_object(b64d(certificate.get("payload"), "certificate"), "certificate")
    if payload.get("keyid") != signer.key_id:
        raise TrustError("the signer key does not match its certificate")
    if "pack" not in payload.get("roles", []):
        raise TrustError(f"signer {payload.get('name')!r} lacks the 'pack' role")
    if not any(fnmatch.fnmatchcase(model_name, p) for p in payload.get("model_patterns", [])):
        raise TrustError(f"signer {payload.get('name')!r} may not sign model {model_name!r}")


def pack_model(
    model_path: Path,
    out: Path,
    *,
    name: str,
    version: int,
    signer: Signer,
    certificate: Mapping[str, Any],
    devices: Sequence[DeviceRecord],
    target: TargetProfile | None = None,
    chunk_size: int = 1024 * 1024,
    validity: timedelta = timedelta(days=365),
    revocations: Mapping[str, Any] | None = None,
    root_rotations: Sequence[Mapping[str, Any]] = (),
    now: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> PackResult:
    _check_certificate(signer, certificate, name)
    if not devices:
        raise ValueError("name at least one device to pack for (--to DEVICE)")
    profile = target or get_target("generic")
    device_profiles = [get_target(d.target) for d in devices if d.target]
    cipher = cipher_for([profile, *device_profiles])
    try:
        data = model_path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read model {model_path}: {e.strerror}") from e
    if is_tflite(data):
        inputs, outputs = tflite_io(data)
        sections: dict[str, bytes | bytearray] = {"graph": data}
        fmt, runtime = "tflite", "litert"
    else:
        split = split_onnx(load_onnx(model_path))
        inputs, outputs = split.inputs, split.outputs
        sections = {"graph": split.graph, "weights": split.weights}
        fmt, runtime = "onnx", "onnxruntime"
    created = now or utcnow()
    manifest = seal_bundle(
        out,
        sections=sections,
        model_name=name,
        version=version,
        model_format=fmt,
        inputs=inputs,
        outputs=outputs,
        signer=signer,
        certificate=certificate,
        recipients=[RecipientKey(d.id, d.public_key) for d in devices],
        created=created,
        expires=created + validity,
        target=Target(
            architectures=profile.architectures,
            runtime=runtime,
            min_agent_version=AGENT_MIN_VERSION,
            execution_providers=profile.execution_providers,
        ),
        cipher=cipher,
        chunk_size=chunk_size,
        revocations=revocations,
        root_rotations=root_rotations,
        progress=progress,
    )
    return PackResult(
        manifest, len(data), len(sections["graph"]), len(sections.get("weights", b"")), cipher
    )
