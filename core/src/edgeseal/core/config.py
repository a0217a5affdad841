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
from edgeseal.core.listen import ListenAddress

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "AccessRule",
    "AgentConfig",
    "BundleConfig",
    "Config",
    "DeviceConfig",
    "Limits",
    "OtaConfig",
    "RuntimeConfig",
    "load_config",
]

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
    #: ONNX Runtime graph optimization: disable, basic, extended or all. Above basic the
    #: weights go into the graph for the optimizers, and ONNX Runtime keeps its own copy
    #: outside the locked buffer (edgeseal.core.ortsession).
    graph_optimization: str = "basic"
    #: TensorRT's engine cache holds the weights (compiled into engines): off by default.
    #: On, engines are kept sealed to the device key in the model store and exist in
    #: plaintext only in a RAM-only directory while ORT reads or writes them.
    trt_engine_cache: bool = False
    #: A tmpfs/ramfs directory for the plaintext engines ("": $XDG_RUNTIME_DIR, else
    #: /dev/shm); a disk-backed one is refused.
    trt_engine_cache_ram_dir: str = ""
    #: Largest engine cache (all engine files of one model) sealed or opened, in bytes.
    trt_engine_cache_max_bytes: int = 4096 * MiB
    #: TFLite: LiteRT's default CPU delegate, XNNPACK (faster), packs a plaintext copy of
    #: the weights into the ordinary heap: not locked, in core dumps, not wiped. False
    #: builds the interpreter without default delegates, and without that copy.
    tflite_xnnpack: bool = True

    def __post_init__(self) -> None:
        if self.graph_optimization not in {"disable", "basic", "extended", "all"}:
            raise ConfigError("runtime.graph_optimization must be disable, basic, extended or all")
        if self.intra_op_threads < 0:
            raise ConfigError("runtime.intra_op_threads must be 0 (auto) or positive")
        if self.trt_engine_cache_ram_dir and not self.trt_engine_cache_ram_dir.startswith("/"):
            raise ConfigError("runtime.trt_engine_cache_ram_dir must be an absolute path")
        if self.trt_engine_cache_max_bytes < 1:
            raise ConfigError("runtime.trt_engine_cache_max_bytes must be positive")


@dataclass(frozen=True)
class AgentConfig:
    """The agent daemon: its socket, its checks while serving, its audit log."""

    #: The local API's unix socket, its file mode (octal text) and group ("" keeps ours).
    socket: str = "/run/edgeseal/agent.sock"
    socket_mode: str = "0660"
    socket_group: str = ""
    #: The model store (default: <device.home>/models) and audit log (<home>/audit.log).
    store: str = ""
    audit_log: str = ""
    #: fsync the audit log every N records (1: every call is on disk before the answer).
    audit_flush_every: int = 1
    audit_max_bytes: int = 16 * MiB
    #: Re-run the golden vectors every N requests or T seconds (0: never), and re-hash
    #: the weights buffer against the signed digest every T seconds.
    golden_every_requests: int = 10_000
    golden_every_seconds: int = 300
    digest_every_seconds: int = 600
    #: Request limits: rows per call, request body bytes.
    max_rows: int = 1024
    max_body_bytes: int = 64 * MiB
    #: Size bounds per call, per model: input elements (a symbolic dimension counts at
    #: ``profile_dim_factor`` times its size in the model's calibration rows, and in all
    #: at most ``max_input_elements``); output bytes. Beyond: 413. The request body is
    #: bounded by what the input bound can need (and by ``max_body_bytes``).
    max_input_elements: int = 16 * 1024 * 1024
    max_output_bytes: int = 64 * MiB
    profile_dim_factor: float = 4.0
    #: Connections to the local API: at most this many open at once, at most this many
    #: per caller uid, and the last ``max_connections_reserved`` of them only for callers
    #: an access rule lists (and root and the agent's uid). The total is also kept below
    #: the process's file descriptor limit.
    max_connections: int = 512
    max_connections_per_uid: int = 64
    max_connections_reserved: int = 64
    #: Refuse values further outside the calibrated range than this many spans (0: off).
    range_margin: float = 1.0
    #: A row whose OOD score exceeds this is counted as out of distribution.
    ood_threshold: float = 1.0
    #: Update channels to start, by entry point name (group ``edgeseal.agent.channels``).
    channels: tuple[str, ...] = ()
    #: Serve ``GET /metrics`` (and nothing else) over TCP at ``HOST:PORT`` ("": off). A
    #: bare port is loopback; a non-loopback host must be written out and is warned about.
    metrics_listen: str = ""

    def __post_init__(self) -> None:
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777:
            raise ConfigError('agent.socket_mode must be octal text such as "0660"')
        if not self.profile_dim_factor >= 1.0:
            raise ConfigError("agent.profile_dim_factor must be at least 1")
        if self.max_connections_reserved < 0:
            raise ConfigError("agent.max_connections_reserved must not be negative")
        for name in (
            "audit_flush_every",
            "max_rows",
            "max_body_bytes",
            "max_connections",
            "max_connections_per_uid",
            "max_input_elements",
            "max_output_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"agent.{name} must be at least 1")
        if self.metrics_listen:
            ListenAddress.parse(self.metrics_listen, where="agent.metrics_listen")

    @property
    def metrics_address(self) -> ListenAddress | None:
        """Where to serve metrics over TCP; None when off."""
        if not self.metrics_listen:
            return None
        return ListenAddress.parse(self.metrics_listen, where="agent.metrics_listen")


@dataclass(frozen=True)
class OtaConfig:
    """The MQTT update channel (``agent.channels = ["mqtt"]``); see docs/ota.md."""

    #: The broker: ``mqtts://host:8883`` (TLS) or ``mqtt://host:1883`` (tests only); "" is off.
    broker: str = ""
    #: MQTT protocol: "5" or "3.1.1".
    protocol: str = "5"
    #: The groups this device takes group offers for.
    groups: tuple[str, ...] = ()
    #: Every topic lives under this versioned prefix.
    topic_prefix: str = "edgeseal/v1"
    #: TLS: the fleet CA, this device's certificate and its key (PEM files).
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive: int = 30
    #: Transport chunks asked for at a time, and how long to wait for one before asking again.
    window: int = 8
    chunk_timeout: float = 10.0
    #: Largest bundle an offer may announce.
    max_bundle_bytes: int = 2048 * MiB
    #: A committed version becomes final (the floor rises to it, the fallback goes) after
    #: this long without trouble; 0 waits for a signed finalize order.
    probation_seconds: int = 0
    #: Health check: the candidate's golden-input latency may be at most this many times
    #: the serving model's (0: not checked).
    latency_budget: float = 3.0

    def __post_init__(self) -> None:
        if self.broker and not self.broker.startswith(("mqtt://", "mqtts://")):
            raise ConfigError("ota.broker must be an mqtts://host:port (or mqtt://) URL")
        if self.protocol not in {"5", "3.1.1"}:
            raise ConfigError('ota.protocol must be "5" or "3.1.1"')
        if self.window < 1 or self.keepalive < 5 or self.max_bundle_bytes < 1:
            raise ConfigError("ota.window, ota.keepalive (>= 5) and ota.max_bundle_bytes too small")


@dataclass(frozen=True)
class AccessRule:
    """Who may call a model (``[access."<model glob>"]``), and how much."""

    uids: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()
    #: Requests per minute per caller (0: unlimited) and rows per day per caller.
    rate_per_minute: int = 0
    daily_budget: int = 0
    #: Output hardening: only the top k scores of each row (0: all), rounded to n digits
    #: (-1: exact).
    top_k: int = 0
    round_digits: int = -1


@dataclass(frozen=True)
class Config:
    limits: Limits = field(default_factory=Limits)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    ota: OtaConfig = field(default_factory=OtaConfig)
    #: Model name glob -> rule; the first matching glob in file order applies. No rule:
    #: only the agent's own uid and root may call.
    access: tuple[tuple[str, AccessRule], ...] = ()


def _build(cls: type[Any], table: object, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name, raw in table.items():
        default = getattr(cls(), name)
        value = float(raw) if isinstance(default, float) and type(raw) is int else raw
        if isinstance(default, tuple):
            kind = int if name.endswith(("pcrs", "uids")) else str
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
        "agent": AgentConfig,
        "ota": OtaConfig,
    }
    access = data.pop("access", {})
    if not isinstance(access, dict):
        raise ConfigError("[access] must be a table of model globs")
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown table [{unknown[0]}] (known: {', '.join(sorted(sections))})")
    built = {name: _build(cls, data[name], name) for name, cls in sections.items() if name in data}
    rules = tuple(
        (glob, _build(AccessRule, rule, f'access."{glob}"')) for glob, rule in access.items()
    )
    return Config(**built, access=rules)
