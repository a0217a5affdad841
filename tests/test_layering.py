"""Import rules for the whole house, checked by reading the source (no module is run).

docs/DESIGN: dependencies point one way, ``core`` <- ``hardware`` <- ``agent`` <- ``ota``,
and ``packager`` uses ``core`` and ``hardware``; ``agent`` never imports ``ota``. And no
part reaches into another part's private rooms: a module or name whose dotted path has
a ``_``-prefixed segment (``edgeseal.core._hpke``) is for its own part only; a part
offers what others may use through a public module (``edgeseal.core.sealing``).

Every ``import``/``from ... import`` counts, wherever it is (inside a function, under
``TYPE_CHECKING``), and so does ``importlib.import_module("edgeseal....")`` with a
literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("core", "hardware", "agent", "ota", "packager")
#: What each part may import of the others (docs/DESIGN.md, "Dependencies point one way").
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "hardware": frozenset({"core"}),
    "agent": frozenset({"core", "hardware"}),
    "ota": frozenset({"core", "hardware", "agent"}),
    "packager": frozenset({"core", "hardware"}),
}
#: Known exceptions, each with its reason: (importing module, imported name). Empty: the
#: one crossing found when the rule was written (agent.trtcache using core._hpke and
#: core._stream) now goes through edgeseal.core.sealing.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def imported_names(source: str, module: str) -> list[str]:
    """Every dotted name ``source`` (the text of ``module``) imports, modules and names
    alike: ``from edgeseal.core import _hpke`` gives ``edgeseal.core._hpke``."""
    names: list[str] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names += [f"{base}.{a.name}" if a.name != "*" else base for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", ""))
            in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def violations(part: str, module: str, source: str) -> list[str]:
    """What ``module`` of ``part`` imports against the rules, one line each."""
    found = []
    for name in imported_names(source, module):
        segments = name.split(".")
        if segments[0] != "edgeseal" or len(segments) < 2:
            continue
        other = segments[1]
        if other == part or (module, name) in ALLOWED:
            continue
        if other not in MAY_IMPORT[part]:
            found.append(f"{module} imports {name}: {part} may not import {other}")
        elif any(s.startswith("_") and not s.startswith("__") for s in segments[2:]):
            found.append(f"{module} imports {name}: private to {other}")
    return found


def _modules() -> list[tuple[str, str, Path]]:
    """(part, dotted module name, path) for every module of every part."""
    found = []
    for part in PARTS:
        src = ROOT / part / "src"
        for path in sorted((src / "edgeseal" / part).rglob("*.py")):
            dotted = ".".join(path.relative_to(src).with_suffix("").parts)
            found.append((part, dotted.removesuffix(".__init__"), path))
    assert {p for p, _, _ in found} == set(PARTS), "a part's sources were not found"
    return found


def test_every_part_imports_only_what_it_may():
    found = [
        v
        for part, module, path in _modules()
        for v in violations(part, module, path.read_text(encoding="utf-8"))
    ]
    assert found == [], "\n".join(found)


def test_the_allow_list_holds_only_crossings_that_still_exist():
    seen = {
        (module, name)
        for _, module, path in _modules()
        for name in imported_names(path.read_text(encoding="utf-8"), module)
    }
    assert seen >= ALLOWED, sorted(ALLOWED - seen)


@pytest.mark.parametrize(
    ("part", "source", "expected"),
    [
        ("core", "import edgeseal.agent.store\n", "core may not import agent"),
        ("hardware", "def f():\n    from edgeseal.agent import store\n", "may not import agent"),
        ("agent", "from edgeseal.ota.updater import Updater\n", "agent may not import ota"),
        ("packager", "from edgeseal.agent.device import Agent\n", "may not import agent"),
        ("packager", "from edgeseal import ota\n", "packager may not import ota"),
        ("agent", "from edgeseal.core import _hpke\n", "private to core"),
        ("ota", "from edgeseal.agent._x import y\n", "private to agent"),
        ("ota", "from edgeseal.core.reader import _check_policy\n", "private to core"),
        ("agent", "import importlib\nimportlib.import_module('edgeseal.ota.x')\n", "ota"),
        ("core", "from ..agent import store\n", "core may not import agent"),
    ],
)
def test_a_bad_import_is_caught(part, source, expected):
    found = violations(part, f"edgeseal.{part}.mod", source)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    ("part", "source"),
    [
        ("agent", "from edgeseal.core.sealing import wrap_key\nimport edgeseal.hardware.stores\n"),
        ("ota", "from edgeseal.agent.device import Agent\nfrom edgeseal.core import errors\n"),
        ("core", "from edgeseal.core import _hpke\nfrom . import _stream\nimport os\n"),
        ("hardware", "from __future__ import annotations\nfrom edgeseal.core.keys import key_id\n"),
    ],
)
def test_a_good_import_passes(part, source):
    assert violations(part, f"edgeseal.{part}.mod", source) == []
