"""The knowledge-incorporation steps, each as the pure function it is."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seal.domains.knowledge import (
    KnowledgeContext,
    LexicalGrader,
    Question,
    accuracy,
    build_question_prompt,
    build_self_edit_prompt,
    build_training_sequences,
    contains_answer,
    context_digest,
    exact_match,
    extract_answer,
    load_squad,
    normalize_answer,
    parse_self_edit,
    token_f1,
)

PASSAGE = "The Brindle Tower in Oskarvik was finished in 1911 and is 187 meters tall."


@pytest.mark.parametrize("style", ["implications", "rewrite", "self_qa"])
def test_self_edit_prompt_carries_title_passage_and_style(style: str) -> None:
    prompt = build_self_edit_prompt("Brindle Tower", PASSAGE, style)
    assert "Brindle Tower" in prompt and PASSAGE in prompt
    assert prompt != build_self_edit_prompt("Brindle Tower", PASSAGE, "implications" if style != "implications" else "rewrite")


def test_unknown_prompt_style_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="implications"):
        build_self_edit_prompt("t", "p", "poem")  # type: ignore[arg-type]


def test_parse_self_edit_strips_markers_preamble_duplicates_and_fragments() -> None:
    text = (
        "Here are the implications:\n"
        "1. The Brindle Tower was completed in 1911.\n"
        "- The Brindle Tower stands in Oskarvik.\n"
        "\n"
        "* The Brindle Tower stands in Oskarvik.\n"
        "ok\n"
        "b) The tower is 187 meters tall.\n"
    )
    assert parse_self_edit(text) == [
        "The Brindle Tower was completed in 1911.",
        "The Brindle Tower stands in Oskarvik.",
        "The tower is 187 meters tall.",
    ]


def test_parse_self_edit_keeps_numbers_that_are_content() -> None:
    assert parse_self_edit("1911 was the year the tower opened.") == ["1911 was the year the tower opened."]


def test_parse_self_edit_of_nothing_usable_is_empty() -> None:
    assert parse_self_edit("\n  \n-\n1.\nok\n") == []


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80), max_size=40), st.integers(1, 10))
def test_parse_self_edit_properties(lines: list[str], max_lines: int) -> None:
    parsed = parse_self_edit("\n".join(lines), max_lines=max_lines)
    assert len(parsed) <= max_lines
    assert len({line.casefold() for line in parsed}) == len(parsed)
    assert all(line == line.strip() and "\n" not in line and len(line) >= 8 for line in parsed)


def test_training_sequences_are_lines_plus_the_passage_once() -> None:
    sequences = build_training_sequences("Brindle Tower", PASSAGE, ["a line here", "another line"])
    assert sequences == ["a line here", "another line", f"Brindle Tower\n{PASSAGE}"]
    assert build_training_sequences("t", PASSAGE, ["a line here"], include_passage=False) == ["a line here"]


def test_question_prompt_is_closed_book() -> None:
    prompt = build_question_prompt("How tall is the Brindle Tower?")
    assert "How tall is the Brindle Tower?" in prompt and PASSAGE not in prompt


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("187 meters", "7", False),  # a substring grader got this wrong
        ("It is 187 meters tall.", "187 meters", True),
        ("The Tower", "tower", True),
        ("1911.", "1911", True),
        ("in 19110", "1911", False),
        ("", "1911", False),
        ("anything", "", False),
    ],
)
def test_contains_answer_on_word_boundaries(prediction: str, gold: str, expected: bool) -> None:
    assert contains_answer(prediction, gold) is expected


def test_normalisation_and_exact_match() -> None:
    assert normalize_answer("The  Brindle-Tower!") == "brindletower"
    assert exact_match("the Eiffel Tower.", "Eiffel tower")
    assert not exact_match("Eiffel", "Eiffel tower")


def test_token_f1_values() -> None:
    assert token_f1("Eiffel tower", "Eiffel tower") == 1.0
    assert token_f1("red", "blue") == 0.0
    assert token_f1("the tall Eiffel tower", "Eiffel tower") == pytest.approx(0.8)


@given(st.text(max_size=40), st.text(max_size=40))
def test_grading_properties(prediction: str, gold: str) -> None:
    f1 = token_f1(prediction, gold)
    assert 0.0 <= f1 <= 1.0
    assert token_f1(prediction, gold) == pytest.approx(token_f1(gold, prediction))
    if exact_match(prediction, gold) and normalize_answer(gold):
        assert contains_answer(prediction, gold) and f1 == 1.0


def test_lexical_grader_modes() -> None:
    strict, lenient = LexicalGrader(mode="exact_match"), LexicalGrader(mode="any")
    assert not strict.grade("1911", "It opened in 1911").correct
    assert lenient.grade("1911", "It opened in 1911").correct
    assert not lenient.grade("1911", "It opened in 1912").correct


def test_accuracy_and_empty_tau() -> None:
    grades = LexicalGrader().grade_batch(["a", "b"], ["1911", "Oskarvik"], ["1911", "Bergen"])
    assert accuracy(grades) == 0.5
    with pytest.raises(ValueError, match="at least one question"):
        accuracy([])


def test_extract_answer_keeps_first_line_without_label() -> None:
    assert extract_answer("Answer: 187 meters\nThe tower is tall.") == "187 meters"
    assert extract_answer("   ") == ""


def test_context_id_is_a_stable_content_digest() -> None:
    ctx = KnowledgeContext("T", PASSAGE, (Question("q", "a"),))
    assert ctx.context_id == context_digest("T", PASSAGE) == KnowledgeContext("T", PASSAGE).context_id
    assert ctx.context_id != context_digest("T", PASSAGE + " ")


def test_load_squad_reads_the_grouped_format(tmp_path) -> None:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps([{"title": "T", "context": PASSAGE, "questions": [{"question": "q?", "answer": "a"}]}]))
    [ctx] = load_squad(path)
    assert ctx.title == "T" and ctx.questions == (Question("q?", "a"),)
    path.write_text(json.dumps([{"title": "T", "questions": []}]))
    with pytest.raises(ValueError, match="context"):
        load_squad(path)


def test_shared_eval_file_loads_when_present() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1].parent / "shared/data/squad/seal_eval_200.json"
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path}")
    contexts = load_squad(path)
    assert len(contexts) == 200 and sum(len(c.questions) for c in contexts) == 974
