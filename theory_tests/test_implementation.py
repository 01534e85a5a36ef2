"""Claims I1–I3 of THEORY.md §3: the implementation's weights, numerics and accumulation.

- I1: the returned weights are the autograd gradient (∂L/∂policy = ∓β·weights), for all four
  objectives.
- I2: IRIS is finite for rewards up to |r| = 1e4 and any α in (0, 50], in float64 and float32,
  agrees with 60-digit mpmath to ~1e-10 for every α in (0, 50] (including 1 ± 1e-9 and
  1 ± 5e-3), and is continuous through α = 1 and towards α → 0.
- I3: computing the weights over the whole global batch and back-propagating
  `weighted_surrogate` micro-batch by micro-batch gives exactly the big-batch gradient.

The 60-digit reference is the independent formula of theory_tests/golden/make_golden.py (it
never imports iris_ref). Every claim has a negative control: a plausible wrong
implementation the same check rejects.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import mpmath
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from iris_ref.objectives import ObjectiveOutput, get_objective, iris_loss, weighted_surrogate
from theory_tests.mutants import iris_coarse_series

_spec = importlib.util.spec_from_file_location(
    "make_golden", Path(__file__).resolve().parent / "golden" / "make_golden.py"
)
exact = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exact)

MP_DIGITS = 60
# α values where implementations typically switch formulas or lose digits.
SPECIAL_ALPHAS = (
    1.0,
    1.0 - 1e-9,
    1.0 + 1e-9,
    1.0 - 1e-7,
    1.0 + 1e-7,
    1.0 - 5e-3,
    1.0 + 5e-3,
    0.5,
    2.0,
    1e-9,
    1e-3,
    50.0,
)
alphas = st.one_of(st.sampled_from(SPECIAL_ALPHAS), st.floats(1e-9, 50.0))
betas = st.sampled_from((0.05, 0.1, 1.0, 2.5))


def rewards(max_size=6, bound=50.0):
    return st.lists(st.floats(-bound, bound), min_size=1, max_size=max_size)


def optional_weights(size):
    return st.none() | st.lists(st.floats(1e-3, 1.0), min_size=size, max_size=size)


def logps_for(rewards_, beta, dtype=torch.float64, offset=-300.0):
    """(policy, opponent) log-prob vectors with β·(policy − opponent) ≈ the given rewards."""
    opponent = torch.tensor([offset - 7.0 * i for i in range(len(rewards_))], dtype=torch.float64)
    policy = opponent + torch.tensor(rewards_, dtype=torch.float64) / beta
    return policy.to(dtype), opponent.to(dtype)


def evaluate(fn, real, synthetic, *, beta, dtype=torch.float64, real_weights=None, synthetic_weights=None, **constants):
    """Run ``fn`` on inputs giving these rewards: (output, grad_real, grad_synthetic, four inputs)."""
    pr, orr = logps_for(real, beta, dtype)
    ps, os_ = logps_for(synthetic, beta, dtype, offset=-250.0)
    pr.requires_grad_()
    ps.requires_grad_()
    kwargs = dict(constants, beta=beta)
    if real_weights is not None:
        kwargs["real_weights"] = torch.tensor(real_weights, dtype=dtype)
    if synthetic_weights is not None:
        kwargs["synthetic_weights"] = torch.tensor(synthetic_weights, dtype=dtype)
    out = fn(pr, ps, orr, os_, **kwargs)
    grad_real, grad_synthetic = torch.autograd.grad(out.loss, (pr, ps))
    return out, grad_real, grad_synthetic, (pr.detach(), ps.detach(), orr, os_)


def mp_iris(inputs, alpha, beta, real_weights=None, synthetic_weights=None):
    """60-digit IRIS loss and weights for the exact values of the float64 inputs."""
    pr, ps, orr, os_ = (x.tolist() for x in inputs)
    with mpmath.workdps(MP_DIGITS):
        r = exact.exact_rewards(pr, orr, beta)
        rp = exact.exact_rewards(ps, os_, beta)
        pi = exact.exact_normalised(real_weights, len(r))
        rho = exact.exact_normalised(synthetic_weights, len(rp))
        loss, a, b = exact.iris_exact(r, rp, pi, rho, alpha)
        return float(loss), [float(x) for x in a], [float(x) for x in b]


# ------------------------------------------------------------------------------------------
# I1: weights = autograd gradient


def weights_match_gradient(out: ObjectiveOutput, grad_real, grad_synthetic, beta, rtol=1e-12, atol=1e-15) -> bool:
    """∂L/∂policy_real = −β·a and ∂L/∂policy_synthetic = +β·b, elementwise to rounding."""
    return bool(
        torch.allclose(grad_real, -beta * out.real_weights, rtol=rtol, atol=atol)
        and torch.allclose(grad_synthetic, beta * out.synthetic_weights, rtol=rtol, atol=atol)
    )


@st.composite
def objective_problems(draw):
    """An objective, its constants and a batch: any sizes, scales from 1e-3 to 50, weights or not."""
    name = draw(st.sampled_from(("iris", "spin", "space", "spif")))
    scale = draw(st.sampled_from((1e-3, 1.0, 25.0, 50.0)))
    real = [scale * x for x in draw(rewards(bound=1.0))]
    n_synthetic = len(real) if name == "spin" else draw(st.integers(1, 6))
    synthetic = [scale * x for x in draw(st.lists(st.floats(-1.0, 1.0), min_size=n_synthetic, max_size=n_synthetic))]
    constants = {"beta": draw(betas)}
    if name == "iris":
        constants["alpha"] = draw(alphas)
    elif name == "space":
        constants["mu"] = draw(st.sampled_from((1.0, 4.0)) | st.floats(0.1, 10.0))
    elif name == "spif":
        bound = draw(st.none() | st.floats(1e-4, 40.0))
        if bound is not None:
            # On the bound itself the clamp has no derivative; stay clear of it.
            assume(all(abs(abs(x) - bound) > 1e-9 * bound for x in real + synthetic))
        constants["reward_bound"] = bound
    if name == "spin":
        pair = draw(optional_weights(len(real)))
        weights = {} if pair is None else {"pair_weights": pair}
    else:
        weights = {"real_weights": draw(optional_weights(len(real))), "synthetic_weights": draw(optional_weights(n_synthetic))}
    return name, real, synthetic, constants, weights


def _evaluate_problem(fn, real, synthetic, constants, weights, dtype=torch.float64):
    """``evaluate`` for a drawn problem: weights (any of real/synthetic/pair) passed as tensors."""
    pr, orr = logps_for(real, constants["beta"], dtype)
    ps, os_ = logps_for(synthetic, constants["beta"], dtype, offset=-250.0)
    pr.requires_grad_()
    ps.requires_grad_()
    kwargs = dict(constants)
    kwargs.update({k: torch.tensor(v, dtype=dtype) for k, v in weights.items() if v is not None})
    out = fn(pr, ps, orr, os_, **kwargs)
    grad_real, grad_synthetic = torch.autograd.grad(out.loss, (pr, ps))
    return out, grad_real, grad_synthetic


@settings(max_examples=150)
@given(objective_problems())
def test_I1_weights_equal_autograd_gradient(problem):
    """I1: for every objective, ∂loss/∂policy_real_logps = −β·real_weights and ∂loss/∂policy_synthetic_logps = +β·synthetic_weights."""
    name, real, synthetic, constants, weights = problem
    out, grad_real, grad_synthetic = _evaluate_problem(get_objective(name), real, synthetic, constants, weights)
    assert weights_match_gradient(out, grad_real, grad_synthetic, constants["beta"]), (
        f"{name}: grad_real={grad_real.tolist()} vs -beta*a={(-constants['beta'] * out.real_weights).tolist()}; "
        f"grad_synthetic={grad_synthetic.tolist()} vs beta*b={(constants['beta'] * out.synthetic_weights).tolist()}"
    )


def iris_with_unnormalised_weights(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights=None, synthetic_weights=None):
    """Wrong variant: the right loss, but it reports π·e^{(α−1)r} and ρ·e^{αr'} without dividing by their sums."""
    out = iris_loss(pr, ps, orr, os_, alpha=alpha, beta=beta, real_weights=real_weights, synthetic_weights=synthetic_weights)
    n, m = out.real_rewards.numel(), out.synthetic_rewards.numel()
    a = torch.exp((alpha - 1.0) * out.real_rewards) / n
    b = torch.exp(alpha * out.synthetic_rewards) / m
    return ObjectiveOutput(out.loss, a, b, out.real_rewards, out.synthetic_rewards)


def test_I1_negative_control_unnormalised_weights_are_caught():
    """Negative control for I1: weights that are not renormalised differ from the autograd gradient."""
    fn = iris_with_unnormalised_weights
    out, grad_real, grad_synthetic = _evaluate_problem(fn, [0.5, -1.0, 2.0], [0.3, 1.5], {"alpha": 2.0, "beta": 0.1}, {})
    assert not weights_match_gradient(out, grad_real, grad_synthetic, 0.1)


# ------------------------------------------------------------------------------------------
# I2: finite, accurate, continuous


def iris_naive(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights=None, synthetic_weights=None):
    """Wrong variant: the textbook formula with exp/mean/log and the α = 1 limit only at α == 1 exactly."""
    r = beta * (pr - orr)
    rs = beta * (ps - os_)
    t = alpha - 1.0
    real_term = -(r.mean()) if t == 0 else -torch.log(torch.exp(t * r).mean()) / t
    loss = real_term + torch.log(torch.exp(alpha * rs).mean()) / alpha
    with torch.no_grad():
        a = torch.softmax(t * r, dim=0)
        b = torch.softmax(alpha * rs, dim=0)
    return ObjectiveOutput(loss, a, b, r.detach(), rs.detach())


def all_finite(out, grad_real, grad_synthetic) -> bool:
    tensors = (out.loss, out.real_weights, out.synthetic_weights, grad_real, grad_synthetic)
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@settings(max_examples=120)
@given(
    real=rewards(bound=1e4),
    synthetic=rewards(bound=1e4),
    alpha=alphas,
    beta=st.sampled_from((0.1, 1.0)),
    dtype=st.sampled_from((torch.float64, torch.float32)),
)
def test_I2_finite_for_huge_rewards(real, synthetic, alpha, beta, dtype):
    """I2: IRIS loss, weights and gradients are finite for rewards up to |r| = 1e4, any α in (0, 50], float64 and float32."""
    out, grad_real, grad_synthetic, _ = evaluate(iris_loss, real, synthetic, alpha=alpha, beta=beta, dtype=dtype)
    assert all_finite(out, grad_real, grad_synthetic)
    assert out.loss.dtype == dtype
    assert math.isclose(float(out.real_weights.sum()), 1.0, abs_tol=1e-5) and math.isclose(
        float(out.synthetic_weights.sum()), 1.0, abs_tol=1e-5
    )


@settings(max_examples=60)
@given(objective_problems(), st.sampled_from((torch.float64, torch.float32)), st.floats(100.0, 1e4))
def test_I2_other_objectives_finite_for_huge_rewards(problem, dtype, blow_up):
    """I2: SPIN, SPACE and SPIF (and IRIS) stay finite when the same rewards are scaled to |r| ~ 1e4."""
    name, real, synthetic, constants, weights = problem
    scale = blow_up / max(1e-12, max(abs(x) for x in real + synthetic))
    real = [x * scale for x in real]
    synthetic = [x * scale for x in synthetic]
    if constants.get("reward_bound") is not None:
        assume(all(abs(abs(x) - constants["reward_bound"]) > 1e-3 * constants["reward_bound"] for x in real + synthetic))
    out, grad_real, grad_synthetic = _evaluate_problem(get_objective(name), real, synthetic, constants, weights, dtype)
    assert all_finite(out, grad_real, grad_synthetic)


def test_I2_negative_control_naive_formula_overflows():
    """Negative control for I2 finiteness: exp without log-sum-exp overflows at |r| = 1e3."""
    out, grad_real, grad_synthetic, _ = evaluate(iris_naive, [1e3, -1e3], [1e3, 5.0], alpha=2.0, beta=1.0)
    assert not all_finite(out, grad_real, grad_synthetic)


def agrees_with_mpmath(fn, real, synthetic, alpha, beta, real_weights=None, synthetic_weights=None, tol=1e-10) -> bool:
    """Loss and weights within tol·max(1, max|r|) of the 60-digit values of the same float64 inputs."""
    out, _, _, inputs = evaluate(
        fn, real, synthetic, alpha=alpha, beta=beta, real_weights=real_weights, synthetic_weights=synthetic_weights
    )
    loss, a, b = mp_iris(inputs, alpha, beta, real_weights, synthetic_weights)
    scale = max([1.0] + [abs(x) for x in real + synthetic])
    weight_error = max(
        max(abs(x - y) for x, y in zip(out.real_weights.tolist(), a)),
        max(abs(x - y) for x, y in zip(out.synthetic_weights.tolist(), b)),
    )
    return abs(out.loss.item() - loss) <= tol * scale and weight_error <= tol


@settings(max_examples=150)
@given(st.data(), rewards(bound=50.0), rewards(bound=50.0), alphas, betas)
def test_I2_agrees_with_60_digit_arithmetic(data, real, synthetic, alpha, beta):
    """I2: float64 IRIS loss and weights agree with 60-digit mpmath to 1e-10 (relative to max(1, max|r|)) for every α in (0, 50]."""
    real_weights = data.draw(optional_weights(len(real)))
    synthetic_weights = data.draw(optional_weights(len(synthetic)))
    assert agrees_with_mpmath(iris_loss, real, synthetic, alpha, beta, real_weights, synthetic_weights)


@pytest.mark.parametrize("alpha", [1.0 - 5e-3, 1.0 + 5e-3, 1.0 - 1e-9, 1.0 + 1e-9])
def test_I2_agrees_with_60_digit_arithmetic_at_the_named_orders(alpha):
    """I2: at α = 1 ± 5e-3 and 1 ± 1e-9 the float64 loss matches 60-digit arithmetic on rewards with spread."""
    assert agrees_with_mpmath(iris_loss, [3.0, -2.0, 0.5, 7.0], [-4.0, 1.0, 6.0], alpha, 1.0, [0.1, 0.2, 0.3, 0.4], None)


def test_I2_negative_control_coarse_series_is_caught():
    """Negative control for I2 accuracy: a first-order series used for |α − 1| < 1e-2 misses by far more than 1e-10 at α = 1 ± 5e-3."""
    for alpha in (1.0 - 5e-3, 1.0 + 5e-3):
        assert not agrees_with_mpmath(iris_coarse_series, [3.0, -2.0, 0.5, 7.0], [-4.0, 1.0, 6.0], alpha, 1.0)


def test_I2_negative_control_naive_formula_loses_digits_near_one():
    """Negative control for I2 accuracy: dividing a plain log-sum-exp by α − 1 = 1e-9 loses about seven digits."""
    assert not agrees_with_mpmath(iris_naive, [3.0, -2.0, 0.5, 7.0], [-4.0, 1.0, 6.0], 1.0 + 1e-9, 1.0)


CONTINUITY_REAL = [3.0, -2.0, 0.5, 7.0, -0.25]
CONTINUITY_SYNTHETIC = [-4.0, 1.0, 6.0, 2.5]


def continuity_defects(fn) -> list[str]:
    """Orders on the paths α → 1 (both sides) and α → 0 where ``fn`` is off the 60-digit curve or off its limit."""
    defects = []
    inputs = evaluate(fn, CONTINUITY_REAL, CONTINUITY_SYNTHETIC, alpha=1.0, beta=1.0)[3]
    limit_one = mp_iris(inputs, 1.0, 1.0)[0]  # the Donsker–Varadhan form, exact at α = 1
    with mpmath.workdps(MP_DIGITS):
        r = exact.exact_rewards(inputs[0].tolist(), inputs[2].tolist(), 1.0)
        rp = exact.exact_rewards(inputs[1].tolist(), inputs[3].tolist(), 1.0)
        # α → 0: L → log E_π e^{−r} + E_ρ r' (reverse KL form, THEORY.md §2).
        limit_zero = float(
            mpmath.log(mpmath.fsum(mpmath.exp(-x) for x in r) / len(r)) + mpmath.fsum(rp) / len(rp)
        )
    paths = [(1.0 + s * 10.0**-k, limit_one) for k in range(1, 16) for s in (-1.0, 1.0)]
    paths += [(10.0**-k, limit_zero) for k in range(1, 16)]
    for alpha, limit in paths:
        out = evaluate(fn, CONTINUITY_REAL, CONTINUITY_SYNTHETIC, alpha=alpha, beta=1.0)[0]
        value = out.loss.item()
        true_value = mp_iris(inputs, alpha, 1.0)[0]
        if not math.isfinite(value) or abs(value - true_value) > 1e-10 * 7.0:
            defects.append(f"alpha={alpha!r}: {value!r} vs 60-digit {true_value!r}")
        # The distance to the limit may not exceed the true distance by more than the tolerance.
        if abs(value - limit) > abs(true_value - limit) + 1e-10 * 7.0:
            defects.append(f"alpha={alpha!r}: {value!r} is farther from the limit {limit!r} than {true_value!r}")
    return defects


def test_I2_continuous_through_one_and_towards_zero():
    """I2: along α = 1 ± 10^-k and α = 10^-k (k = 1..15) the loss follows the 60-digit curve into its limits (DV at 1, reverse KL at 0)."""
    assert continuity_defects(iris_loss) == []


@pytest.mark.parametrize("wrong", [iris_coarse_series, iris_naive], ids=["coarse_series", "naive"])
def test_I2_negative_control_continuity(wrong):
    """Negative control for I2 continuity: the coarse series and the naive formula leave the curve on the way to α = 1."""
    assert continuity_defects(wrong) != []


@settings(max_examples=80)
@given(rewards(bound=50.0), rewards(bound=50.0), alphas, st.sampled_from((0.1, 1.0)))
def test_I2_float32_inputs_work(real, synthetic, alpha, beta):
    """I2: float32 inputs give a float32 loss and weights within 1e-4·max(1, max|r|) of float64 on the same inputs."""
    close, out32 = float32_close_to_float64(iris_loss, real, synthetic, alpha, beta)
    assert out32.loss.dtype == torch.float32 and out32.real_weights.dtype == torch.float32
    assert close


def float32_close_to_float64(fn, real, synthetic, alpha, beta, tol=1e-4):
    out32, g32r, g32s, inputs32 = evaluate(fn, real, synthetic, alpha=alpha, beta=beta, dtype=torch.float32)
    # The same float32-rounded inputs in float64: only the arithmetic differs.
    pr, ps, orr, os_ = (x.to(torch.float64) for x in inputs32)
    pr.requires_grad_()
    ps.requires_grad_()
    out64 = fn(pr, ps, orr, os_, alpha=alpha, beta=beta)
    g64r, g64s = torch.autograd.grad(out64.loss, (pr, ps))
    scale = max([1.0] + [abs(x) for x in real + synthetic])
    close = (
        all_finite(out32, g32r, g32s)
        and abs(out32.loss.item() - out64.loss.item()) <= tol * scale
        and torch.allclose(g32r.double(), g64r, atol=tol, rtol=0)
        and torch.allclose(g32s.double(), g64s, atol=tol, rtol=0)
    )
    return close, out32


def test_I2_negative_control_float32_naive_formula():
    """Negative control for the float32 check: in float32 the plain log-sum-exp divided by α − 1 = 1e-6 loses every digit."""
    close, _ = float32_close_to_float64(iris_naive, [3.0, -2.0, 0.5], [-4.0, 1.0, 6.0], 1.0 + 1e-6, 1.0)
    assert not close


# ------------------------------------------------------------------------------------------
# I3: exact gradient accumulation


def _linear_problem(seed, n, features=4):
    """A tiny 'model' producing sequence log-probs: a linear layer on fixed per-sample features."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # Linear's default init must not consume the global RNG
        model = torch.nn.Linear(features, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, features, generator=gen, dtype=torch.float64))
        model.bias.fill_(-40.0)
    x_real = torch.randn(n, features, generator=gen, dtype=torch.float64)
    x_synthetic = torch.randn(n, features, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        # The opponent is the model before a few updates: log-probs a few nats away.
        opponent_real = model(x_real).squeeze(-1) + 3.0 * torch.randn(n, generator=gen, dtype=torch.float64)
        opponent_synthetic = model(x_synthetic).squeeze(-1) + 3.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    return model, x_real, x_synthetic, opponent_real, opponent_synthetic


def _gradient(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def big_batch_gradient(fn, problem, constants):
    model, x_real, x_synthetic, o_real, o_synthetic = problem
    model.zero_grad()
    out = fn(model(x_real).squeeze(-1), model(x_synthetic).squeeze(-1), o_real, o_synthetic, **constants)
    out.loss.backward()
    return _gradient(model)


def accumulated_surrogate_gradient(fn, problem, constants, micro_batches):
    """The exact recipe: global weights first (no graph), then weighted_surrogate per micro-batch."""
    model, x_real, x_synthetic, o_real, o_synthetic = problem
    model.zero_grad()
    with torch.no_grad():
        out = fn(model(x_real).squeeze(-1), model(x_synthetic).squeeze(-1), o_real, o_synthetic, **constants)
    for idx in torch.arange(x_real.shape[0]).tensor_split(micro_batches):
        surrogate = weighted_surrogate(
            model(x_real[idx]).squeeze(-1),
            model(x_synthetic[idx]).squeeze(-1),
            out.real_weights[idx],
            out.synthetic_weights[idx],
            constants["beta"],
        )
        surrogate.backward()
    return _gradient(model)


def accumulated_local_loss_gradient(fn, problem, constants, micro_batches):
    """The tempting wrong recipe: the objective on each micro-batch alone, averaged."""
    model, x_real, x_synthetic, o_real, o_synthetic = problem
    model.zero_grad()
    for idx in torch.arange(x_real.shape[0]).tensor_split(micro_batches):
        out = fn(model(x_real[idx]).squeeze(-1), model(x_synthetic[idx]).squeeze(-1), o_real[idx], o_synthetic[idx], **constants)
        (out.loss / micro_batches).backward()
    return _gradient(model)


@st.composite
def accumulation_setups(draw):
    name = draw(st.sampled_from(("iris", "spin", "space", "spif")))
    constants = {"beta": draw(st.sampled_from((0.1, 1.0)))}
    if name == "iris":
        constants["alpha"] = draw(alphas)
    elif name == "space":
        constants["mu"] = draw(st.sampled_from((1.0, 4.0)))
    elif name == "spif":
        constants["reward_bound"] = draw(st.sampled_from((None, 50.0)))
    micro_batches = draw(st.sampled_from((2, 3, 4)))
    n = micro_batches * draw(st.integers(1, 3)) + draw(st.integers(0, micro_batches - 1))
    return name, constants, n, micro_batches, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60)
@given(accumulation_setups())
def test_I3_accumulated_surrogate_equals_big_batch_gradient(setup):
    """I3: global weights + weighted_surrogate back-propagated per micro-batch give exactly the big-batch gradient, for every objective."""
    name, constants, n, micro_batches, seed = setup
    fn = get_objective(name)
    problem = _linear_problem(seed, n)
    expected = big_batch_gradient(fn, problem, constants)
    actual = accumulated_surrogate_gradient(fn, problem, constants, micro_batches)
    assert torch.allclose(actual, expected, rtol=1e-12, atol=1e-13), (actual - expected).abs().max()


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_I3_negative_control_micro_batch_local_iris_is_not_exact(alpha):
    """Negative control for I3: IRIS losses computed per micro-batch and averaged do not give the big-batch gradient."""
    constants = {"alpha": alpha, "beta": 1.0}
    problem = _linear_problem(seed=7, n=8)
    expected = big_batch_gradient(iris_loss, problem, constants)
    local = accumulated_local_loss_gradient(iris_loss, problem, constants, micro_batches=4)
    exact_recipe = accumulated_surrogate_gradient(iris_loss, problem, constants, micro_batches=4)
    assert torch.allclose(exact_recipe, expected, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(local, expected, rtol=1e-3, atol=1e-6)
