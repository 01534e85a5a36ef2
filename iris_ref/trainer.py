"""One self-play iteration of training: a plain PyTorch loop, readable top to bottom.

Choices, and why:

- **One model resident.** The opponent (the previous iteration's model) enters only through
  its precomputed sequence log-probs; memory is that of SFT plus a few vectors. The real and
  the synthetic sequences of a micro-batch go through ONE forward (concatenated, padded
  together), and the log-probs are split afterwards.
- **Objectives** come from ``iris_ref.objectives.get_objective(args.loss)`` with the constants
  of ``args`` (α is passed in per iteration). ``loss="sft"`` is plain supervised fine-tuning:
  the mean negative log-likelihood per response token of the real responses (synthetic
  sequences are neither needed nor computed), for the warm-up and the SFT baseline.
- **Exact gradient accumulation** (THEORY.md I3). IRIS's log-sum-exp couples every sample of
  the batch, so the loss of a global batch is not a sum of micro-batch losses. Every update
  is therefore made from the objective over the WHOLE global batch (all micro-batches of all
  ranks): its per-sample weights a_i, b_j are computed once, and each micro-batch
  back-propagates its slice of ``weighted_surrogate`` (β·(Σ b_j·log p(y'_j) − Σ a_i·log p(y_i))),
  whose gradient summed over the slices is exactly the global gradient. Data-parallel
  engines average gradients over ranks, so the surrogate is multiplied by the world size.
    * one micro-batch per rank: forward with grad, all-gather the detached log-probs over
      ranks, global objective -> weights, backward of the local surrogate. No extra cost.
    * several micro-batches per rank: first a no-grad *scoring pass* over the rank's
      micro-batches, all-gather, global weights, then the grad passes. Cost: one extra
      forward (about a third of a forward+backward) per optimizer step.
    * separable objectives (spin, space, spif, sft: each sample's weight depends only on its
      own rewards) skip the scoring pass: the weights of a micro-batch are the objective's on
      that micro-batch rescaled by (micro-batch size / global batch size), which is exact
      because their weights are linear in the uniform sample weights. Same surrogate path.
    The logged loss and rewards are always those of the global batch.
- **Optimisation**: RMSprop by default (SPIN's recipe, no weight decay), AdamW selectable
  (weight decay on matrices only, as transformers' Trainer); linear warmup over
  ``ceil(warmup_ratio · steps)`` steps then linear decay (``transformers.get_scheduler``);
  ``clip_grad_norm_``; a fresh optimizer and schedule every iteration (each iteration is a
  new fine-tuning run from the previous model, as in SPIN).
- **Batches**: ``global_batch_size`` pairs per optimizer step =
  ``micro_batch_size × accumulation × world_size``; anything else is a ValueError. Each epoch
  visits the pairs in a seeded random order (``torch.Generator``) and drops the last
  ``N mod global_batch_size`` pairs of that order (different ones every epoch), so every
  step has the same global batch.
- **Precision and memory**: bf16 autocast on CUDA (weights and optimizer stay in the model's
  dtype); on CPU ``bf16`` is ignored with a warning. Non-reentrant gradient checkpointing
  when asked. The model is in ``train()`` mode while training (the Qwen2 family has no
  dropout, so training and scoring forwards agree).
- **Failures**: a non-finite loss or gradient norm raises ``NonFiniteLossError`` naming the
  optimizer step, before the optimizer step and before any save, so the last saved state
  stays the last good one.
- **Mid-iteration resume**: every ``save_steps`` optimizer steps, and at the end, the model,
  optimizer, scheduler, RNG states, data order, step and metric history are saved atomically
  into ``state_dir`` (a new ``step_XXXXXXXX`` folder written under a temporary name,
  fsynced, renamed, then the ``LATEST`` pointer replaced). On start, a valid state in
  ``state_dir`` is resumed; on CPU the result equals an uninterrupted run bit for bit.
  ``log_fn`` is only called for steps run in this call; ``saved_step(state_dir)`` tells the
  caller where a resume will start (drop logged lines after it).
- **Metrics** per optimizer step (TRL names): loss, rewards/real, rewards/synthetic,
  rewards/margins, rewards/accuracies (fraction of pairs whose real reward beats the
  synthetic one), logps/real, logps/synthetic (mean summed log-probs), alpha,
  weights/ess_real, weights/ess_synthetic (1/Σŵ² of the normalised |weights|), lr (of the
  step), grad_norm (before clipping), tokens_per_s (global, non-padding tokens of the
  training forwards), peak_memory_mb (CUDA peak allocated; peak RSS of the process on CPU),
  step, epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from iris_ref import distributed as dist_utils
from iris_ref.logprobs import DEFAULT_CHUNK_SIZE
from iris_ref.objectives import get_objective, weighted_surrogate

SEPARABLE_LOSSES = ("spin", "space", "spif", "sft")
LOSSES = ("iris", "spin", "space", "spif", "sft")
STATE_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of an optimizer step is NaN or infinite."""

    def __init__(self, step: int, what: str, value: float):
        self.step = step
        super().__init__(
            f"non-finite {what} ({value}) at optimizer step {step}; stopped before updating the "
            "model, the last saved state is intact (lower the learning rate or raise beta's "
            "numerical headroom, and check the data)"
        )


@dataclass
class TrainingArgs:
    """The options of one iteration's training (names as in ``iris_ref.config.IrisConfig``)."""

    loss: str = "iris"
    beta: float = 0.1
    mu: float = 1.0
    reward_bound: Optional[float] = None
    optimizer: str = "rmsprop"
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    epochs: int = 2
    global_batch_size: int = 64
    micro_batch_size: int = 8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    save_steps: int = 50
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE
    # Stop (and save) after this many optimizer steps in total; the schedule is unchanged.
    # For tests and for splitting a long iteration over several jobs.
    max_steps: Optional[int] = None
    progress: bool = True
    # DDP/FSDP wrapping used when train_iteration receives a bare model under torchrun.
    parallel: str = "auto"

    @classmethod
    def from_config(cls, config: Any, **overrides) -> "TrainingArgs":
        """Pick the fields of this dataclass from any object with the same attribute names
        (``IrisConfig``), then apply ``overrides`` (e.g. ``loss="sft"`` for the warm-up)."""
        values = {}
        for f in dataclasses.fields(cls):
            if hasattr(config, f.name) and getattr(config, f.name) is not None:
                values[f.name] = getattr(config, f.name)
        values.update(overrides)
        return cls(**values)

    def validate(self, world_size: int) -> int:
        """Check the options; return the number of micro-batches per rank and step."""
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.optimizer not in ("rmsprop", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose rmsprop or adamw")
        for name in ("beta", "learning_rate", "mu"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "global_batch_size", "micro_batch_size", "save_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        per_rank, rem = divmod(self.global_batch_size, world_size)
        if rem or per_rank % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must equal micro_batch_size "
                f"({self.micro_batch_size}) x accumulation steps x world size ({world_size})"
            )
        return per_rank // self.micro_batch_size


# --------------------------------------------------------------------------------------
# batching and log-probs


def _response_tokens(seq) -> int:
    return len(seq.input_ids) - seq.prompt_length


def _forward_logps(policy: nn.Module, sequences: list, pad_token_id: int, device, autocast):
    """Sequence log-probs of ``sequences`` in ONE forward (right-padded together)."""
    from iris_ref.data import collate

    batch = collate(sequences, pad_token_id)
    with autocast():
        return policy(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["response_mask"].to(device),
        )


def _autocast_factory(bf16: bool, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if bf16 and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if bf16:
        warnings.warn("bf16 autocast is only used on CUDA; training in the model's dtype on CPU")
    return contextlib.nullcontext


def _device_of(policy: nn.Module) -> torch.device:
    param = next(dist_utils.unwrap_model(policy).parameters())
    # FSDP2 parameters are DTensors; their local shard sits on the training device.
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.device


@torch.no_grad()
def compute_logprobs(
    model: nn.Module,
    pairs: Sequence[tuple],
    pad_token_id: int,
    micro_batch_size: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bf16: bool = False,
    split_across_ranks: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sequence log-probs (no grad, eval mode) of the real and the synthetic response of every pair.

    Returns ``(real, synthetic)`` float32 CPU tensors in the order of ``pairs``;
    ``synthetic`` is None when every pair's synthetic entry is None (evaluation of
    annotated responses only). ``model``: a bare Hugging Face model or the module from
    ``distributed.prepare_model``.

    Under torchrun (default ``split_across_ranks=True``) every rank passes the same ``pairs``:
    each rank scores its contiguous share (``distributed.shard_range``) and the results are
    all-gathered in order, so every rank returns the log-probs of all pairs. Every rank runs
    the same number of forwards (a rank with less data repeats one and discards it) because
    an FSDP forward is collective. With ``False`` each rank scores exactly the pairs it is
    given (the caller splits; under FSDP the ranks must then pass equally many).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    policy = model if dist_utils.is_prepared(model) else dist_utils.SequenceLogprobModule(model, chunk_size)
    with_synthetic = _check_pairs(pairs, need_synthetic=False)
    device = _device_of(policy)
    autocast = _autocast_factory(bf16, device)
    if split_across_ranks:
        mine = list(dist_utils.shard_range(len(pairs)))
        per_rank_max = math.ceil(len(pairs) / dist_utils.get_world_size())
    else:
        mine = list(range(len(pairs)))
        per_rank_max = len(pairs)
    n_forwards = math.ceil(per_rank_max / micro_batch_size)
    was_training = policy.training
    policy.eval()
    real_out, syn_out = [], []
    try:
        for k in range(n_forwards):
            idx = mine[k * micro_batch_size : (k + 1) * micro_batch_size]
            dummy = not idx
            if dummy:
                idx = [0]
            seqs = [pairs[i][0] for i in idx] + ([pairs[i][1] for i in idx] if with_synthetic else [])
            logps = _forward_logps(policy, seqs, pad_token_id, device, autocast).float().cpu()
            if dummy:
                continue
            real_out.append(logps[: len(idx)])
            if with_synthetic:
                syn_out.append(logps[len(idx) :])
    finally:
        policy.train(was_training)
        dist_utils.reshard(policy)
    empty = torch.zeros(0, dtype=torch.float32)
    real = torch.cat(real_out) if real_out else empty
    synthetic = (torch.cat(syn_out) if syn_out else empty) if with_synthetic else None
    if split_across_ranks:
        real = dist_utils.all_gather_1d(real)
        synthetic = dist_utils.all_gather_1d(synthetic) if with_synthetic else None
    return real, synthetic


def _check_pairs(pairs: Sequence[tuple], need_synthetic: bool) -> bool:
    """Validate ``pairs``; return whether they carry synthetic sequences."""
    if len(pairs) == 0:
        raise ValueError("no training pairs")
    has_syn = [p[1] is not None for p in pairs]
    if any(has_syn) and not all(has_syn):
        raise ValueError("either every pair or no pair must have a synthetic response")
    if need_synthetic and not has_syn[0]:
        raise ValueError("self-play objectives need a synthetic response in every pair")
    return has_syn[0]


# --------------------------------------------------------------------------------------
# optimizer, schedule, state


def _make_optimizer(policy: nn.Module, args: TrainingArgs) -> torch.optim.Optimizer:
    params = [p for p in policy.parameters() if p.requires_grad]
    if args.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    # As transformers' Trainer: no decay on biases and normalisation weights (1-D tensors).
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state as plain types so that torch.load(weights_only=True) accepts it
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _latest_state_path(state_dir: Optional[Path]) -> Optional[Path]:
    if state_dir is None:
        return None
    pointer = Path(state_dir) / "LATEST"
    if not pointer.is_file():
        return None
    path = Path(state_dir) / pointer.read_text().strip()
    return path if (path / "COMPLETE").is_file() else None


def saved_step(state_dir: Optional[os.PathLike]) -> Optional[int]:
    """The optimizer step a resume from ``state_dir`` starts after, or None (no valid state).

    The driver uses it to drop metric lines of steps that will be redone."""
    path = _latest_state_path(Path(state_dir) if state_dir is not None else None)
    if path is None:
        return None
    return int(torch.load(path / "trainer.pt", weights_only=True)["step"])


def _write_file_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _save_state(state_dir: Path, policy, optimizer, scheduler, step: int, order, history, fingerprint) -> None:
    """Atomically save everything a resume needs (collective under FSDP: all ranks call)."""
    model_state = dist_utils.full_model_state_dict(policy)
    optim_state = dist_utils.optimizer_state_dict(policy, optimizer)
    rank = dist_utils.get_rank()
    name = f"step_{step:08d}"
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{name}.tmp"
    if dist_utils.is_main_process():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        torch.save(model_state, tmp / "model.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(
            {
                "format": STATE_FORMAT,
                "step": step,
                "scheduler": scheduler.state_dict(),
                "order": order,
                "history": history,
                "fingerprint": fingerprint,
            },
            tmp / "trainer.pt",
        )
    dist_utils.barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")  # each rank its own generator state
    dist_utils.barrier()
    if dist_utils.is_main_process():
        (tmp / "COMPLETE").write_text("ok\n")
        dist_utils.atomic_replace_dir(tmp, state_dir / name)
        _write_file_atomic(state_dir / "LATEST", name + "\n")
        for old in state_dir.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()


def _load_state(path: Path, policy, optimizer, scheduler, fingerprint) -> dict:
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    saved = trainer_state["fingerprint"]
    if saved != fingerprint:
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ValueError(
            f"cannot resume from {path}: it was saved with different {', '.join(changed)} "
            "(delete the state folder to start this iteration afresh)"
        )
    dist_utils.load_full_model_state_dict(policy, torch.load(path / "model.pt", weights_only=True))
    dist_utils.load_optimizer_state_dict(policy, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_path = path / f"rng_rank{dist_utils.get_rank()}.pt"
    if rng_path.is_file():
        _set_rng_state(torch.load(rng_path, weights_only=True))
    return trainer_state


# --------------------------------------------------------------------------------------
# metrics


def _ess(weights: torch.Tensor) -> float:
    """Effective sample size 1/Σŵ² of the normalised absolute weights (0 if all are 0)."""
    w = weights.detach().double().abs()
    total = w.sum()
    if total <= 0:
        return 0.0
    w = w / total
    return float(1.0 / (w * w).sum())


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _summarise(history: list[dict]) -> dict:
    """Mean of every per-step metric over the iteration, plus the final values."""
    summary: dict[str, Any] = {"steps": len(history)}
    if not history:
        return summary
    for key in history[0]:
        if key in ("step", "epoch"):
            continue
        values = [h[key] for h in history if key in h]
        summary[key] = float(np.mean(values))
    summary["final"] = dict(history[-1])
    return summary


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of ``model`` to 0 (its saved config is left as it is).

    Self-play needs deterministic forwards: the rewards must be exactly 0 at θ = θt (the
    opponent's log-probs are computed in eval mode), and the IRIS weights of the scoring pass
    must belong to the log-probs that are back-propagated (THEORY.md I3). Models such as
    GPT-2, OPT or Phi have dropout on by default. Besides ``nn.Dropout`` modules, attention
    layers keep their probability as a float attribute (Qwen2's ``attention_dropout``).
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


# --------------------------------------------------------------------------------------
# the loop


def train_iteration(
    model: nn.Module,
    pairs: Sequence[tuple],
    opponent_real_logps: Optional[torch.Tensor],
    opponent_synthetic_logps: Optional[torch.Tensor],
    *,
    alpha: Optional[float],
    args: TrainingArgs,
    pad_token_id: int,
    state_dir: Optional[os.PathLike] = None,
    log_fn: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Train ``model`` in place for one self-play iteration; return summary metrics.

    ``pairs``: (real, synthetic) ``EncodedSequence`` per prompt (synthetic None for
    ``loss="sft"``). ``opponent_*_logps``: the frozen opponent's sequence log-probs, one per
    pair (None for sft). ``model``: a bare Hugging Face model (wrapped here: DDP under
    torchrun) or the module from ``distributed.prepare_model`` (needed for FSDP). Under
    torchrun every rank calls this with the same pairs; ``log_fn`` runs on rank 0 only.
    Returns the mean of each metric over the iteration's steps, ``steps``,
    ``resumed_from_step`` and ``final`` (the last step's metrics).
    """
    world = dist_utils.get_world_size()
    rank = dist_utils.get_rank()
    args.validate(world)
    sft = args.loss == "sft"
    _check_pairs(pairs, need_synthetic=not sft)
    _objective_constants(args, alpha)  # validates alpha before any heavy work
    n_pairs = len(pairs)
    G, m = args.global_batch_size, args.micro_batch_size
    steps_per_epoch = n_pairs // G
    if steps_per_epoch == 0:
        raise ValueError(f"{n_pairs} training pairs are fewer than global_batch_size ({G})")
    total_steps = steps_per_epoch * args.epochs
    opp_real, opp_syn = _check_opponent(opponent_real_logps, opponent_synthetic_logps, n_pairs, sft)

    hf_model = dist_utils.unwrap_model(model)
    policy = model if dist_utils.is_prepared(model) else dist_utils.prepare_model(
        model, args.parallel, chunk_size=args.logprob_chunk_size
    )
    device = _device_of(policy)
    enabled_checkpointing = False
    if args.gradient_checkpointing and not getattr(hf_model, "is_gradient_checkpointing", False):
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_model.config.use_cache = False
        enabled_checkpointing = True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    dist_utils.reshard(policy)  # the optimizer must hold FSDP's sharded parameters
    optimizer = _make_optimizer(policy, args)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = [torch.randperm(n_pairs, generator=generator) for _ in range(args.epochs)]
    fingerprint = {
        "loss": args.loss, "alpha": None if sft else (float(alpha) if alpha is not None else None),
        "beta": args.beta, "num_pairs": n_pairs, "global_batch_size": G, "micro_batch_size": m,
        "world_size": world, "epochs": args.epochs, "seed": args.seed, "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
    }
    history: list[dict] = []
    start_step = 0
    state_dir = Path(state_dir) if state_dir is not None else None
    latest = _latest_state_path(state_dir)
    if latest is not None:
        saved = _load_state(latest, policy, optimizer, scheduler, fingerprint)
        start_step, order, history = int(saved["step"]), saved["order"], list(saved["history"])

    stop_at = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    show = args.progress and rank == 0 and sys.stderr.isatty()
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not show, desc=f"train {args.loss}")
    was_training = policy.training
    disable_dropout(policy)
    policy.train()
    try:
        step = start_step
        while step < stop_at:
            epoch, k = divmod(step, steps_per_epoch)
            global_idx = order[epoch][k * G : (k + 1) * G].tolist()
            t0 = time.perf_counter()
            out = accumulate_gradients(
                policy, pairs, global_idx, opp_real, opp_syn, alpha=alpha, args=args,
                pad_token_id=pad_token_id,
            )
            step += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(
                policy.parameters(), args.max_grad_norm if args.max_grad_norm else float("inf")
            )
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(out["loss"]):
                raise NonFiniteLossError(step, "loss", out["loss"])
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(step, "gradient norm", grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(pairs[i][0].input_ids) + (0 if sft else len(pairs[i][1].input_ids)) for i in global_idx)
            metrics = {
                **out,
                "alpha": float(alpha) if (alpha is not None and args.loss == "iris") else None,
                "lr": float(lr),
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed,
                "peak_memory_mb": dist_utils.all_reduce_max(_peak_memory_mb(device)),
                "step": step,
                "epoch": epoch + (k + 1) / steps_per_epoch,
            }
            metrics = {k_: v for k_, v in metrics.items() if v is not None}
            history.append(metrics)
            if log_fn is not None and rank == 0:
                log_fn(dict(metrics))
            bar.update(1)
            if state_dir is not None and (step % args.save_steps == 0 or step == stop_at):
                _save_state(state_dir, policy, optimizer, scheduler, step, order, history, fingerprint)
    finally:
        bar.close()
        policy.train(was_training)
        if enabled_checkpointing:
            hf_model.gradient_checkpointing_disable()
    summary = _summarise(history)
    summary["resumed_from_step"] = start_step
    summary["total_steps"] = total_steps
    return summary


def _objective_constants(args: TrainingArgs, alpha: Optional[float]) -> dict:
    if args.loss == "iris":
        if alpha is None or not alpha > 0:
            raise ValueError(f"IRIS needs an order alpha > 0, got {alpha}")
        return {"alpha": float(alpha), "beta": args.beta}
    if args.loss == "space":
        return {"mu": args.mu, "beta": args.beta}
    if args.loss == "spif":
        return {"beta": args.beta, "reward_bound": args.reward_bound}
    if args.loss == "spin":
        return {"beta": args.beta}
    return {}


def _check_opponent(real, synthetic, n_pairs: int, sft: bool):
    if sft:
        return None, None
    if real is None or synthetic is None:
        raise ValueError("self-play objectives need the opponent's real and synthetic log-probs")
    real = torch.as_tensor(real).detach().flatten()
    synthetic = torch.as_tensor(synthetic).detach().flatten()
    if real.numel() != n_pairs or synthetic.numel() != n_pairs:
        raise ValueError(
            f"opponent log-probs ({real.numel()} real, {synthetic.numel()} synthetic) do not match "
            f"the {n_pairs} pairs"
        )
    if not (torch.isfinite(real).all() and torch.isfinite(synthetic).all()):
        raise ValueError("opponent log-probs contain non-finite values")
    return real, synthetic


def accumulate_gradients(
    policy: nn.Module,
    pairs: Sequence[tuple],
    global_idx: Sequence[int],
    opp_real: Optional[torch.Tensor],
    opp_syn: Optional[torch.Tensor],
    *,
    alpha: Optional[float],
    args: TrainingArgs,
    pad_token_id: int,
) -> dict:
    """Forward/backward of ONE optimizer step over the global batch ``pairs[global_idx]``.

    Adds the exact gradient of the objective over the whole global batch to ``.grad``
    (every rank calls it with the same ``global_idx``; rank r handles its contiguous
    slice, split into micro-batches of ``args.micro_batch_size``). ``policy`` is a module
    from ``distributed.prepare_model``. Returns the global batch's metrics (loss, rewards,
    log-probs, weight ESS). Public so that tests and benchmarks can check the gradient.
    """
    accumulation = args.validate(dist_utils.get_world_size())
    if len(global_idx) != args.global_batch_size:
        raise ValueError(f"global batch has {len(global_idx)} pairs, expected {args.global_batch_size}")
    sft = args.loss == "sft"
    objective = None if sft else get_objective(args.loss)
    constants = _objective_constants(args, alpha)
    device = _device_of(policy)
    autocast = _autocast_factory(args.bf16, device)
    world, rank = dist_utils.get_world_size(), dist_utils.get_rank()
    G, m = args.global_batch_size, args.micro_batch_size
    per_rank = G // world
    local_start = rank * per_rank  # position of this rank's slice in the global batch
    micro = [global_idx[local_start + j * m : local_start + (j + 1) * m] for j in range(accumulation)]
    beta = 1.0 if sft else args.beta
    separable = args.loss in SEPARABLE_LOSSES
    if sft:
        total_tokens = sum(_response_tokens(pairs[i][0]) for i in global_idx)

    def sequences(idx):
        return [pairs[i][0] for i in idx] + ([] if sft else [pairs[i][1] for i in idx])

    def split(logps, n):
        return logps[:n], logps[n:]

    def global_objective(local_real, local_syn):
        """Objective over the whole global batch from every rank's detached log-probs."""
        real = dist_utils.all_gather_1d(local_real.detach())
        if sft:
            return None, real, None
        syn = dist_utils.all_gather_1d(local_syn.detach())
        idx = torch.tensor(global_idx)
        o_real = opp_real[idx].to(device=real.device, dtype=real.dtype)
        o_syn = opp_syn[idx].to(device=syn.device, dtype=syn.dtype)
        return objective(real, syn, o_real, o_syn, **constants), real, syn

    global_out = None
    if not separable and accumulation > 1:
        # Scoring pass: the log-sum-exp needs every sample's log-prob before any backward.
        with torch.no_grad():
            logps = [split(_forward_logps(policy, sequences(idx), pad_token_id, device, autocast), len(idx)) for idx in micro]
        global_out = global_objective(torch.cat([r for r, _ in logps]), torch.cat([s for _, s in logps]))

    local_real, local_syn = [], []
    offset = 0  # position of the current micro-batch inside this rank's slice
    for j, idx in enumerate(micro):
        last = j == accumulation - 1
        with dist_utils.gradient_sync(policy, enabled=last):
            pol_real, pol_syn = split(_forward_logps(policy, sequences(idx), pad_token_id, device, autocast), len(idx))
            local_real.append(pol_real.detach())
            if not sft:
                local_syn.append(pol_syn.detach())
            if sft:
                w_real = torch.full_like(pol_real, 1.0 / total_tokens)
                w_syn = torch.zeros_like(pol_syn)
            elif separable:
                i = torch.tensor(idx)
                mb_out = objective(pol_real.detach(), pol_syn.detach(), opp_real[i].to(pol_real),
                                   opp_syn[i].to(pol_syn), **constants)
                scale = len(idx) / G  # micro-batch weights are normalised over len(idx) samples
                w_real, w_syn = mb_out.real_weights * scale, mb_out.synthetic_weights * scale
            else:
                if global_out is None:  # one micro-batch per rank: the forward above is the scoring
                    global_out = global_objective(pol_real, pol_syn)
                pos = slice(local_start + offset, local_start + offset + len(idx))
                w_real, w_syn = global_out[0].real_weights[pos], global_out[0].synthetic_weights[pos]
            # DDP/FSDP average gradients over ranks; the global gradient is their sum.
            surrogate = weighted_surrogate(pol_real, pol_syn, w_real, w_syn, beta) * world
            surrogate.backward()
        offset += len(idx)

    if global_out is None:  # separable objectives: the global batch's values, for logging
        global_out = global_objective(torch.cat(local_real), torch.cat(local_syn) if local_syn else None)
    out, real, syn = global_out
    if sft:
        return {"loss": float(-real.double().sum() / total_tokens), "logps/real": float(real.double().mean())}
    real_rewards, syn_rewards = out.real_rewards.double(), out.synthetic_rewards.double()
    return {
        "loss": float(out.loss),
        "rewards/real": float(real_rewards.mean()),
        "rewards/synthetic": float(syn_rewards.mean()),
        "rewards/margins": float((real_rewards - syn_rewards).mean()),
        "rewards/accuracies": float((real_rewards > syn_rewards).double().mean()),
        "logps/real": float(real.double().mean()),
        "logps/synthetic": float(syn.double().mean()),
        "weights/ess_real": _ess(out.real_weights),
        "weights/ess_synthetic": _ess(out.synthetic_weights),
    }
