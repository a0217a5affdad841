"""The ``edgeseal`` command: the typer root, the ``keys`` group, ``inspect`` and ``verify``.

Other parts add their commands through the ``edgeseal.commands`` entry point: each entry
is a ``register(app: typer.Typer) -> None`` function, so a device with only the agent
installed has no packager commands.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions, entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgeseal.core.clihelp import PlainHelpGroup
from edgeseal.core.config import load_config
from edgeseal.core.console import (
    EXIT_USAGE,
    emit,
    err_console,
    out_console,
    report_error,
    reports_errors,
    untrusted,
)
from edgeseal.core.encoding import b64d, format_time, parse_json_object, parse_time, utcnow
from edgeseal.core.errors import MalformedBundleError
from edgeseal.core.files import reported_as_path_error
from edgeseal.core.keyring import Keyring, default_keys_dir, parse_device_public_key
from edgeseal.core.keys import key_protection, load_private_key, passphrase_from
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.layout import HEADER_LEN, parse_header
from edgeseal.core.reader import BundleFile, VerifyPolicy, unwrap_content_key, wipe
from edgeseal.core.targets import TARGETS
from edgeseal.core.trust import TrustAnchor

app = typer.Typer(
    name="edgeseal",
    help="Protect ML models on edge devices: seal them into signed, encrypted bundles, "
    "deliver them, verify and run them in memory only.\n\n"
    "Exit codes: 0 ok, 1 rejected or verification failed, 2 usage error, 3 internal error.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    cls=PlainHelpGroup,
)


def _installed_parts() -> dict[str, str]:
    """Every installed edgeseal distribution and its version, by name."""
    found = {}
    for dist in distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().replace("_", "-").split("-")[0] == "edgeseal":
            found[name.lower().replace("_", "-")] = dist.version
    return dict(sorted(found.items()))


def _show_version(value: bool) -> None:
    if value:
        for name, version in _installed_parts().items():
            out_console.print(Text(f"{name} {version}"))
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Show each installed edgeseal distribution and its version, and exit.",
        ),
    ] = False,
) -> None:
    # No docstring: the app's help above is the one --help shows.
    del version


keys_app = typer.Typer(
    help="Root, signer and device keys on the workstation.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")

KeysDir = Annotated[
    Path,
    typer.Option(
        "--keys-dir", envvar="EDGESEAL_KEYS", help="Keyring directory.", show_default=False
    ),
]
PassFile = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        help="File whose first line is the root key passphrase (else $EDGESEAL_PASSPHRASE).",
    ),
]
NoPassphrase = Annotated[
    bool,
    typer.Option(
        "--no-passphrase",
        help="Store the new key unencrypted (demos and tests only; keys list reports it).",
    ),
]


def _new_key_passphrase(
    passphrase: bytes | None, *, no_passphrase: bool, token: object, what: str, option: str
) -> None:
    """Keys are written encrypted unless asked otherwise: a new software key needs a
    passphrase or an explicit --no-passphrase (a key on a token needs neither)."""
    if token is not None:
        return
    if passphrase is not None and no_passphrase:
        raise ValueError(f"give either {option} or --no-passphrase for the {what}, not both")
    if passphrase is None and not no_passphrase:
        raise ValueError(
            f"the {what} would be stored unencrypted: give {option} (its first line is the "
            "passphrase), or --no-passphrase to store it unencrypted on purpose"
        )


Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Config = Annotated[
    Path | None,
    typer.Option("--config", envvar="EDGESEAL_CONFIG", help="edgeseal TOML config file."),
]


Pkcs11Module = Annotated[
    str, typer.Option(help="Keep the key on a PKCS#11 token: the module (.so) path.")
]
TokenLabel = Annotated[str, typer.Option(help="PKCS#11 token label.")]
PinFile = Annotated[
    str, typer.Option(help="File holding the token PIN (else $EDGESEAL_PKCS11_PIN).")
]


def _token_ref(module: str, label: str, pin_file: str) -> dict[str, str] | None:
    if not module:
        return None
    if not label:
        raise ValueError("--token-label is required with --pkcs11-module")
    return {"kind": "pkcs11", "module": module, "token_label": label, "pin_file": pin_file}


def _keyring(keys_dir: Path | None, passphrase_file: Path | None) -> Keyring:
    return Keyring(keys_dir or default_keys_dir(), passphrase=passphrase_from(passphrase_file))


@keys_app.command("init-root")
@reports_errors
def init_root(  # nosec B107 # pin_file="" is "no PIN file" (a path option), not a password
    keys_dir: KeysDir = None,  # type: ignore[assignment]
    passphrase_file: PassFile = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing root key (devices that pinned it no longer accept new "
            "bundles; keys rotate-root is the way to change roots).",
        ),
    ] = False,
    no_passphrase: NoPassphrase = False,
    pkcs11_module: Pkcs11Module = "",
    token_label: TokenLabel = "",
    pin_file: PinFile = "",
    as_json: Json = False,
) -> None:
    """Create the offline root key (in a file, or on a PKCS#11 token with --pkcs11-module).
    Devices pin its public key (root.pub). A file key is encrypted with the passphrase
    (--passphrase-file or $EDGESEAL_PASSPHRASE) unless --no-passphrase says otherwise."""
    ring = _keyring(keys_dir, passphrase_file)
    token = _token_ref(pkcs11_module, token_label, pin_file)
    _new_key_passphrase(
        ring.passphrase,
        no_passphrase=no_passphrase,
        token=token,
        what="root key",
        option="--passphrase-file",
    )
    with reported_as_path_error(ring.path, "create the keyring in"):
        kid = ring.init_root(force=force, token=token)
    emit(
        {
            "ok": True,
            "root_key_id": kid,
            "root_public_key": str(ring.root_pub_path),
            "encrypted": ring.passphrase is not None,
        },
        as_json=as_json,
        render=lambda: out_console.print(
            f"root key {kid[:16]} created in {ring.path}\n"
            f"devices pin: {ring.root_pub_path}"
            + (
                ""
                if ring.passphrase or token is not None
                else "\n[yellow]warning[/]: root key stored without a "
                "passphrase (--no-passphrase: for demos and tests only)"
            )
        ),
    )


@keys_app.command("new-signer")
@reports_errors
def new_signer(  # nosec B107 # pin_file="" is "no PIN file" (a path option), not a password
    name: Annotated[str, typer.Argument(help="Signer name, e.g. ci-release.")],
    role: Annotated[list[str], typer.Option("--role", help="pack and/or deploy.")] = ["pack"],  # noqa: B006
    models: Annotated[
        list[str], typer.Option("--models", help="Model-name glob(s) it may sign.")
    ] = ["*"],  # noqa: B006
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
    keys_dir: KeysDir = None,  # type: ignore[assignment]
    passphrase_file: PassFile = None,
    signer_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            help="Encrypt the signer key with this passphrase (first line; else "
            "$EDGESEAL_SIGNER_PASSPHRASE)."
        ),
    ] = None,
    no_passphrase: NoPassphrase = False,
    pkcs11_module: Pkcs11Module = "",
    token_label: TokenLabel = "",
    pin_file: PinFile = "",
    as_json: Json = False,
) -> None:
    """Create a signer key (in a file, or on a PKCS#11 token) and a root-signed certificate.
    A file key is encrypted (--signer-passphrase-file) unless --no-passphrase says
    otherwise."""
    token = _token_ref(pkcs11_module, token_label, pin_file)
    signer_passphrase = passphrase_from(signer_passphrase_file, env="EDGESEAL_SIGNER_PASSPHRASE")
    _new_key_passphrase(
        signer_passphrase,
        no_passphrase=no_passphrase,
        token=token,
        what=f"signer key {name!r}",
        option="--signer-passphrase-file",
    )
    ring = _keyring(keys_dir, passphrase_file)
    ring.new_signer(
        name,
        roles=role,
        model_patterns=models,
        days=days,
        signer_passphrase=signer_passphrase,
        token=token,
    )
    payload = ring.certificate_payload(name)
    emit(
        {"ok": True, "signer": payload},
        as_json=as_json,
        render=lambda: out_console.print(
            f"signer {name} ({payload['keyid'][:16]}) roles={','.join(payload['roles'])} "
            f"models={','.join(payload['model_patterns'])} until {payload['not_after']}"
        ),
    )


@keys_app.command("rotate-root")
@reports_errors
def rotate_root(
    keys_dir: KeysDir = None,  # type: ignore[assignment]
    passphrase_file: PassFile = None,
    no_passphrase: NoPassphrase = False,
    as_json: Json = False,
) -> None:
    """Replace the root key; the new root is announced by a statement the old root signs.
    The new root file is encrypted with the same passphrase (--no-passphrase: unencrypted).

    Signers must be certified again under the new root (keys new-signer)."""
    ring = _keyring(keys_dir, passphrase_file)
    _new_key_passphrase(
        ring.passphrase,
        no_passphrase=no_passphrase,
        token=True if ring.root_token_path.exists() else None,
        what="new root key",
        option="--passphrase-file",
    )
    kid, version = ring.rotate_root()
    emit(
        {"ok": True, "root_key_id": kid, "version": version},
        as_json=as_json,
        render=lambda: out_console.print(
            f"root rotated to version {version} ({kid[:16]}); bundles now carry the rotation "
            "statement so devices pinning the old root follow it"
        ),
    )


@keys_app.command("revoke")
@reports_errors
def revoke(
    signer: Annotated[str, typer.Argument(help="Signer name or key id.")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "revoked",
    keys_dir: KeysDir = None,  # type: ignore[assignment]
    passphrase_file: PassFile = None,
    as_json: Json = False,
) -> None:
    """Revoke a signer: a root-signed list, carried in every bundle packed after this."""
    ring = _keyring(keys_dir, passphrase_file)
    version = ring.revoke(signer, reason=reason)
    emit(
        {"ok": True, "revocations_version": version},
        as_json=as_json,
        render=lambda: out_console.print(f"revoked {signer} (revocation list v{version})"),
    )


@keys_app.command("add-device")
@reports_errors
def add_device(
    device_id: Annotated[str, typer.Argument(help="Device id (as in its certificate/topics).")],
    pubkey_file: Annotated[
        Path,
        typer.Argument(
            help="PEM, or the JSON device provisioning prints.", exists=True, dir_okay=False
        ),
    ],
    target: Annotated[str | None, typer.Option(help=f"One of: {', '.join(TARGETS)}.")] = None,
    keys_dir: KeysDir = None,  # type: ignore[assignment]
    as_json: Json = False,
) -> None:
    """Register a device's public key so bundles can be wrapped for it."""
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    dev = parse_device_public_key(pubkey_file.read_bytes())
    if dev.device_id is not None and dev.device_id != device_id:
        raise ValueError(f"{pubkey_file} is for device {dev.device_id!r}, not {device_id!r}")
    if target is not None and dev.architecture is not None:
        fits = TARGETS[target].architectures
        if dev.architecture not in fits:
            others = [t for t, p in TARGETS.items() if dev.architecture in p.architectures]
            raise ValueError(
                f"{pubkey_file} says the device is {dev.architecture}; target {target!r} is "
                f"for {', '.join(fits)} (targets that fit: {', '.join(others) or 'none'})"
            )
    store = dev.key_store
    rec = Keyring(keys_dir or default_keys_dir()).add_device(
        device_id, dev.key, target=target, key_store=store
    )
    emit(
        {"ok": True, "device": rec.to_obj()},
        as_json=as_json,
        render=lambda: out_console.print(
            f"device {device_id} ({rec.key_id[:16]}, key store {store}) registered"
        ),
    )


@keys_app.command("remove")
@reports_errors
def remove(
    device_id: str,
    keys_dir: KeysDir = None,  # type: ignore[assignment]
    as_json: Json = False,
) -> None:
    """Remove a device from the registry (bundles already packed still open on it)."""
    Keyring(keys_dir or default_keys_dir()).remove_device(device_id)
    emit(
        {"ok": True, "removed": device_id},
        as_json=as_json,
        render=lambda: out_console.print(f"device {device_id} removed"),
    )


def _shown_protection(protection: str) -> str:
    # (not a dict keyed "passphrase"/"token": bandit reads such values as passwords)
    if protection == "none":
        return "[yellow]unencrypted[/]"
    if protection == "passphrase":
        return "encrypted"
    if protection == "token":
        return "on a token"
    return f"[red]{protection}[/]"


@keys_app.command("list")
@reports_errors
def list_keys(
    keys_dir: KeysDir = None,  # type: ignore[assignment]
    as_json: Json = False,
) -> None:
    """Show the root, the signers, the revocations and the registered devices."""
    ring = Keyring(keys_dir or default_keys_dir())
    anchor = ring.anchor()
    signers = [ring.certificate_payload(n) for n in ring.signer_names()]
    revs = ring.revocations()
    revoked = (
        parse_json_object(b64d(revs["payload"], "revocations"), "revocations")["revoked"]
        if revs
        else []
    )
    revoked_ids = {r["keyid"] for r in revoked}
    devices = [d.to_obj() for d in ring.devices()]

    def protection(key_path: Path, token_path: Path) -> str:
        return "token" if token_path.exists() else key_protection(key_path)

    root_protection = protection(ring.root_key_path, ring.root_token_path)
    for s in signers:
        key_path, _ = ring.signer_paths(s["name"])
        s["protection"] = protection(key_path, key_path.with_name(f"{s['name']}.token.json"))
    unencrypted = [s["name"] for s in signers if s["protection"] == "none"]
    if root_protection == "none":
        unencrypted.insert(0, "root")
    data = {
        "root": {
            "key_ids": list(anchor.keys),
            "version": anchor.version,
            "protection": root_protection,
        },
        "signers": signers,
        "unencrypted_keys": unencrypted,
        "revoked": revoked,
        "devices": devices,
    }

    def render() -> None:
        out_console.print(
            f"root v{anchor.version}: {', '.join(k[:16] for k in anchor.keys)} "
            + _shown_protection(root_protection)
        )
        t = Table("signer", "key id", "roles", "models", "valid until", "key", "status")
        for s in signers:
            t.add_row(
                untrusted(s["name"]),
                s["keyid"][:16],
                untrusted(",".join(s["roles"])),
                untrusted(",".join(s["model_patterns"])),
                untrusted(s["not_after"]),
                _shown_protection(s["protection"]),
                "[red]revoked[/]" if s["keyid"] in revoked_ids else "ok",
            )
        out_console.print(t)
        d = Table("device", "key id", "target", "key store", "added")
        for dev in devices:
            d.add_row(
                dev["id"], dev["key_id"][:16], dev["target"] or "-", dev["key_store"], dev["added"]
            )
        out_console.print(d)

    emit(data, as_json=as_json, render=render)


def _unverified_summary(path: Path) -> dict[str, Any]:
    cfg = load_config()
    with BundleFile.open(path) as bf:
        prefix = bf.read_prefix(cfg.limits)
        header = parse_header(prefix[:HEADER_LEN], file_len=bf.size, limits=cfg.limits)
    try:
        unverified_manifest = parse_json_object(
            prefix[header.manifest_offset : header.trust_offset], "manifest"
        )
        unverified_trust = parse_json_object(
            prefix[header.trust_offset : header.signature_offset], "trust block"
        )
        cert = parse_json_object(
            b64d(unverified_trust["signer"]["payload"], "certificate"), "certificate"
        )
    except (ValueError, KeyError, TypeError) as e:
        raise MalformedBundleError(f"cannot read bundle metadata: {e}") from e
    recipients = unverified_manifest.get("recipients", [])
    return {
        "verified": False,
        "file": str(path),
        "size": bf.size,
        "format_version": header.format_version,
        "manifest": {
            **unverified_manifest,
            "recipients": [
                {"device": r.get("device"), "keyid": r.get("keyid")}
                for r in recipients
                if isinstance(r, dict)
            ],
        },
        "signer": {
            k: cert.get(k)
            for k in (
                "name",
                "keyid",
                "roles",
                "model_patterns",
                "not_before",
                "not_after",
                "issuer",
            )
        },
        "root_rotations": len(unverified_trust.get("rotations") or []),
        "carries_revocations": unverified_trust.get("revocations") is not None,
    }


@app.command("inspect")
@reports_errors
def inspect(
    bundle: Annotated[Path, typer.Argument(exists=True, dir_okay=False)], as_json: Json = False
) -> None:
    """Show everything a bundle says, without a private key. Nothing here is verified:
    use `edgeseal verify` for that."""
    s = _unverified_summary(bundle)
    m = s["manifest"]

    def render() -> None:
        # Every value below is the bundle's own, unverified: printed as text, never markup.
        u = untrusted
        model = m.get("model", {})
        out_console.print(
            f"[bold]{u(bundle)}[/] ({s['size']:,} bytes, format v{s['format_version']})"
            "  [yellow](not verified: run edgeseal verify)[/]"
        )
        out_console.print(
            u(
                f"model {model.get('name')} v{model.get('version')} "
                f"({model.get('format')}), bundle {m.get('bundle_id')}"
            )
        )
        out_console.print(u(f"created {m.get('created')}, expires {m.get('expires')}"))
        tgt = m.get("target", {})
        out_console.print(
            u(
                f"target {','.join(map(str, tgt.get('architectures', [])))} runtime "
                f"{tgt.get('runtime')} agent>={tgt.get('min_agent_version')}"
            )
        )
        chunk = m.get("chunk_size")
        out_console.print(
            u(
                f"cipher {m.get('cipher')}, chunks of "
                f"{f'{chunk:,}' if isinstance(chunk, int) else chunk} bytes; "
                f"key wrap {m.get('key_wrap')}"
            )
        )
        out_console.print(
            u(
                f"signer {s['signer']['name']} ({str(s['signer']['keyid'])[:16]}), "
                f"roles {s['signer']['roles']}, valid until {s['signer']['not_after']}"
            )
        )
        t = Table("section", "plaintext bytes", "chunks", "sha256")
        for sec in m.get("sections", []):
            size = sec.get("plaintext_size", 0)
            t.add_row(
                Text(str(sec.get("name"))),
                Text(f"{size:,}" if isinstance(size, int) else str(size)),
                Text(str(len(sec.get("chunks", [])))),
                Text(str(sec.get("sha256"))[:16]),
            )
        out_console.print(t)
        io = m.get("io", {})
        for kind in ("inputs", "outputs"):
            for tensor in io.get(kind, []):
                out_console.print(
                    u(f"{kind[:-1]} {tensor['name']}: {tensor['dtype']} {tensor['shape']}")
                )
        rec = m["recipients"]
        shown = ", ".join(str(r["device"]) for r in rec[:8])
        out_console.print(u(f"{len(rec)} recipient(s): {shown}{' ...' if len(rec) > 8 else ''}"))

    emit(s, as_json=as_json, render=render)


@app.command("verify")
@reports_errors
def verify(
    bundle: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    root: Annotated[
        list[Path],
        typer.Option(
            "--root", exists=True, dir_okay=False, help="Pinned root public key(s) (root.pub)."
        ),
    ],
    device_key: Annotated[
        Path | None,
        typer.Option(
            help="A device private key: also unwrap and decrypt every section (in memory)."
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(help="Verify as of this UTC time (2026-01-31T12:00:00Z) instead of now."),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Check the signature chain only, not the sealed payload's chunk digests.",
        ),
    ] = False,
    config: Config = None,
    as_json: Json = False,
) -> None:
    """Check a bundle's trust chain, signature, expiry and its sealed payload against the
    signed chunk digests (no key needed; --quick skips it); with --device-key also
    decrypt every section and check its digest."""
    cfg = load_config(config)
    now = parse_time(at, "--at") if at else utcnow()
    anchor = TrustAnchor.from_pem_files([p.read_bytes() for p in root])
    policy = VerifyPolicy(anchor=anchor, now=now, limits=cfg.limits)
    steps = [
        "V1 header and lengths",
        "V2-V3 trust block and root",
        "V4 revocations",
        "V5 signer certificate",
        "V6 bundle signature",
        "V7 manifest and signer scope",
        "V8 expiry",
        "V11 section layout",
    ]
    with BundleFile.open(bundle) as bf:
        vb = bf.verify(policy)
        if device_key is None and not quick:
            # V13, first half: every sealed chunk is the one the signed manifest lists.
            bf.check_chunk_digests(vb)
            steps.append("V13 chunk digests (sealed payload)")
        if device_key is not None:
            ks = InMemoryKey(load_private_key(device_key, passphrase=passphrase_from(None)))
            ckey = unwrap_content_key(vb.manifest, ks)
            try:
                for entry in vb.manifest.sections:
                    wipe(bf.read_section(vb, entry.name, ckey))
            finally:
                wipe(ckey)
            steps += [
                "V12 content key unwrapped",
                "V13 chunk digests and AEAD tags",
                "V14 section digests",
            ]
    m = vb.manifest
    data = {
        "ok": True,
        "model": m.model_name,
        "version": m.version,
        "bundle_id": m.bundle_id,
        "signer": vb.signer.name,
        "signer_key_id": vb.signer.key_id,
        "root_version": vb.anchor.version,
        "checked": steps,
        "payload_checked": not quick or device_key is not None,
        "at": format_time(now),
    }
    verdict = (
        "[bold green]verified[/]"
        if data["payload_checked"]
        else "[bold yellow]signature verified[/] (payload not checked: --quick)"
    )
    emit(
        data,
        as_json=as_json,
        render=lambda: out_console.print(
            "\n".join(f"[green]✓[/] {s}" for s in steps)
            + f"\n{verdict}: {untrusted(m.model_name)} v{m.version}, signed by "
            f"{untrusted(vb.signer.name)} ({vb.signer.key_id[:16]})"
        ),
    )


def _register_parts() -> None:
    for ep in sorted(entry_points(group="edgeseal.commands"), key=lambda e: e.name):
        try:
            ep.load()(app)
        except Exception as e:
            err_console.print(
                f"[yellow]warning[/]: command group {ep.name!r} failed to load: {untrusted(e)}"
            )


def main() -> None:
    """Console entry point. Errors the commands do not report themselves (bad options,
    missing arguments, a bug) are reported here, as JSON too when ``--json`` was given."""
    _register_parts()
    try:
        code = app(standalone_mode=False, prog_name="edgeseal")
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(EXIT_USAGE)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        sys.exit(report_error(e, as_json="--json" in sys.argv[1:]))
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
