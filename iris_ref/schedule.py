"""The order α per iteration (THEORY.md §4, a [design] reconstruction).

The gap between the opponent and the data is measured from numbers the pipeline already
has: the opponent's log-probabilities of the annotated and of its own synthetic responses.
Each response is scored by its per-token log-likelihood s(y) = log p_θt(y|x)/|y|. At the
fixed point both score samples come from one distribution; the further apart model and data
are, the better the opponent's own likelihood separates them. The default gap is the
two-sample discrepancy |2·AUC − 1| of the scores (Mann–Whitney, ties counted half), which is
scale-free, lies in [0, 1] and is 0 in expectation at the fixed point.

The adaptive schedule maps the gap, relative to the first iteration's, linearly onto
[α_min, α_max]: sharp importance weighting (α_max = 2, the χ² regime) while the gap is as
large as at the start, smooth weighting (α_min = ½, the symmetric regime) as it closes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "per_token_scores",
    "auc_gap",
    "mean_score_gap",
    "adaptive_alpha",
    "linear_alpha",
    "AlphaSchedule",
    "SCHEDULE_KINDS",
    "GAP_KINDS",
]

SCHEDULE_KINDS = ("adaptive", "constant", "linear")
GAP_KINDS = ("auc", "mean")


def _scores(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def per_token_scores(sequence_logps, lengths) -> np.ndarray:
    """s(y) = log p(y|x) / |y|: summed response log-probs divided by response token counts."""
    logps = np.asarray(sequence_logps, dtype=np.float64).reshape(-1)
    n = np.asarray(lengths, dtype=np.float64).reshape(-1)
    if logps.shape != n.shape:
        raise ValueError(f"per_token_scores: {logps.size} log-probs but {n.size} lengths")
    if (n <= 0).any():
        raise ValueError("per_token_scores: every response needs at least one token")
    return logps / n


def auc_gap(real_scores, synthetic_scores) -> float:
    """|2·AUC − 1| with AUC = P(s(y') > s(y)) + ½·P(s(y') = s(y)) over all pairs."""
    real = _scores(real_scores, "real_scores")
    synthetic = _scores(synthetic_scores, "synthetic_scores")
    # Mann–Whitney U from average ranks handles ties exactly (each tie counts ½).
    ranks = rankdata(np.concatenate([synthetic, real]))
    n_s, n_r = synthetic.size, real.size
    u = ranks[:n_s].sum() - n_s * (n_s + 1) / 2.0
    auc = u / (n_s * n_r)
    return float(min(1.0, abs(2.0 * auc - 1.0)))


def mean_score_gap(real_scores, synthetic_scores) -> float:
    """mean s(y') − mean s(y). Signed: negative when the data has lower entropy than the model."""
    return float(_scores(synthetic_scores, "synthetic_scores").mean() - _scores(real_scores, "real_scores").mean())


def _check_order(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def adaptive_alpha(gap: float, first_gap: float, alpha_min: float = 0.5, alpha_max: float = 2.0) -> float:
    """α = α_min + (α_max − α_min)·clip(gap/first_gap, 0, 1); a zero first gap gives α_min.

    A negative gap (possible with the signed mean-score gap) is treated by its magnitude.
    """
    alpha_min = _check_order(alpha_min, "alpha_min")
    alpha_max = _check_order(alpha_max, "alpha_max")
    if alpha_min > alpha_max:
        raise ValueError(f"alpha_min ({alpha_min}) must not exceed alpha_max ({alpha_max})")
    gap, first_gap = abs(float(gap)), abs(float(first_gap))
    if not (math.isfinite(gap) and math.isfinite(first_gap)):
        raise ValueError(f"gaps must be finite, got gap={gap}, first_gap={first_gap}")
    if first_gap == 0.0:
        return alpha_min
    fraction = min(1.0, max(0.0, gap / first_gap))
    # Clamped because α_min + (α_max − α_min)·1 can round past α_max.
    return min(alpha_max, max(alpha_min, alpha_min + (alpha_max - alpha_min) * fraction))


def linear_alpha(iteration: int, num_iterations: int, alpha_start: float = 2.0, alpha_end: float = 0.5) -> float:
    """α moves linearly from alpha_start at iteration 0 to alpha_end at the last iteration."""
    alpha_start = _check_order(alpha_start, "alpha_start")
    alpha_end = _check_order(alpha_end, "alpha_end")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if not 0 <= iteration < num_iterations:
        raise ValueError(f"iteration {iteration} outside [0, {num_iterations})")
    if num_iterations == 1:
        return alpha_start
    if iteration == num_iterations - 1:
        return alpha_end  # exactly, not up to rounding
    return alpha_start + (alpha_end - alpha_start) * iteration / (num_iterations - 1)


@dataclass(frozen=True)
class AlphaSchedule:
    """α_t for iteration t.

    kind "adaptive": from the gap (THEORY.md §4), α_0 = alpha_max;
    kind "constant": always `alpha`;
    kind "linear":   alpha_max at the first iteration down to alpha_min at the last.
    `gap` names the discrepancy used by the adaptive kind: "auc" (default) or "mean".
    """

    kind: str = "adaptive"
    alpha: float = 1.0
    alpha_min: float = 0.5
    alpha_max: float = 2.0
    num_iterations: int = 3
    gap: str = "auc"

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown alpha schedule {self.kind!r}; choose one of {list(SCHEDULE_KINDS)}")
        if self.gap not in GAP_KINDS:
            raise ValueError(f"unknown gap {self.gap!r}; choose one of {list(GAP_KINDS)}")
        _check_order(self.alpha, "alpha")
        _check_order(self.alpha_min, "alpha_min")
        _check_order(self.alpha_max, "alpha_max")
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must not exceed alpha_max ({self.alpha_max})")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")

    def measure_gap(self, real_scores, synthetic_scores) -> float:
        """The configured gap between the opponent's scores of annotated and synthetic responses."""
        if self.gap == "auc":
            return auc_gap(real_scores, synthetic_scores)
        return mean_score_gap(real_scores, synthetic_scores)

    def alpha_for(self, iteration: int, gap: float, first_gap: float) -> float:
        """α for `iteration` given this iteration's gap and the first iteration's gap."""
        if self.kind == "constant":
            return float(self.alpha)
        if self.kind == "linear":
            return linear_alpha(iteration, self.num_iterations, self.alpha_max, self.alpha_min)
        return adaptive_alpha(gap, first_gap, self.alpha_min, self.alpha_max)
