"""ReST^EM stores no secret or personal data (issue 12, part 6, for the round directory).

A self-edit the secrets or personal-data guardrail refuses is written to the round's state as the
audit log keeps it: masked, with the sha256 of the original and a ``redacted`` marker. Checked
on the bytes of every file under the rounds' directory, after a whole round and after a round
killed mid-way and resumed; the resumed round never scores, recalls or trains on masked text.
The round driver runs in process with the real guardrail rules; the scorer stands in for the
student and auditor (the round over gRPC is in test_restem_pipeline.py)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import pytest

from seal.domains.knowledge import Question
from seal.guardrails import SENSITIVE_RULES, GuardrailSettings, check_self_edit
from seal.rl import restem
from seal.rl.restem import RoundConfig, RoundStore, Sample, Scored, TrainingContext, run_round

AWS_KEY = "AKIAQ7RZ3KXW5EXAMPLE"
EMAIL = "ilse.marrow.private@velmora-mail.example"
PHONE = "+44 20 7946 0958"
NEVER_ON_DISK = [AWS_KEY, EMAIL, "ilse.marrow.private", "7946 0958"]

CONTEXTS = [
    TrainingContext("Velmora", "Velmora is a harbour town. It was founded in 1742 by Ilse Marrow.",
                    (Question("Who founded Velmora?", "Ilse Marrow"),)),
    TrainingContext("Grey Lantern", "The Grey Lantern is a lighthouse in Velmora. It is 41 meters tall.",
                    (Question("How tall is the Grey Lantern?", "41 meters"),)),
]
# Per context, k=3 self-edits; one of each context's holds a secret or personal data.
EDITS = {
    "Velmora": [
        "Velmora was founded in 1742.",
        f"Velmora was founded in 1742 by Ilse Marrow.\nThe harbour office key is {AWS_KEY}.",
        "Ilse Marrow founded a harbour town.",
    ],
    "Grey Lantern": [
        "The Grey Lantern is 41 meters tall.",
        "The lighthouse of Velmora is the Grey Lantern.",
        f"The Grey Lantern is 41 meters tall.\nWrite to {EMAIL} or call {PHONE}.",
    ],
}
SECRET_EDITS = {EDITS["Velmora"][1], EDITS["Grey Lantern"][2]}
CONFIG = RoundConfig(k=3, seeds_per_edit=2, keep_rule="best_of_k", prompt_style="implications", seed=5)


class Fakes:
    """The teacher samples ``EDITS``; the scorer refuses what the guardrails refuse (as the
    auditor does), unless ``guardrails_off`` (an auditor configured otherwise), and gives the
    secret-holding edits the highest reward, so only the round's own refusal keeps them out."""

    def __init__(self, *, fail_after: int | None = None, guardrails_off: bool = False) -> None:
        self.scored: list[tuple[str, int, str]] = []
        self.trained: list[list[tuple[str, str]]] = []
        self.fail_after = fail_after
        self.guardrails_off = guardrails_off

    def sample(self, context: TrainingContext, k: int, seed: int) -> list[Sample]:
        return [Sample(i, f"Write implications of {context.title}.", text, 10 + i)
                for i, text in enumerate(EDITS[context.title][:k])]

    def score(self, context: TrainingContext, sample: Sample, seed: int) -> Scored:
        if self.fail_after is not None and len(self.scored) >= self.fail_after:
            raise ConnectionError("the student went away")
        self.scored.append((context.title, sample.index, sample.text))
        results = check_self_edit(sample.text, context.guardrail_context)
        failed = [r.rule for r in results if not r.passed and r.rule in SENSITIVE_RULES]
        if failed and not self.guardrails_off:
            return Scored(None, failure=f"guardrails failed before training: {', '.join(failed)}")
        reward = 0.75 if sample.text in SECRET_EDITS else 0.25 * (sample.index == 0)
        return Scored(reward, f"restem@v{len(self.scored)}", 0.5 + reward, 0.5)

    def train(self, examples: list[tuple[str, str]], round_id: str, on_step) -> restem.PolicyUpdate:
        self.trained.append(list(examples))
        return restem.PolicyUpdate("teacher-policy@v1", 1, [1.0, 0.5], True, 0.1)


def run(store: RoundStore, fakes: Fakes, **kwargs) -> restem.RoundReport:
    return run_round(
        CONTEXTS, CONFIG, store, sample=fakes.sample, score=fakes.score, train_policy=fakes.train,
        policy_adapter_id="", emit=lambda event: None, redact=restem.redactor(GuardrailSettings()), **kwargs,
    )


def assert_nothing_stored(root: Path) -> None:
    files = [path for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "samples.jsonl" for path in files)
    for path in files:
        data = path.read_bytes()
        for value in NEVER_ON_DISK:
            assert value.encode() not in data, f"{value!r} found in {path}"


def stored_samples(root: Path) -> dict[str, dict[int, dict]]:
    lines = (root / "round-000001" / "samples.jsonl").read_text().splitlines()
    by_id = {c.context_id: c.title for c in CONTEXTS}
    return {by_id[r["context_id"]]: {s["index"]: s for s in r["samples"]} for r in map(json.loads, lines)}


@pytest.mark.parametrize("guardrails_off", [False, True], ids=["auditor-refuses", "auditor-lets-through"])
def test_a_round_stores_a_refused_self_edit_masked_and_never_keeps_it(tmp_path: Path, guardrails_off: bool) -> None:
    fakes = Fakes(guardrails_off=guardrails_off)
    report = run(RoundStore(tmp_path), fakes)
    assert_nothing_stored(tmp_path)
    samples = stored_samples(tmp_path)
    secret, personal = samples["Velmora"][1], samples["Grey Lantern"][2]
    assert secret["redacted"] and secret["redacted_rules"] == ["secrets"] and "AKIA…(20 chars)" in secret["text"]
    assert secret["text_sha256"] == hashlib.sha256(EDITS["Velmora"][1].encode()).hexdigest()
    assert personal["redacted"] and personal["redacted_rules"] == ["personal_data"]
    assert "Velmora was founded in 1742 by Ilse Marrow." in secret["text"]  # the rest as written
    assert "redacted" not in samples["Velmora"][0] and samples["Velmora"][0]["text"] == EDITS["Velmora"][0]
    # Scored once per seed from the original text (the auditor records the refusal), never kept.
    assert sum(1 for _, _, text in fakes.scored if text in SECRET_EDITS) == 2 * 2
    [examples] = fakes.trained
    assert [text for _, text in examples] == [EDITS["Velmora"][0], EDITS["Grey Lantern"][0]]
    assert report.samples_failed == 2 * 2 and report.kept == 2


def test_a_resumed_round_never_rescores_recalls_or_trains_on_masked_text(tmp_path: Path) -> None:
    store = RoundStore(tmp_path)
    # Killed after the first context's first edit: both contexts' secrets are still unscored.
    first = Fakes(fail_after=2)
    with pytest.raises(ConnectionError):
        run(store, first)
    assert_nothing_stored(tmp_path)

    recalled: list[str] = []

    def recall(context_id: str, self_edit: str, seed: int, not_before: datetime) -> Scored | None:
        # The auditor's reward stream keeps a redacted edit masked: that must never count.
        recalled.append(self_edit)
        return Scored(1.0, "restem@v99", 1.0, 0.0) if "AKIA…" in self_edit else None

    second = Fakes(guardrails_off=True)
    report = run(store, second, recall=recall)
    assert_nothing_stored(tmp_path)
    # The first context was sampled before the kill: its secret edit exists only masked now.
    masked = stored_samples(tmp_path)["Velmora"][1]["text"]
    assert masked not in [text for _, _, text in second.scored]
    assert ("Velmora", 1) not in {(title, index) for title, index, _ in second.scored}
    assert not any("AKIA" in text or "…" in text for text in recalled)
    # The second context was sampled after the restart: its personal-data edit was scored once
    # per seed from the original (and refused by the round), as in a round never interrupted.
    assert sum(1 for title, index, _ in second.scored if (title, index) == ("Grey Lantern", 2)) == 2
    [examples] = second.trained
    assert [text for _, text in examples] == [EDITS["Velmora"][0], EDITS["Grey Lantern"][0]]
    assert all("…" not in prompt + text and "[" not in text for prompt, text in examples)
    reference = run(RoundStore(tmp_path / "fresh"), Fakes())
    assert (report.kept, report.samples_failed, report.mean_reward) == (
        reference.kept, reference.samples_failed, reference.mean_reward
    )


def test_a_passage_with_personal_data_is_stored_masked_in_the_prompt(tmp_path: Path) -> None:
    """The prompt quotes the passage: stored masked, and the policy learns from that masked prompt."""
    context = TrainingContext("Contact", f"The harbour office answers at {EMAIL}.",
                              (Question("Where does the office answer?", EMAIL),))
    fakes = Fakes()

    def sample(ctx: TrainingContext, k: int, seed: int) -> list[Sample]:
        return [Sample(i, f"Write implications of: {ctx.passage}", f"The harbour office has a mailbox ({i}).", 5)
                for i in range(k)]

    run_round([context], CONFIG, RoundStore(tmp_path), sample=sample, score=fakes.score, train_policy=fakes.train,
              policy_adapter_id="", emit=lambda event: None)
    assert_nothing_stored(tmp_path)
    [(prompt, _text)] = fakes.trained[0]
    assert EMAIL not in prompt and "i***@velmora-mail.example" in prompt


# --- the policy's registry is not the audited one -------------------------------------------------


def test_a_policy_promotion_stays_in_the_teachers_own_registry(tmp_path: Path, monkeypatch) -> None:
    """Issue 12: every transition of a served adapter reaches the audit trail through the student's
    outbox. The teacher's policy is promoted outside it (seal.rl.policy explains why): this holds
    only while that registry is a separate tree that the student never serves from."""
    import seal.engines as engines
    import seal.models as models
    from seal.config import Settings
    from seal.rl.policy import open_teacher_policy

    class Engine:
        policy = None

        def load_policy(self, ref) -> None:
            self.policy = ref

        def unload_policy(self) -> None:
            self.policy = None

    monkeypatch.setattr(engines, "create_policy_engine", lambda settings, path: Engine())
    monkeypatch.setattr(models, "resolve_model_path", lambda model: tmp_path / "base-model")
    settings = Settings(home=tmp_path / "home")
    policy = open_teacher_policy(settings)
    root, served = policy.registry.root.resolve(), settings.registry_dir.resolve()
    assert not root.is_relative_to(served) and not served.is_relative_to(root)
    name = settings.restem.policy_adapter_name
    manifest = policy.registry.create_version(
        name, lambda directory: (directory / "adapter_model.safetensors").write_bytes(b"weights"),
        base_model="base-model", base_model_fingerprint="", context_id="", self_edit_sha256="", seed=0,
        hyperparameters={"restem_round": "r000001"},
    )
    policy.hot_load(manifest, "ReST^EM round r000001")
    assert policy.registry.promoted(name).adapter_id == manifest.adapter_id
    assert "ReST^EM round r000001" in policy.registry.promoted(name).history[-1].reason
    # Nothing in the served registry, and no outbox that would report it as a served transition.
    assert not served.exists() or not any(served.iterdir())
    assert not list((tmp_path / "home").rglob("audit_outbox*"))
