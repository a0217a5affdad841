"""The one way edgeseal writes a CycloneDX SBOM, on cyclonedx-python-lib.

Two documents use it: the SBOM sealed in each bundle (``edgeseal.packager.sbom``) and the
SBOM of the agent's install (``scripts/sbom-agent``). Both are CycloneDX 1.5 JSON, handed
back as a ``dict``. The same inputs give the same document, byte for byte: the timestamp is
an argument (never the wall clock) and the serial number is derived from the rest of the
document, never random; every component carries the ``bom-ref`` it is given.

Internal to edgeseal: no stability promise beyond those two callers.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense, License, LicenseExpression
from cyclonedx.model.vulnerability import Vulnerability
from cyclonedx.output import make_outputter
from cyclonedx.schema import OutputFormat, SchemaVersion
from packageurl import PackageURL

__all__ = ["SPEC_VERSION", "ComponentType", "component", "document", "licence", "pypi_purl"]

#: The CycloneDX version both SBOMs claim.
SPEC_VERSION = SchemaVersion.V1_5

#: Serial numbers are UUIDv5 names in this namespace over the document's SHA-256.
_SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:edgeseal:sbom")


def pypi_purl(name: str, version: str | None = None) -> PackageURL:
    """``pkg:pypi/<name>[@<version>]``."""
    return PackageURL(type="pypi", name=name, version=version)


def licence(*, expression: str | None = None, name: str | None = None) -> License | None:
    """A licence from an SPDX expression, else from a free-text name, else None."""
    if expression:
        return LicenseExpression(expression)
    if name:
        return DisjunctiveLicense(name=name)
    return None


def component(
    kind: ComponentType,
    *,
    ref: str,
    name: str,
    version: str,
    purl: PackageURL | None = None,
    sha256: str | None = None,
    licences: Iterable[License] = (),
    properties: Iterable[tuple[str, str]] = (),
) -> Component:
    """A component with the ``bom-ref`` ``ref``; ``properties`` are (name, value) pairs."""
    return Component(
        type=kind,
        bom_ref=ref,
        name=name,
        version=version,
        purl=purl,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha256)] if sha256 else None,
        licenses=list(licences),
        properties=[Property(name=n, value=v) for n, v in properties],
    )


def document(
    *,
    tool: str,
    top: Component,
    components: Iterable[Component],
    depends: Mapping[str, Iterable[str]],
    created: datetime,
    properties: Iterable[tuple[str, str]] = (),
    vulnerabilities: Iterable[Vulnerability] = (),
) -> dict[str, Any]:
    """The SBOM of ``top`` (its metadata component) and ``components``, as JSON data.

    ``depends`` maps a ``bom-ref`` to the ``bom-ref`` s it depends on; ``created`` is the
    document's timestamp (a timezone-aware time, written in UTC); ``tool`` names what
    wrote it. Raises ``ValueError`` for a naive ``created`` or an unknown ``bom-ref``.
    """
    if created.tzinfo is None:
        raise ValueError("created must be timezone-aware")
    parts = list(components)
    by_ref = {str(c.bom_ref.value): c for c in [top, *parts]}
    meta = BomMetaData(
        component=top,
        timestamp=created.astimezone(timezone.utc).replace(microsecond=0),
        properties=[Property(name=n, value=v) for n, v in properties],
    )
    meta.tools.components.add(Component(type=ComponentType.APPLICATION, name=tool))
    bom = Bom(
        serial_number=uuid.UUID(int=0),
        metadata=meta,
        components=parts,
        vulnerabilities=list(vulnerabilities),
    )
    for ref, on in depends.items():
        unknown = sorted({ref, *on} - by_ref.keys())
        if unknown:
            raise ValueError(f"dependencies name unknown bom-refs: {', '.join(unknown)}")
        bom.register_dependency(by_ref[ref], [by_ref[r] for r in on])
    # The serial number names the content: a UUIDv5 over the document's digest with a
    # zero serial, so that the same inputs give the same serial and different ones differ.
    digest = hashlib.sha256(_json(bom).encode()).hexdigest()
    bom.serial_number = uuid.uuid5(_SERIAL_NAMESPACE, digest)
    doc: dict[str, Any] = json.loads(_json(bom))
    return doc


def _json(bom: Bom) -> str:
    return make_outputter(bom, OutputFormat.JSON, SPEC_VERSION).output_as_string()
