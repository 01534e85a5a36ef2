"""The self-play driver: T iterations of DESIGN.md "One iteration", with checkpoints and resume.

Run directory (`config.output_dir`):

    config.json                  resolved config + software versions
    iter_0/                      the starting model θ_0
        checkpoint/              embedded default: the SFT warm-up result (given --model: none,
                                 `source.json` names the model)
        metrics.jsonl            embedded default: SFT warm-up steps
        eval.json, COMPLETE
    iter_<t>/  (t = 1..T)        iteration t: opponent θ_{t-1} -> policy θ_t
        synthetic.jsonl          TRL-style {"prompt", "chosen", "rejected"} (chosen = annotated)
        opponent_logps.pt        opponent log-probs + SHA-256 of the opponent's weights
        trainer_state/           mid-iteration trainer state (removed when the iteration completes)
        metrics.jsonl            one record per optimizer step
        train_summary.json       what `trainer.train_iteration` returned + iteration facts
        checkpoint/              θ_t, `save_pretrained` (safetensors + tokenizer), written atomically
        eval.json                held-out evaluation of θ_t
        COMPLETE                 written last: the iteration is never redone
    summary.json, report.png

The opponent of iteration t is always the model of iteration t-1 (its weights' hash is stored
with the opponent log-probs, and checked on resume). Only one model is in memory: the opponent
enters the objective only through its precomputed log-probs, and training starts from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from iris_ref import distributed as dist_utils
from iris_ref.config import RESUMABLE_CHANGES, ConfigError, IrisConfig, collect_versions, config_from_dict, save_config


class InputError(ValueError):
    """Bad user input found before heavy work (CLI: one line, exit code 2)."""


class TrainingFailure(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is intact (exit 1)."""


# Hidden test hook: "T:K" makes the process exit abruptly (os._exit) after optimizer step K of
# iteration T, as a crash would, so the resume test can kill a run mid-iteration.
CRASH_ENV = "IRIS_REF_CRASH_AFTER_STEP"


def log(message: str) -> None:
    if dist_utils.is_main_process():
        print(message, flush=True)


# ----------------------------------------------------------------------------------------
# small file helpers (atomic writes: temp name, then os.replace)
# ----------------------------------------------------------------------------------------
def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: names, dtypes, shapes and bytes, in name order.

    Identifies the opponent by content, never by path (the same path is reused across runs).
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    class _Holder(torch.nn.Module):
        def state_dict(self, *args, **kwargs):  # noqa: D401 - mimic nn.Module
            return state

    return weights_sha256(_Holder())


# ----------------------------------------------------------------------------------------
# checks before heavy work
# ----------------------------------------------------------------------------------------
def check_model_source(model: str, trust_remote_code: bool = False) -> None:
    """Raise InputError unless `model` is a local HF folder or a hub id resolvable now (cheap:
    only the config is fetched, or found in the offline cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(f"model folder {model} has no config.json (not a Hugging Face model folder)")
        return
    if path.exists():
        raise InputError(f"model path {model} is a file, not a Hugging Face model folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot resolve the model"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"unknown model {model!r}: no such local folder, and the hub lookup failed ({reason[:160]})"
        ) from None


def _resolve_run_dir(config: IrisConfig) -> tuple[IrisConfig, Path]:
    """Create or reopen the run directory; on --resume the saved config must agree (options in
    RESUMABLE_CHANGES may differ). Decided on rank 0 and broadcast, so every rank agrees."""
    run_dir = Path(config.output_dir)
    verdict = None
    if dist_utils.is_main_process():
        verdict = _run_dir_verdict(config, run_dir)
    verdict = dist_utils.broadcast_object(verdict)
    if verdict[0] == "error":
        raise InputError(verdict[1])
    if verdict[0] == "overwrite":
        if dist_utils.is_main_process():
            shutil.rmtree(run_dir)
        dist_utils.barrier()
    return config, run_dir


def _run_dir_verdict(config: IrisConfig, run_dir: Path) -> tuple[str, str]:
    saved = run_dir / "config.json"
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return ("fresh", "")
    if config.overwrite:
        return ("overwrite", "")
    if not config.resume:
        return ("error", f"output dir {run_dir} already holds a run; pass --resume to continue it or --overwrite")
    if not saved.exists():
        return ("error", f"--resume: {run_dir} holds no config.json, so it is not an iris-ref run")
    try:
        old = config_from_dict(json.loads(saved.read_text(encoding="utf-8"))["config"])
    except (ValueError, KeyError, TypeError) as exc:
        return ("error", f"--resume: cannot read {saved}: {_one_line(exc)}")
    changed = [
        f.name for f in dataclasses.fields(IrisConfig)
        if f.name not in RESUMABLE_CHANGES and getattr(old, f.name) != getattr(config, f.name)
    ]
    if changed:
        name = changed[0]
        return ("error", f"--resume with changed option --{name.replace('_', '-')} "
                         f"(run has {getattr(old, name)!r}, given {getattr(config, name)!r}); use a new --output-dir")
    return ("resume", "")


# ----------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------
def _device(config: IrisConfig, info) -> torch.device:
    if str(config.device).startswith("cuda"):
        return info.device if info.world_size > 1 else torch.device(config.device)
    return torch.device("cpu")


def load_model(path: str | Path, config: IrisConfig, device: torch.device):
    """A causal LM in fp32 master weights (bf16 is autocast in the trainer), safetensors only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, trust_remote_code=config.trust_remote_code, use_safetensors=True
    )
    return model.to(device)


def load_tokenizer(config: IrisConfig):
    if config.embedded:
        from iris_ref import tiny

        tokenizer = tiny.build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"the tokenizer of {config.model} has no chat template; self-play needs one")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere; eos is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _data_source(config: IrisConfig) -> str:
    if config.dataset is not None:
        return config.dataset
    from iris_ref import tiny

    return str(tiny.TOY_TRAIN_PATH)


def _eval_source(config: IrisConfig) -> Optional[str]:
    if config.eval_dataset is not None:
        return config.eval_dataset
    if config.dataset is None:  # the toy task
        from iris_ref import tiny

        return str(tiny.TOY_HELDOUT_PATH)
    return None


def uses_toy_task(heldout) -> bool:
    """True when every held-out prompt is a toy-task prompt, whose answers can be checked
    exactly (the shipped toy data, or any file of the same task)."""
    from iris_ref import tiny

    if not heldout:
        return False
    for example in heldout:
        text = "\n".join(m["content"] for m in example.prompt_messages if m["role"] == "user")
        try:
            tiny.toy_valid_answers(text)
        except ValueError:
            return False
    return True


def load_data(config: IrisConfig, tokenizer):
    """Training examples (fixed seeded subset), their encodings, and the held-out examples."""
    from iris_ref import data

    source = _data_source(config)
    try:
        examples, skips = data.load_examples(
            source, split=config.split or "train", num_samples=config.num_samples, seed=config.seed,
            first_turn=config.first_turn,
        )
    except (ValueError, OSError) as exc:
        raise InputError(f"dataset {source}: {_one_line(exc)}") from None
    kept, encoded, too_long = [], [], 0
    for example in examples:
        seq = data.encode_pair(tokenizer, example.prompt_messages, example.response, config.max_length, config.max_prompt_length)
        if seq is None:
            too_long += 1
            continue
        kept.append(example)
        encoded.append(seq)
    skips.too_long += too_long
    log(f"data: {len(kept)} prompts used from {source} (skipped: {skips.describe()})")
    if not kept:
        raise InputError(f"dataset {source}: no valid rows left (every prompt longer than --max-prompt-length {config.max_prompt_length}?)")
    heldout = []
    eval_source = _eval_source(config)
    if eval_source is not None:
        try:
            heldout, eval_skips = data.load_examples(
                eval_source, split=config.eval_split or "train", num_samples=config.eval_num_samples,
                seed=config.seed, first_turn=config.first_turn,
            )
        except (ValueError, OSError) as exc:
            raise InputError(f"eval dataset {eval_source}: {_one_line(exc)}") from None
        log(f"held-out: {len(heldout)} rows from {eval_source} ({eval_skips.total} skipped)")
    return kept, encoded, heldout


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def training_args(config: IrisConfig, **overrides):
    """The trainer's TrainingArgs from the run config: every field of the same name, plus overrides."""
    from iris_ref.trainer import TrainingArgs

    return TrainingArgs.from_config(config, **overrides)


# ----------------------------------------------------------------------------------------
# distributed helpers: split work over ranks, gather in order
# ----------------------------------------------------------------------------------------
def _gather_objects(items: list) -> list:
    if not dist_utils.is_distributed():
        return list(items)
    import torch.distributed as dist

    parts: list = [None] * dist_utils.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def generate_split(model_or_path, tokenizer, prompts: list, *, config: IrisConfig, seed: int, temperature: float,
                   device: torch.device, max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """One response per prompt and whether it finished (ended with its end of turn rather than
    at max_new_tokens); under torchrun each rank takes its contiguous share."""
    from iris_ref import generation

    share = dist_utils.shard_range(len(prompts))
    local_prompts = [prompts[i] for i in share]
    n_local = len(local_prompts)
    from_path = isinstance(model_or_path, (str, Path))
    extra = {}
    if not from_path and prompts and _is_sharded(model_or_path):
        # Every forward of an FSDP model is collective: all ranks must run the same number of
        # batches (pad with a repeated prompt, results discarded) and of decoding steps.
        per_rank = -(-len(prompts) // dist_utils.get_world_size())
        local_prompts += [prompts[0]] * (per_rank - n_local)
        extra["synced_gpus"] = True
    if from_path and str(device).startswith("cuda") and torch.cuda.is_available():
        # vLLM shares the GPU with the resident training model: give it most of what is free.
        free, total = torch.cuda.mem_get_info()
        extra["gpu_memory_utilization"] = max(0.05, 0.85 * free / total)
    local = generation.generate_responses(
        str(model_or_path) if from_path else model_or_path, tokenizer, local_prompts, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=config.top_p, seed=seed + 100003 * dist_utils.get_rank(),
        batch_size=config.generation_batch_size, backend=config.generator if from_path else "hf",
        device=str(device), return_finished=True, **extra,
    ) if local_prompts else ([], [])
    texts, finished = local
    gathered = _gather_objects(list(zip(texts[:n_local], finished[:n_local])))
    return [text for text, _ in gathered], [done for _, done in gathered]


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def logprobs_split(policy, pairs: list, pad_token_id: int, micro_batch_size: int, bf16: bool = False):
    """Sequence log-probs (no grad) of (real, synthetic-or-None) pairs; under torchrun the
    trainer's `compute_logprobs` splits the pairs over ranks and gathers them in order."""
    from iris_ref.trainer import compute_logprobs

    return compute_logprobs(policy, pairs, pad_token_id, micro_batch_size, bf16=bf16)


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------
class StepLog:
    """The per-step metrics of one training phase, appended to `metrics.jsonl` as they come.

    After a resume the trainer replays from its last saved step; `finish()` rewrites the file
    keeping the last record of every step, so the file equals an uninterrupted run's.
    """

    def __init__(self, path: Path, iteration: int, crash_at: Optional[tuple[int, int]] = None):
        self.path = path
        self.iteration = iteration
        self.crash_at = crash_at

    def __call__(self, record: dict) -> None:
        record = {"iteration": self.iteration, **{k: _plain(v) for k, v in record.items()}}
        if dist_utils.is_main_process():
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=_json_default) + "\n")
                handle.flush()
        if self.crash_at is not None and self.crash_at == (self.iteration, int(record.get("step", -1))):
            sys.stdout.flush()
            os._exit(17)

    def finish(self) -> list[dict]:
        if not self.path.exists():
            return []
        by_step: dict = {}
        for record in read_jsonl(self.path):
            by_step[record.get("step")] = record
        records = [by_step[k] for k in sorted(by_step, key=lambda s: (s is None, s if s is not None else 0))]
        if dist_utils.is_main_process():
            write_jsonl(self.path, records)
        return records


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _crash_point() -> Optional[tuple[int, int]]:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    iteration, step = spec.split(":")
    return int(iteration), int(step)


def _train(policy, pairs, opp_real, opp_syn, *, alpha, args, pad_token_id, state_dir, step_log, phase: str) -> dict:
    from iris_ref import trainer

    try:
        return trainer.train_iteration(
            policy, pairs, opp_real, opp_syn, alpha=alpha, args=args, pad_token_id=pad_token_id,
            state_dir=state_dir, log_fn=step_log,
        )
    except trainer.NonFiniteLossError as exc:
        raise TrainingFailure(f"{phase}: {_one_line(exc)}") from None


def _evaluate(policy, tokenizer, heldout, config: IrisConfig, device, toy: bool) -> dict:
    from iris_ref import evaluation

    if not heldout:
        return {}
    return evaluation.evaluate(
        policy, tokenizer, heldout, config=config, device=device, toy=toy, generate=generate_split,
        logprobs=logprobs_split,
    )


def _check_finite(policy, probe_pairs, pad_token_id: int, config: IrisConfig, phase: str) -> None:
    """Refuse to save a model whose weights or log-probs are not finite: the trainer checks
    each step's loss and gradient, not what its last update produced."""
    for name, param in dist_utils.unwrap_model(policy).named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local).all():
            raise TrainingFailure(f"{phase}: non-finite weights ({name}) after the last optimizer step; "
                                  "not saved, the previous checkpoint is intact (lower the learning rate)")
    real, synthetic = logprobs_split(policy, probe_pairs, pad_token_id, config.micro_batch_size, config.bf16)
    values = real if synthetic is None else torch.cat([real, synthetic])
    if not torch.isfinite(values).all():
        raise TrainingFailure(f"{phase}: non-finite log-probs after the last optimizer step; not saved, "
                              "the previous checkpoint is intact (lower the learning rate)")


def _save_checkpoint(policy, path: Path, tokenizer) -> None:
    dist_utils.save_full_checkpoint(policy, path, tokenizer=tokenizer)


def _complete(iter_dir: Path) -> bool:
    return (iter_dir / "COMPLETE").exists()


def _mark_complete(iter_dir: Path) -> None:
    if dist_utils.is_main_process():
        (iter_dir / "COMPLETE.tmp").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        os.replace(iter_dir / "COMPLETE.tmp", iter_dir / "COMPLETE")
    dist_utils.barrier()


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _opponent_logps(iter_dir: Path, policy, opponent_hash: str, pairs, pad_token_id, config) -> dict:
    """Load `opponent_logps.pt` if it belongs to this opponent (same weight hash), else compute and save."""
    path = iter_dir / "opponent_logps.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("opponent_sha256") == opponent_hash and saved["real"].numel() == len(pairs):
            return saved
        log(f"iteration {iter_dir.name}: saved opponent log-probs belong to other weights; recomputing")
    real, synthetic = logprobs_split(policy, pairs, pad_token_id, config.micro_batch_size, config.bf16)
    payload = {
        "opponent_sha256": opponent_hash,
        "real": real,
        "synthetic": synthetic,
        "real_lengths": torch.tensor([len(r.input_ids) - r.prompt_length for r, _ in pairs]),
        "synthetic_lengths": torch.tensor([len(s.input_ids) - s.prompt_length for _, s in pairs]),
    }
    if dist_utils.is_main_process():
        torch_save_atomic(payload, path)
    dist_utils.barrier()
    return payload


def _policy_hash(policy) -> str:
    state = dist_utils.full_model_state_dict(policy)
    digest = _state_dict_sha256(state) if dist_utils.is_main_process() else None
    return dist_utils.broadcast_object(digest)


def run(config: IrisConfig) -> dict:
    """Run (or resume) self-play; returns the summary dict also written to `summary.json`.

    Raises InputError for bad input (before any model is loaded) and TrainingFailure when the
    run must stop (non-finite loss).
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: IrisConfig) -> dict:
    from iris_ref.schedule import AlphaSchedule, per_token_scores

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the table
    info = dist_utils.init_distributed("cpu" if config.device == "cpu" else None)
    device = _device(config, info)
    try:
        config.validate()
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    if not config.embedded:
        check_model_source(config.model, config.trust_remote_code)
    config, run_dir = _resolve_run_dir(config)
    crash_at = _crash_point()

    tokenizer = load_tokenizer(config)
    examples, encoded, heldout = load_data(config, tokenizer)
    toy = uses_toy_task(heldout)

    if dist_utils.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json", collect_versions())
    dist_utils.barrier()
    _set_seed(config.seed)
    schedule = AlphaSchedule(kind=config.alpha_schedule, alpha=config.alpha, alpha_min=config.alpha_min,
                             alpha_max=config.alpha_max, num_iterations=config.iters, gap=config.gap)
    pad_token_id = tokenizer.pad_token_id
    prompts = [ex.prompt_messages for ex in examples]

    # ---- the starting model θ_0 ---------------------------------------------------------
    last_done = 0
    while _complete(run_dir / f"iter_{last_done + 1}") and last_done + 1 <= config.iters:
        last_done += 1
    iter0 = run_dir / "iter_0"
    iter0.mkdir(exist_ok=True)
    if _complete(iter0):
        start_path = iter0 / "checkpoint" if config.embedded else Path(config.model)
        policy_path = run_dir / f"iter_{last_done}" / "checkpoint" if last_done else start_path
        log(f"resume: iterations 0..{last_done} complete; continuing from {policy_path}")
        hf_model = load_model(policy_path, config, device)
    else:
        if config.embedded:
            from iris_ref import tiny

            hf_model = tiny.build_tiny_model(tokenizer, seed=config.seed).to(device)
        else:
            hf_model = load_model(config.model, config, device)
    # Wrapped once for the whole run (FSDP shards in place); the trainer enables gradient
    # checkpointing for its own forwards only, so generation keeps its KV cache.
    policy = dist_utils.prepare_model(hf_model, strategy=config.parallel)

    if not _complete(iter0):
        if config.embedded and config.sft_epochs > 0:
            log(f"SFT warm-up: {config.sft_epochs} epochs on {len(encoded)} annotated responses")
            step_log = StepLog(iter0 / "metrics.jsonl", 0, crash_at)
            args = training_args(config, loss="sft", epochs=config.sft_epochs, learning_rate=config.sft_learning_rate)
            sft_summary = _train(policy, [(seq, None) for seq in encoded], None, None, alpha=None, args=args,
                                 pad_token_id=pad_token_id, state_dir=iter0 / "trainer_state", step_log=step_log,
                                 phase="SFT warm-up")
            step_log.finish()
            sft_summary = _plain_dict(sft_summary)
            if dist_utils.is_main_process():
                write_json(iter0 / "train_summary.json", sft_summary)
        if config.embedded:
            _check_finite(policy, [(seq, None) for seq in encoded[: config.micro_batch_size]], pad_token_id, config,
                          "SFT warm-up")
            _save_checkpoint(policy, iter0 / "checkpoint", tokenizer)
        elif dist_utils.is_main_process():
            write_json(iter0 / "source.json", {"model": config.model})
        evaluation = _evaluate(policy, tokenizer, heldout, config, device, toy)
        if dist_utils.is_main_process():
            write_json(iter0 / "eval.json", evaluation)
        _mark_complete(iter0)
        if dist_utils.is_main_process():  # only once complete: a crash before keeps the state to resume from
            shutil.rmtree(iter0 / "trainer_state", ignore_errors=True)

    first_gap = None
    for t in range(1, config.iters + 1):
        iter_dir = run_dir / f"iter_{t}"
        if _complete(iter_dir):
            first_gap = first_gap if first_gap is not None else json.loads((iter_dir / "train_summary.json").read_text())["gap"]
            continue
        if dist_utils.is_main_process():
            iter_dir.mkdir(exist_ok=True)
        dist_utils.barrier()
        opponent_dir = run_dir / f"iter_{t - 1}"
        opponent_path = opponent_dir / "checkpoint" if (t > 1 or config.embedded) else Path(config.model)
        opponent_hash = _policy_hash(policy)
        t0 = time.time()

        # 2. synthetic responses from the opponent θ_{t-1} (the policy in memory right now)
        synthetic_path = iter_dir / "synthetic.jsonl"
        if synthetic_path.exists():
            rows = read_jsonl(synthetic_path)
            if [row["prompt"] for row in rows] != [ex.prompt_messages for ex in examples]:
                raise InputError(f"{synthetic_path} was generated for other prompts; delete it or use --overwrite")
            synthetic = [row["rejected"][-1]["content"] for row in rows]
            finished = [row.get("rejected_finished", True) for row in rows]
        else:
            use_path = config.generator == "vllm" or dist_utils.parallel_strategy(policy) == "fsdp"
            if config.generator == "auto" and str(device).startswith("cuda"):
                from iris_ref import generation

                use_path = use_path or generation.vllm_is_importable()
            source = str(opponent_path) if use_path else dist_utils.unwrap_model(policy)
            synthetic, finished = generate_split(
                source, tokenizer, prompts, config=config, seed=config.seed * 1000 + t,
                temperature=config.temperature, device=device, max_new_tokens=config.max_new_tokens,
            )
            # TRL-style rows; `rejected_finished` (ignored by TRL) is False for a response cut at
            # max_new_tokens, which then gets no end-of-turn token appended.
            rows = [
                {"prompt": ex.prompt_messages,
                 "chosen": [{"role": "assistant", "content": ex.response}],
                 "rejected": [{"role": "assistant", "content": text}],
                 "rejected_finished": done}
                for ex, text, done in zip(examples, synthetic, finished)
            ]
            if dist_utils.is_main_process():
                write_jsonl(synthetic_path, rows)
            dist_utils.barrier()
        generation_seconds = time.time() - t0

        from iris_ref import data

        pairs = []
        for real_seq, ex, text, done in zip(encoded, examples, synthetic, finished):
            syn_seq = data.encode_pair(tokenizer, ex.prompt_messages, text, config.max_length, config.max_prompt_length,
                                       end_of_turn=done)
            pairs.append((real_seq, syn_seq))

        # 3. opponent log-probs, once, keyed by the opponent's weights
        opp = _opponent_logps(iter_dir, policy, opponent_hash, pairs, pad_token_id, config)

        # 4. gap and α_t from the opponent's per-token scores
        real_scores = per_token_scores(opp["real"].numpy(), opp["real_lengths"].numpy())
        syn_scores = per_token_scores(opp["synthetic"].numpy(), opp["synthetic_lengths"].numpy())
        gap = schedule.measure_gap(real_scores, syn_scores)
        if first_gap is None:
            first_gap = gap
        alpha = schedule.alpha_for(t - 1, gap, first_gap)
        log(f"iteration {t}: opponent {opponent_path} (sha256 {opponent_hash[:12]}), gap {gap:.4f}, alpha {alpha:.3f}")

        # 5. train θ_t from θ_{t-1}
        step_log = StepLog(iter_dir / "metrics.jsonl", t, crash_at)
        t1 = time.time()
        result = _train(policy, pairs, opp["real"], opp["synthetic"], alpha=alpha, args=training_args(config),
                        pad_token_id=pad_token_id, state_dir=iter_dir / "trainer_state", step_log=step_log,
                        phase=f"iteration {t}")
        step_log.finish()
        train_summary = {
            **_plain_dict(result),
            "iteration": t, "alpha": alpha if config.loss == "iris" else None, "gap": gap, "first_gap": first_gap,
            "opponent_sha256": opponent_hash, "opponent_checkpoint": str(opponent_path),
            "generation_seconds": generation_seconds, "train_seconds": time.time() - t1,
        }

        # 6. save θ_t atomically, evaluate, mark complete
        _check_finite(policy, pairs[: config.micro_batch_size], pad_token_id, config, f"iteration {t}")
        _save_checkpoint(policy, iter_dir / "checkpoint", tokenizer)
        if dist_utils.is_main_process():
            write_json(iter_dir / "train_summary.json", train_summary)
        evaluation = _evaluate(policy, tokenizer, heldout, config, device, toy)
        if dist_utils.is_main_process():
            write_json(iter_dir / "eval.json", evaluation)
        _mark_complete(iter_dir)
        if dist_utils.is_main_process():
            shutil.rmtree(iter_dir / "trainer_state", ignore_errors=True)

    summary = build_summary(run_dir, config)
    if dist_utils.is_main_process():
        write_json(run_dir / "summary.json", summary)
        from iris_ref import report

        report.write_report(run_dir, summary)
        print(report.format_table(summary["iterations"]), flush=True)
        print(f"run directory: {run_dir}  (summary.json, report.png)", flush=True)
    dist_utils.barrier()
    return summary


def _plain_dict(values: Optional[dict]) -> dict:
    return {k: _plain(v) for k, v in (values or {}).items()}


SUMMARY_KEYS = ("iteration", "alpha", "gap", "heldout_nll", "heldout_accuracy")


def build_summary(run_dir: Path, config: IrisConfig) -> dict:
    """`summary.json`: entry 0 = the starting model, then one entry per completed iteration."""
    entries = []
    for t in range(0, config.iters + 1):
        iter_dir = run_dir / f"iter_{t}"
        if not _complete(iter_dir):
            break
        entry: dict[str, Any] = {"iteration": t, "alpha": None, "gap": None, "heldout_nll": None, "heldout_accuracy": None}
        train_path = iter_dir / "train_summary.json"
        if t > 0 and train_path.exists():
            entry.update(json.loads(train_path.read_text(encoding="utf-8")))
        eval_path = iter_dir / "eval.json"
        if eval_path.exists():
            entry.update(json.loads(eval_path.read_text(encoding="utf-8")))
        entry["checkpoint"] = str(iter_dir / "checkpoint") if (iter_dir / "checkpoint").exists() else config.model
        entry["iteration"] = t
        entries.append(entry)
    return {
        "title": f"{'tiny (embedded default)' if config.embedded else config.model}, loss {config.loss}, "
                 f"{config.alpha_schedule} alpha",
        "loss": config.loss,
        "model": config.model,
        "run_dir": str(run_dir),
        "iterations": entries,
    }
