"""Exact divergences between categorical distributions.

Used by the theory tests and the tabular laboratory to compute, independently of the
objectives, the values the objectives' optima must reach (THEORY.md §2-3). Never used by
training.

Conventions
-----------
* ``q`` and ``p`` are arrays of non-negative probabilities, numpy float64 or torch float64,
  of any (equal) shape; an array is ONE distribution over all its entries, so a joint table
  ``p(x) p(y|x)`` of shape (prompts, responses) is passed as is.
* Inputs must sum to 1 within 1e-6; they are then renormalised exactly, so a vector summing
  to 1 - 1e-16 gives the same value as its normalised version.
* Zeros follow the measure-theoretic conventions: 0·log(0/p) = 0, q·log(q/0) = +inf for
  q > 0, 0^a = 0 for a > 0. Infinite divergences are returned as ``inf``.
* Natural logarithms. numpy inputs give a Python float; torch inputs give a 0-dim tensor
  that is differentiable wherever the value is finite.
* Argument order follows the divergence: ``kl(q, p)`` is KL(Q‖P). In the theory Q = p_data
  (annotated data) and P = p_θt (the opponent).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
import torch

__all__ = [
    "kl",
    "reverse_kl",
    "renyi",
    "js",
    "hellinger_squared",
    "bhattacharyya",
    "chi2",
    "total_variation",
]

_SUM_TOLERANCE = 1e-6
# Below this size of |exponent * log-ratio| the log1p/expm1 form of log Σ q e^{t L} is used:
# it keeps relative accuracy of R_α as α → 1 and α → 0, where log Σ is O(t) and is divided by t.
_SERIES_RADIUS = 1.0


class _Backend:
    """The handful of array operations the formulas need, for numpy or torch."""

    def __init__(self, is_torch: bool):
        self.is_torch = is_torch

    def log(self, x):
        return torch.log(x) if self.is_torch else np.log(x)

    def log1p(self, x):
        return torch.log1p(x) if self.is_torch else np.log1p(x)

    def expm1(self, x):
        return torch.expm1(x) if self.is_torch else np.expm1(x)

    def sqrt(self, x):
        return torch.sqrt(x) if self.is_torch else np.sqrt(x)

    def logsumexp(self, x):
        return torch.logsumexp(x, dim=0) if self.is_torch else scipy.special.logsumexp(x)

    def total(self, x):
        # An empty selection sums to an exact zero of the right kind.
        return x.sum() if self.is_torch else np.sum(x)

    def out(self, value):
        """A finite or infinite result in the input's kind (float or 0-dim float64 tensor)."""
        if self.is_torch:
            if isinstance(value, torch.Tensor):
                return value.reshape(())
            return torch.tensor(float(value), dtype=torch.float64)
        return float(value)


def _prepare(q, p):
    """Validate two distributions, flatten them and renormalise them exactly."""
    is_torch = isinstance(q, torch.Tensor) or isinstance(p, torch.Tensor)
    if is_torch:
        if not (isinstance(q, torch.Tensor) and isinstance(p, torch.Tensor)):
            raise ValueError("q and p must both be torch tensors or both be numpy arrays")
        if q.dtype != torch.float64 or p.dtype != torch.float64:
            raise ValueError(f"torch inputs must be float64, got {q.dtype} and {p.dtype}")
        detached = (q.detach().cpu().numpy(), p.detach().cpu().numpy())
    else:
        q = np.asarray(q, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        detached = (q, p)
    if tuple(q.shape) != tuple(p.shape):
        raise ValueError(f"q and p must have the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")
    if (q.numel() if is_torch else q.size) == 0:
        raise ValueError("distributions must have at least one entry")
    for name, values in zip(("q", "p"), detached):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} has non-finite entries")
        if np.any(values < 0):
            raise ValueError(f"{name} has negative entries")
        total = float(values.sum())
        if abs(total - 1.0) > _SUM_TOLERANCE:
            raise ValueError(f"{name} must sum to 1 (within {_SUM_TOLERANCE}), sums to {total!r}")
    q = q.reshape(-1)
    p = p.reshape(-1)
    return _Backend(is_torch), q / q.sum(), p / p.sum()


def _mask(x):
    return x > 0


def kl(q, p):
    """KL(Q‖P) = Σ_i q_i·log(q_i/p_i); +inf if some q_i > 0 has p_i = 0."""
    xp, q, p = _prepare(q, p)
    support = _mask(q)
    if bool((support & ~_mask(p)).any()):
        return xp.out(math.inf)
    qs, ps = q[support], p[support]
    return xp.out(xp.total(qs * (xp.log(qs) - xp.log(ps))))


def reverse_kl(q, p):
    """Reverse KL of the pair (Q, P): KL(P‖Q) = Σ_i p_i·log(p_i/q_i) (the α → 0 limit of R_α(Q‖P))."""
    return kl(p, q)


def _log_power_sum(xp, q, p, alpha):
    """log S_α with S_α = Σ_i q_i^α p_i^{1−α} over the common support, α ∉ {0, 1}.

    Both identities S_α = Σ q e^{(α−1)L} = Σ p e^{αL}, L = log(q/p), are used: the one with the
    smaller exponent, and in log1p/expm1 form when that exponent times max|L| is small, so that
    log S_α (which is O(α−1) near 1 and O(α) near 0) keeps full relative accuracy.
    """
    common = _mask(q) & _mask(p)
    if not bool(common.any()):
        return None  # disjoint supports: S_α = 0
    log_ratio = xp.log(q[common]) - xp.log(p[common])
    if abs(alpha - 1.0) <= alpha:
        base, exponent, outside = q, alpha - 1.0, _mask(q) & ~_mask(p)
    else:
        base, exponent, outside = p, alpha, _mask(p) & ~_mask(q)
    base_common = base[common]
    largest = float(log_ratio.detach().abs().max()) if xp.is_torch else float(np.abs(log_ratio).max())
    if abs(exponent) * largest <= _SERIES_RADIUS:
        # Σ_common base·e^{tL} = 1 − base(outside) + Σ_common base·(e^{tL} − 1)
        return xp.log1p(xp.total(base_common * xp.expm1(exponent * log_ratio)) - xp.total(base[outside]))
    return xp.logsumexp(xp.log(base_common) + exponent * log_ratio)


def renyi(q, p, alpha):
    """Rényi divergence in Birrell et al.'s normalisation (SIAM J. Math. Data Sci. 2021).

    R_α(Q‖P) = 1/(α(α−1))·log Σ_i q_i^α p_i^{1−α}  for α ∈ (0, 1) ∪ (1, ∞);
    R_1(Q‖P) = KL(Q‖P) and R_0(Q‖P) = KL(P‖Q) (the limits, returned exactly at α = 1, 0).

    It equals D_α/α for the classical Rényi divergence D_α = 1/(α−1)·log Σ q^α p^{1−α}, and is
    the optimal value of −L_α for IRIS of order α (THEORY.md §2). Infinite when α ≥ 1 and Q is
    not absolutely continuous w.r.t. P, or when α < 1 and the supports are disjoint.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if alpha == 1.0:
        return kl(q, p)
    if alpha == 0.0:
        return reverse_kl(q, p)
    xp, q, p = _prepare(q, p)
    if alpha > 1.0 and bool((_mask(q) & ~_mask(p)).any()):
        return xp.out(math.inf)
    log_s = _log_power_sum(xp, q, p, alpha)
    if log_s is None:
        return xp.out(math.inf)
    return xp.out(log_s / (alpha * (alpha - 1.0)))


def bhattacharyya(p, q):
    """Bhattacharyya coefficient BC(P, Q) = Σ_i sqrt(p_i q_i) ∈ [0, 1]."""
    xp, p, q = _prepare(p, q)
    return xp.out(xp.total(xp.sqrt(p * q)))


def hellinger_squared(p, q):
    """Squared Hellinger distance H²(P, Q) = ½·Σ_i (√p_i − √q_i)² = 1 − BC(P, Q) ∈ [0, 1]."""
    xp, p, q = _prepare(p, q)
    return xp.out(0.5 * xp.total((xp.sqrt(p) - xp.sqrt(q)) ** 2))


def js(p, q):
    """Jensen–Shannon divergence JS(P, Q) = ½KL(P‖M) + ½KL(Q‖M), M = (P + Q)/2; in [0, log 2]."""
    xp, p, q = _prepare(p, q)
    m = 0.5 * (p + q)
    total = 0.0
    for r in (p, q):
        support = _mask(r)
        total = total + 0.5 * xp.total(r[support] * (xp.log(r[support]) - xp.log(m[support])))
    return xp.out(total)


def chi2(q, p):
    """Pearson χ²(Q‖P) = Σ_i (q_i − p_i)²/p_i = Σ_i q_i²/p_i − 1; +inf if some q_i > 0 has p_i = 0."""
    xp, q, p = _prepare(q, p)
    if bool((_mask(q) & ~_mask(p)).any()):
        return xp.out(math.inf)
    support = _mask(p)
    with np.errstate(over="ignore"):  # a ratio beyond float range is an honest +inf
        return xp.out(xp.total((q[support] - p[support]) ** 2 / p[support]))


def total_variation(p, q):
    """Total variation distance TV(P, Q) = ½·Σ_i |p_i − q_i| ∈ [0, 1]."""
    xp, p, q = _prepare(p, q)
    return xp.out(0.5 * xp.total((p - q).abs() if xp.is_torch else np.abs(p - q)))
