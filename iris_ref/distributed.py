"""Data parallelism: DDP by default, FSDP2 on request, one process otherwise; and the few
collectives the rest of the code uses. Nothing here knows about self-play.

1. `init_distributed()` once at start-up. Under `torchrun` (`WORLD_SIZE` > 1) it creates the
   process group: `nccl` with CUDA (pinning the local GPU), `gloo` on CPU. Without `torchrun`
   it does nothing and reports rank 0 of 1.
2. `prepare_model(model, strategy)` after the model is on its device: `"auto"` (DDP when
   world > 1, plain otherwise), `"ddp"`, `"fsdp"` (FSDP2: `fully_shard` on every decoder
   layer, then on the Hugging Face model as root) or `"none"`. The returned module's
   `forward(input_ids, attention_mask, response_mask)` gives the sequence log-probs of the
   response tokens; `unwrap_model(policy)` gives the Hugging Face model back.
3. `full_model_state_dict` / `load_full_model_state_dict` and the optimizer equivalents move
   full (unsharded) states in and out (checkpoints and trainer states use them).
4. `is_main_process()`, `barrier()`, `broadcast_object`, `all_gather_1d`,
   `all_gather_objects`, `all_reduce_sum/max` move small things between ranks.
5. `teardown_distributed()` at exit.

Gradient semantics: DDP and FSDP2 both *average* gradients over ranks; the trainer scales
each rank's contribution by the world size, so the averaged gradient is exactly the gradient
of the objective over the whole global batch (THEORY.md I3).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from iris_ref.logprobs import DEFAULT_CHUNK_SIZE, SequenceLogprobModule

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, the local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise torch.distributed from the variables ``torchrun`` sets, if any.

    ``device``: ``"cpu"`` forces gloo even when CUDA is present; ``None`` picks CUDA when
    available. Idempotent: calling it twice returns the same information.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=dev)


def teardown_distributed() -> None:
    """Destroy the process group if this process created one (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Tensors handed to collectives must live where the backend expects them."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_1d(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's 1-D tensor in rank order; lengths may differ between ranks.

    The result is detached, on the input's device, with the input's dtype. Identity (a
    detached copy) in one process.
    """
    if tensor.dim() != 1:
        raise ValueError(f"all_gather_1d expects a 1-D tensor, got shape {tuple(tensor.shape)}")
    if not is_distributed():
        return tensor.detach().clone()
    comm = _comm_device()
    local = tensor.detach().to(comm)
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.long, device=comm))
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=local.dtype, device=comm)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)]).to(tensor.device)


def all_gather_objects(items: list) -> list:
    """Concatenate every rank's list of picklable objects in rank order (a copy in one process)."""
    if not is_distributed():
        return list(items)
    parts: list = [None] * get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def all_reduce_sum(value: float) -> float:
    """Sum of a python number over ranks (identity in one process)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float) -> float:
    """Maximum of a python number over ranks (identity in one process)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``; blocks are in rank order and cover it.

    The first ``n % world_size`` ranks get one item more, so concatenating the per-rank
    results in rank order (``all_gather_1d``) restores the original order.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (Qwen2, Llama, Mistral...)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"FSDP needs a decoder with `.model.layers`; {type(model).__name__} has none"
        )
    return list(layers)


def prepare_model(model: nn.Module, strategy: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE) -> nn.Module:
    """Wrap a Hugging Face causal LM for training on this process's share of the batch.

    Returns a module whose forward gives sequence log-probs (see SequenceLogprobModule):
    plain, ``DistributedDataParallel`` or FSDP2-sharded. Idempotent on an already prepared
    module. DDP uses ``forward_sync_buffers=False`` (the only buffers are deterministic rotary
    tables), so a no-grad forward involves no collective.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {strategy!r}; choose one of {STRATEGIES}")
    if is_prepared(model):
        return model
    if strategy == "auto":
        strategy = "ddp" if is_distributed() else "none"
    if strategy in ("ddp", "fsdp") and not is_distributed():
        strategy = "none"
    wrapped = SequenceLogprobModule(model, chunk_size=chunk_size)
    if strategy == "ddp":
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(
            wrapped,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        # The Hugging Face model itself is the root (embeddings, final norm, LM head), so its
        # own forward unshards them: log-probs, evaluation and `generate` all work on it.
        # A root's parameters stay unsharded from its forward until its backward ends, which
        # covers the chunked LM head that `sequence_logprobs` applies after the forward.
        fully_shard(model)
    return wrapped


def is_prepared(module: nn.Module) -> bool:
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    return isinstance(inner, SequenceLogprobModule)


def parallel_strategy(policy: nn.Module) -> str:
    """"ddp", "fsdp" or "none" for a module returned by prepare_model."""
    if isinstance(policy, nn.parallel.DistributedDataParallel):
        return "ddp"
    from torch.distributed.fsdp import FSDPModule

    return "fsdp" if isinstance(unwrap_model(policy), FSDPModule) else "none"


def reshard(policy: nn.Module) -> None:
    """Put FSDP2 parameters back into their sharded form (a no-op otherwise).

    FSDP2 leaves the root's parameters unsharded after a forward that is not followed by a
    backward (evaluation, scoring); an optimizer built then would hold the unsharded tensors.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def unwrap_model(policy: nn.Module) -> nn.Module:
    """The Hugging Face model inside a prepared module (identity for a bare model)."""
    if isinstance(policy, nn.parallel.DistributedDataParallel):
        policy = policy.module
    if isinstance(policy, SequenceLogprobModule):
        return policy.policy
    return policy


@contextlib.contextmanager
def gradient_sync(policy: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter for accumulation micro-batches.

    Gradients still accumulate locally; the last micro-batch of an optimizer step runs with
    ``enabled=True`` and synchronises the sum. A no-op in one process.
    """
    strategy = parallel_strategy(policy)
    if strategy == "ddp" and not enabled:
        with policy.no_sync():
            yield
    elif strategy == "fsdp":
        unwrap_model(policy).set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            unwrap_model(policy).set_requires_gradient_sync(True)
    else:
        yield


def full_model_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of the Hugging Face model, on CPU, keyed as in HF.

    Collective for FSDP: every rank must call it; under FSDP only rank 0 receives the
    tensors (other ranks get an empty dict).
    """
    strategy = parallel_strategy(policy)
    hf_model = unwrap_model(policy)
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        # Tied parameters (input/output embeddings) come back as separate copies; make them
        # one tensor again so that save_pretrained recognises the tie, as for a plain model.
        first_name: dict[int, str] = {}
        for name, param in hf_model.named_parameters(remove_duplicate=False):
            if id(param) in first_name and name in state and first_name[id(param)] in state:
                state[name] = state[first_name[id(param)]]
            first_name.setdefault(id(param), name)
        return state
    # One CPU copy per tensor: tied weights (input/output embeddings) stay ONE tensor, which is
    # how save_pretrained recognises the tie (a GPU model's .to("cpu") would copy each name).
    copies: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in hf_model.state_dict(keep_vars=False).items():
        key = (id(tensor),) if tensor.device.type == "meta" else \
            (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu")
        state[name] = copies[key]
    return state


def load_full_model_state_dict(policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full HF-keyed state dict into a (possibly sharded) prepared model.

    Every rank must pass the same full state (each rank reads it from disk): FSDP2 keeps its
    own shard of each tensor.
    """
    strategy = parallel_strategy(policy)
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unwrap_model(policy), state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap_model(policy).load_state_dict(state)


def optimizer_state_dict(policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state to save: full (rank-0 view) under FSDP, the plain one otherwise."""
    if parallel_strategy(policy) == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            unwrap_model(policy), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state_dict(policy: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if parallel_strategy(policy) == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            unwrap_model(policy), optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
        return
    optimizer.load_state_dict(state)
