#!/usr/bin/env python3
"""Audit every exact pin in constraints.txt against PyPI's vulnerability data.

    scripts/audit_deps.py [--constraints constraints.txt]
                          [--held-back scripts/audit-held-back.toml] [--index-url URL] [--strict]

PyPI answers vulnerabilities (the PyPA advisory database and GitHub's advisories, as
osv.dev merges them) in two places, and this reads both:

* the project JSON, ``/pypi/<name>/json``: its ``vulnerabilities`` list is that of the
  project's latest release (``info.version``) only, so it answers for a pin exactly when
  the pin is that release;
* the release JSON, ``/pypi/<name>/<version>/json`` (pip-audit's default service): it
  answers for any release, on a network where PyPI serves it.

The lookup is ``PypiService.lookup`` (edgeseal.packager.advisories), the one the
packager's ``--advisories pypi`` uses. The run fails (exit 1) on a pin *known* to be
vulnerable and on a stale held-back entry (both decided by what is known and what the
repository says, never by the calendar alone). A pin neither answer covers ("not
audited": on this network, any pin upstream has since released past) is a warning,
printed with the reason and the date of the run, and does not fail: a new upstream
release must not turn the build red by itself. The held-back file (``[[held-back]]``
tables of ``name``, the exact pinned ``version`` and a ``reason``) names the pins kept
below the latest on purpose; each is printed as "held back, not audited" with its
reason. An entry whose version is not the one pinned, or whose package is not pinned,
is stale: a changed pin must be reviewed before it is excused again. ``--strict`` (what
a release runs) excuses nothing: every pin must be audited, held back or not. Bad input
exits 2.
docs/supply-chain.md says why this is not pip-audit itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the CI Python is 3.11; tomli is pinned for older ones
    import tomli as tomllib

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from edgeseal.packager.advisories import (
    PROJECT_SOURCE,
    RELEASE_SOURCE,
    Advisory,
    AdvisoryError,
    PypiProject,
    PypiService,
)

__all__ = [
    "PROJECT_SOURCE",
    "RELEASE_SOURCE",
    "AdvisoryError",
    "HeldBack",
    "Pin",
    "PinAudit",
    "advisories_from_project",
    "audit",
    "audit_pin",
    "main",
    "parse_constraints",
    "parse_held_back",
    "report",
    "stale_held_back",
    "yanked_reason",
]

PYPI = "https://pypi.org"
HELD_BACK = Path(__file__).resolve().with_name("audit-held-back.toml")


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (PEP 503)
    version: str
    line: int


def parse_constraints(text: str) -> list[Pin]:
    """Every requirement line must be an exact ``name==version`` pin (markers allowed):
    each is audited whatever its marker, since the file serves every platform."""
    pins: list[Pin] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise ValueError(f"line {n}: {raw!r} is not a requirement: {e}") from e
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise ValueError(f"line {n}: {raw!r} is not an exact pin (name==version)")
        pins.append(Pin(canonicalize_name(req.name), specs[0].version, n))
    return pins


@dataclass(frozen=True)
class HeldBack:
    """A pin that may go unaudited: the exact version pinned, and why it is held back."""

    name: str  # canonical (PEP 503)
    version: str
    reason: str

    def __post_init__(self) -> None:
        for key in ("name", "version", "reason"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"held-back entry: {key!r} must be a non-empty string")
        if self.name != canonicalize_name(self.name):
            raise ValueError(f"held-back entry: {self.name!r} is not a canonical name")


def parse_held_back(text: str) -> dict[str, HeldBack]:
    """The held-back file: ``[[held-back]]`` tables, each with exactly ``name``,
    ``version`` and ``reason``; one entry per package. Anything else is refused."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not TOML: {e}") from e
    if set(data) - {"held-back"}:
        raise ValueError(f"unknown keys {sorted(set(data) - {'held-back'})}")
    entries = data.get("held-back", [])
    if not isinstance(entries, list):
        raise ValueError("'held-back' must be an array of tables ([[held-back]])")
    held: dict[str, HeldBack] = {}
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or set(entry) != {"name", "version", "reason"}:
            raise ValueError(f"held-back entry {n}: needs exactly name, version and reason")
        name = entry["name"]
        if not isinstance(name, str):
            raise ValueError(f"held-back entry {n}: 'name' must be a string")
        try:
            item = HeldBack(canonicalize_name(name), entry["version"], entry["reason"])
        except ValueError as e:
            raise ValueError(f"{e} (entry {n}, {name})") from e
        if item.name in held:
            raise ValueError(f"held-back entry {n}: {item.name} is listed twice")
        held[item.name] = item
    return held


def stale_held_back(
    pins: Sequence[Pin], held: Mapping[str, HeldBack], *, subset: bool = False
) -> list[str]:
    """Why each held-back entry that does not match a pin exactly is stale. ``subset``:
    the pins are a device's wheelhouse, resolved for its board on the day it is built,
    not constraints.txt, which the entries describe: none is stale against it (an entry
    still excuses only the exact version it names)."""
    if subset:
        return []
    pinned: dict[str, list[str]] = {}
    for p in pins:
        pinned.setdefault(p.name, []).append(p.version)
    stale: list[str] = []
    for h in held.values():
        versions = pinned.get(h.name)
        if not versions:
            stale.append(f"{h.name}=={h.version}: {h.name} is not pinned")
        elif h.version not in versions:
            now = ", ".join(f"{h.name}=={v}" for v in versions)
            stale.append(f"{h.name}=={h.version}: the pin is now {now}; review the entry")
    return stale


def advisories_from_project(pin: Pin, project: Mapping[str, Any]) -> tuple[Advisory, ...] | None:
    """The advisories of ``pin`` from its project JSON, or None when the JSON cannot say
    (the pin is not the latest release)."""
    return PypiProject.from_json(pin.name, project).advisories(pin.version)


def yanked_reason(pin: Pin, project: Mapping[str, Any]) -> str | None:
    """Why the pinned release was yanked ("yanked" without a reason), or None if it was not."""
    return PypiProject.from_json(pin.name, project).yanked_reason(pin.version)


@dataclass(frozen=True)
class PinAudit:
    pin: Pin
    source: str | None  # which PyPI answer was used; None: not audited
    advisories: tuple[Advisory, ...] = ()
    error: str | None = None  # why the pin was not audited
    yanked: str | None = None

    @property
    def audited(self) -> bool:
        return self.source is not None


def audit_pin(pin: Pin, pypi: PypiService) -> PinAudit:
    """The project JSON when the pin is the latest release, else the release JSON."""
    found = pypi.lookup(pin.name, pin.version)
    return PinAudit(pin, found.source, found.advisories, found.error, found.yanked)


def audit(pins: Sequence[Pin], base_url: str = PYPI, workers: int = 8) -> list[PinAudit]:
    pypi = PypiService(base_url, timeout=30.0)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: audit_pin(p, pypi), pins))


def report(
    audits: Sequence[PinAudit],
    held: Mapping[str, HeldBack],
    *,
    strict: bool = False,
    subset: bool = False,
    today: date | None = None,
) -> tuple[list[str], list[str], int]:
    """(stdout lines, stderr lines, exit code). A known vulnerability and a stale held-back
    entry fail. A pin not audited is a warning dated ``today`` (the run's UTC date when
    None) unless ``held`` has an entry for its exact version; with ``strict`` every pin
    not audited fails, held back or not."""
    day = (today or datetime.now(timezone.utc).date()).isoformat()
    out: list[str] = []
    err: list[str] = []
    vulnerable = [a for a in audits if a.advisories]
    for a in vulnerable:
        for adv in a.advisories:
            aliases = f" ({', '.join(adv.aliases)})" if adv.aliases else ""
            fix = ", ".join(adv.fixed_in) or "no fixed release"
            out.append(
                f"VULNERABLE {a.pin.name}=={a.pin.version}: {adv.id}{aliases}; fixed in {fix}"
            )
    for a in audits:
        if a.yanked:
            out.append(f"YANKED {a.pin.name}=={a.pin.version}: {a.yanked}")
    excused: list[PinAudit] = []
    skipped: list[PinAudit] = []
    for a in audits:
        if a.audited:
            continue
        entry = held.get(a.pin.name)
        if entry is not None and entry.version == a.pin.version and not strict:
            excused.append(a)
            out.append(
                f"audit-deps: held back, not audited: {a.pin.name}=={a.pin.version}: "
                f"{entry.reason} ({a.error})"
            )
        else:
            skipped.append(a)
            label = "NOT AUDITED" if strict else "warning: not audited"
            err.append(f"audit-deps: {label} {a.pin.name}=={a.pin.version} (on {day}): {a.error}")
    stale = stale_held_back([a.pin for a in audits], held, subset=subset)
    err += [f"audit-deps: STALE held-back entry {s}" for s in stale]
    audited = sum(a.audited for a in audits)
    by_project = sum(a.source == PROJECT_SOURCE for a in audits)
    out.append(
        f"audit-deps: {audited} of {len(audits)} pinned packages audited "
        f"({by_project} by {PROJECT_SOURCE}, {audited - by_project} by {RELEASE_SOURCE}), "
        f"{len(vulnerable)} vulnerable, {len(excused)} held back, {len(skipped)} not audited"
        + (f", {len(stale)} stale held-back entries" if stale else "")
    )
    if skipped and not strict:
        err.append(
            f"audit-deps: {len(skipped)} pins could not be audited on {day}: upstream released "
            "past them; scripts/lock bumps them (a release runs --strict)"
        )
    rc = 1 if vulnerable or stale or (skipped and strict) else 0
    return out, err, rc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    ap.add_argument(
        "--held-back",
        type=Path,
        default=HELD_BACK,
        help="the pins that may go unaudited, each with its version and reason",
    )
    ap.add_argument("--index-url", default=os.environ.get("EDGESEAL_AUDIT_INDEX", PYPI))
    ap.add_argument(
        "--strict",
        action="store_true",
        help="every pin must be audited (a release): a pin not audited fails, held back or not",
    )
    ap.add_argument(
        "--subset",
        action="store_true",
        help="the pins are a device's wheelhouse lock, not constraints.txt: "
        "no held-back entry is stale against them",
    )
    args = ap.parse_args(argv)
    try:
        pins = parse_constraints(args.constraints.read_text())
    except (OSError, ValueError) as e:
        sys.stderr.write(f"audit-deps: {args.constraints}: {e}\n")
        return 2
    try:
        held = parse_held_back(args.held_back.read_text())
    except (OSError, ValueError) as e:
        sys.stderr.write(f"audit-deps: {args.held_back}: {e}\n")
        return 2
    out, err, rc = report(audit(pins, args.index_url), held, strict=args.strict, subset=args.subset)
    sys.stdout.write("".join(f"{line}\n" for line in out))
    sys.stderr.write("".join(f"{line}\n" for line in err))
    return rc


if __name__ == "__main__":
    sys.exit(main())
