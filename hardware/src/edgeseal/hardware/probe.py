"""What board is this, and what can it protect keys and models with? Stable API.

:func:`probe` reads only files under ``root`` for everything that lives in files (so
tests point it at fixture trees of each board family) and asks this process only for
what is not in files: the inference runtimes installed and the memory-lock limit. A
missing or garbled file never raises: its fields are ``None`` or empty.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PlatformInfo", "jetpack_for", "parse_cpuinfo", "parse_l4t", "probe"]

#: L4T release -> JetPack (NVIDIA's release notes; minor revisions map within a line).
_JETPACK = {
    "R32.7": "4.6.x",
    "R32.6": "4.6",
    "R32.5": "4.5.x",
    "R35.1": "5.0.2",
    "R35.2": "5.1",
    "R35.3": "5.1.1",
    "R35.4": "5.1.2",
    "R35.5": "5.1.3",
    "R35.6": "5.1.4",
    "R36.2": "6.0 DP",
    "R36.3": "6.0",
    "R36.4": "6.1/6.2",
}
PKCS11_GLOBS = (
    "usr/lib/softhsm/libsofthsm2.so",
    "usr/lib/*/softhsm/libsofthsm2.so",
    "usr/lib/libckteec.so*",
    "usr/lib/*/libckteec.so*",
    "usr/lib/*/opensc-pkcs11.so",
    "usr/lib/*/pkcs11/*.so",
    "usr/lib/libcryptoauth.so",
    "usr/local/lib/libcryptoauth.so",
    "usr/local/lib/libsss_pkcs11.so",
    "usr/lib/libsss_pkcs11.so",
)


@dataclass(frozen=True)
class CpuInfo:
    architecture: str | None
    features: tuple[str, ...]
    model: str | None


@dataclass(frozen=True)
class PlatformInfo:
    architecture: str | None
    board: str
    family: str  # jetson, raspberry-pi, generic
    l4t_release: str | None
    jetpack: str | None
    cpu_model: str | None
    crypto_extensions: tuple[str, ...]
    has_aes: bool
    tpm: str | None
    tee: str | None
    pkcs11_modules: tuple[str, ...]
    memory_mb: int | None
    suggested_target: str
    onnxruntime_providers: tuple[str, ...] = ()
    litert: str | None = None
    memlock_limit: dict[str, int | None] = field(default_factory=dict)
    can_lock_memory: bool = False

    def to_obj(self) -> dict[str, Any]:
        return asdict(self)


def _read(root: Path, name: str) -> str | None:
    try:
        return (root / name).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def parse_cpuinfo(text: str | None) -> CpuInfo:
    """Architecture, CPU features and model from /proc/cpuinfo text (x86 or arm64)."""
    if not text:
        return CpuInfo(None, (), None)
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    if "flags" in fields:
        arch: str | None = "x86_64" if " lm " in f" {fields['flags']} " else "x86"
        features = tuple(fields["flags"].split())
        model = fields.get("model name")
    elif "Features" in fields or fields.get("CPU architecture") == "8":
        arch = "aarch64"
        features = tuple(fields.get("Features", "").split())
        model = fields.get("Model") or fields.get("model name")
    else:
        return CpuInfo(None, (), fields.get("model name"))
    return CpuInfo(arch, features, model)


def parse_l4t(text: str | None) -> str | None:
    """ "# R35 (release), REVISION: 4.1, ..." -> "R35.4.1"."""
    if not text:
        return None
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    return f"R{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def jetpack_for(l4t: str | None) -> str | None:
    if not l4t:
        return None
    major_minor = ".".join(l4t.split(".")[:2])
    return _JETPACK.get(major_minor)


def _crypto(cpu: CpuInfo) -> tuple[str, ...]:
    wanted = (
        ("aes", "pmull", "sha1", "sha2", "sha512")
        if cpu.architecture == "aarch64"
        else ("aes", "vaes", "sha_ni", "pclmulqdq")
    )
    return tuple(f for f in wanted if f in cpu.features)


def _suggest(family: str, board: str, arch: str | None, has_aes: bool) -> str:
    if family == "jetson":
        return "jetson"
    if family == "raspberry-pi":
        return "rpi5" if "Raspberry Pi 5" in board else "rpi4"
    if arch in ("x86_64", "x86"):
        return "x86_64"
    return "generic" if has_aes or arch is None else "rpi4"


def _runtime_facts() -> tuple[tuple[str, ...], str | None, dict[str, int | None], bool]:
    providers: tuple[str, ...] = ()
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime

            providers = tuple(onnxruntime.get_available_providers())
        except Exception:
            providers = ()
    litert = next(
        (
            m
            for m in ("ai_edge_litert", "tflite_runtime")
            if importlib.util.find_spec(m) is not None
        ),
        None,
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def norm(v: int) -> int | None:
        return None if v == resource.RLIM_INFINITY else v

    limit = {"soft": norm(soft), "hard": norm(hard)}
    # An estimate: root (CAP_IPC_LOCK) or a limit of at least 64 MiB.
    can_lock = os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= 64 * 2**20
    return providers, litert, limit, can_lock


def probe(root: Path = Path("/")) -> PlatformInfo:
    cpu = parse_cpuinfo(_read(root, "proc/cpuinfo"))
    arch = cpu.architecture
    if Path(root) == Path("/"):
        m = platform.machine().lower()
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
    model = (_read(root, "proc/device-tree/model") or "").strip("\x00\n ") or None
    l4t = parse_l4t(_read(root, "etc/nv_tegra_release"))
    if (model and ("Jetson" in model or "NVIDIA" in model)) or l4t:
        family = "jetson"
    elif model and "Raspberry Pi" in model:
        family = "raspberry-pi"
    else:
        family = "generic"
    board = model or f"generic {'arm64' if arch == 'aarch64' else arch or 'unknown'}"
    crypto = _crypto(cpu)
    has_aes = "aes" in crypto
    tpm = next((f"/{d}" for d in ("dev/tpmrm0", "dev/tpm0") if (root / d).exists()), None)
    tee = next((f"/{d}" for d in ("dev/tee0", "dev/teepriv0") if (root / d).exists()), None)
    modules = tuple(sorted({f"/{p.relative_to(root)}" for g in PKCS11_GLOBS for p in root.glob(g)}))
    meminfo = _read(root, "proc/meminfo") or ""
    mem = re.search(r"^MemTotal:\s+(\d+)\s+kB", meminfo, re.M)
    providers, litert, limit, can_lock = _runtime_facts()
    return PlatformInfo(
        architecture=arch,
        board=board,
        family=family,
        l4t_release=l4t,
        jetpack=jetpack_for(l4t),
        cpu_model=cpu.model,
        crypto_extensions=crypto,
        has_aes=has_aes,
        tpm=tpm,
        tee=tee,
        pkcs11_modules=modules,
        memory_mb=int(mem.group(1)) // 1024 if mem else None,
        suggested_target=_suggest(family, board, arch, has_aes),
        onnxruntime_providers=providers,
        litert=litert,
        memlock_limit=limit,
        can_lock_memory=can_lock,
    )
