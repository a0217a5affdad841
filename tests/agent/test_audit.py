"""The audit log: an intact chain verifies; edits, removals, a cut tail, a rollback and a torn
line are each reported by name; rotation and concurrent appends keep one valid chain."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from edgeseal.agent.audit import COUNTER, ZERO_HASH, AuditError, AuditLog, verify_log
from edgeseal.core import cli
from edgeseal.hardware.floors import FileFloors


def call(i: int) -> dict[str, object]:
    return {"uid": 1000, "model": "classifier", "version": 3, "result": i % 10, "ood": False}


def write_log(path: Path, n: int, floors: FileFloors | None = None, **kw: int) -> None:
    with AuditLog(path, floors, **kw) as audit:
        for i in range(n):
            audit.append(call(i))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def sha(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.log"


@pytest.fixture
def floors(tmp_path: Path) -> FileFloors:
    """Stands in for the TPM counter: kept apart from the log, only ever rises."""
    return FileFloors(tmp_path / "counter" / "floors.json")


def test_an_intact_log_verifies_and_each_record_chains_to_the_one_before(log_path, floors):
    written = []
    with AuditLog(log_path, floors) as audit:
        for i in range(10):
            written.append(audit.append(call(i)))

    report = verify_log(log_path, floors)
    assert report.ok, report.problems
    assert (report.records, report.unanchored) == (10, 0)
    raw = lines(log_path)
    assert [r["seq"] for r in written] == list(range(10))
    assert written[0]["prev"] == ZERO_HASH
    assert all(written[i]["prev"] == sha(raw[i - 1]) for i in range(1, 10))
    assert json.loads(raw[3]) == written[3]
    assert written[3]["uid"] == 1000
    assert written[3]["time"].endswith("Z")
    anchor = json.loads(log_path.with_name("audit.log.anchor").read_bytes())
    assert anchor == {"count": 10, "head": sha(raw[-1]), "first_seq": 0}
    assert floors.get(COUNTER) == 10


def test_an_edited_middle_line_is_detected(log_path):
    write_log(log_path, 6)
    raw = lines(log_path)
    record = json.loads(raw[2])
    record["result"] = 7  # a different answer, still valid JSON with the old prev
    raw[2] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    log_path.write_bytes(b"".join(raw))

    report = verify_log(log_path)
    assert not report.ok
    assert report.problems == [
        "audit.log line 4: prev does not match audit.log line 3 (edited or removed)"
    ]


def test_an_edited_last_line_is_detected_by_the_anchor_head(log_path):
    write_log(log_path, 4)
    raw = lines(log_path)
    raw[-1] = raw[-1].replace(b'"result":3', b'"result":9')
    log_path.write_bytes(b"".join(raw))

    report = verify_log(log_path)
    assert report.problems == [
        "record seq 3 does not match the anchor's head hash (the last anchored record was edited)"
    ]


def test_a_removed_middle_line_is_detected(log_path):
    write_log(log_path, 6)
    raw = lines(log_path)
    del raw[2]
    log_path.write_bytes(b"".join(raw))

    report = verify_log(log_path)
    assert not report.ok
    assert report.records == 5
    assert "audit.log line 3: seq 3 follows seq 1 in audit.log line 2" in report.problems[0]
    assert report.problems[1] == (
        "audit.log line 3: prev does not match audit.log line 2 (edited or removed)"
    )


def test_a_cut_off_tail_is_detected_by_the_anchor_and_refused_on_reopen(log_path):
    write_log(log_path, 6)
    log_path.write_bytes(b"".join(lines(log_path)[:4]))  # whole lines: the chain is intact

    report = verify_log(log_path)
    assert report.problems == ["log ends at 4 records but the anchor says 6 (tail cut off)"]
    with pytest.raises(AuditError, match="tail cut off"):
        AuditLog(log_path)
    assert len(lines(log_path)) == 4  # the evidence was not appended over


def test_a_rolled_back_log_and_anchor_are_detected_by_the_monotonic_counter(
    log_path, floors, tmp_path
):
    anchor = log_path.with_name("audit.log.anchor")
    write_log(log_path, 3, floors)
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copy2(log_path, saved / "audit.log")
    shutil.copy2(anchor, saved / "audit.log.anchor")
    write_log(log_path, 2, floors)  # reopens and continues: 5 records
    shutil.copy2(saved / "audit.log", log_path)  # both put back as they were at 3
    shutil.copy2(saved / "audit.log.anchor", anchor)

    assert verify_log(log_path).ok  # without the counter the older copy is consistent
    report = verify_log(log_path, floors)
    assert report.problems == [
        "anchor count 3 is below the monotonic counter 5 (log and anchor rolled back)"
    ]
    with pytest.raises(AuditError, match="rolled back"):
        AuditLog(log_path, floors)


def test_a_torn_last_line_is_reported_then_truncated_on_reopen_and_the_chain_continues(
    log_path,
):
    write_log(log_path, 3)
    complete = log_path.read_bytes()
    with log_path.open("ab") as f:
        f.write(b'{"model":"classifier","ood":fal')  # power cut mid-write

    report = verify_log(log_path)
    assert report.records == 3
    assert report.problems == ["audit.log line 4: torn last line (no newline: a write was cut off)"]

    with AuditLog(log_path) as audit:
        assert log_path.read_bytes() == complete
        record = audit.append(call(3))
    assert record["seq"] == 3
    assert record["prev"] == sha(lines(log_path)[2])
    report = verify_log(log_path)
    assert report.ok, report.problems
    assert report.records == 4


def test_rotation_keeps_the_chain_verifiable_across_segments_and_drops_old_ones(log_path):
    write_log(log_path, 40, max_bytes=600, keep=2)

    names = sorted(p.name for p in log_path.parent.iterdir() if not p.name.startswith("."))
    assert names == [
        "audit.log",
        "audit.log.1",
        "audit.log.2",
        "audit.log.anchor",
        "audit.log.lock",
    ]
    oldest, newer = (
        lines(log_path.with_name("audit.log.2")),
        lines(log_path.with_name("audit.log.1")),
    )
    current = lines(log_path)
    assert json.loads(newer[0])["prev"] == sha(oldest[-1])  # chained across the rotation
    assert json.loads(current[0])["prev"] == sha(newer[-1])
    first_kept = json.loads(oldest[0])["seq"]
    assert first_kept > 0  # the oldest segments were dropped
    anchor = json.loads(log_path.with_name("audit.log.anchor").read_bytes())
    assert anchor["first_seq"] == first_kept
    assert json.loads(current[-1])["seq"] == 39

    report = verify_log(log_path)
    assert report.ok, report.problems
    assert report.records == 40 - first_kept

    log_path.with_name("audit.log.2").unlink()  # someone removes the oldest kept segment
    report = verify_log(log_path)
    assert len(report.problems) == 1
    assert "(oldest records removed)" in report.problems[0]


def test_concurrent_appends_from_four_threads_form_one_valid_chain(log_path, floors):
    with AuditLog(log_path, floors, max_bytes=4000) as audit:

        def worker(t: int) -> None:
            for i in range(25):
                audit.append({"uid": t, "model": "classifier", "version": 1, "result": i})

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    report = verify_log(log_path, floors)
    assert report.ok, report.problems
    assert report.records == 100
    assert floors.get(COUNTER) == 100


def test_flush_every_leaves_records_unanchored_until_the_batch_or_close(log_path):
    with AuditLog(log_path, flush_every=100) as audit:
        for i in range(5):
            audit.append(call(i))
        report = verify_log(log_path)
        assert report.ok, report.problems
        assert (report.records, report.unanchored) == (5, 5)
    assert verify_log(log_path).unanchored == 0


def test_a_rotation_failing_after_its_rename_does_not_rotate_again_at_the_next_record(
    log_path, monkeypatch
):
    """The rename went through, the directory sync failed: the next records go into the
    new, empty segment; an empty segment must not be rotated in after it (which would
    drop a kept one early)."""
    import edgeseal.agent.audit as audit_module

    failed = []

    def sync_fails_once(path: Path) -> None:
        if not failed:
            failed.append(path)
            raise OSError(5, "injected I/O error")

    monkeypatch.setattr(audit_module, "fsync_dir", sync_fails_once)
    with AuditLog(log_path, max_bytes=600, keep=3) as audit:
        seq = 0
        while not failed:
            try:
                audit.append(call(seq))
                seq += 1
            except AuditError:
                break
        audit.append(call(seq))
        audit.append(call(seq + 1))
    assert failed
    assert log_path.with_name("audit.log.1").exists()
    assert not log_path.with_name("audit.log.2").exists()
    assert [json.loads(r)["seq"] for r in lines(log_path)] == [seq, seq + 1]
    assert verify_log(log_path).ok


def test_records_written_before_a_crash_but_not_yet_anchored_are_anchored_on_reopen(
    log_path,
):
    """A process dies (os._exit, no close) after 5 appends with flush_every=3: the anchor
    vouches for 3, the other 2 are on disk; reopening checks record 2 against the anchor
    and anchors all 5."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from edgeseal.agent.audit import AuditLog\n"
        "audit = AuditLog(Path(sys.argv[1]), flush_every=3)\n"
        "for i in range(5):\n"
        "    audit.append({'uid': 0, 'result': i})\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(log_path)], check=True, timeout=60)
    assert verify_log(log_path).unanchored == 2

    with AuditLog(log_path) as audit:
        assert audit.append(call(5))["seq"] == 5
    report = verify_log(log_path)
    assert report.ok, report.problems
    assert (report.records, report.unanchored) == (6, 0)


def test_a_second_writer_on_the_same_log_is_refused(log_path):
    with AuditLog(log_path), pytest.raises(AuditError, match="already open"):
        AuditLog(log_path)
    with AuditLog(log_path) as audit:  # released on close
        audit.append(call(0))


def test_fields_the_log_sets_cannot_be_given_by_the_caller(log_path):
    with AuditLog(log_path) as audit:
        with pytest.raises(ValueError, match="set by the log"):
            audit.append({"seq": 99, "uid": 1})
        assert audit.append(call(0))["seq"] == 0


def _show(*args: str, check: int = 0) -> Result:
    """``edgeseal agent audit show ARGS`` in this process."""
    if not any(g.name == "agent" for g in cli.app.registered_groups):
        cli._register_parts()
    result = CliRunner().invoke(cli.app, ["agent", "audit", "show", *args], env={})
    assert result.exit_code == check, f"exit {result.exit_code}\n{result.output}"
    return result


def test_audit_show_gives_back_the_records_written_and_filters_by_time_and_model(tmp_path):
    """Timeline: three calls (two models) are written; a second later two more; the log
    rotates on the way. ``audit show --json`` returns every record as written, oldest
    first; --since keeps the later ones, --model one model's; a table for people."""
    path = tmp_path / "audit.log"
    home = tmp_path / "home"
    with AuditLog(path, FileFloors(tmp_path / "counter.json"), max_bytes=300) as audit:
        early = [
            audit.append({"uid": 1000, "model": m, "version": 3, "result": "ok", "ood_max": 0.5})
            for m in ("vision", "speech", "vision")
        ]
        time.sleep(1.1)  # records keep the second: the next ones are later
        late = [
            audit.append({"uid": 1001, "model": "speech", "version": 4, "result": "refused"}),
            audit.append({"uid": 0, "model": "vision", "version": 3, "result": "ok"}),
        ]
    assert len(list(tmp_path.glob("audit.log.*"))) >= 2  # the reader crosses segments

    def shown(*args: str) -> list[dict[str, object]]:
        out = _show("--home", str(home), "--log", str(path), "--json", *args).stdout
        return list(json.loads(out)["records"])

    assert shown() == early + late
    since = late[0]["time"]
    assert shown("--since", str(since)) == late
    assert shown("--model", "vision") == [early[0], early[2], late[1]]
    assert shown("--model", "speech", "--since", str(since)) == [late[0]]
    assert shown("--since", "2999-01-01") == []
    offset = datetime.fromisoformat(str(since)).astimezone(timezone(timedelta(hours=2)))
    assert shown("--since", offset.isoformat()) == late  # any zone; no zone is UTC

    table = _show("--home", str(home), "--log", str(path), "--model", "speech").stdout
    assert "speech" in table and "refused" in table and "2 records" in table

    bad = _show("--home", str(home), "--log", str(path), "--since", "yesterday", check=2)
    assert "--since" in bad.output
    _show("--home", str(home), "--log", str(tmp_path / "none.log"), check=1)  # no log
