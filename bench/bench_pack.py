"""Packing throughput: encrypt + sign, against the raw AEAD ceiling, in the same run.

    .venv/bin/python bench/bench_pack.py [--mb 200] [--json]

Reports MB/s of (a) the raw AEAD on 1 MiB chunks (the ceiling), (b) seal_bundle on
already-split sections (encrypt, chunk digests, section digest, sign, write), to tmpfs
(the CPU cost) and to the working disk (adds the write and fsync), and
(c) pack_model from the .onnx file (adds ONNX parsing and the graph/weights split).
Goal from the core issue: >= 300 MB/s on one core for (b).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from edgeseal.core.encoding import utcnow
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import generate_private_key
from edgeseal.core.writer import RecipientKey, seal_bundle
from edgeseal.packager.onnx_model import load_onnx, split_onnx
from edgeseal.packager.pack import pack_model
from edgeseal.packager.samples import make_onnx_weighted

MiB = 1024 * 1024


def _best(fn, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="esbench-pack-"))
    model = tmp / "model.onnx"
    model.write_bytes(make_onnx_weighted(total_weight_bytes=args.mb * MiB))
    size = model.stat().st_size
    chunk = os.urandom(MiB)
    n_chunks = size // MiB
    raw = {}
    for name, aead in (
        ("AES-256-GCM", AESGCM(os.urandom(32))),
        ("ChaCha20-Poly1305", ChaCha20Poly1305(os.urandom(32))),
    ):
        nonce = os.urandom(12)
        secs = _best(lambda a=aead, n=nonce: [a.encrypt(n, chunk, b"") for _ in range(n_chunks)])
        raw[name] = n_chunks * MiB / secs / 1e6

    ring = Keyring(tmp / "keys")
    ring.init_root()
    ring.new_signer("bench", roles=["pack"], model_patterns=["*"], days=1)
    dev = generate_private_key()
    ring.add_device("bench-dev", dev.public_key(), target=None)
    signer, cert = ring.load_signer("bench")
    split = split_onnx(load_onnx(model))
    now = utcnow()

    shm_root = Path("/dev/shm")
    shm = Path(tempfile.mkdtemp(prefix="esbench-", dir=shm_root)) if shm_root.is_dir() else tmp

    def seal(out: Path = shm / "s.esb") -> None:
        seal_bundle(
            out,
            sections={"graph": split.graph, "weights": split.weights},
            model_name="bench",
            version=1,
            model_format="onnx",
            inputs=split.inputs,
            outputs=split.outputs,
            signer=signer,
            certificate=cert,
            recipients=[RecipientKey("bench-dev", dev.public_key())],
            created=now,
            expires=now + timedelta(days=1),
        )

    def pack() -> None:
        pack_model(
            model,
            tmp / "p.esb",
            name="bench",
            version=1,
            signer=signer,
            certificate=cert,
            devices=ring.devices(),
            validity=timedelta(days=1),
        )

    sealed = size / _best(seal) / 1e6
    sealed_disk = size / _best(lambda: seal(tmp / "s.esb")) / 1e6
    if shm != tmp:
        shutil.rmtree(shm, ignore_errors=True)
    packed = size / _best(pack, runs=2) / 1e6
    report = {
        "model_mb": round(size / MiB, 1),
        "raw_aead_mb_s": raw,
        "seal_bundle_mb_s": sealed,
        "seal_bundle_to_disk_mb_s": sealed_disk,
        "pack_model_mb_s": packed,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"model {size / MiB:.0f} MiB (MB/s, best of runs, one thread)")
    for name, v in raw.items():
        print(f"  raw {name:<18} {v:8.0f}")
    print(
        f"  seal_bundle (to tmpfs)   {sealed:8.0f}  goal >= 300: "
        f"{'PASS' if sealed >= 300 else 'MISS'}"
    )
    print(f"  seal_bundle (to disk)    {sealed_disk:8.0f}  (adds the write and fsync)")
    print(f"  pack_model (from .onnx)  {packed:8.0f}")


if __name__ == "__main__":
    main()
