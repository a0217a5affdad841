"""Opening a sealed model against loading the plain model, in the same run.

Each case runs in a fresh subprocess (so peak RSS is its own), R times; medians reported.

    plain     onnxruntime.InferenceSession(model.onnx) + one inference
    edgeseal  open_bundle(model.esb): verify, unwrap, decrypt into locked memory, digests,
              pre-flight, session with weights handed over as OrtValues + one inference
    warm      the same open, timed after a first open in the same process: what a running
              agent pays on its second and later installs (its pre-flight server is up)

``--model PATH --shape 1,1,64,96`` opens a real ONNX model (its first input fed zeros of
that shape) instead of the synthetic ``--mb`` one.

Goals from the core issue: time <= 1.3x plain; peak RSS <= plain peak + 1.1 x model size.

    .venv/bin/python bench/bench_open.py [--mb 200] [--repeat 3] [--json]
    .venv/bin/python bench/bench_open.py --model common_old.onnx --shape 1,1,64,96
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

CHILD = r"""
import json, sys, time
mode, model, bundle, key, root, shape = sys.argv[1:7]
import numpy as np, onnxruntime as ort
from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config
from edgeseal.core.encoding import utcnow
from edgeseal.core.keys import load_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.reader import VerifyPolicy
from edgeseal.core.trust import TrustAnchor
def status_mb(field):
    # VmHWM is this process's own peak (ru_maxrss can carry the parent's across fork+exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024
base = status_mb("VmRSS")
x = np.ones(tuple(int(d) for d in shape.split(",")), np.float32)
def sealed():
    dev = InMemoryKey(load_private_key(__import__("pathlib").Path(key), passphrase=None))
    policy = VerifyPolicy(anchor=TrustAnchor.from_pem_files([open(root, "rb").read()]),
                          now=utcnow())
    m = open_bundle(__import__("pathlib").Path(bundle), key_store=dev, policy=policy,
                    config=Config())
    return m, m.run({INPUT: x})[OUTPUT]
INPUT, OUTPUT = sys.argv[7:9]
if mode == "warm":
    first, _ = sealed()
    first.close()
    base = status_mb("VmRSS")
t0 = time.perf_counter()
if mode == "plain":
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    y = s.run(None, {INPUT: x})[0]
else:
    m, y = sealed()
elapsed = time.perf_counter() - t0
y = np.asarray(y, np.float32).reshape(-1)[None, :]
print(json.dumps({"s": elapsed, "peak_mb": status_mb("VmHWM") - base, "y": y[0, :4].tolist()}))
"""


def run_case(mode: str, paths: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, *paths], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", type=Path, help="a real .onnx model instead of --mb's synthetic")
    ap.add_argument("--shape", default="1,1024", help="shape of the zeros fed to input 0")
    args = ap.parse_args()

    from edgeseal.core.encoding import utcnow
    from edgeseal.core.keyring import Keyring
    from edgeseal.core.keys import generate_private_key, write_private_key
    from edgeseal.packager.pack import pack_model
    from edgeseal.packager.samples import make_onnx_weighted

    tmp = Path(tempfile.mkdtemp(prefix="esbench-open-"))
    model = tmp / "model.onnx"
    if args.model:
        model.write_bytes(args.model.read_bytes())
    else:
        model.write_bytes(make_onnx_weighted(total_weight_bytes=args.mb * 1024 * 1024))
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    io_names = [graph.input[0].name, graph.output[0].name]
    ring = Keyring(tmp / "keys")
    ring.init_root()
    ring.new_signer("bench", roles=["pack"], model_patterns=["*"], days=1)
    key = generate_private_key()
    write_private_key(tmp / "device.key", key, passphrase=None)
    ring.add_device("bench-dev", key.public_key(), target=None)
    signer, cert = ring.load_signer("bench")
    bundle = tmp / "model.esb"
    pack_model(
        model,
        bundle,
        name="bench",
        version=1,
        signer=signer,
        certificate=cert,
        devices=ring.devices(),
        now=utcnow(),
        validity=timedelta(days=1),
    )
    paths = [str(model), str(bundle), str(tmp / "device.key"), str(ring.root_pub_path)]
    paths += [args.shape, *io_names]
    size_mb = model.stat().st_size / 2**20

    results: dict[str, list[dict[str, float]]] = {"plain": [], "edgeseal": [], "warm": []}
    for _ in range(args.repeat):  # interleave so drift on a noisy machine hits both
        for mode, runs in results.items():
            runs.append(run_case(mode, paths))
    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("s", "peak_mb")}
        for m, rs in results.items()
    }
    plain_y, sealed_y = results["plain"][0]["y"], results["edgeseal"][0]["y"]
    same = all(abs(a - b) < 1e-4 for a, b in zip(plain_y, sealed_y, strict=True))
    time_ratio = med["edgeseal"]["s"] / med["plain"]["s"]
    warm_ratio = med["warm"]["s"] / med["plain"]["s"]
    extra_rss = (med["edgeseal"]["peak_mb"] - med["plain"]["peak_mb"]) / size_mb
    report = {
        "model_mb": round(size_mb, 1),
        "repeat": args.repeat,
        "median": med,
        "time_ratio": time_ratio,
        "warm_time_ratio": warm_ratio,
        "extra_peak_rss_per_model_size": extra_rss,
        "same_output": same,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"ONNX model {size_mb:.0f} MB, median of {args.repeat} fresh processes each")
    print(f"{'':10}{'load+run s':>12}{'peak RSS MB':>14}")
    for m in ("plain", "edgeseal", "warm"):
        print(f"{m:10}{med[m]['s']:>12.3f}{med[m]['peak_mb']:>14.0f}")
    print(f"warm time ratio {warm_ratio:.2f}x (a running agent's later opens)")
    print(f"time ratio {time_ratio:.2f}x (goal <= 1.3x): {'PASS' if time_ratio <= 1.3 else 'MISS'}")
    print(
        f"extra peak RSS {extra_rss:.2f} x model size (goal <= 1.1x): "
        f"{'PASS' if extra_rss <= 1.1 else 'MISS'}"
    )
    print(f"same output: {same}")


if __name__ == "__main__":
    main()
