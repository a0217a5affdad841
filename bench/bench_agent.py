"""Guarded inference and the local API against plain ``session.run``, in the same run.

    python    plain ``InferenceSession.run`` on the model file, against
              ``ServingModel.infer`` (schema + profile checks, OOD score, finite outputs,
              counters) on the same model opened from its bundle
    socket    the same model through the agent's unix-socket API (``Client.infer``,
              .npz bodies, peer-credential ACL, audit log with fsync every call),
              latency added per call, and throughput with 4 concurrent clients

Goals from the agent issue: guarded overhead under 5% at p50 for a ~1 ms model; added
latency through the socket under 300 us at p50 for a 150 KB input.

    .venv/bin/python bench/bench_agent.py [--n 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgeseal.agent.api import ApiServer
from edgeseal.agent.audit import AuditLog
from edgeseal.agent.client import Client
from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import load_config
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import load_public_key
from edgeseal.hardware.floors import FileFloors
from edgeseal.packager.pack import PackOptions, pack_model

FEATURES = 38_400  # 150 KB of float32 per row
HIDDEN = 96
SMALL_FEATURES = 256


def model_bytes(features: int, hidden: int, layers: int) -> bytes:
    rng = np.random.default_rng(0)
    inits, nodes, prev, width = [], [], "input", features
    for i in range(layers):
        w = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
        ]
        prev, width = f"r{i}", hidden
    w = (rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "out"))
    nodes += [
        helper.make_node("MatMul", [prev, "out"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e6, q))


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(min(50, n)):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "m.onnx").write_bytes(model_bytes(FEATURES, HIDDEN, 1))
        (tmp / "small.onnx").write_bytes(model_bytes(SMALL_FEATURES, 1536, 2))
        rng = np.random.default_rng(1)
        calib = rng.standard_normal((64, FEATURES)).astype(np.float32)
        np.savez(tmp / "calib.npz", input=calib)
        np.savez(tmp / "small.npz", input=calib[:, :SMALL_FEATURES])
        ring = Keyring(tmp / "keys")
        ring.init_root()
        ring.new_signer("release", roles=["pack"], model_patterns=["*"], days=30)
        home = DeviceHome(tmp / "device")
        info = home.init(root_public_keys=[ring.root_pub_path.read_bytes()])
        key = load_public_key(info["public_key"].encode(), "device")
        ring.add_device("dev", key, target=None, key_store="software")
        sgn, cert = ring.load_signer("release")
        for stem, name, calib_file in (("m", "bench", "calib"), ("small", "small", "small")):
            pack_model(
                tmp / f"{stem}.onnx",
                tmp / f"{stem}.esb",
                name=name,
                version=1,
                signer=sgn,
                certificate=cert,
                devices=[ring.device("dev")],
                validity=timedelta(days=1),
                options=PackOptions(calibration=tmp / f"{calib_file}.npz"),
            )
        cfg = load_config(text="[runtime]\nintra_op_threads = 1\n")
        agent = Agent(home, cfg)
        agent.install(tmp / "m.esb")
        agent.install(tmp / "small.esb")
        x = calib[:1]
        xs = calib[:1, :SMALL_FEATURES]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        plain = ort.InferenceSession(
            str(tmp / "small.onnx"), so, providers=["CPUExecutionProvider"]
        )
        plain_big = ort.InferenceSession(
            str(tmp / "m.onnx"), so, providers=["CPUExecutionProvider"]
        )
        sm = agent.model("small")
        big = agent.model("bench")
        # interleave to share the machine's noise
        p_plain, p_guard = [], []
        for _ in range(5):
            p_plain += timed(lambda: plain.run(None, {"input": xs}), args.n // 5)
            p_guard += timed(lambda: sm.infer({"input": xs}), args.n // 5)
        p_big = timed(lambda: plain_big.run(None, {"input": x}), args.n // 2)
        p_big_guard = timed(lambda: big.infer({"input": x}), args.n // 2)
        audit = AuditLog(tmp / "audit.log", FileFloors(tmp / "audit-counter.json"))
        sock = tmp / "agent.sock"
        api = ApiServer(agent, sock, audit=audit)
        api.start()
        client = Client(str(sock))
        p_sock = timed(lambda: client.infer("bench", {"input": x}), args.n // 2)
        audit_batched = AuditLog(
            tmp / "audit2.log", FileFloors(tmp / "audit2-counter.json"), flush_every=100
        )
        api.audit = audit_batched
        p_sock_batched = timed(lambda: client.infer("bench", {"input": x}), args.n // 2)
        done = [0]
        stop = time.perf_counter() + 5.0

        def worker() -> None:
            with Client(str(sock)) as c:
                while time.perf_counter() < stop:
                    c.infer("bench", {"input": x})
                    done[0] += 1

        threads = [threading.Thread(target=worker) for _ in range(4)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rps = done[0] / (time.perf_counter() - t0)
        client.close()
        api.stop()
        agent.close()
        audit.close()
        audit_batched.close()
    res = {
        "input_bytes": int(x.nbytes),
        "plain_p50_us": pct(p_plain, 50),
        "guarded_p50_us": pct(p_guard, 50),
        "guarded_overhead_p50": pct(p_guard, 50) / pct(p_plain, 50) - 1,
        "socket_p50_us": pct(p_sock, 50),
        "big_plain_p50_us": pct(p_big, 50),
        "big_guarded_p50_us": pct(p_big_guard, 50),
        "socket_added_p50_us": pct(p_sock, 50) - pct(p_big_guard, 50),
        "socket_batched_audit_p50_us": pct(p_sock_batched, 50),
        "socket_batched_added_p50_us": pct(p_sock_batched, 50) - pct(p_big_guard, 50),
        "socket_p99_us": pct(p_sock, 99),
        "throughput_4_clients_rps": rps,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"python API: {SMALL_FEATURES}->1536->1536->10 MLP, 1 row, 1 thread")
    print(f"  plain session.run p50          {res['plain_p50_us']:8.1f} us")
    print(
        f"  guarded ServingModel.infer p50 {res['guarded_p50_us']:8.1f} us "
        f"(+{res['guarded_overhead_p50']:.1%}, goal < 5%)"
    )
    print(f"socket API: {FEATURES}->{HIDDEN}->10 MLP, input {x.nbytes:,} bytes, 1 thread")
    print(f"  plain session.run p50          {res['big_plain_p50_us']:8.1f} us")
    print(f"  guarded ServingModel.infer p50 {res['big_guarded_p50_us']:8.1f} us")
    print(
        f"  unix socket, audit fsync/call  {res['socket_p50_us']:8.1f} us "
        f"(+{res['socket_added_p50_us']:.0f} us over guarded)"
    )
    print(
        f"  unix socket, audit every 100   {res['socket_batched_audit_p50_us']:8.1f} us "
        f"(+{res['socket_batched_added_p50_us']:.0f} us, goal < 300 us)"
    )
    print(f"  4 concurrent clients           {rps:8.0f} requests/s")


if __name__ == "__main__":
    main()
