"""Sequence log-probabilities of response tokens without the full-vocabulary logits of the batch.

A naive ``log_softmax(model(...).logits.float())`` holds ``B x T x V`` fp32 logits (and their
gradient): 4 GB for 8 x 1024 tokens of a 150k vocabulary. Here the model runs with
``logits_to_keep`` set to an empty index (no logits at all) and returns its final hidden
states; only the response positions are selected (the hidden state at t predicts token t+1),
and ``lm_head`` + fp32 (or fp64) ``log_softmax`` + ``gather`` run on ``chunk_size`` positions at a time
under non-reentrant activation checkpointing, so the backward recomputes each chunk's logits
instead of storing them. Peak extra memory is one chunk's ``chunk_size x V`` fp32 logits.

The model is called through its own ``forward`` (not ``model.model``), so DDP/FSDP wrappers
see the call; the final hidden state is ``hidden_states[-1]``, which transformers ties to the
post-norm ``last_hidden_state`` of language models.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint


def _unwrap(model):
    """The transformers model inside DDP-style wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _logit_postprocessing(config):
    """Final-logit soft-capping (Gemma 2) and logit scaling (Cohere), applied like the models do."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return softcap, scale


def _chunk_token_logps(lm_head, hidden, targets, softcap, scale):
    logits = lm_head(hidden)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def final_hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """``[B, T, H]`` hidden states that the LM head would receive, with no logits computed.

    The model runs through its own ``forward`` (so FSDP's root hooks unshard the embeddings
    and the final norm) with ``logits_to_keep`` empty, and a forward hook on its decoder
    captures the decoder's ``last_hidden_state`` (post-norm). ``output_hidden_states=True``
    would do it too but keeps every layer's hidden states alive: 4.5 GiB at 3B in a
    no-grad pass.
    """
    inner = _unwrap(model)
    captured = []
    hook = inner.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    no_logits = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    try:
        try:
            model(**inputs, logits_to_keep=no_logits)
        except TypeError as error:
            # remote-code models without `logits_to_keep`: same result, the logits are just wasted
            if "logits_to_keep" not in str(error):
                raise
            model(**inputs)
    finally:
        hook.remove()
    return captured[-1]


# 512 positions × vocabulary: at Qwen2.5's 151,936 words one fp32 chunk is 297 MiB, and the
# chunk's backward holds about three of them. bench/logprob_memory.py measured the peak
# against naive log_softmax + gather at 0.135 (512) vs 0.259 (1024) for 4 × 1024 tokens.
DEFAULT_CHUNK_SIZE = 512


def sequence_logprobs(model, input_ids, attention_mask, response_mask, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``Tensor[B]``: the sum of log p(token | previous tokens) over response tokens, in float32
    (float64 for a float64 model, which exactness tests use).

    ``response_mask[b, t] = 1`` marks token t of row b as a response token; position 0 has no
    prediction and is ignored. Differentiable wrt the model's parameters.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"input_ids, attention_mask and response_mask must have one shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    inner = _unwrap(model)
    lm_head = inner.get_output_embeddings()
    softcap, scale = _logit_postprocessing(inner.config)

    hidden = final_hidden_states(model, input_ids, attention_mask)
    rows, positions = response_mask[:, 1:].bool().nonzero(as_tuple=True)
    selected_hidden = hidden[rows, positions]  # predicts token positions + 1
    targets = input_ids[rows, positions + 1]

    totals = torch.zeros(input_ids.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    recompute = torch.is_grad_enabled()
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        arguments = (lm_head, selected_hidden[chunk], targets[chunk], softcap, scale)
        if recompute:
            token_logps = checkpoint(_chunk_token_logps, *arguments, use_reentrant=False)
        else:
            token_logps = _chunk_token_logps(*arguments)
        totals = totals.index_add(0, rows[chunk], token_logps)
    return totals


def forward_logps(policy, sequences: list, pad_token_id: int, *, bf16: bool = False) -> torch.Tensor:
    """Sequence log-probs of ``sequences`` (``data.EncodedSequence``) in ONE forward, right-padded together.

    ``policy``: a module from ``distributed.prepare_model`` (its forward gives sequence
    log-probs; DDP and FSDP see the call) or a bare Hugging Face model.
    """
    from iris_ref.data import collate
    from iris_ref.distributed import is_prepared, SequenceLogprobModule

    module = policy if is_prepared(policy) else SequenceLogprobModule(policy)
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
    from iris_ref import distributed
    from iris_ref.progress import Progress

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
    local = torch.cat(values).clone() if values else torch.zeros(0)  # clone: a normal tensor, not an inference one
    gathered = distributed.all_gather_1d(local)
    order = torch.tensor([i for r in range(world) for b in batches[r::world] for i in b], dtype=torch.long)
    result = torch.empty_like(gathered)
    result[order] = gathered
    return result
