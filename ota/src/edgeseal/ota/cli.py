"""``edgeseal ota ...``: fleet TLS identities, device groups and the example broker.

Workstation side: ``ca-init``, ``enroll``, ``group``, ``broker-config``.
Device side: ``csr``. See docs/ota.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeseal.agent.device import DeviceHome
from edgeseal.core.config import load_config
from edgeseal.core.console import emit, out_console, reports_errors
from edgeseal.core.encoding import canonical_json
from edgeseal.core.errors import KeyFileError
from edgeseal.core.files import atomic_write
from edgeseal.core.keyring import Keyring, default_keys_dir
from edgeseal.core.keys import passphrase_from
from edgeseal.ota.broker import BrokerSetup, acl_text
from edgeseal.ota.enroll import CONTROLLER, FleetCA, default_ca_dir, make_csr
from edgeseal.ota.registry import GroupRegistry
from edgeseal.ota.topics import Topics

ota_app = typer.Typer(
    help="Fleet updates over MQTT: TLS identities, groups, the broker.", no_args_is_help=True
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
    force: Annotated[bool, typer.Option(help="Replace an existing fleet CA.")] = False,
    as_json: Json = False,
) -> None:
    """Create the fleet CA (in <keyring>/fleet-ca/) that issues MQTT TLS certificates."""
    ca = FleetCA.init(
        default_ca_dir(_keys(keys_dir)),
        days=days,
        force=force,
        passphrase=passphrase_from(passphrase_file, env="EDGESEAL_CA_PASSPHRASE"),
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
    force: Annotated[bool, typer.Option(help="Replace an existing TLS key.")] = False,
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
        typer.Option(help="Issue even when the id is not in the keyring's device registry."),
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
    atomic_write(out, cert_pem)
    emit(
        {"ok": True, "device_id": cn, "certificate": str(out), "ca_file": str(ca.cert_path)},
        as_json=as_json,
        render=lambda: out_console.print(
            f"certificate for {cn} written to {out}\n"
            f"install it on the device with the CA certificate {ca.cert_path} "
            "([ota] cert_file, ca_file)",
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
    """Add devices to a group (made when new). Then rewrite the broker ACL."""
    members = GroupRegistry.in_keyring(_keys(keys_dir)).add(group, devices)
    emit(
        {"ok": True, "group": group, "members": list(members)},
        as_json=as_json,
        render=lambda: out_console.print(f"{group}: {', '.join(members)}", highlight=False),
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
    bind: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    controller: Annotated[
        str, typer.Option(help="The controller's certificate CN (full access).")
    ] = CONTROLLER,
    prefix: Annotated[
        str | None, typer.Option(help="Topic prefix [config: ota.topic_prefix].")
    ] = None,
    acl_only: Annotated[
        bool, typer.Option(help="Only rewrite the ACL from the groups (then SIGHUP mosquitto).")
    ] = False,
    keys_dir: KeysDir = None,
    passphrase_file: CaPass = None,
    config: ConfigOpt = None,
    as_json: Json = False,
) -> None:
    """Write a Mosquitto broker directory: certificates, mosquitto.conf and the ACL."""
    topics = Topics(prefix or load_config(config).ota.topic_prefix)
    groups = GroupRegistry.in_keyring(_keys(keys_dir)).groups()
    if acl_only:
        acl = BrokerSetup.acl_path_in(out)
        if not acl.exists():
            raise ValueError(f"{out} holds no broker ACL; run broker-config without --acl-only")
        atomic_write(acl, acl_text(topics, groups, controller).encode())
        written, where = [acl], out
    else:
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
        },
        as_json=as_json,
        render=lambda: out_console.print(
            f"broker files written to {where} ({len(groups)} groups)\n"
            + (
                "reload the ACL: kill -HUP $(pidof mosquitto)"
                if acl_only
                else f"run: mosquitto -c {where / 'mosquitto.conf'}"
            ),
            highlight=False,
        ),
    )


def register(app: typer.Typer) -> None:
    app.add_typer(ota_app, name="ota")
