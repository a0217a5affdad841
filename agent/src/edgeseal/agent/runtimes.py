"""Inference runtimes fed from memory: ONNX Runtime and LiteRT.

ONNX Runtime gets the weight-less graph as bytes and every large tensor as an
``OrtValue`` viewing the locked weights buffer (``SessionOptions.add_initializer``), so
the weights exist once in the process; at ``graph_optimization`` levels above ``basic``
they go into the graph instead and ONNX Runtime keeps a copy
(:mod:`edgeseal.core.ortsession`). The buffer, the numpy views, the OrtValues and
the session are owned together by :class:`OnnxSession` and released together: ORT's
Python binding does not keep an OrtValue alive, and a freed one crashes session creation.

LiteRT's Python API only takes the model as an immutable ``bytes`` object, which it keeps
as the model's storage: the agent hands it a :class:`~edgeseal.agent.memory.LockedBytes`,
whose pages are locked and left out of core dumps, and wipes it on close. LiteRT's
default CPU delegate, XNNPACK, packs its own copy of the weights into the ordinary heap,
out of the agent's reach: :class:`TfliteSession` says so in its status.
``[runtime] tflite_xnnpack = false`` turns XNNPACK off (and that copy with it).

A session names the sections it reads from a copy of its own (:meth:`own_sections`), so
the agent's digest re-check hashes the bytes the runtime reads, not the locked buffer
they were copied from.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeseal.agent.memory import LockedBytes
from edgeseal.agent.trtcache import EngineCache
from edgeseal.core.config import RuntimeConfig
from edgeseal.core.errors import EdgesealError, MissingExtraError, RuntimeBackendError
from edgeseal.core.ortsession import hand_over, session_options, weight_views, weights_visible
from edgeseal.core.weights import TensorEntry

__all__ = [
    "InferenceSession",
    "OnnxSession",
    "TfliteInterpreter",
    "TfliteSession",
    "available_providers",
    "choose_providers",
    "find_tflite_interpreter",
    "provider_options",
]

log = logging.getLogger(__name__)


class InferenceSession(Protocol):
    runtime: str

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def own_sections(self) -> Mapping[str, bytes]:
        """The bundle sections this session reads from a copy it owns rather than from
        their locked buffer, by section name: what the digest re-check must hash."""
        ...

    def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingExtraError(
            "running ONNX models needs ONNX Runtime: pip install onnxruntime"
        ) from e
    return onnxruntime


CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def choose_providers(
    requested: Sequence[str], have: Collection[str]
) -> tuple[list[str], list[str]]:
    """The requested execution providers ``have`` holds, CPU always last, and the
    reason for each one passed over. Pure: ``have`` is ORT's available providers."""
    chosen: list[str] = []
    reasons: list[str] = []
    for p in requested:
        if p == CPU or p in chosen:
            continue
        if p in have:
            chosen.append(p)
        else:
            reasons.append(
                f"{p} is not available in this ONNX Runtime (it has: {', '.join(sorted(have))})"
            )
    return [*chosen, CPU], reasons


def available_providers(requested: tuple[str, ...]) -> list[str]:
    """The requested execution providers this ONNX Runtime has, CPU always last; each one
    passed over is logged with the reason."""
    chosen, reasons = choose_providers(requested, _ort().get_available_providers())
    for reason in reasons:
        log.warning("%s: falling back to %s", reason, " then ".join(chosen))
    return chosen


def provider_options(
    providers: Sequence[str], *, engine_cache_dir: Path | None
) -> list[dict[str, str]]:
    """ONNX Runtime's options for each provider. TensorRT's engine cache (the weights,
    compiled) is written only to ``engine_cache_dir``, a RAM-only directory that
    :class:`~edgeseal.agent.trtcache.EngineCache` seals into the store; without one it
    is explicitly off."""
    options: list[dict[str, str]] = []
    for p in providers:
        if p == TENSORRT and engine_cache_dir is not None:
            options.append(
                {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(engine_cache_dir)}
            )
        elif p == TENSORRT:
            options.append({"trt_engine_cache_enable": "False"})
        else:
            options.append({})
    return options


class OnnxSession:
    runtime = "onnxruntime"

    def __init__(
        self,
        graph: bytes,
        weights: memoryview | None,
        entries: list[TensorEntry],
        config: RuntimeConfig,
        *,
        providers: tuple[str, ...] = (),
        engine_cache: EngineCache | None = None,
    ) -> None:
        ort = _ort()
        self._engine_cache: EngineCache | None = None
        self.active_providers: list[str] = []
        so = session_options(config)
        self._level = config.graph_optimization
        assert weights is not None or not entries
        views = weight_views(weights, entries) if weights is not None else []
        self._arrays: list[np.ndarray] = [a for _, a in views]
        self._values: list[Any] = hand_over(so, views, level=self._level)
        self.providers, self.provider_fallbacks = choose_providers(
            providers or config.providers, ort.get_available_providers()
        )
        for reason in self.provider_fallbacks:
            log.warning("%s: falling back to %s", reason, " then ".join(self.providers))
        try:
            cache_dir = self._prepare_engine_cache(config, engine_cache)
            self._session = ort.InferenceSession(
                graph,
                so,
                providers=self.providers,
                provider_options=provider_options(self.providers, engine_cache_dir=cache_dir),
            )
            self._after_build()
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            self.close()
            if isinstance(e, EdgesealError):
                raise
            raise RuntimeBackendError(f"ONNX Runtime refused the model: {e}") from e
        except BaseException:
            self.close()
            raise
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def _prepare_engine_cache(
        self, config: RuntimeConfig, engine_cache: EngineCache | None
    ) -> Path | None:
        """The RAM directory TensorRT's engine cache goes to, filled from the sealed
        cache; None when TensorRT is not used or its cache is off."""
        if TENSORRT not in self.providers or not config.trt_engine_cache:
            return None
        if engine_cache is None:
            log.warning("TensorRT engine cache is on, but this open has no store for it: off")
            return None
        try:
            cache_dir = engine_cache.prepare()
        except RuntimeBackendError as e:  # no RAM-only directory: never a disk one
            log.warning("TensorRT engine cache off for this session: %s", e)
            self.provider_fallbacks.append(f"TensorRT engine cache off: {e}")
            return None
        self._engine_cache = engine_cache
        return cache_dir

    def _after_build(self) -> None:
        # ORT itself falls back to CPU when a listed provider fails to start (no GPU).
        self.active_providers = list(self._session.get_providers())
        for p in self.providers:
            if p not in self.active_providers:
                log.warning(
                    "%s did not start in ONNX Runtime: running on %s",
                    p,
                    " then ".join(self.active_providers),
                )
                self.provider_fallbacks.append(f"{p} did not start in ONNX Runtime")
        cache = self._engine_cache
        if cache is not None and TENSORRT not in self.active_providers:
            self._engine_cache = None
            cache.close()  # nothing was built; remove the RAM directory
        elif cache is not None:
            cache.persist()  # seal what the build wrote, wipe the plaintext

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The output names listed once at build time (ORT lists them on every call given
        # None); a feed that is a dict already goes as it is.
        feed = inputs if type(inputs) is dict else dict(inputs)
        try:
            results = self._session.run(self.output_names, feed)
        except Exception as e:
            raise RuntimeBackendError(f"inference failed: {e}") from e
        return dict(zip(self.output_names, results, strict=False))

    def own_sections(self) -> Mapping[str, bytes]:
        """None: ONNX Runtime reads the weights in place from the locked buffer (the graph
        it parsed once, at build time)."""
        return {}

    def close(self) -> None:
        self._session = None
        self._values.clear()
        self._arrays.clear()
        cache, self._engine_cache = self._engine_cache, None
        if cache is not None:
            cache.close()  # after the session: seal engines built since, wipe, remove

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "runtime": self.runtime,
            "providers": self.active_providers,
            "weights_handed_over": (
                "into the graph, for ONNX Runtime's optimizers: it keeps its own copy, "
                "outside the locked buffer"
                if weights_visible(self._level)
                else "OrtValue views of the locked buffer (no copy)"
            ),
        }
        if self.provider_fallbacks:
            status["provider_fallbacks"] = self.provider_fallbacks
        if TENSORRT in self.active_providers:
            cache = self._engine_cache
            status["trt_engine_cache"] = (
                f"on, sealed to the device key: {cache.status()}" if cache else "off"
            )
        return status


#: The TFLite interpreters the agent can use, in order of preference: (import name,
#: distribution, the name status shows). LiteRT is the maintained one; tflite-runtime (last
#: release 2.14, numpy<2) serves boards LiteRT publishes no wheel for.
TFLITE_RUNTIMES = (
    ("ai_edge_litert.interpreter", "ai-edge-litert", "litert"),
    ("tflite_runtime.interpreter", "tflite-runtime", "tflite-runtime"),
)
#: What status says the runtime was handed (``weights_handed_over``): how the model bytes
#: are held, by runtime and whether they are the agent's LockedBytes or a caller's own
#: bytes; then the runtime's own copies, by runtime and whether XNNPACK is on. Counted by
#: tests/agent/test_plaintext.py and tests/agent/test_core_dump.py where LiteRT is
#: installed; tflite-runtime's are not.
_TFLITE_HELD = {
    ("litert", True): "as bytes in locked MADV_DONTDUMP pages, wiped on close",
    ("litert", False): "as the caller's bytes, kept by LiteRT, never wiped",
    ("tflite-runtime", True): "as bytes in locked MADV_DONTDUMP pages, wiped on close",
    ("tflite-runtime", False): "as the caller's bytes, kept by tflite-runtime, never wiped",
}
_TFLITE_COPIES = {
    ("litert", True): "XNNPACK packs its own copy of the weights into the ordinary heap",
    ("litert", False): "XNNPACK off: no packed copy of the weights",
    ("tflite-runtime", True): "the runtime's own copies not counted",
    ("tflite-runtime", False): "XNNPACK off; the runtime's own copies not counted",
}


@dataclass(frozen=True)
class TfliteInterpreter:
    """The TFLite interpreter found here: its class, and which runtime provides it."""

    cls: Any
    runtime: str
    distribution: str
    version: str
    #: Why a preferred runtime was passed over ("" when the first one was used).
    fallback_reason: str = ""
    #: The module's ``OpResolverType`` (None in a release without it): its
    #: ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` turns XNNPACK off.
    op_resolver_type: Any = None


def find_tflite_interpreter() -> TfliteInterpreter:
    """LiteRT (``ai-edge-litert``) when it imports, else ``tflite-runtime``.

    Raises :class:`MissingExtraError` naming the pip install when neither does.
    """
    reasons: list[str] = []
    for module_name, dist, runtime in TFLITE_RUNTIMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            reasons.append(f"{dist} does not import ({e})")
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        reason = "; ".join(reasons)
        if reason:
            log.info("TFLite models run on %s %s: %s", dist, version, reason)
        return TfliteInterpreter(
            module.Interpreter,
            runtime,
            dist,
            version,
            reason,
            op_resolver_type=getattr(module, "OpResolverType", None),
        )
    raise MissingExtraError(
        "running TFLite models needs LiteRT: pip install ai-edge-litert "
        "(or, where LiteRT has no wheel, tflite-runtime with numpy<2)"
    )


def tflite_options(found: TfliteInterpreter, *, xnnpack: bool) -> dict[str, Any]:
    """The interpreter's keyword arguments for ``[runtime] tflite_xnnpack``: without
    XNNPACK, the builtin ops without their default delegates. The session and the
    pre-flight child build their interpreters alike with them."""
    if xnnpack:
        return {}
    if found.op_resolver_type is None:
        raise RuntimeBackendError(
            f"{found.distribution} {found.version} cannot turn XNNPACK off (it has "
            "no OpResolverType): upgrade it or set [runtime] tflite_xnnpack = true"
        )
    return {
        "experimental_op_resolver_type": found.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    }


class TfliteSession:
    """A TFLite model on LiteRT, or on tflite-runtime where LiteRT is not installed;
    :attr:`runtime` (and status) say which.

    The interpreter keeps ``model`` as its storage. Given a :class:`LockedBytes` (as the
    agent does), the session owns it: :meth:`close` drops the interpreter, then wipes it.
    ``config.tflite_xnnpack`` false builds the interpreter without its default delegates
    (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), so XNNPACK packs no copy of the weights.
    """

    runtime = "litert"

    def __init__(self, model: bytes | LockedBytes, config: RuntimeConfig) -> None:
        found = find_tflite_interpreter()
        self.runtime = found.runtime
        self.interpreter = found
        self.xnnpack = config.tflite_xnnpack
        self._model = model if isinstance(model, LockedBytes) else None
        self._interp: Any = None
        content = model.data if isinstance(model, LockedBytes) else model
        try:
            options = tflite_options(found, xnnpack=self.xnnpack)
        except RuntimeBackendError:
            self.close()
            raise
        try:
            self._interp = found.cls(
                model_content=content, num_threads=config.intra_op_threads or None, **options
            )
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            self.close()
            raise RuntimeBackendError(f"{found.distribution} refused the model: {e}") from e
        self._inputs = {d["name"]: d for d in self._interp.get_input_details()}
        self._outputs = self._interp.get_output_details()
        self.input_names = list(self._inputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            for name, value in inputs.items():
                d = self._inputs[name]
                if tuple(value.shape) != tuple(d["shape"]):
                    self._interp.resize_tensor_input(d["index"], value.shape)
                    self._interp.allocate_tensors()
                self._interp.set_tensor(d["index"], value)
            self._interp.invoke()
            return {d["name"]: self._interp.get_tensor(d["index"]).copy() for d in self._outputs}
        except (ValueError, RuntimeError, KeyError) as e:
            raise RuntimeBackendError(f"inference failed: {e}") from e

    def own_sections(self) -> Mapping[str, bytes]:
        """The ``graph`` section (for TFLite, the whole model) as the interpreter reads it:
        the :class:`LockedBytes` it keeps as its storage. None for a caller's own bytes."""
        return {"graph": self._model.data} if self._model is not None else {}

    def close(self) -> None:
        self._interp = None  # the interpreter goes first: it reads the model in place
        if self._model is not None:
            self._model.close()

    def status(self) -> dict[str, Any]:
        found = self.interpreter
        status: dict[str, Any] = {
            "runtime": self.runtime,
            "tflite_runtime": f"{found.distribution} {found.version}",
            "weights_handed_over": f"{_TFLITE_HELD[found.runtime, self._model is not None]}; "
            f"{_TFLITE_COPIES[found.runtime, self.xnnpack]}",
            "xnnpack": self.xnnpack,
        }
        if self._model is not None:
            status["model_bytes"] = self._model.status().to_obj()
        if found.fallback_reason:
            status["tflite_fallback"] = found.fallback_reason
        return status
