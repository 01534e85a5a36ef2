"""bench/method_comparison.py: the fairness of the plan, the statistics, the report and job reuse.

The full bench takes the better part of an hour and its results are committed in bench/results/;
these tests (no training, a few seconds) check what makes those numbers trustworthy: every arm of
a seed starts from the same checkpoint with the same data, optimizer, epochs and batch size; the
SFT start stops on validation rows disjoint from the training and test rows; the data-efficiency
arms see the data they claim; the t-intervals, paired differences and seed counts are right; the
report renders them; a finished job is reused only when everything it depends on is unchanged.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import method_comparison as mc

SELF_PLAY_KEYS = {"loss", "alpha_schedule", "alpha", "num_synthetic", "mu"}  # what an arm may change


def _args(tmp_path, **overrides):
    parser = mc.build_parser()
    args = parser.parse_args(["--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _resolved(job, tmp_path):
    return mc.make_config(**job.options, seed=job.seed, output_dir=str(tmp_path / "out" / job.name)).to_dict()


def _rows(path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------- the plan


def test_every_arm_of_a_seed_starts_from_the_same_model_with_the_same_budget(tmp_path):
    args = _args(tmp_path)
    jobs = {j.name: j for j in mc.plan(args)}
    work = Path(args.work_dir)
    for family in mc.FAMILIES:
        for seed in args.seeds:
            start = jobs[f"{family}-seed{seed}-sft-start"]
            assert start.kind == "warmup" and start.start is None and start.options["model"] is None
            arms = {arm: jobs[f"{family}-seed{seed}-{arm}"] for arm in mc.ARMS}
            checkpoint = str(work / start.name / "run" / "iter_0" / "checkpoint")
            assert {j.options["model"] for j in arms.values()} == {checkpoint}
            assert {j.start for j in arms.values()} == {start.name}
            configs = {arm: _resolved(j, tmp_path) for arm, j in arms.items()}
            reference = configs["sft"]
            for arm, config in configs.items():
                differing = {k for k in config if config[k] != reference[k] and k != "output_dir"}
                assert differing <= SELF_PLAY_KEYS, (arm, differing)
                # the budget: same prompts, optimizer, learning rate, epochs, batch, β, iterations
                for key in ("dataset", "num_samples", "seed", "optimizer", "learning_rate", "epochs",
                            "global_batch_size", "micro_batch_size", "beta", "iters", "eval_dataset",
                            "max_length", "temperature", "warmup_ratio", "max_grad_norm", "sft_epochs"):
                    assert config[key] == reference[key], (arm, key)
                assert config["sft_epochs"] == 0  # the arms do not train SFT again from scratch
            assert arms["sft"].kind == "sft" and all(j.kind == "selfplay" for a, j in arms.items() if a != "sft")
            assert configs["iris-alpha2"]["alpha_schedule"] == "constant" and configs["iris-alpha2"]["alpha"] == 2.0
            assert configs["iris-adaptive"]["alpha_schedule"] == "adaptive"
            assert configs["iris-adaptive-k4"]["num_synthetic"] == 4 and configs["iris-adaptive"]["num_synthetic"] == 1
            assert configs["spin"]["loss"] == "spin" and configs["space"]["beta"] == configs["iris-alpha1"]["beta"]
            assert configs["sft"]["num_samples"] == args.prompts  # a seeded subset of the training rows


def test_the_start_stops_on_validation_rows_disjoint_from_training_and_test(tmp_path):
    args = _args(tmp_path)
    jobs = {j.name: j for j in mc.plan(args)}
    for family in mc.FAMILIES:
        start = _resolved(jobs[f"{family}-seed0-sft-start"], tmp_path)
        arm = _resolved(jobs[f"{family}-seed0-iris-adaptive"], tmp_path)
        assert start["sft_patience"] == args.sft_patience and start["sft_epochs"] == args.sft_max_epochs
        assert start["num_samples"] is None  # SFT sees every training row
        train, validation, test = _rows(start["dataset"]), _rows(start["eval_dataset"]), _rows(arm["eval_dataset"])
        assert arm["dataset"] == start["dataset"]
        assert len(train) == args.train_rows and len(validation) == args.validation_rows and len(test) == args.heldout_rows
        # disjoint draws: together at most as many copies of each row as the shipped file holds (the
        # prompt space is small, so identical rows recur in the data, also across the shipped files)
        shipped_train, shipped_test = mc.family_files(family)
        assert not Counter(train) + Counter(validation) - Counter(_rows(shipped_train))
        assert test == _rows(shipped_test)[:args.heldout_rows]  # the test rows come from the shipped held-out file


def test_data_efficiency_arms_see_the_data_they_claim(tmp_path):
    args = _args(tmp_path)
    jobs = {j.name: j for j in mc.plan(args)}
    for family in mc.FAMILIES:
        for seed in args.seeds:
            de_start = jobs[f"{family}-seed{seed}-de-sft-start"]
            main_start = jobs[f"{family}-seed{seed}-sft-start"]
            fraction, train = _rows(de_start.options["dataset"]), _rows(main_start.options["dataset"])
            n = mc.fraction_rows(args.train_rows, args.fraction)
            assert len(fraction) == n == round(args.fraction * args.train_rows)
            assert fraction == train[:n]  # a subset of the rows SFT-on-all saw
            # the fraction's start is trained exactly like the main start, on fewer rows
            a, b = dict(de_start.options), dict(main_start.options)
            assert a.pop("dataset") != b.pop("dataset") and a == b
            for arm in ("de-iris", "de-sft"):
                job = jobs[f"{family}-seed{seed}-{arm}"]
                assert job.start == de_start.name and job.options["dataset"] == de_start.options["dataset"]
                assert job.options["num_samples"] is None  # every row of the fraction, nothing else
                assert job.options["model"].startswith(str(Path(args.work_dir) / de_start.name))
            de_iris, main_iris = (_resolved(jobs[f"{family}-seed{seed}-{n}"], tmp_path) for n in ("de-iris", "iris-adaptive"))
            differing = {k for k in de_iris if de_iris[k] != main_iris[k]}
            assert differing == {"dataset", "model", "num_samples", "output_dir"}
            assert jobs[f"{family}-seed{seed}-de-sft"].kind == "sft"


def test_job_keys_follow_options_data_and_the_start(tmp_path):
    args = _args(tmp_path, families=["short"], seeds=[0], arms=["iris-adaptive", "sft"], data_efficiency=False)
    keys = mc.job_keys(mc.plan(args))
    assert len(set(keys.values())) == len(keys)
    assert mc.job_keys(mc.plan(args)) == keys  # deterministic
    changed = mc.job_keys(mc.plan(_args(tmp_path, families=["short"], seeds=[0], arms=["iris-adaptive", "sft"],
                                        data_efficiency=False, sft_lr=1e-3)))
    # a different warm-up changes the start's key and, through it, every arm's (same checkpoint path!)
    assert all(changed[name] != keys[name] for name in keys)
    lr = mc.job_keys(mc.plan(_args(tmp_path, families=["short"], seeds=[0], arms=["iris-adaptive", "sft"],
                                   data_efficiency=False, lr=3e-4)))
    assert lr["short-seed0-sft-start"] == keys["short-seed0-sft-start"]
    assert lr["short-seed0-sft"] != keys["short-seed0-sft"]


# ----------------------------------------------------------------------------- statistics


def test_t_interval_is_the_student_t_interval_over_seeds():
    values = [1.0, 2.0, 4.0]
    mean, low, high = mc.t_interval(values)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert mean == pytest.approx(7 / 3) and low == pytest.approx(7 / 3 - half) and high == pytest.approx(7 / 3 + half)
    five = [0.1, -0.2, 0.3, 0.0, 0.05]
    m, lo, hi = mc.t_interval(five)
    sd5 = math.sqrt(sum((v - 0.05) ** 2 for v in five) / 4)
    assert m == pytest.approx(0.05) and hi - m == pytest.approx(2.7764451051977987 * sd5 / math.sqrt(5))
    assert mc.t_interval([5.0]) == (5.0, None, None)
    assert mc.mean_std([5.0]) == (5.0, 0.0)


def test_paired_differences_and_seed_counts():
    # lower is better (NLL): arm − reference per seed
    d = mc.paired([1.0, 1.4, 0.9, 1.0], [0.9, 1.0, 1.0, 1.0], higher_is_better=False)
    assert d["values"] == pytest.approx([0.1, 0.4, -0.1, 0.0])
    assert (d["better_in"], d["worse_in"], d["tied_in"], d["seeds"]) == (1, 2, 1, 4)
    assert d["mean"] == pytest.approx(0.1)
    half = 3.182446305284263 * math.sqrt(sum((v - 0.1) ** 2 for v in [0.1, 0.4, -0.1, 0.0]) / 3) / 2  # t_{0.975, 3}
    assert d["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    up = mc.paired([0.5, 0.3], [0.4, 0.4], higher_is_better=True)
    assert up["values"] == pytest.approx([0.1, -0.1]) and up["better_in"] == 1 and up["worse_in"] == 1
    with pytest.raises(ValueError, match="one value per seed"):
        mc.paired([1.0], [1.0, 2.0], True)


def _run(values):
    return {"iterations": [{"iteration": t, **dict(zip(mc.METRICS, v))} for t, v in enumerate(values)]}


def _fake_results(seeds=(0, 1), arms=("iris-adaptive", "sft"), family="short"):
    """Per seed: start metrics s, then an arm's last iteration; the numbers are easy to check by hand."""
    results = {}
    start = {0: (1.0, 0.5, 0.4, 0.45, 0.6), 1: (1.2, 0.3, 0.2, 0.25, 0.8)}
    last = {("iris-adaptive", 0): (0.9, 0.6, 0.5, 0.5, 0.55), ("iris-adaptive", 1): (1.3, 0.3, 0.2, 0.2, 0.85),
            ("sft", 0): (1.0, 0.5, 0.4, 0.45, 0.6), ("sft", 1): (1.1, 0.4, 0.3, 0.3, 0.75),
            ("de-iris", 0): (1.5, 0.2, 0.1, 0.1, 0.9), ("de-iris", 1): (1.6, 0.1, 0.1, 0.1, 0.9),
            ("de-sft", 0): (1.55, 0.2, 0.1, 0.1, 0.9), ("de-sft", 1): (1.6, 0.1, 0.1, 0.1, 0.9)}
    de_start = {0: (1.6, 0.2, 0.1, 0.1, 0.9), 1: (1.7, 0.1, 0.1, 0.1, 0.9)}
    for s in seeds:
        for arm in arms:
            results[f"{family}-seed{s}-{arm}"] = _run([start[s], last[(arm, s)]])
        for arm in ("de-iris", "de-sft"):
            results[f"{family}-seed{s}-{arm}"] = _run([de_start[s], last[(arm, s)]])
        results[f"{family}-seed{s}-sft-check"] = _run([start[s], start[s]])  # lower lr: no change at all
        warm = {"rows": 1000, "best_epoch": 3, "epochs_run": 5, "stopped_by": "patience", "steps_per_epoch": 125,
                "sft_epochs": [{"epoch": e, "heldout_nll": 1.0 + abs(e - 3) / 10} for e in range(1, 6)], "seconds": 9.0}
        results[f"{family}-seed{s}-sft-start"] = dict(warm)
        results[f"{family}-seed{s}-de-sft-start"] = dict(warm, rows=250)
    return results


def test_aggregate_and_compare_against_hand_computation():
    results = _fake_results()
    table = mc.aggregate(results, ["short-seed0-iris-adaptive", "short-seed1-iris-adaptive"])
    assert table["1"]["heldout_nll"]["mean"] == pytest.approx(1.1)
    assert table["1"]["heldout_nll"]["std"] == pytest.approx(math.sqrt(0.08))
    assert table["0"]["heldout_accuracy"]["values"] == [0.5, 0.3]
    diffs = mc.compare(results, {"iris-adaptive": ["short-seed0-iris-adaptive", "short-seed1-iris-adaptive"]},
                       ["short-seed0-sft", "short-seed1-sft"])["iris-adaptive"]
    assert diffs["heldout_nll"]["values"] == pytest.approx([-0.1, 0.2]) and diffs["heldout_nll"]["better_in"] == 1
    assert diffs["heldout_accuracy"]["values"] == pytest.approx([0.1, -0.1])
    assert diffs["heldout_answer_tv"]["values"] == pytest.approx([-0.05, 0.1]) and diffs["heldout_answer_tv"]["better_in"] == 1
    # against the reference's start instead of its last iteration
    vs_start = mc.compare(results, {"x": ["short-seed0-sft", "short-seed1-sft"]}, ["short-seed0-sft", "short-seed1-sft"],
                          reference_iteration=0)["x"]
    assert vs_start["heldout_nll"]["values"] == pytest.approx([0.0, -0.1]) and vs_start["heldout_nll"]["tied_in"] == 1


# ----------------------------------------------------------------------------- the report


def _payload(tmp_path):
    args = _args(tmp_path, families=["short"], seeds=[0, 1], arms=["iris-adaptive", "sft"], iters=1)
    mc.split_family("short", Path(args.work_dir), args.train_rows, args.validation_rows, args.fraction, None)
    results = _fake_results()
    for job in mc.plan(args):  # what the jobs record
        if job.name in results:
            results[job.name]["options"] = job.options
    payload = mc.build_payload(args, results, "python bench/method_comparison.py --x", 125.0, (1.0, 2.5))
    return args, results, payload


def test_payload_records_seeds_sft_start_and_the_paired_differences(tmp_path):
    _, _, payload = _payload(tmp_path)
    assert payload["seeds"] == [0, 1]
    fam = payload["families"]["short"]
    start = fam["sft_start"]
    assert "early stopping" in start["how"] and "validation" in start["how"]
    assert [s["best_epoch"] for s in start["per_seed"]] == [3, 3] and start["per_seed"][0]["stopped_by"] == "patience"
    assert start["test_metrics"]["heldout_nll"]["mean"] == pytest.approx(1.1)
    gain = start["continued_sft"]["gain_last_minus_start"]["heldout_nll"]
    assert gain["values"] == pytest.approx([0.0, -0.1]) and gain["better_in"] == 1
    assert start["all_arms_share_the_start"] is True
    low = start["continued_sft_low_lr"]
    assert low["learning_rate"] == 1e-4 and low["gain_last_minus_start"]["heldout_nll"]["tied_in"] == 2
    assert fam["paired_vs_sft"]["iris-adaptive"]["heldout_nll"]["values"] == pytest.approx([-0.1, 0.2])
    assert "sft" not in fam["paired_vs_sft"]
    assert fam["change_from_start"]["iris-adaptive"]["heldout_accuracy"]["values"] == pytest.approx([0.1, 0.0])


def test_markdown_headline_has_mean_interval_and_seed_count(tmp_path):
    _, _, payload = _payload(tmp_path)
    text = mc.markdown_report(payload)
    assert "Command: `python bench/method_comparison.py --x`" in text
    assert "95% t-interval" in text and "## short family: headline (t = 1)" in text
    d = payload["families"]["short"]["paired_vs_sft"]["iris-adaptive"]["heldout_nll"]
    lo, hi = d["ci95"]
    cell = f"1.100; +0.050 [{lo:+.3f}, {hi:+.3f}]; 1/2"
    assert f"| IRIS (guarded adaptive α) | {cell} |" in text
    assert "| continued SFT (same steps) | 1.050 | 0.450 |" in text
    assert "| start (t = 0, every arm) | 1.100 | 0.400 |" in text
    assert "| 0 | 3 | 5 | patience | 1.200, 1.100, 1.000, 1.100, 1.200 |" in text
    assert "| metric | start (mean ± std) | continued SFT, lr 0.001 | continued SFT, lr 0.0001 |" in text
    assert "| NLL/token ↓ | 1.100 ± 0.141 | -0.0500 [" in text and "+0.0000 [+0.0000, +0.0000]; 0/2 |" in text
    assert "wall time 2.1 min" in text
    assert "adamw lr 0.001, β = 1 (SPACE too), global batch 32 (None optimizer steps" not in text
    assert "adamw lr 0.001, β = 1 (SPACE too), global batch 32" in text and "generation batch 64" in text


def test_render_writes_both_reports_and_report_only_rerenders(tmp_path):
    args, results, payload = _payload(tmp_path)
    de = mc.build_de_payload(args, results, payload)
    short = de["families"]["short"]
    assert short["fraction_rows"] == 250 and short["all_rows"] == 1000
    vs_all = short["paired_vs_sft_all"]["de-iris"]["heldout_nll"]
    assert vs_all["values"] == pytest.approx([0.5, 0.4]) and vs_all["better_in"] == 0
    out = Path(args.results_dir)
    mc.render(payload, de, out)
    for name in ("method_comparison", "data_efficiency"):
        assert json.loads((out / f"{name}.json").read_text())["seeds"] == [0, 1]
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| SFT converged on all rows (the main start) | 1.100 |" in (out / "data_efficiency.md").read_text()
    assert "sft_start" in json.loads((out / "method_comparison.json").read_text())["families"]["short"]
    (out / "method_comparison.md").unlink()
    (out / "data_efficiency.md").unlink()
    assert mc.main(["--report-only", "--results-dir", str(out)]) == 0
    assert (out / "method_comparison.md").read_text() == mc.markdown_report(payload)
    assert (out / "data_efficiency.md").is_file()


# ----------------------------------------------------------------------------- reuse of finished jobs


def test_a_finished_job_is_reused_only_when_its_key_matches(tmp_path, monkeypatch):
    calls = []

    def fake(job, work):
        calls.append(job.name)
        (work / "artefact").write_text("x")
        return {"iterations": [{"iteration": 0, "heldout_nll": 1.0}]}

    monkeypatch.setitem(mc.RUNNERS, "sft", fake)
    job = mc.Job("short-seed0-sft", "sft", 0, "short", "sft", {"lr": 1.0})
    work = str(tmp_path)
    first = mc.run_job(job, "key-a", work, threads=1)
    assert calls == ["short-seed0-sft"] and first["reused"] is False and first["key"] == "key-a"
    again = mc.run_job(job, "key-a", work, threads=1)
    assert calls == ["short-seed0-sft"] and again["reused"] is True and again["iterations"] == first["iterations"]
    other = mc.run_job(job, "key-b", work, threads=1)  # other options / data / start: redone from nothing
    assert calls == ["short-seed0-sft"] * 2 and other["reused"] is False
    assert mc.cached_result(work, job, "key-a") is None and mc.cached_result(work, job, "key-b") is not None
    # an unfinished job (no result.json) leaves nothing to reuse: its folder is cleared first
    (tmp_path / "short-seed0-sft" / "result.json").unlink()
    (tmp_path / "short-seed0-sft" / "stale").write_text("old")
    mc.run_job(job, "key-b", work, threads=1)
    assert not (tmp_path / "short-seed0-sft" / "stale").exists() and len(calls) == 3


def test_execute_runs_arms_after_their_start_and_reuses_cached_jobs(tmp_path, monkeypatch):
    order = []

    def fake(job, work):
        if job.start is not None:
            assert (Path(work).parent / job.start / "result.json").is_file()
        order.append(job.name)
        return {"iterations": [], "rows": 1}

    for kind in ("warmup", "selfplay", "sft"):
        monkeypatch.setitem(mc.RUNNERS, kind, fake)
    args = _args(tmp_path, families=["short"], seeds=[0], arms=["iris-adaptive", "sft"], workers=1)
    jobs = mc.plan(args)
    results = mc.execute(jobs, args)
    assert set(results) == {j.name for j in jobs} and order.index("short-seed0-sft-start") == 0
    order.clear()
    assert all(r["reused"] for r in mc.execute(jobs, args).values()) and order == []
    args.lr = 3e-4  # the arms change, the starts (and the lower-lr check of the start) do not
    mc.execute(mc.plan(args), args)
    assert sorted(order) == sorted(["short-seed0-iris-adaptive", "short-seed0-sft", "short-seed0-de-iris",
                                    "short-seed0-de-sft"])
    invocations = mc.record_invocation(Path(args.work_dir), "x", 3.0, ["a"])
    assert invocations[-1]["wall_seconds"] == 3.0 and invocations[-1]["jobs_run"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters and --epochs must be >= 1"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1)"),
    (["--arms", "spin"], "--arms must include sft"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--train-rows", "40"], "fewer rows than --batch-size"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert mc.main([*argv, "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "w").exists()


def test_a_work_dir_it_did_not_make_is_never_deleted(tmp_path, capsys):
    """--fresh deletes the work folder only when this bench made it (its marker is there)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    assert mc.main(["--work-dir", str(mine), "--fresh", "--results-dir", str(tmp_path / "r")]) == 2
    assert "was not made by this bench" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "keep"
