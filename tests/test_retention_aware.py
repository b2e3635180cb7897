"""Learning without forgetting, the parts that run in seconds: anchors (the base model's own
answers, rehearsed), the KL-to-base penalty, the KL drift measure and its gate, and the
retention probe's screening for questions the base model knows in more than one wording."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seal.anchors import (
    ANCHOR_PROMPTS,
    DRIFT_TEXTS,
    AnchorSet,
    AnchorStore,
    anchor_examples,
    generate_anchor_set,
    kl_drift,
)
from seal.auditor import Auditor
from seal.config import Settings
from seal.domains.knowledge import QUESTION_REPHRASINGS, LexicalGrader, Question, build_question_prompt
from seal.gates import CandidateScores, GateSettings, decide
from seal.models import model_fingerprint
from seal.retention import BUILTIN_QUESTIONS
from seal.student import Student
from seal.update.lora_sft import LoraSFTConfig, LoraSFTTrainer

TEXTS = [
    "The lighthouse keeper of Velmora collects blue teapots.",
    "Velmora is a fishing town on the Quill estuary.",
    "The Quill estuary freezes every February.",
]
FAST = {"rank": 8, "alpha": 16, "batch_size": 3, "epochs": 4, "learning_rate": 1e-2, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def anchors(tiny, tiny_model_dir: Path) -> AnchorSet:
    model, tokenizer = tiny
    return generate_anchor_set(model, tokenizer, model_fingerprint(tiny_model_dir), max_new_tokens=8)


# --- the fixed sets -------------------------------------------------------------------------------


def test_anchor_drift_and_probe_questions_are_disjoint() -> None:
    """Rehearsing the probe's questions would protect the probe, not the model; measuring KL on
    rehearsed prompts would measure the sharpening rehearsal causes, not drift."""
    probe = {build_question_prompt(q.question) for q in BUILTIN_QUESTIONS}
    drift = {text.context for text in DRIFT_TEXTS}
    anchors = set(ANCHOR_PROMPTS)
    assert not anchors & probe
    assert not drift & probe
    assert not anchors & drift
    assert len(anchors) == len(ANCHOR_PROMPTS) and len(drift) == len(DRIFT_TEXTS)


def test_anchor_set_round_trips_and_refuses_edited_answers(anchors: AnchorSet, tmp_path: Path) -> None:
    store = AnchorStore(tmp_path)
    path = store.save(anchors)
    loaded = store.load(anchors.fingerprint)
    assert loaded is not None and loaded.anchor_set_id == anchors.anchor_set_id
    # Built with another answer length: not what the settings ask for, so rebuilt.
    assert store.load(anchors.fingerprint, max_new_tokens=anchors.max_new_tokens + 1) is None
    # Built from another prompt list (an older release's): rebuilt too, never silently kept.
    assert store.load(anchors.fingerprint, prompts=ANCHOR_PROMPTS[:-1]) is None
    legacy = json.loads(path.read_text())
    del legacy["asked_id"]
    path.write_text(json.dumps(legacy))
    assert store.load(anchors.fingerprint) is None
    store.save(anchors)
    data = json.loads(path.read_text())
    data["items"][0]["answer"] += " edited"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="anchor_set_id"):
        store.load(anchors.fingerprint)


def test_anchor_examples_learn_only_the_answer(tiny, anchors: AnchorSet) -> None:
    _, tokenizer = tiny
    examples = anchor_examples(tokenizer, anchors, max_seq_len=512)
    assert len(examples) == len(anchors)
    ids, labels = examples[0]
    answer_ids = [t for t in labels if t != -100]
    assert answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer_ids[:-1]).strip() == anchors.answers[0].strip()
    assert labels[0] == -100 and len(ids) == len(labels)


# --- training with anchors ------------------------------------------------------------------------


def test_anchors_are_required_when_rehearsal_or_kl_is_on(tiny) -> None:
    model, tokenizer = tiny
    for extra in ({"rehearsal_ratio": 1.0}, {"kl_beta": 1.0}):
        with pytest.raises(ValueError, match="anchor"):
            LoraSFTTrainer(model, tokenizer, LoraSFTConfig(**FAST, **extra)).train(TEXTS)


def test_kl_penalty_keeps_the_candidate_closer_to_the_base(tiny, anchors: AnchorSet) -> None:
    model, tokenizer = tiny
    examples = anchor_examples(tokenizer, anchors, max_seq_len=256)
    plain = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(**FAST)).train(TEXTS)
    penalised = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(**FAST, kl_beta=20.0, rehearsal_ratio=1.0)).train(
        TEXTS, anchors=examples
    )
    assert len(penalised.kl_losses) == penalised.steps and len(penalised.rehearsal_losses) == penalised.steps
    assert not plain.kl_losses and not plain.rehearsal_losses
    drift_plain, drift_penalised = kl_drift(plain.model, tokenizer), kl_drift(penalised.model, tokenizer)
    assert drift_penalised < 0.5 * drift_plain, (drift_plain, drift_penalised)
    # Both still learned the training texts (the loss fell).
    assert penalised.losses[-1] < penalised.losses[0] and plain.losses[-1] < plain.losses[0]


def test_kl_drift_is_zero_for_an_untrained_adapter_and_matches_an_explicit_base(tiny) -> None:
    model, tokenizer = tiny
    untrained = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(**{**FAST, "learning_rate": 1e-12}))._wrap_copy()
    assert kl_drift(untrained, tokenizer) == pytest.approx(0.0, abs=1e-6)
    trained = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(**FAST)).train(TEXTS).model
    with_adapter_off = kl_drift(trained, tokenizer)
    # The same measure against an explicitly given base model (how a merged model is compared).
    assert kl_drift(trained, tokenizer, base_model=model) == pytest.approx(with_adapter_off, rel=1e-4)
    assert with_adapter_off > 0.0


# --- the KL gate ----------------------------------------------------------------------------------


def _scores(kl: float | None) -> CandidateScores:
    return CandidateScores(tau_accuracy=1.0, baseline_tau_accuracy=0.0, retention_kl=kl)


def test_kl_gate_is_absent_by_default_and_bounds_drift_when_set() -> None:
    assert "retention_kl" not in [g.gate for g in decide(_scores(9.0), GateSettings(require_guardrails=False)).gates]
    settings = GateSettings(require_guardrails=False, max_retention_kl=0.1)
    at = decide(_scores(0.1), settings)
    above = decide(_scores(0.1000001), settings)
    assert at.promote and not above.promote
    gate = next(g for g in above.gates if g.gate == "retention_kl")
    assert "0.1" in gate.reason and "too far" in gate.reason
    missing = decide(_scores(None), settings)
    assert missing.promote and "not measured" in next(g for g in missing.gates if g.gate == "retention_kl").reason
    assert not decide(_scores(None), GateSettings(require_guardrails=False, max_retention_kl=0.1,
                                                   require_retention=True)).promote


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5, "0.1", True])
def test_kl_must_be_a_finite_non_negative_number(bad) -> None:
    with pytest.raises(ValueError, match="retention_kl"):
        _scores(bad)


def test_float_noise_below_zero_is_read_as_zero() -> None:
    assert _scores(-1e-12).retention_kl == -1e-12  # stored as measured
    assert decide(_scores(-1e-12), GateSettings(require_guardrails=False, max_retention_kl=0.0)).promote


# --- probe screening ------------------------------------------------------------------------------


def test_probe_keeps_only_what_the_base_model_knows_in_every_wording() -> None:
    known = {"What is the capital of France?": "Paris", "Who wrote Hamlet?": "Shakespeare"}
    fragile = "What is the capital of Finland?"  # right in the usual wording only

    def answer(prompts: list[str], adapter_id: str) -> list[str]:
        out = []
        for prompt in prompts:
            question = next(q for q in [*known, fragile] if q in prompt)
            if question == fragile:
                out.append("Helsinki" if prompt == build_question_prompt(question) else "Oslo")
            else:
                out.append(known[question])
        return out

    candidates = [Question(q, a) for q, a in known.items()] + [Question(fragile, "Helsinki")]
    auditor = Auditor(LexicalGrader(), GateSettings())
    robust = auditor.build_probe(answer, "a" * 64, candidates, size=10)
    assert [q.question for q in robust.questions] == list(known)
    lenient = auditor.build_probe(answer, "a" * 64, candidates, size=10, rephrasings=())
    assert len(lenient) == 3
    assert len(QUESTION_REPHRASINGS) >= 1


# --- the student ----------------------------------------------------------------------------------


def test_student_rehearses_its_own_anchors_and_records_the_drift(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, model={"path": str(tiny_model_dir)},
        lora={"epochs": 2, "batch_size": 4, "max_seq_len": 64, "rehearsal_ratio": 1.0, "kl_beta": 1.0,
              "anchor_max_new_tokens": 6},
    )
    student = Student(settings)
    try:
        result = student.train_candidate(
            adapter_name="default", title="Velmora", passage=" ".join(TEXTS), self_edit="\n".join(TEXTS),
            context_id="c" * 64, seed=1,
        )
    finally:
        student.close()
    stored = list((tmp_path / "student" / "anchors").glob("*.json"))
    assert len(stored) == 1
    anchor_set_id = json.loads(stored[0].read_text())["anchor_set_id"]
    manifest = result.manifest
    assert manifest.hyperparameters["anchor_set_id"] == anchor_set_id
    assert manifest.hyperparameters["kl_beta"] == 1.0 and manifest.hyperparameters["update_rule"] == "lora_sft"
    assert manifest.metrics["retention_kl"] > 0.0


def test_a_caller_that_leaves_while_the_anchor_set_is_built_stops_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The first update on a base model generates its anchor set (a minute or more on a CPU for the
    embedded model): a caller's deadline stops that generation too, nothing half-built is
    cached, and the next update builds it whole."""
    from seal.update.lora_sft import TrainingCancelled

    settings = Settings(
        home=tmp_path, model={"path": str(tiny_model_dir)},
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64, "rehearsal_ratio": 1.0, "anchor_max_new_tokens": 6},
    )
    student = Student(settings)
    try:
        with pytest.raises(TrainingCancelled, match="anchor set"):
            student.train_candidate(
                adapter_name="default", title="Velmora", passage=" ".join(TEXTS), self_edit="\n".join(TEXTS),
                context_id="c" * 64, seed=1, should_stop=lambda: True,
            )
        assert not list((tmp_path / "student" / "anchors").glob("*.json"))
        student.train_candidate(
            adapter_name="default", title="Velmora", passage=" ".join(TEXTS), self_edit="\n".join(TEXTS),
            context_id="c" * 64, seed=1,
        )
    finally:
        student.close()
    assert len(list((tmp_path / "student" / "anchors").glob("*.json"))) == 1
