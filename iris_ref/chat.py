"""The chat format of a run: how conversations become the exact token ids trained on and sampled.

The rule (also in `data`'s docstring and docs/data_and_generation.md, "Token-exact sequences"):

* An **annotated training sequence** is the tokens of the rendered conversation, as an SFT
  pipeline tokenizes it: the chat template renders the prompt turns and the response turn as
  text, and the tokenizer encodes that text with its own special-token policy, with the BOS
  exactly once (the tokenizer's leading special tokens are added unless the template wrote
  them: Llama 3 and Gemma templates write the BOS, Zephyr's does not). A response is never
  encoded on its own: a SentencePiece tokenizer puts the word-start marker `▁` on the first
  word of a string encoded alone, which the model never sees after `<|assistant|>\\n`.
* The **generation prompt** is the rendering with `add_generation_prompt=True`, encoded the
  same way, and must be a prefix of the annotated sequence. A row where it is not (a
  tokenizer merges the response's first characters with the prompt's last token, e.g. a
  response that starts with a newline) is skipped and counted as `prefix_mismatch`, the first
  one named; it is never trained on.
* The response ends with the template's **end of turn**, up to its first special token. Text the
  template writes after it (ChatML's `\\n`, Phi-3's `\\n<|endoftext|>`) is not part of the
  response: generation stops before it. A template that writes nothing after the response gets
  the eos appended. A response whose text holds a stop token's text (a literal `<|im_end|>`) is
  skipped as `stop_in_response`: no sample can continue after a stop.
* A **synthetic sequence** is the generation prompt followed by exactly the sampled ids.
* **Stops** are special or added tokens only: those of the end of turn, the tokenizer's eos and
  the model's `generation_config.eos_token_id` (vLLM adds those by itself; the transformers
  path is given the same set). Plain text in an end of turn never becomes a stop
  (Llama-2-chat's `' ' + eos` is `▁` + `</s>`, and Llama tokenizers emit `▁` before digits).
* The rendering is **frozen for a run**: `strftime_now` (Llama 3.x templates print today's
  date) returns the run's date, and the template options (`--chat-template-kwargs`, e.g.
  `{"enable_thinking": false}`) reach every rendering.
* A template whose final assistant turn holds special text that the generation prompt does
  not end with (Qwen3's empty `<think>\\n\\n</think>\\n\\n` when thinking is on, while the
  model samples real think blocks) is refused: the two response sets would differ in form.

`ChatFormat` is built once per run and passed wherever a tokenizer was: data encoding,
both generators, evaluation and `--dry-run`'s display.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Optional, Sequence

_MARKER = "IRISRESPONSEMARKER"
_PROBE_PROMPT = ({"role": "user", "content": "x"},)


class ChatFormatError(ValueError):
    """A tokenizer or template that cannot give token-exact sequences (one-line message)."""


def _leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (the BOS, if its policy adds one)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _added_token_pattern(tokenizer) -> Optional[re.Pattern]:
    """A regex matching the text of any added or special token, longest first."""
    contents = {str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    contents |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    contents.discard("")
    if not contents:
        return None
    return re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in (ids or [])]


class ChatFormat:
    """One tokenizer, its chat template, the run's template options and date, and the model's
    generation eos ids: the single source of prompt ids, annotated sequences and stop tokens.

    ``ChatFormatError`` at construction for a template that cannot be trained token-exactly
    (no chat template, a generation prompt that is not the start of the rendered conversation,
    special text the model never sees before each response, an end of turn without a special
    token).
    """

    def __init__(self, tokenizer, *, template_kwargs: Optional[dict] = None, date: Optional[str] = None,
                 generation_eos_ids: Sequence[int] | int | None = ()):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError("the tokenizer has no chat template; self-play needs one")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        try:
            self.date = (datetime.date.fromisoformat(date) if date else datetime.date.today()).isoformat()
        except ValueError:
            raise ChatFormatError(f"template date must be YYYY-MM-DD, got {date!r}") from None
        self.generation_eos_ids = _as_id_list(generation_eos_ids)
        self.leading_ids = _leading_special_ids(tokenizer)
        self._added = _added_token_pattern(tokenizer)
        self._prompt_cache: dict[tuple, list[int]] = {}
        self._check_generation_prompt()
        # what the template writes after a response; its end of turn; what follows that (not trained);
        # whether the eos must be appended (the template writes no end of turn)
        self._closing, self.end_of_turn_text, self.after_turn_text, self._appends_eos = self._end_of_turn()
        self.stop_ids = self._stops()

    # -- rendering ----------------------------------------------------------------------
    def render(self, messages: Sequence[dict], add_generation_prompt: bool, *, date: Optional[str] = None) -> str:
        """The template's text, with its clock (`strftime_now`) frozen at the run's date (or `date`)."""
        day = datetime.datetime.fromisoformat(date or self.date)
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
            **{"strftime_now": day.strftime, **self.template_kwargs})

    def encode_text(self, text: str) -> list[int]:
        """Text as an SFT pipeline tokenizes it: the tokenizer's special tokens, the BOS once."""
        body = self.tokenizer.encode(text, add_special_tokens=False)
        lead = self.leading_ids
        return list(body) if body[:len(lead)] == lead else lead + list(body)

    def special_tokens_in(self, text: str) -> list[str]:
        return self._added.findall(text) if self._added is not None else []

    # -- the two sequences ----------------------------------------------------------------
    def prompt_ids(self, prompt_messages: Sequence[dict]) -> list[int]:
        """The generation prompt's ids: what both generators feed the model (cached per prompt)."""
        key = tuple((m.get("role"), m.get("content")) for m in prompt_messages)
        cached = self._prompt_cache.get(key)
        if cached is None:
            cached = self.encode_text(self.render(prompt_messages, add_generation_prompt=True))
            self._prompt_cache[key] = cached
        return list(cached)

    def conversation_ids(self, prompt_messages: Sequence[dict], response: str) -> tuple[list[int], list[int]] | str:
        """(prompt ids, response ids up to the end of turn) of an annotated response, or the
        reason it cannot be trained token-exactly: ``"prefix_mismatch"`` (the generation prompt's
        ids are not the start of the conversation's), ``"no_end_of_turn"`` (the template did
        not close this response the way it closes others) or ``"stop_in_response"`` (the response's
        text holds a stop token's text, e.g. a literal ``<|im_end|>``: it would train on going on
        after a stop, which no sampled response can)."""
        prompt = self.prompt_ids(prompt_messages)
        text = self.render(list(prompt_messages) + [{"role": "assistant", "content": response}],
                           add_generation_prompt=False)
        if not text.endswith(self._closing):
            return "no_end_of_turn"
        text = text[:len(text) - len(self.after_turn_text)]
        if self._appends_eos:
            text += self.tokenizer.eos_token
        ids = self.encode_text(text)
        if ids[:len(prompt)] != prompt:
            return "prefix_mismatch"
        response = ids[len(prompt):]
        if set(response[:-1]) & set(self.stop_ids):  # the text holds a stop token's text: no sample can
            return "stop_in_response"
        return prompt, response

    def describe_mismatch(self, prompt_messages: Sequence[dict], response: str) -> str:
        """Why a ``prefix_mismatch`` row fails, in a few words (shown once at load)."""
        prompt = self.prompt_ids(prompt_messages)
        text = self.render(list(prompt_messages) + [{"role": "assistant", "content": response}], False)
        ids = self.encode_text(text)
        at = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        alone = self.tokenizer.convert_ids_to_tokens(prompt[at:at + 2])
        together = self.tokenizer.convert_ids_to_tokens(ids[at:at + 2])
        return (f"response {response[:20]!r}: the prompt ends {alone} where the conversation has {together} "
                f"(token {at})")

    # -- the template's structure, read off a probe conversation ---------------------------
    def _probe(self) -> tuple[str, str]:
        prompt = self.render(_PROBE_PROMPT, add_generation_prompt=True)
        full = self.render(list(_PROBE_PROMPT) + [{"role": "assistant", "content": _MARKER}], add_generation_prompt=False)
        return prompt, full

    def _check_generation_prompt(self) -> None:
        prompt, full = self._probe()
        if _MARKER not in full:
            raise ChatFormatError("the chat template does not render the assistant's content")
        if not full.startswith(prompt):
            raise ChatFormatError(
                f"the chat template's generation prompt (ending {prompt[-30:]!r}) is not the start of the rendered "
                "conversation: generation and training would see different text")
        inserted = full[len(prompt):full.index(_MARKER)]
        special = self.special_tokens_in(inserted)
        if special or "<think>" in inserted:
            raise ChatFormatError(
                f"the chat template writes {inserted!r} before every annotated response but not at the end of the "
                "generation prompt, so the model samples its own there (a think block): the two response sets would "
                "differ in form; pass --chat-template-kwargs '{\"enable_thinking\": false}' if the template takes it")

    def _end_of_turn(self) -> tuple[str, str, str, bool]:
        """The template's text after an assistant response, cut after its FIRST special token,
        where generation stops (Phi-3's final turn writes `<|end|>\n<|endoftext|>`: the model
        samples `<|end|>` and stops): (all of it, the end of turn, the rest, whether the eos must
        be appended instead)."""
        _, full = self._probe()
        suffix = full.split(_MARKER, 1)[1]
        if not suffix.strip():  # the template writes at most whitespace: the eos ends the response
            if self.tokenizer.eos_token_id is None:
                raise ChatFormatError("the chat template marks no end of turn and the tokenizer has no eos token")
            return suffix, self.tokenizer.eos_token, suffix, True
        first = self._added.search(suffix) if self._added is not None else None
        if first is None:
            raise ChatFormatError(
                f"the chat template ends an assistant turn with plain text {suffix!r} and no special token: "
                "generation could not stop where the annotated responses end")
        return suffix, suffix[:first.end()], suffix[first.end():], False

    def _stops(self) -> list[int]:
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in self.special_tokens_in(self.end_of_turn_text)]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        ids += self.generation_eos_ids
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The special tokens of the end of turn (the last one ends every complete response)."""
        return [self.tokenizer.convert_tokens_to_ids(t) for t in self.special_tokens_in(self.end_of_turn_text)]

    @property
    def depends_on_date(self) -> bool:
        """Whether the template's output changes with the date (it is frozen at `date` either way)."""
        return self.render(_PROBE_PROMPT, True, date="2001-02-03") != self.render(_PROBE_PROMPT, True)

    def settings(self) -> dict[str, Any]:
        """What fixes the rendering, for logs and `--dry-run`."""
        return {"template_date": self.date, "chat_template_kwargs": self.template_kwargs,
                "leading_ids": self.leading_ids, "end_of_turn": self.end_of_turn_text, "stop_ids": self.stop_ids}


def as_chat_format(chat_or_tokenizer) -> ChatFormat:
    """A `ChatFormat` as given, or a tokenizer's (no template options, today's date, no
    generation-config eos ids): library callers may pass either."""
    return chat_or_tokenizer if isinstance(chat_or_tokenizer, ChatFormat) else ChatFormat(chat_or_tokenizer)


def show_sequence(chat: ChatFormat, input_ids: Sequence[int], prompt_length: int, *, width: int = 100) -> list[str]:
    """An annotated sequence as tokens for `--dry-run`: `|` between prompt and response, the
    BOS, the end of turn and the stop tokens marked, long runs elided."""
    tokenizer = chat.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(list(input_ids))
    stops, lead = set(chat.stop_ids), len(chat.leading_ids)

    def label(i: int) -> str:
        text = repr(tokens[i])
        if i < lead:
            return f"[BOS {text}]"
        return f"[STOP {text}]" if i >= prompt_length and input_ids[i] in stops else text

    def run(lo: int, hi: int, keep: int) -> str:
        shown = [label(i) for i in range(lo, hi)]
        if len(shown) > 2 * keep:
            shown = shown[:keep] + [f"... {len(shown) - 2 * keep} tokens ..."] + shown[-keep:]
        return " ".join(shown)

    line = f"{run(0, prompt_length, 12)} | {run(prompt_length, len(input_ids), 8)}"
    return [line[i:i + width] for i in range(0, len(line), width)]
