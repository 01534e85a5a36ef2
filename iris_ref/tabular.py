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

`python -m iris_ref.tabular --help` runs the comparison of IRIS (adaptive and fixed α), SPIN,
SPACE and SPIF from a common start and writes a plot.
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
    args = parser.parse_args(argv)
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


def _plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_alpha) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
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
    _plot(results, args.output, f"beta={args.beta:g}, {mode}")
    print(f"plot: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
