"""Fleet scale: N simulated devices (real agent and update channel, each with its own key,
TLS identity, store and slots) receive, verify and commit one bundle through one local
Mosquitto, with a one-wave rollout (one group offer) driven by the real controller.

Reports time to 50/90/100% committed (from the offer), messages/s through the broker,
and the broker's, the controller's and the simulator processes' CPU time and peak memory
(from /proc). Usage: python bench/bench_fleet.py --devices 1000 --mb 5 [--processes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) and peak RSS (VmHWM, MB) of a process."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    children = (int(fields[13]) + int(fields[14])) / ticks  # waited-for children (pre-flight)
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return {
        "cpu_s": round(cpu, 1),
        "children_cpu_s": round(children, 1),
        "peak_rss_mb": round(hwm, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--mb", type=float, default=5.0)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--chunk-kb", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--chunk-timeout", type=float, default=5.0)
    ap.add_argument("--pool-threads", type=int, default=4, help="update-step threads per process")
    ap.add_argument("--publishers", type=int, default=2, help="controller data connections")
    ap.add_argument(
        "--preflight",
        choices=("each", "once"),
        default="each",
        help="each: every device runs the pre-flight child (as real devices do); once: a "
        "simulator process runs it once for the bundle and reuses the verdict",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--tmp",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="Where the device homes live (default: tmpfs; each real device has its own "
        "flash, a shared VM disk would serialize a thousand devices' fsyncs).",
    )
    args = ap.parse_args()

    from edgeseal.core.encoding import utcnow
    from edgeseal.core.keyring import Keyring
    from edgeseal.ota.broker import BrokerSetup
    from edgeseal.ota.controller import Controller
    from edgeseal.ota.enroll import FleetCA
    from edgeseal.ota.mqtt import MqttConnection
    from edgeseal.ota.rollout import Policy
    from edgeseal.ota.rollout_store import open_store
    from edgeseal.ota.simulate import FleetSpec, SimFleet, provision_fleet
    from edgeseal.ota.topics import Topics
    from edgeseal.packager.pack import pack_model
    from edgeseal.packager.samples import make_onnx_weighted

    tmp = Path(tempfile.mkdtemp(prefix="esbench-fleet-", dir=args.tmp))
    t0 = time.monotonic()
    ring = Keyring(tmp / "keys")
    ring.init_root()
    ring.new_signer("release", roles=["pack"], model_patterns=["*"], days=2)
    ring.new_signer("deployer", roles=["deploy"], model_patterns=["*"], days=2)
    ca = FleetCA.init(tmp / "fleet-ca")
    ids = provision_fleet(tmp / "fleet", args.devices, ring=ring, ca=ca, prefix="b")
    setup = BrokerSetup.write(tmp / "broker", ca, groups={"bench": ids}, topics=Topics())
    model = tmp / "model.onnx"
    model.write_bytes(make_onnx_weighted(total_weight_bytes=int(args.mb * 2**20), width=256))
    bundle = tmp / "model.esb"
    signer, cert = ring.load_signer("release")
    pack_model(model, bundle, name="bench", version=1, signer=signer, certificate=cert,
               devices=ring.devices(), now=utcnow(), validity=timedelta(days=1))  # fmt: skip
    prep = time.monotonic() - t0

    broker = setup.mosquitto().start()
    spec = FleetSpec(
        root=str(tmp / "fleet"), broker=broker.url, ca_file=str(setup.ca_file),
        devices=tuple(ids), groups=("bench",), keep_serving=False, chunk_timeout=args.chunk_timeout,
        keepalive=60, window=4, pool_threads=args.pool_threads, preflight=args.preflight,
    )  # fmt: skip
    t1 = time.monotonic()
    fleet = SimFleet(spec, processes=args.processes).start(wait=900)
    online = time.monotonic() - t1

    dsigner, dcert = ring.load_signer("deployer")

    def connect(**kw: object) -> MqttConnection:
        return MqttConnection(
            broker.url, client_id=f"ctl-{uuid.uuid4().hex[:6]}", ca_file=str(setup.ca_file),
            cert_file=str(setup.controller_cert), key_file=str(setup.controller_key),
            clean=True, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    store = open_store(tmp / "rollouts.sqlite")
    ctl = Controller(store, connect, signer=dsigner, certificate=dcert, anchor=ring.anchor(),
                     data_connections=args.publishers)  # fmt: skip
    ctl.start()
    r = ctl.create(bundle, group="bench", members=ids, policy=Policy(waves=(1.0,),
                   wave_timeout=args.timeout), signer_name="deployer",
                   chunk_bytes=args.chunk_kb * 1024)  # fmt: skip
    broker_pid = broker._proc.pid if broker._proc else 0
    before = {"broker": proc_stats(broker_pid), "controller": proc_stats(os.getpid())}
    before_sim = [proc_stats(p) for p in fleet.pids]
    marks: dict[str, float] = {}
    start = time.monotonic()
    done = threading.Event()

    peak_load = [0.0]

    def watch(rec: object) -> None:
        peak_load[0] = max(peak_load[0], os.getloadavg()[0])
        n = sum(1 for p in store.phases(r.id).values() if p.phase == "committed")
        for pct in (50, 90, 100):
            if f"{pct}%" not in marks and n * 100 >= pct * len(ids):
                marks[f"{pct}%"] = round(time.monotonic() - start, 1)

    final = ctl.run(r.id, poll=1.0, on_step=watch)
    total = time.monotonic() - start
    done.set()
    after = {"broker": proc_stats(broker_pid), "controller": proc_stats(os.getpid())}
    after_sim = [proc_stats(p) for p in fleet.pids]
    phases: dict[str, int] = {}
    for p in store.phases(r.id).values():
        phases[p.phase] = phases.get(p.phase, 0) + 1
    bytes_out = ctl.server.bytes_sent
    msgs = ctl.messages_in + ctl.messages_out + ctl.server.chunks_sent
    report = {
        "devices": len(ids),
        "bundle_mb": round(bundle.stat().st_size / 2**20, 2),
        "chunk_kb": args.chunk_kb,
        "processes": args.processes,
        "pool_threads": args.pool_threads,
        "publishers": args.publishers,
        "preflight": args.preflight,
        "cpus": os.cpu_count(),
        "state": final.state,
        "reason": final.reason,
        "phases": phases,
        "time_to": marks,
        "rollout_s": round(total, 1),
        "prepare_s": round(prep, 1),
        "online_s": round(online, 1),
        "controller_messages": msgs,
        "controller_messages_per_s": round(msgs / total, 1),
        "data_mb_sent": round(bytes_out / 2**20, 1),
        "data_mb_per_s": round(bytes_out / 2**20 / total, 1),
        "broker_cpu_s": round(after["broker"]["cpu_s"] - before["broker"]["cpu_s"], 1),
        "broker_peak_rss_mb": after["broker"]["peak_rss_mb"],
        "controller_cpu_s": round(after["controller"]["cpu_s"] - before["controller"]["cpu_s"], 1),
        "controller_peak_rss_mb": after["controller"]["peak_rss_mb"],
        "simulator_cpu_s": round(
            sum(a["cpu_s"] - b["cpu_s"] for a, b in zip(after_sim, before_sim, strict=False)), 1
        ),
        "simulator_children_cpu_s": round(
            sum(
                a["children_cpu_s"] - b["children_cpu_s"]
                for a, b in zip(after_sim, before_sim, strict=False)
            ),
            1,
        ),
        "peak_load_average_1m": round(peak_load[0], 1),
        "simulator_peak_rss_mb_per_process": [s["peak_rss_mb"] for s in after_sim],
    }
    ctl.stop()
    fleet.stop()
    broker.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k:36} {v}")


if __name__ == "__main__":
    main()
