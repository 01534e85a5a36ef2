"""The embedded default: tiny tokenizer, tiny Qwen2 model, toy task and its shipped data."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from iris_ref import tiny
from iris_ref.tiny import (
    TOY_HELDOUT_PATH,
    TOY_TRAIN_PATH,
    build_tiny_model,
    build_tiny_tokenizer,
    make_toy_rows,
    toy_answer_distance,
    toy_is_correct,
    toy_valid_answers,
    write_toy_data,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_small_and_has_the_special_tokens(tokenizer):
    again = build_tiny_tokenizer()
    assert tokenizer.get_vocab() == again.get_vocab()
    assert len(tokenizer) <= tiny.TINY_VOCAB_SIZE
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for special in tiny.SPECIAL_TOKENS:
        assert tokenizer.encode(special, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(special)]


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_any_text_round_trips_through_the_byte_level_bpe(text):
    tokenizer = _shared_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


_CACHE = {}


def _shared_tokenizer():
    if "tokenizer" not in _CACHE:
        _CACHE["tokenizer"] = build_tiny_tokenizer()
    return _CACHE["tokenizer"]


def test_chat_template_is_qwen2_style(tokenizer):
    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )


# --- model and checkpoint -------------------------------------------------------------------------


def test_model_size_architecture_and_seeded_init(tokenizer):
    torch.manual_seed(99)
    state = torch.get_rng_state()
    model = build_tiny_model(tokenizer, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    same = build_tiny_model(tokenizer, seed=0)
    other = build_tiny_model(tokenizer, seed=1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, same.state_dict()[name])
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_saved_checkpoint_reloads_identically(tiny_checkpoint, tokenizer):
    assert (tiny_checkpoint / "model.safetensors").is_file()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    loaded_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    messages = [{"role": "user", "content": "Name a letter between c and h."}]
    ids = loaded_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert loaded_model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert loaded_model.generation_config.pad_token_id == tokenizer.pad_token_id
    fresh = build_tiny_model(tokenizer, seed=0)
    batch = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(batch).logits, fresh(batch).logits, rtol=0, atol=0)


def test_cli_saves_a_checkpoint_and_refuses_to_do_nothing(tmp_path, capsys):
    tiny._main(["--save-checkpoint", str(tmp_path / "ckpt"), "--seed", "3"])
    assert (tmp_path / "ckpt" / "config.json").is_file()
    with pytest.raises(SystemExit):
        tiny._main([])
    assert "nothing to do" in capsys.readouterr().err


# --- toy task and data ------------------------------------------------------------------------------


def test_shipped_data_is_what_the_seeded_script_writes(tmp_path):
    written_train, written_heldout = write_toy_data(tmp_path)
    assert written_train.read_bytes() == TOY_TRAIN_PATH.read_bytes()
    assert written_heldout.read_bytes() == TOY_HELDOUT_PATH.read_bytes()
    assert TOY_TRAIN_PATH.stat().st_size + TOY_HELDOUT_PATH.stat().st_size < 1_000_000


def test_shipped_rows_are_correct_short_and_have_several_valid_answers(tokenizer):
    train, heldout = read_rows(TOY_TRAIN_PATH), read_rows(TOY_HELDOUT_PATH)
    assert (len(train), len(heldout)) == (tiny.TOY_TRAIN_SIZE, tiny.TOY_HELDOUT_SIZE)
    families = set()
    for row in train + heldout:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert toy_is_correct(user["content"], assistant["content"])
        assert len(toy_valid_answers(user["content"])) >= 2
        families.add(user["content"].split()[1])
        length = len(tokenizer.apply_chat_template(row["messages"], return_dict=False))
        assert length <= 48
    assert families == {"two", "a", "an"}


def test_data_answers_are_spread_over_the_valid_answers():
    rows = make_toy_rows(3000, seed=5)
    prompt = "Give two digits that add up to 9."
    answers = [r["messages"][1]["content"] for r in rows if r["messages"][0]["content"] == prompt]
    assert len(answers) > 30
    assert len(set(answers)) >= 6  # 10 valid answers, drawn uniformly


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("Give two digits that add up to 11.", "2+9", True),
        ("Give two digits that add up to 11.", " 9+2\n", True),
        ("Give two digits that add up to 11.", "2+8", False),
        ("Give two digits that add up to 11.", "2 + 9", False),
        ("Give two digits that add up to 11.", "11+0", False),
        ("Give two digits that add up to 1.", "0+1", True),
        ("Name a letter between c and h.", "d", True),
        ("Name a letter between c and h.", "h", False),
        ("Name a letter between c and h.", "D", False),
        ("Give an even number between 23 and 31.", "30", True),
        ("Give an even number between 23 and 31.", "29", False),
        ("Give an even number between 23 and 31.", "024", False),
        ("Give an odd number between 3 and 9.", "3", False),
        ("Give an odd number between 3 and 9.", "7", True),
        ("<|im_start|>user\nGive an odd number between 3 and 9.<|im_end|>\n<|im_start|>assistant\n", "5", True),
        ("Name a letter between c and h.", "", False),
    ],
)
def test_checker_examples(prompt, response, expected):
    assert toy_is_correct(prompt, response) is expected


PROMPT_STRATEGY = st.one_of(
    st.integers(1, 17).map(lambda n: f"Give two digits that add up to {n}."),
    st.tuples(st.integers(0, 22), st.integers(2, 8)).map(
        lambda t: f"Name a letter between {chr(97 + t[0])} and {chr(97 + min(t[0] + t[1], 25))}."
    ),
    st.tuples(st.sampled_from(["even", "odd"]), st.integers(0, 80), st.integers(3, 12)).map(
        lambda t: f"Give an {t[0]} number between {t[1]} and {t[1] + t[2]}."
    ),
)
RESPONSE_STRATEGY = st.one_of(
    st.tuples(st.integers(0, 12), st.integers(0, 12)).map(lambda t: f"{t[0]}+{t[1]}"),
    st.sampled_from(list("abcdefghijklmnopqrstuvwxyzA")),
    st.integers(0, 100).map(str),
    st.text(max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(PROMPT_STRATEGY, RESPONSE_STRATEGY)
def test_checker_agrees_with_the_enumeration_of_valid_answers(prompt, response):
    assert toy_is_correct(prompt, response) == (response.strip() in toy_valid_answers(prompt))


def test_non_toy_prompt_is_a_value_error():
    with pytest.raises(ValueError, match="not a toy-task prompt"):
        toy_is_correct("What is the capital of France?", "Paris")
    with pytest.raises(ValueError, match="not a toy-task prompt"):
        toy_valid_answers("hello")


def test_answer_distance_to_the_data_distribution():
    prompt = "Name a letter between c and h."  # valid: d e f g, each 1/4 in the data
    assert toy_answer_distance(prompt, ["d", "e", "f", "g"]) == pytest.approx(0.0)
    assert toy_answer_distance(prompt, [" d", "e\n", "f", "g"] * 3) == pytest.approx(0.0)
    assert toy_answer_distance(prompt, ["d"] * 8) == pytest.approx(0.75)
    assert toy_answer_distance(prompt, ["x", "y"]) == pytest.approx(1.0)
    assert toy_answer_distance(prompt, ["d", "e", "x", "x"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one response"):
        toy_answer_distance(prompt, [])
