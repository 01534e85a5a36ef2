"""Synthetic responses from the opponent: one function, ``generate``, two backends.

``generate(model_or_path, chat, prompts, *, num_responses=1, max_new_tokens, ...)``
returns, for every prompt in order, its ``num_responses`` :class:`Generation` objects, on
every rank. A ``Generation`` holds

* ``token_ids``: the new tokens exactly as sampled, INCLUDING the stop token the model emitted
  when it stopped (``<|im_end|>`` for a chat model, ``<|endoftext|>`` for a base model that
  stops on its eos): the ids that are scored, never decoded text re-tokenised;
* ``text``: those tokens decoded with special tokens skipped (the final stop token is never
  part of the text);
* ``finished``: True when the response ended with a stop token, False when it was cut at its
  budget (or at vLLM's ``max_model_len``), so that no end of turn the model never produced is
  appended to it.

``max_new_tokens`` is one budget for every prompt or a list of one per prompt (a run gives
each prompt ``data.response_budget``: ``max_length - |prompt|``, the budget its annotated
response is cut to). A budget >= 1 always gives at least one token: a response can be empty
of text (its first token was the stop token, or only special tokens / partial UTF-8 bytes were
sampled) but never empty of tokens.

``chat`` is the run's ``chat.ChatFormat`` (a bare tokenizer is accepted and gets its default
format). Both backends feed the model exactly ``chat.prompt_ids(prompt)`` and stop at exactly
``chat.stop_ids``: the special tokens of the template's end of turn, the tokenizer's eos and the
model's ``generation_config`` eos ids (vLLM adds the latter by itself; here they are in the set
for both). Only the arguments given here shape sampling: temperature, top_p (top-k off, no
repetition penalty), ``temperature=0`` is greedy. ``trust_remote_code`` reaches every load.

transformers (``backend="hf"``)
-------------------------------
* One global plan: the prompt x response requests sorted by prompt length (longest first, ties
  by prompt index then response index), cut into batches of ``batch_size`` sequences (less
  padding than prompts in data order). Each batch is left-padded by hand (the caller's
  tokenizer is never touched), decoded with the KV cache up to the largest budget of its rows,
  and stops as soon as every row has stopped (``model.generate`` does this). A row is then cut
  at its own budget: sampling is sequential, so that is the response it would have had with
  its own limit (length-sorted batches keep the difference small).
* Batch ``b`` is sampled after seeding the CPU generator (and the model's CUDA device) with an
  integer derived from ``(seed, b)`` only, inside ``torch.random.fork_rng``: the caller's RNG
  state is left as it was, and a batch's result does not depend on which batches ran before it.
* Under ``torch.distributed`` rank ``r`` runs batches ``r, r + world, ...`` and the results are
  all-gathered (``distributed.all_gather_objects``), so one process and N processes return the
  same generations (tested on CPU: 1 process == 2 gloo processes). Every rank must call
  ``generate`` with the same prompts and arguments (checked): it is a collective.
* ``synced_gpus=True`` (automatic for an FSDP-sharded model, whose every forward is collective):
  every rank runs the same number of batches (ranks with fewer repeat a dummy batch whose
  results are discarded) and ``model.generate`` keeps all ranks stepping until all are done.
* A loaded model is used on its own device in its own dtype (``device`` is ignored); a path is
  loaded on ``device`` in bf16 on CUDA, fp32 on CPU, and freed afterwards. The model's own
  ``generation_config`` (a hub model's top-k, repetition penalty) is set aside for the call.
  Progress is reported through ``iris_ref.progress.Progress`` (unit: prompts).

vLLM (``backend="vllm"``)
-------------------------
* A fresh ``vllm.LLM(model=path, tokenizer=path, seed=..., dtype="bfloat16",
  gpu_memory_utilization=..., max_model_len=..., trust_remote_code=...)`` on the saved
  checkpoint (so the opponent is exactly what was saved), one request per prompt with
  ``SamplingParams(n=num_responses, temperature, top_p, max_tokens=<the prompt's budget>,
  stop_token_ids=stops)``, the prompt passed as
  ``{"prompt_token_ids": ...}``; the engine is torn down afterwards so that the trainer gets the
  GPU memory back. The engine is seeded once; per-request seeds (``per_request_seed=True``:
  ``seed + prompt index x num_responses``, and vLLM adds the response index) make vLLM's V1
  sampler treat requests one by one, so they are off by default.
* ``CompletionOutput.token_ids`` ends with the stop token the engine hit, for a token of
  ``stop_token_ids`` and for the model's eos alike: vLLM's V1 detokenizer leaves a
  stop-terminated request's last token out of the *text* but appends it to ``token_ids``
  (``BaseIncrementalDetokenizer.update``), and the scheduler keeps the stopping token
  (``_update_request_with_output`` trims only what comes after it). Nothing is appended here.
  ``finished`` is ``finish_reason == "stop"``, or the last id is a stop token: some vLLM
  versions test the length limit before the stop tokens (``check_stop``), so a stop token
  sampled as the ``max_tokens``-th token is reported as "length" although the response is
  complete. ``text`` is decoded here from the ids, as for transformers.
* The engine runs on the GPU of ``device`` (``--device cuda:N`` in one process, the rank's
  device under torchrun): vLLM puts a one-GPU engine on the first visible device, so
  ``CUDA_VISIBLE_DEVICES`` is narrowed to that one while the engine process starts.
* Under ``torchrun`` each rank runs its own engine on its GPU on its contiguous share of
  the prompts, seeded ``seed + rank``; the results are gathered in prompt order. vLLM's results
  are neither batch-invariant nor independent of the rank layout: the same seed on a different
  number of GPUs gives different (equally distributed) samples.
* ``vllm_available()`` imports vLLM (a broken install is found here, not later);
  ``backend="auto"`` uses vLLM only with a checkpoint path, CUDA and a working vLLM, and falls
  back to transformers with a one-line warning, before any model is loaded, when vLLM is
  installed but does not import. ``backend="vllm"`` without them is a clear ValueError.
* Not run here (no GPU): the tests drive this path through a stand-in module with vLLM's API;
  the torchrun device narrowing in particular has not run on a multi-GPU machine yet.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import math
import os
import sys
from array import array
from dataclasses import dataclass
from typing import Sequence

import torch

from iris_ref import distributed
from iris_ref.chat import as_chat_format
from iris_ref.progress import Progress

BACKENDS = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class Generation:
    """One sampled response: its token ids (stop token included), its text, whether it stopped."""

    token_ids: list[int]
    text: str
    finished: bool


# ---------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def vllm_available() -> tuple[bool, str]:
    """(True, "vllm <version>") when ``import vllm`` works; else (False, why, in one line).

    vLLM is imported for real (``find_spec`` would call a broken install usable). Cached: the
    import is slow, and a failed import is not retried.
    """
    try:
        import vllm
    except ModuleNotFoundError as error:
        if error.name == "vllm":
            return False, "vllm is not installed"
        return False, _one_line(error)
    except Exception as error:  # a broken install fails in many ways (ImportError, OSError, RuntimeError...)
        return False, _one_line(error)
    return True, f"vllm {getattr(vllm, '__version__', '(unknown version)')}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"import vllm failed: {type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def choose_backend(backend: str, *, has_path: bool, vllm_ok: bool, vllm_reason: str = "",
                   cuda_available: bool) -> str:
    """The backend ``generate`` uses ("hf" or "vllm"); ValueError if the request cannot be met."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "hf":
        return "hf"
    if backend == "vllm":
        if not has_path:
            raise ValueError("generation backend 'vllm' loads a saved checkpoint: pass its path, not a model object")
        if not cuda_available:
            raise ValueError("generation backend 'vllm' needs a CUDA GPU; none is available (use 'hf' or 'auto')")
        if not vllm_ok:
            raise ValueError(f"generation backend 'vllm' needs a working vllm package ({vllm_reason or 'unavailable'}); "
                             "use 'hf' or 'auto'")
        return "vllm"
    return "vllm" if (has_path and cuda_available and vllm_ok) else "hf"


def _resolve_backend(backend: str, has_path: bool) -> str:
    """choose_backend with the facts of this machine; vLLM is imported only when it could be used."""
    if backend not in BACKENDS:
        choose_backend(backend, has_path=has_path, vllm_ok=False, cuda_available=False)  # raises
    cuda = torch.cuda.is_available()
    if backend == "hf" or not has_path or not cuda:  # vLLM is out of the question: no import
        return choose_backend(backend, has_path=has_path, vllm_ok=False, cuda_available=cuda)
    ok, reason = vllm_available()
    chosen = choose_backend(backend, has_path=has_path, vllm_ok=ok, vllm_reason=reason, cuda_available=cuda)
    if backend == "auto" and chosen == "hf" and reason != "vllm is not installed" and distributed.is_main_process():
        print(f"[iris] warning: vLLM is unusable ({reason}); generating with transformers", file=sys.stderr,
              flush=True)
    return chosen


def _check_arguments(num_responses, budgets, temperature, top_p, batch_size, gpu_memory_utilization,
                     max_model_len) -> None:
    if num_responses < 1:
        raise ValueError(f"num_responses must be >= 1, got {num_responses}")
    if budgets and min(budgets) < 1:
        raise ValueError(f"max_new_tokens must be positive, got {min(budgets)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_model_len is not None and max_model_len < 1:
        raise ValueError(f"max_model_len must be positive or None, got {max_model_len}")


# ---------------------------------------------------------------------------------------
# the one public function
# ---------------------------------------------------------------------------------------


def generate(
    model_or_path,
    chat,
    prompts: list[list[dict]],
    *,
    num_responses: int = 1,
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    backend: str = "auto",
    device: str = "cpu",
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    per_request_seed: bool = False,
    synced_gpus: bool = False,
    trust_remote_code: bool = False,
    desc: str = "generation",
) -> list[list[Generation]]:
    """``num_responses`` sampled responses to each prompt (a list of chat turns), in the prompts'
    order, on every rank (see the module docstring).

    ``model_or_path``: a loaded causal LM (transformers only; used where it is) or a saved
    checkpoint's path. ``chat``: the run's ``chat.ChatFormat`` (or a tokenizer).
    ``max_new_tokens``: one budget, or one per prompt. ``batch_size``: sequences per transformers
    batch. ``gpu_memory_utilization`` and ``max_model_len`` (None: vLLM's default, the model's own
    maximum) are vLLM's: its share of the GPU's total memory and its context limit.
    ``per_request_seed``: vLLM only. ``synced_gpus``: transformers under torch.distributed with a
    sharded model. ``device``: where a path is loaded (transformers) or the engine runs (vLLM).
    """
    chat = as_chat_format(chat)
    budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(b) for b in max_new_tokens]
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens: {len(budgets)} budgets for {len(prompts)} prompts")
    _check_arguments(num_responses, budgets, temperature, top_p, batch_size, gpu_memory_utilization, max_model_len)
    has_path = isinstance(model_or_path, (str, os.PathLike))
    chosen = _resolve_backend(backend, has_path)
    ids = [chat.prompt_ids(prompt) for prompt in prompts]
    stops = chat.stop_ids
    _check_same_prompts_on_every_rank(ids)
    if not ids:
        return []
    if chosen == "vllm":
        sampled = _generate_vllm(str(model_or_path), ids, stops, num_responses=num_responses, budgets=budgets,
                                 temperature=temperature, top_p=top_p, seed=seed, device=device,
                                 gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                 per_request_seed=per_request_seed, trust_remote_code=trust_remote_code, desc=desc)
    else:
        with _loaded(model_or_path, has_path, device, trust_remote_code) as model:
            sampled = _generate_hf(model, ids, stops, pad_token_id=_pad_id(chat.tokenizer, stops),
                                   num_responses=num_responses, budgets=budgets,
                                   temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                   synced_gpus=synced_gpus, desc=desc)
    return [[_as_generation(chat.tokenizer, token_ids, stops, stopped) for token_ids, stopped in responses]
            for responses in sampled]


def _as_generation(tokenizer, token_ids: list[int], stops: list[int], stopped: bool) -> Generation:
    finished = bool(stopped) or bool(token_ids and token_ids[-1] in stops)
    shown = token_ids[:-1] if finished and token_ids else token_ids
    return Generation(token_ids=list(token_ids), text=tokenizer.decode(shown, skip_special_tokens=True),
                      finished=finished)


def _pad_id(tokenizer, stops: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]


def _check_same_prompts_on_every_rank(ids: list[list[int]]) -> None:
    """generate is a collective: every rank must ask for the same prompts (else results mix)."""
    if not distributed.is_distributed():
        return
    digest = hashlib.sha256()
    for row in ids:
        digest.update(len(row).to_bytes(8, "little"))
        digest.update(array("q", row).tobytes())
    digests = distributed.all_gather_objects([digest.hexdigest()])
    if len(set(digests)) != 1:
        raise ValueError("generate was called with different prompts on different ranks; every rank must pass the "
                         "same prompts (each gets its share of the work and all get every result)")


@contextlib.contextmanager
def _loaded(model_or_path, has_path: bool, device: str, trust_remote_code: bool = False):
    """The model to generate with: the given one, or the checkpoint loaded (and freed afterwards)."""
    if not has_path:
        yield model_or_path
        return
    from transformers import AutoModelForCausalLM

    on_cuda = str(device).startswith("cuda")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_or_path), dtype=torch.bfloat16 if on_cuda else torch.float32,
        trust_remote_code=trust_remote_code).to(device)
    try:
        yield model
    finally:
        del model
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------


def plan_batches(prompt_lengths: list[int], num_responses: int, batch_size: int, budgets: list[int] | None = None,
                 position_limit: int | None = None) -> list[list[tuple[int, int]]]:
    """The global plan: (prompt index, response index) requests, longest prompt first (ties by
    prompt index, then response index), in batches of ``batch_size`` sequences.

    With ``position_limit`` (the model's position range) a batch also ends before a request
    whose budget would take the batch past it: left-padded rows share positions, so the batch
    reaches its longest prompt plus its largest budget (a model with learned positions, GPT-2's,
    fails past its range)."""
    requests = sorted(((p, k) for p in range(len(prompt_lengths)) for k in range(num_responses)),
                      key=lambda request: (-prompt_lengths[request[0]], request[0], request[1]))
    batches: list[list[tuple[int, int]]] = []
    for request in requests:
        batch = batches[-1] if batches else None
        fits = batch is not None and len(batch) < batch_size and (
            position_limit is None or budgets is None
            or prompt_lengths[batch[0][0]] + max(budgets[p] for p, _ in [*batch, request]) <= position_limit)
        if fits:
            batch.append(request)
        else:
            batches.append([request])
    return batches


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``: a function of (seed, batch index) only."""
    digest = hashlib.sha256(f"iris-generation:{int(seed)}:{int(batch_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _left_padded(batch_ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _until_stop(new_ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The new tokens up to and including the first stop token, and whether there was one
    (what follows it is generate's padding)."""
    for position, token in enumerate(new_ids):
        if token in stops:
            return new_ids[:position + 1], True
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


def _generation_config(max_new_tokens, temperature, top_p, stops, pad_token_id):
    from transformers import GenerationConfig

    sampling = temperature > 0
    return GenerationConfig(
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stops),
        pad_token_id=pad_token_id,
        bos_token_id=None,
        use_cache=True,
    )


def _run_batch(model, generation_config, rows: list[list[int]], budgets: list[int], pad_token_id: int,
               stops: set[int], seed: int, synced: bool) -> list[tuple[list[int], bool]]:
    """One batch, sampled from its own seed up to its largest budget: (new token ids up to and
    including the stop, stopped), each row cut at its own budget."""
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    input_ids, attention_mask = _left_padded(rows, pad_token_id, device)
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if on_cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(budgets),
                                generation_config=generation_config, synced_gpus=synced,
                                stopping_criteria=_budgets_reached(budgets, input_ids.shape[1]))
    return [_until_stop(row[:budget], stops) for row, budget in zip(output[:, input_ids.shape[1]:].tolist(), budgets)]


def _budgets_reached(budgets: list[int], width: int):
    """A row is done once it has its budget of new tokens: the batch stops as soon as every row
    has stopped or reached its own budget, not at the largest budget."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class BudgetReached(StoppingCriteria):
        def __init__(self):
            self.limits = torch.tensor(budgets) + width

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] >= self.limits.to(input_ids.device)

    return StoppingCriteriaList([BudgetReached()])


def _position_limit(model) -> int | None:
    """The model's position range (learned positions fail past it), if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _run_plan(model, plan, order: list[int | None], prompt_token_ids, budgets, *, pad_token_id, stops,
              generation_config, seed, synced, on_batch=None) -> dict[int, list[tuple[list[int], bool]]]:
    """Run the batches ``order`` names (None: a dummy batch, results dropped); results by batch index."""
    results: dict[int, list[tuple[list[int], bool]]] = {}
    stop_set = set(stops)
    for index in order:
        run_index = len(plan) - 1 if index is None else index  # the dummy is the smallest batch
        rows = [prompt_token_ids[p] for p, _ in plan[run_index]]
        row_budgets = [budgets[p] for p, _ in plan[run_index]]
        out = _run_batch(model, generation_config, rows, row_budgets, pad_token_id, stop_set,
                         batch_seed(seed, run_index), synced)
        if index is not None:
            results[index] = out
            if on_batch is not None:
                on_batch(index)
    return results


def _generate_hf(model, prompt_token_ids, stops, *, pad_token_id, num_responses, budgets, temperature, top_p,
                 seed, batch_size, synced_gpus, desc) -> list[list[tuple[list[int], bool]]]:
    plan = plan_batches([len(ids) for ids in prompt_token_ids], num_responses, batch_size, budgets,
                        _position_limit(model))
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine: list[int | None] = list(range(rank, len(plan), world))
    synced = world > 1 and (synced_gpus or _is_sharded(model))
    if synced:  # the same number of generate calls on every rank: pad with dummies
        mine += [None] * (math.ceil(len(plan) / world) - len(mine))
    generation_config = _generation_config(max(budgets), temperature, top_p, stops, pad_token_id)

    # Progress: only rank 0 reports; while it runs its j-th batch the others run theirs, so
    # batches 0 .. index + world - 1 are (about) done when its batch `index` is.
    sizes = [len(batch) for batch in plan]
    with Progress(len(prompt_token_ids), desc, unit="prompts") as progress:
        def on_batch(index: int) -> None:
            done = sum(sizes[:min(len(plan), index + world)]) // num_responses
            progress.update(max(0, done - progress.done))

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _only_these_generation_settings(model, generation_config):
                local = _run_plan(model, plan, mine, prompt_token_ids, budgets, pad_token_id=pad_token_id, stops=stops,
                                  generation_config=generation_config, seed=seed, synced=synced, on_batch=on_batch)
        finally:
            model.train(was_training)
        gathered = dict(distributed.all_gather_objects(sorted(local.items())))
        progress.update(len(prompt_token_ids) - progress.done)

    responses: list[list] = [[None] * num_responses for _ in prompt_token_ids]
    for index, batch in enumerate(plan):
        for (p, k), out in zip(batch, gathered[index]):
            responses[p][k] = out
    return responses


# ---------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _engine_on(device):
    """Let the engine process (started while this is active) see only the GPU of ``device``
    (``cuda:N``: the one the user named, or this rank's under torchrun); vLLM puts a one-GPU
    engine on the first visible device. A device without an index changes nothing."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        yield
        return
    index = device.index if device.index is not None else (torch.cuda.current_device()
                                                           if distributed.is_distributed() else None)
    if index is None:
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in saved.split(",")] if saved else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index]
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _generate_vllm(path, prompt_token_ids, stops, *, num_responses, budgets, temperature, top_p, seed, device,
                   gpu_memory_utilization, max_model_len, per_request_seed, trust_remote_code,
                   desc) -> list[list[tuple[list[int], bool]]]:
    share = distributed.shard_range(len(prompt_token_ids))
    local: list[list[tuple[list[int], bool]]] = []
    with Progress(len(prompt_token_ids), desc, unit="prompts") as progress:
        if len(share):
            local = _vllm_engine_run(path, [prompt_token_ids[i] for i in share], list(share), stops,
                                     num_responses=num_responses, budgets=[budgets[i] for i in share],
                                     temperature=temperature, top_p=top_p, seed=seed + distributed.get_rank(),
                                     request_seed=seed if per_request_seed else None, device=device,
                                     gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                     trust_remote_code=trust_remote_code)
        gathered = distributed.all_gather_objects(local)
        progress.update(len(prompt_token_ids))
    return gathered


def _vllm_engine_run(path, prompt_token_ids, prompt_indices, stops, *, num_responses, budgets, temperature,
                     top_p, seed, request_seed, device, gpu_memory_utilization, max_model_len, trust_remote_code):
    from vllm import LLM, SamplingParams

    # vLLM sets up torch.distributed for its workers; it is ours to tear down only if it
    # was not there before (under torchrun the trainer owns the process group).
    distributed_was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    with _engine_on(device):
        llm = LLM(model=path, tokenizer=path, seed=seed, dtype="bfloat16", trust_remote_code=trust_remote_code,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
    try:
        def params(position: int):
            # vLLM seeds response j of a request seed + j: prompt i's are seed + i * K + j, all distinct.
            index = prompt_indices[position]
            extra = {} if request_seed is None else {"seed": request_seed + index * num_responses}
            return SamplingParams(n=num_responses, temperature=temperature, top_p=top_p, max_tokens=budgets[position],
                                  stop_token_ids=list(stops), skip_special_tokens=True, **extra)

        # One object per distinct budget (and per request only with per-request seeds).
        made: dict[tuple, object] = {}
        sampling = []
        for position, budget in enumerate(budgets):
            key = (budget, position if request_seed is not None else None)
            if key not in made:
                made[key] = params(position)
            sampling.append(made[key])
        if len(made) == 1:
            sampling = sampling[0]  # one object for all: nothing differs between requests
        show_bar = distributed.is_main_process() and sys.stderr.isatty()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids], sampling, use_tqdm=show_bar)
        stop_set = set(stops)
        results = []
        for output in outputs:
            completions = sorted(output.outputs, key=lambda c: getattr(c, "index", 0))
            results.append([
                (list(c.token_ids), c.finish_reason == "stop" or bool(c.token_ids and c.token_ids[-1] in stop_set))
                for c in completions])
        return results
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
