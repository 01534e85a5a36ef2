"""Per-iteration table (printed) and PNG report of a self-play run.

Both read only the run's `summary.json` content (one entry per model: entry 0 is the starting
model, then one per iteration) and the per-step `metrics.jsonl` records of each iteration, so a
report can be rebuilt from a finished run directory with `write_report(run_dir)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

# (header, summary key, format) of the printed table.
TABLE_COLUMNS = (
    ("iter", "iteration", "{:d}"),
    ("alpha", "alpha", "{:.3f}"),
    ("gap", "gap", "{:.3f}"),
    ("loss", "loss", "{:.4f}"),
    ("margin", "rewards/margins", "{:.3f}"),
    ("logp_real", "logps/real", "{:.2f}"),
    ("logp_syn", "logps/synthetic", "{:.2f}"),
    ("acc_greedy", "heldout_accuracy", "{:.3f}"),
    ("acc_sampled", "heldout_sampled_accuracy", "{:.3f}"),
    ("answer_tv", "heldout_answer_tv", "{:.3f}"),
    ("nll/token", "heldout_nll", "{:.4f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


HELDOUT_KEYS = ("heldout_accuracy", "heldout_sampled_accuracy", "heldout_answer_tv", "heldout_nll")


def _columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The columns that have something to show: no alpha for other losses, no empty held-out ones."""
    entries = summary["iterations"]
    columns = []
    for header, key, fmt in TABLE_COLUMNS:
        if key == "alpha" and summary.get("loss", "iris") != "iris":
            continue
        if key in HELDOUT_KEYS and not any(e.get(key) is not None for e in entries):
            continue
        columns.append((header, key, fmt))
    return columns


def format_table(summary: dict[str, Any]) -> str:
    """Fixed-width table of a run's summary (missing values shown as `-`)."""
    columns = _columns(summary)
    rows = [[header for header, _, _ in columns]]
    for entry in summary["iterations"]:
        rows.append([_cell(entry.get(key), fmt) for _, key, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if not summary.get("has_heldout", True):
        lines.append("(no held-out data: pass --eval-dataset to evaluate each iteration)")
    return "\n".join(lines)


def heldout_note(iterations: list[dict[str, Any]]) -> str:
    """What an empty held-out panel says: that there is no held-out data, or, when there is (its
    NLL is drawn), that accuracy needs an exact answer checker, which only the toy tasks have."""
    if any(e.get("heldout_nll") is not None for e in iterations):
        return "no accuracy: only the toy tasks have an exact\nanswer checker (held-out NLL: left panel)"
    return "no held-out data\n(--eval-dataset)"


def read_step_metrics(run_dir: Path, iterations: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The per-step records of each self-play iteration (`iter_<t>/metrics.jsonl`), by iteration."""
    steps: dict[int, list[dict[str, Any]]] = {}
    for entry in iterations:
        t = entry["iteration"]
        if t == 0:
            continue
        path = Path(run_dir) / f"iter_{t}" / "metrics.jsonl"
        if path.exists():
            with open(path, encoding="utf-8") as handle:
                steps[t] = [json.loads(line) for line in handle if line.strip()]
    return steps


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 1:  # matplotlib warns about a legend without labelled artists
        ax.legend(fontsize=8)


def write_report(run_dir: Path, summary: Optional[dict[str, Any]] = None, path: Optional[Path] = None) -> Path:
    """Draw `report.png`: per-step loss, rewards, margins, weight ESS (iterations side by side),
    and per-iteration alpha, gap and held-out metrics. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    iterations = summary["iterations"]
    steps = read_step_metrics(run_dir, iterations)
    path = Path(path) if path is not None else run_dir / "report.png"

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    fig.suptitle(f"self-play: {summary.get('title', run_dir.name)}")

    # Per-step curves: the x axis is the global optimizer step, iteration boundaries dashed.
    def step_series(key: str):
        xs, ys, bounds, offset = [], [], [], 0
        for t in sorted(steps):
            records = steps[t]
            for i, record in enumerate(records):
                if key in record and record[key] is not None:
                    xs.append(offset + i + 1)
                    ys.append(record[key])
            offset += len(records)
            bounds.append(offset)
        return xs, ys, bounds

    def draw_steps(ax, keys_labels, title):
        bounds = []
        for key, label in keys_labels:
            xs, ys, bounds = step_series(key)
            if xs:
                ax.plot(xs, ys, label=label, lw=1)
        for b in bounds[:-1]:
            ax.axvline(b + 0.5, color="grey", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step (dashed: new iteration)")
        _legend(ax)

    draw_steps(axes[0, 0], [("loss", "loss")], "training loss")
    draw_steps(axes[0, 1], [("rewards/real", "real"), ("rewards/synthetic", "synthetic")], "rewards (beta * log-ratio)")
    draw_steps(axes[0, 2], [("rewards/margins", "margin"), ("rewards/accuracies", "accuracy")], "reward margin / accuracy")
    draw_steps(axes[0, 3], [("weights/ess_real", "real"), ("weights/ess_synthetic", "synthetic")], "weight ESS 1/sum(w^2) (max = batch size)")

    its = [e["iteration"] for e in iterations]

    def per_iter(ax, keys_labels, title, skip_start=False):
        pts_any = [False]
        for key, label in keys_labels:
            pts = [(e["iteration"], e.get(key)) for e in iterations if e.get(key) is not None]
            if skip_start:
                pts = [p for p in pts if p[0] > 0]
            if pts:
                pts_any[0] = True
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration (0 = starting model)")
        ax.set_xticks(its)
        if not pts_any[0] and keys_labels[0][0].startswith("heldout"):
            ax.text(0.5, 0.5, heldout_note(iterations), ha="center", va="center", transform=ax.transAxes)
        _legend(ax)

    if summary.get("loss", "iris") == "iris":
        per_iter(axes[1, 0], [("alpha", "alpha")], "order alpha_t", skip_start=True)
    else:
        axes[1, 0].set_axis_off()
        axes[1, 0].text(0.5, 0.5, f"no order alpha: loss {summary.get('loss')}", ha="center", va="center")
    per_iter(axes[1, 1], [("gap", "gap")], "gap (opponent scores)", skip_start=True)
    per_iter(axes[1, 2], [("heldout_nll", "NLL / token")], "held-out NLL / token of the annotated responses")
    per_iter(
        axes[1, 3],
        [("heldout_accuracy", "greedy"), ("heldout_sampled_accuracy", "sampled"), ("heldout_answer_tv", "answer TV")],
        "held-out accuracy / answer-distribution TV (toy tasks)",
    )
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
