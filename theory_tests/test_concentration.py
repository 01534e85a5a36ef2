"""Claims C1-C2 of THEORY.md §3: α controls gradient concentration; the small-reward expansion.

The gradient weights are read from autograd (a = −∂L/∂policy_real / β, b = +∂L/∂policy_synthetic / β),
not from the returned `.real_weights`/`.synthetic_weights`, so the checks judge the gradient
that training actually follows. Each claim is a `check_<claim>(loss_fn, ...)` raising
AssertionError, run on the reference under hypothesis and on the mutants it should reject.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_ref.objectives import iris_loss
from theory_tests.conftest import distribution_pairs, evaluate_critic, examples, reward_vectors
from theory_tests.mutants import MUTANTS

ALPHA_GRID = (0.02, 0.1, 0.3, 0.6, 0.9, 0.99, 1.0, 1.01, 1.2, 2.0, 4.0, 10.0, 30.0)


def _gradient_weights(loss_fn, r, rs, alpha, beta):
    _, grad_real, grad_synthetic, _ = evaluate_critic(loss_fn, r, rs, beta=beta, alpha=alpha)
    return -grad_real, grad_synthetic


def _summary(w, what):
    assert np.all(w >= -1e-15) and abs(w.sum() - 1.0) <= 1e-12, f"{what}: not a probability vector: {w}"
    w = np.clip(w, 0.0, None)
    positive = w[w > 0]
    return -(positive * np.log(positive)).sum(), 1.0 / np.square(w).sum(), w.max()


def _assert_concentrating(summaries, what):
    """Entropy and ESS non-increasing, max weight non-decreasing along the sequence."""
    for (h0, e0, m0), (h1, e1, m1) in zip(summaries, summaries[1:]):
        assert h1 <= h0 + 1e-12 * (1 + abs(h0)), f"{what}: entropy increases {h0!r} -> {h1!r}"
        assert e1 <= e0 * (1 + 1e-12), f"{what}: ESS increases {e0!r} -> {e1!r}"
        assert m1 >= m0 * (1 - 1e-12), f"{what}: max weight decreases {m0!r} -> {m1!r}"


def check_C1(loss_fn, r, rs, beta=1.0):
    """Synthetic weights concentrate as α grows; annotated weights as α moves away from 1 either way."""
    real, synthetic = {}, {}
    for alpha in ALPHA_GRID:
        a, b = _gradient_weights(loss_fn, r, rs, alpha, beta)
        real[alpha] = _summary(a, f"annotated weights, alpha={alpha}")
        synthetic[alpha] = _summary(b, f"synthetic weights, alpha={alpha}")
    _assert_concentrating([synthetic[a] for a in ALPHA_GRID], "synthetic, alpha increasing")
    _assert_concentrating([real[a] for a in ALPHA_GRID if a >= 1.0], "annotated, alpha increasing from 1")
    _assert_concentrating([real[a] for a in reversed(ALPHA_GRID) if a <= 1.0], "annotated, alpha decreasing from 1")


@settings(max_examples=examples(40))
@given(reward_vectors(min_size=2, max_size=8, bound=3.0), reward_vectors(min_size=2, max_size=8, bound=3.0), st.floats(0.1, 3.0))
def test_C1_alpha_controls_concentration(r, rs, beta):
    """With uniform sample weights, the entropy and ESS of the synthetic weights are non-increasing in α, those of the annotated weights non-increasing as α moves away from 1, and the largest weight non-decreasing in the same sense."""
    check_C1(iris_loss, r, rs, beta)


R_FIX = np.array([1.0, -0.5, 0.3, -1.2, 0.8])
RS_FIX = np.array([0.4, -1.0, 1.5, 0.0])


@pytest.mark.parametrize("mutant", ["swapped_tilts", "swapped_roles", "dropped_sign"])
def test_C1_negative_control(mutant):
    """check_C1 rejects swapped tilts (synthetic weights spread again past α = 1), swapped roles and the dropped sign (negative weights)."""
    check_C1(iris_loss, R_FIX, RS_FIX)
    with pytest.raises(AssertionError):
        check_C1(MUTANTS[mutant], R_FIX, RS_FIX)


def test_C1_needs_uniform_sample_weights():
    """With non-uniform π the annotated entropy can rise as α leaves 1 (dH/dt = −Cov_w(z, log π) − t·Var_w(z)), so C1's uniformity condition is needed."""
    pi = np.array([0.7, 0.2, 0.1])
    r = -np.log(pi)  # a ∝ π·e^{(α−1)r} = π^{2−α}: flatter than π for α slightly above 1
    entropies = []
    for alpha in (1.0, 1.05, 1.1):
        _, grad_real, _, _ = evaluate_critic(iris_loss, r, np.zeros(2), real_weights=pi, alpha=alpha, beta=1.0)
        entropies.append(_summary(-grad_real, "annotated")[0])
    assert entropies[1] > entropies[0] and entropies[2] > entropies[1]


# ------------------------------------------------------------------------------------ C2


def _moments(z, w):
    w = w / w.sum()
    mean = np.dot(w, z)
    centred = z - mean
    return mean, np.dot(w, centred**2), np.dot(w, centred**3)


def check_C2(loss_fn, r, rs, q, p, alpha, scale=1e-3):
    """L_α(εr, εr') = ε(E_p r' − E_q r) + ε²[(α/2)Var_p r' + ((1−α)/2)Var_q r] + O(ε³), checked through its ε³ term."""
    loss, *_ = evaluate_critic(loss_fn, scale * r, scale * rs, real_weights=q, synthetic_weights=p, alpha=alpha, beta=1.0)
    mean_r, var_r, skew_r = _moments(r, q)
    mean_s, var_s, skew_s = _moments(rs, p)
    second = scale * (mean_s - mean_r) + scale**2 * (0.5 * alpha * var_s + 0.5 * (1 - alpha) * var_r)
    # The cumulant expansion T_t[z] = κ1 + tκ2/2 + t²κ3/6 + t³κ4/24 + ...; κ3(−r) = −κ3(r).
    third = scale**3 * (alpha**2 * skew_s - (1 - alpha) ** 2 * skew_r) / 6
    # |κ4| ≤ 16 for values in [−1, 1] (as drawn); higher orders are smaller by powers of ε.
    fourth_bound = scale**4 * (alpha**3 + abs(1 - alpha) ** 3) / 24 * 16 * 2
    assert abs(loss - second - third) <= fourth_bound + 1e-16, (
        f"alpha={alpha}: L - (2nd-order expansion) = {loss - second!r}, expected {third!r} ± {fourth_bound:.2g}"
    )


sizes = st.integers(2, 6)


@st.composite
def c2_examples(draw):
    n, m = draw(sizes), draw(sizes)
    r = np.array(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
    rs = np.array(draw(st.lists(st.floats(-1, 1), min_size=m, max_size=m)))
    q = draw(distribution_pairs(min_size=n, max_size=n))[0]
    p = draw(distribution_pairs(min_size=m, max_size=m))[0]
    return r, rs, q, p


@settings(max_examples=examples(50))
@given(c2_examples(), st.floats(0.01, 3.0))
def test_C2_small_reward_expansion(example, alpha):
    """For small rewards L_α = (E_ρ r' − E_π r) + (α/2)·Var_ρ r' + ((1−α)/2)·Var_π r + O(r³)."""
    r, rs, q, p = example
    check_C2(iris_loss, r, rs, q, p, alpha)


Q_C2 = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
P_C2 = np.array([0.4, 0.1, 0.3, 0.2])


@pytest.mark.parametrize("mutant", ["swapped_tilts", "swapped_roles", "dropped_sign"])
def test_C2_negative_control(mutant):
    """check_C2 rejects swapped tilts (the variances get each other's coefficients), swapped roles and the dropped sign."""
    check_C2(iris_loss, R_FIX, RS_FIX * 0.6, Q_C2, P_C2, 0.3)
    with pytest.raises(AssertionError):
        check_C2(MUTANTS[mutant], R_FIX, RS_FIX * 0.6, Q_C2, P_C2, 0.3)
