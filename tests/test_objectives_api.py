"""Engineering checks of the objectives' public API: inputs, dtypes, errors, lookup.

The mathematics is verified in theory_tests/; here: what a caller can pass and get back.
"""

import math

import pytest
import torch

from iris_ref.objectives import (
    OBJECTIVES,
    ObjectiveOutput,
    get_objective,
    iris_loss,
    space_loss,
    spif_loss,
    spin_loss,
    tilted_mean,
    weighted_surrogate,
)

CONSTANTS = {"iris": {"alpha": 0.7}, "spin": {}, "space": {"mu": 2.0}, "spif": {"reward_bound": 5.0}}


def four(n=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-10 * torch.rand(n, generator=g)).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_lookup_by_name_and_output_fields(name):
    """Each registered objective returns a 0-dim loss with detached weights and rewards."""
    fn = get_objective(name)
    pr, ps, orr, os_ = four()
    pr.requires_grad_(True)
    out = fn(pr, ps, orr, os_, **CONSTANTS[name])
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.dim() == 0 and out.loss.requires_grad
    for t in (out.real_weights, out.synthetic_weights, out.real_rewards, out.synthetic_rewards):
        assert t.shape == (4,) and not t.requires_grad


def test_unknown_objective_is_rejected():
    """An unknown name raises ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="unknown objective 'dpo'.*iris"):
        get_objective("dpo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_low_precision_inputs_compute_in_float32(name, dtype):
    """bf16/fp16/fp32 inputs give float32 loss arithmetic close to the float64 result."""
    inputs64 = four(dtype=torch.float64)
    out = get_objective(name)(*[x.to(dtype) for x in inputs64], **CONSTANTS[name])
    exact = get_objective(name)(*[x.to(dtype).to(torch.float64) for x in inputs64], **CONSTANTS[name])
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(exact.loss.item(), rel=1e-5, abs=1e-6)


def test_opponent_never_receives_gradient():
    """The opponent is frozen: its log-probs get no gradient even if they require it."""
    pr, ps, orr, os_ = four(dtype=torch.float64)
    orr.requires_grad_(True)
    pr.requires_grad_(True)
    iris_loss(pr, ps, orr, os_, alpha=2.0).loss.backward()
    assert orr.grad is None and pr.grad is not None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: iris_loss(*x, alpha=0.0), "alpha must be"),
        (lambda x: iris_loss(*x, alpha=-1.0), "alpha must be"),
        (lambda x: iris_loss(*x, alpha=float("nan")), "alpha must be"),
        (lambda x: iris_loss(*x, alpha=1.0, beta=0.0), "beta must be"),
        (lambda x: space_loss(*x, mu=0.0), "mu must be"),
        (lambda x: spif_loss(*x, reward_bound=-1.0), "reward_bound must be"),
        (lambda x: iris_loss(x[0], x[1], x[2][:3], x[3], alpha=1.0), "differ in length"),
        (lambda x: spin_loss(x[0], x[1][:3], x[2], x[3][:3]), "lengths differ"),
        (lambda x: iris_loss(x[0][None], x[1], x[2][None], x[3], alpha=1.0), "must be 1-D"),
        (lambda x: iris_loss(*x, alpha=1.0, real_weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), "negative"),
        (lambda x: iris_loss(*x, alpha=1.0, real_weights=torch.ones(3)), "length 4"),
        (lambda x: iris_loss(*x, alpha=1.0, synthetic_weights=torch.ones(2, 2)), "1-D tensor of length 4"),
        (lambda x: iris_loss(*x, alpha=1.0, synthetic_weights=torch.zeros(4)), "sums to zero"),
        (lambda x: spin_loss(*x, pair_weights=torch.tensor([1.0, float("inf"), 1.0, 1.0])), "non-finite"),
        (lambda x: iris_loss(x[0].long(), x[1], x[2], x[3], alpha=1.0), "floating-point"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    """Bad arguments raise ValueError with a message naming the problem."""
    with pytest.raises(ValueError, match=message):
        call(four())


def test_weights_are_renormalised():
    """Scaling the probability weights by any positive constant changes nothing."""
    pr, ps, orr, os_ = four(dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    base = iris_loss(pr, ps, orr, os_, alpha=1 + 1e-9, real_weights=w, synthetic_weights=w)
    scaled = iris_loss(pr, ps, orr, os_, alpha=1 + 1e-9, real_weights=7 * w, synthetic_weights=w * (1 - 1e-16))
    assert scaled.loss.item() == base.loss.item() or math.isclose(scaled.loss.item(), base.loss.item(), rel_tol=1e-14)


def test_tilted_mean_limits():
    """T_0 is the mean, T_t → max as t → ∞ and → min as t → −∞, and T_t is non-decreasing in t."""
    z = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    assert tilted_mean(z, 0.0).item() == pytest.approx(z.mean().item())
    assert tilted_mean(z, 1e4).item() == pytest.approx(2.0, abs=1e-3)
    assert tilted_mean(z, -1e4).item() == pytest.approx(-1.0, abs=1e-3)
    values = [tilted_mean(z, t).item() for t in (-5, -1, -1e-12, 0, 1e-12, 1, 5)]
    assert values == sorted(values)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_weighted_surrogate_reproduces_the_gradient(name):
    """The surrogate with the returned weights has the objective's gradient."""
    pr, ps, orr, os_ = four(dtype=torch.float64)
    pr.requires_grad_(True)
    ps.requires_grad_(True)
    out = get_objective(name)(pr, ps, orr, os_, beta=0.5, **CONSTANTS[name])
    expected = torch.autograd.grad(out.loss, [pr, ps])
    surrogate = weighted_surrogate(pr, ps, out.real_weights, out.synthetic_weights, 0.5)
    got = torch.autograd.grad(surrogate, [pr, ps])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_weighted_surrogate_rejects_mismatched_weights():
    """Weights of the wrong shape are an error, not a silent broadcast."""
    pr, ps, _, _ = four()
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_surrogate(pr, ps, torch.ones(3), torch.ones(4), 0.1)
