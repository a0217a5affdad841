"""Integrity-checked inference around an opened model.

A :class:`ServingModel` refuses to exist unless the bundle's golden vectors reproduce
within their tolerances. Each request is checked against the signed schema and input
profile, its outputs must be finite, and each row gets an out-of-distribution score.
While serving, the golden vectors are re-run and the decrypted sections, as the runtime
reads them (:meth:`OpenedModel.section_view`), re-hashed against the signed digests on a
schedule; a failure quarantines the model: it stops answering with
:class:`QuarantinedError` until the store falls back or a new bundle is installed.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.agent.opener import OpenedModel
from edgeseal.core.config import AgentConfig
from edgeseal.core.errors import EdgesealError
from edgeseal.core.extras import decode_extras
from edgeseal.core.golden import check_golden
from edgeseal.core.profile import CompiledProfile, InputTooLargeError, compile_profile

__all__ = ["InferResult", "IntegrityError", "QuarantinedError", "ServingModel"]

Array = npt.NDArray[Any]
_SUM = np.add.reduce


class IntegrityError(EdgesealError):
    """The model does not compute what was signed: golden vectors or digests differ."""

    hint = "the agent falls back to the previous bundle; reinstall the bundle or replace it"


class QuarantinedError(EdgesealError):
    """The model failed an integrity check while serving and answers no more calls."""


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, Array]
    ood: list[float] | None
    ood_rows: int
    model: dict[str, Any]


@dataclass
class Counters:
    requests: int = 0
    rows: int = 0
    ood_rows: int = 0
    rejected: int = 0
    golden_runs: int = 0
    digest_runs: int = 0


@dataclass
class ServingModel:
    opened: OpenedModel
    config: AgentConfig
    on_quarantine: Callable[[ServingModel, str], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    quarantined: str | None = None
    _since_golden: int = 0
    _last_golden: float = 0.0
    _last_digest: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # One integrity check at a time, held apart from ``_lock`` (the counters every call
    # takes) so that calls are not held up while the weights are hashed; and whether a
    # scheduled check was claimed and has not finished yet.
    _check_lock: threading.Lock = field(default_factory=threading.Lock)
    _check_claimed: bool = False
    _checks: CompiledProfile | None = None
    _identity: dict[str, Any] | None = None
    # Calls in flight, and whether a replacement took over: the memory is wiped only once
    # the last call using it is done (retire), never under a running session.
    _users: int = 0
    _retired: bool = False
    _use_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(
        cls,
        opened: OpenedModel,
        config: AgentConfig,
        on_quarantine: Callable[[ServingModel, str], None] | None = None,
    ) -> ServingModel:
        """Check the golden vectors, then serve; a model that fails is closed and refused."""
        try:
            buf = opened.buffers.get("extras")
            extras = decode_extras(bytes(buf.view)) if buf is not None else {}
            self = cls(opened, config, on_quarantine, extras)
            # Schema, ranges and OOD matrices compiled once: per-request work is only
            # the array operations themselves.
            profile = extras.get("profile")
            self._checks = compile_profile(
                profile if isinstance(profile, dict) else {},
                opened.manifest.inputs,
                max_rows=config.max_rows,
                range_margin=config.range_margin,
                max_elements=config.max_input_elements,
                dim_factor=config.profile_dim_factor,
            )
            m = opened.manifest
            self._identity = {"model": m.model_name, "version": m.version, "bundle_id": m.bundle_id}
            problems = self._golden_problems()
            if problems:
                raise IntegrityError(
                    f"{opened.manifest.model_name} v{opened.manifest.version} does not "
                    f"reproduce its golden vectors: {'; '.join(problems[:3])}"
                )
        except BaseException:
            opened.close()
            raise
        now = time.monotonic()
        self._last_golden = self._last_digest = now
        return self

    # -- identity --------------------------------------------------------------------

    @property
    def max_input_elements(self) -> int:
        """Input elements a call may carry (the compiled bound)."""
        assert self._checks is not None, "start() compiles the checks"
        return self._checks.max_elements

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            m = self.opened.manifest
            self._identity = {
                "model": m.model_name,
                "version": m.version,
                "bundle_id": m.bundle_id,
            }
        return dict(self._identity)

    # -- checks ----------------------------------------------------------------------

    def _golden_problems(self) -> list[str]:
        golden = self.extras.get("golden")
        if not golden or not golden.get("vectors"):
            return []
        self.counters.golden_runs += 1
        return check_golden(self.opened.run, golden)

    def _digest_problems(self) -> list[str]:
        self.counters.digest_runs += 1
        problems = []
        for entry in self.opened.manifest.sections:
            # The bytes the runtime reads: for TFLite, LiteRT's own copy of the graph
            # section, not the locked buffer it was copied from.
            view = self.opened.section_view(entry.name)
            if view is None:
                continue
            if hashlib.sha256(view).hexdigest() != entry.sha256:
                problems.append(f"section {entry.name} in memory no longer matches its digest")
        return problems

    def self_check(self, *, golden: bool = True, digest: bool = True) -> list[str]:
        """Run the checks now; quarantine on failure. Returns the problems found."""
        with self._check_lock:
            problems = self._run_checks(golden=golden, digest=digest)
        if problems:
            self.quarantine("; ".join(problems))
        return problems

    def _run_checks(self, *, golden: bool, digest: bool) -> list[str]:
        """The checks asked for, with ``_check_lock`` held; then the schedule restarts."""
        problems = (self._digest_problems() if digest else []) + (
            self._golden_problems() if golden else []
        )
        now = time.monotonic()
        with self._lock:
            if golden:
                self._last_golden, self._since_golden = now, 0
            if digest:
                self._last_digest = now
        return problems

    def claim_due_checks(self, now: float | None = None) -> bool:
        """True, for one caller only, when a scheduled check is due and none is claimed
        yet: that caller then runs :meth:`run_due_checks` (on a thread of its choice)."""
        golden, digest = self.due_checks(now)
        if not (golden or digest):
            return False
        with self._lock:
            if self._check_claimed:
                return False
            self._check_claimed = True
            return True

    def run_due_checks(self) -> list[str]:
        """Run the scheduled checks that are due now and release the claim; quarantine on
        failure. A check that cannot run at all (the runtime fails on the golden vectors)
        quarantines too: the model's integrity can no longer be shown. Returns the
        problems found."""
        try:
            with self._check_lock:
                golden, digest = self.due_checks()
                if not (golden or digest):
                    return []
                try:
                    problems = self._run_checks(golden=golden, digest=digest)
                except Exception as e:  # any failure here is the model's
                    problems = [f"the scheduled integrity check failed to run: {e}"]
        finally:
            with self._lock:
                self._check_claimed = False
        if problems:
            self.quarantine("; ".join(problems))
        return problems

    def due_checks(self, now: float | None = None) -> tuple[bool, bool]:
        """(golden due, digest due) by the configured schedule."""
        now = time.monotonic() if now is None else now
        c = self.config
        golden = (
            c.golden_every_requests > 0 and self._since_golden >= c.golden_every_requests
        ) or (c.golden_every_seconds > 0 and now - self._last_golden >= c.golden_every_seconds)
        digest = c.digest_every_seconds > 0 and now - self._last_digest >= c.digest_every_seconds
        return golden, digest

    def quarantine(self, reason: str) -> None:
        if self.quarantined is not None:
            return
        self.quarantined = reason
        if self.on_quarantine is not None:
            self.on_quarantine(self, reason)

    # -- serving ---------------------------------------------------------------------

    def infer(self, feed: Mapping[str, Array]) -> InferResult:
        """Check ``feed``, run it, check the outputs and score the rows.

        Every check runs on every call, vectorised over the whole batch: names, dtypes,
        shapes and rows per call from the compiled schema; finiteness and range from two
        reductions per input (:meth:`CompiledProfile.check`); finite outputs (one sum
        each); one OOD score per row from precomputed matrices. No input is copied.
        """
        if self.quarantined is not None:
            raise QuarantinedError(
                f"{self.identity['model']} v{self.identity['version']} is quarantined: "
                f"{self.quarantined}"
            )
        checks = self._checks
        assert checks is not None, "start() compiles the checks"
        try:
            checks.check(feed)
        except EdgesealError:
            self.counters.rejected += 1
            raise
        outputs = self.opened.run(feed)
        size = 0
        for value in outputs.values():
            if isinstance(value, np.ndarray):
                size += value.nbytes
        if size > self.config.max_output_bytes:
            self.counters.rejected += 1
            raise InputTooLargeError(
                f"the outputs would be {size} bytes, at most {self.config.max_output_bytes} "
                "(agent.max_output_bytes)"
            )
        for name, value in outputs.items():
            # Any NaN or infinity makes the sum non-finite; a finite sum's overflow is
            # the only false alarm, and the exact check below clears it.
            if (
                isinstance(value, np.ndarray)
                and value.dtype.kind == "f"
                and not math.isfinite(_SUM(value, axis=None))
                and not np.isfinite(value).all()
            ):
                self.counters.rejected += 1
                raise IntegrityError(f"output {name} has NaN or infinite values")
        ood_rows = 0
        ood = None
        if checks.scorers:
            # Plain floats from here: a batch's scores are a few, and the list goes out
            # in the answer anyway (NaN is above no threshold, as in numpy).
            scores = checks.scores(feed)
            if scores is not None:
                threshold = self.config.ood_threshold
                values = scores.tolist()
                ood_rows = sum(1 for s in values if s > threshold)
                ood = [round(s, 4) for s in values]
        # Rows are counted on the first input that has a batch axis (a scalar input, such
        # as a sample rate, has none); a feed of scalars only is one row. The feed passed
        # the schema check: its values are arrays.
        rows = next((v.shape[0] for v in feed.values() if v.ndim), 1 if feed else 0)
        with self._lock:
            c = self.counters
            c.requests += 1
            c.rows += rows
            c.ood_rows += ood_rows
            self._since_golden += 1
        return InferResult(outputs, ood, ood_rows, self.identity)

    def info(self) -> dict[str, Any]:
        m = self.opened.manifest
        return {
            **self.identity,
            "format": m.model_format,
            "inputs": [t.to_obj() for t in m.inputs],
            "outputs": [t.to_obj() for t in m.outputs],
            "profile": {
                name: {k: e[k] for k in ("dtype", "shape", "min", "max")}  # scalars only
                for name, e in (self.extras.get("profile") or {}).get("inputs", {}).items()
            },
            "golden_vectors": len((self.extras.get("golden") or {}).get("vectors", [])),
        }

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            **self.opened.status(),
            "quarantined": self.quarantined,
            "requests": c.requests,
            "rows": c.rows,
            "ood_rows": c.ood_rows,
            "rejected": c.rejected,
            "golden_runs": c.golden_runs,
            "digest_runs": c.digest_runs,
        }

    def close(self) -> None:
        """Close now (the caller knows no call is using the model)."""
        self.opened.close()

    @property
    def retired(self) -> bool:
        return self._retired

    def acquire(self) -> bool:
        """Count a call in; False once the model is retired (its replacement serves)."""
        with self._use_lock:
            if self._retired:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        """Count a call out; the last one out of a retired model closes it."""
        with self._use_lock:
            self._users -= 1
            last = self._retired and self._users == 0
        if last:
            self.opened.close()

    def retire(self) -> None:
        """No new calls; close once the calls in flight are done (at once if none is)."""
        with self._use_lock:
            if self._retired:
                return
            self._retired = True
            idle = self._users == 0
        if idle:
            self.opened.close()
