"""Log-probs of encoded sequences: one right-padded forward (`forward_logps`, the trainer's unit),
or many without gradient, batched by a token budget and shared by the ranks (`score_sequences`:
the opponent pass, evaluation). The per-model computation is `logprobs.sequence_logprobs`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from iris_ref import distributed
from iris_ref.data import collate
from iris_ref.logprobs import SequenceLogprobModule
from iris_ref.progress import Progress


def forward_logps(policy, sequences: list, pad_token_id: int, *, bf16: bool = False) -> torch.Tensor:
    """Sequence log-probs of ``sequences`` (``data.EncodedSequence``) in ONE forward, right-padded together.

    ``policy``: a module from ``distributed.prepare_model`` (its forward gives sequence
    log-probs; DDP and FSDP see the call) or a bare Hugging Face model.
    """
    module = policy if distributed.is_prepared(policy) else SequenceLogprobModule(policy)
    batch = collate(sequences, pad_token_id)
    device = _device_of(module)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        return module(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device))


def _device_of(module) -> torch.device:
    param = next(module.parameters())
    local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2 DTensor: its local shard
    return local.device


def token_budget_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into batches whose padded size
    ``rows x longest`` stays within ``token_budget`` (at least one row each)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def score_sequences(policy, sequences: list, pad_token_id: int, *, token_budget: int, bf16: bool = False,
                    desc: Optional[str] = None) -> torch.Tensor:
    """Log-probs (no grad) of every sequence, float32 on CPU (float64 for a float64 model), in order.

    Sorted by length and batched by ``token_budget`` padded tokens, so little is computed on
    padding. Under torchrun the batches are dealt round-robin to the ranks and the results
    all-gathered, so every rank returns all of them; every rank runs the same number of
    forwards (a rank short of work repeats one and discards it) because an FSDP forward is
    collective.
    """
    if not sequences:
        return torch.zeros(0)
    batches = token_budget_batches([len(s.input_ids) for s in sequences], token_budget)
    world, rank = distributed.get_world_size(), distributed.get_rank()
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    values, positions = [], []
    was_training = policy.training
    policy.eval()
    try:
        # inference_mode, except under FSDP2: its unsharded parameter buffers, allocated in here,
        # would become inference tensors that the training forwards cannot update in place.
        no_grad = torch.no_grad() if distributed.parallel_strategy(policy) == "fsdp" else torch.inference_mode()
        with no_grad, Progress(len(sequences), desc or "log-probs", unit="sequences",
                                              enabled=desc is not None and distributed.is_main_process()) as progress:
            for k in range(rounds):
                batch = mine[k] if k < len(mine) else batches[0][:1]
                logps = forward_logps(policy, [sequences[i] for i in batch], pad_token_id, bf16=bf16)
                if k < len(mine):
                    values.append(logps.cpu())
                    positions.extend(batch)
                progress.update(sum(len(b) for b in batches[k * world:(k + 1) * world]))
    finally:
        policy.train(was_training)
        distributed.reshard(policy)
    # clone: a normal tensor, not an inference one. A rank without a batch sends an empty tensor of the
    # others' dtype (float32, float64 for a float64 model): all_gather needs one dtype.
    empty = torch.zeros(0, dtype=torch.promote_types(next(policy.parameters()).dtype, torch.float32))
    local = torch.cat(values).clone() if values else empty
    gathered = distributed.all_gather_1d(local)
    order = torch.tensor([i for r in range(world) for b in batches[r::world] for i in b], dtype=torch.long)
    result = torch.empty_like(gathered)
    result[order] = gathered
    return result
