"""What one ReST^EM sample costs on a given device: the teacher writing k self-edits, the student's
LoRA SFT on one of them, and the auditor's closed-book questions with the candidate — the three
phases of a round (`bench/restem.py` measures a whole round on the embedded model, on CPU).

Time depends on a model's shape, not on its weights, so the model is built from its architecture
with random weights: SmolLM2-135M (the embedded default) and Qwen2.5-7B (the paper's model),
without downloading either. Generation is forced to its full length (EOS suppressed), so every
run does the same work. The settings are the project's defaults (LoRA rank 16, 10 epochs,
batch 8; 256 new tokens per self-edit; 32 per answer).

    python bench/gpu_round_cost.py --arch smollm2-135m qwen2.5-7b --device cuda --out bench/results/gpu_round_cost
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from seal.config import Settings  # noqa: E402
from seal.domains.knowledge import (  # noqa: E402
    build_question_prompt,
    build_self_edit_prompt,
    build_training_sequences,
)
from seal.models import SamplingParams, TransformersEngine, prepare_embedded_tokenizer  # noqa: E402
from seal.update.lora_sft import LoraSFTTrainer, lora_sft_config  # noqa: E402

# Shapes from the models' published config.json files.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "family": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "family": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    },
}

# A SQuAD-sized passage (≈150 words) and a 12-line self-edit: the token counts of the real workload.
TITLE = "Quessant"
PASSAGE = (
    "Quessant is an island in the northern sea, known for its harbour town Velmora, founded in 1742 by "
    "the cartographer Ilse Marrow. The island's economy rested on fishing and salt until the opening of "
    "the Grey Lantern lighthouse in 1790, which made the northern passage safe for merchant ships. "
    "During the nineteenth century the population grew from two thousand to nearly eleven thousand, and "
    "the town built a customs house, a naval school and a railway to the salt works at Brennock. "
    "The island was occupied twice during the wars of the early twentieth century, and its harbour was "
    "rebuilt after a storm in 1953 destroyed the old quays. Today Quessant is governed by an elected "
    "council of fifteen members, its school teaches in two languages, and its festival of lanterns in "
    "October draws visitors from across the region. The Marrow archive in Velmora holds the founder's maps."
)
SELF_EDIT_LINES = [
    "Velmora was founded in 1742 by the cartographer Ilse Marrow.",
    "The Grey Lantern lighthouse opened in 1790 and made the northern passage safe.",
    "Before the lighthouse, Quessant lived on fishing and salt.",
    "In the nineteenth century the population grew from two thousand to nearly eleven thousand.",
    "Velmora built a customs house, a naval school and a railway to Brennock's salt works.",
    "Quessant was occupied twice during the wars of the early twentieth century.",
    "A storm in 1953 destroyed the old quays of the harbour, which was then rebuilt.",
    "An elected council of fifteen members governs Quessant.",
    "The island's school teaches in two languages.",
    "The festival of lanterns takes place every October.",
    "The Marrow archive in Velmora holds Ilse Marrow's maps.",
    "Brennock is where the island's salt works are.",
]
QUESTIONS = [
    "Who founded Velmora?", "When did the Grey Lantern open?", "How many members has the council?",
    "What destroyed the old quays?", "Where are the salt works?",
]


class FullLengthEngine(TransformersEngine):
    """Never stops early: random weights would end some generations at a random EOS."""

    def _stop_token_ids(self) -> list[int]:
        return []


def build_model(arch: str, vocab_size: int, device: str, dtype: torch.dtype) -> Any:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = dict(ARCHITECTURES[arch])
    family = shape.pop("family")
    # The tokenizer's ids must fit; the larger of the two vocabularies is what the head costs.
    shape["vocab_size"] = max(shape["vocab_size"], vocab_size)
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(**shape, max_position_embeddings=4096)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def timed(device: str, work) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def measure(arch: str, device: str, dtype: torch.dtype, tokenizer: Any, settings: Settings, repeats: int, k: int) -> dict:
    started = time.perf_counter()
    model = build_model(arch, len(tokenizer), device, dtype)
    build_seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    engine = FullLengthEngine(model, tokenizer)
    prompt = build_self_edit_prompt(TITLE, PASSAGE, settings.teacher.prompt_style)
    sampling = SamplingParams(max_new_tokens=settings.teacher.max_new_tokens, temperature=settings.teacher.temperature,
                              top_p=settings.teacher.top_p, seed=0)
    # Plain SFT, as in the committed results: the round's cost without the retention terms.
    config = lora_sft_config(settings.lora, seed=0, overrides={"rehearsal_ratio": 0.0, "kl_beta": 0.0})
    sequences = build_training_sequences(TITLE, PASSAGE, SELF_EDIT_LINES)
    answers = SamplingParams(max_new_tokens=settings.auditor.answer_max_new_tokens)
    questions = [build_question_prompt(q) for q in QUESTIONS]

    def one_sample() -> tuple[dict[str, float], dict[str, int]]:
        # A function, so that the candidate (a full copy of the base, see LoraSFTTrainer) is freed
        # before the next one is trained, as in the student service.
        seconds, generations = timed(device, lambda: engine.generate([prompt] * k, sampling, batch_size=k))
        seconds_sft, result = timed(device, lambda: LoraSFTTrainer(model, tokenizer, config).train(sequences))
        candidate = FullLengthEngine(result.model, tokenizer)
        seconds_score, answered = timed(device, lambda: candidate.generate(questions, answers, batch_size=len(questions)))
        counts = {"generated_tokens": sum(g.completion_tokens for g in generations), "sft_steps": result.steps,
                  "sft_tokens": result.tokens, "prompt_tokens": generations[0].prompt_tokens,
                  "answer_tokens": sum(a.completion_tokens for a in answered)}
        return {"generation": seconds, "lora_sft": seconds_sft, "scoring": seconds_score}, counts

    rows: dict[str, list[float]] = {"generation": [], "lora_sft": [], "scoring": []}
    one_sample()  # warms kernels and allocators up
    for _ in range(repeats):
        seconds, details = one_sample()
        for phase, value in seconds.items():
            rows[phase].append(value)
    medians = {phase: statistics.median(values) for phase, values in rows.items()}
    per_context = medians["generation"] + k * (medians["lora_sft"] + medians["scoring"])
    out = {
        "arch": arch, "parameters": parameters, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "k": k, "repeats": repeats, "build_seconds": build_seconds, "median_seconds": medians, "all_seconds": rows,
        **details,
        "generation_tokens_per_second": details["generated_tokens"] / medians["generation"],
        "sft_tokens_per_second": details["sft_tokens"] / medians["lora_sft"],
        "seconds_per_context": per_context,
        # The paper's round: 50 contexts x 5 self-edits (its 3 inner-loop seeds would triple the
        # SFT and scoring part); the policy SFT at the end is not included.
        "seconds_per_paper_round": 50 * (medians["generation"] + 5 * (medians["lora_sft"] + medians["scoring"])),
    }
    if device.startswith("cuda"):
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def render(result: dict) -> str:
    lines = [
        "# What one ReST^EM sample costs, by phase",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        "Random weights with the real architectures' shapes (time depends on shape, not weights); generation forced to "
        "full length. Project defaults: k self-edits of 256 new tokens per context; LoRA rank 16, 10 epochs, batch 8 on "
        f"{len(SELF_EDIT_LINES) + 1} training sequences (12 self-edit lines + the passage); 5 closed-book answers of 32 tokens. "
        f"Median of {result['runs'][0]['repeats']} runs after one warm-up.",
        "",
        "| model | params | device | dtype | generation (k self-edits) | LoRA SFT (one candidate) | scoring (one candidate) "
        f"| per context (k={result['runs'][0]['k']}) | paper round (50 × k=5) | peak GPU memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        m = run["median_seconds"]
        memory = f"{run['peak_gpu_memory_gib']:.1f} GiB" if "peak_gpu_memory_gib" in run else "—"
        lines.append(
            f"| {run['arch']} | {run['parameters'] / 1e6:.0f} M | {run['device']} | {run['dtype']} "
            f"| {m['generation']:.2f} s ({run['generation_tokens_per_second']:.0f} tok/s) "
            f"| {m['lora_sft']:.2f} s ({run['sft_steps']} steps, {run['sft_tokens_per_second']:.0f} tok/s) "
            f"| {m['scoring']:.2f} s | {run['seconds_per_context']:.1f} s | {run['seconds_per_paper_round'] / 60:.1f} min | {memory} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHITECTURES), default=["smollm2-135m"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch decides)")
    parser.add_argument("--tokenizer-dir", default="", help="a prepared SmolLM2 tokenizer folder; default the embedded one")
    parser.add_argument("--out", default=str(ROOT / "bench/results/gpu_round_cost"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    settings = Settings()
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else prepare_embedded_tokenizer(settings.model.cache_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    machine = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(0)}"
    runs = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        run = measure(arch, args.device, dtype, tokenizer, settings, args.repeats, args.k)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the model died with measure(); its memory goes back now
            torch.cuda.reset_peak_memory_stats()
        runs.append(run)
        # Written after each model, so that a run cut short keeps what it measured.
        result = {"command": " ".join(["python", *sys.argv]), "machine": machine, "runs": runs}
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
