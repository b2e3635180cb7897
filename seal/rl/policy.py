"""The teacher's policy adapter: trained by ReST^EM, versioned in an ``AdapterRegistry`` under one
lineage name, hot-loaded into the teacher's engine.

The promoted version of the lineage is the policy the teacher serves: a restarted teacher loads
it again, and ``registry.rollback`` followed by ``load_serving`` undoes a round.

Audited like the student's registry, under kinds of its own. This registry is the teacher's,
under ``<home>/teacher/registry`` (``open_teacher_policy``), and holds only the policy that writes
self-edits; nothing the student serves is read from it. With ``audit`` (the teacher service's
``seal.audit_outbox.AuditOutbox``) every status change is journaled before it is made and reported
once to the auditor's chain, where the teacher may report only ``policy_*`` kinds
(``seal.audit.policy_kind``; the auditor checks): a hot-loaded round is ``policy_promote``, the
version it replaced is recorded in its manifest history. Without ``audit`` (``seal eval``, tests)
the manifest history and the round's ``round.json`` are the only record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seal.audit import KIND_PROMOTE
from seal.engines import PolicyEngine, PolicyRef
from seal.registry import AdapterRegistry, Manifest
from seal.rl.restem import PolicyUpdate
from seal.update.lora_sft import LoraSFTConfig, save_adapter
from seal.update.policy_sft import PolicyExample, train_policy

if TYPE_CHECKING:
    from seal.audit_outbox import AuditOutbox
    from seal.config import Settings

log = logging.getLogger(__name__)


class TeacherPolicy:
    def __init__(
        self,
        engine: PolicyEngine,
        registry: AdapterRegistry,
        *,
        name: str,
        base_model_path: Path,
        sft_config: Callable[[int], LoraSFTConfig],
        dtype: str = "float32",
        device: str = "cpu",
        audit: AuditOutbox | None = None,
    ) -> None:
        """``audit``: the outbox ``registry`` journals its transitions in (the same object), which
        reports them to the auditor; None = not reported."""
        self.engine = engine
        self.registry = registry
        self.audit = audit
        self.name = name
        self._base_model_path = Path(base_model_path)
        self._sft_config = sft_config
        self._dtype = dtype
        self._device = device
        self._train_base: Any = None
        self._tokenizer: Any = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()

    # --- serving ------------------------------------------------------------------------------

    def ref(self, manifest: Manifest) -> PolicyRef:
        return PolicyRef(manifest.adapter_name, manifest.version, self.registry.path_of(manifest))

    @property
    def adapter_id(self) -> str:
        """The policy generating now; empty = the base model."""
        policy = self.engine.policy
        return policy.adapter_id if policy else ""

    def load_serving(self) -> Manifest | None:
        """Load the promoted version into the engine (the base model if none is promoted)."""
        manifest = self.registry.promoted(self.name)
        if manifest is None:
            self.engine.unload_policy()
            return None
        self.registry.verify(manifest)
        self.engine.load_policy(self.ref(manifest))
        return manifest

    def activate(self, version: int) -> Manifest | None:
        """Generate with one stored version (0 = the base model) without changing what is
        promoted: for evaluating an old policy side by side."""
        if version == 0:
            self.engine.unload_policy()
            return None
        manifest = self.registry.get((self.name, version))
        self.registry.verify(manifest)
        self.engine.load_policy(self.ref(manifest))
        return manifest

    def hot_load(self, manifest: Manifest, reason: str) -> Manifest:
        """Serve ``manifest`` from now on. The engine loads first, so a version that fails to
        load is never marked as serving."""
        self.registry.verify(manifest)
        self.engine.load_policy(self.ref(manifest))
        if manifest.status != "promoted":
            manifest = self.registry.promote(manifest.adapter_id, reason)
            if self.audit is not None:  # the journaled transition, reported as policy_promote
                self.audit.record(KIND_PROMOTE, manifest.adapter_id, reason, principal="teacher")
        return manifest

    # --- training -----------------------------------------------------------------------------

    def _training_base(self) -> tuple[Any, Any]:
        # A separate copy: the engine's model carries injected LoRA layers once a policy loads.
        if self._train_base is None:
            from seal.models import load_model_and_tokenizer, model_fingerprint

            model, tokenizer = load_model_and_tokenizer(self._base_model_path, dtype=self._dtype, device=self._device)
            self._train_base, self._tokenizer = model, tokenizer
            self._fingerprint = model_fingerprint(self._base_model_path)
        return self._train_base, self._tokenizer

    def _trained_by(self, round_id: str) -> Manifest | None:
        for manifest in self.registry.list(self.name):
            if manifest.hyperparameters.get("restem_round") == round_id:
                return manifest
        return None

    def train(
        self,
        examples: Sequence[tuple[str, str]],
        round_id: str,
        on_step: Callable[[int, int, float], None] | None = None,
        *,
        seed: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> PolicyUpdate:
        """SFT a fresh policy adapter from the base model on this round's kept examples, store
        it as the next version and hot-load it.

        From the base model each round, as in ReST^EM: every round's data comes from the latest
        policy, so fine-tuning the base on it cannot drift by compounding one round's noise on
        the last. A round interrupted after storing its version reuses that version."""
        with self._lock:
            started = time.perf_counter()
            existing = self._trained_by(round_id)
            if existing is not None:
                log.info("round %s already stored %s; hot-loading it", round_id, existing.adapter_id)
                manifest = self.hot_load(existing, f"ReST^EM round {round_id} (resumed)")
                losses = [float(x) for x in existing.metrics.get("losses", [])]
                return PolicyUpdate(manifest.adapter_id, manifest.version, losses, True, time.perf_counter() - started)

            base, tokenizer = self._training_base()
            config = self._sft_config(seed)
            policy_examples = [PolicyExample(prompt, completion) for prompt, completion in examples]
            result = train_policy(base, tokenizer, policy_examples, config, on_step=on_step, should_stop=should_stop)
            manifest = self.registry.create_version(
                self.name,
                lambda directory: save_adapter(result.model, directory),
                base_model=self._base_model_path.name,
                base_model_fingerprint=self._fingerprint or "",
                context_id="",
                self_edit_sha256="",
                seed=config.seed,
                hyperparameters={**asdict(config), "restem_round": round_id, "examples": len(policy_examples)},
                metrics={
                    "losses": result.losses,
                    "final_loss": result.losses[-1],
                    "train_seconds": result.seconds,
                    "tokens": result.tokens,
                },
            )
            manifest = self.hot_load(manifest, f"ReST^EM round {round_id}: SFT on {len(policy_examples)} kept self-edits")
            return PolicyUpdate(manifest.adapter_id, manifest.version, result.losses, True, time.perf_counter() - started)


def policy_sft_config(settings: Settings, seed: int) -> LoraSFTConfig:
    """The policy's LoRA SFT hyperparameters: ``settings.restem.policy``, field for field (its
    fields are a subset of :class:`LoraSFTConfig`'s; rehearsal and the KL penalty stay off)."""
    return LoraSFTConfig(**settings.restem.policy.model_dump(), seed=seed)


def open_teacher_policy(settings: Settings, audit: AuditOutbox | None = None) -> TeacherPolicy:
    """The teacher's engine (``teacher.engine``) on the configured base model, with its policy
    store under ``<home>/teacher/registry``; nothing is loaded into the engine yet. With ``audit``
    (the service) the registry journals every transition there and recovers from a crash first:
    leftover intents settled and reported, staging of dead writers removed."""
    from seal.engines import create_policy_engine
    from seal.models import resolve_model_path

    model_path = resolve_model_path(settings.model)
    registry = AdapterRegistry(settings.home / "teacher" / "registry", journal=audit)
    if audit is not None:
        registry.recover()
    return TeacherPolicy(
        create_policy_engine(settings, model_path),
        registry,
        name=settings.restem.policy_adapter_name,
        base_model_path=model_path,
        sft_config=lambda seed: policy_sft_config(settings, seed),
        dtype=settings.model.dtype,
        device=settings.model.device,
        audit=audit,
    )
