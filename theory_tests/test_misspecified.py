"""Claim F3 of THEORY.md §3: with a policy class that cannot represent p_data, the fixed point of
exact population self-play is the SFT (maximum-likelihood) solution.

The class is `tabular.misspecified_class()`: log-linear policies p_θ(y|x) = softmax(Φ_x θ) on 2
prompts with 5 and 6 responses and d = 3 shared parameters (the tabular class has 9 free
logits), features centred per prompt and of full column rank, so θ is identifiable and the
projection θ* = argmin KL(p_data‖p_Φθ) is unique; p_data = softmax(Φθ_true + noise) lies outside
the class (KL(p_data‖p_θ*) = 0.04826). Everything is exact population arithmetic in float64.

Each claim is a `check_<claim>(loss_fn, ...)` raising AssertionError, run on the reference
objectives and, as negative controls, on wrong objectives (theory_tests/mutants.py) and on a
class that is NOT misspecified.

Beyond F3, the linearisation of the exact iteration at θ* in this class is derived in closed
form (`tabular.linearised_iteration_eigenvalues`): one iteration is a preconditioned Newton step
on the SFT loss, θ_{t+1} − θ* ≈ (I − (1/β)·M⁻¹F)(θt − θ*), M = a·F + b·S (IRIS: a = α, b = 1 − α),
F the Fisher information at θ*, S the data's second moment of the model-centred features. Its
eigenvalues ν = 1 − 1/(β(a + bλ)), λ the eigenvalues of F⁻¹S, explain which orders converge:
here λ_max = 1.1376, so the projection repels for α > 1 + 1/(2(λ_max − 1)) = 4.6335.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_ref import tabular
from iris_ref.objectives import iris_loss
from theory_tests.conftest import examples
from theory_tests.mutants import FIXED_POINT_MUTANTS, MUTANTS

CLASS = tabular.misspecified_class()
THETA_STAR = tabular.ml_projection(CLASS)
ALPHA_CRITICAL = 4.633463799307474  # 1 + 1/(2(λ_max − 1)) for CLASS, β = 1 (test_F3_large_order_instability)


def _realizable_class():
    """The same task with d = 9 = Σ(K_x − 1) random features: the whole tabular class again."""
    return tabular.LinearPolicyClass.random(CLASS.task, CLASS.tabular_dim, seed=5)


def _near_projection(scale):
    return THETA_STAR + scale * torch.ones(3, dtype=torch.float64)


# ------------------------------------------------------------------ the gradient at θ = θt


def check_F3_gradient(loss_fn, policy_class, theta, c, *, beta, paired=None, **constants):
    """∇_θ L(θ; θt) at θ = θt equals c·β·∇_θ KL(p_data‖p_θ) = c·β·Φᵀ(p_θ − p_data) (closed form), to float64 rounding."""
    point = theta.detach().clone().requires_grad_(True)
    opponent = policy_class.logits(theta.detach()).detach()
    loss = tabular.population_loss(policy_class.task, policy_class.logits(point), opponent, loss_fn, paired=paired, beta=beta, **constants).loss
    (autograd,) = torch.autograd.grad(loss, point)
    closed = c * beta * tabular.sft_gradient(policy_class, theta)
    scale = 1.0 + float(closed.abs().max()) + float(autograd.abs().max())
    error = float((autograd - closed).abs().max())
    assert error <= 1e-13 * scale * (1.0 + beta), f"∇L(θt) = {autograd.tolist()} ≠ {c}·β·∇KL = {closed.tolist()} (error {error:.3g})"


@st.composite
def linear_classes(draw):
    """A random task (1-3 prompts, 2-5 responses) and a log-linear class with d ≤ Σ(K_x − 1) features."""
    sizes = draw(st.lists(st.integers(2, 5), min_size=1, max_size=3))
    seed = draw(st.integers(0, 10_000))
    task = tabular.TabularTask.random(sizes, seed=seed, concentration=2.0)
    dim = draw(st.integers(1, sum(n - 1 for n in sizes)))
    return tabular.LinearPolicyClass.random(task, dim, seed=seed + 1)


@settings(max_examples=examples(20))
@given(linear_classes(), st.integers(0, 10_000), st.floats(0.05, 10.0), st.floats(0.05, 10.0), st.floats(0.1, 10.0))
def test_F3_gradient_at_opponent_is_scaled_sft_gradient(policy_class, seed, alpha, beta, mu):
    """At θ = θt every objective's gradient is c·β·∇KL(p_data‖p_θ) in any log-linear class: IRIS (any α) and SPIF c = 1, SPIN c = ½, SPACE c = μ/(1+μ) (½ at μ = 1)."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(policy_class.dim, generator=generator, dtype=torch.float64)
    check_F3_gradient("iris", policy_class, theta, 1.0, beta=beta, alpha=alpha)
    check_F3_gradient("spif", policy_class, theta, 1.0, beta=beta)
    check_F3_gradient("spin", policy_class, theta, 0.5, beta=beta)
    check_F3_gradient("space", policy_class, theta, mu / (1.0 + mu), beta=beta, mu=mu)
    check_F3_gradient("space", policy_class, theta, 0.5, beta=beta, mu=1.0)


@pytest.mark.parametrize(
    "objective, c, constants",
    [
        (MUTANTS["swapped_roles"], 1.0, {"alpha": 2.0}),  # gradient −β∇KL: pushes away from the data
        (MUTANTS["dropped_sign"], 1.0, {"alpha": 0.5}),  # likewise for α < 1
        (FIXED_POINT_MUTANTS["doubled_annotated"], 1.0, {"alpha": 2.0}),  # c = 2
        (FIXED_POINT_MUTANTS["unweighted_synthetic"], 1.0, {"alpha": 2.0}),  # not ∝ ∇KL at all
        ("spin", 1.0, {}),  # the claim mis-scaled: SPIN's c is ½
        ("iris", 0.5, {"alpha": 2.0}),  # and IRIS's is 1
    ],
)
def test_F3_gradient_negative_control(objective, c, constants):
    """check_F3_gradient rejects swapped roles, the dropped sign, a doubled annotated term, unweighted synthetic samples, and a wrong c."""
    theta = THETA_STAR + torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64)
    with pytest.raises(AssertionError):
        check_F3_gradient(objective, CLASS, theta, c, beta=0.7, **constants)


# ------------------------------------------------------------------ the fixed point


def check_F3_fixed_point(loss_fn, policy_class, start, *, iterations=40, paired=None, **constants):
    """p_data is not representable (KL at the projection > 1e-3), and iterating exact population
    self-play from `start` reaches the ML projection: ‖θ_T − θ*‖ ≤ 1e-7, the SFT gradient ≈ 0 there."""
    theta_star = tabular.ml_projection(policy_class)
    kl_star = policy_class.kl_to_data(theta_star)
    assert kl_star > 1e-3, f"p_data is representable (KL at the projection {kl_star:.3g}): not a misspecified class"
    theta = start.detach().clone()
    distances = []
    for _ in range(iterations):
        new = tabular.minimise_in_class(policy_class, theta, loss_fn, paired=paired, **constants)
        step, theta = float((new - theta).norm()), new
        distances.append(float((theta - theta_star).norm()))
        assert distances[-1] < 100.0, f"θ runs off: ‖θ_t − θ*‖ = {distances[-1]:.3g}"
        if step <= 1e-11:
            break
    assert distances[-1] <= 1e-7, f"not at the ML projection: ‖θ_T − θ*‖ = {distances[-1]:.3g} (history {distances[:3]} … {distances[-3:]})"
    assert float(tabular.sft_gradient(policy_class, theta).abs().max()) <= 1e-9, "the limit is not a stationary point of KL"


@pytest.mark.parametrize(
    "objective, constants",
    [("iris", {"alpha": a}) for a in (0.25, 0.5, 1.0, 2.0, 3.0)] + [("spin", {}), ("space", {"mu": 1.0})],
    ids=["iris-0.25", "iris-0.5", "iris-1", "iris-2", "iris-3", "spin", "space"],
)
def test_F3_fixed_point_is_the_ml_projection(objective, constants):
    """With β = 1, exact population IRIS (α ∈ {¼, ½, 1, 2, 3}), SPIN and SPACE (μ = 1) iterated to convergence from the uniform policy reach the ML projection of the misspecified class (‖θ − θ*‖ ≤ 1e-7)."""
    check_F3_fixed_point(objective, CLASS, CLASS.zeros(), beta=1.0, **constants)


@pytest.mark.parametrize(
    "objective, alpha",
    [(MUTANTS["swapped_roles"], 2.0), (MUTANTS["dropped_sign"], 0.5), (FIXED_POINT_MUTANTS["unweighted_synthetic"], 2.0)],
    ids=["swapped_roles", "dropped_sign", "unweighted_synthetic"],
)
def test_F3_fixed_point_negative_control(objective, alpha):
    """check_F3_fixed_point rejects objectives whose fixed point is not the projection: swapped roles and the dropped sign (they ascend KL) and unweighted synthetic samples (a different stationary point)."""
    with pytest.raises(AssertionError):
        check_F3_fixed_point(objective, CLASS, CLASS.zeros(), alpha=alpha, beta=1.0)


def test_F3_fixed_point_does_not_see_the_scale():
    """A doubled annotated term (c = 2) still has the projection as its fixed point: F3 holds for any objective whose θt-gradient is ∝ ∇KL; only check_F3_gradient sees the scale."""
    check_F3_fixed_point(FIXED_POINT_MUTANTS["doubled_annotated"], CLASS, CLASS.zeros(), alpha=0.5, beta=1.0)


def test_F3_realizable_class_is_not_a_demonstration():
    """With d = Σ(K_x − 1) features the class is the tabular one: its projection is p_data (KL ≈ 0), and check_F3_fixed_point refuses it as a demonstration of misspecification."""
    realizable = _realizable_class()
    assert tabular.LinearPolicyClass(realizable.task, realizable.features).dim == 9
    assert realizable.kl_to_data(tabular.ml_projection(realizable)) <= 1e-14
    with pytest.raises(AssertionError, match="not a misspecified class"):
        check_F3_fixed_point("iris", realizable, realizable.zeros(), alpha=2.0, beta=1.0)


def test_misspecified_class_and_its_projection():
    """CLASS cannot represent p_data: the projection has KL 0.04826 > 0, zero SFT gradient (≤ 1e-12) and no perturbation does better; d = 3 < 9 free logits."""
    assert (CLASS.dim, CLASS.tabular_dim, CLASS.task.sizes) == (3, 9, [5, 6])
    kl_star = CLASS.kl_to_data(THETA_STAR)
    assert kl_star == pytest.approx(0.048264303066735, abs=1e-12)
    assert float(tabular.sft_gradient(CLASS, THETA_STAR).abs().max()) <= 1e-12
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(4):
            other = THETA_STAR + scale * torch.randn(3, generator=generator, dtype=torch.float64)
            assert CLASS.kl_to_data(other) >= kl_star
    # The projection does not depend on the start (strict convexity).
    assert torch.allclose(tabular.ml_projection(CLASS, start=torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)), THETA_STAR, rtol=0, atol=1e-12)


def test_F3_iris_order_one_is_sft():
    """IRIS at α = 1, β = 1 is the SFT loss plus a constant in every class (E_{p_θt} e^r = 1), so ONE exact iteration from anywhere lands on the projection."""
    opponent = CLASS.logits(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    values = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        theta = 2.0 * torch.randn(3, generator=generator, dtype=torch.float64)
        loss = float(tabular.population_loss(CLASS.task, CLASS.logits(theta), opponent, "iris", alpha=1.0, beta=1.0).loss)
        values.append(loss - float(tabular._cross_entropy(CLASS, theta)))
    assert max(values) - min(values) <= 1e-14
    one_step = tabular.minimise_in_class(CLASS, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), "iris", alpha=1.0, beta=1.0)
    assert float((one_step - THETA_STAR).norm()) <= 1e-12


# ------------------------------------------------------------------ the linearised iteration


@pytest.mark.parametrize(
    "objective, constants",
    [
        ("iris", {"alpha": 0.25, "beta": 1.0}),
        ("iris", {"alpha": 5.0, "beta": 1.0}),
        ("iris", {"alpha": 2.0, "beta": 0.7}),
        ("spin", {"beta": 1.0}),
        ("space", {"mu": 3.0, "beta": 1.0}),
        ("spif", {"beta": 1.0}),
    ],
    ids=["iris-0.25", "iris-5", "iris-2-beta0.7", "spin", "space-mu3", "spif"],
)
def test_linearised_iteration_closed_form(objective, constants):
    """The exact iteration's Jacobian at θ* (central differences of converged solves) has the closed-form eigenvalues 1 − 1/(β(a + bλ_i)) to 1e-6."""
    jacobian = tabular.iteration_jacobian(CLASS, THETA_STAR, objective, **constants)
    measured = torch.sort(torch.linalg.eigvals(jacobian).real).values
    predicted = tabular.linearised_iteration_eigenvalues(CLASS, objective, **constants)
    assert float((measured - predicted).abs().max()) <= 1e-6, f"{measured.tolist()} vs {predicted.tolist()}"
    assert float(torch.linalg.eigvals(jacobian).imag.abs().max()) <= 1e-6


def test_linearised_iteration_negative_control():
    """The closed form is not vacuous: the Jacobian of IRIS at α = 5 does not match the prediction for α = 4, nor SPIF's the prediction for IRIS at α = ½."""
    measured = torch.sort(torch.linalg.eigvals(tabular.iteration_jacobian(CLASS, THETA_STAR, "iris", alpha=5.0, beta=1.0)).real).values
    assert float((measured - tabular.linearised_iteration_eigenvalues(CLASS, "iris", alpha=4.0)).abs().max()) > 0.1
    spif = torch.sort(torch.linalg.eigvals(tabular.iteration_jacobian(CLASS, THETA_STAR, "spif", beta=1.0)).real).values
    assert float((spif - tabular.linearised_iteration_eigenvalues(CLASS, "iris", alpha=0.5)).abs().max()) > 0.5


# ------------------------------------------------------------------ large orders, SPIF, β < 1


def test_F3_large_order_instability():
    """Large orders destabilise the exact iteration: stable for α < α_c = 1 + 1/(2(λ_max − 1)) = 4.6335 (converges at α = 3, see above), an eigenvalue crosses −1 at α_c, and at α = 5 the iteration leaves the projection and settles into an exact 2-cycle (KL 0.0533 / 0.0980 against 0.0483 at θ*)."""
    low, high = tabular.stable_orders(CLASS)
    assert low == 0.0 and high == pytest.approx(ALPHA_CRITICAL, rel=1e-9)
    lam_max = float(tabular.spread_ratios(CLASS).max())
    assert high == pytest.approx(1 + 1 / (2 * (lam_max - 1)), rel=1e-12)
    at_critical = tabular.iteration_jacobian(CLASS, THETA_STAR, "iris", alpha=ALPHA_CRITICAL, beta=1.0)
    assert float(torch.linalg.eigvals(at_critical).real.min()) == pytest.approx(-1.0, abs=1e-6)
    assert float(tabular.linearised_iteration_eigenvalues(CLASS, "iris", alpha=3.0).abs().max()) < 0.4
    # α = 5: from 0.01 away the projection repels; after a transient of ~45 iterations the
    # orbit contracts onto a 2-cycle (‖θ_{t+2} − θ_t‖ ≈ 2e-8 at t = 60, 1e-15 by t = 90).
    history = tabular.self_play_in_class(CLASS, _near_projection(0.01), "iris", iterations=60, alpha=5.0, beta=1.0)
    thetas = [h.theta for h in history]
    assert tabular.attractor_period(thetas[-8:], tolerance=1e-6) == 2
    kls = sorted(h.kl for h in history[-2:])
    assert kls == pytest.approx([0.05325, 0.09799], abs=1e-4)
    assert min(float((t - THETA_STAR).norm()) for t in thetas[-2:]) > 0.1
    # Just above α_c the projection repels too (the orbit does not converge; the script shows a 6-cycle at 4.7).
    assert float(tabular.linearised_iteration_eigenvalues(CLASS, "iris", alpha=4.7).min()) < -1.03


def test_F3_spif_overshoots():
    """SPIF's θt-gradient is β·∇KL (c = 1), so its only possible fixed point is θ*, but one exact iteration is a Newton step of twice the length: the linearised map is (1 − 2/β)·I = −I at β = 1, and from the uniform policy the distance to θ* shrinks only sublinearly (still > 0.05 after 30 iterations)."""
    jacobian = tabular.iteration_jacobian(CLASS, THETA_STAR, "spif", beta=1.0)
    assert torch.allclose(jacobian, -torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
    history = tabular.self_play_in_class(CLASS, CLASS.zeros(), "spif", iterations=30, beta=1.0)
    distances = [float((h.theta - THETA_STAR).norm()) for h in history[1:]]
    assert 0.05 < distances[-1] < distances[0]
    assert all(b < a for a, b in zip(distances[::2], distances[2::2])), distances


def test_F3_beta_below_one_runs_off():
    """With β < 1 one iteration over-relaxes the Newton step (ν = 1 − 1/β at α = 1): β = 0.7 still converges, β = ½ is neutral (J = −I, the distance to θ* does not shrink), and at β = 0.3 θ runs off to infinity across iterations (distance ×≥2 per iteration, beyond 20 after 8)."""
    assert torch.allclose(tabular.linearised_iteration_eigenvalues(CLASS, "iris", alpha=1.0, beta=0.5), -torch.ones(3, dtype=torch.float64), atol=1e-12)
    start = THETA_STAR + torch.tensor([0.03, -0.02, 0.025], dtype=torch.float64)
    converging = tabular.self_play_in_class(CLASS, start, "iris", iterations=25, alpha=1.0, beta=0.7)
    assert float((converging[-1].theta - THETA_STAR).norm()) <= 1e-9
    running = tabular.self_play_in_class(CLASS, start, "iris", iterations=8, alpha=1.0, beta=0.3)
    distances = [float((h.theta - THETA_STAR).norm()) for h in running]
    assert all(b >= 2.0 * a for a, b in zip(distances[:5], distances[1:6])), distances
    assert distances[-1] > 20.0, distances


def test_linear_class_validation():
    """Features must be float64 (cells × d) of full column rank after per-prompt centring."""
    task = CLASS.task
    with pytest.raises(ValueError, match="2-D float64"):
        tabular.LinearPolicyClass(task, torch.zeros(11, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="rows"):
        tabular.LinearPolicyClass(task, torch.zeros(10, 2, dtype=torch.float64))
    constant = torch.ones(11, 1, dtype=torch.float64)  # constant within each prompt: no effect on the policy
    with pytest.raises(ValueError, match="not identifiable"):
        tabular.LinearPolicyClass(task, torch.cat([CLASS.features[:, :1], constant], dim=1))
    with pytest.raises(ValueError, match="shape"):
        CLASS.logits(torch.zeros(4, dtype=torch.float64))
    # Centring is exact and changes no policy.
    raw = torch.randn(11, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    centred = tabular.LinearPolicyClass(task, raw)
    theta = torch.tensor([0.7, -0.4], dtype=torch.float64)
    assert torch.allclose(
        torch.cat(tabular.policy_log_probs(task, raw @ theta)), torch.cat(tabular.policy_log_probs(task, centred.logits(theta))), atol=1e-14
    )
    assert math.isinf(tabular.stable_orders(_realizable_class())[1])  # λ = 1: every order is stable when realizable
