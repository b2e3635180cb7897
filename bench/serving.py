"""Serving the student through Triton vs in-process: start time, latency, throughput, swap cost.

Builds the tiny random Llama of the tests (or uses the embedded SmolLM2-135M with --model
embedded), two LoRA adapters with non-zero weights, starts a real tritonserver on loopback, and
measures: server start; adapter promote (load + switch) and rollback (switch only); sequential
generate latency through Triton vs the same PEFT model in this process; throughput with several
concurrent clients (dynamic batching); the worst request latency while a swap happens under load.

    .venv/bin/python bench/serving.py --requests 40 --out bench/results/serving
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seal.models import prepare_embedded_model, prepare_embedded_tokenizer  # noqa: E402
from seal.serving.triton.server import TritonSupervisor  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

PROMPT = "The lighthouse of Velmora is"


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * pick(0.95), "n": len(ordered)}


def in_process_engine(base: Path, adapter: Path, threads: int):
    """The same PEFT model answered by the student's own engine in this process."""
    from peft import PeftModel

    from seal.models import TransformersEngine, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(base, torch_threads=threads)
    return TransformersEngine(PeftModel.from_pretrained(model, adapter).eval(), tokenizer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per latency run")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server instance and in-process")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for throughput")
    parser.add_argument("--window", type=float, default=5.0, help="seconds of load before and after the swap")
    parser.add_argument("--cache", default=str(ROOT / ".seal/models"), help="where the embedded model is prepared")
    parser.add_argument("--out", default="", help="directory for a JSON result (printed anyway)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="seal-bench-serving-"))
    if args.model == "tiny":
        base = build_tiny_model(work / "base", prepare_embedded_tokenizer(work / "cache"), seed=0)
    else:
        base = prepare_embedded_model(Path(args.cache))
    adapters = {v: make_adapter(base, work / v, seed) for v, seed in (("v1", 1), ("v2", 2))}
    result: dict[str, object] = {"model": args.model, "base": str(base), "threads": args.threads,
                                 "max_new_tokens": args.max_new_tokens, "host": platform.node()}

    supervisor = TritonSupervisor(work / "triton", base, model_parameters={"torch_threads": str(args.threads)})
    started = time.perf_counter()
    supervisor.start(timeout_s=300)
    result["server_start_s"] = time.perf_counter() - started
    try:
        with supervisor.client() as client:
            timed = time.perf_counter()
            client.promote("v1", adapters["v1"])
            result["first_promote_s"] = time.perf_counter() - timed
            timed = time.perf_counter()
            client.promote("v2", adapters["v2"])
            result["promote_new_adapter_s"] = time.perf_counter() - timed
            timed = time.perf_counter()
            client.rollback()
            result["rollback_s"] = time.perf_counter() - timed

            tokens = {"triton": 0, "in_process": 0}

            def run(n: int) -> list[float]:
                samples = []
                for _ in range(n):
                    began = time.perf_counter()
                    answers = client.generate(PROMPT, max_new_tokens=args.max_new_tokens)
                    samples.append(time.perf_counter() - began)
                    tokens["triton"] += sum(a.completion_tokens for a in answers)
                return samples

            def server_stats() -> dict[str, tuple[int, int]]:
                stats = client._client.get_inference_statistics(client.model_name, as_json=True)
                inference = stats["model_stats"][0]["inference_stats"]
                return {k: (int(v.get("count", 0)), int(v.get("ns", 0))) for k, v in inference.items()}

            from seal.models import SamplingParams

            engine = in_process_engine(base, adapters["v1"], args.threads)
            params = SamplingParams(max_new_tokens=args.max_new_tokens)
            local: list[float] = []
            run(2)
            engine.generate([PROMPT], params)
            before = server_stats()
            tokens.update(triton=0, in_process=0)
            remote: list[float] = []
            # Interleaved, so that both see the same load from whatever else shares the machine.
            for _ in range(args.requests):
                remote += run(1)
                began = time.perf_counter()
                answers = engine.generate([PROMPT], params)
                local.append(time.perf_counter() - began)
                tokens["in_process"] += sum(a.completion_tokens for a in answers)
            after = server_stats()
            result["triton_latency"] = percentiles(remote)
            result["in_process_latency"] = percentiles(local)
            result["triton_tokens_per_s"] = tokens["triton"] / sum(remote)
            result["in_process_tokens_per_s"] = tokens["in_process"] / sum(local)
            # Where a request's time goes inside Triton (the rest is gRPC, client and scheduling).
            result["triton_server_side_ms"] = {
                k: (after[k][1] - before[k][1]) / 1e6 / max(1, after[k][0] - before[k][0])
                for k in ("queue", "compute_input", "compute_infer", "compute_output") if k in after
            }

            # Throughput and the latency a swap costs the requests around it.
            latencies: list[tuple[float, float]] = []
            lock = threading.Lock()
            stop = threading.Event()

            def worker() -> None:
                with supervisor.client() as own:
                    while not stop.is_set():
                        began = time.perf_counter()
                        own.generate(PROMPT, max_new_tokens=args.max_new_tokens)
                        with lock:
                            latencies.append((began, time.perf_counter() - began))

            threads = [threading.Thread(target=worker) for _ in range(args.clients)]
            window_start = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(args.window)
            swap_began = time.perf_counter()
            client.promote("v2", adapters["v2"])
            swap_ended = time.perf_counter()
            time.sleep(args.window)
            stop.set()
            for t in threads:
                t.join()
            window = time.perf_counter() - window_start
            around = [d for began, d in latencies if began + d >= swap_began and began <= swap_ended]
            steady = [d for began, d in latencies if began + d < swap_began]
            result["concurrent"] = {
                "clients": args.clients,
                "requests_per_s": len(latencies) / window,
                "steady": percentiles(steady),
                "swap_under_load_s": swap_ended - swap_began,
                "worst_latency_around_swap_ms": 1000 * max(around) if around else None,
            }
    finally:
        timed = time.perf_counter()
        supervisor.stop()
        result["server_stop_s"] = time.perf_counter() - timed
        result["leftover_processes"] = supervisor.leftover_processes()

    result["command"] = " ".join([".venv/bin/python", "bench/serving.py", *sys.argv[1:]])
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        if out.suffix in (".json", ".md"):  # bench/results/serving.json -> serving.json + serving.md
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(text + "\n")
            out.with_suffix(".md").write_text(markdown(result))
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"serving-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text + "\n")
    return 0


def markdown(r: dict) -> str:
    t, p, c = r["triton_latency"], r["in_process_latency"], r["concurrent"]
    return "\n".join([
        f"# Student serving: Triton vs in-process ({r['model']} model, {r['max_new_tokens']} new tokens, "
        f"{r['threads']} torch thread(s))",
        "",
        f"Command: `{r['command']}` ({r['date']}, host {r['host']}).",
        "",
        "| path | p50 ms | p95 ms | tokens/s (sequential) |",
        "|---|---|---|---|",
        f"| Triton (gRPC, Python backend) | {t['p50_ms']:.1f} | {t['p95_ms']:.1f} | {r['triton_tokens_per_s']:.1f} |",
        f"| in-process PEFT | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {r['in_process_tokens_per_s']:.1f} |",
        "",
        f"- server start: {r['server_start_s']:.1f} s; first promote (load) {r['first_promote_s']:.2f} s, "
        f"promote of a new adapter {r['promote_new_adapter_s']:.2f} s, rollback (routing only) {r['rollback_s']:.2f} s",
        f"- {c['clients']} concurrent clients: {c['requests_per_s']:.1f} req/s, steady p50 {c['steady']['p50_ms']:.1f} ms / "
        f"p95 {c['steady']['p95_ms']:.1f} ms",
        f"- promote (swap) under that load: {c['swap_under_load_s']:.2f} s wall; worst request latency around the "
        f"swap {c['worst_latency_around_swap_ms'] or 0:.1f} ms; server stop {r['server_stop_s']:.1f} s, "
        f"leftover processes {r['leftover_processes']}",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
