"""THEORY.md §4: properties of the adaptive order schedule and its gap."""

import itertools

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from iris_ref.schedule import (
    SCHEDULE_KINDS,
    AlphaSchedule,
    adaptive_alpha,
    auc_gap,
    gap_warning,
    linear_alpha,
    mean_score_gap,
    per_token_scores,
)
from theory_tests.mutants import SCHEDULE_MUTANTS

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


# ------------------------------------------------------------------ the guarded adaptive rule
#
# Each property of THEORY.md §4 is a check_<property>(alpha_fn, history, lo, hi) raising
# AssertionError; alpha_fn has the signature of adaptive_alpha(gaps, alpha_min, alpha_max) and
# α_t is alpha_fn(history[: t + 1]). The tests run the checks on adaptive_alpha under
# hypothesis; the negative controls make hypothesis FIND a history on which a wrong rule of
# mutants.SCHEDULE_MUTANTS fails them.

histories = st.lists(gaps, min_size=1, max_size=10)
positive_histories = st.tuples(st.floats(1e-6, 1.0), st.lists(gaps, max_size=9)).map(lambda h: [h[0], *h[1]])


def _orders(a, b):
    return min(a, b), max(a, b)


def _path(alpha_fn, history, lo, hi):
    """α_0 .. α_T of one gap history."""
    return [alpha_fn(history[: t + 1], lo, hi) for t in range(len(history))]


def check_alpha_range(alpha_fn, history, lo, hi, slack=0.0):
    """α_t ∈ [α_min, α_max] for every t (widened by slack·α_max on both sides, default 0)."""
    for t, alpha in enumerate(_path(alpha_fn, history, lo, hi)):
        assert lo - slack * hi <= alpha <= hi + slack * hi, f"alpha_{t} = {alpha!r} outside [{lo!r}, {hi!r}] for gaps {history[: t + 1]}"


def check_alpha_starts_at_max(alpha_fn, history, lo, hi):
    """α_0 = α_max when gap_0 > 0."""
    alpha = alpha_fn(history[:1], lo, hi)
    assert alpha == pytest.approx(hi, rel=1e-12), f"alpha_0 = {alpha!r} != alpha_max = {hi!r}"


def check_alpha_non_increasing(alpha_fn, history, lo, hi):
    """α_{t+1} ≤ α_t for every t, whatever the gaps do."""
    path = _path(alpha_fn, history, lo, hi)
    for t in range(1, len(path)):
        assert path[t] <= path[t - 1], f"alpha rises {path[t - 1]!r} -> {path[t]!r} at t={t} for gaps {history}"


def check_alpha_follows_smallest_gap(alpha_fn, history, lo, hi):
    """α_t depends on the history only through g_t/gap_0 = min(gap_0..gap_t)/gap_0, non-decreasingly,
    and reaches α_min at g_t = 0: α_t equals the rule on the two-point history (gap_0, g_t), a
    new smallest gap (by a factor 0.9 or more) strictly lowers α when α_min < α_max, and a gap
    of 0 gives α_min. The rule on (gap_0, g) must itself be non-decreasing in g: that is
    test_adaptive_alpha_non_decreasing_in_relative_gap."""
    path = _path(alpha_fn, history, lo, hi)
    for t in range(1, len(history)):
        smallest = min(history[: t + 1])
        reduced = alpha_fn([history[0], smallest], lo, hi)
        assert path[t] == reduced, f"alpha_{t} = {path[t]!r} but {reduced!r} from (gap_0, g_t) for gaps {history[: t + 1]}"
        earlier = min(history[:t])
        # "Strictly lower" is asserted where rounding cannot hide it: α_max − α_min and the
        # earlier smallest gap not negligible, the new gap at most 0.9 of it.
        if hi - lo > 1e-3 * hi and earlier > 1e-6 * history[0] and history[t] <= 0.9 * earlier:
            assert path[t] < path[t - 1], f"a new smallest gap {history[t]!r} leaves alpha at {path[t]!r} (gaps {history[: t + 1]})"
        if smallest == 0.0:
            assert path[t] == lo, f"a zero gap gives alpha {path[t]!r}, not alpha_min = {lo!r}"


SCHEDULE_CHECKS = {
    "range": check_alpha_range,
    "starts_at_max": check_alpha_starts_at_max,
    "non_increasing": check_alpha_non_increasing,
    "follows_smallest_gap": check_alpha_follows_smallest_gap,
}


@settings(max_examples=300, deadline=None)
@given(histories, orders, orders)
def test_adaptive_alpha_stays_in_range(history, a, b):
    """α stays in [α_min, α_max] for every gap history (zero gap_0 included)."""
    check_alpha_range(adaptive_alpha, history, *_orders(a, b))


@settings(max_examples=100, deadline=None)
@given(positive_histories, orders, orders)
def test_adaptive_alpha_starts_at_alpha_max(history, a, b):
    """α_0 = α_max for gap_0 > 0, through adaptive_alpha and AlphaSchedule.alpha_for."""
    lo, hi = _orders(a, b)
    check_alpha_starts_at_max(adaptive_alpha, history, lo, hi)
    assert AlphaSchedule("adaptive", alpha_min=lo, alpha_max=hi).alpha_for(0, history[:1]) == pytest.approx(hi, rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(histories, orders, orders)
def test_adaptive_alpha_non_increasing_in_t(history, a, b):
    """α_t is non-increasing in t for EVERY gap sequence (the running minimum guard)."""
    check_alpha_non_increasing(adaptive_alpha, history, *_orders(a, b))


@settings(max_examples=300, deadline=None)
@given(positive_histories, orders, orders)
def test_adaptive_alpha_follows_the_smallest_gap(history, a, b):
    """α_t is a function of g_t/gap_0 only, non-decreasing in it, moving down at each new smallest gap, α_min at g_t = 0."""
    check_alpha_follows_smallest_gap(adaptive_alpha, history, *_orders(a, b))


@settings(max_examples=300, deadline=None)
@given(gaps, gaps, st.floats(1e-6, 1.0), orders, orders)
def test_adaptive_alpha_non_decreasing_in_relative_gap(g1, g2, first_gap, a, b):
    """α is a non-decreasing function of g_t/gap_0 (two histories with the same gap_0)."""
    lo_order, hi_order = _orders(a, b)
    small, large = sorted((g1, g2))
    assert adaptive_alpha([first_gap, small], lo_order, hi_order) <= adaptive_alpha([first_gap, large], lo_order, hi_order)


def test_adaptive_alpha_hand_derived_path():
    """gaps 0.4, 0.2, 0.3, 0.1, 0.5 (signs ignored): g_t/gap_0 = 1, ½, ½, ¼, ¼, so α = 2, 1.25, 1.25, 0.875, 0.875."""
    history = [0.4, -0.2, 0.3, 0.1, 0.5]
    assert _path(adaptive_alpha, history, 0.5, 2.0) == [2.0, 1.25, 1.25, 0.875, 0.875]
    schedule = AlphaSchedule("adaptive")
    assert [schedule.alpha_for(t, history[: t + 1]) for t in range(5)] == [2.0, 1.25, 1.25, 0.875, 0.875]


def test_toy_feedback_loop_gaps_keep_alpha_at_max_and_warn():
    """The toy task's degrading run (gap 0.12 → 0.20 → 0.33): the guard never raises α past α_max (α_0 = 2 stays) and both growths are warned."""
    history = [0.12, 0.20, 0.33]
    schedule = AlphaSchedule("adaptive")
    assert [schedule.alpha_for(t, history[: t + 1]) for t in range(3)] == [2.0, 2.0, 2.0]
    assert schedule.gap_warning(history[:1]) is None
    for t in (1, 2):
        message = schedule.gap_warning(history[: t + 1])
        assert message is not None and "\n" not in message and "moving away from the data" in message
        assert f"gap_{t} = {history[t]:.4g}" in message and "gap_0 = 0.12" in message
    # The unclipped first version answered this very history with alpha far above alpha_max.
    assert SCHEDULE_MUTANTS["unguarded_unclipped"](history, 0.5, 2.0) == pytest.approx(0.5 + 1.5 * 0.33 / 0.12)


def _find_counterexample(check, mutant, **options):
    """A (history, lo, hi) on which `mutant` fails `check`, found by hypothesis (NoSuchExample if none)."""

    def fails(example):
        history, a, b = example
        try:
            check(mutant, history, *_orders(a, b), **options)
        except AssertionError:
            return True
        return False

    strategy = st.tuples(positive_histories, orders, orders)
    return find(strategy, fails, settings=settings(max_examples=2000, database=None, derandomize=True, deadline=None))


@pytest.mark.parametrize(
    "mutant, check",
    [
        ("unguarded", "non_increasing"),  # the first version: a growing gap raises α again
        ("unguarded", "follows_smallest_gap"),
        ("unguarded_unclipped", "range"),
        ("running_max", "follows_smallest_gap"),  # α stuck at α_max passes range, start and monotonicity
        ("running_max_unclipped", "range"),
    ],
)
def test_schedule_negative_control(mutant, check):
    """Hypothesis finds a gap history on which the wrong rule fails the check that should reject it; adaptive_alpha passes the same history.

    The range check is searched with a slack of 1e-9·α_max, so that what hypothesis finds is a
    gap above gap_0 sending α past α_max, not the last-bit rounding of α_0 (which the clamp of
    adaptive_alpha also guards; see test_adaptive_alpha_never_rounds_past_alpha_max).
    """
    options = {"slack": 1e-9} if check == "range" else {}
    history, a, b = _find_counterexample(SCHEDULE_CHECKS[check], SCHEDULE_MUTANTS[mutant], **options)
    with pytest.raises(AssertionError):
        SCHEDULE_CHECKS[check](SCHEDULE_MUTANTS[mutant], history, *_orders(a, b), **options)
    SCHEDULE_CHECKS[check](adaptive_alpha, history, *_orders(a, b))


def test_unguarded_rule_fails_non_increasing_on_an_explicit_history():
    """gaps 1, ½, 1: the first version answers α = 2, 1.25, 2 (α rises); the guarded rule 2, 1.25, 1.25."""
    assert _path(SCHEDULE_MUTANTS["unguarded"], [1.0, 0.5, 1.0], 0.5, 2.0) == [2.0, 1.25, 2.0]
    with pytest.raises(AssertionError, match="alpha rises"):
        check_alpha_non_increasing(SCHEDULE_MUTANTS["unguarded"], [1.0, 0.5, 1.0], 0.5, 2.0)
    assert _path(adaptive_alpha, [1.0, 0.5, 1.0], 0.5, 2.0) == [2.0, 1.25, 1.25]


def test_adaptive_alpha_never_rounds_past_alpha_max():
    """α_min + (α_max − α_min)·1 rounds above α_max for some orders; the result is clamped."""
    alpha_min, alpha_max = 0.30879735067865166, 8.522047844135448
    assert alpha_min + (alpha_max - alpha_min) * 1.0 > alpha_max  # the rounding this guards against
    assert adaptive_alpha([1.0], alpha_min, alpha_max) == alpha_max
    assert adaptive_alpha([1.0, 1.0, 3.0], alpha_min, alpha_max) == alpha_max


def test_zero_first_gap_gives_alpha_min():
    """A zero gap_0 (already at the fixed point) gives α_min, whatever follows."""
    assert adaptive_alpha([0.0], 0.5, 2.0) == 0.5
    assert adaptive_alpha([0.0, 0.3], 0.5, 2.0) == 0.5


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "empty"),
        ([0.1, float("nan")], "finite; gap_1 is nan"),
        ([float("inf")], "finite; gap_0 is inf"),
        (0.3, "sequence"),
        ("0.3", "sequence"),
        ([0.1, "x"], "sequence of numbers"),
    ],
)
def test_adaptive_alpha_rejects_bad_gaps(bad, message):
    """Empty, non-finite or non-numeric gap histories raise a ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        adaptive_alpha(bad)


def test_alpha_for_needs_the_whole_history():
    """alpha_for(t, gaps) needs len(gaps) == t + 1 for every kind; constant and linear ignore the values."""
    for kind in SCHEDULE_KINDS:
        schedule = AlphaSchedule(kind, num_iterations=4)
        with pytest.raises(ValueError, match=r"gap_0..gap_2 \(3 values\), got 2"):
            schedule.alpha_for(2, [0.3, 0.2])
        with pytest.raises(ValueError, match=r"\(1 values\), got 2"):
            schedule.alpha_for(0, [0.3, 0.2])
        with pytest.raises(ValueError, match="iteration must be an integer"):
            schedule.alpha_for(1.0, [0.3, 0.2])
        with pytest.raises(ValueError, match="iteration must be an integer"):
            schedule.alpha_for(-1, [])
        with pytest.raises(ValueError, match="sequence"):
            schedule.alpha_for(0, 0.3)
    assert AlphaSchedule("constant", alpha=1.3).alpha_for(1, [float("nan"), 5.0]) == 1.3


@settings(max_examples=100, deadline=None)
@given(positive_histories, orders, orders)
def test_alpha_for_is_adaptive_alpha_of_the_history(history, a, b):
    """AlphaSchedule("adaptive").alpha_for(t, gaps) is adaptive_alpha(gaps, α_min, α_max)."""
    lo, hi = _orders(a, b)
    schedule = AlphaSchedule("adaptive", alpha_min=lo, alpha_max=hi)
    t = len(history) - 1
    assert schedule.alpha_for(t, history) == adaptive_alpha(history, lo, hi)


def test_linear_and_constant_schedules():
    """The linear schedule runs from α_max to α_min; the constant one never moves."""
    schedule = AlphaSchedule("linear", alpha_min=0.5, alpha_max=2.0, num_iterations=4)
    assert [schedule.alpha_for(t, [0.0] * (t + 1)) for t in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    assert linear_alpha(0, 1, 2.0, 0.5) == 2.0
    constant = AlphaSchedule("constant", alpha=1.3)
    assert {constant.alpha_for(t, [1.0] + [g] * t) for t, g in [(0, 1.0), (5, 0.1)]} == {1.3}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=8), st.floats(1.0, 4.0))
def test_gap_warning_iff_latest_exceeds_factor_times_running_minimum(history, factor):
    """gap_warning warns (one line) exactly when |gap_t| > factor·min(|gap_0|..|gap_{t−1}|); never for a single gap."""
    message = gap_warning(history, factor)
    magnitudes = [abs(g) for g in history]
    expected = len(history) > 1 and magnitudes[-1] > factor * min(magnitudes[:-1])
    assert (message is not None) == expected
    if message is not None:
        assert "\n" not in message and "moving away from the data" in message
    assert AlphaSchedule().gap_warning(history, factor) == message


def test_gap_warning_rejects_bad_input():
    """A factor below 1 or non-finite, or a bad history, raises ValueError."""
    for factor in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor"):
            gap_warning([0.1, 0.2], factor)
    with pytest.raises(ValueError, match="empty"):
        gap_warning([])
    with pytest.raises(ValueError, match="finite"):
        gap_warning([0.1, float("nan")])


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
