"""Pins how each real tokenizer family + published chat template behaves (transformers 5.20).

These are the facts the rest of the suite may rely on when it uses ``tests.tokenizer_families``;
each test names the real-world behaviour it reproduces.
"""

import datetime
import hashlib
import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import chat_template_utils

from tests import tokenizer_families as tf

QUESTION = [{"role": "user", "content": "What colour is the sky?"}]


def answered(content, question=QUESTION):
    return question + [{"role": "assistant", "content": content}]


def ids(tok, conversation, **kwargs):
    # transformers 5.x: apply_chat_template(tokenize=True) returns a BatchEncoding by default and
    # tokenizes with add_special_tokens=False (the template is responsible for BOS).
    return tok.apply_chat_template(conversation, **kwargs)["input_ids"]


def pieces(tok, token_ids):
    return tok.convert_ids_to_tokens(token_ids)


# --------------------------------------------------------------------------- templates
TEMPLATE_SHA256 = {
    "chatml.jinja": "153280e3ff55d19da1398bdb3914ee2a51b80429bfaedde11d7d216c39db80f3",
    "gemma.jinja": "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
    "llama2_chat.jinja": "e8d5b5a546d3f19df16a5320c614fab05bdc4edd50e850f1afd947b503ea41cf",
    "llama3_1.jinja": "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
    "llama3_2.jinja": "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
    "mistral_instruct.jinja": "796853172235ab3aaa4810013ddfe2eab481bda3306dad4f700c00d436eed596",
    "qwen2_5.jinja": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "qwen3.jinja": "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
    "zephyr.jinja": "66291cf0045c2425a3a667cf3cbb7af2b11f09e025c02f97245323ab79119362",
}


def test_templates_are_the_published_bytes():
    """The fixtures are verbatim copies (see SOURCES.md): no editor may 'fix' a trailing newline."""
    files = {p.name: p for p in tf.TEMPLATES_DIR.glob("*.jinja")}
    assert set(files) == set(TEMPLATE_SHA256)
    for name, digest in TEMPLATE_SHA256.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == digest, name
    assert {fx.template for fx in tf.FIXTURES.values()} == set(TEMPLATE_SHA256)
    sources = (tf.TEMPLATES_DIR / "SOURCES.md").read_text(encoding="utf-8")
    assert all(name in sources for name in TEMPLATE_SHA256)


@pytest.mark.parametrize("name", sorted(tf.FIXTURES))
def test_every_fixture_renders_and_round_trips(name):
    tok = tf.tokenizer(name)
    text = tok.apply_chat_template(answered("Blue"), tokenize=False)
    assert "What colour is the sky?" in text and "Blue" in text
    token_ids = ids(tok, answered("Blue"))
    assert tok.unk_token_id is None or tok.unk_token_id not in token_ids
    decoded = tok.decode(token_ids)
    if name in ("zephyr", "llama2_chat"):
        # legacy=True: the "▁" put in front of the text after a special token decodes as a
        # space that was never in the rendered text ("</s>\n" -> "</s> \n", "<s>[INST]" -> "<s> [INST]").
        assert decoded != text
        assert decoded.replace("</s> ", "</s>").replace("<s> ", "<s>") == text
    else:
        assert decoded == text  # no unknown piece, no lost byte, no invented space


# (token add_special_tokens=True puts first or None, does the rendered chat start with bos_token)
BOS_POLICY = {
    "zephyr": ("<s>", False),
    "zephyr_nonlegacy": ("<s>", False),
    "mistral_instruct": ("<s>", True),
    "llama2_chat": ("<s>", True),
    "llama3_1": ("<|begin_of_text|>", True),
    "llama3_2": ("<|begin_of_text|>", True),
    "qwen2_5": (None, False),
    "qwen3": (None, False),
    "gemma": ("<bos>", True),
    # setup_chat_format makes bos_token "<|im_start|>", which the tokenizer never adds but every
    # ChatML turn starts with: code that strips a leading BOS would eat the first role marker.
    "chatml": (None, True),
}


@pytest.mark.parametrize("name", sorted(tf.FIXTURES))
def test_bos_policy(name):
    added, template_writes = BOS_POLICY[name]
    tok = tf.tokenizer(name)
    plain = tok("x", add_special_tokens=False)["input_ids"]
    with_special = tok("x")["input_ids"]
    assert with_special == ([tok.convert_tokens_to_ids(added)] if added else []) + plain
    chat = ids(tok, answered("Blue"))
    assert (tok.bos_token_id is not None and chat[0] == tok.bos_token_id) is template_writes
    if added and template_writes:  # rendering to text, then tokenizing with defaults: two BOS
        text = tok.apply_chat_template(answered("Blue"), tokenize=False)
        assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2


# --------------------------------------------------------------------------- SentencePiece
def test_zephyr_leading_marker_exists_only_at_the_start():
    """'Blue' alone is '▁Blue', but after the template's newline it is a bare 'Blue'."""
    tok = tf.tokenizer("zephyr")
    assert pieces(tok, tok("Blue", add_special_tokens=False)["input_ids"]) == ["▁Blue"]
    text = tok.apply_chat_template(answered("Blue"), tokenize=False)
    assert text.endswith("<|assistant|>\nBlue</s>\n")
    toks = pieces(tok, ids(tok, answered("Blue")))
    # "...|>", "<0x0A>", "Blue", "</s>", then the "\n" the template writes after </s>
    assert toks[-6:-2] == ["|>", "<0x0A>", "Blue", "</s>"], toks


def test_zephyr_digits_split_one_by_one():
    """The issue we fix: '42' alone is ▁,4,2 but 4,2 inside the rendered conversation."""
    tok = tf.tokenizer("zephyr")
    assert pieces(tok, tok("42", add_special_tokens=False)["input_ids"]) == ["▁", "4", "2"]
    toks = pieces(tok, ids(tok, answered("42")))
    assert toks[-5:-2] == ["4", "2", "</s>"]
    assert "▁4" not in tok.get_vocab() and "42" not in tok.get_vocab()


def test_sentencepiece_newline_goes_through_byte_fallback():
    for name in ("zephyr", "mistral_instruct", "llama2_chat"):
        tok = tf.tokenizer(name)
        vocab = tok.get_vocab()
        assert [vocab["<unk>"], vocab["<s>"], vocab["</s>"], vocab["<0x00>"], vocab["<0xFF>"]] == [0, 1, 2, 3, 258]
        assert not any("\n" in piece for piece in vocab)
        assert pieces(tok, tok("a\nb", add_special_tokens=False)["input_ids"]) == ["▁a", "<0x0A>", "b"]


def test_zephyr_bos_comes_from_the_tokenizer_not_the_template():
    tok = tf.tokenizer("zephyr")
    assert tok("x")["input_ids"][0] == tok.bos_token_id == 1  # add_special_tokens=True
    assert tok.bos_token_id not in ids(tok, answered("Blue"))  # the Zephyr template writes no <s>


def test_legacy_marker_after_special_tokens():
    """legacy=True (the real tokenizer_config) puts a '▁' in front of the text after each </s>:
    the template's '\\n' after </s> becomes '▁', '<0x0A>'. legacy=False does not."""
    legacy, first = tf.tokenizer("zephyr"), tf.tokenizer("zephyr_nonlegacy")
    assert pieces(legacy, ids(legacy, answered("Blue")))[-3:] == ["</s>", "▁", "<0x0A>"]
    assert pieces(first, ids(first, answered("Blue")))[-2:] == ["</s>", "<0x0A>"]
    # Both agree where the brief's facts live: the answer token, digits, a word alone.
    for tok in (legacy, first):
        assert pieces(tok, tok("Blue")["input_ids"]) == ["<s>", "▁Blue"]


def test_tokenizer_json_pipeline_differs_from_what_transformers5_loads():
    """The published tokenizer.json (Prepend normalizer) doubles the marker of a segment that
    starts with a space; transformers 5.20's LlamaTokenizer (Metaspace 'always') does not.
    Mistral's own template starts with '<s> [INST]', so the two disagree on every prompt."""
    file_pipeline = tf.sentencepiece_llama(prepend="normalizer")
    loaded_pipeline = tf.sentencepiece_llama(prepend="always")
    text = "<s> [INST] hi [/INST]"
    assert pieces(file_pipeline, file_pipeline(text, add_special_tokens=False)["input_ids"])[:3] == ["<s>", "▁", "▁["]
    assert pieces(loaded_pipeline, loaded_pipeline(text, add_special_tokens=False)["input_ids"])[:2] == ["<s>", "▁["]
    # Elsewhere they agree (e.g. the Zephyr conversation).
    zephyr_text = tf.tokenizer("zephyr").apply_chat_template(answered("Blue"), tokenize=False)
    assert file_pipeline(zephyr_text)["input_ids"] == loaded_pipeline(zephyr_text)["input_ids"]


def test_mistral_and_llama2_templates_ignore_generation_prompt():
    for name in ("mistral_instruct", "llama2_chat"):
        tok = tf.tokenizer(name)
        with_prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
        assert with_prompt == tok.apply_chat_template(QUESTION, tokenize=False)  # no assistant header
    tok = tf.tokenizer("mistral_instruct")
    assert tok.apply_chat_template(answered("Blue"), tokenize=False) == "<s> [INST] What colour is the sky? [/INST] Blue</s>"


def test_llama2_end_of_turn_is_a_marker_before_eos():
    """Llama-2-chat writes ' ' + content.strip() + ' ' + eos: the space becomes a lone '▁'."""
    tok = tf.tokenizer("llama2_chat")
    text = tok.apply_chat_template(answered("  Blue  "), tokenize=False)
    assert text.endswith("[/INST] Blue </s>")
    assert pieces(tok, ids(tok, answered("Blue")))[-3:] == ["▁Blue", "▁", "</s>"]
    system = [{"role": "system", "content": "Be brief."}] + answered("Blue")
    assert tok.apply_chat_template(system, tokenize=False).startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n")
    two_turns = answered("Blue") + answered("Blue", [{"role": "user", "content": "And the sea?"}])
    assert tok.apply_chat_template(two_turns, tokenize=False).count("<s>") == 2  # one per user turn


# --------------------------------------------------------------------------- Gemma
def test_gemma_has_no_prefix_marker_and_turns_end_with_end_of_turn():
    tok = tf.tokenizer("gemma")
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    assert pieces(tok, tok("Blue")["input_ids"]) == ["<bos>", "Blue"]  # no dummy prefix
    assert pieces(tok, tok("42", add_special_tokens=False)["input_ids"]) == ["4", "2"]
    assert pieces(tok, tok("a\n\nb", add_special_tokens=False)["input_ids"]) == ["a", "\n\n", "b"]
    text = tok.apply_chat_template(answered("Blue"), tokenize=False)
    assert text == "<bos><start_of_turn>user\nWhat colour is the sky?<end_of_turn>\n<start_of_turn>model\nBlue<end_of_turn>\n"
    toks = pieces(tok, ids(tok, answered("Blue")))
    assert toks.count("<bos>") == 1 and toks[-3:] == ["Blue", "<end_of_turn>", "\n"]
    assert "<end_of_turn>" in tok.all_special_tokens
    # tokenizer.eos_token is <eos>, which the template never writes: generation must stop on
    # <end_of_turn> too, which is why gemma-2-it's generation_config lists both.
    assert tok.eos_token == "<eos>" and "<eos>" not in text
    assert tf.generation_eos_ids("gemma", tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "x"}] + QUESTION, tokenize=False)


# --------------------------------------------------------------------------- byte level
def test_qwen_has_no_bos_and_a_default_system_prompt():
    tok = tf.tokenizer("qwen2_5")
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>assistant\n")
    toks = pieces(tok, ids(tok, answered("Blue")))
    assert toks[-3:] == ["Blue", "<|im_end|>", "Ċ"]
    assert tf.generation_eos_ids("qwen2_5", tok) == [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert pieces(tok, tok("42")["input_ids"]) == ["4", "2"]  # Qwen2's regex: one digit per pre-token
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    assert "# Tools" in tok.apply_chat_template(QUESTION, tools=tools, tokenize=False)


def test_qwen3_think_blocks():
    tok = tf.tokenizer("qwen3")
    # <think> is an added token but not special: it survives skip_special_tokens=True.
    assert "<think>" in tok.get_vocab() and "<think>" not in tok.all_special_tokens
    full = tok.apply_chat_template(answered("Blue"), tokenize=False)
    assert full.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nBlue<|im_end|>\n")
    assert "<think>" in tok.decode(tok(full)["input_ids"], skip_special_tokens=True)
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    no_think = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == prompt + "<think>\n\n</think>\n\n"
    # An earlier assistant turn loses its think block once a later user turn exists, so the
    # rendering of a conversation is not a prefix of the rendering of its continuation.
    longer = answered("Blue") + answered("Blue", [{"role": "user", "content": "And the sea?"}])
    longer_text = tok.apply_chat_template(longer, tokenize=False)
    assert not longer_text.startswith(full)
    assert longer_text.count("<think>") == 1


def test_llama3_tokenizer():
    tok = tf.tokenizer("llama3_1")
    assert tok("x")["input_ids"][0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|begin_of_text|>")
    toks = ids(tok, answered("Blue"))
    assert toks.count(tok.bos_token_id) == 1 and toks[0] == tok.bos_token_id  # the template's {{- bos_token }}
    text = tok.apply_chat_template(answered("Blue"), tokenize=False)
    split = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [piece for piece, _ in split("12345")] == ["123", "45"]  # Llama 3: \p{N}{1,3}
    assert [piece for piece, _ in tf.tokenizer("qwen2_5").backend_tokenizer.pre_tokenizer.pre_tokenize_str("123")] == ["1", "2", "3"]
    assert tf.generation_eos_ids("llama3_1", tok) == [
        tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    ]
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nBlue<|eot_id|>")


class _FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2031, 2, 3)


def _today(text):
    return re.search(r"Today Date: (.*)\n", text).group(1)


def test_llama3_dates(monkeypatch):
    """Llama-3.1's published template pins '26 Jul 2024'; Llama-3.2's reads the clock through
    the strftime_now jinja global. Both accept date_string=...; a strftime_now=... kwarg shadows
    the global (extra apply_chat_template kwargs go to template.render)."""
    l31, l32 = tf.tokenizer("llama3_1"), tf.tokenizer("llama3_2")

    def today(tok, **kwargs):
        return _today(tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, **kwargs))

    assert today(l31) == "26 Jul 2024"
    assert today(l32) == datetime.datetime.now().strftime("%d %b %Y")
    # strftime_now is looked up in transformers' module at render time: moving the clock moves 3.2 only.
    monkeypatch.setattr(chat_template_utils, "datetime", _FrozenClock)
    assert today(l32) == "03 Feb 2031" and today(l31) == "26 Jul 2024"
    for tok in (l31, l32):
        assert today(tok, date_string="01 Jan 2000") == "01 Jan 2000"
    assert today(l32, strftime_now=lambda fmt: "05 May 2005") == "05 May 2005"
    assert today(l31, strftime_now=lambda fmt: "05 May 2005") == "26 Jul 2024"  # 3.1 never calls it


# --------------------------------------------------------------------------- prompt/response boundary
PREFIX_CASES = [
    # (fixture, answer, tokens(prompt) is a prefix of tokens(prompt + answer))
    *[(name, "Blue", True) for name in sorted(tf.FIXTURES)],
    *[(name, " Blue", True) for name in sorted(tf.FIXTURES)],
    # Byte-level BPE: a newline run in the pre-tokenizer swallows the template's own "\n".
    ("qwen2_5", "\nBlue", False),  # Qwen2 regex \s*[\r\n]+ : "\n" + "\n" -> "ĊĊ"
    ("chatml", "\nBlue", True),  # GPT-2 regex \s+(?!\S) leaves the last "\n" to the word
    ("chatml", "\n\nBlue", False),  # ...but "\n" + "\n\n" -> "ĊĊ", "Ċ"
    # Templates that strip the answer (trim/strip/lstrip('\n')) or tokenizers without newline merges hold.
    ("qwen3", "\n\nBlue", True),
    ("llama3_1", "\n\nBlue", True),
    ("gemma", "\n\nBlue", True),
    ("zephyr", "\n\nBlue", True),
    ("llama2_chat", "\n\nBlue", True),
]


@pytest.mark.parametrize(("name", "answer", "holds"), PREFIX_CASES)
def test_prompt_tokens_prefix_property(name, answer, holds):
    tok = tf.tokenizer(name)
    prompt = ids(tok, QUESTION, add_generation_prompt=True)
    full = ids(tok, answered(answer))
    text_prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(answered(answer), tokenize=False).startswith(text_prompt)  # as strings: always
    assert (full[: len(prompt)] == prompt) is holds, (pieces(tok, prompt[-3:]), pieces(tok, full[len(prompt) - 3 :]))


def test_boundary_merge_concrete_case():
    tok = tf.tokenizer("qwen2_5")
    prompt = ids(tok, QUESTION, add_generation_prompt=True)
    full = ids(tok, answered("\nBlue"))
    assert pieces(tok, prompt[-3:]) == ["<|im_start|>", "assistant", "Ċ"]
    assert pieces(tok, full[len(prompt) - 2 : len(prompt) + 1]) == ["assistant", "ĊĊ", "Blue"]


# --------------------------------------------------------------------------- saved folders
@pytest.mark.parametrize("name", sorted(tf.FIXTURES))
def test_save_fixture_loads_offline_like_the_real_checkpoint(name, tmp_path):
    fx = tf.FIXTURES[name]
    tf.save_fixture(name, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    # The real tokenizer class is named, so loading goes through the same code as the real model.
    expected_class = "TokenizersBackend" if fx.tokenizer_class == "PreTrainedTokenizerFast" else fx.tokenizer_class
    assert type(loaded).__name__ == expected_class
    tok = tf.tokenizer(name)
    assert loaded.chat_template == tok.chat_template == tf.template_text(name)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    for text in ("Blue", " Blue", "42", "a\n\nb", tok.apply_chat_template(answered("Blue"), tokenize=False)):
        for special in (True, False):
            assert loaded(text, add_special_tokens=special)["input_ids"] == tok(text, add_special_tokens=special)["input_ids"]
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert generation.eos_token_id == tf.generation_eos_ids(name, tok)
    assert isinstance(generation.eos_token_id, list) == isinstance(fx.generation["eos_token_id"], tuple)


# One fixture per architecture: mistral, llama, qwen2, qwen3, gemma2, gpt2.
@pytest.mark.parametrize("name", ["zephyr", "llama3_1", "qwen2_5", "qwen3", "gemma", "chatml"])
def test_save_fixture_model_generates(name, tmp_path):
    tf.save_fixture_model(name, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.model_type == tf.FIXTURES[name].architecture
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tf.generation_eos_ids(name, tok)
    batch = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3
