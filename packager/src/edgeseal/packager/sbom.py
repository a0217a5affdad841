"""A CycloneDX 1.5 SBOM of what the model needs at run time.

The model itself is the top component (type ``machine-learning-model``, with its
SHA-256); its run-time requirement is the inference runtime with the minimum version
that loads its opset, and the operator domains it uses. The SBOM is sealed in
``extras`` and its digest is in the signed manifest. It is written by the shared builder
(``edgeseal.packager.cyclonedx_doc``, on cyclonedx-python-lib), so the same inputs
(the bundle's creation time included) give the same document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cyclonedx.model import Property
from cyclonedx.model.impact_analysis import ImpactAnalysisAffectedStatus
from cyclonedx.model.vulnerability import (
    BomTarget,
    BomTargetVersionRange,
    Vulnerability,
    VulnerabilityReference,
    VulnerabilitySource,
)
from packaging.version import Version

from edgeseal.packager.advisories import Advisory, RuntimeAudit
from edgeseal.packager.cyclonedx_doc import ComponentType, component, document, pypi_purl

__all__ = ["MIN_ORT_FOR_OPSET", "make_sbom", "runtime_floor"]

#: The first ONNX Runtime release that loads each default-domain opset.
MIN_ORT_FOR_OPSET = {
    7: "1.0.0",
    8: "1.0.0",
    9: "1.0.0",
    10: "1.0.0",
    11: "1.0.0",
    12: "1.5.0",
    13: "1.7.0",
    14: "1.10.0",
    15: "1.11.0",
    16: "1.12.0",
    17: "1.13.0",
    18: "1.14.0",
    19: "1.16.0",
    20: "1.17.0",
    21: "1.18.0",
}


def runtime_floor(model_format: str, opsets: dict[str, int]) -> tuple[str, str]:
    """(package, minimum version) of the runtime that loads the model."""
    if model_format == "onnx":
        opset = opsets.get("", opsets.get("ai.onnx", 0))
        return "onnxruntime", MIN_ORT_FOR_OPSET.get(opset, "1.18.0")
    return "ai-edge-litert", "1.2.0"


def _vulnerabilities(audit: RuntimeAudit) -> list[Vulnerability]:
    """One entry per advisory; each version it affects (the floor, the tested-with one, or
    both) is listed, and a property ``edgeseal:affected:<role>`` says which is which."""
    found: dict[str, tuple[Advisory, list[tuple[str, str]]]] = {}
    for role, version, advisories in (
        ("floor", audit.floor, audit.floor_advisories),
        ("tested-with", audit.tested_with, audit.tested_advisories),
    ):
        for a in advisories:
            found.setdefault(a.id, (a, []))[1].append((role, version or "unknown"))
    return [
        Vulnerability(
            bom_ref=a.id,
            id=a.id,
            source=VulnerabilitySource(name=audit.source),
            description=a.summary,
            references=[
                VulnerabilityReference(id=x, source=VulnerabilitySource(name="alias"))
                for x in a.aliases
            ],
            recommendation=(
                f"use {audit.package} >= {min(a.fixed_in, key=Version)}"
                if a.fixed_in
                else "no fixed version is known"
            ),
            affects=[
                BomTarget(
                    ref="runtime",
                    versions=[
                        BomTargetVersionRange(
                            version=v, status=ImpactAnalysisAffectedStatus.AFFECTED
                        )
                        for _, v in roles
                    ],
                )
            ],
            properties=[Property(name=f"edgeseal:affected:{r}", value=v) for r, v in roles],
        )
        for a, roles in found.values()
    ]


def make_sbom(
    *,
    name: str,
    version: int,
    model_format: str,
    model_sha256: str,
    opsets: dict[str, int],
    domains: list[str],
    runtime_version: str | None,
    created: datetime,
    audit: RuntimeAudit | None = None,
) -> dict[str, Any]:
    """The bundle's SBOM (JSON data). ``created`` is its timestamp: the bundle's creation
    time, so that the same inputs give the same SBOM."""
    package, floor = runtime_floor(model_format, opsets)
    required = audit.safe_floor if audit and audit.safe_floor else floor
    if audit is None:
        audited = "not checked (no advisory source)"
    elif audit.error:
        audited = f"not checked: {audit.error}"
    elif audit.safe_floor is None:
        audited = f"checked against {audit.source}: no version at or above {floor} is known safe"
    else:
        audited = f"checked against {audit.source}"
    runtime = component(
        ComponentType.LIBRARY,
        ref="runtime",
        name=package,
        version=f">={required}",
        purl=pypi_purl(package),
        properties=[
            ("edgeseal:tested-with", runtime_version or "unknown"),
            ("edgeseal:format-floor", floor),
            ("edgeseal:advisories", audited),
        ],
    )
    props = [("edgeseal:format", model_format)]
    props += [(f"edgeseal:onnx:opset:{d or 'ai.onnx'}", str(v)) for d, v in sorted(opsets.items())]
    props += [("edgeseal:onnx:domain", d or "ai.onnx") for d in sorted(domains)]
    model = component(
        ComponentType.MACHINE_LEARNING_MODEL,
        ref="model",
        name=name,
        version=str(version),
        sha256=model_sha256,
        properties=props,
    )
    return document(
        tool="edgeseal",
        top=model,
        components=[runtime],
        depends={"model": ["runtime"]},
        created=created,
        vulnerabilities=_vulnerabilities(audit) if audit is not None else (),
    )
