"""run_iris.py: end to end as a subprocess, a user's own model folder and data, progress a batch job
can follow, one-line errors (exit 2) before anything is written, --dry-run, TensorBoard, torchrun."""

import json
import os
import shutil

import pytest

import run_iris
from iris_ref.tiny import TOY_HELDOUT_PATH, TOY_TRAIN_PATH
from tests.driver_helpers import REPO, SMALL, read_summary, run_cli


def test_spin_end_to_end_through_the_cli_with_progress_lines(tmp_path):
    out = tmp_path / "spin"
    proc = run_cli(*SMALL, "--loss", "spin", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("run folder:")[0].splitlines()
    header = next(line for line in table if "nll/token" in line)
    assert "acc_greedy" in header and "alpha" not in header  # no order alpha for SPIN
    summary = read_summary(out)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1, 2] and "SPIN" in summary["title"]
    assert json.loads((out / "config.json").read_text())["config"]["loss"] == "spin"
    # stderr is not a terminal: every long phase reports done/total lines, with a rate
    for phase in ("SFT warm-up", "generation", "opponent log-probs", "iteration 1 training", "held-out"):
        assert any(line.startswith(f"[iris] {phase}") and "/" in line and "/s" in line
                   for line in proc.stderr.splitlines()), phase
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr[-2000:]


def test_bad_input_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("--alpha-schedule", "constant", "--alpha", "0", "--output-dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def _small_model_run(tiny_checkpoint, tmp_path, dataset, *extra):
    model = tmp_path / "model"
    if not model.exists():
        shutil.copytree(tiny_checkpoint, model)
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    code = run_iris.main([
        "--model", str(model), "--dataset", str(dataset), "--iters", "1", "--num-samples", "16", "--epochs", "1",
        "--global-batch-size", "8", "--micro-batch-size", "4", "--max-length", "48", "--max-prompt-length", "32",
        "--learning-rate", "1e-3", "--threads", "1", "--output-dir", str(out), *extra])
    return code, model, out


def test_local_model_folder_and_local_dataset(tiny_checkpoint, tmp_path, capsys):
    dataset = tmp_path / "my_data.jsonl"
    dataset.write_text("\n".join(TOY_TRAIN_PATH.read_text().splitlines()[:40]) + "\n")
    code, model, out = _small_model_run(tiny_checkpoint, tmp_path, dataset, "--eval-dataset", str(TOY_HELDOUT_PATH),
                                        "--eval-num-samples", "8")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "looks like a base model" in captured.out  # a model folder with no SFT marker, no warm-up
    summary = read_summary(out)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    assert summary["iterations"][0]["checkpoint"] == str(model)  # θ_0 is the given model, not copied
    assert not (out / "iter_0" / "checkpoint").exists()
    import torch

    from iris_ref import models

    saved = torch.load(out / "iter_1" / "opponent_logps.pt", weights_only=True)
    assert saved["opponent_sha256"] == models.weights_sha256(models.load_policy(model, device=torch.device("cpu")))


def test_trl_datasets_and_our_own_synthetic_file_are_accepted(tiny_checkpoint, tmp_path, capsys):
    rows = [json.loads(line) for line in TOY_TRAIN_PATH.read_text().splitlines()[:24]]
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps({"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
                                       "rejected": "no"}) + "\n" for r in rows))
    code, _, out = _small_model_run(tiny_checkpoint, tmp_path, trl)
    assert code == 0, capsys.readouterr().err
    # the synthetic.jsonl this project writes is itself a TRL dataset (prompt/chosen)
    code, _, second = _small_model_run(tiny_checkpoint, tmp_path, out / "iter_1" / "synthetic.jsonl")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "(no held-out data" in captured.out  # the table says so instead of empty columns


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{this is not json\n")
    no_assistant = tmp_path / "no_assistant.jsonl"
    no_assistant.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 4)
    few = tmp_path / "few.jsonl"  # 28 valid rows against the embedded global batch of 32
    few.write_text("\n".join(TOY_TRAIN_PATH.read_text().splitlines()[:28]) + "\n")
    return [
        (["--model", str(tmp_path / "no_such_model")], "unknown model"),
        (["--model", "nobody-here/no-such-model-xyz"], "HF_HUB_OFFLINE=1 is set"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "not found"),
        (["--dataset", str(empty)], "empty"),
        (["--dataset", str(garbage)], "cannot read"),
        (["--dataset", str(no_assistant)], "no valid rows"),
        (["--dataset", str(few)], "28 usable prompts"),
        (["--num-samples", "230", "--sft-validation-size", "200"], "holds out 200 of the 230 usable prompts"),
        (["--num-samples", "60"], "--sft-validation-size 0.1 holds out 32 of the 60 usable prompts"),  # the floor
        (["--num-samples", "10"], "fewer than --global-batch-size 32"),
        (["--max-prompt-length", "4", "--max-length", "48"], "0 usable prompts (skipped: too_long=2000)"),
        (["--alpha-schedule", "constant", "--alpha", "-0.5"], "--alpha must be > 0"),
        (["--alpha-min", "2.5"], "larger than --alpha-max"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "does not divide"),
        (["--bf16"], "needs CUDA"),
        (["--loss", "nope"], "invalid choice"),
        (["--resume"], "needs --output-dir"),
    ]


def test_each_bad_input_gives_one_line_exit_2_and_leaves_the_folder_as_it_was(tmp_path, capsys):
    for argv, fragment in _bad_inputs(tmp_path):
        out = tmp_path / "runs" / str(abs(hash(tuple(argv))))
        code = run_iris.main([*argv, "--output-dir", str(out)] if "--resume" not in argv else argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and "\n" not in err and fragment in err, (argv, err)
        assert not out.exists(), argv  # nothing was written, not even the folder
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run_iris.main(["--num-samples", "10", "--output-dir", str(existing)]) == 2
    assert list(existing.iterdir()) == []


def test_a_folder_holding_another_run_is_not_offered_resume(tmp_path, capsys):
    from iris_ref import rundir
    from iris_ref.config import parse_config, saved_payload

    out = tmp_path / "toy"
    rundir.prepare(out, "fresh", saved_payload(parse_config(["--output-dir", str(out)])))
    assert run_iris.main(["--loss", "spin", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds another run (--loss 'spin' (the run has 'iris'))" in err and "--resume" not in err
    assert run_iris.main(["--output-dir", str(out)]) == 2
    assert "add --resume to continue it" in capsys.readouterr().err


def test_resume_of_nothing_is_an_error_not_a_fresh_run(tmp_path, capsys):
    assert run_iris.main(["--output-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "nothing").exists()


def test_a_folder_that_is_not_a_run_is_never_deleted(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert run_iris.main(["--output-dir", str(out), *extra]) == 2
        assert "not created by iris-ref" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]


def test_non_finite_loss_stops_with_the_step_named_and_exit_1(tmp_path, capsys):
    out = tmp_path / "run"
    # Step 1 runs at warmup lr 0, step 2's update blows the weights up, step 3's loss is not finite.
    code = run_iris.main([*SMALL, "--epochs", "2", "--learning-rate", "1e30", "--sft-learning-rate", "1e-3",
                          "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert code == 1, err
    assert err.startswith("error: iteration 1") and "step 3" in err and "\n" not in err, err
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "iter_0" / "checkpoint")  # the last good checkpoint is intact
    assert (out / "iter_0" / "COMPLETE").exists() and not (out / "iter_1" / "COMPLETE").exists()
    assert not (out / "iter_1" / "checkpoint").exists()


def test_non_finite_weights_after_the_last_step_are_not_saved(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_iris.main([*SMALL, "--learning-rate", "1e30", "--sft-learning-rate", "1e-3", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert code == 1 and err.startswith("error: iteration 1: non-finite"), err
    assert not (out / "iter_1" / "checkpoint").exists() and (out / "iter_0" / "COMPLETE").exists()


def test_help_lists_options_with_defaults(capsys):
    assert run_iris.main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--loss", "--alpha-schedule", "--beta", "--resume", "--generator", "--max-prompt-length"):
        assert option in text


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "planned"
    assert run_iris.main(["--dry-run", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    for fragment in ("dry run", "1800 prompts", "optimizer steps", "generator", "disk at peak", "parameters"):
        assert fragment in text, fragment
    assert "3 iterations x 1 epochs x 56 steps = 168 optimizer steps" in text  # 200 rows held out for early stopping
    assert not out.exists()


def test_dry_run_of_the_3b_config_offline_fails_only_at_the_model_lookup(tmp_path):
    proc = run_cli("--config", "configs/qwen2.5-3b.yaml", "--dry-run", "--output-dir", str(tmp_path / "q"),
                   cwd=tmp_path)  # from a folder without that file: the shipped config by name
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown model 'Qwen/Qwen2.5-3B'") and "HF_HUB_OFFLINE=1 is set" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "q").exists()


def test_tensorboard_events_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    code = run_iris.main([*SMALL, "--iters", "1", "--report-to", "tensorboard", "--output-dir", str(out)])
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "iter_1" / "metrics.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (out / "iter_0" / "metrics.jsonl").read_text().splitlines()]
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [s["step"] for s in sft] + [len(sft) + r["step"] for r in records]
    assert [e.value for e in losses[len(sft):]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "rewards/margins" in events.Tags()["scalars"]


def run_ranks(out, nproc: int, *extra: str, port: int) -> dict:
    """`torchrun --nproc_per_node N run_iris.py SMALL... extra...` on CPU (gloo); the run's summary."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)] \
        if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, str(REPO / "run_iris.py"), *SMALL, *extra, "--output-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_summary(out)


def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path):
    """DDP over gloo: generation, opponent log-probs and training split over ranks and gathered in
    order; sampling does not depend on the rank layout, so the synthetic data is the same."""
    import torch

    from iris_ref import models

    one = run_ranks(tmp_path / "one", 1, "--iters", "1", port=0)
    two = run_ranks(tmp_path / "two", 2, "--iters", "1", port=29517)
    synthetic = [(tmp_path / name / "iter_1" / "synthetic.jsonl").read_text() for name in ("one", "two")]
    assert synthetic[0] == synthetic[1]
    saved = [torch.load(tmp_path / name / "iter_1" / "opponent_logps.pt", weights_only=True) for name in ("one", "two")]
    torch.testing.assert_close(saved[1]["real"], saved[0]["real"], rtol=0, atol=1e-5)
    opponent = models.load_policy(tmp_path / "two" / "iter_0" / "checkpoint", device=torch.device("cpu"))
    assert saved[1]["opponent_sha256"] == models.weights_sha256(opponent)
    assert two["iterations"][1]["loss"] == pytest.approx(one["iterations"][1]["loss"], rel=1e-4, abs=1e-6)


def test_torchrun_fsdp_with_uneven_evaluation_shares(tmp_path):
    """FSDP over gloo with 17 held-out prompts: every forward of the sharded model is collective, so
    the ranks must run the same number of batches and decode in step for the toy evaluation to finish."""
    summary = run_ranks(tmp_path / "fsdp", 2, "--iters", "1", "--fsdp", "--eval-num-samples", "17",
                        "--generation-batch-size", "8", port=29519)
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    assert all(e["heldout_accuracy"] is not None for e in summary["iterations"])
