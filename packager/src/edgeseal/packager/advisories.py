"""Known-vulnerable runtime versions, checked against the SBOM's runtime requirement.

Two sources, both the data pip-audit reads:

* ``OsvFile``: OSV records (a JSON file holding one record, a list of them, or a
  directory of ``*.json``), as published by the PyPA advisory database and osv.dev.
  Ranges are evaluated, so any version can be asked about. This is how an air-gapped
  workstation checks.
* ``PypiService``: PyPI's JSON API (``/pypi/<name>/<version>/json``, field
  ``vulnerabilities``), pip-audit's default service. Only exact versions can be asked.

``check_runtime`` answers two questions for the runtime the model needs: is the floor
the SBOM would state vulnerable (then the floor is raised to the first version no known
advisory affects), and is the runtime this workstation tested with vulnerable.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from packaging.version import InvalidVersion, Version

from edgeseal.core.errors import EdgesealError

__all__ = [
    "Advisory",
    "AdvisoryError",
    "AdvisorySource",
    "OsvFile",
    "PypiService",
    "RuntimeAudit",
    "VulnerableRuntimeError",
    "check_runtime",
]

#: How many times the floor may be raised before we give up (each raise needs a lookup).
_MAX_RAISES = 8


class AdvisoryError(EdgesealError):
    """An advisory source could not be read or answered nonsense."""


class VulnerableRuntimeError(EdgesealError):
    """The runtime on this workstation has a known advisory (``--fail-on-advisory``)."""


@dataclass(frozen=True)
class Advisory:
    id: str
    package: str
    summary: str
    aliases: tuple[str, ...] = ()
    fixed_in: tuple[str, ...] = ()


class AdvisorySource(Protocol):
    name: str

    def affecting(self, package: str, version: str) -> list[Advisory]:
        """Advisories that affect exactly this version of the package."""
        ...


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _parse_version(v: str, what: str) -> Version:
    try:
        return Version(v)
    except InvalidVersion as e:
        raise AdvisoryError(f"{what}: {v!r} is not a version") from e


@dataclass(frozen=True)
class _Range:
    introduced: Version | None
    fixed: Version | None
    last_affected: Version | None

    def contains(self, v: Version) -> bool:
        if self.introduced is not None and v < self.introduced:
            return False
        if self.fixed is not None and v >= self.fixed:
            return False
        return self.last_affected is None or v <= self.last_affected


@dataclass
class _OsvRecord:
    advisory: Advisory
    versions: set[Version] = field(default_factory=set)
    ranges: list[_Range] = field(default_factory=list)

    def affects(self, v: Version) -> bool:
        return v in self.versions or any(r.contains(v) for r in self.ranges)


def _ranges(events: Sequence[Any], where: str) -> list[_Range]:
    """OSV ECOSYSTEM events in order: each ``introduced`` opens a range that the next
    ``fixed`` or ``last_affected`` closes."""
    out: list[_Range] = []
    start: Version | None = None
    open_ = False
    for ev in events:
        if not isinstance(ev, dict):
            raise AdvisoryError(f"{where}: an event is not an object")
        if "introduced" in ev:
            intro = str(ev["introduced"])
            start = None if intro == "0" else _parse_version(intro, where)
            open_ = True
        elif "fixed" in ev or "last_affected" in ev:
            if not open_:
                continue
            fixed = _parse_version(str(ev["fixed"]), where) if "fixed" in ev else None
            last = (
                _parse_version(str(ev["last_affected"]), where) if "last_affected" in ev else None
            )
            out.append(_Range(start, fixed, last))
            open_ = False
    if open_:
        out.append(_Range(start, None, None))
    return out


class OsvFile:
    """OSV records from a file or a directory of files."""

    name = "OSV"

    def __init__(self, path: Path) -> None:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not files:
            raise AdvisoryError(f"{path}: no OSV records (*.json)")
        self._records: dict[str, list[_OsvRecord]] = {}
        for f in files:
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise AdvisoryError(f"{f}: not readable JSON: {e}") from e
            for rec in data if isinstance(data, list) else [data]:
                self._add(rec, str(f))

    def _add(self, rec: Any, where: str) -> None:
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise AdvisoryError(f"{where}: an OSV record needs an 'id'")
        where = f"{where}: {rec['id']}"
        for aff in rec.get("affected", []):
            pkg = aff.get("package", {}) if isinstance(aff, dict) else {}
            if pkg.get("ecosystem") != "PyPI" or not isinstance(pkg.get("name"), str):
                continue
            fixed: list[str] = []
            ranges: list[_Range] = []
            for r in aff.get("ranges", []):
                if r.get("type") not in ("ECOSYSTEM", "SEMVER"):
                    continue
                events = r.get("events", [])
                ranges += _ranges(events, where)
                fixed += [str(e["fixed"]) for e in events if isinstance(e, dict) and "fixed" in e]
            advisory = Advisory(
                id=rec["id"],
                package=_canonical(pkg["name"]),
                summary=str(rec.get("summary") or rec.get("details", ""))[:300],
                aliases=tuple(str(a) for a in rec.get("aliases", [])),
                fixed_in=tuple(fixed),
            )
            versions = {_parse_version(str(v), where) for v in aff.get("versions", [])}
            self._records.setdefault(advisory.package, []).append(
                _OsvRecord(advisory, versions, ranges)
            )

    def affecting(self, package: str, version: str) -> list[Advisory]:
        v = _parse_version(version, package)
        return [r.advisory for r in self._records.get(_canonical(package), []) if r.affects(v)]


class PypiService:
    """PyPI's JSON API, the service pip-audit queries by default."""

    name = "PyPI"

    def __init__(self, base_url: str = "https://pypi.org", timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def affecting(self, package: str, version: str) -> list[Advisory]:
        url = f"{self.base_url}/pypi/{_canonical(package)}/{version}/json"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:  # noqa: S310
                data = json.loads(resp.read(16 * 1024 * 1024))
        except urllib.error.HTTPError as e:
            raise AdvisoryError(f"{url}: HTTP {e.code}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise AdvisoryError(f"{url}: {e}") from e
        vulns = data.get("vulnerabilities") if isinstance(data, dict) else None
        if not isinstance(vulns, list):
            raise AdvisoryError(f"{url}: no 'vulnerabilities' list in the answer")
        out = []
        for v in vulns:
            if not isinstance(v, dict) or not isinstance(v.get("id"), str):
                raise AdvisoryError(f"{url}: a vulnerability without an id")
            if v.get("withdrawn"):
                continue
            out.append(
                Advisory(
                    id=v["id"],
                    package=_canonical(package),
                    summary=str(v.get("summary") or v.get("details") or "")[:300],
                    aliases=tuple(str(a) for a in v.get("aliases") or []),
                    fixed_in=tuple(str(f) for f in v.get("fixed_in") or []),
                )
            )
        return out


@dataclass(frozen=True)
class RuntimeAudit:
    """What the advisory check found for one runtime requirement."""

    package: str
    source: str
    floor: str  # the version the model's opset needs
    safe_floor: str | None  # the first version at or above it that no advisory affects
    floor_advisories: tuple[Advisory, ...]
    tested_with: str | None
    tested_advisories: tuple[Advisory, ...]
    error: str | None = None  # the check could not run: why

    @property
    def checked(self) -> bool:
        return self.error is None

    def to_obj(self) -> dict[str, Any]:
        def adv(a: Advisory) -> dict[str, Any]:
            return {"id": a.id, "aliases": list(a.aliases), "fixed_in": list(a.fixed_in)}

        return {
            "package": self.package,
            "source": self.source,
            "floor": self.floor,
            "safe_floor": self.safe_floor,
            "floor_advisories": [adv(a) for a in self.floor_advisories],
            "tested_with": self.tested_with,
            "tested_advisories": [adv(a) for a in self.tested_advisories],
            "error": self.error,
        }


def _next_floor(current: Version, advisories: Iterable[Advisory]) -> Version | None:
    """The lowest version above ``current`` that each advisory names as fixed; None when
    an advisory names no fix above it (no safe version is known)."""
    need = current
    for a in advisories:
        fixes = sorted(fv for f in a.fixed_in if (fv := _parse_version(f, a.id)) > current)
        if not fixes:
            return None
        need = max(need, fixes[0])
    return need


def check_runtime(
    source: AdvisorySource, package: str, floor: str, tested_with: str | None
) -> RuntimeAudit:
    """Audit the runtime floor and the tested-with version; a source that cannot answer
    gives an audit with ``error`` set (packing goes on; the SBOM says it was not checked)."""
    try:
        current = _parse_version(floor, package)
        first = tuple(source.affecting(package, str(current)))
        found = first
        safe: Version | None = current
        for _ in range(_MAX_RAISES):
            if not found:
                break
            safe = _next_floor(current, found)
            if safe is None:
                break
            current = safe
            found = tuple(source.affecting(package, str(current)))
        else:
            safe = None
        tested = tuple(source.affecting(package, tested_with)) if tested_with else ()
    except AdvisoryError as e:
        return RuntimeAudit(package, source.name, floor, None, (), tested_with, (), str(e))
    return RuntimeAudit(
        package=package,
        source=source.name,
        floor=floor,
        safe_floor=str(safe) if safe is not None else None,
        floor_advisories=first,
        tested_with=tested_with,
        tested_advisories=tested,
    )
