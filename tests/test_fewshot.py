"""The few-shot (ARC) domain: grid transforms and their inverses, the grid ↔ text format, the
self-edit as a validated recipe, leave-out task construction, the cost guard, chat examples with
the loss on the reply, voting over views, and one end-to-end update on the tiny model."""

from __future__ import annotations

import doctest
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seal.adapt import is_refusal
from seal.domains import arc_grids, fewshot
from seal.domains.arc_grids import Grid, GridTransform
from seal.domains.fewshot import (
    ArcPair,
    ArcTask,
    FewShotSelfEdit,
    FewShotSettings,
    InvalidSelfEdit,
    NoTrainingExamples,
    OverBudget,
    Prediction,
    SuccessTable,
    build_self_edit_prompt,
    build_training_examples,
    check_budget,
    grade,
    grid_to_text,
    leave_out_tasks,
    parse_self_edit,
    predict,
    prepare_update,
    text_to_grid,
    update_cost,
    vote,
)

REPO = Path(__file__).resolve().parent.parent
ARC_DIR = REPO.parent / "shared" / "data" / "arc"

# --- strategies and helpers -------------------------------------------------------------------

colours = st.integers(min_value=0, max_value=9)


@st.composite
def grids(draw: st.DrawFn, max_side: int = 8) -> Grid:
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    return tuple(tuple(draw(colours) for _ in range(width)) for _ in range(height))


ASYMMETRIC: Grid = ((1, 2, 3), (4, 5, 6))  # no rotation or reflection maps it onto itself


def every_transform() -> list[GridTransform]:
    """Every named transform, plus every member of every augmentation group (chains included)."""
    rng = random.Random(0)
    members = [t for group in arc_grids.AUGMENTATION_GROUPS for t in arc_grids.augmentation_group(group, rng)]
    return list(arc_grids.BY_NAME.values()) + members


def recipe(**changes) -> FewShotSelfEdit:
    fields = {"basic": True, "size": False, "chain": False, "repeat": False, "strategy": "output_tokens",
              "learning_rate": 1e-3, "epochs": 2}
    return FewShotSelfEdit(**{**fields, **changes})


def recolour_task(n_demos: int = 3, side: int = 3, seed: int = 0) -> ArcTask:
    """A task whose rule is "colour 1 becomes 2": it commutes with every rotation and reflection,
    so a correct solver gives the same answer from every view once mapped back."""
    rng = random.Random(seed)

    def random_grid() -> Grid:
        return tuple(tuple(rng.choice((0, 1, 3)) for _ in range(side)) for _ in range(side))

    def rule(grid: Grid) -> Grid:
        return tuple(tuple(2 if c == 1 else c for c in row) for row in grid)

    inputs = [random_grid() for _ in range(n_demos + 1)]
    return ArcTask(
        "recolour", tuple(ArcPair(g, rule(g)) for g in inputs[:-1]), (inputs[-1],), (rule(inputs[-1]),)
    )


def last_input_of(prompt: str) -> Grid:
    test_part = prompt.rsplit("Test\nInput:\n", 1)[1]
    grid = text_to_grid(test_part)
    assert grid is not None
    return grid


# --- invertible grid transforms ---------------------------------------------------------------


@pytest.mark.parametrize("transform", every_transform(), ids=lambda t: t.name)
@given(grid=grids())
@settings(max_examples=60, deadline=None)
def test_every_inverse_undoes_its_transform(transform: GridTransform, grid: Grid) -> None:
    assert transform.inverse(transform.forward(grid)) == grid


@given(grid=grids(), permutation=st.permutations(range(1, 10)))
@settings(max_examples=100, deadline=None)
def test_any_colour_permutation_is_undone_and_keeps_the_background(grid: Grid, permutation: list[int]) -> None:
    transform = arc_grids.recolouring([0, *permutation])
    recoloured = transform.forward(grid)
    assert transform.inverse(recoloured) == grid
    assert all((a == 0) == (b == 0) for ra, rb in zip(grid, recoloured) for a, b in zip(ra, rb))


@given(grid=grids(), first=st.sampled_from(every_transform()), second=st.sampled_from(every_transform()))
@settings(max_examples=100, deadline=None)
def test_chained_transforms_are_undone_in_reverse_order(grid: Grid, first: GridTransform, second: GridTransform) -> None:
    assert first.then(second).inverse(first.then(second).forward(grid)) == grid


def test_the_transforms_do_what_their_names_say() -> None:
    # The inverse property alone would hold for forward = inverse = identity.
    assert arc_grids.rotate90(ASYMMETRIC) == ((4, 1), (5, 2), (6, 3))
    assert arc_grids.rotate270(ASYMMETRIC) == ((3, 6), (2, 5), (1, 4))
    assert arc_grids.flip_horizontal(ASYMMETRIC) == ((3, 2, 1), (6, 5, 4))
    assert arc_grids.flip_vertical(ASYMMETRIC) == ((4, 5, 6), (1, 2, 3))
    assert arc_grids.transpose(ASYMMETRIC) == ((1, 4), (2, 5), (3, 6))
    assert arc_grids.anti_transpose(ASYMMETRIC) == ((6, 3), (5, 2), (4, 1))
    assert arc_grids.stretch(((1, 2),), 2, 1) == ((1, 2), (1, 2))
    assert arc_grids.stretch(((1, 2),), 1, 2) == ((1, 1, 2, 2),)
    assert arc_grids.tile(((1, 2),), 2, 2) == ((1, 2, 1, 2), (1, 2, 1, 2))
    assert arc_grids.translate(((5,),), 1, 1) == ((0, 0), (0, 5))
    images = {t.forward(ASYMMETRIC) for t in (arc_grids.IDENTITY, *arc_grids.DIHEDRAL)}
    assert len(images) == 8, "the 8 symmetries of the square must give 8 different grids"


@given(grid=grids())
@settings(max_examples=50, deadline=None)
def test_four_quarter_turns_are_the_identity(grid: Grid) -> None:
    turned = grid
    for _ in range(4):
        turned = arc_grids.rotate90(turned)
    assert turned == grid


@pytest.mark.parametrize(
    ("transform", "not_an_image"),
    [
        (arc_grids.UPSCALE2, ((1, 2), (1, 1))),
        (arc_grids.UPSCALE2, ((1, 1, 1),)),  # odd size
        (arc_grids.DOUBLE_HEIGHT, ((1,), (2,))),
        (arc_grids.tiling(1, 2), ((1, 2, 3, 4),)),
        (arc_grids.SHIFT_ONE, ((0, 0), (3, 5))),  # the added column is not background
        (arc_grids.SHIFT_ONE, ((0,),)),  # nothing left after removing the band
    ],
)
def test_an_inverse_refuses_what_its_transform_cannot_produce(transform: GridTransform, not_an_image: Grid) -> None:
    assert transform.inverse(not_an_image) is None


def test_a_size_augmentation_that_would_exceed_the_largest_grid_is_skipped() -> None:
    big = tuple(tuple([1] * 20) for _ in range(20))
    assert arc_grids.apply_to_all(arc_grids.UPSCALE2, [((1,),), big]) is None
    assert arc_grids.apply_to_all(arc_grids.ROTATE90, [((1,),), big]) is not None


def test_as_grid_rejects_what_is_not_a_grid() -> None:
    assert arc_grids.as_grid([[0, 1], [2, 3]]) == ((0, 1), (2, 3))
    for bad, reason in [([], "non-empty"), ([[1, 2], [3]], "rectangular"), ([[10]], "0-9"), ([[True]], "0-9")]:
        with pytest.raises(ValueError, match=reason):
            arc_grids.as_grid(bad)


# --- grids as text ----------------------------------------------------------------------------


@given(grid=grids(max_side=30))
@settings(max_examples=60, deadline=None)
def test_text_format_round_trips(grid: Grid) -> None:
    assert text_to_grid(grid_to_text(grid)) == grid


def test_text_to_grid_reads_answers_the_way_models_write_them() -> None:
    assert text_to_grid("```\n01\n23\n```") == ((0, 1), (2, 3))
    assert text_to_grid("Output:\n0 1\n2 3\nDone") == ((0, 1), (2, 3))
    assert text_to_grid("12\n34\n\n56") == ((1, 2), (3, 4)), "only the first block is the answer"
    assert text_to_grid("The rule is 0000.") is None
    assert text_to_grid("01\n234") is None
    assert text_to_grid("") is None


def test_the_module_docstring_examples_run() -> None:
    result = doctest.testmod(fewshot)
    assert result.attempted >= 4 and result.failed == 0


# --- loading tasks ----------------------------------------------------------------------------


def test_load_arc_tasks_reads_challenges_and_sibling_solutions(tmp_path: Path) -> None:
    challenges = {
        "aaa": {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]},
        "bbb": {"train": [{"input": [[0, 1]], "output": [[1, 0]]}], "test": [{"input": [[1, 1]]}]},
    }
    (tmp_path / "x_challenges.json").write_text(json.dumps(challenges))
    (tmp_path / "x_solutions.json").write_text(json.dumps({"aaa": [[[4]]], "bbb": [[[1, 1]]]}))
    tasks = fewshot.load_arc_tasks(tmp_path / "x_challenges.json", exclude=("bbb",))
    assert [t.task_id for t in tasks] == ["aaa"]
    assert tasks[0].demonstrations == (ArcPair(((1,),), ((2,),)),)
    assert tasks[0].test_outputs == (((4,),),)

    challenges["aaa"]["train"][0]["output"] = [[1, 2], [3]]
    (tmp_path / "x_challenges.json").write_text(json.dumps(challenges))
    with pytest.raises(ValueError, match="task aaa is malformed"):
        fewshot.load_arc_tasks(tmp_path / "x_challenges.json")


def test_a_task_round_trips_through_its_json_form() -> None:
    task = recolour_task()
    data = json.loads(json.dumps(fewshot.task_to_dict(task)))
    assert fewshot.task_from_dict(data) == task
    data["train"][0]["input"] = [[1, 2], [3]]
    with pytest.raises(ValueError, match="rectangular"):
        fewshot.task_from_dict(data)


def test_context_id_follows_the_content() -> None:
    task = recolour_task()
    assert task.context_id == recolour_task().context_id
    assert task.context_id != recolour_task(seed=1).context_id


@pytest.mark.skipif(not ARC_DIR.is_dir(), reason=f"SEAL's ARC files are not at {ARC_DIR}")
def test_seal_task_files_load_with_their_solutions() -> None:
    evaluation = fewshot.load_arc_tasks(ARC_DIR / fewshot.SEAL_EVAL_CHALLENGES)
    training = fewshot.load_arc_tasks(ARC_DIR / fewshot.SEAL_TRAIN_CHALLENGES)
    assert len(evaluation) == 10 and len(training) == 12
    assert all(t.has_solutions for t in evaluation + training)
    reported = fewshot.load_arc_tasks(ARC_DIR / fewshot.SEAL_EVAL_CHALLENGES, exclude=fewshot.PAPER_DROPPED_EVAL_TASKS)
    assert len(reported) == 8


# --- the self-edit ----------------------------------------------------------------------------


def test_a_recipe_round_trips_and_is_found_inside_prose_and_fences() -> None:
    edit = recipe(size=True, strategy="all_tokens", learning_rate=5e-4, epochs=3)
    assert parse_self_edit(edit.to_json()) == edit
    wrapped = f"Sure! Here is my choice:\n```json\n{edit.to_json()}\n```\nGood luck {{not json}}"
    assert parse_self_edit(wrapped) == edit
    assert edit.groups == ("basic", "size")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I would rotate the grids.", "holds no JSON object"),
        ('{"basic": true, "size": }', "malformed"),
        ('{"basic": true}', "missing key(s) size, chain, repeat, strategy, learning_rate, epochs"),
        (recipe().to_json()[:-1] + ', "colour": true}', "unknown key(s) colour"),
        (recipe().to_json().replace('"basic": true', '"basic": "yes"'), "basic must be true or false"),
        (recipe().to_json().replace("output_tokens", "some_tokens"), "strategy must be one of"),
        (recipe(learning_rate=0.5).to_json(), "learning_rate must be a number in [1e-06, 0.01]"),
        (recipe().to_json().replace("0.001", '"fast"'), "learning_rate must be a number"),
        (recipe().to_json().replace('"epochs": 2', '"epochs": 2.5'), "epochs must be a whole number"),
        (recipe().to_json().replace('"epochs": 2', '"epochs": 0'), "epochs must be a whole number in [1, 10]"),
        (recipe().to_json().replace('"epochs": 2', '"epochs": true'), "epochs must be a whole number"),
    ],
)
def test_a_malformed_self_edit_is_rejected_with_its_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidSelfEdit) as caught:
        parse_self_edit(text)
    assert reason in str(caught.value)
    assert is_refusal(caught.value), "the pipeline must fail this candidate alone, not the whole step"


def test_every_problem_of_a_self_edit_is_reported_at_once() -> None:
    text = json.dumps({"basic": 1, "size": False, "chain": False, "repeat": False, "strategy": "x",
                       "learning_rate": 1e-3, "epochs": 99})
    with pytest.raises(InvalidSelfEdit) as caught:
        parse_self_edit(text)
    message = str(caught.value)
    assert "basic must be" in message and "strategy must be" in message and "epochs must be" in message


def test_the_self_edit_prompt_shows_the_puzzle_but_never_the_answer() -> None:
    task = ArcTask("t", (ArcPair(((1, 1),), ((2, 2),)), ArcPair(((3, 3),), ((4, 4),))), (((5, 5),),), (((9, 8),),))
    prompt = build_self_edit_prompt(task)
    assert "11\nOutput:\n22" in prompt and "33\nOutput:\n44" in prompt and "55" in prompt
    assert "98" not in prompt
    assert all(f'"{key}"' in prompt for key in fewshot.SELF_EDIT_KEYS)
    example = prompt.split("For example: ", 1)[1].splitlines()[0]
    parse_self_edit(example)  # the example the prompt shows is itself a valid recipe


# --- leave-out tasks, augmentation, dedup, cap --------------------------------------------------


def test_leave_one_out_and_leave_two_out_tasks() -> None:
    demos = tuple(ArcPair(((i,),), ((i,),)) for i in range(4))
    tasks = leave_out_tasks(demos, leave_two_out=True)
    assert len(tasks) == 4 + 4 * 3
    for held_out, context, query in tasks:
        assert query == demos[held_out[0]] and query not in context
        assert len(context) == 4 - len(held_out)
        assert set(context) == {d for i, d in enumerate(demos) if i not in held_out}
    assert len(leave_out_tasks(demos, leave_two_out=False)) == 4
    assert len(leave_out_tasks(demos[:2], leave_two_out=True)) == 2, "leave-two-out would leave one demo, none in context"
    assert leave_out_tasks(demos[:1], leave_two_out=True) == []


def test_each_augmented_example_is_its_held_out_pair_under_its_transform() -> None:
    task = recolour_task(n_demos=3)
    edit = recipe(basic=True, chain=True)
    settings_ = FewShotSettings(max_examples=1000)
    examples, stats = build_training_examples(task, edit, settings_, seed=3)
    by_name = {t.name: t for t in fewshot.recipe_transforms(edit, seed=3)}
    assert {e.transform for e in examples} == set(by_name)
    for example in examples:
        transform = by_name[example.transform]
        query = task.demonstrations[example.held_out[0]]
        assert transform.inverse(text_to_grid(example.reply)) == query.output
        assert transform.inverse(last_input_of(example.prompt)) == query.input
    assert stats.kept == len(examples) == stats.generated - stats.duplicates


def test_duplicates_are_removed() -> None:
    # Uniform grids look the same under every rotation and reflection: 8 views, one example each.
    demos = tuple(ArcPair(((c, c), (c, c)), ((c,),)) for c in (1, 2, 3))
    task = ArcTask("uniform", demos, (((4, 4), (4, 4)),))
    examples, stats = build_training_examples(task, recipe(), FewShotSettings(max_examples=1000), seed=0)
    pairs = [(e.prompt, e.reply) for e in examples]
    assert len(pairs) == len(set(pairs)) == 9  # leave-out tasks: 3 + 6, each once
    assert stats.duplicates == stats.generated - 9 > 0


def test_the_cap_keeps_the_tasks_own_examples_first_and_is_seeded() -> None:
    task = recolour_task(n_demos=4)
    capped = FewShotSettings(max_examples=20)
    first, stats = build_training_examples(task, recipe(), capped, seed=1)
    again, _ = build_training_examples(task, recipe(), capped, seed=1)
    other, _ = build_training_examples(task, recipe(), capped, seed=2)
    assert len(first) == stats.kept == 20 and stats.capped == stats.generated - stats.duplicates - 20 > 0
    # The task's own leave-one-out examples, untransformed, lead; the rest is a seeded mix.
    assert [(e.transform, e.held_out) for e in first[:4]] == [("identity", (j,)) for j in range(4)]
    assert not any(fewshot.is_own_example(e) for e in first[4:])
    assert {e.transform for e in first[4:]} - {"identity"}, "augmented examples must be sampled too"
    assert first == again and first != other
    small, _ = build_training_examples(task, recipe(), FewShotSettings(max_examples=3), seed=1)
    assert [(e.transform, e.held_out) for e in small] == [("identity", (j,)) for j in range(3)]


def test_examples_over_the_token_limit_are_dropped_not_cut() -> None:
    task = recolour_task(n_demos=3)
    settings_ = FewShotSettings(max_examples=1000, max_seq_len=60)

    def fifty_per_demonstration(example) -> int:
        return 50 * example.prompt.count("Example ")

    examples, stats = build_training_examples(task, recipe(), settings_, seed=0, count_tokens=fifty_per_demonstration)
    assert examples and all(len(e.held_out) == 2 for e in examples), "only leave-two-out examples are short enough"
    assert stats.too_long > 0 and stats.kept + stats.too_long == stats.generated - stats.duplicates


# --- the cost guard ---------------------------------------------------------------------------


def test_update_cost_counts_steps_and_tokens() -> None:
    cost = update_cost([10, 20, 30], epochs=2, batch_size=2)
    assert (cost.examples, cost.steps, cost.tokens) == (3, 4, 120)


def test_the_budget_refuses_over_budget_recipes_and_allows_the_limit() -> None:
    at_limit = FewShotSettings(max_steps=4, max_training_tokens=120)
    check_budget(update_cost([10, 20, 30], epochs=2, batch_size=2), at_limit)
    with pytest.raises(OverBudget) as caught:
        check_budget(update_cost([10, 20, 30], epochs=3, batch_size=2), at_limit)
    assert "6 optimizer steps > max_steps=4" in str(caught.value)
    assert "180 training tokens > max_training_tokens=120" in str(caught.value)
    assert is_refusal(caught.value)


# --- chat examples: the loss on the reply, located by the chat template ------------------------


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir))


def test_chat_example_takes_the_loss_on_the_reply_only(tokenizer) -> None:
    from seal.update.lora_sft import chat_example

    prompt, reply = "Example 1\nInput:\n01\nOutput:\n10\n\nTest\nInput:\n23\nOutput:", "32"
    input_ids, labels = chat_example(tokenizer, prompt, reply, loss_on="output_tokens")
    generation_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    # What the engines feed the model at generation time is exactly the masked part.
    prompt_ids = tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    trained = [token for token in labels if token != -100]
    assert tokenizer.decode(trained).startswith(reply + tokenizer.eos_token)

    all_ids, all_labels = chat_example(tokenizer, prompt, reply, loss_on="all_tokens")
    assert all_ids == input_ids and all_labels == input_ids
    with pytest.raises(ValueError, match="loss_on"):
        chat_example(tokenizer, prompt, reply, loss_on="prompt_tokens")


def test_chat_example_needs_a_chat_template(tokenizer) -> None:
    import copy

    from seal.update.lora_sft import chat_example

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_example(plain, "a", "b")


def test_prepare_update_masks_by_strategy_and_refuses_before_training(tokenizer) -> None:
    task = recolour_task(n_demos=3)
    settings_ = FewShotSettings(max_examples=6, batch_size=2)
    prepared = prepare_update(task, recipe(epochs=2), tokenizer, settings_, seed=0)
    assert prepared.cost.examples == 6 and prepared.cost.steps == 6
    for (ids, labels), example in zip(prepared.sequences, prepared.examples):
        reply_tokens = len(tokenizer(example.reply + tokenizer.eos_token + "\n", add_special_tokens=False)["input_ids"])
        assert sum(label != -100 for label in labels) == reply_tokens
    assert prepared.lora_overrides() == {"learning_rate": 1e-3, "epochs": 2, "batch_size": 2, "max_seq_len": 1024}

    everything = prepare_update(task, recipe(strategy="all_tokens"), tokenizer, settings_, seed=0)
    assert all(labels == ids for ids, labels in everything.sequences)

    with pytest.raises(OverBudget, match="max_steps=5"):
        prepare_update(task, recipe(epochs=2), tokenizer, settings_.model_copy(update={"max_steps": 5}), seed=0)
    with pytest.raises(NoTrainingExamples, match="longer than max_seq_len=32"):
        prepare_update(task, recipe(), tokenizer, settings_.model_copy(update={"max_seq_len": 32}), seed=0)
    one_demo = ArcTask("one", task.demonstrations[:1], task.test_inputs, task.test_outputs)
    with pytest.raises(NoTrainingExamples, match="leave-one-out needs 2"):
        prepare_update(one_demo, recipe(), tokenizer, settings_, seed=0)


# --- voting and pass@2 ------------------------------------------------------------------------

A: Grid = ((1, 2), (3, 4))
B: Grid = ((5, 6), (7, 8))
C: Grid = ((9,),)


def test_vote_ranks_by_count_then_by_first_answer() -> None:
    assert vote([A, B, B, None, C], attempts=2) == ((B, 2), (A, 1))
    assert vote([C, A, A, C], attempts=2) == ((C, 2), (A, 2))
    assert vote([None, None]) == ()
    assert vote([A, B, C], attempts=1) == ((A, 1),)


def solving_view(prompt: str) -> str:
    """A correct solver of :func:`recolour_task`, working in whatever frame the prompt is in."""
    grid = last_input_of(prompt)
    return grid_to_text(tuple(tuple(2 if c == 1 else c for c in row) for row in grid))


VIEWS = FewShotSettings(vote_views=("identity", "transpose", "rotate90", "flip_horizontal"))


def test_answers_from_every_view_are_mapped_back_before_voting() -> None:
    task = recolour_task(side=3, seed=5)
    asked: list[str] = []

    def generate(prompts, max_new_tokens):
        asked.extend(prompts)
        return [solving_view(p) for p in prompts]

    [prediction] = predict(task, generate, VIEWS)
    raw = {answer.text for answer in prediction.answers}
    assert len(raw) > 1, "the views must show the model differently oriented grids"
    assert prediction.attempts == (task.test_outputs[0],) and prediction.votes == (4,)
    assert grade(task, [prediction]).solved and grade(task, [prediction]).reward == 1.0
    assert len(asked) == 4


def test_pass_at_two_counts_the_runner_up() -> None:
    task = recolour_task(side=3, seed=5)
    wrong = grid_to_text(((7, 7, 7),) * 3)

    def generate(prompts, max_new_tokens):
        # Right from the identity view only; the same wrong grid (a fixed point of every view) from the rest.
        return [solving_view(p) if i == 0 else wrong for i, p in enumerate(prompts)]

    [prediction] = predict(task, generate, VIEWS)
    assert prediction.attempts == (((7, 7, 7),) * 3, task.test_outputs[0]) and prediction.votes == (3, 1)
    assert grade(task, [prediction]).solved
    [single] = predict(task, generate, VIEWS.model_copy(update={"attempts": 1}))
    assert not grade(task, [single]).solved


def test_unreadable_answers_cast_no_vote() -> None:
    task = recolour_task(side=3, seed=5)
    [prediction] = predict(task, lambda prompts, n: ["I think it is blue."] * len(prompts), VIEWS)
    assert prediction.attempts == () and all(answer.grid is None for answer in prediction.answers)
    assert not grade(task, [prediction]).solved


def test_a_task_is_solved_only_when_every_test_input_is() -> None:
    task = ArcTask("two", (), (A, B), (A, B))
    right, wrong = Prediction((A,), (1,), ()), Prediction((C,), (1,), ())
    assert grade(task, [right, Prediction((C, B), (2, 1), ())]).solved
    half = grade(task, [right, wrong])
    assert not half.solved and half.tests_solved == 1 and half.reward == 0.0


def test_success_table_reports_tasks_and_task_self_edit_pairs() -> None:
    table = SuccessTable()
    for task_id, solved in [("a", True), ("a", False), ("b", False), ("b", False)]:
        table.add(task_id, solved)
    assert table.summary() == {"tasks": 2, "tasks_solved": 1, "pairs": 4, "pairs_solved": 1, "success_rate": 0.25}


# --- end to end on the tiny model -------------------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
def test_an_update_on_its_own_examples_teaches_the_tiny_model_a_constant_answer(tiny) -> None:
    """The whole path: recipe → leave-out examples → output-token loss → LoRA → views → vote.
    The rule (every output is the same grid) is one a 2-layer random model can learn."""
    from seal.config import LoraSettings
    from seal.models import SamplingParams, TransformersEngine

    model, tokenizer = tiny
    answer: Grid = ((1, 2), (3, 4))
    inputs = [((0, 5), (5, 0)), ((6, 0), (0, 6)), ((7, 7), (0, 0)), ((0, 0), (8, 8))]
    task = ArcTask("constant", tuple(ArcPair(g, answer) for g in inputs[:3]), (inputs[3],), (answer,))
    settings_ = FewShotSettings(vote_views=("identity",), max_examples=9, batch_size=1, max_seq_len=512, max_steps=90)

    def generate_with(m):
        engine = TransformersEngine(m, tokenizer)
        return lambda prompts, n: [g.text for g in engine.generate(list(prompts), SamplingParams(max_new_tokens=n))]

    assert not grade(task, predict(task, generate_with(model), settings_)).solved
    prepared = prepare_update(task, recipe(basic=False, learning_rate=1e-2, epochs=10), tokenizer, settings_, seed=0)
    lora = LoraSettings(rehearsal_ratio=0, kl_beta=0, rank=8, alpha=16, target_modules="all-linear")
    result = fewshot.train_update(model, tokenizer, prepared, lora, seed=0)
    assert result.steps == prepared.cost.steps == 10 * 9
    assert result.losses[-1] < 0.2 * result.losses[0]
    assert grade(task, predict(task, generate_with(result.model), settings_)).solved
