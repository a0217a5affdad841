"""The platform probe on fixture trees of each board family, and on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeseal.core.targets import TARGETS
from edgeseal.hardware.probe import jetpack_for, parse_l4t, probe
from helpers import run

BOARDS = Path(__file__).parent / "boards"

EXPECTED = {
    # board: (arch, family, model substring, l4t, jetpack, has_aes, tpm, tee, target)
    "jetson-orin": (
        "aarch64",
        "jetson",
        "AGX Orin",
        "R36.3.0",
        "6.0",
        True,
        None,
        "/dev/tee0",
        "jetson",
    ),
    "jetson-nano": (
        "aarch64",
        "jetson",
        "Jetson Nano",
        "R32.7.1",
        "4.6.x",
        True,
        None,
        None,
        "jetson",
    ),
    "rpi4": ("aarch64", "raspberry-pi", "Raspberry Pi 4", None, None, False, None, None, "rpi4"),
    "rpi5": ("aarch64", "raspberry-pi", "Raspberry Pi 5", None, None, True, None, None, "rpi5"),
    "arm64-server": (
        "aarch64",
        "generic",
        "generic arm64",
        None,
        None,
        True,
        None,
        None,
        "generic",
    ),
    "x86": ("x86_64", "generic", "generic x86_64", None, None, True, "/dev/tpmrm0", None, "x86_64"),
}


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_each_board_family_is_recognised(board):
    arch, family, model, l4t, jetpack, aes, tpm, tee, target = EXPECTED[board]
    p = probe(BOARDS / board)
    assert (p.architecture, p.family, p.l4t_release, p.jetpack) == (arch, family, l4t, jetpack)
    assert model in p.board
    assert (p.has_aes, p.tpm, p.tee) == (aes, tpm, tee)
    assert p.suggested_target == target and target in TARGETS
    assert p.memory_mb and p.memory_mb > 1000


def test_pkcs11_modules_are_found_under_the_usual_paths():
    assert probe(BOARDS / "x86").pkcs11_modules == ("/usr/lib/softhsm/libsofthsm2.so",)
    assert probe(BOARDS / "jetson-orin").pkcs11_modules == (
        "/usr/lib/aarch64-linux-gnu/libckteec.so.0",
    )


def test_an_empty_or_garbled_root_gives_unknowns_without_raising(tmp_path):
    p = probe(tmp_path)
    assert (p.architecture, p.family, p.tpm, p.memory_mb) == (None, "generic", None, None)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_bytes(b"\xff\xfe garbage: : :\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal: lots\n")
    assert probe(tmp_path).memory_mb is None


def test_l4t_parsing_and_jetpack_mapping():
    assert parse_l4t("# R35 (release), REVISION: 4.1, GCID: 1, BOARD: t186ref") == "R35.4.1"
    assert jetpack_for("R35.4.1") == "5.1.2"
    assert jetpack_for("R99.1.0") is None
    assert parse_l4t("nonsense") is None


def test_the_real_machine_probes_to_json():
    p = probe()
    obj = json.loads(json.dumps(p.to_obj()))
    assert obj["architecture"] and "CPUExecutionProvider" in obj["onnxruntime_providers"]


def test_hw_info_reports_a_board_as_json():
    env = {**os.environ, "COLUMNS": "200"}
    out = json.loads(run("hw", "info", "--root", str(BOARDS / "rpi4"), "--json", env=env).stdout)
    assert out["suggested_target"] == "rpi4" and out["has_aes"] is False
    assert "Raspberry Pi 4" in run("hw", "info", "--root", str(BOARDS / "rpi4"), env=env).stdout
