"""Model file -> sealed bundle. Stable API.

The pipeline (each stage reported through ``stage``): load and the safety gate;
quantize; evaluate the quantized model against the original and apply the accuracy
gate; derive golden vectors, the input profile, provenance and the SBOM; seal. ONNX
graphs are split from their weights; the cipher is picked for the target devices; the
content key is wrapped for each device; a signer whose certificate allows ``pack`` and
the model's name signs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx

from edgeseal.core.config import Limits, RuntimeConfig
from edgeseal.core.encoding import b64d, parse_json_object, utcnow
from edgeseal.core.errors import EdgesealError, MissingExtraError, TrustError
from edgeseal.core.extras import encode_extras, sbom_digest
from edgeseal.core.files import atomic_write
from edgeseal.core.keyring import DeviceRecord
from edgeseal.core.keys import Signer, SoftwareSigner
from edgeseal.core.manifest import Manifest, Target, TensorSpec
from edgeseal.core.oms import split_signature
from edgeseal.core.targets import TargetProfile, cipher_for, get_target
from edgeseal.core.writer import RecipientKey, seal_bundle
from edgeseal.packager import oms
from edgeseal.packager.advisories import (
    AdvisorySource,
    RuntimeAudit,
    VulnerableRuntimeError,
    check_runtime,
)
from edgeseal.packager.datasets import BatchLayout, InputData, batch_layout, load_inputs
from edgeseal.packager.devicecheck import check_split_onnx, split_onnx_opens
from edgeseal.packager.evaluate import AccuracyReport, GateUsageError, Threshold, evaluate, gate
from edgeseal.packager.golden import (
    Runner,
    fixed_batch,
    input_profile,
    make_golden,
    onnx_runners,
    provenance,
    synthetic_inputs,
    tflite_runners,
)
from edgeseal.packager.onnx_model import (
    ModelError,
    dim_hints,
    fold_constants,
    load_onnx,
    observed_outputs,
    onnx_io,
    optimize_offline,
    split_onnx,
    with_output_shapes,
)
from edgeseal.packager.quantize import CalibrationMethod, QuantizeMode, quantize
from edgeseal.packager.safety import check_onnx, refuse_pickle
from edgeseal.packager.sbom import make_sbom, runtime_floor
from edgeseal.packager.tflite_model import (
    is_tflite,
    refuse_stateful,
    tflite_io,
    tflite_tensor_types,
)

__all__ = ["PackOptions", "PackResult", "pack_model"]

AGENT_MIN_VERSION = "0.1.0"
Stage = Callable[[str], None]


@dataclass(frozen=True)
class PackOptions:
    quantize: QuantizeMode = QuantizeMode.NONE
    calibration: Path | None = None
    method: CalibrationMethod = CalibrationMethod.MINMAX
    evaluation: Path | None = None
    max_accuracy_drop: Threshold | None = None
    accept_accuracy_drop: bool = False
    allow_custom_ops: tuple[str, ...] = ()
    dry_run: bool = False
    golden_count: int = 8
    #: OpenSSF model signing: "auto" signs when model-signing is installed, "on" requires
    #: it, "off" skips it. ``oms_out`` also writes the signature there.
    oms: str = "auto"
    oms_out: Path | None = None
    #: Where known-vulnerable runtime versions come from (None: not checked), and whether
    #: a vulnerable runtime on this workstation fails the pack.
    advisories: AdvisorySource | None = None
    fail_on_advisory: bool = False
    #: Sample inputs (.npz / folder of .npy keyed by input name) for golden vectors, the
    #: input profile, evaluation and, without --calibration, static calibration.
    sample_inputs: Path | None = None


@dataclass(frozen=True)
class PackResult:
    manifest: Manifest | None  # None on a dry run
    model_bytes: int
    graph_bytes: int
    weights_bytes: int
    cipher: str
    report: AccuracyReport | None = None
    gate_failures: tuple[str, ...] = ()
    tensor_types: Mapping[str, int] | None = None
    golden_vectors: int = 0
    audit: RuntimeAudit | None = None


def _check_certificate(signer: Signer, certificate: Mapping[str, Any], model_name: str) -> None:
    """Fail on the workstation what the device would refuse (V5, V7)."""
    payload = parse_json_object(b64d(certificate.get("payload"), "certificate"), "certificate")
    name = payload.get("name")
    if payload.get("keyid") != signer.key_id:
        raise TrustError(
            f"the key of signer {name!r} does not match its certificate",
            hint="the signer's key and certificate files come from different issues; "
            f"issue the signer again: edgeseal keys new-signer {name}",
        )
    if "pack" not in payload.get("roles", []):
        raise TrustError(
            f"signer {name!r} lacks the 'pack' role",
            hint="pack with a signer that has it (edgeseal keys new-signer NAME --role pack)",
        )
    patterns = payload.get("model_patterns", [])
    if not any(fnmatch.fnmatchcase(model_name, p) for p in patterns):
        raise TrustError(
            f"signer {name!r} may not sign model {model_name!r} "
            f"(its certificate allows: {', '.join(map(str, patterns)) or 'no model'})",
            hint=f"pack under a name those patterns allow, or issue a signer for it: "
            f"edgeseal keys new-signer NAME --models {model_name!r}",
        )


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _data(
    options: PackOptions, specs: tuple[TensorSpec, ...]
) -> tuple[InputData | None, InputData | None, InputData | None]:
    """(calibration, evaluation, all real data). Without --eval, half of the calibration
    set is held out to evaluate on; the input profile is drawn from all of it."""
    full = load_inputs(options.calibration, specs) if options.calibration else None
    if options.evaluation:
        return full, load_inputs(options.evaluation, specs), full
    if full is not None and full.rows >= 4:
        calibration, evaluation = full.split(0.5)
        return calibration, evaluation, full
    return full, full, full


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
    options: PackOptions | None = None,
    stage: Stage | None = None,
    limits: Limits | None = None,
    runtime: RuntimeConfig | None = None,
) -> PackResult:
    """Pack ``model_path`` into the bundle ``out``. ``runtime`` is how the devices build
    their sessions (the agent's ``[runtime]`` config; default: the agent's defaults): the
    sealed form is opened and run that way before anything is written."""
    opts = options or PackOptions()
    say = stage or (lambda s: None)
    _check_certificate(signer, certificate, name)
    if not devices and not opts.dry_run:
        raise ValueError("name at least one device to pack for (--to DEVICE)")
    profile = target or get_target("generic")
    cipher = cipher_for([profile, *(get_target(d.target) for d in devices if d.target)])
    say("load")
    try:
        data = model_path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read model {model_path}: {e.strerror}") from e
    refuse_pickle(model_path, data[:8])
    if opts.max_accuracy_drop is not None and not (
        opts.calibration or opts.evaluation or opts.sample_inputs
    ):
        raise GateUsageError(
            "--max-accuracy-drop needs real data to measure on: give --eval, --calibration "
            "or --sample-inputs (on synthetic inputs only error figures are reported)"
        )
    current = ["load"]

    def stage_(name: str) -> None:
        current[0] = name
        say(name)

    # Every temporary file (quantization included) lives in this private (0700) folder,
    # removed whatever happens; nothing is written outside it but the bundle.
    with tempfile.TemporaryDirectory(prefix="edgeseal-pack-", ignore_cleanup_errors=True) as tmp:
        try:
            common: dict[str, Any] = {
                "name": name,
                "version": version,
                "opts": opts,
                "signer": signer,
                "certificate": certificate,
                "devices": devices,
                "profile": profile,
                "cipher": cipher,
                "chunk_size": chunk_size,
                "validity": validity,
                "revocations": revocations,
                "root_rotations": root_rotations,
                # One creation time for the manifest and the SBOM: the caller's, else now.
                "now": now or utcnow(),
                "progress": progress,
                "say": stage_,
            }
            if is_tflite(data):
                return _pack_tflite(data, model_path, out, **common)
            return _pack_onnx(
                data,
                model_path,
                out,
                Path(tmp),
                limits=limits,
                runtime=runtime or RuntimeConfig(),
                **common,
            )
        except (EdgesealError, GateUsageError):
            raise
        except Exception as e:  # a third-party tool's own error types, with the stage
            raise ModelError(
                f"packing failed while {STAGE_NAMES.get(current[0], current[0])}: "
                f"{type(e).__name__}: {e}"
            ) from e


#: What each stage does, for messages.
STAGE_NAMES = {
    "load": "loading the model",
    "check": "checking the model",
    "quantize": "quantizing",
    "evaluate": "evaluating the quantized model",
    "golden": "making golden vectors",
    "device": "opening the sealed form as the device will",
    "seal": "sealing",
}


def _source_runner(model_path: Path) -> Runner:
    """The model as given, run by ONNX Runtime: the probe for synthesized inputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a rejected guess is expected: no error lines on stderr
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed), strict=True))


def _pack_onnx(
    data: bytes,
    model_path: Path,
    out: Path,
    tmp: Path,
    *,
    name: str,
    version: int,
    opts: PackOptions,
    limits: Limits | None,
    runtime: RuntimeConfig,
    say: Stage,
    signer: Signer,
    certificate: Mapping[str, Any],
    cipher: str,
    **seal_args: Any,
) -> PackResult:
    say("check")
    model = check_onnx(model_path, allow_custom_ops=opts.allow_custom_ops, limits=limits)
    inputs, declared_outputs = onnx_io(model)
    layout = batch_layout(inputs)
    calibration, evaluation, real_data = _data(opts, inputs)
    samples = load_inputs(opts.sample_inputs, inputs) if opts.sample_inputs else None
    synthetic: list[InputData] = []

    def synthesized() -> InputData:
        if not synthetic:
            synthetic.append(
                synthetic_inputs(inputs, probe=_source_runner(model_path), hints=dim_hints(model))
            )
        return synthetic[0]

    say("quantize")
    quantized = quantize(
        model_path,
        tmp,
        opts.quantize,
        calibration=calibration or samples,
        method=opts.method,
        fixed_batch=layout.fixed,
    )
    golden_data = evaluation or calibration or samples or synthesized()
    final, outputs = _sealable(quantized.path, tmp, golden_data, layout, declared_outputs, runtime)
    report: AccuracyReport | None = None
    failures: tuple[str, ...] = ()
    if opts.quantize is not QuantizeMode.NONE:
        say("evaluate")
        report = evaluate(
            model_path,
            final,
            evaluation or samples or synthesized(),
            mode=opts.quantize.value,
            batch=layout.fixed,
            notes=quantized.notes,
        )
        failures = tuple(gate(report, opts.max_accuracy_drop, accept=opts.accept_accuracy_drop))
    if opts.dry_run:
        return PackResult(None, len(data), 0, 0, cipher, report, failures)
    say("golden")
    reference, variants = onnx_runners(final)
    golden = make_golden(
        reference,
        variants,
        golden_data,
        mode=opts.quantize.value,
        count=opts.golden_count,
        batch=layout.fixed or 1,
        model_bytes=final.stat().st_size,
    )
    final_model = check_onnx(
        final, allow_custom_ops=(*opts.allow_custom_ops, "com.microsoft"), limits=limits
    )
    settings = {
        "quantize": opts.quantize.value,
        "calibration_method": opts.method.value,
        "max_accuracy_drop": str(opts.max_accuracy_drop or ""),
        "accepted_failures": list(failures),
        "quantizer_notes": list(quantized.notes),
        "golden_data": golden_data.source,
    }
    real_data = real_data or evaluation or samples
    extras = {
        "golden": golden,
        "profile": input_profile(real_data) if real_data else {"inputs": {}, "rows": 0},
        "provenance": provenance(
            source=model_path,
            final=final,
            calibration=opts.calibration,
            evaluation=opts.evaluation,
            settings=settings,
            report=report.to_obj() if report else None,
        ),
    }
    audit = _sbom(
        extras,
        opts,
        name=name,
        version=version,
        model_format="onnx",
        model_sha256=hashlib.sha256(final.read_bytes()).hexdigest(),
        opsets={o.domain: o.version for o in final_model.opset_import},
        domains=sorted({n.domain for n in final_model.graph.node}),
        runtime_version=_version("onnxruntime"),
        created=seal_args["now"],
    )
    split = split_onnx(final_model)
    # The device's way: the split form, its session options, weights from memory, and
    # the golden vectors it will replay. A model that fails here is not sealed.
    say("device")
    check_split_onnx(split.graph, split.weights, golden, runtime)
    _add_oms(extras, final, signer, opts, split=(split.graph, split.weights))
    say("seal")
    sections: dict[str, bytes | bytearray] = {
        "graph": split.graph,
        "weights": split.weights,
        "extras": encode_extras(extras),
    }
    manifest = _seal(
        out,
        sections,
        name=name,
        version=version,
        fmt="onnx",
        runtime="onnxruntime",
        inputs=inputs,
        outputs=outputs,
        signer=signer,
        certificate=certificate,
        cipher=cipher,
        quantization=report.to_obj() if report else None,
        sbom=extras["sbom"],
        **seal_args,
    )
    return PackResult(
        manifest,
        len(data),
        len(split.graph),
        len(split.weights),
        cipher,
        report,
        failures,
        golden_vectors=len(golden["vectors"]),
        audit=audit,
    )


def _sealable(
    path: Path,
    tmp: Path,
    data: InputData,
    layout: BatchLayout,
    declared: tuple[TensorSpec, ...],
    runtime: RuntimeConfig,
) -> tuple[Path, tuple[TensorSpec, ...]]:
    """The model to seal and its real output specs: constant subgraphs folded and, when
    the sealed form would not open as the device opens it, ONNX Runtime's basic
    optimizations applied here (``optimize_offline``), so the device's graph
    optimizations never compute from weights handed over from memory; and output shapes
    as observed running it (symbolic where they vary), written into the graph."""
    model = load_onnx(path)
    folded, _ = fold_constants(model)
    split = split_onnx(folded)
    if not split_onnx_opens(split.graph, split.weights, runtime):
        # Fusions at the device's level (Conv with BatchNormalization, ...) would rewrite
        # weights it hands over from memory: seal the graph they produce instead.
        folded = optimize_offline(folded, tmp)
    del split
    outputs = observed_outputs(folded, data, layout, declared)
    # The model's own file name: the OpenSSF model-signing statement names the model by it.
    sealed = tmp / "sealed" / path.name
    sealed.parent.mkdir(exist_ok=True)
    try:
        onnx.save(with_output_shapes(folded, outputs), str(sealed))
    except (ValueError, OSError) as e:
        raise ModelError(f"cannot write the folded model: {e}") from e
    return sealed, outputs


def _pack_tflite(
    data: bytes,
    model_path: Path,
    out: Path,
    *,
    name: str,
    version: int,
    opts: PackOptions,
    say: Stage,
    **seal_args: Any,
) -> PackResult:
    if opts.quantize is not QuantizeMode.NONE:
        raise MissingExtraError(
            "TFLite models arrive already converted: quantize with TensorFlow's TFLite "
            "converter before packing (it needs TensorFlow, which edgeseal does not install)"
        )
    say("check")
    inputs, outputs = tflite_io(data)
    refuse_stateful(data)
    types = tflite_tensor_types(data)
    calibration, evaluation, real_data = _data(opts, inputs)
    samples = load_inputs(opts.sample_inputs, inputs) if opts.sample_inputs else None
    if opts.dry_run:
        return PackResult(None, len(data), len(data), 0, seal_args["cipher"], None, (), types)
    say("golden")
    reference, variants = tflite_runners(data)
    golden_data = evaluation or calibration or samples or synthetic_inputs(inputs, probe=reference)
    real_data = real_data or samples
    golden = make_golden(
        reference,
        variants,
        golden_data,
        mode="none",
        batch=fixed_batch(inputs) or 1,
        count=opts.golden_count,
        model_bytes=len(data),
    )
    extras = {
        "golden": golden,
        "profile": input_profile(real_data) if real_data else {"inputs": {}, "rows": 0},
        "provenance": provenance(
            source=model_path,
            final=model_path,
            calibration=opts.calibration,
            evaluation=opts.evaluation,
            settings={"quantize": "none", "tensor_types": types},
            report=None,
        ),
    }
    audit = _sbom(
        extras,
        opts,
        name=name,
        version=version,
        model_format="tflite",
        model_sha256=hashlib.sha256(data).hexdigest(),
        opsets={},
        domains=[],
        runtime_version=_version("ai-edge-litert"),
        created=seal_args["now"],
    )
    _add_oms(extras, model_path, seal_args["signer"], opts)
    say("seal")
    manifest = _seal(
        out,
        {"graph": data, "extras": encode_extras(extras)},
        name=name,
        version=version,
        fmt="tflite",
        runtime="litert",
        inputs=inputs,
        outputs=outputs,
        quantization={"tensor_types": types},
        sbom=extras["sbom"],
        **seal_args,
    )
    return PackResult(
        manifest,
        len(data),
        len(data),
        0,
        seal_args["cipher"],
        None,
        (),
        types,
        golden_vectors=len(golden["vectors"]),
        audit=audit,
    )


def _sbom(
    extras: dict[str, Any],
    opts: PackOptions,
    *,
    model_format: str,
    opsets: dict[str, int],
    runtime_version: str | None,
    **fields: Any,
) -> RuntimeAudit | None:
    """Audit the runtime the model needs and add the SBOM to ``extras``."""
    audit = None
    if opts.advisories is not None:
        package, floor = runtime_floor(model_format, opsets)
        audit = check_runtime(opts.advisories, package, floor, runtime_version)
        if opts.fail_on_advisory and audit.tested_advisories:
            ids = ", ".join(a.id for a in audit.tested_advisories)
            raise VulnerableRuntimeError(
                f"{package} {runtime_version} on this workstation is affected by {ids}: "
                f"upgrade it (the SBOM asks devices for {package} >= {audit.safe_floor})"
            )
    extras["sbom"] = make_sbom(
        model_format=model_format,
        opsets=opsets,
        runtime_version=runtime_version,
        audit=audit,
        **fields,
    )
    return audit


def _add_oms(
    extras: dict[str, Any],
    model: Path,
    signer: Signer,
    opts: PackOptions,
    *,
    split: tuple[bytes, bytes | bytearray] | None = None,
) -> None:
    """Seal the OMS signatures (docs/bundle-format.md, "OMS signatures"):

    ``bundle``, over the final model file, by the model-signing library, for the stock
    tool on the workstation (written to ``oms_out`` on request); and, for an ONNX model,
    ``split``, over the ``graph`` and ``weights`` sections' plaintext, which the agent
    checks from memory. A TFLite model's ``graph`` section is the file itself, so its
    ``bundle`` signature is what the agent checks."""
    if opts.oms == "off":
        extras["provenance"]["oms"] = "not signed (--no-oms)"
        return
    block: dict[str, Any] = {"file_name": model.name}
    if split is not None:
        graph, weights = split
        block["split"] = split_signature(
            model.name,
            {
                "graph": hashlib.sha256(graph).hexdigest(),
                "weights": hashlib.sha256(weights).hexdigest(),
            },
            public_key=signer.public_key,
            sign_raw=signer.sign,
        )
    if opts.oms == "on" or (oms.available() and isinstance(signer, SoftwareSigner)):
        signature = oms.oms_sign(model, signer)
        block["bundle"] = signature
        if opts.oms_out is not None:
            atomic_write(opts.oms_out, json.dumps(signature).encode())
    else:
        extras["provenance"]["oms"] = (
            "file not signed (model-signing not installed, or the signer is on a token)"
        )
    if len(block) > 1:
        extras["oms"] = block


def _seal(
    out: Path,
    sections: Mapping[str, bytes | bytearray],
    *,
    name: str,
    version: int,
    fmt: str,
    runtime: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    signer: Signer,
    certificate: Mapping[str, Any],
    devices: Sequence[DeviceRecord],
    profile: TargetProfile,
    cipher: str,
    chunk_size: int,
    validity: timedelta,
    revocations: Mapping[str, Any] | None,
    root_rotations: Sequence[Mapping[str, Any]],
    now: datetime | None,
    progress: Callable[[int], None] | None,
    quantization: Mapping[str, Any] | None,
    sbom: dict[str, Any],
) -> Manifest:
    created = now or utcnow()
    return seal_bundle(
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
        quantization=quantization,
        sbom_digest=sbom_digest(sbom),
    )
