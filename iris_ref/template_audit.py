"""Audit a tokenizer and its chat template for token-exact self-play (`iris-audit --template`).

    iris-audit --template MODEL_OR_TOKENIZER_DIR [--chat-template-kwargs JSON] [--template-date YYYY-MM-DD]

Each invariant of `chat`'s rule is checked on probe conversations (plain answers, digits, a
list item, several lines, and answers that start with whitespace) and reported as

* `ok`: the invariant holds;
* `note`: it holds for iris-ref, which handles it, but a pipeline that tokenizes naively would
  break it (the BOS a template also writes, the word-start marker of a response encoded alone,
  plain text in the end of turn, a date in the template);
* `violation`: self-play on this template would train on sequences the model is not shown, or
  could not stop where the annotated responses end; a run refuses the template, or skips every
  row the violation touches.

Exit status: 0 no violation, 1 at least one violation, 2 the tokenizer cannot be loaded or the
arguments are wrong. The same checks, as functions of any encoder, are what the tests hold
iris-ref's encoding (and, as a negative control, the old response-alone encoding) to.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from iris_ref.chat import ChatFormat, ChatFormatError

PROBE_PROMPTS = (
    [{"role": "user", "content": "What colour is the sky?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many apples?"}],
    [{"role": "user", "content": "List one fruit."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again?"}],
)
PLAIN_RESPONSES = ("Blue", "42 apples", "- apple", "Sure.\nA second line.", "Yes")
WHITESPACE_RESPONSES = (" Blue", "\nBlue", "  indented")


@dataclass
class Finding:
    level: str      # "ok", "note" or "violation"
    topic: str
    text: str


def reference_ids(chat: ChatFormat, prompt: Sequence[dict], response: str) -> list[int]:
    """What an SFT pipeline trains on, independently of `ChatFormat.encode_text`: the rendered
    conversation (cut after the end of turn) through the tokenizer with its special tokens, a
    BOS that the template also wrote counted once."""
    tokenizer = chat.tokenizer
    text = chat.render(list(prompt) + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    text = text[:len(text) - len(chat.after_turn_text)]
    if chat.end_of_turn_text == tokenizer.eos_token and not text.endswith(tokenizer.eos_token or "\0"):
        text += tokenizer.eos_token  # a template that writes no end of turn: the eos ends the response
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return list(ids)


def reference_prompt_ids(chat: ChatFormat, prompt: Sequence[dict]) -> list[int]:
    """The generation prompt as an SFT pipeline tokenizes it (see `reference_ids`)."""
    tokenizer = chat.tokenizer
    ids = tokenizer(chat.render(prompt, add_generation_prompt=True), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return list(ids[1:] if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos else ids)


def invariant_failures(chat: ChatFormat, prompt_ids: Callable, sequence_ids: Callable, stop_ids: Sequence[int],
                       responses: Sequence[str] = PLAIN_RESPONSES) -> list[str]:
    """The rule's invariants for an encoder, on the probe prompts and `responses`:
    `prompt_ids(prompt)` are the generation prompt's ids, `sequence_ids(prompt, response)` the
    annotated training sequence's (None: the encoder skips the row), `stop_ids` its stop set.
    Returns one line per failure (empty: all hold)."""
    tokenizer = chat.tokenizer
    failures = []
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    plain = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids if i not in special]
    if plain:
        failures.append(f"stops: plain-text tokens {plain} are stops (the model emits them inside answers)")
    missing = [i for i in chat.generation_eos_ids if i not in stop_ids]
    if missing:
        failures.append(f"stops: the model's generation_config eos ids {missing} are not stops (vLLM stops on them)")
    bos = tokenizer.bos_token_id if chat.leading_ids else None
    names = tokenizer.convert_ids_to_tokens
    for prompt in accepted_prompts(chat):
        for response in responses:
            expected, got, fed = reference_ids(chat, prompt, response), sequence_ids(prompt, response), prompt_ids(prompt)
            where = f"{response!r}"
            if got is None:
                failures.append(f"{where}: skipped")
                continue
            if got != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                failures.append(f"{where}: trained on {names(got[at:at + 3])} at token {at} where the conversation "
                                f"has {names(expected[at:at + 3])}")
            # the response on its own (a difference in the prompt above would hide one here)
            expected_response = expected[len(reference_prompt_ids(chat, prompt)):]
            if got[len(fed):] != expected_response:
                failures.append(f"{where}: the response is trained as {names(got[len(fed):len(fed) + 2])} where the "
                                f"conversation has {names(expected_response[:2])}")
            if got[:len(fed)] != fed:
                failures.append(f"{where}: the generation prompt is not the start of the training sequence")
            # Exactly once at the start (a template may write one per turn, as Llama 2's does).
            if bos is not None and (got[:1] != [bos] or got[1:2] == [bos] or fed[:1] != [bos] or fed[1:2] == [bos]):
                failures.append(f"{where}: the sequences do not start with exactly one BOS (training "
                                f"{tokenizer.convert_ids_to_tokens(got[:2])}, prompt {tokenizer.convert_ids_to_tokens(fed[:2])})")
            if got and got[-1] not in stop_ids:
                failures.append(f"{where}: the response ends with {tokenizer.convert_ids_to_tokens(got[-1:])}, "
                                "not a stop token")
            inner = [i for i in got[len(fed):-1] if i in stop_ids]
            if inner:  # generation would have stopped there: the rest is text no sample has
                failures.append(f"{where}: the response holds the stop token {tokenizer.convert_ids_to_tokens(inner[:1])} "
                                "before its end")
    return failures


def accepted_prompts(chat: ChatFormat) -> list:
    """The probe prompts the template renders (Gemma's refuses a system turn)."""
    from jinja2.exceptions import TemplateError

    accepted = []
    for prompt in PROBE_PROMPTS:
        try:
            chat.render(prompt, add_generation_prompt=True)
        except TemplateError:
            continue
        accepted.append(prompt)
    return accepted


def chat_format_failures(chat: ChatFormat, responses: Sequence[str] = PLAIN_RESPONSES) -> list[str]:
    """`invariant_failures` of iris-ref's own encoding."""
    def sequence(prompt, response):
        pair = chat.conversation_ids(prompt, response)
        return None if isinstance(pair, str) else pair[0] + pair[1]

    return invariant_failures(chat, chat.prompt_ids, sequence, chat.stop_ids, responses)


def audit_template(tokenizer, *, template_kwargs: Optional[dict] = None, date: Optional[str] = None,
                   generation_eos_ids: Sequence[int] = ()) -> list[Finding]:
    """Every finding for a tokenizer (with its chat template)."""
    try:
        chat = ChatFormat(tokenizer, template_kwargs=template_kwargs, date=date, generation_eos_ids=generation_eos_ids)
    except ChatFormatError as exc:
        return [Finding("violation", "template", str(exc))]
    names = tokenizer.convert_ids_to_tokens
    findings = []

    # BOS: once, whoever writes it
    bos = tokenizer.bos_token
    if not chat.leading_ids:
        findings.append(Finding("ok", "BOS", "the tokenizer adds none"))
    else:
        written = bool(bos) and chat.render(PROBE_PROMPTS[0][-1:], True).startswith(bos)
        shown = names(chat.leading_ids)
        findings.append(Finding("note", "BOS", f"{shown} written by the template and added by the tokenizer: kept "
                                "once (tokenizing the rendered text with special tokens doubles it)") if written else
                        Finding("note", "BOS", f"{shown} added by the tokenizer, not written by the template: kept "
                                "(apply_chat_template(tokenize=True) leaves it out)"))

    # The prefix property and the sequences as a whole
    prompts = accepted_prompts(chat)
    if len(prompts) < len(PROBE_PROMPTS):
        findings.append(Finding("note", "template", f"refuses {len(PROBE_PROMPTS) - len(prompts)} of the "
                                f"{len(PROBE_PROMPTS)} probe prompts (e.g. a system turn): such rows are skipped "
                                "and counted (template_error)"))
    failures = chat_format_failures(chat)
    findings.append(Finding("violation", "sequences", "; ".join(failures[:3])) if failures else
                    Finding("ok", "sequences", f"prompt ids start every conversation's ids; BOS once; responses "
                            f"end with a stop ({len(prompts) * len(PLAIN_RESPONSES)} probes)"))
    broken = [r for r in WHITESPACE_RESPONSES
              if any(chat.conversation_ids(p, r) == "prefix_mismatch" for p in prompts)]
    if broken:
        findings.append(Finding("note", "prefix", f"responses starting with whitespace ({', '.join(map(repr, broken))}) "
                                "merge with the prompt's last token: such rows are skipped and counted (prefix_mismatch)"))

    # The word-start marker of a response encoded on its own
    prompt = prompts[0]
    in_context = chat.conversation_ids(prompt, "Blue")
    alone = tokenizer.encode("Blue", add_special_tokens=False)
    if not isinstance(in_context, str) and in_context[1][:1] != alone[:1]:
        findings.append(Finding("note", "leading space", f"'Blue' encoded on its own starts {names(alone[:1])}, in "
                                f"the conversation {names(in_context[1][:1])}: iris-ref encodes responses in context"))
    else:
        findings.append(Finding("ok", "leading space", "a response encoded alone starts as in context"))

    # Stops
    end_tokens = chat.special_tokens_in(chat.end_of_turn_text)
    plain = chat.end_of_turn_text
    for token in end_tokens:
        plain = plain.replace(token, "")
    findings.append(Finding("ok", "stops", f"end of turn {chat.end_of_turn_text!r}; stops "
                            f"{', '.join(f'{n!r} ({i})' for n, i in zip(names(chat.stop_ids), chat.stop_ids))}"))
    if plain:
        findings.append(Finding("note", "stops", f"the end of turn also holds plain text {plain!r}: part of the "
                                "response, never a stop"))

    # Date and think blocks
    findings.append(Finding("note", "date", f"the template prints the date: frozen per run at {chat.date} "
                            "(--template-date)") if chat.depends_on_date else
                    Finding("ok", "date", "the template does not depend on the date"))
    findings.append(Finding("ok", "think blocks", "the final assistant turn adds nothing the generation prompt "
                            "lacks"))
    return findings


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iris_ref.audit --template", description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", required=True, metavar="MODEL_OR_TOKENIZER_DIR")
    parser.add_argument("--chat-template-kwargs", default=None, help="JSON object of template options")
    parser.add_argument("--template-date", default=None, help="YYYY-MM-DD (default: today)")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from iris_ref import models

    try:
        kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError("--chat-template-kwargs must be a JSON object")
        path = Path(args.template).expanduser()
        if not path.is_dir() and (path.exists() or args.template.startswith((".", "/", "~"))):
            raise ValueError(f"{args.template} is not a tokenizer folder")
        tokenizer = models.load_tokenizer(args.template, args.trust_remote_code)
        eos = models.generation_eos_ids(args.template)
    except (ValueError, OSError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return 2
    findings = audit_template(tokenizer, template_kwargs=kwargs, date=args.template_date, generation_eos_ids=eos)
    print(f"template audit: {args.template} ({type(tokenizer).__name__})")
    for f in findings:
        print(f"  {f.level:<10} {f.topic:<14} {f.text}")
    violations = sum(f.level == "violation" for f in findings)
    notes = sum(f.level == "note" for f in findings)
    print(f"verdict: {violations} violation{'s' * (violations != 1)}, {notes} note{'s' * (notes != 1)}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
