"""Plausible wrong IRIS implementations, the negative controls of the verification suite.

Each mutant has the signature of `iris_ref.objectives.iris_loss` and returns an
`ObjectiveOutput`, with weights that are consistent with its own (wrong) loss wherever that
is possible, so that a test catching it must look at the mathematics, not at bookkeeping.
Every claim's negative control shows that its check rejects at least one of these.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from iris_ref.objectives import ObjectiveOutput


def _prepare(pr, ps, orr, os_, beta, real_weights, synthetic_weights, normalise=True):
    dtype = torch.float64 if pr.dtype == torch.float64 else torch.float32
    r = beta * (pr.to(dtype) - orr.detach().to(dtype))
    rs = beta * (ps.to(dtype) - os_.detach().to(dtype))

    def weights(w, n):
        if w is None:
            return torch.full((n,), 1.0 / n, dtype=dtype)
        w = w.detach().to(dtype)
        return w / w.sum() if normalise else w

    return r, rs, weights(real_weights, r.numel()), weights(synthetic_weights, rs.numel())


def _naive_tilted(z: Tensor, t: float, w: Tensor) -> Tensor:
    """(1/t)·log Σ w e^{t z} with the exact t = 0 limit, no renormalisation of w."""
    if t == 0.0:
        return (w * z).sum()
    return torch.logsumexp(t * z + torch.log(w), dim=0) / t


def _output(loss, r, rs, real_tilt, synthetic_tilt, pi, rho):
    """Weights as the gradient of a loss of the form T_{real_tilt}[−r] + T_{synthetic_tilt}[r']."""
    with torch.no_grad():
        a = torch.softmax(-real_tilt * r + torch.log(pi), dim=0)
        b = torch.softmax(synthetic_tilt * rs + torch.log(rho), dim=0)
    return ObjectiveOutput(loss, a, b, r.detach(), rs.detach())


def iris_swapped_tilts(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights: Optional[Tensor] = None, synthetic_weights: Optional[Tensor] = None):
    """Bug: the annotated term gets tilt α and the synthetic term tilt 1 − α (the order-(1−α) objective)."""
    r, rs, pi, rho = _prepare(pr, ps, orr, os_, beta, real_weights, synthetic_weights)
    loss = _naive_tilted(-r, alpha, pi) + _naive_tilted(rs, 1.0 - alpha, rho)
    return _output(loss, r, rs, alpha, 1.0 - alpha, pi, rho)


def iris_swapped_roles(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights: Optional[Tensor] = None, synthetic_weights: Optional[Tensor] = None):
    """Bug: annotated and synthetic data exchanged, pushing the model towards its own samples."""
    r, rs, pi, rho = _prepare(pr, ps, orr, os_, beta, real_weights, synthetic_weights)
    loss = _naive_tilted(-rs, 1.0 - alpha, rho) + _naive_tilted(r, alpha, pi)
    with torch.no_grad():
        b_on_synthetic = -torch.softmax((alpha - 1.0) * rs + torch.log(rho), dim=0)
        a_on_real = -torch.softmax(alpha * r + torch.log(pi), dim=0)
    return ObjectiveOutput(loss, a_on_real, b_on_synthetic, r.detach(), rs.detach())


def iris_dropped_sign(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights: Optional[Tensor] = None, synthetic_weights: Optional[Tensor] = None):
    """Bug: for α < 1 the annotated term is written as +(1/(1−α))·log Σπ e^{(α−1) r}, sign lost."""
    r, rs, pi, rho = _prepare(pr, ps, orr, os_, beta, real_weights, synthetic_weights)
    real_term = _naive_tilted(-r, 1.0 - alpha, pi)
    if alpha < 1.0:
        real_term = -real_term
    loss = real_term + _naive_tilted(rs, alpha, rho)
    out = _output(loss, r, rs, 1.0 - alpha, alpha, pi, rho)
    if alpha < 1.0:
        out = ObjectiveOutput(loss, -out.real_weights, out.synthetic_weights, out.real_rewards, out.synthetic_rewards)
    return out


def iris_unnormalised_weights(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights: Optional[Tensor] = None, synthetic_weights: Optional[Tensor] = None):
    """Bug: probability weights used as given, never renormalised (a 1e-16 deficit moves the loss near α = 1)."""
    r, rs, pi, rho = _prepare(pr, ps, orr, os_, beta, real_weights, synthetic_weights, normalise=False)
    loss = _naive_tilted(-r, 1.0 - alpha, pi) + _naive_tilted(rs, alpha, rho)
    return _output(loss, r, rs, 1.0 - alpha, alpha, pi, rho)


COARSE_SERIES_THRESHOLD = 1e-2


def iris_coarse_series(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights: Optional[Tensor] = None, synthetic_weights: Optional[Tensor] = None):
    """Bug: replaces each tilted mean by its first-order series mean + (t/2)·Var when |α − 1| < 1e-2."""
    r, rs, pi, rho = _prepare(pr, ps, orr, os_, beta, real_weights, synthetic_weights)
    if abs(alpha - 1.0) >= COARSE_SERIES_THRESHOLD:
        loss = _naive_tilted(-r, 1.0 - alpha, pi) + _naive_tilted(rs, alpha, rho)
        return _output(loss, r, rs, 1.0 - alpha, alpha, pi, rho)

    def series(z, t, w):
        mean = (w * z).sum()
        return mean + 0.5 * t * (w * (z - mean) ** 2).sum()

    loss = series(-r, 1.0 - alpha, pi) + series(rs, alpha, rho)
    # The series' exact gradient weights: w_i·(1 + t·(z_i − mean)).
    with torch.no_grad():
        a = pi * (1 + (1.0 - alpha) * (-r - (pi * -r).sum()))
        b = rho * (1 + alpha * (rs - (rho * rs).sum()))
    return ObjectiveOutput(loss, a, b, r.detach(), rs.detach())


MUTANTS = {
    "swapped_tilts": iris_swapped_tilts,
    "swapped_roles": iris_swapped_roles,
    "dropped_sign": iris_dropped_sign,
    "unnormalised_weights": iris_unnormalised_weights,
    "coarse_series": iris_coarse_series,
}


# --------------------------------------------------------------------------------------
# Wrong objectives for the misspecified fixed point (THEORY.md F3), signature of iris_loss.
# Kept apart from MUTANTS (the audit and golden-vector tests require every MUTANT rejected by
# them; these two are aimed at F3 only).


def iris_doubled_annotated(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights: Optional[Tensor] = None, synthetic_weights: Optional[Tensor] = None):
    """Mis-scaled: the annotated tilted term counted twice. Gradient at θt = 2β·∇KL (c = 2, not 1);
    its fixed points are still stationary points of KL, so only the gradient identity sees it."""
    r, rs, pi, rho = _prepare(pr, ps, orr, os_, beta, real_weights, synthetic_weights)
    loss = 2.0 * _naive_tilted(-r, 1.0 - alpha, pi) + _naive_tilted(rs, alpha, rho)
    out = _output(loss, r, rs, 1.0 - alpha, alpha, pi, rho)
    return ObjectiveOutput(loss, 2.0 * out.real_weights, out.synthetic_weights, out.real_rewards, out.synthetic_rewards)


def iris_unweighted_synthetic(pr, ps, orr, os_, *, alpha, beta=0.1, real_weights: Optional[Tensor] = None, synthetic_weights: Optional[Tensor] = None):
    """Bug: the synthetic term ignores its sample weights (uniform over the synthetic samples, as
    if every response had been sampled once). At θt the synthetic gradient E_uniform ∇log p_θ is
    not 0, so the fixed point is not the maximum-likelihood projection."""
    r, rs, pi, rho = _prepare(pr, ps, orr, os_, beta, real_weights, None)
    loss = _naive_tilted(-r, 1.0 - alpha, pi) + _naive_tilted(rs, alpha, rho)
    return _output(loss, r, rs, 1.0 - alpha, alpha, pi, rho)


FIXED_POINT_MUTANTS = {
    "doubled_annotated": iris_doubled_annotated,
    "unweighted_synthetic": iris_unweighted_synthetic,
}

# --------------------------------------------------------------------------------------
# Wrong adaptive order schedules (THEORY.md §4), signature of
# `iris_ref.schedule.adaptive_alpha(gaps, alpha_min, alpha_max)`. Kept apart from MUTANTS,
# which the audit and golden-vector tests run as IRIS objectives.


def _schedule_alpha(fraction: float, alpha_min: float, alpha_max: float, clip: bool) -> float:
    if clip:
        fraction = min(1.0, max(0.0, fraction))
        return min(alpha_max, max(alpha_min, alpha_min + (alpha_max - alpha_min) * fraction))
    return alpha_min + (alpha_max - alpha_min) * fraction


def _magnitudes(gaps):
    values = [abs(float(g)) for g in gaps]
    if not values:
        raise ValueError("gaps is empty")
    return values


def schedule_unguarded(gaps, alpha_min: float = 0.5, alpha_max: float = 2.0) -> float:
    """Bug (the first version): α from the latest gap alone, gap_t/gap_0, so a growing gap raises α again."""
    values = _magnitudes(gaps)
    return alpha_min if values[0] == 0.0 else _schedule_alpha(values[-1] / values[0], alpha_min, alpha_max, True)


def schedule_unguarded_unclipped(gaps, alpha_min: float = 0.5, alpha_max: float = 2.0) -> float:
    """Bug: the first version without the clip: a gap above gap_0 sends α past α_max."""
    values = _magnitudes(gaps)
    return alpha_min if values[0] == 0.0 else _schedule_alpha(values[-1] / values[0], alpha_min, alpha_max, False)


def schedule_running_max(gaps, alpha_min: float = 0.5, alpha_max: float = 2.0) -> float:
    """Bug: the running maximum instead of the minimum (clipped): α is stuck at α_max."""
    values = _magnitudes(gaps)
    return alpha_min if values[0] == 0.0 else _schedule_alpha(max(values) / values[0], alpha_min, alpha_max, True)


def schedule_running_max_unclipped(gaps, alpha_min: float = 0.5, alpha_max: float = 2.0) -> float:
    """Bug: the running maximum and no clip: α climbs past α_max with the largest gap."""
    values = _magnitudes(gaps)
    return alpha_min if values[0] == 0.0 else _schedule_alpha(max(values) / values[0], alpha_min, alpha_max, False)


# Forgetting the clip of the GUARDED rule is not a mutant: g_t <= gap_0, so g_t/gap_0 lies in
# [0, 1] exactly (IEEE division is monotone and gap_0/gap_0 = 1) and the clip never acts there.
SCHEDULE_MUTANTS = {
    "unguarded": schedule_unguarded,
    "unguarded_unclipped": schedule_unguarded_unclipped,
    "running_max": schedule_running_max,
    "running_max_unclipped": schedule_running_max_unclipped,
}

# --------------------------------------------------------------------------------------
# Foreign SPIN/SPACE code that is mathematically right but numerically short of float64 (the
# audit's exit status 3), and float32 code with a real bug (still wrong mathematics, exit 1).
# Foreign style: the audit's calling convention, a bare loss tensor returned.


def spin_nemo_aligner_float32(pr, ps, orr, os_, *, beta=0.1):
    """Right, computed in float32 as NeMo-Aligner's SPIN loss does: summed log-prob differences
    times β, cast with .float() (its split_output_tensor), then -logsigmoid(margin).mean() in float32."""
    rewards = torch.cat([pr - orr, ps - os_])
    chosen, rejected = torch.split((beta * rewards).float(), len(rewards) // 2, dim=0)
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean(0)


def spin_float32_constants(pr, ps, orr, os_, *, beta=0.1, pair_weights=None):
    """Right, in float64 arithmetic, but β and the pair weights built as float32 tensors: the loss
    comes back float64 yet carries float32 rounding."""
    n = pr.numel()
    weights = torch.full((n,), 1.0 / n, dtype=torch.float32) if pair_weights is None else (pair_weights / pair_weights.sum()).float()
    margin = torch.tensor(beta, dtype=torch.float32) * ((pr - orr) - (ps - os_))
    return (weights * -torch.nn.functional.logsigmoid(margin)).sum()


def spin_nemo_aligner_float32_sign_error(pr, ps, orr, os_, *, beta=0.1):
    """Bug in float32 code: the margin's sign flipped (rewards the synthetic responses)."""
    return spin_nemo_aligner_float32(ps, pr, os_, orr, beta=beta)


def spin_nemo_aligner_float32_sum(pr, ps, orr, os_, *, beta=0.1):
    """Bug in float32 code: the per-pair terms summed, not averaged."""
    return spin_nemo_aligner_float32(pr, ps, orr, os_, beta=beta) * pr.numel()


def _weights(w, n, like):
    return torch.full((n,), 1.0 / n, dtype=like.dtype) if w is None else w / w.sum()


def spin_torch_softplus(pr, ps, orr, os_, *, beta=0.1, pair_weights=None, threshold=20.0):
    """Right, except for torch.nn.functional.softplus, which returns x itself above its threshold (20)."""
    r, rs = beta * (pr - orr), beta * (ps - os_)
    return (_weights(pair_weights, r.numel(), r) * torch.nn.functional.softplus(rs - r, threshold=threshold)).sum()


def space_torch_softplus(pr, ps, orr, os_, *, mu=1.0, beta=1.0, real_weights=None, synthetic_weights=None, threshold=20.0):
    """Right, except for torch's softplus (the large-reward cases have arguments above 20 too)."""
    r, rs = beta * (pr - orr), beta * (ps - os_)
    pi, rho = _weights(real_weights, r.numel(), r), _weights(synthetic_weights, rs.numel(), rs)
    log_mu, softplus = math.log(mu), torch.nn.functional.softplus
    return (pi * softplus(log_mu - r, threshold=threshold)).sum() + mu * (rho * softplus(rs - log_mu, threshold=threshold)).sum()


def space_softplus_threshold_15(pr, ps, orr, os_, **kwargs):
    """Right, except for a softplus thresholded at 15 (x itself above 15), an error up to 3e-7."""
    return space_torch_softplus(pr, ps, orr, os_, threshold=15.0, **kwargs)


def in_float32(fn):
    """``fn`` run on its inputs (and weight tensors) cast to float32: the reference objectives
    wrapped so are correct float32 code; the IRIS mutants so are float32 code with a real bug."""

    def cast(x):
        return x.float() if isinstance(x, Tensor) else x

    def wrapped(*args, **kwargs):
        return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    wrapped.__name__ = wrapped.__qualname__ = f"{fn.__name__}_in_float32"
    return wrapped


NUMERICAL_ONLY = {  # (objective, function, weights selection, the audit's verdict)
    "nemo_aligner_float32": ("spin", spin_nemo_aligner_float32, "uniform", "matches up to float32 rounding"),
    "float32_constants": ("spin", spin_float32_constants, "all", "matches up to float32 rounding"),
    "spin_torch_softplus": ("spin", spin_torch_softplus, "all", "matches up to the softplus threshold (20, torch's default)"),
    "space_torch_softplus": ("space", space_torch_softplus, "all", "matches up to the softplus threshold (20, torch's default)"),
}
FLOAT32_MUTANTS = {  # float32 code with a real bug: (objective, function, weights selection)
    "nemo_aligner_sign_error": ("spin", spin_nemo_aligner_float32_sign_error, "uniform"),
    "nemo_aligner_sum": ("spin", spin_nemo_aligner_float32_sum, "uniform"),
    **{f"{name}_in_float32": ("iris", in_float32(fn), "all") for name, fn in MUTANTS.items()},
}

__all__ = [
    "MUTANTS",
    "NUMERICAL_ONLY",
    "FLOAT32_MUTANTS",
    "in_float32",
    "space_softplus_threshold_15",
    *[spec[1].__name__ for spec in NUMERICAL_ONLY.values()],
    *[spec[1].__name__ for spec in FLOAT32_MUTANTS.values() if spec[0] == "spin"],
    "SCHEDULE_MUTANTS",
    "FIXED_POINT_MUTANTS",
    "COARSE_SERIES_THRESHOLD",
    *[f.__name__ for f in MUTANTS.values()],
    *[f.__name__ for f in SCHEDULE_MUTANTS.values()],
    *[f.__name__ for f in FIXED_POINT_MUTANTS.values()],
]
