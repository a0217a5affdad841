"""The one configuration schema (TOML) every part of edgeseal reads. Stable API.

Every field has a documented default (docs/configuration.md); a file only names what it
changes. Unknown tables or keys are refused, so a typo never silently falls back to a
default. Sizes are in bytes, durations in seconds.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeseal.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["BundleConfig", "Config", "DeviceConfig", "Limits", "RuntimeConfig", "load_config"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked before memory is allocated for anything read from outside."""

    max_manifest_bytes: int = 16 * MiB
    max_trust_bytes: int = 1 * MiB
    max_section_bytes: int = 8 * 1024 * MiB
    max_chunk_bytes: int = 64 * MiB
    max_sections: int = 8
    max_recipients: int = 100_000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"limits.{f.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class BundleConfig:
    """Defaults for packing."""

    chunk_bytes: int = 1 * MiB
    validity_days: int = 365
    #: "auto" picks AES-256-GCM, or ChaCha20-Poly1305 for targets without AES instructions.
    cipher: str = "auto"

    def __post_init__(self) -> None:
        if not 4096 <= self.chunk_bytes <= 64 * MiB:
            raise ConfigError("bundle.chunk_bytes must be between 4096 and 67108864")
        if self.validity_days <= 0:
            raise ConfigError("bundle.validity_days must be positive")
        if self.cipher not in {"auto", "aes-256-gcm", "chacha20-poly1305"}:
            raise ConfigError("bundle.cipher must be auto, aes-256-gcm or chacha20-poly1305")


@dataclass(frozen=True)
class DeviceConfig:
    """Who this device is and where its state lives."""

    id: str = ""
    home: str = "/var/lib/edgeseal"
    #: auto picks the strongest store present: a TPM, else a PKCS#11 module, else software.
    key_store: str = "auto"
    root_keys: tuple[str, ...] = ()
    #: Maximum clock skew tolerated for a bundle's created time, in seconds.
    clock_skew: int = 300
    #: TPM 2.0: the TCTI (``swtpm:path=...`` for a simulator).
    tpm_tcti: str = "device:/dev/tpmrm0"
    #: TPM 2.0: PCRs the device key is bound to, e.g. [7, 16] (empty: none).
    tpm_pcrs: tuple[int, ...] = ()
    #: PKCS#11: module path, token label and a file holding the PIN.
    pkcs11_module: str = ""
    pkcs11_token_label: str = ""
    pkcs11_pin_file: str = ""

    def __post_init__(self) -> None:
        if self.key_store not in {"auto", "software", "tpm", "pkcs11"}:
            raise ConfigError("device.key_store must be auto, software, tpm or pkcs11")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the agent builds inference sessions."""

    #: ONNX Runtime's weight prepacking copies weights outside the locked buffer.
    disable_prepacking: bool = True
    intra_op_threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    #: ONNX Runtime graph optimization: disable, basic, extended or all. Levels above
    #: basic may derive transformed copies of weights outside the locked buffer.
    graph_optimization: str = "basic"

    def __post_init__(self) -> None:
        if self.graph_optimization not in {"disable", "basic", "extended", "all"}:
            raise ConfigError("runtime.graph_optimization must be disable, basic, extended or all")
        if self.intra_op_threads < 0:
            raise ConfigError("runtime.intra_op_threads must be 0 (auto) or positive")


@dataclass(frozen=True)
class Config:
    limits: Limits = field(default_factory=Limits)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _build(cls: type[Any], table: object, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name, value in table.items():
        default = getattr(cls(), name)
        if isinstance(default, tuple):
            kind = int if name.endswith("pcrs") else str
            if not isinstance(value, list) or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in value
            ):
                raise ConfigError(f"{where}.{name} must be a list of {kind.__name__}s")
            values[name] = tuple(value)
            continue
        if type(default) is not type(value):
            raise ConfigError(
                f"{where}.{name} must be a {type(default).__name__}, got {type(value).__name__}"
            )
        values[name] = value
    return cls(**values)


def load_config(path: Path | None = None, *, text: str | None = None) -> Config:
    """Load a config file (or TOML text); with neither, the defaults."""
    if path is None and text is None:
        return Config()
    try:
        if text is None:
            assert path is not None
            text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path or '<text>'} is not valid TOML: {e}") from e
    sections: dict[str, type[Any]] = {
        "limits": Limits,
        "bundle": BundleConfig,
        "device": DeviceConfig,
        "runtime": RuntimeConfig,
    }
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown table [{unknown[0]}] (known: {', '.join(sorted(sections))})")
    built = {name: _build(cls, data[name], name) for name, cls in sections.items() if name in data}
    return Config(**built)
