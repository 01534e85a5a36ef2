"""THEORY.md §4: properties of the adaptive order schedule and its gap."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_ref.schedule import AlphaSchedule, adaptive_alpha, auc_gap, linear_alpha, mean_score_gap, per_token_scores

scores = st.lists(st.floats(-20, 0, allow_nan=False), min_size=1, max_size=12)
orders = st.floats(0.05, 10.0)
gaps = st.floats(0.0, 1.0)


def brute_force_auc_gap(real, synthetic):
    """|2·AUC − 1| by enumerating every (synthetic, real) pair: the definition, no ranks."""
    wins = sum((s > r) + 0.5 * (s == r) for s, r in itertools.product(synthetic, real))
    return abs(2 * wins / (len(real) * len(synthetic)) - 1)


@settings(max_examples=200, deadline=None)
@given(scores, scores)
def test_auc_gap_matches_pairwise_definition(real, synthetic):
    """The rank-based gap equals the all-pairs Mann–Whitney definition, ties counted half."""
    assert auc_gap(real, synthetic) == pytest.approx(brute_force_auc_gap(real, synthetic), abs=1e-12)


def test_auc_gap_counts_ties_half_negative_control():
    """Counting ties as wins would give gap 1 on identical samples; the definition gives 0."""
    same = [-1.0, -1.0, -2.0]
    assert auc_gap(same, same) == 0.0
    ties_as_wins = abs(2 * np.mean([s >= r for s in same for r in same]) - 1)
    assert ties_as_wins != 0.0


@settings(max_examples=100, deadline=None)
@given(scores)
def test_identical_samples_give_zero_gap(sample):
    """Identical score samples (the fixed point) give gap 0 for both gap measures."""
    assert auc_gap(sample, sample) == 0.0
    assert mean_score_gap(sample, sample) == 0.0


def test_separated_samples_give_full_gap():
    """Perfectly separated scores give gap 1, whichever side is higher."""
    assert auc_gap([-5.0, -4.0], [-1.0, -0.5]) == 1.0
    assert auc_gap([-1.0, -0.5], [-5.0, -4.0]) == 1.0


@settings(max_examples=300, deadline=None)
@given(gaps, st.floats(1e-6, 1.0), orders, orders)
def test_adaptive_alpha_stays_in_range(gap, first_gap, a, b):
    """α stays in [α_min, α_max] for any gap."""
    lo, hi = min(a, b), max(a, b)
    alpha = adaptive_alpha(gap, first_gap, lo, hi)
    assert lo <= alpha <= hi


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-6, 1.0), orders, orders)
def test_adaptive_alpha_starts_at_alpha_max(first_gap, a, b):
    """At the first iteration (gap = first gap) α_0 = α_max."""
    lo, hi = min(a, b), max(a, b)
    assert adaptive_alpha(first_gap, first_gap, lo, hi) == pytest.approx(hi, rel=1e-12)
    schedule = AlphaSchedule("adaptive", alpha_min=lo, alpha_max=hi)
    assert schedule.alpha_for(0, first_gap, first_gap) == pytest.approx(hi, rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(gaps, gaps, st.floats(1e-6, 1.0))
def test_adaptive_alpha_non_decreasing_in_relative_gap(g1, g2, first_gap):
    """α is a non-decreasing function of gap_t / gap_0."""
    lo, hi = sorted((g1, g2))
    assert adaptive_alpha(lo, first_gap) <= adaptive_alpha(hi, first_gap)


def test_adaptive_alpha_never_rounds_past_alpha_max():
    """α_min + (α_max − α_min)·1 rounds above α_max for some orders; the result is clamped."""
    alpha_min, alpha_max = 0.30879735067865166, 8.522047844135448
    assert alpha_min + (alpha_max - alpha_min) * 1.0 > alpha_max  # the rounding this guards against
    assert adaptive_alpha(1.0, 1.0, alpha_min, alpha_max) == alpha_max


def test_zero_first_gap_gives_alpha_min():
    """A zero first gap (already at the fixed point) gives α_min."""
    assert adaptive_alpha(0.3, 0.0, 0.5, 2.0) == 0.5


def test_linear_and_constant_schedules():
    """The linear schedule runs from α_max to α_min; the constant one never moves."""
    schedule = AlphaSchedule("linear", alpha_min=0.5, alpha_max=2.0, num_iterations=4)
    assert [schedule.alpha_for(t, 0.0, 0.0) for t in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    assert linear_alpha(0, 1, 2.0, 0.5) == 2.0
    constant = AlphaSchedule("constant", alpha=1.3)
    assert {constant.alpha_for(t, g, 1.0) for t, g in [(0, 1.0), (5, 0.1)]} == {1.3}


def test_per_token_scores():
    """Scores are summed log-probs per response token."""
    assert per_token_scores([-6.0, -3.0], [3, 1]).tolist() == [-2.0, -3.0]
    with pytest.raises(ValueError, match="at least one token"):
        per_token_scores([-1.0], [0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="cosine"), "unknown alpha schedule"),
        (dict(gap="kl"), "unknown gap"),
        (dict(alpha=0.0), "alpha must be"),
        (dict(alpha_min=2.0, alpha_max=1.0), "must not exceed"),
        (dict(alpha_min=-1.0), "alpha_min must be"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    """Invalid schedule settings raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        AlphaSchedule(**kwargs)
