"""Shared set-up of the theory suite: hypothesis profile, offline hubs, exact population helpers.

Hypothesis profile "theory" (loaded here, for every file under theory_tests/):
derandomize=True makes every run draw the same examples, so a CI failure reproduces
exactly; deadline=None because timing is not what these tests measure. Individual tests set
`max_examples` to keep `pytest theory_tests` within about two minutes on two busy cores.
`IRIS_HYPOTHESIS_PROFILE=theory-thorough` draws fresh random examples on every run instead, and
`IRIS_EXAMPLES_SCALE=10` multiplies the example counts of the tests that use `examples()`.

The helpers below build EXACT population objectives: every (prompt, response) cell of a finite
table appears once among the annotated and once among the synthetic samples, with the
probability weights p(x)·p_data(y|x) and p(x)·p_θt(y|x) (THEORY.md §1). No Monte Carlo.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "theory",
    derandomize=True,
    database=None,  # no replay of examples saved by earlier runs: every run is the same run
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "theory-thorough",
    derandomize=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("IRIS_HYPOTHESIS_PROFILE", "theory"))

_EXAMPLES_SCALE = max(1, int(os.environ.get("IRIS_EXAMPLES_SCALE", "1")))


def examples(count: int) -> int:
    """A test's hypothesis example count, times IRIS_EXAMPLES_SCALE (default 1)."""
    return count * _EXAMPLES_SCALE


# Smallest probability the random distributions use where the claim needs a finite log-ratio
# log(q/p) everywhere (optimal critics); zeros are exercised separately in test_divergences.
MIN_PROBABILITY = 1e-3


@st.composite
def distributions(draw, size, min_probability=MIN_PROBABILITY):
    """A float64 probability vector of `size` entries, each at least `min_probability`."""
    raw = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=size, max_size=size)), dtype=np.float64)
    if raw.sum() == 0.0:
        raw = np.ones(size)
    raw = raw / raw.sum()
    mixed = min_probability + (1.0 - size * min_probability) * raw
    return mixed / mixed.sum()


@st.composite
def distribution_pairs(draw, min_size=2, max_size=6, min_probability=MIN_PROBABILITY):
    """(q, p): two probability vectors on a common finite set, q = p_data, p = p_θt."""
    size = draw(st.integers(min_size, max_size))
    return draw(distributions(size, min_probability)), draw(distributions(size, min_probability))


@st.composite
def reward_vectors(draw, min_size=1, max_size=8, bound=5.0):
    """A float64 vector of rewards in [−bound, bound]."""
    values = draw(st.lists(st.floats(-bound, bound), min_size=min_size, max_size=max_size))
    return np.array(values, dtype=np.float64)


def t64(x) -> torch.Tensor:
    """A float64 torch tensor copy of `x`."""
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64).clone()


def critic_inputs(real_rewards, synthetic_rewards, beta):
    """The four log-prob vectors that give the requested rewards r = β·(policy − opponent).

    Opponent log-probs are 0 and the policy's are r/β (with requires_grad, so autograd gives
    ∂L/∂r = (1/β)·∂L/∂policy). Only the rewards enter the objectives, which is what lets the
    tests set the critic freely.
    """
    policy_real = (t64(real_rewards) / beta).requires_grad_(True)
    policy_synthetic = (t64(synthetic_rewards) / beta).requires_grad_(True)
    return policy_real, policy_synthetic, torch.zeros_like(policy_real), torch.zeros_like(policy_synthetic)


def evaluate_critic(loss_fn, real_rewards, synthetic_rewards, *, beta=1.0, real_weights=None, synthetic_weights=None, **constants):
    """Loss value and autograd gradients w.r.t. the rewards, for a critic given on the samples.

    Returns (loss float, ∂L/∂r on the annotated samples, ∂L/∂r' on the synthetic samples,
    the ObjectiveOutput). Weights are passed as given: the objectives must renormalise them.
    """
    pr, ps, orr, os_ = critic_inputs(real_rewards, synthetic_rewards, beta)
    kwargs = dict(constants, beta=beta)
    if real_weights is not None:
        kwargs["real_weights"] = t64(real_weights)
    if synthetic_weights is not None:
        kwargs["synthetic_weights"] = t64(synthetic_weights)
    out = loss_fn(pr, ps, orr, os_, **kwargs)
    grad_real, grad_synthetic = torch.autograd.grad(out.loss, (pr, ps), allow_unused=True)
    grad_real = torch.zeros_like(pr) if grad_real is None else grad_real
    grad_synthetic = torch.zeros_like(ps) if grad_synthetic is None else grad_synthetic
    return float(out.loss.detach()), (grad_real / beta).numpy(), (grad_synthetic / beta).numpy(), out


def population_critic_value(loss_fn, q, p, critic, *, real_mass=1.0, synthetic_mass=1.0, **constants):
    """L at critic g on the population: annotated cells weighted by q, synthetic cells by p.

    The same function g of the cell is the reward on both sides. Returns (loss, ∂L/∂g) where
    ∂L/∂g = ∂L/∂r + ∂L/∂r' cell by cell. `real_mass`/`synthetic_mass` scale the weight
    vectors (e.g. prompt counts instead of probabilities); the loss must not change.
    """
    value, grad_real, grad_synthetic, _ = evaluate_critic(
        loss_fn,
        critic,
        critic,
        real_weights=np.asarray(q) * real_mass,
        synthetic_weights=np.asarray(p) * synthetic_mass,
        **constants,
    )
    return value, grad_real + grad_synthetic
