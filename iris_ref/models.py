"""Loading, saving and identifying models and tokenizers.

- Safe loading: safetensors only, `trust_remote_code` off unless asked for.
- The policy is loaded in fp32 (master weights; bf16 is autocast on CUDA) and wrapped for
  this process's share of the work (`distributed.prepare_model`: plain, DDP or FSDP2).
- A checkpoint is one full Hugging Face folder (`save_pretrained`: safetensors + tokenizer),
  written atomically by rank 0, so vLLM and lm-eval load it as it is. Tied embeddings stay
  tied (one tensor on disk) and the saved config keeps the model's own `use_cache`.
- Models are identified by the SHA-256 of their weights, never by a path (paths are reused).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from iris_ref import distributed, files


class ModelError(ValueError):
    """A model or tokenizer that cannot be used (one-line message)."""


def check_model_source(model: str, trust_remote_code: bool = False) -> None:
    """`ModelError` unless `model` is a local Hugging Face folder or a hub id whose config
    resolves now (only the config is fetched, or found in the offline cache)."""
    import os

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {model} has no config.json (not a Hugging Face model folder)")
        return
    if path.exists():
        raise ModelError(f"model path {model} is a file, not a Hugging Face model folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot resolve the model"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = " HF_HUB_OFFLINE=1 is set, so the hub was not asked (set HF_HUB_OFFLINE=0 to download);" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") else ""
        raise ModelError(f"unknown model {model!r}: no such local folder, and the hub lookup failed;{offline} "
                         f"{reason[:160]}") from None


_SFT_NAME = re.compile(r"(instruct|chat|sft|dpo|rlhf|spin|iris|zephyr|-it\b|_it\b)", re.IGNORECASE)


def looks_like_base_model(model: str) -> bool:
    """A heuristic: no instruct/chat/SFT marker in the name and not a checkpoint of an iris-ref run.

    Self-play starts from an SFT model (SPIN: zephyr-7b-sft-full); a base model such as
    Qwen/Qwen2.5-3B has never been taught to answer in the chat format it is prompted with.
    """
    path = Path(model).expanduser()
    if path.is_dir() and any((parent / ".iris-run").is_file() for parent in path.resolve().parents):
        return False
    return not _SFT_NAME.search(str(model))


def load_tokenizer(model: Optional[str], trust_remote_code: bool = False):
    """The model's tokenizer (the tiny one for the embedded default), with a chat template and a pad token."""
    if model is None:
        from iris_ref import tiny

        tokenizer = tiny.build_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the tokenizer of {model} has no chat template; self-play needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out everywhere
    return tokenizer


def generation_eos_ids(model: Optional[str]) -> list[int]:
    """The eos ids of the model's `generation_config` (often a list: Qwen2.5-Instruct's two,
    Llama 3.1's three), which vLLM stops on by itself; [] when it has none (the embedded model)."""
    if model is None:
        return []
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: nothing beyond the tokenizer's eos
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in (eos or [])]


def load_policy(path, *, device: torch.device, parallel: str = "auto", trust_remote_code: bool = False):
    """A causal LM in fp32 from `path`, on `device`, wrapped by `distributed.prepare_model`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
    return distributed.prepare_model(model.to(device), strategy=parallel)


def new_tiny_policy(tokenizer, *, seed: int, device: torch.device, parallel: str = "auto"):
    """The embedded default's starting model: a tiny Qwen2 initialised on the spot."""
    from iris_ref import tiny

    return distributed.prepare_model(tiny.build_tiny_model(tokenizer, seed=seed).to(device), strategy=parallel)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of weights: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weights_sha256(policy) -> str:
    """The SHA-256 of a (possibly wrapped or sharded) model's full weights, the same on every rank."""
    state = distributed.full_model_state_dict(policy)
    digest = state_dict_sha256(state) if distributed.is_main_process() else None
    return distributed.broadcast_object(digest)


def free_memory() -> None:
    """Return what dead models held (reference cycles included) to the system and to CUDA, so that
    a vLLM engine started next finds the GPU empty."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_finite(policy, what: str) -> None:
    """`ValueError` if any weight is NaN or infinite (checked before a save, so that a bad last
    step never overwrites a good checkpoint)."""
    for name, param in distributed.unwrap_model(policy).named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local).all():
            raise ValueError(f"{what}: non-finite weights ({name}) after the last optimizer step; not saved, the "
                             "previous checkpoint is intact (lower the learning rate)")


def save_checkpoint(policy, path: Path, tokenizer=None) -> None:
    """One full Hugging Face folder at `path`, atomically, with the SHA256SUMS a resume verifies it
    by (call on every rank: FSDP gathers)."""
    state = distributed.full_model_state_dict(policy)
    model = distributed.unwrap_model(policy)
    with files.atomic_directory(path, checksums=True) as tmp:
        if tmp is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' notes about generation defaults
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
