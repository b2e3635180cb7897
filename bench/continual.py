"""Continual self-edits: adapt a sequence of SQuAD passages one after another into the same
weights (each step's LoRA merged in), measuring after every step the closed-book accuracy on
every passage seen so far — once per update rule (``--runs``):

- ``sft``: LoRA SFT at the student's defaults (retention-aware: MLP targets, anchor rehearsal, KL);
- ``sft+replay``: the same, mixing ``--replay-size`` earlier training sequences into each update;
- ``sdft``: self-distillation (TRL's SDFTTrainer) on questions about the passage's subject, the
  passage and self-edit as the teacher's privileged context.

Self-edits are written once per passage by the base model acting as teacher (k=1, the
"implications" prompt) and reused by every run, so runs differ only in the update rule.

    .venv/bin/python bench/continual.py --n 4 --runs sft,sdft --out bench/results/continual
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seal.config import Settings  # noqa: E402
from seal.continual import (  # noqa: E402
    ContinualConfig,
    ContinualStep,
    closed_book_accuracy,
    run_continual,
    save_heatmaps,
    write_json,
)
from seal.domains.knowledge import load_squad, parse_self_edit  # noqa: E402
from seal.grading import build_grader  # noqa: E402
from seal.anchors import AnchorStore, anchor_examples  # noqa: E402
from seal.models import TransformersEngine, load_model_and_tokenizer, model_fingerprint, resolve_model_path  # noqa: E402
from seal.teacher import SelfEditProposer  # noqa: E402
from seal.update.lora_sft import lora_sft_config  # noqa: E402
from seal.update.sdft import sdft_config  # noqa: E402
from bench.forgetting import SDFT_PROMPTS  # noqa: E402

RUNS = ("sft", "sft+replay", "sdft")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad-file", default=str(ROOT.parent / "shared/data/squad/seal_eval_200.json"))
    parser.add_argument("--n", type=int, default=4, help="passages, in file order from --start")
    parser.add_argument("--start", type=int, default=0)
    # "shortest": the n shortest passages of the file. On a shared 2-core CPU a LoRA step on a
    # 1,000-character passage took ~60 s; short passages keep the run in budget and are the ones
    # a 135M model can absorb in 10 epochs, so the diagonal (and hence forgetting) is measurable.
    parser.add_argument("--pick", choices=("first", "shortest"), default="first")
    parser.add_argument("--runs", default="sft,sdft", help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--replay-size", type=int, default=8, help="earlier sequences mixed into each sft+replay update")
    parser.add_argument("--epochs", type=int, default=None, help="LoRA epochs (default: settings)")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--max-lines", type=int, default=12, help="self-edit lines kept per passage")
    parser.add_argument("--teacher-tokens", type=int, default=192)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    # On a shared, oversubscribed CPU one intra-op thread was ~6x faster than two (spinning
    # OpenMP workers wait on each other when descheduled); 0 = torch decides.
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/continual"))
    args = parser.parse_args()
    run_names = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = sorted(set(run_names) - set(RUNS))
    if unknown or not run_names:
        parser.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")

    started_all = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(seed=args.seed)
    overrides = {"learning_rate": args.learning_rate, "epochs": args.epochs}
    lora_config = lora_sft_config(settings.lora, seed=args.seed,
                                  overrides={key: value for key, value in overrides.items() if value})
    model_path = resolve_model_path(settings.model)
    model, tokenizer = load_model_and_tokenizer(model_path)
    anchors = []
    if lora_config.uses_anchors:
        # The base model's own answers, as the student rehearses them (cached per fingerprint).
        anchor_set = AnchorStore(settings.home / "student" / "anchors").load_or_build(
            model_fingerprint(model_path), model, tokenizer, max_new_tokens=settings.lora.anchor_max_new_tokens
        )
        anchors = anchor_examples(tokenizer, anchor_set, max_seq_len=lora_config.max_seq_len)
    all_contexts = load_squad(args.squad_file)
    if args.pick == "shortest":
        indices = sorted(range(len(all_contexts)), key=lambda i: (len(all_contexts[i].passage), i))[: args.n]
    else:
        indices = list(range(args.start, min(args.start + args.n, len(all_contexts))))
    contexts = [all_contexts[i] for i in indices]
    log(f"model {model_path.name}, {len(contexts)} passages, torch threads {torch.get_num_threads()}")

    started = time.perf_counter()
    proposer = SelfEditProposer(
        TransformersEngine(model, tokenizer),
        max_new_tokens=args.teacher_tokens,
        temperature=settings.teacher.temperature,
        top_p=settings.teacher.top_p,
    )
    steps, self_edits = [], []
    for index, context in enumerate(contexts):
        edit = proposer.propose(context.title, context.passage, 1, "implications", args.seed + index)[0]
        lines = tuple(parse_self_edit(edit.text, max_lines=args.max_lines))
        prompts = tuple(template.format(title=context.title) for template in SDFT_PROMPTS)
        steps.append(ContinualStep(context, lines, training_prompts=prompts))
        self_edits.append({"title": context.title, "text": edit.text, "lines": list(lines)})
        log(f"self-edit {index + 1}/{len(contexts)} ({context.title}): {len(lines)} lines")
    generation_seconds = time.perf_counter() - started

    started = time.perf_counter()
    grader = build_grader(settings.auditor)
    baseline = closed_book_accuracy(model, tokenizer, contexts, max_new_tokens=args.answer_tokens, batch_size=8, grader=grader)
    baseline_seconds = time.perf_counter() - started
    log(f"baseline {[round(a, 2) for a in baseline[0]]} ({baseline_seconds:.0f}s)")

    report: dict = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": {"torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "model": model_path.name,
        "grader": settings.auditor.grader,
        "passages": [{"index": i, "title": c.title, "questions": len(c.questions), "chars": len(c.passage)}
                     for i, c in zip(indices, contexts, strict=True)],
        "self_edits": self_edits,
        "seconds": {"self_edit_generation": generation_seconds, "baseline": baseline_seconds},
        "runs": {},
    }
    out = Path(args.out)
    sdft = sdft_config(settings.sdft, seed=args.seed)
    configs = {
        "sft": ContinualConfig(update=lora_config, answer_max_new_tokens=args.answer_tokens, anchors=anchors),
        "sft+replay": ContinualConfig(update=lora_config, replay_size=args.replay_size, replay_seed=args.seed,
                                      answer_max_new_tokens=args.answer_tokens, anchors=anchors),
        "sdft": ContinualConfig(update=sdft, answer_max_new_tokens=args.answer_tokens),
    }
    for name in run_names:
        started = time.perf_counter()
        config = configs[name]

        def save_partial(partial, name=name) -> None:  # noqa: ANN001
            report["runs"][name] = partial.to_dict()
            write_json(report, out.with_suffix(".json"))
            last = partial.steps[-1]
            log(f"{name}: after step {last.step}: {[None if v is None else round(v, 2) for v in partial.matrix[-1]]} "
                f"(train {last.train_seconds:.0f}s, eval {last.eval_seconds:.0f}s, loss {last.final_loss:.3f})")

        result = run_continual(model, tokenizer, steps, config, baseline=baseline, on_step=save_partial, grader=grader)
        report["runs"][name] = result.to_dict()
        report["seconds"][name] = time.perf_counter() - started
    report["seconds"]["total"] = time.perf_counter() - started_all
    write_json(report, out.with_suffix(".json"))
    save_heatmaps({name: run["matrix"] for name, run in report["runs"].items()}, [c.title for c in contexts], out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    titles = [p["title"] for p in report["passages"]]
    n = len(titles)
    lines = [
        f"# Continual self-edits: {n} passages of seal_eval_200 into one model, one run per update rule",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: {report['model']}; teacher: the same base model, k=1 self-edit per passage (implications prompt), "
        "reused by every run; each step's adapter merged into the weights; closed-book answers graded "
        f"lexically (\"{report['grader']}\"); torch threads {report['machine']['torch_threads']}.",
        "",
        "Passages: " + "; ".join(f"P{i + 1} = #{p['index']} {p['title']} ({p['questions']} q)" for i, p in enumerate(report["passages"])),
        "",
    ]
    for name, run in report["runs"].items():
        lines += [f"## {name}", "", _describe(run["config"]), "",
                  "| after | " + " | ".join(f"P{j + 1}" for j in range(n)) + " |", "|---" * (n + 1) + "|"]
        for i, row in enumerate(run["matrix"]):
            label = "base" if i == 0 else f"step {i}"
            lines.append(f"| {label} | " + " | ".join(_cell(v) for v in row) + " |")
        s = run["summary"]
        lines += [
            "",
            f"just learned (diagonal) {_cell(s['just_learned'])}, final on all passages {_cell(s['final_seen'])}, "
            f"forgetting {_cell(s['forgetting'])}, net gain over base at the end {_cell(s['net_gain_final'])}; "
            f"{report['seconds'].get(name, 0):.0f} s",
            "",
        ]
    secs = report["seconds"]
    lines += [
        f"Self-edit generation {secs['self_edit_generation']:.0f} s, baseline {secs['baseline']:.0f} s, "
        f"total {secs.get('total', 0):.0f} s. Rows: after step i; columns: passage j; cells above the diagonal "
        "(passages not yet learned) are not asked. Forgetting = mean over P1..P(n-1) of (accuracy right after "
        "learning it − accuracy after the last step). Heatmap: `continual.png`.",
        "",
        "Choices, to fit a shared 2-core CPU: passages picked by length (`--pick shortest`: short passages "
        "train fastest and are the ones a 135M model can absorb, so the diagonal, and with it "
        "forgetting, is measurable at all); one self-edit per passage (k=1) sampled once by the base model "
        "and reused by every run, so runs differ only in the update rule. SFT steps train on the self-edit "
        "lines plus the passage (sft+replay adds a seeded sample of up to `replay_size` sequences from every "
        "earlier step); SDFT steps distil on questions about the passage's subject (`SDFT_PROMPTS` in "
        "`bench/forgetting.py`, never the measured questions), the passage and self-edit shown only to the teacher.",
    ]
    return "\n".join(lines) + "\n"


def _describe(config: dict) -> str:
    update = config["update"]
    if config["update_rule"] == "sdft":
        return (f"SDFT: lr {update['learning_rate']}, {update['epochs']} epochs, rank {update['rank']}, "
                f"{update['num_generations']} generations of ≤{update['max_completion_length']} tokens, "
                f"teacher {update['teacher_model_kind']}, {update['distillation_mode']}.")
    targets = update["target_modules"]
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    return (f"LoRA SFT: lr {update['learning_rate']}, {update['epochs']} epochs, rank {update['rank']}, "
            f"targets {targets}, rehearsal ratio {update['rehearsal_ratio']}, "
            f"KL β {update['kl_beta']}, replay {config['replay_size']}.")


if __name__ == "__main__":
    sys.exit(main())
