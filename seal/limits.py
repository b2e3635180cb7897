"""The bounds a request must keep before any work starts, checked by the service that does the
work (student and auditor as well as the teacher), transport-free.

Servicers turn a request into plain values, call these checks, then call the core; a ValueError
becomes INVALID_ARGUMENT with its message, which names the field, the limit and the setting that
raises it. Sizes and counts an operator may want to change are ``limits.*`` settings
(``seal.config.LimitSettings``); the bounds of update overrides are those declared on
``seal.config.LoraSettings``, read from there rather than written again.

Every check runs before anything is created: no lock, file or registry entry exists for a
request that fails here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from seal.config import LoraSettings, UpdateSettings
from seal.domains.arc_grids import MAX_SIDE
from seal.registry import parse_adapter_id, validate_adapter_name

if TYPE_CHECKING:
    from seal.config import LimitSettings
    from seal.domains.fewshot import ArcTask
    from seal.domains.knowledge import Question

# How much of a caller's value an error message repeats. The message travels back in the
# status's trailing metadata, which gRPC caps (8 KiB by default): echoing a 1 MB value turned a
# plain INVALID_ARGUMENT into RESOURCE_EXHAUSTED, and a person needs only the start to find it.
ECHO_CHARS = 80
# Ids chosen by callers (request ids, event ids, sources); an id is an id, not a setting.
MAX_ID_CHARS = 128
# A valid adapter name has at most 63 characters (seal.registry.ADAPTER_NAME_PATTERN), an id adds
# "@v" and the version: anything longer is refused before the registry parses (and echoes) it.
MAX_ADAPTER_ID_CHARS = 96
# Guardrail results a Score request carries: one per rule (seal.guardrails.RULES) or the
# few-shot recipe check, so a handful; the cap only stops a request from inflating the record.
MAX_GUARDRAIL_RESULTS = 32
MAX_GATE_NAME_CHARS = 128

# Update override (core name) → the LoraSettings field whose declared bounds it must keep.
_LORA_BOUNDED = ("learning_rate", "epochs", "rank", "alpha", "batch_size")
UPDATE_RULES: tuple[str, ...] = get_args(UpdateSettings.model_fields["rule"].annotation)


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with the full length
    said, so a message stays short whatever the caller sent."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit]}… ({size})"


# --- text and counts -------------------------------------------------------------------------


def check_text(field: str, value: str, max_chars: int, setting: str = "") -> str:
    """``value`` (a request's string field) is at most ``max_chars`` characters."""
    if len(value) > max_chars:
        raise ValueError(
            f"{field} has {len(value)} characters, above the limit of {max_chars}; "
            + (f"shorten it or raise limits.{setting}" if setting else "shorten it")
        )
    return value


def check_count(field: str, count: int, maximum: int, setting: str = "") -> int:
    if count > maximum:
        raise ValueError(
            f"{field} has {count} entries, above the limit of {maximum}; "
            + (f"send fewer or raise limits.{setting}" if setting else "send fewer")
        )
    return count


def check_texts(
    field: str, values: Sequence[str], *, max_count: int, max_chars: int, count_setting: str, chars_setting: str
) -> Sequence[str]:
    """A repeated string field: how many, and how long each is."""
    check_count(field, len(values), max_count, count_setting)
    for index, value in enumerate(values):
        check_text(f"{field}[{index}]", value, max_chars, chars_setting)
    return values


def check_id(field: str, value: str) -> str:
    """A caller-chosen id (request_id, event_id, source)."""
    return check_text(field, value, MAX_ID_CHARS)


def check_context(title: str, passage: str, limits: LimitSettings, *, require_passage: bool) -> None:
    """The context C of a student or auditor request: the same bounds Adapt keeps (the title's
    500 characters are the teacher's ``seal.teacher.validate_context``'s)."""
    if require_passage and not passage.strip():
        raise ValueError("context.passage is empty: send the passage the self-edit is about")
    check_text("context.passage", passage, limits.max_passage_chars, "max_passage_chars")
    check_text("context.title", title, 500)


def check_questions(questions: Sequence[Question], limits: LimitSettings) -> None:
    """τ as a Score request carries it: the bounds Adapt keeps, and a bound on gold answers."""
    if not questions:
        raise ValueError("no questions: scoring needs τ, at least one question with its gold answer")
    check_count("questions", len(questions), limits.max_questions, "max_questions")
    for index, question in enumerate(questions):
        check_text(f"questions[{index}].question", question.question, limits.max_question_chars, "max_question_chars")
        check_text(f"questions[{index}].answer", question.answer, limits.max_answer_chars, "max_answer_chars")
        if not question.question.strip() or not question.answer.strip():
            raise ValueError(f"questions[{index}] needs both a question and a gold answer")


def check_json_size(field: str, value: Any, max_bytes: int, setting: str) -> Any:
    """A free-form structure (RecordEvent details) is at most ``max_bytes`` once written as JSON,
    which is how the audit log keeps it, for good."""
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > max_bytes:
        raise ValueError(
            f"{field} is {size} bytes as JSON, above the limit of {max_bytes}; keep details short "
            f"(a few ids and numbers) or raise limits.{setting}"
        )
    return value


# --- names ---------------------------------------------------------------------------------------


def check_adapter_name(value: str, field: str = "adapter_name") -> str:
    """A lineage name, validated by the registry's own rule; the length first, so a huge value is
    never echoed back."""
    if len(value) > MAX_ADAPTER_ID_CHARS:
        raise ValueError(f"{field} {echo(value)} is not a valid adapter name: at most 63 characters")
    try:
        return validate_adapter_name(value)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from exc


def check_adapter_id(value: str, field: str = "adapter_id") -> str:
    """A version id ``<name>@v<version>``, validated by the registry's own parser."""
    if len(value) > MAX_ADAPTER_ID_CHARS:
        raise ValueError(f"{field} {echo(value)} is not a valid adapter id: expected '<adapter_name>@v<version>'")
    try:
        parse_adapter_id(value)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from exc
    return value


def check_adapter_ids(adapter_ids: Sequence[str], prompts: int, field: str = "adapter_ids") -> list[str]:
    """A per-prompt version list (GenerateMixed): one entry per prompt, each a version id or ""
    (the base model). Checked whole before any weights are loaded, so a typo in the last entry
    never costs the loading of the others."""
    if len(adapter_ids) != prompts:
        raise ValueError(
            f"{field} has {len(adapter_ids)} entries for {prompts} prompt(s): send one per prompt, "
            "in the prompts' order (\"\" = the base model)"
        )
    return [check_adapter_id(value, f"{field}[{index}]") if value else "" for index, value in enumerate(adapter_ids)]


# --- update overrides and sampling -------------------------------------------------------------


def check_update_overrides(
    overrides: Mapping[str, Any], *, field_names: Mapping[str, str] | None = None
) -> Mapping[str, Any]:
    """A request's update overrides keep the bounds ``LoraSettings`` declares for the same
    settings (``lora.rank`` ≤ 256, ``lora.epochs`` ≤ 100, …): outside them a run would fail in
    the allocator (rank 4294967295) or train for days (epochs 1000). ``field_names`` maps each
    core key to the request's field name for the message (``rank`` → ``lora_rank``)."""
    names = field_names or {}
    for key in _LORA_BOUNDED:
        if key not in overrides:
            continue
        value = overrides[key]
        try:
            LoraSettings.model_validate({key: value})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ValueError(
                f"overrides.{names.get(key, key)} = {echo(value)} is out of bounds: {reason[:1].lower()}{reason[1:]} "
                f"(the bounds of lora.{key})"
            ) from None
    rule = overrides.get("update_rule")
    if rule is not None and rule not in UPDATE_RULES:
        raise ValueError(f"overrides.update_rule {echo(rule)} is unknown; use one of {', '.join(UPDATE_RULES)}")
    return overrides


def check_max_new_tokens(max_new_tokens: int, limits: LimitSettings) -> int:
    """Generate's token budget per prompt (temperature and top_p are seal.models.SamplingParams'
    to check: it refuses what no engine can sample with)."""
    if max_new_tokens > limits.max_new_tokens:
        raise ValueError(
            f"max_new_tokens {max_new_tokens} is above the limit of {limits.max_new_tokens}; "
            "ask for fewer or raise limits.max_new_tokens"
        )
    return max_new_tokens


# --- the few-shot domain -------------------------------------------------------------------------


def check_fewshot_size(task: ArcTask, limits: LimitSettings) -> None:
    """A few-shot task's size: how many grids, and ARC's 30 × 30 bound on each."""
    check_text("fewshot.task_id", task.task_id, MAX_ID_CHARS)
    check_count("fewshot.train", len(task.demonstrations), limits.max_fewshot_pairs, "max_fewshot_pairs")
    check_count("fewshot.test_inputs", len(task.test_inputs), limits.max_fewshot_pairs, "max_fewshot_pairs")
    check_count("fewshot.test_outputs", len(task.test_outputs), limits.max_fewshot_pairs, "max_fewshot_pairs")
    grids: Iterable[tuple[str, Any]] = [
        *((f"fewshot.train[{i}].input", p.input) for i, p in enumerate(task.demonstrations)),
        *((f"fewshot.train[{i}].output", p.output) for i, p in enumerate(task.demonstrations)),
        *((f"fewshot.test_inputs[{i}]", g) for i, g in enumerate(task.test_inputs)),
        *((f"fewshot.test_outputs[{i}]", g) for i, g in enumerate(task.test_outputs)),
    ]
    for name, grid in grids:
        if len(grid) > MAX_SIDE or len(grid[0]) > MAX_SIDE:
            raise ValueError(f"{name} is {len(grid)} × {len(grid[0])}; ARC grids are at most {MAX_SIDE} × {MAX_SIDE}")
