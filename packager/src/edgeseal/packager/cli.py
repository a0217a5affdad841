"""``edgeseal pack``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from edgeseal.core.config import load_config
from edgeseal.core.console import emit, out_console, progress_bytes, reports_errors
from edgeseal.core.keyring import Keyring, default_keys_dir
from edgeseal.core.keys import passphrase_from
from edgeseal.core.targets import TARGETS, get_target
from edgeseal.packager.pack import pack_model


@reports_errors
def pack(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=".onnx or .tflite")],
    name: Annotated[str, typer.Option("--name", help="Model name (a-z, 0-9, . _ -).")],
    version: Annotated[int, typer.Option("--version", help="Integer version; grows per name.")],
    signer: Annotated[str, typer.Option("--signer", help="Signer name in the keyring.")],
    to: Annotated[list[str], typer.Option("--to", help="Device id(s) from the registry.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Bundle file to write.")],
    target: Annotated[str, typer.Option(help=f"One of: {', '.join(TARGETS)}.")] = "generic",
    days: Annotated[int | None, typer.Option(help="Validity in days (config default).")] = None,
    keys_dir: Annotated[Path | None, typer.Option("--keys-dir", envvar="EDGESEAL_KEYS")] = None,
    signer_passphrase_file: Annotated[Path | None, typer.Option()] = None,
    config: Annotated[Path | None, typer.Option(envvar="EDGESEAL_CONFIG")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Seal MODEL into a signed, encrypted bundle for the named devices."""
    cfg = load_config(config)
    ring = Keyring(keys_dir or default_keys_dir())
    sgn, cert = ring.load_signer(
        signer,
        signer_passphrase=passphrase_from(signer_passphrase_file, env="EDGESEAL_SIGNER_PASSPHRASE"),
    )
    devices = [ring.device(d) for d in to]
    size = model.stat().st_size
    with progress_bytes(f"sealing {model.name}", size, enabled=not as_json) as advance:
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
            progress=advance,
        )
    m = result.manifest
    data = {
        "ok": True,
        "bundle": str(out),
        "model": m.model_name,
        "version": m.version,
        "bundle_id": m.bundle_id,
        "format": m.model_format,
        "cipher": result.cipher,
        "recipients": [r.device for r in m.recipients],
        "bytes": out.stat().st_size,
        "model_bytes": result.model_bytes,
        "weights_bytes": result.weights_bytes,
        "expires": m.expires.isoformat(),
    }
    emit(
        data,
        as_json=as_json,
        render=lambda: out_console.print(
            f"sealed {m.model_name} v{m.version} ({m.model_format}, {result.cipher}) for "
            f"{len(m.recipients)} device(s) -> {out} ({data['bytes']:,} bytes)"
        ),
    )


def register(app: typer.Typer) -> None:
    app.command("pack")(pack)
