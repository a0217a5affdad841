"""``edgeseal agent ...``: provision a device and open bundles on it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from edgeseal.agent.audit import audit_location, read_records, verify_log
from edgeseal.agent.client import Client
from edgeseal.agent.daemon import Daemon
from edgeseal.agent.device import DeviceHome
from edgeseal.agent.guard import ServingModel
from edgeseal.agent.opener import open_bundle
from edgeseal.agent.service import Agent
from edgeseal.core.config import Config, load_config
from edgeseal.core.console import (
    EXIT_REJECTED,
    emit,
    out_console,
    progress_bytes,
    reports_errors,
    untrusted,
)
from edgeseal.core.errors import PathError
from edgeseal.core.files import reported_as_path_error
from edgeseal.core.keys import passphrase_from
from edgeseal.core.listen import ListenAddress
from edgeseal.core.logs import LogFormat, configure_logging
from edgeseal.hardware.stores import StoreSpec, choose_store

agent_app = typer.Typer(
    help="The on-device agent: provision, open bundles, run inference.", no_args_is_help=True
)

Home = Annotated[
    Path, typer.Option("--home", envvar="EDGESEAL_HOME", help="Device home directory.")
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Config_ = Annotated[
    Path | None,
    typer.Option("--config", envvar="EDGESEAL_CONFIG", help="edgeseal TOML config file."),
]


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
        typer.Option(
            help=escape("auto (the strongest present), tpm, pkcs11 or software [config].")
        ),
    ] = None,
    tcti: Annotated[
        str | None, typer.Option(help=escape("TPM TCTI (swtpm:path=... for swtpm) [config]."))
    ] = None,
    pcrs: Annotated[
        str | None, typer.Option(help=escape("Bind the TPM key to these PCRs, e.g. 7,16 [config]."))
    ] = None,
    pkcs11_module: Annotated[
        str | None, typer.Option(help=escape("PKCS#11 module (.so) path [config]."))
    ] = None,
    token_label: Annotated[
        str | None, typer.Option(help=escape("PKCS#11 token label [config]."))
    ] = None,
    pin_file: Annotated[
        str | None,
        typer.Option(
            help=escape("File holding the token PIN (else $EDGESEAL_PKCS11_PIN) [config].")
        ),
    ] = None,
    config: Config_ = None,
    machine_bound: Annotated[
        bool,
        typer.Option(
            "--machine-bound", help="software store: encrypt the key under this machine's identity."
        ),
    ] = False,
    as_json: Json = False,
) -> None:
    r"""Provision this device: make its key, pin the root, print what the registry needs.

    Options not given come from the \[device] table of the config."""
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
    root_public_keys = [p.read_bytes() for p in root]
    with reported_as_path_error(home, "provision the device home"):
        info = DeviceHome(home).init(
            root_public_keys=root_public_keys,
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
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            return {names[0]: np.load(path, allow_pickle=False)}
        except OSError as e:
            raise PathError.from_os_error(e, path, "read the input") from e
        except (ValueError, EOFError) as e:
            # numpy's own words (allow_pickle, "No data left in file") name no file.
            raise PathError(
                f"cannot read the input {path}: not a .npy or .npz array file", path=path
            ) from e
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape, dtype in zip(names, shapes, dtypes, strict=False):
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
        out[name] = rng.standard_normal(dims).astype(dtype)
    return out


Socket = Annotated[
    Path | None,
    typer.Option("--socket", envvar="EDGESEAL_SOCKET", help=escape("The agent's socket [config].")),
]


def _open_direct(bundle: Path, home: Path, cfg: Config, as_json: bool) -> ServingModel:
    """Open a bundle file in this process as the daemon would (golden vectors checked)."""
    dev = DeviceHome(home)
    agent = Agent(dev, cfg, passphrase=passphrase_from(None))
    with progress_bytes("decrypting", bundle.stat().st_size, enabled=not as_json) as advance:
        opened = open_bundle(
            bundle,
            key_store=agent.key_store,
            policy=agent.policy(None, installing=True),
            config=cfg,
            progress=advance,
        )
    dev.advance_trusted_time(
        opened.manifest.created, clock_skew=timedelta(seconds=cfg.device.clock_skew)
    )
    return ServingModel.start(opened, cfg.agent)


@agent_app.command("infer")
@reports_errors
def infer(
    target: Annotated[str, typer.Argument(help="A bundle file, or a model the daemon serves.")],
    home: Home = Path("/var/lib/edgeseal"),
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
    socket: Socket = None,
    config: Config_ = None,
    as_json: Json = False,
) -> None:
    """Run one inference: on a bundle file opened here (verify, unwrap, decrypt into
    locked memory, check golden vectors), or on a model through the running daemon."""
    cfg = load_config(config)
    bundle = Path(target)
    if bundle.is_dir():
        raise PathError(f"{bundle} is a directory, not a bundle file", path=bundle)
    if not bundle.is_file() and (bundle.suffix == ".esb" or len(bundle.parts) > 1):
        # A path, not a model name (names have no "/"; bundles end in .esb).
        raise PathError(f"bundle {bundle} does not exist", path=bundle)
    if bundle.is_file():
        with contextlib.closing(_open_direct(bundle, home, cfg, as_json)) as sm:
            m = sm.opened.manifest
            specs = m.inputs
            inputs = _load_input(
                input_file,
                [t.name for t in specs],
                [t.shape for t in specs],
                [t.dtype for t in specs],
                seed,
            )
            result = sm.infer(inputs)
            status = sm.status()
        outputs, identity, ood = result.outputs, result.model, result.ood
    else:
        with Client(str(socket or cfg.agent.socket)) as client:
            info = client.info(target)
            specs_obj = info["inputs"]
            inputs = _load_input(
                input_file,
                [t["name"] for t in specs_obj],
                [tuple(t["shape"]) for t in specs_obj],
                [t["dtype"] for t in specs_obj],
                seed,
            )
            response = client.infer(target, inputs)
        outputs, identity, ood, status = response.outputs, response.model, response.ood, None
    data = {
        "ok": True,
        **identity,
        "ood": ood,
        "status": status,
        "inputs": {k: v.tolist() for k, v in inputs.items()},
        "outputs": {k: v.tolist() for k, v in outputs.items()},
    }

    def render() -> None:
        if status is not None:
            mem = ", ".join(
                f"{k}: {v['kind']}{' locked' if v['locked'] else ' NOT locked'}"
                for k, v in status["memory"].items()
            )
            out_console.print(
                f"[green]✓[/] verified {identity['model']} v{identity['version']} signed by "
                f"{status['signer']}; key unwrapped in {status['key_store']} store"
                f"{'' if status['hardware_backed'] else ' (not hardware-backed)'}"
            )
            out_console.print(f"[green]✓[/] decrypted in memory only ({mem})")
            out_console.print(
                f"[green]✓[/] {status['runtime']} session: {status['weights_handed_over']}"
            )
            out_console.print(
                f"[green]✓[/] golden vectors reproduced ({status['golden_runs']} run)"
            )
        else:
            out_console.print(
                f"answered by {identity['model']} v{identity['version']} "
                f"(bundle {identity['bundle_id']})"
            )
        t = Table("output", "shape", "values")
        for k, v in outputs.items():
            t.add_row(k, str(v.shape), np.array2string(v, precision=4, max_line_width=80))
        out_console.print(t)
        if ood is not None:
            out_console.print(f"OOD score per row (above 1: unusual): {ood}")

    emit(data, as_json=as_json, render=render)


@agent_app.command("install")
@reports_errors
def install(
    bundle: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    home: Home = Path("/var/lib/edgeseal"),
    config: Config_ = None,
    as_json: Json = False,
) -> None:
    """Verify BUNDLE and install it for serving: staged beside the serving slot, opened
    and checked (golden vectors), then committed; the previous one becomes the fallback.
    A running daemon picks it up on SIGHUP (systemctl reload / snap restart)."""
    cfg = load_config(config)
    agent = Agent(DeviceHome(home), cfg, passphrase=passphrase_from(None))
    try:
        result = agent.install(bundle)
    finally:
        agent.close()
    emit(
        {"ok": True, **result},
        as_json=as_json,
        render=lambda: out_console.print(
            f"installed {result['model']} v{result['version']} in slot {result['slot']}"
            + (f" (fallback: slot {result['fallback']})" if result["fallback"] else "")
        ),
    )


@agent_app.command("run")
@reports_errors
def run(
    home: Home = Path("/var/lib/edgeseal"),
    socket: Socket = None,
    config: Config_ = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            metavar="HOST:PORT",
            help=escape(
                "Also serve GET /metrics (only) over TCP here, e.g. 127.0.0.1:9464; "
                'a bare port is loopback, "" turns it off [config].'
            ),
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="EDGESEAL_LOG_FORMAT",
            help="Log lines on stderr: text, or json (one object per line). Without "
            "timestamps under journald, which stamps them.",
        ),
    ] = LogFormat.TEXT,
) -> None:
    """Run the agent daemon: serve installed models on the local socket, run the update
    channels and the scheduled integrity checks. SIGHUP reloads, SIGTERM stops."""
    configure_logging(
        sys.stderr, level=logging.DEBUG if verbose else logging.INFO, log_format=log_format
    )
    cfg = load_config(config)
    if metrics_listen is not None:
        cfg = _with_metrics_listen(cfg, metrics_listen)
    Daemon(DeviceHome(home), cfg, socket_path=socket).run()


def _with_metrics_listen(cfg: Config, value: str) -> Config:
    """``cfg`` with --metrics-listen in place of [agent] metrics_listen (checked: a bad
    value is a ConfigError naming it, exit 2)."""
    if value:
        ListenAddress.parse(value, where="--metrics-listen")
    return dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, metrics_listen=value))


@agent_app.command("status")
@reports_errors
def status_cmd(
    socket: Socket = None,
    config: Config_ = None,
    as_json: Json = False,
) -> None:
    """The running agent's status: models, versions, slots, counters, memory, key store."""
    cfg = load_config(config)
    with Client(str(socket or cfg.agent.socket)) as client:
        st = client.status()

    def render() -> None:
        out_console.print(
            f"device {st['device']}: key store {st['key_store']}"
            f"{'' if st['hardware_backed'] else ' (not hardware-backed)'}; floors: {st['floors']}"
        )
        t = Table("model", "version", "requests", "OOD rows", "rejected", "state")
        for name, m in st["models"].items():
            t.add_row(
                untrusted(name),
                str(m["version"]),
                str(m["requests"]),
                str(m["ood_rows"]),
                str(m["rejected"]),
                f"[red]quarantined: {untrusted(m['quarantined'])}[/]"
                if m["quarantined"]
                else "serving",
            )
        out_console.print(t)

    emit(st, as_json=as_json, render=render)


audit_app = typer.Typer(help="The agent's tamper-evident audit log.", no_args_is_help=True)
AuditLogPath = Annotated[
    Path | None, typer.Option("--log", help=escape("Default: [agent] audit_log."))
]
agent_app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
@reports_errors
def audit_verify(
    home: Home = Path("/var/lib/edgeseal"),
    log_path: AuditLogPath = None,
    config: Config_ = None,
    as_json: Json = False,
) -> None:
    """Check the audit log's hash chain, its anchor and its counter (exit 1 if broken)."""
    cfg = load_config(config)
    path, counter = audit_location(home, cfg.agent.audit_log)
    report = verify_log(log_path or path, counter)
    emit(
        {"ok": report.ok, "records": report.records, "problems": report.problems},
        as_json=as_json,
        render=lambda: out_console.print(
            f"[green]audit log intact[/]: {report.records} records"
            if report.ok
            else "[red]audit log broken[/]:\n  " + "\n  ".join(report.problems)
        ),
    )
    if not report.ok:
        raise typer.Exit(EXIT_REJECTED)


def _since(text: str | None) -> datetime | None:
    """``--since``: an ISO 8601 time; without a zone it is UTC."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an ISO 8601 time (like 2026-01-31T12:00:00Z or 2026-01-31)",
            param_hint="--since",
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


#: Columns of ``audit show``: (heading, field); the rest of a record goes under "other".
_AUDIT_COLUMNS = (
    ("seq", "seq"),
    ("time", "time"),
    ("model", "model"),
    ("version", "version"),
    ("uid", "uid"),
    ("pid", "pid"),
    ("result", "result"),
    ("OOD max", "ood_max"),
)
_AUDIT_HIDDEN = frozenset({"prev", "gid", "groups"})


@audit_app.command("show")
@reports_errors
def audit_show(
    home: Home = Path("/var/lib/edgeseal"),
    log_path: AuditLogPath = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Only records at or after this ISO 8601 time (UTC if no zone)."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model's records.")] = None,
    config: Config_ = None,
    as_json: Json = False,
) -> None:
    """Print the audit log's records, oldest first (it checks nothing: audit verify does).

    --json prints {"ok": true, "records": [...]}, each record as the log holds it."""
    start = _since(since)
    cfg = load_config(config)
    path, _ = audit_location(home, cfg.agent.audit_log)
    records = list(read_records(log_path or path, since=start, model=model))

    def cell(value: Any) -> str:
        return "" if value is None else untrusted(str(value))

    def render() -> None:
        t = Table(*(heading for heading, _ in _AUDIT_COLUMNS), "other")
        shown = {name for _, name in _AUDIT_COLUMNS} | _AUDIT_HIDDEN
        for r in records:
            other = {k: v for k, v in r.items() if k not in shown}
            t.add_row(
                *(cell(r.get(name)) for _, name in _AUDIT_COLUMNS),
                cell(json.dumps(other, sort_keys=True)) if other else "",
            )
        out_console.print(t)
        out_console.print(f"{len(records)} records")

    emit({"ok": True, "records": records}, as_json=as_json, render=render)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
