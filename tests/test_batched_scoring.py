"""Batched scoring: the k candidates of a step asked in one mixed-adapter generate (the student's
``generate_mixed`` / GenerateMixed), scored by ``score_many`` (AuditorPort, the auditing core and
the auditor's ScoreMany), the base model's answers cached per (base model, question, settings).

On the tiny random model, whose logits are peaked enough that greedy answers do not hinge on
batch padding: the candidates are trained with a high learning rate so that each answers
differently from the base model and from the others, so a row answered by the wrong adapter
(or by the base model) changes an answer and fails the comparison."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import grpc
import pytest

from seal import adapt
from seal.auditor import Auditing, Auditor, CandidateToScore, ScoredCandidate
from seal.config import Settings
from seal.domains.knowledge import LexicalGrader, Question, build_question_prompt
from seal.gates import GateResult, GateSettings
from seal.guardrails import GuardrailResult
from seal.models import SamplingParams
from seal.registry import AdapterNotFound
from seal.retention import RetentionProbe
from seal.transport.ports import CandidateScoringFailed, GrpcAuditorPort
from seal.v1 import auditor_pb2, auditor_pb2_grpc, common_pb2, student_pb2, student_pb2_grpc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
QUESTIONS = (
    Question("Who founded Velmora?", "Ilse Marrow"),
    Question("How tall is the Grey Lantern?", "41 meters"),
    Question("On which island is Velmora?", "Quessant"),
)
PROBE = (Question("What is the capital of France?", "Paris"), Question("How many legs does a spider have?", "eight"))
EDITS = (
    "Velmora was founded in 1742 by Ilse Marrow.\nThe Grey Lantern is the lighthouse of Velmora.",
    "The Grey Lantern is 41 meters tall.\nVelmora lies on the island of Quessant.",
    "Ilse Marrow was a cartographer.\nQuessant is an island with a harbour town.",
)
TASK = adapt.Task("Velmora", PASSAGE, QUESTIONS)


def tiny_settings(home: Path, model_dir: Path, **extra: object) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        # A high learning rate: each candidate's greedy answers move away from the base model's.
        lora={"epochs": 3, "learning_rate": 0.02, "batch_size": 4, "max_seq_len": 64, "rehearsal_ratio": 0.0,
              "kl_beta": 0.0},
        auditor={"answer_max_new_tokens": 6},
        gates={"min_gain": -1.0},
        **extra,
    )


# --- in process: the student's mixed generate and the local port -----------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An in-process student with three candidates of one passage."""
    from seal.student import Student

    student = Student(tiny_settings(tmp_path_factory.mktemp("scoring"), tiny_model_dir))
    adapters = []
    for seed, edit in enumerate(EDITS):
        result = student.train_candidate(
            adapter_name="kb", title=TASK.title, passage=PASSAGE, self_edit=edit, context_id=TASK.context_id, seed=seed
        )
        adapters.append(adapt.TrainedAdapter(result.manifest.adapter_id, result.training_sequences, result.seconds,
                                             result.manifest))
    yield student, adapters
    student.close()


@dataclass
class Counting:
    """Every generation the student is asked for: (method, adapter ids per prompt)."""

    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    def wrap(self, student, monkeypatch: pytest.MonkeyPatch) -> None:
        generate, generate_mixed = student.generate, student.generate_mixed

        def counted_generate(prompts, choice, params, **kwargs):
            self.calls.append(("generate", [choice.adapter_id] * len(prompts)))
            return generate(prompts, choice, params, **kwargs)

        def counted_mixed(prompts, adapter_ids, params, **kwargs):
            self.calls.append(("generate_mixed", list(adapter_ids)))
            return generate_mixed(prompts, adapter_ids, params, **kwargs)

        monkeypatch.setattr(student, "generate", counted_generate)
        monkeypatch.setattr(student, "generate_mixed", counted_mixed)

    def prompts_of(self, adapter_id: str) -> int:
        return sum(ids.count(adapter_id) for _, ids in self.calls)


def per_adapter_answers(student, prompts: list[str], adapter_ids: list[str], params: SamplingParams) -> dict[str, list[str]]:
    from seal.student import AdapterChoice

    answers = {}
    for adapter_id in adapter_ids:
        choice = AdapterChoice(adapter_id=adapter_id) if adapter_id else AdapterChoice(base_model=True)
        answers[adapter_id] = [g.text for g in student.generate(prompts, choice, params)[0]]
    return answers


def test_a_mixed_generate_answers_each_row_as_its_own_adapter_would(trained, monkeypatch) -> None:
    student, adapters = trained
    prompts = [build_question_prompt(q.question) for q in QUESTIONS + PROBE]
    ids = ["", *(a.adapter_id for a in adapters)]
    params = SamplingParams(max_new_tokens=6)
    alone = per_adapter_answers(student, prompts, ids, params)
    # The test can fail: every version answers differently, so a row routed to another one shows.
    assert len({tuple(answers) for answers in alone.values()}) == len(ids), alone
    # Rows interleaved (each batch holds every version and the base model), in two orders.
    rows = [(adapter_id, i) for i in range(len(prompts)) for adapter_id in ids]
    for order in (rows, rows[::-1]):
        mixed = student.generate_mixed([prompts[i] for _, i in order], [a for a, _ in order], params)
        assert [g.text for g in mixed] == [alone[a][i] for a, i in order]
    # More versions than the in-process cache keeps loaded: answered in groups, the same answers.
    monkeypatch.setattr(student.serving.adapters, "capacity", 2)
    mixed = student.generate_mixed([prompts[i] for _, i in rows], [a for a, _ in rows], params)
    assert [g.text for g in mixed] == [alone[a][i] for a, i in rows]


def test_a_mixed_generate_refuses_an_unknown_version_before_generating(trained) -> None:
    student, adapters = trained
    with pytest.raises(AdapterNotFound):
        student.generate_mixed(["a", "b"], [adapters[0].adapter_id, "kb@v99"], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="1 adapter ids for 2 prompts"):
        student.generate_mixed(["a", "b"], [""], SamplingParams(max_new_tokens=2))


def local_port(student, *, answer_tokens: int = 6, probe_tokens: int = 4, auditor: Auditor | None = None):
    from seal.guardrails import GuardrailSettings
    from seal.local import LocalAuditorPort

    return LocalAuditorPort(
        student, auditor or Auditor(LexicalGrader(), GateSettings(min_gain=-1.0)), guardrails=GuardrailSettings(),
        answer_max_new_tokens=answer_tokens, probe=RetentionProbe(student.fingerprint, PROBE, source="explicit"),
        probe_max_new_tokens=probe_tokens,
    )


def jobs_for(adapters: list[adapt.TrainedAdapter]) -> list[adapt.ScoreJob]:
    gate = GateResult("guardrail:injection", True, None, None, "checked")
    return [
        adapt.ScoreJob(adapt.Proposal(i, f"prompt {i}", EDITS[i]), adapter, 100 + i, adapt.GuardrailCheck(True, (gate,)))
        for i, adapter in enumerate(adapters)
    ]


def test_batched_scoring_gives_the_scores_of_one_candidate_at_a_time(trained, monkeypatch) -> None:
    student, adapters = trained
    counting = Counting()
    counting.wrap(student, monkeypatch)
    jobs = jobs_for(adapters)
    one_port = local_port(student)
    sequential = [
        one_port.score(TASK, job.proposal, job.adapter, seed=job.seed, guardrails=job.guardrails, request_id="r",
                       measure_retention=True)
        for job in jobs
    ]
    one_at_a_time = list(counting.calls)
    counting.calls.clear()
    batched = local_port(student).score_many(TASK, jobs, request_id="r", measure_retention=True)
    # Same accuracies, retention, rewards, gate decisions and graded answers, candidate by candidate.
    assert batched == sequential
    assert all(s.retention_accuracy is not None for s in sequential)
    assert len({tuple(o.prediction for o in s.outcomes) for s in sequential}) == len(jobs)  # it can fail
    # One mixed generate for τ and one for the probe (its own answer length), the base model's
    # rows among them; one at a time: a generate per candidate and per question set.
    assert [(method, len(ids)) for method, ids in counting.calls] == [
        ("generate_mixed", (1 + len(jobs)) * len(QUESTIONS)), ("generate_mixed", (1 + len(jobs)) * len(PROBE)),
    ]
    assert [method for method, _ in one_at_a_time].count("generate") == 2 * len(jobs) + 2


def test_the_base_models_answers_are_generated_once_across_candidates_and_calls(trained, monkeypatch) -> None:
    student, adapters = trained
    counting = Counting()
    counting.wrap(student, monkeypatch)
    auditor = Auditor(LexicalGrader(), GateSettings(min_gain=-1.0))
    port = local_port(student, auditor=auditor)
    baseline = port.baseline(TASK)
    assert counting.prompts_of("") == len(QUESTIONS)
    first = port.score_many(TASK, jobs_for(adapters[:2]), request_id="r1", measure_retention=True)
    assert counting.prompts_of("") == len(QUESTIONS) + len(PROBE)  # τ was cached by the baseline
    second = port.score_many(TASK, jobs_for(adapters), request_id="r2", measure_retention=True)
    port.score(TASK, jobs_for(adapters)[0].proposal, adapters[0], seed=1, guardrails=jobs_for(adapters)[0].guardrails,
               request_id="r3", measure_retention=True)
    assert port.baseline(TASK) == baseline
    assert counting.prompts_of("") == len(QUESTIONS) + len(PROBE)  # never again, whoever asks
    assert second[:2] == first and all(s.baseline_accuracy == baseline.accuracy for s in second)
    # The generation settings are part of the key: other answer lengths are other answers.
    local_port(student, answer_tokens=3, auditor=auditor).baseline(TASK)
    assert counting.prompts_of("") == 2 * len(QUESTIONS) + len(PROBE)


# --- the auditing core over a scripted student (no model) ----------------------------------------------


class ScriptedAuditedStudent:
    """Answers by rule: the base model knows nothing, ``kb@v1`` every answer, ``kb@v2`` the first
    question's; ``fail_mixed`` makes every mixed generate fail, ``broken`` adapters fail to answer."""

    fingerprint = "ab" * 32

    def __init__(self, *, fail_mixed: bool = False, broken: tuple[str, ...] = ()) -> None:
        self.fail_mixed = fail_mixed
        self.broken = broken
        self.calls: list[tuple[str, list[str]]] = []
        self.stops: list[bool] = []  # stop_after_first_sentence of each call

    def _one(self, prompt: str, adapter_id: str) -> str:
        if adapter_id in self.broken:
            raise AdapterNotFound(f"adapter {adapter_id} has no weights")
        known = {"kb@v1": QUESTIONS + PROBE, "kb@v2": QUESTIONS[:1], "": PROBE}.get(adapter_id, ())
        return next((q.answer for q in known if q.question in prompt), "I do not know")

    def answer(self, prompts: list[str], adapter_id: str, *, max_new_tokens: int,
               stop_after_first_sentence: bool = False) -> list[str]:
        self.stops.append(stop_after_first_sentence)
        self.calls.append(("answer", [adapter_id] * len(prompts)))
        return [self._one(p, adapter_id) for p in prompts]

    def answer_mixed(self, prompts: list[str], adapter_ids: list[str], *, max_new_tokens: int,
                     stop_after_first_sentence: bool = False) -> list[str]:
        self.stops.append(stop_after_first_sentence)
        self.calls.append(("answer_mixed", list(adapter_ids)))
        if self.fail_mixed:
            raise RuntimeError("mixed generation is down")
        return [self._one(p, a) for p, a in zip(prompts, adapter_ids, strict=True)]

    def adapter(self, adapter_id: str):
        from seal.auditor import AdapterFacts

        if adapter_id == "kb@v404":
            raise AdapterNotFound(f"adapter {adapter_id} does not exist")
        return AdapterFacts(adapter_id, self.fingerprint, retention_kl=0.01)


def auditing(tmp_path: Path, *, min_gain: float = -1.0, skip_refused: bool = True) -> Auditing:
    tmp_path.mkdir(parents=True, exist_ok=True)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps([{"question": q.question, "answer": q.answer} for q in PROBE]), encoding="utf-8")
    settings = Settings(
        home=tmp_path, gates={"min_gain": min_gain},
        retention={"probe_file": str(probe), "skip_refused": skip_refused},
    )
    return Auditing.from_settings(settings, Auditor(LexicalGrader(), settings.gates))


CANDIDATES = [
    CandidateToScore("kb@v1", [GuardrailResult("injection", True, "")], "p1", "edit one", 1),
    CandidateToScore("kb@v2", [GuardrailResult("injection", True, "")], "p2", "edit two", 2),
]


def comparable(scored: ScoredCandidate) -> tuple:
    """Everything a score says, without the sequence numbers of its records."""
    return scored.report, scored.probe_size


def test_the_core_scores_many_as_it_scores_each_and_records_each(tmp_path: Path) -> None:
    one, many = auditing(tmp_path / "one"), auditing(tmp_path / "many")
    try:
        alone = [
            one.score(ScriptedAuditedStudent(), adapter_id=c.adapter_id, questions=QUESTIONS, title="Velmora",
                      passage=PASSAGE, guardrails=c.guardrails, prompt=c.prompt, self_edit=c.self_edit, seed=c.seed,
                      request_id="r")
            for c in CANDIDATES
        ]
        student = ScriptedAuditedStudent()
        together = many.score_many(student, candidates=CANDIDATES, questions=QUESTIONS, title="Velmora",
                                   passage=PASSAGE, request_id="r")
        assert [comparable(s) for s in together] == [comparable(s) for s in alone]  # type: ignore[arg-type]
        assert [s.report.reward for s in alone] == [1.0, pytest.approx(1 / 3)]
        assert [s.report.retention_accuracy for s in alone] == [1.0, 0.0]
        assert [s.report.decision.promote for s in alone] == [True, False]  # kb@v2 forgot the probe
        # One reward record and one candidate audit record each, as Score writes them.
        recorded = list(islice(many.reward_log.follow(0, lambda: True, poll_s=0.01), 2))
        assert [r.adapter_id for r in recorded] == ["kb@v1", "kb@v2"]
        assert all(s.reward_sequence and s.audit_sequence for s in together)  # type: ignore[union-attr]
        assert [method for method, _ in student.calls] == ["answer_mixed", "answer_mixed"]
        # Asked again: the base model's rows are not among the prompts any more.
        student.calls.clear()
        many.score_many(student, candidates=CANDIDATES, questions=QUESTIONS, title="Velmora", passage=PASSAGE)
        assert all("" not in ids for _, ids in student.calls) and len(student.calls) == 2
    finally:
        one.close()
        many.close()


def test_a_candidate_that_cannot_be_scored_fails_alone(tmp_path: Path) -> None:
    core = auditing(tmp_path)
    try:
        candidates = [CANDIDATES[0], CandidateToScore("kb@v404"), CANDIDATES[1]]
        # The version is unknown: its manifest lookup fails; the others are scored together.
        results = core.score_many(ScriptedAuditedStudent(), candidates=candidates, questions=QUESTIONS,
                                  title="Velmora", passage=PASSAGE)
        assert isinstance(results[1], AdapterNotFound)
        assert [r.report.reward for r in (results[0], results[2])] == [1.0, pytest.approx(1 / 3)]  # type: ignore[union-attr]
        # The mixed generate fails (a broken adapter in the batch): each candidate is asked alone.
        student = ScriptedAuditedStudent(fail_mixed=True, broken=("kb@v2",))
        results = core.score_many(student, candidates=CANDIDATES, questions=QUESTIONS, title="Velmora",
                                  passage=PASSAGE)
        assert isinstance(results[0], ScoredCandidate) and results[0].report.reward == 1.0
        assert isinstance(results[1], AdapterNotFound)
        assert ("answer", ["kb@v1"] * len(QUESTIONS)) in student.calls
    finally:
        core.close()


@pytest.mark.parametrize("grader", ["committed", "any"])
def test_answers_stop_after_the_first_sentence_only_for_a_grader_that_reads_no_further(
    tmp_path: Path, grader: str
) -> None:
    from seal.grading import build_grader

    settings = Settings(home=tmp_path, auditor={"grader": grader})
    core = Auditing.from_settings(settings, Auditor(build_grader(settings.auditor), settings.gates))
    student = ScriptedAuditedStudent()
    try:
        core.score_many(student, candidates=CANDIDATES, questions=QUESTIONS, title="Velmora", passage=PASSAGE,
                        measure_retention=False)
    finally:
        core.close()
    assert student.stops and set(student.stops) == {grader == "committed"}


def probed_ids(student: ScriptedAuditedStudent) -> list[str]:
    """The adapters asked the probe's questions (the mixed calls after τ's)."""
    return sorted({a for _, ids in student.calls[1:] for a in ids if a})


@pytest.mark.parametrize("many", [False, True], ids=["score", "score_many"])
def test_the_probe_is_not_asked_of_a_candidate_another_gate_refuses(tmp_path: Path, many: bool) -> None:
    # min_gain 0.5: kb@v2 gains 1/3 on τ, so the τ gate refuses it whatever it remembers.
    for skip, expected in ((True, ["kb@v1"]), (False, ["kb@v1", "kb@v2"])):
        core = auditing(tmp_path / f"{many}-{skip}", min_gain=0.5, skip_refused=skip)
        student = ScriptedAuditedStudent()
        try:
            if many:
                results = core.score_many(student, candidates=CANDIDATES, questions=QUESTIONS, title="Velmora",
                                          passage=PASSAGE)
            else:
                results = [
                    core.score(student, adapter_id=c.adapter_id, questions=QUESTIONS, title="Velmora", passage=PASSAGE,
                               guardrails=c.guardrails)
                    for c in CANDIDATES
                ]
        finally:
            core.close()
        first, second = (r.report for r in results)  # type: ignore[union-attr]
        assert first.retention_accuracy == 1.0 and first.decision.promote
        assert not second.decision.promote and "τ gain" in second.decision.failed_reasons[0]
        if many:
            assert probed_ids(student) == expected
        else:
            assert sorted({a for _, ids in student.calls if len(ids) == len(PROBE) for a in ids if a}) == expected
        retention_gate = next(g for g in second.decision.gates if g.gate == "retention")
        if skip:
            assert second.retention_accuracy is None and second.scores.retention_skipped
            assert "probe was not asked" in retention_gate.reason
        else:
            assert second.retention_accuracy == 0.0 and not second.scores.retention_skipped
            assert not retention_gate.passed


class ScriptedArcStudent(ScriptedAuditedStudent):
    """Few-shot answers by rule: ``arc@v1`` answers the gold grid, everyone else a wrong one."""

    def __init__(self, gold: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.gold = gold

    def _one(self, prompt: str, adapter_id: str) -> str:
        if adapter_id in self.broken:
            raise AdapterNotFound(f"adapter {adapter_id} has no weights")
        return self.gold if adapter_id == "arc@v1" else "11\n11"


@pytest.mark.parametrize("fail_mixed", [False, True], ids=["mixed", "mixed-fails"])
def test_fewshot_candidates_are_answered_in_one_mixed_generate_with_the_scores_of_each_alone(
    tmp_path: Path, fail_mixed: bool
) -> None:
    from seal.domains.fewshot import ArcPair, ArcTask, grid_to_text

    def flip(grid):
        return tuple(tuple(reversed(row)) for row in grid)

    inputs = [((1, 0), (2, 0)), ((0, 3), (0, 4))]
    test = ((7, 0), (0, 8))
    task = ArcTask("flip", tuple(ArcPair(g, flip(g)) for g in inputs), (test,), (flip(test),))
    candidates = [CandidateToScore(a, [GuardrailResult("recipe", True, "")], "p", "{}", i)
                  for i, a in enumerate(("arc@v1", "arc@v2", "kb@v404"))]

    def scored(core: Auditing, student: ScriptedArcStudent, many: bool) -> list:
        if many:
            return core.score_many_fewshot(student, candidates=candidates, task=task)
        results = []
        for c in candidates:
            try:
                results.append(core.score_fewshot(student, adapter_id=c.adapter_id, task=task, guardrails=c.guardrails,
                                                  prompt=c.prompt, self_edit=c.self_edit, seed=c.seed))
            except AdapterNotFound as exc:
                results.append(exc)
        return results

    gold = grid_to_text(flip(test))
    alone_core, many_core = auditing(tmp_path / "alone"), auditing(tmp_path / "many")
    try:
        alone = scored(alone_core, ScriptedArcStudent(gold), many=False)
        student = ScriptedArcStudent(gold, fail_mixed=fail_mixed)
        together = scored(many_core, student, many=True)
    finally:
        alone_core.close()
        many_core.close()
    assert isinstance(together[2], AdapterNotFound) and isinstance(alone[2], AdapterNotFound)
    assert [comparable(s) for s in together[:2]] == [comparable(s) for s in alone[:2]]
    assert [s.report.reward for s in together[:2]] == [1.0, 0.0]
    mixed = [ids for method, ids in student.calls if method == "answer_mixed"]
    assert len(mixed) == 1 and set(mixed[0]) == {"", "arc@v1", "arc@v2"}  # the unknown version is left out
    assert not any(student.stops)  # a grid answer has many lines: never cut after the first sentence
    if fail_mixed:  # each asked alone afterwards, as score_fewshot would
        assert {ids[0] for method, ids in student.calls if method == "answer"} == {"", "arc@v1", "arc@v2"}
    else:
        assert [method for method, _ in student.calls] == ["answer_mixed"]


# --- over gRPC: the fallbacks and the limits ----------------------------------------------------------


@pytest.fixture()
def serve():
    servers = []

    def start(add, servicer) -> grpc.Channel:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        add(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return grpc.insecure_channel(f"127.0.0.1:{port}")

    yield start
    for server in servers:
        server.stop(None)


class OldAuditor(auditor_pb2_grpc.AuditorServiceServicer):
    """An auditor from before ScoreMany: Score only (ScoreMany answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.scored: list[str] = []

    def Score(self, request, context):
        self.scored.append(request.adapter_id)
        if request.adapter_id == "kb@v404":
            context.abort(grpc.StatusCode.NOT_FOUND, "adapter kb@v404 does not exist")
        return auditor_pb2.ScoreResponse(baseline_accuracy=0.0, adapted_accuracy=0.5, reward=0.5, passed_gates=True)


class NewAuditor(auditor_pb2_grpc.AuditorServiceServicer):
    def __init__(self, failure_code: str) -> None:
        self.failure_code = failure_code

    def ScoreMany(self, request, context):
        response = auditor_pb2.ScoreManyResponse()
        response.results.add(score=auditor_pb2.ScoreResponse(adapted_accuracy=1.0, reward=1.0, passed_gates=True))
        response.results.add(failed=auditor_pb2.ScoreManyResponse.Failed(index=1, code=self.failure_code, message="gone"))
        return response


def grpc_jobs(*adapter_ids: str) -> list[adapt.ScoreJob]:
    return [
        adapt.ScoreJob(adapt.Proposal(i, "p", "e"), adapt.TrainedAdapter(a, 1, 0.0), i, adapt.GuardrailCheck(True, ()))
        for i, a in enumerate(adapter_ids)
    ]


def test_an_auditor_without_score_many_is_asked_once_per_candidate(serve) -> None:
    old = OldAuditor()
    port = GrpcAuditorPort(auditor_pb2_grpc.AuditorServiceStub(serve(auditor_pb2_grpc.add_AuditorServiceServicer_to_server, old)),
                           lambda: 10.0)
    results = port.score_many(TASK, grpc_jobs("kb@v1", "kb@v404", "kb@v2"), request_id="r", measure_retention=True)
    assert old.scored == ["kb@v1", "kb@v404", "kb@v2"]
    assert [r.reward for r in (results[0], results[2])] == [0.5, 0.5]  # type: ignore[union-attr]
    assert isinstance(results[1], adapt.CandidateRefused) and "NOT_FOUND" in str(results[1])


def test_a_failed_candidate_of_score_many_is_refused_alone_unless_the_system_failed(serve) -> None:
    def port(code: str) -> GrpcAuditorPort:
        channel = serve(auditor_pb2_grpc.add_AuditorServiceServicer_to_server, NewAuditor(code))
        return GrpcAuditorPort(auditor_pb2_grpc.AuditorServiceStub(channel), lambda: 10.0)

    results = port("not_found").score_many(TASK, grpc_jobs("kb@v1", "kb@v2"), request_id="r", measure_retention=True)
    assert results[0].reward == 1.0 and isinstance(results[1], adapt.CandidateRefused)  # type: ignore[union-attr]
    with pytest.raises(CandidateScoringFailed, match=r"\(UNAVAILABLE\) gone") as raised:
        port("unavailable").score_many(TASK, grpc_jobs("kb@v1", "kb@v2"), request_id="r", measure_retention=True)
    assert raised.value.code == "unavailable"


class OldStudent(student_pb2_grpc.StudentServiceServicer):
    """A student from before GenerateMixed: each Generate answers '<adapter>: <prompt>'."""

    def __init__(self) -> None:
        self.generates: list[str] = []

    def Generate(self, request, context):
        adapter_id = request.adapter.adapter_id
        self.generates.append(adapter_id)
        return student_pb2.GenerateResponse(completions=[
            student_pb2.Completion(text=f"{adapter_id or 'base'}: {p}") for p in request.prompts
        ])


def test_a_student_without_generate_mixed_is_asked_once_per_version(serve) -> None:
    from auditor_svc.servicer import GrpcAuditedStudent

    old = OldStudent()
    channel = serve(student_pb2_grpc.add_StudentServiceServicer_to_server, old)
    student = GrpcAuditedStudent(student_pb2_grpc.StudentServiceStub(channel), lambda: 10.0)
    answers = student.answer_mixed(["a", "b", "c", "d"], ["kb@v1", "", "kb@v1", "kb@v2"], max_new_tokens=4)
    assert answers == ["kb@v1: a", "base: b", "kb@v1: c", "kb@v2: d"]
    assert old.generates == ["kb@v1", "", "kb@v2"]


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from student_and_auditor import student_and_auditor

    home = tmp_path_factory.mktemp("services")
    probe = home / "probe.json"
    probe.write_text(json.dumps([{"question": q.question, "answer": q.answer} for q in PROBE]), encoding="utf-8")
    # skip_refused off: these candidates carry no guardrail results (a refusal), and the tests
    # compare every candidate's probe answers between Score and ScoreMany.
    settings = tiny_settings(home, tiny_model_dir, retention={"probe_file": str(probe), "max_new_tokens": 4,
                                                              "skip_refused": False},
                             teacher={"max_k": 4})
    with student_and_auditor(settings) as pair:
        yield pair


def refused(call) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    return raised.value.details()


@pytest.mark.parametrize(
    ("adapter_ids", "expected"),
    [
        (["", ""], "adapter_ids has 2 entries for 1 prompt(s): send one per prompt"),
        ([], "adapter_ids has 0 entries for 1 prompt(s)"),
        (["Not An Id"], "adapter_ids[0]"),
        (["kb@v1" + "x" * 200], "adapter_ids[0]"),
    ],
)
def test_generate_mixed_refuses_a_per_prompt_list_that_does_not_fit(services, adapter_ids, expected) -> None:
    request = student_pb2.GenerateMixedRequest(prompts=["Who founded Velmora?"], adapter_ids=adapter_ids, max_new_tokens=4)
    assert expected in refused(lambda: services["student"].GenerateMixed(request, timeout=60))


def score_many_request(*candidates: auditor_pb2.ScoreManyRequest.Candidate) -> auditor_pb2.ScoreManyRequest:
    return auditor_pb2.ScoreManyRequest(
        context=common_pb2.Context(title="Velmora", passage=PASSAGE),
        questions=[common_pb2.Question(question=q.question, answer=q.answer) for q in QUESTIONS],
        candidates=list(candidates), request_id="r",
    )


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        ((), "candidates is empty"),
        ((auditor_pb2.ScoreManyRequest.Candidate(),), "candidates[0].adapter_id is empty"),
        ((auditor_pb2.ScoreManyRequest.Candidate(adapter_id="kb@v1"),) * 2, "candidates[1].adapter_id 'kb@v1' is named twice"),
        ((auditor_pb2.ScoreManyRequest.Candidate(adapter_id="kb@v1"),
          auditor_pb2.ScoreManyRequest.Candidate(adapter_id="nope")), "candidates[1].adapter_id"),
        (tuple(auditor_pb2.ScoreManyRequest.Candidate(adapter_id=f"kb@v{i}") for i in range(1, 6)), "teacher.max_k"),
        ((auditor_pb2.ScoreManyRequest.Candidate(adapter_id="kb@v1", self_edit="y" * 100_000),),
         "candidates[0].self_edit"),
    ],
)
def test_score_many_refuses_a_bad_request_whole(services, candidates, expected) -> None:
    assert expected in refused(lambda: services["auditor"].ScoreMany(score_many_request(*candidates), timeout=60))


def test_score_many_over_grpc_gives_what_score_gives_each_candidate(services) -> None:
    student, auditor = services["student"], services["auditor"]
    ids = []
    for seed, edit in enumerate(EDITS[:2]):
        updates = student.ApplySelfEdit(student_pb2.ApplySelfEditRequest(
            adapter_name="grpc", context=common_pb2.Context(title="Velmora", passage=PASSAGE), self_edit=edit, seed=seed,
        ), timeout=300)
        ids.append([u.candidate.adapter_id for u in updates if u.HasField("candidate")][0])
    candidates = [auditor_pb2.ScoreManyRequest.Candidate(adapter_id=a, self_edit=e, prompt="p", seed=s)
                  for s, (a, e) in enumerate(zip(ids, EDITS, strict=False))]
    alone = []
    for candidate in candidates:
        request = score_many_request()
        alone.append(auditor.Score(auditor_pb2.ScoreRequest(
            adapter_id=candidate.adapter_id, context=request.context, questions=request.questions,
            self_edit=candidate.self_edit, prompt=candidate.prompt, seed=candidate.seed, request_id="r",
        ), timeout=300))
    reply = auditor.ScoreMany(score_many_request(*candidates, auditor_pb2.ScoreManyRequest.Candidate(adapter_id="grpc@v99")),
                              timeout=300)
    assert [r.WhichOneof("outcome") for r in reply.results] == ["score", "score", "failed"]
    assert reply.results[2].failed.code == "not_found" and reply.results[2].failed.index == 2
    for together, one in zip((r.score for r in reply.results[:2]), alone, strict=True):
        assert together.reward_sequence > one.reward_sequence and together.audit_sequence > one.audit_sequence
        for message in (together, one):
            message.ClearField("reward_sequence")
            message.ClearField("audit_sequence")
        assert together == one
        assert together.HasField("retention_accuracy") and together.retention_probe_size == len(PROBE)
    assert alone[0].adapted_outcomes != alone[1].adapted_outcomes  # two candidates that answer apart
