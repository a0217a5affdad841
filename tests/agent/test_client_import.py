"""The client apps import is light: numpy and the wire format, no runtime, key store or
TPM code (an app that calls the agent must not pay for, or depend on, what serves it)."""

from __future__ import annotations

import json
import subprocess
import sys

#: Modules the client must not load, nor anything under them.
HEAVY = (
    "onnxruntime",
    "ai_edge_litert",
    "tflite_runtime",
    "tpm2_pytss",
    "pkcs11",
    "PyKCS11",
    "cryptography",
    "edgeseal.hardware",
    "edgeseal.agent.runtimes",
    "edgeseal.agent.service",
    "edgeseal.agent.api",
    "edgeseal.core.keystore",
)


def test_importing_the_client_loads_numpy_and_the_wire_format_only():
    probe = "import json, sys; import edgeseal.agent.client; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    loaded = json.loads(out)
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == []
    ours = [m for m in loaded if m.startswith("edgeseal")]
    print(f"importing edgeseal.agent.client loads {len(ours)} edgeseal modules: {ours}")
    assert set(ours) == {
        "edgeseal",
        "edgeseal.agent",
        "edgeseal.agent.client",
        "edgeseal.agent.sockio",
        "edgeseal.agent.wire",
        "edgeseal.core",
        "edgeseal.core.errors",
    }
    third_party = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
    assert third_party - {"__main__", "_distutils_hack", "edgeseal", "numpy"} == set()
