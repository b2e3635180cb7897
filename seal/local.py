"""The SEAL pipeline's ports over the in-process engines: one process, no services.

Tests, benches and ``seal eval`` run the very step Adapt runs (``seal.adapt``) on a
:class:`seal.student.Student` and a :class:`seal.auditor.Auditor` held in memory; nothing here
knows gRPC. Guardrails are the same rules the auditor service applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from seal import adapt
from seal.auditor import AdapterToScore, Auditor, MixedAnswerFunction, ScoreReport, accuracy_of, base_key
from seal.domains import fewshot_audit
from seal.domains.fewshot import FewShotSettings, task_to_dict
from seal.executors import CandidateJob
from seal.guardrails import GuardrailSettings, check_self_edit
from seal.models import SamplingParams
from seal.retention import RetentionProbe
from seal.streaming import stream_callbacks
from seal.student import AdapterChoice, Student


def candidate_job(
    task: adapt.Task,
    proposal: adapt.Proposal,
    *,
    adapter_name: str,
    seed: int,
    overrides: Mapping[str, Any],
    training_prompts: Sequence[str] = (),
) -> CandidateJob:
    """The student's job for one candidate of ``task``: ``include_passage`` travels among the
    pipeline's overrides but is the job's own field."""
    options = dict(overrides)
    include_passage = bool(options.pop("include_passage", True))
    return CandidateJob(
        adapter_name=adapter_name,
        title=task.title,
        passage=task.passage,
        self_edit=proposal.text,
        context_id=task.context_id,
        overrides=options,
        include_passage=include_passage,
        seed=seed,
        training_prompts=tuple(training_prompts),
        fewshot_task=task_to_dict(task.fewshot) if task.fewshot is not None else None,
    )


class LocalStudentPort:
    """The student port over an in-process :class:`Student`. Its ``promote`` and ``reject`` go
    through the student's registry, so they reach the audit trail only when that student was
    built with ``audit=`` (the service's outbox): these ports serve tests, benches and ``seal
    eval``, whose students live in scratch homes (``evaluate_stored_policy``) and never promote."""

    def __init__(self, student: Student, *, should_stop: Callable[[], bool] | None = None) -> None:
        self._student = student
        self._should_stop = should_stop

    def train(
        self,
        task: adapt.Task,
        proposal: adapt.Proposal,
        *,
        adapter_name: str,
        seed: int,
        overrides: Mapping[str, Any],
        training_prompts: Sequence[str] = (),
    ) -> Iterator[adapt.TrainingStep | adapt.TrainedAdapter]:
        job = candidate_job(task, proposal, adapter_name=adapter_name, seed=seed, overrides=overrides,
                            training_prompts=training_prompts)

        def work(emit: Callable[[adapt.TrainingStep], None]) -> Any:
            return self._student.train_candidate(
                **job.train_kwargs(),
                on_step=lambda step, total, loss: emit(adapt.TrainingStep(step, total, loss)),
                should_stop=self._should_stop,
            )

        try:
            result = yield from stream_callbacks(work, name="seal-local-train")
        except Exception as exc:
            if adapt.is_refusal(exc):
                raise adapt.CandidateRefused(str(exc)) from exc
            raise
        yield adapt.TrainedAdapter(result.manifest.adapter_id, result.training_sequences, result.seconds, result.manifest)

    def train_many(
        self,
        task: adapt.Task,
        proposals: Sequence[adapt.Proposal],
        *,
        adapter_name: str,
        seeds: Sequence[int],
        overrides: Mapping[str, Any],
        training_prompts: Sequence[str] = (),
    ) -> Iterator[tuple[int, adapt.TrainingStep | adapt.TrainedAdapter | adapt.CandidateRefused]]:
        """One batch through the student's executor (``Student.train_candidates``: together when
        ``student.batch_candidates``); each candidate's result comes once the batch has ended."""
        if len(seeds) != len(proposals):
            raise ValueError(f"{len(proposals)} self-edits but {len(seeds)} seeds")
        jobs = [
            candidate_job(task, proposal, adapter_name=adapter_name, seed=seed, overrides=overrides,
                          training_prompts=training_prompts)
            for proposal, seed in zip(proposals, seeds, strict=True)
        ]

        def work(emit: Callable[[tuple[int, adapt.TrainingStep]], None]) -> Any:
            return self._student.train_candidates(
                jobs,
                on_step=lambda position, step, total, loss: emit((position, adapt.TrainingStep(step, total, loss))),
                should_stop=self._should_stop,
            )

        outcomes = yield from stream_callbacks(work, name="seal-local-train-many")
        for outcome in outcomes:
            if outcome.result is not None:
                result = outcome.result
                yield outcome.position, adapt.TrainedAdapter(
                    result.manifest.adapter_id, result.training_sequences, result.seconds, result.manifest
                )
            elif outcome.refused:
                yield outcome.position, adapt.CandidateRefused(outcome.failure)
            else:  # not the self-edit's fault: raised as a lone training would have raised it
                outcome.result_or_raise()

    def answer_with_base(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]:
        generations, _ = self._student.generate(
            list(prompts), AdapterChoice(base_model=True), SamplingParams(max_new_tokens=max_new_tokens)
        )
        return [g.text for g in generations]

    def promote(self, adapter_id: str, reason: str) -> None:
        self._student.promote(adapter_id, reason)

    def reject(self, adapter_id: str, reason: str, *, discard_weights: bool = False) -> None:
        self._student.reject(adapter_id, reason, discard_weights=discard_weights)


class LocalAuditorPort:
    """Closed-book scoring through the student's own ``generate``; the retention probe is asked
    only when one is given (building it is the auditor service's job)."""

    def __init__(
        self,
        student: Student,
        auditor: Auditor,
        *,
        guardrails: GuardrailSettings,
        answer_max_new_tokens: int = 32,
        probe: RetentionProbe | None = None,
        probe_max_new_tokens: int | None = None,
        fewshot: FewShotSettings | None = None,
    ) -> None:
        """``fewshot``: the few-shot domain's settings (recipe limits, voting), for its tasks."""
        self._student = student
        self._auditor = auditor
        self._guardrails = guardrails
        self._probe = probe
        self._answer = self._answer_fn(answer_max_new_tokens)
        self._probe_answer = self._answer_fn(probe_max_new_tokens or answer_max_new_tokens)
        self._answer_mixed = self._mixed_fn(answer_max_new_tokens)
        self._probe_answer_mixed = self._mixed_fn(probe_max_new_tokens or answer_max_new_tokens)
        # The base model's answers are cached by the auditor under its fingerprint and settings.
        fingerprint = student.fingerprint
        first_sentence = auditor.stops_after_first_sentence
        self._base = base_key(fingerprint, answer_max_new_tokens, first_sentence=first_sentence)
        self._probe_base = base_key(fingerprint, probe_max_new_tokens or answer_max_new_tokens, first_sentence=first_sentence)
        self._fewshot = fewshot or FewShotSettings()
        # The base model's graded answers per few-shot task (they depend on nothing else).
        self._fewshot_baselines: dict[str, fewshot_audit.Graded] = {}

    def _fewshot_answer(self, prompts: Sequence[str], max_new_tokens: int, adapter_id: str) -> list[str]:
        choice = AdapterChoice(adapter_id=adapter_id) if adapter_id else AdapterChoice(base_model=True)
        generations, _ = self._student.generate(list(prompts), choice, SamplingParams(max_new_tokens=max_new_tokens))
        return [g.text for g in generations]

    def _fewshot_baseline(self, task: adapt.Task) -> fewshot_audit.Graded:
        assert task.fewshot is not None
        if task.context_id not in self._fewshot_baselines:
            self._fewshot_baselines[task.context_id] = fewshot_audit.grade_with(
                task.fewshot, self._fewshot_answer, "", self._fewshot
            )
        return self._fewshot_baselines[task.context_id]

    def _answer_fn(self, max_new_tokens: int) -> Callable[[list[str], str], list[str]]:
        params = SamplingParams(
            max_new_tokens=max_new_tokens, stop_after_first_sentence=self._auditor.stops_after_first_sentence
        )

        def answer(prompts: list[str], adapter_id: str) -> list[str]:
            choice = AdapterChoice(adapter_id=adapter_id) if adapter_id else AdapterChoice(base_model=True)
            generations, _ = self._student.generate(prompts, choice, params)
            return [g.text for g in generations]

        return answer

    def _mixed_fn(self, max_new_tokens: int) -> MixedAnswerFunction:
        params = SamplingParams(
            max_new_tokens=max_new_tokens, stop_after_first_sentence=self._auditor.stops_after_first_sentence
        )

        def answer(prompts: list[str], adapter_ids: list[str]) -> list[str]:
            return [g.text for g in self._student.generate_mixed(prompts, adapter_ids, params)]

        return answer

    def check(self, task: adapt.Task, proposal: adapt.Proposal, *, seed: int, request_id: str) -> adapt.GuardrailCheck:
        if task.fewshot is not None:
            results = [fewshot_audit.check_recipe(proposal.text, self._fewshot)]
            return adapt.GuardrailCheck(all(r.passed for r in results), tuple(adapt.guardrail_to_gate(r) for r in results))
        results = check_self_edit(proposal.text, f"{task.title}\n{task.passage}", self._guardrails)
        return adapt.GuardrailCheck(all(r.passed for r in results), tuple(adapt.guardrail_to_gate(r) for r in results))

    def baseline(self, task: adapt.Task) -> adapt.Baseline:
        if task.fewshot is not None:
            graded = self._fewshot_baseline(task)
            return adapt.Baseline(graded.accuracy, graded.outcomes)
        outcomes = self._auditor.baseline(self._answer, task.questions, base=self._base)
        return adapt.Baseline(accuracy_of(outcomes), tuple(outcomes))

    def score(
        self,
        task: adapt.Task,
        proposal: adapt.Proposal,
        adapter: adapt.TrainedAdapter,
        *,
        seed: int,
        guardrails: adapt.GuardrailCheck,
        request_id: str,
        measure_retention: bool,
    ) -> adapt.Score:
        if task.fewshot is not None:
            return self._score_fewshot(task, adapter, guardrails)
        report = self._auditor.score(
            self._answer,
            adapter.adapter_id,
            task.questions,
            [adapt.guardrail_from_gate(g) for g in guardrails.gates],
            probe=self._probe if measure_retention else None,
            probe_answer=self._probe_answer,
            retention_kl=_retention_kl(adapter) if measure_retention else None,
            base=self._base,
            probe_base=self._probe_base,
        )
        return score_of(report)

    def score_many(
        self, task: adapt.Task, jobs: Sequence[adapt.ScoreJob], *, request_id: str, measure_retention: bool
    ) -> list[adapt.Score | adapt.CandidateRefused]:
        """Every candidate's answers in one mixed-adapter generate for τ and one for the probe
        (``Student.generate_mixed``), scored as :meth:`score` scores one; few-shot tasks one by one."""
        if task.fewshot is not None:
            return adapt.score_each(self, task, jobs, request_id=request_id, measure_retention=measure_retention)
        reports = self._auditor.score_many(
            self._answer,
            self._answer_mixed,
            [
                AdapterToScore(
                    job.adapter.adapter_id,
                    [adapt.guardrail_from_gate(g) for g in job.guardrails.gates],
                    _retention_kl(job.adapter) if measure_retention else None,
                )
                for job in jobs
            ],
            task.questions,
            probe=self._probe if measure_retention else None,
            probe_answer=self._probe_answer,
            probe_answer_mixed=self._probe_answer_mixed,
            base=self._base,
            probe_base=self._probe_base,
        )
        results: list[adapt.Score | adapt.CandidateRefused] = []
        for report in reports:
            if not isinstance(report, Exception):
                results.append(score_of(report))
            elif adapt.is_scoring_refusal(report):
                results.append(adapt.CandidateRefused(str(report)))
            else:  # not that candidate's fault: raised as a lone score would have raised it
                raise report
        return results


    def _score_fewshot(
        self, task: adapt.Task, adapter: adapt.TrainedAdapter, guardrails: adapt.GuardrailCheck
    ) -> adapt.Score:
        assert task.fewshot is not None
        baseline = self._fewshot_baseline(task)
        adapted = fewshot_audit.grade_with(task.fewshot, self._fewshot_answer, adapter.adapter_id, self._fewshot)
        verdict = fewshot_audit.score_task(
            task.fewshot, baseline, adapted, [adapt.guardrail_from_gate(g) for g in guardrails.gates]
        )
        return fewshot_score(verdict)


def score_of(report: ScoreReport) -> adapt.Score:
    """An auditor's report as the pipeline's :class:`seal.adapt.Score`."""
    return adapt.Score(
        accuracy=report.adapted_accuracy,
        baseline_accuracy=report.baseline_accuracy,
        reward=report.reward,
        passed_gates=report.decision.promote,
        gates=tuple(report.decision.gates),
        outcomes=tuple(report.adapted_outcomes),
        retention_accuracy=report.retention_accuracy,
        baseline_retention_accuracy=report.baseline_retention_accuracy,
    )


def fewshot_score(verdict: fewshot_audit.FewShotScore) -> adapt.Score:
    """A few-shot verdict as the pipeline's :class:`seal.adapt.Score` (binary reward)."""
    return adapt.Score(
        accuracy=verdict.adapted.accuracy,
        baseline_accuracy=verdict.baseline.accuracy,
        reward=verdict.reward,
        passed_gates=verdict.passed_gates,
        gates=verdict.gates,
        outcomes=verdict.adapted.outcomes,
    )


def _retention_kl(adapter: adapt.TrainedAdapter) -> float | None:
    """The KL drift the student measured after training, from the candidate's manifest."""
    manifest = adapter.manifest
    value = getattr(manifest, "metrics", {}).get("retention_kl") if manifest is not None else None
    return float(value) if isinstance(value, (int, float)) else None
