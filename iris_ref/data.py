"""Dataset loading and validation, token-exact training sequences, collation.

Choices:

* Data comes through ``datasets``: a hub name (with its ``split``), a local
  ``.json``/``.jsonl``/``.parquet`` file (chosen by extension; the file becomes the requested
  split), or a folder written by ``save_to_disk``: a ``Dataset`` (used whatever the split,
  like a file) or a ``DatasetDict`` (the requested split; a missing one is an error naming
  those there). Any other folder is refused: loading every file in it as one table mixes
  whatever it holds.
* Three column sets are accepted as annotated data, checked in this order (so a dataset
  that has ``messages`` besides ``prompt``/``chosen`` is read through ``messages``):

  - ``messages``: a list of ``{"role", "content"}`` turns;
  - ``prompt`` + ``chosen`` (TRL's preference format; ``rejected`` and any other column is
    ignored);
  - ``prompt`` + ``completion`` (TRL's prompt-completion format; a ``label`` column, TRL's
    unpaired preference format, is refused: its completions are not all good answers).

  ``prompt``, ``chosen`` and ``completion`` are each a string or a list of turns (TRL's
  "conversational" form). A string prompt is one user turn, a string chosen/completion is
  the assistant response. A chosen/completion list that repeats the prompt's turns before
  the assistant turn (as some datasets store it) has the repeat removed. Its last turn must
  be an assistant turn. The prompt and response then make one conversation that is read like
  a ``messages`` row, under the same ``first_turn`` rule (so with ``first_turn=True`` a
  multi-turn prompt gives its first user turn and the assistant turn after it).
* The prompt is every turn before the LAST assistant turn and the annotated response is that
  turn. With ``first_turn=True`` (SPIN's UltraChat setting) the prompt is the first user turn
  (plus a leading system turn, if any) and the response is the assistant turn right after it.
* One rule in every format: a row whose example (prompt turns and response) equals one
  already kept is counted ``duplicate`` and dropped. Repeats are either copies or rows that
  differ only in what is not read (the project's own ``synthetic.jsonl`` has one row per
  sampled response, K per prompt; preference sets pair one chosen answer with several
  rejected ones; with ``first_turn`` the later turns), and a repeat would only weigh an
  example twice and sample it twice. The exception is the shipped toy tasks
  (``iris_ref/toy_data/``): their rows are draws from a known answer distribution, so their
  repeats ARE that distribution (the evaluation compares the model's with it) and are kept.
* Invalid rows are skipped and counted by reason (see ``SkipCounts``; only the turns that
  are looked at are checked); an error is raised if nothing valid is left.
* **Token-exact sequences: what is trained is what the model sees.** ``chat.ChatFormat``
  applies one rule (its docstring has the details and the reasons):

  - an annotated training sequence (``encode_pair``) is the tokens of the rendered
    conversation as an SFT pipeline tokenizes it: the tokenizer's own special-token policy,
    the BOS exactly once, the response never tokenized on its own, ending with the template's
    end of turn;
  - the generation prompt (``ChatFormat.prompt_ids``) is its prefix; a row where the tokens
    break that property is skipped, counted as ``prefix_mismatch``, and the first one named;
  - a synthetic sequence (``encode_generated``) is that prompt followed by exactly the token
    ids the opponent sampled, never re-tokenised;
  - both response sets get one length budget per prompt, ``max_length - |prompt|`` (capped
    by ``max_new_tokens``): ``response_budget``. A response over it is cut (``cut``), the
    annotated one like the sampled one, without its end of turn.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
from array import array
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

KNOWN_ROLES = ("system", "user", "assistant")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ACCEPTED_FORMATS = "'messages'; 'prompt' + 'chosen' ('rejected' ignored); 'prompt' + 'completion'"


@dataclass
class Example:
    prompt_messages: list[dict]
    response: str


@dataclass
class SkipCounts:
    """Rows skipped, by reason. ``too_long`` is filled in by callers of ``encode_pair``.

    * ``not_a_list``: the conversation is not a list (``prompt``/``chosen``/``completion``:
      neither a list nor a string), e.g. missing;
    * ``bad_turn``: a turn looked at is not a dict with a ``role``;
    * ``unknown_role``: a turn looked at has a role other than system/user/assistant;
    * ``no_user_turn`` / ``no_assistant_turn``: no user turn in the prompt / no assistant
      turn to answer it;
    * ``bad_content``: a used turn's ``content`` is missing or not a string;
    * ``empty_content``: a used turn's ``content`` is blank;
    * ``duplicate``: a row repeating an example already kept (prompt turns and response);
    * ``too_long``: the prompt exceeds ``max_prompt_length`` or leaves no room for a response;
    * ``prefix_mismatch``: the tokenized generation prompt is not the start of the tokenized
      conversation (``chat.ChatFormat``), so no sequence is both what the model was prompted
      with and what it would be trained on; ``first`` describes the first such row;
    * ``no_end_of_turn``: the template did not close this response the way it closes others;
    * ``template_error``: the chat template raised on the conversation (Gemma's refuses a
      system turn); ``first`` gives its message;
    * ``stop_in_response``: the response's text holds a stop token's text (a literal
      ``<|im_end|>``), so it would teach going on after a stop, which no sample can.
    """

    not_a_list: int = 0
    bad_turn: int = 0
    unknown_role: int = 0
    no_user_turn: int = 0
    no_assistant_turn: int = 0
    bad_content: int = 0
    empty_content: int = 0
    duplicate: int = 0
    too_long: int = 0
    prefix_mismatch: int = 0
    no_end_of_turn: int = 0
    template_error: int = 0
    stop_in_response: int = 0
    first: dict = field(default_factory=dict, compare=False)  # reason -> the first such row, described

    def _counts(self):
        return [f.name for f in fields(self) if f.name != "first"]

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self._counts())

    def add(self, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in self._counts() if getattr(self, name)]
        return ", ".join(parts) if parts else "none"


@dataclass
class EncodedSequence:
    input_ids: list[int]
    prompt_length: int
    cut: bool = False  # the response was cut at its budget (``response_budget``)


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
    if path.is_dir():
        return _load_saved(path, split)
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


def _load_saved(path: Path, split: str):
    """A folder written by ``save_to_disk``: a ``Dataset`` as it is, a ``DatasetDict``'s ``split``."""
    import datasets

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise ValueError(f"dataset folder {path} was not written by datasets' save_to_disk (no dataset_dict.json or "
                         "state.json): give such a folder, a .json/.jsonl/.parquet file or a hub name")
    try:
        with _quiet_datasets():
            saved = datasets.load_from_disk(str(path))
    except Exception as error:
        raise ValueError(f"cannot read dataset folder {path}: {_first_line(error)}") from None
    if not isinstance(saved, datasets.DatasetDict):
        return saved
    if split not in saved:
        raise ValueError(f"dataset folder {path} has no split {split!r} (its splits: {', '.join(saved)}): choose one "
                         "with --split or --eval-split")
    return saved[split]


def _turn_problem(turn) -> str | None:
    """Why a turn cannot even be read for its role (its content is checked separately, and
    only where the turn is used), or None."""
    # Parquet and Arrow give every turn every key seen in the column, so a missing role
    # arrives as None.
    if not isinstance(turn, dict) or turn.get("role") is None:
        return "bad_turn"
    if turn["role"] not in KNOWN_ROLES:
        return "unknown_role"
    return None


def _content_problem(turn: dict) -> str | None:
    content = turn.get("content")
    if not isinstance(content, str):
        return "bad_content"
    if not content.strip():
        return "empty_content"
    return None


def _first_exchange(messages: list) -> tuple[tuple[list, dict] | None, str | None]:
    """The first user turn (with a leading system turn) and the answer right after it.

    Turns are looked at up to that answer: one with an unknown role before the first user
    turn may be the real user turn (e.g. ShareGPT's ``human``), so it is reported, not
    stepped over."""
    for index, turn in enumerate(messages):
        reason = _turn_problem(turn)
        if reason is not None:
            return None, reason
        if turn["role"] == "user":
            break
    else:
        return None, "no_user_turn"
    if index + 1 == len(messages):
        return None, "no_assistant_turn"
    answer = messages[index + 1]
    reason = _turn_problem(answer)
    if reason is not None:
        return None, reason
    if answer["role"] != "assistant":
        return None, "no_assistant_turn"
    system = [messages[0]] if index > 0 and messages[0]["role"] == "system" else []
    return (system + [messages[index]], answer), None


def _last_response(messages: list) -> tuple[tuple[list, dict] | None, str | None]:
    """Every turn before the last assistant turn, and that turn. Turns after it are unused
    (their roles are not checked), but a malformed one anywhere hides whether it is the
    last assistant turn."""
    problems = [_turn_problem(turn) for turn in messages]
    if "bad_turn" in problems:
        return None, "bad_turn"
    roles = [turn["role"] for turn in messages]
    if "assistant" not in roles:
        # An unknown role may be the assistant under another name (e.g. ShareGPT's "gpt").
        return None, "unknown_role" if "unknown_role" in problems else "no_assistant_turn"
    index = len(roles) - 1 - roles[::-1].index("assistant")
    if "unknown_role" in problems[:index]:
        return None, "unknown_role"
    if "user" not in roles[:index]:
        return None, "no_user_turn"
    return (messages[:index], messages[index]), None


def select_turns(messages, first_turn: bool) -> tuple[Example | None, str | None]:
    """Split one conversation into (prompt turns, response), or name why it is skipped
    (a ``SkipCounts`` field)."""
    if not isinstance(messages, list):
        return None, "not_a_list"
    picked, reason = _first_exchange(messages) if first_turn else _last_response(messages)
    if picked is None:
        return None, reason
    prompt, response_turn = picked
    for turn in prompt + [response_turn]:
        reason = _content_problem(turn)
        if reason is not None:
            return None, reason
    prompt_messages = [{"role": turn["role"], "content": turn["content"]} for turn in prompt]
    return Example(prompt_messages=prompt_messages, response=response_turn["content"]), None


def _as_turns(value, role: str) -> list | None:
    """A ``prompt``/``chosen``/``completion`` value as turns: a string is one turn of
    ``role``, a list is taken as turns; None for anything else."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value if isinstance(value, list) else None


def _same_turn(a, b) -> bool:
    # Role and content only: Arrow adds the column's other keys (as None) to every turn.
    return (isinstance(a, dict) and isinstance(b, dict)
            and (a.get("role"), a.get("content")) == (b.get("role"), b.get("content")))


def join_prompt_response(prompt, response) -> tuple[list | None, str | None]:
    """One conversation from a ``prompt`` value and a ``chosen``/``completion`` value, or the
    ``SkipCounts`` reason it cannot be made."""
    prompt_turns = _as_turns(prompt, "user")
    response_turns = _as_turns(response, "assistant")
    if prompt_turns is None or response_turns is None:
        return None, "not_a_list"
    n = len(prompt_turns)
    if n and len(response_turns) > n and all(map(_same_turn, prompt_turns, response_turns)):
        response_turns = response_turns[n:]
    # The response must be the row's own last turn: otherwise the last-assistant rule
    # (first_turn=False) would take an assistant turn of the prompt as the answer.
    if not response_turns:
        return None, "no_assistant_turn"
    reason = _turn_problem(response_turns[-1])
    if reason is not None:
        return None, reason
    if response_turns[-1]["role"] != "assistant":
        return None, "no_assistant_turn"
    return prompt_turns + response_turns, None


def _format_of(source: str, columns: list[str]) -> tuple[str, ...]:
    """The columns that hold the conversation, by the accepted formats in order of priority;
    ValueError (one line) if none fits."""
    if "messages" in columns:
        return ("messages",)
    if "prompt" in columns and "chosen" in columns:
        return ("prompt", "chosen")
    if "prompt" in columns and "completion" in columns:
        if "label" in columns:
            raise ValueError(
                f"dataset {source} has 'prompt', 'completion' and 'label' columns (TRL's unpaired preference "
                f"format): its completions are not all annotated answers; keep the rows labelled true and drop 'label'"
            )
        return ("prompt", "completion")
    raise ValueError(
        f"dataset {source} has no 'messages' column (columns: {', '.join(columns)}); "
        f"accepted formats: {ACCEPTED_FORMATS}"
    )


def _row_example(values: tuple, first_turn: bool) -> tuple[Example | None, str | None]:
    if len(values) == 1:
        return select_turns(values[0], first_turn)
    conversation, reason = join_prompt_response(*values)
    if conversation is None:
        return None, reason
    return select_turns(conversation, first_turn)


def _example_key(example: Example) -> tuple:
    return tuple((t["role"], t["content"]) for t in example.prompt_messages), example.response


def _is_toy_task_file(source: str) -> bool:
    """A shipped toy task's file (``iris_ref/toy_data/``), whose repeated rows are kept."""
    from iris_ref.tiny import TOY_DATA_DIR

    path = Path(source).expanduser()
    return path.is_file() and path.resolve().parent == TOY_DATA_DIR.resolve()


def load_examples(
    source: str, split: str = "train", num_samples: int | None = None, seed: int = 0, first_turn: bool = True
) -> tuple[list[Example], SkipCounts]:
    """Load, validate and subsample an annotated dataset (any accepted format, see the module
    docstring).

    With ``num_samples`` set, rows are visited in a seeded random order until
    ``num_samples`` valid examples are found (so the counts cover the rows looked at; a
    duplicate does not count as a new example); the examples are returned in the dataset's
    order. A row repeating a kept example is counted ``duplicate`` and dropped, in every
    format, except in the shipped toy tasks' files (see the module docstring). Raises
    ``ValueError`` (one line naming the source and the problem) for missing, unreadable or
    empty data, for columns of no accepted format and when no valid row is left.
    """
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    dataset = _load_rows(source, split)
    if len(dataset) == 0:
        raise ValueError(f"dataset {source} (split {split!r}) is empty")
    names = _format_of(source, dataset.column_names)
    columns = [dataset[name] for name in names]
    keep_repeats = _is_toy_task_file(source)  # draws from a known distribution: repeats are part of it
    order = range(len(dataset))
    if num_samples is not None and num_samples < len(dataset):
        order = np.random.default_rng(seed).permutation(len(dataset)).tolist()
    counts = SkipCounts()
    seen: set[tuple] = set()
    chosen: list[tuple[int, Example]] = []
    for index in order:
        example, reason = _row_example(tuple(column[index] for column in columns), first_turn)
        if example is None:
            counts.add(reason)
            continue
        if not keep_repeats:
            key = _example_key(example)
            if key in seen:
                counts.add("duplicate")
                continue
            seen.add(key)
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
# Token-exact sequences (the rule is in the module docstring; `chat.ChatFormat` applies it)
# ---------------------------------------------------------------------------------------


def response_budget(prompt_length: int, max_length: int, max_new_tokens: int | None = None) -> int:
    """Response tokens a prompt of ``prompt_length`` tokens may have, the SAME for its annotated
    and its synthetic responses: ``max_length - prompt_length``, capped at ``max_new_tokens``.
    (Otherwise a long annotated answer would be longer than any sampled one could be, and
    length alone would tell the two sets apart.)"""
    budget = max_length - prompt_length
    return budget if max_new_tokens is None else min(budget, max_new_tokens)


def _prompt_that_fits(chat, prompt_messages, max_length: int, max_prompt_length: int) -> list[int] | None:
    """The prompt ids, or None if the prompt exceeds ``max_prompt_length`` or leaves no room
    for a response token within ``max_length``."""
    if max_length <= 0 or max_prompt_length <= 0:
        raise ValueError(f"max_length and max_prompt_length must be positive, got {max_length}, {max_prompt_length}")
    prompt = chat.prompt_ids(prompt_messages)
    if len(prompt) > max_prompt_length or len(prompt) >= max_length:
        return None
    return prompt


def encode_pair(
    chat, prompt_messages: list[dict], response: str, max_length: int, max_prompt_length: int,
    max_new_tokens: int | None = None,
) -> tuple[EncodedSequence | None, str | None]:
    """An annotated response as trained on, or the ``SkipCounts`` reason it is not.

    The ids are the rendered conversation's, cut after the end of turn (``chat.ChatFormat``):
    the prompt's ids, then the response's as they follow them in context. The response is cut
    to ``response_budget`` tokens, the rule its synthetic responses are sampled under (its end
    of turn then falls off, as a sampled response cut at the budget has none): ``cut`` says so.
    Reasons: ``too_long`` (the prompt exceeds ``max_prompt_length`` or leaves no room),
    ``prefix_mismatch``, ``no_end_of_turn`` and ``stop_in_response`` (see
    ``ChatFormat.conversation_ids``), ``template_error`` (the template raised on this conversation).
    """
    from jinja2.exceptions import TemplateError

    try:
        if _prompt_that_fits(chat, prompt_messages, max_length, max_prompt_length) is None:
            return None, "too_long"
        pair = chat.conversation_ids(prompt_messages, response)
    except TemplateError:  # the template refuses this conversation (Gemma's: a system turn)
        return None, "template_error"
    if isinstance(pair, str):
        return None, pair
    prompt, response_ids = pair
    budget = response_budget(len(prompt), max_length, max_new_tokens)
    return EncodedSequence(prompt + response_ids[:budget], len(prompt), cut=len(response_ids) > budget), None


def encode_examples(chat, examples: list[Example], max_length: int, max_prompt_length: int,
                    max_new_tokens: int | None = None, counts: SkipCounts | None = None
                    ) -> tuple[list[Example], list[EncodedSequence], SkipCounts]:
    """``encode_pair`` of every example: those that encode, their sequences, and the skips
    counted (added to ``counts``), the first row of each tokenization reason described."""
    counts = counts if counts is not None else SkipCounts()
    kept, encoded = [], []
    for example in examples:
        seq, reason = encode_pair(chat, example.prompt_messages, example.response, max_length, max_prompt_length,
                                  max_new_tokens)
        if seq is None:
            counts.add(reason)
            if reason in ("prefix_mismatch", "template_error", "stop_in_response") and reason not in counts.first:
                counts.first[reason] = _describe_skip(chat, example, reason)
            continue
        kept.append(example)
        encoded.append(seq)
    return kept, encoded, counts


def _describe_skip(chat, example: Example, reason: str) -> str:
    if reason == "prefix_mismatch":
        return chat.describe_mismatch(example.prompt_messages, example.response)
    if reason == "stop_in_response":
        stops = [t for t in chat.special_tokens_in(example.response)
                 if chat.tokenizer.convert_tokens_to_ids(t) in chat.stop_ids]
        return f"response {example.response[:40]!r} holds {stops[:1]}"
    try:
        chat.render(example.prompt_messages + [{"role": "assistant", "content": example.response}], False)
    except Exception as error:  # noqa: BLE001 - the template's own message is the description
        return f"{type(error).__name__}: {str(error).strip()[:120]}"
    return "the template raised"


def sequences_sha256(sequences) -> str:
    """SHA-256 of token sequences (ids and prompt lengths, in order): what an artefact made from
    them records, so that a resume can tell they are the same."""
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(len(seq.input_ids).to_bytes(8, "little") + int(seq.prompt_length).to_bytes(8, "little"))
        digest.update(array("q", seq.input_ids).tobytes())
    return digest.hexdigest()


def _token_id_list(token_ids) -> list[int]:
    """Plain ints (from a list, a JSON row, numpy or torch); ValueError (one line) for a
    non-integer or negative id, which would otherwise fail deep inside the model."""
    try:
        ids = [operator.index(token) for token in token_ids]
    except TypeError as error:
        raise ValueError(f"response token ids must be integers: {error}") from None
    if any(token < 0 for token in ids):
        raise ValueError(f"response token ids must be non-negative, got {min(ids)}")
    return ids


def encode_generated(
    chat, prompt_messages: list[dict], response_token_ids, max_length: int, max_prompt_length: int,
    max_new_tokens: int | None = None,
) -> EncodedSequence | None:
    """The generation prompt's ids + exactly the token ids the model sampled; None if there is
    nothing to train on.

    The response ids are used as given: with the stop token the model emitted, if it emitted
    one, and nothing appended (a response cut at its budget has no end of turn), never decoded
    and re-tokenised (text -> ids is not the inverse of ids -> text, so re-tokenising would
    score a sequence the model did not sample). They are cut to ``response_budget`` (a
    generator already stops there).

    None when the prompt is too long (the rule of ``encode_pair``) or when the response has
    no tokens. So every returned sequence has at least one response token and is fit for
    ``collate``; callers skip a None.
    """
    response = _token_id_list(response_token_ids)
    prompt = _prompt_that_fits(chat, prompt_messages, max_length, max_prompt_length)
    if prompt is None or not response:
        return None
    budget = response_budget(len(prompt), max_length, max_new_tokens)
    return EncodedSequence(input_ids=prompt + response[:budget], prompt_length=len(prompt), cut=len(response) > budget)


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
