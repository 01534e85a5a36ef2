"""The embedded default: a tiny tokenizer, a tiny Qwen2 model and a toy task, all offline.

Everything here is built on the spot (the tokenizer trains in a few hundredths of a second,
the model initialises in well under a second), so there is nothing to download and nothing
to cache.

The toy task has three families of prompts whose answers can be checked exactly and which
all have SEVERAL valid answers, so that a model's sampled-answer distribution can be compared
with the data's (the data's answer is uniform over the valid answers):

* ``Give two digits that add up to 11.``         -> ``2+9``, ``9+2``, ``3+8``, ...
* ``Name a letter between c and h.``             -> ``d``, ``e``, ``f`` or ``g``
* ``Give an even number between 23 and 31.``     -> ``24``, ``26``, ``28`` or ``30``

The families differ in difficulty for a ~1M-parameter model (a lookup table of digit pairs,
the alphabet's order, comparisons of two-digit numbers), so a short SFT warm-up gets part of
the way and leaves room for self-play to move the model.

A second, "long" toy task (its own files, ``long_train.jsonl`` / ``long_heldout.jsonl``) has
answers of 9-15 tokens whose validity is a property of the whole sequence:

* ``Give 5 digits that add up to 23.``           -> ``1<3<5<6<8``, ``0<4<5<6<8``, ... (20 answers)

N distinct digits (N = 5..8) in increasing order, joined by ``<``, that add up to S; the
pairs (N, S) with 2 to 24 valid answers (74 prompts). Each token is constrained by the
prompt and the tokens before it (count, order, the running sum), so a model can be partly
right: well-formed and increasing but with the wrong sum, or the wrong number of digits.
Its prompts use only words that are already single tokens of the tiny tokenizer (trained on
the first task), so the tokenizer, and with it the model's vocabulary and initialisation,
are the same as without it; see ``_tokenizer_corpus``.

Regenerate the shipped data (seeded, byte-for-byte reproducible) with
``python -m iris_ref.tiny --write-toy-data``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import re
import string
from pathlib import Path

import torch

TOY_DATA_DIR = Path(__file__).resolve().parent / "toy_data"
TOY_TRAIN_PATH = TOY_DATA_DIR / "train.jsonl"
TOY_HELDOUT_PATH = TOY_DATA_DIR / "heldout.jsonl"

TOY_DATA_SEED = 1234
TOY_TRAIN_SIZE = 2000
TOY_HELDOUT_SIZE = 200

TOY_LONG_TRAIN_PATH = TOY_DATA_DIR / "long_train.jsonl"
TOY_LONG_HELDOUT_PATH = TOY_DATA_DIR / "long_heldout.jsonl"
TOY_LONG_DATA_SEED = 4321
TOY_LONG_DIGIT_COUNTS = (5, 6, 7, 8)
TOY_LONG_MIN_ANSWERS = 2
TOY_LONG_MAX_ANSWERS = 24

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]

TINY_VOCAB_SIZE = 512

# Qwen2's chat template without its default system prompt (the toy sequences stay short):
# <|im_start|>role\ncontent<|im_end|>\n per turn, and <|im_start|>assistant\n as the
# generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen2's pre-tokenisation regex: digits are split one by one, which keeps the toy
# arithmetic learnable with a small vocabulary.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ---------------------------------------------------------------------------------------
# The toy task
# ---------------------------------------------------------------------------------------

_SUM_PROMPT = re.compile(r"Give two digits that add up to (\d+)\.")
_LETTER_PROMPT = re.compile(r"Name a letter between ([a-z]) and ([a-z])\.")
_PARITY_PROMPT = re.compile(r"Give an (even|odd) number between (\d+) and (\d+)\.")
_SUM_ANSWER = re.compile(r"([0-9])\+([0-9])")
_LETTER_ANSWER = re.compile(r"[a-z]")
_NUMBER_ANSWER = re.compile(r"0|[1-9][0-9]*")
_DIGITS_PROMPT = re.compile(r"Give (\d+) digits that add up to (\d+)\.")
_DIGITS_ANSWER = re.compile(r"[0-9](?:<[0-9])*")


@functools.lru_cache(maxsize=None)
def _increasing_digits(count: int, total: int) -> tuple[str, ...]:
    """Every ``count`` distinct digits adding up to ``total``, increasing, joined by ``<``."""
    if not 1 <= count <= 10:
        return ()
    return tuple("<".join(map(str, digits)) for digits in itertools.combinations(range(10), count)
                 if sum(digits) == total)


def toy_valid_answers(prompt_text: str) -> list[str]:
    """Every valid answer of a toy prompt (the prompt may be embedded in a longer text)."""
    match = _SUM_PROMPT.search(prompt_text)
    if match:
        total = int(match.group(1))
        return [f"{a}+{total - a}" for a in range(10) if 0 <= total - a <= 9]
    match = _LETTER_PROMPT.search(prompt_text)
    if match:
        low, high = match.group(1), match.group(2)
        return [c for c in string.ascii_lowercase if low < c < high]
    match = _PARITY_PROMPT.search(prompt_text)
    if match:
        parity, low, high = match.group(1), int(match.group(2)), int(match.group(3))
        remainder = 0 if parity == "even" else 1
        return [str(n) for n in range(low + 1, high) if n % 2 == remainder]
    match = _DIGITS_PROMPT.search(prompt_text)
    if match:
        return list(_increasing_digits(int(match.group(1)), int(match.group(2))))
    raise ValueError(f"not a toy-task prompt: {prompt_text[:80]!r}")


def toy_is_correct(prompt_text: str, response_text: str) -> bool:
    """Exact checker of the toy task: is ``response_text`` one of the prompt's valid answers?

    Surrounding whitespace in the response is ignored, nothing else: ``"2+9"`` is right for
    "add up to 11", ``"2 + 9"`` or ``"2+9."`` is not. ``prompt_text`` may be the user
    message or any text containing it (e.g. the rendered chat prompt).
    """
    answer = response_text.strip()
    match = _SUM_PROMPT.search(prompt_text)
    if match:
        parsed = _SUM_ANSWER.fullmatch(answer)
        return bool(parsed) and int(parsed.group(1)) + int(parsed.group(2)) == int(match.group(1))
    match = _LETTER_PROMPT.search(prompt_text)
    if match:
        return bool(_LETTER_ANSWER.fullmatch(answer)) and match.group(1) < answer < match.group(2)
    match = _PARITY_PROMPT.search(prompt_text)
    if match:
        if not _NUMBER_ANSWER.fullmatch(answer):
            return False
        value, low, high = int(answer), int(match.group(2)), int(match.group(3))
        wanted = 0 if match.group(1) == "even" else 1
        return low < value < high and value % 2 == wanted
    match = _DIGITS_PROMPT.search(prompt_text)
    if match:
        return toy_long_diagnosis(prompt_text, response_text) == "correct"
    raise ValueError(f"not a toy-task prompt: {prompt_text[:80]!r}")


TOY_LONG_DIAGNOSES = ("correct", "wrong_sum", "not_increasing", "wrong_count", "malformed")


def toy_long_diagnosis(prompt_text: str, response_text: str) -> str:
    """How right a response to a long-task prompt (``Give N digits that add up to S.``) is.

    The first that applies, from the worst: ``malformed`` (not single digits joined by
    ``<``), ``wrong_count`` (not N digits), ``not_increasing`` (a digit not above the one
    before it, repeats included), ``wrong_sum``; otherwise ``correct``. Surrounding
    whitespace is ignored, as in ``toy_is_correct``.
    """
    match = _DIGITS_PROMPT.search(prompt_text)
    if not match:
        raise ValueError(f"not a long toy-task prompt: {prompt_text[:80]!r}")
    answer = response_text.strip()
    if not _DIGITS_ANSWER.fullmatch(answer):
        return "malformed"
    digits = [int(d) for d in answer.split("<")]
    if len(digits) != int(match.group(1)):
        return "wrong_count"
    if any(a >= b for a, b in zip(digits, digits[1:])):
        return "not_increasing"
    if sum(digits) != int(match.group(2)):
        return "wrong_sum"
    return "correct"


def toy_answer_distance(prompt_text: str, responses: list[str]) -> float:
    """Total-variation distance between the empirical distribution of ``responses`` (stripped)
    and the data's answer distribution for the prompt (uniform over the valid answers).

    Invalid answers count as outcomes the data never produces. 0 = the data's distribution,
    1 = disjoint (e.g. only wrong answers). An empirical estimate: with n samples it is
    biased upwards by about sqrt(k / n) for k valid answers, so compare like with like.
    """
    if not responses:
        raise ValueError("toy_answer_distance needs at least one response")
    valid = toy_valid_answers(prompt_text)
    data_probability = 1.0 / len(valid)
    counts: dict[str, int] = {}
    for response in responses:
        counts[response.strip()] = counts.get(response.strip(), 0) + 1
    outcomes = set(counts) | set(valid)
    total = len(responses)
    return 0.5 * sum(
        abs(counts.get(outcome, 0) / total - (data_probability if outcome in valid else 0.0)) for outcome in outcomes
    )


def _toy_prompt(rng: random.Random) -> str:
    family = rng.randrange(3)
    if family == 0:
        return f"Give two digits that add up to {rng.randint(1, 17)}."
    if family == 1:
        low = rng.randrange(0, 22)
        high = rng.randint(low + 3, min(low + 8, 25))
        return f"Name a letter between {string.ascii_lowercase[low]} and {string.ascii_lowercase[high]}."
    parity = rng.choice(["even", "odd"])
    low = rng.randint(0, 80)
    high = low + rng.randint(5, 12)
    return f"Give an {parity} number between {low} and {high}."


def make_toy_rows(num_rows: int, seed: int) -> list[dict]:
    """``num_rows`` seeded toy conversations; each answer is uniform over the valid answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = _toy_prompt(rng)
        answer = rng.choice(toy_valid_answers(prompt))
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


def toy_long_prompts() -> list[tuple[int, int]]:
    """The long task's (N, S): N in ``TOY_LONG_DIGIT_COUNTS`` and every S with between
    ``TOY_LONG_MIN_ANSWERS`` and ``TOY_LONG_MAX_ANSWERS`` valid answers."""
    return [(count, total) for count in TOY_LONG_DIGIT_COUNTS for total in range(46)
            if TOY_LONG_MIN_ANSWERS <= len(_increasing_digits(count, total)) <= TOY_LONG_MAX_ANSWERS]


def make_toy_long_rows(num_rows: int, seed: int) -> list[dict]:
    """``num_rows`` seeded long-task conversations: N uniform over the digit counts, S uniform
    over that N's sums, the answer uniform over the valid answers."""
    rng = random.Random(seed)
    sums: dict[int, list[int]] = {}
    for count, total in toy_long_prompts():
        sums.setdefault(count, []).append(total)
    rows = []
    for _ in range(num_rows):
        count = rng.choice(TOY_LONG_DIGIT_COUNTS)
        prompt = f"Give {count} digits that add up to {rng.choice(sums[count])}."
        answer = rng.choice(toy_valid_answers(prompt))
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_toy_data(directory: Path = TOY_DATA_DIR) -> tuple[Path, Path]:
    """Write the shipped train/heldout JSONL files (two independent seeded draws)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / TOY_TRAIN_PATH.name, directory / TOY_HELDOUT_PATH.name)
    sizes = (TOY_TRAIN_SIZE, TOY_HELDOUT_SIZE)
    for offset, (path, size) in enumerate(zip(paths, sizes)):
        _write_rows(path, make_toy_rows(size, TOY_DATA_SEED + offset))
    return paths


def write_toy_long_data(directory: Path = TOY_DATA_DIR) -> tuple[Path, Path]:
    """Write the long task's train/heldout JSONL files (two independent seeded draws)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / TOY_LONG_TRAIN_PATH.name, directory / TOY_LONG_HELDOUT_PATH.name)
    sizes = (TOY_TRAIN_SIZE, TOY_HELDOUT_SIZE)
    for offset, (path, size) in enumerate(zip(paths, sizes)):
        _write_rows(path, make_toy_long_rows(size, TOY_LONG_DATA_SEED + offset))
    return paths


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    """Training text of the tiny BPE: the toy train set rendered turn by turn (without the
    special tokens, which the trainer adds as whole tokens), plus the role names.

    The long task is not in it, on purpose: every word of its prompts is already one token
    and its answers are single characters, so each of its pre-tokens is one token, which no
    BPE (with this pre-tokeniser) can improve on; adding its rows would only reorder the
    merges and so change the token ids, the vocabulary size and the model initialisation
    of the first task (tests/test_tiny.py checks both facts)."""
    texts = [f"{role}\n" for role in ("system", "user", "assistant")]
    for row in _read_jsonl(TOY_TRAIN_PATH):
        for message in row["messages"]:
            texts.append(f"{message['role']}\n{message['content']}\n")
    return texts


def build_tiny_tokenizer():
    """A deterministic byte-level BPE of ``TINY_VOCAB_SIZE`` tokens trained on the toy corpus.

    Byte-level, so any UTF-8 text round-trips; Qwen2's pre-tokeniser; special tokens
    ``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>`` (end of turn = eos) and a
    Qwen2-style chat template. Returned as a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer):
    """Qwen2 architecture, ~1M parameters, tied embeddings."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(tokenizer, seed: int = 0):
    """A randomly initialised tiny ``Qwen2ForCausalLM``; the init is seeded without touching
    the caller's global RNG state."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def save_tiny_checkpoint(path, seed: int = 0) -> Path:
    """Write a full HF folder (safetensors weights, config, generation config, tokenizer with
    chat template) loadable by ``AutoModelForCausalLM``/``AutoTokenizer``."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iris_ref.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--write-toy-data", action="store_true",
                        help="regenerate iris_ref/toy_data/*.jsonl (both tasks)")
    parser.add_argument("--save-checkpoint", metavar="DIR", help="save a random tiny model + tokenizer to DIR")
    parser.add_argument("--seed", type=int, default=0, help="model init seed for --save-checkpoint")
    args = parser.parse_args(argv)
    if not (args.write_toy_data or args.save_checkpoint):
        parser.error("nothing to do: pass --write-toy-data and/or --save-checkpoint DIR")
    if args.write_toy_data:
        for path in (*write_toy_data(), *write_toy_long_data()):
            print(f"wrote {path}")
    if args.save_checkpoint:
        print(f"saved {save_tiny_checkpoint(args.save_checkpoint, seed=args.seed)}")


if __name__ == "__main__":
    _main()
