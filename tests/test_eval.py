"""eval/run_eval.py: the toy suite end to end (CLI subprocess and in-process), and its errors.

All offline (conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); the model is the random
tiny checkpoint, so the checks are about the plumbing, not the scores: the table and plot
exist and agree with the raw JSON, run directories expand in iteration order, lm-eval's
multiple-choice accuracy matches an independent computation with the same chat template,
and every bad request is one line on stderr with exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval import run_eval

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "run_eval.py"
TOY_MC = REPO / "eval" / "tasks" / "toy" / "toy_mc.jsonl"
MODEL_CONFIG = json.dumps({"model_type": "qwen2"})




def _make_run_dir(root: Path, checkpoint: Path, complete: list[int], incomplete: list[int]) -> Path:
    """A run directory shaped like the driver's: iter_<t>/checkpoint (+ COMPLETE)."""
    run_dir = root / "demo_run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"config": {"loss": "iris", "iters": 3}, "versions": {}}))
    for t in complete + incomplete:
        shutil.copytree(checkpoint, run_dir / f"iter_{t}" / "checkpoint")
        if t in complete:
            (run_dir / f"iter_{t}" / "COMPLETE").write_text("")
    return run_dir


def _parse_table(markdown: str) -> tuple[list[str], dict[str, list[float]]]:
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    body = {}
    for line in rows[2:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        body[cells[0]] = [float(c) for c in cells[1:]]
    return header[1:], body


def test_toy_suite_cli_writes_table_plot_and_raw_json(tiny_checkpoint, tmp_path):
    run_dir = _make_run_dir(tmp_path, tiny_checkpoint, complete=[0, 1], incomplete=[2])
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", str(run_dir), "--suite", "toy",
         "--output", str(out), "--limit", "6", "--batch-size", "8", "--device", "cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    labels, table = _parse_table((out / "results.md").read_text())
    # iter_2 has a checkpoint but no COMPLETE marker: never evaluated.
    assert labels == ["demo_run/iter_0", "demo_run/iter_1"]
    assert set(table) == {"Toy-MC (0-shot, acc)", "Toy-Gen (0-shot, exact_match)", "Average"}
    for label_index in range(2):
        scores = [table[name][label_index] for name in table if name != "Average"]
        assert all(0.0 <= s <= 100.0 for s in scores)
        assert table["Average"][label_index] == pytest.approx(sum(scores) / 2, abs=0.006)
    # The two iterations are the same weights: evaluation is deterministic.
    assert table["Toy-MC (0-shot, acc)"][0] == table["Toy-MC (0-shot, acc)"][1]

    summary = json.loads((out / "results.json").read_text())
    settings = summary["settings"]
    assert settings["apply_chat_template"] is True and settings["fewshot_as_multiturn"] is True
    assert settings["limit"] == 6 and settings["suite"] == "toy"
    assert "lm_eval" in settings["versions"] and "torch" in settings["versions"]
    for label in labels:
        raw = json.loads((out / "raw" / (label.replace("/", "__") + ".json")).read_text())
        assert raw["results"]["toy_mc"]["sample_len"] == 6
        assert raw["results"]["toy_gen"]["sample_len"] == 6
        assert "<|im_start|>" in raw["chat_template"]
        assert summary["scores"][label]["toy_mc"] == pytest.approx(raw["results"]["toy_mc"]["acc,none"])
        assert table["Toy-MC (0-shot, acc)"][labels.index(label)] == pytest.approx(
            100 * raw["results"]["toy_mc"]["acc,none"], abs=0.006)

    png = (out / "scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out / "scores.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def _independent_mc_accuracy(checkpoint: Path, rows: list[dict]) -> float:
    """argmax over choices of log p(choice | chat-templated prompt), with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    correct = 0
    for row in rows:
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True
        )
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            full_ids = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
            assert full_ids[: len(context_ids)] == context_ids
            ids = torch.tensor([full_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            token_logps = logprobs.gather(1, targets[:, None])[:, 0]
            scores.append(float(token_logps[len(context_ids) - 1:].sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return correct / len(rows)


def test_in_process_mc_accuracy_matches_independent_computation(tiny_checkpoint, tmp_path):
    limit = 12
    summary = run_eval.run([
        "--models", str(tiny_checkpoint), "--suite", "toy", "--tasks", "toy_mc",
        "--output", str(tmp_path / "out"), "--limit", str(limit), "--batch-size", "4", "--device", "cpu",
    ])
    label = summary["checkpoints"][0]["label"]
    rows = [json.loads(l) for l in TOY_MC.read_text().splitlines()[:limit]]
    expected = _independent_mc_accuracy(Path(tiny_checkpoint), rows)
    assert summary["scores"][label]["toy_mc"] == pytest.approx(expected, abs=1e-9)
    assert list(summary["scores"][label]) == ["toy_mc"]


def test_run_directory_expansion_orders_iterations_numerically(tmp_path):
    run_dir = tmp_path / "r"
    # A run directory's own config.json (the run's options) must not make it look like a model.
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"config": {"loss": "iris"}, "versions": {}}))
    for t in (10, 2, 0, 1):
        ckpt = run_dir / f"iter_{t}" / "checkpoint"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text(MODEL_CONFIG)
        (run_dir / f"iter_{t}" / "COMPLETE").write_text("")
    (run_dir / "iter_11").mkdir()  # started, nothing saved yet
    single = tmp_path / "plain_model"
    single.mkdir()
    (single / "config.json").write_text(MODEL_CONFIG)
    checkpoints = run_eval.expand_models([str(run_dir), str(single), str(single)])
    assert [c.label for c in checkpoints] == [
        "r/iter_0", "r/iter_1", "r/iter_2", "r/iter_10", "plain_model", "plain_model#2"]
    assert checkpoints[3].path == run_dir / "iter_10" / "checkpoint"

    # A run started from a given model: iter_0 holds only source.json naming it.
    given = tmp_path / "given"
    (given / "iter_0").mkdir(parents=True)
    (given / "iter_0" / "source.json").write_text(json.dumps({"model": str(single)}))
    (given / "iter_0" / "COMPLETE").write_text("")
    (given / "iter_1" / "checkpoint").mkdir(parents=True)
    (given / "iter_1" / "checkpoint" / "config.json").write_text(MODEL_CONFIG)
    (given / "iter_1" / "COMPLETE").write_text("")
    assert [c.label for c in run_eval.expand_models([str(given)])] == ["given/iter_1"]
    with_base = run_eval.expand_models([str(given)], include_base=True)
    assert [(c.label, c.path) for c in with_base] == [
        ("given/base", single), ("given/iter_1", given / "iter_1" / "checkpoint")]

    # Two runs with the same directory name are told apart by their parents.
    other = tmp_path / "elsewhere" / "given"
    shutil.copytree(given, other)
    labels = [c.label for c in run_eval.expand_models([str(given), str(other)], include_base=True)]
    assert labels == [f"{tmp_path.name}/given/base", f"{tmp_path.name}/given/iter_1",
                      "elsewhere/given/base", "elsewhere/given/iter_1"]


def _assert_one_line_error(capsys, argv, pattern):
    code = run_eval.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def test_cheap_errors_are_one_line_with_exit_2(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "o")
    model = str(tiny_checkpoint)
    _assert_one_line_error(capsys, ["--models", model, "--suite", "iris11", "--output", out],
                           r"unknown suite 'iris11'.*iris10, openllm6, toy")
    _assert_one_line_error(capsys, ["--models", str(tmp_path / "nope"), "--suite", "toy", "--output", out],
                           r"checkpoint not found: .*nope")
    (tmp_path / "empty_run").mkdir()
    _assert_one_line_error(capsys, ["--models", str(tmp_path / "empty_run"), "--suite", "toy", "--output", out],
                           r"no model in .*empty_run")
    _assert_one_line_error(capsys, ["--models", model, "--suite", "toy", "--output", out,
                                    "--no-apply-chat-template", "--fewshot-as-multiturn"],
                           r"--fewshot-as-multiturn needs --apply-chat-template")
    _assert_one_line_error(capsys, ["--models", model, "--output", out], r"give --suite or --tasks")
    assert not (tmp_path / "o").exists()


def test_unknown_task_and_offline_hub_task_fail_before_loading(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    # An empty cache: no hub dataset can be served offline.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "ds_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = []
    monkeypatch.setattr(run_eval, "_make_lm", lambda *a, **k: loaded.append(a))
    out = str(tmp_path / "o")
    model = str(tiny_checkpoint)
    _assert_one_line_error(capsys, ["--models", model, "--suite", "toy", "--tasks", "toy_mc", "no_such_task",
                                    "--output", out], r"unknown lm-eval task\(s\): no_such_task")
    _assert_one_line_error(capsys, ["--models", model, "--suite", "openllm6", "--output", out],
                           r"task 'arc_challenge' needs the hub dataset 'allenai/ai2_arc'.*OFFLINE")
    # A group task is followed down to its subtasks' datasets.
    _assert_one_line_error(capsys, ["--models", model, "--suite", "iris10", "--tasks", "MMLU", "--output", out],
                           r"task 'mmlu' needs the hub dataset 'cais/mmlu'")
    assert loaded == [] and not (tmp_path / "o").exists()
    # With a cached copy the same request passes validation (offline evaluation from cache works).
    (tmp_path / "ds_cache" / "cais___mmlu").mkdir(parents=True)
    args, specs, checkpoints, _ = run_eval.prepare(
        ["--models", model, "--suite", "iris10", "--tasks", "MMLU", "--output", out])
    assert [s.task for s in specs] == ["mmlu"] and specs[0].num_fewshot == 5
    assert math.isclose(len(checkpoints), 1)


def test_trust_remote_code_reaches_the_lm_eval_model(tmp_path, monkeypatch):
    """--trust-remote-code is passed to lm-eval's model for both backends (spied on its loader)."""
    import types

    import lm_eval.api.registry as registry

    seen = []

    class Recorder:
        @classmethod
        def create_from_arg_obj(cls, model_args, extra):
            seen.append((model_args, extra))

    monkeypatch.setattr(registry, "get_model", lambda name: Recorder)
    checkpoint = types.SimpleNamespace(path=tmp_path)
    for backend, flag in (("hf", True), ("vllm", True), ("hf", False)):
        args = types.SimpleNamespace(backend=backend, dtype="auto", trust_remote_code=flag, batch_size=4, device="cpu")
        run_eval._make_lm(checkpoint, args)
    assert [m["trust_remote_code"] for m, _ in seen] == [True, True, False]
    assert "device" not in seen[1][1] and seen[0][1]["device"] == "cpu"
    assert run_eval.build_parser().parse_args(["--models", "m", "--output", "o"]).trust_remote_code is False
