"""Benchmark a run's checkpoints with lm-eval: raw JSON per checkpoint, a markdown table, a plot.

    python eval/run_eval.py --models runs/demo --suite toy --output eval_out/demo
    python eval/run_eval.py --models runs/zephyr --include-base --suite iris10 \
        --backend vllm --output eval_out/zephyr

``--models`` takes run directories (expanded to their ``iter_*/checkpoint`` folders in
iteration order) and plain Hugging Face model folders, in any mix. Everything that can be
checked cheaply is checked before a model is loaded (suite, task names, checkpoints, offline
datasets, backend), and each problem is reported as one line on stderr with exit status 2.

Settings that change scores (chat template, few-shot as multi-turn, limit, shots, backend,
versions) are written next to the scores, in ``results.json`` and in the table's header.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python eval/run_eval.py): make `eval.suites` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.suites import LOCAL_SUITES, SUITES, TOY_TASKS_DIR, TaskSpec, get_suite  # noqa: E402

EXIT_USAGE = 2
# Dataset builders that read local files, never the hub.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
_ITER_RE = re.compile(r"^iter_(\d+)$")
_TASK_LINE = re.compile(r"^task:\s*([\w.-]+)", re.MULTILINE)


class EvalError(Exception):
    """A problem with the request, reported as one line (no traceback) by ``main``."""


@dataclass(frozen=True)
class Checkpoint:
    label: str
    path: Path
    run: Path | None = None  # the run directory it belongs to, if any


# ----------------------------------------------------------------------------- checkpoints


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a ``config.json`` naming a ``model_type``.

    A run directory also holds a ``config.json`` (the run's resolved options), so the file's
    existence alone does not make a model folder.
    """
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def _iteration_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for child in run_dir.iterdir():
        match = _ITER_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _source_model_of(run_dir: Path) -> str | None:
    """The starting model of a run that began from a given model (``iter_0/source.json``).

    Runs of the embedded default save their starting model (the SFT warm-up) as
    ``iter_0/checkpoint``, which the expansion picks up like any other iteration.
    """
    source = run_dir / "iter_0" / "source.json"
    if not source.is_file():
        return None
    try:
        model = json.loads(source.read_text()).get("model")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


def expand_models(paths: list[str], include_base: bool = False) -> list[Checkpoint]:
    """Resolve ``--models`` arguments to an ordered list of labelled checkpoints.

    A Hugging Face folder (has ``config.json``) is taken as it is. A run directory expands to
    ``iter_0/checkpoint, iter_1/checkpoint, ...`` in numeric order (``iter_0`` is the starting
    model: the embedded default's SFT warm-up; a run from a given model has none there, and
    ``include_base`` adds that model, named in ``iter_0/source.json``); only iterations whose
    checkpoint is complete (``config.json`` written, and the iteration's ``COMPLETE`` marker
    when the run writes one) are taken, so a half-written checkpoint is never evaluated.
    Labels are ``<run>/iter_<t>`` for run checkpoints and the folder name otherwise; a
    repeated label gets a ``#n`` suffix.
    """
    checkpoints: list[Checkpoint] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise EvalError(f"checkpoint not found: {raw}")
        if not path.is_dir():
            raise EvalError(f"not a model folder or run directory: {raw}")
        if _is_hf_folder(path):
            parent = path.parent
            if path.name == "checkpoint" and _ITER_RE.match(parent.name):
                label = f"{parent.parent.name}/{parent.name}"
                run = parent.parent.resolve()
            else:
                label, run = path.resolve().name, None
            checkpoints.append(Checkpoint(label, path, run))
            continue
        iterations = _iteration_dirs(path)
        if not iterations:
            raise EvalError(
                f"no model in {raw}: neither a Hugging Face folder (config.json with a model_type) "
                "nor a run directory with iter_*/checkpoint folders"
            )
        if include_base and not _is_hf_folder(path / "iter_0" / "checkpoint"):
            base = _source_model_of(path)
            if base is None:
                raise EvalError(f"--include-base: run {raw} records no starting model (iter_0/source.json)")
            if Path(base).expanduser().exists() and not _is_hf_folder(Path(base).expanduser()):
                raise EvalError(f"--include-base: the starting model {base} of run {raw} is not a model folder")
            checkpoints.append(Checkpoint(f"{path.resolve().name}/base", Path(base), path.resolve()))
        taken = 0
        for _, iter_dir in iterations:
            ckpt = iter_dir / "checkpoint"
            marker_ok = (iter_dir / "COMPLETE").exists() or not any(
                (d / "COMPLETE").exists() for _, d in iterations
            )
            if _is_hf_folder(ckpt) and marker_ok:
                checkpoints.append(Checkpoint(f"{path.resolve().name}/{iter_dir.name}", ckpt, path.resolve()))
                taken += 1
        if taken == 0:
            raise EvalError(f"run directory {raw} has no complete iter_*/checkpoint yet")
    checkpoints = _disambiguate_runs(checkpoints)
    seen: dict[str, int] = {}
    unique = []
    for ckpt in checkpoints:
        seen[ckpt.label] = seen.get(ckpt.label, 0) + 1
        label = ckpt.label if seen[ckpt.label] == 1 else f"{ckpt.label}#{seen[ckpt.label]}"
        unique.append(Checkpoint(label, ckpt.path, ckpt.run))
    return unique


def _disambiguate_runs(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Runs whose directories share a name (``a/run``, ``b/run``) get ``a/run/iter_1``-style labels."""
    runs_by_name: dict[str, set[Path]] = {}
    for ckpt in checkpoints:
        if ckpt.run is not None:
            runs_by_name.setdefault(ckpt.run.name, set()).add(ckpt.run)
    return [
        Checkpoint(f"{c.run.parent.name}/{c.label}", c.path, c.run)
        if c.run is not None and len(runs_by_name[c.run.name]) > 1 else c
        for c in checkpoints
    ]


# ----------------------------------------------------------------------------- tasks


def offline_mode() -> bool:
    """True when either Hugging Face offline switch is set (as ``huggingface_hub`` reads them)."""
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(name, "").strip().lower() in truthy
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def make_task_manager(specs: list[TaskSpec], local_dirs: list[Path]):
    """A ``TaskManager`` over the repo's task packs, plus lm-eval's built-ins only if needed.

    The repo's packs (``eval/tasks``) are always indexed, so ``--tasks toy_mc`` works with
    any suite. Indexing the thousands of built-in YAML files takes seconds, so a request
    that only names local tasks (the toy suite) skips it.
    """
    dirs = sorted({str(TOY_TASKS_DIR), *(str(d) for d in local_dirs)})
    local_names = set()
    for directory in dirs:
        for yaml_path in Path(directory).rglob("*.yaml"):
            local_names |= set(_TASK_LINE.findall(yaml_path.read_text(encoding="utf-8")))
    needs_defaults = any(spec.task not in local_names for spec in specs)
    return _task_manager(tuple(dirs), needs_defaults)


@functools.lru_cache(maxsize=4)
def _task_manager(local_dirs: tuple[str, ...], include_defaults: bool):
    """Built once per process and configuration: the index is read-only after construction."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(local_dirs) or None, include_defaults=include_defaults)


def resolve_tasks(suite: str | None, task_names: list[str] | None) -> tuple[list[TaskSpec], list[Path]]:
    """The task specs to run: a suite, optionally narrowed or extended by ``--tasks``.

    A ``--tasks`` name that is a suite task (by lm-eval name or label) keeps the suite's shots
    and metric; any other name is taken as an lm-eval task with its own default shots, scored
    by the first metric it reports.
    """
    if suite is None and not task_names:
        raise EvalError("nothing to evaluate: give --suite or --tasks")
    local_dirs: list[Path] = []
    base: list[TaskSpec] = []
    if suite is not None:
        try:
            base = list(get_suite(suite))
        except ValueError as err:
            raise EvalError(str(err)) from None
        if suite in LOCAL_SUITES:
            local_dirs.append(LOCAL_SUITES[suite])
    if not task_names:
        return base, local_dirs
    by_name = {s.task: s for s in base} | {s.label: s for s in base}
    chosen = []
    for name in task_names:
        chosen.append(by_name.get(name) or TaskSpec(name, None, None, name))
    return chosen, local_dirs


def _dataset_paths(name: str, index, seen: set[str]) -> set[tuple[str, str]]:
    """``(task, dataset_path)`` of every leaf task under ``name`` (groups and tags followed)."""
    if name in seen:
        return set()
    seen.add(name)
    entry = index.get(name)
    if entry is None:
        return set()
    kind = entry.kind.name
    found: set[tuple[str, str]] = set()
    if kind == "TAG":
        for child in entry.tags:
            found |= _dataset_paths(child, index, seen)
    elif kind == "GROUP":
        members = (entry.cfg or {}).get("task") or []
        for member in members if isinstance(members, list) else [members]:
            child = member if isinstance(member, str) else member.get("task") or member.get("group")
            if isinstance(child, str):
                found |= _dataset_paths(child, index, seen)
    else:
        cfg = entry.cfg or {}
        if cfg.get("custom_dataset") is not None:
            return found
        found.add((name, str(cfg.get("dataset_path") or "")))
    return found


def _in_local_cache(dataset_path: str) -> bool:
    """Whether ``datasets`` can load this hub dataset offline (a prepared or hub-cache copy)."""
    import datasets.config
    from huggingface_hub import constants

    prepared = Path(datasets.config.HF_DATASETS_CACHE) / dataset_path.replace("/", "___")
    hub_copy = Path(constants.HF_HUB_CACHE) / ("datasets--" + dataset_path.replace("/", "--"))
    return prepared.exists() or hub_copy.exists()


def validate_tasks(specs: list[TaskSpec], task_manager) -> None:
    """Unknown tasks, and hub datasets requested while offline, fail here, before any loading."""
    index = task_manager.task_index
    unknown = [s.task for s in specs if s.task not in index]
    if unknown:
        raise EvalError(
            f"unknown lm-eval task(s): {', '.join(unknown)} "
            "(names as in `lm_eval ls tasks`, or a task of the chosen suite)"
        )
    if not offline_mode():
        return
    for spec in specs:
        for task, dataset_path in sorted(_dataset_paths(spec.task, index, set())):
            if not dataset_path or dataset_path in LOCAL_BUILDERS:
                continue
            if not _in_local_cache(dataset_path):
                raise EvalError(
                    f"task {spec.task!r} needs the hub dataset {dataset_path!r} (subtask {task}), "
                    "which is not cached, and HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: "
                    "run once online to cache it, or unset the offline switches"
                )


def check_backend(backend: str, device: str) -> None:
    if backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise EvalError("--backend vllm: vllm is not installed (it is an optional GPU extra)")
        import torch

        if not torch.cuda.is_available():
            raise EvalError("--backend vllm needs a CUDA GPU; use --backend hf on CPU")
    elif device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvalError(f"--device {device}: no CUDA GPU here; use --device cpu")


# ----------------------------------------------------------------------------- evaluation


def _make_lm(checkpoint: Checkpoint, args):
    from lm_eval.api.registry import get_model

    model_args = {"pretrained": str(checkpoint.path), "dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    extra = {"batch_size": args.batch_size} if args.backend == "vllm" else \
        {"batch_size": args.batch_size, "device": args.device}
    return get_model(args.backend).create_from_arg_obj(model_args, extra)


def evaluate_checkpoint(checkpoint: Checkpoint, specs: list[TaskSpec], task_manager, args) -> dict:
    """All tasks on one checkpoint, one model load; one ``simple_evaluate`` call per shot count.

    ``simple_evaluate`` takes a single ``num_fewshot``, so tasks are grouped by their shot
    count and the already-built model object is reused across the groups.
    """
    import lm_eval

    lm = _make_lm(checkpoint, args)
    merged: dict = {"results": {}, "groups": {}, "n-shot": {}, "versions": {}, "configs": {},
                    "higher_is_better": {}, "n-samples": {}}
    by_shots: dict[int | None, list[str]] = {}
    for spec in specs:
        by_shots.setdefault(spec.num_fewshot, []).append(spec.task)
    for shots, tasks in by_shots.items():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=shots,
            limit=args.limit,
            task_manager=task_manager,
            apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            log_samples=False,
            bootstrap_iters=args.bootstrap_iters,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
        for key in merged:
            merged[key].update(out.get(key) or {})
        merged["config"] = out.get("config", {})
    # The template actually applied (the tokenizer's), so a table can be traced to its prompts.
    merged["chat_template"] = lm.chat_template(True) if args.apply_chat_template else None
    del lm
    return merged


def score_of(spec: TaskSpec, raw: dict) -> tuple[float, str]:
    """The reported score of a task (and the metric key used) from a merged result dict."""
    results = raw["results"].get(spec.task)
    if results is None:
        raise EvalError(f"lm-eval returned no result for task {spec.task!r}")
    if spec.metric is not None:
        if spec.metric not in results:
            keys = sorted(k for k in results if "," in k and "_stderr" not in k)
            raise EvalError(
                f"task {spec.task!r} has no metric {spec.metric!r}; it reports {', '.join(keys)}"
            )
        return float(results[spec.metric]), spec.metric
    keys = [k for k in results if "," in k and "_stderr" not in k and isinstance(results[k], (int, float))]
    if not keys:
        raise EvalError(f"task {spec.task!r} reported no numeric metric")
    return float(results[keys[0]]), keys[0]


# ----------------------------------------------------------------------------- outputs


def settings_of(args, specs: list[TaskSpec]) -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("lm_eval", "torch", "transformers", "datasets", "vllm"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return {
        "suite": args.suite,
        "backend": args.backend,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "apply_chat_template": args.apply_chat_template,
        "fewshot_as_multiturn": args.fewshot_as_multiturn,
        "limit": args.limit,
        "seed": args.seed,
        "bootstrap_iters": args.bootstrap_iters,
        "tasks": [asdict(s) for s in specs],
        "versions": versions,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def markdown_table(specs: list[TaskSpec], labels: list[str], scores: dict[str, dict[str, float]],
                   metrics: dict[str, str], settings: dict) -> str:
    """Tasks as rows, checkpoints as columns, scores in percent, the mean over tasks last."""
    header = ["Task (shots, metric)", *labels]
    lines = [
        f"Suite `{settings['suite']}`; backend {settings['backend']}; "
        f"chat template {'on' if settings['apply_chat_template'] else 'off'}; "
        f"few-shot as multi-turn {'on' if settings['fewshot_as_multiturn'] else 'off'}; "
        f"limit {settings['limit'] if settings['limit'] is not None else 'none'}; "
        f"lm_eval {settings['versions'].get('lm_eval', '?')}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for spec in specs:
        shots = "default" if spec.num_fewshot is None else f"{spec.num_fewshot}-shot"
        name = f"{spec.label} ({shots}, {metrics[spec.task].split(',')[0]})"
        row = [f"{100 * scores[label][spec.task]:.2f}" for label in labels]
        lines.append("| " + " | ".join([name, *row]) + " |")
    averages = [100 * sum(scores[label][s.task] for s in specs) / len(specs) for label in labels]
    lines.append("| **Average** | " + " | ".join(f"**{a:.2f}**" for a in averages) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(specs: list[TaskSpec], labels: list[str], scores: dict[str, dict[str, float]],
                path: Path, title: str, groups: list[str] | None = None) -> None:
    """Each task and the average across checkpoints; ``groups`` (one key per checkpoint,
    e.g. its run) breaks the lines between runs so iterations of different runs are not joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups or ["all"] * len(labels)
    segments: list[list[int]] = []
    for i, key in enumerate(groups):
        if i and key == groups[i - 1]:
            segments[-1].append(i)
        else:
            segments.append([i])
    series = [(spec.label, [100 * scores[l][spec.task] for l in labels], {"marker": "o", "alpha": 0.8})
              for spec in specs]
    averages = [100 * sum(scores[l][s.task] for s in specs) / len(specs) for l in labels]
    series.append(("Average", averages, {"marker": "s", "color": "black", "linewidth": 2.5}))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 3), 4.8))
    for name, values, style in series:
        color = style.pop("color", None)
        for n, segment in enumerate(segments):
            line, = ax.plot(segment, [values[i] for i in segment], label=name if n == 0 else None,
                            color=color, **style)
            color = line.get_color()
    for segment in segments[1:]:
        ax.axvline(segment[0] - 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(list(range(len(labels))))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.#-]+", "__", label)


def write_outputs(output: Path, specs, checkpoints, raws, settings) -> dict:
    from lm_eval.utils import handle_non_serializable

    output.mkdir(parents=True, exist_ok=True)
    (output / "raw").mkdir(exist_ok=True)
    labels = [c.label for c in checkpoints]
    scores: dict[str, dict[str, float]] = {}
    metrics: dict[str, str] = {}
    for ckpt in checkpoints:
        raw = raws[ckpt.label]
        raw["iris_ref_settings"] = settings | {"checkpoint": str(ckpt.path), "label": ckpt.label}
        (output / "raw" / f"{_safe_name(ckpt.label)}.json").write_text(
            json.dumps(raw, indent=2, default=handle_non_serializable)
        )
        scores[ckpt.label] = {}
        for spec in specs:
            value, key = score_of(spec, raw)
            scores[ckpt.label][spec.task] = value
            metrics[spec.task] = key
    summary = {
        "settings": settings,
        "checkpoints": [{"label": c.label, "path": str(c.path)} for c in checkpoints],
        "metrics": metrics,
        "scores": scores,
        "average": {l: sum(scores[l].values()) / len(specs) for l in labels},
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    (output / "results.md").write_text(markdown_table(specs, labels, scores, metrics, settings))
    plot_scores(specs, labels, scores, output / "scores.png",
                f"{settings['suite'] or 'tasks'} across checkpoints",
                groups=[str(c.run) if c.run is not None else f"model:{c.label}" for c in checkpoints])
    return summary


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate checkpoints (a run's iter_*/checkpoint folders or HF folders) with lm-eval.",
    )
    parser.add_argument("--models", nargs="+", required=True, metavar="DIR",
                        help="run directories (expanded to iter_*/checkpoint) or HF model folders")
    parser.add_argument("--include-base", action="store_true",
                        help="for a run started from a given model (no iter_0/checkpoint): evaluate that model "
                             "first (named in iter_0/source.json; a local folder or a hub id)")
    parser.add_argument("--suite", default=None, help=f"one of: {', '.join(sorted(SUITES))}")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help="only these tasks of the suite, or extra lm-eval task names")
    parser.add_argument("--output", required=True, metavar="OUTDIR")
    parser.add_argument("--limit", type=float, default=None,
                        help="examples per task (testing only; <1 means a fraction)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--batch-size", default=None,
                        help="per-model batch size, or 'auto' / 'auto:N' (lm-eval's search). "
                             "Default: auto:4 on a GPU, 16 on CPU (the search costs more than it saves there)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto, bfloat16, float32, ...)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint's own model code (as run_iris.py's option; off by default)")
    parser.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction, default=True,
                        help="wrap prompts in the model's chat template (default on: self-play "
                             "checkpoints are chat models trained with their template)")
    parser.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction, default=None,
                        help="few-shot examples as a multi-turn chat (default: on with the chat template)")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for non-mean metrics' stderr (0: none)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def _batch_size(value: str) -> int | str:
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value == "auto" or re.fullmatch(r"auto:\d+", value):
        return value
    raise EvalError(f"--batch-size must be a positive integer, 'auto' or 'auto:N', not {value!r}")


def prepare(argv: list[str] | None = None):
    """Parse and validate everything that needs no model: returns (args, specs, checkpoints, tm)."""
    args = build_parser().parse_args(argv)
    if args.limit is not None:
        if args.limit <= 0:
            raise EvalError(f"--limit must be positive, not {args.limit}")
        if args.limit >= 1:
            if args.limit != int(args.limit):
                raise EvalError(f"--limit above 1 must be a whole number, not {args.limit}")
            args.limit = int(args.limit)
    if args.fewshot_as_multiturn is None:
        args.fewshot_as_multiturn = args.apply_chat_template
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise EvalError("--fewshot-as-multiturn needs --apply-chat-template")
    specs, local_dirs = resolve_tasks(args.suite, args.tasks)
    checkpoints = expand_models(args.models, include_base=args.include_base)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch_size is None:
        args.batch_size = "auto:4" if args.device.startswith("cuda") else "16"
    args.batch_size = _batch_size(str(args.batch_size))
    check_backend(args.backend, args.device)
    task_manager = make_task_manager(specs, local_dirs)
    validate_tasks(specs, task_manager)
    return args, specs, checkpoints, task_manager


def run(argv: list[str] | None = None) -> dict:
    """The whole evaluation; returns the summary written to ``results.json``."""
    args, specs, checkpoints, task_manager = prepare(argv)
    output = Path(args.output)
    settings = settings_of(args, specs)
    raws = {}
    for ckpt in checkpoints:
        started = time.time()
        print(f"[run_eval] {ckpt.label}: {ckpt.path}", file=sys.stderr, flush=True)
        raws[ckpt.label] = evaluate_checkpoint(ckpt, specs, task_manager, args)
        raws[ckpt.label]["iris_ref_seconds"] = time.time() - started
    summary = write_outputs(output, specs, checkpoints, raws, settings)
    print((output / "results.md").read_text())
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except EvalError as err:
        print(f"run_eval: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
