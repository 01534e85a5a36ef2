"""The self-play driver end to end on the tiny model (in-process through `selfplay.run`)."""

import json

import pytest
import torch

from iris_ref import selfplay
from tests.driver_helpers import comparable, read_summary, small_config

REQUIRED = ("iteration", "alpha", "gap", "heldout_nll", "heldout_accuracy")


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("iris") / "run"
    summary = selfplay.run(small_config(run_dir, "--loss", "iris"))
    return run_dir, summary


def test_run_directory_layout_and_summary_schema(iris_run):
    run_dir, summary = iris_run
    assert summary == read_summary(run_dir)
    assert (run_dir / "report.png").stat().st_size > 1000
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["loss"] == "iris" and saved["versions"]["torch"] == torch.__version__
    entries = summary["iterations"]
    assert [e["iteration"] for e in entries] == [0, 1, 2]
    for entry in entries:
        for key in REQUIRED:
            assert key in entry, key
        assert entry["heldout_nll"] > 0 and 0 <= entry["heldout_accuracy"] <= 1
    assert entries[0]["alpha"] is None and entries[0]["gap"] is None
    # Adaptive schedule: the first iteration uses alpha_max, later ones stay in [alpha_min, alpha_max].
    assert entries[1]["alpha"] == 2.0 and 0.5 <= entries[2]["alpha"] <= 2.0
    for t in (1, 2):
        it = run_dir / f"iter_{t}"
        for name in ("synthetic.jsonl", "opponent_logps.pt", "metrics.jsonl", "COMPLETE", "eval.json"):
            assert (it / name).exists(), (t, name)
        assert (it / "checkpoint" / "model.safetensors").exists()
        assert (it / "checkpoint" / "tokenizer_config.json").exists()
        assert not (it / "trainer_state").exists()
        rows = [json.loads(line) for line in (it / "synthetic.jsonl").read_text().splitlines()]
        assert len(rows) == 16 and set(rows[0]) == {"prompt", "chosen", "rejected", "rejected_finished"}
        assert rows[0]["chosen"][0]["role"] == "assistant" and rows[0]["prompt"][-1]["role"] == "user"
        steps = [json.loads(line) for line in (it / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2]
        for key in ("loss", "rewards/real", "rewards/synthetic", "rewards/margins", "logps/real",
                    "weights/ess_real", "weights/ess_synthetic", "alpha"):
            assert key in steps[0], key


def test_opponent_of_iteration_t_is_the_checkpoint_of_iteration_t_minus_1(iris_run):
    from transformers import AutoModelForCausalLM

    run_dir, summary = iris_run
    for t in (1, 2):
        previous = AutoModelForCausalLM.from_pretrained(run_dir / f"iter_{t - 1}" / "checkpoint")
        saved = torch.load(run_dir / f"iter_{t}" / "opponent_logps.pt", weights_only=True)
        assert saved["opponent_sha256"] == selfplay.weights_sha256(previous)
        assert summary["iterations"][t]["opponent_sha256"] == saved["opponent_sha256"]
    # ... and never the policy itself: every iteration's model differs from its opponent.
    hashes = [summary["iterations"][t]["opponent_sha256"] for t in (1, 2)]
    assert hashes[0] != hashes[1]


def test_opponent_logprobs_match_the_opponent_and_are_recomputed_for_other_weights(iris_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from iris_ref.trainer import compute_logprobs

    run_dir, _ = iris_run
    saved = torch.load(run_dir / "iter_2" / "opponent_logps.pt", weights_only=True)
    opponent = AutoModelForCausalLM.from_pretrained(run_dir / "iter_1" / "checkpoint")
    config = small_config(tmp_path)
    tokenizer = selfplay.load_tokenizer(config)
    examples, encoded, _ = selfplay.load_data(config, tokenizer)
    from iris_ref import data

    rows = [json.loads(line) for line in (run_dir / "iter_2" / "synthetic.jsonl").read_text().splitlines()]
    # a response the opponent did not finish (cut at max_new_tokens) gets no end-of-turn token
    pairs = [(seq, data.encode_pair(tokenizer, ex.prompt_messages, row["rejected"][0]["content"], 48, 32,
                                    end_of_turn=row["rejected_finished"]))
             for seq, ex, row in zip(encoded, examples, rows)]
    assert not all(row["rejected_finished"] for row in rows)  # this weak model runs out of tokens
    real, synthetic = compute_logprobs(opponent, pairs, tokenizer.pad_token_id, 4)
    torch.testing.assert_close(real, saved["real"], rtol=0, atol=1e-4)
    torch.testing.assert_close(synthetic, saved["synthetic"], rtol=0, atol=1e-4)
    # A stale file (other weights' hash) is recomputed, a matching one is reused.
    target = tmp_path / "iter"
    target.mkdir()
    torch.save({**saved, "real": saved["real"] + 1.0, "opponent_sha256": "0" * 64}, target / "opponent_logps.pt")
    fresh = selfplay._opponent_logps(target, opponent, selfplay.weights_sha256(opponent), pairs,
                                     tokenizer.pad_token_id, config)
    torch.testing.assert_close(fresh["real"], saved["real"], rtol=0, atol=1e-4)
    reused = selfplay._opponent_logps(target, opponent, selfplay.weights_sha256(opponent), pairs,
                                      tokenizer.pad_token_id, config)
    assert torch.equal(reused["real"], fresh["real"])


@pytest.mark.parametrize("loss", ["space", "spif"])
def test_every_loss_runs_two_iterations(loss, tmp_path):
    summary = selfplay.run(small_config(tmp_path / loss, "--loss", loss))
    entries = summary["iterations"]
    assert [e["iteration"] for e in entries] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in entries[1:])
    # α is IRIS's order: the other objectives must not report one
    assert all((e["alpha"] is not None) == (loss == "iris" and e["iteration"] > 0) for e in entries)


def test_same_seed_gives_identical_metrics(iris_run, tmp_path):
    _, first = iris_run
    second = selfplay.run(small_config(tmp_path / "again", "--loss", "iris"))
    assert comparable(first) == comparable(second)


def test_existing_run_needs_resume_or_overwrite(iris_run):
    run_dir, _ = iris_run
    with pytest.raises(selfplay.InputError, match="already holds a run"):
        selfplay.run(small_config(run_dir))
    with pytest.raises(selfplay.InputError, match="changed option --beta"):
        selfplay.run(small_config(run_dir, "--resume", "--beta", "0.5"))
