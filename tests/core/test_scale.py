"""Scale: a bundle for 10,000 devices."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from edgeseal.core.keys import generate_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.reader import BundleFile, unwrap_content_key
from edgeseal.core.writer import RecipientKey, seal_bundle
from helpers import NOW


@pytest.mark.slow
def test_ten_thousand_recipients_each_open_their_key(fleet):
    keys = [InMemoryKey(generate_private_key()) for _ in range(10_000)]
    signer, cert = fleet.ring.load_signer("release")
    out = fleet.tmp / "fleet.esb"
    t0 = time.perf_counter()
    seal_bundle(
        out,
        sections={"graph": b"g" * 1000},
        model_name="fleet-model",
        version=1,
        model_format="onnx",
        inputs=(),
        outputs=(),
        signer=signer,
        certificate=cert,
        recipients=[RecipientKey(f"dev-{i:05d}", k.public_key) for i, k in enumerate(keys)],
        created=NOW,
        expires=NOW + timedelta(days=1),
    )
    seal_s = time.perf_counter() - t0
    size = out.stat().st_size
    assert size < 10_000 * 320  # about 270 bytes a recipient
    for dev in (keys[0], keys[-1]):
        t0 = time.perf_counter()
        with BundleFile.open(out) as bf:
            vb = bf.verify(fleet.policy())
            assert (
                bytes(bf.read_section(vb, "graph", unwrap_content_key(vb.manifest, dev)))
                == b"g" * 1000
            )
        open_s = time.perf_counter() - t0
    print(
        f"\n10,000 recipients: {size:,} bytes, sealed in {seal_s:.2f} s, opened in {open_s:.3f} s"
    )
