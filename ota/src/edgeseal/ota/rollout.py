"""Rollout decisions: waves, the wave gate, halts. Pure: values and a reference time in,
a plan or a verdict out; the controller (:mod:`edgeseal.ota.controller`) does the I/O.
Stable API.

A rollout offers one bundle to the devices of a group in **waves**, given as cumulative
percentages of the group (``1%,10%,50%,100%``). :func:`wave_sizes` turns them into
cumulative device counts with at least one new device per wave; :func:`plan_waves` puts
the devices in a stable pseudo-random order per rollout, so the canaries differ from one
rollout to the next but a restarted controller picks the same ones.

Each device of an open wave is in one **phase**, read from its retained status
(:func:`device_phase`): ``offered`` (nothing heard yet), ``downloading``, ``verifying``,
``staged``, ``testing`` (in progress); ``committed`` (success); ``failed``,
``fallen-back``, ``refused``, ``timed-out`` (failures). :func:`judge_wave` is the gate,
in this order:

R1. failures / wave size > ``max_failure_rate``: **halt**. The wave size is the
    denominator, so the rate only grows while the wave is open and a halt never comes
    too early.
R2. ``max_ood_rate`` set and the mean OOD rate reported by the wave's devices that run
    the new version is above it: **halt** (a model-quality signal, not an install one).
R3. committed >= the success requirement (``min_success``; default: every device the
    failure budget does not allow to fail) and the wave has been open ``soak`` seconds:
    the wave **passes**; the next one opens, or the rollout is **done** after the last.
    (While it soaks, R1 and R2 can still halt it: OOD rates need traffic and time.)
R4. nothing in progress and R3 not met: **halt** (the wave can no longer pass).
R5. the wave has been open ``wave_timeout`` seconds without passing: devices still in
    progress are **timed out**, count as failures, and the rollout **halts** (a wave never
    stays open forever). A wave with room for stragglers passes at R3 without waiting for
    them (``--min-success`` below 100%): the stragglers keep their offer and are recorded
    with what they say when they come back. A timed-out device that answers later is
    recorded likewise.
R6. otherwise: **wait**.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FAILED",
    "IN_PROGRESS",
    "PHASES",
    "Policy",
    "Success",
    "Verdict",
    "WaveTally",
    "device_phase",
    "judge_wave",
    "parse_duration",
    "parse_rate",
    "parse_waves",
    "plan_waves",
    "tally",
    "wave_sizes",
]

PHASES = (
    "offered",
    "downloading",
    "verifying",
    "staged",
    "testing",
    "committed",
    "failed",
    "fallen-back",
    "refused",
    "timed-out",
)
IN_PROGRESS = frozenset({"offered", "downloading", "verifying", "staged", "testing"})
FAILED = frozenset({"failed", "fallen-back", "refused", "timed-out"})
#: Rollout states. ``running``: a wave is open; ``halted``: stopped by a threshold or an
#: operator (``ota resume`` opens it again); ``done``: every wave passed.
ROLLOUT_STATES = ("running", "halted", "done")

_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")


def parse_rate(text: str) -> float:
    """``"2%"`` or ``"0.02"`` -> 0.02; ValueError outside 0..1."""
    text = text.strip()
    m = _PERCENT.fullmatch(text)
    try:
        value = float(m.group(1)) / 100 if m else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate: give a percentage (2%) or a fraction") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"rate {text!r} must be between 0% and 100%")
    return value


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"1h"``, ``"500ms"`` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 1h)")
    scale = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
    seconds = float(m.group(1)) * scale
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def parse_waves(text: str) -> tuple[float, ...]:
    """``"1%,10%,50%,100%"`` -> (0.01, 0.1, 0.5, 1.0): cumulative, strictly rising."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise ValueError("give at least one wave, e.g. --waves 1%,10%,50%,100%")
    waves = tuple(parse_rate(p if p.endswith("%") else p + "%") for p in parts)
    if any(w <= 0 for w in waves) or any(b <= a for a, b in itertools.pairwise(waves)):
        raise ValueError(f"waves {text!r} must be rising cumulative percentages above 0%")
    return waves


def wave_sizes(waves: Sequence[float], devices: int) -> tuple[int, ...]:
    """Cumulative device counts per wave for a group of ``devices``: ``ceil(w * n)``,
    at least one more device than the wave before, never more than ``n``. Waves that
    would add nobody (the group is used up) are dropped."""
    if devices < 0:
        raise ValueError("devices must be >= 0")
    sizes: list[int] = []
    for w in waves:
        count = min(devices, max(math.ceil(w * devices - 1e-9), (sizes[-1] if sizes else 0) + 1))
        if count > (sizes[-1] if sizes else 0):
            sizes.append(count)
    return tuple(sizes)


def _order_key(rollout: str, device: str) -> bytes:
    return hashlib.sha256(f"{rollout}\0{device}".encode()).digest()


def plan_waves(rollout: str, devices: Iterable[str], waves: Sequence[float]) -> list[list[str]]:
    """The devices of each wave (not cumulative): a stable pseudo-random order per rollout
    id, cut at :func:`wave_sizes`."""
    ordered = sorted(set(devices), key=lambda d: _order_key(rollout, d))
    out: list[list[str]] = []
    start = 0
    for end in wave_sizes(waves, len(ordered)):
        out.append(ordered[start:end])
        start = end
    return out


@dataclass(frozen=True)
class Success:
    """What a wave needs to pass: a fraction of its devices, or a count (capped at the
    wave's size). ``None`` fraction and count: derived from the failure budget."""

    fraction: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> Success:
        if text is None or not text.strip():
            return cls()
        text = text.strip()
        if text.endswith("%") or "." in text:
            return cls(fraction=parse_rate(text))
        try:
            count = int(text)
        except ValueError:
            raise ValueError(f"--min-success {text!r}: give a count (5) or a percentage") from None
        if count < 1:
            raise ValueError("--min-success must be at least 1 device")
        return cls(count=count)

    def required(self, size: int, max_failure_rate: float) -> int:
        if self.count is not None:
            return min(self.count, size)
        if self.fraction is not None:
            return min(size, max(1, math.ceil(self.fraction * size - 1e-9)))
        return max(1, size - math.floor(max_failure_rate * size + 1e-9)) if size else 0

    def text(self) -> str:
        if self.count is not None:
            return str(self.count)
        if self.fraction is not None:
            return f"{self.fraction:.4g}"
        return ""


@dataclass(frozen=True)
class Policy:
    """The thresholds of a rollout (stored with it, changed by ``ota resume``)."""

    waves: tuple[float, ...] = (1.0,)
    max_failure_rate: float = 0.0
    min_success: Success = field(default_factory=Success)
    #: Seconds a wave may stay open; then R5.
    wave_timeout: float = 1800.0
    max_ood_rate: float | None = None
    auto_fallback: bool = False
    #: Seconds a wave stays open at least, even when its devices have committed, so that
    #: OOD rates and quarantines can show (R3 waits for it).
    soak: float = 0.0

    def __post_init__(self) -> None:
        if not self.waves or self.wave_timeout <= 0:
            raise ValueError("a policy needs waves and a positive wave timeout")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError("max_failure_rate must be 0..1")
        if self.max_ood_rate is not None and not 0.0 <= self.max_ood_rate <= 1.0:
            raise ValueError("max_ood_rate must be 0..1")

    def to_obj(self) -> dict[str, Any]:
        return {
            "waves": list(self.waves),
            "max_failure_rate": self.max_failure_rate,
            "min_success": self.min_success.text(),
            "wave_timeout": self.wave_timeout,
            "max_ood_rate": self.max_ood_rate,
            "auto_fallback": self.auto_fallback,
            "soak": self.soak,
        }

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> Policy:
        ood = obj.get("max_ood_rate")
        return cls(
            waves=tuple(float(w) for w in obj["waves"]),
            max_failure_rate=float(obj.get("max_failure_rate", 0.0)),
            min_success=Success.parse(str(obj.get("min_success") or "")),
            wave_timeout=float(obj.get("wave_timeout", 1800.0)),
            max_ood_rate=None if ood is None else float(ood),
            auto_fallback=bool(obj.get("auto_fallback", False)),
            soak=float(obj.get("soak", 0.0)),
        )


def device_phase(
    model_status: Mapping[str, Any] | None, *, rollout: str, version: int
) -> tuple[str, str] | None:
    """(phase, reason) that a device's status says about this rollout, or None when it
    says nothing about it yet (an older status, another rollout)."""
    if not model_status:
        return None
    state = str(model_status.get("state", "idle"))
    reason = str(model_status.get("reason", ""))
    ours = model_status.get("rollout") == rollout and model_status.get("offered") == version
    if model_status.get("active") == version and (state == "committed" or not ours):
        return "committed", reason  # installed by this rollout, or had it already
    if not ours:
        return None
    if state in IN_PROGRESS:
        return state, reason
    if state in {"failed", "fallen-back"}:
        return state, reason
    return None


@dataclass(frozen=True)
class WaveTally:
    size: int
    committed: int
    failed: int
    in_progress: int
    by_phase: Mapping[str, int]
    #: Mean OOD rate over the wave's devices that run the new version (None: none do).
    ood_rate: float | None

    @property
    def failure_rate(self) -> float:
        return self.failed / self.size if self.size else 0.0


def tally(phases: Mapping[str, str], ood_rates: Mapping[str, float] | None = None) -> WaveTally:
    """Count a wave's devices by phase; ``ood_rates`` holds the reported OOD rate of the
    devices that run the new version."""
    by_phase = dict.fromkeys(PHASES, 0)
    for phase in phases.values():
        by_phase[phase] = by_phase.get(phase, 0) + 1
    rates = [r for d, r in (ood_rates or {}).items() if phases.get(d) == "committed"]
    return WaveTally(
        size=len(phases),
        committed=by_phase["committed"],
        failed=sum(by_phase[p] for p in FAILED),
        in_progress=sum(by_phase[p] for p in IN_PROGRESS),
        by_phase=by_phase,
        ood_rate=sum(rates) / len(rates) if rates else None,
    )


@dataclass(frozen=True)
class Verdict:
    """``wait``, ``pass`` (open the next wave, or ``done`` after the last) or ``halt``;
    ``timed_out``: the devices R5 counts as failed."""

    action: str
    reason: str = ""
    timed_out: tuple[str, ...] = ()


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def judge_wave(  # noqa: PLR0911 - one return per rule
    phases: Mapping[str, str],
    policy: Policy,
    *,
    opened_at: float,
    now: float,
    last: bool,
    ood_rates: Mapping[str, float] | None = None,
) -> Verdict:
    """The wave gate, rules R1-R6 (module docstring). ``phases``: device -> phase for this
    wave's devices; times in seconds on one clock."""
    t = tally(phases, ood_rates)
    passed = Verdict("done" if last else "pass")
    required = policy.min_success.required(t.size, policy.max_failure_rate)
    # R1
    if t.failure_rate > policy.max_failure_rate:
        return Verdict(
            "halt",
            f"R1: {t.failed} of {t.size} devices failed ({_pct(t.failure_rate)}, "
            f"over {_pct(policy.max_failure_rate)})",
        )
    # R2
    if policy.max_ood_rate is not None and t.ood_rate is not None:  # noqa: SIM102 - R2 reads so
        if t.ood_rate > policy.max_ood_rate:
            return Verdict(
                "halt",
                f"R2: OOD rate {_pct(t.ood_rate)} on the new version, "
                f"over {_pct(policy.max_ood_rate)}",
            )
    # R3
    if t.committed >= required and now - opened_at >= policy.soak:
        return Verdict(passed.action, f"R3: {t.committed} of {t.size} committed")
    if t.committed >= required:
        return Verdict("wait", "R3: soaking")
    # R4
    if t.in_progress == 0:
        return Verdict(
            "halt", f"R4: {t.committed} of {t.size} committed, {required} needed; none left"
        )
    # R5 (R3 did not pass, so the late devices, now failures, sink the wave)
    if now - opened_at >= policy.wave_timeout:
        late = tuple(sorted(d for d, p in phases.items() if p in IN_PROGRESS))
        return Verdict(
            "halt",
            f"R5: wave timed out after {policy.wave_timeout:.0f} s with {t.committed} of "
            f"{t.size} committed ({required} needed), {len(late)} not answering",
            late,
        )
    # R6
    return Verdict("wait")
