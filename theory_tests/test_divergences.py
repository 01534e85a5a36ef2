"""iris_ref.divergences against 60-digit mpmath formulas, their identities, zeros and errors."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_ref import divergences as D
from theory_tests.conftest import distribution_pairs, examples

mpmath.mp.dps = 60


def _mp(v):
    values = [mpmath.mpf(float(x)) for x in v]
    total = sum(values)
    return [x / total for x in values]


def _mp_renyi(q, p, alpha):
    """Birrell's R_α by its definition, in 60-digit arithmetic (independent of iris_ref)."""
    q, p, a = _mp(q), _mp(p), mpmath.mpf(alpha)
    s = sum(qi**a * pi ** (1 - a) for qi, pi in zip(q, p) if qi > 0 and pi > 0)
    return mpmath.log(s) / (a * (a - 1))


def _mp_kl(q, p):
    q, p = _mp(q), _mp(p)
    return sum(qi * mpmath.log(qi / pi) for qi, pi in zip(q, p) if qi > 0)


# distributions with exact zeros in q only (so KL(q‖p), χ², R_α are finite for every α)
@st.composite
def pairs_with_zeros_in_q(draw):
    q, p = draw(distribution_pairs(min_size=3, max_size=6))
    zeros = draw(st.lists(st.booleans(), min_size=q.size, max_size=q.size))
    keep = ~np.array(zeros)
    keep[0] = True
    q = np.where(keep, q, 0.0)
    return q / q.sum(), p


ALPHAS = [1e-9, 1e-6, 1e-3, 0.05, 0.5, 1 - 1e-9, 1 - 5e-3, 1 + 1e-9, 1 + 5e-3, 2.0, 10.0, 50.0]


@settings(max_examples=examples(25))
@given(pairs_with_zeros_in_q())
def test_renyi_matches_60_digit_definition(pair):
    """R_α(Q‖P) agrees with its definition in 60-digit arithmetic to 1e-12 (relative), for α in (0, 50] incl. 1 ± 1e-9."""
    q, p = pair
    for alpha in ALPHAS:
        expected = float(_mp_renyi(q, p, alpha))
        assert D.renyi(q, p, alpha) == pytest.approx(expected, rel=1e-12, abs=1e-13), alpha


@settings(max_examples=examples(25))
@given(pairs_with_zeros_in_q())
def test_kl_chi2_js_hellinger_match_60_digit_formulas(pair):
    """KL, reverse KL, χ², JS, H², BC agree with their textbook formulas in 60-digit arithmetic."""
    q, p = pair
    Q, P = _mp(q), _mp(p)
    assert D.kl(q, p) == pytest.approx(float(_mp_kl(q, p)), rel=1e-12, abs=1e-15)
    assert D.reverse_kl(p, q) == pytest.approx(float(_mp_kl(q, p)), rel=1e-12, abs=1e-15)
    assert D.chi2(q, p) == pytest.approx(float(sum((a - b) ** 2 / b for a, b in zip(Q, P))), rel=1e-12, abs=1e-15)
    M = [(a + b) / 2 for a, b in zip(Q, P)]
    js = sum(a * mpmath.log(a / m) for a, m in zip(Q, M) if a > 0) / 2 + sum(b * mpmath.log(b / m) for b, m in zip(P, M)) / 2
    assert D.js(q, p) == pytest.approx(float(js), rel=1e-12, abs=1e-15)
    bc = sum(mpmath.sqrt(a * b) for a, b in zip(Q, P))
    assert D.bhattacharyya(q, p) == pytest.approx(float(bc), rel=1e-13)
    assert D.hellinger_squared(q, p) == pytest.approx(float(1 - bc), rel=1e-11, abs=1e-15)
    assert D.total_variation(q, p) == pytest.approx(float(sum(abs(a - b) for a, b in zip(Q, P)) / 2), rel=1e-13)


@settings(max_examples=examples(40))
@given(distribution_pairs(min_probability=1e-4))
def test_renyi_special_orders_and_limits(pair):
    """R_1 = KL, R_0 = reverse KL, R_½ = −4·log BC, R_2 = ½·log(1 + χ²), continuous at α = 1 and α → 0."""
    q, p = pair
    kl, rkl = D.kl(q, p), D.kl(p, q)
    assert D.renyi(q, p, 1.0) == kl
    assert D.renyi(q, p, 0.0) == rkl
    assert D.renyi(q, p, 0.5) == pytest.approx(-4 * math.log(D.bhattacharyya(q, p)), rel=1e-12, abs=1e-15)
    assert D.renyi(q, p, 2.0) == pytest.approx(0.5 * math.log1p(D.chi2(q, p)), rel=1e-12, abs=1e-15)
    for eps in (1e-12, 1e-9):
        assert D.renyi(q, p, 1 + eps) == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert D.renyi(q, p, 1 - eps) == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert D.renyi(q, p, eps) == pytest.approx(rkl, rel=1e-6, abs=1e-12)


@settings(max_examples=examples(40))
@given(distribution_pairs(min_probability=0.0))
def test_basic_inequalities(pair):
    """Non-negativity, JS ≤ log 2, ln2·H² ≤ JS ≤ H², TV² ≤ H²·(2 − H²), Pinsker TV ≤ sqrt(KL/2)."""
    q, p = pair
    tol = 1e-13
    for value in (D.kl(q, p), D.js(q, p), D.hellinger_squared(q, p), D.chi2(q, p), D.renyi(q, p, 0.3), D.renyi(q, p, 3.0)):
        assert value >= -tol
    js, h2, tv = D.js(q, p), D.hellinger_squared(q, p), D.total_variation(q, p)
    assert js <= math.log(2) + tol
    assert math.log(2) * h2 <= js + tol
    assert js <= h2 + tol
    assert tv <= math.sqrt(D.kl(q, p) / 2) + tol
    assert tv**2 <= h2 * (2 - h2) + tol


def test_zero_conventions():
    """Zeros: 0·log 0 = 0; q > 0 = p gives +inf for KL, χ² and R_α (α ≥ 1); disjoint supports give +inf for every α and JS = log 2."""
    q = np.array([0.5, 0.5, 0.0])
    p = np.array([0.25, 0.25, 0.5])
    assert D.kl(q, p) == pytest.approx(math.log(2))
    assert D.kl(p, q) == math.inf
    assert D.chi2(p, q) == math.inf
    assert D.renyi(p, q, 2.0) == math.inf
    assert D.renyi(p, q, 1.0) == math.inf
    # α < 1: only the common support counts, S = Σ q^α p^{1−α} < 1, finite.
    expected = math.log(2 * 0.25**0.3 * 0.5**0.7) / (0.3 * (0.3 - 1))
    assert D.renyi(p, q, 0.3) == pytest.approx(expected, rel=1e-14)
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    for alpha in (0.0, 1e-9, 0.5, 1.0, 2.0):
        assert D.renyi(a, b, alpha) == math.inf
    assert D.js(a, b) == pytest.approx(math.log(2), rel=1e-15)
    assert D.hellinger_squared(a, b) == 1.0
    assert D.bhattacharyya(a, b) == 0.0
    assert D.kl(a, a) == 0.0 and D.renyi(a, a, 3.0) == 0.0


@settings(max_examples=examples(20))
@given(pairs_with_zeros_in_q())
def test_torch_agrees_with_numpy_and_differentiates(pair):
    """torch float64 inputs give the numpy values, and autograd of KL(Q‖P) w.r.t. p is −q/p."""
    q, p = pair
    qt, pt = torch.tensor(q), torch.tensor(p, requires_grad=True)
    for name in ("kl", "js", "hellinger_squared", "bhattacharyya", "chi2", "total_variation"):
        assert float(getattr(D, name)(qt, pt).detach()) == pytest.approx(getattr(D, name)(q, p), rel=1e-12, abs=1e-15), name
    for alpha in (1e-6, 0.5, 1 + 1e-9, 2.0):
        assert float(D.renyi(qt, pt, alpha).detach()) == pytest.approx(D.renyi(q, p, alpha), rel=1e-12, abs=1e-15)
    (grad,) = torch.autograd.grad(D.kl(qt, pt), pt)
    # d/dp_i of Σ q log(q/p) with p renormalised inside: −q_i/p_i + Σ_j q_j = 1 − q_i/p_i.
    np.testing.assert_allclose(grad.numpy(), 1.0 - q / p, rtol=1e-12, atol=1e-12)


def test_renormalisation_is_exact():
    """A vector summing to 1 − 1e-16 gives the same Rényi value as its normalised version, even at α = 1 + 1e-12."""
    q = np.array([0.2, 0.3, 0.5])
    p = np.array([0.4, 0.4, 0.2])
    for alpha in (1 + 1e-12, 1 - 1e-12, 1e-12):
        assert D.renyi(q * (1 - 1e-16), p * (1 + 2e-16), alpha) == pytest.approx(D.renyi(q, p, alpha), rel=1e-9)


@pytest.mark.parametrize(
    "q, p, alpha, match",
    [
        ([0.5, 0.5], [0.5, 0.5, 0.0], 0.5, "same shape"),
        ([0.6, 0.6], [0.5, 0.5], 0.5, "sum to 1"),
        ([1.5, -0.5], [0.5, 0.5], 0.5, "negative"),
        ([math.nan, 1.0], [0.5, 0.5], 0.5, "non-finite"),
        ([0.5, 0.5], [0.5, 0.5], -0.1, "alpha"),
        ([0.5, 0.5], [0.5, 0.5], math.inf, "alpha"),
        ([], [], 0.5, "at least one"),
    ],
)
def test_bad_input_raises_value_error(q, p, alpha, match):
    """Bad distributions or orders raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        D.renyi(np.array(q, dtype=np.float64), np.array(p, dtype=np.float64), alpha)


def test_torch_requires_float64():
    """torch inputs must be float64 (the suite's exactness relies on it)."""
    with pytest.raises(ValueError, match="float64"):
        D.kl(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
