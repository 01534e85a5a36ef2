"""Loading, validation, the one chat template, tokenisation with prompt masking, collation."""

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer

from iris_ref.chat import ChatFormat
from iris_ref.data import (
    EncodedSequence,
    SkipCounts,
    collate,
    encode_generated,
    encode_pair,
    load_examples,
    response_budget,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatFormat(tokenizer)


def pair(chat, prompt, response, max_length, max_prompt_length, max_new_tokens=None):
    """encode_pair's sequence (None when skipped)."""
    return encode_pair(chat, prompt, response, max_length, max_prompt_length, max_new_tokens)[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def turn(role, content):
    return {"role": role, "content": content}


GOOD = {"messages": [turn("user", "hi"), turn("assistant", "hello")]}

CONVERSATIONS = [
    [turn("user", "Give two digits that add up to 11.")],
    [turn("system", "You are terse."), turn("user", "Name a letter between c and h.")],
    [turn("system", "Answer with a number."), turn("user", "Give an odd number between 3 and 9.")],
    [turn("user", "first"), turn("assistant", "reply"), turn("user", "second question, ünïcode ✓")],
]


# --- loading and validation -------------------------------------------------------------


def test_toy_train_loads_without_skips(toy_train_path):
    examples, counts = load_examples(str(toy_train_path))
    assert len(examples) == 2000
    assert counts.total == 0
    assert examples[0].prompt_messages[-1]["role"] == "user"
    assert examples[0].response


def test_seeded_subset_is_deterministic_and_in_dataset_order(tmp_path):
    rows = [{"messages": [turn("user", f"q{i}"), turn("assistant", f"a{i}")]} for i in range(100)]
    path = str(write_jsonl(tmp_path / "numbered.jsonl", rows))
    a, _ = load_examples(path, num_samples=20, seed=3)
    b, _ = load_examples(path, num_samples=20, seed=3)
    c, _ = load_examples(path, num_samples=20, seed=4)
    assert a == b
    assert a != c
    indices = [int(e.response[1:]) for e in a]
    assert len(set(indices)) == 20
    assert indices == sorted(indices)
    assert indices != list(range(20))
    everything, _ = load_examples(path, num_samples=1000, seed=3)
    assert [e.response for e in everything] == [f"a{i}" for i in range(100)]


def test_skip_counts_per_reason(tmp_path):
    rows = [
        GOOD,
        {"messages": "not a list"},
        {"messages": [1, 2]},
        {"messages": []},
        {"messages": [turn("user", "no answer")]},
        {"messages": [turn("assistant", "no question")]},
        {"messages": [turn("user", "   "), turn("assistant", "x")]},
        {"messages": [turn("user", "q"), turn("assistant", "")]},
        {"messages": [turn("user", "q"), turn("assistant", None)]},
        {"messages": [turn("robot", "q"), turn("user", "q"), turn("assistant", "a")]},
        {"messages": [turn("system", "s"), turn("user", "q2"), turn("assistant", "a2")]},
    ]
    examples, counts = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), first_turn=False)
    assert counts == SkipCounts(not_a_list=1, bad_turn=1, no_user_turn=1, no_assistant_turn=2, empty_content=2,
                                bad_content=1, unknown_role=1)
    assert counts.total == 9
    assert [e.response for e in examples] == ["hello", "a2"]
    assert examples[1].prompt_messages == [turn("system", "s"), turn("user", "q2")]


def test_first_turn_versus_whole_conversation(tmp_path):
    conversation = [
        turn("system", "be brief"),
        turn("user", "q1"),
        turn("assistant", "a1"),
        turn("user", "q2"),
        turn("assistant", "a2"),
    ]
    path = str(write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}]))
    (first,), _ = load_examples(path, first_turn=True)
    assert first.prompt_messages == [turn("system", "be brief"), turn("user", "q1")]
    assert first.response == "a1"
    (whole,), _ = load_examples(path, first_turn=False)
    assert whole.prompt_messages == conversation[:4]
    assert whole.response == "a2"


def test_first_turn_ignores_later_invalid_turns(tmp_path):
    row = {"messages": [turn("user", "q"), turn("assistant", "a"), turn("tool", ""), turn("assistant", "b")]}
    path = str(write_jsonl(tmp_path / "t.jsonl", [row]))
    (example,), counts = load_examples(path, first_turn=True)
    assert (example.response, counts.total) == ("a", 0)
    with pytest.raises(ValueError, match="unknown_role=1"):
        load_examples(path, first_turn=False)


def test_parquet_and_json_files(tmp_path):
    import datasets

    rows = [GOOD, {"messages": [turn("user", "q"), turn("assistant", "a")]}]
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    examples, _ = load_examples(str(parquet))
    assert [e.response for e in examples] == ["hello", "a"]
    json_file = tmp_path / "d.json"
    json_file.write_text(json.dumps(rows), encoding="utf-8")
    examples, _ = load_examples(str(json_file), split="train_sft")
    assert [e.response for e in examples] == ["hello", "a"]


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("missing.jsonl", None, "dataset file not found: .*missing.jsonl"),
        ("empty.jsonl", "", "dataset file is empty: .*empty.jsonl"),
        ("broken.jsonl", '{"messages": [\n', "cannot read dataset file .*broken.jsonl"),
        ("broken.parquet", "not parquet", "cannot read dataset file .*broken.parquet"),
        ("blank.jsonl", "\n\n", "(empty|cannot read)"),
        ("nocol.jsonl", '{"text": "x"}\n', "no 'messages' column \\(columns: text\\)"),
        ("invalid.jsonl", '{"messages": [{"role": "user", "content": "q"}]}\n', "no valid rows in dataset .*invalid.jsonl.*no_assistant_turn=1"),
    ],
)
def test_bad_data_gives_one_line_value_error(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=pattern) as error:
        load_examples(str(path))
    assert "\n" not in str(error.value)


def test_other_bad_arguments(tmp_path, toy_train_path):
    with pytest.raises(ValueError, match="num_samples must be positive"):
        load_examples(str(toy_train_path), num_samples=0)
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported dataset file type '.csv'"):
        load_examples(str(odd))
    with pytest.raises(ValueError, match="cannot load dataset 'no-such-org/no-such-dataset'"):
        load_examples("no-such-org/no-such-dataset")


# --- the one chat template (the real tokenizer families are in test_token_exact.py) ------------


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_training_prompt_tokens_equal_generation_prompt_tokens(tokenizer, chat, conversation):
    encoded = pair(chat, conversation, "2+9", max_length=256, max_prompt_length=200)
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    generation_prompt = chat.prompt_ids(conversation)
    assert encoded.input_ids[: encoded.prompt_length] == generation_prompt
    assert tokenizer.decode(generation_prompt) == expected
    assert generation_prompt == tokenizer(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_decoded_training_sequence_is_the_templated_conversation(tokenizer, chat, conversation):
    response = "Sure: 4+7, or 5+6."
    encoded = pair(chat, conversation, response, max_length=256, max_prompt_length=200)
    full = tokenizer.apply_chat_template(conversation + [turn("assistant", response)], tokenize=False)
    assert full.endswith("<|im_end|>\n")
    assert tokenizer.decode(encoded.input_ids) == full[: -len("\n")]
    assert encoded.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_end_of_turn_is_read_off_the_template(tokenizer, chat):
    assert chat.end_of_turn_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert chat.stop_ids == [tokenizer.eos_token_id]
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '<|endoftext|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
    )
    other_chat = ChatFormat(other)
    endoftext = other.convert_tokens_to_ids("<|endoftext|>")
    assert other_chat.end_of_turn_ids == [endoftext]
    assert other_chat.stop_ids == [endoftext, other.eos_token_id]
    encoded = pair(other_chat, [turn("user", "q")], "a", max_length=64, max_prompt_length=64)
    assert other.decode(encoded.input_ids) == "user:\nq<|endoftext|>\nassistant:\na<|endoftext|>"


def test_a_generation_prompt_that_merges_with_the_response_is_named_and_skipped(tokenizer):
    """A template whose generation prompt ends with a space: byte-level BPE merges it with the
    response's first letter (`Ġ` + `a` -> `Ġa`), so the prompt's ids are not the start of the
    conversation's. The row is never trained on; the old encoding (prompt ids + the response
    encoded alone) would have trained on `Ġ`, `a`, a sequence the model is never shown."""
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    other_chat = ChatFormat(other)
    from iris_ref.data import Example, encode_examples

    examples = [Example([turn("user", "q")], "a"), Example([turn("user", "r")], "b")]
    kept, encoded, counts = encode_examples(other_chat, examples, 64, 32)
    assert kept == [] and counts.prefix_mismatch == 2
    assert "'Ġ'" in counts.first["prefix_mismatch"] and "'Ġa'" in counts.first["prefix_mismatch"]
    assert "prefix_mismatch=2" in counts.describe()


def test_too_long_prompt_is_skipped_and_long_response_is_cut(tokenizer, chat):
    prompt = [turn("user", "Give two digits that add up to 11.")]
    n = len(chat.prompt_ids(prompt))
    assert encode_pair(chat, prompt, "a", max_length=100, max_prompt_length=n - 1) == (None, "too_long")
    assert encode_pair(chat, prompt, "a", max_length=n, max_prompt_length=n) == (None, "too_long")
    exact = pair(chat, prompt, "a", max_length=n + 1, max_prompt_length=n)
    assert exact.prompt_length == n and len(exact.input_ids) == n + 1 and exact.cut
    long_response = "abc " * 50
    full = pair(chat, prompt, long_response, max_length=1000, max_prompt_length=n)
    cut = pair(chat, prompt, long_response, max_length=n + 5, max_prompt_length=n)
    assert cut.input_ids == full.input_ids[: n + 5] and cut.cut and not full.cut
    capped = pair(chat, prompt, long_response, max_length=1000, max_prompt_length=n, max_new_tokens=5)
    assert capped.input_ids == cut.input_ids and capped.cut
    with pytest.raises(ValueError, match="must be positive"):
        encode_pair(chat, prompt, "a", max_length=0, max_prompt_length=10)


def test_both_response_sets_share_each_prompts_budget(chat):
    """Issue 19: no annotated response is longer than its prompt's synthetic budget (so length
    alone cannot tell the sets apart), for short and long prompts alike; negative control: the
    old global max_new_tokens (max length - max prompt length) lets annotated responses run longer."""
    max_length, max_prompt_length = 48, 32
    long_answer = " ".join(["4+7"] * 30)
    for text in ("hi", "Give two digits that add up to 11.", "Name a letter between c and h, please, now."):
        prompt = [turn("user", text)]
        seq = pair(chat, prompt, long_answer, max_length, max_prompt_length)
        if seq is None:
            continue
        budget = response_budget(seq.prompt_length, max_length)
        assert len(seq.input_ids) - seq.prompt_length <= budget
        sampled = encode_generated(chat, prompt, list(range(5, 5 + 200)), max_length, max_prompt_length)
        assert len(sampled.input_ids) - sampled.prompt_length == budget  # the generator stops there too
    short = [turn("user", "hi")]
    n = len(chat.prompt_ids(short))
    old_synthetic_budget = max_length - max_prompt_length
    assert len(pair(chat, short, long_answer, max_length, max_prompt_length).input_ids) - n > old_synthetic_budget


# --- collation ----------------------------------------------------------------------------


def test_collate_right_pads_and_masks_the_prompt():
    batch = collate([EncodedSequence([5, 6, 7, 8], 2), EncodedSequence([9, 10, 11], 1)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="prompt_length 3 but 3 tokens"):
        collate([EncodedSequence([1, 2, 3], 3)], pad_token_id=0)


# --- sampled responses, token for token -------------------------------------------------------


def test_generated_sequence_is_what_the_model_was_fed_and_sampled(chat, tiny_checkpoint):
    """The training sequence of a sampled response is the generation input followed by the
    sampled ids, up to and including the stop token, with nothing re-tokenised or appended."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    stops = chat.stop_ids
    for index, conversation in enumerate(CONVERSATIONS):
        fed = chat.prompt_ids(conversation)
        stopped = index % 2 == 0  # the random model never stops by itself: force the stop on some
        torch.manual_seed(index)
        with torch.no_grad():
            output = model.generate(torch.tensor([fed]), attention_mask=torch.ones(1, len(fed), dtype=torch.long),
                                    do_sample=True, top_k=0, max_new_tokens=12, eos_token_id=stops,
                                    pad_token_id=stops[0], forced_eos_token_id=stops[0] if stopped else None
                                    )[0].tolist()
        assert output[: len(fed)] == fed
        sampled = output[len(fed) :]
        cut = next((i + 1 for i, token in enumerate(sampled) if token in stops), len(sampled))
        sampled = sampled[:cut]  # through the stop token, as generation reports it
        assert (sampled[-1] in stops) == stopped
        encoded = encode_generated(chat, conversation, sampled, max_length=256, max_prompt_length=200)
        assert encoded.input_ids == fed + sampled
        assert encoded.prompt_length == len(fed)


def test_generated_ids_are_not_retokenised_and_get_no_end_of_turn(tokenizer, chat):
    prompt = [turn("user", "Give two digits that add up to 11.")]
    fed = chat.prompt_ids(prompt)
    # A token spelled out character by character: decoding and re-encoding would merge it.
    word = next(t for t in tokenizer.get_vocab() if len(t) >= 3 and t.isalpha() and t.isascii()
                and all(tokenizer.convert_tokens_to_ids(c) != tokenizer.unk_token_id for c in t))
    spelled = [tokenizer.convert_tokens_to_ids(c) for c in word]
    assert tokenizer.encode(tokenizer.decode(spelled), add_special_tokens=False) != spelled
    eot = chat.end_of_turn_ids
    unfinished = encode_generated(chat, prompt, spelled, 64, 32)
    assert unfinished.input_ids == fed + spelled
    finished = encode_generated(chat, prompt, spelled + eot, 64, 32)
    assert finished.input_ids == fed + spelled + eot
    import numpy as np

    assert encode_generated(chat, prompt, np.array(spelled), 64, 32) == unfinished
    assert encode_generated(chat, prompt, torch.tensor(spelled), 64, 32) == unfinished


def test_generated_truncation_too_long_prompt_and_empty_response(chat):
    prompt = [turn("user", "Give two digits that add up to 11.")]
    n = len(chat.prompt_ids(prompt))
    response = list(range(10, 30))
    cut = encode_generated(chat, prompt, response, max_length=n + 3, max_prompt_length=n)
    assert cut.input_ids == chat.prompt_ids(prompt) + response[:3] and cut.prompt_length == n and cut.cut
    # The prompt rule of encode_pair.
    assert encode_generated(chat, prompt, response, max_length=100, max_prompt_length=n - 1) is None
    assert encode_generated(chat, prompt, response, max_length=n, max_prompt_length=n) is None
    assert pair(chat, prompt, "a", max_length=n, max_prompt_length=n) is None
    one = encode_generated(chat, prompt, response[:1], max_length=n + 1, max_prompt_length=n)
    assert len(one.input_ids) == n + 1 and not one.cut
    # Nothing sampled: nothing to train on, and never a sequence collate would refuse.
    assert encode_generated(chat, prompt, [], max_length=100, max_prompt_length=n) is None
    collate([cut, one], pad_token_id=0)
    with pytest.raises(ValueError, match="must be positive"):
        encode_generated(chat, prompt, response, max_length=0, max_prompt_length=10)


@pytest.mark.parametrize("bad, pattern", [([1, 2.5], "must be integers"), ([3, -1], "non-negative, got -1"),
                                          (["5"], "must be integers")])
def test_generated_ids_must_be_token_ids(chat, bad, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        encode_generated(chat, [turn("user", "q")], bad, 64, 32)
    assert "\n" not in str(error.value)
