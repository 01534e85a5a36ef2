"""A run killed mid-iteration resumes with `--output-dir X --resume` alone and ends exactly like an
uninterrupted run; completed iterations are never redone."""

import json

from iris_ref import selfplay
from iris_ref.config import parse_config
from tests.driver_helpers import SMALL, comparable, read_summary, run_cli, small_config


def test_kill_mid_iteration_then_resume_matches_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    # Die abruptly after optimizer step 2 of iteration 2. The trainer saved its state after
    # step 1 (--save-steps 1) but not yet after step 2.
    proc = run_cli(*SMALL, "--loss", "iris", "--output-dir", str(killed), script="tests/crash_run.py",
                   env_extra={"CRASH_AT": "2:2"})
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert (killed / "iter_1" / "COMPLETE").exists() and not (killed / "iter_2" / "COMPLETE").exists()
    assert not (killed / "summary.json").exists()
    assert (killed / "iter_2" / "trainer_state" / "LATEST").exists()
    checkpoint_1 = killed / "iter_1" / "checkpoint" / "model.safetensors"
    stamp = checkpoint_1.stat().st_mtime_ns
    synthetic_2 = (killed / "iter_2" / "synthetic.jsonl").read_text()

    # The README's form: nothing but the folder.
    resumed = selfplay.run(parse_config(["--output-dir", str(killed), "--resume"]))

    assert checkpoint_1.stat().st_mtime_ns == stamp  # the completed iteration was not redone
    assert (killed / "iter_2" / "synthetic.jsonl").read_text() == synthetic_2
    assert resumed["iterations"][2]["resumed_from_step"] == 1
    steps = [json.loads(line)["step"] for line in (killed / "iter_2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the replayed step is not duplicated

    fresh = selfplay.run(small_config(tmp_path / "fresh", "--loss", "iris"))
    ignore = {"resumed_from_step"}
    strip = lambda entries: [{k: v for k, v in e.items() if k not in ignore} for e in entries]  # noqa: E731
    assert strip(comparable(resumed)) == strip(comparable(fresh))
    assert read_summary(killed) == resumed


def test_resume_after_a_completed_run_does_nothing_new_and_can_extend_it(tmp_path):
    run_dir = tmp_path / "run"
    first = selfplay.run(small_config(run_dir, "--iters", "1"))
    stamp = (run_dir / "iter_1" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    again = selfplay.run(parse_config(["--output-dir", str(run_dir), "--resume"]))
    assert comparable(again) == comparable(first)
    longer = selfplay.run(parse_config(["--output-dir", str(run_dir), "--resume", "--iters", "2"]))
    assert [e["iteration"] for e in longer["iterations"]] == [0, 1, 2]
    assert (run_dir / "iter_1" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == stamp
    assert longer["iterations"][2]["opponent_sha256"] != longer["iterations"][1]["opponent_sha256"]
    # the extension is remembered: a later plain --resume keeps 2 iterations
    assert parse_config(["--output-dir", str(run_dir), "--resume"]).iters == 2
    # the schedule's history survived the resume: alpha_2 follows min(gap_1, gap_2)
    entries = longer["iterations"]
    assert entries[2]["gaps"] == [entries[1]["gap"], entries[2]["gap"]]
