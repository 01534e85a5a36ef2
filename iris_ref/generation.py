"""Synthetic responses from the opponent: a transformers backend and a vLLM backend.

Both backends feed the model exactly ``data.prompt_ids(tokenizer, prompt)``: the one chat
template, as token ids (never re-tokenised text), so generation and training see the same
prompt tokens. Both stop at the template's end-of-turn token or the eos
(``data.stop_token_ids``) and return only the new text, special tokens removed.

* ``hf``: batches of ``batch_size`` prompts, left-padded by hand (the caller's tokenizer is
  never touched), KV cache, sampling seeded through ``torch.manual_seed`` inside a forked RNG
  (the caller's RNG state is left as it was). Only the arguments given here shape sampling:
  the model's own ``generation_config`` (e.g. Qwen's repetition penalty and top-k) is set
  aside for the call, so temperature 1 and top_p 1 really sample from the model.
  ``temperature=0`` means greedy decoding.
* ``vllm``: a fresh ``vllm.LLM`` engine on the saved checkpoint path (so the opponent is
  exactly what was saved), prompts passed as ``{"prompt_token_ids": ...}``, one seeded
  ``SamplingParams`` per prompt (seed + index: reproducible whatever vLLM's scheduling),
  and the engine torn down afterwards so the trainer gets the GPU memory back.
* ``auto``: vLLM when it imports, CUDA is present and a checkpoint path is given; else hf.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
from pathlib import Path

import torch

from iris_ref.data import prompt_ids, stop_token_ids

BACKENDS = ("auto", "hf", "vllm")


def vllm_is_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(backend: str, *, has_path: bool, vllm_importable: bool, cuda_available: bool) -> str:
    """The backend ``generate_responses`` uses; ValueError if the request cannot be met."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "hf":
        return "hf"
    if backend == "vllm":
        if not vllm_importable:
            raise ValueError("generation backend 'vllm' needs the vllm package (pip install vllm); use 'hf' or 'auto'")
        if not cuda_available:
            raise ValueError("generation backend 'vllm' needs a CUDA GPU; none is available (use 'hf' or 'auto')")
        if not has_path:
            raise ValueError("generation backend 'vllm' loads a saved checkpoint: pass its path, not a model object")
        return "vllm"
    return "vllm" if (vllm_importable and cuda_available and has_path) else "hf"


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def generate_responses(
    model_or_path,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    backend: str = "auto",
    device: str = "cpu",
    gpu_memory_utilization: float = 0.9,
    synced_gpus: bool = False,
    return_finished: bool = False,
):
    """One sampled response per prompt (a list of chat turns), in the prompts' order.

    ``model_or_path``: a loaded causal LM (hf backend; used on its own device, and ``device``
    is ignored) or the path of a saved checkpoint (loaded on ``device`` for hf). Results are
    deterministic for a given seed, batch size and backend. ``gpu_memory_utilization`` is
    vLLM's share of the GPU: the training model should be off the GPU while vLLM runs.
    ``synced_gpus`` (hf backend) keeps every rank stepping until all ranks are done, which a
    sharded (FSDP) model needs because each of its forwards is collective.
    With ``return_finished`` the result is ``(texts, finished)``: ``finished[i]`` is False
    when response i was cut at ``max_new_tokens`` before its end-of-turn token, so that the
    caller does not append an end of turn the model never produced.
    """
    _check_sampling(max_new_tokens, temperature, top_p, batch_size)
    has_path = isinstance(model_or_path, (str, Path))
    chosen = choose_backend(
        backend, has_path=has_path, vllm_importable=vllm_is_importable(), cuda_available=torch.cuda.is_available()
    )
    token_ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    if not prompts:
        texts, finished = [], []
    elif chosen == "vllm":
        texts, finished = _generate_vllm(
            str(model_or_path), tokenizer, token_ids, max_new_tokens, temperature, top_p, seed, gpu_memory_utilization
        )
    else:
        if has_path:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_or_path)).to(device)
        else:
            model = model_or_path
        texts, finished = _generate_hf(
            model, tokenizer, token_ids, max_new_tokens, temperature, top_p, seed, batch_size, synced_gpus
        )
    return (texts, finished) if return_finished else texts


# ---------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------


def _left_padded(batch_ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_stop(new_ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The new tokens before the first stop token, and whether there was one."""
    for position, token in enumerate(new_ids):
        if token in stops:
            return new_ids[:position], True
    return new_ids, False


@contextlib.contextmanager
def _only_these_generation_settings(model, generation_config):
    """Set the model's own generation defaults aside for the call (transformers fills every
    unset sampling option from ``model.generation_config``)."""
    saved = model.generation_config
    model.generation_config = generation_config
    try:
        yield
    finally:
        model.generation_config = saved


def _generate_hf(
    model, tokenizer, token_ids, max_new_tokens, temperature, top_p, seed, batch_size, synced_gpus=False
) -> tuple[list[str], list[bool]]:
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = temperature > 0
    generation_config = GenerationConfig(
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        use_cache=True,
    )
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    responses: list[str] = []
    finished: list[bool] = []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            with _only_these_generation_settings(model, generation_config):
                for start in range(0, len(token_ids), batch_size):
                    batch = token_ids[start : start + batch_size]
                    input_ids, attention_mask = _left_padded(batch, pad_token_id, device)
                    output = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                        synced_gpus=synced_gpus,
                    )
                    for row in output[:, input_ids.shape[1] :].tolist():
                        new_ids, stopped = _cut_at_stop(row, set(stops))
                        responses.append(tokenizer.decode(new_ids, skip_special_tokens=True))
                        finished.append(stopped)
    finally:
        model.train(was_training)
    return responses, finished


# ---------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------


def _generate_vllm(
    path, tokenizer, token_ids, max_new_tokens, temperature, top_p, seed, gpu_memory_utilization
) -> tuple[list[str], list[bool]]:
    from vllm import LLM, SamplingParams

    # vLLM sets up torch.distributed for its workers; it is ours to tear down only if it
    # was not there before (under torchrun the trainer owns the process group).
    distributed_was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    stops = stop_token_ids(tokenizer)
    llm = LLM(model=path, tokenizer=path, seed=seed, dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization)
    try:
        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=seed + index,
                stop_token_ids=stops,
                skip_special_tokens=True,
            )
            for index in range(len(token_ids))
        ]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=False)
        completions = [output.outputs[0] for output in outputs]
        return [c.text for c in completions], [c.finish_reason == "stop" for c in completions]
    finally:
        _shutdown_vllm(llm, distributed_was_initialised)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _shutdown_vllm(llm, distributed_was_initialised: bool) -> None:
    """Free the engine's GPU memory with whatever teardown this vLLM version offers."""
    engine = getattr(llm, "llm_engine", None)
    engine_core = getattr(engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        with contextlib.suppress(Exception):
            engine_core.shutdown()
    if distributed_was_initialised:
        return
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        return
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
