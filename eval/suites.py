"""Benchmark suites: which lm-eval tasks, with how many shots, scored by which metric.

Every name below was checked against the task registry of the installed lm-eval (0.4.13):
``lm_eval.tasks.TaskManager().task_index`` lists each of them, and the metric keys are the
``"<metric>,<filter>"`` keys that ``simple_evaluate`` writes into ``results["results"][task]``.

Choices, and why:

* ``iris10`` is the ten-benchmark table of the self-play papers this method follows (T-SPIN,
  IRIS): the six Open LLM Leaderboard v2 tasks (lm-eval's ``leaderboard_*`` tasks, with the
  leaderboard's own shot counts and metrics) plus GSM8K, MMLU, HellaSwag and WinoGrande with
  the v1 leaderboard's shots. MATH is ``leaderboard_math_hard`` (the level-5 MATH subset the
  v2 leaderboard uses, 4-shot, exact match); IFEval is reported as prompt-level strict
  accuracy (the raw JSON also holds the instruction-level and loose variants).
* ``openllm6`` is the Open LLM Leaderboard v1 table that SPIN reported: ARC-Challenge 25,
  HellaSwag 10, TruthfulQA-mc2 0, MMLU 5, WinoGrande 5, GSM8K 5.
* ``toy`` is the local task pack in ``eval/tasks/`` (one multiple-choice and one
  generate-until task on the embedded toy data), so the whole code path runs offline.

GSM8K is scored with the ``strict-match`` filter (the ``#### <number>`` answer format the
few-shot examples teach), as the leaderboards did; ``flexible-extract`` is in the raw JSON.
Group tasks (MMLU, BBH, GPQA, MATH-hard, MuSR) report lm-eval's size-weighted group mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TOY_TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    """One column of a benchmark table.

    ``task`` is the lm-eval task or group name; ``num_fewshot`` the shot count passed to
    ``simple_evaluate`` (``None``: the task's own default); ``metric`` the key in
    ``results["results"][task]`` (``None``: the first metric lm-eval reports, used for tasks
    named on the command line outside any suite); ``label`` the name shown in tables.
    """

    task: str
    num_fewshot: int | None
    metric: str | None
    label: str

    @property
    def metric_name(self) -> str:
        return "auto" if self.metric is None else self.metric.split(",")[0]


SUITES: dict[str, tuple[TaskSpec, ...]] = {
    "iris10": (
        TaskSpec("gsm8k", 5, "exact_match,strict-match", "GSM8K"),
        TaskSpec("leaderboard_math_hard", 4, "exact_match,none", "MATH"),
        TaskSpec("leaderboard_musr", 0, "acc_norm,none", "MuSR"),
        TaskSpec("mmlu", 5, "acc,none", "MMLU"),
        TaskSpec("leaderboard_mmlu_pro", 5, "acc,none", "MMLU-Pro"),
        TaskSpec("leaderboard_gpqa", 0, "acc_norm,none", "GPQA"),
        TaskSpec("hellaswag", 10, "acc_norm,none", "HellaSwag"),
        TaskSpec("winogrande", 5, "acc,none", "WinoGrande"),
        TaskSpec("leaderboard_bbh", 3, "acc_norm,none", "BBH"),
        TaskSpec("leaderboard_ifeval", 0, "prompt_level_strict_acc,none", "IFEval"),
    ),
    "openllm6": (
        TaskSpec("arc_challenge", 25, "acc_norm,none", "ARC-Challenge"),
        TaskSpec("hellaswag", 10, "acc_norm,none", "HellaSwag"),
        TaskSpec("truthfulqa_mc2", 0, "acc,none", "TruthfulQA-mc2"),
        TaskSpec("mmlu", 5, "acc,none", "MMLU"),
        TaskSpec("winogrande", 5, "acc,none", "WinoGrande"),
        TaskSpec("gsm8k", 5, "exact_match,strict-match", "GSM8K"),
    ),
    "toy": (
        TaskSpec("toy_mc", 0, "acc,none", "Toy-MC"),
        TaskSpec("toy_gen", 0, "exact_match,none", "Toy-Gen"),
    ),
}

# Suites whose tasks live in this repository rather than in lm-eval's built-in registry.
LOCAL_SUITES = {"toy": TOY_TASKS_DIR}


def get_suite(name: str) -> tuple[TaskSpec, ...]:
    """The task specs of a suite; ``ValueError`` naming the known suites otherwise."""
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(
            f"unknown suite {name!r}; known suites: {', '.join(sorted(SUITES))}"
        ) from None


def suite_markdown(name: str) -> str:
    """The suite as a markdown table (task, lm-eval name, shots, metric) for docs and reports."""
    lines = ["| Task | lm-eval task | Shots | Metric |", "|---|---|---|---|"]
    for spec in get_suite(name):
        lines.append(f"| {spec.label} | `{spec.task}` | {spec.num_fewshot} | `{spec.metric}` |")
    return "\n".join(lines)
