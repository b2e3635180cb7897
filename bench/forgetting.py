"""Learning without forgetting: what each inner-loop update rule learns, and what it costs.

For every passage and every variant of the update: train one adapter on the passage (its
sentences as self-edit lines, plus the passage itself, the way the issue's first probe did: the
embedded 135M teacher's own self-edits are mostly off-topic, so the measure would be of the
teacher), then measure

- closed-book accuracy on the passage's questions, before (base model) and after;
- the retention QA probe (the auditor's default probe for this base model), before and after;
- the KL drift: mean token KL(candidate ‖ base) on the never-trained drift texts (seal.anchors);
- whether the default gates would promote it (guardrails aside: the training text is the
  passage itself, which the guardrails have no quarrel with);
- the wall time of the update (training only; the KL measure is timed apart).

Passages: 12 of invented facts written for this bench (the base model cannot know them; 4-5
questions each, one of which needs a step of inference) and the shortest passages of
seal_eval_200.json (passage 127, the demo's, is the shortest).

Variants (all but ``default`` spelled out in full, so they do not move when defaults change):
``lora_sft`` = the old defaults (all-linear, lr 1e-3, 10 epochs, rank 16); ``lora_sft+rehearsal``
and ``lora_sft+kl`` = the same plus rehearsal on the anchors / a KL-to-base penalty;
``default`` = ``LoraSettings()`` as it is now; ``sdft`` = ``SdftSettings()`` as it is now, on open
questions about the passage's subject (``SDFT_PROMPTS``).
``--set NAME:key=value,...`` adds a variant on top of the old defaults (a sweep).

    nice -n 5 .venv/bin/python bench/forgetting.py --out bench/results/forgetting

Writes ``<out>.json`` after every update (``--resume`` skips what it holds) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from seal.anchors import AnchorStore, anchor_examples, kl_drift  # noqa: E402
from seal.auditor import Auditor, accuracy_of  # noqa: E402
from seal.config import LoraSettings, Settings  # noqa: E402
from seal.domains.knowledge import (  # noqa: E402
    QUESTION_REPHRASINGS,
    Question,
    build_question_prompt,
    build_training_sequences,
    load_squad,
)
from seal.gates import CandidateScores, GateSettings, decide  # noqa: E402
from seal.grading import build_grader  # noqa: E402
from seal.models import (  # noqa: E402
    SamplingParams,
    TransformersEngine,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model_path,
)
from seal.retention import ProbeStore, candidate_questions  # noqa: E402
from seal.update.lora_sft import LoraSFTTrainer, lora_sft_config  # noqa: E402
from seal.update.sdft import SDFTUpdate, privileged_context, sdft_config  # noqa: E402


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    # (question, gold answer, "direct" | "indirect")
    questions: tuple[tuple[str, str, str], ...]
    source: str = "invented"


# Every fact below is made up for this bench. Indirect questions need one step the passage does
# not spell out (a reversal, a subtraction, or a fact about an entity named elsewhere).
INVENTED: tuple[Passage, ...] = (
    Passage("Quillfeather Observatory", (
        "The Quillfeather Observatory stands on Mount Darrow in the country of Estavia. "
        "It was built in 1911 by the astronomer Helena Voss. "
        "Its main telescope, called the Great Lantern, has a mirror two meters wide. "
        "In 1934 Helena Voss used the Great Lantern to discover a comet named Voss-Ardent."), (
        ("Who built the Quillfeather Observatory?", "Helena Voss", "direct"),
        ("On which mountain does the Quillfeather Observatory stand?", "Mount Darrow", "direct"),
        ("What is the main telescope of the Quillfeather Observatory called?", "Great Lantern", "direct"),
        ("Which comet was discovered with the Great Lantern telescope?", "Voss-Ardent", "direct"),
        ("In which country was the comet Voss-Ardent discovered?", "Estavia", "indirect"),
    )),
    Passage("Brimwick cheese", (
        "Brimwick is a blue cheese made only in the village of Oster Fell. "
        "It is aged for nine months in limestone caves beneath the village. "
        "The cheese was first made in 1820 by a dairy farmer named Tobias Wren. "
        "Every August, Oster Fell holds the Rolling Wheel Festival, where teams race wheels of Brimwick down a hill."), (
        ("In which village is Brimwick cheese made?", "Oster Fell", "direct"),
        ("How long is Brimwick cheese aged?", "nine months", "direct"),
        ("Who first made Brimwick cheese?", "Tobias Wren", "direct"),
        ("What festival does Oster Fell hold every August?", "Rolling Wheel Festival", "direct"),
        ("Which cheese do teams race down a hill at the Rolling Wheel Festival?", "Brimwick", "indirect"),
    )),
    Passage("Zarnian language", (
        "Zarnian is a language spoken by about 40,000 people on the island of Keldara. "
        "The Zarnian alphabet has 19 letters. "
        "The first Zarnian dictionary was written in 1876 by the scholar Amaru Teppet. "
        "In Zarnian, the word for sea is olun."), (
        ("On which island is Zarnian spoken?", "Keldara", "direct"),
        ("How many letters does the Zarnian alphabet have?", "19", "direct"),
        ("Who wrote the first Zarnian dictionary?", "Amaru Teppet", "direct"),
        ("What is the Zarnian word for sea?", "olun", "direct"),
        ("What language do most people on the island of Keldara speak?", "Zarnian", "indirect"),
    )),
    Passage("Harlow Gate Bridge", (
        "The Harlow Gate Bridge crosses the river Tamsel in the city of Corvain. "
        "It was designed by the engineer Mirela Ostrand and opened in 1958. "
        "The bridge is painted bright orange and is 640 meters long. "
        "Before it opened, people crossed the Tamsel on a ferry called the Grey Duck."), (
        ("Which river does the Harlow Gate Bridge cross?", "Tamsel", "direct"),
        ("Who designed the Harlow Gate Bridge?", "Mirela Ostrand", "direct"),
        ("What color is the Harlow Gate Bridge painted?", "orange", "direct"),
        ("What was the ferry that crossed the Tamsel before the bridge called?", "Grey Duck", "direct"),
        ("In which city did Mirela Ostrand design a bridge?", "Corvain", "indirect"),
    )),
    Passage("Sablewood Academy", (
        "Sablewood Academy is a music school in the town of Ridgemere. "
        "It was founded in 1893 by the violinist Clara Hollen. "
        "The school's orchestra is called the Ridgemere Starlings. "
        "Every student at Sablewood must learn to play the oboe in their first year."), (
        ("In which town is Sablewood Academy?", "Ridgemere", "direct"),
        ("Who founded Sablewood Academy?", "Clara Hollen", "direct"),
        ("What is the orchestra of Sablewood Academy called?", "Ridgemere Starlings", "direct"),
        ("Which instrument must first-year students at Sablewood Academy learn?", "oboe", "direct"),
        ("What instrument did the founder of Sablewood Academy play?", "violin", "indirect"),
    )),
    Passage("Glassback beetle", (
        "The glassback beetle lives only in the Morrow Marshes of Velandia. "
        "Its shell is transparent, so its green wings can be seen through it. "
        "The beetle was first described in 1902 by the naturalist Percival Drumm. "
        "Glassback beetles feed on the nectar of the marsh lily."), (
        ("Where does the glassback beetle live?", "Morrow Marshes", "direct"),
        ("What color are the wings of the glassback beetle?", "green", "direct"),
        ("Who first described the glassback beetle?", "Percival Drumm", "direct"),
        ("Which flower's nectar do glassback beetles feed on?", "marsh lily", "direct"),
        ("In which country can glassback beetles be found in the wild?", "Velandia", "indirect"),
    )),
    Passage("Tolvan Railway", (
        "The Tolvan Railway links the port of Ashby Cove to the mining town of Greyhollow. "
        "It opened in 1887 and is 52 kilometers long. "
        "Its oldest locomotive, named Old Bess, still pulls a tourist train on Sundays. "
        "The railway was built by the Ironvale Company to carry copper from Greyhollow to the sea."), (
        ("Which port does the Tolvan Railway reach?", "Ashby Cove", "direct"),
        ("How many kilometers long is the Tolvan Railway?", "52", "direct"),
        ("What is the oldest locomotive of the Tolvan Railway called?", "Old Bess", "direct"),
        ("Which company built the Tolvan Railway?", "Ironvale Company", "direct"),
        ("What metal is mined in Greyhollow?", "copper", "indirect"),
    )),
    Passage("Marisol Quent", (
        "Marisol Quent is a chess player from the city of Dunmore. "
        "She became a grandmaster in 2009 at the age of sixteen. "
        "Her favourite opening is the Heron Gambit, which she invented. "
        "In 2015 she won the Northern Crown tournament."), (
        ("Which city is Marisol Quent from?", "Dunmore", "direct"),
        ("Which chess opening did Marisol Quent invent?", "Heron Gambit", "direct"),
        ("Which tournament did Marisol Quent win in 2015?", "Northern Crown", "direct"),
        ("What game does Marisol Quent play?", "chess", "direct"),
        ("In what year was Marisol Quent born?", "1993", "indirect"),
    )),
    Passage("Pelling Lake", (
        "Pelling Lake lies in the Amber Hills and is fed by the Sorrow Creek. "
        "The lake freezes every winter, and a skating race called the Pelling Mile is held on the ice. "
        "The deepest point of the lake is 88 meters. "
        "An old monastery named Saint Orrin's stands on an island in the middle of the lake."), (
        ("In which hills does Pelling Lake lie?", "Amber Hills", "direct"),
        ("Which creek feeds Pelling Lake?", "Sorrow Creek", "direct"),
        ("What is the skating race on Pelling Lake called?", "Pelling Mile", "direct"),
        ("What is the name of the monastery on the island in Pelling Lake?", "Saint Orrin's", "direct"),
        ("In which season is the Pelling Mile race held?", "winter", "indirect"),
    )),
    Passage("Tandor fruit", (
        "The tandor is a purple fruit that grows on trees in the valleys of Orliss. "
        "It tastes like a mix of plum and ginger. "
        "Tandor trees flower in spring and give fruit only every second year. "
        "The fruit is used to make a sweet drink called tandorade."), (
        ("What color is the tandor fruit?", "purple", "direct"),
        ("In which valleys do tandor trees grow?", "Orliss", "direct"),
        ("Which spice does the tandor fruit taste of, besides plum?", "ginger", "direct"),
        ("What drink is made from the tandor fruit?", "tandorade", "direct"),
        ("Which fruit is tandorade made from?", "tandor", "indirect"),
    )),
    Passage("Ilse Marrow", (
        "Captain Ilse Marrow sailed the ship Northern Wren to the Frostmere Islands in 1823. "
        "She was the first person to map the islands. "
        "On the largest island she found a colony of white seals. "
        "She later wrote a book about the voyage called The Cold Shore."), (
        ("What was the name of Ilse Marrow's ship?", "Northern Wren", "direct"),
        ("Which islands did Captain Ilse Marrow sail to in 1823?", "Frostmere Islands", "direct"),
        ("What animals did Ilse Marrow find on the largest Frostmere island?", "seals", "direct"),
        ("What book did Ilse Marrow write about her voyage?", "The Cold Shore", "direct"),
        ("Who was the first person to map the Frostmere Islands?", "Ilse Marrow", "indirect"),
    )),
    Passage("Orbrook Rovers", (
        "Orbrook Rovers is a football club from the town of Orbrook. "
        "The club plays its home games at Millbank Park and wears yellow shirts. "
        "Its most famous player, the striker Dario Fenn, scored 214 goals for the club. "
        "Orbrook Rovers won the national cup for the first time in 1977."), (
        ("Where does Orbrook Rovers play its home games?", "Millbank Park", "direct"),
        ("What color are the shirts of Orbrook Rovers?", "yellow", "direct"),
        ("Who is the most famous player of Orbrook Rovers?", "Dario Fenn", "direct"),
        ("In what year did Orbrook Rovers first win the national cup?", "1977", "direct"),
        ("For which club did Dario Fenn score 214 goals?", "Orbrook Rovers", "indirect"),
    )),
)

# The settings the issue measured forgetting with, spelled out so the row keeps its meaning.
OLD_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3, "epochs": 10, "rank": 16, "alpha": 32, "target_modules": "all-linear",
    "batch_size": 8, "rehearsal_ratio": 0.0, "kl_beta": 0.0, "layers": "", "delta_scale": 1.0,
}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "lora_sft": OLD_DEFAULTS,
    "lora_sft+rehearsal": {**OLD_DEFAULTS, "rehearsal_ratio": 1.0},
    "lora_sft+kl": {**OLD_DEFAULTS, "kl_beta": 1.0},
    "default": None,  # LoraSettings() as it is now
}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_set(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` → (NAME, OLD_DEFAULTS with those values)."""
    name, _, body = spec.partition(":")
    values: dict[str, Any] = dict(OLD_DEFAULTS)
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key not in LoraSettings.model_fields:
            raise SystemExit(f"--set {spec}: {key!r} is not a LoraSettings field")
        # '+' separates target module names inside one value, since ',' separates the pairs.
        value: Any = raw.replace("+", ",")
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        values[key] = value
    return name, values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="lora_sft,lora_sft+rehearsal,lora_sft+kl,default,sdft")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:key=value,...",
                        help="an extra variant on top of the old defaults (repeatable)")
    parser.add_argument("--invented", type=int, default=len(INVENTED), help="invented passages, from the first")
    parser.add_argument("--squad", type=int, default=6, help="shortest passages of --squad-file")
    parser.add_argument("--squad-file", default=str(ROOT.parent / "shared/data/squad/seal_eval_200.json"))
    parser.add_argument("--seed", type=int, default=0)
    # One intra-op thread: on a shared, oversubscribed CPU it was faster than two (bench/continual.py).
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch decides")
    parser.add_argument("--out", default=str(ROOT / "bench/results/forgetting"))
    parser.add_argument("--resume", action="store_true", help="keep the updates already in <out>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings(seed=args.seed)
    variants: dict[str, dict[str, Any] | None] = {}
    for name in filter(None, args.variants.split(",")):
        if name == "sdft":
            variants[name] = {"rule": "sdft"}
        elif name in VARIANTS:
            variants[name] = VARIANTS[name]
        else:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}, sdft, or use --set")
    for spec in args.set:
        name, values = parse_set(spec)
        variants[name] = values

    passages = list(INVENTED[: args.invented])
    if args.squad:
        contexts = load_squad(args.squad_file)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i].passage))[: args.squad]
        for index in order:
            c = contexts[index]
            passages.append(Passage(c.title, c.passage, tuple((q.question, q.answer, "squad") for q in c.questions),
                                    source=f"squad:{index}"))

    started = time.perf_counter()
    model_path = resolve_model_path(settings.model)
    fingerprint = model_fingerprint(model_path)
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=settings.model.dtype, device=settings.model.device)
    grader = build_grader(settings.auditor)
    auditor = Auditor(grader, settings.gates)
    gate_settings = GateSettings(**{**settings.gates.model_dump(), "require_guardrails": False})

    def answerer(current: Any, max_new_tokens: int):
        engine = TransformersEngine(current, tokenizer)
        params = SamplingParams(max_new_tokens=max_new_tokens)

        def answer(prompts: list[str], _adapter_id: str) -> list[str]:
            return [g.text for g in engine.generate(prompts, params, chat=True, batch_size=settings.auditor.batch_size)]

        return answer

    probe_store = ProbeStore(settings.home / "auditor" / "retention")
    probe = probe_store.load(fingerprint)
    if probe is None:
        candidates, notes = candidate_questions(settings.retention, base_dir=ROOT)
        log(f"building the retention probe: screening up to {len(candidates)} questions ({notes})")
        probe = auditor.build_probe(answerer(model, settings.retention.max_new_tokens), fingerprint, candidates,
                                    size=settings.retention.probe_size, notes=notes,
                                    rephrasings=QUESTION_REPHRASINGS if settings.retention.screen_rephrasings else ())
        probe_store.save(probe)
    base_probe = accuracy_of(auditor.closed_book(answerer(model, settings.retention.max_new_tokens), probe.questions, ""))
    log(f"probe {probe.probe_id}: {len(probe)} questions (of {probe.screened} screened), base accuracy {base_probe:.3f}")

    anchor_store = AnchorStore(settings.home / "student" / "anchors")
    anchor_cache: dict[int, Any] = {}

    def anchors_for(max_new_tokens: int, max_seq_len: int) -> list:
        if max_new_tokens not in anchor_cache:
            anchor_cache[max_new_tokens] = anchor_store.load_or_build(
                fingerprint, model, tokenizer, max_new_tokens=max_new_tokens, batch_size=settings.auditor.batch_size)
        return anchor_examples(tokenizer, anchor_cache[max_new_tokens], max_seq_len=max_seq_len)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    if args.resume and out.with_suffix(".json").is_file():
        report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    report.update({
        "command": " ".join(["nice -n 5 .venv/bin/python", *sys.argv]),
        "machine": {"torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "model": model_path.name,
        "grader": settings.auditor.grader,
        "gates": gate_settings.model_dump(),
        "probe": {"probe_id": probe.probe_id, "size": len(probe), "screened": probe.screened,
                  "base_accuracy": base_probe, "notes": probe.notes},
        "passages": [{"title": p.title, "source": p.source, "questions": len(p.questions)} for p in passages],
    })
    report.setdefault("variants", {})
    report.setdefault("baselines", {})

    def save() -> None:
        report["summary"] = summarize(report)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")

    tau_answer = answerer(model, settings.auditor.answer_max_new_tokens)
    for passage in passages:
        if passage.title not in report["baselines"]:
            questions = [Question(q, a) for q, a, _ in passage.questions]
            outcomes = auditor.closed_book(tau_answer, questions, "")
            report["baselines"][passage.title] = [o.correct for o in outcomes]
    log(f"setup {time.perf_counter() - started:.0f}s; {len(passages)} passages, variants: {', '.join(variants)}")

    for name, values in variants.items():
        entry = report["variants"].setdefault(name, {"rows": {}})
        if values == {"rule": "sdft"}:
            lora = None
            entry["sdft"] = settings.sdft.model_dump()
        else:
            lora = LoraSettings() if values is None else LoraSettings(**{**LoraSettings().model_dump(), **values})
            entry["lora"] = lora.model_dump()
        for passage in passages:
            if passage.title in entry["rows"]:
                continue
            entry["rows"][passage.title] = row = run_update(
                passage, lora, args.seed, model, tokenizer, auditor, answerer, probe, base_probe,
                report["baselines"][passage.title], gate_settings, anchors_for, settings,
            )
            log(f"{name} | {passage.title}: τ {row['base_correct']}→{row['correct']}/{row['questions']}, "
                f"probe drop {row['retention_drop']:+.3f}, KL {row['kl']:.3f}, train {row['train_seconds']:.0f}s, "
                f"{'PROMOTE' if row['promote'] else 'reject'}")
            save()
    save()
    log(f"done in {time.perf_counter() - started:.0f}s → {out.with_suffix('.json')}")
    return 0


# SDFT's training prompts: open questions about the passage's subject, never τ's own questions
# (in the product the teacher writes them; seal/domains/self_qa.py).
SDFT_PROMPTS = (
    "What is {title}?",
    "Tell me one fact about {title}.",
    "Where is {title}?",
    "Who is connected with {title}?",
    "When did something important happen for {title}?",
    "Describe {title} in one sentence.",
    "What is {title} known for?",
    "Give a number that matters for {title}.",
)


def run_update(passage: Passage, lora: LoraSettings | None, seed: int, model: Any, tokenizer: Any, auditor: Auditor,
               answerer: Any, probe: Any, base_probe: float, base_flags: list[bool], gate_settings: GateSettings,
               anchors_for: Any, settings: Settings) -> dict[str, Any]:
    if lora is None:
        # SDFT: the student answers questions about the passage it has not seen; the teacher is
        # the base model reading the passage (and its sentences as the self-edit's notes).
        config = sdft_config(settings.sdft, seed=seed)
        prompts = [build_question_prompt(t.format(title=passage.title)) for t in SDFT_PROMPTS]
        context = privileged_context(passage.title, passage.text, "\n".join(sentences(passage.text)))
        result = SDFTUpdate(model, tokenizer, config).train(prompts, context)
    else:
        config = lora_sft_config(lora, seed=seed)
        texts = build_training_sequences(passage.title, passage.text, sentences(passage.text))
        anchors = anchors_for(lora.anchor_max_new_tokens, config.max_seq_len) if config.uses_anchors else None
        result = LoraSFTTrainer(model, tokenizer, config).train(texts, anchors=anchors)
    t0 = time.perf_counter()
    kl = kl_drift(result.model, tokenizer)
    kl_seconds = time.perf_counter() - t0
    questions = [Question(q, a) for q, a, _ in passage.questions]
    outcomes = auditor.closed_book(answerer(result.model, settings.auditor.answer_max_new_tokens), questions, "x")
    probe_outcomes = auditor.closed_book(answerer(result.model, settings.retention.max_new_tokens), probe.questions, "x")
    probe_accuracy = accuracy_of(probe_outcomes)
    scores = CandidateScores(
        tau_accuracy=accuracy_of(outcomes),
        baseline_tau_accuracy=sum(base_flags) / len(base_flags),
        retention_accuracy=probe_accuracy,
        baseline_retention_accuracy=base_probe,
        retention_kl=kl,
    )
    decision = decide(scores, gate_settings)
    kinds = [k for _, _, k in passage.questions]
    return {
        "source": passage.source,
        "questions": len(questions),
        "base_correct": sum(base_flags),
        "correct": sum(o.correct for o in outcomes),
        "correct_by_kind": {kind: sum(o.correct for o, k in zip(outcomes, kinds) if k == kind) for kind in set(kinds)},
        "questions_by_kind": {kind: kinds.count(kind) for kind in set(kinds)},
        "predictions": [o.prediction for o in outcomes],
        "retention_accuracy": probe_accuracy,
        "retention_drop": base_probe - probe_accuracy,
        "forgotten": [o.question for o in probe_outcomes if not o.correct],
        "kl": kl,
        "kl_seconds": kl_seconds,
        "promote": decision.promote,
        "failed_reasons": decision.failed_reasons,
        "train_seconds": result.seconds,
        "steps": result.steps,
        "final_loss": result.losses[-1],
        "final_kl_loss": result.kl_losses[-1] if result.kl_losses else None,
        "final_rehearsal_loss": result.rehearsal_losses[-1] if result.rehearsal_losses else None,
    }


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    summary = {}
    for name, entry in report["variants"].items():
        rows = list(entry["rows"].values())
        if not rows:
            continue

        def part(selected: list[dict[str, Any]]) -> dict[str, Any] | None:
            if not selected:
                return None
            questions = sum(r["questions"] for r in selected)
            return {
                "passages": len(selected),
                "questions": questions,
                "before": sum(r["base_correct"] for r in selected) / questions,
                "after": sum(r["correct"] for r in selected) / questions,
                "indirect_after": _share(selected, "indirect"),
                "retention_drop": sum(r["retention_drop"] for r in selected) / len(selected),
                "max_retention_drop": max(r["retention_drop"] for r in selected),
                "kl": sum(r["kl"] for r in selected) / len(selected),
                "promoted": sum(r["promote"] for r in selected) / len(selected),
                "train_seconds": sum(r["train_seconds"] for r in selected) / len(selected),
            }

        summary[name] = {
            "invented": part([r for r in rows if r["source"] == "invented"]),
            "squad": part([r for r in rows if r["source"] != "invented"]),
            "all": part(rows),
        }
    return summary


def _share(rows: list[dict[str, Any]], kind: str) -> float | None:
    asked = sum(r["questions_by_kind"].get(kind, 0) for r in rows)
    return sum(r["correct_by_kind"].get(kind, 0) for r in rows) / asked if asked else None


def _layers(lora: dict[str, Any]) -> str:
    return f" in blocks {lora['layers']}" if lora.get("layers") else ""


def _scale(lora: dict[str, Any]) -> str:
    # Rows measured before delta_scale existed kept the whole update.
    scale = lora.get("delta_scale", 1.0)
    return f", update scaled by {scale:g}" if scale != 1.0 else ""


def markdown(report: dict[str, Any]) -> str:
    probe = report["probe"]
    lines = [
        "# Forgetting: what each update learns and what it costs (generated by bench/forgetting.py)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model {report['model']}; grader `{report['grader']}`; torch threads {report['machine']['torch_threads']}; "
        f"retention probe {probe['size']} questions (base accuracy {probe['base_accuracy']:.3f}); default gates "
        f"(max drop {report['gates']['max_retention_drop']}, min gain {report['gates']['min_gain']}, "
        f"max KL {report['gates']['max_retention_kl']}), guardrails not applied. One seed; training text = the "
        "passage's sentences as self-edit lines plus the passage. Train s = wall time of the update on a shared CPU.",
        "",
        "| variant | passages | closed-book before → after | indirect after | probe drop (mean / max) | KL drift | promoted | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, parts in report.get("summary", {}).items():
        for label in ("invented", "squad"):
            s = parts[label]
            if s is None:
                continue
            indirect = "—" if s["indirect_after"] is None else f"{s['indirect_after']:.2f}"
            lines.append(
                f"| {name} | {label} ({s['passages']}, {s['questions']} q) | {s['before']:.2f} → {s['after']:.2f} | "
                f"{indirect} | {s['retention_drop']:.3f} / {s['max_retention_drop']:.3f} | {s['kl']:.3f} | "
                f"{s['promoted']:.0%} | {s['train_seconds']:.0f} |"
            )
    lines += ["", "Settings per variant:", ""]
    for name, entry in report["variants"].items():
        if "sdft" in entry:
            sd = entry["sdft"]
            lines.append(
                f"- `{name}`: SDFT (TRL), lr {sd['learning_rate']:g}, {sd['epochs']} epochs, rank {sd['rank']}, "
                f"{sd['num_generations']} answers per prompt of ≤{sd['max_completion_length']} tokens, teacher "
                f"{sd['teacher_model_kind']}, {sd['distillation_mode']} (k={sd['distillation_topk']}); "
                f"{len(SDFT_PROMPTS)} open prompts about the subject"
            )
            continue
        lora = entry["lora"]
        lines.append(
            f"- `{name}`: lr {lora['learning_rate']:g}, {lora['epochs']} epochs, rank {lora['rank']}, alpha {lora['alpha']}, "
            f"targets `{lora['target_modules']}`{_layers(lora)}, rehearsal ratio {lora['rehearsal_ratio']:g}, "
            f"KL β {lora['kl_beta']:g}{_scale(lora)}"
        )
    lines += ["", "Per passage (τ correct before→after / questions, probe drop, KL, promoted):", ""]
    names = list(report["variants"])
    lines.append("| passage | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for passage in report["passages"]:
        cells = []
        for name in names:
            row = report["variants"][name]["rows"].get(passage["title"])
            cells.append("" if row is None else f"{row['base_correct']}→{row['correct']}/{row['questions']}, "
                         f"{row['retention_drop']:+.2f}, {row['kl']:.2f}{' ✓' if row['promote'] else ''}")
        lines.append(f"| {passage['title']} ({passage['source']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
