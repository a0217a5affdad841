"""What each key store adds to opening a bundle.

For the software key, a TPM 2.0 (swtpm) and a PKCS#11 token (SoftHSM2): the median time
of unwrapping the content key (HPKE with the store's ECDH) over many runs, beside the
median time to open a ~50 MB bundle (verify, unwrap, decrypt into locked memory, digest,
ONNX Runtime session) with that store. Goal: the store adds under 5% to the open.

    .venv/bin/python bench/bench_keystores.py [--mb 50] [--runs 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config
from edgeseal.core.encoding import utcnow
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import generate_private_key
from edgeseal.core.keystore import InMemoryKey, KeyStore
from edgeseal.core.reader import BundleFile, VerifyPolicy, unwrap_content_key
from edgeseal.hardware.pkcs11 import Pkcs11KeyStore
from edgeseal.hardware.simulators import SoftHsmToken, Swtpm
from edgeseal.hardware.tpm import TpmKeyStore
from edgeseal.packager.pack import pack_model
from edgeseal.packager.samples import make_onnx_weighted


def _median_s(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="esbench-"))
    tpm = Swtpm.in_tempdir().start()
    token = SoftHsmToken.create(label="bench")
    try:
        stores: dict[str, KeyStore] = {
            "software": InMemoryKey(generate_private_key()),
            "tpm (swtpm)": TpmKeyStore.create(tpm.tcti),
            "pkcs11 (SoftHSM2)": Pkcs11KeyStore.create(
                token.module, token.label, token.pin, key_label="bench"
            ),
        }
        ring = Keyring(tmp / "keys")
        ring.init_root()
        ring.new_signer("bench", roles=["pack"], model_patterns=["*"], days=1)
        for i, store in enumerate(stores.values()):
            ring.add_device(f"dev-{i}", store.public_key, target=None)
        model = tmp / "model.onnx"
        model.write_bytes(make_onnx_weighted(total_weight_bytes=args.mb * 1024 * 1024))
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
            validity=timedelta(days=1),
        )
        policy = VerifyPolicy(anchor=ring.anchor(), now=utcnow())
        with BundleFile.open(bundle) as bf:
            manifest = bf.verify(policy).manifest
        rows = []
        for name, store in stores.items():
            unwrap = _median_s(lambda s=store: unwrap_content_key(manifest, s), args.runs)

            def full_open(s: KeyStore = store) -> None:
                with open_bundle(bundle, key_store=s, policy=policy, config=Config()):
                    pass

            total = _median_s(full_open, args.opens)
            rows.append(
                {
                    "store": name,
                    "unwrap_ms": unwrap * 1e3,
                    "open_ms": total * 1e3,
                    "unwrap_share": unwrap / total,
                }
            )
    finally:
        tpm.remove()
        token.remove()
    if args.json:
        print(json.dumps({"model_mb": args.mb, "rows": rows}, indent=2))
        return
    print(
        f"bundle of a {args.mb} MB ONNX model; unwrap median of {args.runs}, "
        f"open median of {args.opens}"
    )
    print(f"{'store':<20}{'unwrap ms':>12}{'open ms':>12}{'share':>9}  goal < 5%")
    for r in rows:
        verdict = "PASS" if r["unwrap_share"] < 0.05 else "MISS"
        print(
            f"{r['store']:<20}{r['unwrap_ms']:>12.2f}{r['open_ms']:>12.1f}"
            f"{r['unwrap_share']:>8.1%}  {verdict}"
        )


if __name__ == "__main__":
    main()
