"""Device target profiles: which architectures a bundle is for and which cipher fits. Stable API.

AES-256-GCM is the default: x86-64 and ARMv8 cores with the crypto extensions (Jetson,
Raspberry Pi 5) run it at GB/s. The Raspberry Pi 4's Cortex-A72 has no AES
instructions, so bundles for it use ChaCha20-Poly1305 with the same framing
(docs/adr/0002-stream-aead.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgeseal.core._stream import AES_256_GCM, CHACHA20_POLY1305

__all__ = ["TARGETS", "TargetProfile", "cipher_for", "get_target"]


@dataclass(frozen=True)
class TargetProfile:
    name: str
    architectures: tuple[str, ...]
    has_aes: bool
    execution_providers: tuple[str, ...]
    description: str


TARGETS: dict[str, TargetProfile] = {
    t.name: t
    for t in (
        TargetProfile(
            "generic",
            ("x86_64", "aarch64"),
            True,
            ("CPUExecutionProvider",),
            "any x86-64 or arm64 Linux device",
        ),
        TargetProfile("x86_64", ("x86_64",), True, ("CPUExecutionProvider",), "x86-64 gateways"),
        TargetProfile(
            "jetson",
            ("aarch64",),
            True,
            ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
            "NVIDIA Jetson (Orin, Xavier); GPU providers where present, else CPU",
        ),
        TargetProfile(
            "rpi5",
            ("aarch64",),
            True,
            ("CPUExecutionProvider",),
            "Raspberry Pi 5 (Cortex-A76, AES instructions)",
        ),
        TargetProfile(
            "rpi4",
            ("aarch64",),
            False,
            ("CPUExecutionProvider",),
            "Raspberry Pi 4 (Cortex-A72, no AES instructions: ChaCha20-Poly1305)",
        ),
    )
}


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r} (known: {', '.join(TARGETS)})") from None


def cipher_for(profiles: Iterable[TargetProfile]) -> str:
    """AES-256-GCM unless some device lacks AES instructions."""
    return AES_256_GCM if all(p.has_aes for p in profiles) else CHACHA20_POLY1305
