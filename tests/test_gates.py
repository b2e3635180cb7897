"""Promotion gates: thresholds at their boundaries, every reason reported, tie-breaking, and
properties checked against an exact (Fraction) re-statement of the policy."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from seal.gates import (
    CandidateScores,
    Decision,
    GateResult,
    GateSettings,
    choose_best,
    decide,
    reward,
)
from seal.guardrails import GuardrailResult

CLEAN = (GuardrailResult("length", True, "ok"), GuardrailResult("secrets", True, "ok"))


def scores(
    tau: float = 0.75,
    base: float = 0.25,
    retention: float | None = 0.9,
    base_retention: float | None = 0.9,
    guardrails: tuple[GuardrailResult, ...] = CLEAN,
) -> CandidateScores:
    return CandidateScores(tau, base, retention, base_retention, guardrails)


def gate(decision: Decision, name: str) -> GateResult:
    (found,) = [g for g in decision.gates if g.gate == name]
    return found


def test_a_clean_gain_is_promoted() -> None:
    decision = decide(scores(), GateSettings())
    assert decision.promote
    assert [g.gate for g in decision.gates] == ["tau_gain", "retention", "guardrail:length", "guardrail:secrets"]
    assert decision.failed_reasons == []


def test_defaults() -> None:
    defaults = GateSettings()
    assert defaults.min_gain == 0.0
    assert defaults.max_retention_drop == 0.05
    assert defaults.require_guardrails and not defaults.require_retention


# --- τ gain ----------------------------------------------------------------------------------


def test_zero_gain_is_not_promoted_by_default() -> None:
    decision = decide(scores(tau=0.5, base=0.5), GateSettings())
    assert not decision.promote
    assert decision.failed_reasons == ["τ gain +0.000 is not above the minimum 0.000"]


@pytest.mark.parametrize(
    ("tau", "base", "min_gain"),
    [
        (0.4, 0.3, 0.1),  # 0.4 - 0.3 = 0.10000000000000003 in floats
        (0.3, 0.2, 0.1),  # 0.3 - 0.2 = 0.09999999999999998
        (0.7, 0.6, 0.1),
        (0.5, 0.75, -0.25),
        (1.0, 0.0, 1.0),
    ],
)
def test_gain_exactly_at_min_gain_is_not_enough(tau: float, base: float, min_gain: float) -> None:
    result = gate(decide(scores(tau, base), GateSettings(min_gain=min_gain)), "tau_gain")
    assert not result.passed
    assert result.threshold == min_gain
    assert result.value == pytest.approx(min_gain)


def test_gain_just_above_min_gain_passes() -> None:
    assert gate(decide(scores(0.41, 0.3), GateSettings(min_gain=0.1)), "tau_gain").passed
    assert gate(decide(scores(0.5001, 0.5), GateSettings()), "tau_gain").passed
    # and the reason shows enough digits to tell the numbers apart
    assert gate(decide(scores(0.5001, 0.5), GateSettings()), "tau_gain").reason == (
        "τ gain +0.0001 is above the minimum 0.0000"
    )


def test_negative_min_gain_lets_a_loss_through() -> None:
    assert decide(scores(0.25, 0.5), GateSettings(min_gain=-1.0)).promote


# --- retention -------------------------------------------------------------------------------


@pytest.mark.parametrize(("retention", "base_retention"), [(0.95, 1.0), (0.85, 0.9), (0.45, 0.5)])
def test_retention_drop_exactly_at_the_maximum_passes(retention: float, base_retention: float) -> None:
    result = gate(decide(scores(retention=retention, base_retention=base_retention), GateSettings()), "retention")
    assert result.passed, result.reason
    assert result.reason == "retention dropped 0.050, within the allowed 0.050"


def test_retention_drop_above_the_maximum_fails() -> None:
    decision = decide(scores(retention=0.875, base_retention=1.0), GateSettings())
    assert not decision.promote
    assert decision.failed_reasons == ["retention dropped 0.125 > allowed 0.050"]
    result = gate(decision, "retention")
    assert (result.value, result.threshold) == (pytest.approx(0.125), 0.05)
    assert not gate(decide(scores(retention=0.9499, base_retention=1.0), GateSettings()), "retention").passed


def test_retention_gain_passes() -> None:
    result = gate(decide(scores(retention=0.95, base_retention=0.9), GateSettings(max_retention_drop=0.0)), "retention")
    assert result.passed and "did not drop" in result.reason


@pytest.mark.parametrize(("retention", "base_retention"), [(None, None), (0.9, None), (None, 0.9)])
def test_unmeasured_retention(retention: float | None, base_retention: float | None) -> None:
    candidate = scores(retention=retention, base_retention=base_retention)
    result = gate(decide(candidate, GateSettings()), "retention")
    assert result.passed and result.reason == "retention not measured" and result.value is None
    required = gate(decide(candidate, GateSettings(require_retention=True)), "retention")
    assert not required.passed and "require_retention" in required.reason


# --- guardrails ------------------------------------------------------------------------------


def test_failed_guardrail_blocks_and_names_the_rule() -> None:
    bad = (GuardrailResult("length", True, "ok"), GuardrailResult("secrets", False, "API key 'sk-a…' at line 1, col 3"))
    decision = decide(scores(guardrails=bad), GateSettings())
    assert not decision.promote
    assert [g.gate for g in decision.failed] == ["guardrail:secrets"]
    assert decision.failed_reasons == ["guardrail secrets failed: API key 'sk-a…' at line 1, col 3"]


def test_guardrails_can_be_advisory() -> None:
    bad = (GuardrailResult("secrets", False, "found"),)
    decision = decide(scores(guardrails=bad), GateSettings(require_guardrails=False))
    assert decision.promote
    assert "advisory" in gate(decision, "guardrail:secrets").reason


def test_missing_guardrail_results_block_when_required() -> None:
    decision = decide(scores(guardrails=()), GateSettings())
    assert not decision.promote
    assert [g.gate for g in decision.failed] == ["guardrails"]
    assert decide(scores(guardrails=()), GateSettings(require_guardrails=False)).promote


# --- all gates together ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "failing"),
    [
        (scores(tau=0.25, base=0.25), "tau_gain"),
        (scores(retention=0.5, base_retention=0.9), "retention"),
        (scores(guardrails=(GuardrailResult("urls", False, "https://x"),)), "guardrail:urls"),
    ],
)
def test_each_gate_can_fail_alone(candidate: CandidateScores, failing: str) -> None:
    decision = decide(candidate, GateSettings())
    assert not decision.promote
    assert [g.gate for g in decision.failed] == [failing]


def test_every_failed_gate_is_reported() -> None:
    candidate = scores(
        tau=0.5,
        base=0.5,
        retention=0.5,
        base_retention=1.0,
        guardrails=(GuardrailResult("secrets", False, "key"), GuardrailResult("urls", False, "link")),
    )
    decision = decide(candidate, GateSettings())
    assert decision.failed_reasons == [
        "τ gain +0.000 is not above the minimum 0.000",
        "retention dropped 0.500 > allowed 0.050",
        "guardrail secrets failed: key",
        "guardrail urls failed: link",
    ]


@pytest.mark.parametrize("bad", [-0.1, 1.1, math.nan, math.inf, True, "0.5", None])
def test_accuracies_outside_the_unit_interval_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        CandidateScores(bad, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CandidateScores(0.5, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        reward(bad, 0.5)  # type: ignore[arg-type]
    if bad is not None:
        with pytest.raises(ValueError):
            CandidateScores(0.5, 0.5, bad, 0.5)  # type: ignore[arg-type]


def test_decide_rechecks_forged_scores() -> None:
    candidate = scores()
    object.__setattr__(candidate, "tau_accuracy", 2.0)
    with pytest.raises(ValueError):
        decide(candidate, GateSettings())


def test_a_promoting_decision_over_a_failed_gate_cannot_be_built() -> None:
    failed_gate = GateResult("tau_gain", False, 0.0, 0.0, "no")
    with pytest.raises(ValueError):
        Decision(promote=True, gates=(failed_gate,))
    with pytest.raises(ValueError):
        Decision(promote=True, gates=())
    assert not Decision(promote=False, gates=(failed_gate,)).promote


def test_gate_settings_validate() -> None:
    with pytest.raises(ValidationError):
        GateSettings(max_retention_drop=-0.1)
    with pytest.raises(ValidationError):
        GateSettings(min_gain=2.0)
    with pytest.raises(ValidationError):
        GateSettings.model_validate({"min_gian": 0.1})


def test_decide_accepts_a_settings_section_declared_elsewhere() -> None:
    class PartialSection(BaseModel):  # e.g. an older config section with only min_gain
        min_gain: float = 0.1

    assert not decide(scores(tau=0.3, base=0.25), PartialSection()).promote  # type: ignore[arg-type]
    decision = decide(scores(tau=0.5, base=0.25, retention=0.5), PartialSection())  # type: ignore[arg-type]
    assert decision.failed_reasons == ["retention dropped 0.400 > allowed 0.050"]  # default drop applies


def test_to_dict_is_plain_data() -> None:
    decision = decide(scores(tau=0.5, base=0.5), GateSettings())
    data = decision.to_dict()
    assert data["promote"] is False
    assert data["gates"][0] == {
        "gate": "tau_gain",
        "passed": False,
        "value": 0.0,
        "threshold": 0.0,
        "reason": "τ gain +0.000 is not above the minimum 0.000",
    }
    assert scores().to_dict()["tau_gain"] == 0.5


# --- choose_best -----------------------------------------------------------------------------


def entry(key: object, tau: float, retention: float | None = 0.9, passing: bool = True):
    candidate = scores(tau=tau, base=0.25, retention=retention)
    if not passing:
        candidate = scores(tau=tau, base=0.25, retention=retention, guardrails=(GuardrailResult("urls", False, "x"),))
    return (key, candidate, decide(candidate, GateSettings()))


def test_choose_best_takes_the_highest_gain() -> None:
    assert choose_best([entry("a", 0.5), entry("b", 0.75), entry("c", 0.625)]) == "b"


def test_choose_best_ignores_failing_candidates_even_with_higher_gain() -> None:
    assert choose_best([entry("a", 0.5), entry("b", 1.0, passing=False)]) == "a"
    assert choose_best([entry("a", 0.25), entry("b", 1.0, passing=False)]) is None  # a: zero gain
    assert choose_best([]) is None


def test_choose_best_breaks_ties_by_retention_then_key() -> None:
    assert choose_best([entry("a", 0.5, retention=0.86), entry("b", 0.5, retention=0.89)]) == "b"
    assert choose_best([entry("a", 0.5, retention=None), entry("b", 0.5, retention=0.86)]) == "b"
    assert choose_best([entry("b", 0.5), entry("a", 0.5), entry("c", 0.5)]) == "a"
    assert choose_best([entry(2, 0.5), entry(1, 0.5)]) == 1


def test_choose_best_float_noise_does_not_break_a_tie() -> None:
    a = CandidateScores(0.4, 0.3, None, None, CLEAN)  # gain 0.10000000000000003
    b = CandidateScores(0.3, 0.2, None, None, CLEAN)  # gain 0.09999999999999998
    assert a.tau_gain > b.tau_gain
    assert choose_best([("b", a, decide(a, GateSettings())), ("a", b, decide(b, GateSettings()))]) == "a"


def test_choose_best_accepts_reward_and_flag() -> None:
    assert choose_best([(0, 0.25, True), (1, 0.5, False), (2, 0.25, True)]) == 0
    assert choose_best([(0, 0.0, False)]) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.booleans()), min_size=1, max_size=6), st.randoms())
def test_choose_best_is_order_independent_and_picks_a_maximum(raw, rnd) -> None:
    entries = [(key, tau / 4, passing) for key, (tau, _, passing) in enumerate(raw)]
    best = choose_best(entries)
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert choose_best(shuffled) == best
    passing = [e for e in entries if e[2]]
    if not passing:
        assert best is None
    else:
        top = max(e[1] for e in passing)
        assert best == min(e[0] for e in passing if e[1] == top)


# --- properties ------------------------------------------------------------------------------

fractions = st.integers(1, 20).flatmap(lambda n: st.integers(0, n).map(lambda k: Fraction(k, n)))
guardrail_lists = st.lists(st.builds(GuardrailResult, st.sampled_from(["length", "secrets", "urls"]), st.booleans(), st.just("d")), max_size=3)


@settings(max_examples=250, deadline=None)
@given(
    tau=fractions,
    base=fractions,
    retention=st.none() | fractions,
    base_retention=st.none() | fractions,
    guardrails=guardrail_lists,
    min_gain=st.integers(-4, 4).map(lambda k: Fraction(k, 8)),
    max_drop=st.integers(0, 8).map(lambda k: Fraction(k, 40)),
    require_guardrails=st.booleans(),
    require_retention=st.booleans(),
)
def test_decide_promotes_exactly_when_the_policy_says_so(
    tau, base, retention, base_retention, guardrails, min_gain, max_drop, require_guardrails, require_retention
) -> None:
    candidate = CandidateScores(
        float(tau),
        float(base),
        None if retention is None else float(retention),
        None if base_retention is None else float(base_retention),
        guardrails,
    )
    config = GateSettings(
        min_gain=float(min_gain),
        max_retention_drop=float(max_drop),
        require_guardrails=require_guardrails,
        require_retention=require_retention,
    )
    decision = decide(candidate, config)

    # The policy restated in exact arithmetic, independent of the implementation's tolerance.
    measured = retention is not None and base_retention is not None
    expected = (
        tau - base > min_gain
        and (base_retention - retention <= max_drop if measured else not require_retention)
        and (not require_guardrails or (bool(guardrails) and all(g.passed for g in guardrails)))
    )
    assert decision.promote == expected
    assert decision.promote == all(g.passed for g in decision.gates)
    assert len(decision.failed_reasons) == sum(not g.passed for g in decision.gates)
    assert decision.gates[0].gate == "tau_gain" and decision.gates[1].gate == "retention"


@given(st.floats(0, 1), st.floats(0, 1))
def test_reward_is_antisymmetric(a: float, b: float) -> None:
    assert reward(a, b) == -reward(b, a)
    assert reward(a, a) == 0.0
    assert -1.0 <= reward(a, b) <= 1.0
