"""``edgeseal ota ...``: fleet TLS identities, device groups, the example broker,
rollouts and the fleet simulator.

Workstation side: ``ca-init``, ``enroll``, ``group``, ``broker-config``; rollouts:
``deploy``, ``status``, ``halt``, ``resume``, ``fallback``, ``finalize``, ``devices``;
``simulate``. Device side: ``csr``. See docs/ota.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgeseal.agent.device import DeviceHome
from edgeseal.core.config import load_config
from edgeseal.core.console import (
    EXIT_REJECTED,
    emit,
    err_console,
    out_console,
    reports_errors,
    untrusted,
)
from edgeseal.core.encoding import canonical_json, format_time
from edgeseal.core.errors import KeyFileError, UnknownNameError
from edgeseal.core.files import atomic_write, reported_as_path_error
from edgeseal.core.keyring import Keyring, default_keys_dir
from edgeseal.core.keys import passphrase_from
from edgeseal.ota.broker import BrokerSetup, acl_text
from edgeseal.ota.controller import (
    DEFAULT_CHUNK_BYTES,
    Controller,
    RolloutError,
    rollout_report,
)
from edgeseal.ota.enroll import CONTROLLER, FleetCA, default_ca_dir, make_csr
from edgeseal.ota.mqtt import MqttConnection
from edgeseal.ota.registry import GroupRegistry
from edgeseal.ota.rollout import Policy, Success, parse_duration, parse_rate, parse_waves
from edgeseal.ota.rollout_store import RolloutStore, default_store_path, open_store
from edgeseal.ota.simulate import FleetSpec, SimFleet, provision_fleet
from edgeseal.ota.topics import Topics

ota_app = typer.Typer(
    help="Fleet updates over MQTT: TLS identities, groups, the broker, rollouts.",
    no_args_is_help=True,
)
group_app = typer.Typer(help="Device groups (group offers go to their members).")
ota_app.add_typer(group_app, name="group")

KeysDir = Annotated[
    Path | None,
    typer.Option(
        "--keys-dir", envvar="EDGESEAL_KEYS", help="Keyring directory.", show_default=False
    ),
]
CaPass = Annotated[
    Path | None,
    typer.Option(
        "--ca-passphrase-file",
        help="File whose first line is the fleet CA key's passphrase "
        "(else $EDGESEAL_CA_PASSPHRASE; none: key stored unencrypted).",
    ),
]
Home = Annotated[
    Path, typer.Option("--home", envvar="EDGESEAL_HOME", help="Device home directory.")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", envvar="EDGESEAL_CONFIG", help="edgeseal TOML config file."),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _keys(keys_dir: Path | None) -> Path:
    return keys_dir or default_keys_dir()


def _ca(keys_dir: Path | None, passphrase_file: Path | None) -> FleetCA:
    return FleetCA.load(
        default_ca_dir(_keys(keys_dir)),
        passphrase=passphrase_from(passphrase_file, env="EDGESEAL_CA_PASSPHRASE"),
    )


# -- the fleet CA and enrollment ------------------------------------------------------
@ota_app.command("ca-init")
@reports_errors
def ca_init(
    keys_dir: KeysDir = None,
    passphrase_file: CaPass = None,
    days: Annotated[int, typer.Option(help="CA certificate validity in days.")] = 3650,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing fleet CA.")] = False,
    as_json: Json = False,
) -> None:
    """Create the fleet CA (in <keyring>/fleet-ca/) that issues MQTT TLS certificates."""
    passphrase = passphrase_from(passphrase_file, env="EDGESEAL_CA_PASSPHRASE")
    with reported_as_path_error(default_ca_dir(_keys(keys_dir)), "create the fleet CA in"):
        ca = FleetCA.init(
            default_ca_dir(_keys(keys_dir)), days=days, force=force, passphrase=passphrase
        )
    emit(
        {"ok": True, "ca_dir": str(ca.path), "ca_file": str(ca.cert_path)},
        as_json=as_json,
        render=lambda: out_console.print(
            f"fleet CA created in {ca.path}\nbrokers and devices pin: {ca.cert_path}"
        ),
    )


@ota_app.command("csr")
@reports_errors
def csr(
    home: Home,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the request here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing TLS key.")] = False,
    as_json: Json = False,
) -> None:
    """On the device: make its MQTT TLS key and a certificate request (CN = device id).

    The TLS key is a software key (<home>/ota/tls.key, 0600): Python's ssl cannot use a
    TPM or PKCS#11 key. The key that opens bundles stays in the device's key store."""
    info = DeviceHome(home).info()
    device_id = str(info["device_id"])
    ota_dir = home / "ota"
    key_path = ota_dir / "tls.key"
    if key_path.exists() and not force:
        raise KeyFileError(f"{key_path} exists; give --force to make a new TLS key")
    ota_dir.mkdir(parents=True, exist_ok=True)
    ota_dir.chmod(0o700)
    pem = make_csr(device_id, key_path)
    csr_path = ota_dir / "tls.csr"
    atomic_write(csr_path, pem)
    atomic_write(
        ota_dir / "tls.json",
        canonical_json({"device_id": device_id, "key": "tls.key", "key_storage": "software"}),
    )
    if out is not None:
        with reported_as_path_error(out, "write the request to"):
            atomic_write(out, pem)
    emit(
        {
            "ok": True,
            "device_id": device_id,
            "csr": str(out or csr_path),
            "tls_key": str(key_path),
            "key_storage": "software",
        },
        as_json=as_json,
        render=lambda: out_console.print(
            f"certificate request for {device_id} written to {out or csr_path}\n"
            f"TLS key (software key, see docs/ota.md): {key_path}\n"
            f"on the workstation: edgeseal ota enroll {out or csr_path} "
            f"--out {device_id}.pem",
            highlight=False,
        ),
    )


@ota_app.command("enroll")
@reports_errors
def enroll(
    request: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The device's CSR (PEM).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the certificate (PEM).")],
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
    device_id: Annotated[
        str | None, typer.Option("--device-id", help="Refuse a request for any other id.")
    ] = None,
    allow_unregistered: Annotated[
        bool,
        typer.Option(
            "--allow-unregistered",
            help="Issue even when the id is not in the keyring's device registry.",
        ),
    ] = False,
    keys_dir: KeysDir = None,
    passphrase_file: CaPass = None,
    as_json: Json = False,
) -> None:
    """Issue a device's MQTT client certificate from its CSR (the CN must be its id)."""
    ca = _ca(keys_dir, passphrase_file)
    registered = None if allow_unregistered else {d.id for d in Keyring(_keys(keys_dir)).devices()}
    cert_pem = ca.issue_device(
        request.read_bytes(), days=days, expected_id=device_id, registered=registered
    )
    cn = ca.issued()[-1]["cn"]
    with reported_as_path_error(out, "write the certificate to"):
        atomic_write(out, cert_pem)
    emit(
        {"ok": True, "device_id": cn, "certificate": str(out), "ca_file": str(ca.cert_path)},
        as_json=as_json,
        render=lambda: out_console.print(
            f"certificate for {cn} written to {out}\n"
            f"install it on the device with the CA certificate {ca.cert_path} "
            "(\\[ota] cert_file, ca_file)",
            highlight=False,
        ),
    )


# -- groups ---------------------------------------------------------------------------
def _print_groups(groups: dict[str, tuple[str, ...]]) -> None:
    table = Table("group", "members")
    for name, members in groups.items():
        table.add_row(name, ", ".join(members))
    out_console.print(table)


@group_app.command("add")
@reports_errors
def group_add(
    group: Annotated[str, typer.Argument(help="Group name.")],
    devices: Annotated[list[str], typer.Argument(help="Device ids to add.")],
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Add registered devices (keys add-device) to a group (made when new). Then rewrite
    the broker ACL."""
    ring = Keyring(_keys(keys_dir))
    registered = {d.id for d in ring.devices()}
    unknown = [d for d in devices if d not in registered]
    if unknown:
        # Refused now, not at deploy: a bundle can only be sealed for a registered key.
        raise UnknownNameError(
            f"not in the registry of {ring.path}: {', '.join(unknown)} "
            "(register each first: edgeseal keys add-device ID device.pub.json)"
        )
    members = GroupRegistry.in_keyring(_keys(keys_dir)).add(group, devices)
    emit(
        {"ok": True, "group": group, "members": list(members)},
        as_json=as_json,
        render=lambda: out_console.print(
            untrusted(f"{group}: {', '.join(members)}"), highlight=False
        ),
    )


@group_app.command("remove")
@reports_errors
def group_remove(
    group: Annotated[str, typer.Argument(help="Group name.")],
    devices: Annotated[
        list[str] | None, typer.Argument(help="Device ids to remove (none: the whole group).")
    ] = None,
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Remove devices from a group, or the group itself. Then rewrite the broker ACL."""
    members = GroupRegistry.in_keyring(_keys(keys_dir)).remove(group, devices or ())
    emit(
        {"ok": True, "group": group, "members": list(members)},
        as_json=as_json,
        render=lambda: out_console.print(
            f"{group}: {', '.join(members)}" if members else f"{group} removed",
            highlight=False,
        ),
    )


@group_app.command("list")
@reports_errors
def group_list(
    device: Annotated[
        str | None, typer.Option("--device", help="Only the groups of this device.")
    ] = None,
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """List groups and their members."""
    reg = GroupRegistry.in_keyring(_keys(keys_dir))
    groups = reg.groups()
    if device is not None:
        mine = set(reg.groups_of(device))
        groups = {g: m for g, m in groups.items() if g in mine}
    emit(
        {"ok": True, "groups": {g: list(m) for g, m in groups.items()}},
        as_json=as_json,
        render=lambda: _print_groups(groups),
    )


# -- the example broker ---------------------------------------------------------------
@ota_app.command("broker-config")
@reports_errors
def broker_config(
    out: Annotated[Path, typer.Option("--out", help="The broker directory to write.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A name or IP devices reach the broker by (repeat)."),
    ] = None,
    port: Annotated[int, typer.Option(help="TLS port.")] = 8883,
    bind: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on (default: the one --host given, all addresses for "
            "several, 127.0.0.1 for none).",
            show_default=False,
        ),
    ] = None,
    controller: Annotated[
        str, typer.Option(help="The controller's certificate CN (full access).")
    ] = CONTROLLER,
    prefix: Annotated[
        str | None, typer.Option(help=escape("Topic prefix [config: ota.topic_prefix]."))
    ] = None,
    acl_only: Annotated[
        bool,
        typer.Option(
            "--acl-only", help="Only rewrite the ACL from the groups (then SIGHUP mosquitto)."
        ),
    ] = False,
    keys_dir: KeysDir = None,
    passphrase_file: CaPass = None,
    config: ConfigOpt = None,
    as_json: Json = False,
) -> None:
    """Write a Mosquitto broker directory: certificates, mosquitto.conf and the ACL."""
    topics = Topics(prefix or load_config(config).ota.topic_prefix)
    if bind is None:
        # Devices reach the broker by --host: listen there, not on loopback only (on
        # every address for several names).
        if not host:
            bind = "127.0.0.1"
        elif len(host) == 1:
            bind = host[0]
        else:
            bind = "0.0.0.0"  # noqa: S104  # nosec B104
    groups = GroupRegistry.in_keyring(_keys(keys_dir)).groups()
    if acl_only:
        acl = BrokerSetup.acl_path_in(out)
        if not acl.exists():
            raise ValueError(f"{out} holds no broker ACL; run broker-config without --acl-only")
        with reported_as_path_error(acl, "write the broker ACL to"):
            atomic_write(acl, acl_text(topics, groups, controller).encode())
        written, where = [acl], out
    else:
        with reported_as_path_error(out, "write the broker directory"):
            setup = BrokerSetup.write(
                out,
                _ca(keys_dir, passphrase_file),
                groups=groups,
                topics=topics,
                hosts=host or (),
                controller=controller,
                port=port,
                bind=bind,
            )
        written = [
            setup.conf_file,
            setup.settings.acl_file,
            setup.ca_file,
            setup.settings.cert_file,
            setup.settings.key_file,
            setup.controller_cert,
            setup.controller_key,
        ]
        where = setup.path
    emit(
        {
            "ok": True,
            "dir": str(where),
            "files": [str(p) for p in written],
            "groups": len(groups),
            "bind": None if acl_only else f"{bind}:{port}",
        },
        as_json=as_json,
        render=lambda: out_console.print(
            f"broker files written to {where} ({len(groups)} groups"
            + ("" if acl_only else f"; listening on {bind}:{port}")
            + ")\n"
            + (
                "reload the ACL: kill -HUP $(pidof mosquitto)"
                if acl_only
                else f"run: mosquitto -c {where / 'mosquitto.conf'}"
            ),
            highlight=False,
        ),
    )


# -- rollouts ----------------------------------------------------------------------------
Broker = Annotated[
    str | None,
    typer.Option("--broker", envvar="EDGESEAL_BROKER", help="mqtts://host:port of the broker."),
]
TlsDir = Annotated[
    Path | None,
    typer.Option(
        "--tls-dir",
        envvar="EDGESEAL_TLS_DIR",
        help="A broker-config directory: ca.pem, controller.pem, controller.key.",
    ),
]
CaFile = Annotated[Path | None, typer.Option("--ca-file", help="The fleet CA certificate.")]
CertFile = Annotated[Path | None, typer.Option("--cert-file", help="The controller's certificate.")]
KeyFile = Annotated[Path | None, typer.Option("--key-file", help="The controller's TLS key.")]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="EDGESEAL_ROLLOUT_STORE",
        help=escape("SQLite file or postgresql:// URL [default: <keyring>/fleet/rollouts.sqlite]."),
    ),
]
Share = Annotated[
    str | None,
    typer.Option(help="MQTT 5 shared-subscription group, for several controllers."),
]
Prefix = Annotated[str, typer.Option("--prefix", help="Topic prefix.")]
RolloutArg = Annotated[
    str | None, typer.Argument(help="Rollout id (default: the newest).", show_default=False)
]


def _open_store(store: str | None, keys_dir: Path | None) -> RolloutStore:
    return open_store(store or default_store_path(_keys(keys_dir)))


def _rollout_id(st: RolloutStore, rollout: str | None) -> str:
    if rollout:
        return rollout
    newest = st.rollouts(limit=1)
    if not newest:
        raise RolloutError("no rollouts in this store yet (edgeseal ota deploy ...)")
    return newest[0].id


def _controller(
    st: RolloutStore,
    *,
    keys_dir: Path | None,
    signer: str,
    broker: str | None,
    tls_dir: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    prefix: str,
    share: str | None,
) -> Controller:
    if not broker:
        raise ValueError("give the broker: --broker mqtts://host:8883 (or $EDGESEAL_BROKER)")
    ca = ca_file or (tls_dir / "ca.pem" if tls_dir else None)
    cert = cert_file or (tls_dir / "controller.pem" if tls_dir else None)
    key = key_file or (tls_dir / "controller.key" if tls_dir else None)
    if broker.startswith("mqtts://") and not (ca and cert and key):
        raise ValueError("TLS needs --tls-dir DIR (or --ca-file, --cert-file, --key-file)")
    ring = Keyring(_keys(keys_dir))
    sig, cert_obj = ring.load_signer(signer)
    if "deploy" not in ring.certificate_payload(signer).get("roles", []):
        raise ValueError(
            f"signer {signer!r} has no deploy role (edgeseal keys new-signer NAME --role deploy)"
        )

    def connect(**kw: Any) -> MqttConnection:
        return MqttConnection(
            broker,
            client_id=f"{CONTROLLER}-{uuid.uuid4().hex[:8]}",
            ca_file=str(ca or ""),
            cert_file=str(cert or ""),
            key_file=str(key or ""),
            clean=True,
            **kw,
        )

    return Controller(
        st,
        connect,
        topics=Topics(prefix),
        signer=sig,
        certificate=cert_obj,
        revocations=ring.revocations(),
        rotations=ring.rotations(),
        anchor=ring.anchor(),
        share=share,
    )


def _default_signer(keys_dir: Path | None) -> str:
    ring = Keyring(_keys(keys_dir))
    names = [n for n in ring.signer_names() if "deploy" in ring.certificate_payload(n)["roles"]]
    if len(names) != 1:
        raise ValueError(
            "name the signer with --signer"
            + ("" if names else " (none has the deploy role: keys new-signer N --role deploy)")
        )
    return names[0]


_PHASE_COLUMNS = (
    ("offered", ("offered",)),
    ("downloading", ("downloading", "verifying", "staged")),
    ("testing", ("testing",)),
    ("committed", ("committed",)),
    ("failed", ("failed", "refused", "timed-out")),
    ("fallen back", ("fallen-back",)),
)


#: How a closed wave's verdict reads ("pass: R3: 5 of 5 committed" is stored).
_VERDICT_WORDS = {  # nosec B105 - the wave gate's actions ("pass"), not a password
    "pass": "passed",
    "done": "passed, the last wave",
    "halt": "halted",
}


def _in_words(reason: str) -> str:
    """A wave gate's reason without its rule code ("R3: 5 of 5 committed" reads
    "5 of 5 committed"); docs/ota.md lists the rules."""
    return re.sub(r"\bR\d+: ", "", reason)


def _verdict_words(verdict: str | None, opened: bool) -> str:
    if not verdict:
        return "open" if opened else "waiting"
    action, _, reason = verdict.partition(": ")
    words = _VERDICT_WORDS.get(action, action)
    return f"{words}: {_in_words(reason)}" if reason else words


def _status_table(report: dict[str, Any]) -> Group:
    """The waves as a table of counts (it fits 80 columns), each wave's verdict below it
    in words."""
    title = untrusted(
        f"{report['rollout']}: {report['model']} v{report['version']} to {report['group']} "
        f"({report['state']})"
    )
    table = Table(title=title, box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for heading in ("wave", "devices", *(c for c, _ in _PHASE_COLUMNS)):
        table.add_column(heading, justify="right", no_wrap=True, min_width=len(heading))
    verdicts = []
    for w in report["waves"]:
        phases = w["phases"]
        cells = [str(sum(phases.get(p, 0) for p in ps) or "") for _, ps in _PHASE_COLUMNS]
        table.add_row(str(w["wave"]), str(w["devices"]), *cells)
        words = _verdict_words(w["verdict"], bool(w["opened_at"]))
        verdicts.append(Text(f"wave {w['wave']}: {words}"))
    return Group(table, *verdicts)


def _summary(report: dict[str, Any]) -> str:
    lines = [
        f"{report['rollout']}: {report['state']}"
        + (f" ({_in_words(report['reason'])})" if report["reason"] else ""),
        f"{report['committed']} of {report['devices']} devices committed "
        f"v{report['version']}, {report['failed']} failed, {report['in_progress']} in progress",
    ]
    for w in report["waves"]:
        for dev, why in sorted(w["failures"].items())[:10]:
            lines.append(f"  wave {w['wave']} {dev}: {why}")
    return "\n".join(lines)


def _report_document(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` for --json: its times in RFC 3339 UTC, as every edgeseal document."""

    def when(t: float | None) -> str | None:
        return None if t is None else format_time(datetime.fromtimestamp(t, timezone.utc))

    waves = [{**w, "opened_at": when(w["opened_at"]), "closed_at": when(w["closed_at"])}
             for w in report["waves"]]  # fmt: skip
    return {
        **report,
        "created": when(report["created"]),
        "updated": when(report["updated"]),
        "waves": waves,
    }


@ota_app.command("deploy")
@reports_errors
def deploy(
    bundle: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The bundle.")],
    group: Annotated[str, typer.Option("--group", help="The device group to update.")],
    waves: Annotated[
        str, typer.Option(help="Cumulative percentages of the group per wave.")
    ] = "1%,10%,50%,100%",
    max_failure_rate: Annotated[
        str, typer.Option(help="A wave with more failures than this halts the rollout.")
    ] = "0%",
    min_success: Annotated[
        str | None,
        typer.Option(
            help=escape(
                "Committed devices a wave needs to pass: a count or a percentage "
                "[default: all but the failure budget]."
            )
        ),
    ] = None,
    wave_timeout: Annotated[
        str, typer.Option(help="A wave not passed after this halts; silent devices fail.")
    ] = "30m",
    max_ood_rate: Annotated[
        str | None, typer.Option(help="Halt when the wave's mean OOD rate is above this.")
    ] = None,
    soak: Annotated[
        str | None, typer.Option(help="Keep each wave open at least this long (OOD signals).")
    ] = None,
    auto_fallback: Annotated[
        bool,
        typer.Option("--auto-fallback", help="On a halt, order the wave's committed devices back."),
    ] = False,
    group_offer: Annotated[
        bool, typer.Option(help="One-wave rollouts: one offer to the group topic.")
    ] = True,
    chunk_size: Annotated[int, typer.Option(help="Transport chunk bytes.")] = DEFAULT_CHUNK_BYTES,
    signer: Annotated[str | None, typer.Option(help="Keyring signer with the deploy role.")] = None,
    broker: Broker = None,
    tls_dir: TlsDir = None,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    store: StoreOpt = None,
    share: Share = None,
    prefix: Prefix = "edgeseal/v1",
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Roll a bundle out to a group in waves; halt on failures; exit 0 done, 1 halted."""
    policy = Policy(
        waves=parse_waves(waves),
        max_failure_rate=parse_rate(max_failure_rate),
        min_success=Success.parse(min_success),
        wave_timeout=parse_duration(wave_timeout),
        max_ood_rate=parse_rate(max_ood_rate) if max_ood_rate else None,
        auto_fallback=auto_fallback,
        soak=parse_duration(soak) if soak else 0.0,
    )
    members = GroupRegistry.in_keyring(_keys(keys_dir)).members(group)
    signer = signer or _default_signer(keys_dir)
    st = _open_store(store, keys_dir)
    ctl = _controller(
        st, keys_dir=keys_dir, signer=signer, broker=broker, tls_dir=tls_dir,
        ca_file=ca_file, cert_file=cert_file, key_file=key_file, prefix=prefix, share=share,
    )  # fmt: skip
    record = ctl.create(
        bundle, group=group, members=members, policy=policy, signer_name=signer,
        chunk_bytes=chunk_size, group_offer=group_offer,
    )  # fmt: skip
    if not as_json:
        err_console.print(f"rollout {record.id}", highlight=False)
    _drive(ctl, st, record.id, as_json=as_json)


def _drive(ctl: Controller, st: RolloutStore, rollout_id: str, *, as_json: bool) -> None:
    ctl.start()
    try:
        if as_json or not out_console.is_terminal:
            final = ctl.run(rollout_id)
        else:
            with Live(console=out_console, refresh_per_second=4) as live:
                final = ctl.run(
                    rollout_id,
                    on_step=lambda _r: live.update(_status_table(rollout_report(st, rollout_id))),
                )
    finally:
        ctl.stop()
    report = rollout_report(st, rollout_id)
    emit(
        {"ok": final.state == "done", **_report_document(report)},
        as_json=as_json,
        render=lambda: out_console.print(_summary(report), highlight=False, markup=False),
    )
    if final.state != "done":
        raise typer.Exit(EXIT_REJECTED)


@ota_app.command("status")
@reports_errors
def status(
    rollout: RolloutArg = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until the rollout ends.")] = False,
    store: StoreOpt = None,
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """A rollout's waves: devices offered, downloading, testing, committed, failed."""
    st = _open_store(store, keys_dir)
    rid = _rollout_id(st, rollout)
    report = rollout_report(st, rid)
    if watch and not as_json:
        # transient: the live table goes when the rollout ends, and the final one is
        # printed once, below, as without --watch.
        live = Live(_status_table(report), console=out_console, auto_refresh=False, transient=True)
        with live:
            while report["state"] == "running":
                time.sleep(0.5)
                report = rollout_report(st, rid)
                live.update(_status_table(report), refresh=True)

    def render() -> None:
        out_console.print(_status_table(report))
        out_console.print(_summary(report), highlight=False, markup=False)

    emit({"ok": True, **_report_document(report)}, as_json=as_json, render=render)


def _operate(
    action: str,
    rollout: str | None,
    *,
    store: str | None,
    keys_dir: Path | None,
    conn: dict[str, Any],
) -> tuple[Controller, RolloutStore, str]:
    st = _open_store(store, keys_dir)
    rid = _rollout_id(st, rollout)
    r = st.rollout(rid)
    if r is None:
        raise RolloutError(f"no rollout {rid!r}")
    return _controller(st, keys_dir=keys_dir, signer=r.signer, **conn), st, rid


@ota_app.command("halt")
@reports_errors
def halt(
    rollout: RolloutArg = None,
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "halted by the operator",
    broker: Broker = None,
    tls_dir: TlsDir = None,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    store: StoreOpt = None,
    prefix: Prefix = "edgeseal/v1",
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Halt a rollout: no new offers (retained ones withdrawn); auto-fallback applies."""
    conn = {"broker": broker, "tls_dir": tls_dir, "ca_file": ca_file, "cert_file": cert_file,
                "key_file": key_file, "prefix": prefix, "share": None}  # fmt: skip
    ctl, _st, rid = _operate("halt", rollout, store=store, keys_dir=keys_dir, conn=conn)
    ctl.start()
    try:
        r = ctl.halt(rid, reason)
    finally:
        ctl.stop()
    emit(
        {"ok": True, "rollout": rid, "state": r.state},
        as_json=as_json,
        render=lambda: out_console.print(untrusted(f"{rid}: halted ({reason})"), highlight=False),
    )


@ota_app.command("resume")
@reports_errors
def resume(
    rollout: RolloutArg = None,
    max_failure_rate: Annotated[str | None, typer.Option(help="New failure budget.")] = None,
    max_ood_rate: Annotated[str | None, typer.Option(help="New OOD threshold.")] = None,
    wave_timeout: Annotated[str | None, typer.Option(help="New wave timeout.")] = None,
    broker: Broker = None,
    tls_dir: TlsDir = None,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    store: StoreOpt = None,
    share: Share = None,
    prefix: Prefix = "edgeseal/v1",
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Pick a rollout up (after a halt, or a controller that died) and drive it on."""
    conn = {"broker": broker, "tls_dir": tls_dir, "ca_file": ca_file, "cert_file": cert_file,
                "key_file": key_file, "prefix": prefix, "share": share}  # fmt: skip
    ctl, st, rid = _operate("resume", rollout, store=store, keys_dir=keys_dir, conn=conn)
    r = st.rollout(rid)
    assert r is not None
    changes: dict[str, Any] = {}
    if max_failure_rate is not None:
        changes["max_failure_rate"] = parse_rate(max_failure_rate)
    if max_ood_rate is not None:
        changes["max_ood_rate"] = parse_rate(max_ood_rate)
    if wave_timeout is not None:
        changes["wave_timeout"] = parse_duration(wave_timeout)
    ctl.resume(rid, dataclasses.replace(r.policy, **changes) if changes else None)
    _drive(ctl, st, rid, as_json=as_json)


def _order_command(action: str, rollout: str | None, devices: list[str] | None, **kw: Any) -> None:
    as_json = kw.pop("as_json")
    store, keys_dir = kw.pop("store"), kw.pop("keys_dir")
    ctl, st, rid = _operate(action, rollout, store=store, keys_dir=keys_dir, conn=kw)
    r = st.rollout(rid)
    assert r is not None
    rows = st.phases(rid)
    targets = sorted(devices or [d for d, row in rows.items() if row.phase == "committed"])
    ctl.start()
    try:
        sent = ctl.order(r, action, targets, reason=f"{action} ordered by the operator")
    finally:
        ctl.stop()
    emit(
        {"ok": True, "rollout": rid, "action": action, "devices": targets},
        as_json=as_json,
        render=lambda: out_console.print(
            f"{rid}: {action} ordered for {sent} device(s)", highlight=False
        ),
    )


@ota_app.command("fallback")
@reports_errors
def fallback(
    rollout: RolloutArg = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="Only these (default: all committed).")
    ] = None,
    broker: Broker = None,
    tls_dir: TlsDir = None,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    store: StoreOpt = None,
    prefix: Prefix = "edgeseal/v1",
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Order the rollout's committed devices back to their fallback slot (signed order)."""
    _order_command(
        "fall-back", rollout, device, broker=broker, tls_dir=tls_dir, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file, prefix=prefix, share=None, store=store,
        keys_dir=keys_dir, as_json=as_json,
    )  # fmt: skip


@ota_app.command("finalize")
@reports_errors
def finalize(
    rollout: RolloutArg = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="Only these (default: all committed).")
    ] = None,
    broker: Broker = None,
    tls_dir: TlsDir = None,
    ca_file: CaFile = None,
    cert_file: CertFile = None,
    key_file: KeyFile = None,
    store: StoreOpt = None,
    prefix: Prefix = "edgeseal/v1",
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Order the rollout's committed devices to finalize (the floor rises, fallback goes)."""
    _order_command(
        "finalize", rollout, device, broker=broker, tls_dir=tls_dir, ca_file=ca_file,
        cert_file=cert_file, key_file=key_file, prefix=prefix, share=None, store=store,
        keys_dir=keys_dir, as_json=as_json,
    )  # fmt: skip


@ota_app.command("devices")
@reports_errors
def devices_cmd(
    model: Annotated[str | None, typer.Option(help="Show this model's columns.")] = None,
    store: StoreOpt = None,
    keys_dir: KeysDir = None,
    as_json: Json = False,
) -> None:
    """Devices the controller has heard from: last seen, versions, key store, OOD rate."""
    st = _open_store(store, keys_dir)
    rows = []
    for d in st.devices():
        models = d.status.get("models", {}) if isinstance(d.status, dict) else {}
        name = model or next(iter(sorted(models)), None)
        m = models.get(name, {}) if name else {}
        rows.append(
            {
                "device": d.device,
                "last_seen": format_time(datetime.fromtimestamp(d.last_seen, timezone.utc)),
                "model": name,
                "active": m.get("active"),
                "state": m.get("state"),
                "key_store": d.status.get("key_store"),
                "agent_version": d.status.get("agent_version"),
                "ood_rate": m.get("ood_rate"),
            }
        )

    def render() -> None:
        table = Table(
            "device", "last seen", "model", "active", "state", "key store", "agent", "OOD"
        )
        for r in rows:
            # Every cell is what a device reported: plain text, never markup.
            table.add_row(*(Text("" if r[k] is None else str(r[k])) for k in r))
        out_console.print(table)

    emit({"ok": True, "devices": rows}, as_json=as_json, render=render)


# -- the fleet simulator ----------------------------------------------------------------
@ota_app.command("simulate")
@reports_errors
def simulate(
    devices: Annotated[int, typer.Option("--devices", help="How many devices.")],
    out: Annotated[Path, typer.Option("--dir", help="The fleet tree (kept between runs).")],
    group: Annotated[str, typer.Option("--group", help="Their group.")] = "sim",
    id_prefix: Annotated[str, typer.Option(help="Device ids are PREFIX-0000...")] = "sim",
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="DEVICE=FAULTS, e.g. sim-0001=kill-at=testing (UNSAFE: simulator only).",
        ),
    ] = None,
    processes: Annotated[int, typer.Option(help="Worker processes (0: this one).")] = 0,
    seconds: Annotated[
        float, typer.Option("--for", help="Run this long, then stop (0: until Ctrl-C).")
    ] = 0.0,
    provision_only: Annotated[
        bool, typer.Option("--provision-only", help="Provision, then exit.")
    ] = False,
    register: Annotated[
        bool,
        typer.Option(
            "--register",
            help="Register the new simulated devices in the keyring (--keys-dir) and their "
            "group, and issue them fleet-CA client certificates (a demo or test keyring).",
        ),
    ] = False,
    broker: Broker = None,
    ca_file: CaFile = None,
    prefix: Prefix = "edgeseal/v1",
    keys_dir: KeysDir = None,
    passphrase_file: CaPass = None,
    as_json: Json = False,
) -> None:
    """Simulated devices (real agent and update channel) against a real broker.

    Their public keys go into the keyring and their TLS certificates come from its fleet
    CA, so a real rollout can reach them: that happens only with --register (devices
    already registered need no flag), never silently in the keyring you ship from."""
    ring = Keyring(_keys(keys_dir))
    known = {d.id for d in ring.devices()}
    new = [d for d in (f"{id_prefix}-{i:04d}" for i in range(devices)) if d not in known]
    if new and not register:
        raise ValueError(
            f"{len(new)} simulated device(s) ({new[0]}...) are not in the keyring {ring.path}: "
            "--register adds them, their group and fleet-CA client certificates there "
            "(a demo or test keyring, --keys-dir, not the one you ship from)"
        )
    ids = provision_fleet(
        out, devices, ring=ring, ca=_ca(keys_dir, passphrase_file), prefix=id_prefix
    )
    GroupRegistry.in_keyring(_keys(keys_dir)).add(group, ids)
    faults = dict(f.split("=", 1) for f in fault or [])
    if not provision_only:
        if not broker:
            raise ValueError("give the broker: --broker mqtts://host:8883")
        ca = ca_file or default_ca_dir(_keys(keys_dir)) / "ca.pem"
        spec = FleetSpec(
            root=str(out.absolute()), broker=broker, ca_file=str(ca), devices=tuple(ids),
            groups=(group,), topic_prefix=prefix, faults=faults,
            keep_serving=devices <= 100,
        )  # fmt: skip
        with SimFleet(spec, processes=processes).start() as fleet:
            err_console.print(f"{len(ids)} simulated devices online; Ctrl-C stops them")
            deadline = time.monotonic() + seconds if seconds else None
            with contextlib.suppress(KeyboardInterrupt):
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.5)
            del fleet
    emit(
        {"ok": True, "devices": ids, "registered": new, "group": group, "dir": str(out)},
        as_json=as_json,
        render=lambda: out_console.print(
            f"{len(ids)} devices in {out} (group {group}"
            + (f"; {len(new)} registered in {ring.path}" if new else "")
            + "); rewrite the broker ACL for the group:"
            " edgeseal ota broker-config --out DIR --acl-only",
            highlight=False,
        ),
    )


def register(app: typer.Typer) -> None:
    app.add_typer(ota_app, name="ota")
