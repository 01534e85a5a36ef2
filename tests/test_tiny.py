"""The embedded default: tiny tokenizer, tiny Qwen2 model, toy task and its shipped data."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from iris_ref import data, tiny
from iris_ref.tiny import (
    TOY_HELDOUT_PATH,
    TOY_LONG_HELDOUT_PATH,
    TOY_LONG_TRAIN_PATH,
    TOY_TRAIN_PATH,
    build_tiny_model,
    build_tiny_tokenizer,
    make_toy_long_rows,
    make_toy_rows,
    toy_answer_distance,
    toy_is_correct,
    toy_long_diagnosis,
    toy_valid_answers,
    write_toy_data,
    write_toy_long_data,
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


# --- the long toy task ------------------------------------------------------------------------------


def _long_prompt(count, total):
    return f"Give {count} digits that add up to {total}."


def test_shipped_long_data_is_what_the_seeded_script_writes(tmp_path):
    written_train, written_heldout = write_toy_long_data(tmp_path)
    assert written_train.read_bytes() == TOY_LONG_TRAIN_PATH.read_bytes()
    assert written_heldout.read_bytes() == TOY_LONG_HELDOUT_PATH.read_bytes()
    assert written_train.read_bytes() != written_heldout.read_bytes()[: len(written_train.read_bytes())]


def test_cli_writes_both_tasks_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny, "write_toy_data", lambda: write_toy_data(tmp_path))
    monkeypatch.setattr(tiny, "write_toy_long_data", lambda: write_toy_long_data(tmp_path))
    tiny._main(["--write-toy-data"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "heldout.jsonl", "long_heldout.jsonl", "long_train.jsonl", "train.jsonl"]
    assert capsys.readouterr().out.count("wrote ") == 4
    assert (tmp_path / "long_train.jsonl").read_bytes() == TOY_LONG_TRAIN_PATH.read_bytes()


def _token_lengths(tokenizer, rows):
    from iris_ref.chat import ChatFormat

    chat = ChatFormat(tokenizer)
    prompts, answers, totals = [], [], []
    for row in rows:
        user, assistant = row["messages"]
        prompt = chat.prompt_ids([user])
        answer = tokenizer.encode(assistant["content"], add_special_tokens=False)
        encoded, _ = data.encode_pair(chat, [user], assistant["content"], max_length=10_000, max_prompt_length=10_000)
        # The tiny tokenizer has no word-start marker: the answer alone is the answer in context.
        assert encoded.input_ids == prompt + answer + chat.end_of_turn_ids
        prompts.append(len(prompt))
        answers.append(len(answer))
        totals.append(len(encoded.input_ids))
    return prompts, answers, totals


def test_shipped_long_rows_are_correct_and_within_the_embedded_limits(tokenizer):
    train, heldout = read_rows(TOY_LONG_TRAIN_PATH), read_rows(TOY_LONG_HELDOUT_PATH)
    assert (len(train), len(heldout)) == (tiny.TOY_TRAIN_SIZE, tiny.TOY_HELDOUT_SIZE)
    for row in train + heldout:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        valid = toy_valid_answers(user["content"])
        assert tiny.TOY_LONG_MIN_ANSWERS <= len(valid) <= tiny.TOY_LONG_MAX_ANSWERS
        assert assistant["content"] in valid
        assert toy_is_correct(user["content"], assistant["content"])
        assert toy_long_diagnosis(user["content"], assistant["content"]) == "correct"
    prompts, answers, totals = _token_lengths(tokenizer, train + heldout)
    assert max(prompts) <= 32  # max_prompt_length of the embedded default, chat template included
    assert max(totals) <= 64  # max_length: prompt + answer + end of turn
    assert 8 <= min(answers) and max(answers) <= 20
    # and every valid answer of every prompt fits too (evaluation scores them all)
    for count, total in tiny.toy_long_prompts():
        for answer in toy_valid_answers(_long_prompt(count, total)):
            assert 8 <= len(tokenizer.encode(answer, add_special_tokens=False)) <= 20


def test_every_long_prompt_appears_in_the_training_data():
    prompts = {row["messages"][0]["content"] for row in read_rows(TOY_LONG_TRAIN_PATH)}
    assert prompts == {_long_prompt(n, s) for n, s in tiny.toy_long_prompts()}
    assert len(prompts) == 74


def test_long_task_is_tokenised_one_token_per_pre_token_without_retraining_the_tokenizer(tokenizer):
    """The tokenizer is trained on the first task only; the long task still gets one token per
    pre-token (the best any BPE with this pre-tokeniser can do), so training on it would add
    nothing but a reordering of the merges (new ids, a new model initialisation)."""
    pre_tokenize = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    texts = {t for row in read_rows(TOY_LONG_TRAIN_PATH) + read_rows(TOY_LONG_HELDOUT_PATH)
             for t in (row["messages"][0]["content"], row["messages"][1]["content"])}
    for text in texts:
        assert len(tokenizer.encode(text, add_special_tokens=False)) == len(pre_tokenize(text)), text
    corpus = "".join(tiny._tokenizer_corpus())
    assert "digits that add up" in corpus and "<" not in corpus  # first task only


def _subsets_by_bitmask(count, total):
    """Independent enumeration: every non-empty subset of the ten digits as a bitmask (an
    empty response is never an answer)."""
    out = []
    for mask in range(1, 1 << 10):
        digits = [d for d in range(10) if mask >> d & 1]
        if len(digits) == count and sum(digits) == total:
            out.append("<".join(map(str, digits)))
    return sorted(out)


@pytest.mark.parametrize("count", [0, 1, 2, 5, 6, 7, 8, 9, 10, 11])
def test_long_enumeration_is_complete(count):
    for total in range(0, 50):
        valid = toy_valid_answers(_long_prompt(count, total))
        assert sorted(valid) == _subsets_by_bitmask(count, total)
        assert len(set(valid)) == len(valid)
        assert all(toy_is_correct(_long_prompt(count, total), answer) for answer in valid)


def test_long_prompts_are_the_pairs_with_two_to_twenty_four_answers():
    pairs = tiny.toy_long_prompts()
    assert {n for n, _ in pairs} == set(tiny.TOY_LONG_DIGIT_COUNTS) == {5, 6, 7, 8}
    for count in range(11):
        for total in range(50):
            k = len(_subsets_by_bitmask(count, total))
            expected = count in tiny.TOY_LONG_DIGIT_COUNTS and 2 <= k <= 24
            assert ((count, total) in pairs) == expected


def _chi_square(counts, expected):
    return sum((c - expected) ** 2 / expected for c in counts)


def test_long_data_answers_are_uniform_over_the_valid_answers():
    """Pooled chi-square of the answer counts per prompt against uniform (fixed seed, so
    deterministic); a model-free sanity check that the sampler draws uniformly."""
    from scipy.stats import chi2

    rows = make_toy_long_rows(40_000, seed=7)
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault(row["messages"][0]["content"], []).append(row["messages"][1]["content"])
    statistic, dof = 0.0, 0
    for prompt, answers in by_prompt.items():
        valid = toy_valid_answers(prompt)
        assert set(answers) <= set(valid)
        counts = [answers.count(v) for v in valid]
        statistic += _chi_square(counts, len(answers) / len(valid))
        dof += len(valid) - 1
    assert chi2.sf(statistic, dof) > 1e-3
    # and N is uniform over the digit counts, S uniform over that N's sums
    per_count = [sum(row["messages"][0]["content"].startswith(f"Give {n} ") for row in rows) for n in (5, 6, 7, 8)]
    assert chi2.sf(_chi_square(per_count, len(rows) / 4), 3) > 1e-3
    # the check has power: dropping every draw of each prompt's first valid answer is caught
    statistic = 0.0
    for prompt, answers in by_prompt.items():
        valid = toy_valid_answers(prompt)
        kept = [a for a in answers if a != valid[0]]
        statistic += _chi_square([kept.count(v) for v in valid], len(kept) / len(valid))
    assert chi2.sf(statistic, dof) < 1e-6


def test_shipped_long_training_answers_pass_the_same_uniformity_check():
    from scipy.stats import chi2

    by_prompt = {}
    for row in read_rows(TOY_LONG_TRAIN_PATH):
        by_prompt.setdefault(row["messages"][0]["content"], []).append(row["messages"][1]["content"])
    statistic, dof = 0.0, 0
    for prompt, answers in by_prompt.items():
        valid = toy_valid_answers(prompt)
        statistic += _chi_square([answers.count(v) for v in valid], len(answers) / len(valid))
        dof += len(valid) - 1
    assert chi2.sf(statistic, dof) > 1e-3


@pytest.mark.parametrize(
    "prompt, response, diagnosis",
    [
        ("Give 5 digits that add up to 23.", "1<3<5<6<8", "correct"),
        ("Give 5 digits that add up to 23.", " 0<4<5<6<8\n", "correct"),
        ("Give 5 digits that add up to 23.", "8<6<5<3<1", "not_increasing"),  # right digits, wrong order
        ("Give 5 digits that add up to 23.", "1<5<3<6<8", "not_increasing"),  # one swap
        ("Give 5 digits that add up to 23.", "1<3<5<5<9", "not_increasing"),  # a repeat
        ("Give 5 digits that add up to 23.", "1<3<5<6<9", "wrong_sum"),
        ("Give 5 digits that add up to 23.", "1<3<5<6<7<1", "wrong_count"),
        ("Give 5 digits that add up to 23.", "3<6<6<8", "wrong_count"),
        ("Give 5 digits that add up to 23.", "1+3+5+6+8", "malformed"),
        ("Give 5 digits that add up to 23.", "1 < 3 < 5 < 6 < 8", "malformed"),
        ("Give 5 digits that add up to 23.", "1<3<5<6<8.", "malformed"),
        ("Give 5 digits that add up to 23.", "1<3<5<14", "malformed"),
        ("Give 5 digits that add up to 23.", "", "malformed"),
        ("Give 8 digits that add up to 30.", "0<1<2<3<4<5<6<9", "correct"),
        ("Give 8 digits that add up to 30.", "0<1<2<3<4<5<7<8", "correct"),
        ("Give 8 digits that add up to 30.", "0<1<2<3<4<5<6<8", "wrong_sum"),
        ("<|im_start|>user\nGive 6 digits that add up to 17.<|im_end|>\n<|im_start|>assistant\n", "0<1<2<3<4<7",
         "correct"),
    ],
)
def test_long_checker_examples(prompt, response, diagnosis):
    assert toy_long_diagnosis(prompt, response) == diagnosis
    assert toy_is_correct(prompt, response) is (diagnosis == "correct")


def test_long_diagnosis_is_only_for_long_prompts():
    with pytest.raises(ValueError, match="not a long toy-task prompt"):
        toy_long_diagnosis("Give two digits that add up to 11.", "2+9")
    assert toy_valid_answers("Give two digits that add up to 11.")[0] == "2+9"  # the first task is unchanged
    assert toy_is_correct("Give two digits that add up to 11.", "9+2")


LONG_PROMPT_STRATEGY = st.tuples(st.integers(0, 11), st.integers(0, 50)).map(lambda t: _long_prompt(*t))
DIGIT_LIST = st.lists(st.integers(0, 9), min_size=0, max_size=11)
LONG_RESPONSE_STRATEGY = st.one_of(
    DIGIT_LIST.map(lambda ds: "<".join(map(str, ds))),
    DIGIT_LIST.map(lambda ds: "<".join(map(str, sorted(set(ds))))),  # well-formed and increasing
    st.tuples(DIGIT_LIST, st.sampled_from(["+", ",", ", ", "<<", " < "])).map(lambda t: t[1].join(map(str, t[0]))),
    st.text(alphabet="0123456789< \n+", max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(LONG_PROMPT_STRATEGY, LONG_RESPONSE_STRATEGY)
def test_long_checker_agrees_with_the_enumeration_of_valid_answers(prompt, response):
    assert toy_is_correct(prompt, response) == (response.strip() in toy_valid_answers(prompt))
    assert (toy_long_diagnosis(prompt, response) == "correct") == toy_is_correct(prompt, response)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(tiny.toy_long_prompts()), st.data())
def test_long_near_misses_are_rejected(pair, draw):
    """Any reordering of a valid answer other than itself is wrong, and so is any one-digit change."""
    prompt = _long_prompt(*pair)
    answer = draw.draw(st.sampled_from(toy_valid_answers(prompt)))
    digits = answer.split("<")
    permuted = draw.draw(st.permutations(digits))
    assert toy_is_correct(prompt, "<".join(permuted)) is (list(permuted) == digits)
    position = draw.draw(st.integers(0, len(digits) - 1))
    changed = draw.draw(st.integers(0, 9).filter(lambda d: str(d) != digits[position]))
    altered = digits[:position] + [str(changed)] + digits[position + 1:]
    assert not toy_is_correct(prompt, "<".join(altered))


def test_answer_distance_works_for_the_long_task():
    prompt = "Give 8 digits that add up to 30."  # 0<1<2<3<4<5<6<9 and 0<1<2<3<4<5<7<8
    valid = toy_valid_answers(prompt)
    assert len(valid) == 2
    assert toy_answer_distance(prompt, valid) == pytest.approx(0.0)
    assert toy_answer_distance(prompt, [valid[0]] * 4) == pytest.approx(0.5)
    assert toy_answer_distance(prompt, ["9<6<5<4<3<2<1<0"]) == pytest.approx(1.0)
