"""The self-play driver end to end on the tiny model (in-process through `selfplay.run`)."""

import json

import pytest
import torch
from safetensors import safe_open

from iris_ref.chat import ChatFormat
from iris_ref import models, selfplay
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
    assert (run_dir / ".iris-run").is_file() and (run_dir / "report.png").stat().st_size > 1000
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["loss"] == "iris" and saved["versions"]["torch"] == torch.__version__
    entries = summary["iterations"]
    assert [e["iteration"] for e in entries] == [0, 1, 2]
    for entry in entries:
        for key in REQUIRED:
            assert key in entry, key
        assert entry["heldout_nll"] > 0 and 0 <= entry["heldout_accuracy"] <= 1
    assert entries[0]["alpha"] is None and entries[0]["gap"] is None
    # The guarded schedule: alpha_max first, then never above the previous iteration's.
    assert entries[1]["alpha"] == 2.0 and 0.5 <= entries[2]["alpha"] <= entries[1]["alpha"]
    assert entries[2]["gaps"] == [entries[1]["gap"], entries[2]["gap"]]
    for t in (1, 2):
        it = run_dir / f"iter_{t}"
        for name in ("synthetic.jsonl", "opponent_logps.pt", "metrics.jsonl", "COMPLETE", "eval.json"):
            assert (it / name).exists(), (t, name)
        assert (it / "checkpoint" / "model.safetensors").exists()
        assert (it / "checkpoint" / "tokenizer_config.json").exists()
        assert not (it / "trainer_state").exists()
        rows = [json.loads(line) for line in (it / "synthetic.jsonl").read_text().splitlines()]
        assert len(rows) == 16
        assert set(rows[0]) == {"prompt", "chosen", "rejected", "prompt_token_ids", "rejected_token_ids",
                                "rejected_finished", "chosen_cut", "sample_index"}
        assert rows[0]["chosen"][0]["role"] == "assistant" and rows[0]["prompt"][-1]["role"] == "user"
        steps = [json.loads(line) for line in (it / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2]
        for key in ("loss", "rewards/real", "rewards/synthetic", "rewards/margins", "logps/real",
                    "weights/ess_real", "weights/ess_synthetic", "padding_fraction"):
            assert key in steps[0], key


def test_saved_checkpoints_keep_use_cache_and_one_tied_embedding(iris_run):
    run_dir, _ = iris_run
    for t in (0, 1, 2):
        folder = run_dir / f"iter_{t}" / "checkpoint"
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True
        with safe_open(folder / "model.safetensors", "pt") as handle:
            assert "lm_head.weight" not in handle.keys() and "model.embed_tokens.weight" in handle.keys()


def test_tied_weights_stay_one_tensor_in_the_state_dict(tokenizer_and_model=None):
    """Negative control of the save path: the state dict that save_pretrained gets keeps the tie as
    one tensor (a GPU model's `.to("cpu")` per name would make two, written twice)."""
    from iris_ref import distributed
    from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer(), seed=0)
    state = distributed.full_model_state_dict(model)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_synthetic_responses_are_scored_from_their_sampled_token_ids(iris_run):
    """The opponent log-probs are those of exactly the sampled ids: re-scoring the saved ids with
    the opponent checkpoint reproduces them; a re-tokenisation of the text would not be needed."""
    from iris_ref import data
    from iris_ref.scoring import score_sequences

    run_dir, _ = iris_run
    rows = [json.loads(line) for line in (run_dir / "iter_2" / "synthetic.jsonl").read_text().splitlines()]
    saved = torch.load(run_dir / "iter_2" / "opponent_logps.pt", weights_only=True)
    opponent = models.load_policy(run_dir / "iter_1" / "checkpoint", device=torch.device("cpu"))
    tokenizer = models.load_tokenizer(None)
    chat = ChatFormat(tokenizer)
    sequences = [data.encode_generated(chat, r["prompt"], r["rejected_token_ids"], 48, 32) for r in rows]
    assert all(r["prompt_token_ids"] == chat.prompt_ids(r["prompt"]) for r in rows)
    rescored = score_sequences(opponent, sequences, tokenizer.pad_token_id, token_budget=10**6)
    torch.testing.assert_close(rescored, saved["synthetic"], rtol=0, atol=1e-4)
    eot = chat.end_of_turn_ids[-1]
    for row in rows:  # the stop token the opponent emitted ends a finished response; nothing is appended otherwise
        assert (row["rejected_token_ids"][-1] in chat.stop_ids) == row["rejected_finished"]
    assert any(not r["rejected_finished"] for r in rows) or all(r["rejected_token_ids"][-1] == eot for r in rows)


def test_opponent_of_iteration_t_is_the_checkpoint_of_iteration_t_minus_1(iris_run):
    run_dir, summary = iris_run
    for t in (1, 2):
        previous = models.load_policy(run_dir / f"iter_{t - 1}" / "checkpoint", device=torch.device("cpu"))
        saved = torch.load(run_dir / f"iter_{t}" / "opponent_logps.pt", weights_only=True)
        assert saved["opponent_sha256"] == models.weights_sha256(previous)
        assert summary["iterations"][t]["opponent_sha256"] == saved["opponent_sha256"]
    hashes = [summary["iterations"][t]["opponent_sha256"] for t in (1, 2)]
    assert hashes[0] != hashes[1]  # never the policy itself: each iteration's model moved


def test_stale_opponent_logprobs_are_recomputed_and_matching_ones_reused(iris_run, tmp_path, monkeypatch):
    """Resume reuses opponent_logps.pt only when it belongs to the opponent's weights."""
    import shutil

    run_dir, first = iris_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for name in ("COMPLETE", "checkpoint", "eval.json", "train_summary.json", "metrics.jsonl"):
        target = copy / "iter_2" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    saved = torch.load(copy / "iter_2" / "opponent_logps.pt", weights_only=True)
    torch.save({**saved, "real": saved["real"] + 1.0, "opponent_sha256": "0" * 64}, copy / "iter_2" / "opponent_logps.pt")
    calls = []
    real = selfplay.opponent_logprobs
    monkeypatch.setattr(selfplay, "opponent_logprobs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    again = selfplay.run(small_config(copy, "--loss", "iris", "--resume"))
    assert calls == [1]  # recomputed once, for the stale file
    assert comparable(again)[2] == comparable(first)[2]
    assert torch.equal(torch.load(copy / "iter_2" / "opponent_logps.pt", weights_only=True)["real"], saved["real"])


@pytest.mark.parametrize("loss", ["space", "spif"])
def test_every_loss_runs_two_iterations(loss, tmp_path):
    summary = selfplay.run(small_config(tmp_path / loss, "--loss", loss))
    entries = summary["iterations"]
    assert [e["iteration"] for e in entries] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in entries[1:])
    assert all(e["alpha"] is None for e in entries)  # alpha is IRIS's order only
    assert loss.upper() in summary["title"]


def test_two_synthetic_responses_per_prompt_end_to_end(tmp_path):
    run_dir = tmp_path / "k2"
    summary = selfplay.run(small_config(run_dir, "--iters", "1", "--num-synthetic", "2"))
    rows = [json.loads(line) for line in (run_dir / "iter_1" / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and [r["sample_index"] for r in rows[:4]] == [0, 1, 0, 1]
    assert rows[0]["prompt"] == rows[1]["prompt"] and rows[1]["prompt"] != rows[2]["prompt"]
    saved = torch.load(run_dir / "iter_1" / "opponent_logps.pt", weights_only=True)
    assert saved["real"].shape == (16,) and saved["synthetic"].shape == (32,)
    step = json.loads((run_dir / "iter_1" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["weights/ess_synthetic"] == pytest.approx(16, rel=1e-4)  # 8 prompts x 2, uniform at theta_t
    assert "K=2" in summary["title"]


def test_same_seed_gives_identical_metrics(iris_run, tmp_path):
    _, first = iris_run
    second = selfplay.run(small_config(tmp_path / "again", "--loss", "iris"))
    assert comparable(first) == comparable(second)


def test_existing_run_needs_resume_or_overwrite(iris_run):
    run_dir, _ = iris_run
    with pytest.raises(selfplay.InputError, match="already holds a run"):
        selfplay.run(small_config(run_dir))


def test_generation_runs_with_no_model_in_memory(tmp_path, monkeypatch):
    """A stand-in for the vLLM engine: when generation starts, no model (policy, opponent or the
    previous iteration's) is alive in the process, so the engine can have the GPU to itself; the
    opponent is read from its checkpoint path, with the run's max length as max_model_len."""
    import gc

    from transformers import PreTrainedModel

    from iris_ref import generation

    real_generate = generation.generate
    seen = []

    def stand_in_engine(model_or_path, tokenizer, prompts, **kwargs):
        if isinstance(model_or_path, str):  # the opponent's synthetic responses (evaluation uses the live policy)
            alive = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
            seen.append((model_or_path, len(alive), kwargs["max_model_len"], kwargs["gpu_memory_utilization"]))
        return real_generate(model_or_path, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate", stand_in_engine)
    run_dir = tmp_path / "run"
    selfplay.run(small_config(run_dir))
    assert [s[0] for s in seen] == [str(run_dir / "iter_0" / "checkpoint"), str(run_dir / "iter_1" / "checkpoint")]
    assert all(alive == 0 for _, alive, _, _ in seen), seen
    assert all(max_len == 48 and share == 0.85 for _, _, max_len, share in seen)


def test_sft_warmup_early_stopping_on_held_out_training_rows(tmp_path):
    """--sft-patience with --sft-validation-size: rows held out of training (and of self-play) decide
    when the warm-up stops; the best epoch's model is θ_0 and the summary says why it stopped."""
    run_dir = tmp_path / "es"
    config = small_config(run_dir, "--iters", "1", "--num-samples", "40", "--sft-epochs", "4", "--sft-patience", "1",
                          "--sft-validation-size", "8", "--sft-learning-rate", "3e-3")
    summary = selfplay.run(config)
    warmup = json.loads((run_dir / "iter_0" / "train_summary.json").read_text())
    epochs = warmup["sft_epochs"]
    assert warmup["stopped_on"] == "validation rows" and warmup["stopped_by"] in ("patience", "epoch limit")
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
    best = min(epochs, key=lambda e: e["heldout_nll"])
    assert warmup["best_epoch"] == best["epoch"]
    if warmup["stopped_by"] == "patience":
        assert len(epochs) - best["epoch"] == 1
    rows = [json.loads(line) for line in (run_dir / "iter_1" / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 32  # 40 rows less the 8 held out
    assert summary["iterations"][0]["heldout_nll"] > 0
