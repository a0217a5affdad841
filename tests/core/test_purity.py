"""The trust decisions are pure: their modules pull in no network, process or runtime I/O."""

from __future__ import annotations

import subprocess
import sys

PURE = [
    "edgeseal.core.trust",
    "edgeseal.core.truststate",
    "edgeseal.core.manifest",
    "edgeseal.core.layout",
    "edgeseal.core.envelope",
    "edgeseal.core.weights",
    "edgeseal.core._stream",
    "edgeseal.core._hpke",
]
FORBIDDEN = [
    "socket",
    "subprocess",
    "urllib.request",
    "http.client",
    "onnxruntime",
    "paho",
    "edgeseal.agent",
    "edgeseal.packager",
    "edgeseal.hardware",
]


def test_pure_modules_import_no_io_libraries():
    code = (
        "import sys\n"
        f"for m in {PURE!r}: __import__(m)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_core_imports_none_of_the_other_parts():
    code = (
        "import sys, edgeseal.core.cli, edgeseal.core.reader, edgeseal.core.writer\n"
        "print(','.join(m for m in sys.modules if m.startswith('edgeseal.') and "
        "not m.startswith('edgeseal.core')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
