"""A CycloneDX 1.5 SBOM of what the model needs at run time.

The model itself is the top component (type ``machine-learning-model``, with its
SHA-256); its run-time requirement is the inference runtime with the minimum version
that loads its opset, and the operator domains it uses. The SBOM is sealed in
``extras`` and its digest is in the signed manifest.
"""

from __future__ import annotations

import uuid
from typing import Any

from edgeseal.core.encoding import format_time, utcnow

__all__ = ["MIN_ORT_FOR_OPSET", "make_sbom"]

#: The first ONNX Runtime release that loads each default-domain opset.
MIN_ORT_FOR_OPSET = {
    7: "1.0",
    8: "1.0",
    9: "1.0",
    10: "1.0",
    11: "1.0",
    12: "1.5",
    13: "1.7",
    14: "1.10",
    15: "1.11",
    16: "1.12",
    17: "1.13",
    18: "1.14",
    19: "1.16",
    20: "1.17",
    21: "1.18",
}


def make_sbom(
    *,
    name: str,
    version: int,
    model_format: str,
    model_sha256: str,
    opsets: dict[str, int],
    domains: list[str],
    runtime_version: str | None,
) -> dict[str, Any]:
    if model_format == "onnx":
        opset = opsets.get("", opsets.get("ai.onnx", 0))
        runtime = {
            "type": "library",
            "name": "onnxruntime",
            "purl": "pkg:pypi/onnxruntime",
            "version": f">={MIN_ORT_FOR_OPSET.get(opset, '1.18')}",
            "properties": [{"name": "edgeseal:tested-with", "value": runtime_version or "unknown"}],
        }
    else:
        runtime = {
            "type": "library",
            "name": "ai-edge-litert",
            "purl": "pkg:pypi/ai-edge-litert",
            "version": ">=1.2",
            "properties": [{"name": "edgeseal:tested-with", "value": runtime_version or "unknown"}],
        }
    props = [
        {"name": f"edgeseal:onnx:opset:{d or 'ai.onnx'}", "value": str(v)}
        for d, v in sorted(opsets.items())
    ]
    props += [{"name": "edgeseal:onnx:domain", "value": d or "ai.onnx"} for d in sorted(domains)]
    return {
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
