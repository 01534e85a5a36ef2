"""Real tokenizer families, built offline in milliseconds, with the published chat templates.

Our toy tokenizer hides the bugs real users hit (a leading ``▁`` that appears only when a word
starts a sequence, a BOS written twice, merges across the prompt/response boundary, an end of
turn that is not ``eos_token``...). The builders below train tiny vocabularies on a small
built-in corpus, but assemble each ``tokenizers`` pipeline exactly the way transformers builds
the real one, so every pipeline component a real checkpoint uses is exercised:

============================  =======================================  ===========================
family (builder)              mirrors                                  transformers 5.20 code
============================  =======================================  ===========================
``sentencepiece_llama``       Llama 2, Mistral-7B-v0.1 (Zephyr)        ``LlamaConverter``;
                                                                       ``LlamaTokenizer.__init__``
``sentencepiece_gemma``       Gemma, Gemma 2                           ``GemmaConverter``;
                                                                       ``GemmaTokenizer.__init__``
``bytelevel_gpt2``            GPT-2 (+ TRL ``setup_chat_format``)      ``GPT2Converter``
``bytelevel_qwen2``           Qwen2 / Qwen2.5 / Qwen3                  ``Qwen2Converter``;
                                                                       ``Qwen2Tokenizer.__init__``
``tiktoken_llama3``           Llama 3 / 3.1 / 3.2                      ``TikTokenConverter`` + the
                                                                       post-processor of the
                                                                       published tokenizer.json
============================  =======================================  ===========================

Choices (each one pinned by ``tests/test_tokenizer_families.py``):

* SentencePiece-style (Llama 2 / Mistral): BPE with ``byte_fallback=True`` and ``fuse_unk=True``;
  ids ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<0x00>``..``<0xFF>``=3..258 as in the real vocab.
  Newline is not a vocabulary piece (the real models encode it as ``<0x0A>``) and digits are
  single pieces that never merge with ``▁`` (SentencePiece ``split_digits``), so ``"42"`` alone
  is ``▁ 4 2``. The word-start marker comes in three flavours, selected by ``prepend``:

  - ``"normalizer"``: what the published ``tokenizer.json`` files of Llama-2 and Mistral-7B-v0.1
    contain (``LlamaConverter`` with ``legacy=True``; what transformers 4.x and raw ``tokenizers``
    run): normalizer ``Sequence([Prepend("▁"), Replace(" ", "▁")])``, no pre-tokenizer. The
    ``▁`` is prepended to *every* text segment, i.e. also after each special token
    (``</s>\\n`` -> ``</s> ▁ <0x0A>``), and a segment that already starts with a space gets two
    (``<s> [INST]`` -> ``<s> ▁ ▁[``).
  - ``"always"`` (default, used by the registry): what ``AutoTokenizer`` in transformers 5.20
    builds when it loads the real checkpoint: ``LlamaTokenizer.__init__`` drops the file's
    normalizer and pre-tokenizer and installs ``Metaspace(prepend_scheme="always", split=False)``
    because ``tokenizer_config.json`` says ``"legacy": true``. Same as ``"normalizer"`` except
    that a segment that already starts with a space gets one ``▁``, not two.
  - ``"first"``: ``legacy=False`` (``Metaspace(prepend_scheme="first", split=False)``): ``▁`` only
    at the very start of the text, never after a special token.

  The post-processor is the ``TemplateProcessing`` that adds ``<s>`` (``add_bos_token=True``).
* Gemma: ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, ``<mask>``=4 and ``<start_of_turn>``,
  ``<end_of_turn>`` as special added tokens; normalizer ``Replace(" ", "▁")`` with no prefix
  (no dummy prefix: ``"Blue"`` alone has no ``▁``), newlines are real pieces (``\\n``, ``\\n\\n``),
  digits split, byte fallback, post-processor adds ``<bos>``.
* Byte-level (GPT-2, Qwen2): ``ByteLevel`` pre-tokenizer (GPT-2 regex) or Qwen2's ``Split``
  regex (single digits) followed by ``ByteLevel(use_regex=False)``, NFC for Qwen. Specials are
  appended after the BPE vocab as in the real files. Qwen has no BOS (``bos_token=None``) and
  ``add_special_tokens=True`` adds nothing; Qwen3's ``<think>``/``</think>`` are added but not
  special (``skip_special_tokens=True`` keeps them).
* tiktoken-style (Llama 3.x): byte-level BPE with ``ignore_merges=True``, Llama 3's split regex
  (digits in groups of up to 3) and the published post-processor
  ``Sequence([ByteLevel(trim_offsets=False), TemplateProcessing(<|begin_of_text|> $A)])``.
  Only the first 11 of the 256 reserved specials are created (ids in the real order).

What is *not* reproduced: the vocabularies are tiny and trained here, so ids and the exact
split of rare words differ from the real ones (``"Blue"`` is one piece, ``"Alibaba"`` is
letters); whitespace-run pieces (``▁▁▁``) and the unused/reserved tokens are absent.

The registry ``FIXTURES`` names real model setups (tokenizer + verbatim template from
``tests/fixtures/chat_templates``, see ``SOURCES.md`` there) with the special ids of the real
``generation_config.json`` written as tokens, mapped to this vocabulary's ids
(``generation_eos_ids``). ``tokenizer(name)`` returns a fresh object on each call (training is
cached per process, a call costs a few ms). ``save_fixture``/``save_fixture_model`` write a
folder that ``AutoTokenizer``,
``GenerationConfig`` and ``AutoModelForCausalLM`` load offline. The saved
``tokenizer_config.json`` names the *real* tokenizer class (``LlamaTokenizer``,
``Qwen2Tokenizer``...) so that loading goes through the same transformers code path as loading
the real checkpoint (for the SentencePiece family that means the ``"always"`` flavour above).

Dates in Llama 3.x templates (transformers 5.20): ``apply_chat_template`` renders with a jinja
environment whose global ``strftime_now(fmt)`` returns ``datetime.now().strftime(fmt)``
(``transformers.utils.chat_template_utils._cached_compile_jinja_template``), and every extra
keyword argument of ``apply_chat_template`` is passed to ``template.render(**kwargs)``, where it
shadows globals. So both ``apply_chat_template(..., date_string="26 Jul 2024")`` (the template
only computes the date ``if not date_string is defined``) and
``apply_chat_template(..., strftime_now=lambda fmt: "26 Jul 2024")`` freeze the date (the
latter only matters for templates that call it). Note that the *published Llama-3.1-8B-Instruct*
template never calls ``strftime_now``: it defaults to the constant ``"26 Jul 2024"``. The
clock-dependent one is Llama-3.2's (fixture ``llama3_2``, same tokenizer).
"""

from __future__ import annotations

import functools
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers
from transformers import PreTrainedTokenizerFast

TEMPLATES_DIR = Path(__file__).parent / "fixtures" / "chat_templates"

# A small English corpus with digits, the words the tests use and the punctuation the templates
# write, so that words like "Blue" become single pieces while the alphabet covers the templates.
_SENTENCES = (
    "The sky is blue. Blue is my favourite colour, and blue is the colour of the sea.",
    "What colour is the sky? The sky is Blue on a clear day.",
    "What is the capital of France? Paris is the capital of France.",
    "Hello, how are you today? I am fine, thank you. Hello there!",
    "The answer is 42. The answer to 2 + 2 is 4, and 12 + 30 = 42.",
    "There are 365 days in a year and 24 hours in a day; 1000 is a large number.",
    "You are a helpful assistant. Answer the question of the user in one word.",
    "The user asks a question, the assistant answers it, and the model thinks first.",
    "Please think step by step before you answer. Think, then answer.",
    "Red, green and Blue are colours. Yellow is a colour too.",
    "I like apples and oranges; she likes 7 apples and 3 pears.",
    "A system prompt tells the assistant who it is: You are Qwen, a helpful assistant.",
    "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "[INST] Who are you? [/INST] I am an assistant. <<SYS>> system <</SYS>>",
    "<|user|> <|assistant|> <|system|> user assistant system model tool",
)
CORPUS: tuple[str, ...] = _SENTENCES * 4
# Multi-line documents for the families whose vocabulary has newline pieces.
_DOCUMENTS = tuple("\n".join(_SENTENCES[i : i + 3]) + "\n\n" for i in range(0, len(_SENTENCES), 3)) * 4

# Characters that are ordinary pieces in every family (the templates' punctuation included).
_PRINTABLE = [c for c in string.printable if not c.isspace()]

_LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
_GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
_BYTE_PIECES = tuple(f"<0x{i:02X}>" for i in range(256))

# Qwen2.5's added tokens in the real order (ids 151643..151664): (content, special).
_QWEN2_ADDED = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)  # fmt: skip
# Qwen3 appends these (ids 151665..151668); none of them is special.
_QWEN3_EXTRA = (("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False))

# Llama 3.1's first specials, ids 128000..128010 in the real vocabulary.
_LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)  # fmt: skip

# Split regexes copied from transformers 5.20 (Qwen2Converter / TikTokenConverter).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _special(content: str) -> AddedToken:
    return AddedToken(content, normalized=False, special=True)


def _train_merges(normalizer, pre_tokenizer, texts, vocab_size, alphabet) -> tuple[list[str], list[list[str]]]:
    """Train a BPE and return (tokens in id order, merges). Only used to get a plausible vocab."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=alphabet, special_tokens=[]
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    # merges are ["a", "b"] pairs in tokenizers >= 0.20, "a b" strings before
    return tokens, [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]


def _wrap(tok: Tokenizer, **special_tokens) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special_tokens)


# --------------------------------------------------------------------------- SentencePiece
@functools.cache
def _llama2_vocab() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    # Training-time split that mimics SentencePiece's constraints: "▁" only starts a piece,
    # letters and punctuation never share a piece (split_by_unicode_script), digits stay alone
    # (split_digits). The trained merges therefore never cross these borders, so the real
    # inference pipeline (no pre-tokenizer at all) can run BPE over whole segments like Llama.
    pieces, merges = _train_merges(
        normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
        pre_tokenizers.Split(Regex(r"▁?\p{L}+|▁?[^\p{L}\p{N}▁]+|▁|\p{N}"), behavior="isolated"),
        CORPUS,  # no newline in it: "\n" must go through byte fallback as in Llama/Mistral
        vocab_size=400,
        alphabet=_PRINTABLE + ["▁"],
    )
    return tuple(pieces), tuple(tuple(m) for m in merges)


def sentencepiece_llama(prepend: Literal["always", "normalizer", "first"] = "always") -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral-7B-v0.1 style tokenizer (see the module docstring for ``prepend``)."""
    pieces, merges = _llama2_vocab()
    vocab = {t: i for i, t in enumerate(_LLAMA2_SPECIALS + _BYTE_PIECES)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.add_special_tokens([_special(t) for t in _LLAMA2_SPECIALS])
    if prepend == "normalizer":  # LlamaConverter.normalizer, legacy=True; no pre-tokenizer
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:  # LlamaTokenizer.__init__ in transformers 5.x (and LlamaConverter with legacy=False)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    # LlamaConverter.decoder with add_prefix_space=True
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # What LlamaTokenizerFast.update_post_processor writes for add_bos_token=True
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def _gemma_vocab() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    pieces, merges = _train_merges(
        normalizers.Replace(" ", "▁"),  # no Prepend: Gemma has no dummy prefix
        pre_tokenizers.Split(Regex(r"\n+|▁?\p{L}+|▁?[^\p{L}\p{N}▁\n]+|▁+|\p{N}"), behavior="isolated"),
        _DOCUMENTS,  # Gemma's vocabulary has "\n", "\n\n"... pieces
        vocab_size=450,
        alphabet=_PRINTABLE + ["▁", "\n", "\t"],
    )
    return tuple(pieces), tuple(tuple(m) for m in merges)


def sentencepiece_gemma() -> PreTrainedTokenizerFast:
    """Gemma / Gemma 2 style tokenizer (GemmaConverter)."""
    pieces, merges = _gemma_vocab()
    vocab = {t: i for i, t in enumerate(_GEMMA_SPECIALS + _GEMMA_TURN_TOKENS + _BYTE_PIECES)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    # GemmaConverter: control tokens and <start_of_turn>/<end_of_turn> are special added tokens
    tok.add_special_tokens([_special(t) for t in _GEMMA_SPECIALS + _GEMMA_TURN_TOKENS])
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # a no-op after the normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    return _wrap(
        tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        additional_special_tokens=list(_GEMMA_TURN_TOKENS),
    )


# --------------------------------------------------------------------------- byte level
@functools.cache
def _bytelevel_vocab(kind: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    if kind == "gpt2":
        normalizer, pre_tok = None, pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        normalizer = normalizers.NFC() if kind == "qwen2" else None
        pattern = QWEN2_PATTERN if kind == "qwen2" else LLAMA3_PATTERN
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    pieces, merges = _train_merges(
        normalizer, pre_tok, _DOCUMENTS, vocab_size=600, alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    return tuple(pieces), tuple(tuple(m) for m in merges)


def _bytelevel_tokenizer(kind: str) -> Tokenizer:
    pieces, merges = _bytelevel_vocab(kind)
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(pieces)},
            merges=[tuple(m) for m in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.decoder = decoders.ByteLevel()
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pattern = QWEN2_PATTERN if kind == "qwen2" else LLAMA3_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def bytelevel_gpt2(chatml: bool = True) -> PreTrainedTokenizerFast:
    """GPT-2; with ``chatml`` as left by TRL's ``setup_chat_format`` (ChatML tokens appended,
    bos/eos/pad switched to ``<|im_start|>``/``<|im_end|>``/``<|im_end|>``)."""
    tok = _bytelevel_tokenizer("gpt2")
    tok.add_special_tokens([_special("<|endoftext|>")])  # GPT-2: last id of the vocabulary
    if not chatml:
        return _wrap(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.add_special_tokens([_special("<|im_start|>"), _special("<|im_end|>")])
    return _wrap(
        tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def bytelevel_qwen2(qwen3: bool = False) -> PreTrainedTokenizerFast:
    """Qwen2 / Qwen2.5 tokenizer, or Qwen3's (same plus the tool-response and think tokens)."""
    tok = _bytelevel_tokenizer("qwen2")
    added = _QWEN2_ADDED + (_QWEN3_EXTRA if qwen3 else ())
    tok.add_tokens([AddedToken(t, normalized=False, special=s) for t, s in added])
    return _wrap(
        tok,
        bos_token=None,  # Qwen has no BOS; nothing is added by add_special_tokens=True
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[t for t, s in _QWEN2_ADDED[1:] if s],
    )


def tiktoken_llama3() -> PreTrainedTokenizerFast:
    """Llama 3 / 3.1 / 3.2 tokenizer (TikTokenConverter + the published post-processor)."""
    tok = _bytelevel_tokenizer("llama3")
    tok.model.ignore_merges = True  # TikTokenConverter: whole-word vocabulary hits win over merges
    tok.add_special_tokens([_special(t) for t in _LLAMA3_SPECIALS])
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|>:0 $A:0",
                pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
            ),
        ]
    )
    return _wrap(tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Fixture:
    """A real model setup: which tokenizer family, which published template, which stop ids."""

    model: str  # the real checkpoint this imitates
    build: Callable[[], PreTrainedTokenizerFast]  # tokenizer *without* chat template
    template: str  # file name in TEMPLATES_DIR
    # The real generation_config.json token ids, written as tokens (a tuple is a list of ids, in
    # the real order) so that they map onto this vocabulary's ids.
    generation: dict[str, str | tuple[str, ...]]
    tokenizer_class: str  # what the real tokenizer_config.json names
    architecture: str  # model_type used by save_fixture_model
    tokenizer_config: dict = field(default_factory=dict)  # real tokenizer_config.json keys that matter


_LEGACY_LLAMA = {"add_bos_token": True, "add_eos_token": False, "legacy": True}
_LLAMA3_GENERATION = {"bos_token_id": "<|begin_of_text|>", "eos_token_id": ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
_QWEN_GENERATION = {
    "bos_token_id": "<|endoftext|>",  # set although the tokenizer has no BOS
    "pad_token_id": "<|endoftext|>",
    "eos_token_id": ("<|im_end|>", "<|endoftext|>"),
}

FIXTURES: dict[str, Fixture] = {
    "zephyr": Fixture(
        "HuggingFaceH4/zephyr-7b-beta",
        sentencepiece_llama,
        "zephyr.jinja",
        {"bos_token_id": "<s>", "eos_token_id": "</s>"},
        "LlamaTokenizer",
        "mistral",
        {**_LEGACY_LLAMA, "pad_token": "</s>"},
    ),
    # The same tokenizer converted with legacy=False (no "▁" after special tokens).
    "zephyr_nonlegacy": Fixture(
        "HuggingFaceH4/zephyr-7b-beta, legacy=False variant",
        functools.partial(sentencepiece_llama, prepend="first"),
        "zephyr.jinja",
        {"bos_token_id": "<s>", "eos_token_id": "</s>"},
        "LlamaTokenizer",
        "mistral",
        {**_LEGACY_LLAMA, "legacy": False, "pad_token": "</s>"},
    ),
    "mistral_instruct": Fixture(
        "mistralai/Mistral-7B-Instruct-v0.1 (template shared with v0.2)",
        sentencepiece_llama,
        "mistral_instruct.jinja",
        {"bos_token_id": "<s>", "eos_token_id": "</s>"},
        "LlamaTokenizer",
        "mistral",
        dict(_LEGACY_LLAMA),
    ),
    "llama2_chat": Fixture(
        "meta-llama/Llama-2-7b-chat-hf",
        sentencepiece_llama,
        "llama2_chat.jinja",
        {"bos_token_id": "<s>", "eos_token_id": "</s>", "pad_token_id": "<unk>"},
        "LlamaTokenizer",
        "llama",
        dict(_LEGACY_LLAMA),
    ),
    "llama3_1": Fixture(
        "meta-llama/Llama-3.1-8B-Instruct",
        tiktoken_llama3,
        "llama3_1.jinja",
        _LLAMA3_GENERATION,
        "PreTrainedTokenizerFast",
        "llama",
    ),
    # Same tokenizer; this template is the one that reads the clock (strftime_now).
    "llama3_2": Fixture(
        "meta-llama/Llama-3.2-3B-Instruct",
        tiktoken_llama3,
        "llama3_2.jinja",
        _LLAMA3_GENERATION,
        "PreTrainedTokenizerFast",
        "llama",
    ),
    "qwen2_5": Fixture(
        "Qwen/Qwen2.5-7B-Instruct",
        bytelevel_qwen2,
        "qwen2_5.jinja",
        _QWEN_GENERATION,
        "Qwen2Tokenizer",
        "qwen2",
    ),
    "qwen3": Fixture(
        "Qwen/Qwen3-0.6B",
        functools.partial(bytelevel_qwen2, qwen3=True),
        "qwen3.jinja",
        _QWEN_GENERATION,
        "Qwen2Tokenizer",
        "qwen3",
    ),
    "gemma": Fixture(
        "google/gemma-2-2b-it",
        sentencepiece_gemma,
        "gemma.jinja",
        # the turn ends with <end_of_turn>, which is not tokenizer.eos_token
        {"bos_token_id": "<bos>", "pad_token_id": "<pad>", "eos_token_id": ("<eos>", "<end_of_turn>")},
        "GemmaTokenizer",
        "gemma2",
        {"add_bos_token": True, "add_eos_token": False},
    ),
    # trl.setup_chat_format also points generation_config's bos/eos/pad at the ChatML tokens.
    "chatml": Fixture(
        "openai-community/gpt2 after trl.setup_chat_format",
        bytelevel_gpt2,
        "chatml.jinja",
        {"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|im_end|>"},
        "GPT2Tokenizer",
        "gpt2",
    ),
}


def template_text(name: str) -> str:
    return (TEMPLATES_DIR / FIXTURES[name].template).read_text(encoding="utf-8")


def tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer for fixture ``name`` with its chat template (training is cached)."""
    fx = FIXTURES[name]
    tok = fx.build()  # cheap once _llama2_vocab & co are cached; a new object each call
    tok.chat_template = template_text(name)
    if "pad_token" in fx.tokenizer_config:
        tok.pad_token = fx.tokenizer_config["pad_token"]
    return tok


def generation_ids(name: str, tok: PreTrainedTokenizerFast | None = None) -> dict[str, int | list[int]]:
    """The real ``generation_config`` special ids of ``name``, mapped to this vocabulary."""
    tok = tok or tokenizer(name)
    # a tuple stays a list of ids (the real file has a list), a single token stays an int
    return {
        key: tok.convert_tokens_to_ids(list(tokens) if isinstance(tokens, tuple) else tokens)
        for key, tokens in FIXTURES[name].generation.items()
    }


def generation_eos_ids(name: str, tok: PreTrainedTokenizerFast | None = None) -> int | list[int]:
    """The real ``generation_config.eos_token_id`` of ``name`` (int or list, as in the real file)."""
    return generation_ids(name, tok)["eos_token_id"]


def _generation_config(name: str, tok: PreTrainedTokenizerFast):
    from transformers import GenerationConfig

    return GenerationConfig(**generation_ids(name, tok))


def save_fixture(name: str, folder: str | Path) -> Path:
    """Save tokenizer + chat template + generation_config.json so that ``AutoTokenizer`` and
    ``GenerationConfig.from_pretrained(folder)`` load them offline.

    ``tokenizer_config.json`` is patched to name the real tokenizer class and the real keys
    (``legacy``, ``add_bos_token``...), so loading follows the same code path as the real model.
    """
    folder = Path(folder)
    fx = FIXTURES[name]
    tok = tokenizer(name)
    tok.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = fx.tokenizer_class
    config.update(fx.tokenizer_config)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _generation_config(name, tok).save_pretrained(folder)
    return folder


def _model_config(name: str, tok: PreTrainedTokenizerFast):
    import transformers

    fx = FIXTURES[name]
    # config.json carries the same special ids as generation_config.json in the real checkpoints
    common = {"vocab_size": len(tok), "pad_token_id": None, **generation_ids(name, tok)}
    if fx.architecture == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, **common)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
    }[fx.architecture]
    extra = {"head_dim": 8} if fx.architecture in ("qwen3", "gemma2") else {}
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
        **common,
    )


def save_fixture_model(name: str, folder: str | Path, seed: int = 0) -> Path:
    """``save_fixture`` plus a tiny random causal LM of the matching architecture
    (hidden 32, 2 layers, vocab = ``len(tokenizer)``), loadable with ``AutoModelForCausalLM``."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = save_fixture(name, folder)
    tok = tokenizer(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_model_config(name, tok))
    model.generation_config = _generation_config(name, tok)
    model.save_pretrained(folder)
    return folder
