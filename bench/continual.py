"""Continual self-edits: adapt a sequence of passages one after another into the same weights
(each step's LoRA merged in), measuring after every step the closed-book accuracy on every
passage seen so far — once per update rule (``--runs``):

- ``lora_sft``: LoRA SFT at the old defaults, spelled out in full so the row keeps its meaning
  (``VARIANTS["lora_sft"]`` of bench/forgetting.py: all-linear, lr 1e-3, 10 epochs, rank 16,
  alpha 32, no rehearsal, no KL) — the reference of the issue's target;
- ``sft``: LoRA SFT at the student's defaults as they are now (``LoraSettings``: retention-aware,
  MLP targets, anchor rehearsal, KL);
- ``sft+replay``: the same, mixing ``--replay-size`` earlier training sequences into each update;
- ``sdft``: self-distillation (TRL's SDFTTrainer) on questions about the passage's subject, the
  passage and self-edit as the teacher's privileged context;
- ``--set NAME:key=value,...``: an extra LoRA SFT run on top of the old defaults (bench/forgetting.py's
  parser; ``+`` separates target module names), e.g. ``--set mlp_lr3e-4:target_modules=mlp,learning_rate=3e-4``.

Passages (``--passages``):

- ``squad`` (default): SQuAD passages of ``--squad-file``; self-edits are written once per passage
  by the base model acting as teacher (k=1, the "implications" prompt) and reused by every run;
- ``invented``: the invented-fact passages of bench/forgetting.py (the base model cannot know
  them), trained on the way that bench trains: the passage's sentences as self-edit lines plus
  the passage; no teacher generation.

Either way every run sees the same training text, so runs differ only in the update rule.

    .venv/bin/python bench/continual.py --passages invented --n 8 --runs lora_sft,sft,sdft --out /tmp/continual
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forgetting import INVENTED, SDFT_PROMPTS, VARIANTS, parse_set, sentences
from seal.anchors import AnchorStore, anchor_examples
from seal.config import LoraSettings, Settings
from seal.continual import (
    ContinualConfig,
    ContinualStep,
    closed_book_accuracy,
    run_continual,
    save_heatmaps,
    write_json,
)
from seal.domains.knowledge import KnowledgeContext, Question, load_squad, parse_self_edit
from seal.grading import build_grader
from seal.models import TransformersEngine, load_model_and_tokenizer, model_fingerprint, resolve_model_path
from seal.teacher import SelfEditProposer
from seal.update.lora_sft import lora_sft_config
from seal.update.sdft import sdft_config

RUNS = ("lora_sft", "sft", "sft+replay", "sdft")
# The run every other is measured against (the target: at most half its forgetting at
# equal or better just-learned accuracy).
REFERENCE = "lora_sft"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", choices=("squad", "invented"), default="squad",
                        help=f"squad = --squad-file; invented = the {len(INVENTED)} invented-fact passages of "
                        "bench/forgetting.py")
    parser.add_argument("--squad-file", default=str(ROOT.parent / "shared/data/squad/seal_eval_200.json"))
    parser.add_argument("--n", type=int, default=4, help="passages, in order from --start")
    parser.add_argument("--start", type=int, default=0)
    # "shortest": the n shortest passages of the file. On a shared 2-core CPU a LoRA step on a
    # 1,000-character passage took ~60 s; short passages keep the run in budget and are the ones
    # a 135M model can absorb in 10 epochs, so the diagonal (and hence forgetting) is measurable.
    parser.add_argument("--pick", choices=("first", "shortest"), default="first")
    parser.add_argument("--runs", default="lora_sft,sft,sdft", help=f"comma-separated, from {', '.join(RUNS)} "
                        "(and --set names, which are added at the end unless listed here)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:key=value,...",
                        help="an extra LoRA SFT run on top of the old defaults (repeatable)")
    parser.add_argument("--replay-size", type=int, default=8, help="earlier sequences mixed into each sft+replay update")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every LoRA SFT run (default: its own)")
    parser.add_argument("--learning-rate", type=float, default=None, help="learning rate of every LoRA SFT run")
    parser.add_argument("--max-lines", type=int, default=12, help="self-edit lines kept per passage (squad)")
    parser.add_argument("--teacher-tokens", type=int, default=192)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    # On a shared, oversubscribed CPU one intra-op thread was ~6x faster than two (spinning
    # OpenMP workers wait on each other when descheduled); 0 = torch decides.
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/continual"))
    args = parser.parse_args()

    settings = Settings(seed=args.seed)
    # Each LoRA run's settings, kept whole (the anchors' length is not part of the trainer's config).
    old_defaults = VARIANTS[REFERENCE]
    assert old_defaults is not None
    lora_settings: dict[str, LoraSettings] = {
        "lora_sft": LoraSettings(**{**LoraSettings().model_dump(), **old_defaults}),
        "sft": settings.lora,
        "sft+replay": settings.lora,
    }
    extra: list[str] = []
    for spec in args.set:
        name, values = parse_set(spec)
        if not name or name in RUNS or name in extra:
            parser.error(f"--set {spec}: the name must be new and not one of {', '.join(RUNS)}")
        lora_settings[name] = LoraSettings(**{**LoraSettings().model_dump(), **values})
        extra.append(name)
    run_names = [name.strip() for name in args.runs.split(",") if name.strip()]
    run_names += [name for name in extra if name not in run_names]
    unknown = sorted(set(run_names) - set(RUNS) - set(extra))
    if unknown or not run_names:
        parser.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)} or name a --set")
    if args.n < 1:
        parser.error("--n: at least one passage")

    started_all = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {key: value for key, value in {"learning_rate": args.learning_rate, "epochs": args.epochs}.items()
                 if value is not None}
    model_path = resolve_model_path(settings.model)
    model, tokenizer = load_model_and_tokenizer(model_path)

    anchor_sets: dict[int, Any] = {}

    def anchors_for(lora: LoraSettings, max_seq_len: int) -> list:
        # The base model's own answers, as the student rehearses them (cached per fingerprint).
        if lora.anchor_max_new_tokens not in anchor_sets:
            anchor_sets[lora.anchor_max_new_tokens] = AnchorStore(settings.home / "student" / "anchors").load_or_build(
                model_fingerprint(model_path), model, tokenizer, max_new_tokens=lora.anchor_max_new_tokens
            )
        return anchor_examples(tokenizer, anchor_sets[lora.anchor_max_new_tokens], max_seq_len=max_seq_len)

    # (index in its source, source label, context, the training lines when they need no teacher)
    pool: list[tuple[int, str, KnowledgeContext, tuple[str, ...] | None]]
    if args.passages == "invented":
        pool = [(i, p.source, KnowledgeContext(p.title, p.text, tuple(Question(q, a) for q, a, _ in p.questions)),
                 tuple(sentences(p.text))) for i, p in enumerate(INVENTED)]
    else:
        pool = [(i, "squad", c, None) for i, c in enumerate(load_squad(args.squad_file))]
    if args.pick == "shortest":
        chosen = sorted(pool, key=lambda item: (len(item[2].passage), item[0]))[: args.n]
    else:
        chosen = pool[args.start: args.start + args.n]
    if len(chosen) < args.n:
        log(f"only {len(chosen)} {args.passages} passages from {args.start} (asked for {args.n})")
    contexts = [c for _, _, c, _ in chosen]
    log(f"model {model_path.name}, {len(contexts)} {args.passages} passages, torch threads {torch.get_num_threads()}")

    started = time.perf_counter()
    proposer = None
    steps, self_edits = [], []
    for index, (_, _, context, given) in enumerate(chosen):
        if given is None:
            if proposer is None:
                proposer = SelfEditProposer(
                    TransformersEngine(model, tokenizer),
                    max_new_tokens=args.teacher_tokens,
                    temperature=settings.teacher.temperature,
                    top_p=settings.teacher.top_p,
                )
            edit = proposer.propose(context.title, context.passage, 1, "implications", args.seed + index)[0]
            text, lines = edit.text, tuple(parse_self_edit(edit.text, max_lines=args.max_lines))
        else:
            # bench/forgetting.py's training text: the passage's sentences as self-edit lines (the
            # passage itself is added by run_continual, include_passage).
            text, lines = None, given
        prompts = tuple(template.format(title=context.title) for template in SDFT_PROMPTS)
        steps.append(ContinualStep(context, lines, training_prompts=prompts))
        self_edits.append({"title": context.title, "text": text, "lines": list(lines)})
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
        "passage_set": args.passages,
        "passages": [{"index": i, "source": source, "title": c.title, "questions": len(c.questions),
                      "chars": len(c.passage)} for i, source, c, _ in chosen],
        "self_edits": self_edits,
        "overrides": overrides,
        "seconds": {"self_edit_generation": generation_seconds, "baseline": baseline_seconds},
        "runs": {},
    }
    out = Path(args.out)

    def config_for(name: str) -> ContinualConfig:
        if name == "sdft":
            return ContinualConfig(update=sdft_config(settings.sdft, seed=args.seed), answer_max_new_tokens=args.answer_tokens)
        lora = lora_settings[name]
        update = lora_sft_config(lora, seed=args.seed, overrides=overrides)
        return ContinualConfig(
            update=update,
            replay_size=args.replay_size if name == "sft+replay" else 0,
            replay_seed=args.seed,
            answer_max_new_tokens=args.answer_tokens,
            anchors=anchors_for(lora, update.max_seq_len) if update.uses_anchors else (),
        )

    for name in run_names:
        started = time.perf_counter()
        config = config_for(name)

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
    report["target"] = target_check(report)
    write_json(report, out.with_suffix(".json"))
    save_heatmaps({name: run["matrix"] for name, run in report["runs"].items()}, [c.title for c in contexts],
                  out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(report, out.with_suffix(".png").name), encoding="utf-8")
    print(markdown(report, out.with_suffix(".png").name))
    return 0


def target_check(report: dict) -> dict[str, Any]:
    """The issue's target per run, against ``lora_sft``: forgetting at most half of its forgetting,
    at equal or better just-learned accuracy. ``ratio`` is None when the reference forgot nothing
    (the target then asks for no forgetting at all)."""
    reference = report["runs"].get(REFERENCE)
    if reference is None:
        return {"reference": None}
    ref = reference["summary"]
    checks: dict[str, Any] = {}
    for name, run in report["runs"].items():
        if name == REFERENCE:
            continue
        s = run["summary"]
        forgetting, learned = s["forgetting"], s["just_learned"]
        known = None not in (forgetting, learned, ref["forgetting"], ref["just_learned"])
        checks[name] = {
            "forgetting": forgetting,
            "just_learned": learned,
            "ratio": forgetting / ref["forgetting"] if known and ref["forgetting"] > 0 else None,
            "forgetting_ok": forgetting <= 0.5 * ref["forgetting"] + 1e-9 if known else None,
            "just_learned_ok": learned >= ref["just_learned"] - 1e-9 if known else None,
            "met": (forgetting <= 0.5 * ref["forgetting"] + 1e-9 and learned >= ref["just_learned"] - 1e-9)
            if known else None,
        }
    return {"reference": REFERENCE, "reference_forgetting": ref["forgetting"],
            "reference_just_learned": ref["just_learned"], "runs": checks}


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _yes(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def markdown(report: dict, heatmap: str = "continual.png") -> str:
    titles = [p["title"] for p in report["passages"]]
    n = len(titles)
    invented = report.get("passage_set") == "invented"
    if invented:
        what = "invented-fact passages of bench/forgetting.py"
        teacher = ("training text: the passage's sentences as self-edit lines plus the passage (as bench/forgetting.py; "
                   "no teacher)")
        passages = "; ".join(f"P{i + 1} = {p['title']} ({p['questions']} q)" for i, p in enumerate(report["passages"]))
    else:
        what = "SQuAD passages of seal_eval_200"
        teacher = "teacher: the same base model, k=1 self-edit per passage (implications prompt), reused by every run"
        passages = "; ".join(f"P{i + 1} = #{p['index']} {p['title']} ({p['questions']} q)"
                             for i, p in enumerate(report["passages"]))
    overrides = report.get("overrides") or {}
    lines = [
        f"# Continual self-edits: {n} {what} into one model, one run per update rule",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: {report['model']}; {teacher}; each step's adapter merged into the weights; closed-book answers "
        f"graded lexically (\"{report['grader']}\"); torch threads {report['machine']['torch_threads']}."
        + (f" Overrides of every LoRA SFT run: {overrides}." if overrides else ""),
        "",
        "Passages: " + passages,
        "",
        "## Summary",
        "",
        "| run | update | just learned (diagonal) | final mean | forgetting | net gain over base | "
        f"forgetting ÷ {REFERENCE}'s | just learned − {REFERENCE}'s | target met | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    target = report.get("target") or {}
    checks = target.get("runs", {})
    ref_learned = target.get("reference_just_learned")
    for name, run in report["runs"].items():
        s = run["summary"]
        check = checks.get(name, {})
        ratio = check.get("ratio")
        delta = None if ref_learned is None or s["just_learned"] is None else s["just_learned"] - ref_learned
        lines.append(
            f"| {name} | {_short(run['config'])} | {_cell(s['just_learned'])} | {_cell(s['final_seen'])} | "
            f"{_cell(s['forgetting'])} | {_cell(s['net_gain_final'])} | "
            f"{'reference' if name == REFERENCE else _cell(ratio)} | "
            f"{'reference' if name == REFERENCE else ('—' if delta is None else f'{delta:+.2f}')} | "
            f"{'reference' if name == REFERENCE else _yes(check.get('met'))} | {report['seconds'].get(name, 0):.0f} |"
        )
    lines.append("")
    if target.get("reference") is None:
        lines.append(f"Target check: no `{REFERENCE}` run, so not checked.")
    else:
        ref_f = target["reference_forgetting"]
        parts = []
        for name, check in checks.items():
            if check["met"] is None:
                parts.append(f"`{name}` not checkable (fewer than two steps)")
                continue
            if check["ratio"] is None:
                forgot = (f"forgetting {_cell(check['forgetting'])} {'≤' if check['forgetting_ok'] else '>'} "
                          f"½ × {_cell(ref_f)} (ratio undefined: the reference forgot nothing)")
            else:
                forgot = (f"forgetting {_cell(check['forgetting'])} ÷ {_cell(ref_f)} = {check['ratio']:.2f} "
                          f"({'≤' if check['forgetting_ok'] else '>'} 0.5)")
            parts.append(
                f"`{name}`: {forgot}, just learned {_cell(check['just_learned'])} "
                f"{'≥' if check['just_learned_ok'] else '<'} {_cell(ref_learned)} → "
                f"{'**met**' if check['met'] else 'not met'}"
            )
        lines.append(
            f"Target check (forgetting at most half of `{REFERENCE}`'s, at equal or better just-learned accuracy; "
            f"`{REFERENCE}`: forgetting {_cell(ref_f)}, just learned {_cell(ref_learned)}): " + "; ".join(parts) + "."
            + (" The reference forgot nothing (forgetting ≤ 0), so this check cannot tell the runs apart."
               if ref_f is not None and ref_f <= 0 else "")
        )
    lines.append("")
    for name, run in report["runs"].items():
        lines += [f"## {name}", "", _describe(run["config"]), "",
                  "| after | " + " | ".join(f"P{j + 1}" for j in range(n)) + " |", "|---" * (n + 1) + "|"]
        for i, row in enumerate(run["matrix"]):
            label = "base" if i == 0 else f"step {i}"
            lines.append(f"| {label} | " + " | ".join(_cell(v) for v in row) + " |")
        s = run["summary"]
        lines += [
            "",
            f"just learned (diagonal) {_cell(s['just_learned'])}, final mean on all passages {_cell(s['final_seen'])}, "
            f"forgetting {_cell(s['forgetting'])}, net gain over base at the end {_cell(s['net_gain_final'])}; "
            f"{report['seconds'].get(name, 0):.0f} s",
            "",
        ]
    secs = report["seconds"]
    lines += [
        f"Self-edit generation {secs['self_edit_generation']:.0f} s, baseline {secs['baseline']:.0f} s, "
        f"total {secs.get('total', 0):.0f} s. Rows: after step i; columns: passage j; cells above the diagonal "
        "(passages not yet learned) are not asked. Forgetting = mean over P1..P(n-1) of (accuracy right after "
        f"learning it − accuracy after the last step). Heatmap (one panel per run): `{heatmap}`.",
        "",
    ]
    if invented:
        lines.append(
            "Choices: invented facts, so the base model cannot know them and the diagonal measures learning; the "
            "training text is the passage's sentences as self-edit lines plus the passage, the same for every run "
            "(no teacher, whose self-edits at 135M are mostly off-topic), so runs differ only in the update rule. "
            "SFT steps train on that text (sft+replay adds a seeded sample of up to `replay_size` sequences from every "
            "earlier step); SDFT steps distil on questions about the passage's subject (`SDFT_PROMPTS` in "
            "`bench/forgetting.py`, never the measured questions), the passage and its sentences shown only to the "
            "teacher."
        )
    else:
        lines.append(
            "Choices, to fit a shared 2-core CPU: passages picked by length (`--pick shortest`: short passages "
            "train fastest and are the ones a 135M model can absorb, so the diagonal, and with it "
            "forgetting, is measurable at all); one self-edit per passage (k=1) sampled once by the base model "
            "and reused by every run, so runs differ only in the update rule. SFT steps train on the self-edit "
            "lines plus the passage (sft+replay adds a seeded sample of up to `replay_size` sequences from every "
            "earlier step); SDFT steps distil on questions about the passage's subject (`SDFT_PROMPTS` in "
            "`bench/forgetting.py`, never the measured questions), the passage and self-edit shown only to the teacher."
        )
    return "\n".join(lines) + "\n"


def _short(config: dict) -> str:
    update = config["update"]
    if config["update_rule"] == "sdft":
        return f"SDFT lr {update['learning_rate']:g}, {update['epochs']} ep"
    targets = update["target_modules"]
    targets = targets if isinstance(targets, str) else "+".join(targets)
    replay = f", replay {config['replay_size']}" if config["replay_size"] else ""
    # Runs recorded before delta_scale existed kept the whole update.
    scale = f", ×{update.get('delta_scale', 1.0):g}" if update.get("delta_scale", 1.0) != 1.0 else ""
    return (f"LoRA {targets}, lr {update['learning_rate']:g}, {update['epochs']} ep, r {update['rank']}, "
            f"reh {update['rehearsal_ratio']:g}, KL {update['kl_beta']:g}{scale}{replay}")


def _describe(config: dict) -> str:
    update = config["update"]
    if config["update_rule"] == "sdft":
        return (f"SDFT: lr {update['learning_rate']}, {update['epochs']} epochs, rank {update['rank']}, "
                f"{update['num_generations']} generations of ≤{update['max_completion_length']} tokens, "
                f"teacher {update['teacher_model_kind']}, {update['distillation_mode']}.")
    targets = update["target_modules"]
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    return (f"LoRA SFT: lr {update['learning_rate']}, {update['epochs']} epochs, rank {update['rank']}, "
            f"alpha {update['alpha']}, targets {targets}, batch {update['batch_size']}, "
            f"rehearsal ratio {update['rehearsal_ratio']}, KL β {update['kl_beta']}, "
            f"update scaled by {update.get('delta_scale', 1.0)}, replay {config['replay_size']}.")


if __name__ == "__main__":
    sys.exit(main())
