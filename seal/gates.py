"""The promotion policy: one pure function from a candidate adapter's scores to a decision.

SEAL's reward for a self-edit is the closed-book accuracy on the passage's questions (τ) after
the update minus the accuracy before it. Production adds two more conditions before an adapter
may replace the served one: it must not forget much of what the model already knew (retention),
and the self-edit it was trained on must have passed every guardrail.

Everything here is deterministic and side-effect free, so the same scores always give the same
decision, and the decision can be recomputed from the audit log.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from seal.guardrails import GuardrailResult

# Accuracies are fractions k/n, and their float differences carry rounding noise
# (0.4 - 0.3 = 0.10000000000000003). Comparisons against a threshold treat anything within
# this distance as equal to it, so "exactly at the threshold" means the same thing for every n.
TOLERANCE = 1e-9


class GateSettings(BaseModel):
    """Thresholds of the promotion gates."""

    model_config = ConfigDict(extra="forbid")

    # Strictly greater, not ≥: with the default 0.0 an update that changes nothing on τ (or makes
    # it worse) is never promoted, because swapping the served adapter has a cost and a risk of
    # its own. Set e.g. 0.05 to demand a real improvement, or a negative value to exercise the
    # promotion path in tests.
    min_gain: float = Field(0.0, ge=-1.0, le=1.0, description="promote only if the τ gain is strictly above this")
    max_retention_drop: float = Field(
        0.05, ge=0.0, le=1.0, description="largest allowed fall in retention accuracy (a drop exactly this big passes)"
    )
    require_guardrails: bool = Field(True, description="a failed guardrail blocks promotion (off: advisory only)")
    require_retention: bool = Field(
        False, description="block promotion when retention (the QA probe, or the KL drift if max_retention_kl is set) was not measured"
    )
    # None leaves the KL gate out entirely, so decisions recorded before it existed recompute to
    # the same gates. The QA probe stays the interpretable gate; the KL is cheaper and catches
    # drift the probe's greedy answers do not show yet (seal.anchors.kl_drift).
    max_retention_kl: float | None = Field(
        None,
        ge=0.0,
        description="largest allowed mean token KL(candidate ‖ base) in nats on the never-trained drift "
        "texts (a KL exactly this big passes); None = no KL gate",
    )


def _check_accuracy(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # ValueError rather than TypeError: callers handle one error for any unusable score.
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")  # noqa: TRY004
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")
    return float(value)


def _check_kl(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"retention_kl must be a number >= 0, got {value!r}")  # noqa: TRY004
    # A KL is never negative; a tiny negative one is float noise from the log-softmax difference.
    if not math.isfinite(value) or value < -TOLERANCE:
        raise ValueError(f"retention_kl must be a finite number >= 0 (nats), got {value!r}")
    return max(0.0, float(value))


def reward(adapted_accuracy: float, baseline_accuracy: float) -> float:
    """SEAL's reward: adapted − baseline accuracy on τ, in [-1, 1]."""
    return _check_accuracy("adapted_accuracy", adapted_accuracy) - _check_accuracy(
        "baseline_accuracy", baseline_accuracy
    )


@dataclass(frozen=True)
class CandidateScores:
    tau_accuracy: float
    baseline_tau_accuracy: float
    retention_accuracy: float | None = None
    baseline_retention_accuracy: float | None = None
    guardrails: Sequence[GuardrailResult] = field(default=())
    # Mean token KL(candidate ‖ base) on general texts never trained on; None = not measured.
    retention_kl: float | None = None
    # True when the QA probe was deliberately not asked because another gate already refused
    # the candidate (retention.skip_refused): retention is then None for a known reason.
    retention_skipped: bool = False

    def __post_init__(self) -> None:
        _check_accuracy("tau_accuracy", self.tau_accuracy)
        _check_accuracy("baseline_tau_accuracy", self.baseline_tau_accuracy)
        for name in ("retention_accuracy", "baseline_retention_accuracy"):
            if getattr(self, name) is not None:
                _check_accuracy(name, getattr(self, name))
        if self.retention_kl is not None:
            _check_kl(self.retention_kl)
        # A tuple, so the scores a decision was made on cannot change afterwards.
        object.__setattr__(self, "guardrails", tuple(self.guardrails))

    @property
    def tau_gain(self) -> float:
        return reward(self.tau_accuracy, self.baseline_tau_accuracy)

    @property
    def retention_change(self) -> float | None:
        """adapted − baseline retention; None when either was not measured."""
        if self.retention_accuracy is None or self.baseline_retention_accuracy is None:
            return None
        return self.retention_accuracy - self.baseline_retention_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "tau_accuracy": self.tau_accuracy,
            "baseline_tau_accuracy": self.baseline_tau_accuracy,
            "tau_gain": self.tau_gain,
            "retention_accuracy": self.retention_accuracy,
            "baseline_retention_accuracy": self.baseline_retention_accuracy,
            "retention_kl": self.retention_kl,
            "retention_skipped": self.retention_skipped,
            "guardrails": [g.to_dict() for g in self.guardrails],
        }


@dataclass(frozen=True)
class GateResult:
    gate: str  # "tau_gain" | "retention" | "retention_kl" | "guardrails" | "guardrail:<rule>"
    passed: bool
    value: float | None
    threshold: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    promote: bool
    gates: tuple[GateResult, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "gates", tuple(self.gates))
        # A decision that says "promote" over a failed gate would be a governance hole, so it
        # cannot even be constructed.
        if self.promote != (bool(self.gates) and all(g.passed for g in self.gates)):
            raise ValueError("promote must be true exactly when there are gates and every gate passed")

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    @property
    def failed_reasons(self) -> list[str]:
        return [g.reason for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "gates": [g.to_dict() for g in self.gates],
            "failed_reasons": self.failed_reasons,
        }


def _fmt(a: float, b: float, signed: bool = False) -> tuple[str, str]:
    """Both numbers at 3 decimals, or as many more as it takes for values that differ by more
    than the tolerance not to print identically ("+0.000 is above 0.000" helps nobody)."""
    sign = "+" if signed else ""
    for places in range(3, 10):
        left, right = f"{a:{sign}.{places}f}", f"{b:.{places}f}"
        if abs(a - b) <= TOLERANCE or float(left) != float(right):
            return left, right
    return left, right


def _tau_gate(scores: CandidateScores, settings: GateSettings) -> GateResult:
    gain = scores.tau_gain
    passed = gain > settings.min_gain + TOLERANCE
    shown_gain, shown_min = _fmt(gain, settings.min_gain, signed=True)
    verdict = "is above" if passed else "is not above"
    return GateResult("tau_gain", passed, gain, settings.min_gain, f"τ gain {shown_gain} {verdict} the minimum {shown_min}")


def _retention_gate(scores: CandidateScores, settings: GateSettings) -> GateResult:
    change = scores.retention_change
    allowed = settings.max_retention_drop
    if change is None:
        missing = [
            name
            for name in ("retention_accuracy", "baseline_retention_accuracy")
            if getattr(scores, name) is None
        ]
        if scores.retention_skipped:
            # Whatever its passed flag, the decision is a refusal: another gate failed first.
            return GateResult(
                "retention", not settings.require_retention, None, allowed,
                "retention not measured: another gate already refuses this candidate, so the probe was not asked",
            )
        if settings.require_retention:
            return GateResult(
                "retention", False, None, allowed, f"retention not measured ({', '.join(missing)} missing) but require_retention is set"
            )
        return GateResult("retention", True, None, allowed, "retention not measured")
    drop = -change
    passed = drop <= allowed + TOLERANCE
    shown_drop, shown_allowed = _fmt(drop, allowed)
    if drop <= TOLERANCE:
        reason = f"retention did not drop ({change:+.3f})"
    elif passed:
        reason = f"retention dropped {shown_drop}, within the allowed {shown_allowed}"
    else:
        reason = f"retention dropped {shown_drop} > allowed {shown_allowed}"
    return GateResult("retention", passed, drop, allowed, reason)


def _kl_gate(scores: CandidateScores, settings: GateSettings) -> list[GateResult]:
    allowed = settings.max_retention_kl
    if allowed is None:
        return []
    if scores.retention_kl is None:
        if settings.require_retention:
            return [GateResult("retention_kl", False, None, allowed, "KL drift not measured but require_retention is set")]
        return [GateResult("retention_kl", True, None, allowed, "KL drift not measured")]
    kl = _check_kl(scores.retention_kl)
    passed = kl <= allowed + TOLERANCE
    shown_kl, shown_allowed = _fmt(kl, allowed)
    if passed:
        reason = f"KL drift {shown_kl} nats is within the allowed {shown_allowed}"
    else:
        reason = f"KL drift {shown_kl} nats > allowed {shown_allowed}: the candidate moved too far from the base model on general text"
    return [GateResult("retention_kl", passed, kl, allowed, reason)]


def _guardrail_gates(scores: CandidateScores, settings: GateSettings) -> list[GateResult]:
    if not scores.guardrails:
        if not settings.require_guardrails:
            return []
        # An empty list means the text was never checked, not that it is clean.
        return [GateResult("guardrails", False, None, None, "no guardrail results: the self-edit was never checked")]
    gates = []
    for result in scores.guardrails:
        if result.passed:
            gates.append(GateResult(f"guardrail:{result.rule}", True, None, None, f"guardrail {result.rule} passed"))
        elif settings.require_guardrails:
            gates.append(
                GateResult(f"guardrail:{result.rule}", False, None, None, f"guardrail {result.rule} failed: {result.detail}")
            )
        else:
            gates.append(
                GateResult(
                    f"guardrail:{result.rule}",
                    True,
                    None,
                    None,
                    f"guardrail {result.rule} failed (advisory, require_guardrails is off): {result.detail}",
                )
            )
    return gates


def decide(scores: CandidateScores, settings: GateSettings) -> Decision:
    """Evaluate every gate — no short-circuit, so a rejection lists every reason — and promote
    only if all of them pass.

    ``settings`` may also be another object with the same field names (a settings section
    declared elsewhere); fields it lacks take the defaults above, which are the strict ones.
    """
    if not isinstance(settings, GateSettings):
        settings = GateSettings.model_validate(settings, from_attributes=True)
    # Re-checked here because a frozen dataclass can still be forged with object.__setattr__,
    # and a decision must never rest on an out-of-range score.
    for name in ("tau_accuracy", "baseline_tau_accuracy"):
        _check_accuracy(name, getattr(scores, name))
    for name in ("retention_accuracy", "baseline_retention_accuracy"):
        if getattr(scores, name) is not None:
            _check_accuracy(name, getattr(scores, name))
    if scores.retention_kl is not None:
        _check_kl(scores.retention_kl)
    gates = (
        _tau_gate(scores, settings),
        _retention_gate(scores, settings),
        *_kl_gate(scores, settings),
        *_guardrail_gates(scores, settings),
    )
    return Decision(promote=all(g.passed for g in gates), gates=gates)


def refused_before_retention(scores: CandidateScores, settings: GateSettings) -> list[GateResult]:
    """The gates other than the QA retention probe that already refuse ``scores``: when there
    are any, the candidate cannot be promoted whatever the probe would say, so the auditor may
    skip asking it (the probe is the costliest measurement: one generation per question).

    >>> refused_before_retention(CandidateScores(0.2, 0.2), GateSettings(require_guardrails=False))[0].gate
    'tau_gain'
    """
    return [g for g in decide(scores, settings).failed if g.gate != "retention"]


K = TypeVar("K", bound=Hashable)


def choose_best(candidates: Iterable[tuple[K, CandidateScores | float, Decision | bool]]) -> K | None:
    """The key of the best candidate whose decision is to promote, or None if none may be.

    Best = highest τ gain; ties go to the smaller retention drop (measured beats unmeasured),
    then to the smallest key, so the choice does not depend on the order candidates finished in.
    Keys must therefore be mutually orderable (indices or adapter ids).

    Each entry is ``(key, scores, decision)``. Callers that only hold a reward and a pass/fail
    flag (e.g. from the wire) may pass ``(key, reward, passed)``; their ties fall to the key.
    """
    ranked = []
    for key, scores, decision in candidates:
        passed = decision.promote if isinstance(decision, Decision) else bool(decision)
        if not passed:
            continue
        if isinstance(scores, CandidateScores):
            gain, change = scores.tau_gain, scores.retention_change
        else:
            gain, change = float(scores), None
        # Gains are compared at the tolerance, so float noise cannot break a real tie.
        rank_gain = round(gain / TOLERANCE)
        rank_retention = -math.inf if change is None else round(change / TOLERANCE)
        ranked.append(((-rank_gain, -rank_retention), key))
    if not ranked:
        return None
    return min(ranked, key=lambda item: (item[0], item[1]))[1]
