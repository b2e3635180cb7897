"""ReST^EM for the few-shot ARC domain: the same round (seal.rl.restem.run_round) and the same
Train RPC as knowledge incorporation, with ARC tasks as contexts, the recipe prompt, the recipe
gate and a binary solved-or-not reward.

The pure pieces first (the ARC training context, the round's domain, the reward check, the keep
rule on binary rewards), then one real round over gRPC on two of SEAL's ARC training tasks with
the tiny random model, and the Train RPC's refusals."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest

from seal.config import Settings
from seal.domains.fewshot import (
    SEAL_TRAIN_CHALLENGES,
    ArcPair,
    ArcTask,
    FewShotSelfEdit,
    build_self_edit_prompt,
    load_arc_tasks,
    select_arc_tasks,
)
from seal.domains.knowledge import Question
from seal.rl.restem import (
    PolicyUpdate,
    RoundConfig,
    RoundStore,
    Sample,
    Scored,
    TrainingContext,
    domain_reward,
    round_domain,
    round_fingerprint,
    run_round,
)

ARC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc"
# The two smallest of SEAL's training tasks (3×3 grids; recipe prompts of 333 and 368 tokens).
TASK_IDS = ("6150a2bd", "5582e5ca")
RECIPE = FewShotSelfEdit(True, False, False, False, "output_tokens", 1e-3, 1).to_json()


def flip(grid: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(reversed(row)) for row in grid)


def flip_task(task_id: str = "flip", test: tuple[tuple[int, ...], ...] = ((7, 0), (0, 8))) -> ArcTask:
    inputs = [((1, 0), (2, 0)), ((0, 3), (0, 4))]
    return ArcTask(task_id, tuple(ArcPair(g, flip(g)) for g in inputs), (test,), (flip(test),))


def seal_training_tasks() -> list[ArcTask]:
    challenges = ARC_DIR / SEAL_TRAIN_CHALLENGES
    if not challenges.is_file():
        pytest.skip(f"{challenges} not present (../shared/data)")
    return select_arc_tasks(load_arc_tasks(challenges), TASK_IDS)


# --- pure pieces ----------------------------------------------------------------------------------


def test_an_arc_training_context_is_identified_by_its_task_and_scored_on_its_test_outputs() -> None:
    arc = flip_task()
    context = TrainingContext.from_arc(arc)
    assert (context.domain, context.context_id, context.problem()) == ("fewshot", arc.context_id, "")
    assert context.tau == [[[0, 7], [8, 0]]]  # the gold test output, as JSON
    unsolvable = TrainingContext.from_arc(ArcTask(arc.task_id, arc.demonstrations, arc.test_inputs))
    assert "0 test output(s) for 1 test input(s)" in unsolvable.problem()
    passage = TrainingContext("T", "P says x.", (Question("q?", "x"),))
    assert (passage.domain, passage.tau, passage.problem()) == ("knowledge", [["q?", "x"]], "")
    assert "needs a passage" in TrainingContext("T", " ", ()).problem()


def test_the_round_fingerprint_keeps_knowledge_rounds_resumable_and_covers_arc_gold_outputs() -> None:
    config = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=0)
    passage = TrainingContext("T", "P says x.", (Question("q?", "x"),))
    # The fingerprint of a knowledge round is what it was before the few-shot domain: a round
    # left unfinished by the previous version still resumes.
    before = {"contexts": [[passage.context_id, [["q?", "x"]]]], "config": asdict(config)}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert round_fingerprint([passage], config) == expected
    # Two rounds on the same ARC task with different gold outputs are different experiments.
    a, b = flip_task(), flip_task()
    b = ArcTask(b.task_id, b.demonstrations, b.test_inputs, (((1, 1), (1, 1)),))
    assert TrainingContext.from_arc(a).context_id == TrainingContext.from_arc(b).context_id
    assert round_fingerprint([TrainingContext.from_arc(a)], config) != round_fingerprint(
        [TrainingContext.from_arc(b)], config
    )


def test_a_round_is_in_one_domain() -> None:
    arc, passage = TrainingContext.from_arc(flip_task()), TrainingContext("T", "P.", (Question("q?", "x"),))
    assert round_domain([arc]) == "fewshot" and round_domain([passage]) == "knowledge"
    with pytest.raises(ValueError, match=r"mix fewshot \(first at contexts\[1\]\) and knowledge \(first at contexts\[0\]\)"):
        round_domain([passage, arc])


def test_a_fewshot_reward_is_binary_and_a_knowledge_reward_is_a_gain() -> None:
    assert domain_reward("fewshot", 1.0) == 1.0 and domain_reward("fewshot", 0.0) == 0.0
    with pytest.raises(ValueError, match="1 \\(solved\\) or 0"):
        domain_reward("fewshot", 0.5)
    assert domain_reward("knowledge", -0.25) == -0.25
    with pytest.raises(ValueError, match="unknown"):
        domain_reward("vision", 1.0)


class Effects:
    """The round's effects for a pure run: fixed self-edits, a scorer that solves the tasks
    named in ``solves`` with the first self-edit, a policy SFT that records its data."""

    def __init__(self, solves: set[str], reward: float = 1.0) -> None:
        self.solves, self.reward = solves, reward
        self.trained: list[tuple[str, str]] = []

    def sample(self, context: TrainingContext, k: int, seed: int) -> list[Sample]:
        prompt = build_self_edit_prompt(context.fewshot)  # type: ignore[arg-type]
        return [Sample(i, prompt, RECIPE if i == 0 else f"{RECIPE} #{i}", 40 + i) for i in range(k)]

    def score(self, context: TrainingContext, sample: Sample, seed: int) -> Scored:
        solved = sample.index == 0 and context.title in self.solves
        return Scored(self.reward if solved else 0.0, f"restem@v{seed}", float(solved), 0.0)

    def train_policy(self, examples, round_id, on_step) -> PolicyUpdate:
        self.trained.extend(examples)
        return PolicyUpdate("teacher-policy@v1", 1, [1.0, 0.5], True, 0.0)


def test_a_fewshot_round_keeps_the_recipes_that_solved_their_task_and_names_its_domain(tmp_path: Path) -> None:
    contexts = [TrainingContext.from_arc(flip_task("a")), TrainingContext.from_arc(flip_task("b", ((3, 0), (0, 4))))]
    config = RoundConfig(k=2, seeds_per_edit=1, keep_rule="best_positive", prompt_style="implications", seed=1)
    effects, events = Effects(solves={"a"}), []
    report = run_round(contexts, config, RoundStore(tmp_path), sample=effects.sample, score=effects.score,
                       train_policy=effects.train_policy, policy_adapter_id="", emit=events.append)
    assert report.domain == "fewshot" and events[0].domain == "fewshot"
    assert (report.kept, report.positive_kept, report.max_reward) == (1, 1, 1.0)
    # Task a's solving recipe is the policy's one SFT example, with the recipe prompt it answered;
    # task b's unsolved recipes are not kept (binary reward, best_positive).
    assert effects.trained == [(build_self_edit_prompt(contexts[0].fewshot), RECIPE)]
    assert json.loads((tmp_path / "round-000001" / "round.json").read_text())["domain"] == "fewshot"


def test_a_non_binary_fewshot_reward_ends_the_round_instead_of_training_on_it(tmp_path: Path) -> None:
    config = RoundConfig(k=1, seeds_per_edit=1, keep_rule="best_of_k", prompt_style="implications", seed=1)
    effects = Effects(solves={"flip"}, reward=0.5)
    with pytest.raises(ValueError, match="the scorer returned 0.5"):
        run_round([TrainingContext.from_arc(flip_task())], config, RoundStore(tmp_path), sample=effects.sample,
                  score=effects.score, train_policy=effects.train_policy, policy_adapter_id="", emit=lambda e: None)
    assert effects.trained == []


def test_train_request_inputs_default_to_the_fewshot_keep_rule(tmp_path: Path) -> None:
    from seal.transport import convert
    from seal.v1 import common_pb2, teacher_pb2
    from teacher_svc.restem import round_inputs

    settings = Settings(home=tmp_path)
    arc = teacher_pb2.TrainRequest(contexts=[teacher_pb2.TrainingContext(fewshot=convert.fewshot_to_proto(flip_task()))])
    contexts, config = round_inputs(arc, settings)
    assert contexts == [TrainingContext.from_arc(flip_task())]
    assert config.keep_rule == settings.restem.fewshot_keep_rule == "best_positive"
    passage = teacher_pb2.TrainingContext(
        context=common_pb2.Context(title="T", passage="P says x."), questions=[common_pb2.Question(question="q?", answer="x")]
    )
    _, knowledge = round_inputs(teacher_pb2.TrainRequest(contexts=[passage]), settings)
    assert knowledge.keep_rule == settings.restem.keep_rule == "best_of_k"


# --- the CLI's request --------------------------------------------------------------------------


def test_seal_train_domain_fewshot_sends_the_named_arc_tasks_with_their_gold_outputs() -> None:
    from seal.cli import build_parser
    from seal.cli.train import fewshot_train_request

    tasks = seal_training_tasks()
    challenges = str(ARC_DIR / SEAL_TRAIN_CHALLENGES)
    args = build_parser().parse_args([
        "train", "--domain", "fewshot", "--arc-tasks", challenges, "--task-ids", ",".join(TASK_IDS), "--k", "3",
    ])
    request = fewshot_train_request(args, default_n=8)
    assert request.domain == "fewshot" and request.k == 3
    assert [c.fewshot.task_id for c in request.contexts] == list(TASK_IDS)
    assert all(len(c.fewshot.test_outputs) == len(c.fewshot.test_inputs) == 1 for c in request.contexts)
    assert all(not c.context.passage and not c.questions for c in request.contexts)
    assert len(tasks) == 2

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as caught:
            fewshot_train_request(build_parser().parse_args(["train", "--domain", "fewshot", "--arc-tasks", challenges,
                                                             *argv]), default_n=8)
        return str(caught.value)

    assert "has no task 'nope'" in refused("--task-ids", "6150a2bd,nope")
    assert "(12 tasks: 44f52bb0, " in refused("--task-ids", "6150a2bd,nope")  # and it lists what is there
    assert "do not apply to --domain fewshot" in refused("--epochs", "2")
    assert "out of range" in refused("--start", "99")


def test_arc_flags_without_domain_fewshot_are_refused() -> None:
    from seal import cli

    with pytest.raises(SystemExit, match="need --domain fewshot"):
        cli.main(["train", "--task-ids", "6150a2bd"])


# --- one round over gRPC --------------------------------------------------------------------------


def fewshot_restem_settings(home: Path, model_dir: Path) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        # Greedy, so the warm-started policy writes its recipe every time; room for the recipe.
        teacher={"max_new_tokens": 64, "temperature": 0.0, "engine": "transformers"},
        # One epoch on two examples: a recipe of the round trains 1-2 steps, scores one view.
        fewshot={"max_examples": 2, "leave_two_out": False, "max_steps": 8, "vote_views": ["identity"],
                 "answer_max_new_tokens": 16, "max_seq_len": 512},
        restem={"k": 2, "policy": {"learning_rate": 2e-2, "epochs": 2, "batch_size": 2, "max_seq_len": 512}},
    )


def warm_start_policy(settings: Settings, task: ArcTask) -> None:
    """Teach the teacher's policy to answer ``task``'s recipe prompt with a recipe, through the
    policy's own SFT (the M-step's code path): the random tiny model writes no JSON, and a round
    whose every self-edit fails the recipe gate would score nothing. One task only (30 steps,
    ~30 s here): the other task of the round keeps getting text that fails the recipe gate, so
    the round has both kinds of sample."""
    from seal.rl.policy import open_teacher_policy

    policy_lora = settings.restem.policy.model_copy(update={"learning_rate": 5e-2, "epochs": 30, "batch_size": 1})
    warm = settings.model_copy(update={"restem": settings.restem.model_copy(update={"policy": policy_lora})})
    policy = open_teacher_policy(warm)
    policy.train([(build_self_edit_prompt(task, settings.fewshot), RECIPE)], "warm-start", seed=0)
    policy.engine.close()


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    from seal.stack import local_stack

    tasks = seal_training_tasks()
    settings = fewshot_restem_settings(tmp_path_factory.mktemp("restem-fewshot"), tiny_model_dir)
    warm_start_policy(settings, tasks[0])
    with local_stack(settings) as running:
        yield running, tasks


def train_over_grpc(address: str, request) -> list:
    from seal.v1 import teacher_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return list(teacher_pb2_grpc.TeacherServiceStub(channel).Train(request, timeout=600))


def test_one_fewshot_round_over_grpc_scores_recipes_with_a_binary_reward_and_trains_the_policy(stack) -> None:
    from seal.transport import convert
    from seal.v1 import teacher_pb2

    running, tasks = stack
    request = teacher_pb2.TrainRequest(
        contexts=[teacher_pb2.TrainingContext(fewshot=convert.fewshot_to_proto(t)) for t in tasks],
        domain="fewshot", k=2, seed=5, keep_rule=teacher_pb2.KEEP_RULE_BEST_OF_K,
    )
    events = train_over_grpc(running.teacher.address, request)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "round_started" and kinds[-1] == "report"
    started, report = events[0].round_started, events[-1].report
    assert started.domain == "fewshot" and started.policy_adapter_id == "teacher-policy@v1"

    # The recipe prompt, answered by the warm-started policy with a recipe.
    sampled = [e.context_sampled for e in events if e.WhichOneof("event") == "context_sampled"]
    assert [s.context_id for s in sampled] == [t.context_id for t in tasks]
    for task, item in zip(tasks, sampled):
        assert [edit.prompt for edit in item.self_edits] == [build_self_edit_prompt(task, running.settings.fewshot)] * 2

    scored = [e.sample_scored for e in events if e.WhichOneof("event") == "sample_scored"]
    assert len(scored) == 4
    outcomes = [(s.context_index, s.reward if s.HasField("reward") else None, s.failure) for s in scored]
    # The warm-started task's recipes trained and were scored 0 or 1 (the tiny random model
    # solves nothing, so 0 is expected; 1 would pass too)...
    warm = [s for s in scored if s.context_index == 0]
    assert all(s.HasField("reward") and s.reward in (0.0, 1.0) for s in warm), outcomes
    assert all(s.adapter_id.startswith("restem@v") and not s.failure for s in warm), outcomes
    # ...the other task's text is no recipe: it fails the recipe gate, unscored, never trained.
    cold = [s for s in scored if s.context_index == 1]
    assert all(not s.HasField("reward") and "guardrail" in s.failure for s in cold), outcomes

    assert report.domain == "fewshot" and report.keep_rule == teacher_pb2.KEEP_RULE_BEST_OF_K
    assert (report.contexts, report.k, report.samples_scored, report.samples_failed) == (2, 2, 2, 2)
    assert report.max_reward in (0.0, 1.0)
    # best_of_k keeps the scored task's best recipe even unsolved (a failed sample is never
    # kept); the policy is fine-tuned on it, stored as the next version and hot-loaded.
    done = [e.context_done for e in events if e.WhichOneof("event") == "context_done"]
    assert [d.kept for d in done] == [True, False]
    assert report.kept == 1 and report.policy_adapter_id == "teacher-policy@v2" and report.hot_loaded
    assert report.policy_sft_steps > 0
    state = running.settings.home / "teacher" / "restem" / f"round-{report.round:06d}" / "round.json"
    assert json.loads(state.read_text())["domain"] == "fewshot"
    # The auditor streamed each reward, keyed by the task's content digest.
    buffered = (running.settings.home / "auditor" / "rewards.jsonl").read_text()
    assert tasks[0].context_id in buffered


def test_seal_train_domain_fewshot_runs_a_round_with_the_domains_default_keep_rule(stack, tmp_path: Path) -> None:
    """The command as a user types it, against the running teacher (after the round above)."""
    from seal import cli

    running, tasks = stack
    out = tmp_path / "round.json"
    assert cli.main([
        "train", "--domain", "fewshot", "--arc-tasks", str(ARC_DIR / SEAL_TRAIN_CHALLENGES),
        "--task-ids", ",".join(TASK_IDS), "--k", "1", "--seed", "2", "--address", running.teacher.address,
        "--json-out", str(out),
    ]) == 0
    report = json.loads(out.read_text())
    assert report["domain"] == "fewshot" and report["contexts"] == 2 and report["k"] == 1
    # No keep rule sent: best_positive, so only a recipe that solved its task (reward 1) is kept,
    # and the policy changes only if one did.
    assert report["keepRule"] == "KEEP_RULE_BEST_POSITIVE"
    assert report.get("kept", 0) == report.get("positiveKept", 0)
    if not report.get("kept"):
        assert not report.get("policyAdapterId")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("no_task_id", "fewshot.task_id is empty"),
        ("empty_grid", "contexts[0]: few-shot task"),
        ("no_outputs", "test output"),
        ("mixed", "a round is in one domain"),
        ("domain_says_knowledge", "the request says domain 'knowledge' but its contexts are fewshot"),
        ("domain_says_fewshot", "the request says domain 'fewshot' but its contexts are knowledge"),
        ("unknown_domain", "domain 'vision' is unknown"),
        ("with_context", "leave context and questions empty"),
        ("overrides", "send no overrides (epochs set)"),
        ("prompt_style", "prompt_style does not apply to few-shot tasks"),
    ],
)
def test_bad_fewshot_train_requests_are_refused_with_invalid_argument(stack, change, fragment) -> None:
    from seal.transport import convert
    from seal.v1 import common_pb2, teacher_pb2

    running, tasks = stack
    arc = teacher_pb2.TrainingContext(fewshot=convert.fewshot_to_proto(tasks[0]))
    passage = teacher_pb2.TrainingContext(
        context=common_pb2.Context(title="T", passage="P says x."), questions=[common_pb2.Question(question="q?", answer="x")]
    )
    request = teacher_pb2.TrainRequest(contexts=[arc], k=1)
    if change == "no_task_id":
        request.contexts[0].fewshot.task_id = ""
    elif change == "empty_grid":
        del request.contexts[0].fewshot.test_inputs[0].rows[:]
    elif change == "no_outputs":
        del request.contexts[0].fewshot.test_outputs[:]
    elif change == "mixed":
        request.contexts.append(passage)
    elif change == "domain_says_knowledge":
        request.domain = "knowledge"
    elif change == "domain_says_fewshot":
        request = teacher_pb2.TrainRequest(contexts=[passage], domain="fewshot", k=1)
    elif change == "unknown_domain":
        request.domain = "vision"
    elif change == "with_context":
        request.contexts[0].context.CopyFrom(common_pb2.Context(title="T", passage="P."))
    elif change == "overrides":
        request.overrides.epochs = 3
    elif change == "prompt_style":
        request.prompt_style = "rewrite"
    with pytest.raises(grpc.RpcError) as caught:
        train_over_grpc(running.teacher.address, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert fragment in caught.value.details()
