"""Runs on one's own data (issue 16): the validation rows scale with the data, the report names
the data and says what its held-out panels show."""

import json

import pytest

from iris_ref import models, report, selfplay
from iris_ref.chat import ChatFormat
from iris_ref.config import MIN_VALIDATION_ROWS, parse_config
from iris_ref.tiny import TOY_TRAIN_PATH


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(models.load_tokenizer(None, False))


def test_validation_rows_rule():
    assert selfplay.validation_rows(0.1, 2000) == 200  # the embedded default on the toy task
    assert selfplay.validation_rows(0.1, 300) == MIN_VALIDATION_ROWS  # not 200 of 300 any more
    assert selfplay.validation_rows(0.25, 1000) == 250
    assert selfplay.validation_rows(200, 300) == 200  # a number of rows is taken as given


def test_the_toy_run_holds_out_the_same_rows_as_before(chat):
    """0.1 of the toy task's 2000 rows are the very 200 rows the former default (200) held out."""
    now = selfplay.load_data(parse_config([]), chat)
    before = selfplay.load_data(parse_config(["--sft-validation-size", "200"]), chat)
    assert parse_config([]).sft_validation_size == 0.1 and len(now[3]) == 200
    assert now[3] == before[3] and now[0] == before[0]


def test_small_data_keeps_most_rows_for_training(chat, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(TOY_TRAIN_PATH.read_text().splitlines()[:300]) + "\n")
    kept, _, _, validation = selfplay.load_data(parse_config(["--dataset", str(small)]), chat)
    assert len(validation) == MIN_VALIDATION_ROWS and len(kept) + len(validation) < 300  # repeats dropped
    with pytest.raises(ValueError, match="holds out 250 of the .* fewer than --global-batch-size 32") as info:
        selfplay.load_data(parse_config(["--dataset", str(small), "--sft-validation-size", "250"]), chat)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv, expected", [
    ([], "tiny (embedded default) on the toy task: IRIS"),
    (["--dataset", "{d}/mine.jsonl", "--eval-dataset", "{d}/held.jsonl"], "on mine.jsonl, held out: held.jsonl: IRIS"),
    (["--dataset", "{d}/mine.jsonl"], "on mine.jsonl, no held-out data: IRIS"),
    (["--model", "org/m"], "org/m on HuggingFaceH4/ultrachat_200k [train_sft], held out: "
                           "HuggingFaceH4/ultrachat_200k [test_sft]: IRIS"),
])
def test_the_report_title_names_the_data(tmp_path, argv, expected):
    config = parse_config([a.format(d=tmp_path) for a in argv] + ["--output-dir", str(tmp_path / "run")])
    assert expected in selfplay.build_summary(tmp_path / "run", config)["title"]


def test_the_held_out_panels_say_what_they_show(tmp_path, monkeypatch):
    """With held-out data that is not a toy task, only its NLL exists: the accuracy panel says
    why it is empty instead of claiming there is no held-out data."""
    import matplotlib.axes

    texts = []
    draw = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **kw: texts.append(s) or draw(self, x, y, s, *a, **kw))
    entries = [{"iteration": t, "alpha": None if t == 0 else 2.0, "gap": None if t == 0 else 0.1,
                "heldout_nll": 1.5 - 0.1 * t} for t in range(3)]
    summary = {"title": "m on mine.jsonl, held out: held.jsonl: IRIS", "loss": "iris", "iterations": entries}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report.write_report(tmp_path)
    assert any("only the toy tasks" in text for text in texts) and not any("no held-out data" in t for t in texts)
    texts.clear()
    report.write_report(tmp_path, {**summary, "iterations": [{k: v for k, v in e.items() if k != "heldout_nll"}
                                                             for e in entries]})
    assert any("no held-out data" in text for text in texts)
