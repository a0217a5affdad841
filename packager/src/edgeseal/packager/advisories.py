"""Known-vulnerable runtime versions, checked against the SBOM's runtime requirement.

Two sources, both the data pip-audit reads:

* ``OsvFile``: OSV records (a JSON file holding one record, a list of them, or a
  directory of ``*.json``), as published by the PyPA advisory database and osv.dev.
  Ranges are evaluated, so any version can be asked about. This is how an air-gapped
  workstation checks. Withdrawn records are skipped; a malformed record is an error. A
  bound that is not PEP 440 (a few real records have one) widens what the record affects,
  never narrows it, and is logged at WARNING with the record's id: an ``introduced``
  counts as "0", a ``fixed`` or ``last_affected`` leaves the range open, and an entry of
  ``versions`` matches only the identical version string.
* ``PypiService``: PyPI's JSON API in two places. The project JSON
  (``/pypi/<name>/json``) has the ``vulnerabilities`` of the latest release only, so it
  answers for exactly that version; any other version is asked of the release JSON
  (``/pypi/<name>/<version>/json``, pip-audit's default service), which some networks
  do not serve. ``scripts/audit_deps.py`` audits constraints.txt with the same lookup.

``check_runtime`` answers two questions for the runtime the model needs: is the floor
the SBOM would state vulnerable (then the floor is raised to the first version no known
advisory affects), and is the runtime this workstation tested with vulnerable.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from edgeseal.core.errors import EdgesealError

__all__ = [
    "PROJECT_SOURCE",
    "RELEASE_SOURCE",
    "Advisory",
    "AdvisoryError",
    "AdvisorySource",
    "OsvFile",
    "PypiLookup",
    "PypiProject",
    "PypiService",
    "RuntimeAudit",
    "VulnerableRuntimeError",
    "check_runtime",
    "pypi_advisories",
]

log = logging.getLogger(__name__)

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
    return str(canonicalize_name(name))


def _parse_version(v: str, what: str) -> Version:
    try:
        return Version(v)
    except InvalidVersion as e:
        raise AdvisoryError(f"{what}: {v!r} is not a version") from e


def _osv_version(v: object, where: str, instead: str) -> Version | None:
    """An OSV version, or None when it is not PEP 440 (e.g. ``0.2.0-n653`` in
    PYSEC-2021-371). The caller then reads the bound conservatively, as ``instead`` says,
    and the record's id (in ``where``) is logged at WARNING."""
    try:
        return Version(str(v))
    except InvalidVersion:
        log.warning("%s: %r is not a PEP 440 version; %s", where, v, instead)
        return None


@dataclass(frozen=True)
class _Range:
    introduced: Version | None  # None: from the first release
    fixed: Version | None  # None: no fix (open-ended, unless last_affected closes it)
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
    raw_versions: set[str] = field(default_factory=set)  # entries that are not PEP 440
    ranges: list[_Range] = field(default_factory=list)

    def affects(self, v: Version, raw: str) -> bool:
        return (
            v in self.versions
            or raw in self.raw_versions
            or any(r.contains(v) for r in self.ranges)
        )


def _ranges(events: object, where: str) -> tuple[list[_Range], list[str]]:
    """OSV ECOSYSTEM events in order: each ``introduced`` opens a range that the next
    ``fixed`` or ``last_affected`` closes. Returns the ranges and their fixed versions.
    A bound that is not PEP 440 only ever widens a range: an ``introduced`` counts as
    "0", a ``fixed`` or ``last_affected`` leaves the range open-ended (and that fix is
    not listed, since no version can be compared with it)."""
    if not isinstance(events, list):
        raise AdvisoryError(f"{where}: 'events' is not a list")
    out: list[_Range] = []
    fixes: list[str] = []
    start: Version | None = None
    open_ = False
    for ev in events:
        if not isinstance(ev, dict):
            raise AdvisoryError(f"{where}: an event is not an object")
        if "introduced" in ev:
            intro = str(ev["introduced"])
            start = (
                None
                if intro == "0"
                else _osv_version(intro, where, "introduced read as '0' (from the start)")
            )
            open_ = True
        elif "fixed" in ev or "last_affected" in ev:
            if not open_:
                continue
            open_ = False
            fixed: Version | None = None
            last: Version | None = None
            if "fixed" in ev:
                fixed = _osv_version(ev["fixed"], where, "fixed ignored (range left open)")
            if "last_affected" in ev:
                last = _osv_version(
                    ev["last_affected"], where, "last_affected ignored (range left open)"
                )
            out.append(_Range(start, fixed, last))
            if fixed is not None:
                fixes.append(str(ev["fixed"]))
    if open_:
        out.append(_Range(start, None, None))
    return out, fixes


def _list(rec: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = rec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise AdvisoryError(f"{where}: {key!r} is not a list")
    return value


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
        if rec.get("withdrawn"):
            log.debug("%s: withdrawn %s; skipped", where, rec["withdrawn"])
            return
        for aff in _list(rec, "affected", where):
            if not isinstance(aff, dict) or not isinstance(aff.get("package", {}), dict):
                raise AdvisoryError(f"{where}: an 'affected' entry is not an object")
            pkg = aff.get("package", {})
            if pkg.get("ecosystem") != "PyPI" or not isinstance(pkg.get("name"), str):
                continue
            fixed: list[str] = []
            ranges: list[_Range] = []
            for r in _list(aff, "ranges", where):
                if not isinstance(r, dict):
                    raise AdvisoryError(f"{where}: a range is not an object")
                if r.get("type") not in ("ECOSYSTEM", "SEMVER"):
                    continue
                found, fixes = _ranges(r.get("events", []), where)
                ranges += found
                fixed += fixes
            advisory = Advisory(
                id=rec["id"],
                package=_canonical(pkg["name"]),
                summary=str(rec.get("summary") or rec.get("details", ""))[:300],
                aliases=tuple(str(a) for a in _list(rec, "aliases", where)),
                fixed_in=tuple(fixed),
            )
            versions: set[Version] = set()
            raw_versions: set[str] = set()
            for raw in _list(aff, "versions", where):
                v = _osv_version(raw, where, "matched as an exact string")
                if v is None:
                    raw_versions.add(str(raw))
                else:
                    versions.add(v)
            self._records.setdefault(advisory.package, []).append(
                _OsvRecord(advisory, versions, raw_versions, ranges)
            )

    def affecting(self, package: str, version: str) -> list[Advisory]:
        v = _parse_version(version, package)
        return [
            r.advisory for r in self._records.get(_canonical(package), []) if r.affects(v, version)
        ]


#: Which of PyPI's answers a lookup used.
PROJECT_SOURCE = "PyPI project JSON (latest release)"
RELEASE_SOURCE = "PyPI release JSON"

#: The largest JSON read: a project JSON lists every file of every release (numpy's is
#: a few MiB); a release JSON is much smaller.
_MAX_PROJECT_JSON = 64 * 1024 * 1024
_MAX_RELEASE_JSON = 16 * 1024 * 1024


def pypi_advisories(package: str, vulns: object, where: str) -> tuple[Advisory, ...]:
    """PyPI's ``vulnerabilities`` entries as advisories; withdrawn ones are dropped."""
    if not isinstance(vulns, list):
        raise AdvisoryError(f"{where}: no 'vulnerabilities' list")
    out: list[Advisory] = []
    for v in vulns:
        if not isinstance(v, dict) or not isinstance(v.get("id"), str):
            raise AdvisoryError(f"{where}: a vulnerability without an id")
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
    return tuple(out)


@dataclass(frozen=True)
class PypiProject:
    """What a lookup needs from a project JSON (``/pypi/<name>/json``), not its file
    lists: ``info.version``, the latest release's ``vulnerabilities``, and for each
    release with files the reason it was yanked (None: not yanked)."""

    name: str  # canonical (PEP 503)
    latest: object  # info.version as given; None when the JSON has no 'info'
    vulnerabilities: object
    yanked: Mapping[str, str | None]

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> PypiProject:
        info = data.get("info")
        releases = data.get("releases")
        yanked: dict[str, str | None] = {}
        for key, files in releases.items() if isinstance(releases, dict) else ():
            if isinstance(files, list) and files:
                gone = all(isinstance(f, dict) and f.get("yanked") for f in files)
                yanked[str(key)] = str(files[0].get("yanked_reason") or "yanked") if gone else None
        return cls(
            name=_canonical(name),
            latest=info.get("version") if isinstance(info, dict) else None,
            vulnerabilities=data.get("vulnerabilities"),
            yanked=yanked,
        )

    @property
    def where(self) -> str:
        return f"{self.name} project JSON"

    def latest_release(self) -> Version:
        if self.latest is None:
            raise AdvisoryError(f"{self.where}: no 'info.version'")
        return _parse_version(str(self.latest), self.where)

    def advisories(self, version: str) -> tuple[Advisory, ...] | None:
        """The advisories of ``version``, or None when this JSON cannot say: its
        vulnerabilities are the latest release's, and ``version`` is another release."""
        if _parse_version(version, self.name) != self.latest_release():
            return None
        return pypi_advisories(self.name, self.vulnerabilities, self.where)

    def yanked_reason(self, version: str) -> str | None:
        """Why ``version`` was yanked ("yanked" without a reason), or None if it was not."""
        want = _parse_version(version, self.name)
        for key, reason in self.yanked.items():
            try:
                if Version(key) == want:
                    return reason
            except InvalidVersion:
                continue
        return None


@dataclass(frozen=True)
class PypiLookup:
    """PyPI's answer for one version: which JSON gave it, or why neither did."""

    source: str | None  # PROJECT_SOURCE or RELEASE_SOURCE; None: not answered
    advisories: tuple[Advisory, ...] = ()
    error: str | None = None  # why it was not answered
    yanked: str | None = None  # the release was yanked, and why


class PypiService:
    """PyPI's JSON API: the project JSON for the latest release, else the release JSON
    (the one service pip-audit queries). Project answers are kept per instance; it may
    be shared by threads."""

    name = "PyPI"

    def __init__(self, base_url: str = "https://pypi.org", timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._projects: dict[str, PypiProject] = {}
        self._lock = threading.Lock()

    def _get(self, url: str, limit: int) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:  # noqa: S310
                data = json.loads(resp.read(limit))
        except urllib.error.HTTPError as e:
            raise AdvisoryError(f"{url}: HTTP {e.code}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise AdvisoryError(f"{url}: {e}") from e
        if not isinstance(data, dict):
            raise AdvisoryError(f"{url}: not a JSON object")
        return data

    def project(self, package: str) -> PypiProject:
        """``/pypi/<name>/json``, fetched once per package."""
        name = _canonical(package)
        with self._lock:
            known = self._projects.get(name)
        if known is not None:
            return known
        data = self._get(f"{self.base_url}/pypi/{name}/json", _MAX_PROJECT_JSON)
        project = PypiProject.from_json(name, data)
        with self._lock:
            self._projects[name] = project
        return project

    def release(self, package: str, version: str) -> tuple[Advisory, ...]:
        """``/pypi/<name>/<version>/json``: the advisories of that release."""
        url = f"{self.base_url}/pypi/{_canonical(package)}/{version}/json"
        return pypi_advisories(
            package, self._get(url, _MAX_RELEASE_JSON).get("vulnerabilities"), url
        )

    def lookup(self, package: str, version: str) -> PypiLookup:
        """The project JSON when ``version`` is the latest release, else the release JSON;
        when neither answers, the reasons."""
        yanked: str | None = None
        why: list[str] = []
        try:
            project = self.project(package)
            yanked = project.yanked_reason(version)
            found = project.advisories(version)
            if found is not None:
                return PypiLookup(PROJECT_SOURCE, found, yanked=yanked)
            why.append(f"not the latest release ({project.latest_release()})")
        except AdvisoryError as e:
            why.append(str(e))
        try:
            return PypiLookup(RELEASE_SOURCE, self.release(package, version), yanked=yanked)
        except AdvisoryError as e:
            why.append(f"release JSON: {e}")
        return PypiLookup(None, error="; ".join(why), yanked=yanked)

    def affecting(self, package: str, version: str) -> list[Advisory]:
        found = self.lookup(package, version)
        if found.source is None:
            raise AdvisoryError(f"{_canonical(package)} {version}: {found.error}")
        return list(found.advisories)


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
