"""Golden vectors, the input profile and provenance: what the device checks itself with.

Golden vectors are a handful of inputs with the final model's outputs on this machine
and a per-output absolute tolerance: the measured spread of the same model over other
ways of computing it, times a safety factor, with a floor relative to the output's scale.

- Float and fp16 models: the spread over other session settings (graph optimizations off
  and all on, one thread) is rounding noise, which other CPUs' SIMD widths and summation
  orders can multiply; the factor is 16.
- int8 models: what differs across CPUs is the integer matrix product itself. Besides
  the session settings (which switch QDQ models between float fallback and QLinear
  kernels), the spread covers emulations of the two results CPUs compute for an int8
  GEMM, on the same golden inputs: exact int32 accumulation (ARM NEON and dot-product,
  x86 VNNI) and x86's u8s8 ``vpmaddubsw`` path (AVX2, AVX-512 without VNNI), whose
  adjacent pair sums saturate at int16. The device computes one of those up to rounding
  at ties, so the factor is 2. That single tolerance spans both families; int8 golden
  data also holds each family's own outputs with a tight per-family tolerance, and the
  agent accepts a device that matches one family on every vector. See docs/packager.md
  ("golden").
"""

from __future__ import annotations

import hashlib
import platform
import sys
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeseal.core.extras import array_to_obj
from edgeseal.core.golden import FORMAT, draw_input, numeric_outputs, sample_indices
from edgeseal.core.manifest import TensorSpec
from edgeseal.core.profile import make_profile
from edgeseal.packager.datasets import SYNTHETIC, InputData, batch_layout
from edgeseal.packager.onnx_model import ModelError

__all__ = [
    "KERNEL_FAMILIES",
    "InputSynthesisError",
    "KernelRunner",
    "Runner",
    "fixed_batch",
    "host_kernel_family",
    "host_kernels",
    "input_profile",
    "make_golden",
    "onnx_runners",
    "provenance",
    "synthetic_inputs",
    "tflite_runners",
]

#: The default seed of golden inputs and output samples (any fixed value: it is stored).
GOLDEN_SEED = 0
#: Inputs of at most this many elements per vector are stored verbatim; larger ones are
#: drawn on the device from the golden seed.
VERBATIM_MAX_ELEMENTS = 256
#: Sampled output values kept over all vectors, outputs and expectations (4 bytes each
#: for float32, a third more in base64): the golden data's share of issue 17's fixed
#: 64 KiB; and one more value per :data:`BYTES_PER_SAMPLE` bytes of the model, from its
#: 2 % (under 1 % of the model with base64 and extremes).
SAMPLE_BUDGET = 6144
BYTES_PER_SAMPLE = 800
#: Elements of each output kept per vector: at most (all when fewer), and at least.
MAX_SAMPLES = 4096
MIN_SAMPLES = 16
#: Fewest golden vectors kept when whole small outputs would pass the budget.
MIN_VECTORS = 4
#: Besides the seeded sample, each output of each vector keeps its largest-magnitude
#: elements (with their indices): at most this many, and an eighth of the sample.
EXTREMES = 32
#: Spread multiplier for float rounding noise (float32, fp16 models).
SAFETY_FACTOR = 16.0
#: Spread multiplier for int8 models, whose spread includes every integer kernel family.
KERNEL_FACTOR = 2.0
#: Largest weight matrix (K x N) the saturating u8s8 emulation expands per input row.
MAX_EMULATED_PRODUCTS = 1 << 24
#: Tolerance floor relative to each output's largest magnitude, by quantization mode.
RELATIVE_FLOOR = {"none": 1e-4, "fp16": 1e-2, "dynamic-int8": 2e-2, "static-int8": 2e-2}
#: The int8 GEMM families: exact int32 accumulation, and int16-saturated u8s8 pair sums.
EXACT = "exact"
PAIRSUM16 = "pairsum16"
KERNEL_FAMILIES = (EXACT, PAIRSUM16)
#: Floor of a per-family int8 tolerance, relative to the output's largest magnitude: a few
#: flips of one activation's quantization at a rounding tie, which float noise upstream
#: can cause on one device of a family and not on another.
FAMILY_FLOOR = 5e-3
#: A quantized output (QDQ) may move by one whole step where float noise meets a rounding
#: tie, so a per-family tolerance is at least this many of its steps: one, not two.
STEP_FACTOR = 1.25


Runner = Callable[[dict[str, npt.NDArray[Any]]], dict[str, npt.NDArray[Any]]]


def onnx_runners(model: Path) -> tuple[Runner, list[Runner]]:
    """The reference runner (basic optimizations) and variants to measure spread with."""
    import onnxruntime as ort

    def runner(
        level: str, threads: int = 0, graph: bytes | None = None, kernel: str | None = None
    ) -> Runner:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if threads:
            so.intra_op_num_threads = threads
        source = graph if graph is not None else str(model)
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return KernelRunner(
            lambda feed: dict(zip(names, sess.run(None, feed), strict=True)), kernel
        )

    def kernel_runner(level: str, threads: int = 0, kernel: str | None = None) -> KernelRunner:
        r = runner(level, threads, kernel=kernel)
        assert isinstance(r, KernelRunner)
        return r

    loaded = onnx.load(str(model), load_external_data=True)
    ops = {n.op_type for n in loaded.graph.node if n.domain in ("", "ai.onnx")}
    if ops & {"MatMulInteger", "ConvInteger"}:
        # Dynamic int8: this host's runs join the family whose emulation they match.
        host = kernel_runner("ORT_ENABLE_ALL", threads=1)
        host.host = True
        variants: list[Runner] = [runner("ORT_DISABLE_ALL"), host]
        emulations = []
        for saturate, kernel in ((False, EXACT), (True, PAIRSUM16)):
            emulated = _emulate_integer_kernels(loaded, saturate=saturate)
            if emulated is not None:
                graph = emulated.SerializeToString()
                emulations.append(runner("ORT_ENABLE_BASIC", graph=graph, kernel=kernel))
                emulations.append(runner("ORT_DISABLE_ALL", graph=graph, kernel=kernel))
        if len(emulations) == 4:
            variants += emulations[::2] + emulations[1::2]
        else:  # one family cannot be emulated: no per-family expectations
            variants += [KernelRunner(r, None) for r in emulations[::2]]
        return runner("ORT_ENABLE_BASIC"), variants
    if "QuantizeLinear" in ops and "DequantizeLinear" in ops:
        # Static int8 (QDQ): up to basic optimizations ONNX Runtime computes it in float
        # from the dequantized integers, which is exact integer accumulation up to float
        # rounding; "all" fuses QLinear int8 kernels, of this host's family. The other
        # family is emulated, so the golden data holds both whatever CPU packs it.
        reference = kernel_runner("ORT_ENABLE_BASIC", kernel=EXACT)
        reference.steps = _output_steps(loaded)
        qdq_host = kernel_runner("ORT_ENABLE_ALL", threads=1, kernel=host_kernel_family())
        qdq_host.host = True
        qdq: list[Runner] = [runner("ORT_DISABLE_ALL", kernel=EXACT), qdq_host]
        saturated = _emulate_integer_kernels(loaded, saturate=True)
        if saturated is not None:
            graph = saturated.SerializeToString()
            qdq.append(runner("ORT_ENABLE_BASIC", graph=graph, kernel=PAIRSUM16))
            qdq.append(runner("ORT_DISABLE_ALL", graph=graph, kernel=PAIRSUM16))
        return reference, qdq
    return runner("ORT_ENABLE_BASIC"), [
        runner("ORT_DISABLE_ALL"),
        runner("ORT_ENABLE_ALL", threads=1),
    ]


def _output_steps(model: onnx.ModelProto) -> dict[str, float]:
    """The quantization step of each graph output that a DequantizeLinear with a scalar
    scale produces (a QDQ model's quantized outputs move in whole steps)."""
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    steps = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs:
            scale = inits.get(node.input[1])
            if scale is not None and numpy_helper.to_array(scale).size == 1:
                steps[node.output[0]] = float(numpy_helper.to_array(scale).reshape(()))
    return steps


class KernelRunner:
    """A runner that knows which int8 kernel family it computes (None: unknown, or a
    float model), and the quantization step of outputs that move in steps. Plain
    callables are runners of unknown family."""

    def __init__(self, run: Runner, kernel: str | None) -> None:
        self.run = run
        self.kernel = kernel
        self.steps: dict[str, float] = {}
        #: This machine's own int8 kernels (ONNX Runtime at "all"), as opposed to an
        #: emulation: the one runner whose result depends on the packing CPU.
        self.host = False

    def __call__(self, feed: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return self.run(feed)


def host_kernel_family() -> str | None:
    """The int8 GEMM family ONNX Runtime's CPU kernels compute on this machine: ``exact``
    on arm64 and x86 with VNNI, ``pairsum16`` on x86 without VNNI; None when unknown."""
    return host_kernels()[0]


def host_kernels(cpuinfo: str | None = None, machine: str | None = None) -> tuple[str | None, str]:
    """(family, evidence): :func:`host_kernel_family` and what it was read from (the
    machine type and the CPU flags that decided it), recorded in the provenance. The
    golden data does not depend on it (both families are emulated); it only names which
    family this machine's own ONNX Runtime kernels are checked against."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return EXACT, f"{machine}: NEON integer dot products accumulate exactly"
    if machine not in ("x86_64", "amd64"):
        return None, f"{machine}: unknown int8 kernels"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError as e:
            return None, f"{machine}: /proc/cpuinfo unreadable ({e.strerror})"
    flags = set(cpuinfo.split())
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni"})
    if vnni:
        return EXACT, f"{machine} with {' and '.join(vnni)}"
    if "avx2" not in flags:
        return None, f"{machine} without AVX2: unknown int8 kernels"
    return PAIRSUM16, f"{machine} with AVX2, without VNNI: u8s8 pair sums saturate at int16"


class _Rewriter:
    """Appends nodes and constants to a copy of a graph under fresh names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.opset = next(
            (o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0
        )
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def name(self) -> str:
        self._n += 1
        return f"_edgeseal_emulated_{self._n}"

    def const(self, value: npt.NDArray[Any]) -> str:
        name = self.name()
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self.name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def array(self, name: str) -> npt.NDArray[Any] | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def reduce_sum(self, x: str, axis: int) -> str:
        if self.opset >= 13:
            return self.op("ReduceSum", x, self.const(np.array([axis], np.int64)), keepdims=0)
        return self.op("ReduceSum", x, axes=[axis], keepdims=0)


def _scalar_zero_point(rw: _Rewriter, name: str, producers: dict[str, str]) -> bool:
    """A zero point the emulation may broadcast: absent, a scalar, or DynamicQuantizeLinear's."""
    if not name or producers.get(name) == "DynamicQuantizeLinear":
        return True
    value = rw.array(name)
    return value is not None and value.size == 1


def _matmul_integer(
    rw: _Rewriter, node: onnx.NodeProto, producers: dict[str, str], *, saturate: bool
) -> bool:
    """MatMulInteger as int32 arithmetic; with ``saturate``, the x86 u8s8 path: products of
    the raw uint8 activations and int8 weights summed in adjacent pairs, each pair clamped
    to int16, then zero points corrected exactly. False when it cannot be emulated."""
    a, b, a_zp, b_zp = (*node.input, "", "")[:4]
    if not _scalar_zero_point(rw, a_zp, producers):
        return False
    i32 = TensorProto.INT32
    weights = rw.array(b)
    if not saturate or weights is None or weights.ndim != 2 or weights.dtype != np.int8:
        # Exact int32 accumulation, computed in float64: every product of two 8-bit values
        # less their zero points is below 2**16, so sums over any K below 2**37 are exact,
        # and ONNX Runtime's double GEMM is some 40x faster than its int32 MatMul.
        f64 = TensorProto.DOUBLE
        lhs = rw.op("Cast", a, to=f64)
        rhs = rw.op("Cast", b, to=f64)
        if a_zp:
            lhs = rw.op("Sub", lhs, rw.op("Cast", a_zp, to=f64))
        if b_zp:
            rhs = rw.op("Sub", rhs, rw.op("Cast", b_zp, to=f64))
        product = rw.op("MatMul", lhs, rhs)
        rw.nodes.append(helper.make_node("Cast", [product], [node.output[0]], to=i32))
        return True
    k, n = weights.shape
    if k * n > MAX_EMULATED_PRODUCTS:
        return False
    w = weights.astype(np.int32)
    padded = np.vstack([w, np.zeros((k % 2, n), np.int32)]).astype(np.float32)
    half = (k + k % 2) // 2
    rows = rw.op("Reshape", rw.op("Cast", a, to=i32), rw.const(np.array([-1, k], np.int64)))
    if k % 2:
        rows = rw.op("Pad", rows, rw.const(np.array([0, 0, 0, 1], np.int64)))
    # Each pair sum a[2p] w[2p] + a[2p+1] w[2p+1] made at once from the even and odd
    # halves, in float32: a product of uint8 and int8 and a sum of two are integers far
    # below 2**24, so exact, and ONNX Runtime's float kernels are the fast ones.
    pairs = rw.op("Reshape", rows, rw.const(np.array([-1, half, 2], np.int64)))
    split = rw.op("Cast", pairs, to=TensorProto.FLOAT)
    even, odd = (
        rw.op(
            "Slice",
            split,
            rw.const(np.array([i], np.int64)),
            rw.const(np.array([i + 1], np.int64)),
            rw.const(np.array([2], np.int64)),
        )
        for i in (0, 1)
    )
    pair_sums = rw.op(
        "Add",
        rw.op("Mul", even, rw.const(padded[0::2])),
        rw.op("Mul", odd, rw.const(padded[1::2])),
    )
    clamped = rw.op(
        "Max",
        rw.op("Min", pair_sums, rw.const(np.array(32767, np.float32))),
        rw.const(np.array(-32768, np.float32)),
    )
    # The sum over pairs can pass 2**24: in int32, as the kernel accumulates.
    acc = rw.reduce_sum(rw.op("Cast", clamped, to=i32), 1)
    if a_zp:
        azp = rw.op("Cast", a_zp, to=i32)
        acc = rw.op("Sub", acc, rw.op("Mul", azp, rw.const(w.sum(axis=0, dtype=np.int32))))
    if b_zp:
        bzp = rw.op("Cast", b_zp, to=i32)
        row_sums = (
            rw.op(
                "Unsqueeze",
                rw.reduce_sum(rows, 1),
                rw.const(np.array([1], np.int64)),
            )
            if rw.opset >= 13
            else rw.op("Unsqueeze", rw.reduce_sum(rows, 1), axes=[1])
        )
        acc = rw.op("Sub", acc, rw.op("Mul", row_sums, bzp))
        if a_zp:
            kk = rw.const(np.array(k, np.int32))
            acc = rw.op("Add", acc, rw.op("Mul", kk, rw.op("Mul", azp, bzp)))
    lead = rw.op(
        "Slice",
        rw.op("Shape", a),
        rw.const(np.array([0], np.int64)),
        rw.const(np.array([-1], np.int64)),
    )
    shape = rw.op("Concat", lead, rw.const(np.array([n], np.int64)), axis=0)
    rw.nodes.append(helper.make_node("Reshape", [acc, shape], [node.output[0]]))
    return True


def _conv_integer(rw: _Rewriter, node: onnx.NodeProto, producers: dict[str, str]) -> bool:
    """ConvInteger as a float Conv over zero-point-corrected integers (exact while partial
    sums stay below 2**24). False when it cannot be emulated."""
    x, w, x_zp, w_zp = (*node.input, "", "")[:4]
    weights = rw.array(w)
    if weights is None or not _scalar_zero_point(rw, x_zp, producers):
        return False
    wf = weights.astype(np.float32)
    if w_zp:
        zp = rw.array(w_zp)
        if zp is None:
            return False
        wf = wf - zp.astype(np.float32).reshape(-1, *[1] * (wf.ndim - 1))
    xf = rw.op("Cast", x, to=TensorProto.FLOAT)
    if x_zp:
        xf = rw.op("Sub", xf, rw.op("Cast", x_zp, to=TensorProto.FLOAT))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    conv = rw.op("Conv", xf, rw.const(wf), **attrs)
    rw.nodes.append(helper.make_node("Cast", [conv], [node.output[0]], to=TensorProto.INT32))
    return True


_QdqOperands = tuple[str, npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]


def _qdq_operands(
    rw: _Rewriter, node: onnx.NodeProto, dequantized: dict[str, onnx.NodeProto]
) -> _QdqOperands | None:
    """(quantized activation, its zero point, int8 weights as K x N, their zero point,
    activation scale times weight scale) of a QDQ MatMul or Gemm with int8 weights and a
    per-tensor activation, or None when the node is not one."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain_gemm = (
        not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0
    )
    a_dq, b_dq = dequantized.get(node.input[0]), dequantized.get(node.input[1])
    if (node.op_type == "Gemm" and not plain_gemm) or a_dq is None or b_dq is None:
        return None
    a_q, a_scale, a_zp = (*a_dq.input, "")[:3]
    b_q, b_scale, b_zp = (*b_dq.input, "")[:3]
    weights, w_scale, x_scale = rw.array(b_q), rw.array(b_scale), rw.array(a_scale)
    x_zp = rw.array(a_zp) if a_zp else np.array(0, np.int8)
    w_zp = rw.array(b_zp) if b_zp else np.zeros((), np.int8)
    trans_b = bool(attrs.get("transB", 0))
    b_axis = int(
        next((helper.get_attribute_value(a) for a in b_dq.attribute if a.name == "axis"), 1)
    )
    if (
        weights is None
        or w_scale is None
        or x_scale is None
        or x_zp is None
        or w_zp is None
        or weights.dtype != np.int8
        or weights.ndim != 2
        or x_scale.size != 1
        or x_zp.size != 1
        # per-channel along the reduced axis: not a QLinear GEMM
        or (w_scale.size > 1 and b_axis % 2 != (0 if trans_b else 1))
    ):
        return None
    scale = (x_scale.astype(np.float32).reshape(()) * w_scale.astype(np.float32)).astype(np.float32)
    return a_q, x_zp, np.ascontiguousarray(weights.T if trans_b else weights), w_zp, scale


def _qdq_matmul(
    rw: _Rewriter,
    node: onnx.NodeProto,
    dequantized: dict[str, onnx.NodeProto],
    producers: dict[str, str],
    *,
    saturate: bool,
) -> bool:
    """A QDQ MatMul or Gemm (int8 activations and weights, each behind a
    DequantizeLinear) as the QLinear kernel ONNX Runtime fuses it into at "all": an
    integer matrix product (``_matmul_integer``) scaled back to float. With ``saturate``,
    x86's path: int8 activations shifted to uint8 (ONNX Runtime's QDQ S8-to-U8 rewrite
    on x86) and multiplied with the u8s8 pair sums. False when the node is not that."""
    operands = _qdq_operands(rw, node, dequantized)
    if operands is None:
        return False
    a_in, x_zp, weights, w_zp, scale = operands
    if saturate and x_zp.dtype == np.int8:
        shifted = rw.op("Cast", a_in, to=TensorProto.INT32)
        a_in = rw.op("Add", shifted, rw.const(np.array(128, np.int32)))
        x_zp = x_zp.astype(np.int32) + 128
    acc = rw.name()
    integer = helper.make_node(
        "MatMulInteger", [a_in, rw.const(weights), rw.const(x_zp), rw.const(w_zp)], [acc]
    )
    if not _matmul_integer(rw, integer, producers, saturate=saturate):
        return False
    y = rw.op("Mul", rw.op("Cast", acc, to=TensorProto.FLOAT), rw.const(scale))
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        rw.nodes.append(helper.make_node("Add", [y, node.input[2]], [node.output[0]]))
    else:
        rw.nodes.append(helper.make_node("Identity", [y], [node.output[0]]))
    return True


def _emulate_integer_kernels(model: onnx.ModelProto, *, saturate: bool) -> onnx.ModelProto | None:
    """A copy of ``model`` whose integer matrix products compute what one family of CPU
    kernels computes: exact int32 accumulation, or (``saturate``) x86's u8s8 pair sums
    clamped to int16. Integer products are MatMulInteger and ConvInteger (dynamic int8)
    and QDQ MatMul/Gemm over int8 (static int8, as ONNX Runtime fuses them at "all").
    None when no op could be emulated that way."""
    rw = _Rewriter(model)
    producers = {o: n.op_type for n in rw.graph.node for o in n.output}
    dequantized = {
        n.output[0]: n
        for n in rw.graph.node
        if n.domain in ("", "ai.onnx") and n.op_type == "DequantizeLinear"
    }
    changed = False
    for node in rw.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type == "MatMulInteger":
            done = _matmul_integer(rw, node, producers, saturate=saturate)
        elif node.domain in ("", "ai.onnx") and node.op_type == "ConvInteger" and not saturate:
            done = _conv_integer(rw, node, producers)
        elif node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
            done = _qdq_matmul(rw, node, dequantized, producers, saturate=saturate)
        else:
            done = False
        if not done:
            rw.nodes.append(node)
        changed = changed or done
    if not changed:
        return None
    del rw.graph.node[:]
    rw.graph.node.extend(rw.nodes)
    return rw.model


def tflite_runners(model: bytes) -> tuple[Runner, list[Runner]]:
    from ai_edge_litert.interpreter import Interpreter

    def runner(threads: int | None) -> Runner:
        interp = Interpreter(model_content=model, num_threads=threads)
        interp.allocate_tensors()
        ins = {d["name"]: d for d in interp.get_input_details()}
        outs = interp.get_output_details()

        def run(feed: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
            for k, v in feed.items():
                if tuple(v.shape) != tuple(ins[k]["shape"]):
                    interp.resize_tensor_input(ins[k]["index"], v.shape)
                    interp.allocate_tensors()
                interp.set_tensor(ins[k]["index"], v)
            interp.invoke()
            return {d["name"]: interp.get_tensor(d["index"]).copy() for d in outs}

        return run

    return runner(None), [runner(1)]


def _distance(a: dict[str, npt.NDArray[Any]], b: dict[str, npt.NDArray[Any]], name: str) -> float:
    x, y = a[name].astype(np.float64), b[name].astype(np.float64)
    return float(np.abs(x - y).max(initial=0.0))


def make_golden(
    reference: Runner,
    variants: list[Runner],
    data: InputData,
    *,
    mode: str,
    count: int = 8,
    batch: int = 1,
    seed: int = GOLDEN_SEED,
    model_bytes: int = 0,
) -> dict[str, Any]:
    """Golden data (format 2, compact) for ``count`` feeds of ``batch`` rows (a model with
    a fixed batch dimension takes exactly that many), with per-output tolerances derived
    from the spread.

    An input of at most :data:`VERBATIM_MAX_ELEMENTS` per feed is stored as it is (data
    rows, half of them midpoints of two); a larger one is described by its dtype, shape
    and the data's statistics, and drawn from ``seed`` by
    :func:`edgeseal.core.golden.draw_input`, here and on the device. Each output keeps
    its shape and a seeded sample of its elements (:func:`_samples_per_output`: more for
    a larger model, ``model_bytes``, as issue 17's bound allows 2 % of it), and its
    largest elements the sample missed (:func:`_extremes`); the tolerances are measured
    on those elements.

    For an int8 model whose runners (:class:`KernelRunner`) cover both kernel families,
    each vector also gets ``expected_by_kernel`` and the golden data ``kernel_tolerances``:
    per family, its expected outputs (same samples) and a tolerance from the spread within
    the family."""
    n = min(count, data.rows // batch)
    if n == 0:
        raise ValueError(f"need at least {batch} rows of data for golden vectors")
    rows = [data.feed(i * batch, (i + 1) * batch) for i in range(n)]
    # Real rows are often classified with near-certainty, where a saturated softmax hides
    # any change to the weights. Half the vectors are midpoints of two real rows instead:
    # nearer the decision boundaries, where outputs move with the weights.
    for i in range(n // 2, n):
        a, b = rows[i], rows[(i + 1) % n]
        rows[i] = {
            k: np.asarray((a[k].astype(np.float64) + b[k].astype(np.float64)) / 2, a[k].dtype)
            if a[k].dtype.kind == "f"
            else a[k]
            for k in a
        }
    specs = {name: _input_spec([r[name] for r in rows]) for name in rows[0]}
    feeds = [
        {
            name: row[name]
            if spec["draw"] == "verbatim"
            else draw_input(spec, seed=seed, vector=i, name=name)
            for name, spec in specs.items()
        }
        for i, row in enumerate(rows)
    ]
    runners = [reference, *variants]
    # full[r][v]: runner r's numeric outputs on vector v; runs[r][v]: their samples
    full = [[numeric_outputs(r(feed)) for feed in feeds] for r in runners]
    names = list(full[0][0])
    int8 = mode.endswith("int8")
    both = {getattr(r, "kernel", None) for r in runners} >= set(KERNEL_FAMILIES)
    expectations = 1 + (len(KERNEL_FAMILIES) if int8 and both else 0)
    verbatim = [spec["values"] for spec in specs.values() if spec["draw"] == "verbatim"]
    per_output = _samples_per_output(
        n,
        len(names),
        expectations,
        model_bytes,
        spent=sum(int(np.size(v)) for values in verbatim for v in values),
    )
    # Outputs no larger than the sample are kept whole, which the share does not bound:
    # when every vector's kept values (each expectation's outputs, and the inputs stored
    # verbatim) pass the budget, fewer vectors are kept (at least MIN_VECTORS).
    per_vector = expectations * sum(
        min(int(full[0][0][name].size), per_output) for name in names
    ) + sum(int(np.size(values[0])) for values in verbatim)
    keep = max(min(n, MIN_VECTORS), min(n, _sample_budget(model_bytes) // max(per_vector, 1)))
    if keep < n:
        n = keep
        full = [vectors_[:n] for vectors_ in full]
        for spec in specs.values():
            if spec["draw"] == "verbatim":
                spec["values"] = spec["values"][:n]
    sampled = [
        {
            name: sample_indices(out[name].size, per_output, seed=seed, vector=v, name=name)
            for name in names
        }
        for v, out in enumerate(full[0])
    ]
    extremes = [
        {name: _extremes(out[name], sampled[v][name], per_output // 8) for name in names}
        for v, out in enumerate(full[0])
    ]
    runs = [
        [
            {
                name: out[v][name].reshape(-1)[
                    np.concatenate([sampled[v][name], extremes[v][name]])
                ]
                for name in names
            }
            for v in range(n)
        ]
        for out in full
    ]

    def kept(r: int, v: int) -> dict[str, Any]:
        result = {}
        for name in names:
            values, count = runs[r][v][name], sampled[v][name].size
            obj = {"shape": list(full[r][v][name].shape), "values": array_to_obj(values[:count])}
            if extremes[v][name].size:
                obj["extremes"] = {
                    "index": array_to_obj(extremes[v][name]),
                    "values": array_to_obj(values[count:]),
                }
            result[name] = obj
        return result

    spreads = {
        name: max(_distance(run[v], runs[0][v], name) for run in runs for v in range(n))
        for name in names
    }
    for spec in specs.values():
        if spec["draw"] == "verbatim":
            spec["values"] = [array_to_obj(a) for a in spec["values"]]
    vectors: list[dict[str, Any]] = [{"outputs": kept(0, v)} for v in range(n)]
    scales = {
        name: max(float(np.abs(runs[0][v][name]).max(initial=0.0)) for v in range(n))
        for name in names
    }
    factor = KERNEL_FACTOR if int8 else SAFETY_FACTOR
    tolerances = {
        name: {
            "atol": max(
                factor * spreads[name], RELATIVE_FLOOR.get(mode, 2e-2) * max(scales[name], 1e-6)
            ),
            "measured_spread": spreads[name],
            "factor": factor,
        }
        for name in names
    }
    golden: dict[str, Any] = {
        "format": FORMAT,
        "seed": seed,
        "inputs": specs,
        "vectors": vectors,
        "tolerances": tolerances,
        "mode": mode,
    }
    families = _kernel_families(runners, runs, names) if int8 else None
    if families is not None:
        expected, family_spreads = families
        steps: dict[str, float] = getattr(reference, "steps", {})
        for v, vector in enumerate(vectors):
            vector["expected_by_kernel"] = {
                kernel: kept(first, v) for kernel, first in expected.items()
            }
        golden["kernel_tolerances"] = {
            kernel: {
                name: {
                    "atol": _family_atol(family_spreads[name], scales[name], steps.get(name)),
                    "measured_spread": family_spreads[name],
                    "factor": KERNEL_FACTOR,
                }
                for name in names
            }
            for kernel in expected
        }
    return golden


def _extremes(output: npt.NDArray[Any], sampled: npt.NDArray[np.int64], share: int) -> Any:
    """The flat indices (int64, sorted) of the largest-magnitude elements of a reference
    output that the seeded sample missed, at most :data:`EXTREMES` and ``share`` (an
    eighth of the sample: within the budget): a softmax moves most where it is large,
    and a random sample of a large output mostly holds near-zero values."""
    count = min(EXTREMES, share)
    flat = np.abs(output.astype(np.float64).reshape(-1))
    if flat.size <= sampled.size or count <= 0:
        return np.empty(0, np.int64)
    top = np.argsort(-flat, kind="stable")[: count + sampled.size]
    return np.sort(top[~np.isin(top, sampled)][:count]).astype(np.int64)


def _sample_budget(model_bytes: int) -> int:
    """Golden values a bundle may keep: :data:`SAMPLE_BUDGET`, and one per
    :data:`BYTES_PER_SAMPLE` bytes of the model."""
    return SAMPLE_BUDGET + max(model_bytes, 0) // BYTES_PER_SAMPLE


def _samples_per_output(
    vectors: int, outputs: int, expectations: int, model_bytes: int = 0, spent: int = 0
) -> int:
    """How many elements of each output each vector keeps: :data:`SAMPLE_BUDGET` values,
    and one per :data:`BYTES_PER_SAMPLE` bytes of the model, less the ``spent`` values of
    inputs stored verbatim, shared by every vector, output and expectation (an int8 model
    has one per kernel family besides its own), within [:data:`MIN_SAMPLES`,
    :data:`MAX_SAMPLES`]."""
    budget = _sample_budget(model_bytes) - spent
    share = budget // max(vectors * outputs * expectations, 1)
    return max(MIN_SAMPLES, min(MAX_SAMPLES, share))


def _input_spec(values: list[npt.NDArray[Any]]) -> dict[str, Any]:
    """How golden data holds one input, given its value in every vector: verbatim
    (``values``, turned into array objects by the caller) when small, of varying shape
    or not finite; else how to draw it (:func:`edgeseal.core.golden.draw_input`), from
    the statistics of these values."""
    first = values[0]
    large = first.size > VERBATIM_MAX_ELEMENTS and all(v.shape == first.shape for v in values)
    if not large or first.dtype.kind not in "biuf":
        return {"draw": "verbatim", "values": values}
    base = {"dtype": first.dtype.name, "shape": list(first.shape)}
    if first.dtype.kind == "f":
        stack = np.stack(values).astype(np.float64)
        if not np.isfinite(stack).all():
            return {"draw": "verbatim", "values": values}
        return {
            **base,
            "draw": "normal",
            "mean": float(stack.mean()),
            "std": float(stack.std()),
            "min": float(stack.min()),
            "max": float(stack.max()),
        }
    stack = np.stack(values)
    return {**base, "draw": "integers", "low": int(stack.min()), "high": int(stack.max())}


def _family_atol(spread: float, scale: float, step: float | None) -> float:
    """One kernel family's tolerance for an output. A family's kernels are the same code
    on every CPU of the family, so what differs is rounding: float noise (a factor on the
    measured spread) or, for an output that moves in quantization steps, requantizing at
    a tie (the measured whole steps and a quarter step, at least one step and a quarter;
    doubling a one-step spread would let a weight change of two steps through)."""
    floor = FAMILY_FLOOR * max(scale, 1e-6)
    if step:
        return max(spread + (STEP_FACTOR - 1) * step, STEP_FACTOR * step, floor)
    return max(KERNEL_FACTOR * spread, floor)


def _kernel_families(
    runners: list[Runner], runs: list[list[dict[str, npt.NDArray[Any]]]], names: list[str]
) -> tuple[dict[str, int], dict[str, float]] | None:
    """Each kernel family's expectation (the index of its first runner) and the spread
    within a family, or None unless both families have runners.

    A runner of unknown family (this host's own kernels, when not known up front) joins
    the family whose expectation it is nearest. The spread is the largest distance of a
    runner from its family's expectation, over every family: the family this host does
    not compute is only emulated here, so it borrows the gap measured between this
    host's kernels and the emulation of their family."""
    kernels = [getattr(r, "kernel", None) for r in runners]
    expected: dict[str, int] = {}
    for i, kernel in enumerate(kernels):
        if kernel is not None:
            expected.setdefault(kernel, i)
    if set(expected) != set(KERNEL_FAMILIES):
        return None

    def distance(i: int, j: int, name: str) -> float:
        return max(_distance(a, b, name) for a, b in zip(runs[i], runs[j], strict=True))

    spreads = dict.fromkeys(names, 0.0)
    for i, known in enumerate(kernels):
        kernel = known or min(
            expected, key=lambda k: max(distance(i, expected[k], name) for name in names)
        )
        for name in names:
            spreads[name] = max(spreads[name], distance(i, expected[kernel], name))
    return expected, spreads


def fixed_batch(specs: tuple[TensorSpec, ...]) -> int | None:
    """The batch size a model insists on (a fixed batch dimension), or None when free."""
    return batch_layout(specs).fixed


#: Sizes tried, in order, for a symbolic dimension other than the batch (an image's
#: height and width, a sequence length): the first the model runs with is kept.
DIM_CANDIDATES = (32, 64, 16, 128, 8, 224, 1)


class InputSynthesisError(ModelError):
    """No input this model accepts could be built from its input specs."""

    hint = (
        "give sample inputs: --sample-inputs FILE.npz (one array per input, named after "
        "it; batched inputs with rows along their batch axis, other inputs in the model's "
        "shape), or --calibration / --eval data"
    )


def _draw(rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(0, 8, size=shape).astype(dtype)


def synthetic_inputs(
    specs: tuple[TensorSpec, ...],
    *,
    rows: int = 16,
    seed: int = 0,
    probe: Runner | None = None,
    hints: Mapping[str, int] | None = None,
) -> InputData:
    """Inputs drawn from the model's own input specs, when no data was given.

    Rows run along each input's batch axis (:func:`batch_layout`); a fixed-batch model
    gets ``rows`` batches. Dimensions sharing a name get one size; the batch dimension
    is the row count; a dimension the weights imply (``hints``, by dim name or
    ``input:axis``: :func:`edgeseal.packager.onnx_model.dim_hints`) takes that size;
    other symbolic dimensions take the first of :data:`DIM_CANDIDATES` that ``probe``
    (the model, run on one batch) accepts. Floats are N(0, 1), integers 0..7, booleans
    either. Raises :class:`InputSynthesisError`, naming the inputs, when the model
    accepts none."""
    layout = batch_layout(specs)
    batch = layout.fixed or 1
    total = rows * batch
    others = sorted(
        {
            d
            for s in specs
            for i, d in enumerate(s.shape)
            if isinstance(d, str) and d not in ("?", layout.name) and i != layout.axes.get(s.name)
        }
        | {
            f"{s.name}:{i}"
            for s in specs
            for i, d in enumerate(s.shape)
            if (d == "?" or (isinstance(d, int) and d <= 0)) and i != layout.axes.get(s.name)
        }
    )

    known = dict(hints or {})
    others = [o for o in others if o not in known]

    def build(size: int) -> InputData:
        rng = np.random.default_rng(seed)
        inputs: dict[str, npt.NDArray[Any]] = {}
        for s in specs:
            axis = layout.axes.get(s.name)
            shape = []
            for i, d in enumerate(s.shape):
                if i == axis:
                    shape.append(total)
                elif isinstance(d, int) and d > 0:
                    shape.append(d)
                elif d == layout.name:
                    shape.append(batch)
                else:
                    key = d if isinstance(d, str) and d != "?" else f"{s.name}:{i}"
                    shape.append(known.get(key, size))
            inputs[s.name] = _draw(rng, np.dtype(s.dtype), tuple(shape))
        return InputData(inputs, None, dict(layout.axes), SYNTHETIC)

    if probe is None:
        return build(DIM_CANDIDATES[0])
    errors = []
    for size in DIM_CANDIDATES if others else DIM_CANDIDATES[:1]:
        data = build(size)
        try:
            probe(data.feed(0, batch))
        except Exception as e:  # the runtime's own error types: try the next size
            errors.append(f"{str(e).strip().splitlines()[-1][:300]}")
            continue
        return data
    integers = [s.name for s in specs if not np.issubdtype(np.dtype(s.dtype), np.floating)]
    shaped = [s.name for s in specs if any(not (isinstance(d, int) and d > 0) for d in s.shape)]
    # Sizes were tried for symbolic dims; integer values (ids, rates, flags) were guessed.
    risky = integers or shaped or [s.name for s in specs]
    tried = f" (sizes {', '.join(map(str, DIM_CANDIDATES))} for {', '.join(others)})"
    raise InputSynthesisError(
        f"cannot build inputs this model runs with for input(s) {', '.join(risky)}"
        f"{tried if others else ''}: {errors[0] if errors else 'no attempt'}"
    )


def input_profile(data: InputData) -> dict[str, Any]:
    """The profile the agent checks requests against (``edgeseal.core.profile``), of the
    inputs whose rows run along axis 0, as the agent scores them; the others (fed whole,
    or a state with rows on another axis) are checked by the schema only."""
    return make_profile({k: v for k, v in data.inputs.items() if data.axis(k) == 0})


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _digest(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def provenance(
    *,
    source: Path,
    final: Path,
    calibration: Path | None,
    evaluation: Path | None,
    settings: dict[str, Any],
    report: dict[str, Any] | None,
) -> dict[str, Any]:
    """A record linking the float model to the shipped one (sealed and signed)."""
    return {
        "source_model_sha256": _digest(source),
        "final_model_sha256": _digest(final),
        "calibration_sha256": _digest(calibration),
        "evaluation_sha256": _digest(evaluation),
        "settings": settings,
        "accuracy": report,
        "tools": {
            "int8_kernels": dict(zip(("family", "evidence"), host_kernels(), strict=True)),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            **{d: _version(d) for d in ("onnx", "onnxruntime", "edgeseal-packager", "numpy")},
        },
    }
