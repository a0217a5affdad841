"""Assemble and pack the snap without snapcraft: what tests/snap checks, and a way to make
an arm64 .snap on an amd64 machine.

    python snap/local/assemble.py --arch arm64 --prime DIR [--cross TARGET] [--pack OUT.snap]

Writes ``DIR/meta/snap.yaml`` from ``snap/snapcraft.yaml`` (the runtime keys snapcraft
would carry over, ``architectures`` as the plain list snap.yaml wants), copies the hooks
into ``meta/hooks`` and the launcher into ``bin/``. With ``--cross TARGET`` it also runs
``snap/local/build-python --cross TARGET`` for the Python parts (without it the tree is a
skeleton: metadata, hooks, launcher). ``--pack`` makes a .snap with the flags snapd's
``snap pack`` gives mksquashfs. Needs PyYAML (a dev dependency).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

SNAP_DIR = Path(__file__).resolve().parent.parent
REPO = SNAP_DIR.parent
LOCAL = SNAP_DIR / "local"
#: snapd's squashfs Build() for an app snap (snap/squashfs/squashfs.go).
MKSQUASHFS_FLAGS = ["-noappend", "-comp", "xz", "-no-fragments", "-no-progress"]
MKSQUASHFS_FLAGS += ["-all-root", "-no-xattrs"]
#: Top-level snapcraft.yaml keys that snap.yaml keeps (the rest is build-time only).
RUNTIME_KEYS = (
    "name",
    "version",
    "summary",
    "description",
    "license",
    "title",
    "base",
    "grade",
    "confinement",
    "epoch",
    "assumes",
    "type",
    "environment",
    "layout",
    "plugs",
    "slots",
    "hooks",
    "system-usernames",
)
#: App keys that exist only for snapcraft.
BUILD_ONLY_APP_KEYS = {"extensions", "adapter", "desktop", "common-id"}


class _Dumper(yaml.SafeDumper):
    """Multi-line text (the description) as a literal block, as snapcraft writes it."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def load_snapcraft(path: Path = SNAP_DIR / "snapcraft.yaml") -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a mapping")
    return data


def snap_yaml(snapcraft: dict[str, Any], arch: str) -> dict[str, Any]:
    """meta/snap.yaml's content for one architecture."""
    builds_for = {a for entry in snapcraft.get("architectures", []) for a in entry["build-for"]}
    if arch not in builds_for:
        raise ValueError(f"snapcraft.yaml does not build for {arch} (only {sorted(builds_for)})")
    meta = {k: snapcraft[k] for k in RUNTIME_KEYS if k in snapcraft}
    meta["architectures"] = [arch]
    meta["apps"] = {
        name: {k: v for k, v in app.items() if k not in BUILD_ONLY_APP_KEYS}
        for name, app in snapcraft["apps"].items()
    }
    return meta


def assemble(prime: Path, arch: str, *, cross: str | None = None) -> Path:
    """Lay out a snap tree in ``prime`` (emptied first)."""
    if prime.exists():
        shutil.rmtree(prime)
    (prime / "meta" / "hooks").mkdir(parents=True)
    meta = snap_yaml(load_snapcraft(), arch)
    (prime / "meta" / "snap.yaml").write_text(
        yaml.dump(meta, Dumper=_Dumper, sort_keys=False, width=100), encoding="utf-8"
    )
    for hook in sorted((SNAP_DIR / "hooks").iterdir()):
        dest = prime / "meta" / "hooks" / hook.name
        shutil.copyfile(hook, dest)
        dest.chmod(0o755)
    if cross:
        build = [str(LOCAL / "build-python"), "--prefix", str(prime), "--cross", cross]
        subprocess.run(build, check=True)  # noqa: S603 - our own script, no shell
    else:
        (prime / "bin").mkdir()
        (prime / "lib" / "edgeseal").mkdir(parents=True)
        shutil.copyfile(LOCAL / "edgeseal-launch", prime / "bin" / "edgeseal-launch")
        (prime / "bin" / "edgeseal-launch").chmod(0o755)
        shutil.copyfile(LOCAL / "snapconfig.py", prime / "lib" / "edgeseal" / "snapconfig.py")
        (prime / "lib" / "edgeseal" / "python").write_text("python3\n")
    return prime


def pack(prime: Path, out: Path) -> Path:
    """``out`` as snapd's ``snap pack`` would make it from ``prime``."""
    out.unlink(missing_ok=True)
    mksquashfs = shutil.which("mksquashfs") or "/usr/bin/mksquashfs"
    cmd = [mksquashfs, str(prime), str(out), *MKSQUASHFS_FLAGS]
    subprocess.run(cmd, check=True, capture_output=True)  # noqa: S603 - fixed tool, no shell
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=["amd64", "arm64"])
    p.add_argument("--prime", required=True, type=Path)
    p.add_argument("--cross", metavar="TARGET", help="add the Python parts (cross/wheelhouse)")
    p.add_argument("--pack", type=Path, metavar="OUT.snap")
    args = p.parse_args(argv)
    assemble(args.prime, args.arch, cross=args.cross)
    if args.pack:
        pack(args.prime, args.pack)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
