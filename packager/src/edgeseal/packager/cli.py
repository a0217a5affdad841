"""``edgeseal pack``."""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeseal.core.config import load_config
from edgeseal.core.console import (
    EXIT_REJECTED,
    emit,
    err_console,
    out_console,
    reports_errors,
    untrusted,
)
from edgeseal.core.errors import PathError, UsageError
from edgeseal.core.keyring import Keyring, default_keys_dir
from edgeseal.core.keys import passphrase_from
from edgeseal.core.targets import TARGETS, get_target
from edgeseal.packager.advisories import AdvisorySource, OsvFile, PypiService, RuntimeAudit
from edgeseal.packager.evaluate import AccuracyDropError, AccuracyReport, Threshold, gate_status
from edgeseal.packager.pack import PackOptions, PackResult, pack_model
from edgeseal.packager.quantize import CalibrationMethod, QuantizeMode

STAGES = {
    "load": "loading",
    "check": "safety gate",
    "quantize": "quantizing",
    "evaluate": "evaluating",
    "golden": "golden vectors and profile",
    "device": "opening as the device will",
    "seal": "sealing",
}


def _report_table(
    r: AccuracyReport,
    failures: tuple[str, ...],
    threshold: Threshold | None,
    *,
    accepted: bool = True,
) -> Table:
    """The accuracy report. Every text in it that is not edgeseal's own markup (output
    names, quantizer notes, the gate's reasons) is escaped: rich would drop "[...]"."""
    t = Table("", "original", untrusted(r.mode), title="accuracy report", title_justify="left")
    t.add_row(
        "size",
        f"{r.size_before:,} B",
        f"{r.size_after:,} B ({r.size_after / max(r.size_before, 1):.0%})",
    )
    t.add_row(
        "latency (median batch)", f"{r.latency_ms_before:.2f} ms", f"{r.latency_ms_after:.2f} ms"
    )
    if r.accuracy_before is not None:
        t.add_row("top-1 accuracy", f"{r.accuracy_before:.2%}", f"{r.accuracy_after:.2%}")
    if r.top1_agreement is not None:
        t.add_row("top-1 agreement", "", f"{r.top1_agreement:.2%}")
    for o in r.outputs:
        t.add_row(
            untrusted(f"{o.name}: max/mean abs err"),
            "",
            f"{o.max_abs_error:.4g} / {o.mean_abs_error:.4g}",
        )
        t.add_row(untrusted(f"{o.name}: cosine"), "", f"{o.cosine:.6f}")
    for note in r.notes:
        t.add_row("quantizer", "", untrusted(note))
    t.add_row("measured", untrusted(f"{r.rows} rows of {r.data_source}"), untrusted(r.metric))
    status = gate_status(r, threshold, failures, accepted=accepted)
    colour = "red" if failures else ("green" if threshold is not None else "yellow")
    t.add_row("gate", "", f"[{colour}]{untrusted(status)}[/]")
    return t


def _terminate(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)


def _audit_line(a: RuntimeAudit | None) -> str:
    """One line on what the advisory check did, and did not, check."""
    if a is None:
        return (
            "runtime advisories: not checked (--advisories off, the default: give pypi, "
            "an index URL or a folder of OSV records to check)"
        )
    if a.error:
        return (
            f"[yellow]runtime advisories not checked[/] ({escape(a.source)}): {escape(a.error)}; "
            f"the SBOM asks devices for {a.package} >= {a.floor} (the model's opset floor), "
            f"unaudited"
        )
    ids = sorted({x.id for x in (*a.floor_advisories, *a.tested_advisories)})
    if not ids:
        return f"runtime advisories ({a.source}): none for {a.package} >= {a.floor}"
    tested = f"; this workstation's {a.tested_with} is affected" if a.tested_advisories else ""
    return (
        f"[yellow]runtime advisories[/] ({a.source}): {', '.join(ids)}; "
        f"devices need {a.package} >= {a.safe_floor or '(no safe version known)'}{tested}"
    )


def _data(result: PackResult, out: Path) -> dict[str, Any]:
    m = result.manifest
    data: dict[str, Any] = {
        "ok": True,
        "dry_run": m is None,
        "cipher": result.cipher,
        "model_bytes": result.model_bytes,
        "weights_bytes": result.weights_bytes,
        "report": result.report.to_obj() if result.report else None,
        "gate_failures_accepted": list(result.gate_failures),
        "tensor_types": dict(result.tensor_types or {}),
        "golden_vectors": result.golden_vectors,
        "advisories": result.audit.to_obj() if result.audit else None,
    }
    if m is not None:
        data.update(
            bundle=str(out),
            model=m.model_name,
            version=m.version,
            bundle_id=m.bundle_id,
            format=m.model_format,
            recipients=[r.device for r in m.recipients],
            bytes=out.stat().st_size,
            expires=m.expires.isoformat(),
        )
    return data


def _check_output(out: Path) -> None:
    """Refuse an -o that cannot be written before any work is done (the bundle writer
    refuses the rest: a read-only or full file system)."""
    if out.is_dir():
        raise PathError(f"-o {out} is a directory: give the bundle file to write", path=out)
    if not out.parent.is_dir():
        raise PathError(
            f"cannot write the bundle {out}: its directory {out.parent} does not exist",
            path=out,
        )


def _advisory_source(spec: str) -> AdvisorySource | None:
    if spec == "off":
        return None
    if spec == "pypi":
        return PypiService()
    if spec.startswith(("http://", "https://")):
        return PypiService(spec)
    return OsvFile(Path(spec))


@reports_errors
def pack(
    model: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, metavar="MODEL", help=".onnx or .tflite"),
    ],
    name: Annotated[str, typer.Option("--name", help="Model name (a-z, 0-9, . _ -).")],
    version: Annotated[int, typer.Option("--version", help="Integer version; grows per name.")],
    signer: Annotated[str, typer.Option("--signer", help="Signer name in the keyring.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Bundle file to write.")],
    to: Annotated[
        list[str] | None,
        typer.Option("--to", metavar="DEVICE", help="Device id(s) from the registry."),
    ] = None,
    target: Annotated[str, typer.Option(help=f"One of: {', '.join(TARGETS)}.")] = "generic",
    quantize: Annotated[QuantizeMode, typer.Option(help="Quantize before sealing.")] = (
        QuantizeMode.NONE
    ),
    calibration: Annotated[
        Path | None,
        typer.Option(exists=True, help=".npz or folder of .npy, keyed by input name (+ labels)."),
    ] = None,
    method: Annotated[CalibrationMethod, typer.Option(help="Static calibration method.")] = (
        CalibrationMethod.MINMAX
    ),
    sample_inputs: Annotated[
        Path | None,
        typer.Option(
            "--sample-inputs",
            exists=True,
            help="Sample inputs (.npz or folder of .npy, keyed by input name) for golden "
            "vectors, the profile and evaluation, when the model's own specs cannot "
            "describe valid inputs.",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval", exists=True, help="Evaluation data (default: half the calibration set)."
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        str | None,
        typer.Option(help="Refuse if top-1 drops more (e.g. 1%) or error exceeds (abs=0.05)."),
    ] = None,
    accept_accuracy_drop: Annotated[
        bool,
        typer.Option(
            "--accept-accuracy-drop",
            help="Seal even when the accuracy gate fails (recorded in provenance).",
        ),
    ] = False,
    allow_custom_ops: Annotated[
        list[str] | None,
        typer.Option(metavar="DOMAIN", help="Custom op domain(s) the device's runtime has."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Quantize and evaluate only.")] = False,
    no_oms: Annotated[
        bool,
        typer.Option(
            "--no-oms",
            help="Make no OpenSSF model signature of the plaintext model (made by default "
            "when model-signing is installed; --oms-out requires it).",
        ),
    ] = False,
    oms_out: Annotated[
        Path | None,
        typer.Option(
            help="Also write the OMS signature here (verify with model_signing verify key)."
        ),
    ] = None,
    advisories: Annotated[
        str,
        typer.Option(
            help="Check the runtime the SBOM asks for against known-vulnerable versions: "
            "'pypi' (PyPI's JSON API, as pip-audit; needs the network), an index URL, a file "
            "or folder of OSV records (offline), or 'off' (the default: no network).",
            envvar="EDGESEAL_ADVISORIES",
            show_envvar=False,
        ),
    ] = "off",
    fail_on_advisory: Annotated[
        bool,
        typer.Option(
            "--fail-on-advisory", help="Refuse to pack when this workstation's runtime is affected."
        ),
    ] = False,
    days: Annotated[int | None, typer.Option(help="Validity in days (config default).")] = None,
    keys_dir: Annotated[
        Path | None,
        typer.Option("--keys-dir", envvar="EDGESEAL_KEYS", help="Keyring directory."),
    ] = None,
    signer_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            help="File whose first line is the signer key's passphrase (else the "
            "environment: see above)."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(envvar="EDGESEAL_CONFIG", help="edgeseal TOML config file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Check, optionally quantize and evaluate, then seal MODEL for the named devices.

    Without --signer-passphrase-file, the signer key's passphrase comes from
    $EDGESEAL_SIGNER_PASSPHRASE; --advisories from $EDGESEAL_ADVISORIES."""
    if no_oms and oms_out is not None:
        raise UsageError("--no-oms and --oms-out contradict: the signature --oms-out writes")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the private temp folder is removed.
        signal.signal(signal.SIGTERM, _terminate)
    if quantize is QuantizeMode.STATIC_INT8 and calibration is None and sample_inputs is None:
        raise ValueError(
            "--quantize static-int8 needs --calibration (a .npz, or a folder of .npy files, "
            "keyed by input name) or --sample-inputs"
        )
    if not dry_run:
        _check_output(out)
    cfg = load_config(config)
    ring = Keyring(keys_dir or default_keys_dir())
    sgn, cert = ring.load_signer(
        signer,
        signer_passphrase=passphrase_from(signer_passphrase_file, env="EDGESEAL_SIGNER_PASSPHRASE"),
    )
    devices = [ring.device(d) for d in to or []]
    options = PackOptions(
        quantize=quantize,
        calibration=calibration,
        method=method,
        evaluation=eval_data,
        max_accuracy_drop=Threshold.parse(max_accuracy_drop) if max_accuracy_drop else None,
        accept_accuracy_drop=accept_accuracy_drop,
        allow_custom_ops=tuple(allow_custom_ops or ()),
        dry_run=dry_run,
        oms="off" if no_oms else ("on" if oms_out is not None else "auto"),
        oms_out=oms_out,
        advisories=_advisory_source(advisories),
        fail_on_advisory=fail_on_advisory,
        sample_inputs=sample_inputs,
    )
    show = not as_json and err_console.is_terminal
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not show,
    ) as progress:
        task = progress.add_task("starting", total=None)

        def stage(name: str) -> None:
            progress.update(task, description=f"{model.name}: {STAGES.get(name, name)}")

        try:
            result = pack_model(
                model,
                out,
                name=name,
                version=version,
                signer=sgn,
                certificate=cert,
                devices=devices,
                target=get_target(target),
                chunk_size=cfg.bundle.chunk_bytes,
                validity=timedelta(days=days or cfg.bundle.validity_days),
                revocations=ring.revocations(),
                root_rotations=ring.rotations(),
                options=options,
                stage=stage,
                limits=cfg.limits,
                runtime=cfg.runtime,
            )
        except AccuracyDropError as e:
            progress.stop()
            if e.report is not None:
                if as_json:
                    emit(
                        {
                            "ok": False,
                            "error": type(e).__name__,
                            "message": str(e),
                            "exit_code": EXIT_REJECTED,
                            "report": e.report.to_obj(),
                        },
                        as_json=True,
                        render=lambda: None,
                    )
                else:
                    err_console.print(
                        _report_table(
                            e.report, (str(e),), options.max_accuracy_drop, accepted=False
                        )
                    )
            err_console.print(f"[bold red]rejected[/]: {untrusted(e.diagnostics())}")
            raise typer.Exit(EXIT_REJECTED) from None
    data = _data(result, out)

    def render() -> None:
        if result.report:
            out_console.print(
                _report_table(result.report, result.gate_failures, options.max_accuracy_drop)
            )
        if result.tensor_types:
            out_console.print(
                "tensor types: " + ", ".join(f"{k} x{v}" for k, v in result.tensor_types.items())
            )
        out_console.print(_audit_line(result.audit))
        m = result.manifest
        if m is None:
            out_console.print("dry run: nothing sealed")
            return
        out_console.print(
            f"sealed {m.model_name} v{m.version} ({m.model_format}, {result.cipher}, "
            f"{result.golden_vectors} golden vectors) for {len(m.recipients)} device(s) -> "
            f"{out} ({data['bytes']:,} bytes)"
        )

    emit(data, as_json=as_json, render=render)


def register(app: typer.Typer) -> None:
    app.command("pack")(pack)
