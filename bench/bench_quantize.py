"""Quantize + evaluate + seal against ONNX Runtime's quantize_dynamic alone, same run.

    .venv/bin/python bench/bench_quantize.py [--mb 50]

Goal from the packager issue: the whole edgeseal pack (dynamic int8, accuracy report,
golden vectors, seal) in under 2x the time of quantize_dynamic on the same model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import generate_private_key
from edgeseal.packager.pack import PackOptions, pack_model
from edgeseal.packager.quantize import QuantizeMode
from edgeseal.packager.samples import make_onnx_weighted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="esbench-q-"))
    model = tmp / "model.onnx"
    model.write_bytes(make_onnx_weighted(total_weight_bytes=args.mb * 1024 * 1024))
    ring = Keyring(tmp / "keys")
    ring.init_root()
    ring.new_signer("bench", roles=["pack"], model_patterns=["*"], days=1)
    ring.add_device("bench-dev", generate_private_key().public_key(), target=None)
    signer, cert = ring.load_signer("bench")

    t0 = time.perf_counter()
    quantize_dynamic(
        str(model), str(tmp / "plain-q.onnx"), weight_type=QuantType.QInt8, per_channel=True
    )
    plain = time.perf_counter() - t0

    stages: dict[str, float] = {}
    last = [time.perf_counter(), ""]

    def stage(name: str) -> None:
        now = time.perf_counter()
        if last[1]:
            stages[str(last[1])] = now - float(last[0])
        last[0], last[1] = now, name

    t0 = time.perf_counter()
    result = pack_model(
        model,
        tmp / "m.esb",
        name="bench",
        version=1,
        signer=signer,
        certificate=cert,
        devices=ring.devices(),
        validity=timedelta(days=1),
        options=PackOptions(quantize=QuantizeMode.DYNAMIC_INT8),
        stage=stage,
    )
    total = time.perf_counter() - t0
    stage("end")
    ratio = total / plain
    report = {
        "model_mb": args.mb,
        "quantize_dynamic_s": plain,
        "edgeseal_pack_s": total,
        "ratio": ratio,
        "stages_s": stages,
        "size_after_mb": result.report.size_after / 2**20 if result.report else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.mb} MB float ONNX model, dynamic int8")
    print(f"  quantize_dynamic alone     {plain:7.2f} s")
    print(
        f"  edgeseal pack (all stages) {total:7.2f} s  = {ratio:.2f}x (goal < 2x): "
        f"{'PASS' if ratio < 2 else 'MISS'}"
    )
    for name, secs in stages.items():
        print(f"    {name:<10} {secs:6.2f} s")


if __name__ == "__main__":
    main()
