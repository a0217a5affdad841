"""The bundle manifest: what a bundle says about itself, signed. Stable API.

Parsed only after its signature has been checked (V6), then validated field by field
(V7). Unknown top-level fields are kept in :attr:`Manifest.extra` and otherwise ignored,
so newer packers can add fields older agents still read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeGuard

from edgeseal.core._stream import CIPHERS, chunk_count, sealed_size
from edgeseal.core.config import Limits
from edgeseal.core.encoding import (
    b64d,
    b64e,
    canonical_json,
    format_time,
    parse_json_object,
    parse_time,
)
from edgeseal.core.errors import MalformedBundleError

__all__ = [
    "FORMAT",
    "KEY_WRAP",
    "MODEL_FORMATS",
    "SECTION_NAMES",
    "Manifest",
    "Recipient",
    "SectionEntry",
    "Target",
    "TensorSpec",
    "is_bundle_id",
    "validate_name",
]

FORMAT = "edgeseal-bundle/1"
KEY_WRAP = "HPKE-base/DHKEM-P256-HKDF-SHA256/HKDF-SHA256/AES-128-GCM"
MODEL_FORMATS = ("onnx", "tflite")
SECTION_NAMES = ("graph", "weights", "extras")
MAX_VERSION = 2**31 - 1
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: A bundle's id: 32 lowercase hex digits (a uuid4, drawn when the bundle is packed).
_BUNDLE_ID = re.compile(r"[0-9a-f]{32}")
_SEALED_KEY_LEN = 65 + 32 + 16


def is_bundle_id(text: object) -> TypeGuard[str]:
    """Whether ``text`` is a bundle id: a string of exactly 32 lowercase hex digits (a
    ``bool``; to a type checker, also proof that ``text`` is a ``str``)."""
    return isinstance(text, str) and _BUNDLE_ID.fullmatch(text) is not None


def validate_name(name: str, what: str) -> str:
    """Model names and device ids: lowercase letters, digits, ``.``, ``_``, ``-``; <= 128."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} must be 1-128 chars of a-z, 0-9, '.', '_', '-' "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class SectionEntry:
    name: str
    plaintext_size: int
    sha256: str
    offset: int
    sealed_size: int
    chunks: tuple[str, ...]

    def to_obj(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "plaintext_size": self.plaintext_size,
            "sha256": self.sha256,
            "offset": self.offset,
            "sealed_size": self.sealed_size,
            "chunks": list(self.chunks),
        }


@dataclass(frozen=True)
class Recipient:
    device: str
    key_id: str
    sealed_key: bytes

    def to_obj(self) -> dict[str, Any]:
        return {"device": self.device, "keyid": self.key_id, "sealed_key": b64e(self.sealed_key)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Target:
    architectures: tuple[str, ...] = ("x86_64", "aarch64")
    runtime: str = "onnxruntime"
    min_agent_version: str = "0.1.0"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def to_obj(self) -> dict[str, Any]:
        return {
            "architectures": list(self.architectures),
            "runtime": self.runtime,
            "min_agent_version": self.min_agent_version,
            "execution_providers": list(self.execution_providers),
        }


@dataclass(frozen=True)
class Manifest:
    bundle_id: str
    model_name: str
    version: int
    model_format: str
    created: datetime
    expires: datetime
    target: Target
    cipher: str
    chunk_size: int
    sections: tuple[SectionEntry, ...]
    recipients: tuple[Recipient, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    signer: str
    quantization: Mapping[str, Any] | None = None
    sbom_digest: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> SectionEntry | None:
        return next((s for s in self.sections if s.name == name), None)

    def recipient_for(self, key_id: str) -> Recipient | None:
        return next((r for r in self.recipients if r.key_id == key_id), None)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = dict(self.extra)
        obj.update(
            {
                "format": FORMAT,
                "bundle_id": self.bundle_id,
                "model": {
                    "name": self.model_name,
                    "version": self.version,
                    "format": self.model_format,
                },
                "created": format_time(self.created),
                "expires": format_time(self.expires),
                "target": self.target.to_obj(),
                "cipher": self.cipher,
                "key_wrap": KEY_WRAP,
                "chunk_size": self.chunk_size,
                "sections": [s.to_obj() for s in self.sections],
                "recipients": [r.to_obj() for r in self.recipients],
                "io": {
                    "inputs": [t.to_obj() for t in self.inputs],
                    "outputs": [t.to_obj() for t in self.outputs],
                },
                "signer": self.signer,
                "quantization": dict(self.quantization) if self.quantization else None,
                "sbom_digest": self.sbom_digest,
            }
        )
        return obj

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_bytes(cls, data: bytes, *, payload_len: int, limits: Limits) -> Manifest:
        """V7: validate a manifest whose signature has been checked."""
        try:
            return _parse(parse_json_object(data, "manifest"), payload_len, limits)
        except (ValueError, TypeError, KeyError) as e:
            raise MalformedBundleError(f"manifest is invalid: {e}") from e


_KNOWN = {
    "format",
    "bundle_id",
    "model",
    "created",
    "expires",
    "target",
    "cipher",
    "key_wrap",
    "chunk_size",
    "sections",
    "recipients",
    "io",
    "signer",
    "quantization",
    "sbom_digest",
}


def _get(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise ValueError(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"field {name!r} has the wrong type")
    return value


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def _tensors(value: Any, what: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list) or len(value) > 1024:
        raise ValueError(f"{what} must be a list of at most 1024 tensors")
    out = []
    for t in value:
        shape = _get(t, "shape", list)
        if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"{what} shape entries must be integers or names")
        out.append(TensorSpec(_get(t, "name", str), _get(t, "dtype", str), tuple(shape)))
    return tuple(out)


def _parse(obj: dict[str, Any], payload_len: int, limits: Limits) -> Manifest:
    if obj.get("format") != FORMAT:
        raise ValueError(f"format must be {FORMAT!r}")
    if obj.get("key_wrap") != KEY_WRAP:
        raise ValueError(f"unknown key wrap {obj.get('key_wrap')!r}")
    model = _get(obj, "model", dict)
    version = _get(model, "version", int)
    if not 1 <= version <= MAX_VERSION:
        raise ValueError(f"model version {version} outside 1..{MAX_VERSION}")
    model_format = _get(model, "format", str)
    if model_format not in MODEL_FORMATS:
        raise ValueError(f"unknown model format {model_format!r}")
    cipher = _get(obj, "cipher", str)
    if cipher not in CIPHERS:
        raise ValueError(f"unknown cipher {cipher!r}")
    chunk_size = _get(obj, "chunk_size", int)
    if not 1 <= chunk_size <= limits.max_chunk_bytes:
        raise ValueError(f"chunk size {chunk_size} outside 1..{limits.max_chunk_bytes}")
    sections = _parse_sections(_get(obj, "sections", list), chunk_size, payload_len, limits)
    recipients = _parse_recipients(_get(obj, "recipients", list), limits)
    target = _get(obj, "target", dict)
    io = _get(obj, "io", dict)
    quantization = obj.get("quantization")
    sbom = obj.get("sbom_digest")
    if quantization is not None and not isinstance(quantization, dict):
        raise ValueError("quantization must be an object or null")
    if sbom is not None and not isinstance(sbom, str):
        raise ValueError("sbom_digest must be a string or null")
    bundle_id = _get(obj, "bundle_id", str)
    if not is_bundle_id(bundle_id):
        raise ValueError("bundle_id must be 32 hex digits")
    created = parse_time(obj.get("created"), "created")
    expires = parse_time(obj.get("expires"), "expires")
    if expires <= created:
        raise ValueError("expires must come after created")
    return Manifest(
        bundle_id=bundle_id,
        model_name=validate_name(_get(model, "name", str), "model name"),
        version=version,
        model_format=model_format,
        created=created,
        expires=expires,
        target=Target(
            architectures=_str_list(_get(target, "architectures", list), "architectures"),
            runtime=_get(target, "runtime", str),
            min_agent_version=_get(target, "min_agent_version", str),
            execution_providers=_str_list(target.get("execution_providers", []), "providers"),
        ),
        cipher=cipher,
        chunk_size=chunk_size,
        sections=sections,
        recipients=recipients,
        inputs=_tensors(io.get("inputs", []), "inputs"),
        outputs=_tensors(io.get("outputs", []), "outputs"),
        signer=_get(obj, "signer", str),
        quantization=quantization,
        sbom_digest=sbom,
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )


def _parse_sections(
    raw_sections: list[Any], chunk_size: int, payload_len: int, limits: Limits
) -> tuple[SectionEntry, ...]:
    if not 1 <= len(raw_sections) <= limits.max_sections:
        raise ValueError(f"a bundle has 1..{limits.max_sections} sections")
    sections: list[SectionEntry] = []
    offset = 0
    for s in raw_sections:
        name = _get(s, "name", str)
        if name not in SECTION_NAMES or any(x.name == name for x in sections):
            raise ValueError(f"unknown or repeated section {name!r}")
        size = _get(s, "plaintext_size", int)
        if not 0 <= size <= limits.max_section_bytes:
            raise ValueError(f"section {name} size {size} exceeds limits.max_section_bytes")
        digest = _get(s, "sha256", str)
        chunks = _str_list(_get(s, "chunks", list), f"section {name} chunks")
        if not _HEX64.fullmatch(digest) or not all(_HEX64.fullmatch(c) for c in chunks):
            raise ValueError(f"section {name} digests must be SHA-256 hex")
        # V11: sections lie back to back, each exactly as long as its chunking says.
        if _get(s, "offset", int) != offset:
            raise ValueError(f"section {name} does not start where the previous one ends")
        if _get(s, "sealed_size", int) != sealed_size(size, chunk_size):
            raise ValueError(f"section {name} sealed size does not match its plaintext size")
        if len(chunks) != chunk_count(size, chunk_size):
            raise ValueError(f"section {name} lists the wrong number of chunk digests")
        sections.append(
            SectionEntry(name, size, digest, offset, sealed_size(size, chunk_size), chunks)
        )
        offset += sealed_size(size, chunk_size)
    if offset != payload_len:
        raise ValueError("sections do not fill the payload exactly")
    if sections[0].name != "graph":
        raise ValueError("the first section must be 'graph'")
    return tuple(sections)


def _parse_recipients(raw_recipients: list[Any], limits: Limits) -> tuple[Recipient, ...]:
    if not 1 <= len(raw_recipients) <= limits.max_recipients:
        raise ValueError(f"a bundle has 1..{limits.max_recipients} recipients")
    recipients = []
    for r in raw_recipients:
        kid = _get(r, "keyid", str)
        sealed = b64d(_get(r, "sealed_key", str), "recipient sealed_key")
        if not _HEX64.fullmatch(kid) or len(sealed) != _SEALED_KEY_LEN:
            raise ValueError("a recipient entry is malformed")
        recipients.append(Recipient(_get(r, "device", str), kid, sealed))
    return tuple(recipients)
