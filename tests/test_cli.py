"""run_iris.py: end to end as a subprocess, a user's own model folder and dataset, and one-line
errors (exit 2) for bad input before any heavy work."""

import json
import shutil

import pytest

import run_iris
from iris_ref.tiny import TOY_HELDOUT_PATH, TOY_TRAIN_PATH
from tests.driver_helpers import SMALL, read_summary, run_cli


def test_spin_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "spin"
    proc = run_cli(*SMALL, "--loss", "spin", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nll/token" in proc.stdout and "acc_greedy" in proc.stdout  # the per-iteration table
    summary = read_summary(out)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["config"]["loss"] == "spin"
    assert (out / "report.png").exists()


def test_bad_input_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("--alpha-schedule", "constant", "--alpha", "0", "--output-dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_local_model_folder_and_local_dataset(tiny_checkpoint, tmp_path, capsys):
    dataset = tmp_path / "my_data.jsonl"
    rows = TOY_TRAIN_PATH.read_text().splitlines()[:40]
    dataset.write_text("\n".join(rows) + "\n")
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    out = tmp_path / "run"
    code = run_iris.main([
        "--model", str(model), "--dataset", str(dataset), "--iters", "2",
        "--eval-dataset", str(TOY_HELDOUT_PATH), "--eval-num-samples", "8",
        "--num-samples", "16", "--epochs", "1", "--global-batch-size", "8", "--micro-batch-size", "4",
        "--max-length", "48", "--max-prompt-length", "32", "--learning-rate", "1e-3", "--threads", "1", "--output-dir", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    summary = read_summary(out)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1, 2]
    assert summary["iterations"][0]["checkpoint"] == str(model)  # θ_0 is the given model, not copied
    assert not (out / "iter_0" / "checkpoint").exists()
    saved = __import__("torch").load(out / "iter_1" / "opponent_logps.pt", weights_only=True)
    from transformers import AutoModelForCausalLM

    from iris_ref.selfplay import weights_sha256

    assert saved["opponent_sha256"] == weights_sha256(AutoModelForCausalLM.from_pretrained(model))


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{this is not json\n")
    no_assistant = tmp_path / "no_assistant.jsonl"
    no_assistant.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 4)
    return [
        (["--model", str(tmp_path / "no_such_model")], "unknown model"),
        (["--model", "nobody-here/no-such-model-xyz"], "unknown model"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "not found"),
        (["--dataset", str(empty)], "empty"),
        (["--dataset", str(garbage)], "cannot read"),
        (["--dataset", str(no_assistant)], "no valid rows"),
        (["--max-prompt-length", "4", "--max-length", "48"], "no valid rows"),
        (["--alpha-schedule", "constant", "--alpha", "-0.5"], "--alpha must be > 0"),
        (["--alpha-min", "2.5"], "larger than --alpha-max"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "does not divide"),
        (["--bf16"], "needs CUDA"),
        (["--loss", "nope"], "invalid choice"),
    ]


def test_each_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    for argv, fragment in _bad_inputs(tmp_path):
        out = tmp_path / "runs" / str(abs(hash(tuple(argv))))
        code = run_iris.main([*argv, "--output-dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and "\n" not in err and fragment in err, (argv, err)
        # Nothing heavy happened: no run directory content beyond nothing at all.
        assert not (out / "iter_0").exists(), argv


def test_existing_run_without_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert run_iris.main(["--output-dir", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_non_finite_loss_stops_with_the_step_named_and_exit_1(tmp_path, capsys):
    out = tmp_path / "run"
    # Step 1 runs at warmup lr 0, step 2's update blows the weights up, step 3's loss is not finite.
    code = run_iris.main([*SMALL, "--epochs", "2", "--learning-rate", "1e30", "--sft-learning-rate", "1e-3",
                          "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.startswith("error: iteration 1:") and "step 3" in err and "\n" not in err, err
    # The last good checkpoint (θ_0) is intact and loadable; iteration 1 is not marked complete.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "iter_0" / "checkpoint")
    assert (out / "iter_0" / "COMPLETE").exists() and not (out / "iter_1" / "COMPLETE").exists()
    assert not (out / "iter_1" / "checkpoint").exists()


def test_non_finite_weights_after_the_last_step_are_not_saved(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_iris.main([*SMALL, "--learning-rate", "1e30", "--sft-learning-rate", "1e-3", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: iteration 1: non-finite"), err
    assert not (out / "iter_1" / "checkpoint").exists() and (out / "iter_0" / "COMPLETE").exists()


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_options_with_defaults(flag, capsys):
    assert run_iris.main([flag]) == 0
    text = capsys.readouterr().out
    for option in ("--loss", "--alpha-schedule", "--beta", "--resume", "--generator", "--max-prompt-length"):
        assert option in text


def run_two_ranks(out, port: int, *extra: str) -> dict:
    """`torchrun --nproc_per_node 2 run_iris.py SMALL... extra...` on CPU (gloo); the run's summary."""
    import os
    import subprocess
    import sys

    from tests.driver_helpers import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(REPO / "run_iris.py"), *SMALL, *extra, "--output-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_summary(out)


def test_torchrun_two_ranks_on_cpu(tmp_path):
    """DDP over gloo: generation and opponent log-probs split over ranks and gathered in order,
    files written by rank 0 only, the opponent still the previous checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from iris_ref.selfplay import weights_sha256

    out = tmp_path / "ddp"
    summary = run_two_ranks(out, 29517, "--iters", "1")  # the last occurrence wins
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    rows = (out / "iter_1" / "synthetic.jsonl").read_text().splitlines()
    prompts = [json.loads(r)["prompt"][0]["content"] for r in rows]
    from iris_ref.data import load_examples

    expected, _ = load_examples(str(TOY_TRAIN_PATH), num_samples=16, seed=3)
    assert prompts == [ex.prompt_messages[0]["content"] for ex in expected]  # gathered in order
    saved = torch.load(out / "iter_1" / "opponent_logps.pt", weights_only=True)
    assert saved["real"].shape == (16,)
    opponent = AutoModelForCausalLM.from_pretrained(out / "iter_0" / "checkpoint")
    assert saved["opponent_sha256"] == weights_sha256(opponent)


def test_torchrun_fsdp_with_uneven_evaluation_shares(tmp_path):
    """FSDP over gloo with 17 held-out prompts on 2 ranks (9 and 8, so 2 and 1 generation
    batches of 8): every forward of the sharded model is collective, so the ranks must pad to the
    same number of batches and decode in step (synced_gpus) for the toy evaluation to finish."""
    summary = run_two_ranks(tmp_path / "fsdp", 29519, "--iters", "1", "--fsdp", "--eval-num-samples", "17",
                            "--generation-batch-size", "8")
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    assert all(e["heldout_accuracy"] is not None for e in summary["iterations"])
