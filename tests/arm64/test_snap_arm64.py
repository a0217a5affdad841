"""The arm64 snap is real, not a skeleton: its tree (Python parts for aarch64 included) is
packed as snapd would, unsquashed, and on emulated arm64 its own hooks and launcher
provision the device, install a bundle, run the daemon and serve one inference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from arm64.conftest import REPO, host_env, run_arm64
from edgeseal.core.keys import load_public_key

pytestmark = [pytest.mark.arm64, pytest.mark.snap]

sys.path.insert(0, str(REPO / "snap" / "local"))
import assemble  # noqa: E402

SNAP = "/snap/edgeseal/x1"
GUEST_ENV = {
    "SNAP": SNAP,
    "SNAP_NAME": "edgeseal",
    "SNAP_INSTANCE_NAME": "edgeseal",
    "SNAP_REVISION": "x1",
    "SNAP_ARCH": "arm64",
    "SNAP_COMMON": "/var/snap/edgeseal/common",
    "SNAP_DATA": "/var/snap/edgeseal/x1",
    "PATH": "/fakebin:/usr/bin:/bin",
    "FAKE_SNAPCTL_STATE": "/var/snap/edgeseal/snapctl.json",
    "FAKE_SNAPCTL_LOG": "/var/snap/edgeseal/snapctl.log",
}

SERVE = """
set -eu
L=$SNAP/bin/edgeseal-launch
$L agent install /work/clf.esb --json > /work/install.json
$L agent run > /work/daemon.log 2>&1 &
pid=$!
i=0
while [ ! -S /run/snap.edgeseal/agent.sock ]; do
  i=$((i + 1)); [ $i -lt 600 ] || { echo "no socket" >&2; cat /work/daemon.log >&2; exit 1; }
  sleep 0.5
done
$L agent infer clf --input /work/x.npy --json > /work/infer.json
kill -TERM $pid
wait $pid && echo 0 > /work/daemon.rc || echo $? > /work/daemon.rc
"""


def test_the_arm64_snap_provisions_installs_and_serves_one_inference(
    fleet, onnx_model, arm64_sysroot, tmp_path
):
    t0 = time.monotonic()
    prime = assemble.assemble(tmp_path / "prime", "arm64", cross="rpi-bookworm")
    snap = assemble.pack(prime, tmp_path / "edgeseal_0.1.0_arm64.snap")
    tree = tmp_path / "squashfs-root"
    subprocess.run(
        ["unsquashfs", "-q", "-no-progress", "-d", str(tree), str(snap)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(prime)
    packed = time.monotonic() - t0

    var = tmp_path / "var"
    (var / "common").mkdir(parents=True)
    (var / "x1").mkdir()
    fakebin, work = tmp_path / "fakebin", tmp_path / "work"
    fakebin.mkdir()
    work.mkdir()
    shutil.copyfile(REPO / "tests" / "snap" / "fake_snapctl.py", fakebin / "snapctl")
    (fakebin / "snapctl").chmod(0o755)
    (work / "root.pub").write_bytes(fleet.ring.root_pub_path.read_bytes())
    binds = {tree: SNAP, var: "/var/snap/edgeseal", fakebin: "/fakebin", work: "/work"}

    # 1. install and configure hooks, then provisioning, all through the snap's launcher
    setup = (
        "set -eu; $SNAP/meta/hooks/install; snapctl set device.id=arm-01; "
        "$SNAP/meta/hooks/configure; "
        "$SNAP/bin/edgeseal-launch agent provision --root /work/root.pub --device-id arm-01 "
        "--keystore software --json > /work/provision.json"
    )
    proc = run_arm64(arm64_sysroot, "/bin/sh", "-c", setup, binds=binds, env=GUEST_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((work / "provision.json").read_text())
    assert info["architecture"] == "aarch64"
    assert (var / "x1" / "config.toml").is_file()
    assert (var / "common" / "home" / "device.json").is_file()

    # 2. the workstation registers the device and seals a model for it
    fleet.ring.add_device(
        "arm-01", load_public_key(info["public_key"]), target=None, key_store="software"
    )
    fleet.pack(onnx_model, name="clf", to=("arm-01",), out=work / "clf.esb")
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    np.save(work / "x.npy", x)

    # 3. the daemon app serves it; the CLI app asks for one inference; SIGTERM stops it
    proc = run_arm64(arm64_sysroot, "/bin/sh", "-c", SERVE, binds=binds, env=GUEST_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((work / "install.json").read_text())["version"] == 1
    answer = json.loads((work / "infer.json").read_text())
    assert (work / "daemon.rc").read_text().strip() == "0", (work / "daemon.log").read_text()

    # the same bundle and device home opened on x86 compute the same
    home = str(var / "common" / "home")
    x86 = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeseal.core",
            "agent",
            "infer",
            str(work / "clf.esb"),
            "--home",
            home,
            "--input",
            str(work / "x.npy"),
            "--json",
        ],
        env=host_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    ref = json.loads(x86.stdout)["outputs"]
    for name, values in ref.items():
        np.testing.assert_allclose(answer["outputs"][name], values, rtol=1e-4, atol=1e-5)

    # the model store holds the sealed bundle only: no plaintext graph anywhere on disk
    plaintext = onnx_model.read_bytes()
    probe = plaintext[len(plaintext) // 2 : len(plaintext) // 2 + 64]
    for f in var.rglob("*"):
        if f.is_file():
            assert probe not in f.read_bytes(), f
    print(f"snap tree built and packed in {packed:.0f} s; total {time.monotonic() - t0:.0f} s")
