"""Sequence log-probabilities of response tokens without the full-vocabulary logits of the batch.

A naive ``log_softmax(model(...).logits.float())`` holds ``B x T x V`` fp32 logits (and their
gradient): 4 GB for 8 x 1024 tokens of a 150k vocabulary. Here the model runs with
``logits_to_keep`` set to an empty index (no logits at all) and returns its final hidden
states; only the response positions are selected (the hidden state at t predicts token t+1),
and ``lm_head`` + the architecture's logit post-processing + fp32 (or fp64) ``log_softmax`` +
``gather`` run on ``chunk_size`` positions at a time under non-reentrant activation
checkpointing, so the backward recomputes each chunk's logits instead of storing them. Peak
extra memory is one chunk's ``chunk_size x V`` fp32 logits.

This fast path re-implements the end of the model's forward, so it is taken only for the
architectures in ``VERIFIED_ARCHITECTURES``: transformers' own classes (matched by identity, so
a subclass or a ``trust_remote_code`` class never matches), each with the post-processing its
forward applies after ``lm_head`` (Gemma 2/3 soft-capping, Cohere's ``logit_scale``, Granite's
division by ``logits_scaling``), each checked against the model's own logits by
``tests/test_logprob_architectures.py``. Any other model takes the fallback, correct by
construction: its own forward's ``.logits``, of which only the response rows are kept, then fp32
``log_softmax`` + ``gather`` chunk by chunk (slower, and the model's ``B x T x V`` logits exist
during the forward); a note says so once per class. See docs/architectures.md.

The model is called through its own ``forward`` (not ``model.model``), so DDP/FSDP wrappers
see the call; the final hidden state is the decoder's post-norm ``last_hidden_state``.
``SequenceLogprobModule`` wraps ``sequence_logprobs`` as the module DDP and FSDP2 see; scoring
lists of encoded sequences (one forward, or many across ranks) is ``iris_ref.scoring``'s.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint


def _unwrap(model):
    """The transformers model inside DDP-style wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _unchanged(logits, model):
    return logits


def _final_logit_softcapping(logits, model):
    """Gemma 2/3: tanh soft-capping when the config sets a cap, with the model's own operations."""
    cap = model.config.final_logit_softcapping
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _times_logit_scale(logits, model):
    """Cohere: ``logits * self.logit_scale``, the config's value as copied when the model was built."""
    return logits * model.logit_scale


def _over_logits_scaling(logits, model):
    """Granite: DIVIDES the logits by ``config.logits_scaling`` (a muP output multiplier's inverse)."""
    return logits / model.config.logits_scaling


# transformers causal-LM class name -> what its forward does to lm_head's output. Only classes whose
# forward is `lm_head(decoder output)` then this, each one verified (float64, 1e-10) by
# tests/test_logprob_architectures.py; adding one means adding its case there.
VERIFIED_ARCHITECTURES: dict[str, Callable] = {
    **dict.fromkeys([
        "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
        "LlamaForCausalLM", "MistralForCausalLM", "MinistralForCausalLM", "MixtralForCausalLM",
        "GemmaForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "OlmoForCausalLM",
        "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM", "SmolLM3ForCausalLM",
        "StableLmForCausalLM", "Starcoder2ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM",
        "FalconForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM", "Exaone4ForCausalLM",
        "HeliumForCausalLM", "NemotronForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM",
        "SeedOssForCausalLM", "DeepseekV3ForCausalLM",
    ], _unchanged),
    **dict.fromkeys(["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "VaultGemmaForCausalLM"],
                    _final_logit_softcapping),
    **dict.fromkeys(["CohereForCausalLM", "Cohere2ForCausalLM"], _times_logit_scale),
    **dict.fromkeys(["GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"],
                    _over_logits_scaling),
}


def _model_class(model) -> type:
    # FSDP2's fully_shard re-classes a module as `FSDP<Name>(FSDPModule, <Name>)`, made in torch
    return next(cls for cls in type(model).__mro__ if not cls.__module__.startswith("torch."))


def verified_postprocessing(model) -> Optional[Callable]:
    """``postprocess(logits, model)`` for a verified architecture (see ``VERIFIED_ARCHITECTURES``),
    None for any other model, which then takes the fallback."""
    cls = _model_class(_unwrap(model))
    postprocess = VERIFIED_ARCHITECTURES.get(cls.__name__)
    if postprocess is None:
        return None
    import transformers

    # identity, not name: a subclass or remote code may change the forward under the same name
    return postprocess if getattr(transformers, cls.__name__, None) is cls else None


_noted_classes: set = set()


def _note_fallback(cls: type) -> None:
    if cls not in _noted_classes:
        _noted_classes.add(cls)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"[iris] log-probs: {cls.__name__} is not in the verified list; using the model's own "
                  f"logits (slower, more memory)", flush=True)


def _token_logps(logits, targets):
    logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _chunk_token_logps(lm_head, hidden, targets, postprocess=None, model=None):
    logits = lm_head(hidden)
    if postprocess is not None:
        logits = postprocess(logits, model)
    return _token_logps(logits, targets)


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
    prediction and is ignored. Differentiable wrt the model's parameters. A model outside
    ``VERIFIED_ARCHITECTURES`` is scored from its own logits (see the module's docstring).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"input_ids, attention_mask and response_mask must have one shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}"
        )
    inner = _unwrap(model)
    rows, positions = response_mask[:, 1:].bool().nonzero(as_tuple=True)
    targets = input_ids[rows, positions + 1]  # position t predicts token t + 1
    postprocess = verified_postprocessing(inner)
    if postprocess is not None:
        selected = final_hidden_states(model, input_ids, attention_mask)[rows, positions]
        token_logps = functools.partial(_chunk_token_logps, inner.get_output_embeddings(),
                                        postprocess=postprocess, model=inner)
    else:
        _note_fallback(_model_class(inner))
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        # the index's backward keeps no reference to the full logits, so they go with `output`
        selected = (output[0] if isinstance(output, tuple) else output.logits)[rows, positions]
        del output
        token_logps = _token_logps

    totals = torch.zeros(input_ids.shape[0], dtype=torch.promote_types(selected.dtype, torch.float32), device=selected.device)
    recompute = torch.is_grad_enabled()
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        if recompute:
            values = checkpoint(token_logps, selected[chunk], targets[chunk], use_reentrant=False)
        else:
            values = token_logps(selected[chunk], targets[chunk])
        totals = totals.index_add(0, rows[chunk], values)
    return totals


class SequenceLogprobModule(torch.nn.Module):
    """The policy's sequence log-probs as one forward: the unit the trainer calls.

    ``sequence_logprobs`` runs the decoder and then the LM head chunk by chunk (or, for an
    unverified architecture, takes the model's own logits). DDP wraps this whole computation
    (rather than the Hugging Face model's own ``forward``), so its forward/backward bookkeeping
    covers every parameter it touches. Under FSDP2 this module stays plain and the Hugging Face
    model inside is the FSDP root (``distributed.prepare_model``).
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.policy = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, response_mask):
        return sequence_logprobs(self.policy, input_ids, attention_mask, response_mask, chunk_size=self.chunk_size)
