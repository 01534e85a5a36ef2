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
    """``[B, T, H]`` hidden states that the LM head would receive, with no logits computed."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True, "use_cache": False}
    no_logits = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    try:
        outputs = model(**inputs, logits_to_keep=no_logits)
    except TypeError as error:
        # remote-code models without `logits_to_keep`: same result, the logits are just wasted
        if "logits_to_keep" not in str(error):
            raise
        outputs = model(**inputs)
    return outputs.hidden_states[-1]


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
