"""Who may call which model, how often, and what they get back. Pure logic.

Callers are identified by the kernel (the socket's peer credentials), never by anything
they send. A model's rule is the first ``[access."<glob>"]`` that matches its name; root
and the agent's own uid may always call. Without a rule nobody else may.

Rate limits are token buckets per (caller uid, model); daily budgets count rows per
(caller uid, model) per UTC day. Output hardening keeps the top k scores of each row
(the others become 0) and rounds them, to make model extraction by querying costlier.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.config import AccessRule
from edgeseal.core.errors import EdgesealError

__all__ = ["AccessControl", "AccessDeniedError", "BudgetExceededError", "Caller", "harden"]


class AccessDeniedError(EdgesealError):
    """The caller's uid and groups are not allowed to call this model (HTTP 403)."""

    hint = "add the caller's uid or group to [access.\"<model>\"] in the agent's config"


class BudgetExceededError(EdgesealError):
    """The caller's rate limit or daily query budget for this model is used up (HTTP 429)."""


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()

    def to_obj(self) -> dict[str, int]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid}


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class AccessControl:
    rules: Sequence[tuple[str, AccessRule]]
    agent_uid: int
    clock: Callable[[], float]
    group_ids: Callable[[str], int | None]
    #: Callers who may always call (root and the agent's uid unless told otherwise).
    trusted_uids: tuple[int, ...] | None = None
    _buckets: dict[tuple[int, str], _Bucket] = field(default_factory=dict)
    _spent: dict[tuple[int, str, int], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def rule_for(self, model: str) -> AccessRule | None:
        return next((r for g, r in self.rules if fnmatch.fnmatchcase(model, g)), None)

    def trusted(self, caller: Caller) -> bool:
        """Root and the agent's uid (unless told otherwise): who may always call."""
        trusted = (0, self.agent_uid) if self.trusted_uids is None else self.trusted_uids
        return caller.uid in trusted

    def listed(self, caller: Caller) -> bool:
        """Whether any rule names the caller (or it is trusted): who may hold the
        connections kept back from everyone else."""
        if self.trusted(caller):
            return True
        gids = {caller.gid, *caller.groups}
        for _, rule in self.rules:
            if caller.uid in rule.uids:
                return True
            if any(self.group_ids(name) in gids for name in rule.groups):
                return True
        return False

    def check(self, caller: Caller, model: str) -> AccessRule | None:
        """Raise AccessDeniedError unless the caller may call ``model``; the rule that applies."""
        rule = self.rule_for(model)
        trusted = (0, self.agent_uid) if self.trusted_uids is None else self.trusted_uids
        if caller.uid in trusted:
            return rule
        if rule is not None:
            if caller.uid in rule.uids:
                return rule
            gids = {caller.gid, *caller.groups}
            for name in rule.groups:
                gid = self.group_ids(name)
                if gid is not None and gid in gids:
                    return rule
        raise AccessDeniedError(f"uid {caller.uid} may not call model {model!r}")

    def spend(self, caller: Caller, model: str, rule: AccessRule | None, rows: int) -> None:
        """Take one request from the rate limit and ``rows`` from the daily budget."""
        self.take_request(caller, model, rule)
        self.spend_rows(caller, model, rule, rows)

    def take_request(self, caller: Caller, model: str, rule: AccessRule | None) -> None:
        """Take one request from the rate limit (before its body is read)."""
        if rule is None or rule.rate_per_minute <= 0:
            return
        now = self.clock()
        key = (caller.uid, model)
        with self._lock:
            cap = float(rule.rate_per_minute)
            b = self._buckets.get(key) or _Bucket(cap, now)
            b.tokens = min(cap, b.tokens + (now - b.stamp) * cap / 60.0)
            b.stamp = now
            if b.tokens < 1.0:
                self._buckets[key] = b
                wait = (1.0 - b.tokens) * 60.0 / cap
                raise BudgetExceededError(
                    f"rate limit for {model!r}: {rule.rate_per_minute} requests a minute "
                    f"(retry in {wait:.1f} s)"
                )
            b.tokens -= 1.0
            self._buckets[key] = b

    def spend_rows(self, caller: Caller, model: str, rule: AccessRule | None, rows: int) -> None:
        """Take ``rows`` from the daily budget (once the body says how many)."""
        if rule is None or rule.daily_budget <= 0:
            return
        now = self.clock()
        with self._lock:
            day = int(now // 86400)
            spent_key = (caller.uid, model, day)
            spent = self._spent.get(spent_key, 0)
            if spent + rows > rule.daily_budget:
                raise BudgetExceededError(
                    f"daily budget for {model!r} is used up: {spent} of "
                    f"{rule.daily_budget} rows today (UTC)"
                )
            self._spent = {k: v for k, v in self._spent.items() if k[2] == day}
            self._spent[spent_key] = spent + rows


def harden(
    outputs: Mapping[str, npt.NDArray[Any]], rule: AccessRule | None
) -> dict[str, npt.NDArray[Any]]:
    """Top-k and rounding per the rule, on float outputs of shape [rows, classes]."""
    if rule is None or (rule.top_k <= 0 and rule.round_digits < 0):
        return dict(outputs)
    out = {}
    for name, a in outputs.items():
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            out[name] = a
            continue
        v = a.copy()
        if rule.top_k > 0 and v.ndim == 2 and v.shape[1] > rule.top_k:
            drop = np.argsort(v, axis=1)[:, : v.shape[1] - rule.top_k]
            np.put_along_axis(v, drop, 0.0, axis=1)
        if rule.round_digits >= 0:
            v = np.round(v, rule.round_digits)
        out[name] = v
    return out
