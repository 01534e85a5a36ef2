"""The paper's comparison in miniature, from a CONVERGED SFT model: IRIS against its baselines.

    python bench/method_comparison.py --fresh            # the committed run: 5 seeds, both toy families, 140 jobs,
                                                         # 30 min on 2 cores (docs/eval.md reads it)
    python bench/method_comparison.py                    # the same, reusing every finished job that still matches
    python bench/method_comparison.py --report-only      # re-render md/png from the recorded json
    python bench/method_comparison.py --families short --seeds 0 1 --iters 1 --arms iris-adaptive sft

Why this design (THEORY.md §3, F3): at θ = θt every objective's gradient is c·β·∇KL(p_data‖p_θ),
so in population self-play converges, if at all, to what SFT converges to. An advantage over SFT
can only come from finite samples, optimisation or early stopping, so the comparison must start
every arm from the same SFT model trained to convergence, and show that more SFT from there no
longer helps. Everything runs through the real pipeline:

1. **SFT start** (per family, per seed): ``selfplay.setup`` + ``selfplay.start_model`` with the
   driver's early-stopped warm-up (``--sft-patience``: stop after P epochs without a better
   held-out NLL, keep the best epoch). The early stopping reads a VALIDATION split carved out of
   the shipped training file, never the test rows the arms are scored on (selecting the epoch on
   the test rows would flatter the start's test NLL and make "continued SFT no longer helps"
   partly an artefact of selection).
2. **Arms**, each from that checkpoint, on the same seeded prompts, with the same optimiser,
   learning rate, β, batch size and epochs per iteration: IRIS with the guarded adaptive
   schedule, IRIS at constant α ∈ {½, 1, 2}, SPIN, SPACE, SPIF, IRIS adaptive with K = 4
   synthetic responses per prompt (all through ``selfplay.run``), and continued SFT
   (``selfplay.setup``/``start_model``, then per iteration ``trainer.train`` with
   ``TrainingData(real=...)`` as the driver's warm-up calls it, and ``selfplay.evaluate`` =
   ``evaluation.evaluate``: the functions the driver uses). Same number of optimizer steps per iteration for every arm.
3. **Data efficiency** (the analogue of "IRIS on 26k annotated samples beats SFT on the full
   200k"): SFT converged on a ``--fraction`` of the training rows (same early stopping), then IRIS
   (adaptive) on those rows, and continued SFT on those rows (equal data, equal steps), against SFT
   converged on all of them (the main start).

Statistics: per seed, the paired difference arm − continued SFT at the last iteration; mean over
seeds with a 95% t-interval (Student t with n − 1 degrees of freedom over the seeds' differences:
mean ± t·sd/√n), and the number of seeds in which the arm is better (strictly; direction per
metric). Metrics (``evaluation.evaluate`` on the test rows): held-out NLL per token, greedy and
sampled accuracy, valid-answer mass, answer-distribution TV to the data's.

Work files go to ``--work-dir``; a job whose ``result.json`` was written with the same key
(its options, its data files' hashes and, recursively, its starting job's key) is reused, any
other is redone from nothing; ``--fresh`` deletes the work dir first. Each job runs in one of
``--workers`` processes with ``--threads`` torch threads (two jobs of one thread beat one job of
two threads for a ~1M-parameter model on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import common  # noqa: E402

# name -> selfplay options (None: continued SFT, run by `continued_sft`).
ARMS: dict[str, Optional[dict]] = {
    "iris-adaptive": {"loss": "iris", "alpha_schedule": "adaptive"},
    "iris-alpha0.5": {"loss": "iris", "alpha_schedule": "constant", "alpha": 0.5},
    "iris-alpha1": {"loss": "iris", "alpha_schedule": "constant", "alpha": 1.0},
    "iris-alpha2": {"loss": "iris", "alpha_schedule": "constant", "alpha": 2.0},
    "spin": {"loss": "spin"},
    "space": {"loss": "space"},
    "spif": {"loss": "spif"},
    "iris-adaptive-k4": {"loss": "iris", "alpha_schedule": "adaptive", "num_synthetic": 4},
    "sft": None,
}
LABELS = {
    "iris-adaptive": "IRIS (guarded adaptive α)", "iris-alpha0.5": "IRIS α = ½", "iris-alpha1": "IRIS α = 1",
    "iris-alpha2": "IRIS α = 2", "spin": "SPIN", "space": "SPACE", "spif": "SPIF",
    "iris-adaptive-k4": "IRIS adaptive, K = 4", "sft": "continued SFT (same steps)",
}
REFERENCE = "sft"

# metric key -> (table name, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "heldout_nll": ("NLL/token", False),
    "heldout_accuracy": ("greedy acc", True),
    "heldout_sampled_accuracy": ("sampled acc", True),
    "heldout_correct_mass": ("valid mass", True),
    "heldout_answer_tv": ("answer TV", False),
}
# Training diagnostics kept per iteration (driver's train_summary / summary.json entries).
DIAGNOSTICS = ("alpha", "gap", "total_steps", "logps/real", "logps/synthetic", "rewards/margins", "skipped_prompts")

FAMILIES = ("short", "long")


def family_files(family: str) -> tuple[Path, Path]:
    """The shipped (train, held-out) files of a toy family."""
    from iris_ref import tiny

    if family == "short":
        return tiny.TOY_TRAIN_PATH, tiny.TOY_HELDOUT_PATH
    if family == "long":
        return tiny.TOY_LONG_TRAIN_PATH, tiny.TOY_LONG_HELDOUT_PATH
    raise ValueError(f"unknown toy family {family!r}; choose from {FAMILIES}")


@dataclass(frozen=True)
class Job:
    """One unit of work, run in its own process; its result is cached in ``<work>/<name>``.

    ``options`` are IrisConfig keyword arguments (the seed and output folder are added when it
    runs); ``start`` names the job whose checkpoint it starts from (None: from scratch).
    """

    name: str
    kind: str  # "warmup" | "selfplay" | "sft"
    seed: int
    family: str
    arm: str
    options: dict = field(default_factory=dict, hash=False, compare=False)
    start: Optional[str] = None


# ----------------------------------------------------------------------------- data split


def _read_rows(path: Path) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(row + "\n" for row in rows)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


SPLIT_SEED = 2024


def split_family(family: str, work: Path, train_rows: int, validation_rows: int, fraction: float,
                 heldout_rows: Optional[int]) -> dict[str, Path]:
    """Write the family's files for the bench (deterministic, the same for every seed):

    - ``validation.jsonl``: ``validation_rows`` rows of the shipped training file (early stopping);
    - ``train.jsonl``: ``train_rows`` other rows of it (the annotated data: SFT's rows);
    - ``fraction.jsonl``: the first ``round(fraction * train_rows)`` rows of ``train.jsonl``;
    - ``test.jsonl``: the first ``heldout_rows`` rows of the shipped held-out file (all if 0 or None).

    One seeded shuffle of the shipped training rows: validation first, then training, so the
    three are disjoint from each other and from the test rows (a separate shipped file).
    """
    shipped_train, shipped_heldout = family_files(family)
    rows = _read_rows(shipped_train)
    if validation_rows + train_rows > len(rows):
        raise ValueError(f"{family}: --validation-rows {validation_rows} + --train-rows {train_rows} exceed the "
                         f"{len(rows)} rows of {shipped_train}")
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    validation = [rows[i] for i in order[:validation_rows]]
    train = [rows[i] for i in order[validation_rows:validation_rows + train_rows]]
    heldout = _read_rows(shipped_heldout)
    test = heldout if not heldout_rows else heldout[:heldout_rows]
    folder = work / "data" / family
    paths = {"train": folder / "train.jsonl", "validation": folder / "validation.jsonl",
             "fraction": folder / "fraction.jsonl", "test": folder / "test.jsonl"}
    _write_rows(paths["train"], train)
    _write_rows(paths["validation"], validation)
    _write_rows(paths["fraction"], train[:fraction_rows(train_rows, fraction)])
    _write_rows(paths["test"], test)
    return paths


def fraction_rows(train_rows: int, fraction: float) -> int:
    return max(1, int(round(fraction * train_rows)))


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the plan


# The embedded default's constants (iris_ref/configs/tiny.yaml) as they were when this bench was
# written and run, pinned here: a later change of the embedded default neither changes what the
# bench measures nor invalidates its finished jobs. Unlisted options are IrisConfig's defaults
# (e.g. generation_batch_size 64). The bench overrides several (base_options, plan).
BENCH_CONSTANTS = {
    "num_samples": None, "eval_num_samples": None, "beta": 1.0, "optimizer": "adamw", "learning_rate": 1e-4,
    "epochs": 1, "global_batch_size": 32, "micro_batch_size": 16, "max_length": 64, "max_prompt_length": 32,
    "sft_epochs": 2, "sft_learning_rate": 3e-3, "save_steps": 20, "threads": 1,
}


def base_options(args) -> dict:
    """What every job of the bench shares (before its data, start model and objective)."""
    options = dict(BENCH_CONSTANTS)
    options.update(
        split="train", eval_split="train", num_samples=None, eval_num_samples=None,
        learning_rate=args.lr, epochs=args.epochs, iters=args.iters,
        global_batch_size=args.batch_size,
        # One micro-batch per step: the same exact global-batch gradient (THEORY.md I3) without
        # the trainer's scoring pass, i.e. faster, and nothing else changes.
        micro_batch_size=args.batch_size,
        device="cpu", generator="hf", bf16=False, gradient_checkpointing=False,
        save_steps=None, save_minutes=10**6,  # jobs are redone, not resumed mid-phase
        threads=args.threads, report_to="jsonl",
    )
    return options


def plan(args) -> list[Job]:
    """Every job, warm-ups first; each arm names the warm-up it starts from."""
    work = Path(args.work_dir)
    base = base_options(args)
    jobs: list[Job] = []
    for family in args.families:
        files = split_family(family, work, args.train_rows, args.validation_rows, args.fraction, args.heldout_rows)
        warm = {**base, "model": None, "eval_dataset": str(files["validation"]), "sft_epochs": args.sft_max_epochs,
                "sft_patience": args.sft_patience, "sft_learning_rate": args.sft_lr,
                "global_batch_size": args.sft_batch_size, "micro_batch_size": args.sft_batch_size,
                # not used by the warm-up; fixed so that the arms' settings do not change its key
                "learning_rate": args.sft_lr, "epochs": 1, "iters": 1}
        arm_base = {**base, "eval_dataset": str(files["test"]), "sft_epochs": 0, "sft_patience": None}
        for seed in args.seeds:
            start = f"{family}-seed{seed}-sft-start"
            jobs.append(Job(start, "warmup", seed, family, "sft-start", {**warm, "dataset": str(files["train"])}))
            start_model = str(work / start / "run" / "iter_0" / "checkpoint")
            prompts = None if args.prompts == 0 or args.prompts >= args.train_rows else args.prompts
            for arm in args.arms:
                overrides = ARMS[arm]
                options = {**arm_base, "dataset": str(files["train"]), "num_samples": prompts, "model": start_model}
                kind = "sft" if overrides is None else "selfplay"
                jobs.append(Job(f"{family}-seed{seed}-{arm}", kind, seed, family, arm, {**options, **(overrides or {})},
                                start=start))
            if args.sft_check_lr > 0:  # more SFT at a lower learning rate: is the start converged?
                options = {**arm_base, "dataset": str(files["train"]), "num_samples": prompts, "model": start_model,
                           "learning_rate": args.sft_check_lr}
                jobs.append(Job(f"{family}-seed{seed}-sft-check", "sft", seed, family, "sft-check", options, start=start))
            if args.data_efficiency:
                de_start = f"{family}-seed{seed}-de-sft-start"
                jobs.append(Job(de_start, "warmup", seed, family, "de-sft-start",
                                {**warm, "dataset": str(files["fraction"])}))
                de_model = str(work / de_start / "run" / "iter_0" / "checkpoint")
                de = {**arm_base, "dataset": str(files["fraction"]), "num_samples": None, "model": de_model}
                jobs.append(Job(f"{family}-seed{seed}-de-iris", "selfplay", seed, family, "de-iris",
                                {**de, **ARMS["iris-adaptive"]}, start=de_start))
                jobs.append(Job(f"{family}-seed{seed}-de-sft", "sft", seed, family, "de-sft", de, start=de_start))
    return jobs


def job_keys(jobs: list[Job]) -> dict[str, str]:
    """A job's identity for reuse: its kind, seed and options, the hashes of the data files it
    reads and, recursively, its starting job's key (a redone warm-up invalidates its arms)."""
    by_name = {job.name: job for job in jobs}
    keys: dict[str, str] = {}

    def key(job: Job) -> str:
        if job.name not in keys:
            data = {name: file_sha256(job.options[name]) for name in ("dataset", "eval_dataset")
                    if job.options.get(name) and Path(job.options[name]).is_file()}
            payload = {"kind": job.kind, "seed": job.seed, "options": job.options, "data": data,
                       "start": key(by_name[job.start]) if job.start else None}
            keys[job.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
        return keys[job.name]

    for job in jobs:
        key(job)
    return keys


# ----------------------------------------------------------------------------- the jobs (pipeline calls)


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
    """The driver's SFT warm-up with early stopping (``selfplay.start_model``), from a fresh tiny model."""
    from iris_ref import distributed, rundir, selfplay

    config = make_config(**job.options, seed=job.seed, output_dir=str(work / "run"))
    try:
        session = selfplay.setup(config)
        selfplay.start_model(session)
    finally:
        distributed.teardown_distributed()
    it = rundir.IterationDir(work / "run" / "iter_0", 0)
    summary = it.read("train_summary.json") or {}
    history = summary.get("sft_epochs", [])
    best = summary.get("best_epoch")
    ran = len(history)
    stopped = "patience" if best is not None and ran - best >= config.sft_patience else "max_epochs"
    return {"checkpoint": str(it.checkpoint), "rows": len(session.encoded), "validation_rows": len(session.heldout),
            "epochs_run": ran, "best_epoch": best, "stopped_by": stopped, "sft_epochs": history,
            "steps_per_epoch": len(session.encoded) // config.global_batch_size,
            "validation_eval": _metrics_only(it.read("eval.json") or {})}


def self_play(job: Job, work: Path) -> dict:
    """``iris_ref.selfplay.run`` from the start checkpoint; one entry per iteration (0 = the start)."""
    from iris_ref import distributed, selfplay

    config = make_config(**job.options, seed=job.seed, output_dir=str(work / "run"))
    try:
        summary = selfplay.run(config)
    finally:
        distributed.teardown_distributed()
    return {"iterations": [_entry(e) for e in summary["iterations"]]}


def continued_sft(job: Job, work: Path) -> dict:
    """Continued SFT from the start checkpoint, laid out as a driver run: ``selfplay.setup`` (the same
    data loading and seeded prompt subset as the self-play arms), ``start_model`` (loads and
    evaluates θ_0), then per iteration ``trainer.train`` on ``TrainingData(real=...)`` with the
    arms' epochs and learning rate, called as the driver's SFT warm-up calls it (a fresh optimizer
    per iteration, as in every self-play iteration), and ``selfplay.evaluate``."""
    from iris_ref import distributed, files, rundir, selfplay, trainer

    config = make_config(**job.options, seed=job.seed, output_dir=str(work / "run"))
    try:
        session = selfplay.setup(config)
        selfplay.start_model(session)
        policy = selfplay.load_policy(session, selfplay.model_path(session, 0))
        data = trainer.TrainingData(real=session.encoded)
        for t in range(1, config.iters + 1):
            it = rundir.iteration(session.dir, t)
            started = time.time()
            result = trainer.train(policy, data, None, config, pad_token_id=session.tokenizer.pad_token_id,
                                   epochs=config.epochs, learning_rate=config.learning_rate,
                                   state_dir=it.trainer_state, log=selfplay.metrics_log(session, it),
                                   desc=f"continued SFT {t}", fingerprint={"loss": "sft"})
            files.write_json(it.path / "train_summary.json", {**result, "iteration": t, "alpha": None, "gap": None,
                                                              "train_seconds": time.time() - started})
            files.write_json(it.path / "eval.json", selfplay.evaluate(session, policy))
            it.mark_complete()
        summary = selfplay.build_summary(session.dir, config)
    finally:
        distributed.teardown_distributed()
    return {"iterations": [_entry(e) for e in summary["iterations"]]}


def _metrics_only(entry: dict) -> dict:
    return {k: float(v) for k, v in entry.items() if k in METRICS and isinstance(v, (int, float))}


def _entry(entry: dict) -> dict:
    keep = {"iteration": int(entry["iteration"])}
    for key in (*METRICS, *DIAGNOSTICS):
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            keep[key] = float(value)
    return keep


RUNNERS = {"warmup": warm_up, "selfplay": self_play, "sft": continued_sft}


def cached_result(work_root: str, job: Job, key: str) -> Optional[dict]:
    """The finished result of ``job`` when it was made with the same key, else None."""
    done = Path(work_root) / job.name / "result.json"
    if not done.is_file():
        return None
    try:
        cached = json.loads(done.read_text())
    except ValueError:
        return None
    return cached if cached.get("key") == key else None


def run_job(job: Job, key: str, work_root: str, threads: int) -> dict:
    """Entry point of a worker process: reuse or (re)do one job; returns its result dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cached = cached_result(work_root, job, key)
    if cached is not None:
        return {**cached, "reused": True}
    import torch

    torch.set_num_threads(threads)
    work = Path(work_root) / job.name
    if work.exists():  # unfinished, or made with other settings: never reuse any of it
        shutil.rmtree(work)
    started = time.time()
    with _logged(work / "log.txt"):
        result = RUNNERS[job.kind](job, work)
    result.update(job=job.name, kind=job.kind, seed=job.seed, family=job.family, arm=job.arm, key=key,
                  seconds=time.time() - started, threads=threads, options=job.options, start=job.start)
    done = work / "result.json"
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, done)
    return {**result, "reused": False}


def execute(jobs: list[Job], args) -> dict[str, dict]:
    """Run the jobs on ``args.workers`` processes, each arm as soon as its start is done.

    Warm-ups are queued first (long family first: its epochs cost the most)."""
    keys = job_keys(jobs)
    results: dict[str, dict] = {}
    pending = sorted(jobs, key=lambda j: (j.start is not None, j.family != "long"))
    for job in list(pending):  # reuse without starting a process
        cached = cached_result(args.work_dir, job, keys[job.name])
        if cached is not None:
            results[job.name] = {**cached, "reused": True}
            pending.remove(job)
            _progress(job.name, results[job.name])

    def ready(job: Job) -> bool:
        return job.start is None or job.start in results

    if args.workers <= 1:
        while pending:
            job = next(j for j in pending if ready(j))
            pending.remove(job)
            results[job.name] = run_job(job, keys[job.name], args.work_dir, args.threads)
            _progress(job.name, results[job.name])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        running: dict = {}
        while pending or running:
            for job in [j for j in pending if ready(j)]:
                pending.remove(job)
                running[pool.submit(run_job, job, keys[job.name], args.work_dir, args.threads)] = job
            if not running:
                raise RuntimeError(f"jobs whose start never ran: {[j.name for j in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                results[job.name] = future.result()
                _progress(job.name, results[job.name])
    return results


def _progress(name: str, result: dict) -> None:
    note = " (reused)" if result.get("reused") else ""
    print(f"[method_comparison] {name}: {result.get('seconds', 0.0):.0f} s{note}", flush=True)


# ----------------------------------------------------------------------------- statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, Optional[float], Optional[float]]:
    """Mean and the two-sided Student-t interval mean ± t_{(1+level)/2, n−1}·sd/√n (None for n < 2)."""
    from scipy.stats import t as student_t

    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, None, None
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def final_entry(result: dict, iteration: Optional[int] = None) -> dict:
    """The entry of ``iteration`` (default: the last one) of a job's result."""
    entries = result["iterations"]
    if iteration is None:
        return entries[-1]
    return next(e for e in entries if e["iteration"] == iteration)


def paired(arm_values: list[float], ref_values: list[float], higher_is_better: bool) -> dict:
    """Per-seed differences arm − reference, their mean with a 95% t-interval, and the number of
    seeds in which the arm is strictly better (worse, tied)."""
    if len(arm_values) != len(ref_values):
        raise ValueError(f"paired difference needs one value per seed on both sides: {len(arm_values)} vs "
                         f"{len(ref_values)}")
    diffs = [a - b for a, b in zip(arm_values, ref_values)]
    mean, low, high = t_interval(diffs)
    sign = 1.0 if higher_is_better else -1.0
    better = sum(1 for d in diffs if sign * d > 0)
    worse = sum(1 for d in diffs if sign * d < 0)
    return {"mean": mean, "ci95": [low, high], "std": mean_std(diffs)[1], "values": diffs, "better_in": better,
            "worse_in": worse, "tied_in": len(diffs) - better - worse, "seeds": len(diffs)}


def metric_values(results: dict[str, dict], names: list[str], metric: str, iteration: Optional[int] = None) -> list[float]:
    return [final_entry(results[name], iteration)[metric] for name in names]


def aggregate(results: dict[str, dict], names: list[str]) -> dict:
    """Per iteration, per metric/diagnostic: mean, std and the per-seed values (seed order of ``names``)."""
    per_iter: dict[int, dict[str, list[float]]] = {}
    for name in names:
        for entry in results[name]["iterations"]:
            slot = per_iter.setdefault(entry["iteration"], {})
            for key, value in entry.items():
                if key != "iteration":
                    slot.setdefault(key, []).append(value)
    out = {}
    for t, slot in sorted(per_iter.items()):
        out[str(t)] = {}
        for key, values in sorted(slot.items()):
            if len(values) == len(names):  # a key some seeds lack (e.g. alpha of SPIN) is not averaged
                mean, std = mean_std(values)
                out[str(t)][key] = {"mean": mean, "std": std, "values": values}
    return out


def compare(results: dict[str, dict], arms: dict[str, list[str]], reference: list[str],
            reference_iteration: Optional[int] = None) -> dict:
    """Per arm and metric, the paired difference at the arm's last iteration to ``reference`` (at
    its last iteration, or at ``reference_iteration``)."""
    return {arm: {metric: paired(metric_values(results, names, metric),
                                 metric_values(results, reference, metric, reference_iteration), higher)
                  for metric, (_, higher) in METRICS.items()}
            for arm, names in arms.items()}


def continued_gain(results: dict[str, dict], names: list[str]) -> dict:
    """What continued SFT changed from the start: last − t = 0 per metric (paired over seeds),
    and the mean per iteration."""
    return {"gain_last_minus_start": {m: paired(metric_values(results, names, m), metric_values(results, names, m, 0), h)
                                      for m, (_, h) in METRICS.items()},
            "mean_by_iteration": {m: {str(e["iteration"]): mean_std(metric_values(results, names, m, e["iteration"]))[0]
                                      for e in results[names[0]]["iterations"]} for m in METRICS}}


def sft_start_evidence(results: dict[str, dict], family: str, seeds: list[int], args) -> dict:
    """How the start was chosen, its test metrics, and what continued SFT gained from it."""
    warmups = [results[f"{family}-seed{s}-sft-start"] for s in seeds]
    sft = [f"{family}-seed{s}-sft" for s in seeds]
    start = {metric: dict(zip(("mean", "std"), mean_std(metric_values(results, sft, metric, 0))))
             for metric in METRICS}
    identical = all(
        len({json.dumps(_metrics_only(final_entry(results[f"{family}-seed{s}-{arm}"], 0)), sort_keys=True)
             for arm in args.arms}) == 1 for s in seeds)
    evidence = {
        "how": (f"the driver's SFT warm-up from a fresh tiny model with early stopping (--sft-patience "
                f"{args.sft_patience}, at most {args.sft_max_epochs} epochs, AdamW lr {args.sft_lr:g} with linear "
                f"warm-up/decay over the {args.sft_max_epochs} epochs, batch {args.sft_batch_size}) on the "
                f"{args.train_rows} training rows; the held-out NLL it stops on is that of {args.validation_rows} "
                "validation rows carved out of the shipped training file (disjoint draws from the training rows; "
                "the test rows are the shipped held-out file); the best epoch's model is kept"),
        "per_seed": [{"seed": s, "best_epoch": w["best_epoch"], "epochs_run": w["epochs_run"],
                      "stopped_by": w["stopped_by"], "steps_per_epoch": w["steps_per_epoch"],
                      "validation_nll_by_epoch": [round(e["heldout_nll"], 5) for e in w["sft_epochs"]],
                      "seconds": w.get("seconds")} for s, w in zip(seeds, warmups)],
        "test_metrics": start,
        "continued_sft": {"iterations": args.iters, "epochs_per_iteration": args.epochs, "learning_rate": args.lr,
                          **continued_gain(results, sft)},
        "all_arms_share_the_start": identical,
    }
    check = [f"{family}-seed{s}-sft-check" for s in seeds]
    if all(name in results for name in check):
        evidence["continued_sft_low_lr"] = {"iterations": args.iters, "epochs_per_iteration": args.epochs,
                                            "learning_rate": args.sft_check_lr, **continued_gain(results, check)}
    return evidence


# ----------------------------------------------------------------------------- report


def _fmt(value: Optional[float], digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def headline_cell(mean: float, diff: Optional[dict]) -> str:
    """``mean; Δ [low, high]; k/n`` (no Δ for the reference itself)."""
    if diff is None:
        return f"{_fmt(mean)}"
    low, high = diff["ci95"]
    return (f"{_fmt(mean)}; {_fmt(diff['mean'], sign=True)} [{_fmt(low, sign=True)}, {_fmt(high, sign=True)}]; "
            f"{diff['better_in']}/{diff['seeds']}")


def headline_table(table: dict[str, dict], diffs: dict[str, dict], labels: dict[str, str], final: int,
                   start_row: Optional[dict] = None) -> list[str]:
    cols = [f"{name} {'↑' if higher else '↓'}" for name, higher in METRICS.values()]
    lines = ["| Arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    if start_row is not None:
        lines.append("| start (t = 0, every arm) | " + " | ".join(_fmt(start_row[m]["mean"]) for m in METRICS) + " |")
    for arm, label in labels.items():
        row = table[arm].get(str(final)) or table[arm][max(table[arm], key=int)]
        cells = [headline_cell(row[m]["mean"], diffs.get(arm, {}).get(m)) if m in row else "n/a" for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def per_iteration_tables(table: dict[str, dict], labels: dict[str, str]) -> list[str]:
    iterations = sorted({int(t) for arm in table.values() for t in arm})
    lines = []
    for metric, (name, higher) in METRICS.items():
        lines += [f"#### {name} ({'higher' if higher else 'lower'} is better), mean ± std over seeds", "",
                  "| Arm | " + " | ".join(f"t = {t}" for t in iterations) + " |",
                  "|---|" + "---|" * len(iterations)]
        for arm, label in labels.items():
            cells = []
            for t in iterations:
                cell = table[arm].get(str(t), {}).get(metric)
                cells.append("" if cell is None else f"{cell['mean']:.3f} ± {cell['std']:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def diagnostics_table(table: dict[str, dict], labels: dict[str, str]) -> list[str]:
    iterations = sorted({int(t) for arm in table.values() for t in arm if int(t) > 0})
    lines = ["| Arm | " + " | ".join(f"t = {t}" for t in iterations) + " |", "|---|" + "---|" * len(iterations)]
    for arm, label in labels.items():
        cells = []
        for t in iterations:
            row = table[arm].get(str(t), {})
            parts = [f"{short} {row[key]['mean']:.{d}f}" for key, short, d in
                     (("alpha", "α", 2), ("gap", "gap", 3), ("total_steps", "steps", 0), ("logps/real", "real", 2),
                      ("logps/synthetic", "syn", 2)) if key in row]
            cells.append(", ".join(parts) or "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def evidence_lines(evidence: dict) -> list[str]:
    runs = [evidence["continued_sft"]] + ([evidence["continued_sft_low_lr"]] if "continued_sft_low_lr" in evidence else [])
    lines = [f"How: {evidence['how']}.", "",
             "| seed | best epoch | epochs run | stopped by | validation NLL by epoch |", "|---|---|---|---|---|"]
    for s in evidence["per_seed"]:
        nll = ", ".join(f"{v:.3f}" for v in s["validation_nll_by_epoch"])
        lines.append(f"| {s['seed']} | {s['best_epoch']} | {s['epochs_run']} | {s['stopped_by']} | {nll} |")
    lines += ["", "What continued SFT changed from the start (t = last − t = 0, paired over seeds: mean, 95% "
              "t-interval, seeds improved), with the same steps as every arm:", "",
              "| metric | start (mean ± std) | " + " | ".join(f"continued SFT, lr {r['learning_rate']:g}" for r in runs)
              + " |", "|---|---|" + "---|" * len(runs)]
    for metric, (name, higher) in METRICS.items():
        s = evidence["test_metrics"][metric]
        cells = []
        for r in runs:
            d = r["gain_last_minus_start"][metric]
            cells.append(f"{_fmt(d['mean'], 4, True)} [{_fmt(d['ci95'][0], 4, True)}, {_fmt(d['ci95'][1], 4, True)}]; "
                         f"{d['better_in']}/{d['seeds']}")
        lines.append(f"| {name} {'↑' if higher else '↓'} | {s['mean']:.3f} ± {s['std']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"Every arm's t = 0 evaluation is the same per seed (one start, one test set): "
              f"{'yes' if evidence['all_arms_share_the_start'] else 'NO'}."]
    return lines


def plot(tables: dict[str, dict[str, dict]], labels: dict[str, str], path: Path, title: str) -> None:
    """Rows: families; columns: metrics; one line per arm (mean over seeds) across iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(tables)
    metrics = list(METRICS)
    fig, axes = plt.subplots(len(families), len(metrics), figsize=(4.0 * len(metrics), 3.6 * len(families)),
                             squeeze=False)
    for row, family in enumerate(families):
        table = tables[family]
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for arm, label in labels.items():
                if arm not in table:
                    continue
                ts = sorted(int(t) for t in table[arm] if metric in table[arm][t])
                means = [table[arm][str(t)][metric]["mean"] for t in ts]
                style = "--" if "sft" in arm else "-"
                ax.plot(ts, means, style, marker="o", markersize=3, label=label,
                        linewidth=2.2 if arm in ("iris-adaptive", "sft", "de-iris") else 1.2)
            name, higher = METRICS[metric]
            ax.set_title(f"{family}: {name} ({'↑' if higher else '↓'})", fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _header(payload: dict) -> list[str]:
    s = payload["settings"]
    return [
        f"Command: `{payload['command']}`",
        "",
        f"Measured {payload['measured']} on {payload['device']}; {s['workers']} job(s) at once × {s['threads']} torch "
        f"thread(s); {_wall_text(payload)}; sum of the jobs' own times {payload['job_seconds'] / 60:.1f} min "
        "(1-minute load average above 2: other work shared the 2 cores).",
        "",
        f"Seeds {payload['seeds']}; toy families {s['families']}; per family {s['train_rows']} training rows (SFT's "
        f"data), {s['validation_rows']} validation rows (early stopping only), {s['test_rows']} test rows (every "
        f"metric below); self-play on {s['prompts'] or 'all'} seeded prompts of the training rows, the same for every "
        f"arm of a seed; {s['iters']} iterations × {s['epochs']} epoch(s), {s.get('optimizer', 'adamw')} lr "
        f"{s['lr']:g}, β = {s['beta']:g} (SPACE too), global batch {s['batch_size']} ({s['steps_per_iteration']} "
        f"optimizer steps per iteration for every arm), temperature {s.get('temperature', 1.0):g}, K = 1 except where "
        f"stated, generation batch {s.get('generation_batch_size', 64)}, max length {s.get('max_length', 64)}; the "
        "rest as the embedded default was when the bench was written (`BENCH_CONSTANTS`).",
    ]


def _wall_text(payload: dict) -> str:
    """Wall time, with every invocation that ran jobs into the work dir (its wall time, jobs, load)."""
    invocations = payload.get("invocations") or [{"command": payload["command"], "wall_seconds": payload["wall_seconds"],
                                                  "jobs_run": payload["total_jobs"], "load": payload["load"]}]
    ran = [i for i in invocations if i.get("jobs_run")]
    parts = []
    for i in ran:
        load = i.get("load")
        parts.append(f"`{i['command']}` ran {i['jobs_run']} jobs in {i['wall_seconds'] / 60:.1f} min"
                     + (f" (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)" if load else ""))
    total = sum(i["wall_seconds"] for i in ran)
    return f"wall time {total / 60:.1f} min in all: " + "; ".join(parts) if parts else "no job ran"


def markdown_report(payload: dict) -> str:
    labels = {arm: LABELS[arm] for arm in payload["arms_run"]}
    final = payload["settings"]["iters"]
    lines = ["# Method comparison from a converged SFT start (toy tasks)", "", *_header(payload), "",
             "Cells: mean over seeds at the last iteration; paired difference to continued SFT (arm − SFT, per "
             "seed) with its 95% t-interval over seeds (Student t, n − 1 degrees of freedom); seeds in which the "
             "arm is strictly better than continued SFT. ↑ higher is better, ↓ lower is better.", ""]
    for family in payload["families"]:
        fam = payload["families"][family]
        lines += [f"## {family} family: headline (t = {final})", ""]
        lines += headline_table(fam["arms"], fam["paired_vs_sft"], labels, final,
                                start_row=fam["sft_start"]["test_metrics"])
        lines += ["", "Change from the start (t = last − t = 0, paired over seeds; 95% t-interval; seeds improved):", "",
                  "| Arm | " + " | ".join(f"{n} {'↑' if h else '↓'}" for n, h in METRICS.values()) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for arm, label in labels.items():
            cells = []
            for m in METRICS:
                d = fam["change_from_start"][arm][m]
                cells.append(f"{_fmt(d['mean'], 4, True)} [{_fmt(d['ci95'][0], 4, True)}, {_fmt(d['ci95'][1], 4, True)}]; "
                             f"{d['better_in']}/{d['seeds']}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", f"### {family}: the SFT start", ""]
        lines += evidence_lines(fam["sft_start"])
        lines += ["", f"### {family}: per iteration", ""]
        lines += per_iteration_tables(fam["arms"], labels)
        lines += [f"#### {family}: training diagnostics (mean over seeds): α (IRIS), gap |2·AUC − 1| of the opponent's "
                  "per-token scores, optimizer steps, mean summed log p of annotated / synthetic responses", ""]
        lines += diagnostics_table(fam["arms"], labels)
        lines.append("")
    return "\n".join(lines) + "\n"


DE_LABELS = {"sft-all": "SFT converged on all rows (the main start)",
             "de-start": "SFT converged on the fraction",
             "de-iris": "IRIS (adaptive) on the fraction, from that",
             "de-sft": "continued SFT on the fraction, same steps"}


def data_efficiency_payload(results: dict[str, dict], args, family: str) -> dict:
    seeds = args.seeds
    main_start = [f"{family}-seed{s}-sft" for s in seeds]  # its t = 0 is the converged all-rows start
    de_iris = [f"{family}-seed{s}-de-iris" for s in seeds]
    de_sft = [f"{family}-seed{s}-de-sft" for s in seeds]

    def at(names, t):
        return {metric: [final_entry(results[n], t)[metric] for n in names] for metric in METRICS}

    values = {"sft-all": at(main_start, 0), "de-start": at(de_iris, 0), "de-iris": at(de_iris, None),
              "de-sft": at(de_sft, None)}
    table = {arm: {m: dict(zip(("mean", "std"), mean_std(v))) | {"values": v} for m, v in per.items()}
             for arm, per in values.items()}
    diffs = {arm: {m: paired(values[arm][m], values["sft-all"][m], higher) for m, (_, higher) in METRICS.items()}
             for arm in ("de-start", "de-iris", "de-sft")}
    warm = [results[f"{family}-seed{s}-de-sft-start"] for s in seeds]
    return {"fraction": args.fraction, "fraction_rows": warm[0]["rows"],
            "all_rows": results[f"{family}-seed{seeds[0]}-sft-start"]["rows"],
            "arms": table, "paired_vs_sft_all": diffs,
            "fraction_start": [{"seed": s, "best_epoch": w["best_epoch"], "epochs_run": w["epochs_run"],
                                "stopped_by": w["stopped_by"]} for s, w in zip(seeds, warm)],
            "per_iteration": {"de-iris": aggregate(results, de_iris), "de-sft": aggregate(results, de_sft)}}


def data_efficiency_markdown(payload: dict) -> str:
    lines = ["# Data efficiency from converged SFT starts (toy tasks)", "", *_header(payload), "",
             "The analogue of \"IRIS on 26k annotated samples beats SFT on the full 200k\": per family and seed, SFT "
             "converged (the same early stopping) on a fraction of the training rows, then IRIS (adaptive) on those "
             "rows only, against SFT converged on all of them. Cells: mean over seeds; paired difference to SFT "
             "converged on all rows with its 95% t-interval; seeds in which the row is strictly better.", ""]
    for family, de in payload["families"].items():
        lines += [f"## {family} family: {de['fraction_rows']} of {de['all_rows']} rows "
                  f"({de['fraction_rows'] / de['all_rows']:.0%})", ""]
        cols = [f"{name} {'↑' if higher else '↓'}" for name, higher in METRICS.values()]
        lines += ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for arm, label in DE_LABELS.items():
            cells = [headline_cell(de["arms"][arm][m]["mean"], de["paired_vs_sft_all"].get(arm, {}).get(m))
                     for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        stops = ", ".join(f"seed {s['seed']}: best {s['best_epoch']} of {s['epochs_run']} ({s['stopped_by']})"
                          for s in de["fraction_start"])
        lines += ["", f"Fraction start, early stopping: {stops}.", ""]
    return "\n".join(lines) + "\n"


def settings(args, results: dict[str, dict]) -> dict:
    """The settings every arm ran with, read from the recorded jobs (resolved as IrisConfig does)."""
    family = args.families[0]
    sft = results[f"{family}-seed{args.seeds[0]}-sft"]
    config = make_config(**sft["options"], seed=args.seeds[0], output_dir=str(Path(args.work_dir) / "unused"))
    steps = int(sft["iterations"][1].get("total_steps", 0)) if len(sft["iterations"]) > 1 else None
    first = results[f"{family}-seed{args.seeds[0]}-sft-start"]
    return {"families": args.families, "train_rows": args.train_rows, "validation_rows": args.validation_rows,
            "test_rows": len(_read_rows(Path(args.work_dir) / "data" / family / "test.jsonl")),
            "prompts": args.prompts, "iters": config.iters, "epochs": config.epochs, "lr": config.learning_rate,
            "beta": config.beta, "optimizer": config.optimizer, "batch_size": config.global_batch_size,
            "steps_per_iteration": steps, "generation_batch_size": config.generation_batch_size,
            "max_length": config.max_length, "temperature": config.temperature, "workers": args.workers,
            "threads": args.threads, "sft_lr": args.sft_lr, "sft_batch_size": args.sft_batch_size,
            "sft_max_epochs": args.sft_max_epochs, "sft_patience": args.sft_patience,
            "sft_check_lr": args.sft_check_lr, "fraction": args.fraction, "arms": args.arms,
            "rows_seen_by_warm_up": first["rows"]}


def record_invocation(work: Path, command: str, wall: float, ran: list[str],
                      load: Optional[tuple[float, float]] = None) -> list[dict]:
    """Append this invocation to ``<work>/invocations.jsonl`` (a work dir built in several runs, e.g.
    one interrupted, then continued) and return them all."""
    path = work / "invocations.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"command": command, "wall_seconds": wall, "jobs_run": len(ran),
                                 "load": list(load) if load else None,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_payload(args, results: dict[str, dict], command: str, wall: float, load: tuple[float, float],
                  invocations: Optional[list[dict]] = None) -> dict:
    from bench.common import environment

    invocations = invocations or [{"command": command, "wall_seconds": wall, "jobs_run": len(results)}]
    ran = [i for i in invocations if i.get("jobs_run") and i.get("finished")]
    measured = ran[-1]["finished"][:16].replace("T", " ") + " UTC" if ran else None  # when the last job finished
    payload = {"command": command, "wall_seconds": wall, "invocations": invocations,
               "total_wall_seconds": sum(i["wall_seconds"] for i in invocations), "measured": measured or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "device": environment()["device"], "load": list(load),
               "job_seconds": sum(r.get("seconds", 0.0) for r in results.values()),
               "reused_jobs": sum(1 for r in results.values() if r.get("reused")), "total_jobs": len(results),
               "seeds": list(args.seeds), "arms_run": list(args.arms), "settings": settings(args, results),
               "families": {}}
    for family in args.families:
        names = {arm: [f"{family}-seed{s}-{arm}" for s in args.seeds] for arm in args.arms}
        table = {arm: aggregate(results, n) for arm, n in names.items()}
        others = {arm: n for arm, n in names.items() if arm != REFERENCE}
        payload["families"][family] = {
            "arms": table,
            "paired_vs_sft": compare(results, others, names[REFERENCE]),
            "change_from_start": {arm: {m: paired(metric_values(results, n, m), metric_values(results, n, m, 0), h)
                                        for m, (_, h) in METRICS.items()} for arm, n in names.items()},
            "sft_start": sft_start_evidence(results, family, args.seeds, args),
        }
    # Per job what it did (its key names its exact options); the options themselves once per
    # family and arm (seed 0's: the other seeds differ only in the seed and the start's folder).
    payload["options"] = {family: {r["arm"]: r["options"] for r in results.values()
                                   if r.get("family") == family and r.get("seed") == args.seeds[0] and "options" in r}
                          for family in args.families}
    payload["jobs"] = {k: {key: v for key, v in r.items() if key not in ("reused", "options", "sft_epochs")}
                       for k, r in results.items()}
    return payload


def build_de_payload(args, results: dict[str, dict], payload: dict) -> dict:
    de = {key: payload[key] for key in ("command", "wall_seconds", "invocations", "total_wall_seconds", "measured",
                                        "device", "load", "job_seconds", "reused_jobs", "total_jobs", "seeds",
                                        "settings")}
    de["families"] = {family: data_efficiency_payload(results, args, family) for family in args.families}
    return de


def render(payload: dict, de_payload: Optional[dict], results_dir: Path, write_json: bool = True) -> None:
    """Write (or, with ``write_json=False``, only re-render) the results files."""
    from bench.common import write_results as write_json_with_env

    results_dir.mkdir(parents=True, exist_ok=True)
    labels = {arm: LABELS[arm] for arm in payload["arms_run"]}
    if write_json:
        write_json_with_env("method_comparison", payload, results_dir=results_dir)
    (results_dir / "method_comparison.md").write_text(markdown_report(payload), encoding="utf-8")
    plot({family: fam["arms"] for family, fam in payload["families"].items()}, labels,
         results_dir / "method_comparison.png", "Method comparison from a converged SFT start (mean over seeds)")
    if de_payload is None:
        return
    if write_json:
        write_json_with_env("data_efficiency", de_payload, results_dir=results_dir)
    (results_dir / "data_efficiency.md").write_text(data_efficiency_markdown(de_payload), encoding="utf-8")
    tables = {family: {arm: de["per_iteration"][arm] for arm in ("de-iris", "de-sft")}
              for family, de in de_payload["families"].items()}
    plot(tables, {arm: DE_LABELS[arm] for arm in ("de-iris", "de-sft")}, results_dir / "data_efficiency.png",
         "Data efficiency: from SFT converged on the fraction (t = 0), mean over seeds")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--iters", type=int, default=3, help="self-play iterations (SPIN, IRIS: 3)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per iteration, every arm")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="every arm's peak learning rate (10x the embedded default's 1e-4: at 1e-4 and 8 steps the rewards stay ~0.01 and every objective takes the same steps; measured)")
    p.add_argument("--batch-size", type=int, default=32, help="every arm's global batch (the embedded default's)")
    p.add_argument("--train-rows", type=int, default=500, help="annotated training rows per family (SFT's data)")
    p.add_argument("--validation-rows", type=int, default=200, help="rows carved out for early stopping")
    p.add_argument("--prompts", type=int, default=256,
                   help="self-play prompts: a seeded subset of the training rows, the same for every arm of a seed "
                        "(0: all)")
    p.add_argument("--heldout-rows", type=int, default=100, help="test rows: the first N of the shipped held-out file "
                   "(0: all 200)")
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sft-batch-size", type=int, default=8)
    p.add_argument("--sft-max-epochs", type=int, default=50)
    p.add_argument("--sft-patience", type=int, default=5)
    p.add_argument("--sft-check-lr", type=float, default=1e-4,
                   help="also continue SFT from the start at this learning rate (the embedded default's), the "
                        "arms' steps, as evidence of convergence (0: no such job)")
    p.add_argument("--fraction", type=float, default=0.25, help="data efficiency: fraction of the training rows")
    p.add_argument("--data-efficiency", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workers", type=int, default=2, help="jobs run at once, one process each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "bench_method_comparison"))
    p.add_argument("--results-dir", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument("--fresh", action="store_true", help="delete --work-dir first (no reuse of finished jobs)")
    p.add_argument("--report-only", action="store_true",
                   help="re-render md and png from <results-dir>/method_comparison.json and data_efficiency.json "
                        "(runs no job)")
    return p


def validate(args) -> None:
    if args.iters < 1 or args.epochs < 1:
        raise ValueError(f"--iters and --epochs must be >= 1, got {args.iters}, {args.epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")
    if not 0 < args.fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {args.fraction}")
    if args.workers < 1 or args.threads < 1:
        raise ValueError("--workers and --threads must be >= 1")
    if REFERENCE not in args.arms:
        raise ValueError("--arms must include sft: every table is read against continued SFT")
    if args.prompts < 0 or args.train_rows < 1 or args.validation_rows < 1:
        raise ValueError("--prompts must be >= 0 (0: all), --train-rows and --validation-rows >= 1")
    if args.heldout_rows < 0:
        raise ValueError("--heldout-rows must be >= 0 (0: all)")
    for name in ("batch_size", "sft_batch_size", "sft_max_epochs", "sft_patience"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if fraction_rows(args.train_rows, args.fraction) < args.batch_size and args.data_efficiency:
        raise ValueError(f"--fraction {args.fraction} of --train-rows {args.train_rows} is fewer rows than "
                         f"--batch-size {args.batch_size}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except ValueError as err:
        print(f"method_comparison: error: {err}", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir)
    if args.report_only:
        return report_only(results_dir, args.data_efficiency)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(args.work_dir)
    error = common.claim_work_dir(work, "method_comparison", fresh=args.fresh)  # only its own folder is deleted
    if error is not None:
        print(f"method_comparison: error: {error}", file=sys.stderr)
        return 2
    command = "python bench/method_comparison.py" + ("" if not argv else " " + " ".join(argv))
    started, load_start = time.time(), os.getloadavg()[0]
    results = execute(plan(args), args)
    wall = time.time() - started
    load = (load_start, os.getloadavg()[0])
    invocations = record_invocation(work, command, wall, [n for n, r in results.items() if not r.get("reused")], load)
    payload = build_payload(args, results, command, wall, load, invocations)
    render(payload, build_de_payload(args, results, payload) if args.data_efficiency else None, results_dir)
    print(f"[method_comparison] wall time {wall / 60:.1f} min; results in {results_dir}", flush=True)
    return 0


def report_only(results_dir: Path, data_efficiency: bool) -> int:
    """Re-render the md and png files from the recorded json files (no job runs)."""
    recorded = results_dir / "method_comparison.json"
    if not recorded.is_file():
        print(f"method_comparison: error: --report-only needs {recorded} from a finished run", file=sys.stderr)
        return 2
    de_file = results_dir / "data_efficiency.json"
    de = json.loads(de_file.read_text()) if data_efficiency and de_file.is_file() else None
    render(json.loads(recorded.read_text()), de, results_dir, write_json=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
