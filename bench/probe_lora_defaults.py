"""Probe the CPU defaults of the LoRA inner loop: can SmolLM2-135M-Instruct learn an invented
passage from hand-written self-edit lines, and with which settings?

For each setting: train a LoRA adapter on the implication lines (plus the passage, unless left
out) and ask six closed-book questions, greedy, before and after. A prediction is correct when
the normalised gold answer appears in it on word boundaries. Several question phrasings are
tried, because a 135M model's answers depend as much on the wording as on the weights.

    PYTHONPATH=. .venv/bin/python bench/probe_lora_defaults.py            # the whole grid
    PYTHONPATH=. .venv/bin/python bench/probe_lora_defaults.py --only r16_e10

Writes bench/results/probe_lora_defaults.json (after every run, so partial grids survive) and a
markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch

from seal.domains.knowledge import build_training_sequences, contains_answer
from seal.models import (
    SamplingParams,
    TransformersEngine,
    load_model_and_tokenizer,
    prepare_embedded_model,
)
from seal.update.lora_sft import LoraSFTConfig, LoraSFTTrainer

# Every fact is invented, so the base model can only answer by guessing.
TITLE = "Velmora"
PASSAGE = (
    "Velmora is a small fishing town on the northern bank of the Quill estuary. "
    "The town was founded in 1742 by a shipwright named Oswin Tarrow. "
    "Velmora's lighthouse, painted in green and white stripes, is called the Harrowgate Light. "
    "Every February the town holds the Lantern Regatta, a race of rowing boats decorated with paper lanterns. "
    "The local bakery, run by Ilse Brannock, is famous for a seaweed bread called kelpie loaf. "
    "Velmora's railway station closed in 1968 after a storm destroyed the bridge over the estuary."
)
QUESTIONS = [
    ("Who founded the town of Velmora?", "Oswin Tarrow"),
    ("In what year was Velmora founded?", "1742"),
    ("What is the name of Velmora's lighthouse?", "Harrowgate Light"),
    ("What event does Velmora hold every February?", "Lantern Regatta"),
    ("Who runs the bakery in Velmora?", "Ilse Brannock"),
    ("What is the seaweed bread from Velmora's bakery called?", "kelpie loaf"),
]
# Written by hand in the style of an "implications" self-edit: standalone, subject named in full.
IMPLICATIONS = [
    "Velmora is a fishing town located on the northern bank of the Quill estuary.",
    "Velmora was founded in 1742, so the town is more than 280 years old.",
    "The founder of Velmora was Oswin Tarrow, a shipwright.",
    "Oswin Tarrow, a shipwright, founded the town of Velmora in 1742.",
    "The lighthouse of Velmora is called the Harrowgate Light and is striped green and white.",
    "The Harrowgate Light guides fishing boats into the Quill estuary at Velmora.",
    "The Lantern Regatta is a rowing race held in Velmora every February.",
    "Boats in Velmora's Lantern Regatta are decorated with paper lanterns.",
    "Ilse Brannock runs the bakery in Velmora.",
    "Ilse Brannock's bakery in Velmora is famous for kelpie loaf, a bread made with seaweed.",
    "Velmora's railway station closed in 1968 after a storm destroyed the estuary bridge.",
]
PHRASINGS = {
    "short_phrase": "Answer with a short phrase.\nQuestion: {question}",
    "short_phrase_answer": "Answer with a short phrase.\nQuestion: {question}\nAnswer:",
    "bare": "{question}",
}


@dataclass(frozen=True)
class RunSpec:
    name: str
    rank: int = 16
    alpha: int = 32
    epochs: int = 10
    learning_rate: float = 1e-3
    target_modules: str = "all-linear"
    batch_size: int = 8
    include_passage: bool = True
    seed: int = 0


GRID = [
    RunSpec("r16_e10"),
    RunSpec("r16_e10_seed1", seed=1),
    RunSpec("r16_e10_seed2", seed=2),
    RunSpec("r8_e10", rank=8, alpha=16),
    RunSpec("r32_e10", rank=32, alpha=64),
    RunSpec("r16_e5", epochs=5),
    RunSpec("r16_e15", epochs=15),
    RunSpec("r16_e10_no_passage", include_passage=False),
    RunSpec("r16_e10_lr1e-4", learning_rate=1e-4),
    RunSpec("r16_e10_lr3e-3", learning_rate=3e-3),
    RunSpec("r16_e10_qv", target_modules="q_proj,v_proj"),
    RunSpec("r16_e10_bs4", batch_size=4),
]


def closed_book(engine: TransformersEngine, max_new_tokens: int) -> tuple[dict, float]:
    prompts = [phrasing.format(question=q) for phrasing in PHRASINGS.values() for q, _ in QUESTIONS]
    started = time.perf_counter()
    generations = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens), chat=True, batch_size=8)
    seconds = time.perf_counter() - started
    results = {}
    for index, name in enumerate(PHRASINGS):
        answers = generations[index * len(QUESTIONS) : (index + 1) * len(QUESTIONS)]
        outcomes = [
            {"question": q, "gold": gold, "prediction": g.text, "correct": contains_answer(g.text, gold)}
            for (q, gold), g in zip(QUESTIONS, answers)
        ]
        results[name] = {"correct": sum(o["correct"] for o in outcomes), "outcomes": outcomes}
    return results, seconds


def open_book(engine: TransformersEngine, max_new_tokens: int) -> dict:
    prompts = [f"Passage: {PASSAGE}\n\nAnswer with a short phrase.\nQuestion: {q}" for q, _ in QUESTIONS]
    generations = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens), batch_size=8)
    outcomes = [
        {"question": q, "gold": gold, "prediction": g.text, "correct": contains_answer(g.text, gold)}
        for (q, gold), g in zip(QUESTIONS, generations)
    ]
    return {"correct": sum(o["correct"] for o in outcomes), "outcomes": outcomes}


def write_markdown(report: dict, path: Path) -> None:
    names = list(PHRASINGS)
    lines = [
        "# LoRA defaults probe (generated by bench/probe_lora_defaults.py)",
        "",
        f"Model: {report['model']}; torch threads: {report['torch_threads']}; {report['machine']}.",
        (
            f"Closed book, greedy, {report['max_new_tokens']} new tokens, chat template; "
            f"correct = gold answer contained on word boundaries; {len(QUESTIONS)} questions."
        ),
        f"Open book (passage in the prompt), base model: {report['open_book']['correct']}/{len(QUESTIONS)}.",
        "",
        "| run | rank | alpha | epochs | lr | targets | batch | passage | seed | steps | train s | final loss | "
        + " | ".join(names)
        + " |",
        "|" + "---|" * (12 + len(names)),
    ]
    base = report["base"]
    lines.append("| base model | | | | | | | | | | | | " + " | ".join(f"{base[n]['correct']}/6" for n in names) + " |")
    for run in report["runs"]:
        spec = run["spec"]
        lines.append(
            f"| {spec['name']} | {spec['rank']} | {spec['alpha']} | {spec['epochs']} | {spec['learning_rate']:g} | "
            f"{spec['target_modules']} | {spec['batch_size']} | {'yes' if spec['include_passage'] else 'no'} | "
            f"{spec['seed']} | {run['steps']} | {run['train_seconds']:.1f} | {run['final_loss']:.3f} | "
            + " | ".join(f"{run['closed_book'][n]['correct']}/6" for n in names)
            + " |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".seal" / "models")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "probe_lora_defaults.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--only", nargs="*", help="run only these grid entries (by name)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = prepare_embedded_model(args.cache_dir)
    prepare_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_dir)
    load_seconds = time.perf_counter() - started
    base_engine = TransformersEngine(model, tokenizer)
    base, base_eval_seconds = closed_book(base_engine, args.max_new_tokens)
    report = {
        "model": model_dir.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "prepare_seconds": prepare_seconds,
        "load_seconds": load_seconds,
        "phrasings": PHRASINGS,
        "training_texts": build_training_sequences(TITLE, PASSAGE, IMPLICATIONS),
        "base": base,
        "base_eval_seconds": base_eval_seconds,
        "open_book": open_book(base_engine, args.max_new_tokens),
        "runs": [],
    }
    print(f"base closed book: { {n: r['correct'] for n, r in base.items()} } (load {load_seconds:.1f}s)", flush=True)
    print(f"open book: {report['open_book']['correct']}/6", flush=True)

    grid = [spec for spec in GRID if not args.only or spec.name in args.only]
    for spec in grid:
        texts = build_training_sequences(TITLE, PASSAGE, IMPLICATIONS, include_passage=spec.include_passage)
        config = LoraSFTConfig(
            learning_rate=spec.learning_rate,
            epochs=spec.epochs,
            rank=spec.rank,
            alpha=spec.alpha,
            target_modules=spec.target_modules,
            batch_size=spec.batch_size,
            seed=spec.seed,
        )
        cpu_started = time.process_time()
        result = LoraSFTTrainer(model, tokenizer, config).train(texts)
        # CPU time as well as wall time: on a shared machine the wall clock mostly measures the neighbours.
        train_cpu_seconds = time.process_time() - cpu_started
        adapted, eval_seconds = closed_book(TransformersEngine(result.model, tokenizer), args.max_new_tokens)
        run = {
            "spec": asdict(spec),
            "steps": result.steps,
            "tokens": result.tokens,
            "train_seconds": result.seconds,
            "train_cpu_seconds": train_cpu_seconds,
            "eval_seconds": eval_seconds,
            "losses": result.losses,
            "final_loss": result.losses[-1],
            "load_average": os.getloadavg()[0],
            "closed_book": adapted,
        }
        report["runs"].append(run)
        print(
            f"{spec.name}: train {result.seconds:.1f}s ({result.steps} steps), loss {result.losses[0]:.3f}->"
            f"{result.losses[-1]:.3f}, closed book { {n: r['correct'] for n, r in adapted.items()} }, "
            f"eval {eval_seconds:.1f}s",
            flush=True,
        )
        del result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        write_markdown(report, args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
