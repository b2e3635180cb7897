"""ReST^EM core: the keep rules as properties, the round driver's durability and resume, and the
policy's SFT data (transport-free; the round over real gRPC is in test_restem_pipeline.py)."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seal.domains.knowledge import Question
from seal.rl import restem
from seal.rl.restem import (
    TIE_TOLERANCE,
    EditResult,
    RoundConfig,
    RoundConflict,
    RoundStopped,
    RoundStore,
    Sample,
    Scored,
    TrainingContext,
    derive_seed,
    keep,
    run_round,
)

# --- keep rules -----------------------------------------------------------------------------------

# Rewards as SEAL makes them: differences of two accuracies over the same small τ.
rewards = st.builds(lambda a, b, n: (a - b) / n, st.integers(0, 5), st.integers(0, 5), st.integers(1, 5))


@st.composite
def edit_lists(draw: st.DrawFn) -> list[EditResult]:
    count = draw(st.integers(0, 8))
    edits = []
    for index in range(count):
        failed = draw(st.integers(0, 3)) == 0
        seeds = draw(st.integers(1, 3))
        edits.append(
            EditResult(
                index=index,
                text=f"edit {index}",
                completion_tokens=draw(st.integers(1, 300)),
                rewards=() if failed else tuple(draw(rewards) for _ in range(seeds)),
                failure="guardrails failed" if failed else "",
            )
        )
    return edits


@given(edit_lists())
def test_best_of_k_keeps_a_maximum_even_without_gain(edits: list[EditResult]) -> None:
    kept = keep(edits, "best_of_k")
    scored = [e for e in edits if e.scored]
    assert (kept is None) == (not scored)
    if kept is not None:
        assert kept in scored
        assert all(kept.mean_reward >= e.mean_reward - TIE_TOLERANCE for e in scored)
        # Ties go to the first sample.
        tied = [e for e in scored if abs(e.mean_reward - kept.mean_reward) <= TIE_TOLERANCE]
        assert kept.index == min(e.index for e in tied)


@given(edit_lists())
def test_best_positive_keeps_only_a_gain_and_prefers_the_shorter(edits: list[EditResult]) -> None:
    kept = keep(edits, "best_positive")
    positive = [e for e in edits if e.scored and e.mean_reward > TIE_TOLERANCE]
    assert (kept is None) == (not positive)
    if kept is not None:
        assert kept.mean_reward > 0
        assert all(kept.mean_reward >= e.mean_reward - TIE_TOLERANCE for e in positive)
        tied = [e for e in positive if abs(e.mean_reward - kept.mean_reward) <= TIE_TOLERANCE]
        assert kept.completion_tokens == min(e.completion_tokens for e in tied)
        assert kept.index == min(e.index for e in tied if e.completion_tokens == kept.completion_tokens)


@given(edit_lists())
def test_the_strict_rule_is_the_papers_rule_restricted_to_gains(edits: list[EditResult]) -> None:
    strict, paper = keep(edits, "best_positive"), keep(edits, "best_of_k")
    if strict is not None:
        assert paper is not None and abs(strict.mean_reward - paper.mean_reward) <= TIE_TOLERANCE
    if paper is not None and paper.mean_reward > TIE_TOLERANCE:
        assert strict is not None


@given(edit_lists(), st.randoms(use_true_random=False))
def test_keep_ignores_the_order_samples_arrive_in(edits: list[EditResult], rnd: random.Random) -> None:
    shuffled = list(edits)
    rnd.shuffle(shuffled)
    for rule in restem.KEEP_RULES:
        a, b = keep(edits, rule), keep(shuffled, rule)
        assert (a.index if a else None) == (b.index if b else None)


@given(edit_lists())
def test_failed_samples_are_never_kept(edits: list[EditResult]) -> None:
    for rule in restem.KEEP_RULES:
        kept = keep(edits, rule)
        assert kept is None or not kept.failure


def test_keep_examples() -> None:
    a = EditResult(0, "long", 200, (0.0,))
    b = EditResult(1, "short", 50, (0.0,))
    c = EditResult(2, "worse", 10, (-0.5,))
    assert keep([a, b, c], "best_of_k") is a  # zero gain still kept; tie → first sample
    assert keep([a, b, c], "best_positive") is None
    d = EditResult(3, "gain long", 120, (0.5, 0.5))
    e = EditResult(4, "gain short", 80, (0.25, 0.75))  # same mean over its seeds
    assert keep([a, d, e], "best_of_k") is d
    assert keep([a, d, e], "best_positive") is e
    with pytest.raises(ValueError, match="keep rule"):
        keep([a], "best_of_all")  # type: ignore[arg-type]


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, "r1", "ctx", 0, 0) == derive_seed(0, "r1", "ctx", 0, 0)
    seeds = {derive_seed(0, "r1", "ctx", edit, seed) for edit in range(5) for seed in range(3)}
    assert len(seeds) == 15
    assert all(0 <= s < 2**31 for s in seeds)


# --- the round driver -----------------------------------------------------------------------------


def contexts(n: int = 3) -> list[TrainingContext]:
    return [
        TrainingContext(f"Title {i}", f"Passage number {i} says that item {i} weighs {i + 1} kilograms.",
                        (Question(f"How much does item {i} weigh?", f"{i + 1} kilograms"),))
        for i in range(n)
    ]


class Fakes:
    """Deterministic stand-ins for the teacher, the student+auditor path and the policy SFT."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sample_calls: list[str] = []
        self.score_calls: list[tuple[str, int, int]] = []
        self.trained: list[tuple[list[tuple[str, str]], str]] = []
        self.fail_after = fail_after

    def sample(self, context: TrainingContext, k: int, seed: int) -> list[Sample]:
        self.sample_calls.append(context.context_id)
        return [Sample(i, f"prompt for {context.title}", f"{context.title} edit {i} " + "x" * i, 10 + i) for i in range(k)]

    def score(self, context: TrainingContext, sample: Sample, seed: int) -> Scored:
        if self.fail_after is not None and len(self.score_calls) >= self.fail_after:
            raise ConnectionError("student went away")
        self.score_calls.append((context.context_id, sample.index, seed))
        if sample.index == 2:
            return Scored(None, failure="guardrails failed before training: secrets")
        # Edit 1 gains on the first context only; everything else is flat.
        gain = 0.5 if sample.index == 1 and context.title == "Title 0" else 0.0
        return Scored(gain, f"restem@v{len(self.score_calls)}", 0.5 + gain, 0.5)

    def train(self, examples: list[tuple[str, str]], round_id: str, on_step) -> restem.PolicyUpdate:
        self.trained.append((examples, round_id))
        for step in range(1, 3):
            on_step(step, 2, 1.0 / step)
        return restem.PolicyUpdate("teacher-policy@v1", 1, [1.0, 0.5], True, 0.1)


def run(store: RoundStore, fakes: Fakes, config: RoundConfig, events: list | None = None, **kwargs) -> restem.RoundReport:
    return run_round(
        contexts(), config, store, sample=fakes.sample, score=fakes.score, train_policy=fakes.train,
        policy_adapter_id=kwargs.pop("policy", ""), emit=(events if events is not None else []).append, **kwargs,
    )


def test_a_round_scores_every_sample_keeps_one_per_context_and_trains(tmp_path: Path) -> None:
    fakes, events = Fakes(), []
    config = RoundConfig(k=3, seeds_per_edit=2, keep_rule="best_of_k", prompt_style="implications", seed=0)
    report = run(RoundStore(tmp_path), fakes, config, events)
    assert len(fakes.sample_calls) == 3 and len(fakes.score_calls) == 3 * 3 * 2
    assert report.samples_scored == 12 and report.samples_failed == 6 and report.samples_resumed == 0
    assert report.kept == 3 and report.positive_kept == 1
    assert report.mean_reward == pytest.approx(0.5 / 6)  # one of six scored edits gained 0.5
    assert report.policy_adapter_id == "teacher-policy@v1" and report.hot_loaded
    assert report.policy_sft_first_loss == 1.0 and report.policy_sft_final_loss == 0.5
    examples, round_id = fakes.trained[0]
    assert [text for _, text in examples] == ["Title 0 edit 1 x", "Title 1 edit 0 ", "Title 2 edit 0 "]
    assert round_id == report.round_id
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RoundStarted" and kinds[-1] == "RoundReport"
    assert kinds.count("ContextDone") == 3 and kinds.count("PolicyProgress") == 2
    stored = json.loads((tmp_path / "round-000001" / "round.json").read_text())
    assert stored["status"] == "done" and stored["report"]["kept"] == 3


def test_the_strict_rule_trains_only_on_gains(tmp_path: Path) -> None:
    fakes = Fakes()
    config = RoundConfig(k=3, seeds_per_edit=1, keep_rule="best_positive", prompt_style="implications", seed=0)
    report = run(RoundStore(tmp_path), fakes, config)
    assert report.kept == 1 and [t for _, t in fakes.trained[0][0]] == ["Title 0 edit 1 x"]


def test_nothing_kept_leaves_the_policy_alone(tmp_path: Path) -> None:
    fakes = Fakes()

    def flat(context, sample, seed):
        return Scored(-0.25, "restem@v1", 0.25, 0.5)

    config = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_positive", prompt_style="implications", seed=0)
    report = run_round(contexts(), config, RoundStore(tmp_path), sample=fakes.sample, score=flat,
                       train_policy=fakes.train, policy_adapter_id="", emit=lambda e: None)
    assert report.kept == 0 and not fakes.trained and report.policy_adapter_id == "" and not report.hot_loaded


def test_an_interrupted_round_resumes_without_redoing_work(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    config = RoundConfig(k=3, seeds_per_edit=2, keep_rule="best_of_k", prompt_style="implications", seed=4)
    first = Fakes(fail_after=7)
    with pytest.raises(ConnectionError):
        run(store, first, config)
    assert len(first.score_calls) == 7

    second, events = Fakes(), []
    report = run(store, second, config, events)
    started = events[0]
    assert started.resumed and started.samples_done == 7 and started.round == 1
    # Contexts sampled before the interruption are not sampled again: their self-edits are kept.
    assert second.sample_calls == [contexts()[2].context_id]
    # Every (edit, seed) is scored exactly once across both runs, with the same derived seeds.
    all_calls = first.score_calls + second.score_calls
    assert len(all_calls) == len(set(all_calls)) == 3 * 3 * 2
    assert report.samples_resumed == 7
    reference = run(RoundStore(tmp_path / "fresh"), Fakes(), config)
    assert (report.kept, report.mean_reward) == (reference.kept, reference.mean_reward)


def test_a_stop_request_keeps_finished_work(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    config = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=0)
    fakes = Fakes()
    with pytest.raises(RoundStopped):
        run(store, fakes, config, should_stop=lambda: len(fakes.score_calls) >= 3)
    resumed = Fakes()
    report = run(store, resumed, config)
    assert report.samples_resumed == 3 and len(resumed.score_calls) == 3


def test_a_reward_already_in_the_buffer_is_not_scored_again(tmp_path: Path) -> None:
    config = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=0)
    recalled: list[tuple[str, int]] = []

    def recall(context_id: str, self_edit: str, seed: int, not_before: datetime) -> Scored | None:
        if self_edit.endswith("edit 0 "):
            recalled.append((context_id, seed))
            return Scored(0.25, "restem@v99", 0.75, 0.5)
        return None

    fakes = Fakes()
    report = run(RoundStore(tmp_path), fakes, config, recall=recall)
    assert len(recalled) == 3 and len(fakes.score_calls) == 3
    assert report.samples_resumed == 3
    assert all(index == 1 for _, index, _ in fakes.score_calls)


def test_other_inputs_do_not_resume_an_unfinished_round(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    config = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=0)
    with pytest.raises(ConnectionError):
        run(store, Fakes(fail_after=1), config)
    other = RoundConfig(k=3, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=0)
    with pytest.raises(RoundConflict, match="unfinished"):
        run(store, Fakes(), other)
    with pytest.raises(RoundConflict, match="sampled with policy"):
        run(store, Fakes(), config, policy="teacher-policy@v7")
    report = run(store, Fakes(), other, restart=True)
    assert report.round == 2
    assert json.loads((tmp_path / "round-000001" / "round.json").read_text())["status"] == "abandoned"


def test_a_torn_state_line_is_dropped_and_the_round_still_resumes(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    config = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=0)
    with pytest.raises(ConnectionError):
        run(store, Fakes(fail_after=2), config)
    scores = tmp_path / "round-000001" / "scores.jsonl"
    with scores.open("a") as handle:
        handle.write('{"context_id": "tor')  # killed mid-write
    fakes = Fakes()
    report = run(store, fakes, config)
    assert report.samples_resumed == 2 and len(fakes.score_calls) == 4
    assert all(json.loads(line) for line in scores.read_text().splitlines())


def test_round_input_errors_are_actionable(tmp_path: Path) -> None:
    config = RoundConfig(k=1, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=0)
    fakes = Fakes()
    with pytest.raises(ValueError, match="at least one context"):
        run_round([], config, RoundStore(tmp_path), sample=fakes.sample, score=fakes.score,
                  train_policy=fakes.train, policy_adapter_id="", emit=lambda e: None)
    twice = contexts(1) * 2
    with pytest.raises(ValueError, match="twice"):
        run_round(twice, config, RoundStore(tmp_path), sample=fakes.sample, score=fakes.score,
                  train_policy=fakes.train, policy_adapter_id="", emit=lambda e: None)
    with pytest.raises(ValueError, match="keep_rule"):
        RoundConfig(k=1, seeds_per_edit=1, keep_rule="all", prompt_style="implications", seed=0)  # type: ignore[arg-type]


# --- the policy's SFT data ------------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(st.text(min_size=1, max_size=200).filter(lambda t: t.strip()), st.integers(52, 400))
def test_chat_examples_learn_only_the_completion(embedded_tokenizer_dir: Path, completion: str, max_len: int) -> None:
    from transformers import AutoTokenizer

    from seal.chat import chat_prompt_ids
    from seal.update.policy_sft import (
        IGNORE_INDEX,
        PolicyExample,
        chat_sft_example,
    )

    tokenizer = _tokenizer(embedded_tokenizer_dir, AutoTokenizer)
    prompt = "Read the passage below and list the implications.\n\nTitle: T\nPassage: P\n"
    ids, labels = chat_sft_example(tokenizer, PolicyExample(prompt, completion), max_len)
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    assert len(ids) == len(labels) <= max_len
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]
    full = [*tokenizer(completion.strip(), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if len(prompt_ids) + len(full) <= max_len:
        assert ids[len(prompt_ids):] == full  # whole completion, ending in EOS as generation does


_TOKENIZERS: dict[Path, object] = {}


def _tokenizer(path: Path, auto):  # type: ignore[no-untyped-def]
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = auto.from_pretrained(str(path))
    return _TOKENIZERS[path]


def test_a_prompt_longer_than_the_budget_is_refused(embedded_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from seal.update.policy_sft import PolicyExample, chat_sft_example

    tokenizer = _tokenizer(embedded_tokenizer_dir, AutoTokenizer)
    with pytest.raises(ValueError, match=r"restem\.policy\.max_seq_len"):
        chat_sft_example(tokenizer, PolicyExample("word " * 300, "x"), 64)


def test_the_vllm_engine_can_load_a_policy_of_the_configured_rank(monkeypatch, tmp_path: Path) -> None:
    """``teacher.vllm_max_lora_rank`` is raised to ``restem.policy.rank`` (vLLM refuses a LoRA
    above its max rank); the engine class is replaced, the choice of its arguments is real."""
    import seal.engines as engines
    import seal.engines.vllm_engine as vllm_engine
    from seal.config import Settings

    built: list[dict[str, object]] = []
    monkeypatch.setattr(engines, "resolve_engine_kind", lambda requested: "vllm")
    monkeypatch.setattr(vllm_engine, "VllmEngine", lambda path, **kwargs: built.append(kwargs))
    for policy_rank, expected in ((64, 64), (8, 16)):
        settings = Settings(home=tmp_path, restem={"policy": {"rank": policy_rank}})
        engines.create_policy_engine(settings, tmp_path)
        assert built[-1]["max_lora_rank"] == expected
