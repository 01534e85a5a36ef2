"""Training on fixed opponent log-probs: a plain PyTorch loop, readable top to bottom.

Choices, and why:

- **One model resident.** The opponent enters only through its precomputed sequence
  log-probs, so memory is that of SFT plus a few vectors.
- **Exact gradient of the global batch** (THEORY.md I3). IRIS's log-sum-exp couples every
  sample of a batch, so the loss of a global batch is not a sum of micro-batch losses. Each
  optimizer step therefore (1) computes every sequence's log-prob without gradient, (2)
  evaluates the objective on the WHOLE global batch (all micro-batches of all ranks) and
  takes its gradient with respect to each sequence's log-prob, c_i = ∂L/∂log p(y_i) (these
  are the objective's weights, −β·a_i and +β·b_j), and (3) back-propagates Σ_i c_i·log p(y_i)
  micro-batch by micro-batch with the c_i held fixed. The sum of those gradients is exactly
  the gradient of L over the global batch, whatever the micro-batches are. Step (1) is the
  *scoring pass*: one extra forward per step, about a third of a forward+backward; with a
  single micro-batch per rank the graph of that one forward is kept and no scoring pass
  runs. Data-parallel engines average gradients over ranks, so each rank's sum is scaled by
  the world size. The same path trains SFT (`objective=None`: the mean NLL per response
  token), whose coefficients are known before any forward (−1/tokens), so it has no scoring pass.
- **Little padding.** Because any partition of the global batch into micro-batches is
  exact, the sequences of a global batch (annotated and synthetic alike) are sorted by length
  and cut into micro-batches of equal count (`micro_batch_size` prompts' worth of sequences:
  the same memory bound as before), which the ranks take round-robin. The global batch itself
  is still a uniformly random draw, so the objective is unchanged.
- **Batches**: `global_batch_size` prompts per optimizer step, each with its annotated
  response and its K synthetic ones. Each epoch visits the prompts in a seeded random order
  and drops the last `N mod global_batch_size` of that order, so every step has a full batch.
- **Optimisation**: a fresh optimizer and schedule per call (each self-play iteration is a new
  fine-tuning run from the previous model, as in SPIN): RMSprop (SPIN) or AdamW (weight decay
  on matrices only, as transformers' Trainer), linear warmup over ⌈warmup_ratio·steps⌉ then
  linear decay (`transformers.get_scheduler`), `clip_grad_norm_`.
- **Precision and memory**: bf16 autocast on CUDA, fp32 master weights and optimizer state;
  non-reentrant gradient checkpointing when asked (switched off again afterwards, with the
  model's `use_cache` restored, so saved configs are unchanged). Dropout is disabled: the
  rewards must be exactly 0 at θ = θt, and the weights of step (2) must belong to the
  log-probs back-propagated in step (3).
- **Failures**: a non-finite loss or gradient norm raises `NonFiniteLossError` naming the
  step, before the optimizer step, so the last saved state stays the last good one.
- **Resume** (`train_state`): the state is saved every `save_steps` steps and every
  `save_minutes`; a call with a valid state in `state_dir` continues from it.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from iris_ref import distributed, preemption, train_state
from iris_ref.errors import Interrupted, TrainingFailure
from iris_ref.logprobs import forward_logps
from iris_ref.metrics import objective_metrics, summarise
from iris_ref.progress import Progress


class NonFiniteLossError(TrainingFailure):
    """The loss or the gradient norm of an optimizer step is NaN or infinite."""

    def __init__(self, desc: str, step: int, what: str, value: float):
        self.step = step
        super().__init__(f"{desc}: non-finite {what} ({value}) at optimizer step {step}; stopped before updating "
                         "the model, the last saved state is intact (lower the learning rate, and check the data)")


@dataclass
class TrainingData:
    """What one phase trains on: per prompt its annotated sequence and K synthetic ones.

    `synthetic` is prompt-major (prompt i's responses are `synthetic[i*K:(i+1)*K]`), with the
    opponent's log-probs of both in the same order. SFT: `synthetic` and both log-probs None.
    """

    real: Sequence
    synthetic: Optional[Sequence] = None
    opponent_real: Optional[torch.Tensor] = None
    opponent_synthetic: Optional[torch.Tensor] = None

    @property
    def num_synthetic(self) -> int:
        return 0 if self.synthetic is None else len(self.synthetic) // len(self.real)

    def check(self) -> None:
        if not self.real:
            raise ValueError("no training prompts")
        if self.synthetic is None:
            return
        n, k = len(self.real), self.num_synthetic
        if k < 1 or len(self.synthetic) != n * k:
            raise ValueError(f"{len(self.synthetic)} synthetic responses for {n} prompts: need K per prompt")
        for name, logps, size in (("real", self.opponent_real, n), ("synthetic", self.opponent_synthetic, n * k)):
            if logps is None or logps.numel() != size:
                raise ValueError(f"opponent {name} log-probs: {None if logps is None else logps.numel()} for {size} sequences")
            if not torch.isfinite(logps).all():
                raise ValueError(f"opponent {name} log-probs contain non-finite values")


def train(policy: nn.Module, data: TrainingData, objective: Optional[Callable], config, *, pad_token_id: int,
          epochs: int, learning_rate: float, state_dir: Optional[Path] = None, log: Callable[[dict], None] = lambda _: None,
          max_steps: Optional[int] = None, desc: str = "training", fingerprint: Optional[dict] = None) -> dict:
    """Train `policy` (from `distributed.prepare_model`) in place; return the phase's summary metrics.

    `objective`: one of `iris_ref.objectives` with its constants bound (e.g.
    `functools.partial(iris_loss, alpha=2.0, beta=0.1)`), or None for SFT. `config` supplies
    the optimisation options (`optimizer`, `weight_decay`, `warmup_ratio`, `global_batch_size`,
    `micro_batch_size`, `max_grad_norm`, `gradient_checkpointing`, `bf16`, `seed`,
    `save_steps`, `save_minutes`). `max_steps` stops early (and saves), keeping the schedule of
    the full phase. Every rank calls this with the same data; `log` gets each step's metrics.
    """
    data.check()
    G, world = config.global_batch_size, distributed.get_world_size()
    if G % (world * config.micro_batch_size):
        raise ValueError(f"--global-batch-size {G} must be --micro-batch-size {config.micro_batch_size} x "
                         f"accumulation steps x {world} ranks")
    steps_per_epoch = len(data.real) // G
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.real)} training prompts are fewer than --global-batch-size {G}")
    total = steps_per_epoch * epochs
    stop = total if max_steps is None else min(total, max_steps)

    distributed.reshard(policy)  # the optimizer must hold FSDP's sharded parameters
    optimizer = make_optimizer(policy, config.optimizer, learning_rate, config.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total),
                              num_training_steps=total)
    generator = torch.Generator().manual_seed(config.seed)
    order = [torch.randperm(len(data.real), generator=generator) for _ in range(epochs)]
    fingerprint = train_state.fingerprint(**(fingerprint or {}), prompts=len(data.real), num_synthetic=data.num_synthetic,
                                          global_batch_size=G, micro_batch_size=config.micro_batch_size,
                                          epochs=epochs, seed=config.seed, optimizer=config.optimizer,
                                          learning_rate=learning_rate)
    resumed = train_state.resume(state_dir, policy, optimizer, scheduler, fingerprint)
    start = int(resumed["step"]) if resumed else 0
    order, history = (resumed["order"], list(resumed["history"])) if resumed else (order, [])
    saver = train_state.Saver(state_dir, config.save_steps, config.save_minutes)
    device = _device_of(policy)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # A termination signal is only recorded here; the step boundary below saves the state and stops.
    with training_mode(policy, config.gradient_checkpointing), preemption.deferred(), \
            Progress(total, desc, unit="steps", initial=start) as bar:
        for step in range(start + 1, stop + 1):
            epoch, k = divmod(step - 1, steps_per_epoch)
            prompts = order[epoch][k * G:(k + 1) * G].tolist()
            t0 = time.perf_counter()
            out = accumulate_gradient(policy, data, prompts, objective, config.micro_batch_size, pad_token_id, config.bf16)
            grad_norm = float(_full(nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)))
            if not math.isfinite(out["loss"]):
                raise NonFiniteLossError(desc, step, "loss", out["loss"])
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(desc, step, "gradient norm", grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            out.update(lr=float(lr), grad_norm=grad_norm, step_seconds=seconds, tokens_per_s=out["tokens"] / seconds,
                       peak_memory_mb=distributed.all_reduce_max(_peak_memory_mb(device)), step=step,
                       epoch=epoch + (k + 1) / steps_per_epoch)
            history.append(out)
            log(dict(out))
            bar.update(1)
            stopping = preemption.stop_requested()  # SIGTERM/SIGUSR1 on any rank
            if state_dir is not None and (saver.due(step) or step == stop < total or stopping):
                train_state.save(state_dir, policy, optimizer, scheduler, step=step, order=order, history=history,
                                 fingerprint=fingerprint)
                saver.saved()
            if stopping:
                raise Interrupted(stopping)
    return {**summarise(history), "resumed_from_step": start, "total_steps": total}


def accumulate_gradient(policy, data: TrainingData, prompts: list[int], objective: Optional[Callable],
                        micro_batch_size: int, pad_token_id: int, bf16: bool = False) -> dict:
    """Add to `.grad` the exact gradient of the objective over the global batch `prompts`.

    Returns the global batch's metrics (every rank computes the same), plus `tokens` (the
    non-padding tokens of the training forwards) and `padding_fraction`.
    """
    batch = GlobalBatch(data, prompts, micro_batch_size)
    micro = batch.micro_batches
    single = len(micro) == 1
    if objective is None:  # SFT, the mean NLL per response token: dL/dlog p(y_i) = -1/tokens, known up front
        coefficients = torch.full((len(batch.all),), -1.0 / batch.response_tokens, dtype=torch.float64)
    else:
        # 1. every sequence's log-prob; without gradient unless one forward is the whole share
        with torch.set_grad_enabled(single):
            local = [forward_logps(policy, batch.sequences(mb), pad_token_id, bf16=bf16) for mb in micro]
        logps = batch.gather(local).requires_grad_()
        # 2. the objective over the whole global batch, and c_i = dL/dlog p(y_i) for every sequence
        out = objective(*batch.split(logps))
        (coefficients,) = torch.autograd.grad(out.loss, logps)
        metrics = objective_metrics(out, *batch.split(logps.detach())[:2])
    # 3. back-propagate Σ c_i log p(y_i), micro-batch by micro-batch, with the c_i fixed
    world, trained = distributed.get_world_size(), []
    for j, mb in enumerate(micro):
        with distributed.gradient_sync(policy, enabled=j == len(micro) - 1):
            mb_logps = local[j] if single and objective is not None else \
                forward_logps(policy, batch.sequences(mb), pad_token_id, bf16=bf16)
            (coefficients[mb].to(mb_logps) * mb_logps).sum().mul(world).backward()
        trained.append(mb_logps.detach())
    if objective is None:
        logps = batch.gather(trained).double()
        metrics = {"loss": float(-logps.sum() / batch.response_tokens), "logps/real": float(logps.mean())}
    return {**metrics, **batch.token_counts(micro)}


class GlobalBatch:
    """The sequences of one optimizer step, in one vector: the G annotated ones, then the G·K
    synthetic ones (prompt-major); how they are cut into micro-batches and split for the objective.

    `plan[r]` lists rank r's micro-batches (positions in that vector): all sequences sorted by
    length and cut into world × accumulation chunks with the least padding (`least_padding_cuts`),
    dealt round-robin.
    """

    def __init__(self, data: TrainingData, prompts: list[int], micro_batch_size: int):
        self.data, self.prompts, self.K = data, prompts, data.num_synthetic
        self.synthetic_index = [i * self.K + k for i in prompts for k in range(self.K)]
        self.all = [data.real[i] for i in prompts] + [data.synthetic[j] for j in self.synthetic_index]
        world = distributed.get_world_size()
        chunks = world * (len(prompts) // (world * micro_batch_size))
        by_length = sorted(range(len(self.all)), key=lambda i: (-len(self.all[i].input_ids), i))
        bounds = least_padding_cuts([len(self.all[i].input_ids) for i in by_length], chunks)
        cut = [by_length[a:b] for a, b in zip(bounds, bounds[1:])]
        self.plan = [cut[r::world] for r in range(world)]

    @property
    def micro_batches(self) -> list[list[int]]:
        return self.plan[distributed.get_rank()]

    def sequences(self, positions: list[int]) -> list:
        return [self.all[i] for i in positions]

    def gather(self, local: list[torch.Tensor]) -> torch.Tensor:
        """Every rank's log-probs, detached, back in batch order (the same on every rank)."""
        values = distributed.all_gather_1d(torch.cat([x.detach() for x in local]))
        positions = torch.tensor([p for chunks in self.plan for mb in chunks for p in mb])
        out = torch.empty_like(values)
        out[positions] = values
        return out

    @property
    def response_tokens(self) -> int:
        return sum(len(s.input_ids) - s.prompt_length for s in self.all)

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four vectors of an objective: policy real, policy synthetic, opponent real, opponent synthetic."""
        G = len(self.prompts)
        real, synthetic = logps[:G], logps[G:]
        return (real, synthetic, self.data.opponent_real[torch.tensor(self.prompts)].to(real),
                self.data.opponent_synthetic[torch.tensor(self.synthetic_index)].to(synthetic))

    def token_counts(self, micro: list[list[int]]) -> dict:
        """Non-padding tokens of this step's training forwards (all ranks) and the padding share."""
        lengths = [[len(self.all[i].input_ids) for i in mb] for mb in micro]
        used = sum(map(sum, lengths))
        computed = sum(len(ls) * max(ls) for ls in lengths)
        used, computed = distributed.all_reduce_sum(used), distributed.all_reduce_sum(computed)
        return {"tokens": used, "padding_fraction": 1.0 - used / computed}


def least_padding_cuts(lengths: Sequence[int], chunks: int) -> list[int]:
    """Cut points 0 = c_0 < ... < c_chunks = n of `lengths` (sorted longest first) that minimise the
    padded size Σ (c_{k+1} − c_k)·lengths[c_k] of the chunks, each chunk no larger (padded) than
    the largest chunk of an equal-count cut: as little padding as possible with the memory bound of
    `micro_batch_size` prompts' worth of sequences. Dynamic programming, vectorised over the cut.
    """
    import numpy as np

    n = len(lengths)
    if not 1 <= chunks <= n:
        raise ValueError(f"cannot cut {n} sequences into {chunks} micro-batches")
    length = np.asarray(lengths, dtype=np.float64)
    equal = [c * (n // chunks) for c in range(chunks)] + [n]
    cap = max((b - a) * length[a] for a, b in zip(equal, equal[1:]))
    start = np.arange(n)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((chunks + 1, n + 1), dtype=np.int64)
    for c in range(1, chunks + 1):
        new = np.full(n + 1, np.inf)
        for j in range(c, n - (chunks - c) + 1):
            cost = best[:j] + (j - start[:j]) * length[:j]
            cost[(j - start[:j]) * length[:j] > cap] = np.inf
            i = int(np.argmin(cost))
            new[j], choice[c, j] = cost[i], i
        best = new
    cuts, j = [n], n
    for c in range(chunks, 0, -1):
        j = int(choice[c, j])
        cuts.append(j)
    return cuts[::-1]


def make_optimizer(policy: nn.Module, name: str, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in policy.parameters() if p.requires_grad]
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=learning_rate, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; choose rmsprop or adamw")
    # As transformers' Trainer: no decay on biases and normalisation weights (1-D tensors).
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=learning_rate)


@contextlib.contextmanager
def training_mode(policy: nn.Module, gradient_checkpointing: bool):
    """train() mode without dropout, gradient checkpointing if asked; everything restored after."""
    model = distributed.unwrap_model(policy)
    was_training, use_cache = policy.training, getattr(model.config, "use_cache", None)
    enable = gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", False)
    disable_dropout(policy)
    if enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    policy.train()
    try:
        yield
    finally:
        policy.train(was_training)
        if enable:
            model.gradient_checkpointing_disable()
            model.config.use_cache = use_cache


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of `model` to 0 (its saved config is left as it is).

    Besides `nn.Dropout` modules, attention layers keep theirs as a float attribute (Qwen2's
    `attention_dropout`). Models such as GPT-2, OPT or Phi have dropout on by default.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def _device_of(policy: nn.Module) -> torch.device:
    param = next(policy.parameters())
    return (param.to_local() if hasattr(param, "to_local") else param).device


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
