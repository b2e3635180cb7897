"""ReST^EM for SEAL (§3.1): one round = E-step + M-step.

E-step: for each training context C with its τ, sample k self-edits from the current teacher
policy and score each one by the same path as Adapt. A round is in one domain:

- knowledge incorporation: C is a passage, τ its questions asked closed book, the self-edit notes
  a LoRA candidate is trained on, reward = acc(candidate) − acc(base);
- few-shot ARC: C is a task's demonstrations, τ its test outputs, the self-edit a JSON training
  recipe, reward = 1 when the candidate solves the task (pass@2 on every test input), else 0.

Several inner-loop seeds per self-edit are averaged, as the paper does with 3. The k self-edits
of several contexts can be sampled in one batched generate (``run_round``'s ``sample_many``).
Filter: keep one self-edit per context by a keep rule (``keep``).
M-step: supervised fine-tuning of the teacher's policy adapter on (prompt → kept self-edit).

Everything here is transport-free. The round driver gets its effects as functions (sample,
score, recall a reward already streamed to the durable buffer, train and hot-load the policy),
and persists every finished piece of work in a round directory, so a round interrupted at any
point resumes without sampling or scoring anything twice.

Secrets and personal data are never stored. A self-edit in which the secrets or personal-data
guardrail finds something (``seal.guardrails.redact_sensitive``, the rules the auditor refuses a
knowledge self-edit by) is written to ``samples.jsonl`` as the audit log keeps it: the masked
text, the sha256 of the original (``text_sha256``) and ``"redacted": true`` with the rules. Such
a self-edit is refused by the round itself, in either domain: it is scored only by the
invocation that sampled it, from its original text (so the auditor records its refusal), its
result is a failure whatever the scorer said, it is never kept, and a resumed round neither
re-scores its masked text nor recalls a reward for it. A prompt is stored masked too when the
passage it quotes holds such data; the policy's SFT then learns from that masked prompt, resumed
or not. The events (``ContextSampled``, ``ContextDone``) carry the samples as stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from seal.adapt import DOMAINS, FEWSHOT, KNOWLEDGE
from seal.domains.fewshot import ArcTask
from seal.domains.knowledge import Question, context_digest
from seal.durable import JsonLinesLog, atomic_write_json
from seal.guardrails import GuardrailSettings, Redaction, redact_sensitive

log = logging.getLogger(__name__)

KeepRule = Literal["best_of_k", "best_positive"]
KEEP_RULES: tuple[KeepRule, ...] = ("best_of_k", "best_positive")
# Rewards are differences of fractions of small integers: equal gains can differ by float noise.
TIE_TOLERANCE = 1e-9


# --- the filter ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditResult:
    """One sampled self-edit and what scoring it gave; ``rewards`` holds one value per seed."""

    index: int
    text: str
    completion_tokens: int
    rewards: tuple[float, ...] = ()
    failure: str = ""

    @property
    def scored(self) -> bool:
        return bool(self.rewards) and not self.failure

    @property
    def mean_reward(self) -> float | None:
        return sum(self.rewards) / len(self.rewards) if self.scored else None


def keep(edits: Iterable[EditResult], rule: KeepRule) -> EditResult | None:
    """The self-edit a context contributes to the policy's SFT data, or None.

    ``best_of_k`` is the paper's rule: the highest mean reward among the scored samples, kept even
    when it is zero or negative (the policy still moves towards its best attempt); ties go to the
    first sample. ``best_positive`` keeps only a strictly positive mean gain, and among equal gains
    the shortest self-edit (fewer completion tokens), then the first sample: with a small τ many
    edits tie, and the shorter one carries the gain at less cost. Failed samples are never kept."""
    if rule not in KEEP_RULES:
        raise ValueError(f"keep rule {rule!r} is unknown; use one of {', '.join(KEEP_RULES)}")
    eligible = [e for e in edits if e.scored]
    if rule == "best_positive":
        eligible = [e for e in eligible if e.mean_reward > TIE_TOLERANCE]  # type: ignore[operator]
    if not eligible:
        return None
    top = max(e.mean_reward for e in eligible)  # type: ignore[type-var]
    tied = [e for e in eligible if e.mean_reward >= top - TIE_TOLERANCE]  # type: ignore[operator]
    if rule == "best_positive":
        return min(tied, key=lambda e: (e.completion_tokens, e.index))
    return min(tied, key=lambda e: e.index)


# --- seeds --------------------------------------------------------------------------------------


def derive_seed(base: int, *parts: object) -> int:
    """A seed that depends on what is seeded, not on the order work happens in: a resumed round
    re-derives exactly the seeds the interrupted one used."""
    payload = json.dumps([base, *parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:4], "big") & 0x7FFFFFFF


# --- inputs and effects -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingContext:
    """One context of a round: a passage with its questions τ (knowledge incorporation), or an
    ARC task whose test outputs are τ (``fewshot`` set; title and passage are unused)."""

    title: str
    passage: str
    questions: tuple[Question, ...]
    fewshot: ArcTask | None = None

    @classmethod
    def from_arc(cls, task: ArcTask) -> TrainingContext:
        return cls(title=task.task_id, passage="", questions=(), fewshot=task)

    @property
    def domain(self) -> str:
        return FEWSHOT if self.fewshot is not None else KNOWLEDGE

    @property
    def context_id(self) -> str:
        if self.fewshot is not None:
            return self.fewshot.context_id
        return context_digest(self.title, self.passage)

    @property
    def tau(self) -> list[Any]:
        """What the context's self-edits are scored on, as plain JSON: the (question, answer)
        pairs, or the gold test grids. Part of the round's identity (``round_fingerprint``)."""
        if self.fewshot is not None:
            return [[list(row) for row in grid] for grid in self.fewshot.test_outputs]
        return [[q.question, q.answer] for q in self.questions]

    @property
    def guardrail_context(self) -> str:
        """What the guardrails compare a self-edit with, as the auditor does: the title and the
        passage; nothing for an ARC task (its recipe gate does not compare)."""
        return "" if self.fewshot is not None else f"{self.title}\n{self.passage}"

    def problem(self) -> str:
        """Why this context cannot be trained on, or "" when it can."""
        if self.fewshot is not None:
            task = self.fewshot
            if not task.demonstrations or not task.test_inputs:
                return f"ARC task {task.task_id} needs at least one demonstration and one test input"
            if not task.has_solutions:
                return (f"ARC task {task.task_id} has {len(task.test_outputs)} test output(s) for "
                        f"{len(task.test_inputs)} test input(s); the reward is graded on them, send one per input")
            return ""
        if not self.passage.strip() or not self.questions:
            return f"{self.title!r} needs a passage and at least one question"
        return ""


def round_domain(contexts: Sequence[TrainingContext]) -> str:
    """The one domain of a round's contexts. A round mixing domains is refused: its rewards
    (an accuracy gain, a solved flag) would not be comparable, nor its report's means."""
    domains = sorted({c.domain for c in contexts})
    if len(domains) > 1:
        first = {d: next(i for i, c in enumerate(contexts) if c.domain == d) for d in domains}
        raise ValueError(
            "a round is in one domain, but these contexts mix "
            + " and ".join(f"{d} (first at contexts[{first[d]}])" for d in domains)
            + "; send them as separate rounds"
        )
    return domains[0] if domains else KNOWLEDGE


def domain_reward(domain: str, reward: float) -> float:
    """A scored candidate's reward as the round uses it, checked against what the domain defines.

    Few-shot rewards are binary (the candidate solved the task or not): anything else means the
    scorer and the round disagree on the domain, and averaging it in would train the policy on a
    reward nobody defined, so it is refused rather than passed through."""
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r} is unknown; use one of {', '.join(DOMAINS)}")
    if domain == FEWSHOT and reward not in (0.0, 1.0):
        raise ValueError(f"a few-shot reward is 1 (solved) or 0 (not solved), the scorer returned {reward!r}")
    return float(reward)


@dataclass(frozen=True)
class RoundConfig:
    k: int
    seeds_per_edit: int
    keep_rule: KeepRule
    prompt_style: str
    seed: int
    # Inner-loop overrides for the student, as in Adapt; part of the round's identity.
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 self-edits per context, got {self.k}")
        if self.seeds_per_edit < 1:
            raise ValueError(f"seeds_per_edit must be >= 1, got {self.seeds_per_edit}")
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"keep_rule {self.keep_rule!r} is unknown; use one of {', '.join(KEEP_RULES)}")


@dataclass(frozen=True)
class Sample:
    """One self-edit as the policy wrote it. ``redacted``: the guardrail rules (secrets,
    personal_data) that found something in ``text``; such a self-edit is stored masked and the
    round refuses it (see the module's documentation). A sample read back from the round state
    then holds the masked text, never to be scored or trained on."""

    index: int
    prompt: str
    text: str
    completion_tokens: int
    redacted: tuple[str, ...] = ()


# (text, the guardrails' context) → the text as it may be stored, and the rules that masked it
RedactFn = Callable[[str, str], Redaction]


def redactor(guardrails: GuardrailSettings | None = None) -> RedactFn:
    """The ``RedactFn`` of ``guardrails`` (the defaults when None): what the secrets and
    personal-data rules find is masked, as the audit log masks it (``seal.audit.stored_self_edit``)."""
    settings = guardrails or GuardrailSettings()
    return lambda text, context: redact_sensitive(text, context, settings)


def refusal(rules: Sequence[str]) -> str:
    """The failure of a self-edit the round refuses because the guardrails found these rules."""
    return f"guardrails failed before training: {', '.join(rules)} (the round keeps the self-edit masked only)"


def screened(sample: Sample, context: TrainingContext, redact: RedactFn) -> tuple[Sample, dict[str, Any]]:
    """``sample`` with its ``redacted`` rules set (its text still the original, for scoring now),
    and its record as ``samples.jsonl`` keeps it: masked text and prompt where the rules found
    something, with the original's sha256 and the ``redacted`` marker."""
    text = redact(sample.text, context.guardrail_context)
    prompt = redact(sample.prompt, context.guardrail_context)
    live = Sample(sample.index, prompt.text, sample.text, sample.completion_tokens, tuple(text.rules))
    record: dict[str, Any] = {
        "index": sample.index, "prompt": prompt.text, "text": text.text, "completion_tokens": sample.completion_tokens,
    }
    if text.redacted:
        record.update(
            redacted=True, redacted_rules=list(text.rules),
            text_sha256=hashlib.sha256(sample.text.encode("utf-8")).hexdigest(),
        )
    if prompt.redacted:
        record["prompt_redacted_rules"] = list(prompt.rules)
    return live, record


def _sample_from_record(record: dict[str, Any]) -> Sample:
    rules = tuple(record.get("redacted_rules") or ()) or (("sensitive data",) if record.get("redacted") else ())
    return Sample(int(record["index"]), record["prompt"], record["text"], int(record["completion_tokens"]), rules)


@dataclass(frozen=True)
class Scored:
    """What scoring one (self-edit, seed) gave: a reward, or why there is none."""

    reward: float | None
    adapter_id: str = ""
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    failure: str = ""


@dataclass(frozen=True)
class PolicyUpdate:
    adapter_id: str
    version: int
    losses: list[float]
    hot_loaded: bool
    seconds: float


# (context, k, seed) → k samples from the current policy
SampleFn = Callable[[TrainingContext, int, int], list[Sample]]
# [(context, k, seed), ...] → for each, in order, its k samples: several contexts in one batch
SampleManyFn = Callable[[list[tuple[TrainingContext, int, int]]], list[list[Sample]]]
# (context, sample, inner-loop seed) → score; must not promote anything
ScoreFn = Callable[[TrainingContext, Sample, int], Scored]
# (context_id, self_edit, inner-loop seed, not_before) → a reward already in the durable buffer
RecallFn = Callable[[str, str, int, datetime], Scored | None]
# (examples, round_id, on_step) → the new policy version, already hot-loaded
TrainPolicyFn = Callable[[list[tuple[str, str]], str, Callable[[int, int, float], None]], PolicyUpdate]


# --- events (what a caller streams) -------------------------------------------------------------


@dataclass(frozen=True)
class RoundStarted:
    round: int
    round_id: str
    contexts: int
    contexts_done: int
    samples_done: int
    resumed: bool
    config: RoundConfig
    policy_adapter_id: str
    domain: str = KNOWLEDGE


@dataclass(frozen=True)
class ContextSampled:
    context_index: int
    context_id: str
    samples: list[Sample]
    seconds: float
    reused: bool


@dataclass(frozen=True)
class SampleScored:
    context_index: int
    context_id: str
    edit_index: int
    seed_index: int
    seed: int
    scored: Scored
    source: Literal["scored", "state", "buffer"]
    seconds: float


@dataclass(frozen=True)
class ContextDone:
    context_index: int
    context_id: str
    edits: list[EditResult]
    kept: EditResult | None


@dataclass(frozen=True)
class PolicyProgress:
    step: int
    total_steps: int
    loss: float


@dataclass(frozen=True)
class RoundReport:
    round: int
    round_id: str
    keep_rule: KeepRule
    contexts: int
    k: int
    seeds_per_edit: int
    samples_scored: int  # (edit, seed) pairs with a reward
    samples_failed: int  # (edit, seed) pairs without one (guardrails, unusable text)
    samples_resumed: int  # taken from the round state or the reward buffer instead of rescored
    edits_scored: int
    mean_reward: float | None  # over scored self-edits, each the mean of its seeds
    max_reward: float | None
    kept: int
    mean_kept_reward: float | None
    positive_kept: int
    policy_adapter_id: str
    policy_version: int
    policy_sft_first_loss: float | None
    policy_sft_final_loss: float | None
    policy_sft_steps: int
    hot_loaded: bool
    phase_seconds: dict[str, float]
    wall_seconds: float  # this invocation only (a resumed round counts from the resume)
    domain: str = KNOWLEDGE  # knowledge: rewards are accuracy gains; fewshot: 1 solved, 0 not

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RoundEvent = RoundStarted | ContextSampled | SampleScored | ContextDone | PolicyProgress | RoundReport


class RoundStopped(RuntimeError):
    """The caller asked to stop; everything finished so far is kept and the round resumes later."""

    code = "cancelled"


class RoundConflict(RuntimeError):
    """An unfinished round exists with different inputs."""

    code = "failed_precondition"


# --- durable round state ------------------------------------------------------------------------


def round_fingerprint(contexts: Sequence[TrainingContext], config: RoundConfig) -> str:
    """What makes two requests the same round: the contexts (with τ) and the settings. Resuming
    under others would mix two experiments in one SFT set. The sampling policy is checked
    separately (``RoundStore.open``), because the round itself replaces it at its very end."""
    # A knowledge context's entry is unchanged from before the few-shot domain existed, so an
    # unfinished knowledge round still resumes; a few-shot context adds its domain.
    payload = {
        "contexts": [
            [c.context_id, c.tau] if c.domain == KNOWLEDGE else [c.context_id, c.domain, c.tau] for c in contexts
        ],
        "config": asdict(config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RoundState:
    """One round's directory: ``round.json`` (identity, status, report), ``samples.jsonl`` (the
    self-edits sampled per context) and ``scores.jsonl`` (one line per scored edit and seed)."""

    def __init__(self, directory: Path, number: int, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.number = number
        self.meta = meta
        # Fsynced per record, a torn last line cut off on open (see seal.durable); the records
        # are kept in memory too, since resuming looks them up per context.
        self._samples_log = JsonLinesLog(directory / "samples.jsonl")
        self._scores_log = JsonLinesLog(directory / "scores.jsonl")
        self._samples = self._samples_log.read()
        self._scores = self._scores_log.read()

    @property
    def round_id(self) -> str:
        return str(self.meta["round_id"])

    @property
    def started_at(self) -> datetime:
        return datetime.fromisoformat(self.meta["started_at"])

    @property
    def status(self) -> str:
        return str(self.meta["status"])

    def samples(self, context_id: str) -> list[Sample] | None:
        """The context's samples as stored: a ``redacted`` one holds its masked text."""
        for record in reversed(self._samples):
            if record["context_id"] == context_id:
                return [_sample_from_record(s) for s in record["samples"]]
        return None

    def record_samples(
        self, context_id: str, records: list[dict[str, Any]], *, sampled_with: Sequence[str] = ()
    ) -> list[Sample]:
        """Store the context's samples as ``screened`` made them fit to keep; returns them as stored.
        ``sampled_with``: the other contexts drawn in the same batched generate, if any (what the
        drawn text depended on; see ``run_round``)."""
        entry: dict[str, Any] = {"context_id": context_id, "samples": records}
        if sampled_with:
            entry["sampled_with"] = list(sampled_with)
        self._samples.append(self._samples_log.append(entry))
        return [_sample_from_record(r) for r in records]

    def scores(self, context_id: str) -> dict[tuple[int, int], Scored]:
        found = {}
        for record in self._scores:
            if record["context_id"] == context_id:
                found[(record["edit_index"], record["seed_index"])] = Scored(**record["scored"])
        return found

    def record_score(self, context_id: str, edit_index: int, seed_index: int, seed: int, scored: Scored, source: str) -> None:
        record = {
            "context_id": context_id,
            "edit_index": edit_index,
            "seed_index": seed_index,
            "seed": seed,
            "scored": asdict(scored),
            "source": source,
        }
        self._scores.append(self._scores_log.append(record))

    def update(self, **values: Any) -> None:
        self.meta.update(values)
        atomic_write_json(self.directory / "round.json", self.meta, indent=2, sort_keys=True, default=str)


class RoundStore:
    """Rounds under ``root``, numbered from 1. At most one is unfinished at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _numbers(self) -> list[int]:
        numbers = []
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name.startswith("round-") and (entry / "round.json").is_file():
                try:
                    numbers.append(int(entry.name.removeprefix("round-")))
                except ValueError:
                    continue
        return sorted(numbers)

    def load(self, number: int) -> RoundState:
        directory = self.root / f"round-{number:06d}"
        meta = json.loads((directory / "round.json").read_text(encoding="utf-8"))
        return RoundState(directory, number, meta)

    def rounds(self) -> list[RoundState]:
        return [self.load(n) for n in self._numbers()]

    def unfinished(self) -> RoundState | None:
        numbers = self._numbers()
        if numbers:
            latest = self.load(numbers[-1])
            if latest.status in ("running", "training_policy"):
                return latest
        return None

    def start(self, fingerprint: str, config: RoundConfig, contexts: Sequence[TrainingContext], policy_adapter_id: str) -> RoundState:
        numbers = self._numbers()
        number = (numbers[-1] + 1) if numbers else 1
        directory = self.root / f"round-{number:06d}"
        directory.mkdir(parents=True, exist_ok=False)
        meta = {
            "round": number,
            "round_id": f"r{number:06d}-{fingerprint}",
            "fingerprint": fingerprint,
            "status": "running",
            "started_at": datetime.now(UTC).isoformat(),
            "config": asdict(config),
            "context_ids": [c.context_id for c in contexts],
            "domain": round_domain(contexts),
            "policy_at_start": policy_adapter_id,
        }
        state = RoundState(directory, number, meta)
        state.update()
        return state

    def open(
        self,
        contexts: Sequence[TrainingContext],
        config: RoundConfig,
        policy_adapter_id: str,
        *,
        restart: bool = False,
    ) -> tuple[RoundState, bool]:
        """The round to work on and whether it is a resumed one."""
        fingerprint = round_fingerprint(contexts, config)
        pending = self.unfinished()
        if pending is not None and not restart:
            if pending.meta["fingerprint"] != fingerprint:
                raise RoundConflict(
                    f"round {pending.number} ({pending.directory}) is unfinished and was started with other "
                    "contexts or settings; repeat that request to resume it, or restart to abandon it"
                )
            # Once the policy SFT has begun, the new policy may already be serving: that is the
            # round finishing, not another policy sampling into it.
            if pending.status == "running" and pending.meta["policy_at_start"] != policy_adapter_id:
                raise RoundConflict(
                    f"round {pending.number} sampled with policy {pending.meta['policy_at_start'] or 'base'} but "
                    f"{policy_adapter_id or 'the base policy'} serves now; load that policy again to resume, "
                    "or restart to abandon the round"
                )
            return pending, True
        if pending is not None:
            pending.update(status="abandoned", abandoned_at=datetime.now(UTC).isoformat())
        return self.start(fingerprint, config, contexts, policy_adapter_id), False


# --- the round ----------------------------------------------------------------------------------


@dataclass
class _Clock:
    seconds: dict[str, float] = field(
        default_factory=lambda: {"generation": 0.0, "scoring": 0.0, "policy_sft": 0.0}
    )

    def add(self, phase: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.seconds[phase] += elapsed
        return elapsed


def checked(scored: Scored, domain: str) -> Scored:
    """``scored`` with its reward checked against the domain (``domain_reward``)."""
    if scored.failure or scored.reward is None:
        return scored
    domain_reward(domain, scored.reward)
    return scored


def edit_results(samples: Sequence[Sample], scores: dict[tuple[int, int], Scored], seeds_per_edit: int) -> list[EditResult]:
    results = []
    for sample in samples:
        if sample.redacted:  # refused by the round, whatever was scored for it
            results.append(EditResult(sample.index, sample.text, sample.completion_tokens, (), refusal(sample.redacted)))
            continue
        per_seed = [scores.get((sample.index, s)) for s in range(seeds_per_edit)]
        failures = [s.failure for s in per_seed if s is not None and s.failure]
        rewards = tuple(s.reward for s in per_seed if s is not None and not s.failure and s.reward is not None)
        results.append(
            EditResult(
                index=sample.index,
                text=sample.text,
                completion_tokens=sample.completion_tokens,
                rewards=rewards if len(rewards) == seeds_per_edit else (),
                failure=failures[0] if failures else ("" if len(rewards) == seeds_per_edit else "not scored"),
            )
        )
    return results


def run_round(
    contexts: Sequence[TrainingContext],
    config: RoundConfig,
    store: RoundStore,
    *,
    sample: SampleFn,
    score: ScoreFn,
    train_policy: TrainPolicyFn,
    policy_adapter_id: str,
    emit: Callable[[RoundEvent], None],
    recall: RecallFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    restart: bool = False,
    redact: RedactFn | None = None,
    sample_many: SampleManyFn | None = None,
    contexts_per_sample_batch: int = 1,
) -> RoundReport:
    """Run (or resume) one ReST^EM round and return its report (also stored in round.json).
    ``redact``: how self-edits and prompts are masked before they are stored (``redactor``; the
    default guardrail settings when None).

    ``sample_many``: when given, the contexts without recorded samples are sampled in groups of
    up to ``contexts_per_sample_batch``, one call (the teacher: one batched generate) per group,
    each context with the seed ``sample`` would get. A group is drawn when the loop reaches its
    first context and holds the next unsampled contexts in order; every context's samples are
    screened and recorded as one ``sample`` call's would be, and its ``ContextSampled`` comes
    when the loop reaches it (``seconds``: its share of the group's generation time). The stop
    request is checked before each group. Without ``sample_many`` every context is sampled on
    its own through ``sample``, as before.

    Reproducibility: samples once recorded are never drawn again, so a resumed round is exact
    whatever the batching of either invocation; the knob is therefore not part of the round's
    identity (``round_fingerprint``). What a fresh round draws for a context may depend on the
    batch it was sampled in (the engine seeds a generate, not each prompt of it), so runs with
    other ``contexts_per_sample_batch`` can draw other text; a context's record names the
    contexts it was sampled with (``sampled_with``)."""
    redact = redact or redactor()
    if contexts_per_sample_batch < 1:
        raise ValueError(f"contexts_per_sample_batch must be >= 1, got {contexts_per_sample_batch}")
    if not contexts:
        raise ValueError("no training contexts: a round needs at least one context with its τ")
    for index, context in enumerate(contexts):
        problem = context.problem()
        if problem:
            raise ValueError(f"training context {index}: {problem}")
    domain = round_domain(contexts)
    if len({c.context_id for c in contexts}) != len(contexts):
        raise ValueError(f"the same {'ARC task' if domain == FEWSHOT else 'passage'} appears twice among the "
                         "training contexts; send each once")

    started = time.perf_counter()
    clock = _Clock()
    state, resumed = store.open(contexts, config, policy_adapter_id, restart=restart)
    stop = should_stop or (lambda: False)

    def check_stop() -> None:
        if stop():
            raise RoundStopped(f"round {state.number} stopped on request; repeat the request to resume it")

    done_before = 0
    samples_before = 0
    for context in contexts:
        samples = state.samples(context.context_id)
        if samples is not None:
            scored = state.scores(context.context_id)
            samples_before += len(scored)
            if len(scored) >= len(samples) * config.seeds_per_edit:
                done_before += 1
    emit(RoundStarted(
        state.number, state.round_id, len(contexts), done_before, samples_before, resumed, config, policy_adapter_id,
        domain,
    ))

    group_size = contexts_per_sample_batch if sample_many is not None else 1
    # Samples this invocation drew for contexts the loop has not reached yet: as stored, the
    # originals by index (the only text a redacted self-edit may be scored from; the state holds
    # its masked text), and the context's share of its group's generation time.
    drawn_now: dict[str, tuple[list[Sample], dict[int, Sample], float]] = {}

    def sample_group(first: int) -> None:
        group = [first]
        for later in range(first + 1, len(contexts)):
            if len(group) >= group_size:
                break
            if state.samples(contexts[later].context_id) is None:
                group.append(later)
        check_stop()
        t0 = time.perf_counter()
        requests = [
            (contexts[i], config.k, derive_seed(config.seed, state.round_id, contexts[i].context_id, "sample"))
            for i in group
        ]
        drawn = sample_many(requests) if sample_many is not None else [sample(*requests[0])]
        if len(drawn) != len(group):
            raise RuntimeError(f"the teacher returned self-edits for {len(drawn)} contexts, expected {len(group)}")
        ids = [contexts[i].context_id for i in group]
        for cid, edits in zip(ids, drawn, strict=True):
            if len(edits) != config.k:
                raise RuntimeError(f"the teacher returned {len(edits)} self-edits for {cid}, expected {config.k}")
        seconds = clock.add("generation", t0) / len(group)
        for i, cid, edits in zip(group, ids, drawn, strict=True):
            screens = [screened(s, contexts[i], redact) for s in edits]
            stored = state.record_samples(
                cid, [record for _, record in screens], sampled_with=[other for other in ids if other != cid]
            )
            drawn_now[cid] = (stored, {live.index: live for live, _ in screens}, seconds)

    per_context: list[tuple[Sample, EditResult]] = []
    all_edits: list[EditResult] = []
    samples_scored = samples_failed = samples_resumed = 0
    for context_index, context in enumerate(contexts):
        cid = context.context_id
        if cid not in drawn_now and state.samples(cid) is None:
            sample_group(context_index)
        written: dict[int, Sample] = {}
        if cid in drawn_now:
            samples, written, seconds = drawn_now.pop(cid)
            emit(ContextSampled(context_index, cid, samples, seconds, reused=False))
        else:
            samples = state.samples(cid) or []
            emit(ContextSampled(context_index, cid, samples, 0.0, reused=True))

        scores = state.scores(cid)
        for item in samples:
            original = written.get(item.index)
            for seed_index in range(config.seeds_per_edit):
                seed = derive_seed(config.seed, state.round_id, cid, item.index, seed_index)
                if (item.index, seed_index) in scores:
                    result, source, seconds = scores[(item.index, seed_index)], "state", 0.0
                elif item.redacted and original is None:
                    # Resumed: only the masked text is left, and the round refuses it anyway.
                    result, source, seconds = Scored(None, failure=refusal(item.redacted)), "state", 0.0
                    state.record_score(cid, item.index, seed_index, seed, result, source)
                    scores[(item.index, seed_index)] = result
                else:
                    # A redacted self-edit is never recalled: the reward stream keeps it masked too.
                    recalled = None
                    if recall is not None and not item.redacted:
                        recalled = recall(cid, item.text, seed, state.started_at)
                    if recalled is not None:
                        result, source, seconds = recalled, "buffer", 0.0
                    else:
                        check_stop()
                        t0 = time.perf_counter()
                        result, source = checked(score(context, original or item, seed), domain), "scored"
                        seconds = clock.add("scoring", t0)
                        if item.redacted and not result.failure:  # a scorer with other guardrail settings
                            result = Scored(None, result.adapter_id, failure=refusal(item.redacted))
                    state.record_score(cid, item.index, seed_index, seed, result, source)
                    scores[(item.index, seed_index)] = result
                if source != "scored":
                    samples_resumed += 1
                if result.failure or result.reward is None:
                    samples_failed += 1
                else:
                    samples_scored += 1
                emit(SampleScored(context_index, cid, item.index, seed_index, seed, result, source, seconds))  # type: ignore[arg-type]

        edits = edit_results(samples, scores, config.seeds_per_edit)
        chosen = keep(edits, config.keep_rule)
        all_edits.extend(edits)
        if chosen is not None:
            prompt = next(s.prompt for s in samples if s.index == chosen.index)
            per_context.append((Sample(chosen.index, prompt, chosen.text, chosen.completion_tokens), chosen))
        emit(ContextDone(context_index, cid, edits, chosen))

    check_stop()
    examples = [(s.prompt, s.text) for s, _ in per_context]
    update: PolicyUpdate | None = None
    if examples:
        state.update(status="training_policy")
        t0 = time.perf_counter()
        update = train_policy(examples, state.round_id, lambda step, total, loss: emit(PolicyProgress(step, total, loss)))
        clock.add("policy_sft", t0)

    rewards = [e.mean_reward for e in all_edits if e.scored]
    kept_rewards = [edit.mean_reward for _, edit in per_context]
    losses = update.losses if update else []
    report = RoundReport(
        round=state.number,
        round_id=state.round_id,
        keep_rule=config.keep_rule,
        contexts=len(contexts),
        k=config.k,
        seeds_per_edit=config.seeds_per_edit,
        samples_scored=samples_scored,
        samples_failed=samples_failed,
        samples_resumed=samples_resumed,
        edits_scored=len(rewards),
        mean_reward=sum(rewards) / len(rewards) if rewards else None,  # type: ignore[arg-type]
        max_reward=max(rewards) if rewards else None,  # type: ignore[type-var]
        kept=len(per_context),
        mean_kept_reward=sum(kept_rewards) / len(kept_rewards) if kept_rewards else None,  # type: ignore[arg-type]
        positive_kept=sum(1 for r in kept_rewards if r is not None and r > TIE_TOLERANCE),
        policy_adapter_id=update.adapter_id if update else "",
        policy_version=update.version if update else 0,
        policy_sft_first_loss=losses[0] if losses else None,
        policy_sft_final_loss=losses[-1] if losses else None,
        policy_sft_steps=len(losses),
        hot_loaded=bool(update and update.hot_loaded),
        phase_seconds={**clock.seconds, "total": time.perf_counter() - started},
        wall_seconds=time.perf_counter() - started,
        domain=domain,
    )
    state.update(status="done", finished_at=datetime.now(UTC).isoformat(), report=report.to_dict())
    emit(report)
    return report
