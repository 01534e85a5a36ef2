"""Dataset loading and validation, the one chat template, tokenisation with prompt masking.

Choices:

* Data comes through ``datasets.load_dataset``: a hub name (with its ``split``) or a local
  ``.json``/``.jsonl``/``.parquet`` file (chosen by extension; the file becomes the requested
  split). Rows need a ``messages`` column: a list of ``{"role", "content"}`` turns.
* The prompt is every turn before the LAST assistant turn and the annotated response is that
  turn. With ``first_turn=True`` (SPIN's UltraChat setting) the prompt is the first user turn
  (plus a leading system turn, if any) and the response is the assistant turn right after it.
* Invalid rows are skipped and counted by reason (only the turns that are used are checked);
  an error is raised if nothing valid is left.
* One chat template for generation and training: ``prompt_ids`` is
  ``apply_chat_template(prompt, add_generation_prompt=True)``, and a training sequence is
  exactly those ids followed by the response ids and the template's end-of-turn token(s).
  The end-of-turn is read off the template itself (``<|im_end|>`` for Qwen, ``<|eot_id|>``
  for Llama 3), not assumed to be ``tokenizer.eos_token`` (a base Qwen2.5's eos is
  ``<|endoftext|>`` while its template ends turns with ``<|im_end|>``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

KNOWN_ROLES = ("system", "user", "assistant")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Example:
    prompt_messages: list[dict]
    response: str


@dataclass
class SkipCounts:
    """Rows skipped, by reason. ``too_long`` is filled in by callers of ``encode_pair``."""

    not_a_list: int = 0
    no_user_turn: int = 0
    no_assistant_turn: int = 0
    empty_content: int = 0
    unknown_role: int = 0
    too_long: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)]
        return ", ".join(parts) if parts else "none"


@dataclass
class EncodedSequence:
    input_ids: list[int]
    prompt_length: int


# ---------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own error and progress bars before raising; our message suffices."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_enabled:
            datasets.enable_progress_bars()


def _first_line(error: BaseException) -> str:
    """One line for an exception, with its innermost cause (datasets wraps parser errors in a
    generic DatasetGenerationError whose cause says what is wrong)."""

    def describe(exc: BaseException) -> str:
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

    innermost = error
    while innermost.__cause__ is not None and innermost.__cause__ is not innermost:
        innermost = innermost.__cause__
    if innermost is error:
        return describe(error)
    return f"{describe(error)} ({describe(innermost)})"


def _load_rows(source: str, split: str):
    """The ``datasets.Dataset`` behind ``source``; ValueError with one line on failure."""
    import datasets

    path = Path(source).expanduser()
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is not None:
        if not path.is_file():
            raise ValueError(f"dataset file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"dataset file is empty: {path}")
        try:
            with _quiet_datasets():
                return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        except Exception as error:  # datasets wraps parser errors in several exception types
            raise ValueError(f"cannot read dataset file {path}: {_first_line(error)}") from None
    if path.suffix and path.exists():
        raise ValueError(f"unsupported dataset file type {path.suffix!r} (use .json, .jsonl or .parquet): {path}")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(str(source), split=split)
    except Exception as error:
        raise ValueError(f"cannot load dataset {source!r} (split {split!r}): {_first_line(error)}") from None


def _is_turn(turn) -> bool:
    return isinstance(turn, dict) and "role" in turn and "content" in turn


def _has_content(turn: dict) -> bool:
    return isinstance(turn["content"], str) and turn["content"].strip() != ""


def select_turns(messages, first_turn: bool) -> tuple[Example | None, str | None]:
    """Split one conversation into (prompt turns, response), or name why it is skipped."""
    if not isinstance(messages, list) or not messages or not all(_is_turn(t) for t in messages):
        return None, "not_a_list"
    roles = [turn["role"] for turn in messages]
    if first_turn:
        if "user" not in roles:
            return None, "no_user_turn"
        user_index = roles.index("user")
        if user_index + 1 >= len(messages) or roles[user_index + 1] != "assistant":
            return None, "no_assistant_turn"
        prompt = ([messages[0]] if roles[0] == "system" else []) + [messages[user_index]]
        response_turn = messages[user_index + 1]
    else:
        if "assistant" not in roles:
            return None, "no_assistant_turn"
        response_index = len(roles) - 1 - roles[::-1].index("assistant")
        prompt = messages[:response_index]
        response_turn = messages[response_index]
        if "user" not in roles[:response_index]:
            return None, "no_user_turn"
    used = prompt + [response_turn]
    if any(turn["role"] not in KNOWN_ROLES for turn in used):
        return None, "unknown_role"
    if not all(_has_content(turn) for turn in used):
        return None, "empty_content"
    prompt_messages = [{"role": turn["role"], "content": turn["content"]} for turn in prompt]
    return Example(prompt_messages=prompt_messages, response=response_turn["content"]), None


def load_examples(
    source: str, split: str = "train", num_samples: int | None = None, seed: int = 0, first_turn: bool = True
) -> tuple[list[Example], SkipCounts]:
    """Load, validate and subsample a ``messages`` dataset.

    With ``num_samples`` set, rows are visited in a seeded random order until
    ``num_samples`` valid examples are found (so the counts cover the rows looked at); the
    examples are returned in the dataset's order. Raises ``ValueError`` (one line naming
    the source and the counts) for missing, unreadable or empty data and when no valid row
    is left.
    """
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    dataset = _load_rows(source, split)
    if len(dataset) == 0:
        raise ValueError(f"dataset {source} (split {split!r}) is empty")
    if "messages" not in dataset.column_names:
        raise ValueError(
            f"dataset {source} has no 'messages' column (columns: {', '.join(dataset.column_names)})"
        )
    messages_column = dataset["messages"]
    order = range(len(dataset))
    if num_samples is not None and num_samples < len(dataset):
        order = np.random.default_rng(seed).permutation(len(dataset)).tolist()
    counts = SkipCounts()
    chosen: list[tuple[int, Example]] = []
    for index in order:
        example, reason = select_turns(messages_column[index], first_turn)
        if example is None:
            setattr(counts, reason, getattr(counts, reason) + 1)
            continue
        chosen.append((index, example))
        if num_samples is not None and len(chosen) == num_samples:
            break
    if not chosen:
        raise ValueError(
            f"no valid rows in dataset {source} (split {split!r}, {len(dataset)} rows; skipped: {counts.describe()})"
        )
    chosen.sort(key=lambda item: item[0])
    return [example for _, example in chosen], counts


# ---------------------------------------------------------------------------------------
# The chat template and tokenisation
# ---------------------------------------------------------------------------------------


def _as_id_list(encoded) -> list[int]:
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def prompt_ids(tokenizer, prompt_messages: list[dict]) -> list[int]:
    """Token ids of the prompt, exactly as given to the model for generation and training."""
    return _as_id_list(
        tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


_RESPONSE_MARKER = "IRISRESPONSEMARKER"


def end_of_turn_ids(tokenizer) -> list[int]:
    """Tokens the chat template puts right after an assistant response (whitespace after
    them excluded); the tokenizer's eos if the template adds nothing there."""
    # Cached on the tokenizer, keyed by the template, since encode_pair calls this per row.
    cached = getattr(tokenizer, "_iris_end_of_turn_ids", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return list(cached[1])
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _RESPONSE_MARKER}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    suffix = text.split(_RESPONSE_MARKER, 1)[1].rstrip() if _RESPONSE_MARKER in text else ""
    ids = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
    if not ids:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token and its chat template marks no end of turn")
        ids = [tokenizer.eos_token_id]
    with contextlib.suppress(AttributeError):
        tokenizer._iris_end_of_turn_ids = (tokenizer.chat_template, tuple(ids))
    return list(ids)


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at the template's end-of-turn token or at the tokenizer's eos."""
    stops = [end_of_turn_ids(tokenizer)[0]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


def encode_pair(
    tokenizer, prompt_messages: list[dict], response: str, max_length: int, max_prompt_length: int,
    *, end_of_turn: bool = True,
) -> EncodedSequence | None:
    """Prompt ids + response ids + end-of-turn ids; None if the prompt is too long.

    ``end_of_turn=False`` leaves the end-of-turn ids out: for a synthetic response that the
    opponent did not finish (cut at ``max_new_tokens``), so that the scored sequence is one
    the opponent actually produced.

    The prompt is too long if it exceeds ``max_prompt_length`` or leaves no room for a
    response token within ``max_length``. A response that does not fit is truncated (its
    end-of-turn token then falls off too), as in TRL's DPO/SPIN trainers.
    """
    if max_length <= 0 or max_prompt_length <= 0:
        raise ValueError(f"max_length and max_prompt_length must be positive, got {max_length}, {max_prompt_length}")
    prompt = prompt_ids(tokenizer, prompt_messages)
    if len(prompt) > max_prompt_length or len(prompt) >= max_length:
        return None
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    if end_of_turn:
        response_ids += end_of_turn_ids(tokenizer)
    ids = (prompt + response_ids)[:max_length]
    return EncodedSequence(input_ids=ids, prompt_length=len(prompt))


def collate(sequences: list[EncodedSequence], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask`` and ``response_mask`` (1 on the
    response tokens, 0 on prompt and padding), all ``LongTensor[B, T]``."""
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id")
    width = max(len(seq.input_ids) for seq in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        length = len(seq.input_ids)
        if not 0 < seq.prompt_length < length:
            raise ValueError(f"sequence {row} has prompt_length {seq.prompt_length} but {length} tokens")
        input_ids[row, :length] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        response_mask[row, seq.prompt_length : length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
