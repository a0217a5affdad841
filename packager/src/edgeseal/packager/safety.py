"""The safety gate: refuse models that would hurt the device or leak, before sealing.

- pickle-based formats (``.pt``, ``.pkl``, ``.joblib``, ...): refused, export to ONNX;
- ONNX external data whose path escapes the model's folder (absolute, ``..``, symlinks
  out) or points past the end of its file;
- custom operator domains not allowed with ``--allow-custom-ops``;
- opsets or IR versions the target's runtime cannot load;
- tensors whose declared sizes exceed the limits;
- TFLite flatbuffers that LiteRT's verifier refuses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx

from edgeseal.core.config import Limits
from edgeseal.packager.onnx_model import ModelError

__all__ = ["UnsafeModelError", "check_onnx", "refuse_pickle"]

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt", ".sav", ".npy"}
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
#: Highest default-domain opset and IR version ONNX Runtime 1.16 (JetPack 5's wheels)
#: loads; newer runtimes load more, but a bundle must open on every supported device.
MAX_OPSET = 21
MAX_IR_VERSION = 10


class UnsafeModelError(ModelError):
    """The model is refused by the safety gate."""


def refuse_pickle(path: Path, head: bytes) -> None:
    zipped_pickle = head[:4] == b"PK\x03\x04" and path.suffix.lower() in PICKLE_SUFFIXES
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80" or zipped_pickle:
        raise UnsafeModelError(
            f"{path.name} looks like a pickle-based format, which runs code when loaded: "
            "export it to ONNX first (torch.onnx.export, tf2onnx, skl2onnx)"
        )


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for g in _graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def _check_external(tensor: onnx.TensorProto, folder: Path) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise UnsafeModelError(
            f"tensor {tensor.name}: external data path {location!r} "
            "must be a plain path inside the model's folder"
        )
    target = (folder / rel).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise UnsafeModelError(
            f"tensor {tensor.name}: external data {location!r} resolves "
            "outside the model's folder (symlink?)"
        )
    if not target.is_file():
        raise UnsafeModelError(
            f"tensor {tensor.name}: external data file {location!r} does not exist"
        )
    try:
        offset, length = int(info.get("offset", "0")), int(info.get("length", "-1"))
    except ValueError:
        raise UnsafeModelError(f"tensor {tensor.name}: bad external data offset/length") from None
    size = target.stat().st_size
    if offset < 0 or offset > size or (length >= 0 and offset + length > size):
        raise UnsafeModelError(
            f"tensor {tensor.name}: external data runs past the end of {location!r}"
        )


def check_onnx(
    path: Path, *, allow_custom_ops: Iterable[str] = (), limits: Limits | None = None
) -> onnx.ModelProto:
    """Apply the gate to an ONNX file; returns the model loaded with its external data."""
    limits = limits or Limits()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise UnsafeModelError(f"{path.name} is not a readable ONNX model: {e}") from e
    if model.ir_version > MAX_IR_VERSION:
        raise UnsafeModelError(
            f"IR version {model.ir_version} is newer than the runtimes on "
            f"devices load (max {MAX_IR_VERSION})"
        )
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > MAX_OPSET:
            raise UnsafeModelError(
                f"opset {op.version} is newer than devices' runtimes load "
                f"(max {MAX_OPSET}): re-export with a lower opset"
            )
    allowed = STANDARD_DOMAINS | set(allow_custom_ops)
    for g in _graphs(model.graph):
        for node in g.node:
            if node.domain not in allowed:
                raise UnsafeModelError(
                    f"node {node.name or node.op_type} uses custom op domain "
                    f"{node.domain!r}: allow it with --allow-custom-ops "
                    f"{node.domain} if the device's runtime has it"
                )
    for t in _tensors(model):
        if any(d < 0 for d in t.dims):
            raise UnsafeModelError(f"tensor {t.name} declares a negative dimension")
        itemsize = (
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            if t.data_type != onnx.TensorProto.STRING
            else 1
        )
        if math.prod(t.dims) * itemsize > limits.max_section_bytes:
            raise UnsafeModelError(
                f"tensor {t.name} declares {math.prod(t.dims)} elements, "
                "over limits.max_section_bytes"
            )
        if t.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(t, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise UnsafeModelError(f"cannot read the model's external data: {e}") from e
    return model
