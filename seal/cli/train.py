"""Training and evaluating the teacher's policy: ``seal train`` (one ReST^EM round on the running
teacher, knowledge or few-shot) and ``seal eval`` (a stored policy, in this process)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.progress import Progress
from rich.table import Table

from seal.cli import render
from seal.cli.adapt import with_update_args
from seal.cli.client import add_token_arg, client_channel
from seal.config import AuthSettings, Settings
from seal.domains.knowledge import PROMPT_STYLES, KnowledgeContext, load_squad
from seal.v1 import common_pb2, teacher_pb2, teacher_pb2_grpc

TRAIN_FILE = "../shared/data/squad/seal_train_150.json"
EVAL_FILE = "../shared/data/squad/seal_eval_200.json"
# SEAL's 11 few-shot training tasks (ARC training set, filtered for the 1B model), as shipped in
# ../shared/data/arc/ with their solutions beside them.
ARC_TRAIN_FILE = "../shared/data/arc/arc-agi_training_challenges_filtered_1B_training_set.json"
KEEP_RULES = {name: value for value, name in render.KEEP_RULE_NAMES.items()}


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="run one ReST^EM round on the teacher (resumes an interrupted one)")
    train.add_argument("--domain", choices=("knowledge", "fewshot"), default="knowledge",
                       help="knowledge: SQuAD passages (--squad-file); fewshot: ARC tasks (--arc-tasks), "
                       "self-edits are training recipes rewarded 1 when they solve the task")
    train.add_argument("--squad-file", default=TRAIN_FILE, help="SEAL's grouped SQuAD JSON of training contexts")
    train.add_argument("--arc-tasks", help=f"ARC challenges JSON (--domain fewshot; default {ARC_TRAIN_FILE})")
    train.add_argument("--arc-solutions", help="ARC solutions JSON (default: the …solutions… file beside --arc-tasks)")
    train.add_argument("--task-ids", help="comma-separated task ids in --arc-tasks (default: --start/--n)")
    train.add_argument("--start", type=int, default=0, help="first passage (or ARC task) index")
    train.add_argument("--n", type=int, help="training contexts (default restem.contexts)")
    train.add_argument("--k", type=int, help="self-edits per context (default restem.k)")
    train.add_argument("--seeds-per-edit", type=int, help="inner-loop seeds per self-edit (default restem.seeds_per_edit)")
    train.add_argument("--keep-rule", choices=tuple(KEEP_RULES), help="default restem.keep_rule")
    train.add_argument("--style", choices=PROMPT_STYLES)
    train.add_argument("--seed", type=int)
    train.add_argument("--epochs", type=int, help="student inner-loop epochs")
    train.add_argument("--learning-rate", type=float, help="student inner-loop learning rate")
    train.add_argument("--restart", action="store_true", help="abandon an unfinished round instead of resuming it")
    train.add_argument("--address", help="teacher address (default from settings)")
    train.add_argument("--timeout", type=float, default=7 * 24 * 3600.0)
    train.add_argument("--json-out", help="also write the round report as JSON here")
    add_token_arg(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a teacher policy on SQuAD passages (in this process)")
    evaluate.add_argument("--policy-version", type=int, help="teacher-policy version; 0 = base; default = the promoted one")
    evaluate.add_argument("--squad-file", default=EVAL_FILE)
    evaluate.add_argument("--start", type=int, default=0)
    evaluate.add_argument("--n", type=int, default=4, help="passages")
    evaluate.add_argument("--k", type=int, default=1, help="self-edits per passage")
    evaluate.add_argument("--style", choices=PROMPT_STYLES)
    evaluate.add_argument("--seed", type=int)
    evaluate.add_argument("--no-passage-only", action="store_true", help="skip the passage-only control")
    evaluate.add_argument("--json-out")
    evaluate.set_defaults(handler=cmd_eval)


# --- seal train ---------------------------------------------------------------------------------


def _slice_contexts(path: str, start: int, n: int) -> list[KnowledgeContext]:
    contexts = load_squad(path)
    if not 0 <= start < len(contexts):
        raise SystemExit(f"--start {start} is out of range: {path} has {len(contexts)} passages")
    if n < 1:
        raise SystemExit("--n must be at least 1")
    return contexts[start : start + n]


def train_request(contexts: list[KnowledgeContext], args: argparse.Namespace) -> teacher_pb2.TrainRequest:
    request = teacher_pb2.TrainRequest(
        contexts=[
            teacher_pb2.TrainingContext(
                context=common_pb2.Context(title=c.title, passage=c.passage),
                questions=[common_pb2.Question(question=q.question, answer=q.answer) for q in c.questions],
            )
            for c in contexts
        ],
        k=args.k or 0,
        seeds_per_edit=args.seeds_per_edit or 0,
        keep_rule=KEEP_RULES.get(args.keep_rule or "", 0),
        prompt_style=args.style or "",
        restart=args.restart,
    )
    return with_update_args(request, args)


def fewshot_train_request(args: argparse.Namespace, default_n: int) -> teacher_pb2.TrainRequest:
    """A few-shot round: ARC tasks with their gold outputs (τ), read as `seal adapt --arc-task`
    reads them. --task-ids picks tasks by id, else --start/--n slice the file. No update
    overrides or prompt style: each self-edit is its own training recipe."""
    from seal.domains.fewshot import load_arc_tasks, select_arc_tasks
    from seal.transport import convert

    if args.epochs or args.learning_rate or args.style:
        raise SystemExit("--epochs, --learning-rate and --style do not apply to --domain fewshot: "
                         "each self-edit is a recipe that chooses its own learning rate and epochs")
    path = args.arc_tasks or ARC_TRAIN_FILE
    try:
        tasks = load_arc_tasks(path, args.arc_solutions)
        if args.task_ids:
            chosen = select_arc_tasks(tasks, [t.strip() for t in args.task_ids.split(",") if t.strip()], source=path)
        else:
            if not 0 <= args.start < len(tasks):
                raise ValueError(f"--start {args.start} is out of range: {path} has {len(tasks)} tasks")
            chosen = tasks[args.start : args.start + (args.n or default_n)]
    except (OSError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    if not chosen:
        raise SystemExit("no ARC task chosen: name at least one with --task-ids, or check --start/--n")
    unsolved = [t.task_id for t in chosen if not t.has_solutions]
    if unsolved:
        raise SystemExit(f"no gold outputs for task {', '.join(unsolved)}: pass --arc-solutions (the round is "
                         "rewarded on them)")
    request = teacher_pb2.TrainRequest(
        contexts=[teacher_pb2.TrainingContext(fewshot=convert.fewshot_to_proto(t)) for t in chosen],
        domain="fewshot",
        k=args.k or 0,
        seeds_per_edit=args.seeds_per_edit or 0,
        keep_rule=KEEP_RULES.get(args.keep_rule or "", 0),
        restart=args.restart,
    )
    if args.seed is not None:
        request.seed = args.seed
    return request


def run_train(
    address: str, request: teacher_pb2.TrainRequest, timeout: float, *, auth: AuthSettings | None = None,
    token_file: str = "",
) -> teacher_pb2.RoundReport:
    """Stream one Train call with progress bars; return the round's report."""
    with client_channel(address, auth, token_file) as channel, render.stream_progress() as progress:
        view = render.TrainView(progress, contexts=len(request.contexts))
        responses = teacher_pb2_grpc.TeacherServiceStub(channel).Train(request, timeout=timeout)
        return render.follow_stream(responses, view, final="report", call="Train")


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    if args.domain == "fewshot":
        request = fewshot_train_request(args, settings.restem.contexts)
    else:
        if args.arc_tasks or args.arc_solutions or args.task_ids:
            raise SystemExit("--arc-tasks, --arc-solutions and --task-ids need --domain fewshot")
        request = train_request(_slice_contexts(args.squad_file, args.start, args.n or settings.restem.contexts), args)
    report = run_train(args.address or settings.services.address_of("teacher"), request, args.timeout,
                       auth=settings.auth, token_file=args.token_file)
    render.print_round_report(report)
    if args.json_out:
        from google.protobuf.json_format import MessageToJson

        Path(args.json_out).write_text(MessageToJson(report))
    return 0


# --- seal eval ----------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate a stored teacher policy in this process (no services needed)."""
    from seal.evaluation import EvalConfig, evaluate_stored_policy
    from seal.registry import RegistryError

    contexts = _slice_contexts(args.squad_file, args.start, args.n)
    config = EvalConfig(
        k=args.k,
        seed=args.seed if args.seed is not None else settings.seed,
        prompt_style=args.style or settings.teacher.prompt_style,
        passage_only=not args.no_passage_only,
        answer_max_new_tokens=settings.auditor.answer_max_new_tokens,
    )
    render.console.print(f"{len(contexts)} passages of {args.squad_file}, k={args.k}")
    with Progress(console=render.console) as progress:
        task = progress.add_task("passages", total=len(contexts))
        try:
            evaluation = evaluate_stored_policy(
                settings, contexts, config, policy_version=args.policy_version,
                on_passage=lambda row: progress.advance(task),
            )
        except RegistryError as exc:
            render.console.print(f"[red]cannot load the teacher policy:[/] {exc}")
            return 1
    policy_name = evaluation["policy"]
    summary = evaluation["summary"]

    def percent(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}"

    table = Table(title=f"{policy_name}: {summary['passages']} passages, {summary['questions']} questions, closed book")
    for column in ("baseline", "passage only", f"self-edit (mean of k={args.k})", "self-edit best of k"):
        table.add_column(column)
    table.add_row(*(percent(summary[key]) for key in ("baseline", "passage_only", "self_edit_mean", "self_edit_best_of_k")))
    render.console.print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"policy": policy_name, **evaluation}, indent=2, default=str))
    return 0
