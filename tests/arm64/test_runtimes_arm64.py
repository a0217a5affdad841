"""Bundles packed on x86 open and compute the same on emulated arm64 (ONNX and LiteRT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from arm64.conftest import GUEST_PYTHONPATH, REPO, run_arm64
from arm64.device_check import check
from edgeseal.packager.pack import PackOptions
from edgeseal.packager.quantize import QuantizeMode
from helpers import NOW

pytestmark = pytest.mark.arm64


def _spec(
    work: Path, prefix: str, bundles: dict[str, Path], level: str = "basic"
) -> dict[str, object]:
    """The device_check spec with paths as seen from ``prefix`` (host dir or guest mount)."""
    return {
        "graph_optimization": level,
        "root": f"{prefix}/root.pub",
        "device_key": f"{prefix}/device.pem",
        "now": NOW.isoformat(),
        "bundles": {
            name: {"bundle": f"{prefix}/{b.name}", "inputs": f"{prefix}/{name}.npz"}
            for name, b in bundles.items()
        },
    }


def _compare_on_arm64(
    fleet, sysroot: Path, work: Path, bundles: dict[str, Path], level: str = "basic"
) -> None:
    """Open ``bundles`` on x86 here and on emulated arm64 (ONNX Runtime at ``level``);
    golden vectors must pass on both and the outputs agree."""
    (work / "root.pub").write_bytes(fleet.ring.root_pub_path.read_bytes())
    (work / "device.pem").write_bytes(
        fleet.devices["dev-a"].private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    rng = np.random.default_rng(7)
    for name, bundle in bundles.items():
        shapes = _inputs(fleet, bundle)
        np.savez(
            work / f"{name}.npz",
            **{
                n: rng.standard_normal([3 if d is None else d for d in shape]).astype(np.float32)
                for n, shape in shapes.items()
            },
        )

    x86 = check(_spec(work, str(work), bundles, level))
    (work / "spec.json").write_text(json.dumps(_spec(work, "/work", bundles, level)))
    proc = run_arm64(
        sysroot,
        "/usr/bin/python3",
        "/src/tests/arm64/device_check.py",
        "/work/spec.json",
        binds={work: "/work", REPO: "/src"},
        env={"PYTHONPATH": GUEST_PYTHONPATH},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    arm = json.loads(proc.stdout.strip().splitlines()[-1])

    assert arm["machine"] == "aarch64"
    assert x86["machine"] == "x86_64"
    for name in bundles:
        a, h = arm["results"][name], x86["results"][name]
        assert a["golden_runs"] >= 1, f"{name}: golden vectors not checked on arm64"
        assert a["dtypes"] == h["dtypes"]
        for out, ref in h["outputs"].items():
            ref_arr, got = np.asarray(ref), np.asarray(a["outputs"][out])
            # int8 kernels differ by CPU (x86 u8s8 vs ARM NEON); float paths agree closely.
            tol = 0.05 * float(np.abs(ref_arr).max()) + 1e-3 if "int8" in name else 1e-5
            np.testing.assert_allclose(got, ref_arr, rtol=1e-4, atol=tol, err_msg=name)
    print(json.dumps({"arm64": arm["versions"], "python": arm["python"]}))


def test_onnx_and_litert_bundles_packed_on_x86_pass_golden_checks_on_emulated_arm64(
    fleet, onnx_model, tflite_model, arm64_sysroot, tmp_path
):
    bundles = {
        "onnx-fp32": fleet.pack(onnx_model, name="clf", out=tmp_path / "clf.esb")[0],
        "tflite": fleet.pack(tflite_model, name="dense", out=tmp_path / "dense.esb")[0],
    }
    _compare_on_arm64(fleet, arm64_sysroot, tmp_path, bundles)


def test_dynamic_int8_bundle_packed_on_x86_passes_golden_checks_on_emulated_arm64(
    fleet, onnx_model, arm64_sysroot, tmp_path
):
    bundle, result = fleet.pack(
        onnx_model,
        name="clf-int8",
        out=tmp_path / "clf-int8.esb",
        options=PackOptions(quantize=QuantizeMode.DYNAMIC_INT8),
    )
    assert result.manifest.quantization["mode"] == QuantizeMode.DYNAMIC_INT8.value
    _compare_on_arm64(fleet, arm64_sysroot, tmp_path, {"onnx-int8": bundle})


@pytest.mark.parametrize("level", ["basic", "all"])
def test_int8_bundles_packed_on_x86_pass_on_arm64_with_its_own_int8_kernels(
    fleet, onnx_model, arm64_sysroot, tmp_path, level
):
    """Packed on this x86 machine (whatever its int8 family), dynamic and static int8
    bundles pass their golden checks on arm64 (exact integer kernels), also at "all",
    where ONNX Runtime runs the device's own QLinear and integer GEMM kernels."""
    rng = np.random.default_rng(3)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=rng.standard_normal((32, 8)).astype(np.float32))
    bundles = {}
    for mode in (QuantizeMode.DYNAMIC_INT8, QuantizeMode.STATIC_INT8):
        name = f"clf-{mode.value}"
        bundles[f"onnx-{mode.value}"] = fleet.pack(
            onnx_model,
            name=name,
            out=tmp_path / f"{name}.esb",
            options=PackOptions(quantize=mode, calibration=calibration),
        )[0]
    _compare_on_arm64(fleet, arm64_sysroot, tmp_path, bundles, level)


def _inputs(fleet, bundle: Path) -> dict[str, list[int | None]]:
    """Input names and shapes from the bundle's manifest (symbolic dims as None)."""
    from edgeseal.core.reader import BundleFile

    with BundleFile.open(bundle) as bf:
        vb = bf.verify(fleet.policy())
        return {
            t.name: [d if isinstance(d, int) and d > 0 else None for d in t.shape]
            for t in vb.manifest.inputs
        }
