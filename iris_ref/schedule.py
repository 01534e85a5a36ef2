"""The order α per iteration (THEORY.md §4, a [design] reconstruction).

The gap between the opponent and the data is measured from numbers the pipeline already
has: the opponent's log-probabilities of the annotated and of its own synthetic responses.
Each response is scored by its per-token log-likelihood s(y) = log p_θt(y|x)/|y|. At the
fixed point both score samples come from one distribution; the further apart model and data
are, the better the opponent's own likelihood separates them. The default gap is the
two-sample discrepancy |2·AUC − 1| of the scores (Mann–Whitney, ties counted half), which is
scale-free, lies in [0, 1] and is 0 in expectation at the fixed point.

The adaptive schedule is guarded: it follows the SMALLEST gap seen so far, relative to the
first one,

    g_t = min(|gap_0|, …, |gap_t|),   α_t = α_min + (α_max − α_min)·clip(g_t/|gap_0|, 0, 1),

so α_0 = α_max (sharp importance weighting, the χ² regime at the default α_max = 2) and α
moves towards α_min (smooth weighting, the symmetric regime at the default ½) as the gap
closes, and α NEVER rises. Why the running minimum: the first version used gap_t itself, and
on the toy task at a high learning rate that was a positive feedback loop: α = 2 degraded the
model, the degraded model's gap grew (0.12 → 0.20 → 0.33), the schedule answered with α back at
2, and the model collapsed. A growing gap is reported instead by `gap_warning` (the latest gap
above `factor` × the running minimum of the earlier ones: the model is moving away from the
data). Gaps are used by magnitude, because the "mean" gap is signed.

The whole history gap_0..gap_t is an input (`AlphaSchedule.alpha_for(t, gaps)`): the caller
keeps it, across --resume too; nothing here has state.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "per_token_scores",
    "auc_gap",
    "mean_score_gap",
    "adaptive_alpha",
    "gap_warning",
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


def _gap_history(gaps, name: str = "gaps") -> list:
    """The magnitudes |gap_0|, …, |gap_t| as floats; ValueError on empty or non-finite input."""
    if isinstance(gaps, (str, bytes)) or not hasattr(gaps, "__len__"):
        raise ValueError(f"{name} must be a sequence of numbers gap_0..gap_t, got {type(gaps).__name__}")
    try:
        values = [abs(float(g)) for g in gaps]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a sequence of numbers gap_0..gap_t: {error}") from None
    if not values:
        raise ValueError(f"{name} is empty: the schedule needs at least gap_0")
    bad = [i for i, g in enumerate(values) if not math.isfinite(g)]
    if bad:
        raise ValueError(f"{name} must be finite; gap_{bad[0]} is {values[bad[0]]}")
    return values


def _check_orders(alpha_min: float, alpha_max: float) -> tuple:
    alpha_min = _check_order(alpha_min, "alpha_min")
    alpha_max = _check_order(alpha_max, "alpha_max")
    if alpha_min > alpha_max:
        raise ValueError(f"alpha_min ({alpha_min}) must not exceed alpha_max ({alpha_max})")
    return alpha_min, alpha_max


def adaptive_alpha(gaps: Sequence[float], alpha_min: float = 0.5, alpha_max: float = 2.0) -> float:
    """α_t = α_min + (α_max − α_min)·clip(g_t/gap_0, 0, 1) with g_t = min(gap_0, …, gap_t).

    gaps: the history gap_0..gap_t, used by magnitude (the signed mean-score gap can be
    negative). A zero gap_0 (already at the fixed point) gives α_min. The result is clamped
    into [α_min, α_max] against rounding. α_t is non-increasing in t for every history: it
    moves only when a new smallest gap is seen.
    """
    alpha_min, alpha_max = _check_orders(alpha_min, alpha_max)
    values = _gap_history(gaps)
    first, smallest = values[0], min(values)
    if first == 0.0:
        return alpha_min
    fraction = min(1.0, max(0.0, smallest / first))
    # Clamped because α_min + (α_max − α_min)·1 can round past α_max.
    return min(alpha_max, max(alpha_min, alpha_min + (alpha_max - alpha_min) * fraction))


def gap_warning(gaps: Sequence[float], factor: float = 1.5) -> Optional[str]:
    """A one-line warning when the latest gap exceeds `factor` × the smallest earlier gap, else None.

    gaps: the history gap_0..gap_t (magnitudes are compared). With fewer than two gaps there is
    nothing to compare and the answer is None. factor must be finite and >= 1.
    """
    factor = float(factor)
    if not math.isfinite(factor) or factor < 1.0:
        raise ValueError(f"factor must be a finite number >= 1, got {factor}")
    values = _gap_history(gaps)
    if len(values) < 2:
        return None
    earlier = values[:-1]
    smallest = min(earlier)
    where = earlier.index(smallest)
    latest, t = values[-1], len(values) - 1
    if latest <= factor * smallest:
        return None
    if smallest == 0.0:
        return f"gap_{t} = {latest:.4g} after gap_{where} = 0: the model is moving away from the data"
    return (
        f"gap_{t} = {latest:.4g} is {latest / smallest:.2f}x the smallest earlier gap (gap_{where} = "
        f"{smallest:.4g}; warning above {factor:g}x): the model is moving away from the data"
    )


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

    kind "adaptive": from the running minimum of the gaps (THEORY.md §4), α_0 = alpha_max;
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

    def alpha_for(self, iteration: int, gaps: Sequence[float]) -> float:
        """α for `iteration` (0-based) from the gap history gap_0..gap_iteration.

        len(gaps) must be iteration + 1. The "constant" and "linear" kinds check only that
        length; "adaptive" follows the running minimum of the gaps (`adaptive_alpha`).
        """
        try:
            iteration = operator.index(iteration)
        except TypeError:
            raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}") from None
        if iteration < 0:
            raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
        if isinstance(gaps, (str, bytes)) or not hasattr(gaps, "__len__"):
            raise ValueError(f"gaps must be the sequence gap_0..gap_{iteration}, got {type(gaps).__name__}")
        if len(gaps) != iteration + 1:
            raise ValueError(
                f"alpha_for({iteration}) needs the gap history gap_0..gap_{iteration} "
                f"({iteration + 1} values), got {len(gaps)}"
            )
        if self.kind == "constant":
            return float(self.alpha)
        if self.kind == "linear":
            return linear_alpha(iteration, self.num_iterations, self.alpha_max, self.alpha_min)
        return adaptive_alpha(gaps, self.alpha_min, self.alpha_max)

    def gap_warning(self, gaps: Sequence[float], factor: float = 1.5) -> Optional[str]:
        """`gap_warning(gaps, factor)`: a one-line message when the latest gap has grown past
        `factor` × the running minimum of the earlier gaps, else None (every kind)."""
        return gap_warning(gaps, factor)
