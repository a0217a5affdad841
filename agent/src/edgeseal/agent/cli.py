"""``edgeseal agent ...``: provision a device and open bundles on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from edgeseal.agent.device import DeviceHome, machine_architecture
from edgeseal.agent.opener import open_bundle
from edgeseal.agent.version import __version__
from edgeseal.core.config import load_config
from edgeseal.core.console import emit, out_console, progress_bytes, reports_errors
from edgeseal.core.keys import passphrase_from
from edgeseal.core.reader import VerifyPolicy
from edgeseal.hardware.stores import StoreSpec, choose_store

agent_app = typer.Typer(
    help="The on-device agent: provision, open bundles, run inference.", no_args_is_help=True
)

Home = Annotated[
    Path, typer.Option("--home", envvar="EDGESEAL_HOME", help="Device home directory.")
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@agent_app.command("provision")
@reports_errors
def init(
    home: Home,
    root: Annotated[
        list[Path],
        typer.Option("--root", exists=True, dir_okay=False, help="Root public key(s) to pin."),
    ],
    device_id: Annotated[
        str | None, typer.Option("--device-id", help="Device id (default: from its key id).")
    ] = None,
    keystore: Annotated[
        str | None,
        typer.Option(help="auto (the strongest present), tpm, pkcs11 or software [config]."),
    ] = None,
    tcti: Annotated[
        str | None, typer.Option(help="TPM TCTI (swtpm:path=... for swtpm) [config].")
    ] = None,
    pcrs: Annotated[
        str | None, typer.Option(help="Bind the TPM key to these PCRs, e.g. 7,16 [config].")
    ] = None,
    pkcs11_module: Annotated[
        str | None, typer.Option(help="PKCS#11 module (.so) path [config].")
    ] = None,
    token_label: Annotated[str | None, typer.Option(help="PKCS#11 token label [config].")] = None,
    pin_file: Annotated[
        str | None,
        typer.Option(help="File holding the token PIN (else $EDGESEAL_PKCS11_PIN) [config]."),
    ] = None,
    config: Annotated[Path | None, typer.Option(envvar="EDGESEAL_CONFIG")] = None,
    machine_bound: Annotated[
        bool, typer.Option(help="software store: encrypt the key under this machine's identity.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Provision this device: make its key, pin the root, print what the registry needs.

    Options not given come from the [device] table of the config."""
    dev = load_config(config).device
    tcti = tcti or dev.tpm_tcti
    module = pkcs11_module if pkcs11_module is not None else dev.pkcs11_module
    try:
        pcr_list = (
            tuple(int(p) for p in pcrs.split(",") if p.strip())
            if pcrs is not None
            else dev.tpm_pcrs
        )
    except ValueError:
        raise ValueError(f"--pcrs must be comma-separated numbers, not {pcrs!r}") from None
    spec = StoreSpec(
        kind=choose_store(keystore or dev.key_store, tcti=tcti, pkcs11_module=module),
        tcti=tcti,
        pcrs=pcr_list,
        module=module,
        token_label=token_label if token_label is not None else dev.pkcs11_token_label,
        pin_file=pin_file if pin_file is not None else dev.pkcs11_pin_file,
        machine_bound=machine_bound,
    )
    info = DeviceHome(home).init(
        root_public_keys=[p.read_bytes() for p in root],
        device_id=device_id,
        passphrase=passphrase_from(None),
        store=spec,
    )
    (home / "device.pub.json").write_text(json.dumps(info, indent=2))
    emit(
        info,
        as_json=as_json,
        render=lambda: out_console.print(
            f"device {info['device_id']} provisioned in {home}\n"
            f"key {info['key_id'][:16]} in {info['label']}\n"
            f"register it on the workstation: edgeseal keys add-device {info['device_id']} "
            f"{home / 'device.pub.json'}"
        ),
    )


def _load_input(
    path: Path | None,
    names: list[str],
    shapes: list[tuple[int | str, ...]],
    dtypes: list[str],
    seed: int,
) -> dict[str, np.ndarray]:
    if path is not None:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return {names[0]: np.load(path, allow_pickle=False)}
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, dtype in zip(names, shapes, dtypes, strict=False):
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
        out[name] = rng.standard_normal(dims).astype(dtype)
    return out


@agent_app.command("infer")
@reports_errors
def infer(
    bundle: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    home: Home,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            exists=True,
            dir_okay=False,
            help=".npy (first input) or .npz (by input name); default: random",
        ),
    ] = None,
    seed: int = 0,
    config: Annotated[Path | None, typer.Option(envvar="EDGESEAL_CONFIG")] = None,
    as_json: Json = False,
) -> None:
    """Verify BUNDLE, open it in memory with this device's key, run one inference."""
    cfg = load_config(config)
    dev = DeviceHome(home)
    store = dev.key_store(passphrase=passphrase_from(None))
    now = dev.trusted_now()
    policy = VerifyPolicy(
        anchor=dev.anchor(),
        now=now,
        architecture=machine_architecture(),
        agent_version=__version__,
        runtimes=("onnxruntime", "litert"),
        limits=cfg.limits,
    )
    with (
        progress_bytes("decrypting", bundle.stat().st_size, enabled=not as_json) as advance,
        open_bundle(bundle, key_store=store, policy=policy, config=cfg, progress=advance) as model,
    ):
        dev.advance_trusted_time(model.manifest.created)
        m = model.manifest
        inputs = _load_input(
            input_file,
            [t.name for t in m.inputs],
            [t.shape for t in m.inputs],
            [t.dtype for t in m.inputs],
            seed,
        )
        outputs = model.run(inputs)
        status = model.status()
    data = {
        "ok": True,
        "status": status,
        "inputs": {k: v.tolist() for k, v in inputs.items()},
        "outputs": {k: v.tolist() for k, v in outputs.items()},
    }

    def render() -> None:
        mem = ", ".join(
            f"{k}: {v['kind']}{' locked' if v['locked'] else ' NOT locked'}"
            for k, v in status["memory"].items()
        )
        out_console.print(
            f"[green]✓[/] verified {m.model_name} v{m.version} signed by "
            f"{status['signer']}; key unwrapped in {status['key_store']} store"
            f"{'' if status['hardware_backed'] else ' (not hardware-backed)'}"
        )
        out_console.print(f"[green]✓[/] decrypted in memory only ({mem})")
        out_console.print(
            f"[green]✓[/] {status['runtime']} session: {status['weights_handed_over']}"
        )
        t = Table("output", "shape", "values")
        for k, v in outputs.items():
            t.add_row(k, str(v.shape), np.array2string(v, precision=4, max_line_width=80))
        out_console.print(t)

    emit(data, as_json=as_json, render=render)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
