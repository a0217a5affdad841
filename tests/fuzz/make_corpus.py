"""Write the seed corpus of every fuzz target into tests/fuzz/corpus/<target>/.

    .venv/bin/python tests/fuzz/make_corpus.py          # rewrite the seeds

Seeds are small and valid (or one step from valid), so a fuzzer starts deep in each
parser. The sample bundle ``corpus/prelude/valid.esb`` is sealed anew with the fixed test
keys (targets.py); every other seed is derived from it, so after a rewrite the whole
corpus is consistent again. Regression cases (tests/fuzz/regressions/) are not touched.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import targets
from fuzz.targets import CORPUS, SEED_BUNDLE


def _http(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _ota_seeds() -> dict[str, bytes]:
    """Real control messages, fetch requests and chunk frames (mode byte first)."""
    from edgeseal.core.encoding import canonical_json
    from edgeseal.ota.messages import (
        chunk_digests,
        encode_chunk,
        fetch_request,
        make_message,
    )

    _, deployer, cert = targets._ota_world()
    digests, size, sha = chunk_digests(b"x" * 5000, 2048)
    bid = "ab" * 16
    offer = make_message(
        deployer, cert, action="install", seq=7, to=("device", "dev-a"), model="clf",
        version=2, bundle_id=bid, now=targets.OTA_NOW, size=size, sha256=sha,
        chunk_bytes=2048, chunks=digests, rollout="r1",
    )  # fmt: skip
    order = make_message(
        deployer, cert, action="fall-back", seq=8, to=("group", "lab"), model="clf",
        version=1, bundle_id=bid, now=targets.OTA_NOW, reason="operator",
    )  # fmt: skip
    payload = json.loads(offer)["envelope"]["payload"]
    import base64

    return {
        "offer.wire": b"\x00" + offer,
        "order.wire": b"\x00" + order,
        "offer.payload": b"\x01" + base64.b64decode(payload),
        "fetch.json": b"\x02" + fetch_request(bid, [0, 1, 2]),
        "chunk.frame": b"\x03" + encode_chunk(bid, 1, b"data"),
        "garbage.json": b"\x01" + canonical_json({"_type": "ota-message", "action": "x"}),
    }


def seeds() -> dict[str, dict[str, bytes]]:
    w = targets.world()
    h, m = w.header, w.verified.manifest
    bundle = w.bundle
    obj = json.loads(w.manifest)
    graph = m.section("graph")
    assert graph is not None
    first_chunk = w.payload[: m.chunk_size + 16]
    recipient = m.recipient_for(w.device.key_id)
    assert recipient is not None
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    json_body = json.dumps(
        {"inputs": {"input": {"dtype": "float32", "shape": [2, 8], "data": x.tolist()}}}
    ).encode()
    npz_body = _npz(input=x)
    from edgeseal.agent import api

    tensors = (
        b"".join(bytes(p) for p in api.encode_tensors({"input": x}))
        if hasattr(api, "encode_tensors")
        else b""
    )
    return {
        "prelude": {
            "valid.esb": bundle,
            "prelude-only.bin": bundle[: h.payload_offset],
            "header-only.bin": bundle[:32],
            "manifest-cut.bin": bundle[: h.manifest_offset + 40],
            "one-byte-short.bin": bundle[:-1],
        },
        "manifest": {
            "valid.json": w.manifest,
            "no-extra.json": json.dumps({k: v for k, v in obj.items() if k != "note"}).encode(),
            "one-section.json": json.dumps({**obj, "sections": obj["sections"][:1]}).encode(),
            "pretty.json": json.dumps(obj, indent=1).encode(),
        },
        "chunk": {
            # mode 0: cipher 0 (AES), index 0, plaintext size, chunk size, first sealed chunk
            "stream-first.bin": bytes([0, 0])
            + (0).to_bytes(4, "big")
            + graph.plaintext_size.to_bytes(4, "big")
            + m.chunk_size.to_bytes(2, "big")
            + first_chunk,
            "hpke-valid.bin": bytes([1]) + recipient.sealed_key,
            "section-graph.bin": bytes([2])
            + graph.plaintext_size.to_bytes(2, "big")
            + w.payload[: graph.sealed_size],
        },
        "api_body": {
            "npz.bin": bytes([0]) + npz_body,
            "tensors.bin": bytes([3]) + tensors,
            "json.bin": bytes([1]) + json_body,
            "json-int.bin": bytes([1])
            + b'{"inputs":{"input":{"dtype":"int8","shape":[1,8],"data":[[1,2,3,4,5,6,7,8]]}}}',
        },
        "api_request": {
            "models.http": _http("GET", "/v1/models"),
            "info.http": _http("GET", "/v1/models/clf"),
            "health.http": _http("GET", "/v1/health"),
            "metrics.http": _http("GET", "/metrics"),
            "status.http": _http("GET", "/v1/status"),
            "infer-npz.http": _http("POST", "/v1/models/clf/infer", npz_body),
            "infer-json.http": _http(
                "POST",
                "/v1/models/clf/infer",
                json_body,
                Content_Type="application/json",
                Accept="application/json",
            ),
            "keepalive-two.http": _http("GET", "/v1/health") + _http("GET", "/v1/models"),
        },
        "ota_message": _ota_seeds(),
    }


def main() -> None:
    SEED_BUNDLE.parent.mkdir(parents=True, exist_ok=True)
    targets.build_sample_bundle(SEED_BUNDLE)
    targets.world.cache_clear()
    for target, files in seeds().items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            if old != SEED_BUNDLE:
                old.unlink()
        for name, data in files.items():
            if not (target == "prelude" and name == SEED_BUNDLE.name):
                (d / name).write_bytes(data)
        for name, data in files.items():  # every seed runs cleanly, or the corpus is wrong
            print(f"{target}/{name}: {targets.run_one(target, data)}")


if __name__ == "__main__":
    main()
