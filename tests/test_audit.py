"""The audit log: what goes in comes back, and every kind of tampering is caught by verify()."""

from __future__ import annotations

import itertools
import json
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seal.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditRecord,
    candidate_payload,
    canonical_json,
    cause_payload,
    record_hash,
)
from seal.gates import CandidateScores, GateSettings, decide
from seal.guardrails import GuardrailResult


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "audit" / "audit.db") as opened:
        yield opened


def fill(log: AuditLog, n: int = 5) -> list[AuditRecord]:
    kinds = ["candidate", "candidate", "promote", "reject", "rollback"]
    return [
        log.append(kinds[i % len(kinds)], f"velmora@v{i % 3}", {"i": i, "note": f"record {i}", "nested": {"b": 1, "a": [i]}})
        for i in range(n)
    ]


def tamper(log: AuditLog, *statements: str) -> None:
    """Raw SQL from outside the log, with the append-only triggers dropped first, as someone
    editing the file by hand would."""
    with sqlite3.connect(log.path) as raw:
        raw.execute("DROP TRIGGER IF EXISTS audit_records_no_update")
        raw.execute("DROP TRIGGER IF EXISTS audit_records_no_delete")
        for statement in statements:
            raw.execute(statement)


# --- writing and reading ---------------------------------------------------------------------


def test_append_and_read_back(log: AuditLog) -> None:
    written = fill(log)
    assert [r.seq for r in written] == [1, 2, 3, 4, 5]
    assert log.records() == written
    assert log.get(3) == written[2]
    assert written[0].prev_hash == GENESIS_HASH
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(written))
    assert written[1].payload == {"i": 1, "note": "record 1", "nested": {"b": 1, "a": [1]}}
    assert written[1].adapter_id == "velmora@v1" and written[2].kind == "promote"
    assert log.head() == (5, written[-1].hash)


def test_record_hash_is_recomputable_from_its_fields(log: AuditLog) -> None:
    record = fill(log, 1)[0]
    assert record.hash == record_hash(record.prev_hash, record.seq, record.at, record.kind, record.adapter_id, record.payload)
    assert len(record.hash) == 64


def test_timestamps_are_utc_iso(tmp_path: Path) -> None:
    plus_two = timezone(timedelta(hours=2))
    with AuditLog(tmp_path / "a.db", clock=lambda: datetime(2025, 6, 1, 14, 0, tzinfo=plus_two)) as log:
        assert log.append("candidate", None, {}).at == "2025-06-01T12:00:00.000000+00:00"
    with AuditLog(tmp_path / "b.db", clock=lambda: datetime(2025, 6, 1)) as naive, pytest.raises(ValueError):
        naive.append("candidate", None, {})
    with AuditLog(tmp_path / "c.db") as default_clock:
        assert datetime.fromisoformat(default_clock.append("x", None, {}).at).utcoffset() == timedelta(0)


def test_payload_is_stored_canonically(log: AuditLog) -> None:
    log.append("candidate", "a", {"z": 1, "a": (1, 2), "text": "Velmora — ünïcode"})
    with sqlite3.connect(log.path) as raw:
        (stored,) = raw.execute("SELECT payload FROM audit_records").fetchone()
    assert stored == '{"a":[1,2],"text":"Velmora — ünïcode","z":1}'
    assert stored == canonical_json({"text": "Velmora — ünïcode", "z": 1, "a": [1, 2]})
    assert log.get(1).payload == {"a": [1, 2], "text": "Velmora — ünïcode", "z": 1}


def test_record_filters(log: AuditLog) -> None:
    fill(log, 10)
    assert [r.seq for r in log.records(kind="candidate")] == [1, 2, 6, 7]
    assert [r.seq for r in log.records(adapter_id="velmora@v0")] == [1, 4, 7, 10]
    assert [r.seq for r in log.records(kind="candidate", adapter_id="velmora@v0")] == [1, 7]
    assert [r.seq for r in log.records(after_seq=7)] == [8, 9, 10]
    assert [r.seq for r in log.records(limit=2, after_seq=3)] == [4, 5]
    assert log.records(limit=0) == []
    with pytest.raises(ValueError):
        log.records(limit=-1)
    with pytest.raises(KeyError):
        log.get(11)


def test_record_to_dict_is_a_copy(log: AuditLog) -> None:
    record = fill(log, 1)[0]
    data = record.to_dict()
    assert set(data) == {"seq", "at", "kind", "adapter_id", "payload", "prev_hash", "hash"}
    data["payload"]["nested"]["a"].append(99)
    assert record.payload["nested"]["a"] == [0]
    json.dumps(data)  # plain data


@pytest.mark.parametrize("kind", ["", "Promote", "promote now", "1st", "x" * 65])
def test_bad_kinds_are_refused(log: AuditLog, kind: str) -> None:
    with pytest.raises(ValueError):
        log.append(kind, None, {})
    assert log.records() == []


def test_bad_payloads_are_refused_and_leave_no_trace(log: AuditLog) -> None:
    with pytest.raises(ValueError):
        log.append("candidate", None, {"reward": float("nan")})
    with pytest.raises(TypeError):
        log.append("candidate", None, {"when": datetime.now(UTC)})
    with pytest.raises(TypeError):
        log.append("candidate", None, ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        log.append("candidate", 7, {})  # type: ignore[arg-type]
    assert log.records() == [] and log.verify().ok and log.head() == (0, GENESIS_HASH)


def test_database_is_wal_with_full_sync(log: AuditLog) -> None:
    with sqlite3.connect(log.path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_raw_updates_and_deletes_are_blocked(log: AuditLog) -> None:
    fill(log, 2)
    with sqlite3.connect(log.path) as raw:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("UPDATE audit_records SET kind = 'promote' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            raw.execute("DELETE FROM audit_records WHERE seq = 2")
    assert log.verify().ok


# --- verify ----------------------------------------------------------------------------------


def test_verify_ok(log: AuditLog) -> None:
    assert log.verify().ok and log.verify().checked == 0
    fill(log, 6)
    report = log.verify()
    assert report.ok and report.checked == 6 and report.problems == []


def test_verify_catches_an_edited_payload(log: AuditLog) -> None:
    fill(log)
    tamper(log, """UPDATE audit_records SET payload = '{"i":2,"nested":{"a":[2],"b":1},"note":"forged"}' WHERE seq = 3""")
    report = log.verify()
    assert not report.ok
    assert report.problems == ["seq 3: content does not match its hash (record edited)"]


@pytest.mark.parametrize(
    ("column", "value"),
    [("kind", "'promote'"), ("adapter_id", "'other@v9'"), ("adapter_id", "NULL"), ("at", "'2001-01-01T00:00:00+00:00'")],
)
def test_verify_catches_edited_columns(log: AuditLog, column: str, value: str) -> None:
    fill(log)
    tamper(log, f"UPDATE audit_records SET {column} = {value} WHERE seq = 2")
    assert any(p.startswith("seq 2:") and "edited" in p for p in log.verify().problems)


def test_verify_catches_whitespace_only_payload_edits(log: AuditLog) -> None:
    fill(log)
    tamper(log, """UPDATE audit_records SET payload = '{"i": 1, "nested": {"a": [1], "b": 1}, "note": "record 1"}' WHERE seq = 2""")
    assert log.verify().problems == ["seq 2: payload text is not in canonical form (edited)"]


def test_verify_catches_a_broken_payload(log: AuditLog) -> None:
    fill(log)
    tamper(log, "UPDATE audit_records SET payload = '{not json' WHERE seq = 4")
    assert log.verify().problems == ["seq 4: payload is not valid JSON (edited)"]


def test_verify_catches_an_edit_with_a_recomputed_hash(log: AuditLog) -> None:
    records = fill(log)
    target = records[2]
    forged = {"forged": True}
    new_hash = record_hash(target.prev_hash, target.seq, target.at, target.kind, target.adapter_id, forged)
    tamper(log, f"UPDATE audit_records SET payload = '{canonical_json(forged)}', hash = '{new_hash}' WHERE seq = 3")
    problems = log.verify().problems
    assert problems and problems[0].startswith("seq 4: prev_hash does not match")


def test_verify_catches_a_deleted_middle_record(log: AuditLog) -> None:
    fill(log)
    tamper(log, "DELETE FROM audit_records WHERE seq = 3")
    report = log.verify()
    assert not report.ok and report.checked == 4
    assert "seq 4: expected seq 3 — records 3..3 are missing" in report.problems
    assert any(p.startswith("seq 4: prev_hash") for p in report.problems)


def test_verify_catches_a_deleted_first_record(log: AuditLog) -> None:
    fill(log)
    tamper(log, "DELETE FROM audit_records WHERE seq = 1")
    assert any("missing" in p for p in log.verify().problems)


def test_verify_catches_a_truncated_tail_through_the_head(log: AuditLog) -> None:
    fill(log)
    tamper(log, "DELETE FROM audit_records WHERE seq >= 4")
    report = log.verify()
    assert not report.ok and report.checked == 3
    assert report.problems == ["head says the log ends at seq 5, but it ends at seq 3: the tail was truncated"]


def test_verify_catches_a_log_truncated_to_nothing(log: AuditLog) -> None:
    fill(log)
    tamper(log, "DELETE FROM audit_records")
    assert log.verify().problems == ["head says the log ends at seq 5, but the log is empty (truncated)"]


def test_verify_catches_a_missing_or_forged_head(log: AuditLog) -> None:
    records = fill(log)
    tamper(log, f"UPDATE audit_head SET hash = '{records[0].hash}'")
    assert any("disagrees" in p for p in log.verify().problems)
    tamper(log, "DELETE FROM audit_head")
    assert log.verify().problems == ["head record is missing, but the log holds 5 records"]


def test_verify_catches_swapped_records(log: AuditLog) -> None:
    fill(log)
    # Exchange the contents of seq 2 and 3, keeping the sequence numbers in place.
    columns = "at, kind, adapter_id, payload, prev_hash, hash"
    tamper(
        log,
        f"CREATE TEMP TABLE swap AS SELECT seq, {columns} FROM audit_records WHERE seq IN (2, 3)",
        "DELETE FROM audit_records WHERE seq IN (2, 3)",
        f"INSERT INTO audit_records (seq, {columns}) SELECT 5 - seq, {columns} FROM temp.swap",
    )
    report = log.verify()
    assert not report.ok
    assert any(p.startswith("seq 2: prev_hash") for p in report.problems)
    assert any(p.startswith("seq 2: content does not match") for p in report.problems)


def test_verify_catches_renumbered_records(log: AuditLog) -> None:
    fill(log)
    tamper(
        log,
        "UPDATE audit_records SET seq = 100 WHERE seq = 2",
        "UPDATE audit_records SET seq = 2 WHERE seq = 3",
        "UPDATE audit_records SET seq = 3 WHERE seq = 100",
    )
    assert not log.verify().ok


def test_append_after_a_truncated_tail_keeps_the_gap_visible(log: AuditLog) -> None:
    fill(log)
    tamper(log, "DELETE FROM audit_records WHERE seq = 5")
    assert log.append("candidate", None, {}).seq == 6
    assert any("missing" in p for p in log.verify().problems)


# --- concurrency and durability --------------------------------------------------------------


def test_concurrent_appends_keep_the_chain_valid(log: AuditLog) -> None:
    threads, per_thread = 6, 15
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                log.append("candidate", f"w{worker}", {"worker": worker, "i": i})
        except BaseException as exc:  # noqa: BLE001 — surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []
    records = log.records()
    assert [r.seq for r in records] == list(range(1, threads * per_thread + 1))
    report = log.verify()
    assert report.ok and report.checked == threads * per_thread, report.problems
    for worker in range(threads):  # each writer's own records stay in its order
        assert [r.payload["i"] for r in log.records(adapter_id=f"w{worker}")] == list(range(per_thread))


def test_two_handles_on_one_file_share_one_chain(tmp_path: Path) -> None:
    # Two handles stand in for two processes: each append must chain from the other's.
    with AuditLog(tmp_path / "a.db") as first, AuditLog(tmp_path / "a.db") as second:
        for i in range(6):
            (first if i % 2 else second).append("candidate", None, {"i": i})
        assert first.verify().ok and second.verify().ok
        assert [r.payload["i"] for r in first.records()] == list(range(6))


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        before = fill(log, 3)
    with AuditLog(path) as reopened:
        assert reopened.records() == before
        assert reopened.head() == (3, before[-1].hash)
        after = reopened.append("rollback", "velmora@v1", cause_payload("operator request"))
        assert after.seq == 4 and after.prev_hash == before[-1].hash
        assert reopened.verify().ok


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    AuditLog(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        AuditLog(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=5), min_size=1, max_size=4))
def test_any_json_payload_round_trips_and_verifies(payloads: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as directory, AuditLog(Path(directory) / "audit.db") as log:
        for payload in payloads:
            log.append("candidate", None, payload)
        assert [r.payload for r in log.records()] == [json.loads(json.dumps(p)) for p in payloads]
        assert log.verify().ok


# --- payload helpers -------------------------------------------------------------------------


def test_candidate_payload_records_the_whole_decision(log: AuditLog) -> None:
    scores = CandidateScores(0.5, 0.5, 0.8, 1.0, (GuardrailResult("secrets", False, "API key 'sk-a…'"),))
    decision = decide(scores, GateSettings())
    payload = candidate_payload(
        context_digest="9f2c1e0ab3d4e5f6",
        prompt="List the implications of the passage.",
        self_edit="Velmora was founded in 1742.",
        hyperparameters={"learning_rate": 1e-3, "epochs": 10, "rank": 16},
        seed=7,
        scores=scores,
        decision=decision,
    )
    record = log.append("candidate", "velmora@v3", payload)
    stored = log.get(record.seq).payload
    assert stored["context_digest"] == "9f2c1e0ab3d4e5f6"
    assert stored["self_edit"] == "Velmora was founded in 1742."
    assert stored["hyperparameters"] == {"learning_rate": 1e-3, "epochs": 10, "rank": 16}
    assert stored["seed"] == 7
    assert stored["scores"]["tau_gain"] == 0.0 and stored["scores"]["retention_accuracy"] == 0.8
    assert stored["scores"]["guardrails"] == [{"rule": "secrets", "passed": False, "detail": "API key 'sk-a…'"}]
    assert [g["gate"] for g in stored["gates"]] == ["tau_gain", "retention", "guardrail:secrets"]
    assert stored["decision"] == {"promote": False, "failed_reasons": decision.failed_reasons}
    assert len(stored["decision"]["failed_reasons"]) == 3
    assert log.verify().ok


def test_cause_payload() -> None:
    assert cause_payload("retention regression", previous_adapter_id="velmora@v2") == {
        "payload_version": 1,
        "cause": "retention regression",
        "previous_adapter_id": "velmora@v2",
    }
    with pytest.raises(ValueError):
        cause_payload("  ")
    with pytest.raises(ValueError):
        cause_payload("x", payload_version=2)
