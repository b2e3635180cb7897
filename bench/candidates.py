"""k candidates of one passage: sequential LoRA SFT (a deep copy of the base per candidate, one
small run after another) against batched multi-LoRA training (seal.update.multi_lora: the k
adapters on the one base, one forward/backward per step), in one run, same passage and seeds.

Per k and path: wall time of training and of scoring (greedy closed-book answers to the
passage's questions by the student's engine: per candidate model in the sequential path, one
mixed-adapter generate with ``adapter_names=`` in the batched one, as the auditor's ScoreMany asks
the student for it), candidates per minute, peak RSS during the phase
(sampled every 20 ms), and whether the two paths agree: the largest LoRA weight difference, the
final training losses, the answers and the accuracy.

Candidates differ like real self-edits do: each trains on its own subset of the passage's
statements, with seed ``--seed + i`` and a learning rate alternating between the product default
and half of it; everything else is ``settings.lora`` (rehearsal and the KL penalty included,
anchors from the student's cache).

    nice -n 5 .venv/bin/python bench/candidates.py --ks 1,2,4,8 --threads 1
    .venv/bin/python bench/candidates.py --device cuda --ks 1,2,4,8,16   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.forgetting import INVENTED, Passage  # noqa: E402
from seal.anchors import AnchorStore, anchor_examples  # noqa: E402
from seal.config import Settings  # noqa: E402
from seal.domains.knowledge import build_question_prompt, build_training_sequences  # noqa: E402
from seal.models import (  # noqa: E402
    SamplingParams,
    TransformersEngine,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model_path,
)
from seal.update.lora_sft import LoraSFTTrainer, TrainingDiverged, lora_sft_config  # noqa: E402
from seal.update.multi_lora import AdapterSpec, MultiLoraConfig, MultiLoraTrainer  # noqa: E402


class PeakRss:
    """Peak resident memory of this process while the block runs (ru_maxrss cannot be reset)."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self.current()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    def _poll(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.current())

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def statements(passage: Passage) -> list[str]:
    """The passage's facts as short lines: its sentences and its questions answered."""
    sentences = [s.strip() + "." for s in passage.text.split(". ") if s.strip()]
    answered = [f"{question} {answer}." for question, answer, _ in passage.questions]
    return [s.rstrip(".") + "." for s in sentences + answered]


def candidate_lines(passage: Passage, index: int, per_candidate: int) -> list[str]:
    """Candidate ``index``'s self-edit: a rotating window over the statements (distinct per index)."""
    lines = statements(passage)
    return [lines[(index + offset) % len(lines)] for offset in range(per_candidate)]


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int,
                   adapter_names: list[str] | None = None) -> list[str]:
    """Greedy chat answers by the student's own engine (``TransformersEngine``, batches of
    ``auditor.batch_size``); ``adapter_names`` routes each row to its adapter, as the in-process
    student's GenerateMixed does when the auditor scores k candidates (``Auditor.score_many``)."""
    engine = TransformersEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return [g.text.strip() for g in engine.generate(prompts, params, batch_size=batch_size, adapter_names=adapter_names)]


def correct(answer: str, gold: str) -> bool:
    return gold.casefold() in answer.casefold()


def lora_tensors(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    marker = f".{adapter}."
    return {n.replace(marker, "."): p.detach().float().cpu().clone()
            for n, p in model.named_parameters() if "lora_" in n and marker in n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="1,2,4,8", help="candidate counts, comma-separated")
    parser.add_argument("--passage", type=int, default=0, help="index into bench/forgetting.py's invented passages")
    parser.add_argument("--lines", type=int, default=4, help="statements per candidate's self-edit")
    parser.add_argument("--epochs", type=int, default=0, help="override settings.lora.epochs (0 = keep)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="length of the scored answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-pass", type=int, default=MultiLoraConfig().max_rows_per_pass,
                        help="MultiLoraConfig.max_rows_per_pass: rows of all candidates in one forward/backward")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch decides")
    parser.add_argument("--out", default=str(ROOT / "bench/results/candidates"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings(seed=args.seed)
    model_path = resolve_model_path(settings.model)
    dtype = "bfloat16" if args.device == "cuda" else settings.model.dtype
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype, device=args.device)
    fingerprint = model_fingerprint(model_path)
    lora_overrides: dict[str, Any] = {"epochs": args.epochs} if args.epochs else {}
    base_config = lora_sft_config(settings.lora, seed=args.seed, overrides=lora_overrides)
    anchor_set = AnchorStore(settings.home / "student" / "anchors").load_or_build(
        fingerprint, model, tokenizer, max_new_tokens=settings.lora.anchor_max_new_tokens)
    anchors = anchor_examples(tokenizer, anchor_set, max_seq_len=base_config.max_seq_len)
    passage = INVENTED[args.passage]
    prompts = [build_question_prompt(q) for q, _, _ in passage.questions]
    golds = [a for _, a, _ in passage.questions]

    def specs_for(k: int) -> list[AdapterSpec]:
        specs = []
        for i in range(k):
            lr = settings.lora.learning_rate * (1.0 if i % 2 == 0 else 0.5)
            config = lora_sft_config(settings.lora, seed=args.seed + i, overrides={**lora_overrides, "learning_rate": lr})
            texts = build_training_sequences(passage.title, passage.text, candidate_lines(passage, i, args.lines))
            sequences = LoraSFTTrainer(model, tokenizer, config).tokenize(texts)
            specs.append(AdapterSpec(f"candidate_{i}", config, sequences, anchors if config.uses_anchors else ()))
        return specs

    report: dict[str, Any] = {
        "command": " ".join(["nice -n 5 .venv/bin/python", *sys.argv]),
        "machine": {"torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "device": args.device, "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg()},
        "model": model_path.name,
        "passage": passage.title,
        "rows_per_pass": args.rows_per_pass,
        "lora": {**base_config.__dict__, "learning_rate": f"{settings.lora.learning_rate:g} / half, alternating",
                 "seed": f"{args.seed} + candidate index"},
        "rows": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    for k in [int(x) for x in args.ks.split(",") if x]:
        specs = specs_for(k)
        # --- sequential: one deep copy and one run per candidate, then its own generate
        seq_weights, seq_losses, seq_answers = [], [], []
        train_s = score_s = 0.0
        with PeakRss() as seq_rss:
            for spec in specs:
                started = time.perf_counter()
                try:
                    result = LoraSFTTrainer(model, tokenizer, spec.config).train_tokenized(
                        spec.sequences, anchors=list(spec.anchors) or None)
                except TrainingDiverged as exc:
                    print(f"k={k} sequential {spec.name} diverged: {exc}", flush=True)
                    seq_weights.append({}), seq_losses.append(None), seq_answers.append([])
                    continue
                train_s += time.perf_counter() - started
                started = time.perf_counter()
                seq_answers.append(greedy_answers(result.model, tokenizer, prompts, args.max_new_tokens,
                                                  settings.auditor.batch_size))
                score_s += time.perf_counter() - started
                seq_weights.append(lora_tensors(result.model, "default"))
                seq_losses.append(result.losses[-1])
                del result
        # --- batched: the k adapters on the one base, then one mixed-adapter generate
        with PeakRss() as batch_rss:
            started = time.perf_counter()
            with MultiLoraTrainer(model, tokenizer, specs, MultiLoraConfig(args.rows_per_pass)).train() as trained:
                batch_train_s = time.perf_counter() - started
                started = time.perf_counter()
                names = [run.name for run in trained.runs for _ in prompts]
                flat = greedy_answers(trained.model, tokenizer, prompts * k, args.max_new_tokens,
                                      settings.auditor.batch_size, adapter_names=names)
                batch_score_s = time.perf_counter() - started
                batch_answers = [flat[i * len(prompts):(i + 1) * len(prompts)] for i in range(k)]
                batch_weights = [lora_tensors(trained.model, run.name) for run in trained.runs]
                batch_losses = [run.losses[-1] if run.error is None else None for run in trained.runs]
        max_diff = max((float((batch_weights[i][n] - t).abs().max()) for i in range(k) for n, t in seq_weights[i].items()),
                       default=0.0)
        accuracy = {
            "sequential": sum(correct(a, g) for answers in seq_answers for a, g in zip(answers, golds)) / (k * len(golds)),
            "batched": sum(correct(a, g) for answers in batch_answers for a, g in zip(answers, golds)) / (k * len(golds)),
        }
        row = {
            "k": k,
            "sequential": {"train_s": round(train_s, 2), "score_s": round(score_s, 2),
                           "candidates_per_min": round(60 * k / (train_s + score_s), 2),
                           "peak_rss_mib": round(seq_rss.peak / 2**20),
                           "rss_growth_mib": round((seq_rss.peak - seq_rss.start) / 2**20)},
            "batched": {"train_s": round(batch_train_s, 2), "score_s": round(batch_score_s, 2),
                        "candidates_per_min": round(60 * k / (batch_train_s + batch_score_s), 2),
                        "peak_rss_mib": round(batch_rss.peak / 2**20),
                        "rss_growth_mib": round((batch_rss.peak - batch_rss.start) / 2**20)},
            "speedup_train": round(train_s / batch_train_s, 2),
            "speedup_score": round(score_s / batch_score_s, 2),
            "speedup_total": round((train_s + score_s) / (batch_train_s + batch_score_s), 2),
            "max_weight_diff": max_diff,
            "final_losses": {"sequential": seq_losses, "batched": batch_losses},
            "accuracy": accuracy,
            "same_answers": seq_answers == batch_answers,
        }
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# k candidates: sequential vs batched multi-LoRA training",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: {report['model']} on {report['machine']['device']}, {report['machine']['torch_threads']} torch "
        f"thread(s), load average at start {tuple(round(x, 1) for x in report['machine']['load_average_at_start'])}; "
        f"passage: {report['passage']}; batched rows per pass: {report['rows_per_pass']}.",
        "",
        "| k | seq train s | batched train s | train × | seq score s | batched score s | score × | total × "
        "| cand/min seq → batched | peak RSS MiB seq / batched (growth in the phase) | max weight diff | accuracy seq / batched | same answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        s, b = r["sequential"], r["batched"]
        lines.append(
            f"| {r['k']} | {s['train_s']} | {b['train_s']} | {r['speedup_train']} | {s['score_s']} | {b['score_s']} "
            f"| {r['speedup_score']} | {r['speedup_total']} | {s['candidates_per_min']} → {b['candidates_per_min']} "
            f"| {s['peak_rss_mib']} / {b['peak_rss_mib']} (+{s['rss_growth_mib']} / +{b['rss_growth_mib']}) | {r['max_weight_diff']:.1e} "
            f"| {r['accuracy']['sequential']:.2f} / {r['accuracy']['batched']:.2f} | {r['same_answers']} |"
        )
    lines += ["", "LoRA settings (product defaults unless stated): `" + json.dumps(report["lora"]) + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
