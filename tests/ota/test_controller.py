"""The fleet side: rollout rules (pure), the rollout store (SQLite and PostgreSQL), and the
controller driving simulated devices (real agent and channel) through a real Mosquitto."""

from __future__ import annotations

import functools
import itertools
import json
import operator
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import load_config
from edgeseal.ota.controller import Controller, RolloutError, rollout_report
from edgeseal.ota.mqtt import MqttConnection
from edgeseal.ota.registry import GroupRegistry
from edgeseal.ota.rollout import (
    Policy,
    Success,
    device_phase,
    judge_wave,
    parse_duration,
    parse_rate,
    parse_waves,
    plan_waves,
    wave_sizes,
)
from edgeseal.ota.rollout_store import RolloutRecord, SqliteStore, open_store
from edgeseal.ota.simulate import FleetSpec, SimFleet, provision_fleet
from edgeseal.packager.samples import synthetic_blobs
from helpers import NOW
from ota_world import Workstation, wait_for

# --- pure rules ------------------------------------------------------------------------


def test_waves_become_cumulative_counts_with_at_least_one_device_each():
    waves = parse_waves("1%,10%,50%,100%")
    assert waves == (0.01, 0.1, 0.5, 1.0)
    assert wave_sizes(waves, 1000) == (10, 100, 500, 1000)
    assert wave_sizes(waves, 3) == (1, 2, 3)
    assert wave_sizes(waves, 1) == (1,)
    assert wave_sizes(waves, 0) == ()
    assert wave_sizes(parse_waves("50%"), 5) == (3,)  # a partial rollout stops there
    for bad in ("", "10%,5%", "0%", "120%", "x"):
        with pytest.raises(ValueError):
            parse_waves(bad)


def test_plans_are_stable_per_rollout_and_differ_between_rollouts():
    devices = [f"d{i}" for i in range(100)]
    a = plan_waves("r1", devices, parse_waves("1%,10%,100%"))
    assert [len(w) for w in a] == [1, 9, 90]
    assert a == plan_waves("r1", reversed(devices), parse_waves("1%,10%,100%"))
    assert sorted(functools.reduce(operator.iadd, a, [])) == sorted(devices)
    assert (
        a[0] != plan_waves("r2", devices, parse_waves("1%,10%,100%"))[0]
        or a[1] != (plan_waves("r2", devices, parse_waves("1%,10%,100%"))[1])
    )


def test_rates_durations_and_success_parse():
    assert parse_rate("2%") == 0.02 and parse_rate("0.5") == 0.5
    assert parse_duration("90") == 90 and parse_duration("15m") == 900
    assert parse_duration("500ms") == 0.5
    with pytest.raises(ValueError):
        parse_rate("150%")
    assert Success.parse("5").required(3, 0.0) == 3  # capped at the wave's size
    assert Success.parse("90%").required(10, 0.0) == 9
    assert Success.parse(None).required(100, 0.02) == 98  # all but the failure budget
    assert Success.parse(None).required(10, 0.02) == 10
    p = Policy(parse_waves("10%,100%"), 0.02, Success.parse("3"), 60, 0.2, True, 5)
    assert Policy.from_obj(json.loads(json.dumps(p.to_obj()))) == p


POLICY = Policy(waves=(0.5, 1.0), max_failure_rate=0.25, wave_timeout=100)


def _judge(phases, policy=POLICY, *, now=10.0, last=False, ood=None):
    return judge_wave(phases, policy, opened_at=0.0, now=now, last=last, ood_rates=ood)


def test_the_wave_gate_follows_r1_to_r6():
    four = ["a", "b", "c", "d"]
    # R6: in progress, nothing decided
    assert _judge(dict.fromkeys(four, "downloading")).action == "wait"
    # R3: 3 of 4 committed is all the budget (25%) requires -> pass, or done when last
    ok = {"a": "committed", "b": "committed", "c": "committed", "d": "testing"}
    assert _judge(ok).action == "pass" and _judge(ok, last=True).action == "done"
    # R1: 2 of 4 failed is 50% > 25% -> halt at once, even with others in progress
    bad = {"a": "fallen-back", "b": "failed", "c": "testing", "d": "offered"}
    v = _judge(bad)
    assert v.action == "halt" and v.reason.startswith("R1")
    # R4: done moving, too few committed
    stuck = {"a": "committed", "b": "committed", "c": "refused", "d": "committed"}
    strict = Policy(waves=(1.0,), max_failure_rate=0.3, min_success=Success.parse("100%"))
    assert _judge(stuck, strict).reason.startswith("R4")
    # R5: the timeout turns silent devices into failures, and halts
    late = {"a": "committed", "b": "committed", "c": "offered", "d": "offered"}
    assert _judge(late).action == "wait"
    v = _judge(late, now=100.0)
    assert v.action == "halt" and v.timed_out == ("c", "d") and v.reason.startswith("R5")


def test_ood_rate_on_the_new_version_halts_and_soak_holds_the_wave_open():
    policy = Policy(waves=(1.0,), max_ood_rate=0.2, soak=30)
    done = {"a": "committed", "b": "committed"}
    assert _judge(done, policy, now=5).action == "wait"  # soaking
    assert _judge(done, policy, now=31, last=True, ood={"a": 0.1, "b": 0.2}).action == "done"
    v = _judge(done, policy, now=5, ood={"a": 0.1, "b": 0.9})
    assert v.action == "halt" and v.reason.startswith("R2")


def test_device_phase_reads_only_what_belongs_to_the_rollout():
    def st(**kw):
        return {"state": "idle", "rollout": "r", "offered": 2, "active": 1, **kw}

    assert device_phase(None, rollout="r", version=2) is None
    assert device_phase(st(state="testing"), rollout="r", version=2) == ("testing", "")
    assert device_phase(st(state="testing", rollout="old"), rollout="r", version=2) is None
    assert device_phase(st(state="committed", active=2), rollout="r", version=2)[0] == "committed"
    # already running v2 from before: committed without a transition
    assert device_phase(st(rollout="x", active=2), rollout="r", version=2)[0] == "committed"
    fb = device_phase(st(state="fallen-back", reason="health: golden"), rollout="r", version=2)
    assert fb == ("fallen-back", "health: golden")


# --- the store -------------------------------------------------------------------------


def _record(rid="r1", created=1.0):
    return RolloutRecord(
        id=rid, created=created, model="clf", version=2, bundle_id="ab" * 16,
        bundle_path="/b.esb", target="lab", signer="deployer",
        policy=Policy(waves=(0.5, 1.0)), chunk_bytes=4096,
    )  # fmt: skip


def _exercise_store(open_it):
    st = open_it()
    st.create_rollout(_record(), [["a"], ["b", "c"]])
    assert st.rollout("r1").state == "running" and st.rollout("nope") is None
    assert [w.devices for w in st.waves("r1")] == [("a",), ("b", "c")]
    st.open_wave("r1", 0, 5.0)
    st.mark_offered("r1", ["a"], 5.0)
    st.set_phases("r1", {"a": ("committed", "", 0.1)}, 6.0)
    assert st.close_wave("r1", 0, "pass: R3", 7.0)
    assert not st.close_wave("r1", 0, "halt: R5", 7.5)  # closed once: the second one loses
    st.update_rollout("r1", now=8.0, state="halted", reason="why")
    st.record_statuses({"a": (9.0, {"models": {}})})
    st.record_statuses({"a": (8.5, {"models": {"late": {}}})})  # seen earlier: kept out
    assert st.statuses(["a", "z"]) == {"a": {"models": {}}}
    assert st.statuses_seen(["a"]) == {"a": (9.0, {"models": {}})}
    # the lease to drive r1: one holder at a time; taken over when it lapses, or by force
    assert st.claim_rollout("r1", "ctl-a", now=10.0, ttl=30)
    assert not st.claim_rollout("r1", "ctl-b", now=20.0, ttl=30)
    assert st.claim_rollout("r1", "ctl-a", now=30.0, ttl=30)  # renewed to 60
    assert not st.claim_rollout("r1", "ctl-b", now=59.0, ttl=30)
    assert st.claim_rollout("r1", "ctl-b", now=61.0, ttl=30)
    assert st.claim_rollout("r1", "ctl-a", now=62.0, ttl=30, force=True)
    first = [st.next_seq("key", floor=100) for _ in range(3)]
    assert first == [100, 101, 102]
    st.close()
    st = open_it()  # what a restarted controller sees
    r = st.rollout("r1")
    assert (r.state, r.reason, r.wave) == ("halted", "why", 0)
    assert st.phases("r1")["a"].phase == "committed" and st.phases("r1")["a"].ood_rate == 0.1
    assert st.waves("r1")[0].verdict == "pass: R3" and st.waves("r1")[1].opened_at is None
    assert not st.claim_rollout("r1", "ctl-b", now=63.0, ttl=30)  # the lease is kept
    assert st.devices()[0].device == "a"
    assert st.next_seq("key", floor=50) == 103  # never reused, even below the floor
    assert st.next_seq("key", floor=10_000) == 10_000
    assert st.next_seq("other") == 0
    st.reopen_wave("r1", 1, 20.0)
    assert st.waves("r1")[1].opened_at == 20.0
    st.close()


def test_sqlite_store_keeps_rollouts_and_sequences_across_reopening(tmp_path):
    _exercise_store(lambda: SqliteStore(tmp_path / "fleet" / "rollouts.sqlite"))
    assert (tmp_path / "fleet" / "rollouts.sqlite").exists()


def test_sqlite_sequence_numbers_are_unique_across_threads(tmp_path):
    st = SqliteStore(tmp_path / "r.sqlite")
    got: list[int] = []

    def take():
        for _ in range(50):
            got.append(st.next_seq("k"))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(200))


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A throwaway PostgreSQL cluster (Debian's postgresql), on a unix socket."""
    try:
        import psycopg
    except ImportError:
        psycopg = None
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not binaries or psycopg is None:
        if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
            pytest.fail("postgresql or psycopg is not installed but CI requires this lane")
        pytest.skip("postgresql or psycopg is not installed")
    bin_dir = binaries[-1].parent
    # Not under pytest's 0700 tree: the server runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="edgeseal-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "postgres"], check=True, capture_output=True)  # fmt: skip
    opts = f"-k {sock} -p 55433 -c listen_addresses="
    start = [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
             str(root / "log"), "-w", "start"]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@/postgres?host={sock}&port=55433"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "stop"], check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_store_behaves_like_sqlite(postgres_url):
    _empty_postgres(postgres_url)
    _exercise_store(lambda: open_store(postgres_url))


# --- the controller against simulated devices and a real broker ------------------------

DEVICES = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory, ota_pki):
    root = tmp_path_factory.mktemp("fleet-ws")
    ws = Workstation.make(root, [])
    ids = provision_fleet(root / "pristine", DEVICES, ring=ws.ring, ca=ota_pki.ca)
    GroupRegistry.in_keyring(ws.ring.path).add("sim", ids)
    ws.make_models()
    ws.pack("v1", 1, "m1")
    ws.pack("v2", 2, "m2")
    ws.pack("v3-bad", 3, "m1", bad_golden=True)
    ws.ids = ids
    return ws


@pytest.fixture
def fleet(world, broker, ota_pki, tmp_path):
    started: list[SimFleet] = []

    def start(*, faults=None, offline=(), on=broker, preinstall=None, **spec):
        root = tmp_path / f"fleet{len(started)}"
        shutil.copytree(world.root / "pristine", root)
        fs = FleetSpec(
            root=str(root), broker=on.url, ca_file=str(ota_pki.ca_file),
            devices=tuple(world.ids), faults=faults or {}, chunk_timeout=2.0,
            keepalive=5, **spec,
        )  # fmt: skip
        if preinstall:
            for dev in world.ids:
                agent = Agent(DeviceHome(fs.home(dev)), load_config(text=fs.config_text(dev)))
                agent.install(world.bundles[preinstall])
                agent.close()
        f = SimFleet(fs)
        started.append(f)
        return f.start(offline=offline)

    yield start
    for f in started:
        f.stop()


def _controller(world, ota_pki, broker, store_path, *, share=None, signer_name="deployer"):
    ctl_id = ota_pki["edgeseal-controller"]
    signer, cert = world.ring.load_signer(signer_name)

    def connect(**kw):
        return MqttConnection(
            broker.url, client_id=f"ctl-{uuid.uuid4().hex[:8]}", ca_file=str(ota_pki.ca_file),
            cert_file=str(ctl_id.cert), key_file=str(ctl_id.key), clean=True, **kw,
        )  # fmt: skip

    ctl = Controller(
        open_store(store_path), connect, signer=signer, certificate=cert,
        anchor=world.ring.anchor(), share=share,
    )  # fmt: skip
    ctl.start()
    return ctl


@pytest.fixture
def controller(world, ota_pki, broker, tmp_path):
    made = []

    def make(on=broker, store=None, **kw):
        c = _controller(world, ota_pki, on, store or tmp_path / "rollouts.sqlite", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        # Retained offers would reach the next test's fresh devices: withdraw them.
        for dev in world.ids:
            c.conn.publish(c.topics.device(dev, "control"), b"", retain=True)
        c.conn.publish(c.topics.group("sim"), b"", retain=True)
        time.sleep(0.2)
        c.stop()


def _deploy(ctl, world, key, policy, rollout_id=None, **kw):
    return ctl.create(
        world.bundles[key], group="sim", members=world.ids, policy=policy,
        signer_name="deployer", chunk_bytes=16 * 1024, rollout_id=rollout_id, **kw,
    )  # fmt: skip


def _active(fleet, dev):
    return fleet.devices[dev].model_status("clf").get("active")


@pytest.mark.mqtt
def test_waves_go_out_one_after_another_and_the_rollout_completes(world, fleet, controller):
    """Timeline: wave 1 (2 devices) offered -> both commit -> wave 2 (1) -> wave 3 (3) ->
    done; every device runs v1 and each wave opened only after the one before passed."""
    f = fleet()
    ctl = controller()
    r = _deploy(ctl, world, "v1", Policy(parse_waves("20%,50%,100%"), wave_timeout=60))
    final = ctl.run(r.id, poll=0.1)
    assert final.state == "done", final.reason
    waves = ctl.store.waves(r.id)
    assert [len(w.devices) for w in waves] == [2, 1, 3]
    for before, after in itertools.pairwise(waves):
        assert before.closed_at <= after.opened_at
    assert all(_active(f, d) == 1 for d in world.ids)
    report = rollout_report(ctl.store, r.id)
    assert report["committed"] == DEVICES and report["failed"] == 0


@pytest.mark.mqtt
def test_a_group_with_devices_that_cannot_decrypt_the_bundle_is_refused(world, controller):
    """A bundle sealed to two of the group's devices: the rest could never decrypt it,
    so the rollout is refused before anything is stored or offered, naming them."""
    ctl = controller()
    few = world.pack("v2-few", 2, "m2", to=world.ids[:2])
    with pytest.raises(RolloutError) as e:
        ctl.create(
            few, group="sim", members=world.ids, policy=Policy(parse_waves("100%")),
            signer_name="deployer",
        )  # fmt: skip
    assert f"{len(world.ids) - 2} of group 'sim' cannot decrypt" in str(e.value)
    assert all(d in str(e.value) for d in world.ids[2:])
    assert ctl.store.rollouts() == [] and ctl.messages_out == 0


@pytest.mark.mqtt
def test_a_bad_bundle_halts_on_the_canary_and_nobody_else_gets_it(world, fleet, controller):
    """v3 fails its golden check on the canary, which falls back to v1 by itself; the
    failure budget (0) is crossed, the rollout halts and wave 2 is never offered."""
    f = fleet(preinstall="v1")
    ctl = controller()
    r = _deploy(ctl, world, "v3-bad", Policy(parse_waves("1%,100%"), wave_timeout=60))
    final = ctl.run(r.id, poll=0.1)
    assert final.state == "halted" and final.reason.startswith("R1"), final.reason
    canary, rest = (w.devices for w in ctl.store.waves(r.id))
    assert len(canary) == 1
    phase = ctl.store.phases(r.id)[canary[0]]
    assert phase.phase == "fallen-back" and "golden" in phase.reason
    time.sleep(0.5)
    for dev in rest:
        st = f.devices[dev].model_status("clf")
        assert st["active"] == 1 and st["state"] == "idle"
    assert _active(f, canary[0]) == 1


@pytest.mark.mqtt
def test_an_ood_rise_halts_the_soaking_wave_and_auto_fallback_orders_it_back(
    world, fleet, controller
):
    """v2 commits on the 2 canaries; during the soak their traffic is out of distribution;
    the OOD rate they report crosses 20%: halt (R2), and both are ordered back to v1."""
    f = fleet(preinstall="v1", report_interval=0.3)
    ctl = controller()
    policy = Policy(
        parse_waves("34%,100%"), wave_timeout=60, max_ood_rate=0.2, auto_fallback=True, soak=60
    )
    r = _deploy(ctl, world, "v2", policy)
    canaries = ctl.store.waves(r.id)[0].devices
    odd = synthetic_blobs(seed=99).x_test[:8].astype(np.float32)
    done = threading.Event()
    runner = threading.Thread(target=lambda: (ctl.run(r.id, poll=0.1), done.set()))
    runner.start()
    try:
        wait_for(lambda: all(_active(f, d) == 2 for d in canaries), what="canaries on v2")
        for d in canaries:
            f.devices[d].agent.infer("clf", {"input": odd})
        assert done.wait(30), "no halt"
    finally:
        runner.join(30)
    r = ctl.store.rollout(r.id)
    assert r.state == "halted" and r.reason.startswith("R2"), r.reason
    wait_for(
        lambda: all(_active(f, d) == 1 for d in canaries),
        what="ordered back to v1",
        detail=lambda: {d: f.devices[d].model_status("clf") for d in canaries},
    )
    assert all(ctl.store.phases(r.id)[d].phase == "fallen-back" for d in canaries)


@pytest.mark.mqtt
def test_offline_devices_get_their_offer_when_they_come_back(world, fleet, controller):
    """One device is off when its wave opens. With room for a straggler the rollout is
    done without it, and the retained offer installs when it comes back; with none the
    wave times out (R5), and ``resume`` after the device is back finishes the job."""
    off = world.ids[-1]
    f = fleet(offline=[off])
    ctl = controller()
    lenient = Policy(parse_waves("100%"), min_success=Success.parse("5"), wave_timeout=60)
    r = _deploy(ctl, world, "v1", lenient, group_offer=False)
    assert ctl.run(r.id, poll=0.1).state == "done"
    f.bring_online(off)
    wait_for(lambda: _active(f, off) == 1, what="the late device installs")

    f.take_offline(off)
    strict = Policy(parse_waves("100%"), wave_timeout=3)
    r = _deploy(ctl, world, "v2", strict, group_offer=False)
    final = ctl.run(r.id, poll=0.1)
    assert final.state == "halted" and final.reason.startswith("R5"), final.reason
    assert ctl.store.phases(r.id)[off].phase == "timed-out"
    f.bring_online(off)
    ctl.resume(r.id, policy=Policy(parse_waves("100%"), wave_timeout=60))
    final = ctl.run(r.id, poll=0.1)
    assert final.state == "done", (final.reason, ctl.store.phases(r.id))
    assert all(_active(f, d) == 2 for d in world.ids)


def _say(ctl, device, **model_status):
    """A device's status arriving at the controller (what its status topic carries)."""
    status = {"models": {"clf": model_status}}
    ctl._on_message(ctl.topics.device(device, "status"), json.dumps(status).encode())


def _offered(ctl, r):
    """Step until the broker has acknowledged every offer of the open wave."""
    wait_for(
        lambda: ctl.step(r.id) and all(p.offered_at for p in ctl.store.phases(r.id).values()),
        what="offers acknowledged",
    )


@pytest.mark.mqtt
def test_a_failure_said_before_a_resumed_offer_does_not_halt_it_again(
    world, controller, fresh_broker
):
    """Timeline: the wave times out (R5) with no device answering; while it is halted one
    device reports it failed the old offer; ``resume`` offers again. That earlier failure
    must not halt the resumed wave (R1) before the device has tried the new offer; a
    failure it reports after the new offer does."""
    # A broker of its own: the offers must not wait in the fleet's sessions for later tests.
    ctl = controller(on=fresh_broker)
    strict = Policy(parse_waves("100%"), wave_timeout=1)
    r = _deploy(ctl, world, "v3-bad", strict, group_offer=False)
    _offered(ctl, r)
    final = ctl.run(r.id, poll=0.1)
    assert final.state == "halted" and final.reason.startswith("R5"), final.reason
    late = world.ids[0]
    failed = {"state": "failed", "reason": "health", "rollout": r.id, "offered": 3, "active": 1}
    _say(ctl, late, **failed)
    ctl.resume(r.id, policy=Policy(parse_waves("100%"), wave_timeout=60))
    _offered(ctl, r)
    again = ctl.step(r.id)
    assert again.state == "running", again.reason
    assert ctl.store.phases(r.id)[late].phase == "offered"
    _say(ctl, late, **failed)  # now after the new offer: it counts
    again = ctl.step(r.id)
    assert again.state == "halted" and again.reason.startswith("R1"), again.reason


@pytest.mark.mqtt
def test_a_halt_with_auto_fallback_orders_back_the_devices_still_updating_too(
    world, controller, fresh_broker
):
    """Timeline: one device committed v2, one is still downloading it, the rest were
    offered and said nothing; the operator halts. Both the committed and the downloading
    device are ordered back (the downloading one would else commit v2 after the halt),
    and so are the silent ones, which may have started; those keep their phase, so a
    resume offers them v2 again."""
    ctl = controller(on=fresh_broker)
    policy = Policy(parse_waves("100%"), wave_timeout=60, auto_fallback=True)
    r = _deploy(ctl, world, "v2", policy, group_offer=False)
    _offered(ctl, r)
    done, busy, *silent = world.ids
    _say(ctl, done, state="committed", reason="", rollout=r.id, offered=2, active=2)
    _say(ctl, busy, state="downloading", reason="", rollout=r.id, offered=2, active=1)
    assert ctl.step(r.id).state == "running"
    ordered: list[str] = []
    real_order = ctl.order

    def order(rollout, action, devices, reason=""):
        ordered.extend(f"{action} {d}" for d in devices)
        return real_order(rollout, action, devices, reason)

    ctl.order = order
    ctl.halt(r.id, "halted by the operator")
    assert sorted(ordered) == sorted(f"fall-back {d}" for d in world.ids)
    phases = ctl.store.phases(r.id)
    assert phases[done].phase == phases[busy].phase == "fallen-back"
    assert all(phases[d].phase == "offered" for d in silent)


@pytest.mark.mqtt
@pytest.mark.slow
def test_a_broker_restart_mid_rollout_does_not_lose_the_rollout(
    world, fleet, controller, fresh_broker
):
    """The broker restarts while wave 1 downloads: devices and the controller reconnect
    (persistent sessions, retained offers and statuses) and the rollout finishes."""
    f = fleet(on=fresh_broker)
    ctl = controller(on=fresh_broker)
    r = _deploy(ctl, world, "v2", Policy(parse_waves("50%,100%"), wave_timeout=120))
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", ctl.run(r.id, poll=0.1)))
    runner.start()
    wait_for(
        lambda: any(p.phase == "downloading" for p in ctl.store.phases(r.id).values()),
        what="a download under way",
    )
    fresh_broker.restart()
    runner.join(120)
    assert result["r"].state == "done", result["r"].reason
    assert all(_active(f, d) == 2 for d in world.ids)


@pytest.mark.mqtt
def test_an_offer_is_recorded_only_once_the_broker_has_acknowledged_it(
    world, fleet, controller, fresh_broker
):
    """The broker is frozen (SIGSTOP: the connection stays up, nothing is acknowledged)
    while wave 1's offers are queued: nobody is recorded as offered, so a controller
    killed now would offer them again on resume. Thawed, the rollout completes."""
    f = fleet(on=fresh_broker)
    ctl = controller(on=fresh_broker)
    r = _deploy(ctl, world, "v2", Policy(parse_waves("50%,100%"), wave_timeout=120))
    pid = fresh_broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            ctl.step(r.id)
            time.sleep(0.1)
        wave1 = ctl.store.waves(r.id)[0].devices
        assert ctl.messages_out == len(wave1)  # queued once each, not again at every step
        assert all(p.offered_at is None for p in ctl.store.phases(r.id).values())
    finally:
        os.kill(pid, signal.SIGCONT)
    done = ctl.run(r.id, poll=0.1)
    assert done.state == "done", done.reason
    assert all(_active(f, d) == 2 for d in world.ids)


def _empty_postgres(url):
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        for t in ("rollouts", "waves", "rollout_devices", "devices", "seqs", "drivers"):
            c.execute(f"DROP TABLE IF EXISTS {t}")


@pytest.mark.mqtt
@pytest.mark.postgres
def test_two_shared_controllers_complete_one_rollout_judged_on_every_status(
    world, fleet, controller, postgres_url
):
    """Two controllers with ``share="ctl"`` on one PostgreSQL store, both running the same
    rollout: the broker splits the devices' status messages between them, so each sees
    about half. Timeline: A creates the rollout (A drives it); both step it; every status
    either one receives goes to the store, and the driver judges from the store, so each
    wave passes on the devices' real phases (nobody timed out or failed) and the rollout
    is done with all six on v1. B only takes in statuses and serves chunks: each device
    gets one offer, and no device refuses a message."""
    _empty_postgres(postgres_url)
    if "ctl-2" not in world.ring.signer_names():  # one signer per controller (docs/ota.md)
        world.ring.new_signer("ctl-2", roles=["deploy"], model_patterns=["clf*"], days=365,
                              now=NOW - timedelta(days=1))  # fmt: skip
    f = fleet()
    a = controller(store=postgres_url, share="ctl")
    b = controller(store=postgres_url, share="ctl", signer_name="ctl-2")
    r = _deploy(a, world, "v1", Policy(parse_waves("20%,50%,100%"), wave_timeout=20))
    results: dict[str, RolloutRecord] = {}
    stop = threading.Event()

    def run(name, ctl):
        results[name] = ctl.run(r.id, poll=0.1, stop=stop)

    runners = [threading.Thread(target=run, args=named) for named in (("a", a), ("b", b))]
    for t in runners:
        t.start()
    try:
        wait_for(lambda: len(results) == 2, timeout=90, what="both controllers to finish")
    finally:
        stop.set()
        for t in runners:
            t.join(30)
    assert results["a"].state == results["b"].state == "done", results["a"].reason
    assert a.messages_in and b.messages_in  # the statuses really were split
    waves = a.store.waves(r.id)
    verdicts = [w.verdict.split(":")[0] for w in waves]
    assert verdicts == ["pass", "pass", "done"], [w.verdict for w in waves]
    for before, after in itertools.pairwise(waves):
        assert before.closed_at <= after.opened_at
    phases = a.store.phases(r.id)
    assert {d: p.phase for d, p in phases.items()} == dict.fromkeys(world.ids, "committed")
    assert a.messages_out + b.messages_out == DEVICES  # one offer each, nothing twice
    assert all(_active(f, d) == 1 for d in world.ids)
    refused = [f.devices[d].channel.updater.counters.messages_refused for d in world.ids]
    assert refused == [0] * DEVICES


def _cli(world, ota_pki, broker, store, *args):
    env = {
        **os.environ,
        "EDGESEAL_KEYS": str(world.ring.path),
        "EDGESEAL_BROKER": broker.url,
        "EDGESEAL_ROLLOUT_STORE": str(store),
    }
    tls = [
        "--ca-file", str(ota_pki.ca_file),
        "--cert-file", str(ota_pki["edgeseal-controller"].cert),
        "--key-file", str(ota_pki["edgeseal-controller"].key),
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "edgeseal.core", "ota", *args]
    if args[0] in {"deploy", "resume"}:
        cmd += tls
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.mqtt
@pytest.mark.slow
def test_a_controller_killed_mid_rollout_is_resumed_where_it_was(
    world, fleet, broker, ota_pki, tmp_path
):
    """`ota deploy` is SIGKILLed once wave 2 is open; `ota resume` reads the store, sends
    wave 2's offers again with new sequence numbers (no device refuses a replay) and
    finishes; `ota status --json` tells the story."""
    f = fleet()
    store = tmp_path / "cli.sqlite"
    proc = _cli(world, ota_pki, broker, store, "deploy", str(world.bundles["v1"]),
                "--group", "sim", "--waves", "20%,100%", "--wave-timeout", "2m",
                "--chunk-size", "16384", "--signer", "deployer", "--json")  # fmt: skip
    try:

        def second_wave_open():
            if not store.exists():
                return False
            rs = SqliteStore(store).rollouts(limit=1)
            return bool(rs) and rs[0].wave == 1

        wait_for(second_wave_open, timeout=90, what="wave 2 to open")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    resumed = _cli(world, ota_pki, broker, store, "resume", "--json")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["state"] == "done" and report["committed"] == DEVICES
    assert all(_active(f, d) == 1 for d in world.ids)
    counters = [f.devices[d].channel.updater.counters.messages_refused for d in world.ids]
    assert counters == [0] * DEVICES
    status = _cli(world, ota_pki, broker, store, "status", "--json")
    out, _ = status.communicate(timeout=30)
    assert [w["phases"] for w in json.loads(out)["waves"]] == [
        {"committed": 2},
        {"committed": 4},
    ]
