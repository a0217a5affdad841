"""A CycloneDX 1.5 SBOM of what the model needs at run time.

The model itself is the top component (type ``machine-learning-model``, with its
SHA-256); its run-time requirement is the inference runtime with the minimum version
that loads its opset, and the operator domains it uses. The SBOM is sealed in
``extras`` and its digest is in the signed manifest.
"""

from __future__ import annotations

import uuid
from typing import Any

from packaging.version import Version

from edgeseal.core.encoding import format_time, utcnow
from edgeseal.packager.advisories import RuntimeAudit

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


def _vulnerabilities(audit: RuntimeAudit) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for what, version, advisories in (
        ("floor", audit.floor, audit.floor_advisories),
        ("tested-with", audit.tested_with, audit.tested_advisories),
    ):
        for a in advisories:
            v = out.setdefault(
                a.id,
                {
                    "id": a.id,
                    "source": {"name": audit.source},
                    "description": a.summary,
                    "references": [{"id": x, "source": {"name": "alias"}} for x in a.aliases],
                    "recommendation": (
                        f"use {audit.package} >= {min(a.fixed_in, key=Version)}"
                        if a.fixed_in
                        else "no fixed version is known"
                    ),
                    "affects": [{"ref": "runtime", "versions": []}],
                },
            )
            v["affects"][0]["versions"].append(
                {"version": version, "status": "affected", "x-edgeseal-role": what}
            )
    return list(out.values())


def make_sbom(
    *,
    name: str,
    version: int,
    model_format: str,
    model_sha256: str,
    opsets: dict[str, int],
    domains: list[str],
    runtime_version: str | None,
    audit: RuntimeAudit | None = None,
) -> dict[str, Any]:
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
    runtime = {
        "type": "library",
        "name": package,
        "purl": f"pkg:pypi/{package}",
        "version": f">={required}",
        "properties": [
            {"name": "edgeseal:tested-with", "value": runtime_version or "unknown"},
            {"name": "edgeseal:format-floor", "value": floor},
            {"name": "edgeseal:advisories", "value": audited},
        ],
    }
    props = [
        {"name": f"edgeseal:onnx:opset:{d or 'ai.onnx'}", "value": str(v)}
        for d, v in sorted(opsets.items())
    ]
    props += [{"name": "edgeseal:onnx:domain", "value": d or "ai.onnx"} for d in sorted(domains)]
    sbom: dict[str, Any] = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": format_time(utcnow()),
            "tools": {"components": [{"type": "application", "name": "edgeseal"}]},
            "component": {
                "type": "machine-learning-model",
                "bom-ref": "model",
                "name": name,
                "version": str(version),
                "hashes": [{"alg": "SHA-256", "content": model_sha256}],
                "properties": [{"name": "edgeseal:format", "value": model_format}, *props],
            },
        },
        "components": [{**runtime, "bom-ref": "runtime"}],
        "dependencies": [{"ref": "model", "dependsOn": ["runtime"]}],
    }
    if audit is not None and (audit.floor_advisories or audit.tested_advisories):
        sbom["vulnerabilities"] = _vulnerabilities(audit)
    return sbom
