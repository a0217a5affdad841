"""TensorRT's engine cache: sealed to the device key, bound to the bundle, plaintext in RAM.

There is no TensorRT here (CI is CPU-only). The sealing is tested with raw bytes; the RAM
directory on this machine's real tmpfs (/dev/shm) and its refusal of the disk-backed
test directory; the session plumbing against ONNX Runtime as it is here (no TensorRT:
CPU with a logged reason) and against :class:`SimulatedTrtOrt`, a stand-in for an ORT
build with the TensorRT provider that writes and reads engine files in
``trt_engine_cache_path`` the way TensorRT's provider does.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edgeseal.agent import runtimes, trtcache
from edgeseal.agent.opener import open_bundle
from edgeseal.agent.runtimes import (
    OnnxSession,
    TfliteSession,
    choose_providers,
    provider_options,
)
from edgeseal.agent.trtcache import (
    EngineCache,
    filesystem_type,
    make_ram_directory,
    open_cache,
    seal_cache,
)
from edgeseal.core.config import Config, RuntimeConfig, load_config
from edgeseal.core.errors import ConfigError, DecryptError, RuntimeBackendError
from edgeseal.core.keys import generate_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.targets import get_target
from edgeseal.packager.samples import make_onnx_classifier

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
JETSON = (TRT, CUDA, CPU)
BUNDLE = "0123456789abcdef0123456789abcdef"
OTHER_BUNDLE = "fedcba9876543210fedcba9876543210"
#: A run of bytes that stands for weights folded into an engine.
MARKER = b"ENGINE-WEIGHTS-\x8a\x17\xfe" * 64
ENGINE = "TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_sm87.engine"
MiB = 1024 * 1024


def _key() -> InMemoryKey:
    return InMemoryKey(generate_private_key())


def _files() -> dict[str, bytes]:
    return {
        ENGINE: MARKER + os.urandom(MiB + 5),  # two STREAM chunks
        "TensorrtExecutionProvider_cache_sm87.timing": b"",
        f"{ENGINE}.profile": b"profile",
    }


def _ram_base() -> Path:
    shm = Path("/dev/shm")
    info = Path("/proc/self/mountinfo").read_text()
    if not shm.is_dir() or filesystem_type(shm.resolve(), info) not in {"tmpfs", "ramfs"}:
        pytest.skip("no tmpfs at /dev/shm")
    return shm


def _leftover_ram_dirs(base: Path) -> set[str]:
    return {p.name for p in base.glob("edgeseal-trt-*")}


# --- sealing: bytes in, bytes out -----------------------------------------------------


def test_round_trip_bound_to_bundle_and_device() -> None:
    dev = _key()
    files = _files()
    sealed = seal_cache(files, bundle_id=BUNDLE, device_public_key=dev.public_key)
    assert MARKER[:32] not in sealed
    opened = open_cache(sealed, bundle_id=BUNDLE, key_store=dev, max_bytes=8 * MiB)
    assert {n: bytes(d) for n, d in opened.items()} == files


def test_another_bundle_is_refused() -> None:
    dev = _key()
    sealed = seal_cache(_files(), bundle_id=BUNDLE, device_public_key=dev.public_key)
    with pytest.raises(DecryptError):
        open_cache(sealed, bundle_id=OTHER_BUNDLE, key_store=dev, max_bytes=8 * MiB)


def test_another_devices_cache_is_refused() -> None:
    dev_a, dev_b = _key(), _key()
    sealed = seal_cache(_files(), bundle_id=BUNDLE, device_public_key=dev_b.public_key)
    with pytest.raises(DecryptError):
        open_cache(sealed, bundle_id=BUNDLE, key_store=dev_a, max_bytes=8 * MiB)
    # Naming dev-a's key in the header does not help: the key unwrap binds the header.
    forged = sealed.replace(dev_b.key_id.encode(), dev_a.key_id.encode())
    assert forged != sealed
    with pytest.raises(DecryptError):
        open_cache(forged, bundle_id=BUNDLE, key_store=dev_a, max_bytes=8 * MiB)


def test_tampered_cache_is_refused() -> None:
    dev = _key()
    sealed = seal_cache(_files(), bundle_id=BUNDLE, device_public_key=dev.public_key)
    header_end = sealed.index(b"}") + 1
    positions = [0, 12, header_end - 2, header_end + 3, header_end + 200, len(sealed) // 2]
    for pos in [*positions, len(sealed) - 1]:
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(DecryptError):
            open_cache(bytes(bad), bundle_id=BUNDLE, key_store=dev, max_bytes=8 * MiB)
    for bad_blob in (sealed[:-1], sealed + b"\x00", b"", sealed[:10]):
        with pytest.raises(DecryptError):
            open_cache(bad_blob, bundle_id=BUNDLE, key_store=dev, max_bytes=8 * MiB)


def test_size_limit_checked_before_anything_is_allocated() -> None:
    dev = _key()
    sealed = seal_cache(_files(), bundle_id=BUNDLE, device_public_key=dev.public_key)
    with pytest.raises(DecryptError):
        open_cache(sealed, bundle_id=BUNDLE, key_store=dev, max_bytes=MiB)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "x\x00y"])
def test_engine_file_names_must_be_plain(name: str) -> None:
    with pytest.raises(ValueError, match="plain engine file name"):
        seal_cache({name: b"x"}, bundle_id=BUNDLE, device_public_key=_key().public_key)


# --- RAM-only directories ---------------------------------------------------------------

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:5 / /dev/shm rw,nosuid,nodev shared:2 - tmpfs tmpfs rw
24 22 0:6 / /run/user/1000 rw,nosuid shared:3 - tmpfs tmpfs rw,mode=700
25 22 8:2 / /run/user/1000/disk\\040dir rw shared:4 - ext4 /dev/vdb rw
"""


def test_filesystem_type_follows_the_longest_mount_point() -> None:
    assert filesystem_type(Path("/dev/shm/x"), MOUNTINFO) == "tmpfs"
    assert filesystem_type(Path("/dev/shmx"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/run/user/1000"), MOUNTINFO) == "tmpfs"
    assert filesystem_type(Path("/run/user/1000/disk dir/a"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/var/lib/edgeseal"), MOUNTINFO) == "ext4"


def test_a_disk_backed_directory_is_refused(tmp_path: Path) -> None:
    info = Path("/proc/self/mountinfo").read_text()
    if filesystem_type(tmp_path.resolve(), info) in {"tmpfs", "ramfs"}:
        pytest.skip("the test directory is on tmpfs here")
    with pytest.raises(RuntimeBackendError, match="no RAM-only directory"):
        make_ram_directory([tmp_path])
    assert list(tmp_path.iterdir()) == []


def test_ram_directory_is_private_and_on_tmpfs() -> None:
    base = _ram_base()
    d = make_ram_directory([Path("/nonexistent-edgeseal"), base])
    try:
        assert d.parent == base.resolve()
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert filesystem_type(d, Path("/proc/self/mountinfo").read_text()) in {"tmpfs", "ramfs"}
    finally:
        trtcache.wipe_directory(d)
    assert not d.exists()


# --- the engine cache's life: prepare, persist, close ------------------------------------


def _store_holds_no_plaintext(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert MARKER[:48] not in p.read_bytes(), p


def test_engine_cache_life(tmp_path: Path) -> None:
    """Timeline: first open (empty) -> ORT writes an engine -> sealed, plaintext wiped ->
    ORT builds another at run time -> close seals both, removes the RAM dir -> a second
    open restores both -> the same files on another bundle id or device are ignored."""
    base = _ram_base()
    before = _leftover_ram_dirs(base)
    dev = _key()
    store = tmp_path / "models" / "classifier" / "trt-cache"
    cache = EngineCache(store, BUNDLE, dev, 8 * MiB, ram_base=str(base))
    ram = cache.prepare()
    assert list(ram.iterdir()) == []
    (ram / ENGINE).write_bytes(MARKER)  # what TensorRT's provider writes while building
    assert cache.persist() is True
    assert list(ram.iterdir()) == []  # plaintext wiped and unlinked right after sealing
    sealed = store / f"{BUNDLE}.sealed"
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
    (ram / "late.engine").write_bytes(MARKER + b"late")  # a run-time rebuild
    cache.close()
    assert not ram.exists()
    assert _leftover_ram_dirs(base) == before
    _store_holds_no_plaintext(tmp_path)

    again = EngineCache(store, BUNDLE, dev, 8 * MiB, ram_base=str(base))
    ram2 = again.prepare()
    assert {p.name: p.read_bytes() for p in ram2.iterdir()} == {
        ENGINE: MARKER,
        "late.engine": MARKER + b"late",
    }
    assert again.status().startswith("2 engine file(s) loaded")
    mtime = sealed.stat().st_mtime_ns
    assert again.persist() is False  # nothing new: not rewritten, but wiped
    assert list(ram2.iterdir()) == []
    again.close()
    assert sealed.stat().st_mtime_ns == mtime

    # Another bundle (another model or version) never loads this cache, even renamed.
    (store / f"{OTHER_BUNDLE}.sealed").write_bytes(sealed.read_bytes())
    other = EngineCache(store, OTHER_BUNDLE, dev, 8 * MiB, ram_base=str(base))
    assert list(other.prepare().iterdir()) == []
    other.close()
    # Another device holding the file does not open it.
    thief = EngineCache(store, BUNDLE, _key(), 8 * MiB, ram_base=str(base))
    assert list(thief.prepare().iterdir()) == []
    thief.close()
    assert _leftover_ram_dirs(base) == before


def test_old_bundles_caches_are_pruned(tmp_path: Path) -> None:
    base = _ram_base()
    dev = _key()
    store = tmp_path / "trt-cache"
    ids = [f"{i:032x}" for i in range(1, 5)]
    for n, bundle_id in enumerate(ids):
        cache = EngineCache(store, bundle_id, dev, MiB, ram_base=str(base))
        (cache.prepare() / "e.engine").write_bytes(b"engine %d" % n)
        cache.close()
        os.utime(store / f"{bundle_id}.sealed", (n + 1, n + 1))
    assert sorted(p.stem for p in store.glob("*.sealed")) == ids[-2:]


# --- ONNX Runtime's options ---------------------------------------------------------------


def test_providers_chosen_from_what_ort_has() -> None:
    assert choose_providers(JETSON, {TRT, CUDA, CPU}) == ([TRT, CUDA, CPU], [])
    chosen, reasons = choose_providers(JETSON, {CPU, "AzureExecutionProvider"})
    assert chosen == [CPU]
    assert [r.split(" is not available")[0] for r in reasons] == [TRT, CUDA]
    assert choose_providers((), {TRT, CPU}) == ([CPU], [])


def test_provider_options_for_tensorrt(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    assert provider_options([TRT, CUDA, CPU], engine_cache_dir=ram) == [
        {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(ram)},
        {},
        {},
    ]
    assert provider_options([TRT, CPU], engine_cache_dir=None) == [
        {"trt_engine_cache_enable": "False"},
        {},
    ]
    assert provider_options([CPU], engine_cache_dir=ram) == [{}]


def test_config_flag_is_off_by_default() -> None:
    assert RuntimeConfig().trt_engine_cache is False
    cfg = load_config(text="[runtime]\ntrt_engine_cache = true\n")
    assert cfg.runtime.trt_engine_cache is True
    with pytest.raises(ConfigError, match="absolute"):
        load_config(text='[runtime]\ntrt_engine_cache_ram_dir = "shm"\n')


def test_no_tensorrt_here_means_cpu_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = _ram_base()
    before = _leftover_ram_dirs(base)
    config = RuntimeConfig(providers=JETSON, trt_engine_cache=True)
    cache = EngineCache(tmp_path / "trt-cache", BUNDLE, _key(), MiB, ram_base=str(base))
    with caplog.at_level(logging.WARNING, logger="edgeseal.agent.runtimes"):
        session = OnnxSession(make_onnx_classifier(seed=1), None, [], config, engine_cache=cache)
    try:
        assert session.status()["providers"] == [CPU]
        assert TRT in " ".join(session.status()["provider_fallbacks"])
        assert "trt_engine_cache" not in session.status()
        assert any(
            TRT in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records
        )
        assert cache.ram_dir is None  # TensorRT absent: no plaintext directory at all
        assert _leftover_ram_dirs(base) == before
    finally:
        session.close()


# --- a simulated ORT build with the TensorRT provider -----------------------------------


class SimulatedTrtOrt:
    """Stands in for ``onnxruntime`` built with TensorRT: its session, when TensorRT is
    listed with the engine cache on, loads ``*.engine`` files from the cache path, or
    "builds" one and writes it there, as TensorRT's provider does. Records every call."""

    def __init__(self, *, trt_starts: bool = True) -> None:
        self.trt_starts = trt_starts
        self.calls: list[dict[str, Any]] = []
        real = runtimes._ort()
        self.SessionOptions = real.SessionOptions
        self.GraphOptimizationLevel = real.GraphOptimizationLevel
        self.OrtValue = real.OrtValue

    def get_available_providers(self) -> list[str]:
        return [TRT, CUDA, CPU]

    def InferenceSession(  # noqa: N802 - ORT's name
        self, graph: bytes, so: Any, *, providers: Sequence[str], provider_options: Any
    ) -> Any:
        opts = dict(zip(providers, provider_options, strict=True))
        record: dict[str, Any] = {"providers": list(providers), "options": opts}
        self.calls.append(record)
        active = [p for p in providers if p != TRT or self.trt_starts]
        trt = opts.get(TRT, {})
        if TRT in active and trt.get("trt_engine_cache_enable") == "True":
            path = Path(trt["trt_engine_cache_path"])
            engines = sorted(path.glob("*.engine"))
            record["loaded"] = {p.name: p.read_bytes() for p in engines}
            if not engines:
                (path / ENGINE).write_bytes(MARKER + graph[:16])

        class Session:
            def get_providers(self) -> list[str]:
                return active

            def get_inputs(self) -> list[Any]:
                return []

            def get_outputs(self) -> list[Any]:
                return []

        return Session()


@pytest.fixture
def simulated_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedTrtOrt]:
    sim = SimulatedTrtOrt()
    monkeypatch.setattr(runtimes, "_ort", lambda: sim)
    yield sim


def test_tensorrt_session_seals_its_engines(simulated_trt: SimulatedTrtOrt, tmp_path: Path) -> None:
    base = _ram_base()
    before = _leftover_ram_dirs(base)
    dev = _key()
    store = tmp_path / "trt-cache"
    config = RuntimeConfig(
        providers=JETSON, trt_engine_cache=True, trt_engine_cache_ram_dir=str(base)
    )
    graph = make_onnx_classifier(seed=1)

    first = OnnxSession(
        graph, None, [], config, engine_cache=EngineCache(store, BUNDLE, dev, MiB, str(base))
    )
    call = simulated_trt.calls[-1]
    ram = Path(call["options"][TRT]["trt_engine_cache_path"])
    assert call["options"][TRT]["trt_engine_cache_enable"] == "True"
    assert call["providers"] == [TRT, CUDA, CPU]
    assert call["loaded"] == {}
    assert ram.parent == base.resolve()
    assert list(ram.iterdir()) == []  # sealed and wiped as soon as the session was built
    assert first.status()["trt_engine_cache"].startswith("on, sealed to the device key: 1 ")
    first.close()
    assert not ram.exists()
    assert (store / f"{BUNDLE}.sealed").exists()
    _store_holds_no_plaintext(tmp_path)

    second = OnnxSession(
        graph, None, [], config, engine_cache=EngineCache(store, BUNDLE, dev, MiB, str(base))
    )
    assert simulated_trt.calls[-1]["loaded"] == {ENGINE: MARKER + graph[:16]}
    second.close()

    # Off (the default): TensorRT is told so, and no directory is made.
    off = OnnxSession(graph, None, [], RuntimeConfig(providers=JETSON))
    assert simulated_trt.calls[-1]["options"][TRT] == {"trt_engine_cache_enable": "False"}
    assert off.status()["trt_engine_cache"] == "off"
    off.close()
    assert _leftover_ram_dirs(base) == before


def test_tensorrt_that_does_not_start_leaves_no_directory(
    simulated_trt: SimulatedTrtOrt, tmp_path: Path
) -> None:
    base = _ram_base()
    before = _leftover_ram_dirs(base)
    simulated_trt.trt_starts = False
    config = RuntimeConfig(
        providers=JETSON, trt_engine_cache=True, trt_engine_cache_ram_dir=str(base)
    )
    cache = EngineCache(tmp_path / "trt-cache", BUNDLE, _key(), MiB, str(base))
    session = OnnxSession(make_onnx_classifier(seed=1), None, [], config, engine_cache=cache)
    assert session.status()["providers"] == [CUDA, CPU]
    assert "TensorrtExecutionProvider did not start" in session.status()["provider_fallbacks"][0]
    assert cache.ram_dir is None
    assert _leftover_ram_dirs(base) == before
    session.close()


def test_open_bundle_binds_the_cache_to_the_bundle_id(
    simulated_trt: SimulatedTrtOrt, fleet: Any, onnx_model: Path, tmp_path: Path
) -> None:
    _ram_base()
    bundle, _ = fleet.pack(onnx_model, target=get_target("jetson"))
    config = Config(
        runtime=RuntimeConfig(trt_engine_cache=True, trt_engine_cache_ram_dir="/dev/shm")
    )
    store = tmp_path / "store" / "classifier" / "trt-cache"
    opened = open_bundle(
        bundle,
        key_store=fleet.devices["dev-a"],
        policy=fleet.policy(),
        config=config,
        engine_cache_dir=store,
    )
    try:
        assert simulated_trt.calls[-1]["providers"] == [TRT, CUDA, CPU]
        assert [p.name for p in store.iterdir()] == [f"{opened.manifest.bundle_id}.sealed"]
    finally:
        opened.close()


def test_tflite_sessions_have_no_engine_cache(tflite_model: Path) -> None:
    session = TfliteSession(tflite_model.read_bytes(), RuntimeConfig(trt_engine_cache=True))
    assert "trt_engine_cache" not in session.status()
    session.close()
