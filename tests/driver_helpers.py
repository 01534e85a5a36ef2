"""Small settings shared by the driver tests (tiny model, toy task, seconds per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# 16 prompts, 2 iterations of 1 epoch, 2 optimizer steps per iteration, length 48.
SMALL = [
    "--iters", "2", "--num-samples", "16", "--eval-num-samples", "8", "--epochs", "1",
    "--global-batch-size", "8", "--micro-batch-size", "4", "--max-length", "48",
    "--max-prompt-length", "32", "--sft-epochs", "1", "--sft-patience", "0", "--sft-validation-size", "0",
    "--save-steps", "1", "--seed", "3",
]

# Numbers that must agree between two runs with the same seed (timings and memory excluded).
TIMING_KEYS = ("tokens_per_s", "step_seconds", "peak_memory_mb", "generation_seconds", "train_seconds", "checkpoint")


def small_config(output_dir, *extra: str):
    from iris_ref.config import parse_config

    return parse_config([*SMALL, "--output-dir", str(output_dir), *extra])


def comparable(summary: dict) -> list[dict]:
    """The summary's iteration entries without timing/memory/path fields."""
    out = []
    for entry in summary["iterations"]:
        clean = {}
        for key, value in entry.items():
            if key in TIMING_KEYS or key == "opponent_checkpoint":
                continue
            if key == "final" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in TIMING_KEYS}
            clean[key] = value
        out.append(clean)
    return out


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 300, script: str = "run_iris.py",
            cwd=REPO) -> subprocess.CompletedProcess:
    """The command line in a subprocess (stdout and stderr captured, so neither is a terminal)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


def read_summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
