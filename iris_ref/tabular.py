"""Exact population self-play on tabular softmax policies: the theory's laboratory.

A `TabularTask` is a handful of prompts x with probabilities p(x), each with a finite set of
responses and a data distribution p_data(·|x) over them. A policy is one free logit per
(prompt, response) cell, p_θ(·|x) = softmax of that prompt's logits. Nothing is sampled: every
cell appears once among the annotated samples with weight p(x)·p_data(y|x) and once among the
synthetic samples with weight p(x)·p_θt(y|x), so an objective from `iris_ref.objectives`,
called with these probability weights, IS the population objective of THEORY.md §1-2. SPIN,
being pairwise, gets every ordered pair (y, y') of one prompt with weight
p(x)·p_data(y|x)·p_θt(y'|x).

One self-play iteration (THEORY.md §5) minimises the objective over θ, starting from the
frozen opponent θt, either by K plain gradient steps of size η or to convergence (damped
Newton with exact Hessians, to a gradient tolerance; L-BFGS stalls on these ill-conditioned
tables, see `_newton`). The logits of one prompt
can be shifted together without changing the policy; the optimiser does not care, and all
reported quantities are functions of the policy only. Shifts of the REWARDS are another matter:
IRIS is invariant to one constant added to every reward (T_{1−α}[−r−c] + T_α[r+c] = L_α), not
to a constant per prompt (SPIN, being pairwise within a prompt, is). With β = 1 the optimal
critic log(p_data/p_θt) is reachable, so the minimiser is p_data for every α; with β ≠ 1 and
several prompts it is not reachable up to one global constant, and the minimiser depends on α
(THEORY.md R6).

The adaptive order schedule needs the gap between the opponent's scores of annotated and
synthetic responses. Its exact population analogue is used: the score of a response is its
log-probability under the opponent (a tabular response is one token, so the per-token score
is the log-probability), annotated responses are distributed as p(x)·p_data(y|x), synthetic
ones as p(x)·p_θt(y|x), pooled over prompts as in the pipeline, and
AUC = P(s(y') > s(y)) + ½·P(s(y') = s(y)) is summed exactly over all pairs of cells.

A misspecified class (THEORY.md F3): `LinearPolicyClass` holds log-linear policies
p_θ(y|x) = softmax(Φ_x θ) with one parameter vector θ ∈ R^d SHARED by all prompts (features
centred per prompt, full column rank, so θ is identifiable with no gauge to fix). With d below
the tabular class's Σ_x (K_x − 1) free logits it cannot represent p_data in general;
`misspecified_class()` is the one of the tests and the script (2 prompts, 5 and 6 responses,
d = 3). `ml_projection` is the SFT solution argmin_θ KL(p_data‖p_Φθ) (Newton on the strictly
convex cross-entropy), `minimise_in_class` / `self_play_in_class` the exact population
iteration θ_{t+1} = argmin_θ L(θ; θt) in the class. At θ = θt every objective's gradient is
c·β·∇KL(p_data‖p_θ) (`sft_gradient`), so a fixed point of the iteration is the projection. Near
it one exact iteration is a preconditioned Newton step on the SFT loss,
θ_{t+1} − θ* ≈ (I − (1/β)·M⁻¹F)(θt − θ*), with F the Fisher information at θ*, S the data's
second moment of the model-centred features and M = a·F + b·S (IRIS: a = α, b = 1 − α; SPIN:
½, ½; SPACE: μ/(1+μ), 1/(1+μ); SPIF: ½, 0): `linearised_iteration_eigenvalues`, checked against
the finite-difference Jacobian of the exact iteration (`iteration_jacobian`). Its eigenvalues
1 − 1/(β(a + bλ)), λ the eigenvalues of F⁻¹S (`spread_ratios`; all 1 when realizable), say
which orders and β converge (`stable_orders`): for the default class λ_max = 1.1376 and the
projection repels for α > 4.6335 at β = 1 (a 2-cycle at α = 5), for β ≤ ½ at α = 1.

`python -m iris_ref.tabular --help` runs the comparison of IRIS (adaptive and fixed α), SPIN,
SPACE and SPIF from a common start and writes a plot; then the same methods, iterated to
convergence, in the misspecified class, and a scan of large orders there.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from iris_ref import divergences
from iris_ref.objectives import ObjectiveOutput, get_objective, spin_loss
from iris_ref.schedule import AlphaSchedule

__all__ = [
    "TabularTask",
    "policy_log_probs",
    "population_loss",
    "exact_auc_gap",
    "exact_mean_gap",
    "kl_to_data",
    "tv_to_data",
    "minimise",
    "IterationRecord",
    "self_play",
    "LinearPolicyClass",
    "misspecified_class",
    "sft_gradient",
    "ml_projection",
    "minimise_in_class",
    "self_play_in_class",
    "iteration_jacobian",
    "spread_ratios",
    "linearised_iteration_eigenvalues",
    "stable_orders",
    "attractor_period",
    "main",
]

Objective = Union[str, Callable[..., ObjectiveOutput]]


@dataclass(frozen=True)
class TabularTask:
    """Prompts with finite response sets and a data distribution per prompt.

    p_data: one 1-D float64 tensor per prompt (its responses' data probabilities; zeros allowed,
    sizes may differ). prompt_probs: p(x), 1-D float64, one entry per prompt.
    Both are validated and renormalised exactly.
    """

    p_data: tuple
    prompt_probs: Tensor

    def __post_init__(self):
        if len(self.p_data) == 0:
            raise ValueError("a tabular task needs at least one prompt")
        rows = tuple(_probability_vector(row, f"p_data[{i}]") for i, row in enumerate(self.p_data))
        if any(row.numel() < 2 for row in rows):
            raise ValueError("every prompt needs at least two responses")
        prompts = _probability_vector(self.prompt_probs, "prompt_probs")
        if prompts.numel() != len(rows):
            raise ValueError(f"prompt_probs has {prompts.numel()} entries for {len(rows)} prompts")
        object.__setattr__(self, "p_data", rows)
        object.__setattr__(self, "prompt_probs", prompts)

    @classmethod
    def random(cls, sizes: Sequence[int], seed: int = 0, concentration: float = 1.0) -> "TabularTask":
        """Dirichlet(concentration) data distributions and prompt probabilities, seeded."""
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        rng = np.random.default_rng(seed)
        rows = tuple(torch.tensor(rng.dirichlet(np.full(int(n), concentration))) for n in sizes)
        prompts = torch.tensor(rng.dirichlet(np.full(len(rows), 2.0)))
        return cls(rows, prompts)

    @property
    def sizes(self) -> list:
        return [row.numel() for row in self.p_data]

    @property
    def num_cells(self) -> int:
        return sum(self.sizes)

    def joint_data(self) -> Tensor:
        """p(x)·p_data(y|x) over all cells, flattened prompt by prompt."""
        return torch.cat([px * row for px, row in zip(self.prompt_probs, self.p_data)])

    def data_logits(self) -> Tensor:
        """Logits whose policy is p_data (−inf-free: zeros of p_data become very negative logits)."""
        return torch.cat([torch.log(row.clamp_min(1e-300)) for row in self.p_data])

    def random_logits(self, seed: int = 0, scale: float = 1.0) -> Tensor:
        """Gaussian logits, seeded: a random policy."""
        generator = torch.Generator().manual_seed(seed)
        return scale * torch.randn(self.num_cells, generator=generator, dtype=torch.float64)


def _probability_vector(values, name: str) -> Tensor:
    x = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1).clone()
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    total = float(x.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, sums to {total}")
    return x / x.sum()


def _check_logits(task: TabularTask, logits: Tensor, name: str) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dtype != torch.float64 or logits.dim() != 1:
        raise ValueError(f"{name} must be a 1-D float64 tensor")
    if logits.numel() != task.num_cells:
        raise ValueError(f"{name} has {logits.numel()} entries, the task has {task.num_cells} cells")
    return logits


def policy_log_probs(task: TabularTask, logits: Tensor) -> list:
    """log p_θ(·|x) for every prompt: the log-softmax of that prompt's logits (differentiable)."""
    _check_logits(task, logits, "logits")
    return [torch.log_softmax(chunk, dim=0) for chunk in torch.split(logits, task.sizes)]


def _is_paired(objective: Objective) -> bool:
    return objective == "spin" or objective is spin_loss


def population_loss(
    task: TabularTask,
    logits: Tensor,
    opponent_logits: Tensor,
    objective: Objective = "iris",
    *,
    paired: Optional[bool] = None,
    **constants,
) -> ObjectiveOutput:
    """The exact population objective L(θ; θt) through the probability weights.

    objective: a name for `get_objective` or a function with the objectives' signature (for
    example a mutant of the theory tests). paired: whether it is a pairwise objective taking
    `pair_weights` (SPIN); inferred for "spin"/`spin_loss`. constants: alpha, beta, mu, ...
    """
    fn = get_objective(objective) if isinstance(objective, str) else objective
    paired = _is_paired(objective) if paired is None else paired
    policy = policy_log_probs(task, logits)
    with torch.no_grad():
        opponent = policy_log_probs(task, opponent_logits)
    opponent_probs = [torch.exp(row) for row in opponent]
    if not paired:
        real_weights = task.joint_data()
        synthetic_weights = torch.cat([px * row for px, row in zip(task.prompt_probs, opponent_probs)])
        flat_policy = torch.cat(policy)
        flat_opponent = torch.cat(opponent)
        return fn(
            flat_policy,
            flat_policy,
            flat_opponent,
            flat_opponent,
            real_weights=real_weights,
            synthetic_weights=synthetic_weights,
            **constants,
        )
    # Every ordered pair (y, y') of one prompt: y annotated, y' synthetic.
    parts = {"pr": [], "ps": [], "or": [], "os": [], "w": []}
    for px, pol, opp, data, opp_p in zip(task.prompt_probs, policy, opponent, task.p_data, opponent_probs):
        n = pol.numel()
        parts["pr"].append(pol.repeat_interleave(n))
        parts["or"].append(opp.repeat_interleave(n))
        parts["ps"].append(pol.repeat(n))
        parts["os"].append(opp.repeat(n))
        parts["w"].append(px * torch.outer(data, opp_p).reshape(-1))
    return fn(
        torch.cat(parts["pr"]),
        torch.cat(parts["ps"]),
        torch.cat(parts["or"]),
        torch.cat(parts["os"]),
        pair_weights=torch.cat(parts["w"]),
        **constants,
    )


def _joint(task: TabularTask, logits: Tensor) -> Tensor:
    return torch.cat([px * torch.exp(row) for px, row in zip(task.prompt_probs, policy_log_probs(task, logits))])


def kl_to_data(task: TabularTask, logits: Tensor) -> float:
    """Σ_x p(x)·KL(p_data(·|x) ‖ p_θ(·|x)) = KL between the joint distributions over cells."""
    with torch.no_grad():
        return float(divergences.kl(task.joint_data(), _joint(task, logits)))


def tv_to_data(task: TabularTask, logits: Tensor) -> float:
    """Σ_x p(x)·TV(p_data(·|x), p_θ(·|x)) = TV between the joint distributions over cells."""
    with torch.no_grad():
        return float(divergences.total_variation(task.joint_data(), _joint(task, logits)))


def exact_auc_gap(task: TabularTask, opponent_logits: Tensor) -> float:
    """|2·AUC − 1| of the opponent's scores, annotated ~ p(x)p_data(y|x), synthetic ~ p(x)p_θt(y|x), exactly."""
    with torch.no_grad():
        scores = torch.cat(policy_log_probs(task, opponent_logits))
        real = task.joint_data()
        synthetic = _joint(task, opponent_logits)
        above = (scores[None, :] > scores[:, None]).to(torch.float64)  # [i, j]: s(y'_j) > s(y_i)
        ties = (scores[None, :] == scores[:, None]).to(torch.float64)
        auc = float(real @ (above + 0.5 * ties) @ synthetic)
    return min(1.0, abs(2.0 * auc - 1.0))


def exact_mean_gap(task: TabularTask, opponent_logits: Tensor) -> float:
    """E_synthetic[s] − E_annotated[s] of the opponent's log-probability scores, exactly."""
    with torch.no_grad():
        scores = torch.cat(policy_log_probs(task, opponent_logits))
        return float((_joint(task, opponent_logits) - task.joint_data()) @ scores)


def minimise(
    task: TabularTask,
    opponent_logits: Tensor,
    objective: Objective = "iris",
    *,
    start: Optional[Tensor] = None,
    steps: Optional[int] = None,
    step_size: float = 1.0,
    tolerance: float = 1e-10,
    max_newton_steps: int = 200,
    paired: Optional[bool] = None,
    **constants,
) -> Tensor:
    """Minimise the population objective over the logits, from `start` (default: the opponent).

    steps=K: K plain gradient-descent steps θ ← θ − η∇L with η = step_size.
    steps=None: to convergence: saddle-free damped Newton with exact Hessians and a trust
    region (see `_newton`), until the gradient's max-norm is below `tolerance`, no step makes
    progress, or `max_newton_steps` steps were taken.
    Returns the new logits (detached).
    """
    _check_logits(task, opponent_logits, "opponent_logits")
    opponent_logits = opponent_logits.detach()
    theta = (opponent_logits if start is None else _check_logits(task, start, "start")).detach().clone()
    theta.requires_grad_(True)

    def loss_at(t):
        return population_loss(task, t, opponent_logits, objective, paired=paired, **constants).loss

    if steps is not None:
        if steps < 0 or step_size <= 0:
            raise ValueError(f"need steps >= 0 and step_size > 0, got {steps}, {step_size}")
        for _ in range(int(steps)):
            (grad,) = torch.autograd.grad(loss_at(theta), theta)
            with torch.no_grad():
                theta -= step_size * grad
        return theta.detach()

    return _newton(loss_at, theta.detach(), tolerance, max_newton_steps)


def _newton(loss_at, theta: Tensor, tolerance: float, max_steps: int, max_logit_step: float = 1.0) -> Tensor:
    """Saddle-free damped Newton steps until the gradient's max-norm is below `tolerance`.

    Why not L-BFGS: it crawls where the population weights of some cells are tiny (the Hessian
    at the optimum is diag(w) − wwᵀ in reward space with w ∝ q^α p^{1−α}, whose condition
    number reaches 1e8 on random tables), and its long first steps can land in a saturated
    softmax corner where every gradient vanishes. The tables are small, so exact Hessians are cheap.
    Eigen-directions with |λ| below 1e-12·max|λ| (the per-prompt logit shift, which does not
    change the policy) are left out; negative curvature is used by its magnitude; a
    backtracking line search keeps every step a descent step.
    """
    theta = theta.detach().clone()
    for _ in range(max_steps):
        point = theta.clone().requires_grad_(True)
        loss = loss_at(point)
        (grad,) = torch.autograd.grad(loss, point)
        if float(grad.abs().max()) <= tolerance:
            break
        hessian = torch.autograd.functional.hessian(loss_at, theta)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        magnitude = eigenvalues.abs()
        keep = magnitude > 1e-12 * float(magnitude.max())
        coefficients = (eigenvectors.T @ grad)[keep] / magnitude[keep]
        direction = -(eigenvectors[:, keep] @ coefficients)
        # A trust region in logit space: a long step into a saturated softmax corner lands
        # on a plateau where every gradient vanishes (this happens to L-BFGS for α ≳ 3).
        longest = float(direction.abs().max())
        if longest > max_logit_step:
            direction = direction * (max_logit_step / longest)
        current, gradient_size = float(loss.detach()), float(grad.abs().max())
        step, accepted = 1.0, False
        while step > 1e-6:
            candidate = (theta + step * direction).requires_grad_(True)
            candidate_loss = loss_at(candidate)
            if float(candidate_loss.detach()) < current:
                accepted = True
                break
            # Near the optimum the loss is flat to rounding: judge by the gradient instead.
            (candidate_grad,) = torch.autograd.grad(candidate_loss, candidate)
            if float(candidate_loss.detach()) <= current + 1e-14 * max(1.0, abs(current)) and (
                float(candidate_grad.abs().max()) < gradient_size
            ):
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break  # no progress along the Newton direction: float64's limit
        theta = candidate.detach()
    return theta


@dataclass
class IterationRecord:
    """The state after `iteration` self-play iterations (0 = the start)."""

    iteration: int
    kl: float
    tv: float
    alpha: Optional[float] = None  # the order used to reach this state (IRIS only)
    gap: Optional[float] = None  # the gap measured at the opponent of that iteration
    logits: Tensor = field(default=None, repr=False)
    gap_warning: Optional[str] = None  # the schedule's warning at that opponent (gap grew), if any
    theta: Optional[Tensor] = field(default=None, repr=False)  # parameters of a LinearPolicyClass, if one is used


def self_play(
    task: TabularTask,
    initial_logits: Tensor,
    objective: Objective = "iris",
    *,
    iterations: int = 5,
    schedule: Optional[AlphaSchedule] = None,
    steps: Optional[int] = None,
    step_size: float = 1.0,
    tolerance: float = 1e-10,
    paired: Optional[bool] = None,
    **constants,
) -> list:
    """Iterate: θ_{t+1} = argmin (or K steps) of L(θ; θt) from θt; returns IterationRecords 0..T.

    For IRIS give either `alpha=` in constants or an `AlphaSchedule` (its gap is the exact
    population gap of `exact_auc_gap` / `exact_mean_gap`, per the schedule's `gap`).
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if schedule is not None and "alpha" in constants:
        raise ValueError("give either alpha or an AlphaSchedule, not both")
    if schedule is not None and isinstance(objective, str) and objective != "iris":
        raise ValueError(f"an AlphaSchedule applies to IRIS only, not to {objective!r}")
    theta = _check_logits(task, initial_logits, "initial_logits").detach().clone()
    history = [IterationRecord(0, kl_to_data(task, theta), tv_to_data(task, theta), logits=theta)]
    gaps = []  # gap_0 .. gap_t: the schedule follows their running minimum (THEORY.md §4)
    for t in range(iterations):
        alpha = gap = warning = None
        step_constants = dict(constants)
        if schedule is not None:
            gap = exact_auc_gap(task, theta) if schedule.gap == "auc" else exact_mean_gap(task, theta)
            gaps.append(gap)
            alpha = schedule.alpha_for(t, gaps)
            warning = schedule.gap_warning(gaps)
            step_constants["alpha"] = alpha
        elif "alpha" in constants:
            alpha = float(constants["alpha"])
        theta = minimise(
            task, theta, objective, steps=steps, step_size=step_size, tolerance=tolerance, paired=paired, **step_constants
        )
        history.append(IterationRecord(t + 1, kl_to_data(task, theta), tv_to_data(task, theta), alpha, gap, theta, warning))
    return history


# --------------------------------------------------------------------------------------
# a misspecified policy class (THEORY.md F3)


@dataclass(frozen=True)
class LinearPolicyClass:
    """Log-linear policies p_θ(y|x) = softmax_y(Φ_x θ): one parameter vector θ ∈ R^d shared by all prompts.

    features: (num_cells, d) float64, one row φ(x, y) per cell in the task's cell order.
    They are centred within each prompt on construction (a per-prompt constant in the logits
    does not change the policy, so nothing is lost), and the centred matrix must have full
    column rank d: then θ ↦ p_θ is injective (no gauge to fix) and the cross-entropy
    −Σ p(x)p_data(y|x)·log p_θ(y|x) is strictly convex in θ, so the maximum-likelihood
    projection is unique. The tabular class has Σ_x (K_x − 1) free logits; with d smaller than
    that the class is a proper subset of it and in general cannot represent p_data
    (`ml_projection` then has KL > 0). With d = Σ_x (K_x − 1) it is the tabular class again.
    """

    task: TabularTask
    features: Tensor

    def __post_init__(self):
        phi = torch.as_tensor(self.features)
        if phi.dtype != torch.float64 or phi.dim() != 2:
            raise ValueError("features must be a 2-D float64 tensor (cells x d)")
        if phi.shape[0] != self.task.num_cells:
            raise ValueError(f"features have {phi.shape[0]} rows, the task has {self.task.num_cells} cells")
        if phi.shape[1] < 1 or not torch.isfinite(phi).all():
            raise ValueError("features need at least one finite column")
        centred = torch.cat([block - block.mean(0, keepdim=True) for block in torch.split(phi.detach(), self.task.sizes)])
        rank = int(torch.linalg.matrix_rank(centred))
        if rank < phi.shape[1]:
            raise ValueError(
                f"the centred features have rank {rank} < d = {phi.shape[1]}: θ is not identifiable "
                "(some direction of θ leaves every policy unchanged)"
            )
        object.__setattr__(self, "features", centred.clone())

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def tabular_dim(self) -> int:
        """Σ_x (K_x − 1): the number of free logits of the tabular class."""
        return sum(n - 1 for n in self.task.sizes)

    def logits(self, theta: Tensor) -> Tensor:
        """Φθ (differentiable), the logits of every cell."""
        if not isinstance(theta, Tensor) or theta.dtype != torch.float64 or theta.shape != (self.dim,):
            raise ValueError(f"theta must be a float64 tensor of shape ({self.dim},)")
        return self.features @ theta

    def kl_to_data(self, theta: Tensor) -> float:
        """Σ_x p(x)·KL(p_data(·|x) ‖ p_θ(·|x))."""
        return kl_to_data(self.task, self.logits(theta))

    def tv_to_data(self, theta: Tensor) -> float:
        return tv_to_data(self.task, self.logits(theta))

    def zeros(self) -> Tensor:
        """θ = 0: the uniform policy on every prompt."""
        return torch.zeros(self.dim, dtype=torch.float64)

    @classmethod
    def random(cls, task: TabularTask, dim: int, seed: int = 0, scale: float = 1.0) -> "LinearPolicyClass":
        """Gaussian features (seeded) for an existing task."""
        generator = torch.Generator().manual_seed(seed)
        return cls(task, scale * torch.randn(task.num_cells, int(dim), generator=generator, dtype=torch.float64))


def misspecified_class(sizes: Sequence[int] = (5, 6), dim: int = 3, seed: int = 2, noise: float = 0.8) -> LinearPolicyClass:
    """A log-linear class that cannot represent its data, with data close enough to be interesting.

    Seeded draws, in this order: Gaussian features Φ (cells × dim), θ_true ~ N(0, I_dim), noise
    z ~ N(0, noise²) per cell, prompt probabilities softmax(0.3·N(0, 1)). The data are
    p_data(·|x) = softmax(Φ_x θ_true + z_x): the noise takes them out of the class. The
    defaults (2 prompts with 5 and 6 responses, d = 3 < 9 free logits) are the class of the
    tests and of `python -m iris_ref.tabular`: KL at the projection 0.04826.
    """
    sizes = [int(n) for n in sizes]
    generator = torch.Generator().manual_seed(seed)
    phi = torch.randn(sum(sizes), int(dim), generator=generator, dtype=torch.float64)
    theta_true = torch.randn(int(dim), generator=generator, dtype=torch.float64)
    z = noise * torch.randn(sum(sizes), generator=generator, dtype=torch.float64)
    logits = phi @ theta_true + z
    rows = tuple(torch.softmax(block, 0) for block in torch.split(logits, sizes))
    prompts = torch.softmax(0.3 * torch.randn(len(sizes), generator=generator, dtype=torch.float64), 0)
    return LinearPolicyClass(TabularTask(rows, prompts), phi)


def _cross_entropy(policy_class: LinearPolicyClass, theta: Tensor) -> Tensor:
    log_probs = torch.cat(policy_log_probs(policy_class.task, policy_class.logits(theta)))
    return -(policy_class.task.joint_data() * log_probs).sum()


def sft_gradient(policy_class: LinearPolicyClass, theta: Tensor) -> Tensor:
    """∇_θ KL(p_data‖p_Φθ) in closed form: Φᵀ(p(x)p_θ(y|x) − p(x)p_data(y|x)) (the SFT gradient)."""
    with torch.no_grad():
        return policy_class.features.T @ (_joint(policy_class.task, policy_class.logits(theta)) - policy_class.task.joint_data())


def ml_projection(
    policy_class: LinearPolicyClass, *, start: Optional[Tensor] = None, tolerance: float = 1e-14, max_newton_steps: int = 100
) -> Tensor:
    """argmin_θ KL(p_data‖p_Φθ): the population SFT (maximum-likelihood) solution in the class.

    Damped Newton on the strictly convex cross-entropy from `start` (default θ = 0), to a
    gradient max-norm of `tolerance`; RuntimeError if it does not get below 1e-12.
    """
    theta = policy_class.zeros() if start is None else start.detach().clone()
    theta = _newton(lambda t: _cross_entropy(policy_class, t), theta, tolerance, max_newton_steps)
    residual = float(sft_gradient(policy_class, theta).abs().max())
    if residual > 1e-12:
        raise RuntimeError(f"ml_projection did not converge: gradient {residual:.3g}")
    return theta


def minimise_in_class(
    policy_class: LinearPolicyClass,
    opponent_theta: Tensor,
    objective: Objective = "iris",
    *,
    start: Optional[Tensor] = None,
    steps: Optional[int] = None,
    step_size: float = 1.0,
    tolerance: float = 1e-13,
    max_newton_steps: int = 200,
    paired: Optional[bool] = None,
    **constants,
) -> Tensor:
    """One exact population self-play iteration in the class: argmin_θ L(Φθ; Φθt), from `start` (default θt).

    As `minimise`, with the parameters θ instead of the logits: steps=K plain gradient steps,
    steps=None damped Newton to a gradient max-norm of `tolerance`.
    """
    opponent_logits = policy_class.logits(opponent_theta.detach()).detach()
    theta = (opponent_theta if start is None else start).detach().clone()
    policy_class.logits(theta)  # shape check

    def loss_at(t):
        return population_loss(policy_class.task, policy_class.logits(t), opponent_logits, objective, paired=paired, **constants).loss

    if steps is not None:
        if steps < 0 or step_size <= 0:
            raise ValueError(f"need steps >= 0 and step_size > 0, got {steps}, {step_size}")
        theta.requires_grad_(True)
        for _ in range(int(steps)):
            (grad,) = torch.autograd.grad(loss_at(theta), theta)
            with torch.no_grad():
                theta -= step_size * grad
        return theta.detach()
    return _newton(loss_at, theta, tolerance, max_newton_steps)


def self_play_in_class(
    policy_class: LinearPolicyClass,
    initial_theta: Tensor,
    objective: Objective = "iris",
    *,
    iterations: int = 5,
    schedule: Optional[AlphaSchedule] = None,
    steps: Optional[int] = None,
    step_size: float = 1.0,
    tolerance: float = 1e-13,
    paired: Optional[bool] = None,
    **constants,
) -> list:
    """`self_play` in the log-linear class: θ_{t+1} = argmin_θ L(θ; θt); IterationRecords 0..T with `theta` set."""
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if schedule is not None and "alpha" in constants:
        raise ValueError("give either alpha or an AlphaSchedule, not both")
    task = policy_class.task
    theta = initial_theta.detach().clone()
    logits = policy_class.logits(theta).detach()
    history = [IterationRecord(0, kl_to_data(task, logits), tv_to_data(task, logits), logits=logits, theta=theta)]
    gaps = []
    for t in range(iterations):
        alpha = gap = warning = None
        step_constants = dict(constants)
        if schedule is not None:
            gap = exact_auc_gap(task, logits) if schedule.gap == "auc" else exact_mean_gap(task, logits)
            gaps.append(gap)
            alpha = schedule.alpha_for(t, gaps)
            warning = schedule.gap_warning(gaps)
            step_constants["alpha"] = alpha
        elif "alpha" in constants:
            alpha = float(constants["alpha"])
        theta = minimise_in_class(
            policy_class, theta, objective, steps=steps, step_size=step_size, tolerance=tolerance, paired=paired, **step_constants
        )
        logits = policy_class.logits(theta).detach()
        history.append(
            IterationRecord(t + 1, kl_to_data(task, logits), tv_to_data(task, logits), alpha, gap, logits, warning, theta)
        )
    return history


def iteration_jacobian(
    policy_class: LinearPolicyClass, theta: Tensor, objective: Objective = "iris", *, eps: float = 1e-5, **constants
) -> Tensor:
    """∂θ_{t+1}/∂θt of the exact iteration at θt = theta, by central differences of `minimise_in_class`.

    Each of the 2d solves is converged to a gradient of 1e-13, so the entries are accurate to
    about 1e-8 (rounding/eps plus eps² times the third derivative).
    """
    d = policy_class.dim
    columns = []
    for i in range(d):
        e = torch.zeros(d, dtype=torch.float64)
        e[i] = eps
        up = minimise_in_class(policy_class, theta + e, objective, **constants)
        down = minimise_in_class(policy_class, theta - e, objective, **constants)
        columns.append((up - down) / (2 * eps))
    return torch.stack(columns, dim=1)


def _fisher_and_data_second_moment(policy_class: LinearPolicyClass, theta: Tensor) -> tuple:
    """F = Σ_x p(x) Cov_{p_θ(·|x)}(φ) and S = E_{p(x)p_data(y|x)}[ψψᵀ] with ψ = φ − E_{p_θ(·|x)}φ."""
    task = policy_class.task
    with torch.no_grad():
        probs = [torch.softmax(c, 0) for c in torch.split(policy_class.logits(theta), task.sizes)]
        psi = torch.cat([f - p @ f for f, p in zip(torch.split(policy_class.features, task.sizes), probs)])
        model = torch.cat([px * p for px, p in zip(task.prompt_probs, probs)])
        data = task.joint_data()
        return psi.T @ (model[:, None] * psi), psi.T @ (data[:, None] * psi)


def spread_ratios(policy_class: LinearPolicyClass, theta: Optional[Tensor] = None) -> Tensor:
    """λ_1 ≤ … ≤ λ_d: generalised eigenvalues of S v = λ F v at the projection (default) or theta.

    F is the model's Fisher information (the Hessian of the SFT loss), S the second moment of
    the model-centred features under the DATA: λ > 1 along directions where the data are more
    spread than the model. In the tabular (realizable) case p_θ* = p_data and every λ = 1.
    """
    theta = ml_projection(policy_class) if theta is None else theta
    fisher, second = _fisher_and_data_second_moment(policy_class, theta)
    cholesky = torch.linalg.cholesky(fisher)
    inner = torch.linalg.solve_triangular(cholesky, torch.linalg.solve_triangular(cholesky, second, upper=False).T, upper=False)
    return torch.linalg.eigvalsh(0.5 * (inner + inner.T))


def _effective_metric(objective: Objective, constants: dict):
    """(a, b) of M = a·F + b·S: near θ* the quadratic model of L(θt + δ; θt) is
    c·(β·∇KL·δ + (β²/2)·δᵀMδ) + const (c the F3 scale), so its minimiser is
    δ = −(1/β)·M⁻¹·∇KL. ValueError for objectives without a closed form here."""
    if objective in ("iris",):
        alpha = float(constants["alpha"])
        return alpha, 1.0 - alpha
    if objective in ("spin",):
        return 0.5, 0.5  # SPIN's quadratic model is IRIS's at α = ½ (pairs within a prompt)
    if objective in ("space",):
        mu = float(constants.get("mu", 1.0))
        return mu / (1.0 + mu), 1.0 / (1.0 + mu)  # IRIS's at α = μ/(1+μ)
    if objective in ("spif",):
        return 0.5, 0.0  # M = F/2: a Newton step of twice the length
    raise ValueError(f"no closed-form linearisation for objective {objective!r}")


def linearised_iteration_eigenvalues(
    policy_class: LinearPolicyClass, objective: Objective = "iris", *, theta: Optional[Tensor] = None, beta: float = 1.0, **constants
) -> Tensor:
    """Eigenvalues of the exact iteration's Jacobian at the projection θ*, in closed form (sorted).

    Near θ* one exact iteration is a preconditioned Newton step on the SFT loss,
    θ_{t+1} − θ* ≈ (I − (1/β)·M⁻¹F)(θt − θ*) with M = a·F + b·S (the quadratic model of the
    objective, THEORY.md C2): IRIS a = α, b = 1 − α; SPIN a = b = ½; SPACE a = μ/(1+μ),
    b = 1/(1+μ); SPIF a = ½, b = 0. So the eigenvalues are ν_i = 1 − 1/(β·(a + b·λ_i)), λ_i from
    `spread_ratios`: IRIS at α = 1, β = 1 gives ν = 0 (it IS the SFT loss up to a constant,
    the minimiser is θ* in one step), SPIF gives 1 − 2/β (= −1 at β = 1: neutral), and the
    iteration is linearly stable iff β·(a + b·λ_i) > ½ for every i.
    """
    a, b = _effective_metric(objective, constants)
    lam = spread_ratios(policy_class, theta)
    return torch.sort(1.0 - 1.0 / (float(beta) * (a + b * lam))).values


def stable_orders(policy_class: LinearPolicyClass, *, beta: float = 1.0, theta: Optional[Tensor] = None) -> tuple:
    """(α_low, α_high): the IRIS orders for which the iteration is linearly stable at the projection.

    From β·(α + (1 − α)·λ_i) > ½ for every λ_i of `spread_ratios`: each is linear in α, so the
    set is an interval ((0, 0) when it is empty). λ within 1e-9 of 1 counts as 1. At β = 1: α_high = 1 + 1/(2(λ_max − 1))
    when λ_max > 1 (data more spread than the model somewhere), else ∞; α_low = 1 −
    1/(2(1 − λ_min)) when λ_min < ½, else 0. Beyond α_high the largest eigenvalue crosses −1
    (a flip): the projection repels and the iteration cannot converge to it.
    """
    lam = spread_ratios(policy_class, theta)
    half = 0.5 / float(beta)
    low, high = 0.0, math.inf
    for value in lam.tolist():
        slope, offset = 1.0 - value, half - value  # need α·slope > offset
        if abs(slope) <= 1e-9:  # λ = 1 up to rounding (the realizable case): β > ½ is the condition
            if offset >= 0:
                return (0.0, 0.0)
        elif slope > 0:
            low = max(low, offset / slope)
        else:
            high = min(high, offset / slope)
    return low, high


def attractor_period(thetas: Sequence[Tensor], tolerance: float = 1e-9, max_period: int = 30) -> Optional[int]:
    """The smallest p ≤ max_period with ‖θ_{t+p} − θ_t‖ ≤ tolerance over the second half of the sequence (None if none)."""
    tail = list(thetas)[len(thetas) // 2 :]
    for p in range(1, min(max_period, len(tail) - 1) + 1):
        if all(float((tail[i] - tail[i - p]).norm()) <= tolerance for i in range(p, len(tail))):
            return p
    return None


# --------------------------------------------------------------------------------------
# the comparison script


def _methods(args) -> list:
    """(label, objective, schedule, constants) for every method of the comparison."""
    iris = [
        (
            "IRIS adaptive",
            "iris",
            AlphaSchedule(kind="adaptive", alpha_min=args.alpha_min, alpha_max=args.alpha_max, num_iterations=args.iterations),
            {},
        )
    ]
    iris += [(f"IRIS a={a:g}", "iris", None, {"alpha": a}) for a in args.alphas]
    return iris + [
        ("SPIN", "spin", None, {}),
        (f"SPACE mu={args.mu:g}", "space", None, {"mu": args.mu}),
        ("SPIF", "spif", None, {}),
    ]


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m iris_ref.tabular",
        description=(
            "Exact population self-play on a tabular softmax policy: KL(p_data || p_theta_t) per "
            "iteration for IRIS (adaptive and fixed alpha), SPIN, SPACE and SPIF from a common start."
        ),
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 8], help="responses per prompt (default: 4 6 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data distributions and the start (default: 0)")
    parser.add_argument("--iterations", type=int, default=8, help="self-play iterations (default: 8)")
    parser.add_argument("--beta", type=float, default=1.0, help="beta of every objective (default: 1)")
    parser.add_argument(
        "--steps", type=int, default=5, help="gradient steps per iteration (default: 5); ignored with --converge"
    )
    parser.add_argument("--step-size", type=float, default=0.5, help="gradient step size (default: 0.5)")
    parser.add_argument("--converge", action="store_true", help="optimise every iteration to convergence (damped Newton)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="fixed IRIS orders (default: 0.5 1 2)")
    parser.add_argument("--alpha-min", type=float, default=0.5, help="adaptive schedule's smallest alpha (default: 0.5)")
    parser.add_argument("--alpha-max", type=float, default=2.0, help="adaptive schedule's largest alpha (default: 2)")
    parser.add_argument("--mu", type=float, default=1.0, help="SPACE's mu (default: 1)")
    parser.add_argument("--output", type=Path, default=Path("runs/tabular/tabular.png"), help="PNG plot path")
    parser.add_argument(
        "--class-iterations",
        type=int,
        default=100,
        help="iterations in the misspecified log-linear class (THEORY.md F3; default: 100; 0 skips that part)",
    )
    parser.add_argument(
        "--class-orders",
        type=float,
        nargs="+",
        default=[3.0, 4.5, 4.7, 5.0, 6.0],
        help="IRIS orders of the stability scan in the misspecified class (default: 3 4.5 4.7 5 6)",
    )
    args = parser.parse_args(argv)
    if args.class_iterations < 0:
        parser.error("--class-iterations must be >= 0")
    if any(a <= 0 for a in args.class_orders):
        parser.error("--class-orders must be > 0")
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    if any(n < 2 for n in args.sizes):
        parser.error("--sizes: every prompt needs at least 2 responses")
    for name in ("beta", "step_size", "mu", "alpha_min", "alpha_max"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if any(a <= 0 for a in args.alphas):
        parser.error("--alphas must be > 0")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.alpha_min > args.alpha_max:
        parser.error("--alpha-min must not exceed --alpha-max")
    return args


CLASS_METHODS = (
    ("IRIS a=0.25", "iris", {"alpha": 0.25}),
    ("IRIS a=0.5", "iris", {"alpha": 0.5}),
    ("IRIS a=1", "iris", {"alpha": 1.0}),
    ("IRIS a=2", "iris", {"alpha": 2.0}),
    ("IRIS a=3", "iris", {"alpha": 3.0}),
    ("IRIS a=5", "iris", {"alpha": 5.0}),
    ("SPIN", "spin", {}),
    ("SPACE mu=1", "space", {"mu": 1.0}),
    ("SPIF", "spif", {}),
)


def _class_outcome(thetas: Sequence[Tensor], kls: Sequence[float], theta_star: Tensor) -> str:
    """One phrase: converged, a p-cycle (with its KL values), converging slowly, or neither."""
    distance = float((thetas[-1] - theta_star).norm())
    if distance <= 1e-8:
        return f"converged: |theta_T - theta*| = {distance:.1e}"
    period = attractor_period(thetas[-2 * 30 :] if len(thetas) >= 60 else thetas, tolerance=1e-6)
    if period is not None and distance > 1e-3:
        values = sorted(kls[-period:])
        shown = " / ".join(f"{v:.4f}" for v in values) if period <= 6 else f"{values[0]:.4f} .. {values[-1]:.4f}"
        return f"{period}-cycle, KL {shown}"
    earlier = float((thetas[len(thetas) // 2] - theta_star).norm())
    if distance < earlier:
        return f"converging slowly: |theta_T - theta*| = {distance:.1e}"
    return f"no period <= 30: KL {min(kls[len(kls) // 2:]):.4f} .. {max(kls[len(kls) // 2:]):.4f}, |theta_T - theta*| = {distance:.2f}"


def _misspecified_part(args) -> dict:
    """Print the F3 tables (and return the KL histories for the plot): exact self-play in the misspecified class."""
    policy_class = misspecified_class()
    theta_star = ml_projection(policy_class)
    kl_star = policy_class.kl_to_data(theta_star)
    low, high = stable_orders(policy_class)
    lam = spread_ratios(policy_class)
    start = policy_class.zeros()
    iterations = args.class_iterations
    print(
        f"\nmisspecified log-linear class (THEORY.md F3): {len(policy_class.task.sizes)} prompts with "
        f"{policy_class.task.sizes} responses, d = {policy_class.dim} shared parameters (the tabular class has "
        f"{policy_class.tabular_dim}); beta = 1, every iteration to convergence (Newton)\n"
        f"ML projection theta*: KL(p_data||p_theta*) = {kl_star:.6f} > 0 (p_data is not representable); "
        f"spread ratios lambda = {', '.join(f'{v:.4f}' for v in lam.tolist())}\n"
        f"linearised iteration stable around theta* for IRIS orders alpha in ({low:g}, {high:.4f}); "
        f"start theta = 0 (uniform policy), KL = {policy_class.kl_to_data(start):.6f}"
    )
    histories = {}
    for label, objective, constants in CLASS_METHODS:
        histories[label] = self_play_in_class(policy_class, start, objective, iterations=iterations, beta=1.0, **constants)
    labels = list(histories)
    width = max(13, *(len(label) + 2 for label in labels))
    shown = sorted({t for t in (0, 1, 2, 3, 5, 10, 20, 40, 60, 80, iterations) if t <= iterations})
    print("\nKL(p_data || p_theta_t) in the class (KL at the projection: " + f"{kl_star:.6f})")
    print("iter " + "".join(f"{label:>{width}}" for label in labels))
    for t in shown:
        print(f"{t:>4} " + "".join(f"{histories[label][t].kl:>{width}.6f}" for label in labels))
    print("dist " + "".join(f"{float((histories[label][-1].theta - theta_star).norm()):>{width}.1e}" for label in labels))
    print("(dist: |theta_T - theta*|; SPIF overshoots: its linearised iteration is -I)")

    print(f"\nstability of the exact IRIS iteration around the projection ({iterations} iterations from theta* + 0.01)")
    print(f"{'alpha':>6} {'min nu':>8}  outcome")
    near = theta_star + 0.01 * torch.ones(policy_class.dim, dtype=torch.float64)
    for alpha in sorted(set(args.class_orders)):
        nu = float(linearised_iteration_eigenvalues(policy_class, "iris", alpha=alpha).min())
        if iterations:
            run = self_play_in_class(policy_class, near, "iris", iterations=iterations, alpha=alpha, beta=1.0)
            outcome = _class_outcome([h.theta for h in run], [h.kl for h in run], theta_star)
        else:
            outcome = "-"
        print(f"{alpha:>6g} {nu:>8.3f}  {outcome}")
    print(f"(nu: the closed-form eigenvalues 1 - 1/(alpha + (1 - alpha) lambda) of the linearised map; |nu| > 1 repels, alpha_c = {high:.4f})")
    return {"histories": histories, "kl_star": kl_star}


def _plot(results: dict, path: Path, title: str, misspecified: Optional[dict] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if misspecified is None:
        fig, (ax_kl, ax_alpha) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    else:
        fig, (ax_kl, ax_alpha, ax_class) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [2, 1, 2]})
        kl_star = misspecified["kl_star"]
        for label, history in misspecified["histories"].items():
            excess = [max(h.kl - kl_star, 1e-17) for h in history]
            ax_class.semilogy([h.iteration for h in history], excess, marker="o", ms=2, lw=1, label=label)
        ax_class.set_xlabel("self-play iteration t")
        ax_class.set_ylabel("KL(p_data || p_theta_t) - KL at the ML projection")
        ax_class.set_title(
            f"misspecified class (d=3): KL above the SFT solution's {kl_star:.4f}; beta=1, to convergence", fontsize=9
        )
        ax_class.grid(True, which="both", alpha=0.3)
        ax_class.legend(fontsize=7, ncol=2)
    for label, history in results.items():
        kls = [max(h.kl, 1e-16) for h in history]
        ax_kl.semilogy([h.iteration for h in history], kls, marker="o", ms=3, label=label)
    ax_kl.set_xlabel("self-play iteration t")
    ax_kl.set_ylabel("KL(p_data || p_theta_t)")
    ax_kl.set_title(title, fontsize=9)
    ax_kl.grid(True, which="both", alpha=0.3)
    ax_kl.legend(fontsize=8)
    adaptive = results.get("IRIS adaptive")
    if adaptive is not None:
        its = [h.iteration for h in adaptive[1:]]
        ax_alpha.plot(its, [h.alpha for h in adaptive[1:]], marker="o", label="alpha_t")
        ax_alpha.plot(its, [h.gap for h in adaptive[1:]], marker="s", label="gap_t (exact AUC)")
        ax_alpha.set_xlabel("iteration t (order used to reach it)")
        ax_alpha.set_title("IRIS adaptive schedule", fontsize=9)
        ax_alpha.grid(True, alpha=0.3)
        ax_alpha.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = _parse(argv)
    task = TabularTask.random(args.sizes, seed=args.seed)
    start = task.random_logits(seed=args.seed + 1)
    mode = "to convergence (Newton)" if args.converge else f"{args.steps} gradient steps of size {args.step_size:g}"
    print(
        f"tabular self-play: {len(args.sizes)} prompts with {args.sizes} responses, beta={args.beta:g}, "
        f"each iteration {mode}; common start KL(p_data||p_theta_0) = {kl_to_data(task, start):.6g}"
    )
    results = {}
    for label, objective, schedule, constants in _methods(args):
        results[label] = self_play(
            task,
            start,
            objective,
            iterations=args.iterations,
            schedule=schedule,
            steps=None if args.converge else args.steps,
            step_size=args.step_size,
            beta=args.beta,
            **constants,
        )
    labels = list(results)
    width = max(14, *(len(label) + 2 for label in labels))
    print("\nKL(p_data || p_theta_t)")
    print("iter " + "".join(f"{label:>{width}}" for label in labels))
    for t in range(args.iterations + 1):
        print(f"{t:>4} " + "".join(f"{results[label][t].kl:>{width}.4e}" for label in labels))
    print("\nTV(p_data, p_theta_t)")
    print("iter " + "".join(f"{label:>{width}}" for label in labels))
    for t in range(args.iterations + 1):
        print(f"{t:>4} " + "".join(f"{results[label][t].tv:>{width}.4e}" for label in labels))
    adaptive = results["IRIS adaptive"]
    print(
        "\nIRIS adaptive: alpha_t = "
        + ", ".join(f"{h.alpha:.3f}" for h in adaptive[1:])
        + "; gap_t = "
        + ", ".join(f"{h.gap:.3f}" for h in adaptive[1:])
    )
    misspecified = _misspecified_part(args) if args.class_iterations > 0 else None
    _plot(results, args.output, f"beta={args.beta:g}, {mode}", misspecified)
    print(f"plot: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
