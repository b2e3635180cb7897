"""Padding in LoRA training: one padded pass per step against passes grouped by row length.

A training step mixes a self-edit's short lines with the passage and the anchors (the base
model's own answers, ``lora.rehearsal_ratio``). Padded into one pass, every row costs what the
longest does; ``seal.update.lora_sft.row_sums`` runs rows of similar length together instead
(``MAX_PADDING_SHARE``) and sums each row's loss, which changes no loss beyond float rounding.

Per self-edit size (``--lines``) and layout: wall time to train k candidates with the batched
trainer (``MultiLoraTrainer``) and with the sequential one (``LoraSFTTrainer``), product LoRA
defaults with ``--epochs``, in one run on one passage; the final losses of the two layouts are
compared.

    .venv/bin/python bench/length_groups.py --k 4 --epochs 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.candidates import candidate_lines  # noqa: E402
from bench.forgetting import INVENTED  # noqa: E402
from seal.anchors import AnchorStore, anchor_examples  # noqa: E402
from seal.config import Settings  # noqa: E402
from seal.domains.knowledge import build_training_sequences  # noqa: E402
from seal.models import load_model_and_tokenizer, model_fingerprint, resolve_model_path  # noqa: E402
from seal.update import lora_sft  # noqa: E402
from seal.update.lora_sft import LoraSFTTrainer, lora_sft_config  # noqa: E402
from seal.update.multi_lora import AdapterSpec, MultiLoraTrainer  # noqa: E402

# One padded pass per step (what both trainers did before row_sums), and today's default.
LAYOUTS = {"one padded pass": 1.0, "grouped by length": lora_sft.MAX_PADDING_SHARE}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lines", default="1,6", help="self-edit lines per candidate, comma-separated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--passage", type=int, default=0, help="index into bench/forgetting.py's invented passages")
    parser.add_argument("--threads", type=int, default=2, help="torch threads; 0 = torch decides")
    parser.add_argument("--out", default=str(ROOT / "bench/results/length_groups"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings()
    model_path = resolve_model_path(settings.model)
    model, tokenizer = load_model_and_tokenizer(model_path)
    anchor_set = AnchorStore(settings.home / "student" / "anchors").load_or_build(
        model_fingerprint(model_path), model, tokenizer, max_new_tokens=settings.lora.anchor_max_new_tokens)
    anchors = anchor_examples(tokenizer, anchor_set, max_seq_len=settings.lora.max_seq_len)
    passage = INVENTED[args.passage]
    rows: list[dict[str, Any]] = []
    for lines in (int(n) for n in args.lines.split(",")):
        specs = []
        for i in range(args.k):
            config = lora_sft_config(settings.lora, seed=i, overrides={"epochs": args.epochs})
            texts = build_training_sequences(passage.title, passage.text, candidate_lines(passage, i, lines))
            specs.append(AdapterSpec(f"c{i}", config, LoraSFTTrainer(model, tokenizer, config).tokenize(texts), anchors))
        for layout, share in LAYOUTS.items():
            # row_sums reads its default per call; both trainers go through it.
            lora_sft.row_sums.__kwdefaults__["max_padding_share"] = share
            started = time.perf_counter()
            with MultiLoraTrainer(model, tokenizer, specs).train() as trained:
                batched_losses = [run.losses[-1] for run in trained.runs]
            batched = time.perf_counter() - started
            started = time.perf_counter()
            sequential_losses = [
                LoraSFTTrainer(model, tokenizer, spec.config).train_tokenized(spec.sequences, anchors=anchors).losses[-1]
                for spec in specs
            ]
            sequential = time.perf_counter() - started
            row = {
                "lines": lines, "layout": layout, "max_padding_share": share,
                "sequence_tokens": [len(s) for s in specs[0].sequences],
                "batched_s": round(batched, 1), "sequential_s": round(sequential, 1),
                "final_losses_batched": batched_losses, "final_losses_sequential": sequential_losses,
            }
            print(row, flush=True)
            rows.append(row)
    lora_sft.row_sums.__kwdefaults__["max_padding_share"] = lora_sft.MAX_PADDING_SHARE

    report = {
        "command": "python bench/length_groups.py " + " ".join(sys.argv[1:]),
        "k": args.k, "epochs": args.epochs, "passage": passage.title, "threads": args.threads,
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    lines_md = [
        "# Padding in LoRA training (generated by bench/length_groups.py)", "",
        f"Command: `{report['command']}`  ",
        f"SmolLM2-135M-Instruct on CPU, {args.threads} torch threads, k={args.k} candidates, {args.epochs} epochs, "
        f"product LoRA defaults (rehearsal and KL on); passage \"{passage.title}\"; load average at start "
        f"{report['load_average']}.", "",
        "| self-edit lines | tokens per sequence | layout | batched s | sequential s | largest final-loss difference |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        reference = next(r for r in rows if r["lines"] == row["lines"] and r["max_padding_share"] == 1.0)
        diff = max(abs(a - b) for a, b in zip(row["final_losses_batched"], reference["final_losses_batched"], strict=True))
        lines_md.append(
            f"| {row['lines']} | {row['sequence_tokens']} | {row['layout']} | {row['batched_s']} | {row['sequential_s']} "
            f"| {diff:.1e} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines_md) + "\n", encoding="utf-8")
    print("\n".join(lines_md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
