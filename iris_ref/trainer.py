"""Training on fixed opponent log-probs: a plain PyTorch loop, readable top to bottom.

Choices, and why:

- **One model resident.** The opponent enters only through its precomputed sequence
  log-probs, so memory is that of SFT plus a few vectors.
- **Exact gradient of the global batch** (THEORY.md I3). IRIS's log-sum-exp couples every
  sample of a batch, so the loss of a global batch is not a sum of micro-batch losses. Each
  optimizer step therefore (1) computes the log-prob of every sequence of the rank's share,
  micro-batch by micro-batch, (2) gathers them from all ranks, evaluates the objective on the
  WHOLE global batch and takes its gradient with respect to each sequence's log-prob,
  c_i = ∂L/∂log p(y_i) (these are the objective's weights, −β·a_i and +β·b_j), and (3)
  back-propagates Σ_i c_i·log p(y_i) with the c_i held fixed. The sum of those gradients is
  exactly the gradient of L over the global batch, whatever the micro-batches are. Data-parallel
  engines average gradients over ranks, so each rank's sum is scaled by the world size.
- **Kept graphs or a scoring pass** (`--scoring-pass`; same gradient either way, tested):
  *kept graphs*: the forwards of step (1) run with gradient and keep their graphs, and step (3)
  back-propagates through all of them in one backward. The work per token is SFT's; the memory
  is every micro-batch's graph at once, which under non-reentrant checkpointing is little:
  each decoder layer's input (the fp32 residual stream, also under bf16 autocast), the final
  norm's input and output and the LM head's input rows (`graph_memory`). *The scoring pass*:
  the forwards of step (1) run without gradient, and step (3) runs each micro-batch's forward
  again with gradient before its backward: one extra forward per step, the memory of one
  micro-batch. `auto` (the default) keeps the graphs when `graph_memory`'s estimate for the
  step's real padded micro-batches fits `MEMORY_SHARE` of the memory available now (free GPU
  memory; available RAM on CPU): decided per step, the same on every rank, and logged
  (`scoring_pass`: 0 or 1). With one micro-batch per rank its graph is always kept.
  SFT (`objective=None`: the mean NLL per response token) knows its coefficients before any
  forward (−1/tokens), so it runs one forward+backward per micro-batch and never a scoring pass.
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
  rewards must be exactly 0 at θ = θt, and with a scoring pass the weights of step (2) must
  belong to the log-probs that step (3) recomputes.
- **Failures**: a non-finite loss or gradient norm raises `NonFiniteLossError` naming the
  step, before the optimizer step, so the last saved state stays the last good one.
- **Resume** (`train_state`): the state is saved every `save_steps` steps and every
  `save_minutes`; a call with a valid state in `state_dir` continues from it.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from iris_ref import distributed, preemption, train_state
from iris_ref.errors import Interrupted, TrainingFailure
from iris_ref.logprobs import DEFAULT_CHUNK_SIZE
from iris_ref.scoring import forward_logps
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
          max_steps: Optional[int] = None, desc: str = "training", fingerprint: Optional[dict] = None,
          progress: Optional[Progress] = None) -> dict:
    """Train `policy` (from `distributed.prepare_model`) in place; return the phase's summary metrics.

    `objective`: one of `iris_ref.objectives` with its constants bound (e.g.
    `functools.partial(iris_loss, alpha=2.0, beta=0.1)`), or None for SFT. `config` supplies
    the optimisation options (`optimizer`, `weight_decay`, `warmup_ratio`, `global_batch_size`,
    `micro_batch_size`, `max_grad_norm`, `gradient_checkpointing`, `bf16`, `scoring_pass`, `seed`,
    `save_steps`, `save_minutes`). `max_steps` stops early (and saves), keeping the schedule of
    the full phase. Every rank calls this with the same data; `log` gets each step's metrics.
    `progress`: the phase's `Progress` to count steps into when a phase spans several calls (the
    SFT warm-up's epochs); by default each call reports as a phase of its own.
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
    counter = contextlib.nullcontext(progress) if progress is not None else \
        Progress(total, desc, unit="steps", initial=start)
    with training_mode(policy, config.gradient_checkpointing), preemption.deferred(), counter as bar:
        for step in range(start + 1, stop + 1):
            epoch, k = divmod(step - 1, steps_per_epoch)
            prompts = order[epoch][k * G:(k + 1) * G].tolist()
            t0 = time.perf_counter()
            out = accumulate_gradient(policy, data, prompts, objective, config.micro_batch_size, pad_token_id, config.bf16,
                                      config.scoring_pass)
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
                        micro_batch_size: int, pad_token_id: int, bf16: bool = False, scoring_pass: str = "auto") -> dict:
    """Add to `.grad` the exact gradient of the objective over the global batch `prompts`.

    Returns the global batch's metrics (every rank computes the same), plus `tokens` (the
    non-padding tokens of the training forwards), `padding_fraction`, `scoring_pass` (1 if
    this step ran one) and `graph_memory_gib` (`graph_memory`'s estimate for keeping the graphs).
    """
    batch = GlobalBatch(data, prompts, micro_batch_size)
    if objective is None:
        return {**sft_gradient(policy, batch, pad_token_id, bf16), "scoring_pass": 0}
    memory = step_graph_memory(policy, batch, bf16)
    keep = keep_graphs(scoring_pass, memory, len(batch.micro_batches), _device_of(policy))
    # 1. the log-probs of this rank's sequences: with gradient and graphs kept, or the scoring pass
    local = forward_share(policy, batch, pad_token_id, bf16, keep_graphs=keep)
    # 2. the objective over the whole global batch, and c_i = dL/dlog p(y_i) for every sequence
    coefficients, metrics = global_coefficients(batch, objective, local)
    # 3. back-propagate Σ c_i log p(y_i) with the c_i fixed: through the kept graphs, or forward again
    if keep:
        backward_kept(policy, batch, local, coefficients)
    else:
        forward_backward(policy, batch, coefficients, pad_token_id, bf16)
    return {**metrics, **batch.token_counts(batch.micro_batches), "scoring_pass": int(not keep),
            "graph_memory_gib": memory.total / 2**30}


def sft_gradient(policy, batch: "GlobalBatch", pad_token_id: int, bf16: bool) -> dict:
    """SFT, the mean NLL per response token: dL/dlog p(y_i) = −1/tokens is known before any forward."""
    coefficients = torch.full((len(batch.all),), -1.0 / batch.response_tokens, dtype=torch.float64)
    logps = batch.gather(forward_backward(policy, batch, coefficients, pad_token_id, bf16)).double()
    return {"loss": float(-logps.sum() / batch.response_tokens), "logps/real": float(logps.mean()),
            **batch.token_counts(batch.micro_batches)}


def forward_share(policy, batch: "GlobalBatch", pad_token_id: int, bf16: bool, keep_graphs: bool) -> list[torch.Tensor]:
    """Step 1: the log-probs of each of this rank's micro-batches. With `keep_graphs` every
    forward runs with gradient and its graph stays alive for `backward_kept`; DDP prepares its
    gradient all-reduce at the last forward only (the others run in `no_sync`). Otherwise no
    gradient and nothing kept: the scoring pass."""
    micro, out = batch.micro_batches, []
    with torch.set_grad_enabled(keep_graphs):
        for j, mb in enumerate(micro):
            with distributed.gradient_sync(policy, enabled=not keep_graphs or j == len(micro) - 1):
                out.append(forward_logps(policy, batch.sequences(mb), pad_token_id, bf16=bf16))
    return out


def global_coefficients(batch: "GlobalBatch", objective: Callable, local: list[torch.Tensor]):
    """Step 2: every rank's log-probs, the objective over the whole global batch, its gradient
    c_i with respect to each sequence's log-prob, and the batch's metrics."""
    logps = batch.gather(local).requires_grad_()
    out = objective(*batch.split(logps))
    (coefficients,) = torch.autograd.grad(out.loss, logps)
    return coefficients, objective_metrics(out, *batch.split(logps.detach())[:2])


def backward_kept(policy, batch: "GlobalBatch", local: list[torch.Tensor], coefficients: torch.Tensor) -> None:
    """Step 3 through the kept graphs: ONE backward of Σ_j Σ_{i in j} c_i·log p(y_i) over all of
    them, so every parameter's gradient is accumulated once (and DDP's all-reduce, prepared by
    the last forward, runs once); each graph is freed as the backward leaves it."""
    world = distributed.get_world_size()
    with distributed.gradient_sync(policy, enabled=True):
        torch.autograd.backward([(coefficients[mb].to(logps) * logps).sum().mul(world)
                                 for mb, logps in zip(batch.micro_batches, local)])


def forward_backward(policy, batch: "GlobalBatch", coefficients: torch.Tensor, pad_token_id: int,
                     bf16: bool) -> list[torch.Tensor]:
    """Step 3 without kept graphs (and SFT): per micro-batch, a forward with gradient and the
    backward of Σ c_i·log p(y_i); gradients synchronise with the last one. Returns the log-probs."""
    micro, world, trained = batch.micro_batches, distributed.get_world_size(), []
    for j, mb in enumerate(micro):
        with distributed.gradient_sync(policy, enabled=j == len(micro) - 1):
            logps = forward_logps(policy, batch.sequences(mb), pad_token_id, bf16=bf16)
            (coefficients[mb].to(logps) * logps).sum().mul(world).backward()
        trained.append(logps.detach())
    return trained


# ----------------------------------------------------------------------------------------
# kept graphs or a scoring pass: the memory estimate and the decision
# ----------------------------------------------------------------------------------------
SCORING_PASS_MODES = ("auto", "always", "never")
# The share of the available memory that `auto` lets a step with kept graphs take.
# GPU, 0.8 of the free memory (driver's free + the caching allocator's unused reserve): the
# rest absorbs the allocator's fragmentation and rounding and what the estimate leaves out
# (NCCL and cuBLAS workspaces, small tensors): a wrong call to keep costs an out-of-memory
# error, a cautious one only a forward.
# CPU, 0.5 of MemAvailable, shared by the ranks of the host: that memory also belongs to every
# other process, shrinks while the step runs, and swapping would be far slower than the
# scoring pass it avoids.
MEMORY_SHARE = {"cuda": 0.8, "cpu": 0.5}


@dataclass(frozen=True)
class GraphMemory:
    """Estimated bytes of a step that keeps its graphs, on top of what is allocated before it."""

    kept: float  # every micro-batch's graph of this rank, held at once
    working: float  # the transients of a forward, or of a backward plus the gradients not allocated yet

    @property
    def total(self) -> float:
        return self.kept + self.working


def graph_memory(model_config, shapes: Sequence[tuple[int, int, int]], *, checkpointing: bool, param_bytes: int = 4,
                 compute_bytes: Optional[int] = None, gradient_bytes: float = 0.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> GraphMemory:
    """The memory of keeping the graphs of micro-batches `shapes` ((rows, padded length,
    response tokens) each) of a decoder-only LM (Qwen2/Llama-like `model_config`).

    `param_bytes`: the weights' element size, which is also the residual stream's (it stays
    fp32 under bf16 autocast: the norms compute in fp32 and the residual additions promote);
    `compute_bytes`: the matmuls' (2 under bf16 autocast; None: `param_bytes`);
    `gradient_bytes`: the gradients still to be allocated (None after `zero_grad`).

    Kept per micro-batch of N = rows x length tokens and R response tokens, d = hidden size,
    L layers, I = MLP width:
    - checkpointed: each layer's input (N·d), the final norm's input and output (2·N·d) and
      the LM head's input rows (R·d), at `param_bytes`, plus the attention mask (rows·length²
      bytes);
    - not checkpointed: per layer and token, the norms' inputs and outputs (4·d at
      `param_bytes`), the matmul inputs, q, k, v (GQA heads repeated) and the attention output
      (7·d) and the MLP's four intermediates (4·I) at `compute_bytes`, a mask per layer
      (rows·length²·`compute_bytes`), plus the same final-norm and LM-head terms, plus under
      autocast this forward's own low-precision copy of the weights;
    - and 256 KiB in all for small objects (autograd's nodes, Python objects, allocator granularity).
    Working, for the largest micro-batch: a forward's transients (one layer's activations, 3
    fp32 logit chunks of `chunk_size` x vocabulary, autocast's weight copies) or a backward's
    (one layer recomputed with checkpointing and its gradients, 4 logit chunks, the hidden
    state's gradient) plus `gradient_bytes`, whichever is larger.
    Checked on CPU by tests/test_scoring_pass.py: measured <= estimate <= 3 x measured.
    """
    d, layers, vocab = model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size
    width = getattr(model_config, "intermediate_size", None) or 4 * d
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or d // heads
    compute = compute_bytes or param_bytes
    autocast = compute != param_bytes
    linear = layers * (2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * width)  # q, o, k, v, MLP

    def layer_activations(rows: int, length: int) -> float:
        tokens = rows * length
        per_token = 4 * d * param_bytes + 7 * d * compute + 4 * width * compute + 4 * (2 + heads)
        return tokens * per_token + rows * length ** 2 * compute

    kept = 256 * 1024.0  # small things: autograd's nodes, Python objects, the allocator's granularity
    for rows, length, response in shapes:
        tokens = rows * length
        # the final norm's input and output, the LM head's input rows, the mask, ids and positions, and per
        # checkpointed call (layers, LM-head chunks) its saved RNG state and autograd's bookkeeping (~8 KiB)
        outside = param_bytes * d * (2 * tokens + response) + rows * length ** 2 + 32 * tokens \
            + 8192 * (layers * checkpointing + math.ceil(response / chunk_size))
        if checkpointing:
            kept += param_bytes * d * tokens * layers + outside
        else:
            kept += layers * layer_activations(rows, length) + outside + (compute * linear if autocast else 0)
    rows, length, _ = max(shapes, key=lambda s: s[0] * s[1])
    activations, logits = layer_activations(rows, length), chunk_size * vocab * 4.0
    forward = activations + 3 * logits + (compute * (linear + vocab * d) if autocast else 0)
    backward = (2 if checkpointing else 1) * activations + 4 * logits + 2 * rows * length * d * param_bytes
    return GraphMemory(kept, max(forward, backward + gradient_bytes))


def step_graph_memory(policy, batch: "GlobalBatch", bf16: bool) -> GraphMemory:
    """`graph_memory` of this rank's micro-batches of `batch`, for `policy` as it is now."""
    model = distributed.unwrap_model(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    missing = sum(_local(p).numel() * _local(p).element_size() for p in params if p.grad is None)
    inner = policy.module if isinstance(policy, nn.parallel.DistributedDataParallel) else policy
    cuda_bf16 = bf16 and _device_of(policy).type == "cuda"
    return graph_memory(model.config, batch.shapes(), checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
                        param_bytes=_local(params[0]).element_size(), compute_bytes=2 if cuda_bf16 else None,
                        gradient_bytes=missing, chunk_size=getattr(inner, "chunk_size", DEFAULT_CHUNK_SIZE))


def keep_graphs(mode: str, memory: GraphMemory, micro_batches: int, device: torch.device) -> bool:
    """Whether this step keeps its graphs (else: the scoring pass). `auto`: when `memory` fits
    `memory_budget` on every rank (a rank that took the other path would run a different number
    of forwards, and FSDP's forwards are collective)."""
    if mode not in SCORING_PASS_MODES:
        raise ValueError(f"unknown scoring_pass {mode!r}; choose one of {', '.join(SCORING_PASS_MODES)}")
    if micro_batches == 1 or mode == "never":  # one micro-batch: its graph is what a scoring pass would train on
        return True
    if mode == "always":
        return False
    fits = memory.total <= memory_budget(device)
    return distributed.all_reduce_max(0.0 if fits else 1.0) == 0.0


def memory_budget(device: torch.device, resident: float = 0.0) -> float:
    """Bytes a step may keep in graphs now: `MEMORY_SHARE` of the free GPU memory (the driver's
    free memory plus what PyTorch's caching allocator reserved and does not use), or of the RAM
    the kernel reports available, split between the ranks of this host. `resident`: bytes that
    will be allocated before the step (`--dry-run`'s weights and optimizer state)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MEMORY_SHARE["cuda"] * max(0.0, free - resident)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return MEMORY_SHARE["cpu"] * max(0.0, available_ram() - resident * ranks) / ranks


def available_ram() -> float:
    """The kernel's estimate of memory available without swapping (`MemAvailable`), or psutil's; 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return 0.0


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

    def shapes(self) -> list[tuple[int, int, int]]:
        """(rows, padded length, response tokens) of each of this rank's micro-batches."""
        return [(len(mb), max(len(self.all[i].input_ids) for i in mb),
                 sum(len(self.all[i].input_ids) - self.all[i].prompt_length for i in mb)) for mb in self.micro_batches]

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


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP2's DTensor: this rank's shard


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
