"""Client commands that ask the running services for an answer: ``seal adapt`` (one Adapt call on
a passage or an ARC task, its request built from the arguments) and ``seal generate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from seal.cli import render
from seal.cli.client import add_token_arg, client_channel
from seal.config import AuthSettings, Settings
from seal.domains.knowledge import PROMPT_STYLES, KnowledgeContext, Question, load_squad
from seal.limits import UPDATE_RULES
from seal.v1 import (
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)


def register(commands: argparse._SubParsersAction) -> None:
    adapt = commands.add_parser("adapt", help="send one Adapt call to a running teacher")
    add_context_args(adapt, demo=False)
    adapt.add_argument("--address", help="teacher address (default from settings)")
    adapt.add_argument("--json-out", help="also write the AdaptResult as JSON here")
    add_token_arg(adapt)
    adapt.set_defaults(handler=cmd_adapt)

    generate = commands.add_parser("generate", help="ask the student (promoted adapter unless --adapter)")
    generate.add_argument("prompt")
    generate.add_argument("--adapter", help="adapter id such as default@v3")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    add_token_arg(generate)
    generate.set_defaults(handler=cmd_generate)


# --- seal adapt (and the passage of seal demo) --------------------------------------------------


def add_context_args(sub: argparse.ArgumentParser, *, demo: bool) -> None:
    """What to adapt on and how: `seal adapt` (a passage, SQuAD entry or ARC task) and `seal demo`
    (a SQuAD entry)."""
    source = sub if demo else sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--squad-file", default="../shared/data/squad/seal_eval_200.json" if demo else None,
                        help="SEAL's grouped SQuAD JSON")
    if not demo:
        source.add_argument(
            "--passage-file",
            help="a .txt passage (with --qa, or none: the teacher writes τ) or a .json {title, context, questions}",
        )
        source.add_argument("--arc-task", help="ARC challenges JSON: adapt on one few-shot task (--task-id) "
                            "instead of a passage; gold outputs from the sibling …solutions… file")
        sub.add_argument("--task-id", help="the task's id in --arc-task")
        sub.add_argument("--title")
        sub.add_argument("--qa", action="append", help="'question => answer' (repeatable)")
    sub.add_argument("--index", type=int, default=0, help="passage index in --squad-file")
    sub.add_argument("--k", type=int, help="candidate self-edits")
    sub.add_argument("--style", choices=PROMPT_STYLES)
    sub.add_argument("--seed", type=int)
    sub.add_argument("--epochs", type=int)
    sub.add_argument("--learning-rate", type=float)
    sub.add_argument("--update", choices=UPDATE_RULES, help="inner-loop update rule (default update.rule)")
    sub.add_argument("--timeout", type=float, default=3600.0)


def load_context(args: argparse.Namespace) -> KnowledgeContext:
    if args.squad_file:
        contexts = load_squad(args.squad_file)
        if not 0 <= args.index < len(contexts):
            raise SystemExit(f"--index {args.index} is out of range: {args.squad_file} has {len(contexts)} passages")
        return contexts[args.index]
    path = Path(args.passage_file)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return KnowledgeContext(
            data.get("title", path.stem),
            data["context"],
            tuple(Question(q["question"], q["answer"]) for q in data["questions"]),
        )
    questions = []
    for pair in args.qa or []:
        question, separator, answer = pair.partition("=>")
        if not separator:
            raise SystemExit(f"--qa {pair!r}: write it as 'question => answer'")
        questions.append(Question(question.strip(), answer.strip()))
    return KnowledgeContext(args.title or path.stem, path.read_text(encoding="utf-8"), tuple(questions))


def adapt_request(context: KnowledgeContext, args: argparse.Namespace) -> teacher_pb2.AdaptRequest:
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title=context.title, passage=context.passage),
        questions=[common_pb2.Question(question=q.question, answer=q.answer) for q in context.questions],
        k=args.k or 0,
        prompt_style=args.style or "",
    )
    return with_update_args(request, args)


def with_update_args(request: Any, args: argparse.Namespace) -> Any:
    """Seed and inner-loop overrides shared by Adapt and Train requests."""
    if args.seed is not None:
        request.seed = args.seed
    if args.epochs:
        request.overrides.epochs = args.epochs
    if args.learning_rate:
        request.overrides.learning_rate = args.learning_rate
    if getattr(args, "update", None):
        request.overrides.update_rule = args.update
    return request


def fewshot_adapt_request(args: argparse.Namespace) -> teacher_pb2.AdaptRequest:
    """Adapt on one ARC task: the recipe in each self-edit chooses learning rate and epochs, so
    no update overrides are sent (the teacher refuses them for few-shot tasks)."""
    from seal.domains.fewshot import find_arc_task
    from seal.transport import convert

    if not args.task_id:
        raise SystemExit("--arc-task needs --task-id (a task id in that file)")
    try:
        task = find_arc_task(args.arc_task, args.task_id)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(str(exc)) from None
    request = teacher_pb2.AdaptRequest(fewshot=convert.fewshot_to_proto(task), k=args.k or 0)
    if args.seed is not None:
        request.seed = args.seed
    return request


def run_adapt(
    address: str, request: teacher_pb2.AdaptRequest, timeout: float, *, auth: AuthSettings | None = None,
    token_file: str = "",
) -> teacher_pb2.AdaptResult:
    """Stream one Adapt call with progress bars; return its final result."""
    with client_channel(address, auth, token_file) as channel, render.stream_progress() as progress:
        responses = teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(request, timeout=timeout)
        return render.follow_stream(responses, render.AdaptView(progress), final="result", call="Adapt")


def cmd_adapt(args: argparse.Namespace, settings: Settings) -> int:
    request = fewshot_adapt_request(args) if args.arc_task else adapt_request(load_context(args), args)
    result = run_adapt(args.address or settings.services.address_of("teacher"), request, args.timeout,
                       auth=settings.auth, token_file=args.token_file)
    render.print_result(result)
    if args.json_out:
        from google.protobuf.json_format import MessageToJson

        Path(args.json_out).write_text(MessageToJson(result))
    return 0


# --- seal generate ------------------------------------------------------------------------------


def generate_one(
    address: str, prompt: str, adapter_id: str, max_new_tokens: int, *, auth: AuthSettings | None = None,
    token_file: str = "",
) -> student_pb2.GenerateResponse:
    selector = student_pb2.AdapterSelector(adapter_id=adapter_id) if adapter_id else student_pb2.AdapterSelector()
    with client_channel(address, auth, token_file) as channel:
        return student_pb2_grpc.StudentServiceStub(channel).Generate(
            student_pb2.GenerateRequest(prompts=[prompt], adapter=selector, max_new_tokens=max_new_tokens), timeout=600
        )


def generate_served(
    address: str, prompt: str, max_new_tokens: int, adapter_id: str = "", *, auth: AuthSettings | None = None,
    token_file: str = "",
) -> tuple[student_pb2.GenerateResponse, str]:
    """A generation from the promoted version (or the named one), and the backend that answered
    it (triton or in_process, from the student's trailing metadata)."""
    selector = student_pb2.AdapterSelector(adapter_id=adapter_id) if adapter_id else student_pb2.AdapterSelector()
    with client_channel(address, auth, token_file) as channel:
        reply, call = student_pb2_grpc.StudentServiceStub(channel).Generate.with_call(
            student_pb2.GenerateRequest(prompts=[prompt], adapter=selector, max_new_tokens=max_new_tokens), timeout=600
        )
    backend = dict(call.trailing_metadata() or ()).get("x-seal-serving-backend", "unknown")
    return reply, backend


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    reply = generate_one(settings.services.address_of("student"), args.prompt, args.adapter or "", args.max_new_tokens,
                         auth=settings.auth, token_file=args.token_file)
    render.console.print(f"[dim]{reply.served_adapter_id or 'base model'}:[/] {reply.completions[0].text}")
    return 0
