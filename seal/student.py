"""The student engine: the base model, one LoRA candidate per self-edit, the registry of versions,
and generation with any version (transport-free; ``student_svc`` wraps it in gRPC).

:class:`CandidateTrainer` is the training half on its own (base model, update rules, registry):
the student trains through it in process, and a Kubernetes training pod (seal.executors.worker)
runs the very same class, so a candidate is built by one code path wherever it runs."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from seal.anchors import AnchorSet, AnchorStore, anchor_examples, kl_drift
from seal.cancellation import GenerationStopped, stop_when
from seal.config import Settings
from seal.domains import fewshot
from seal.domains.knowledge import build_question_prompt, build_training_sequences, parse_self_edit
from seal.executors import (
    CandidateJob,
    CandidateOutcome,
    CandidateResult,
    StepCallback,
    TrainingExecutor,
    resolve_executor,
)
from seal.models import (
    Generation,
    SamplingParams,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model_path,
)
from seal.registry import AdapterRegistry, Manifest, TransitionJournal, parse_adapter_id
from seal.serving import ROUTED, BackendKind, MixedBatchServing, ServingBackend, Target
from seal.serving.in_process import InProcessBackend
from seal.update.lora_sft import (
    LoraSFTConfig,
    LoraSFTTrainer,
    TrainingCancelled,
    TrainResult,
    lora_sft_config,
    save_adapter,
)
from seal.update.multi_lora import AdapterRun, AdapterSpec, MultiLoraTrainer, MultiTrainResult
from seal.update.sdft import SDFTUpdate, privileged_context, sdft_config

log = logging.getLogger(__name__)


class UnusableSelfEdit(ValueError):
    code = "invalid_argument"


@dataclass(frozen=True)
class AdapterChoice:
    """Which weights answer a Generate call: base model, a named version, or a lineage's promoted one."""

    base_model: bool = False
    adapter_id: str = ""
    promoted_of: str = ""


def self_edit_digest(self_edit: str) -> str:
    return hashlib.sha256(self_edit.encode()).hexdigest()


class CandidateTrainer:
    """Trains candidates from self-edits by the configured update rules and stores each as a new
    candidate version in ``registry``. The base model is loaded once (now, or on first use with
    ``load_model=False``) and every run starts from it."""

    def __init__(self, settings: Settings, registry: AdapterRegistry, *, load_model: bool = True) -> None:
        self.settings = settings
        self.model_path = resolve_model_path(settings.model)
        self.base_model_name = self.model_path.name
        self.fingerprint = model_fingerprint(self.model_path)
        self.registry = registry
        self._model_lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None
        # One training run at a time: on a CPU node two runs only slow each other down.
        self._train_lock = threading.Lock()
        # The base model's anchor answers (built on first use) and their examples per max_seq_len.
        self._anchors: AnchorSet | None = None
        self._anchor_examples_by_len: dict[int, list[tuple[list[int], list[int]]]] = {}
        if load_model:
            self._model_and_tokenizer()

    def _model_and_tokenizer(self) -> tuple[Any, Any]:
        with self._model_lock:
            if self._loaded is None:
                self._loaded = load_model_and_tokenizer(
                    self.model_path, dtype=self.settings.model.dtype, torch_threads=self.settings.model.torch_threads,
                    device=self.settings.model.device,
                )
            return self._loaded

    @property
    def _train_base(self) -> Any:
        """The base model every training run starts from (never the copy that serves)."""
        return self._model_and_tokenizer()[0]

    @property
    def tokenizer(self) -> Any:
        return self._model_and_tokenizer()[1]

    # --- training --------------------------------------------------------------------------

    def lora_config(self, overrides: dict[str, Any], seed: int) -> LoraSFTConfig:
        return lora_sft_config(self.settings.lora, seed=seed, overrides=overrides)

    def train_candidate(
        self,
        *,
        adapter_name: str,
        title: str,
        passage: str,
        self_edit: str,
        context_id: str,
        overrides: dict[str, Any] | None = None,
        include_passage: bool = True,
        seed: int | None = None,
        training_prompts: Sequence[str] = (),
        fewshot_task: Mapping[str, Any] | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CandidateResult:
        """One candidate from one self-edit by the update rule ``overrides['update_rule']`` (else
        ``settings.update.rule``): LoRA SFT on the self-edit lines (+ the passage), or SDFT on
        ``training_prompts`` with the passage and the self-edit as the teacher's privileged context.
        With ``fewshot_task`` (``seal.domains.fewshot.task_to_dict``) the self-edit is an ARC
        training recipe instead (:meth:`train_fewshot`)."""
        overrides = dict(overrides or {})
        if fewshot_task is not None:
            return self.train_fewshot(
                adapter_name=adapter_name, task=fewshot.task_from_dict(fewshot_task), self_edit=self_edit,
                context_id=context_id, overrides=overrides, seed=seed, on_step=on_step, should_stop=should_stop,
            )
        rule = overrides.pop("update_rule", None) or self.settings.update.rule
        if rule == "sdft":
            return self.train_sdft(
                adapter_name=adapter_name, title=title, passage=passage, self_edit=self_edit, context_id=context_id,
                prompts=training_prompts, overrides=overrides, seed=seed, on_step=on_step, should_stop=should_stop,
            )
        if rule != "lora_sft":
            raise UnusableSelfEdit(f"update rule {rule!r} is unknown; use lora_sft or sdft")
        return self.train_sequences(
            adapter_name=adapter_name,
            sequences=self._knowledge_sequences(title, passage, self_edit, include_passage=include_passage),
            context_id=context_id,
            self_edit_sha256=self_edit_digest(self_edit),
            overrides=overrides,
            seed=seed,
            extra_hyperparameters={"include_passage": include_passage},
            on_step=on_step,
            should_stop=should_stop,
        )

    def _knowledge_sequences(self, title: str, passage: str, self_edit: str, *, include_passage: bool) -> list[str]:
        """The LoRA SFT training texts of a knowledge self-edit; UnusableSelfEdit when it has none."""
        lines = parse_self_edit(self_edit, max_lines=self.settings.lora.max_examples)
        if not lines:
            raise UnusableSelfEdit(
                "the self-edit has no usable lines (each training line needs at least 8 characters "
                "of text besides list markers); send a self-edit with one statement per line"
            )
        return build_training_sequences(title, passage, lines, include_passage=include_passage)

    def train_candidates_together(
        self,
        jobs: Sequence[CandidateJob],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CandidateResult | Exception]:
        """Every job's candidate, in order: a result or the exception that candidate alone raised.

        Knowledge jobs with the lora_sft rule and no LoRA dropout train together on the one base
        model (:mod:`seal.update.multi_lora`: one forward/backward per step for all of them, the
        same adapters as one at a time); the rest (few-shot, SDFT, dropout, or a lone batchable
        job) go through :meth:`train_candidate` one after the other. A cancellation
        (``should_stop``) fails every candidate not yet trained."""
        outcomes: list[CandidateResult | Exception | None] = [None] * len(jobs)
        together: list[tuple[int, CandidateJob, LoraSFTConfig, list[str]]] = []
        for position, job in enumerate(jobs):
            try:
                prepared = self._batchable(job)
            except Exception as exc:  # noqa: BLE001 - an unusable self-edit fails its own candidate only
                outcomes[position] = exc
                continue
            if prepared is not None:
                together.append((position, job, *prepared))
        if len(together) > 1:  # a lone one gains nothing from the batched path
            for (position, *_), outcome in zip(together, self._train_batched(together, on_step, should_stop), strict=True):
                outcomes[position] = outcome
        for position, job in enumerate(jobs):
            if outcomes[position] is not None:
                continue
            try:
                outcomes[position] = self.train_candidate(
                    **job.train_kwargs(), should_stop=should_stop,
                    on_step=None if on_step is None else partial(on_step, position),
                )
            except Exception as exc:  # noqa: BLE001 - one candidate's failure is its outcome, not the batch's
                outcomes[position] = exc
        finished = [outcome for outcome in outcomes if outcome is not None]
        assert len(finished) == len(jobs), "every job ends with a result or its exception"
        return finished

    def _batchable(self, job: CandidateJob) -> tuple[LoraSFTConfig, list[str]] | None:
        """(config, training texts) when ``job`` can train in a multi-LoRA batch, else None (it
        then trains alone, where an unknown rule or other problem is reported as before)."""
        overrides = dict(job.overrides)
        rule = overrides.pop("update_rule", None) or self.settings.update.rule
        if job.fewshot_task is not None or rule != "lora_sft":
            return None
        config = self.lora_config(overrides, self.settings.seed if job.seed is None else job.seed)
        if config.dropout > 0:  # PEFT's mixed-adapter forward runs without dropout
            return None
        return config, self._knowledge_sequences(job.title, job.passage, job.self_edit, include_passage=job.include_passage)

    def _train_batched(
        self,
        together: Sequence[tuple[int, CandidateJob, LoraSFTConfig, list[str]]],
        on_step: StepCallback | None,
        should_stop: Callable[[], bool] | None,
    ) -> list[CandidateResult | Exception]:
        """One multi-LoRA run for ``together`` (position, job, config, texts), each adapter saved as
        its own candidate version exactly as :meth:`train_sequences` saves one."""
        with self._train_lock:
            specs = []
            for index, (_position, _job, config, texts) in enumerate(together):
                trainer = LoraSFTTrainer(self._train_base, self.tokenizer, config)
                anchors = self._anchor_examples(config.max_seq_len, should_stop) if config.uses_anchors else ()
                specs.append(AdapterSpec(f"candidate_{index}", config, trainer.tokenize(texts), anchors))

            def report(index: int, step: int, total: int, loss: float) -> None:
                if on_step is not None:
                    on_step(together[index][0], step, total, loss)

            try:
                with MultiLoraTrainer(self._train_base, self.tokenizer, specs).train(
                    on_step=report, should_stop=should_stop
                ) as trained:
                    saved: list[CandidateResult | Exception] = []
                    for run, (_position, job, config, texts) in zip(trained.runs, together, strict=True):
                        if run.error is not None:  # diverged: the others were trained regardless
                            saved.append(run.error)
                            continue
                        try:
                            saved.append(self._save_batched(trained, run, job, config, texts))
                        except Exception as exc:  # noqa: BLE001 - one candidate's failure is its own
                            saved.append(exc)
                    return saved
            except Exception as exc:  # noqa: BLE001 - cancelled, or the batch itself failed: no adapter was saved
                return [exc] * len(together)

    def _save_batched(
        self, trained: MultiTrainResult, run: AdapterRun, job: CandidateJob, config: LoraSFTConfig, texts: list[str]
    ) -> CandidateResult:
        result = TrainResult(
            model=trained.model_for(run.name), losses=run.losses, steps=run.steps, seconds=run.seconds,
            tokens=run.tokens, rehearsal_losses=run.rehearsal_losses, kl_losses=run.kl_losses,
        )
        hyperparameters = {
            "update_rule": "lora_sft",
            **asdict(config),
            "include_passage": job.include_passage,
            "training_sequences": len(texts),
            # Provenance only: the adapter equals a sequential one (tests/test_multi_lora.py).
            "trained_with": f"multi_lora x{len(trained.runs)}",
        }
        if config.uses_anchors:
            assert self._anchors is not None
            hyperparameters["anchor_set_id"] = self._anchors.anchor_set_id
        manifest = self._save_candidate(
            job.adapter_name, result, job.context_id, self_edit_digest(job.self_edit), config.seed, hyperparameters
        )
        return CandidateResult(manifest, len(texts), run.losses, run.seconds)

    def train_fewshot(
        self,
        *,
        adapter_name: str,
        task: fewshot.ArcTask,
        self_edit: str,
        context_id: str,
        overrides: dict[str, Any] | None = None,
        seed: int | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CandidateResult:
        """One few-shot candidate (test-time training): the self-edit's recipe is parsed
        (malformed: refused), its augmented examples built and costed (over budget: refused,
        nothing trained), then trained by the same LoRA SFT as knowledge incorporation. The
        recipe sets learning rate and epochs, so a request's overrides may only name the rule."""
        try:
            fewshot.validate_fewshot_overrides(overrides or {})
        except ValueError as exc:
            raise UnusableSelfEdit(str(exc)) from None
        settings = self.settings.fewshot
        seed = self.settings.seed if seed is None else seed
        recipe = fewshot.parse_self_edit(self_edit, settings)
        with self._train_lock:
            started = time.perf_counter()
            prepared = fewshot.prepare_update(task, recipe, self.tokenizer, settings, seed=seed)
            config = lora_sft_config(self.settings.lora, seed=seed, overrides=prepared.lora_overrides())
            anchors = self._anchor_examples(config.max_seq_len, should_stop) if config.uses_anchors else None
            result = fewshot.train_update(
                self._train_base, self.tokenizer, prepared, self.settings.lora, seed=seed,
                on_step=on_step, should_stop=should_stop, anchors=anchors,
            )
            hyperparameters = {
                "update_rule": "lora_sft",
                "domain": "fewshot",
                **asdict(config),
                "recipe": recipe.to_json(),
                "cost_steps": prepared.cost.steps,
                "cost_tokens": prepared.cost.tokens,
                "training_sequences": len(prepared.sequences),
            }
            if anchors:
                assert self._anchors is not None
                hyperparameters["anchor_set_id"] = self._anchors.anchor_set_id
            manifest = self._save_candidate(
                adapter_name, result, context_id, self_edit_digest(self_edit), seed, hyperparameters
            )
        return CandidateResult(manifest, len(prepared.sequences), result.losses, time.perf_counter() - started)

    def train_sequences(
        self,
        *,
        adapter_name: str,
        sequences: Sequence[str],
        context_id: str,
        self_edit_sha256: str,
        overrides: dict[str, Any] | None = None,
        seed: int | None = None,
        extra_hyperparameters: dict[str, Any] | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CandidateResult:
        """One LoRA SFT run on ready training sequences, saved as a new candidate version.
        With ``lora.rehearsal_ratio`` or ``lora.kl_beta`` set, every step also rehearses the
        base model's own answers to the anchor prompts (``seal.anchors``)."""
        config = self.lora_config(overrides or {}, self.settings.seed if seed is None else seed)
        with self._train_lock:
            started = time.perf_counter()
            anchors = self._anchor_examples(config.max_seq_len, should_stop) if config.uses_anchors else None
            result = LoraSFTTrainer(self._train_base, self.tokenizer, config).train(
                sequences, on_step=on_step, should_stop=should_stop, anchors=anchors
            )
            hyperparameters = {
                "update_rule": "lora_sft",
                **asdict(config),
                **(extra_hyperparameters or {}),
                "training_sequences": len(sequences),
            }
            if anchors:
                assert self._anchors is not None
                hyperparameters["anchor_set_id"] = self._anchors.anchor_set_id
            manifest = self._save_candidate(adapter_name, result, context_id, self_edit_sha256, config.seed, hyperparameters)
        return CandidateResult(manifest, len(sequences), result.losses, time.perf_counter() - started)

    def train_sdft(
        self,
        *,
        adapter_name: str,
        title: str,
        passage: str,
        self_edit: str,
        context_id: str,
        prompts: Sequence[str],
        overrides: dict[str, Any] | None = None,
        seed: int | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CandidateResult:
        """One SDFT run (``seal.update.sdft``): the student answers ``prompts`` (questions about
        the passage, asked closed-book) on policy and learns to match itself reading the passage
        and the self-edit. The self-edit still shapes the candidate: it is the teacher's notes."""
        if not prompts:
            raise UnusableSelfEdit(
                "the sdft update rule distils on questions about the passage, and none were sent; "
                "send training_prompts (the teacher writes them when Adapt runs with update_rule sdft)"
            )
        config = sdft_config(self.settings.sdft, seed=self.settings.seed if seed is None else seed, overrides=overrides)
        asked = [build_question_prompt(p) for p in prompts]
        with self._train_lock:
            started = time.perf_counter()
            result = SDFTUpdate(self._train_base, self.tokenizer, config).train(
                asked, privileged_context(title, passage, self_edit), on_step=on_step, should_stop=should_stop
            )
            hyperparameters = {"update_rule": "sdft", **asdict(config), "training_prompts": len(asked)}
            manifest = self._save_candidate(
                adapter_name, result, context_id, self_edit_digest(self_edit), config.seed, hyperparameters
            )
        return CandidateResult(manifest, len(asked), result.losses, time.perf_counter() - started)

    def _save_candidate(
        self, adapter_name: str, result: TrainResult, context_id: str, self_edit_sha256: str, seed: int,
        hyperparameters: dict[str, Any],
    ) -> Manifest:
        metrics = {"final_loss": result.losses[-1], "train_seconds": result.seconds}
        if self.settings.retention.measure_kl:
            # Measured here, where the trained model and its base are both in memory: one batched
            # forward pass with the adapter on and off, no generation (seal.anchors.kl_drift).
            metrics["retention_kl"] = kl_drift(result.model, self.tokenizer)
        return self.registry.create_version(
            adapter_name,
            lambda directory: save_adapter(result.model, directory),
            base_model=self.base_model_name,
            base_model_fingerprint=self.fingerprint,
            context_id=context_id,
            self_edit_sha256=self_edit_sha256,
            seed=seed,
            hyperparameters=hyperparameters,
            metrics=metrics,
        )

    def _anchor_examples(
        self, max_seq_len: int, should_stop: Callable[[], bool] | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """The base model's own answers to the anchor prompts, built once per base model and
        cached on disk (``<home>/student/anchors``), tokenised once per ``max_seq_len``; called
        under the training lock. The first build generates for a minute or more on a CPU: it
        stops with the caller (``should_stop``) like the training after it, and nothing is
        cached from a stopped build."""
        if self._anchors is None:
            store = AnchorStore(self.settings.home / "student" / "anchors")
            try:
                with stop_when(should_stop):
                    self._anchors = store.load_or_build(
                        self.fingerprint, self._train_base, self.tokenizer,
                        max_new_tokens=self.settings.lora.anchor_max_new_tokens,
                    )
            except GenerationStopped as exc:
                raise TrainingCancelled(f"stopped while building the anchor set: {exc}") from None
        if max_seq_len not in self._anchor_examples_by_len:
            self._anchor_examples_by_len[max_seq_len] = anchor_examples(
                self.tokenizer, self._anchors, max_seq_len=max_seq_len
            )
        return self._anchor_examples_by_len[max_seq_len]


def open_registry_after_crash(settings: Settings, audit: TransitionJournal | None) -> AdapterRegistry:
    """The student's registry as a start-up after a kill must leave it: staging directories of dead
    writers removed, intents the last process left settled against the manifests, interrupted
    promotions and rollbacks finished; with ``audit`` each of those status changes is reported."""
    registry = AdapterRegistry(settings.registry_dir, journal=audit)
    registry.recover()
    return registry


class Student(CandidateTrainer):
    def __init__(
        self,
        settings: Settings,
        *,
        serving: ServingBackend | None = None,
        executor: TrainingExecutor | None = None,
        audit: TransitionJournal | None = None,
    ) -> None:
        """``serving`` answers Generate for this student's registry (``settings.registry_dir``);
        the student starts it and owns it from then on (``close``). None: in-process generation,
        so that library users (benches, evaluation scripts) never get a tritonserver started
        behind their back; the service passes ``seal.serving.resolve_backend(settings)``.
        ``executor`` trains batches (``train_candidates``); None = the one ``student.executor`` names.
        ``audit`` (the service's ``AuditOutbox``) journals every status change before it is made."""
        # Two copies of the base model on purpose: PEFT injects LoRA layers into the model it
        # wraps, so the copy that serves loaded adapters must never be the one each training run
        # starts from. With training Jobs the pods load theirs; this one loads only if asked to.
        super().__init__(
            settings, open_registry_after_crash(settings, audit), load_model=settings.student.executor == "in_process"
        )
        # Before the backend starts: a misconfigured executor must not leave a tritonserver behind.
        self.executor: TrainingExecutor = executor if executor is not None else resolve_executor(settings, self)
        self.serving: ServingBackend = (
            serving if serving is not None else InProcessBackend(settings, self.registry, self.model_path)
        )
        self.serving.start(self.registry.promoted(settings.adapter_name))

    @property
    def backend(self) -> BackendKind:
        """Which backend answers Generate ('in_process' or 'triton')."""
        return self.serving.name

    def close(self) -> None:
        self.serving.close()

    def served_versions(self) -> dict[str, str]:
        """role -> version currently served for requests that name none ('base' = no adapter)."""
        return self.serving.served()

    def train_candidates(
        self,
        jobs: Sequence[CandidateJob],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CandidateOutcome]:
        """A batch of candidates through the configured executor (``student.executor``): one
        outcome per job, in order; a candidate that fails fails alone."""
        return self.executor.run(jobs, on_step=on_step, should_stop=should_stop)

    # --- serving ---------------------------------------------------------------------------

    def resolve(self, choice: AdapterChoice) -> Manifest | None:
        if choice.base_model:
            return None
        if choice.adapter_id:
            parse_adapter_id(choice.adapter_id)
            return self.registry.get(choice.adapter_id)
        return self.registry.promoted(choice.promoted_of or self.settings.adapter_name)

    def generate(
        self, prompts: Sequence[str], choice: AdapterChoice, params: SamplingParams, *, chat: bool = True
    ) -> tuple[list[Generation], str]:
        if not prompts:
            raise ValueError("no prompts: send at least one prompt to generate from")
        return self.serving.generate(prompts, self._target(choice), params, chat=chat)

    def generate_mixed(
        self, prompts: Sequence[str], adapter_ids: Sequence[str], params: SamplingParams, *, chat: bool = True
    ) -> list[Generation]:
        """``prompts[i]`` answered by version ``adapter_ids[i]`` ("" = the base model): how the
        auditor asks k candidates and the base model at once. Every version is looked up before
        anything is generated (an unknown one fails the call); a backend that batches versions
        together (``MixedBatchServing``: in process) answers in one mixed batch, any other is
        asked once per version. Greedy answers are those of :meth:`generate` per version."""
        if not prompts:
            raise ValueError("no prompts: send at least one prompt to generate from")
        if len(adapter_ids) != len(prompts):
            raise ValueError(f"{len(adapter_ids)} adapter ids for {len(prompts)} prompts: send one per prompt")
        manifests = {
            adapter_id: self.resolve(AdapterChoice(adapter_id=adapter_id)) for adapter_id in dict.fromkeys(adapter_ids)
            if adapter_id
        }
        targets = [manifests[a] if a else None for a in adapter_ids]
        if isinstance(self.serving, MixedBatchServing):
            return self.serving.generate_mixed(prompts, targets, params, chat=chat)
        results: list[Generation | None] = [None] * len(prompts)
        for adapter_id in dict.fromkeys(adapter_ids):
            rows = [i for i, a in enumerate(adapter_ids) if a == adapter_id]
            generations, _ = self.serving.generate(
                [prompts[i] for i in rows], manifests[adapter_id] if adapter_id else None, params, chat=chat
            )
            for i, generation in zip(rows, generations, strict=True):
                results[i] = generation
        return [g for g in results if g is not None]

    def _target(self, choice: AdapterChoice) -> Target:
        if choice.base_model:
            return None
        if not choice.adapter_id and (choice.promoted_of or self.settings.adapter_name) == self.settings.adapter_name:
            # The served lineage, no version named: the backend's routing (and canary split) decides.
            return ROUTED
        # A backend routes the served lineage only; any other version is named by the registry.
        return self.resolve(choice)

    # --- governance --------------------------------------------------------------------------

    def promote(self, adapter_id: str, reason: str) -> Manifest:
        # The registry verifies the weights against their recorded sha256 and raises before
        # anything is recorded; the backend is switched only once the registry has accepted it. If
        # the switch then fails, the record stands and the next start-up serves it.
        manifest = self.registry.promote(adapter_id, reason)
        if manifest.adapter_name == self.settings.adapter_name:  # another lineage is only named
            self.serving.promote(manifest)
        return manifest

    def reject(self, adapter_id: str, reason: str, *, discard_weights: bool = False) -> Manifest:
        manifest = self.registry.mark_rejected(adapter_id, reason)
        # Before the weights go: a rejected version never answers from memory again.
        self.serving.forget(adapter_id)
        if discard_weights:
            manifest = self.registry.discard_weights(adapter_id)
        return manifest

    def rollback(self, adapter_name: str, reason: str, *, allow_base_model: bool) -> tuple[Manifest, Manifest | None]:
        current = self.registry.promoted(adapter_name)
        restored = self.registry.rollback(adapter_name, reason, to_base_ok=allow_base_model)
        if adapter_name == self.settings.adapter_name:
            self.serving.rollback(restored)
        rolled_back = self.registry.get(current.adapter_id) if current else None
        return rolled_back, restored
