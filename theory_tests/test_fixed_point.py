"""Claims F1-F2 of THEORY.md §3: p_data is a fixed point of exact population self-play.

Tabular softmax policies through `iris_ref.tabular` (exact population objectives, no
sampling). Each claim is a `check_<claim>(loss_fn, ...)` raising AssertionError, run on the
reference under hypothesis and, as a negative control, on the mutants it should reject.
F3 (a class that cannot represent p_data: the fixed point is the SFT solution) is in
test_misspecified.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_ref import divergences as D
from iris_ref import tabular
from iris_ref.objectives import iris_loss
from theory_tests.conftest import examples
from theory_tests.mutants import MUTANTS

tasks = st.tuples(st.lists(st.integers(2, 5), min_size=1, max_size=3), st.integers(0, 10_000))


def _loss_and_grad(task, logits, opponent, objective, **constants):
    theta = logits.detach().clone().requires_grad_(True)
    loss = tabular.population_loss(task, theta, opponent, objective, **constants).loss
    (grad,) = torch.autograd.grad(loss, theta)
    return float(loss.detach()), grad


# ------------------------------------------------------------------------------------ F1


def check_F1(loss_fn, task, alpha, beta, probes=4, objective_constants=None, fixed_value=0.0):
    """With p_θt = p_data: L(θt) = fixed_value, ∇L(θt) = 0 and L(θ) ≥ L(θt) for random θ."""
    constants = dict(alpha=alpha) if objective_constants is None else dict(objective_constants)
    constants["beta"] = beta
    at_data = task.data_logits()
    value, grad = _loss_and_grad(task, at_data, at_data, loss_fn, **constants)
    assert abs(value - fixed_value) <= 1e-12, f"L(θt) = {value!r}, expected {fixed_value!r}"
    assert float(grad.abs().max()) <= 1e-12, f"∇L(θt) = {float(grad.abs().max()):.3g}"
    for seed in range(probes):
        for scale in (0.01, 0.3, 2.0):
            other, _ = _loss_and_grad(task, at_data + task.random_logits(seed=seed, scale=scale), at_data, loss_fn, **constants)
            assert other >= value - 1e-12 * (1 + abs(value)), f"L(θ) = {other!r} < L(θt) = {value!r} (scale {scale})"


@settings(max_examples=examples(25))
@given(tasks, st.floats(0.02, 20.0), st.floats(0.05, 10.0))
def test_F1_data_is_fixed_point(task_spec, alpha, beta):
    """If p_θt = p_data then in population L_α(θ) ≥ L_α(θt) = 0 for every θ, α > 0, β > 0, and ∇L_α(θt) = 0."""
    task = tabular.TabularTask.random(task_spec[0], seed=task_spec[1])
    check_F1(iris_loss, task, alpha, beta)


@settings(max_examples=examples(10))
@given(tasks, st.floats(0.05, 10.0), st.floats(0.1, 10.0))
def test_F1_baselines_data_is_fixed_point(task_spec, beta, mu):
    """At p_θt = p_data, SPIN (value log 2), SPACE (value (1+μ)log(1+μ) − μ log μ) and SPIF (value 0) are minimal with zero gradient."""
    task = tabular.TabularTask.random(task_spec[0], seed=task_spec[1])
    check_F1("spin", task, None, beta, objective_constants={}, fixed_value=math.log(2))
    space_value = (1 + mu) * math.log1p(mu) - mu * math.log(mu)
    check_F1("space", task, None, beta, objective_constants={"mu": mu}, fixed_value=space_value)
    check_F1("spif", task, None, beta, objective_constants={})


def test_F1_negative_control():
    """check_F1 rejects the dropped sign of the α < 1 branch (its loss goes below 0 away from θt)."""
    task = tabular.TabularTask.random([3, 4], seed=7)
    check_F1(iris_loss, task, 0.5, 1.0)
    with pytest.raises(AssertionError):
        check_F1(MUTANTS["dropped_sign"], task, 0.5, 1.0)


# ------------------------------------------------------------------------------------ F2


def _joint_policy(task, logits):
    return torch.cat([px * torch.softmax(chunk, 0) for px, chunk in zip(task.prompt_probs, torch.split(logits, task.sizes))])


def check_F2(loss_fn, task, start, alpha, beta, iterations=4, steps=3):
    """Gradient at θt = β·∇KL(p_data‖p_θ); K small steps decrease KL each iteration; β = 1 to convergence reaches p_data."""
    _, grad = _loss_and_grad(task, start, start, loss_fn, alpha=alpha, beta=beta)
    theta = start.detach().clone().requires_grad_(True)
    (kl_grad,) = torch.autograd.grad(D.kl(task.joint_data(), _joint_policy(task, theta)), theta)
    assert float((grad - beta * kl_grad).abs().max()) <= 1e-12 * (1 + beta), "∇L(θt) ≠ β·∇KL(p_data‖p_θ)"
    history = tabular.self_play(
        task, start, loss_fn, iterations=iterations, steps=steps, step_size=0.1 / max(1.0, beta), alpha=alpha, beta=beta
    )
    kls = [h.kl for h in history]
    assert all(b < a for a, b in zip(kls, kls[1:])), f"KL does not decrease across iterations: {kls}"
    converged = tabular.self_play(task, start, loss_fn, iterations=2, alpha=alpha, beta=1.0)
    assert converged[1].tv <= 1e-7 and converged[2].tv <= 1e-7, f"not at p_data: TV {[h.tv for h in converged]}"


@settings(max_examples=examples(8))
@given(tasks, st.floats(0.2, 3.0), st.floats(0.2, 5.0))
def test_F2_iteration_reaches_data(task_spec, alpha, beta):
    """Exact population IRIS iterations reach p_data when optimised to convergence (β = 1), and with a few small gradient steps per iteration KL(p_data‖p_θt) decreases, the gradient at θt being β·∇KL(p_data‖p_θ)."""
    task = tabular.TabularTask.random(task_spec[0], seed=task_spec[1], concentration=3.0)
    start = task.data_logits() + task.random_logits(seed=task_spec[1] + 1)
    check_F2(iris_loss, task, start, alpha, beta)


@pytest.mark.parametrize("mutant, alpha", [("swapped_roles", 2.0), ("dropped_sign", 0.5)])
def test_F2_negative_control(mutant, alpha):
    """check_F2 rejects swapped roles and the dropped sign: their gradient at θt is not β·∇KL, and KL grows."""
    task = tabular.TabularTask.random([3, 4], seed=11, concentration=3.0)
    start = task.data_logits() + task.random_logits(seed=12)
    check_F2(iris_loss, task, start, alpha, 1.0)
    with pytest.raises(AssertionError):
        check_F2(MUTANTS[mutant], task, start, alpha, 1.0)
