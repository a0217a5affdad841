"""Where the controller keeps rollouts: SQLite by default, PostgreSQL for several
controllers. Provisional API.

One small interface, :class:`RolloutStore`, two implementations sharing their SQL:
:class:`SqliteStore` (one file, WAL, default ``<keyring>/fleet/rollouts.sqlite``) and
:class:`PostgresStore` (psycopg 3; ``pip install 'edgeseal-ota[postgres]'``).
:func:`open_store` picks one from a path or a ``postgresql://`` URL.

What is kept: rollouts (bundle, target, policy, state, current wave), their waves (devices,
when opened and closed, the verdict), each device's phase in each rollout, every device's
last status and when it was last seen, the last **sequence number** used per signer, and
which controller **drives** each rollout (a lease, :meth:`RolloutStore.claim_rollout`).
:meth:`RolloutStore.next_seq` reserves a number in its own committed transaction before
the message carrying it is signed, so a number is never used twice, even across a crash
or between controllers sharing a PostgreSQL database. Wave transitions are guarded the
same way: :meth:`RolloutStore.close_wave` closes a wave once, and only the caller that
closed it acts on the verdict.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeseal.core.errors import EdgesealError
from edgeseal.ota.rollout import Policy

__all__ = [
    "DeviceRow",
    "PhaseRow",
    "PostgresStore",
    "RolloutRecord",
    "RolloutStore",
    "RolloutStoreError",
    "SqliteStore",
    "WaveRecord",
    "default_store_path",
    "open_store",
]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollouts (
        id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL, model TEXT NOT NULL,
        version BIGINT NOT NULL, bundle_id TEXT NOT NULL, bundle_path TEXT NOT NULL,
        target TEXT NOT NULL, signer TEXT NOT NULL, policy TEXT NOT NULL,
        chunk_bytes BIGINT NOT NULL, group_offer BIGINT NOT NULL, state TEXT NOT NULL,
        reason TEXT NOT NULL, wave BIGINT NOT NULL, updated DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS waves (
        rollout TEXT NOT NULL, idx BIGINT NOT NULL, opened_at DOUBLE PRECISION,
        closed_at DOUBLE PRECISION, verdict TEXT NOT NULL, PRIMARY KEY (rollout, idx))""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout TEXT NOT NULL, device TEXT NOT NULL, wave BIGINT NOT NULL,
        phase TEXT NOT NULL, reason TEXT NOT NULL, ood_rate DOUBLE PRECISION,
        offered_at DOUBLE PRECISION, updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (rollout, device))""",
    """CREATE TABLE IF NOT EXISTS devices (
        device TEXT PRIMARY KEY, last_seen DOUBLE PRECISION NOT NULL, status TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS seqs (signer TEXT PRIMARY KEY, last BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS drivers (
        rollout TEXT PRIMARY KEY, owner TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)""",
)
#: Devices per ``IN (...)`` list (SQLite allows 32,766 parameters).
_IN_BATCH = 500


class RolloutStoreError(EdgesealError):
    """The rollout store cannot be opened or used."""

    hint = "check --store (a SQLite path or a postgresql:// URL) and that it is reachable"


def default_store_path(keys_dir: Path) -> Path:
    return Path(keys_dir) / "fleet" / "rollouts.sqlite"


@dataclass(frozen=True)
class RolloutRecord:
    id: str
    created: float
    model: str
    version: int
    bundle_id: str
    bundle_path: str
    target: str  # the group
    signer: str
    policy: Policy
    chunk_bytes: int
    #: One signed offer to the group topic per wave-less rollout, instead of one per device.
    group_offer: bool = False
    state: str = "running"
    reason: str = ""
    wave: int = 0
    updated: float = 0.0


@dataclass(frozen=True)
class WaveRecord:
    index: int
    devices: tuple[str, ...]
    opened_at: float | None
    closed_at: float | None
    verdict: str


@dataclass(frozen=True)
class PhaseRow:
    device: str
    wave: int
    phase: str
    reason: str
    ood_rate: float | None
    offered_at: float | None
    updated: float


@dataclass(frozen=True)
class DeviceRow:
    device: str
    last_seen: float
    status: Mapping[str, Any] = field(default_factory=dict)


class RolloutStore:
    """The interface (and the SQL both implementations share). Thread-safe."""

    placeholder = "?"

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # -- the driver-specific part -------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[Any]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _exec(self, cur: Any, sql: str, args: Sequence[Any] = ()) -> Any:
        return cur.execute(self._q(sql), tuple(args))

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _init_schema(self) -> None:
        with self._tx() as cur:
            for stmt in _SCHEMA:
                self._exec(cur, stmt)

    # -- sequence numbers ---------------------------------------------------------------
    def next_seq(self, signer: str, floor: int = 0) -> int:
        """Reserve the next sequence number for ``signer`` (a key id): above every number
        this store has handed out, and at least ``floor`` (a clock, so a new store for an
        old signer still goes forward). Committed before it returns."""
        with self._lock, self._tx() as cur:
            self._exec(
                cur,
                "INSERT INTO seqs (signer, last) VALUES (?, ?) ON CONFLICT (signer) DO UPDATE"
                " SET last = CASE WHEN seqs.last + 1 > ? THEN seqs.last + 1 ELSE ? END",
                (signer, floor, floor, floor),
            )
            row = self._exec(cur, "SELECT last FROM seqs WHERE signer = ?", (signer,)).fetchone()
            return int(row[0])

    # -- rollouts -----------------------------------------------------------------------
    def create_rollout(self, r: RolloutRecord, waves: Sequence[Sequence[str]]) -> None:
        with self._lock, self._tx() as cur:
            self._exec(
                cur,
                "INSERT INTO rollouts (id, created, model, version, bundle_id, bundle_path,"
                " target, signer, policy, chunk_bytes, group_offer, state, reason, wave,"
                " updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id, r.created, r.model, r.version, r.bundle_id, r.bundle_path,
                    r.target, r.signer, json.dumps(r.policy.to_obj()), r.chunk_bytes,
                    int(r.group_offer), r.state, r.reason, r.wave, r.created,
                ),
            )  # fmt: skip
            for idx, devices in enumerate(waves):
                self._exec(
                    cur,
                    "INSERT INTO waves (rollout, idx, opened_at, closed_at, verdict)"
                    " VALUES (?, ?, NULL, NULL, '')",
                    (r.id, idx),
                )
                for d in devices:
                    self._exec(
                        cur,
                        "INSERT INTO rollout_devices (rollout, device, wave, phase, reason,"
                        " ood_rate, offered_at, updated) VALUES (?, ?, ?, '', '', NULL, NULL, ?)",
                        (r.id, d, idx, r.created),
                    )

    @staticmethod
    def _rollout(row: Sequence[Any]) -> RolloutRecord:
        return RolloutRecord(
            id=row[0], created=float(row[1]), model=row[2], version=int(row[3]),
            bundle_id=row[4], bundle_path=row[5], target=row[6], signer=row[7],
            policy=Policy.from_obj(json.loads(row[8])), chunk_bytes=int(row[9]),
            group_offer=bool(row[10]), state=row[11], reason=row[12], wave=int(row[13]),
            updated=float(row[14]),
        )  # fmt: skip

    _COLUMNS = (
        "id, created, model, version, bundle_id, bundle_path, target, signer, policy,"
        " chunk_bytes, group_offer, state, reason, wave, updated"
    )

    def rollout(self, rollout_id: str) -> RolloutRecord | None:
        with self._lock, self._tx() as cur:
            row = self._exec(
                cur,
                f"SELECT {self._COLUMNS} FROM rollouts WHERE id = ?",  # noqa: S608  # nosec B608: constant column list
                (rollout_id,),
            ).fetchone()
        return self._rollout(row) if row else None

    def rollouts(self, *, state: str | None = None, limit: int = 50) -> list[RolloutRecord]:
        """Newest first."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        with self._lock, self._tx() as cur:
            rows = self._exec(
                cur,
                f"SELECT {self._COLUMNS} FROM rollouts {where}"  # noqa: S608  # nosec B608: constant columns and clause
                " ORDER BY created DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [self._rollout(r) for r in rows]

    def update_rollout(
        self,
        rollout_id: str,
        *,
        now: float,
        state: str | None = None,
        reason: str | None = None,
        wave: int | None = None,
        policy: Policy | None = None,
    ) -> None:
        sets: list[str] = ["updated = ?"]
        args: list[Any] = [now]
        for col, value in (("state", state), ("reason", reason), ("wave", wave)):
            if value is not None:
                sets.append(f"{col} = ?")
                args.append(value)
        if policy is not None:
            sets.append("policy = ?")
            args.append(json.dumps(policy.to_obj()))
        with self._lock, self._tx() as cur:
            self._exec(
                cur,
                f"UPDATE rollouts SET {', '.join(sets)} WHERE id = ?",  # noqa: S608  # nosec B608: fixed column names
                (*args, rollout_id),
            )

    # -- waves --------------------------------------------------------------------------
    def waves(self, rollout_id: str) -> list[WaveRecord]:
        with self._lock, self._tx() as cur:
            rows = self._exec(
                cur,
                "SELECT idx, opened_at, closed_at, verdict FROM waves WHERE rollout = ?"
                " ORDER BY idx",
                (rollout_id,),
            ).fetchall()
            members = self._exec(
                cur,
                "SELECT wave, device FROM rollout_devices WHERE rollout = ? ORDER BY device",
                (rollout_id,),
            ).fetchall()
        by_wave: dict[int, list[str]] = {}
        for w, d in members:
            by_wave.setdefault(int(w), []).append(d)
        return [WaveRecord(int(i), tuple(by_wave.get(int(i), ())), o, c, v) for i, o, c, v in rows]

    def open_wave(self, rollout_id: str, index: int, now: float) -> None:
        with self._lock, self._tx() as cur:
            self._exec(
                cur,
                "UPDATE waves SET opened_at = ? WHERE rollout = ? AND idx = ?"
                " AND opened_at IS NULL",
                (now, rollout_id, index),
            )
            self._exec(
                cur, "UPDATE rollouts SET wave = ?, updated = ? WHERE id = ?",
                (index, now, rollout_id),
            )  # fmt: skip

    def close_wave(self, rollout_id: str, index: int, verdict: str, now: float) -> bool:
        """Close an open wave with its verdict. False when it was closed already (by
        another controller): the caller then must not act on its own verdict."""
        with self._lock, self._tx() as cur:
            done = self._exec(
                cur,
                "UPDATE waves SET closed_at = ?, verdict = ? WHERE rollout = ? AND idx = ?"
                " AND closed_at IS NULL",
                (now, verdict, rollout_id, index),
            )
            return bool(done.rowcount == 1)

    def reopen_wave(self, rollout_id: str, index: int, now: float) -> None:
        """``ota resume``: the halted wave's clock starts again, and its devices that never
        started or timed out are to be offered again."""
        with self._lock, self._tx() as cur:
            self._exec(
                cur,
                "UPDATE waves SET opened_at = ?, closed_at = NULL, verdict = ''"
                " WHERE rollout = ? AND idx = ?",
                (now, rollout_id, index),
            )
            self._exec(
                cur,
                "UPDATE rollout_devices SET offered_at = NULL, phase = '', reason = ''"
                " WHERE rollout = ? AND wave = ? AND phase IN ('', 'offered', 'timed-out')",
                (rollout_id, index),
            )

    # -- who drives a rollout -------------------------------------------------------------
    def claim_rollout(
        self, rollout_id: str, owner: str, *, now: float, ttl: float, force: bool = False
    ) -> bool:
        """Take or renew the lease to drive (judge, advance, offer) a rollout for ``ttl``
        seconds. True when ``owner`` holds it: it was free, lapsed, already ``owner``'s,
        or ``force`` (``deploy`` and ``resume``: the operator says who drives)."""
        with self._lock, self._tx() as cur:
            self._exec(
                cur,
                "INSERT INTO drivers (rollout, owner, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (rollout) DO UPDATE SET owner = excluded.owner,"
                " expires = excluded.expires"
                " WHERE ? = 1 OR drivers.owner = excluded.owner OR drivers.expires < ?",
                (rollout_id, owner, now + ttl, int(force), now),
            )
            row = self._exec(
                cur, "SELECT owner FROM drivers WHERE rollout = ?", (rollout_id,)
            ).fetchone()
        return row is not None and row[0] == owner

    # -- devices in a rollout -------------------------------------------------------------
    def phases(self, rollout_id: str) -> dict[str, PhaseRow]:
        with self._lock, self._tx() as cur:
            rows = self._exec(
                cur,
                "SELECT device, wave, phase, reason, ood_rate, offered_at, updated"
                " FROM rollout_devices WHERE rollout = ?",
                (rollout_id,),
            ).fetchall()
        return {r[0]: PhaseRow(r[0], int(r[1]), r[2], r[3], r[4], r[5], float(r[6])) for r in rows}

    def mark_offered(self, rollout_id: str, devices: Iterable[str], now: float) -> None:
        with self._lock, self._tx() as cur:
            for d in sorted(devices):  # rows locked in one order: no deadlock between stores
                self._exec(
                    cur,
                    "UPDATE rollout_devices SET offered_at = ?, updated = ?,"
                    " phase = CASE WHEN phase = '' THEN 'offered' ELSE phase END"
                    " WHERE rollout = ? AND device = ?",
                    (now, now, rollout_id, d),
                )

    def set_phases(
        self,
        rollout_id: str,
        updates: Mapping[str, tuple[str, str, float | None]],
        now: float,
    ) -> None:
        """``updates``: device -> (phase, reason, OOD rate or None)."""
        if not updates:
            return
        with self._lock, self._tx() as cur:
            for d, (phase, reason, ood) in sorted(updates.items()):
                self._exec(
                    cur,
                    "UPDATE rollout_devices SET phase = ?, reason = ?, ood_rate = ?,"
                    " updated = ? WHERE rollout = ? AND device = ?",
                    (phase, reason[:500], ood, now, rollout_id, d),
                )

    # -- the fleet's last word ------------------------------------------------------------
    def record_statuses(self, statuses: Mapping[str, tuple[float, Mapping[str, Any]]]) -> None:
        """``statuses``: device -> (seen at, its status document). A status seen before
        the one stored does not replace it (controllers sharing the store write what each
        received; one that writes late must not put a device back in time). Rows are
        written in device order, so two controllers' writes cannot deadlock."""
        if not statuses:
            return
        with self._lock, self._tx() as cur:
            for d, (seen, status) in sorted(statuses.items()):
                self._exec(
                    cur,
                    "INSERT INTO devices (device, last_seen, status) VALUES (?, ?, ?)"
                    " ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen,"
                    " status = excluded.status WHERE excluded.last_seen >= devices.last_seen",
                    (d, seen, json.dumps(dict(status), sort_keys=True)),
                )

    def statuses(self, devices: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The last status stored for each of ``devices`` (those never heard are absent)."""
        return {d: st for d, (_, st) in self.statuses_seen(devices).items()}

    def statuses_seen(self, devices: Sequence[str]) -> dict[str, tuple[float, dict[str, Any]]]:
        """(when it was seen, the last status) for each of ``devices`` heard from."""
        out: dict[str, tuple[float, dict[str, Any]]] = {}
        with self._lock, self._tx() as cur:
            for i in range(0, len(devices), _IN_BATCH):
                batch = devices[i : i + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                rows = self._exec(
                    cur,
                    f"SELECT device, last_seen, status FROM devices WHERE device IN ({marks})",  # noqa: S608  # nosec B608: placeholders only
                    batch,
                ).fetchall()
                out.update((r[0], (float(r[1]), json.loads(r[2]))) for r in rows)
        return out

    def devices(self) -> list[DeviceRow]:
        with self._lock, self._tx() as cur:
            rows = self._exec(
                cur, "SELECT device, last_seen, status FROM devices ORDER BY device"
            ).fetchall()
        return [DeviceRow(r[0], float(r[1]), json.loads(r[2])) for r in rows]


class SqliteStore(RolloutStore):
    """One SQLite file in WAL mode (several readers, one writer at a time: one controller
    per rollout, any number of ``ota status`` readers)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except sqlite3.Error as e:
            raise RolloutStoreError(f"cannot open the rollout store {self.path}: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.rollback()
                raise RolloutStoreError(f"rollout store {self.path}: {e}") from e
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise
            finally:
                cur.close()

    def close(self) -> None:
        self._db.close()


class PostgresStore(RolloutStore):
    """The same tables in PostgreSQL (psycopg 3), for several controllers."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError as e:
            raise RolloutStoreError(
                "a postgresql:// store needs psycopg: pip install 'edgeseal-ota[postgres]'"
            ) from e
        self._psycopg = psycopg
        try:
            self._db = psycopg.connect(url, autocommit=True)
            self._init_schema()
        except psycopg.Error as e:
            raise RolloutStoreError(f"cannot open the PostgreSQL rollout store: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            try:
                with self._db.transaction(), self._db.cursor() as cur:
                    yield cur
            except self._psycopg.Error as e:
                raise RolloutStoreError(f"PostgreSQL rollout store: {e}") from e

    def close(self) -> None:
        self._db.close()


def open_store(where: str | Path) -> RolloutStore:
    """A ``postgresql://`` (or ``postgres://``) URL opens :class:`PostgresStore`; anything
    else is a SQLite file path."""
    text = str(where)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    return SqliteStore(Path(text))
