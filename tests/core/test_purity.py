"""The trust decisions are pure: their modules pull in no network, process or runtime I/O."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

PURE = [
    "edgeseal.core.trust",
    "edgeseal.core.truststate",
    "edgeseal.core.manifest",
    "edgeseal.core.layout",
    "edgeseal.core.envelope",
    "edgeseal.core.weights",
    "edgeseal.core._stream",
    "edgeseal.core._hpke",
    "edgeseal.core._verify",
    "edgeseal.core._bundle",
    "edgeseal.core.sealing",
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


# What a pure module may not touch itself (the libraries it uses may, for their own setup):
# files, processes, sockets, the environment, the clock.
IO_MODULES = {"os", "io", "pathlib", "shutil", "tempfile", "time", "socket", "subprocess"}
IO_CALLS = {"open", "now", "utcnow", "today", "time", "getenv"}


def io_uses(source: str) -> list[str]:
    """The I/O a module's own code names: imports of ``IO_MODULES`` and calls in ``IO_CALLS``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in IO_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            if name in IO_CALLS:
                found.append(f"{name}()")
    return found


def test_pure_modules_do_no_io_themselves():
    for module in PURE:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        assert io_uses(Path(spec.origin).read_text()) == [], module


def test_io_uses_catches_files_and_the_clock():
    source = "import os\nfrom pathlib import Path\nimport time\nx = time.time()\nopen('f')\n"
    assert io_uses(source) == ["os", "pathlib", "time", "time()", "open()"]
    assert io_uses("from datetime import datetime\nnow = datetime.now()\n") == ["now()"]
