"""The run configuration: one dataclass, a YAML file plus command-line overrides.

`IrisConfig` holds every option of a self-play run. Options whose published default differs
between the paper-scale setting (`--model` given) and the embedded offline default (no
`--model`) are `None` in the dataclass and filled by `resolve()`:

- paper-scale defaults (`PAPER_DEFAULTS`) follow the published self-play setups (SPIN, Chen et
  al. 2024, and SPACE, Wang et al. 2025; see DESIGN.md), and
- embedded defaults (`EMBEDDED_DEFAULTS`) were chosen from measurements on the shipped toy task
  (docs/usage.md lists what was tried).

An option given on the command line or in the YAML file always wins over both.
`parse_config(argv)` returns the resolved, validated config, or raises `ConfigError` with a
one-line message; it never loads a model or a dataset (validation happens before heavy work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

LOSSES = ("iris", "spin", "space", "spif")

# SPIN's released recipe: zephyr-7b-sft-full on UltraChat-200k (first turn, split train_sft).
DEFAULT_HUB_DATASET = "HuggingFaceH4/ultrachat_200k"

PAPER_DEFAULTS: dict[str, Any] = {
    "beta": 0.1,  # SPIN lambda = 0.1; SPACE uses beta = 1 (applied for --loss space)
    "learning_rate": 5e-7,  # SPIN (iteration 0 used 5e-7; later iterations 1e-7)
    "optimizer": "rmsprop",  # SPIN: RMSprop, no weight decay
    "warmup_ratio": 0.1,  # SPIN/alignment-handbook: 10% warmup, then linear decay
    "epochs": 2,  # SPIN: 2 epochs per iteration
    "global_batch_size": 64,  # SPIN: 8 GPUs x 8
    "micro_batch_size": 8,  # SPIN: per-device batch 8
    "max_length": 1024,  # SPIN
    "max_prompt_length": 512,  # SPIN
    "num_samples": 50000,  # SPIN: 50k prompts of UltraChat-200k (26k: IRIS data-efficiency setting)
    "sft_epochs": 0,  # the given model is already the SFT model
    "eval_num_samples": 256,  # held-out prompts per evaluation (our choice: cost bound)
    "generation_batch_size": 16,
    "save_steps": 50,
}

# Chosen from measurements on the toy task (docs/usage.md, "Embedded default").
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "beta": 1.0,
    "learning_rate": 1e-4,
    "optimizer": "adamw",
    "warmup_ratio": 0.1,
    "epochs": 1,
    "global_batch_size": 32,
    "micro_batch_size": 16,
    "max_length": 64,
    "max_prompt_length": 32,
    "num_samples": None,  # every toy training row
    "sft_epochs": 2,
    "sft_learning_rate": 3e-3,
    "eval_num_samples": None,  # every held-out row
    "generation_batch_size": 64,
    "save_steps": 20,
    "threads": 1,
}


class ConfigError(ValueError):
    """A bad or contradictory option; its message is one line, shown as `error: <message>`."""


def _opt(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class IrisConfig:
    # --- what to train -----------------------------------------------------------------
    model: Optional[str] = _opt(
        None,
        "SFT model to start from: hub id or local HF folder. Default: none, which runs the embedded "
        "offline default (tiny Qwen2 model built on the spot + toy task + SFT warm-up).",
    )
    dataset: Optional[str] = _opt(
        None,
        f"Hub dataset name or local .json/.jsonl/.parquet with a `messages` column. Default: "
        f"{DEFAULT_HUB_DATASET} (SPIN) with --model, the shipped toy task without.",
    )
    split: Optional[str] = _opt(
        None, "Dataset split. Default: train_sft for hub datasets (SPIN), train for local files."
    )
    num_samples: Optional[int] = _opt(
        None, "Number of prompts (fixed seeded subset). Default: 50000 (SPIN) with --model; all toy rows without."
    )
    first_turn: bool = _opt(
        True, "Use the first user turn as prompt (SPIN). --no-first-turn keeps the whole conversation before the last assistant turn."
    )
    eval_dataset: Optional[str] = _opt(
        None, "Held-out data for per-iteration evaluation. Default: the toy held-out file without --model; the dataset's test_sft split with the hub default; none otherwise."
    )
    eval_split: Optional[str] = _opt(None, "Split of --eval-dataset. Default: test_sft for hub datasets, train for local files.")
    eval_num_samples: Optional[int] = _opt(None, "Held-out rows per evaluation. Default: 256 with --model; all toy rows without.")
    iters: int = _opt(3, "Number of self-play iterations (SPIN and IRIS report 3).")
    # --- objective ---------------------------------------------------------------------
    loss: Literal["iris", "spin", "space", "spif"] = _opt("iris", "Self-play objective.")
    alpha_schedule: Literal["adaptive", "constant", "linear"] = _opt(
        "adaptive", "Order schedule (THEORY.md section 4): adaptive gap-based, constant --alpha, or linear decay from --alpha-max to --alpha-min."
    )
    alpha: float = _opt(1.0, "IRIS order for --alpha-schedule constant (alpha = 1 is the KL/SPIN regime).")
    alpha_min: float = _opt(0.5, "Smallest order of the adaptive/linear schedule (symmetric regime, THEORY.md section 4).")
    alpha_max: float = _opt(2.0, "Largest order, used at the first iteration (chi-square regime, THEORY.md section 4).")
    gap: Literal["auc", "mean"] = _opt("auc", "Gap measure of the adaptive schedule: |2 AUC - 1| of per-token opponent scores, or the mean score difference.")
    beta: Optional[float] = _opt(
        None, "Reward scale beta. Default: 0.1 (SPIN) with --model, 1.0 for --loss space (SPACE); 1.0 for the embedded default (measured)."
    )
    mu: float = _opt(1.0, "SPACE: synthetic samples per annotated sample (SPACE paper: 1).")
    reward_bound: Optional[float] = _opt(None, "SPIF: optional bound |r| <= B on the rewards (default: none).")
    # --- optimisation ------------------------------------------------------------------
    optimizer: Optional[Literal["rmsprop", "adamw"]] = _opt(
        None, "Optimizer. Default: rmsprop without weight decay (SPIN) with --model; adamw for the embedded default (measured)."
    )
    learning_rate: Optional[float] = _opt(None, "Peak learning rate. Default: 5e-7 (SPIN) with --model; 1e-4 embedded (measured).")
    weight_decay: float = _opt(0.0, "Weight decay (SPIN: 0).")
    warmup_ratio: Optional[float] = _opt(None, "Fraction of steps of linear warmup, then linear decay. Default: 0.1 (SPIN).")
    epochs: Optional[int] = _opt(None, "Epochs per iteration. Default: 2 (SPIN); 1 embedded (time budget).")
    global_batch_size: Optional[int] = _opt(None, "Pairs per optimizer step. Default: 64 (SPIN: 8 GPUs x 8); 32 embedded.")
    micro_batch_size: Optional[int] = _opt(None, "Pairs per forward/backward (gradient accumulation; per rank under torchrun). Default: 8 (SPIN per-device); 16 embedded.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (TRL/transformers default 1.0).")
    gradient_checkpointing: Optional[bool] = _opt(
        None, "Non-reentrant gradient checkpointing (--gradient-checkpointing [true|false]). Default: on with CUDA, off on CPU.", nargs="?", const=True
    )
    bf16: Optional[bool] = _opt(
        None, "bf16 autocast (--bf16 [true|false]). Default: on with CUDA, off on CPU; requires CUDA.", nargs="?", const=True
    )
    parallel: Literal["auto", "ddp", "fsdp", "none"] = _opt(
        "auto", "Under torchrun: DDP (auto) or FSDP2 (fsdp: fully_shard per decoder layer) for models that do not fit one GPU."
    )
    fsdp: bool = _opt(False, "Shorthand for --parallel fsdp.")
    save_steps: Optional[int] = _opt(None, "Save the trainer state (for --resume) every N optimizer steps. Default: 50; 20 embedded.")
    # --- lengths and generation ----------------------------------------------------------
    max_length: Optional[int] = _opt(None, "Max tokens of prompt + response. Default: 1024 (SPIN); 64 embedded.")
    max_prompt_length: Optional[int] = _opt(None, "Max prompt tokens; longer prompts are skipped and counted. Default: 512 (SPIN); 32 embedded.")
    max_new_tokens: Optional[int] = _opt(None, "Max generated tokens. Default: max_length - max_prompt_length.")
    temperature: float = _opt(1.0, "Sampling temperature of the opponent (SPIN: 1.0).")
    top_p: float = _opt(1.0, "Nucleus sampling of the opponent (SPIN: 1.0).")
    generator: Literal["auto", "vllm", "hf"] = _opt("auto", "Generation backend: vLLM when importable and CUDA is present (auto), else transformers.")
    generation_batch_size: Optional[int] = _opt(None, "Prompts per generation batch (transformers backend). Default: 16; 64 embedded.")
    # --- embedded default: SFT warm-up ---------------------------------------------------
    sft_epochs: Optional[int] = _opt(None, "Epochs of SFT warm-up before self-play. Default: 0 with --model (the model is the SFT model); 2 embedded.")
    sft_learning_rate: Optional[float] = _opt(None, "Learning rate of the SFT warm-up. Default: --learning-rate; 3e-3 embedded.")
    # --- run ---------------------------------------------------------------------------
    output_dir: Optional[str] = _opt(None, "Run directory. Default: runs/<model name>-<loss>.")
    resume: bool = _opt(False, "Continue a killed run in --output-dir from its last completed iteration/step.")
    overwrite: bool = _opt(False, "Delete an existing run in --output-dir and start afresh.")
    seed: int = _opt(0, "Seed of data subset, sampling, initialisation and data order.")
    device: str = _opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    threads: Optional[int] = _opt(
        None, "torch intra-op CPU threads. Default: torch's own with --model; 1 embedded (measured: the tiny model's "
        "matrices gain nothing from more, and an oversubscribed machine made 2 threads 10x slower)."
    )
    trust_remote_code: bool = _opt(False, "Allow custom model code from the hub (off: safe loading).")

    # ---------------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True for the offline default: no --model, the tiny model is built on the spot."""
        return self.model is None

    def resolve(self) -> "IrisConfig":
        """Fill every `None` default (paper-scale or embedded) and derived value; returns a copy."""
        values = dataclasses.asdict(self)
        table = EMBEDDED_DEFAULTS if self.embedded else PAPER_DEFAULTS
        for key, default in table.items():
            if key in values and values[key] is None:
                values[key] = default
        if not self.embedded and self.loss == "space" and self.beta is None:
            values["beta"] = 1.0  # SPACE paper
        if values["fsdp"]:
            if values["parallel"] not in ("auto", "fsdp"):
                raise ConfigError(f"--fsdp contradicts --parallel {values['parallel']}")
            values["parallel"] = "fsdp"
        if values["sft_learning_rate"] is None:
            values["sft_learning_rate"] = values["learning_rate"]
        if values["max_new_tokens"] is None and values["max_length"] is not None and values["max_prompt_length"] is not None:
            values["max_new_tokens"] = values["max_length"] - values["max_prompt_length"]
        if values["device"] == "auto":
            values["device"] = "cuda" if _cuda_available() else "cpu"
        on_cuda = str(values["device"]).startswith("cuda")
        if values["bf16"] is None:
            values["bf16"] = on_cuda
        if values["gradient_checkpointing"] is None:
            values["gradient_checkpointing"] = on_cuda
        if values["dataset"] is None and not self.embedded:
            values["dataset"] = DEFAULT_HUB_DATASET
        if values["eval_dataset"] is None and values["dataset"] == DEFAULT_HUB_DATASET:
            values["eval_dataset"] = DEFAULT_HUB_DATASET
        if values["split"] is None and values["dataset"] is not None:
            values["split"] = "train" if _is_local(values["dataset"]) else "train_sft"
        if values["eval_split"] is None and values["eval_dataset"] is not None:
            values["eval_split"] = "train" if _is_local(values["eval_dataset"]) else "test_sft"
        if values["output_dir"] is None:
            name = "tiny" if self.embedded else Path(str(self.model).rstrip("/")).name
            values["output_dir"] = str(Path("runs") / f"{name}-{values['loss']}")
        return IrisConfig(**values)

    def validate(self) -> None:
        """Raise `ConfigError` (one line) for bad or contradictory options. Call on a resolved config."""
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("alpha_schedule", self.alpha_schedule, ("adaptive", "constant", "linear"))
        _check_choice("gap", self.gap, ("auc", "mean"))
        _check_choice("optimizer", self.optimizer, ("rmsprop", "adamw"))
        _check_choice("generator", self.generator, ("auto", "vllm", "hf"))
        _check_choice("parallel", self.parallel, ("auto", "ddp", "fsdp", "none"))
        if self.iters < 1:
            raise ConfigError(f"--iters must be >= 1, got {self.iters}")
        for name in ("alpha", "alpha_min", "alpha_max"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (IRIS order alpha), got {getattr(self, name)}")
        if self.alpha_min > self.alpha_max:
            raise ConfigError(f"--alpha-min ({self.alpha_min}) is larger than --alpha-max ({self.alpha_max})")
        for name in ("beta", "mu", "learning_rate", "sft_learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.reward_bound is not None and not self.reward_bound > 0:
            raise ConfigError(f"--reward-bound must be > 0, got {self.reward_bound}")
        if self.reward_bound is not None and self.loss != "spif":
            raise ConfigError(f"--reward-bound only applies to --loss spif, not {self.loss}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ConfigError("--weight-decay must be >= 0 and --max-grad-norm > 0")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"--max-prompt-length ({self.max_prompt_length}) must be smaller than --max-length ({self.max_length})"
            )
        for name in ("epochs", "global_batch_size", "micro_batch_size", "max_length", "max_prompt_length",
                     "max_new_tokens", "generation_batch_size", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.sft_epochs < 0:
            raise ConfigError(f"--sft-epochs must be >= 0, got {self.sft_epochs}")
        for name in ("num_samples", "eval_num_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--micro-batch-size {self.micro_batch_size} does not divide --global-batch-size {self.global_batch_size}"
            )
        if self.max_new_tokens > self.max_length - self.max_prompt_length:
            raise ConfigError(
                f"--max-new-tokens ({self.max_new_tokens}) exceeds --max-length - --max-prompt-length "
                f"({self.max_length - self.max_prompt_length}): generated responses would not fit the training length"
            )
        on_cuda = str(self.device).startswith("cuda")
        if self.device != "cpu" and not on_cuda:
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if on_cuda and not _cuda_available():
            raise ConfigError(f"--device {self.device} requested but CUDA is not available")
        if self.bf16 and not on_cuda:
            raise ConfigError("--bf16 needs CUDA (bf16 autocast is GPU-only here); drop --bf16 or use a GPU")
        if self.generator == "vllm" and not on_cuda:
            raise ConfigError("--generator vllm needs CUDA; use --generator hf on CPU")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")

    def training_dict(self) -> dict[str, Any]:
        """Plain dict of the resolved config (JSON-serialisable), as saved in config.json."""
        return dataclasses.asdict(self)


# Options that may differ between the original run and a --resume of it.
RESUMABLE_CHANGES = frozenset({"iters", "resume", "overwrite", "device", "generator", "generation_batch_size", "threads"})


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")


def _is_local(source: str) -> bool:
    return os.path.exists(source) or source.endswith((".json", ".jsonl", ".parquet")) or source.startswith((".", "/"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class _OneLineParser:
    """Builds the `HfArgumentParser` whose errors are one line (`ConfigError`), not usage + exit."""

    @staticmethod
    def build():
        from transformers import HfArgumentParser

        class Parser(HfArgumentParser):
            def error(self, message):  # argparse would print usage and exit; we want one line
                raise ConfigError(message.splitlines()[0])

        parser = Parser(IrisConfig, description="IRIS self-play fine-tuning (iris-ref).", allow_abbrev=False)
        parser.add_argument("--config", default=None, help="YAML file of options; command-line options override it.")
        return parser


def build_parser():
    """The command-line parser (also used by `run_iris.py --help`)."""
    return _OneLineParser.build()


def load_yaml_options(path: str) -> dict[str, Any]:
    """Read a YAML file of options (keys with `_` or `-`); unknown keys are a `ConfigError`."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in dataclasses.fields(IrisConfig)}
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown option {key!r} in config file {path}")
        options[name] = value
    return options


def parse_config(argv: Optional[list[str]] = None) -> IrisConfig:
    """Parse `--config file.yaml` plus command-line overrides; returns the resolved, validated config."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**load_yaml_options(known.config))
    config, _namespace, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise ConfigError(f"unrecognized arguments: {' '.join(remaining)}")
    resolved = config.resolve()
    resolved.validate()
    return resolved


def config_from_dict(values: dict[str, Any]) -> IrisConfig:
    """Rebuild a config from a dict (config.json); unknown keys are a `ConfigError`."""
    known = {f.name for f in dataclasses.fields(IrisConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown options in saved config: {', '.join(unknown)}")
    return IrisConfig(**values)


def save_config(config: IrisConfig, path: Path, versions: dict[str, Any]) -> None:
    """Write the resolved config plus software versions as JSON, atomically."""
    payload = {"config": config.training_dict(), "versions": versions}
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def collect_versions() -> dict[str, Any]:
    """torch, transformers, python, and the git commit of the code (if in a git checkout)."""
    import platform
    import subprocess

    import torch
    import transformers

    commit = None
    try:
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "iris_ref_commit": commit,
        "cuda": torch.version.cuda,
    }
