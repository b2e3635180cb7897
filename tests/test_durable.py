"""seal.durable: the one JSON-lines log, atomic write and lock; and RewardLog sitting on them.

Crashes are simulated the way they look on disk: a file cut at an arbitrary byte (a kill or
power loss mid-append) or a fragment appended by hand, then the log reopened as a restart would."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seal.durable
from seal.durable import (
    JsonLinesLog,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_lock,
)

# fsync on the real disk costs milliseconds per append; hypothesis runs many examples.
FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

RECORDS = st.lists(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=20), st.booleans(), st.none()),
        max_size=4,
    ).filter(lambda record: "sequence" not in record),
    min_size=1,
    max_size=8,
)


def test_the_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(seal.durable, optionflags=doctest.ELLIPSIS)
    assert tried > 10 and failures == 0


# --- JsonLinesLog -------------------------------------------------------------------------------


def test_appended_records_read_back_in_order_with_unicode_and_key_order(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.jsonl"  # the directory is created on open
    log = JsonLinesLog(path, sort_keys=False)
    assert log.read() == [] and len(log) == 0 and not path.exists()
    log.append({"z": 1, "a": "Velmora — 1742\u2028"})
    log.append({"b": [1, 2], "a": None})
    assert log.read() == [{"z": 1, "a": "Velmora — 1742\u2028"}, {"b": [1, 2], "a": None}]
    assert path.read_text(encoding="utf-8").splitlines()[0].startswith('{"z": 1')
    assert len(JsonLinesLog(path)) == 2


def test_sequence_numbers_continue_after_a_restart_and_are_never_taken_from_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "numbered.jsonl"
    first = JsonLinesLog(path, sequence_key="seq")
    assert [first.append({"n": n})["seq"] for n in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError, match="numbers its records itself"):
        first.append({"seq": 99})
    with pytest.raises(ValueError, match="append-only"):
        first.rewrite([])
    second = JsonLinesLog(path, sequence_key="seq")
    assert second.last_sequence == 3 and second.append({"n": 3})["seq"] == 4
    assert [r["seq"] for r in JsonLinesLog(path, sequence_key="seq").read()] == [1, 2, 3, 4]


def test_a_record_that_does_not_serialise_writes_nothing_and_uses_no_number(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = JsonLinesLog(path, sequence_key="sequence")
    log.append({"ok": True})
    with pytest.raises(TypeError):
        log.append({"bad": object()})
    assert log.append({"ok": True})["sequence"] == 2
    assert path.read_bytes().count(b"\n") == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=RECORDS, cut_fraction=st.floats(0.0, 1.0))
def test_a_log_cut_at_any_byte_keeps_every_whole_line_and_appends_cleanly(records: list[dict], cut_fraction: float) -> None:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as directory:
        path = Path(directory) / "log.jsonl"
        log = JsonLinesLog(path, sequence_key="sequence")
        written = [log.append(record) for record in records]
        data = path.read_bytes()
        cut = round(cut_fraction * len(data))
        os.truncate(path, cut)  # what a crash at that byte leaves
        survivors = data[:cut].count(b"\n")  # lines whose newline made it to disk

        reopened = JsonLinesLog(path, sequence_key="sequence")
        assert reopened.read() == written[:survivors]
        assert reopened.last_sequence == survivors and len(reopened) == survivors
        assert path.stat().st_size == len(b"".join(data.splitlines(keepends=True)[:survivors]))

        after = reopened.append({"after": "restart"})
        assert after["sequence"] == survivors + 1
        again = JsonLinesLog(path, sequence_key="sequence")
        assert again.read() == [*written[:survivors], after]
        assert all(json.loads(line) for line in path.read_bytes().splitlines())


def test_a_damaged_middle_line_is_skipped_and_kept_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"sequence": 1}\n\x00\x00garbage\n{"sequence": 2}\n')
    log = JsonLinesLog(path, sequence_key="sequence")
    assert [r["sequence"] for r in log.read()] == [1, 2] and log.last_sequence == 2
    assert b"garbage" in path.read_bytes()  # evidence for a person, not silently erased
    assert log.append({})["sequence"] == 3


def test_a_record_glued_onto_a_fragment_by_the_old_reward_log_still_counts(tmp_path: Path) -> None:
    # The on-disk shape the pre-fix RewardLog left: an append after a torn line, on the same line.
    path = tmp_path / "rewards.jsonl"
    path.write_text(
        '{"sequence": 1, "reward": 0.0}\n'
        '{"sequence": 2, "rew{"sequence": 2, "reward": 0.5}\n'
        '{"sequence": 3, "reward": 1.0}\n',
        encoding="utf-8",
    )
    log = JsonLinesLog(path, sequence_key="sequence")
    assert log.read() == [{"sequence": 1, "reward": 0.0}, {"sequence": 2, "reward": 0.5}, {"sequence": 3, "reward": 1.0}]
    assert log.append({"reward": 0.25})["sequence"] == 4


def test_concurrent_appends_get_distinct_numbers_and_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = JsonLinesLog(path, sequence_key="sequence")
    numbers: list[int] = []
    lock = threading.Lock()

    def writer(worker: int) -> None:
        for index in range(25):
            sequence = log.append({"worker": worker, "index": index, "pad": "x" * 500})["sequence"]
            with lock:
                numbers.append(sequence)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(numbers) == list(range(1, 151))
    on_disk = JsonLinesLog(path, sequence_key="sequence").read()
    assert [r["sequence"] for r in on_disk] == list(range(1, 151))


def test_rewrite_replaces_the_whole_queue_and_later_appends_follow_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    queue = JsonLinesLog(path)
    for n in range(3):
        queue.append({"n": n})
    queue.rewrite([{"n": 2}])
    queue.append({"n": 3})
    assert JsonLinesLog(path).read() == [{"n": 2}, {"n": 3}] and len(queue) == 2
    queue.rewrite([])
    assert path.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["outbox.jsonl"]


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    atomic_write_json(target, {"b": 1, "a": "é"}, indent=None, sort_keys=True)
    assert target.read_text(encoding="utf-8") == '{"a": "é", "b": 1}\n'
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_a_failed_atomic_write_keeps_the_old_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "round.json"
    atomic_write_json(target, {"status": "running"})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"status": object()})
    occupied = tmp_path / "occupied"
    (occupied / "child").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic_write_text(occupied, "cannot replace a non-empty directory")
    assert json.loads(target.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "round.json"]


def test_a_fixed_temporary_name_is_reused_and_must_be_a_sibling(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    leftover = tmp_path / "manifest.json.tmp"
    leftover.write_text("a crash's leftover, longer than the new content")
    atomic_write_text(target, "{}", temporary=leftover)
    assert target.read_text() == "{}" and not leftover.exists()
    with pytest.raises(ValueError, match="must sit in"):
        atomic_write_text(target, "{}", temporary=tmp_path / "elsewhere" / "manifest.json.tmp")


# --- file_lock ----------------------------------------------------------------------------------

_HOLDER = """
import sys
from seal.durable import file_lock
with file_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin
"""


def test_file_lock_excludes_another_process_and_reports_the_wait(tmp_path: Path) -> None:
    lock = tmp_path / "state.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        waited = threading.Event()
        acquired_at: list[float] = []

        def take() -> None:
            with file_lock(lock, on_wait=waited.set):
                acquired_at.append(time.monotonic())

        taker = threading.Thread(target=take)
        taker.start()
        assert waited.wait(10)
        time.sleep(0.2)
        assert not acquired_at  # still blocked while the other process holds it
        released_at = time.monotonic()
        assert holder.stdin is not None
        holder.stdin.close()
        taker.join(10)
        assert acquired_at and acquired_at[0] >= released_at
    finally:
        holder.kill()
        holder.wait(10)


def test_file_lock_excludes_threads_of_one_process(tmp_path: Path) -> None:
    lock = tmp_path / "nested" / "counter.lock"
    counter = tmp_path / "counter"
    counter.write_text("0")

    def bump() -> None:
        for _ in range(20):
            with file_lock(lock):
                value = int(counter.read_text())
                time.sleep(0.0005)  # widen the read-modify-write window
                counter.write_text(str(value + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.read_text() == "80"


# --- RewardLog on the log -----------------------------------------------------------------------


def _reward(index: int) -> dict:
    from seal.auditor import QuestionOutcome

    outcome = QuestionOutcome("When?", "1742", "1742", True, True, 1.0, True)
    return {
        "context_id": f"ctx{index}", "adapter_id": f"default@v{index}", "prompt": "p", "self_edit": f"edit {index}",
        "reward": 0.5, "baseline_accuracy": 0.0, "adapted_accuracy": 0.5, "outcomes": [outcome], "seed": index,
    }


def _all_records(path: Path) -> list:
    from seal.auditor import RewardLog

    log = RewardLog(path)
    log.close()  # follow() then returns once it has yielded what is on disk
    return list(log.follow(0, lambda: True))


def test_reward_log_keeps_rewards_acknowledged_after_a_torn_line_across_two_restarts(tmp_path: Path) -> None:
    """Issue 9: the pre-fix RewardLog appended after a torn line, so on the next restart the two
    newly acknowledged rewards vanished and their sequence numbers were handed out again."""
    from seal.auditor import RewardLog

    path = tmp_path / "auditor" / "rewards.jsonl"
    first = RewardLog(path)
    before = [first.append(**_reward(i)) for i in (1, 2)]
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"sequence": 3, "event_id": "torn", "context_id": "ct')  # killed mid-write

    restarted = RewardLog(path)
    acknowledged = [restarted.append(**_reward(i)) for i in (3, 4)]

    survivors = _all_records(path)  # the second restart
    assert [r.event_id for r in survivors] == [r.event_id for r in [*before, *acknowledged]]
    assert [r.sequence for r in survivors] == [1, 2, 3, 4]
    assert survivors[2].outcomes == acknowledged[0].outcomes and survivors[3].self_edit == "edit 4"
    again = RewardLog(path)
    assert again.last_sequence == 4 and again.append(**_reward(5)).sequence == 5  # 3 and 4 never re-issued


def test_reward_log_counts_a_reward_glued_onto_a_fragment_by_the_old_code(tmp_path: Path) -> None:
    from dataclasses import asdict

    from seal.auditor import RewardLog

    path = tmp_path / "rewards.jsonl"
    log = RewardLog(path)
    log.append(**_reward(1))
    glued = json.dumps({**asdict(log.append(**_reward(2))), "sequence": 2})
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text(lines[0] + "\n" + '{"sequence": 2, "ev' + glued + "\n", encoding="utf-8")
    reopened = RewardLog(path)
    assert reopened.last_sequence == 2 and reopened.append(**_reward(3)).sequence == 3
    assert [r.sequence for r in _all_records(path)] == [1, 2, 3]
