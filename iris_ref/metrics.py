"""Per-step metrics: what each optimizer step reports, and where it is written.

Names follow TRL/torchtune: `loss`, `rewards/real`, `rewards/synthetic`, `rewards/margins`
(mean over every (annotated, synthetic) pair of a prompt), `rewards/accuracies` (fraction of
those pairs whose annotated reward is higher), `logps/real`, `logps/synthetic` (mean summed
log-probs), `weights/ess_real`, `weights/ess_synthetic` (effective sample size 1/Σŵ² of the
normalised |gradient weights|; at most the number of samples), then the trainer's `lr`,
`grad_norm`, `tokens` (non-padding tokens of the step's training forwards, all ranks),
`padding_fraction` (padding / all tokens computed), `scoring_pass` (1 when the step ran a
scoring pass, 0 when it kept its graphs), `graph_memory_gib` (the estimate it decided on),
`step_seconds`, `tokens_per_s`, `peak_memory_mb`, `step`, `epoch`.

`MetricsLog` appends one JSON line per step to `metrics.jsonl` (rank 0), and with
`--report-to tensorboard` also writes TensorBoard scalars (tag = metric name, global step =
steps of all iterations so far), through `torch.utils.tensorboard.SummaryWriter`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from iris_ref import distributed, files


def ess(weights: torch.Tensor) -> float:
    """Effective sample size 1/Σŵ² of the normalised absolute weights (0 if all are 0)."""
    w = weights.detach().double().abs()
    total = w.sum()
    if total <= 0:
        return 0.0
    w = w / total
    return float(1.0 / (w * w).sum())


def objective_metrics(out, real_logps: torch.Tensor, synthetic_logps: torch.Tensor) -> dict[str, float]:
    """The TRL-style metrics of one global batch from the objective's output."""
    real, synthetic = out.real_rewards.double(), out.synthetic_rewards.double()
    per_prompt = synthetic.numel() // real.numel()
    margins = real.repeat_interleave(per_prompt) - synthetic
    return {
        "loss": float(out.loss.detach()),
        "rewards/real": float(real.mean()),
        "rewards/synthetic": float(synthetic.mean()),
        "rewards/margins": float(margins.mean()),
        "rewards/accuracies": float((margins > 0).double().mean()),
        "logps/real": float(real_logps.double().mean()),
        "logps/synthetic": float(synthetic_logps.double().mean()),
        "weights/ess_real": ess(out.real_weights),
        "weights/ess_synthetic": ess(out.synthetic_weights),
    }


def summarise(history: list[dict]) -> dict[str, Any]:
    """The mean of every per-step metric over a phase, plus the last step's values."""
    summary: dict[str, Any] = {"steps": len(history)}
    if not history:
        return summary
    for key in history[0]:
        if key not in ("step", "epoch"):
            summary[key] = float(np.mean([h[key] for h in history if key in h]))
    summary["final"] = dict(history[-1])
    return summary


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class MetricsLog:
    """The per-step records of one training phase: `metrics.jsonl`, and TensorBoard events if asked.

    A resumed phase replays the steps after its last saved state (`resume_step`); the records
    of those steps from before the crash are dropped when the log is opened, so the file ends
    up equal to an uninterrupted run's.
    """

    def __init__(self, path: Path, iteration: int, *, resume_step: Optional[int] = None,
                 tensorboard_dir: Optional[Path] = None, step_offset: int = 0):
        self.path, self.iteration, self.step_offset = Path(path), iteration, step_offset
        if self.path.exists():
            kept = [r for r in files.read_jsonl(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
            files.write_jsonl(self.path, kept)
        self._writer = None
        if tensorboard_dir is not None and distributed.is_main_process():
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def __call__(self, record: dict) -> None:
        record = {"iteration": self.iteration, **{k: _plain(v) for k, v in record.items()}}
        if not distributed.is_main_process():
            return
        with files.writing(self.path), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = self.step_offset + int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "iteration"):
                    self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()
