"""The paper's comparison in miniature, on the embedded toy task: IRIS against its baselines.

    python bench/method_comparison.py                      # the committed run (3 seeds, 3 iterations)
    python bench/method_comparison.py --seeds 0 --iters 1 --methods iris-adaptive sft --num-train 256

Two experiments, both through the real pipeline (``iris_ref.selfplay.run`` for every
self-play method; ``iris_ref.trainer.train_iteration`` + ``iris_ref.evaluation.evaluate``
for the SFT arms, the same functions the driver calls):

1. **Method comparison.** Per seed, one starting SFT model (the embedded default's warm-up:
   a tiny Qwen2 model trained with plain NLL on the toy training set), then from that same
   model: IRIS with the adaptive α schedule, IRIS at fixed α ∈ {0.5, 1, 2}, SPIN, SPACE,
   SPIF, and continued SFT, each for ``--iters`` iterations with the same optimiser, data,
   epochs and batch size, hence the same number of gradient steps per iteration.
2. **Data efficiency** (the analogue of "IRIS on 26k annotated samples beats SFT on the full
   200k"): per seed, a starting model warmed up on a fraction of the annotated data only;
   from it, IRIS (adaptive) on that fraction, and SFT on ALL the annotated data (4x the
   data and 4x the gradient steps at fraction 0.25), plus SFT on the fraction (the
   equal-data control). The main comparison's starting model (SFT on all the data from
   scratch) is reported beside them.

Held-out metrics per iteration (``iris_ref.evaluation``; the toy task has several valid
answers per prompt and its annotated answers are uniform over them):
``heldout_nll`` (SFT's own objective), greedy and sampled accuracy, ``heldout_correct_mass``
(exact probability of a valid answer) and ``heldout_answer_tv`` (exact total-variation
distance between the model's answer distribution and the data's). Mean ± sample std over
seeds, and the paired difference to continued SFT at the last iteration.

Outputs: ``bench/results/method_comparison.{json,md,png}`` and
``bench/results/data_efficiency.{json,md,png}``, each with the exact command in its header.
Work files (checkpoints, per-job results) go to ``--work-dir``; a finished job's
``result.json`` is reused when its options are the same (so an interrupted bench continues
where it stopped) and redone otherwise; ``--fresh`` starts from nothing.

CPU threads: every job runs in its own process with ``torch.set_num_threads(threads)``;
``--workers 2 --threads 1`` (the default) keeps both cores busy with two jobs at once,
which beats one job on two threads for a ~1M-parameter model whose matrices are too small
to split well (measured: see docs/eval.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from iris_ref.config import EMBEDDED_DEFAULTS  # noqa: E402  (stdlib-only module: cheap)

# name -> IrisConfig overrides (None: continued SFT, run by `continued_sft`).
METHODS: dict[str, dict | None] = {
    "iris-adaptive": {"loss": "iris", "alpha_schedule": "adaptive"},
    "iris-alpha0.5": {"loss": "iris", "alpha_schedule": "constant", "alpha": 0.5},
    "iris-alpha1": {"loss": "iris", "alpha_schedule": "constant", "alpha": 1.0},
    "iris-alpha2": {"loss": "iris", "alpha_schedule": "constant", "alpha": 2.0},
    "spin": {"loss": "spin"},
    "space": {"loss": "space"},
    "spif": {"loss": "spif"},
    "sft": None,
}

# metric key -> (table name, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "heldout_nll": ("held-out NLL/token", False),
    "heldout_accuracy": ("greedy accuracy", True),
    "heldout_sampled_accuracy": ("sampled accuracy", True),
    "heldout_correct_mass": ("valid-answer mass", True),
    "heldout_answer_tv": ("answer TV to data", False),
}
# Training diagnostics kept per iteration (from the trainer's summary).
DIAGNOSTICS = ("alpha", "gap", "logps/real", "logps/synthetic", "rewards/margins", "steps")


@dataclass(frozen=True)
class Job:
    """One unit of work, run in its own process; its result is cached in ``<work>/<name>``."""

    name: str
    kind: str  # "warmup" | "selfplay" | "sft"
    seed: int
    options: dict = field(default_factory=dict, hash=False, compare=False)


# ----------------------------------------------------------------------------- pipeline calls


def base_options(args) -> dict:
    """The embedded default's constants, written out so every arm uses exactly the same ones."""
    from iris_ref.tiny import TOY_HELDOUT_PATH, TOY_TRAIN_PATH

    options = {k: v for k, v in EMBEDDED_DEFAULTS.items() if k not in ("sft_epochs", "sft_learning_rate")}
    options.update(
        dataset=str(TOY_TRAIN_PATH), eval_dataset=str(TOY_HELDOUT_PATH), split="train", eval_split="train",
        num_samples=args.num_train or None, eval_num_samples=args.num_heldout, iters=args.iters,
        device="cpu", generator="hf", bf16=False, gradient_checkpointing=False,
        save_steps=10**6,  # the bench does not resume mid-iteration; a finished iteration is kept
    )
    return options


def make_config(**options):
    from iris_ref.config import IrisConfig

    config = IrisConfig(**options).resolve()
    config.validate()
    return config


@contextlib.contextmanager
def _logged(path: Path):
    """Send a job's stdout/stderr (the driver's progress lines) to a log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        yield


def warm_up(job: Job, work: Path) -> dict:
    """The embedded default's SFT warm-up (as ``selfplay.run`` does it), saved as a checkpoint.

    ``options["num_samples"]`` set: warm up on that seeded subset only (data efficiency).
    """
    import torch

    from iris_ref import distributed as dist_utils
    from iris_ref import selfplay, tiny, trainer

    config = make_config(**job.options, seed=job.seed, output_dir=str(work / "unused"))
    tokenizer = tiny.build_tiny_tokenizer()
    _, encoded, _ = selfplay.load_data(config, tokenizer)
    selfplay._set_seed(config.seed)
    model = tiny.build_tiny_model(tokenizer, seed=config.seed)
    policy = dist_utils.prepare_model(model, strategy=config.parallel)
    args = selfplay.training_args(config, loss="sft", epochs=EMBEDDED_DEFAULTS["sft_epochs"],
                                  learning_rate=EMBEDDED_DEFAULTS["sft_learning_rate"])
    summary = trainer.train_iteration(policy, [(seq, None) for seq in encoded], None, None, alpha=None,
                                      args=args, pad_token_id=tokenizer.pad_token_id)
    checkpoint = work / "checkpoint"
    dist_utils.save_full_checkpoint(policy, checkpoint, tokenizer=tokenizer)
    return {"checkpoint": str(checkpoint), "rows": len(encoded), "steps": summary.get("steps")}


def self_play(job: Job, work: Path) -> dict:
    """``iris_ref.selfplay.run`` from the seed's starting checkpoint; per-iteration entries."""
    from iris_ref import distributed as dist_utils
    from iris_ref import selfplay

    run_dir = work / "run"
    config = make_config(**job.options, seed=job.seed, output_dir=str(run_dir), resume=run_dir.exists())
    try:
        summary = selfplay.run(config)
    finally:
        dist_utils.teardown_distributed()
    return {"iterations": [_entry(e) for e in summary["iterations"]]}


def continued_sft(job: Job, work: Path) -> dict:
    """Continued SFT from the starting checkpoint: per iteration, the trainer with loss "sft"
    on the annotated responses with the self-play arms' optimiser, epochs and batch size (so
    the same number of gradient steps), then the same held-out evaluation."""
    import torch

    from iris_ref import distributed as dist_utils
    from iris_ref import evaluation, selfplay, trainer

    config = make_config(**job.options, seed=job.seed, output_dir=str(work / "unused"))
    device = torch.device("cpu")
    tokenizer = selfplay.load_tokenizer(config)
    _, encoded, heldout = selfplay.load_data(config, tokenizer)
    toy = selfplay.uses_toy_task(heldout)
    selfplay._set_seed(config.seed)
    policy = dist_utils.prepare_model(selfplay.load_model(config.model, config, device), strategy=config.parallel)

    def evaluate() -> dict:
        return evaluation.evaluate(policy, tokenizer, heldout, config=config, device=device, toy=toy,
                                   generate=selfplay.generate_split, logprobs=selfplay.logprobs_split)

    entries = [_entry({"iteration": 0, **evaluate()})]
    pairs = [(seq, None) for seq in encoded]
    for t in range(1, config.iters + 1):
        result = trainer.train_iteration(policy, pairs, None, None, alpha=None,
                                         args=selfplay.training_args(config, loss="sft"),
                                         pad_token_id=tokenizer.pad_token_id)
        entries.append(_entry({"iteration": t, **{k: v for k, v in result.items() if k != "final"}, **evaluate()}))
    return {"iterations": entries}


def _entry(entry: dict) -> dict:
    keep = {"iteration": int(entry["iteration"])}
    for key in (*METRICS, *DIAGNOSTICS):
        value = entry.get(key)
        if isinstance(value, (int, float)):
            keep[key] = float(value)
    return keep


def run_job(job: Job, work_root: str, threads: int) -> dict:
    """Entry point of a worker process: run (or reuse) one job; returns its result dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)
    work = Path(work_root) / job.name
    done = work / "result.json"
    if done.exists():
        cached = json.loads(done.read_text())
        if cached.get("options") == json.loads(json.dumps(job.options)):
            return cached
        # Same job name, other settings (e.g. another --num-train): never reuse; start afresh.
        shutil.rmtree(work)
    started = time.time()
    with _logged(work / "log.txt"):
        if job.kind == "warmup":
            result = warm_up(job, work)
        elif job.kind == "selfplay":
            result = self_play(job, work)
        else:
            result = continued_sft(job, work)
    result.update(job=job.name, seed=job.seed, seconds=time.time() - started, threads=threads, options=job.options)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, done)
    return result


# ----------------------------------------------------------------------------- the plan


def plan(args) -> tuple[list[Job], list[Job]]:
    """Warm-up jobs (first) and the jobs that start from their checkpoints."""
    base = base_options(args)
    work = Path(args.work_dir)
    warmups, jobs = [], []
    fraction_rows = None
    if args.data_efficiency:
        total = _count_rows(base["dataset"])
        fraction_rows = max(base["global_batch_size"], int(round(args.fraction * total)))
    for seed in args.seeds:
        full_start = work / f"seed{seed}-warmup-all" / "checkpoint"
        # The starting SFT model sees every annotated row (the embedded default's warm-up);
        # self-play then runs on `--num-train` seeded prompts of them, as SPIN ran on a 50k
        # subset of the data its SFT model was trained on.
        warmups.append(Job(f"seed{seed}-warmup-all", "warmup", seed, {**base, "num_samples": None, "model": None}))
        for method in args.methods:
            overrides = METHODS[method]
            options = {**base, "model": str(full_start)}
            if overrides is None:
                jobs.append(Job(f"seed{seed}-{method}", "sft", seed, options))
            else:
                jobs.append(Job(f"seed{seed}-{method}", "selfplay", seed, {**options, **overrides}))
        if args.data_efficiency:
            frac_start = work / f"seed{seed}-warmup-fraction" / "checkpoint"
            frac = {**base, "num_samples": fraction_rows}
            warmups.append(Job(f"seed{seed}-warmup-fraction", "warmup", seed, {**frac, "model": None}))
            jobs.append(Job(f"seed{seed}-de-iris-fraction", "selfplay", seed,
                            {**frac, "model": str(frac_start), **METHODS["iris-adaptive"]}))
            jobs.append(Job(f"seed{seed}-de-sft-fraction", "sft", seed, {**frac, "model": str(frac_start)}))
            jobs.append(Job(f"seed{seed}-de-sft-all", "sft", seed,
                            {**base, "num_samples": None, "model": str(frac_start)}))
    return warmups, jobs


def _count_rows(path: str) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def execute(jobs: list[Job], args) -> dict[str, dict]:
    results: dict[str, dict] = {}
    if args.workers <= 1:
        for job in jobs:
            results[job.name] = run_job(job, args.work_dir, args.threads)
            _progress(job.name, results[job.name])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        futures = {pool.submit(run_job, job, args.work_dir, args.threads): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            results[job.name] = future.result()
            _progress(job.name, results[job.name])
    return results


def _progress(name: str, result: dict) -> None:
    print(f"[method_comparison] {name}: {result.get('seconds', 0.0):.0f} s", flush=True)


# ----------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(results: dict[str, dict], arms: dict[str, list[str]]) -> dict:
    """Per arm, per iteration, per metric: mean, std and the per-seed values."""
    table: dict = {}
    for arm, job_names in arms.items():
        per_iter: dict[int, dict[str, list[float]]] = {}
        for name in job_names:
            for entry in results[name]["iterations"]:
                slot = per_iter.setdefault(entry["iteration"], {})
                for key, value in entry.items():
                    if key != "iteration":
                        slot.setdefault(key, []).append(value)
        table[arm] = {
            str(t): {k: {"mean": mean_std(v)[0], "std": mean_std(v)[1], "values": v} for k, v in sorted(slot.items())}
            for t, slot in sorted(per_iter.items())
        }
    return table


def paired_difference(results: dict[str, dict], arm_jobs: list[str], ref_jobs: list[str], metric: str,
                      iteration: int) -> dict | None:
    """Per-seed (arm - reference) at one iteration; jobs are paired by seed order."""
    diffs = []
    for arm_name, ref_name in zip(arm_jobs, ref_jobs):
        arm = {e["iteration"]: e for e in results[arm_name]["iterations"]}.get(iteration, {})
        ref = {e["iteration"]: e for e in results[ref_name]["iterations"]}.get(iteration, {})
        if metric in arm and metric in ref:
            diffs.append(arm[metric] - ref[metric])
    if not diffs:
        return None
    mean, std = mean_std(diffs)
    higher = METRICS[metric][1]
    wins = sum(1 for d in diffs if (d > 0 if higher else d < 0))
    return {"mean": mean, "std": std, "values": diffs, "better_in": wins, "seeds": len(diffs)}


# ----------------------------------------------------------------------------- reports


def _fmt(cell: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if not cell:
        return "n/a"
    return f"{cell['mean'] * scale:.{digits}f} ± {cell['std'] * scale:.{digits}f}"


def markdown_report(title: str, header: list[str], table: dict, arm_labels: dict[str, str],
                    final: int, paired: dict[str, dict], ref_label: str) -> str:
    lines = [f"# {title}", "", *header, ""]
    lines.append(f"## Last iteration (t = {final}): mean ± std over seeds")
    lines.append("")
    cols = [METRICS[m][0] + (" ↑" if METRICS[m][1] else " ↓") for m in METRICS]
    lines.append("| Arm | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for arm, label in arm_labels.items():
        row = table[arm].get(str(final)) or table[arm][max(table[arm], key=int)]
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(m)) for m in METRICS) + " |")
    if paired:
        lines += ["", f"## Paired difference to {ref_label} at t = {final} (arm − reference, per seed)", ""]
        lines.append("| Arm | " + " | ".join(METRICS[m][0] for m in METRICS) + " |")
        lines.append("|---|" + "---|" * len(METRICS))
        for arm, per_metric in paired.items():
            cells = []
            for m in METRICS:
                d = per_metric.get(m)
                cells.append("n/a" if d is None else
                             f"{d['mean']:+.3f} ± {d['std']:.3f} (better in {d['better_in']}/{d['seeds']})")
            lines.append(f"| {arm_labels[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "## Per iteration (mean ± std over seeds)", ""]
    iterations = sorted({int(t) for arm in table.values() for t in arm})
    for metric, (name, higher) in METRICS.items():
        lines.append(f"### {name} ({'higher' if higher else 'lower'} is better)")
        lines.append("")
        lines.append("| Arm | " + " | ".join(f"t = {t}" for t in iterations) + " |")
        lines.append("|---|" + "---|" * len(iterations))
        for arm, label in arm_labels.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(table[arm].get(str(t), {}).get(metric)) for t in iterations) + " |")
        lines.append("")
    lines.append("### training diagnostics (mean over seeds): α (IRIS only), gap |2·AUC − 1| of the opponent's "
                 "per-token scores, mean summed log p of real / synthetic responses")
    lines.append("")
    lines.append("| Arm | " + " | ".join(f"t = {t}" for t in iterations if t > 0) + " |")
    lines.append("|---|" + "---|" * len([t for t in iterations if t > 0]))
    for arm, label in arm_labels.items():
        cells = []
        for t in iterations:
            if t == 0:
                continue
            row = table[arm].get(str(t), {})
            parts = []
            for key, short in (("alpha", "α"), ("gap", "gap"), ("logps/real", "real"), ("logps/synthetic", "syn")):
                # The driver records the schedule's α for every loss; only IRIS uses it.
                if key in row and (key != "alpha" or arm.startswith("iris")):
                    parts.append(f"{short} {row[key]['mean']:.2f}")
            cells.append(", ".join(parts) or "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, arm_labels: dict[str, str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(METRICS)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2))
    for ax, metric in zip(axes, metrics):
        for arm, label in arm_labels.items():
            ts = sorted(int(t) for t in table[arm] if metric in table[arm][t])
            means = [table[arm][str(t)][metric]["mean"] for t in ts]
            stds = [table[arm][str(t)][metric]["std"] for t in ts]
            style = "-" if not label.startswith("SFT") and "sft" not in arm else "--"
            line, = ax.plot(ts, means, style, marker="o", label=label, linewidth=2 if "adaptive" in arm else 1.3)
            ax.fill_between(ts, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.12)
        name, higher = METRICS[metric]
        ax.set_title(f"{name} ({'↑' if higher else '↓'})")
        ax.set_xlabel("iteration")
        ax.set_xticks(sorted({int(t) for arm in table.values() for t in arm}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(name: str, payload: dict, markdown: str, table: dict, arm_labels: dict, results_dir: Path,
                  title: str) -> None:
    from bench.common import write_results as write_json_with_env

    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_with_env(name, payload, results_dir=results_dir)
    (results_dir / f"{name}.md").write_text(markdown, encoding="utf-8")
    plot(table, arm_labels, results_dir / f"{name}.png", title)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--num-train", type=int, default=500,
                        help="self-play prompts, a seeded subset of the toy rows (default 500: keeps the "
                             "3-seed run well under an hour on 2 cores; 0 = all rows)")
    parser.add_argument("--num-heldout", type=int, default=None, help="held-out prompts (default: all)")
    parser.add_argument("--fraction", type=float, default=0.25, help="data-efficiency: fraction of annotated rows")
    parser.add_argument("--data-efficiency", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workers", type=int, default=2, help="jobs run at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "bench_method_comparison"))
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--fresh", action="store_true", help="delete --work-dir first (no reuse of finished jobs)")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render the tables and plots from the job results recorded in "
                             "<results-dir>/method_comparison.json (runs no job; keeps the recorded command, "
                             "wall time and measurement header)")
    return parser


def validate(args) -> None:
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    if args.num_train < 0 or (args.num_heldout is not None and args.num_heldout < 1):
        raise ValueError("--num-train must be >= 0 (0: all rows) and --num-heldout >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    if not 0 < args.fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {args.fraction}")
    if args.workers < 1 or args.threads < 1:
        raise ValueError("--workers and --threads must be >= 1")
    if "sft" not in args.methods:
        raise ValueError("--methods must include sft: every table is read against continued SFT")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except ValueError as err:
        print(f"method_comparison: error: {err}", file=sys.stderr)
        return 2
    if args.report_only:
        return report_only(args, argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(args.work_dir)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/method_comparison.py" + ("" if not argv else " " + " ".join(argv))
    started = time.time()
    args.load_at_start = os.getloadavg()[0]
    warmups, jobs = plan(args)
    results = execute(warmups, args)
    results.update(execute(jobs, args))
    wall = time.time() - started
    report(args, results, command, wall)
    return 0


def _header(command: str, wall: float, args, cpu_seconds: float) -> list[str]:
    from bench.common import environment

    env = environment()
    return [
        f"Command: `{command}`",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {env['device']}, "
        f"{args.workers} job(s) at once x {args.threads} torch thread(s); "
        f"wall time {wall / 60:.1f} min (sum of job times {cpu_seconds / 60:.1f} min; finished jobs reused "
        "from the work dir count with their original time); 1-minute load average "
        f"{getattr(args, 'load_at_start', float('nan')):.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        "(above 2 means other work shared the 2 cores, and the times are longer than on an idle machine).",
        "",
        f"Seeds {args.seeds}; {args.iters} iterations; toy task (`iris_ref/toy_data`), "
        f"{args.num_train or 'all'} training prompts, {args.num_heldout or 'all'} held-out prompts; "
        "the embedded default's constants for every arm ("
        f"{EMBEDDED_DEFAULTS['optimizer']}, lr {EMBEDDED_DEFAULTS['learning_rate']:g}, β = {EMBEDDED_DEFAULTS['beta']:g}, "
        f"{EMBEDDED_DEFAULTS['epochs']} epoch(s) per iteration, global batch {EMBEDDED_DEFAULTS['global_batch_size']}, "
        "temperature 1).",
    ]


def report_only(args, argv: list[str]) -> int:
    """Re-render the reports from a finished run's recorded job results (no job is run)."""
    recorded = Path(args.results_dir) / "method_comparison.json"
    if not recorded.is_file():
        print(f"method_comparison: error: --report-only needs {recorded} from a finished run", file=sys.stderr)
        return 2
    payload = json.loads(recorded.read_text())
    header = payload.get("header")
    if header is None:  # recorded before the header was stored in the JSON: take it from the markdown
        text = (Path(args.results_dir) / "method_comparison.md").read_text(encoding="utf-8")
        header = text.split("\n## ", 1)[0].split("\n", 2)[2].strip().split("\n")
    note = ("Tables and plots re-rendered from the recorded job results with "
            f"`python bench/method_comparison.py {' '.join(argv)}` (no job re-run).")
    if note not in header:
        header = [*header, "", note]
    args.seeds, args.iters = payload["seeds"], payload["iterations"]
    args.methods = [m for m in METHODS if m in payload["arms"]]
    args.data_efficiency = any("-de-" in name for name in payload["jobs"])
    report(args, payload["jobs"], payload["command"], payload["wall_seconds"], header=header)
    return 0


def report(args, results: dict[str, dict], command: str, wall: float, header: list[str] | None = None) -> None:
    results_dir = Path(args.results_dir)
    cpu_seconds = sum(r.get("seconds", 0.0) for r in results.values())
    header = header if header is not None else _header(command, wall, args, cpu_seconds)
    final = args.iters
    labels = {
        "iris-adaptive": "IRIS (adaptive α)", "iris-alpha0.5": "IRIS α = 0.5", "iris-alpha1": "IRIS α = 1",
        "iris-alpha2": "IRIS α = 2", "spin": "SPIN", "space": "SPACE", "spif": "SPIF",
        "sft": "SFT (continued, same steps)",
    }
    arms = {m: [f"seed{s}-{m}" for s in args.seeds] for m in args.methods}
    table = aggregate(results, arms)
    arm_labels = {m: labels[m] for m in args.methods}
    paired = {
        m: {metric: paired_difference(results, arms[m], arms["sft"], metric, final) for metric in METRICS}
        for m in args.methods if m != "sft"
    }
    markdown = markdown_report("Method comparison on the embedded toy task", header, table, arm_labels, final,
                               paired, labels["sft"])
    payload = {"command": command, "wall_seconds": wall, "seeds": args.seeds, "iterations": args.iters,
               "header": header, "arms": table, "paired_vs_sft": paired, "jobs": {k: v for k, v in results.items()}}
    write_results("method_comparison", payload, markdown, table, arm_labels, results_dir,
                  "Method comparison (toy task), mean ± std over seeds")

    if not args.data_efficiency:
        return
    fraction_rows = results[f"seed{args.seeds[0]}-warmup-fraction"]["rows"]
    all_rows = results[f"seed{args.seeds[0]}-warmup-all"]["rows"]
    de_arms = {
        "iris-fraction": [f"seed{s}-de-iris-fraction" for s in args.seeds],
        "sft-all": [f"seed{s}-de-sft-all" for s in args.seeds],
        "sft-fraction": [f"seed{s}-de-sft-fraction" for s in args.seeds],
        "sft-scratch-all": [f"seed{s}-sft" for s in args.seeds],
    }
    de_table = aggregate(results, {k: v for k, v in de_arms.items() if k != "sft-scratch-all"})
    # The main comparison's starting model: SFT on all rows from scratch (its iteration 0).
    scratch = aggregate(results, {"sft-scratch-all": de_arms["sft-scratch-all"]})["sft-scratch-all"]
    de_table["sft-scratch-all"] = {"0": scratch["0"]}
    de_labels = {
        "iris-fraction": f"IRIS (adaptive) on {fraction_rows} rows",
        "sft-all": f"SFT on all {all_rows} rows",
        "sft-fraction": f"SFT on the same {fraction_rows} rows",
        "sft-scratch-all": f"reference: warm-up on all {all_rows} rows (t = 0 only)",
    }
    de_paired = {
        arm: {metric: paired_difference(results, de_arms[arm], de_arms["sft-all"], metric, final) for metric in METRICS}
        for arm in ("iris-fraction", "sft-fraction")
    }
    de_header = header + [
        "",
        f"Every arm of a seed starts from one model warmed up ({EMBEDDED_DEFAULTS['sft_epochs']} epochs of SFT, "
        f"lr {EMBEDDED_DEFAULTS['sft_learning_rate']:g}) on a seeded "
        f"{fraction_rows}-row subset ({fraction_rows / all_rows:.0%}) of the {all_rows} annotated rows. IRIS then sees only "
        f"those rows; 'SFT on all' sees all {all_rows} rows, i.e. {all_rows // fraction_rows}x the data and "
        "gradient steps per iteration.",
    ]
    de_markdown = markdown_report("Data efficiency on the embedded toy task", de_header, de_table, de_labels,
                                  final, de_paired, de_labels["sft-all"])
    de_payload = {"command": command, "wall_seconds": wall, "seeds": args.seeds, "iterations": args.iters,
                  "fraction": args.fraction, "fraction_rows": fraction_rows, "all_rows": all_rows,
                  "arms": de_table, "paired_vs_sft_all": de_paired}
    write_results("data_efficiency", de_payload, de_markdown, de_table, de_labels, results_dir,
                  f"Data efficiency (toy task): IRIS on {fraction_rows} rows vs SFT on {all_rows}")


if __name__ == "__main__":
    sys.exit(main())
