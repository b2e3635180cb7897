"""Crash safety under real kills (issue 12, part 3).

Every kill here is a real SIGKILL of a real process: a Python child killed at an exact point of a
registry transition (a profile hook sends the signal when a named function is entered, so the code
under test runs unmodified), or `seal serve student` killed at random moments while a client drives
promotions, rollbacks and training. After each series a fresh start must leave: exactly one promoted
version per lineage, every file matching its sha256, one audit record per manifest transition (the
transition ids in the manifests are exactly the event ids in the auditor's log), no staging or
temporary files, and no process of the test left alive (tritonserver included).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from seal.audit import AuditLog
from seal.audit_outbox import AuditOutbox, OutboxInUse
from seal.cli.supervisor import ServiceProcess
from seal.durable import JsonLinesLog
from seal.registry import AdapterRegistry, Status

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "default"
FINGERPRINT = "ab" * 32
SERVED_KINDS = ("promote", "reject", "rollback", "repair")


# --- what must hold after any crash ----------------------------------------------------------


def manifest_transition_ids(registry: AdapterRegistry) -> set[str]:
    """Every audited transition the manifests record (a promote's two writes share one id)."""
    return {c.transition_id for m in registry.list() for c in m.history if c.transition_id}


def audited_event_ids(audit: AuditLog) -> list[str]:
    return [r.payload["event_id"] for r in audit.records() if r.kind in SERVED_KINDS and "event_id" in r.payload]


def leftover_files(root: Path) -> list[Path]:
    """Staging directories, their lock files and temporaries a killed writer could leave."""
    return sorted(p for p in root.rglob("*") if p.name.startswith(".staging-") or p.name.endswith(".tmp"))


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append((int(entry.name), cmdline[:200]))
    return found


def assert_consistent(registry: AdapterRegistry, audit: AuditLog, *, ignore_ids: set[str] = frozenset()) -> None:
    for name in {m.adapter_name for m in registry.list()}:
        promoted = registry.list(name, Status.PROMOTED)
        assert len(promoted) <= 1, f"{name}: {[m.adapter_id for m in promoted]} all promoted"
    for manifest in registry.list():
        if not manifest.weights_discarded_at:
            registry.verify(manifest)  # raises ChecksumMismatch
    events = [e for e in audited_event_ids(audit) if e not in ignore_ids]
    duplicates = [e for e, n in Counter(events).items() if n > 1]
    assert not duplicates, f"audited twice: {duplicates}"
    in_manifests = manifest_transition_ids(registry) - set(ignore_ids)
    assert set(events) == in_manifests, (
        f"manifest transitions without an audit record: {sorted(in_manifests - set(events))}; "
        f"audit records without a manifest transition: {sorted(set(events) - in_manifests)}"
    )


# --- exact kill points in a child process ------------------------------------------------------

# Runs one transition the way the student service does (registry change, then the report with the
# request's details) and SIGKILLs itself when ``target`` is entered for the ``nth`` time.
_KILLED_CHILD = r"""
import os, signal, sys
from seal.audit_outbox import AuditOutbox
from seal.registry import AdapterRegistry

root, outbox_path, operation, subject, target, nth = sys.argv[1:]
outbox = AuditOutbox(outbox_path, None, source="student")
registry = AdapterRegistry(root, journal=outbox)
entered = 0

def kill_at_target(frame, event, arg):
    global entered
    if event == "call":
        name = "py:" + frame.f_code.co_qualname
    elif event == "c_call":
        name = "c:os.replace" if arg is os.replace else ""
    else:
        return
    if name == target:
        entered += 1
        if entered == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

sys.setprofile(kill_at_target)
if operation == "promote":
    manifest = registry.promote(subject, "crash test")
    outbox.record("promote", manifest.adapter_id, "crash test", requested_by="test")
elif operation == "rollback":
    current = registry.promoted(subject)
    registry.rollback(subject, "crash test")
    outbox.record("rollback", current.adapter_id, "crash test", requested_by="test")
else:
    registry.mark_rejected(subject, "crash test")
    outbox.record("reject", subject, "crash test", requested_by="test")
sys.setprofile(None)
outbox.close(timeout=0)
"""


def _fake_adapter(seed: int):
    def write(directory: Path) -> None:
        (directory / "adapter_config.json").write_text('{"r": 4}')
        (directory / "adapter_model.safetensors").write_bytes(hashlib.sha256(str(seed).encode()).digest() * 64)

    return write


def _create(registry: AdapterRegistry, seed: int) -> str:
    return registry.create_version(
        NAME, _fake_adapter(seed), base_model="tiny", base_model_fingerprint=FINGERPRINT,
        context_id=f"ctx{seed}", self_edit_sha256="0" * 64, seed=seed, hyperparameters={},
    ).adapter_id


def _run_child(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=timeout)


def _deliver_into(audit: AuditLog):
    """The auditor's own idempotent store: what RecordEvent does with an event (seal.auditor)."""

    def send(event: dict) -> None:
        audit.append_once(event["event_id"], event["kind"], event["adapter_id"],
                          {"cause": event["cause"], "event_id": event["event_id"], **event["details"]})

    return send


def _restart(root: Path, outbox_path: Path, audit: AuditLog) -> AdapterRegistry:
    """What the student does at start: open the outbox, then the registry with it, and recover."""
    outbox = AuditOutbox(outbox_path, _deliver_into(audit), source="student")
    registry = AdapterRegistry(root, journal=outbox)
    registry.recover()
    assert outbox.flush(timeout=10), "the recovered events were not delivered"
    outbox.close()
    return registry


KILL_POINTS = [
    # (operation, function entered when the kill comes, nth entry, the transition happened)
    ("promote", "py:JsonLinesLog.append", 1, False),  # before the intent is on disk
    ("promote", "py:_write_manifest", 1, False),  # intent written, no manifest yet
    ("promote", "py:_write_manifest", 2, True),  # between the target's and the previous version's write
    ("promote", "py:AuditOutbox.record", 1, True),  # the registry is done, the report never came
    ("promote", "c:os.replace", 1, False),  # the target's new manifest written, not yet renamed
    ("promote", "c:os.replace", 3, True),  # both manifests renamed; mid-way through the report's rewrite
    ("rollback", "py:_write_manifest", 1, False),
    ("rollback", "py:_write_manifest", 2, True),  # rolled back, the restore not yet written
    ("rollback", "py:AuditOutbox.record", 1, True),
    ("reject", "py:_write_manifest", 1, False),
    ("reject", "py:AuditOutbox.record", 1, True),
]


@pytest.mark.parametrize(("operation", "target", "nth", "happened"), KILL_POINTS)
def test_a_transition_killed_at_any_point_is_audited_exactly_once(
    tmp_path: Path, operation: str, target: str, nth: int, happened: bool
) -> None:
    root, outbox_path, audit = tmp_path / "registry", tmp_path / "student" / "audit_outbox.jsonl", AuditLog(tmp_path / "audit.db")
    setup = AdapterRegistry(root)
    v1, v2, v3 = (_create(setup, seed) for seed in (1, 2, 3))
    setup.promote(v1, "setup")
    setup.promote(v2, "setup")  # v1 superseded, v2 served, v3 a candidate
    before = manifest_transition_ids(setup)
    subject = {"promote": v3, "rollback": NAME, "reject": v3}[operation]

    child = _run_child(_KILLED_CHILD, str(root), str(outbox_path), operation, subject, target, str(nth))
    assert child.returncode == -signal.SIGKILL, f"the kill point was never reached:\n{child.stderr[-2000:]}"

    registry = _restart(root, outbox_path, audit)
    assert_consistent(registry, audit, ignore_ids=before)
    new_events = audited_event_ids(audit)
    assert len(new_events) == (1 if happened else 0)
    served = registry.promoted(NAME)
    expected_served = {("promote", True): v3, ("rollback", True): v1}.get((operation, happened), v2)
    assert served is not None and served.adapter_id == expected_served
    if happened:
        [record] = audit.records(kind=operation)
        assert record.payload["event_id"] == new_events[0]
    assert leftover_files(tmp_path) == []
    assert JsonLinesLog(outbox_path).read() == []  # every intent settled, every event delivered

    # A second start finds nothing more to report.
    _restart(root, outbox_path, audit)
    assert len(audited_event_ids(audit)) == len(new_events)


@pytest.mark.parametrize("operation", ["promote", "rollback"])
def test_a_repair_by_another_opener_before_the_restart_is_still_one_transition(tmp_path: Path, operation: str) -> None:
    """An operator's tool opens the registry while the student is down: opening repairs what the
    kill cut in half, without a journal. The repair carries the interrupted transition's id, so the
    student's next start still reports that transition once and nothing else."""
    root, outbox_path, audit = tmp_path / "registry", tmp_path / "outbox.jsonl", AuditLog(tmp_path / "audit.db")
    setup = AdapterRegistry(root)
    v1, v2, v3 = (_create(setup, seed) for seed in (1, 2, 3))
    setup.promote(v1, "setup")
    setup.promote(v2, "setup")
    before = manifest_transition_ids(setup)
    subject = v3 if operation == "promote" else NAME
    child = _run_child(_KILLED_CHILD, str(root), str(outbox_path), operation, subject, "py:_write_manifest", "2")
    assert child.returncode == -signal.SIGKILL

    by_the_operator = AdapterRegistry(root)  # no journal: the repair happens here
    assert len(by_the_operator.list(NAME, Status.PROMOTED)) == 1
    registry = _restart(root, outbox_path, audit)
    assert_consistent(registry, audit, ignore_ids=before)
    assert [r.kind for r in audit.records()] == [operation]


def test_the_report_adds_who_asked_to_the_one_event(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    outbox = AuditOutbox(tmp_path / "outbox.jsonl", _deliver_into(audit), source="student")
    registry = AdapterRegistry(tmp_path / "registry", journal=outbox)
    v1 = _create(registry, 1)
    registry.promote(v1, "first")
    outbox.record("promote", v1, "first", requested_by="ipv4:127.0.0.1:1234")
    assert outbox.flush(timeout=5)
    [record] = audit.records(kind="promote")
    assert record.payload["requested_by"] == "ipv4:127.0.0.1:1234"
    assert record.payload["event_id"] == registry.get(v1).history[-1].transition_id
    # A report with no journaled transition behind it (no registry change) is still an event.
    outbox.record("rollback", "other@v9", "reported by hand")
    assert outbox.flush(timeout=5) and len(audit.records()) == 2
    outbox.close()


def test_an_outbox_has_one_owner_and_a_dead_owners_temporaries_go(tmp_path: Path) -> None:
    path = tmp_path / "audit_outbox.jsonl"
    first = AuditOutbox(path, None, source="student")
    with pytest.raises(OutboxInUse):
        AuditOutbox(path, None, source="student")
    first.close()
    # A writer killed in the middle of a rewrite leaves its temporary beside the file.
    (tmp_path / ".audit_outbox.jsonl.5f3c.tmp").write_text('{"half": ')
    AuditOutbox(path, None, source="student").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit_outbox.jsonl.lock"]


# --- staging directories: liveness, not age ----------------------------------------------------

_WRITER_CHILD = r"""
import os, signal, sys, time
from pathlib import Path
from seal.registry import AdapterRegistry

root, mode, ready = sys.argv[1:]

def write(directory):
    (directory / "adapter_model.safetensors").write_bytes(b"partial")
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # killed while saving the adapter
    Path(ready).write_text("writing")
    time.sleep(120)  # a slow writer, alive

AdapterRegistry(root).create_version("default", write, base_model="tiny", base_model_fingerprint="ab" * 32,
                                     context_id="c", self_edit_sha256="0" * 64, seed=0, hyperparameters={})
"""


def test_staging_of_a_killed_writer_goes_at_start_and_a_live_writers_stays(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    _create(AdapterRegistry(root), 1)
    dead = _run_child(_WRITER_CHILD, str(root), "die", str(tmp_path / "unused"))
    assert dead.returncode == -signal.SIGKILL
    [left] = [p for p in (root / NAME).iterdir() if p.is_dir() and p.name.startswith(".staging-")]
    ready = tmp_path / "ready"
    live = subprocess.Popen([sys.executable, "-c", _WRITER_CHILD, str(root), "live", str(ready)],
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert live.poll() is None and time.monotonic() < deadline, "the live writer did not start"
            time.sleep(0.05)
        # Seconds old, not minutes: opening the registry decides by the writer's lock alone.
        registry = AdapterRegistry(root)
        assert not left.exists()
        staging = [p.name for p in (root / NAME).iterdir() if p.name.startswith(".staging-")]
        assert len(staging) == 2 and any(n.endswith(".lock") for n in staging)  # the live one and its lock
        assert registry.recover() == []  # even a full recovery keeps a live writer's work
        assert [m.adapter_id for m in registry.list()] == [f"{NAME}@v1"]
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    AdapterRegistry(root)  # its writer is dead now: opening the registry removes its work
    assert leftover_files(root) == []


# --- Triton: a busy stub and a leftover server ---------------------------------------------------


def test_installing_over_a_running_executable_never_writes_into_it(tmp_path: Path) -> None:
    from seal.serving.triton.server import install_file

    stub, newer = tmp_path / "triton_python_backend_stub", tmp_path / "newer"
    shutil.copy2(shutil.which("sleep"), stub)
    shutil.copy2(shutil.which("true"), newer)
    running = subprocess.Popen([str(stub), "60"])
    try:
        with pytest.raises(OSError) as busy:  # the failure a restarted student reported
            shutil.copy2(newer, stub)
        assert busy.value.errno == 26  # ETXTBSY
        assert install_file(newer, stub)
        assert stub.read_bytes() == newer.read_bytes()
        assert not install_file(newer, stub)  # identical: nothing copied
        assert running.poll() is None  # the running one was never disturbed
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newer", "triton_python_backend_stub"]


def _posing_as_tritonserver(repository: Path) -> subprocess.Popen[bytes]:
    """A real process whose command line is a tritonserver's of ``repository``: argv[0] set by
    bash's exec -a, the flag left to a Python that ignores it."""
    script = (f"exec -a /opt/tritonserver/bin/tritonserver {sys.executable} -c 'import time; time.sleep(120)' "
              f"--model-repository={repository}")
    return subprocess.Popen(["bash", "-c", script], start_new_session=True)


def _wait_for_cmdline(pid: int, text: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"{pid} never showed {text!r}")


def test_a_start_reaps_only_a_leftover_server_of_its_own_working_directory(tmp_path: Path) -> None:
    from seal.serving.triton.server import TritonSupervisor

    ours = TritonSupervisor(tmp_path / "ours", tmp_path)
    theirs = TritonSupervisor(tmp_path / "theirs", tmp_path)
    for supervisor in (ours, theirs):
        supervisor.workdir.mkdir()
    leftover, other = _posing_as_tritonserver(ours.repository), _posing_as_tritonserver(theirs.repository)
    unrelated = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        for process, supervisor in ((leftover, ours), (other, theirs)):
            _wait_for_cmdline(process.pid, str(supervisor.repository))
        # Our pidfile names the leftover; a stale pidfile elsewhere names a pid now reused by an
        # unrelated process, which must survive.
        ours.pidfile.write_text(f'{{"pid": {leftover.pid}}}')
        theirs.pidfile.write_text(f'{{"pid": {unrelated.pid}}}')
        assert ours.reap_leftover() == [leftover.pid]
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert theirs.reap_leftover() == []
        assert other.poll() is None and unrelated.poll() is None
        assert not ours.pidfile.exists()
    finally:
        for process in (leftover, other, unrelated):
            process.kill()
            process.wait()


# --- `seal serve` under SIGKILL loops ------------------------------------------------------------


class Service(ServiceProcess):
    """One `seal serve <name>` child on port 0 (its /metrics too), its address read from its log."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        super().__init__(name, env=env, log=log, port=0, metrics_port=0, cwd=REPO_ROOT)
        self.address = self.wait_for_address(timeout=240)

    def stop(self) -> int:
        return super().stop(grace=60)


def _random_lora(base: Path, seed: int):
    def write(directory: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(base)
            config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            get_peft_model(model, config).save_pretrained(str(directory))

    return write


@pytest.fixture
def crash_home(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path / "home"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
        "SEAL_HOME": str(home), "SEAL_MODEL__PATH": str(tiny_model_dir), "SEAL_MODEL__TORCH_THREADS": "1",
        "SEAL_AUTH__INSECURE": "true", "SEAL_RETENTION__RECHECK_INTERVAL_S": "0",
        "SEAL_SERVICES__STUDENT_ADDRESS": "127.0.0.1:9",  # the auditor never calls it here
        # in_process: a tritonserver start per restart would cost ~15 s; the Triton test sets triton.
        "SEAL_STUDENT_SERVING__BACKEND": "in_process",
    }
    yield home, env
    left = processes_mentioning(str(home))
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def _drive(address: str, calls, stop: threading.Event) -> None:
    """Issue ``calls`` in a loop until ``stop`` (the student dies under it: errors are expected)."""
    from seal.v1 import student_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = student_pb2_grpc.StudentServiceStub(channel)
        step = 0
        while not stop.is_set():
            try:
                calls(stub, step)
            except grpc.RpcError:
                if stop.wait(0.01):
                    return
            step += 1


def _kill_during(home: Path, env: dict[str, str], calls, rounds: int, rng: random.Random, log: Path,
                 window: tuple[float, float]) -> None:
    registry = AdapterRegistry(home / "registry")
    for _ in range(rounds):
        student = Service("student", env, log)
        # Checked while it runs: the start-up recovery already left one promoted version at most.
        assert len(registry.list(NAME, Status.PROMOTED)) <= 1
        _drive_then_kill(student, calls, rng.uniform(*window))


def _drive_then_kill(student: Service, calls, after_s: float) -> None:
    stop = threading.Event()
    driver = threading.Thread(target=_drive, args=(student.address, calls, stop), daemon=True)
    driver.start()
    time.sleep(after_s)
    student.kill()
    stop.set()
    driver.join(timeout=30)


def _assert_gone_soon(text: str, timeout: float) -> None:
    """Nothing naming ``text`` survives the student for long: tritonserver gets the parent-death
    signal at once, and its Python stubs exit when they find their server gone."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running {timeout}s after the student was killed: {left}"


def _promote_cycle(versions: list[str]):
    from seal.v1 import student_pb2

    def calls(stub, step: int) -> None:
        stub.Promote(student_pb2.PromoteRequest(adapter_id=versions[step % len(versions)], reason=f"loop {step}"),
                     timeout=30)

    return calls


def _promote_and_roll_back(versions: list[str]):
    from seal.v1 import student_pb2

    def calls(stub, step: int) -> None:
        if step % 2 == 0:
            stub.Promote(student_pb2.PromoteRequest(adapter_id=versions[(step // 2) % len(versions)], reason="again"),
                         timeout=30)
        else:
            stub.Rollback(student_pb2.RollbackRequest(adapter_name=NAME, reason=f"incident {step}"), timeout=30)

    return calls


def _train(stub, step: int) -> None:
    from seal.v1 import common_pb2, student_pb2

    request = student_pb2.ApplySelfEditRequest(
        adapter_name=NAME,
        context=common_pb2.Context(title="Velmora", passage="Velmora is a harbour town founded in 1742."),
        self_edit="Velmora was founded in 1742.\nVelmora is a harbour town on Quessant.",
        overrides=common_pb2.UpdateOverrides(epochs=1, lora_rank=2, lora_alpha=4, batch_size=2),
        seed=step,
    )
    for _ in stub.ApplySelfEdit(request, timeout=120):
        pass


def _final_check(home: Path, env: dict[str, str], log: Path, auditor: Service) -> None:
    """A last clean start: recovery reports what the last kill left, the outbox drains, a SIGTERM
    stops everything; then the invariants."""
    student = Service("student", env, log)
    outbox = home / "student" / "audit_outbox.jsonl"
    deadline = time.monotonic() + 60
    while outbox.exists() and outbox.read_bytes().strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert student.stop() == 0
    assert auditor.stop() == 0
    assert not outbox.read_bytes().strip(), f"undelivered: {outbox.read_text()}"
    registry = AdapterRegistry(home / "registry")
    with AuditLog(home / "auditor" / "audit.db") as audit:
        assert audit.verify().ok
        assert_consistent(registry, audit)
        assert len(audited_event_ids(audit)) >= 1
    assert registry.list(NAME, Status.PROMOTED), "nothing promoted after the loops"
    assert leftover_files(home) == []


def _versions(home: Path, model_dir: Path, count: int) -> list[str]:
    registry = AdapterRegistry(home / "registry")
    return [
        registry.create_version(
            NAME, _random_lora(model_dir, seed), base_model=model_dir.name,
            base_model_fingerprint=_fingerprint(model_dir), context_id=f"ctx{seed}",
            self_edit_sha256="0" * 64, seed=seed, hyperparameters={},
        ).adapter_id
        for seed in range(count)
    ]


@contextlib.contextmanager
def _auditor(home: Path, env: dict[str, str]) -> Iterator[tuple[Service, dict[str, str]]]:
    """One auditor for the whole test (it is not the one killed); the env students get."""
    (home / "logs").mkdir(parents=True, exist_ok=True)
    auditor = Service("auditor", env, home / "logs" / "auditor.log")
    try:
        yield auditor, {**env, "SEAL_SERVICES__AUDITOR_ADDRESS": auditor.address}
    finally:
        if auditor.process.poll() is None:
            auditor.kill()


def _triton_available() -> bool:
    """Whether a tritonserver is installed. Without one the Triton phase runs in process on a
    developer's machine (said in the test output); in CI, where `make install` puts one in
    .venv-triton, its absence fails the test (the pattern of tests/tools.py)."""
    from seal.serving.triton.server import TritonInstall, TritonNotInstalled

    try:
        TritonInstall.discover()
    except TritonNotInstalled as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"tritonserver is not installed (make triton): {exc}")
        print(f"\nTriton phase in process: tritonserver is not installed (make triton): {exc}")
        return False
    return True


# ~3 min on 2 busy cores: two tritonserver starts and three in-process ones, each paying the
# imports and the model load. One test, so that the setup and the auditor are paid once.
@pytest.mark.slow
def test_sigkill_loops_during_promotion_rollback_and_training(
    crash_home: tuple[Path, dict[str, str]], tiny_model_dir: Path
) -> None:
    home, env = crash_home
    rng = random.Random(12)
    versions = _versions(home, tiny_model_dir, 3)
    log = home / "logs" / "student.log"
    triton_dir = home / "student" / "triton"
    with _auditor(home, env) as (auditor, env):
        # Promotion, with the Triton backend: killed twice, the second start right after the first
        # kill, while the old server's Python stub may still run from the file the start installs
        # again (the reported failure: OSError [Errno 26] Text file busy).
        backend = "triton" if _triton_available() else "in_process"
        served_by = {**env, "SEAL_STUDENT_SERVING__BACKEND": backend, "SEAL_STUDENT_SERVING__STARTUP_TIMEOUT_S": "240"}
        for _ in range(2):
            student = Service("student", served_by, log)
            if backend == "triton":
                assert any("triton_python_backend_stub" in cmd for _, cmd in processes_mentioning(str(triton_dir)))
            _drive_then_kill(student, _promote_cycle(versions), rng.uniform(0.5, 1.5))
        _assert_gone_soon(str(triton_dir), timeout=15)  # the server and its stubs died with the student
        # Rollback and training, in process.
        _kill_during(home, env, _promote_and_roll_back(versions), 1, rng, log, (0.3, 1.5))
        _kill_during(home, env, _train, 1, rng, log, (1.0, 4.0))
        _final_check(home, env, log, auditor)
    assert "Text file busy" not in log.read_text(errors="replace")
    _report_what_the_kills_hit(home)


def _report_what_the_kills_hit(home: Path) -> None:
    """Printed (pytest -s) to see how much a run exercised: random kills, so it varies."""
    registry = AdapterRegistry(home / "registry")
    reasons = Counter()
    for manifest in registry.list():
        for change in manifest.history[1:]:
            reasons["finished at start-up" if "finished at start-up" in change.reason else str(change.status)] += 1
    print(f"\nstatus changes after the kills: {dict(reasons)}")


def _fingerprint(model_dir: Path) -> str:
    from seal.models import model_fingerprint

    return model_fingerprint(model_dir)
