"""Operator commands: ``seal adapters`` (list, promote, roll back), ``seal audit`` (read and verify
the audit trail, ask for a retention re-check), ``seal auth`` (tokens and principals) and
``seal config`` (the effective settings)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.table import Table
from rich.text import Text

from seal.cli import render
from seal.cli.client import add_token_arg, client_channel
from seal.config import Settings
from seal.v1 import common_pb2, student_pb2, student_pb2_grpc


def register(commands: argparse._SubParsersAction) -> None:
    adapters = commands.add_parser("adapters", help="list, promote or roll back adapter versions")
    adapters.add_argument("action", choices=("list", "promote", "rollback"))
    adapters.add_argument("adapter_id", nargs="?", default="")
    adapters.add_argument("--name", help="adapter lineage (default from settings)")
    adapters.add_argument("--reason", default="operator request")
    adapters.add_argument("--to-base", action="store_true", help="rollback may leave the base model serving")
    add_token_arg(adapters)
    adapters.set_defaults(handler=cmd_adapters)

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
    audit.set_defaults(handler=cmd_audit)

    auth = commands.add_parser("auth", help="make a bearer token, hash one, or check a principals file (docs/auth.md)")
    auth.add_argument("action", choices=("token", "hash", "check"))
    auth.add_argument("name", nargs="?", help="token: the principal's name")
    auth.add_argument("--scope", action="append", default=[], help="token: a scope of the principal (repeatable)")
    auth.add_argument("--out", help="token: write the token to this file (mode 0600); without it the token is the first line printed")
    auth.add_argument("--principals-file", help="check: the file (default auth.principals_file)")
    auth.set_defaults(handler=cmd_auth)

    config = commands.add_parser("config", help="show the effective settings and where each value came from")
    config.add_argument("action", choices=("show",))
    config.add_argument("--json", action="store_true", help="machine-readable output")
    config.set_defaults(handler=cmd_config)


# --- seal adapters ------------------------------------------------------------------------------


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
            render.console.print(table)
        elif args.action == "promote":
            reply = stub.Promote(student_pb2.PromoteRequest(adapter_id=args.adapter_id, reason=args.reason), timeout=60)
            render.console.print(f"promoted {reply.adapter.adapter_id}")
        else:
            reply = stub.Rollback(
                student_pb2.RollbackRequest(adapter_name=args.name or "", reason=args.reason, allow_base_model=args.to_base),
                timeout=60,
            )
            now = reply.now_serving.adapter_id if reply.HasField("now_serving") else "the base model"
            render.console.print(f"rolled back {reply.rolled_back.adapter_id}; now serving {now}")
    return 0


# --- seal audit ---------------------------------------------------------------------------------


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
    console = render.console
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


# --- seal auth ----------------------------------------------------------------------------------


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
        render.console.print(f"[green]{path}: {len(principals.names)} principals[/]: {', '.join(principals.names)}")
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


# --- seal config --------------------------------------------------------------------------------


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
    render.console.print(table)
    return 0
