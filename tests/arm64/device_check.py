"""Open bundles as a device does and report their outputs: run on emulated arm64 by the
smoke test (``python3 device_check.py SPEC.json``) and in-process on the host.

For each bundle: verify against the pinned root, unwrap with the device key, decrypt into
locked memory, build the runtime session, check the golden vectors (ServingModel.start
refuses a model that does not reproduce them), run the given inputs.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edgeseal.agent.guard import ServingModel
from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import load_config
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.reader import VerifyPolicy
from edgeseal.core.trust import TrustAnchor


def check(spec: dict[str, Any]) -> dict[str, Any]:
    # "all": ONNX Runtime fuses int8 QLinear kernels, this CPU's own integer family.
    level = spec.get("graph_optimization", "basic")
    cfg = load_config(text=f'[runtime]\ngraph_optimization = "{level}"\n')
    key = load_pem_private_key(Path(spec["device_key"]).read_bytes(), password=None)
    store = InMemoryKey(key)  # type: ignore[arg-type]
    anchor = TrustAnchor.from_pem_files([Path(spec["root"]).read_bytes()])
    policy = VerifyPolicy(anchor=anchor, now=datetime.fromisoformat(spec["now"]))
    results: dict[str, Any] = {}
    for name, item in spec["bundles"].items():
        opened = open_bundle(Path(item["bundle"]), key_store=store, policy=policy, config=cfg)
        served = ServingModel.start(opened, cfg.agent)
        try:
            with np.load(item["inputs"], allow_pickle=False) as z:
                feed = {k: z[k] for k in z.files}
            out = served.infer(feed).outputs
            status = served.status()
            results[name] = {
                "outputs": {k: v.tolist() for k, v in out.items()},
                "dtypes": {k: str(v.dtype) for k, v in out.items()},
                "golden_runs": status["golden_runs"],
                "runtime": status["runtime"],
            }
        finally:
            served.close()
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("onnxruntime", "ai-edge-litert", "numpy")},
        "results": results,
        "graph_optimization": level,
    }


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(check(spec)))
