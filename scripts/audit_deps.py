#!/usr/bin/env python3
"""Audit every exact pin in constraints.txt against PyPI's vulnerability data.

    scripts/audit_deps.py [--constraints constraints.txt] [--index-url URL] [--strict]

PyPI answers vulnerabilities (the PyPA advisory database and GitHub's advisories, as
osv.dev merges them) in two places, and this reads both:

* the project JSON, ``/pypi/<name>/json``: its ``vulnerabilities`` list is that of the
  project's latest release (``info.version``) only, so it answers for a pin exactly when
  the pin is that release;
* the release JSON, ``/pypi/<name>/<version>/json`` (pip-audit's default service): it
  answers for any release, on a network where PyPI serves it.

The lookup is ``PypiService.lookup`` (edgeseal.packager.advisories), the one the
packager's ``--advisories pypi`` uses. A pin neither answers for is "not audited" and
named with the reason; ``--strict`` makes that fail too. A known vulnerability always
fails (exit 1). docs/supply-chain.md says why this is not pip-audit itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "Pin",
    "PinAudit",
    "advisories_from_project",
    "audit",
    "audit_pin",
    "main",
    "parse_constraints",
    "report",
    "yanked_reason",
]

PYPI = "https://pypi.org"


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


def report(audits: Sequence[PinAudit], strict: bool) -> tuple[list[str], list[str], int]:
    """(stdout lines, stderr lines, exit code)."""
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
    skipped = [a for a in audits if not a.audited]
    for a in skipped:
        err.append(f"audit-deps: NOT AUDITED {a.pin.name}=={a.pin.version}: {a.error}")
    by_project = sum(a.source == PROJECT_SOURCE for a in audits)
    out.append(
        f"audit-deps: {len(audits) - len(skipped)} of {len(audits)} pinned packages audited "
        f"({by_project} by {PROJECT_SOURCE}, {len(audits) - len(skipped) - by_project} by "
        f"{RELEASE_SOURCE}), {len(vulnerable)} vulnerable, {len(skipped)} not audited"
    )
    rc = 1 if vulnerable or (strict and skipped) else 0
    return out, err, rc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    ap.add_argument("--index-url", default=os.environ.get("EDGESEAL_AUDIT_INDEX", PYPI))
    ap.add_argument("--strict", action="store_true", help="a pin not audited fails too")
    args = ap.parse_args(argv)
    try:
        pins = parse_constraints(args.constraints.read_text())
    except (OSError, ValueError) as e:
        sys.stderr.write(f"audit-deps: {args.constraints}: {e}\n")
        return 2
    out, err, rc = report(audit(pins, args.index_url), args.strict)
    sys.stdout.write("".join(f"{line}\n" for line in out))
    sys.stderr.write("".join(f"{line}\n" for line in err))
    return rc


if __name__ == "__main__":
    sys.exit(main())
