"""``seal`` command line: prepare the model, run the services, and drive them as a client."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from seal.limits import UPDATE_RULES
from seal.config import AuthSettings, Settings, get_settings
from seal.domains.knowledge import KnowledgeContext, Question, load_squad
from seal.v1 import common_pb2, student_pb2, student_pb2_grpc, teacher_pb2, teacher_pb2_grpc

console = Console()
SERVICES = ("student", "auditor", "teacher")  # start order: each needs the ones before it


# --- model ----------------------------------------------------------------------------------


def cmd_prepare_model(args: argparse.Namespace, settings: Settings) -> int:
    from seal.models import model_fingerprint, resolve_model_path

    started = time.perf_counter()
    with console.status("preparing the model (the first run converts the embedded GGUF, ~1 min)"):
        path = resolve_model_path(settings.model)
        fingerprint = model_fingerprint(path)
    console.print(f"model ready at [bold]{path}[/] (sha256 {fingerprint[:16]}…, {time.perf_counter() - started:.1f}s)")
    return 0


# --- services -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from seal.rpc import serve_until_signalled

    if args.service == "student":
        from student_svc.servicer import serve_student as serve
    elif args.service == "auditor":
        from auditor_svc.servicer import serve_auditor as serve
    else:
        from teacher_svc.servicer import serve_teacher as serve
    running = serve(settings, port=args.port, metrics_port=args.metrics_port)
    console.print(f"{args.service} serving on {settings.services.host}:{running.port}, metrics on :{running.metrics_port}")
    serve_until_signalled(running, settings.services.shutdown_grace_s)
    return 0


def with_insecure(settings: Settings, insecure: bool) -> Settings:
    """``settings`` with authentication off when ``insecure`` (seal up/demo --insecure), said loudly."""
    if not insecure:
        return settings
    console.print("[yellow]authentication is OFF (--insecure): plaintext, no tokens, no scopes; anyone who can "
                  "reach these ports may call every RPC. For a local demo only (docs/auth.md).[/]")
    return settings.model_copy(update={"auth": settings.auth.model_copy(update={"insecure": True})})


@contextmanager
def local_services(settings: Settings, *, startup_timeout: float = 600.0) -> Iterator[dict[str, str]]:
    """Run the three services as child processes on loopback; stop them on exit. They read the
    same settings as this process (environment and config file), plus auth.insecure when
    ``settings.auth.insecure`` is on (seal up/demo --insecure)."""
    from seal.auth import check_server_settings

    check_server_settings(settings.auth)  # a missing principals file or certificate fails here, not in a child log
    auth_env = {"SEAL_AUTH__INSECURE": "true"} if settings.auth.insecure else {}
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    addresses = {name: settings.services.address_of(name) for name in SERVICES}
    full_names = {
        "student": "seal.v1.StudentService",
        "auditor": "seal.v1.AuditorService",
        "teacher": "seal.v1.TeacherService",
    }
    try:
        for name in SERVICES:
            log_path = log_dir / f"{name}.log"
            with log_path.open("ab") as log_file:
                child = subprocess.Popen(
                    [sys.executable, "-m", "seal.cli", "serve", name],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "SEAL_HOME": str(settings.home), **auth_env},
                    start_new_session=True,
                )
            children.append(child)
            with console.status(f"starting {name} (log: {log_path})"):
                try:
                    wait_for_child(child, addresses[name], full_names[name], startup_timeout, settings.auth)
                except (TimeoutError, RuntimeError) as exc:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} did not start: {exc}\n--- {log_path} ---\n{tail}") from exc
            console.print(f"[green]✓[/] {name} on {addresses[name]}")
        yield addresses
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(timeout=settings.services.shutdown_grace_s + 10)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_for_child(
    child: subprocess.Popen[bytes], address: str, service: str, timeout: float, auth: AuthSettings | None = None
) -> None:
    from seal.rpc import wait_until_serving

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"exited with status {child.returncode}")
        try:
            wait_until_serving(address, service, timeout=5, auth=auth)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"not serving after {timeout:.0f}s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    settings = with_insecure(settings, args.insecure)
    with local_services(settings) as addresses:
        console.print(f"all services up: {addresses}; Ctrl-C stops them")
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


# --- client commands ------------------------------------------------------------------------


def client_channel(address: str, auth: AuthSettings | None, token_file: str = "") -> grpc.Channel:
    """A channel with the client's credentials (seal.rpc.dial: TLS per auth.tls_ca_file, the token
    of --token-file, auth.token_file or $SEAL_TOKEN); plaintext without a token when ``auth`` is
    None (benchmarks and tests that run their own insecure stack)."""
    from seal.rpc import dial

    return grpc.insecure_channel(address) if auth is None else dial(address, auth, token_file=token_file)



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


def stream_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(), console=console, transient=False,
    )


def run_adapt(
    address: str, request: teacher_pb2.AdaptRequest, timeout: float, *, auth: AuthSettings | None = None,
    token_file: str = "",
) -> teacher_pb2.AdaptResult:
    """Stream one Adapt call with progress bars; return its final result."""
    result = None
    with client_channel(address, auth, token_file) as channel, stream_progress() as progress:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        overall = progress.add_task("self-edits", total=None, note="sampling…")
        training: dict[int, int] = {}
        for response in stub.Adapt(request, timeout=timeout):
            kind = response.WhichOneof("event")
            if kind == "self_edits_proposed":
                proposed = response.self_edits_proposed
                progress.update(overall, total=len(proposed.self_edits), completed=0,
                                note=f"{len(proposed.self_edits)} proposed in {proposed.seconds:.0f}s")
            elif kind == "questions_written":
                item = response.questions_written
                progress.console.print(
                    f"the teacher wrote {item.written} questions about the passage: {len(item.held_out)} held out as τ, "
                    f"{len(item.training_prompts)} training prompts, {item.dropped} dropped (unparseable or not "
                    f"answered open book) in {item.seconds:.0f}s"
                )
            elif kind == "baseline_scored":
                progress.console.print(f"baseline closed-book accuracy: {response.baseline_scored.accuracy:.1%}")
            elif kind == "candidate_progress":
                item = response.candidate_progress
                if item.index not in training:
                    training[item.index] = progress.add_task(f"  train #{item.index}", total=item.training.total_steps, note="")
                progress.update(training[item.index], completed=item.training.step, note=f"loss {item.training.loss:.3f}")
            elif kind == "candidate_scored":
                item = response.candidate_scored
                progress.update(overall, advance=1, note=f"#{item.index} reward {item.reward:+.3f}")
            elif kind == "candidate_failed":
                item = response.candidate_failed
                progress.update(overall, advance=1, note=f"#{item.index} failed")
                progress.console.print(f"[yellow]candidate #{item.index} failed:[/] {item.reason}")
            elif kind == "promotion_decided":
                item = response.promotion_decided
                colour = "green" if item.promoted else "yellow"
                progress.console.print(f"[{colour}]{item.reason}[/]")
            elif kind == "result":
                result = response.result
    if result is None:
        raise RuntimeError("the Adapt stream ended without a result")
    return result


def print_result(result: teacher_pb2.AdaptResult) -> None:
    table = Table(title=f"Adapt {result.request_id} — context {result.context_id}")
    for column in ("#", "adapter", "train seqs", "accuracy", "reward", "gates", "train s"):
        table.add_column(column)
    for c in result.candidates:
        gates = "pass" if c.passed_gates else (c.failure or "; ".join(g.gate for g in c.gates if not g.passed) or "fail")
        table.add_row(str(c.index), c.adapter_id or "—", str(c.training_sequences), f"{c.accuracy:.1%}",
                      f"{c.reward:+.3f}", gates, f"{c.train_seconds:.1f}")
    console.print(table)
    questions = Table(title="closed-book answers (baseline → adapted)")
    for column in ("question", "gold", "baseline", "adapted"):
        questions.add_column(column, overflow="fold")
    for before, after in zip(result.baseline_outcomes, result.adapted_outcomes):
        mark = lambda o: ("✓ " if o.correct else "✗ ") + o.prediction  # noqa: E731
        questions.add_row(before.question, before.gold_answer, mark(before), mark(after))
    console.print(questions)
    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.phase_seconds.items())
    console.print(f"phases: {phases}")
    if result.questions_written:
        console.print("[dim]τ was written by the teacher (no questions were sent) and verified open book[/]")
    console.print(
        f"[bold]baseline accuracy {result.baseline_accuracy:.1%} → adapted accuracy {result.adapted_accuracy:.1%}[/] "
        + (f"(promoted {result.adapter_id})" if result.promoted else "(nothing promoted)")
    )


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


def cmd_adapt(args: argparse.Namespace, settings: Settings) -> int:
    request = fewshot_adapt_request(args) if args.arc_task else adapt_request(load_context(args), args)
    result = run_adapt(args.address or settings.services.address_of("teacher"), request, args.timeout,
                       auth=settings.auth, token_file=args.token_file)
    print_result(result)
    if args.json_out:
        from google.protobuf.json_format import MessageToJson

        Path(args.json_out).write_text(MessageToJson(result))
    return 0


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
    console.print(f"[dim]{reply.served_adapter_id or 'base model'}:[/] {reply.completions[0].text}")
    return 0


def cmd_adapters(args: argparse.Namespace, settings: Settings) -> int:
    with client_channel(settings.services.address_of("student"), settings.auth, args.token_file) as channel:
        stub = student_pb2_grpc.StudentServiceStub(channel)
        if args.action == "list":
            reply = stub.ListAdapters(student_pb2.ListAdaptersRequest(adapter_name=args.name or ""), timeout=30)
            table = Table(title="adapters")
            for column in ("adapter", "status", "context", "created", "seed"):
                table.add_column(column)
            for m in reply.adapters:
                status = common_pb2.AdapterStatus.Name(m.status).removeprefix("ADAPTER_STATUS_").lower()
                table.add_row(m.adapter_id, status, m.context_id, m.created_at.ToJsonString(), str(m.seed))
            console.print(table)
        elif args.action == "promote":
            reply = stub.Promote(student_pb2.PromoteRequest(adapter_id=args.adapter_id, reason=args.reason), timeout=60)
            console.print(f"promoted {reply.adapter.adapter_id}")
        else:
            reply = stub.Rollback(
                student_pb2.RollbackRequest(adapter_name=args.name or "", reason=args.reason, allow_base_model=args.to_base),
                timeout=60,
            )
            now = reply.now_serving.adapter_id if reply.HasField("now_serving") else "the base model"
            console.print(f"rolled back {reply.rolled_back.adapter_id}; now serving {now}")
    return 0


def _audit_summary(record: dict) -> str:
    payload = record["payload"]
    if "cause" in payload:
        return payload["cause"]
    if "decision" in payload:
        failed = payload["decision"].get("failed_reasons") or []
        verdict = "passes every gate" if payload["decision"].get("promote") else "; ".join(failed)
        return f"reward {payload.get('reward', 0):+.3f}: {verdict}"
    if "reason" in payload:
        return payload["reason"]
    return ", ".join(f"{k}={v}" for k, v in payload.items() if k != "payload_version")[:120]


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """Read the auditor's hash-chained log directly: verify must not trust the process that writes it."""
    if args.action == "recheck":
        from seal.v1 import auditor_pb2, auditor_pb2_grpc

        with client_channel(args.address or settings.services.address_of("auditor"), settings.auth,
                            args.token_file) as channel:
            reply = auditor_pb2_grpc.AuditorServiceStub(channel).Recheck(
                auditor_pb2.RecheckRequest(adapter_name=args.name or "", dry_run=args.dry_run), timeout=args.timeout
            )
        colour = "red" if reply.rollback_needed else "green"
        console.print(f"[{colour}]{reply.adapter_id or 'nothing promoted'}: {reply.reason}[/]")
        if reply.rolled_back:
            console.print(f"rolled back; now serving {reply.now_serving_adapter_id or 'the base model'}")
        return 0
    from seal.audit import AuditLog

    path = Path(args.db) if args.db else settings.audit_log_path
    if not path.is_file():
        console.print(f"[red]no audit log at {path}[/] (set --db, SEAL_HOME or SEAL_AUDITOR__AUDIT_LOG)")
        return 2
    with AuditLog(path) as audit:
        if args.action == "verify":
            report = audit.verify()
            seq, digest = audit.head()
            if report.ok:
                console.print(f"[green]audit log intact[/]: {report.checked} records, head seq {seq} hash {digest}")
                return 0
            console.print(f"[red]audit log FAILED verification[/] ({report.checked} records checked):")
            for problem in report.problems:
                console.print(f"  - {problem}", markup=False)
            return 1
        if args.action == "show":
            if args.seq is None:
                raise SystemExit("seal audit show needs a record number: seal audit show 12")
            try:
                record = audit.get(args.seq)
            except KeyError as exc:
                console.print(f"[red]{exc.args[0]}[/]")
                return 2
            console.print_json(json.dumps(record.to_dict(), ensure_ascii=False))
            return 0
        records = [r.to_dict() for r in audit.records(kind=args.kind, adapter_id=args.adapter)]
    records = records[-args.limit :] if args.limit else records
    if args.json:
        print(json.dumps(records, ensure_ascii=False, indent=1))
        return 0
    table = Table(title=f"audit log {path}")
    for column in ("seq", "at", "kind", "adapter", "summary"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(str(record["seq"]), record["at"][:19], record["kind"], record["adapter_id"] or "—", _audit_summary(record))
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Prepare the model, start the services, adapt on one SQuAD passage, print the result."""
    settings = with_insecure(settings, args.insecure)
    cmd_prepare_model(args, settings)
    context = load_context(args)
    console.print(f"passage {args.index} of {args.squad_file}: [bold]{context.title}[/] ({len(context.questions)} questions)")
    with local_services(settings):
        result = run_adapt(settings.services.address_of("teacher"), adapt_request(context, args), args.timeout,
                           auth=settings.auth, token_file=args.token_file)
        print_result(result)
        if result.adapted_outcomes and result.adapter_id:
            from seal.domains.knowledge import build_question_prompt

            question = result.adapted_outcomes[0].question
            # Not promoted (a gate said no): ask the best candidate by name, so the demo still
            # shows what it learned, and say that it is not what clients are served.
            named = "" if result.promoted else result.adapter_id
            reply, backend = generate_served(
                settings.services.address_of("student"), build_question_prompt(question), 32, named,
                auth=settings.auth, token_file=args.token_file,
            )
            role = "promoted" if result.promoted else "candidate, not promoted"
            console.print(
                f"served by {reply.served_adapter_id} ({role}, {backend}): Q: {question} → {reply.completions[0].text!r}"
            )
    return 0


# --- ReST^EM: train and evaluate the teacher's policy -----------------------------------------

TRAIN_FILE = "../shared/data/squad/seal_train_150.json"
EVAL_FILE = "../shared/data/squad/seal_eval_200.json"
KEEP_RULES = {"best_of_k": 1, "best_positive": 2}  # teacher_pb2.KeepRule values


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


# SEAL's 11 few-shot training tasks (ARC training set, filtered for the 1B model), as shipped in
# ../shared/data/arc/ with their solutions beside them.
ARC_TRAIN_FILE = "../shared/data/arc/arc-agi_training_challenges_filtered_1B_training_set.json"


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
    report = None
    with client_channel(address, auth, token_file) as channel, stream_progress() as progress:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        samples = progress.add_task("scored samples", total=None, note="")
        contexts = progress.add_task("contexts", total=len(request.contexts), note="")
        policy_task = None
        for response in stub.Train(request, timeout=timeout):
            kind = response.WhichOneof("event")
            if kind == "round_started":
                item = response.round_started
                progress.update(samples, total=item.contexts * item.k * item.seeds_per_edit, completed=0)
                progress.update(contexts, completed=0)
                what = "resuming" if item.resumed else "starting"
                progress.console.print(
                    f"{what} round {item.round} ({item.round_id}): {item.contexts} contexts × k={item.k} × "
                    f"{item.seeds_per_edit} seed(s), policy {item.policy_adapter_id or 'base model'}"
                    + (f"; {item.samples_done} samples already scored" if item.resumed else "")
                )
            elif kind == "context_sampled":
                item = response.context_sampled
                note = "reused" if item.reused else f"sampled in {item.seconds:.0f}s"
                progress.update(contexts, note=f"#{item.context_index} {note}")
            elif kind == "sample_scored":
                item = response.sample_scored
                result = f"{item.reward:+.3f}" if item.HasField("reward") else "failed"
                progress.update(samples, advance=1, note=f"ctx {item.context_index} edit {item.edit_index}: {result} ({item.source})")
            elif kind == "context_done":
                item = response.context_done
                kept = f"kept #{item.kept_edit_index} ({item.kept_reward:+.3f})" if item.kept else "nothing kept"
                progress.update(contexts, advance=1, note=f"#{item.context_index} {kept}")
            elif kind == "policy_progress":
                item = response.policy_progress
                if policy_task is None:
                    policy_task = progress.add_task("policy SFT", total=item.total_steps, note="")
                progress.update(policy_task, completed=item.step, note=f"loss {item.loss:.3f}")
            elif kind == "report":
                report = response.report
    if report is None:
        raise RuntimeError("the Train stream ended without a report")
    return report


def print_round_report(report: teacher_pb2.RoundReport) -> None:
    def opt(name: str, fmt: str) -> str:
        return format(getattr(report, name), fmt) if report.HasField(name) else "—"

    keep_rule = {1: "best_of_k", 2: "best_positive"}.get(report.keep_rule, "?")
    table = Table(title=f"ReST^EM round {report.round} ({report.round_id})")
    table.add_column("")
    table.add_column("value")
    rows = [
        ("domain", report.domain or "knowledge"),
        ("keep rule", keep_rule),
        ("contexts × k × seeds", f"{report.contexts} × {report.k} × {report.seeds_per_edit}"),
        ("samples scored / failed / resumed", f"{report.samples_scored} / {report.samples_failed} / {report.samples_resumed}"),
        ("mean reward of sampled self-edits", opt("mean_reward", "+.3f")),
        ("best reward", opt("max_reward", "+.3f")),
        ("kept (with positive gain)", f"{report.kept} ({report.positive_kept})"),
        ("mean reward of kept", opt("mean_kept_reward", "+.3f")),
        ("policy SFT loss first → final",
         f"{opt('policy_sft_first_loss', '.3f')} → {opt('policy_sft_final_loss', '.3f')} ({report.policy_sft_steps} steps)"),
        ("new policy", (report.policy_adapter_id + (" (hot-loaded)" if report.hot_loaded else "")) or "unchanged (nothing kept)"),
        ("phases", ", ".join(f"{name} {seconds:.0f}s" for name, seconds in report.phase_seconds.items())),
        ("wall time", f"{report.wall_seconds:.0f}s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    if args.domain == "fewshot":
        request = fewshot_train_request(args, settings.restem.contexts)
    else:
        if args.arc_tasks or args.arc_solutions or args.task_ids:
            raise SystemExit("--arc-tasks, --arc-solutions and --task-ids need --domain fewshot")
        request = train_request(_slice_contexts(args.squad_file, args.start, args.n or settings.restem.contexts), args)
    report = run_train(args.address or settings.services.address_of("teacher"), request, args.timeout,
                       auth=settings.auth, token_file=args.token_file)
    print_round_report(report)
    if args.json_out:
        from google.protobuf.json_format import MessageToJson

        Path(args.json_out).write_text(MessageToJson(report))
    return 0


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
    console.print(f"{len(contexts)} passages of {args.squad_file}, k={args.k}")
    with Progress(console=console) as progress:
        task = progress.add_task("passages", total=len(contexts))
        try:
            evaluation = evaluate_stored_policy(
                settings, contexts, config, policy_version=args.policy_version,
                on_passage=lambda row: progress.advance(task),
            )
        except RegistryError as exc:
            console.print(f"[red]cannot load the teacher policy:[/] {exc}")
            return 1
    policy_name = evaluation["policy"]
    summary = evaluation["summary"]

    def percent(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}"

    table = Table(title=f"{policy_name}: {summary['passages']} passages, {summary['questions']} questions, closed book")
    for column in ("baseline", "passage only", f"self-edit (mean of k={args.k})", "self-edit best of k"):
        table.add_column(column)
    table.add_row(*(percent(summary[key]) for key in ("baseline", "passage_only", "self_edit_mean", "self_edit_best_of_k")))
    console.print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"policy": policy_name, **evaluation}, indent=2, default=str))
    return 0


# --- entry ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("prepare-model", help="convert the embedded model once (or check SEAL_MODEL__PATH)")

    serve = commands.add_parser("serve", help="run one service (for a container)")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--port", type=int)
    serve.add_argument("--metrics-port", type=int)

    up = commands.add_parser("up", help="run all three services locally on loopback until Ctrl-C")
    up.add_argument("--insecure", action="store_true",
                    help="authentication off (auth.insecure): plaintext, no tokens; for a local demo only")

    def add_token_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--token-file", default="",
                         help="file holding the bearer token to send (default auth.token_file, then $SEAL_TOKEN)")

    def add_context_args(sub: argparse.ArgumentParser, *, demo: bool) -> None:
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
        sub.add_argument("--style", choices=("implications", "rewrite", "self_qa"))
        sub.add_argument("--seed", type=int)
        sub.add_argument("--epochs", type=int)
        sub.add_argument("--learning-rate", type=float)
        sub.add_argument("--update", choices=UPDATE_RULES, help="inner-loop update rule (default update.rule)")
        sub.add_argument("--timeout", type=float, default=3600.0)

    adapt = commands.add_parser("adapt", help="send one Adapt call to a running teacher")
    add_context_args(adapt, demo=False)
    adapt.add_argument("--address", help="teacher address (default from settings)")
    adapt.add_argument("--json-out", help="also write the AdaptResult as JSON here")
    add_token_arg(adapt)

    demo = commands.add_parser("demo", help="prepare, start everything, adapt on one SQuAD passage")
    add_context_args(demo, demo=True)
    demo.add_argument("--insecure", action="store_true",
                      help="authentication off (auth.insecure): plaintext, no tokens; what `make demo` uses")
    add_token_arg(demo)

    generate = commands.add_parser("generate", help="ask the student (promoted adapter unless --adapter)")
    generate.add_argument("prompt")
    generate.add_argument("--adapter", help="adapter id such as default@v3")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    add_token_arg(generate)

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
    train.add_argument("--style", choices=("implications", "rewrite", "self_qa"))
    train.add_argument("--seed", type=int)
    train.add_argument("--epochs", type=int, help="student inner-loop epochs")
    train.add_argument("--learning-rate", type=float, help="student inner-loop learning rate")
    train.add_argument("--restart", action="store_true", help="abandon an unfinished round instead of resuming it")
    train.add_argument("--address", help="teacher address (default from settings)")
    train.add_argument("--timeout", type=float, default=7 * 24 * 3600.0)
    train.add_argument("--json-out", help="also write the round report as JSON here")
    add_token_arg(train)

    evaluate = commands.add_parser("eval", help="evaluate a teacher policy on SQuAD passages (in this process)")
    evaluate.add_argument("--policy-version", type=int, help="teacher-policy version; 0 = base; default = the promoted one")
    evaluate.add_argument("--squad-file", default=EVAL_FILE)
    evaluate.add_argument("--start", type=int, default=0)
    evaluate.add_argument("--n", type=int, default=4, help="passages")
    evaluate.add_argument("--k", type=int, default=1, help="self-edits per passage")
    evaluate.add_argument("--style", choices=("implications", "rewrite", "self_qa"))
    evaluate.add_argument("--seed", type=int)
    evaluate.add_argument("--no-passage-only", action="store_true", help="skip the passage-only control")
    evaluate.add_argument("--json-out")

    adapters = commands.add_parser("adapters", help="list, promote or roll back adapter versions")
    adapters.add_argument("action", choices=("list", "promote", "rollback"))
    adapters.add_argument("adapter_id", nargs="?", default="")
    adapters.add_argument("--name", help="adapter lineage (default from settings)")
    adapters.add_argument("--reason", default="operator request")
    adapters.add_argument("--to-base", action="store_true", help="rollback may leave the base model serving")
    add_token_arg(adapters)

    audit = commands.add_parser("audit", help="read or verify the audit trail; ask the auditor for a retention re-check")
    audit.add_argument("action", choices=("list", "show", "verify", "recheck"))
    audit.add_argument("seq", nargs="?", type=int, help="record number (show)")
    audit.add_argument("--db", help="audit log file (default: <home>/auditor/audit.db)")
    audit.add_argument("--kind", help="list only this kind (candidate, promote, reject, rollback, recheck, …)")
    audit.add_argument("--adapter", help="list only records of this adapter id")
    audit.add_argument("--limit", type=int, default=0, help="list only the last N records")
    audit.add_argument("--json", action="store_true", help="list as JSON")
    audit.add_argument("--name", help="recheck: adapter lineage (default from settings)")
    audit.add_argument("--dry-run", action="store_true", help="recheck: measure only, never roll back")
    audit.add_argument("--address", help="recheck: auditor address (default from settings)")
    audit.add_argument("--timeout", type=float, default=1800.0)
    add_token_arg(audit)

    auth = commands.add_parser("auth", help="make a bearer token, hash one, or check a principals file (docs/auth.md)")
    auth.add_argument("action", choices=("token", "hash", "check"))
    auth.add_argument("name", nargs="?", help="token: the principal's name")
    auth.add_argument("--scope", action="append", default=[], help="token: a scope of the principal (repeatable)")
    auth.add_argument("--out", help="token: write the token to this file (mode 0600); without it the token is the first line printed")
    auth.add_argument("--principals-file", help="check: the file (default auth.principals_file)")

    health = commands.add_parser("health", help="ask each service's gRPC health service; exit 1 unless all serve")
    health.add_argument("--address", action="append", metavar="NAME=HOST:PORT",
                        help="check this address (repeatable); default: the three services from settings")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds per check")

    config = commands.add_parser("config", help="show the effective settings and where each value came from")
    config.add_argument("action", choices=("show",))
    config.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    """The standard gRPC health check (the service a Kubernetes probe asks) of every service;
    what the chart's `helm test` pod runs."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    targets = [t.partition("=")[::2] for t in args.address] if args.address else \
        [(name, settings.services.address_of(name)) for name in SERVICES]
    healthy = True
    for name, address in targets:
        if not address:
            console.print(f"[red]{name}[/]: no address (use NAME=HOST:PORT)")
            healthy = False
            continue
        from seal.rpc import dial

        with dial(address, settings.auth, with_token=False) as channel:  # health checks are open
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                status = f"{exc.code().name}: {exc.details()}"
        healthy = healthy and status == "SERVING"
        console.print(f"{name} {address}: {'[green]' if status == 'SERVING' else '[red]'}{status}[/]")
    return 0 if healthy else 1


def cmd_auth(args: argparse.Namespace, settings: Settings) -> int:
    """``token``: a new random token and its principals-file entry; ``hash``: the sha256 of a token
    read from stdin; ``check``: load a principals file as a service would and list it."""
    from seal import auth

    if args.action == "hash":
        token = sys.stdin.read().strip()
        if not token:
            raise SystemExit("seal auth hash reads the token from stdin: seal auth hash < token-file")
        print(auth.token_sha256(token))
        return 0
    if args.action == "check":
        path = args.principals_file or settings.auth.principals_file
        if not path:
            raise SystemExit("seal auth check needs --principals-file or auth.principals_file")
        principals = auth.Principals.load(path)
        console.print(f"[green]{path}: {len(principals.names)} principals[/]: {', '.join(principals.names)}")
        return 0
    if not args.name or not args.scope:
        raise SystemExit(f"seal auth token NAME --scope SCOPE [--scope …]; scopes: {', '.join(auth.SCOPES)}")
    token = auth.new_token()
    entry = {"name": args.name, "scopes": args.scope, "token_sha256": auth.token_sha256(token)}
    auth.Principals.parse([entry])  # the same checks a service makes (name, known scopes)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        print(f"# token written to {out}; add this entry to the principals file:", file=sys.stderr)
    else:
        print(token)  # shown once: first line the token, second line the principals-file entry
    print(json.dumps(entry))
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    """Print every effective setting with where its value came from."""
    from seal.config import settings_with_sources

    rows = settings_with_sources(settings)
    if args.json:
        print(json.dumps([{"name": n, "value": str(v) if isinstance(v, Path) else v, "source": s} for n, v, s, _ in rows],
                         indent=1, default=str))
        return 0
    table = Table(title="effective settings (defaults < SEAL_CONFIG_FILE < SEAL_* environment)")
    for column in ("setting", "value", "source", "what"):
        table.add_column(column, overflow="fold")
    for name, value, source, description in rows:
        # Plain Text, not markup: values such as the injection patterns ("[/?inst\\]") contain brackets.
        table.add_row(*(Text(cell) for cell in (name, str(value), source, description)))
    console.print(table)
    return 0


HANDLERS = {
    "auth": cmd_auth,
    "config": cmd_config,
    "health": cmd_health,
    "prepare-model": cmd_prepare_model,
    "serve": cmd_serve,
    "up": cmd_up,
    "adapt": cmd_adapt,
    "demo": cmd_demo,
    "generate": cmd_generate,
    "adapters": cmd_adapters,
    "train": cmd_train,
    "eval": cmd_eval,
    "audit": cmd_audit,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from seal.auth import AuthConfigError

    try:
        return HANDLERS[args.command](args, get_settings())
    except grpc.RpcError as exc:
        # Not markup: details may hold brackets (the scopes a call needs).
        console.print(Text(exc.code().name, style="red") + Text(f": {exc.details()}"))
        return 1
    except AuthConfigError as exc:
        console.print(f"auth settings: {exc}", style="red", markup=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
