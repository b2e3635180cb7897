"""ReST^EM samples the k self-edits of several contexts in one batched generate (issue 11, item 4).

The round driver (``seal.rl.restem.run_round`` with ``sample_many``) over the teacher's own
sampler (``teacher_svc.restem.proposer_sample_many_fn``, ``SelfEditProposer.propose_many``) and
the tiny random model's real engine, counted by a thin wrapper: how many generates a round
makes, that a resumed round never draws a recorded context again, and that one context per
batch draws exactly what the one-context sampler draws. The scorer and the policy SFT stand in
for the student, the auditor and the M-step (the round over gRPC is in test_restem_pipeline.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from seal.domains.fewshot import ArcPair, ArcTask, FewShotSettings
from seal.domains.fewshot import build_self_edit_prompt as fewshot_prompt
from seal.domains.knowledge import Question
from seal.domains.knowledge import build_self_edit_prompt as knowledge_prompt
from seal.guardrails import GuardrailSettings
from seal.models import Generation, SamplingParams, TransformersEngine
from seal.rl import restem
from seal.rl.restem import (
    ContextSampled,
    RoundConfig,
    RoundStopped,
    RoundStore,
    Sample,
    Scored,
    TrainingContext,
    run_round,
)
from seal.teacher import SelfEditProposer, batch_seed
from teacher_svc.restem import proposer_sample_fn, proposer_sample_many_fn

CONFIG = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=7)


class CountingEngine:
    """The real engine, with every generate call recorded (its prompts and its seed)."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[list[str], int | None, int]] = []

    def generate(self, prompts: Sequence[str], params: SamplingParams, **kwargs: Any) -> list[Generation]:
        self.calls.append((list(prompts), params.seed, kwargs.get("batch_size", 8)))
        return self.engine.generate(prompts, params, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny, one_torch_thread) -> TransformersEngine:
    model, tokenizer = tiny
    return TransformersEngine(model, tokenizer)


def proposer(engine: TransformersEngine) -> tuple[SelfEditProposer, CountingEngine]:
    counting = CountingEngine(engine)
    # Sampled, not greedy: a batch that drew another context's seed would show in the text.
    return SelfEditProposer(counting, max_new_tokens=6, temperature=1.0, top_p=1.0), counting  # type: ignore[arg-type]


def passages(n: int = 5) -> list[TrainingContext]:
    return [
        TrainingContext(f"Item {i}", f"Item {i} of the Velmora museum weighs {i + 2} kilograms.",
                        (Question(f"How much does item {i} weigh?", f"{i + 2} kilograms"),))
        for i in range(n)
    ]


def arc_tasks(n: int = 3) -> list[TrainingContext]:
    def flip(grid: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(reversed(row)) for row in grid)

    tasks = []
    for i in range(n):
        demos = [((i + 1, 0), (2, 0)), ((0, 3), (0, i + 4))]
        test = ((7, 0), (0, i + 1))
        tasks.append(TrainingContext.from_arc(
            ArcTask(f"flip{i}", tuple(ArcPair(g, flip(g)) for g in demos), (test,), (flip(test),))
        ))
    return tasks


class Effects:
    """A scorer that rewards the shorter self-edit and a policy SFT that records its data."""

    def __init__(self, stop_after_scores: int | None = None) -> None:
        self.scored: list[tuple[str, int]] = []
        self.trained: list[tuple[str, str]] = []
        self.stop_after_scores = stop_after_scores

    def score(self, context: TrainingContext, sample: Sample, seed: int) -> Scored:
        self.scored.append((context.context_id, sample.index))
        return Scored(0.0 if context.fewshot is not None else -len(sample.text) / 100, f"restem@v{len(self.scored)}")

    def train(self, examples, round_id, on_step) -> restem.PolicyUpdate:
        self.trained.extend(examples)
        return restem.PolicyUpdate("teacher-policy@v1", 1, [1.0], True, 0.0)

    def should_stop(self) -> bool:
        return self.stop_after_scores is not None and len(self.scored) >= self.stop_after_scores


def run(contexts, store: RoundStore, effects: Effects, events: list, sample_one, sample_many=None, per_batch: int = 1):
    return run_round(
        contexts, CONFIG, store, sample=sample_one, score=effects.score, train_policy=effects.train,
        policy_adapter_id="", emit=events.append, should_stop=effects.should_stop,
        sample_many=sample_many, contexts_per_sample_batch=per_batch,
    )


def recorded(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "round-000001" / "samples.jsonl").read_text().splitlines()]


def texts(root: Path) -> dict[str, list[str]]:
    return {r["context_id"]: [s["text"] for s in r["samples"]] for r in recorded(root)}


# --- the teacher's engine calls -------------------------------------------------------------------


def test_a_round_samples_three_contexts_per_generate(engine: TransformersEngine, tmp_path: Path) -> None:
    contexts = passages(5)
    teacher, counting = proposer(engine)
    effects, events = Effects(), []
    report = run(contexts, RoundStore(tmp_path), effects, events, proposer_sample_fn(teacher, "implications"),
                 proposer_sample_many_fn(teacher, "implications"), per_batch=3)

    # ceil(5 / 3) generates, each of the group's prompts k times, in one batch.
    prompts = [knowledge_prompt(c.title, c.passage, "implications") for c in contexts]
    assert [call[0] for call in counting.calls] == [
        [p for p in prompts[:3] for _ in range(2)], [p for p in prompts[3:] for _ in range(2)]
    ]
    assert [call[2] for call in counting.calls] == [6, 4]
    seeds = [restem.derive_seed(CONFIG.seed, report.round_id, c.context_id, "sample") for c in contexts]
    assert [call[1] for call in counting.calls] == [batch_seed(seeds[:3]), batch_seed(seeds[3:])]

    # k samples recorded per context, in context order, each answering its own context's prompt.
    records = recorded(tmp_path)
    assert [r["context_id"] for r in records] == [c.context_id for c in contexts]
    for record, prompt in zip(records, prompts, strict=True):
        assert [s["index"] for s in record["samples"]] == [0, 1]
        assert {s["prompt"] for s in record["samples"]} == {prompt}
    ids = [c.context_id for c in contexts]
    assert records[1]["sampled_with"] == [ids[0], ids[2]] and records[4]["sampled_with"] == [ids[3]]

    sampled = [e for e in events if isinstance(e, ContextSampled)]
    assert [e.context_index for e in sampled] == [0, 1, 2, 3, 4] and not any(e.reused for e in sampled)
    assert [[s.text for s in e.samples] for e in sampled] == [texts(tmp_path)[i] for i in ids]
    # Each ContextSampled still comes right before its own context's scores.
    kinds = [(type(e).__name__, getattr(e, "context_index", None)) for e in events]
    assert kinds.index(("ContextSampled", 1)) > kinds.index(("ContextDone", 0))
    assert len(effects.scored) == 5 * 2 and report.kept == 5


def test_few_shot_contexts_are_batched_too(engine: TransformersEngine, tmp_path: Path) -> None:
    contexts, fewshot = arc_tasks(3), FewShotSettings(max_examples=2)
    teacher, counting = proposer(engine)
    effects, events = Effects(), []
    run(contexts, RoundStore(tmp_path), effects, events, proposer_sample_fn(teacher, "implications", fewshot),
        proposer_sample_many_fn(teacher, "implications", fewshot), per_batch=2)
    prompts = [fewshot_prompt(c.fewshot, fewshot) for c in contexts]  # type: ignore[arg-type]
    assert [call[0] for call in counting.calls] == [
        [p for p in prompts[:2] for _ in range(2)], [prompts[2]] * 2
    ]
    assert [{s["prompt"] for s in r["samples"]} for r in recorded(tmp_path)] == [{p} for p in prompts]


def test_an_interrupted_round_resumes_without_drawing_a_recorded_context_again(
    engine: TransformersEngine, tmp_path: Path
) -> None:
    contexts = passages(5)
    store = RoundStore(tmp_path)
    teacher, counting = proposer(engine)
    # Stopped while scoring context 0: contexts 1 and 2 were sampled with it but not yet reached.
    with pytest.raises(RoundStopped):
        run(contexts, store, Effects(stop_after_scores=1), [], proposer_sample_fn(teacher, "implications"),
            proposer_sample_many_fn(teacher, "implications"), per_batch=3)
    assert len(counting.calls) == 1 and len(recorded(tmp_path)) == 3
    before = texts(tmp_path)

    # Resumed with another batch size: the knob is no part of the round's identity, and
    # nothing recorded is drawn again; only contexts 3 and 4 are sampled, one per generate.
    teacher, counting = proposer(engine)
    effects, events = Effects(), []
    report = run(contexts, store, effects, events, proposer_sample_fn(teacher, "implications"),
                 proposer_sample_many_fn(teacher, "implications"), per_batch=1)
    prompts = [knowledge_prompt(c.title, c.passage, "implications") for c in contexts]
    assert [call[0] for call in counting.calls] == [[prompts[3]] * 2, [prompts[4]] * 2]
    records = recorded(tmp_path)
    assert len(records) == 5 and len({r["context_id"] for r in records}) == 5
    after = texts(tmp_path)
    assert all(after[cid] == before[cid] for cid in before)
    sampled = [e for e in events if isinstance(e, ContextSampled)]
    assert [e.reused for e in sampled] == [True, True, True, False, False]
    assert [[s.text for s in e.samples] for e in sampled[:3]] == [before[c.context_id] for c in contexts[:3]]
    assert events[0].resumed and report.samples_resumed == 1 and report.kept == 5


def test_one_context_per_batch_draws_what_the_one_context_sampler_draws(engine: TransformersEngine, tmp_path: Path) -> None:
    contexts = passages(3)
    teacher, single_calls = proposer(engine)
    run(contexts, RoundStore(tmp_path / "single"), Effects(), [], proposer_sample_fn(teacher, "implications"))
    teacher, batched_calls = proposer(engine)
    run(contexts, RoundStore(tmp_path / "batched"), Effects(), [], proposer_sample_fn(teacher, "implications"),
        proposer_sample_many_fn(teacher, "implications"), per_batch=1)
    assert single_calls.calls == batched_calls.calls and len(batched_calls.calls) == 3
    single, batched = texts(tmp_path / "single"), texts(tmp_path / "batched")
    assert single == batched
    assert len({tuple(t) for t in single.values()}) == 3  # sampled text, not one fixed answer


# --- the round driver alone -----------------------------------------------------------------------


class Recorder:
    """A teacher that records which contexts each call sampled."""

    def __init__(self, edits: dict[str, list[str]] | None = None, short: str = "") -> None:
        self.groups: list[list[str]] = []
        self.edits = edits or {}
        self.short = short  # a context for which one self-edit too few comes back

    def one(self, context: TrainingContext, k: int) -> list[Sample]:
        texts = self.edits.get(context.title) or [f"{context.title} edit {i}" for i in range(k)]
        count = k - 1 if context.title == self.short else k
        return [Sample(i, f"prompt of {context.title}", texts[i], 5) for i in range(count)]

    def sample(self, context: TrainingContext, k: int, seed: int) -> list[Sample]:
        self.groups.append([context.title])
        return self.one(context, k)

    def sample_many(self, requests: list[tuple[TrainingContext, int, int]]) -> list[list[Sample]]:
        self.groups.append([c.title for c, _, _ in requests])
        return [self.one(c, k) for c, k, _ in requests]


def test_groups_hold_only_contexts_without_samples_and_seed_each_as_alone(tmp_path: Path) -> None:
    contexts = passages(6)
    store = RoundStore(tmp_path)
    # A round stopped before it sampled anything, then contexts 0 and 2 given samples by hand.
    with pytest.raises(RoundStopped):
        run_round(contexts, CONFIG, store, sample=Recorder().sample, score=Effects().score,
                  train_policy=Effects().train, policy_adapter_id="", emit=lambda e: None, should_stop=lambda: True)
    state = store.unfinished()
    assert state is not None
    for index in (0, 2):
        state.record_samples(contexts[index].context_id, [
            {"index": i, "prompt": "p", "text": f"old {index}.{i}", "completion_tokens": 1} for i in range(2)
        ])

    seeds: list[list[int]] = []
    recorder = Recorder()

    def sample_many(requests):
        seeds.append([seed for _, _, seed in requests])
        return recorder.sample_many(requests)

    events: list = []
    report = run_round(contexts, CONFIG, RoundStore(tmp_path), sample=recorder.sample, score=Effects().score,
                       train_policy=Effects().train, policy_adapter_id="", emit=events.append,
                       sample_many=sample_many, contexts_per_sample_batch=3)
    assert recorder.groups == [["Item 1", "Item 3", "Item 4"], ["Item 5"]]
    round_id = report.round_id
    assert seeds == [[restem.derive_seed(CONFIG.seed, round_id, contexts[i].context_id, "sample") for i in (1, 3, 4)],
                     [restem.derive_seed(CONFIG.seed, round_id, contexts[5].context_id, "sample")]]
    sampled = [e for e in events if isinstance(e, ContextSampled)]
    assert [e.reused for e in sampled] == [True, False, True, False, False, False]
    assert [s.text for s in sampled[2].samples] == ["old 2.0", "old 2.1"]


def test_a_group_missing_self_edits_is_refused_before_any_is_recorded(tmp_path: Path) -> None:
    recorder = Recorder(short="Item 1")
    with pytest.raises(RuntimeError, match="returned 1 self-edits for .*expected 2"):
        run_round(passages(3), CONFIG, RoundStore(tmp_path), sample=recorder.sample, score=Effects().score,
                  train_policy=Effects().train, policy_adapter_id="", emit=lambda e: None,
                  sample_many=recorder.sample_many, contexts_per_sample_batch=3)
    samples = tmp_path / "round-000001" / "samples.jsonl"
    assert not samples.exists() or not samples.read_text().strip()

    def too_few(requests):
        return recorder.sample_many(requests)[:-1]

    with pytest.raises(RuntimeError, match="for 2 contexts, expected 3"):
        run_round(passages(3), CONFIG, RoundStore(tmp_path), sample=recorder.sample, score=Effects().score,
                  train_policy=Effects().train, policy_adapter_id="", emit=lambda e: None,
                  sample_many=too_few, contexts_per_sample_batch=3)
    with pytest.raises(ValueError, match="contexts_per_sample_batch must be >= 1"):
        run_round(passages(3), CONFIG, RoundStore(tmp_path), sample=recorder.sample, score=Effects().score,
                  train_policy=Effects().train, policy_adapter_id="", emit=lambda e: None,
                  sample_many=recorder.sample_many, contexts_per_sample_batch=0)


def test_a_redacted_self_edit_later_in_a_group_is_scored_from_its_original_text(tmp_path: Path) -> None:
    secret = "The museum's key is AKIAQ7RZ3KXW5EXAMPLE."
    contexts = passages(3)
    recorder = Recorder(edits={"Item 2": ["Item 2 weighs 4 kilograms.", secret]})
    scored: list[str] = []

    def score(context, sample, seed):
        scored.append(sample.text)
        return Scored(0.5, "restem@v1")

    report = run_round(contexts, CONFIG, RoundStore(tmp_path), sample=recorder.sample, score=score,
                       train_policy=Effects().train, policy_adapter_id="", emit=lambda e: None,
                       redact=restem.redactor(GuardrailSettings()), sample_many=recorder.sample_many,
                       contexts_per_sample_batch=3)
    assert recorder.groups == [["Item 0", "Item 1", "Item 2"]]
    assert secret in scored  # scored once, from the text as written (the auditor records the refusal)
    assert "AKIAQ7RZ3KXW5EXAMPLE" not in (tmp_path / "round-000001" / "samples.jsonl").read_text()
    assert report.samples_failed == 1 and report.kept == 3


def test_the_setting_is_documented_and_bounded() -> None:
    from seal.config import RestemSettings

    field = RestemSettings.model_fields["contexts_per_sample_batch"]
    assert field.default == 4 and field.description and "1 = one context at a time" in field.description
    with pytest.raises(ValueError):
        RestemSettings(contexts_per_sample_batch=0)
