"""bench/method_comparison.py: the fairness of the plan, the statistics and the report.

The full bench takes tens of minutes and its committed results are in bench/results/; these
tests check what makes those numbers trustworthy: every arm of a seed starts from the same
checkpoint with the same data, optimiser, epochs and batch size (so the same number of
gradient steps), the data-efficiency arms see the data they claim to see, and the mean ± std
and paired differences are computed right.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from bench import method_comparison as mc


def _args(**overrides):
    values = dict(seeds=[0, 1, 2], iters=3, methods=list(mc.METHODS), num_train=500, num_heldout=None,
                  fraction=0.25, data_efficiency=True, workers=2, threads=1, work_dir="/tmp/mc-work",
                  results_dir="/tmp/mc-results", fresh=False)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_every_arm_of_a_seed_starts_from_the_same_model_with_the_same_budget():
    warmups, jobs = mc.plan(_args())
    assert [w.name for w in warmups] == [f"seed{s}-warmup-{k}" for s in (0, 1, 2) for k in ("all", "fraction")]
    budget_keys = ("dataset", "num_samples", "epochs", "global_batch_size", "micro_batch_size",
                   "learning_rate", "optimizer", "beta", "warmup_ratio", "iters", "eval_dataset", "max_length")
    for seed in (0, 1, 2):
        main = [j for j in jobs if j.seed == seed and "-de-" not in j.name]
        assert sorted(j.name.split("-", 1)[1] for j in main) == sorted(mc.METHODS)
        starts = {j.options["model"] for j in main}
        assert starts == {f"/tmp/mc-work/seed{seed}-warmup-all/checkpoint"}
        for key in budget_keys:
            assert len({repr(j.options.get(key)) for j in main}) == 1, key
        by_name = {j.name.split("-", 1)[1]: j for j in main}
        assert by_name["sft"].kind == "sft"
        assert by_name["iris-alpha2"].options["alpha_schedule"] == "constant"
        assert by_name["iris-alpha2"].options["alpha"] == 2.0
        assert by_name["spin"].options["loss"] == "spin"

        de = {j.name.split("-de-", 1)[1]: j for j in jobs if j.seed == seed and "-de-" in j.name}
        assert set(de) == {"iris-fraction", "sft-fraction", "sft-all"}
        assert {j.options["model"] for j in de.values()} == {f"/tmp/mc-work/seed{seed}-warmup-fraction/checkpoint"}
        assert de["iris-fraction"].options["num_samples"] == 500  # 25% of the 2000 toy rows
        assert de["sft-fraction"].options["num_samples"] == 500
        assert de["sft-all"].options["num_samples"] is None  # every row
        assert by_name["spin"].options["num_samples"] == 500
    assert next(w for w in warmups if w.name == "seed0-warmup-all").options["num_samples"] is None
    fraction_warmup = next(w for w in warmups if w.name == "seed0-warmup-fraction")
    assert fraction_warmup.options["num_samples"] == 500 and fraction_warmup.options["model"] is None


def test_mean_std_is_the_sample_standard_deviation():
    mean, std = mc.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert mc.mean_std([5.0]) == (5.0, 0.0)


def _results():
    def run(values):
        return {"iterations": [{"iteration": t, "heldout_nll": v[0], "heldout_accuracy": v[1]} for t, v in enumerate(values)]}

    return {
        "seed0-a": run([(2.0, 0.1), (1.0, 0.5)]),
        "seed1-a": run([(2.0, 0.1), (1.4, 0.3)]),
        "seed0-sft": run([(2.0, 0.1), (0.9, 0.4)]),
        "seed1-sft": run([(2.0, 0.1), (1.0, 0.4)]),
    }


def test_aggregate_and_paired_difference():
    results = _results()
    table = mc.aggregate(results, {"a": ["seed0-a", "seed1-a"], "sft": ["seed0-sft", "seed1-sft"]})
    assert table["a"]["1"]["heldout_nll"]["mean"] == pytest.approx(1.2)
    assert table["a"]["1"]["heldout_nll"]["std"] == pytest.approx(math.sqrt(0.08))
    assert table["a"]["1"]["heldout_accuracy"]["values"] == [0.5, 0.3]
    nll = mc.paired_difference(results, ["seed0-a", "seed1-a"], ["seed0-sft", "seed1-sft"], "heldout_nll", 1)
    assert nll["values"] == pytest.approx([0.1, 0.4])
    assert nll["better_in"] == 0  # lower NLL is better; "a" is worse on both seeds
    acc = mc.paired_difference(results, ["seed0-a", "seed1-a"], ["seed0-sft", "seed1-sft"], "heldout_accuracy", 1)
    assert acc["values"] == pytest.approx([0.1, -0.1]) and acc["better_in"] == 1


def test_markdown_report_lists_every_arm_and_iteration(tmp_path):
    results = _results()
    table = mc.aggregate(results, {"a": ["seed0-a", "seed1-a"], "sft": ["seed0-sft", "seed1-sft"]})
    paired = {"a": {m: mc.paired_difference(results, ["seed0-a", "seed1-a"], ["seed0-sft", "seed1-sft"], m, 1)
                    for m in mc.METRICS}}
    text = mc.markdown_report("T", ["Command: `x`"], table, {"a": "Arm A", "sft": "SFT"}, 1, paired, "SFT")
    assert "Command: `x`" in text
    assert "| Arm A | 1.200 ± 0.283 |" in text
    assert "+0.250 ± 0.212 (better in 0/2)" in text
    assert "t = 0 | t = 1" in text
    mc.plot(table, {"a": "Arm A", "sft": "SFT"}, tmp_path / "p.png", "T")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters must be >= 1"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1)"),
    (["--methods", "spin"], "--methods must include sft"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert mc.main([*argv, "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "w").exists()
