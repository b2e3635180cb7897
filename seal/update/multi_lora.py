"""Batched multi-LoRA SFT: the k candidates of a batch trained together on ONE frozen base.

:class:`seal.update.lora_sft.LoraSFTTrainer` trains one adapter on a private deep copy of the base
model; k candidates cost k copies and k small training runs one after the other, which leaves a
GPU idle between tiny steps and a CPU repeating the same base matmuls for small batches. Here the
k adapters are named adapters of one :class:`peft.PeftModel` injected into the base itself, and
every optimizer step is one forward and backward pass over the rows of all candidates still
training, each row routed to its own adapter by PEFT's mixed-batch forward (``adapter_names=``).

Why this equals training each candidate alone (the same seeds give the same adapters, up to float
rounding; tests/test_multi_lora.py checks it against the sequential trainer):

- rows never mix in a causal LM (no batch statistics), and an adapter's weights touch only its own
  rows, so the gradient of the summed per-candidate objectives w.r.t. adapter i is exactly the
  gradient of candidate i's own objective; each candidate's loss is normalised by its own token
  count, never the batch's;
- each adapter has its own AdamW, its own gradient-norm clip, learning rate and epochs, and is
  initialised, shuffled and given anchors from its own seed in the same order of random draws as
  the sequential trainer; an adapter whose epochs are done stops receiving rows;
- a candidate whose loss or gradient norm is NaN/inf is marked failed (:class:`TrainingDiverged`,
  the sequential message) and left out of every later step; the others go on;
- rehearsal and the KL-to-base penalty are computed per candidate on its own anchor rows; the
  base's logits come from the same weights with every adapter off (``"__base__"`` rows).

Limits: LoRA dropout must be 0 (PEFT only accepts ``adapter_names`` in eval mode, which switches
dropout off; the product default is 0, and a candidate with dropout is trained sequentially by
the student). The base model is modified in place while the ``with`` block of
:meth:`MultiLoraTrainer.train` runs and restored when it ends, so the caller must keep other
users off it meanwhile (the student holds its training lock). On a CPU a non-float32 base is
copied once per batch in float32 (bf16 matmuls are emulated there), not once per candidate.

Example (``model``/``tokenizer`` from ``seal.models.load_model_and_tokenizer``)::

    specs = [AdapterSpec("c0", LoraSFTConfig(learning_rate=1e-3, epochs=2, seed=0), seqs0),
             AdapterSpec("c1", LoraSFTConfig(learning_rate=3e-4, epochs=4, seed=1), seqs1)]
    with MultiLoraTrainer(model, tokenizer, specs).train() as trained:
        for run in trained.runs:
            if run.error is None:
                save_adapter(trained.model_for(run.name), Path("out") / run.name)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from seal.update.lora_sft import (
    LoraSFTConfig,
    RowForward,
    TokenizedExample,
    TrainingCancelled,
    TrainingDiverged,
    _diverged_message,
    peft_lora_config,
    row_sums,
    scale_lora_delta,
)

# (adapter position in the specs, its step, its total steps, its training loss)
MultiStepCallback = Callable[[int, int, int, float], None]


@dataclass(frozen=True)
class MultiLoraConfig:
    """How the batch is laid out; the per-candidate hyperparameters stay in each LoraSFTConfig."""

    # Most rows (training sequences + anchors, all candidates together) in one forward/backward.
    # A step with more rows is split into passes by whole candidates, which changes no result
    # (candidates are independent) but bounds the memory of the float32 logits and their
    # log-softmaxes (rows × length × vocabulary each). On a CPU big passes only cost: with
    # SmolLM2-135M (49k vocabulary), 4 candidates of 13 rows in one pass took 72 s against 40 s
    # one after another, RSS +8.4 GB (bench/results/candidates.md), so the default is about one
    # candidate's step (8 sequences + 8 anchors). On a GPU, raise it until memory says stop.
    max_rows_per_pass: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.max_rows_per_pass, int) or self.max_rows_per_pass < 1:
            raise ValueError(f"max_rows_per_pass must be an integer >= 1, got {self.max_rows_per_pass!r}")


@dataclass(frozen=True)
class AdapterSpec:
    """One candidate: its adapter's name (unique in the batch), config and training data."""

    name: str
    config: LoraSFTConfig
    sequences: Sequence[TokenizedExample]
    # The base model's own answers (seal.anchors.anchor_examples); required when the config uses them.
    anchors: Sequence[TokenizedExample] = ()


@dataclass
class AdapterRun:
    """What became of one candidate: the same numbers as a sequential TrainResult, or an error."""

    name: str
    total_steps: int
    losses: list[float] = field(default_factory=list)
    rehearsal_losses: list[float] = field(default_factory=list)
    kl_losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    # From the start of the batch to this candidate's last step (all candidates train at once).
    seconds: float = 0.0
    error: TrainingDiverged | None = None

    @property
    def training(self) -> bool:
        return self.error is None and self.steps < self.total_steps


@dataclass
class MultiTrainResult:
    model: Any  # the PeftModel holding every adapter, in eval mode; valid inside the with block only
    runs: list[AdapterRun]
    seconds: float = 0.0

    def model_for(self, name: str) -> Any:
        """The model with only ``name`` active: what ``save_adapter`` and ``kl_drift`` expect."""
        self.model.set_adapter(name)
        return self.model


def validate_specs(specs: Sequence[AdapterSpec]) -> None:
    """Refuse a batch the batched path cannot train exactly like the sequential one."""
    if not specs:
        raise ValueError("no candidates: pass at least one AdapterSpec")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or any(not name or "." in name for name in names):
        raise ValueError(f"adapter names must be unique, non-empty and without dots, got {names!r}")
    for spec in specs:
        if spec.config.dropout != 0:
            raise ValueError(
                f"candidate {spec.name}: batched training needs LoRA dropout 0 (PEFT's mixed-adapter forward "
                "runs in eval mode); train it with LoraSFTTrainer instead"
            )
        if not spec.sequences:
            raise ValueError(f"candidate {spec.name}: no training sequences")
        for index, item in enumerate(spec.sequences):
            if isinstance(item, tuple) and len(item[0]) != len(item[1]):
                raise ValueError(f"candidate {spec.name}, sequence {index}: input_ids and labels differ in length")
        if spec.config.uses_anchors and not spec.anchors:
            raise ValueError(
                f"candidate {spec.name}: rehearsal_ratio or kl_beta is set but no anchor examples were given"
            )


def total_steps(spec: AdapterSpec) -> int:
    return spec.config.epochs * math.ceil(len(spec.sequences) / spec.config.batch_size)


def step_batches(spec: AdapterSpec) -> Iterator[tuple[list[TokenizedExample], list[TokenizedExample]]]:
    """(training batch, anchors) per step, drawn from the candidate's own seeded generator in
    exactly the order LoraSFTTrainer draws them (epoch shuffle, then the anchor cycle as steps
    need it), so both paths see the same batches."""
    import torch

    config = spec.config
    shuffler = torch.Generator().manual_seed(config.seed)
    anchors = list(spec.anchors)
    anchor_order: list[int] = []
    for _epoch in range(config.epochs):
        order = torch.randperm(len(spec.sequences), generator=shuffler).tolist()
        for start in range(0, len(order), config.batch_size):
            batch = [spec.sequences[i] for i in order[start : start + config.batch_size]]
            wanted = config.anchors_per_step(len(batch)) if anchors else 0
            picked: list[TokenizedExample] = []
            while len(picked) < wanted:
                if not anchor_order:
                    anchor_order = torch.randperm(len(anchors), generator=shuffler).tolist()
                picked.append(anchors[anchor_order.pop()])
            yield batch, picked


def pack_passes(row_counts: Sequence[int], max_rows: int) -> list[list[int]]:
    """Group candidate positions into passes of at most ``max_rows`` rows, whole candidates only
    (a candidate bigger than the cap gets a pass of its own)."""
    passes: list[list[int]] = []
    rows = 0
    for position, count in enumerate(row_counts):
        if passes and rows + count <= max_rows:
            passes[-1].append(position)
            rows += count
        else:
            passes.append([position])
            rows = count
    return passes


class MultiLoraTrainer:
    """Trains every candidate of ``specs`` at once on ``base_model`` (see the module docstring)."""

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        specs: Sequence[AdapterSpec],
        settings: MultiLoraConfig | None = None,
    ) -> None:
        from peft import PeftModel

        if isinstance(base_model, PeftModel):
            raise TypeError("pass the plain base model, not a PeftModel: each run trains fresh adapters")
        validate_specs(specs)
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.specs = list(specs)
        self.settings = settings or MultiLoraConfig()

    @contextmanager
    def train(
        self,
        *,
        on_step: MultiStepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[MultiTrainResult]:
        """Train all candidates; yields the result while the adapters still sit on the base (export
        them inside the block); on leaving, the base model is restored exactly as it was.
        ``should_stop()`` is polled before every step and ends the whole batch with TrainingCancelled;
        a diverging candidate only ends itself (its run's ``error``)."""
        import torch

        base_device = getattr(self.base_model, "device", torch.device("cpu"))
        host = self._host_model()
        frozen = {name: parameter.requires_grad for name, parameter in host.named_parameters()}
        model = None
        try:
            with torch.random.fork_rng(devices=[base_device] if base_device.type == "cuda" else []):
                model = self._inject(host)
                result = self._train_steps(model, on_step, should_stop)
            yield result
        finally:
            if model is not None:
                model.unload()  # removes the LoRA layers without merging them: the base's own modules return
            for name, parameter in host.named_parameters():
                parameter.requires_grad_(frozen.get(name, parameter.requires_grad))

    def _host_model(self) -> Any:
        import torch

        model = self.base_model
        if getattr(model, "device", torch.device("cpu")).type == "cpu" and model.dtype != torch.float32:
            # The sequential trainer trains in float32 on a CPU (bf16 matmuls are emulated, >15x
            # slower); one float32 copy for the whole batch keeps that without touching the base.
            return copy.deepcopy(model).float()
        return model

    def _inject(self, host: Any) -> Any:
        """Add every candidate's adapter, each initialised from its own seed (as the sequential
        trainer does right before get_peft_model), all trainable."""
        import torch
        from peft import get_peft_model

        # Target names are resolved on the plain model: once the first adapter is in, its own
        # lora_A/lora_B layers would count as linear layers too.
        loras = [peft_lora_config(host, spec.config) for spec in self.specs]
        model = None
        for spec, lora in zip(self.specs, loras, strict=True):
            torch.manual_seed(spec.config.seed)
            if model is None:
                model = get_peft_model(host, lora, adapter_name=spec.name)
            else:
                model.add_adapter(spec.name, lora)
        assert model is not None
        model.set_requires_grad([spec.name for spec in self.specs], requires_grad=True)
        # Eval mode: PEFT refuses adapter_names in training mode; with dropout 0 (validated) the
        # forward is the same computation.
        model.eval()
        return model

    def _train_steps(
        self, model: Any, on_step: MultiStepCallback | None, should_stop: Callable[[], bool] | None
    ) -> MultiTrainResult:
        import torch

        started = time.perf_counter()
        runs = [AdapterRun(spec.name, total_steps(spec)) for spec in self.specs]
        parameters = [
            [p for n, p in model.named_parameters() if p.requires_grad and f".{spec.name}." in n] for spec in self.specs
        ]
        optimizers = [
            torch.optim.AdamW(params, lr=spec.config.learning_rate, weight_decay=0.0)
            for spec, params in zip(self.specs, parameters, strict=True)
        ]
        batches = [step_batches(spec) for spec in self.specs]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        step = 0
        while True:
            active = [position for position, run in enumerate(runs) if run.training]
            if not active:
                break
            if should_stop is not None and should_stop():
                longest = max(run.total_steps for run in runs)
                raise TrainingCancelled(f"training cancelled before step {step + 1} of {longest}; no adapter was saved")
            step += 1
            work = {position: next(batches[position]) for position in active}
            row_counts = [len(work[p][0]) + len(work[p][1]) for p in active]
            losses: dict[int, float] = {}
            for group in pack_passes(row_counts, self.settings.max_rows_per_pass):
                positions = [active[i] for i in group]
                losses.update(self._forward_backward(model, positions, work, runs, pad_id))
            for position in active:
                run, spec = runs[position], self.specs[position]
                if run.error is not None:
                    optimizers[position].zero_grad(set_to_none=True)
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters[position], spec.config.grad_clip)
                if not torch.isfinite(grad_norm):
                    run.error = TrainingDiverged(
                        _diverged_message(step, run.total_steps, "gradient norm", grad_norm.item(), spec.config)
                    )
                    optimizers[position].zero_grad(set_to_none=True)
                    continue
                optimizers[position].step()
                optimizers[position].zero_grad(set_to_none=True)
                run.steps += 1
                run.losses.append(losses[position])
                run.seconds = time.perf_counter() - started
                if on_step is not None:
                    on_step(position, run.steps, run.total_steps, losses[position])
        for run, spec in zip(runs, self.specs, strict=True):
            if run.error is None:
                scale_lora_delta(model, spec.name, spec.config.delta_scale)
        return MultiTrainResult(model=model, runs=runs, seconds=time.perf_counter() - started)

    def _forward_backward(
        self,
        model: Any,
        positions: Sequence[int],
        work: dict[int, tuple[list[TokenizedExample], list[TokenizedExample]]],
        runs: list[AdapterRun],
        pad_id: int,
    ) -> dict[int, float]:
        """One pass over the rows of ``positions``: each candidate's objective from its own rows,
        the finite ones summed and back-propagated. Returns each surviving candidate's training loss.

        Training rows and anchor rows are summed apart, as in the sequential trainer, each in
        forwards over rows of similar length (:func:`seal.update.lora_sft.row_sums`)."""
        import torch

        train = Rows.of([(self.specs[p].name, work[p][0]) for p in positions])
        anchor = Rows.of([(self.specs[p].name, work[p][1]) for p in positions])
        train_sums = row_sums(train.examples, pad_id, model.device, train.forward(model))
        anchor_sums = None
        if anchor.examples:
            wants_kl = any(self.specs[p].config.kl_beta > 0 and anchor.rows(i) for i, p in enumerate(positions))
            anchor_sums = row_sums(
                anchor.examples, pad_id, model.device, anchor.forward(model), anchor.base_forward(model) if wants_kl else None
            )

        objective = None
        losses: dict[int, float] = {}
        for i, position in enumerate(positions):
            spec, run = self.specs[position], runs[position]
            loss = train_sums.mean(train_sums.ce, train.rows(i))
            total = loss
            rehearsal = kl = None
            rows = anchor.rows(i)
            if rows and anchor_sums is not None:
                if spec.config.rehearsal_ratio > 0:
                    rehearsal = anchor_sums.mean(anchor_sums.ce, rows)
                    total = total + rehearsal
                if spec.config.kl_beta > 0:
                    kl = anchor_sums.mean(anchor_sums.kl, rows)
                    total = total + spec.config.kl_beta * kl
            if not torch.isfinite(total):
                value = (loss if not torch.isfinite(loss) else total).item()
                run.error = TrainingDiverged(_diverged_message(run.steps + 1, run.total_steps, "loss", value, spec.config))
                continue
            objective = total if objective is None else objective + total
            losses[position] = loss.item()
            if rehearsal is not None:
                run.rehearsal_losses.append(rehearsal.item())
            if kl is not None:
                run.kl_losses.append(kl.item())
            run.tokens += int(train_sums.tokens[train.rows(i)].sum())
            if rows and anchor_sums is not None:
                run.tokens += int(anchor_sums.tokens[rows].sum())
        if objective is not None:
            objective.backward()
        return losses


@dataclass
class Rows:
    """Rows of several candidates in one list, each row tagged with its candidate's adapter."""

    owners: list[str]
    spans: list[slice]  # per candidate of the pass, its rows
    examples: list[TokenizedExample]

    @classmethod
    def of(cls, groups: Sequence[tuple[str, Sequence[TokenizedExample]]]) -> Rows:
        examples: list[TokenizedExample] = []
        owners: list[str] = []
        spans = []
        for name, rows in groups:
            spans.append(slice(len(examples), len(examples) + len(rows)))
            examples.extend(rows)
            owners.extend([name] * len(rows))
        return cls(owners, spans, examples)

    def rows(self, index: int) -> slice | None:
        """The rows of the pass's ``index``-th candidate, None when it has none here."""
        span = self.spans[index]
        return span if span.stop > span.start else None

    def forward(self, model: Any) -> RowForward:
        """Logits of some of these rows, each row through its own adapter (PEFT's mixed batch)."""
        return lambda input_ids, attention_mask, picked: model(
            input_ids=input_ids, attention_mask=attention_mask, adapter_names=[self.owners[i] for i in picked],
            use_cache=False,
        ).logits

    def base_forward(self, model: Any) -> RowForward:
        """The base's logits (every adapter off) on some of these rows. "__base__" rows of a
        mixed batch run with every adapter off; not model.disable_adapter(): re-enabling
        afterwards makes PEFT mark all but the active adapter frozen."""
        return lambda input_ids, attention_mask, picked: model(
            input_ids=input_ids, attention_mask=attention_mask, adapter_names=["__base__"] * len(picked), use_cache=False,
        ).logits
