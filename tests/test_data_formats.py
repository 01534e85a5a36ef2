"""The accepted dataset formats (messages; TRL's prompt + chosen and prompt + completion) and
the skip reasons, without a tokenizer."""

import json

import pytest

from iris_ref.data import Example, SkipCounts, load_examples, select_turns


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def turn(role, content):
    return {"role": role, "content": content}


def user(content):
    return turn("user", content)


def assistant(content):
    return turn("assistant", content)


# --- TRL's formats ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "q", "chosen": "a", "rejected": "bad"},
        {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("bad")]},
        {"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("bad")]},
        {"prompt": [user("q")], "chosen": [user("q"), assistant("a")]},
        {"prompt": [user("q")], "chosen": "a"},
        {"prompt": "q", "completion": "a"},
        {"prompt": [user("q")], "completion": [assistant("a")]},
        {"prompt": "q", "completion": [user("q"), assistant("a")]},
    ],
    ids=["pref-str", "pref-conv", "pref-repeats-str-prompt", "pref-repeats-conv", "pref-mixed",
         "completion-str", "completion-conv", "completion-repeats"],
)
def test_trl_formats_give_the_same_example(tmp_path, row):
    for first_turn in (True, False):
        examples, counts = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]), first_turn=first_turn)
        assert examples == [Example(prompt_messages=[user("q")], response="a")]
        assert counts.total == 0


def test_multi_turn_prompt_follows_the_first_turn_rule(tmp_path):
    prompt = [turn("system", "s"), user("q1"), assistant("a1"), user("q2")]
    for column in ("chosen", "completion"):
        path = write_jsonl(tmp_path / f"{column}.jsonl", [{"prompt": prompt, column: [assistant("a2")]}])
        (first,), _ = load_examples(path, first_turn=True)
        assert first == Example(prompt_messages=[turn("system", "s"), user("q1")], response="a1")
        (whole,), _ = load_examples(path, first_turn=False)
        assert whole == Example(prompt_messages=prompt, response="a2")


def synthetic_rows(prompts, K):
    """Rows as selfplay.generate_synthetic writes synthetic.jsonl: K per prompt, prompt-major."""
    return [{"prompt": [user(q)], "chosen": [assistant(f"answer to {q}")],
             "rejected": [assistant(f"sample {k}")], "rejected_token_ids": [5, 6, k],
             "rejected_finished": k % 2 == 0, "sample_index": k}
            for q in prompts for k in range(K)]


def test_synthetic_jsonl_loads_each_annotated_example_once(tmp_path):
    prompts = [f"q{i}" for i in range(5)]
    path = write_jsonl(tmp_path / "synthetic.jsonl", synthetic_rows(prompts, K=3))
    expected = [Example(prompt_messages=[user(q)], response=f"answer to {q}") for q in prompts]
    for first_turn in (True, False):
        examples, counts = load_examples(path, first_turn=first_turn)
        assert examples == expected
        assert counts == SkipCounts(duplicate=10)
    # A subset counts distinct examples: duplicates are skipped, not returned twice.
    subset, counts = load_examples(path, num_samples=4, seed=1)
    assert len(subset) == 4 and len({e.response for e in subset}) == 4
    assert subset == [e for e in expected if e in subset]
    everything, _ = load_examples(path, num_samples=100, seed=1)
    assert everything == expected


def test_same_prompt_with_other_chosen_answers_is_kept(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "x"}, {"prompt": "q", "chosen": "b", "rejected": "x"}]
    examples, counts = load_examples(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [e.response for e in examples] == ["a", "b"] and counts.total == 0


@pytest.mark.parametrize("row", [{"messages": [user("q"), assistant("a")]}, {"prompt": "q", "completion": "a"},
                                 {"prompt": "q", "chosen": "a", "rejected": "x"}], ids=["messages", "completion", "pref"])
def test_one_duplicate_rule_in_every_format(tmp_path, row):
    """An example (prompt turns and response) already kept is a duplicate, whatever the format."""
    other = {**row, "messages": [user("q"), assistant("b")]} if "messages" in row else {**row, "prompt": "q2"}
    examples, counts = load_examples(write_jsonl(tmp_path / "r.jsonl", [row, other, row, row]))
    assert len(examples) == 2 and counts == SkipCounts(duplicate=2)
    # rows that differ only in what is not read give one example too (first turn: the later turns)
    longer = [{"messages": [user("q"), assistant("a"), user(f"q{i}"), assistant(f"a{i}")]} for i in range(3)]
    first, counts = load_examples(write_jsonl(tmp_path / "m.jsonl", longer), first_turn=True)
    assert len(first) == 1 and counts.duplicate == 2
    assert len(load_examples(str(tmp_path / "m.jsonl"), first_turn=False)[0]) == 3


def test_the_toy_tasks_keep_their_repeats(tmp_path):
    """The toy files are draws from a known answer distribution: their repeats are that
    distribution and are kept; the same rows elsewhere are someone's data, deduplicated."""
    from iris_ref.tiny import TOY_LONG_TRAIN_PATH, TOY_TRAIN_PATH

    for toy in (TOY_TRAIN_PATH, TOY_LONG_TRAIN_PATH):
        examples, counts = load_examples(str(toy))
        assert len(examples) == 2000 and counts.total == 0
        copy = tmp_path / toy.name
        copy.write_text(toy.read_text())
        distinct, counts = load_examples(str(copy))
        assert len(distinct) == len({(e.prompt_messages[0]["content"], e.response) for e in examples}) < 2000
        assert counts == SkipCounts(duplicate=2000 - len(distinct))


# --- a folder written by save_to_disk ---------------------------------------------------------


def test_a_saved_dataset_folder_is_read_with_its_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"messages": [user("q"), assistant("a")]}])
    test = datasets.Dataset.from_list([{"prompt": "t", "completion": "b"}])  # each split its own format
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))
    for split in ("train", "anything"):  # a saved Dataset is whatever split is asked for, like a file
        assert load_examples(str(tmp_path / "one"), split=split)[0] == [Example([user("q")], "a")]
    assert load_examples(str(tmp_path / "dict"), split="test")[0] == [Example([user("t")], "b")]
    with pytest.raises(ValueError, match="has no split 'train_sft' \\(its splits: train, test\\): choose one with "
                                         "--split or --eval-split") as info:
        load_examples(str(tmp_path / "dict"), split="train_sft")
    assert "\n" not in str(info.value)


def test_any_other_folder_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"messages": [user("q"), assistant("a")]}])
    write_jsonl(folder / "b.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(ValueError, match="was not written by datasets' save_to_disk .*give such a folder, a "
                                         "\\.json/\\.jsonl/\\.parquet file or a hub name") as info:
        load_examples(str(folder))
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


def test_messages_column_takes_precedence(tmp_path):
    """Hub sets may carry 'messages' besides 'prompt' (and 'chosen'): 'messages' is read."""
    row = {"prompt": "ignored", "chosen": "ignored", "messages": [user("q"), assistant("a")]}
    (example,), _ = load_examples(write_jsonl(tmp_path / "u.jsonl", [row]))
    assert example == Example(prompt_messages=[user("q")], response="a")


@pytest.mark.parametrize(
    "row, columns",
    [
        ({"text": "x"}, "text"),
        ({"prompt": "q", "response": "a"}, "prompt, response"),
        ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}, "chosen, rejected"),
    ],
)
def test_unknown_columns_name_the_columns_and_the_formats(tmp_path, row, columns):
    path = write_jsonl(tmp_path / "cols.jsonl", [row])
    with pytest.raises(ValueError) as error:
        load_examples(path)
    message = str(error.value)
    assert "\n" not in message and path in message
    assert f"(columns: {columns})" in message
    assert "'messages'; 'prompt' + 'chosen' ('rejected' ignored); 'prompt' + 'completion'" in message


def test_unpaired_preference_is_refused(tmp_path):
    rows = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": False}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(ValueError, match="'label' columns \\(TRL's unpaired preference format\\)") as error:
        load_examples(path)
    assert "\n" not in str(error.value) and path in str(error.value)


def test_prompt_response_skip_reasons(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a"},
        {"prompt": None, "chosen": "a"},
        {"prompt": "q", "chosen": 7},
        {"prompt": "q", "chosen": []},
        {"prompt": [user("q")], "chosen": [user("q")]},   # the repeat is not stripped: nothing would be left
        {"prompt": "q", "chosen": [user("other")]},
        {"prompt": [user("q"), assistant("a")], "chosen": [user("again")]},
        {"prompt": "q", "chosen": [turn("gpt", "a")]},
        {"prompt": "q", "chosen": [["assistant", "a"]]},
        {"prompt": "q", "chosen": [{"role": "assistant"}]},
        {"prompt": "   ", "chosen": "a"},
        {"prompt": [], "chosen": "a"},
        {"prompt": [turn("human", "q")], "chosen": "a"},
        {"prompt": [user(3)], "chosen": "a"},
    ]
    for first_turn in (True, False):
        examples, counts = load_examples(write_jsonl(tmp_path / "s.jsonl", rows), first_turn=first_turn)
        assert len(examples) == 1
        assert counts == SkipCounts(not_a_list=2, no_assistant_turn=4, unknown_role=2, bad_turn=1, bad_content=2,
                                    empty_content=1, no_user_turn=1)


# --- skip reasons of a conversation --------------------------------------------------------


@pytest.mark.parametrize(
    "messages, first_turn_reason, whole_reason",
    [
        ("not a list", "not_a_list", "not_a_list"),
        (None, "not_a_list", "not_a_list"),
        ([1, 2], "bad_turn", "bad_turn"),
        ([user("q"), "a"], "bad_turn", "bad_turn"),
        ([user("q"), {"content": "a"}], "bad_turn", "bad_turn"),
        ([{"role": None, "content": "q"}, assistant("a")], "bad_turn", "bad_turn"),
        # the only user-like turn has an unknown role
        ([turn("human", "q"), assistant("a")], "unknown_role", "unknown_role"),
        ([turn("system", "s"), turn("human", "q"), assistant("a")], "unknown_role", "unknown_role"),
        ([user("q"), turn("gpt", "a")], "unknown_role", "unknown_role"),
        ([], "no_user_turn", "no_assistant_turn"),
        ([user("q")], "no_assistant_turn", "no_assistant_turn"),
        ([user("q"), user("q again")], "no_assistant_turn", "no_assistant_turn"),
        ([turn("system", "s"), assistant("a")], "no_user_turn", "no_user_turn"),
        ([user("q"), assistant(None)], "bad_content", "bad_content"),
        ([user("q"), assistant(5)], "bad_content", "bad_content"),
        ([user("q"), {"role": "assistant"}], "bad_content", "bad_content"),
        ([user(["q"]), assistant("a")], "bad_content", "bad_content"),
        ([user("q"), assistant(" \n")], "empty_content", "empty_content"),
        ([user(""), assistant("a")], "empty_content", "empty_content"),
        # used by one rule only
        ([user("q"), assistant("a"), user(None), assistant("b")], None, "bad_content"),
        ([user("q"), assistant("a"), turn("tool", "t"), assistant("b")], None, "unknown_role"),
        ([user("q"), user("q2"), assistant("b")], "no_assistant_turn", None),
        ([user("q"), assistant("a"), turn("tool", "t")], None, None),
    ],
)
def test_each_skip_reason(messages, first_turn_reason, whole_reason):
    for first_turn, expected in ((True, first_turn_reason), (False, whole_reason)):
        example, reason = select_turns(messages, first_turn)
        assert reason == expected, (first_turn, messages)
        assert (example is None) == (expected is not None)
        assert expected is None or hasattr(SkipCounts(), expected)


def test_skip_reasons_survive_the_file_round_trip(tmp_path):
    """JSON and Parquet give a turn with a missing key None there (Parquet for every turn of the
    column): a missing role is still a bad turn, a missing content still bad content."""
    import datasets

    rows = [
        {"messages": [user("q"), assistant("a")]},
        {"messages": [{"content": "q"}, assistant("a")]},
        {"messages": [user("q"), {"role": "assistant"}]},
        {"messages": [turn("human", "q"), assistant("a")]},
    ]
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), str(parquet)):
        for first_turn in (True, False):
            examples, counts = load_examples(path, first_turn=first_turn)
            assert len(examples) == 1
            assert counts == SkipCounts(bad_turn=1, bad_content=1, unknown_role=1), (path, first_turn)
