"""Self-play objectives as pure functions of four sequence log-prob vectors.

Every objective here takes

    policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps

(1-D tensors of summed response-token log-probs) plus keyword constants, and returns an
`ObjectiveOutput` with the loss and the per-sample gradient weights a_i, b_j of THEORY.md §2:

    ∂loss/∂policy_real_logps_i      = −β·a_i
    ∂loss/∂policy_synthetic_logps_j = +β·b_j

No model code lives here. Choices:
- Rewards r = β·(policy − opponent) are formed after upcasting: float64 inputs give float64
  arithmetic, anything else (bf16, fp16, fp32) gives float32.
- Optional probability weights over the samples (π for annotated, ρ for synthetic) turn the
  batch loss into an exact population objective over a finite response set. They are
  renormalised here, because near α = 1 the tilted term divides by a tiny tilt and a weight
  vector summing to 1 − 1e-16 would otherwise move the loss by 1e-16/|α − 1|.
- The tilted mean is computed around its weighted mean with expm1/log1p while the tilt is
  small relative to the spread, and by plain log-sum-exp otherwise. That makes it exact
  through t = 0 (no series cut-off to tune) and overflow-free for any t (see `tilted_mean`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "ObjectiveOutput",
    "tilted_mean",
    "iris_loss",
    "spin_loss",
    "space_loss",
    "spif_loss",
    "weighted_surrogate",
    "OBJECTIVES",
    "get_objective",
]


@dataclass(frozen=True)
class ObjectiveOutput:
    """Result of an objective on one batch.

    loss: 0-dim, differentiable w.r.t. the policy log-probs.
    real_weights, synthetic_weights: detached gradient weights a_i, b_j (THEORY.md §2).
    real_rewards, synthetic_rewards: detached rewards β·(policy − opponent).
    """

    loss: Tensor
    real_weights: Tensor
    synthetic_weights: Tensor
    real_rewards: Tensor
    synthetic_rewards: Tensor


# --------------------------------------------------------------------------------------
# validation and small helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_vector(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one summed log-prob per sample), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _rewards(policy: Tensor, opponent: Tensor, beta: float, dtype: torch.dtype, name: str) -> Tensor:
    _as_vector(policy, f"policy_{name}_logps")
    _as_vector(opponent, f"opponent_{name}_logps")
    if policy.shape != opponent.shape:
        raise ValueError(
            f"policy_{name}_logps and opponent_{name}_logps differ in length: "
            f"{policy.numel()} vs {opponent.numel()}"
        )
    # The opponent is frozen: it never carries gradient, even if the caller forgot to detach.
    return beta * (policy.to(dtype) - opponent.detach().to(dtype))


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _normalised_log_weights(weights: Optional[Tensor], n: int, like: Tensor, name: str) -> Tensor:
    """log of the renormalised probability weights (uniform if None); −inf where a weight is 0."""
    if weights is None:
        return torch.full((n,), -math.log(n), dtype=like.dtype, device=like.device)
    if not isinstance(weights, Tensor):
        weights = torch.as_tensor(weights)
    if weights.dim() != 1 or weights.numel() != n:
        raise ValueError(f"{name} must be a 1-D tensor of length {n}, got shape {tuple(weights.shape)}")
    w = weights.detach().to(dtype=like.dtype, device=like.device)
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains non-finite values")
    if (w < 0).any():
        raise ValueError(f"{name} contains negative values")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{name} sums to zero")
    return torch.log(w / total)


def _rewards_and_log_weights(
    policy_real: Tensor,
    policy_synthetic: Tensor,
    opponent_real: Tensor,
    opponent_synthetic: Tensor,
    beta: float,
    real_weights: Optional[Tensor],
    synthetic_weights: Optional[Tensor],
    real_weights_name: str = "real_weights",
) -> tuple[float, Tensor, Tensor, Tensor, Tensor]:
    """The common preamble of every objective: validated β, rewards r and r', log π and log ρ."""
    beta = _check_positive(beta, "beta")
    dtype = _compute_dtype(policy_real, policy_synthetic, opponent_real, opponent_synthetic)
    r = _rewards(policy_real, opponent_real, beta, dtype, "real")
    rs = _rewards(policy_synthetic, opponent_synthetic, beta, dtype, "synthetic")
    log_pi = _normalised_log_weights(real_weights, r.numel(), r, real_weights_name)
    log_rho = _normalised_log_weights(synthetic_weights, rs.numel(), rs, "synthetic_weights")
    return beta, r, rs, log_pi, log_rho


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) to full precision everywhere, gradient σ(x).

    torch.nn.functional.softplus returns x itself above its threshold of 20, an error of
    e^{-20} ≈ 2e-9 that the golden vectors catch. Each branch sees a clamped argument so that
    the branch torch.where discards never produces inf (whose 0·inf would poison backward).
    """
    positive = x.clamp(min=0)
    negative = x.clamp(max=0)
    return torch.where(x > 0, positive + torch.log1p(torch.exp(-positive)), torch.log1p(torch.exp(negative)))


# --------------------------------------------------------------------------------------
# the tilted mean


def _tilted_mean_from_log_weights(z: Tensor, t: float, log_w: Tensor) -> Tensor:
    """T_t[z] = (1/t)·log Σ_i w_i e^{t z_i} with log-weights `log_w` (already normalised).

    Written as  T_t[z] = z̄ + (1/t)·log Σ_i w_i e^{t (z_i − z̄)}  with z̄ = Σ w_i z_i.
    When |t·(z_i − z̄)| ≤ 1 on the support, the last term is (1/t)·log1p(Σ w_i expm1(t d_i)):
    expm1 keeps full relative precision for tiny t·d, so dividing by t loses nothing and the
    expression tends to z̄ continuously as t → 0 (its first correction is (t/2)·Var_w z).
    Otherwise t is not small relative to the spread, 1/t amplifies rounding by at most
    max|d|, and the plain log-sum-exp is both accurate and overflow-free.
    """
    support = torch.isfinite(log_w)
    w = torch.exp(log_w)  # exact zeros off the support
    z_on = torch.where(support, z, torch.zeros_like(z))  # keeps inf·0 out of the sums
    mean = (w * z_on).sum()
    if t == 0.0:
        return mean
    d = torch.where(support, z - mean, torch.zeros_like(z))
    if float((t * d.detach()).abs().max()) <= 1.0:
        return mean + torch.log1p((w * torch.expm1(t * d)).sum()) / t
    return torch.logsumexp(t * z_on + log_w, dim=0) / t


def tilted_mean(z: Tensor, t: float, weights: Optional[Tensor] = None) -> Tensor:
    """Tilted mean T_t[z] = (1/t)·log Σ_i π_i e^{t z_i}; T_0[z] = Σ_i π_i z_i (THEORY.md §1).

    Its gradient w.r.t. z is softmax(t·z + log π). Exact and continuous through t = 0.
    `weights` are probability weights (renormalised here), uniform if None.
    """
    z = _as_vector(z, "z")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"tilt t must be finite, got {t}")
    dtype = _compute_dtype(z)
    z = z.to(dtype)
    log_w = _normalised_log_weights(weights, z.numel(), z, "weights")
    return _tilted_mean_from_log_weights(z, t, log_w)


# --------------------------------------------------------------------------------------
# objectives


def iris_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_synthetic_logps: Tensor,
    *,
    alpha: float,
    beta: float = 0.1,
    real_weights: Optional[Tensor] = None,
    synthetic_weights: Optional[Tensor] = None,
) -> ObjectiveOutput:
    """IRIS loss of order α: L_α = T_{1−α}[−r] + T_α[r'] (THEORY.md §2).

    Two independent tilted risks: the annotated term with tilt 1 − α on −r and the synthetic
    term with tilt α on r'. Gradient weights a = softmax((α−1)·r + log π),
    b = softmax(α·r' + log ρ). At its best critic −L_α is the Rényi divergence
    R_α(p_data‖p_opponent) (Birrell et al. 2021); α → 1 gives the Donsker–Varadhan KL
    objective, α → 0 reverse KL.
    """
    alpha = _check_positive(alpha, "alpha")
    beta, r, rs, log_pi, log_rho = _rewards_and_log_weights(policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps, beta, real_weights, synthetic_weights)

    loss = _tilted_mean_from_log_weights(-r, 1.0 - alpha, log_pi) + _tilted_mean_from_log_weights(rs, alpha, log_rho)
    with torch.no_grad():
        a = torch.softmax((alpha - 1.0) * r + log_pi, dim=0)
        b = torch.softmax(alpha * rs + log_rho, dim=0)
    return ObjectiveOutput(loss, a, b, r.detach(), rs.detach())


def spin_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_synthetic_logps: Tensor,
    *,
    beta: float = 0.1,
    pair_weights: Optional[Tensor] = None,
) -> ObjectiveOutput:
    """SPIN (Chen et al., ICML 2024): L = Σ π·softplus(−(r_i − r'_ik)) over the pairs of a prompt.

    β is SPIN's λ. With one synthetic response per prompt the pairs are (i, i) and
    a_i = b_i = π_i·σ(r'_i − r_i). With K per prompt (synthetic length K·N, prompt-major: prompt
    i's responses at i·K .. i·K+K−1) every (annotated, synthetic) pair of a prompt is a term,
    π is over the N·K pairs, b_ik = π_ik·σ(r'_ik − r_i) and a_i = Σ_k b_ik. Invariant to adding
    a constant per prompt.
    """
    n_real, n_synthetic = policy_real_logps.numel(), policy_synthetic_logps.numel()
    if n_real == 0 or n_synthetic % n_real:
        raise ValueError(
            f"spin_loss pairs annotated and synthetic responses of the same prompt: lengths differ ({n_real} vs "
            f"{n_synthetic}); the synthetic length must be K times the annotated one")
    k = n_synthetic // n_real
    beta = _check_positive(beta, "beta")
    dtype = _compute_dtype(policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps)
    r = _rewards(policy_real_logps, opponent_real_logps, beta, dtype, "real")
    rs = _rewards(policy_synthetic_logps, opponent_synthetic_logps, beta, dtype, "synthetic")
    pi = torch.exp(_normalised_log_weights(pair_weights, n_synthetic, rs, "pair_weights"))
    margin = r.repeat_interleave(k) - rs
    loss = (pi * _softplus(-margin)).sum()
    with torch.no_grad():
        b = pi * torch.sigmoid(-margin)
        a = b.view(n_real, k).sum(dim=1)
    return ObjectiveOutput(loss, a, b, r.detach(), rs.detach())


def space_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_synthetic_logps: Tensor,
    *,
    mu: float = 1.0,
    beta: float = 1.0,
    real_weights: Optional[Tensor] = None,
    synthetic_weights: Optional[Tensor] = None,
) -> ObjectiveOutput:
    """SPACE (Wang et al., NeurIPS 2025): noise-contrastive estimation, μ synthetic per annotated.

    L = Σ π_i softplus(log μ − r_i) + μ·Σ ρ_j softplus(r'_j − log μ);
    a_i = π_i σ(log μ − r_i), b_j = μ ρ_j σ(r'_j − log μ). Optimal critic log(p_data/p_opponent).
    """
    mu = _check_positive(mu, "mu")
    beta, r, rs, log_pi, log_rho = _rewards_and_log_weights(policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps, beta, real_weights, synthetic_weights)
    pi, rho = torch.exp(log_pi), torch.exp(log_rho)
    log_mu = math.log(mu)
    loss = (pi * _softplus(log_mu - r)).sum() + mu * (rho * _softplus(rs - log_mu)).sum()
    with torch.no_grad():
        a = pi * torch.sigmoid(log_mu - r)
        b = mu * rho * torch.sigmoid(rs - log_mu)
    return ObjectiveOutput(loss, a, b, r.detach(), rs.detach())


def spif_loss(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_synthetic_logps: Tensor,
    *,
    beta: float = 0.1,
    reward_bound: Optional[float] = None,
    real_weights: Optional[Tensor] = None,
    synthetic_weights: Optional[Tensor] = None,
) -> ObjectiveOutput:
    """SPIF, reconstructed as the Pearson-χ² variational objective (THEORY.md §2, [design]).

    L = −Σ π_i r_i + Σ ρ_j (r'_j + r'_j²/4), rewards optionally clamped to |r| ≤ B.
    a_i = π_i, b_j = ρ_j (1 + r'_j/2), both zero where the reward is clamped.
    Optimal critic 2(p_data/p_opponent − 1), optimal value −χ²(p_data‖p_opponent).
    """
    if reward_bound is not None:
        reward_bound = _check_positive(reward_bound, "reward_bound")
    beta, r, rs, log_pi, log_rho = _rewards_and_log_weights(policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps, beta, real_weights, synthetic_weights)
    pi, rho = torch.exp(log_pi), torch.exp(log_rho)
    if reward_bound is None:
        r_used, rs_used = r, rs
        real_active = torch.ones_like(r)
        synthetic_active = torch.ones_like(rs)
    else:
        r_used = r.clamp(-reward_bound, reward_bound)
        rs_used = rs.clamp(-reward_bound, reward_bound)
        # Strictly inside the bound the clamp passes the gradient; outside it is zero.
        real_active = (r.detach().abs() <= reward_bound).to(r.dtype)
        synthetic_active = (rs.detach().abs() <= reward_bound).to(rs.dtype)
    loss = -(pi * r_used).sum() + (rho * (rs_used + rs_used.square() / 4)).sum()
    with torch.no_grad():
        a = pi * real_active
        b = rho * (1 + rs_used / 2) * synthetic_active
    return ObjectiveOutput(loss, a, b, r.detach(), rs.detach())


def weighted_surrogate(
    policy_real_logps: Tensor,
    policy_synthetic_logps: Tensor,
    real_weights: Tensor,
    synthetic_weights: Tensor,
    beta: float,
) -> Tensor:
    """β·(Σ b_j·policy_synthetic_j − Σ a_i·policy_real_i) with the weights held fixed.

    Its gradient is the objective's gradient whenever the weights are the ones the objective
    returned for the same log-probs (THEORY.md §2). This is how the trainer stays exact under
    gradient accumulation and data parallelism (claim I3): the weights are computed once over
    the whole global batch, then each micro-batch back-propagates its slice of this sum. The
    value is not the loss; log the objective's `.loss` instead.
    """
    dtype = _compute_dtype(policy_real_logps, policy_synthetic_logps)
    real_weights = real_weights.detach().to(dtype=dtype, device=policy_real_logps.device)
    synthetic_weights = synthetic_weights.detach().to(dtype=dtype, device=policy_synthetic_logps.device)
    if real_weights.shape != policy_real_logps.shape or synthetic_weights.shape != policy_synthetic_logps.shape:
        raise ValueError(
            "weighted_surrogate: weights and log-probs differ in shape: "
            f"{tuple(real_weights.shape)} vs {tuple(policy_real_logps.shape)}, "
            f"{tuple(synthetic_weights.shape)} vs {tuple(policy_synthetic_logps.shape)}"
        )
    return beta * (
        (synthetic_weights * policy_synthetic_logps.to(dtype)).sum() - (real_weights * policy_real_logps.to(dtype)).sum()
    )


OBJECTIVES: dict[str, Callable[..., ObjectiveOutput]] = {
    "iris": iris_loss,
    "spin": spin_loss,
    "space": space_loss,
    "spif": spif_loss,
}


def get_objective(name: str) -> Callable[..., ObjectiveOutput]:
    """The objective function registered under `name` ("iris", "spin", "space", "spif")."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}") from None
