"""Commands that run SEAL's services: ``seal prepare-model``, ``seal serve`` (one service, as a
container runs it), ``seal up`` and ``seal demo`` (all three in this process on their configured
ports: ``seal.stack.local_stack``) and ``seal health`` (the standard gRPC health check of each)."""

from __future__ import annotations

import argparse
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from seal.cli import render
from seal.cli.adapt import (
    adapt_request,
    add_context_args,
    generate_served,
    load_context,
    run_adapt,
)
from seal.cli.client import add_token_arg
from seal.cli.supervisor import SERVICES
from seal.config import Settings

INSECURE_HELP = "authentication off (auth.insecure): plaintext, no tokens"


def register(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser("prepare-model", help="convert the embedded model once (or check SEAL_MODEL__PATH)")
    prepare.set_defaults(handler=cmd_prepare_model)

    serve = commands.add_parser("serve", help="run one service (for a container)")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--port", type=int, help="gRPC port (0 = a free one); default: the configured one")
    serve.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics port (0 = a free one); default: the configured one"
    )
    serve.set_defaults(handler=cmd_serve)

    up = commands.add_parser("up", help="run all three services locally on loopback until Ctrl-C")
    up.add_argument("--insecure", action="store_true", help=f"{INSECURE_HELP}; for a local demo only")
    up.set_defaults(handler=cmd_up)

    demo = commands.add_parser("demo", help="prepare, start everything, adapt on one SQuAD passage")
    add_context_args(demo, demo=True)
    demo.add_argument("--insecure", action="store_true", help=f"{INSECURE_HELP}; what `make demo` uses")
    add_token_arg(demo)
    demo.set_defaults(handler=cmd_demo)

    health = commands.add_parser("health", help="ask each service's gRPC health service; exit 1 unless all serve")
    health.add_argument("--address", action="append", metavar="NAME=HOST:PORT",
                        help="check this address (repeatable); default: the three services from settings")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    health.set_defaults(handler=cmd_health)


def cmd_prepare_model(args: argparse.Namespace, settings: Settings) -> int:
    from seal.models import model_fingerprint, resolve_model_path

    started = time.perf_counter()
    with render.console.status("preparing the model (the first run converts the embedded GGUF, ~1 min)"):
        path = resolve_model_path(settings.model)
        fingerprint = model_fingerprint(path)
    render.console.print(
        f"model ready at [bold]{path}[/] (sha256 {fingerprint[:16]}…, {time.perf_counter() - started:.1f}s)")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from seal.rpc import serve_until_signalled

    if args.service == "student":
        from student_svc.servicer import serve_student as serve
    elif args.service == "auditor":
        from auditor_svc.servicer import serve_auditor as serve
    else:
        from teacher_svc.servicer import serve_teacher as serve
    from seal.rpc import CONFIGURED

    running = serve(
        settings,
        port=CONFIGURED if args.port is None else args.port,
        metrics_port=CONFIGURED if args.metrics_port is None else args.metrics_port,
    )
    render.console.print(
        f"{args.service} serving on {settings.services.host}:{running.port}, metrics on :{running.metrics_port}")
    serve_until_signalled(running, settings.services.shutdown_grace_s)
    return 0


def with_insecure(settings: Settings, insecure: bool) -> Settings:
    """``settings`` with authentication off when ``insecure`` (seal up/demo --insecure), said loudly."""
    if not insecure:
        return settings
    render.console.print("[yellow]authentication is OFF (--insecure): plaintext, no tokens, no scopes; anyone who "
                         "can reach these ports may call every RPC. For a local demo only (docs/auth.md).[/]")
    return settings.model_copy(update={"auth": settings.auth.model_copy(update={"insecure": True})})


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def running_locally(settings: Settings) -> Iterator[dict[str, str]]:
    """The three services in this process on their configured loopback ports (``seal up``,
    ``seal demo``): the same ``seal.stack.local_stack`` the tests start on free ports."""
    from seal.auth import check_server_settings
    from seal.stack import local_stack

    check_server_settings(settings.auth)  # a missing principals file or certificate fails here, by name
    with ExitStack() as running:
        log_path = running.enter_context(_service_logs_to(settings.home / "logs" / "services.log"))
        render.console.print(f"service logs: {log_path} (warnings here too)")
        with render.console.status("starting student, auditor and teacher (each loads the model)"), \
                _signals_held_until_started():
            stack = running.enter_context(local_stack(
                settings, ports="configured", student_backend=None, grace_s=settings.services.shutdown_grace_s,
            ))
        yield stack.addresses


@contextmanager
def _signals_held_until_started() -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM while the services start is held and raised as
    KeyboardInterrupt once all three have started, so the stack stops whole: an interrupt in the
    middle of a service's start would leave its server threads running and the process hanging."""
    received: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


@contextmanager
def _service_logs_to(path: Path) -> Iterator[Path]:
    """While the services run in this process, their log records go to ``path`` and the console
    shows warnings and errors only, so that the command's own output stays readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
    levels = [h.level for h in consoles]
    for console in consoles:
        console.setLevel(max(console.level, logging.WARNING))
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        for console, level in zip(consoles, levels, strict=True):
            console.setLevel(level)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    settings = with_insecure(settings, args.insecure)
    try:
        with running_locally(settings) as addresses:
            render.console.print(f"all services up: {addresses}; Ctrl-C stops them")
            # Both set here: a process started in the background by a non-interactive shell
            # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
            signal.signal(signal.SIGINT, _interrupt)
            signal.signal(signal.SIGTERM, _interrupt)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, during the start or after: the stack has stopped
        pass
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Prepare the model, start the services, adapt on one SQuAD passage, print the result."""
    settings = with_insecure(settings, args.insecure)
    cmd_prepare_model(args, settings)
    context = load_context(args)
    render.console.print(
        f"passage {args.index} of {args.squad_file}: [bold]{context.title}[/] ({len(context.questions)} questions)")
    with running_locally(settings):
        result = run_adapt(settings.services.address_of("teacher"), adapt_request(context, args), args.timeout,
                           auth=settings.auth, token_file=args.token_file)
        render.print_result(result)
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
            render.console.print(
                f"served by {reply.served_adapter_id} ({role}, {backend}): Q: {question} → {reply.completions[0].text!r}"
            )
    return 0


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    """The standard gRPC health check (the service a Kubernetes probe asks) of every service;
    what the chart's `helm test` pod runs."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from seal.rpc import dial

    targets = [t.partition("=")[::2] for t in args.address] if args.address else \
        [(name, settings.services.address_of(name)) for name in SERVICES]
    healthy = True
    for name, address in targets:
        if not address:
            render.console.print(f"[red]{name}[/]: no address (use NAME=HOST:PORT)")
            healthy = False
            continue
        with dial(address, settings.auth, with_token=False) as channel:  # health checks are open
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                status = f"{exc.code().name}: {exc.details()}"
        healthy = healthy and status == "SERVING"
        render.console.print(f"{name} {address}: {'[green]' if status == 'SERVING' else '[red]'}{status}[/]")
    return 0 if healthy else 1
