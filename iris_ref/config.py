"""The run configuration: one dataclass, one source of truth for every default.

Layers, later ones win:

1. the field defaults of `IrisConfig`: the published self-play setups (SPIN, Chen et al.
   2024; SPACE, Wang et al. 2025), each with its source in the help text;
2. without `--model`, the embedded default `iris_ref/configs/tiny.yaml` (a tiny model built
   on the spot and the shipped toy task; its constants were chosen from measurements);
3. `--config file.yaml`: a path, or the name of a shipped config in `iris_ref/configs/`
   (`qwen2.5-3b`, `zephyr-7b`, `tiny`);
4. options on the command line.

A few options are derived when not given (`resolve()`): `max_new_tokens`, `bf16` and
gradient checkpointing (on with CUDA), dataset splits, SPACE's β and μ, the output folder.

`--resume` needs nothing but `--output-dir`: the run's saved `config.json` supplies every
option, options given again must agree with it (all disagreements are listed in one
message), and only the options in `RESUMABLE_CHANGES` may differ.

`parse_config(argv)` returns the resolved, validated config or raises `ConfigError` (one
line). It reads no model and no dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from iris_ref import rundir
from iris_ref.errors import ConfigError

LOSSES = ("iris", "spin", "space", "spif")
MIN_VALIDATION_ROWS = 32  # --sft-validation-size as a fraction: an NLL over fewer rows is mostly noise
DEFAULT_HUB_DATASET = "HuggingFaceH4/ultrachat_200k"  # SPIN: UltraChat-200k, first turn, train_sft
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: found from any folder
EMBEDDED_CONFIG = SHIPPED_CONFIGS / "tiny.yaml"


def _opt(default, help_text: str, group: str, source: str = "", **extra):
    """A config field: what it does (`help`), its section of --help, and where its default comes from."""
    return field(default=default, metadata={"help": help_text, "group": group, "source": source, **extra})


@dataclass
class IrisConfig:
    # --- what to train -----------------------------------------------------------------
    model: Optional[str] = _opt(None, "SFT model to start from: hub id or local Hugging Face folder; none runs the "
                                "embedded default (a tiny Qwen2 model built on the spot, the toy task, an SFT warm-up).",
                                "data")
    dataset: Optional[str] = _opt(None, "Annotated data: hub name, a local .json/.jsonl/.parquet file, or a folder "
                                  "written by datasets' save_to_disk, with `messages`, `prompt`+`chosen` or "
                                  "`prompt`+`completion`.", "data",
                                  f"{DEFAULT_HUB_DATASET} with --model (SPIN); the toy task without")
    split: Optional[str] = _opt(None, "Dataset split (a file or a saved Dataset is whatever split is asked for).", "data",
                                "train_sft for hub datasets (SPIN), train for local data")
    num_samples: Optional[int] = _opt(50000, "Prompts used: a fixed seeded subset (none: all).", "data",
                                      "SPIN; 26k is the IRIS data-efficiency setting")
    first_turn: bool = _opt(True, "The prompt is the first user turn; --no-first-turn keeps the whole conversation "
                            "before the last assistant turn.", "data", "SPIN")
    eval_dataset: Optional[str] = _opt(None, "Held-out data evaluated after every iteration.", "data",
                                       "test_sft of the hub default; the toy held-out file without --model; else none")
    eval_split: Optional[str] = _opt(None, "Split of --eval-dataset.", "data",
                                     "test_sft for hub datasets, test for a saved DatasetDict folder, train for files")
    eval_num_samples: Optional[int] = _opt(256, "Held-out rows per evaluation (none: all).", "data", "our choice: a cost bound")
    chat_template_kwargs: Optional[str] = _opt(None, "Options of the chat template as a JSON object, passed to every "
                                                "rendering (TRL's name), e.g. '{\"enable_thinking\": false}' for Qwen3.",
                                                "data")
    template_date: Optional[str] = _opt(None, "The date the chat template sees (YYYY-MM-DD; Llama 3.x templates print "
                                        "it), frozen for the run so that a resume on another day gives the same ids.",
                                        "data", "the day the run starts")
    iters: int = _opt(3, "Self-play iterations.", "data", "SPIN, IRIS")
    # --- objective ---------------------------------------------------------------------
    loss: Literal["iris", "spin", "space", "spif"] = _opt("iris", "Self-play objective (THEORY.md section 2).", "objective")
    alpha_schedule: Literal["adaptive", "constant", "linear"] = _opt(
        "adaptive", "Order schedule: the guarded gap-based one, constant --alpha, or linear from --alpha-max to "
        "--alpha-min.", "objective", "THEORY.md section 4")
    alpha: float = _opt(1.0, "IRIS order of the constant schedule.", "objective", "the KL (SPIN) regime")
    alpha_min: float = _opt(0.5, "Smallest order of the adaptive and linear schedules.", "objective",
                            "THEORY.md section 4: the symmetric regime")
    alpha_max: float = _opt(2.0, "Largest order, used at the first iteration.", "objective",
                            "THEORY.md section 4: the chi-square regime")
    gap: Literal["auc", "mean"] = _opt("auc", "Gap of the adaptive schedule: |2 AUC - 1| of the opponent's per-token "
                                       "scores, or their mean difference.", "objective", "THEORY.md section 4")
    beta: Optional[float] = _opt(None, "Reward scale beta.", "objective", "0.1 (SPIN's lambda); 1.0 for --loss space (SPACE)")
    num_synthetic: int = _opt(1, "Synthetic responses per prompt, K: IRIS and SPIF use all K*N, SPIN every "
                              "(annotated, synthetic) pair of a prompt.", "objective", "SPIN, SPACE")
    mu: Optional[float] = _opt(None, "SPACE: synthetic samples per annotated one.", "objective", "--num-synthetic (SPACE: 1)")
    reward_bound: Optional[float] = _opt(None, "SPIF: bound |r| <= B on the rewards (none: unbounded).", "objective",
                                         "SPIF, reconstructed")
    # --- optimisation ------------------------------------------------------------------
    optimizer: Literal["rmsprop", "adamw"] = _opt("rmsprop", "Optimizer (RMSprop without weight decay, or AdamW).", "optimisation", "SPIN")
    learning_rate: float = _opt(5e-7, "Peak learning rate.", "optimisation", "SPIN, iteration 0")
    weight_decay: float = _opt(0.0, "Weight decay (AdamW: matrices only).", "optimisation", "SPIN")
    warmup_ratio: float = _opt(0.1, "Fraction of steps of linear warmup, then linear decay.", "optimisation",
                               "SPIN, alignment-handbook")
    epochs: int = _opt(2, "Epochs per iteration.", "optimisation", "SPIN")
    global_batch_size: int = _opt(64, "Prompts per optimizer step.", "optimisation", "SPIN: 8 GPUs x 8")
    micro_batch_size: int = _opt(8, "Prompts per forward/backward, with all their responses (per rank under torchrun).",
                                 "optimisation", "SPIN: 8 per device")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.", "optimisation", "TRL, transformers")
    gradient_checkpointing: Optional[bool] = _opt(None, "Non-reentrant gradient checkpointing.", "optimisation",
                                                  "on with CUDA, off on CPU", nargs="?", const=True)
    bf16: Optional[bool] = _opt(None, "bf16 autocast (needs CUDA).", "optimisation", "on with CUDA (SPIN), off on CPU",
                                nargs="?", const=True)
    parallel: Literal["auto", "ddp", "fsdp", "none"] = _opt(
        "auto", "Under torchrun: DDP (auto), or FSDP2 (fully_shard per decoder layer) for models that do not fit one GPU.",
        "optimisation")
    fsdp: bool = _opt(False, "Shorthand for --parallel fsdp.", "optimisation")
    scoring_pass: Literal["auto", "always", "never"] = _opt(
        "auto", "Exact global-batch gradient with more than one micro-batch per rank: never = keep every micro-batch's "
        "graph from one forward with gradient (the cost of SFT), always = a forward without gradient first (the scoring "
        "pass: one extra forward per step), auto = keep the graphs when their estimated memory fits 0.8 of the free GPU "
        "memory (0.5 of available RAM on CPU).", "optimisation",
        "our choice: same gradient either way (docs/performance.md)")
    save_minutes: float = _opt(30.0, "Save the trainer state for --resume at most every M minutes.", "optimisation",
                               "about 25 GB a copy at 3B: bounds lost work and disk time (docs/performance.md)")
    save_steps: Optional[int] = _opt(None, "Also save the trainer state every N optimizer steps.", "optimisation")
    # --- lengths and generation ----------------------------------------------------------
    max_length: int = _opt(1024, "Max tokens of prompt + response.", "generation", "SPIN")
    max_prompt_length: int = _opt(512, "Max prompt tokens; longer prompts are skipped and counted.", "generation", "SPIN")
    max_new_tokens: Optional[int] = _opt(None, "Cap on response tokens, the same for annotated and synthetic "
                                         "responses (each prompt's budget is max length - its length).", "generation",
                                         "none: the budget alone, as SPIN's max length")
    temperature: float = _opt(1.0, "Sampling temperature of the opponent.", "generation", "SPIN")
    top_p: float = _opt(1.0, "Nucleus sampling of the opponent.", "generation", "SPIN")
    generator: Literal["auto", "vllm", "hf"] = _opt("auto", "Generation backend: vLLM when it imports and CUDA is "
                                                    "present (auto), else transformers.", "generation")
    generation_batch_size: int = _opt(64, "Sequences per transformers generation batch (length-sorted).", "generation",
                                      "bench/generation_throughput.py")
    gpu_memory_utilization: float = _opt(0.85, "vLLM's share of the GPU's total memory (nothing else is on the GPU "
                                         "while it runs).", "generation", "vLLM's default 0.9, less a margin")
    # --- SFT warm-up -------------------------------------------------------------------
    sft_epochs: int = _opt(0, "Epochs of SFT on the annotated data before self-play; the result is iter_0/checkpoint, "
                           "the first opponent.", "sft", "the given model is already the SFT model")
    sft_learning_rate: Optional[float] = _opt(None, "Learning rate of the SFT warm-up.", "sft", "--learning-rate")
    sft_patience: Optional[int] = _opt(None, "Early stopping of the warm-up: stop after N epochs without a better "
                                       "held-out NLL and keep the best epoch (0 or none: keep the last).", "sft")
    sft_validation_size: Optional[float] = _opt(
        None, "Rows of the training data held out (from the warm-up and from self-play) for --sft-patience to stop on: "
        f"a fraction (< 1) of the usable rows, at least {MIN_VALIDATION_ROWS}, or a number of rows (>= 1); either way "
        "one global batch must be left to train on. None: it stops on --eval-dataset, which then also scores the "
        "result (0: none).", "sft")
    # --- run ---------------------------------------------------------------------------
    output_dir: Optional[str] = _opt(None, "Run folder.", "run",
                                     "runs/<model>-<loss>; runs/<model>-<data>-<loss> on other than the model's default data")
    resume: bool = _opt(False, "Continue the run in --output-dir with its saved options.", "run")
    overwrite: bool = _opt(False, "Delete the run in --output-dir and start afresh (only a folder this project "
                           "created).", "run")
    dry_run: bool = _opt(False, "Check the config, the model's config and tokenizer and the data, print the plan, "
                         "and exit.", "run")
    report_to: Literal["jsonl", "tensorboard"] = _opt("jsonl", "Per-step metrics: metrics.jsonl always; tensorboard "
                                                      "also writes events to <output-dir>/tensorboard.", "run")
    seed: int = _opt(0, "Seed of the data subset, sampling, initialisation and data order.", "run")
    device: str = _opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.", "run")
    threads: Optional[int] = _opt(None, "torch intra-op CPU threads (none: torch's default).", "run")
    trust_remote_code: bool = _opt(False, "Allow custom model code from the hub.", "run", "safe loading")

    # ---------------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """True for the offline default: no --model, the tiny model is built on the spot."""
        return self.model is None

    def resolve(self) -> "IrisConfig":
        """Fill the derived values (the `None` options that depend on others); returns a copy."""
        v = dataclasses.asdict(self)
        if v["fsdp"]:
            if v["parallel"] not in ("auto", "fsdp"):
                raise ConfigError(f"--fsdp contradicts --parallel {v['parallel']}")
            v["parallel"] = "fsdp"
        if v["beta"] is None:
            v["beta"] = 1.0 if v["loss"] == "space" else 0.1
        if v["mu"] is None:
            v["mu"] = float(v["num_synthetic"])
        for name in ("sft_patience", "sft_validation_size"):  # 0 switches them off from the command line
            if v[name] == 0:
                v[name] = None
        if v["sft_learning_rate"] is None:
            v["sft_learning_rate"] = v["learning_rate"]
        if v["template_date"] is None:
            v["template_date"] = datetime.date.today().isoformat()
        if isinstance(v["chat_template_kwargs"], (dict, str)):
            v["chat_template_kwargs"] = json.dumps(parse_template_kwargs(v["chat_template_kwargs"]), sort_keys=True)
        if v["device"] == "auto":
            v["device"] = "cuda" if _cuda_available() else "cpu"
        on_cuda = str(v["device"]).startswith("cuda")
        for name in ("bf16", "gradient_checkpointing"):
            if v[name] is None:
                v[name] = on_cuda
        if v["dataset"] is None and not self.embedded:
            v["dataset"] = DEFAULT_HUB_DATASET
        if v["eval_dataset"] is None and v["dataset"] == DEFAULT_HUB_DATASET:
            v["eval_dataset"] = DEFAULT_HUB_DATASET
        for data_key, split_key, hub_split in (("dataset", "split", "train_sft"), ("eval_dataset", "eval_split", "test_sft")):
            if v[data_key] is not None:
                v[data_key] = absolute_if_local(v[data_key])
                if v[split_key] is None and not is_local(v[data_key]):
                    v[split_key] = hub_split
                elif v[split_key] is None:  # a file is whatever split is asked for; a saved DatasetDict's held-out
                    # data is its test split, as the hub default's is test_sft
                    v[split_key] = "test" if split_key == "eval_split" and os.path.isdir(v[data_key]) else "train"
        if v["model"] is not None:
            v["model"] = absolute_if_local(v["model"])
        if v["output_dir"] is None:
            v["output_dir"] = str(Path("runs") / f"{default_run_name(self.model, v['dataset'])}-{v['loss']}")
        v["output_dir"] = os.path.abspath(os.path.expanduser(v["output_dir"]))
        return IrisConfig(**v)

    def validate(self) -> None:
        """Raise `ConfigError` (one line) for bad or contradictory options; call on a resolved config."""
        for name, choices in (("loss", LOSSES), ("alpha_schedule", ("adaptive", "constant", "linear")),
                              ("gap", ("auc", "mean")), ("optimizer", ("rmsprop", "adamw")),
                              ("generator", ("auto", "vllm", "hf")), ("parallel", ("auto", "ddp", "fsdp", "none")),
                              ("report_to", ("jsonl", "tensorboard"))):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{_flag(name)} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"--max-prompt-length ({self.max_prompt_length}) must be smaller than --max-length ({self.max_length})")
        at_least_one = ("iters", "epochs", "global_batch_size", "micro_batch_size", "max_length", "max_prompt_length",
                        "generation_batch_size", "num_synthetic")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        positive = ("alpha", "alpha_min", "alpha_max", "beta", "mu", "learning_rate", "sft_learning_rate",
                    "temperature", "max_grad_norm", "save_minutes")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("num_samples", "eval_num_samples", "save_steps", "threads", "sft_patience", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        size = self.sft_validation_size
        if size is not None and not (0 < size < 1 or (size >= 1 and float(size).is_integer())):
            raise ConfigError(f"--sft-validation-size must be a fraction in (0, 1) or a whole number of rows, "
                              f"got {size}")
        if self.seed < 0:  # numpy's generators refuse negative seeds, deep inside the run
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.sft_epochs < 0:
            raise ConfigError(f"--sft-epochs must be >= 0, got {self.sft_epochs}")
        if self.alpha_min > self.alpha_max:
            raise ConfigError(f"--alpha-min ({self.alpha_min}) is larger than --alpha-max ({self.alpha_max})")
        if self.reward_bound is not None and not self.reward_bound > 0:
            raise ConfigError(f"--reward-bound must be > 0, got {self.reward_bound}")
        if self.reward_bound is not None and self.loss != "spif":
            raise ConfigError(f"--reward-bound only applies to --loss spif, not {self.loss}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        try:
            datetime.date.fromisoformat(str(self.template_date))
        except ValueError:
            raise ConfigError(f"--template-date must be a date YYYY-MM-DD, got {self.template_date!r}") from None
        parse_template_kwargs(self.chat_template_kwargs)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--micro-batch-size {self.micro_batch_size} does not divide --global-batch-size {self.global_batch_size}")
        if self.sft_patience is not None and self.sft_epochs < 1:
            raise ConfigError("--sft-patience needs --sft-epochs >= 1 (the most epochs of the warm-up)")
        if self.sft_validation_size is not None and self.sft_patience is None:
            raise ConfigError("--sft-validation-size is the data --sft-patience stops on: give --sft-patience too")
        if self.sft_patience is not None and self.eval_dataset is None and self.dataset is not None \
                and self.sft_validation_size is None:
            raise ConfigError("--sft-patience stops on held-out NLL: give --sft-validation-size or --eval-dataset")
        on_cuda = str(self.device).startswith("cuda")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if on_cuda and not _cuda_available():
            raise ConfigError(f"--device {self.device} requested but CUDA is not available")
        if self.bf16 and not on_cuda:
            raise ConfigError("--bf16 needs CUDA (bf16 autocast is GPU-only here); drop --bf16 or use a GPU")
        if self.generator == "vllm" and not on_cuda:
            raise ConfigError("--generator vllm needs CUDA; use --generator hf on CPU")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the config (JSON-serialisable), as saved in config.json."""
        return dataclasses.asdict(self)


# Options that may differ between a run and a --resume of it: how and where it runs, and how
# far it goes; never what it computes.
RESUMABLE_CHANGES = frozenset({
    "iters", "resume", "overwrite", "dry_run", "device", "generator", "generation_batch_size",
    "gpu_memory_utilization", "threads", "report_to", "save_minutes", "save_steps", "output_dir", "scoring_pass",
})
# Options whose default depends on others (filled by `IrisConfig.resolve`).
DERIVED = frozenset({"dataset", "split", "eval_dataset", "eval_split", "beta", "mu", "gradient_checkpointing", "bf16",
                     "sft_learning_rate", "output_dir", "template_date"})
# Options that hold a path: compared after resolving them against the current directory.
PATH_OPTIONS = ("model", "dataset", "eval_dataset", "output_dir")
_GENERIC_NAMES = re.compile(r"^(checkpoint(-\d+)?|iter_\d+|final|best|latest|model|hf|output|"
                            r"data|dataset|train|test|synthetic|heldout|validation)$")


def parse_template_kwargs(value) -> dict[str, Any]:
    """`--chat-template-kwargs` as a dict: a JSON object (a mapping in a YAML config); `ConfigError` otherwise."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"--chat-template-kwargs must be a JSON object, e.g. '{{\"enable_thinking\": false}}': "
                              f"{exc}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"--chat-template-kwargs must be a JSON object of options, got {value!r}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_local(source: str) -> bool:
    """A path rather than a hub id (`org/name`): it exists, has a data-file suffix, starts like a
    path, or has more than one `/`."""
    return os.path.exists(os.path.expanduser(source)) or source.endswith((".json", ".jsonl", ".parquet")) \
        or source.startswith((".", "/", "~")) or source.count("/") > 1


def absolute_if_local(source: str) -> str:
    """A local path made absolute (so a run stays valid from another folder); hub ids unchanged."""
    return os.path.abspath(os.path.expanduser(source)) if is_local(source) else source


def default_run_name(model: Optional[str], dataset: Optional[str] = None) -> str:
    """The model's name, then the data's unless it is the model's default (the toy task for the
    embedded model, `DEFAULT_HUB_DATASET` for the others): `tiny`, `tiny-mydata`, `Qwen2.5-3B`,
    `Qwen2.5-3B-mydata`, so that runs on other data do not collide with the default run.

    A name is a hub id's last part, or a local path's (a data file's without its suffix) with its
    parents until one is not generic (`runs/x/iter_3/checkpoint` gives `x-iter_3-checkpoint`, so
    checkpoints of one run do not collide; `runs/x/iter_1/synthetic.jsonl` gives `x-iter_1-synthetic`)."""
    name = "tiny" if model is None else _source_name(model)
    default_data = None if model is None else DEFAULT_HUB_DATASET
    return name if dataset is None or dataset == default_data else f"{name}-{_source_name(dataset)}"


def _source_name(source: str) -> str:
    path = Path(str(source).rstrip("/"))
    if path.suffix in (".json", ".jsonl", ".parquet"):
        path = path.with_suffix("")
    parts = [p for p in path.parts if p not in ("/", ".", "..")]
    if not is_local(source):
        return parts[-1]
    name = []
    for part in reversed(parts):
        name.insert(0, part)
        if not _GENERIC_NAMES.match(part):
            break
    return "-".join(name[-3:])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------
_UNSET = object()


def build_parser():
    """The command-line parser: transformers' `HfArgumentParser` over `IrisConfig`, with one-line
    errors and a compact help (dashed names, each default shown once with the embedded one)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse prints usage and exits; we want one line
            raise ConfigError(message.splitlines()[0])

        def format_help(self):
            return format_help()

        @staticmethod
        def _parse_dataclass_field(parser, f):
            # `group` and `source` are for format_help; argparse would reject them.
            plain = dataclasses.field(default=f.default, metadata={k: v for k, v in f.metadata.items()
                                                                   if k not in ("group", "source")})
            plain.name, plain.type = f.name, f.type
            HfArgumentParser._parse_dataclass_field(parser, plain)

    parser = Parser(IrisConfig, allow_abbrev=False, add_help=False)
    parser.add_argument("--config", default=None)
    return parser


def format_help() -> str:
    """`run_iris.py --help`: every option once, grouped, as `[default, its source; embedded: value]`."""
    import textwrap

    embedded = _read_yaml(EMBEDDED_CONFIG)
    shipped = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    lines = ["usage: run_iris.py [--config FILE|NAME] [--option VALUE ...]", "",
             "IRIS self-play fine-tuning (iris-ref). Without --model it runs the embedded offline default.",
             "Each option ends with [default, where it comes from; embedded: the embedded default's value].", "",
             "  --config FILE|NAME",
             f"      YAML of options, or a shipped config ({shipped}); the command line overrides it."]
    for group, title in HELP_GROUPS.items():
        lines += ["", f"{title}:"]
        for f in dataclasses.fields(IrisConfig):
            if f.metadata["group"] != group:
                continue
            lines.append(f"  {_usage(f)}")
            lines += [f"      {text}" for text in textwrap.wrap(f"{f.metadata['help']} {_default_note(f, embedded)}", 84, break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


HELP_GROUPS = {"data": "What to train", "objective": "Objective", "optimisation": "Optimisation",
               "generation": "Lengths and generation", "sft": "SFT warm-up", "run": "Run"}


def _usage(f: dataclasses.Field) -> str:
    import typing

    hint = typing.get_type_hints(IrisConfig)[f.name]  # f.type may be a string or (after HfArgumentParser) a type
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    flag = _flag(f.name)
    if hint is bool:
        return f"{flag} / --no-{f.name.replace('_', '-')}" if f.default is True else flag
    if args == [bool]:
        return f"{flag} [true|false]"
    if typing.get_origin(hint) is typing.Literal:
        return f"{flag} {{{','.join(str(c) for c in args)}}}"
    kind = (args[0] if args else hint).__name__.upper()
    return f"{flag} {kind}"


def _default_note(f: dataclasses.Field, embedded: dict[str, Any]) -> str:
    default = "none" if f.default is None else {True: "on", False: "off"}.get(f.default, f.default) \
        if isinstance(f.default, bool) else f.default
    note = f"{default}, {f.metadata['source']}" if f.metadata["source"] and f.default is not None else \
        (f.metadata["source"] or str(default))
    if f.name in embedded and embedded[f.name] != f.default:
        note += f"; embedded: {'none' if embedded[f.name] is None else embedded[f.name]}"
    return f"[{note}]"


def defaults_table() -> str:
    """The README's table of options (markdown), from the same fields as --help: the README
    embeds exactly this text (a test checks it), so the two cannot drift apart."""
    embedded = _read_yaml(EMBEDDED_CONFIG)

    def show(value):
        return "none" if value is None else {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    rows = ["| option | default | where the default comes from | embedded default |", "|---|---|---|---|"]
    for f in dataclasses.fields(IrisConfig):
        source = f.metadata["source"].replace("|", "/")
        default = "(derived)" if f.name in DERIVED else show(f.default)
        other = show(embedded[f.name]) if f.name in embedded and embedded[f.name] != f.default else ""
        rows.append(f"| `{_flag(f.name)}` | {default} | {source} | {other} |")
    return "\n".join(rows)


def _read_yaml(path: Path) -> dict[str, Any]:
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


def config_file(name: str) -> Path:
    """A YAML file as given, else the shipped config of that name: `qwen2.5-3b`, and also
    `configs/qwen2.5-3b.yaml` from a folder that has no such file (an installed package)."""
    path = Path(name).expanduser()
    shipped = SHIPPED_CONFIGS / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    return path if path.exists() or not shipped.exists() else shipped


def given_options(argv: list[str]) -> dict[str, Any]:
    """The options the user gave: the --config file's, overridden by the command line's."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    # Every default becomes a sentinel, so what parsing returns is what the user typed.
    parser.set_defaults(**{action.dest: _UNSET for action in parser._actions if action.dest != "help"})
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise ConfigError(f"unrecognized arguments: {' '.join(remaining)}")
    options = _read_yaml(config_file(known.config)) if known.config else {}
    options.update({k: v for k, v in vars(namespace).items() if v is not _UNSET and k != "config"})
    return options


def parse_config(argv: Optional[list[str]] = None) -> IrisConfig:
    """The resolved, validated config of a command line (see the module docstring)."""
    options = given_options(list(argv or []))
    if options.get("resume") and options.get("overwrite"):
        raise ConfigError("--resume and --overwrite contradict each other")
    if options.get("resume"):
        return resume_config(options)
    layers = {} if options.get("model") is not None else _read_yaml(EMBEDDED_CONFIG)
    try:
        config = IrisConfig(**{**layers, **options})
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    resolved = config.resolve()
    resolved.validate()
    return resolved


def resume_config(options: dict[str, Any]) -> IrisConfig:
    """The saved config of the run in `--output-dir`, plus the resumable options given now."""
    if options.get("output_dir") is None:
        raise ConfigError("--resume needs --output-dir: the folder of the run to continue")
    run_dir = Path(options["output_dir"]).expanduser().resolve()
    saved = rundir.read_saved_config(run_dir)  # ConfigError when no run is there
    disagreements = []
    for name, value in options.items():
        if name in RESUMABLE_CHANGES:
            continue
        given = absolute_if_local(value) if name in PATH_OPTIONS and isinstance(value, str) else value
        if name in ("sft_patience", "sft_validation_size") and given == 0:
            given = None  # as resolve() stores it
        if saved.get(name) != given:
            disagreements.append(f"{_flag(name)} {value!r} (the run has {saved.get(name)!r})")
    if disagreements:
        raise ConfigError(
            f"--resume: the run in {run_dir} was started with other values of {'; '.join(disagreements)}; drop "
            "these options to continue it as it was started (only how and where it runs, and --iters, may change)")
    values = {**saved, **{k: v for k, v in options.items() if k in RESUMABLE_CHANGES}}
    values.update(output_dir=str(run_dir), resume=True, overwrite=False)
    if values["device"] == "auto":
        values["device"] = "cuda" if _cuda_available() else "cpu"
    if values.get("template_date") is None:  # a run from before the date was frozen rendered with "today"
        values["template_date"] = datetime.date.today().isoformat()
    config = config_from_dict(values)
    config.validate()
    return config


def saved_differences(run_dir: Path, config: dict[str, Any]) -> list[str]:
    """How the run in `run_dir` differs from `config` (`IrisConfig.to_dict()`) in what it computes:
    each option outside `RESUMABLE_CHANGES` whose saved value differs, as `--loss 'iris' (the run
    has 'spin')`; empty when `--resume` continues the same computation. The template date is left
    out: unless given it is today's, and a resume keeps the run's own."""
    try:
        saved = rundir.read_saved_config(run_dir)
    except ConfigError:
        return ["its config.json cannot be read"]  # --resume would be refused too
    return [f"{_flag(name)} {value!r} (the run has {saved[name]!r})" for name, value in config.items()
            if name in saved and name not in RESUMABLE_CHANGES and name != "template_date" and saved[name] != value]


def config_from_dict(values: dict[str, Any]) -> IrisConfig:
    """Rebuild a config from a dict (config.json); unknown keys are a `ConfigError`."""
    known = {f.name for f in dataclasses.fields(IrisConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown options in saved config: {', '.join(unknown)}")
    return IrisConfig(**values)


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
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "iris_ref_commit": commit, "cuda": torch.version.cuda}


def saved_payload(config: IrisConfig) -> str:
    """The text of config.json: the resolved config and the software versions."""
    return json.dumps({"config": config.to_dict(), "versions": collect_versions()}, indent=2, sort_keys=True) + "\n"
