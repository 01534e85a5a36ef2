"""Claims R1-R6 of THEORY.md §3: the regimes of IRIS, exactly, through the probability weights.

Every claim is a `check_<claim>(loss_fn, ...)` that raises AssertionError when `loss_fn` (an
IRIS implementation with `iris_loss`'s signature) violates it. `test_<claim>_...` runs the
check on the reference under hypothesis; `test_<claim>_negative_control` shows that the same
check rejects the mutants of `theory_tests/mutants.py` that the claim should catch.

Population objectives: the annotated and the synthetic samples are the same finite set of
cells, weighted by q = p_data and p = p_θt; the critic g (the reward) is a free function of
the cell. Optimal values are computed in closed form by plugging in the optimal critic
g* = log(q/p) (Birrell et al. 2021), and optimality is checked separately: the gradient
w.r.t. the critic vanishes at g* and no perturbation increases −L.

The weights are passed with a relative deficit of 1e-13 (`MASS`), as a pipeline that does not
renormalise would deliver them: the objectives renormalise inside (THEORY.md §1), and near
α = 1 the tilted term divides by a tiny tilt, so a missing renormalisation shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_ref import divergences as D
from iris_ref import tabular
from iris_ref.objectives import iris_loss, space_loss, spif_loss, spin_loss
from theory_tests.conftest import distribution_pairs, evaluate_critic, examples, population_critic_value, t64
from theory_tests.mutants import MUTANTS

MASS = 1.0 - 1e-13
TOL = 1e-10


def _value_and_gradient(loss_fn, q, p, critic, **constants):
    """−L at the critic and ∂L/∂g (population, weights with the deliberate deficit)."""
    value, grad = population_critic_value(loss_fn, q, p, critic, real_mass=MASS, synthetic_mass=MASS, **constants)
    return -value, grad


def _assert_close(actual, expected, what, rel=TOL, abs_=TOL):
    assert math.isfinite(actual), f"{what}: not finite ({actual})"
    assert abs(actual - expected) <= abs_ + rel * abs(expected), f"{what}: {actual!r} != {expected!r}"


def _assert_optimal_critic(loss_fn, q, p, g_star, directions, expected, what, **constants):
    """−L(g*) equals `expected`, ∂L/∂g(g*) = 0, and −L(g* + εd) ≤ −L(g*) for every direction d."""
    value, grad = _value_and_gradient(loss_fn, q, p, g_star, **constants)
    _assert_close(value, expected, f"{what}: optimal value")
    assert np.abs(grad).max() <= 1e-9, f"{what}: gradient at the optimal critic is {np.abs(grad).max():.3g}"
    for d in directions:
        for eps in (1e-3, 0.1, 1.0):
            perturbed, _ = _value_and_gradient(loss_fn, q, p, g_star + eps * d, **constants)
            assert perturbed <= value + 1e-12 * (1 + abs(value)), f"{what}: g* + {eps}·d beats g* ({perturbed} > {value})"


def _directions(g):
    """Perturbation directions: the given critic, a constant (a symmetry), and alternating signs."""
    n = g.size
    return [g - g.mean(), np.ones(n), np.where(np.arange(n) % 2 == 0, 1.0, -1.0)]


critic_pairs = distribution_pairs(min_size=2, max_size=6, min_probability=1e-3).flatmap(
    lambda qp: st.tuples(
        st.just(qp[0]),
        st.just(qp[1]),
        st.lists(st.floats(-3, 3), min_size=qp[0].size, max_size=qp[0].size).map(np.array),
    )
)

# A fixed, deliberately skewed example for the negative controls.
Q_FIX = np.array([0.55, 0.25, 0.15, 0.05])
P_FIX = np.array([0.10, 0.20, 0.30, 0.40])
G_FIX = np.array([1.5, -0.5, 0.25, -2.0])


# ------------------------------------------------------------------------------------ R1


def check_R1(loss_fn, q, p, g):
    """α → 1: −L_α(g*) = R_α → KL(q‖p); L_α(g) → DV(g) and its weights → (q, softmax(g + log p))."""
    g_star = np.log(q) - np.log(p)
    kl = D.kl(q, p)
    _assert_optimal_critic(loss_fn, q, p, g_star, _directions(g), kl, "alpha=1", alpha=1.0)
    dv = -np.dot(q, g) + math.log(np.dot(p, np.exp(g)))
    dv_real, dv_synthetic = q, p * np.exp(g) / np.dot(p, np.exp(g))
    spread = float(g.max() - g.min())
    for delta in (1e-9, 1e-7, 5e-3):
        for alpha in (1 - delta, 1 + delta):
            value, grad = _value_and_gradient(loss_fn, q, p, g_star, alpha=alpha)
            _assert_close(value, D.renyi(q, p, alpha), f"alpha={alpha!r}: -L(g*) vs R_alpha")
            assert abs(D.renyi(q, p, alpha) - kl) <= 10 * delta * (1 + kl * kl + float(np.abs(g_star).max()) ** 2)
            assert np.abs(grad).max() <= 1e-9, f"alpha={alpha!r}: gradient at g* is {np.abs(grad).max():.3g}"
            loss, grad_real, grad_synthetic, _ = evaluate_critic(
                loss_fn, g, g, real_weights=q * MASS, synthetic_weights=p * MASS, alpha=alpha
            )
            bound = delta * spread**2 + TOL
            assert abs(loss - dv) <= bound, f"alpha={alpha!r}: L={loss!r} vs DV {dv!r}"
            assert np.abs(-grad_real - dv_real).max() <= 2 * delta * spread + TOL, f"alpha={alpha!r}: annotated weights"
            assert np.abs(grad_synthetic - dv_synthetic).max() <= 2 * delta * spread + TOL, f"alpha={alpha!r}: synthetic weights"


@settings(max_examples=examples(30))
@given(critic_pairs)
def test_R1_alpha_to_one_gives_kl(example):
    """As α → 1, L_α and its gradient converge to the Donsker–Varadhan KL objective, and the optimum of −L_α tends to KL(p_data‖p_θt)."""
    q, p, g = example
    check_R1(iris_loss, q, p, g)


@pytest.mark.parametrize("mutant", ["coarse_series", "unnormalised_weights", "swapped_tilts", "swapped_roles"])
def test_R1_negative_control(mutant):
    """check_R1 rejects a too-coarse series near α = 1, unrenormalised weights, swapped tilts and swapped roles."""
    check_R1(iris_loss, Q_FIX, P_FIX, G_FIX)
    with pytest.raises(AssertionError):
        check_R1(MUTANTS[mutant], Q_FIX, P_FIX, G_FIX)


# ------------------------------------------------------------------------------------ R2


def check_R2(loss_fn, q, p, g):
    """α = ½: L_½ symmetric under (annotated, r) ↔ (synthetic, −r); optimum −4·log BC; SPACE's JS bracketed."""
    h = np.roll(g, 1) * 0.5 - 0.3  # a second, different critic for the synthetic side
    forward, *_ = evaluate_critic(loss_fn, g, h, real_weights=q * MASS, synthetic_weights=p * MASS, alpha=0.5)
    backward, *_ = evaluate_critic(loss_fn, -h, -g, real_weights=p * MASS, synthetic_weights=q * MASS, alpha=0.5)
    _assert_close(forward, backward, "L_1/2 symmetry")
    bc, h2 = D.bhattacharyya(q, p), D.hellinger_squared(q, p)
    expected = -4 * math.log(bc)
    _assert_close(expected, -4 * math.log1p(-h2), "-4 log BC = -4 log(1 - H^2)", rel=1e-9)
    _assert_close(D.renyi(q, p, 0.5), expected, "R_1/2 = -4 log BC", rel=1e-9)
    g_star = np.log(q) - np.log(p)
    _assert_optimal_critic(loss_fn, q, p, g_star, _directions(g), expected, "alpha=1/2", alpha=0.5)
    # SPACE (μ = 1) at its optimal critic: value log 4 − 2·JS; JS bracketed by H².
    js = D.js(q, p)
    assert math.log(2) * h2 <= js + 1e-14 and js <= h2 + 1e-14, "ln2·H² ≤ JS ≤ H²"
    space_value, space_grad = population_critic_value(space_loss, q, p, g_star, mu=1.0)
    _assert_close(space_value, math.log(4) - 2 * js, "SPACE optimal value log 4 - 2 JS")
    assert np.abs(space_grad).max() <= 1e-12, "SPACE gradient at log(q/p)"


@settings(max_examples=examples(30))
@given(critic_pairs)
def test_R2_alpha_half_is_symmetric_bhattacharyya(example):
    """α = ½ is the symmetric point: L_½ is unchanged under (annotated, r) ↔ (synthetic, −r), its optimum is −4·log BC = −4·log(1 − H²), and SPACE's JS satisfies ln2·H² ≤ JS ≤ H²."""
    q, p, g = example
    check_R2(iris_loss, q, p, g)


@pytest.mark.parametrize("mutant", ["swapped_roles", "dropped_sign"])
def test_R2_negative_control(mutant):
    """check_R2 rejects swapped roles and the dropped sign of the α < 1 branch (swapped tilts are the same function at α = ½)."""
    check_R2(iris_loss, Q_FIX, P_FIX, G_FIX)
    with pytest.raises(AssertionError):
        check_R2(MUTANTS[mutant], Q_FIX, P_FIX, G_FIX)


# ------------------------------------------------------------------------------------ R3


def check_R3(loss_fn, q, p, g):
    """α = 2: −L_2(g*) = ½·log(1 + χ²(q‖p)), with χ² = SPIF's optimal value."""
    chi2 = D.chi2(q, p)
    r_spif = 2 * (q / p - 1)
    spif_value, spif_grad = population_critic_value(spif_loss, q, p, r_spif, beta=1.0)
    _assert_close(-spif_value, chi2, "SPIF optimal value = chi^2")
    assert np.abs(spif_grad).max() <= 1e-12, "SPIF gradient at 2(q/p - 1)"
    for d in _directions(g):
        perturbed, _ = population_critic_value(spif_loss, q, p, r_spif + 0.1 * d, beta=1.0)
        assert -perturbed <= chi2 + 1e-12, "SPIF: a perturbed critic beats the optimum"
    g_star = np.log(q) - np.log(p)
    _assert_optimal_critic(loss_fn, q, p, g_star, _directions(g), 0.5 * math.log1p(chi2), "alpha=2", alpha=2.0)


@settings(max_examples=examples(30))
@given(critic_pairs)
def test_R3_alpha_two_gives_log_one_plus_chi2(example):
    """The optimal value of −L_2 is ½·log(1 + χ²(p_data‖p_θt)), where χ² is exactly SPIF's optimal value."""
    q, p, g = example
    check_R3(iris_loss, q, p, g)


@pytest.mark.parametrize("mutant", ["swapped_tilts", "swapped_roles"])
def test_R3_negative_control(mutant):
    """check_R3 rejects swapped tilts (order −1 instead of 2) and swapped roles."""
    check_R3(iris_loss, Q_FIX, P_FIX, G_FIX)
    with pytest.raises(AssertionError):
        check_R3(MUTANTS[mutant], Q_FIX, P_FIX, G_FIX)


# ------------------------------------------------------------------------------------ R4


def check_R4(loss_fn, q, p, g):
    """α → 0: −L_α(g*) = R_α → KL(p‖q); L_α(g) → log Σ q e^{−g} + Σ p g."""
    g_star = np.log(q) - np.log(p)
    reverse = D.kl(p, q)
    limit = math.log(np.dot(q, np.exp(-g))) + np.dot(p, g)
    spread = float(g.max() - g.min())
    for alpha in (1e-3, 1e-6, 1e-9):
        value, grad = _value_and_gradient(loss_fn, q, p, g_star, alpha=alpha)
        _assert_close(value, D.renyi(q, p, alpha), f"alpha={alpha!r}: -L(g*) vs R_alpha")
        assert abs(value - reverse) <= 10 * alpha * (1 + reverse * reverse + float(np.abs(g_star).max()) ** 2) + TOL, (
            f"alpha={alpha!r}: -L(g*)={value!r} far from KL(p||q)={reverse!r}"
        )
        assert np.abs(grad).max() <= 1e-9, f"alpha={alpha!r}: gradient at g*"
        loss, *_ = evaluate_critic(loss_fn, g, g, real_weights=q * MASS, synthetic_weights=p * MASS, alpha=alpha)
        assert abs(loss - limit) <= alpha * spread**2 + TOL, f"alpha={alpha!r}: L={loss!r} vs reverse-KL limit {limit!r}"


@settings(max_examples=examples(30))
@given(critic_pairs)
def test_R4_alpha_to_zero_gives_reverse_kl(example):
    """As α → 0, the optimum of −L_α tends to KL(p_θt‖p_data) (and L_α to its reverse-KL limit)."""
    q, p, g = example
    check_R4(iris_loss, q, p, g)


@pytest.mark.parametrize("mutant", ["dropped_sign", "swapped_tilts", "swapped_roles"])
def test_R4_negative_control(mutant):
    """check_R4 rejects the dropped sign of the α < 1 branch, swapped tilts and swapped roles."""
    check_R4(iris_loss, Q_FIX, P_FIX, G_FIX)
    with pytest.raises(AssertionError):
        check_R4(MUTANTS[mutant], Q_FIX, P_FIX, G_FIX)


# ------------------------------------------------------------------------------------ R5


def _logp_gradients(loss_fn, n, beta, **kwargs):
    """Autograd ∂L/∂policy_real, ∂L/∂policy_synthetic at policy = opponent (all rewards 0)."""
    base = torch.linspace(-3.0, -1.0, n, dtype=torch.float64)
    pr, ps = base.clone().requires_grad_(True), base.flip(0).clone().requires_grad_(True)
    out = loss_fn(pr, ps, base.clone(), base.flip(0).clone(), beta=beta, **kwargs)
    grads = torch.autograd.grad(out.loss, (pr, ps))
    return grads[0].numpy(), grads[1].numpy(), out


def check_R5(loss_fn, q, p, beta, alphas=(0.05, 0.5, 0.9, 1.0, 1.5, 2.0, 10.0)):
    """At θ = θt every IRIS order gives −β·E_q∇r + β·E_p∇r'; SPIN's and SPACE(μ=1)'s are half; SPIF's equal."""
    weights = dict(real_weights=t64(q * MASS), synthetic_weights=t64(p * MASS))
    tol = 1e-13 * (1 + beta)
    for alpha in alphas:
        gr, gs, out = _logp_gradients(loss_fn, q.size, beta, alpha=alpha, **weights)
        assert np.abs(gr + beta * q).max() <= tol, f"alpha={alpha}: annotated gradient"
        assert np.abs(gs - beta * p).max() <= tol, f"alpha={alpha}: synthetic gradient"
        assert np.abs(out.real_weights.numpy() - q).max() <= tol and np.abs(out.synthetic_weights.numpy() - p).max() <= tol
    gr, gs, _ = _logp_gradients(spin_loss, q.size, beta, pair_weights=t64(q))
    assert np.abs(gr + beta * q / 2).max() <= tol and np.abs(gs - beta * q / 2).max() <= tol, "SPIN is half"
    gr, gs, _ = _logp_gradients(space_loss, q.size, beta, mu=1.0, **weights)
    assert np.abs(gr + beta * q / 2).max() <= tol and np.abs(gs - beta * p / 2).max() <= tol, "SPACE(mu=1) is half"
    gr, gs, _ = _logp_gradients(spif_loss, q.size, beta, **weights)
    assert np.abs(gr + beta * q).max() <= tol and np.abs(gs - beta * p).max() <= tol, "SPIF equals"


@settings(max_examples=examples(25))
@given(distribution_pairs(min_probability=0.0), st.floats(0.01, 10.0))
def test_R5_common_start_same_gradient(pair, beta):
    """At θ = θt (all rewards 0) every IRIS order gives the gradient −E_π∇r + E_ρ∇r'; SPIN's (and μ=1 SPACE's) is half of it and SPIF's equals it."""
    q, p = pair
    check_R5(iris_loss, q, p, beta)


@pytest.mark.parametrize("mutant", ["swapped_roles", "dropped_sign"])
def test_R5_negative_control(mutant):
    """check_R5 rejects swapped roles and the dropped sign of the α < 1 branch (every order of a correct IRIS, swapped tilts included, agrees at θt)."""
    check_R5(iris_loss, Q_FIX, P_FIX, 0.1)
    with pytest.raises(AssertionError):
        check_R5(MUTANTS[mutant], Q_FIX, P_FIX, 0.1)


# ------------------------------------------------------------------------------------ R6


def _joint_policy(task, logits):
    return torch.cat([px * torch.softmax(chunk, 0) for px, chunk in zip(task.prompt_probs, torch.split(logits, task.sizes))])


def _loss_and_grad(task, logits, opponent, objective, **constants):
    theta = logits.detach().clone().requires_grad_(True)
    loss = tabular.population_loss(task, theta, opponent, objective, **constants).loss
    (grad,) = torch.autograd.grad(loss, theta)
    return float(loss.detach()), grad


def check_R6(loss_fn, task, opponent, alpha, probes=3):
    """β = 1, realizable tabular policy: p_data minimises L_α over θ (value −R_α of the joints), and Newton from θt finds it."""
    data = task.data_logits()
    value, grad = _loss_and_grad(task, data, opponent, loss_fn, alpha=alpha, beta=1.0)
    renyi = D.renyi(task.joint_data(), _joint_policy(task, opponent).detach(), alpha)
    _assert_close(-value, float(renyi), f"alpha={alpha}: -L at p_data vs R_alpha", rel=1e-9, abs_=1e-9)
    assert float(grad.abs().max()) <= 1e-9, f"alpha={alpha}: gradient at p_data {float(grad.abs().max()):.3g}"
    for seed in range(probes):
        other, _ = _loss_and_grad(task, data + task.random_logits(seed=seed, scale=0.5), opponent, loss_fn, alpha=alpha, beta=1.0)
        assert other >= value - 1e-12, f"alpha={alpha}: a random policy beats p_data"
    found = tabular.minimise(task, opponent, loss_fn, alpha=alpha, beta=1.0)
    assert tabular.tv_to_data(task, found) <= 1e-7, f"alpha={alpha}: minimiser is not p_data (TV {tabular.tv_to_data(task, found):.3g})"


tasks = st.tuples(
    st.lists(st.integers(2, 4), min_size=1, max_size=3),
    st.integers(0, 10_000),
)


def _task_and_opponent(sizes, seed):
    task = tabular.TabularTask.random(sizes, seed=seed, concentration=3.0)
    return task, task.data_logits() + task.random_logits(seed=seed + 1, scale=1.0)


@settings(max_examples=examples(8))
@given(tasks, st.floats(0.2, 3.0))
def test_R6_iris_minimiser_is_data_for_every_alpha(task_spec, alpha):
    """With realizable tabular policies and β = 1, the minimiser of L_α over θ is p_θ = p_data for every α and any number of prompts."""
    task, opponent = _task_and_opponent(*task_spec)
    check_R6(iris_loss, task, opponent, alpha)


@settings(max_examples=examples(6))
@given(tasks, st.floats(0.1, 10.0))
def test_R6_space_minimiser_is_data_for_every_mu(task_spec, mu):
    """With β = 1, SPACE's minimiser over tabular θ is p_data for every μ."""
    task, opponent = _task_and_opponent(*task_spec)
    found = tabular.minimise(task, opponent, "space", mu=mu, beta=1.0)
    assert tabular.tv_to_data(task, found) <= 1e-7


@settings(max_examples=examples(6))
@given(tasks, st.sampled_from([0.5, 1.0, 2.0]))
def test_R6_spin_minimiser_is_tilted_opponent(task_spec, beta):
    """SPIN's minimiser over tabular θ is p_θt·(p_data/p_θt)^{1/β}, normalised per prompt."""
    task, opponent = _task_and_opponent(*task_spec)
    found = tabular.minimise(task, opponent, "spin", beta=beta)
    expected = []
    for data, opp in zip(task.p_data, torch.split(opponent, task.sizes)):
        log_target = torch.log_softmax(opp, 0) + (torch.log(data) - torch.log_softmax(opp, 0)) / beta
        expected.append(torch.softmax(log_target, 0))
    got = [torch.softmax(chunk, 0) for chunk in torch.split(found, task.sizes)]
    for e, g in zip(expected, got):
        assert float((e - g).abs().max()) <= 1e-7


def test_R6_beta_not_one_minimiser_depends_on_alpha():
    """For β ≠ 1 with several prompts IRIS's minimiser depends on α; with one prompt it is the tilted opponent for every α."""
    task = tabular.TabularTask.random([3, 4], seed=3, concentration=2.0)
    opponent = task.random_logits(seed=4)
    low = tabular.minimise(task, opponent, "iris", alpha=0.5, beta=0.5)
    high = tabular.minimise(task, opponent, "iris", alpha=2.0, beta=0.5)
    assert float((_joint_policy(task, low) - _joint_policy(task, high)).abs().max()) > 1e-4
    single = tabular.TabularTask((task.p_data[1],), torch.ones(1, dtype=torch.float64))
    opp = opponent[3:]
    target = torch.softmax(torch.log_softmax(opp, 0) + (torch.log(single.p_data[0]) - torch.log_softmax(opp, 0)) / 0.5, 0)
    for alpha in (0.5, 2.0):
        found = tabular.minimise(single, opp, "iris", alpha=alpha, beta=0.5)
        assert float((torch.softmax(found, 0) - target).abs().max()) <= 1e-7


def test_R6_iris_invariant_to_a_global_not_a_per_prompt_reward_shift():
    """IRIS is unchanged by one constant added to every reward but not by a constant per prompt; SPIN is unchanged by either (why β ≠ 1 makes IRIS's minimiser α-dependent)."""
    q = np.array([0.2, 0.1, 0.3, 0.4])
    p = np.array([0.3, 0.3, 0.1, 0.3])
    g = np.array([0.5, -1.0, 0.2, 0.7])
    per_prompt = np.array([0.0, 0.0, 1.3, 1.3])  # cells 0-1 are prompt A, cells 2-3 prompt B
    for alpha in (0.3, 1.0, 2.0):
        base, _ = population_critic_value(iris_loss, q, p, g, alpha=alpha)
        shifted, _ = population_critic_value(iris_loss, q, p, g + 0.9, alpha=alpha)
        moved, _ = population_critic_value(iris_loss, q, p, g + per_prompt, alpha=alpha)
        assert shifted == pytest.approx(base, rel=1e-13, abs=1e-14)
        assert abs(moved - base) > 1e-3
    # SPIN pairs live within one prompt: a per-prompt shift cancels in r(y) − r(y').
    pairs_real, pairs_synthetic = np.array([0, 1, 2, 3, 0, 2]), np.array([1, 0, 3, 2, 0, 3])
    spin_base, *_ = evaluate_critic(spin_loss, g[pairs_real], g[pairs_synthetic])
    spin_moved, *_ = evaluate_critic(spin_loss, (g + per_prompt)[pairs_real], (g + per_prompt)[pairs_synthetic])
    assert spin_moved == pytest.approx(spin_base, rel=1e-13)


def _fixed_task():
    task = tabular.TabularTask(
        (torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.2, 0.5, 0.1], dtype=torch.float64)),
        torch.tensor([0.4, 0.6], dtype=torch.float64),
    )
    opponent = torch.tensor([0.0, 0.5, 1.0, 0.3, -0.4, 0.2, 0.9], dtype=torch.float64)
    return task, opponent


@pytest.mark.parametrize("mutant, alpha", [("swapped_roles", 2.0), ("swapped_tilts", 0.3), ("dropped_sign", 0.3)])
def test_R6_negative_control(mutant, alpha):
    """check_R6 rejects swapped roles (minimiser moves to the model's own samples), swapped tilts (same minimiser, wrong value) and the dropped sign."""
    task, opponent = _fixed_task()
    check_R6(iris_loss, task, opponent, alpha)
    with pytest.raises(AssertionError):
        check_R6(MUTANTS[mutant], task, opponent, alpha)
