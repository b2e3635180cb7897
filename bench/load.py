"""A flood on the three services: N concurrent Adapt calls plus a steady Generate stream.

Builds the tiny random Llama of the tests, starts student, auditor and teacher as three real
`seal serve` processes on loopback (authentication off: a load test of the queues, not of auth),
then at once opens --adapts concurrent Adapt calls (k=1 each) while one client sends a Generate
every --generate-interval seconds and another checks every service's health every half second.
Reports per call kind: status counts and p50/p95 latency (a refusal's latency is how fast it was
refused); health answers during the flood; peak RSS of each service process (VmHWM). The queues
are the defaults of seal.config unless overridden with SEAL_… variables.

    .venv/bin/python bench/load.py --adapts 50 --out bench/results/load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from seal.cli.supervisor import SERVICES, ServiceProcess  # noqa: E402
from seal.models import prepare_embedded_tokenizer  # noqa: E402
from seal.v1 import common_pb2, student_pb2, student_pb2_grpc, teacher_pb2, teacher_pb2_grpc  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)

def free_port() -> int:
    """A port free now. The three services must know each other's addresses before any of them
    starts (the student reports to the auditor, the auditor asks the student), so they are chosen
    up front; a bench can afford the small race a test could not."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

def percentiles(samples: list[float]) -> dict[str, float | int]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"n": len(ordered), "p50_s": round(statistics.median(ordered), 3), "p95_s": round(p95, 3),
            "max_s": round(ordered[-1], 3)}

def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024, 1)

def adapt_request(seed: int) -> teacher_pb2.AdaptRequest:
    return teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title="Velmora", passage=PASSAGE),
        questions=[common_pb2.Question(question="Who founded Velmora?", answer="Ilse Marrow"),
                   common_pb2.Question(question="How tall is the Grey Lantern?", answer="41 meters")],
        k=1, seed=seed,
    )

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapts", type=int, default=50, help="concurrent Adapt calls")
    parser.add_argument("--adapt-deadline", type=float, default=600.0, help="deadline of each Adapt call, seconds")
    parser.add_argument("--generate-interval", type=float, default=0.25, help="seconds between two Generate calls")
    parser.add_argument("--generate-deadline", type=float, default=10.0, help="deadline of each Generate call")
    parser.add_argument("--out", default="", help="directory prefix for load.json and load.md (printed anyway)")
    args = parser.parse_args()
    # SIGTERM ends the run through the finally below, so no service outlives it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="seal-bench-load-"))
    base = build_tiny_model(work / "base", prepare_embedded_tokenizer(work / "cache"), seed=0)
    ports = {name: free_port() for name in SERVICES}
    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
        "SEAL_HOME": str(work / "home"), "SEAL_MODEL__PATH": str(base), "SEAL_MODEL__TORCH_THREADS": "1",
        "SEAL_AUTH__INSECURE": "true",
        # In-process generation: no tritonserver beside three services on a small shared machine
        # (Triton is the chart's default; its throughput is bench/serving.py's subject).
        "SEAL_STUDENT_SERVING__BACKEND": "in_process",
        # As the pipeline tests: short self-edits and answers, two epochs, no entity guardrail
        # (random weights emit random proper nouns), every candidate scored.
        "SEAL_TEACHER__MAX_NEW_TOKENS": "40", "SEAL_AUDITOR__ANSWER_MAX_NEW_TOKENS": "8",
        "SEAL_LORA__EPOCHS": "2", "SEAL_LORA__BATCH_SIZE": "4", "SEAL_LORA__MAX_SEQ_LEN": "64",
        "SEAL_GUARDRAILS__UNKNOWN_ENTITIES__ENABLED": "false",
        **{f"SEAL_SERVICES__{name.upper()}_PORT": str(port) for name, port in ports.items()},
        **{f"SEAL_SERVICES__{name.upper()}_ADDRESS": address for name, address in addresses.items()},
    }
    services: dict[str, ServiceProcess] = {}
    try:
        for name in SERVICES:
            services[name] = ServiceProcess(name, env=env, log=work / f"{name}.log", metrics_port=0, cwd=ROOT)
            services[name].wait_serving(addresses[name], timeout=300)
        print(f"services up: {addresses}", flush=True)
        # Warm-up (not counted): the first Adapt builds the anchor set the student rehearses.
        with grpc.insecure_channel(addresses["teacher"]) as channel:
            warm_started = time.monotonic()
            list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(adapt_request(0), timeout=args.adapt_deadline))
            warm_up_s = time.monotonic() - warm_started
        print(f"warm-up Adapt: {warm_up_s:.1f} s", flush=True)

        flood_over = threading.Event()
        lock = threading.Lock()
        adapt_results: list[tuple[str, float]] = []
        generate_results: list[tuple[str, float]] = []
        health_results: dict[str, Counter[str]] = {name: Counter() for name in SERVICES}
        retry_hints_ms: list[int] = []

        def one_adapt(seed: int, channel: grpc.Channel) -> None:
            started = time.monotonic()
            try:
                list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(adapt_request(seed), timeout=args.adapt_deadline))
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
                if hint is not None:
                    with lock:
                        retry_hints_ms.append(int(hint))
            with lock:
                adapt_results.append((code, time.monotonic() - started))

        def generate_stream() -> None:
            with grpc.insecure_channel(addresses["student"]) as channel:
                stub = student_pb2_grpc.StudentServiceStub(channel)
                while not flood_over.is_set():
                    started = time.monotonic()
                    try:
                        stub.Generate(student_pb2.GenerateRequest(prompts=["The lighthouse of Velmora is"],
                                                                  max_new_tokens=8), timeout=args.generate_deadline)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    with lock:
                        generate_results.append((code, time.monotonic() - started))
                    flood_over.wait(max(0.0, args.generate_interval - (time.monotonic() - started)))

        def health_watch() -> None:
            channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
            try:
                while not flood_over.is_set():
                    for name, channel in channels.items():
                        try:
                            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                            answer = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                        except grpc.RpcError as exc:
                            answer = exc.code().name
                        health_results[name][answer] += 1
                    flood_over.wait(0.5)
            finally:
                for channel in channels.values():
                    channel.close()

        watchers = [threading.Thread(target=generate_stream), threading.Thread(target=health_watch)]
        for watcher in watchers:
            watcher.start()
        flood_started = time.monotonic()
        # One channel per ten callers: fifty HTTP/2 streams on one connection is no flood for grpc.
        channels = [grpc.insecure_channel(addresses["teacher"]) for _ in range(-(-args.adapts // 10))]
        callers = [threading.Thread(target=one_adapt, args=(seed, channels[seed % len(channels)]))
                   for seed in range(1, args.adapts + 1)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        flood_s = time.monotonic() - flood_started
        flood_over.set()
        for watcher in watchers:
            watcher.join()
        for channel in channels:
            channel.close()
        rss = {name: peak_rss_mb(service.process.pid) for name, service in services.items()}
    finally:
        for service in reversed(list(services.values())):
            service.stop()
        shutil.rmtree(work, ignore_errors=True)

    def summary(results: list[tuple[str, float]]) -> dict[str, object]:
        codes = Counter(code for code, _ in results)
        return {
            "status_counts": dict(codes),
            "latency_by_status": {code: percentiles([s for c, s in results if c == code]) for code in sorted(codes)},
        }

    report = {
        "command": "bench/load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": "tiny random Llama (tests/tiny_model.py), torch_threads=1 per service",
        "queues": "seal.config defaults: teacher.adapt_queue_depth=4, adapt_queue_wait_s=120; "
                  "student.training_slots=1, training_queue_depth=2; generation_slots=4, generation_queue_depth=8",
        "warm_up_adapt_s": round(warm_up_s, 1),
        "flood_s": round(flood_s, 1),
        "adapt": {"calls": args.adapts, **summary(adapt_results),
                  "retry_after_ms": percentiles([h / 1000 for h in retry_hints_ms]) if retry_hints_ms else {}},
        "generate": {"interval_s": args.generate_interval, "deadline_s": args.generate_deadline,
                     **summary(generate_results)},
        "health_during_flood": {name: dict(counts) for name, counts in health_results.items()},
        "peak_rss_mb": rss,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(text + "\n")
        out.with_suffix(".md").write_text(markdown(report))
    return 0

def markdown(report: dict) -> str:
    def rows(kind: str) -> list[str]:
        lines = []
        for code, stats in report[kind]["latency_by_status"].items():
            lines.append(f"| {kind} | {code} | {stats['n']} | {stats.get('p50_s', '')} | {stats.get('p95_s', '')} "
                         f"| {stats.get('max_s', '')} |")
        return lines

    health = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                       for name, counts in report["health_during_flood"].items())
    hints = report["adapt"]["retry_after_ms"]
    return "\n".join([
        "# Load: concurrent Adapt calls plus a steady Generate stream",
        "",
        f"Command: `.venv/bin/python {report['command']}`",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs (shared with other work). "
        f"Model: {report['model']}. Three `seal serve` processes on loopback, authentication off, "
        "the student generating in process (no Triton).",
        f"Queues: {report['queues']}.",
        "",
        f"{report['adapt']['calls']} Adapt calls opened at once (k=1 each; a warm-up Adapt beforehand took "
        f"{report['warm_up_adapt_s']} s), one Generate every {report['generate']['interval_s']} s "
        f"(deadline {report['generate']['deadline_s']} s) until the last Adapt ended: {report['flood_s']} s.",
        "",
        "| call | status | n | p50 s | p95 s | max s |",
        "|---|---|---|---|---|---|",
        *rows("adapt"),
        *rows("generate"),
        "",
        "Refused Adapt calls carry a retry hint (trailing `retry-after-ms` = `grpc-retry-pushback-ms`): "
        + (f"p50 {hints['p50_s']} s, max {hints['max_s']} s over {hints['n']} refusals." if hints else "none refused."),
        "",
        f"Health checks during the flood (every 0.5 s per service): {health}.",
        "",
        "Peak RSS (VmHWM) per service process: "
        + ", ".join(f"{name} {mb} MB" for name, mb in report["peak_rss_mb"].items()) + ".",
        "",
    ])

if __name__ == "__main__":
    raise SystemExit(main())
