"""The trainer: exact gradient of the global batch (THEORY.md I3) under any micro-batching, K synthetic
responses per prompt, the schedule, resume, failures and metrics.

Everything runs on the embedded tiny Qwen2 model with random token sequences (a few seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from iris_ref import distributed, train_state, trainer
from iris_ref.config import parse_config
from iris_ref.data import EncodedSequence, collate
from iris_ref.logprobs import sequence_logprobs
from iris_ref.scoring import score_sequences
from iris_ref.objectives import get_objective
from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer

CONSTANTS = {"iris": {"alpha": 2.0}, "spin": {}, "space": {"mu": 1.0}, "spif": {}}
NONDETERMINISTIC = ("tokens_per_s", "step_seconds", "peak_memory_mb")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def options(**overrides):
    """A real IrisConfig with the trainer's options set (the embedded default, then overrides)."""
    base = dict(optimizer="adamw", learning_rate=1e-3, warmup_ratio=0.2, global_batch_size=4, micro_batch_size=4,
                save_steps=2, seed=0)
    return dataclasses.replace(parse_config([]), **{**base, **overrides})


def random_sequences(tokenizer, n: int, seed: int) -> list[EncodedSequence]:
    """Random (prompt + response) sequences of varying lengths, so that padding matters."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, response = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(2, 10, (1,), generator=g))
        out.append(EncodedSequence(torch.randint(5, len(tokenizer), (prompt + response,), generator=g).tolist(), prompt))
    return out


def make_data(model, tokenizer, n: int, k: int = 1, seed: int = 1, noise: float = 2.0) -> trainer.TrainingData:
    """n prompts with k synthetic sequences each; opponent log-probs perturbed away from the policy's,
    so that rewards and IRIS weights are non-trivial from the first step."""
    real, synthetic = random_sequences(tokenizer, n, seed), random_sequences(tokenizer, n * k, seed + 100)
    scores = score_sequences(model, real + synthetic, tokenizer.pad_token_id, token_budget=10**6).double()
    shift = torch.randn(n * (1 + k), generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64) * noise
    scores = scores + shift
    return trainer.TrainingData(real, synthetic, scores[:n], scores[n:])


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def max_rel_diff(a, b) -> float:
    scale = max(float(t.abs().max()) for t in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


def objective_of(loss: str, beta: float = 0.5):
    return None if loss == "sft" else functools.partial(get_objective(loss), beta=beta, **CONSTANTS[loss])


def reference_gradient(model, data, loss, pad):
    """The objective over the whole batch in ONE forward and a plain `loss.backward()`."""
    model.zero_grad(set_to_none=True)
    n = len(data.real)
    if loss == "sft":
        batch = collate(list(data.real), pad)
        (-sequence_logprobs(model, **batch).sum() / batch["response_mask"][:, 1:].sum()).backward()
    else:
        logps = sequence_logprobs(model, **collate(list(data.real) + list(data.synthetic), pad))
        objective_of(loss)(logps[:n], logps[n:], data.opponent_real.to(logps), data.opponent_synthetic.to(logps)).loss.backward()
    return grads(model)


def trainer_gradient(model, data, loss, micro, pad, scoring_pass="auto"):
    model.zero_grad(set_to_none=True)
    trainer.accumulate_gradient(distributed.prepare_model(model), data if loss != "sft" else
                                trainer.TrainingData(data.real), list(range(len(data.real))), objective_of(loss),
                                micro, pad, scoring_pass=scoring_pass)
    return grads(model)


@pytest.fixture(scope="module")
def float64_setup(tokenizer):
    model = build_tiny_model(tokenizer, seed=0).double()
    return model, make_data(model, tokenizer, 8)


@pytest.mark.parametrize("loss", ["iris", "spin", "space", "spif", "sft"])
def test_accumulated_gradient_equals_single_batch_gradient(float64_setup, tokenizer, loss):
    """Global batch 8 as 4 length-sorted micro-batches gives the gradient of the objective over all 8."""
    model, data = float64_setup
    pad = tokenizer.pad_token_id
    reference = reference_gradient(model, data, loss, pad)
    one_pass = trainer_gradient(model, data, loss, micro=8, pad=pad)
    accumulated = trainer_gradient(model, data, loss, micro=2, pad=pad)
    assert max(float(t.abs().max()) for t in reference) > 1e-3  # a gradient worth comparing
    assert max_rel_diff(one_pass, reference) < 1e-9
    assert max_rel_diff(accumulated, reference) < 1e-9


def test_micro_batches_mix_real_and_synthetic_sorted_by_length(float64_setup):
    """The partition is any partition (the weights are global): sequences sorted by length, cut
    with the least padding, annotated and synthetic mixed; less padding than pairwise batching."""
    _, data = float64_setup
    batch = trainer.GlobalBatch(data, list(range(8)), micro_batch_size=2)
    chunks = batch.micro_batches
    assert len(chunks) == 4 and all(chunks)
    assert sorted(p for c in chunks for p in c) == list(range(16))
    lengths = [[len(batch.all[p].input_ids) for p in c] for c in chunks]
    assert all(min(a) >= max(b) for a, b in zip(lengths, lengths[1:]))  # longest first, no overlap
    assert any(min(c) < 8 for c in chunks) and any(max(c) >= 8 for c in chunks)  # both kinds are mixed in
    sorted_padding = batch.token_counts(chunks)["padding_fraction"]
    pairwise = [[i, i + 1, 8 + i, 9 + i] for i in range(0, 8, 2)]
    assert sorted_padding < batch.token_counts(pairwise)["padding_fraction"]


def test_k_synthetic_responses_weights_equal_the_flattened_objective(tokenizer):
    """K = 2: the trainer's gradient is that of the objective on the flattened batch (N real,
    N*K synthetic, prompt-major), for IRIS, SPACE with mu = K, SPIF and SPIN over every pair."""
    model = build_tiny_model(tokenizer, seed=5).double()
    data = make_data(model, tokenizer, 4, k=2, seed=9)
    pad = tokenizer.pad_token_id
    for loss in ("iris", "space", "spif", "spin"):
        constants = {"mu": 2.0} if loss == "space" else CONSTANTS[loss]
        objective = functools.partial(get_objective(loss), beta=0.5, **constants)
        model.zero_grad(set_to_none=True)
        logps = sequence_logprobs(model, **collate(list(data.real) + list(data.synthetic), pad))
        objective(logps[:4], logps[4:], data.opponent_real.to(logps), data.opponent_synthetic.to(logps)).loss.backward()
        reference = grads(model)
        model.zero_grad(set_to_none=True)
        out = trainer.accumulate_gradient(distributed.prepare_model(model), data, [0, 1, 2, 3], objective, 1, pad)
        assert max_rel_diff(grads(model), reference) < 1e-9, loss
        assert 1 <= out["weights/ess_synthetic"] <= 8 + 1e-9


def test_micro_batch_local_iris_is_not_the_global_gradient(float64_setup, tokenizer):
    """Negative control: averaging IRIS losses computed per micro-batch (what a generic trainer
    does) changes the gradient, while for the separable SPIN loss it does not."""
    model, data = float64_setup
    pad = tokenizer.pad_token_id

    def micro_batch_local(loss):
        model.zero_grad(set_to_none=True)
        for start in range(0, 8, 2):
            idx = slice(start, start + 2)
            logps = sequence_logprobs(model, **collate(list(data.real[idx]) + list(data.synthetic[idx]), pad))
            out = objective_of(loss)(logps[:2], logps[2:], data.opponent_real[idx].to(logps),
                                     data.opponent_synthetic[idx].to(logps))
            (out.loss / 4).backward()
        return grads(model)

    assert max_rel_diff(micro_batch_local("iris"), reference_gradient(model, data, "iris", pad)) > 1e-2
    assert max_rel_diff(micro_batch_local("spin"), reference_gradient(model, data, "spin", pad)) < 1e-9


def test_gradient_checkpointing_gives_the_same_gradient_and_restores_use_cache(tokenizer):
    model = build_tiny_model(tokenizer, seed=3).double()
    data = make_data(model, tokenizer, 4, seed=4)
    pad = tokenizer.pad_token_id
    plain = trainer_gradient(model, data, "iris", micro=2, pad=pad)
    assert model.config.use_cache is True
    with trainer.training_mode(model, gradient_checkpointing=True):
        assert model.is_gradient_checkpointing and model.config.use_cache is False
        checkpointed = {mode: trainer_gradient(model, data, "iris", micro=2, pad=pad, scoring_pass=mode)
                        for mode in ("never", "always")}  # kept (checkpointed) graphs, and the scoring pass
    assert all(max_rel_diff(g, plain) < 1e-9 for g in checkpointed.values())
    assert not model.is_gradient_checkpointing and model.config.use_cache is True  # saved configs stay as they were


# ---------------------------------------------------------------------------------------
# the loop: schedule, metrics, determinism, resume, failures


def run_training(tokenizer, *, seed=0, loss="iris", n=8, state_dir=None, log=None, epochs=2, max_steps=None,
                 learning_rate=1e-3, **overrides):
    """Train a freshly built tiny model; return (model, summary, records)."""
    model = build_tiny_model(tokenizer, seed=seed)
    data = make_data(model, tokenizer, n, seed=10, noise=0.0)
    if loss == "sft":
        data = trainer.TrainingData(data.real)
    records = []

    def on_step(record):
        records.append(record)
        if log is not None:
            log(record)

    summary = trainer.train(distributed.prepare_model(model), data, objective_of(loss, beta=1.0), options(**overrides),
                            pad_token_id=tokenizer.pad_token_id, epochs=epochs, learning_rate=learning_rate,
                            state_dir=state_dir, log=on_step, max_steps=max_steps,
                            fingerprint={"loss": loss})
    return model, summary, records


def deterministic(records):
    return [{k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in records]


def test_metrics_schedule_and_first_step(tokenizer):
    _, summary, records = run_training(tokenizer, micro_batch_size=2)  # two micro-batches: kept graphs (auto)
    total, warmup, peak = 4, math.ceil(0.2 * 4), 1e-3  # 8 prompts / 4 per step x 2 epochs
    assert [r["step"] for r in records] == list(range(1, total + 1))
    expected_lr = [peak * s / warmup if s < warmup else peak * (total - s) / (total - warmup) for s in range(total)]
    assert [r["lr"] for r in records] == pytest.approx(expected_lr, rel=1e-12, abs=1e-15)
    names = {"loss", "rewards/real", "rewards/synthetic", "rewards/margins", "rewards/accuracies", "logps/real",
             "logps/synthetic", "weights/ess_real", "weights/ess_synthetic", "lr", "grad_norm", "tokens_per_s",
             "padding_fraction", "peak_memory_mb", "step", "epoch", "scoring_pass", "graph_memory_gib"}
    assert names <= set(records[0])
    # The opponent is the starting policy: every reward is 0 and the IRIS weights are uniform.
    first = records[0]
    assert first["rewards/real"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/synthetic"] == pytest.approx(0, abs=1e-5)
    assert first["weights/ess_real"] == pytest.approx(4, rel=1e-5)
    assert first["weights/ess_synthetic"] == pytest.approx(4, rel=1e-5)
    for r in records:
        assert 0 <= r["rewards/accuracies"] <= 1 and 0 <= r["padding_fraction"] < 1
        assert 1 - 1e-9 <= r["weights/ess_synthetic"] <= 4 + 1e-9
        assert r["rewards/margins"] == pytest.approx(r["rewards/real"] - r["rewards/synthetic"], abs=1e-6)
    assert records[-1]["rewards/margins"] > 0  # the policy moved the way the objective asks
    assert summary["steps"] == total and summary["resumed_from_step"] == 0
    assert summary["loss"] == pytest.approx(sum(r["loss"] for r in records) / total)


def test_same_seed_same_run_and_sft_learns(tokenizer):
    model_a, _, records_a = run_training(tokenizer, loss="sft", epochs=3, learning_rate=3e-3, warmup_ratio=0.0)
    model_b, _, records_b = run_training(tokenizer, loss="sft", epochs=3, learning_rate=3e-3, warmup_ratio=0.0)
    assert deterministic(records_a) == deterministic(records_b)
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert records_a[-1]["loss"] < records_a[0]["loss"]
    assert "rewards/real" not in records_a[0]


class Crash(Exception):
    pass


def test_resume_gives_the_uninterrupted_result(tokenizer, tmp_path):
    reference_model, reference_summary, reference_records = run_training(tokenizer)

    # Stop after step 1 (a state is saved there), then resume with a fresh model.
    _, stopped, _ = run_training(tokenizer, state_dir=tmp_path / "a", max_steps=1)
    assert stopped["steps"] == 1 and train_state.saved_step(tmp_path / "a") == 1
    model_a, summary_a, records_a = run_training(tokenizer, state_dir=tmp_path / "a")
    assert summary_a["resumed_from_step"] == 1 and [r["step"] for r in records_a] == [2, 3, 4]

    # Crash inside step 3's logging: the last saved state is step 2; steps 3 and 4 are redone.
    def crash(record):
        if record["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        run_training(tokenizer, state_dir=tmp_path / "b", log=crash)
    assert train_state.saved_step(tmp_path / "b") == 2
    assert len(list((tmp_path / "b").glob("step_*"))) == 1  # one complete state kept, no more
    model_b, summary_b, records_b = run_training(tokenizer, state_dir=tmp_path / "b")
    assert [r["step"] for r in records_b] == [3, 4]

    for model in (model_a, model_b):
        for (name, a), b in zip(model.state_dict().items(), reference_model.state_dict().values()):
            assert torch.equal(a, b), name
    for summary in (summary_a, summary_b):
        assert deterministic([summary["final"]]) == deterministic([reference_summary["final"]])
        assert summary["loss"] == reference_summary["loss"]
    assert deterministic(records_b) == deterministic(reference_records[2:])


def test_time_based_saving(tokenizer, tmp_path, monkeypatch):
    """Without --save-steps a state is saved once --save-minutes have passed (here: always)."""
    _, _, _ = run_training(tokenizer, state_dir=tmp_path / "never", save_steps=None, save_minutes=1e6, max_steps=3)
    assert train_state.saved_step(tmp_path / "never") == 3  # only the early stop saved
    saves = []
    real_save = train_state.save
    monkeypatch.setattr(train_state, "save", lambda *a, **kw: (saves.append(kw["step"]), real_save(*a, **kw)))
    run_training(tokenizer, state_dir=tmp_path / "always", save_steps=None, save_minutes=1e-9)
    assert saves == [1, 2, 3, 4]


def test_resume_refuses_a_state_of_another_configuration(tokenizer, tmp_path):
    run_training(tokenizer, state_dir=tmp_path, max_steps=1)
    with pytest.raises(trainer.TrainingFailure, match="learning_rate"):
        run_training(tokenizer, state_dir=tmp_path, learning_rate=5e-4)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tokenizer, tmp_path, monkeypatch):
    """A NaN weight appearing during step 3: the error names step 3, the step-2 state survives."""
    steps_logged = []
    real_accumulate = trainer.accumulate_gradient

    def accumulate_with_nan_at_step_3(policy, *a, **kw):
        if len(steps_logged) == 2:
            with torch.no_grad():
                next(policy.parameters()).view(-1)[0] = float("nan")
        return real_accumulate(policy, *a, **kw)

    monkeypatch.setattr(trainer, "accumulate_gradient", accumulate_with_nan_at_step_3)
    with pytest.raises(trainer.NonFiniteLossError, match="optimizer step 3"):
        run_training(tokenizer, state_dir=tmp_path, micro_batch_size=2, log=lambda r: steps_logged.append(r["step"]))
    assert steps_logged == [1, 2] and train_state.saved_step(tmp_path) == 2
    saved = torch.load(tmp_path / "step_00000002" / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("overrides, n, message", [
    ({"global_batch_size": 6, "micro_batch_size": 4}, 12, "micro-batch-size"),
    ({"global_batch_size": 16}, 12, "fewer than --global-batch-size"),
    ({"optimizer": "sgd"}, 12, "unknown optimizer"),
])
def test_bad_arguments_are_value_errors(tokenizer, overrides, n, message):
    with pytest.raises(ValueError, match=message):
        run_training(tokenizer, n=n, **overrides)


def test_training_data_must_be_consistent(tokenizer):
    real = random_sequences(tokenizer, 8, 1)
    with pytest.raises(ValueError, match="K per prompt"):
        trainer.TrainingData(real, real[:7], torch.zeros(8), torch.zeros(7)).check()
    with pytest.raises(ValueError, match="opponent real log-probs"):
        trainer.TrainingData(real, real, torch.zeros(7), torch.zeros(8)).check()
    with pytest.raises(ValueError, match="non-finite"):
        trainer.TrainingData(real, real, torch.full((8,), float("nan")), torch.zeros(8)).check()


def test_score_sequences_is_batching_independent_and_ordered(tokenizer):
    model = build_tiny_model(tokenizer, seed=0)
    sequences = random_sequences(tokenizer, 13, seed=11)
    pad = tokenizer.pad_token_id
    one_each = score_sequences(model, sequences, pad, token_budget=1)
    large = score_sequences(model, sequences, pad, token_budget=10**6)
    torch.testing.assert_close(large, one_each, rtol=0, atol=1e-5)
    with torch.no_grad():
        direct = sequence_logprobs(model, **collate([sequences[3]], pad))
    assert float(one_each[3]) == pytest.approx(float(direct[0]), abs=1e-5)
    assert not one_each.is_inference()  # usable in autograd arithmetic later


def test_dropout_is_disabled_so_rewards_start_at_zero(tokenizer):
    """A model with dropout (as GPT-2 or Phi have) must still see rewards of exactly 0 at θ = θt
    and uniform IRIS weights: dropout would make the training forwards differ from the opponent's."""
    model = build_tiny_model(tokenizer, seed=0)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.model.embed_dropout = torch.nn.Dropout(0.5)  # an nn.Dropout module too
    data = make_data(model, tokenizer, 8, seed=10, noise=0.0)
    records = []
    trainer.train(distributed.prepare_model(model), data, objective_of("iris", 1.0), options(global_batch_size=8),
                  pad_token_id=tokenizer.pad_token_id, epochs=1, learning_rate=1e-3, log=records.append, max_steps=1)
    first = records[0]
    assert first["rewards/real"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/synthetic"] == pytest.approx(0, abs=1e-5)
    assert first["weights/ess_real"] == pytest.approx(8, rel=1e-5)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    assert model.model.embed_dropout.p == 0.0


def test_dropout_negative_control(tokenizer):
    """Without disabling it, attention dropout of 0.5 moves the rewards off 0 at θ = θt."""
    model = build_tiny_model(tokenizer, seed=0)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    sequences = random_sequences(tokenizer, 8, seed=10)
    opponent = score_sequences(model, sequences, tokenizer.pad_token_id, token_budget=10**6)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        train_mode = sequence_logprobs(model, **collate(sequences, tokenizer.pad_token_id))
    assert (train_mode - opponent).abs().max() > 1e-3


def test_least_padding_cuts_are_optimal_and_respect_the_memory_bound():
    """Exhaustive check on small cases: the cuts minimise the padded size among all cuts whose
    chunks are no larger than the largest chunk of the equal-count cut."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        n, chunks = rng.randint(2, 9), None
        chunks = rng.randint(1, n)
        lengths = sorted((rng.randint(1, 40) for _ in range(n)), reverse=True)
        equal = [c * (n // chunks) for c in range(chunks)] + [n]
        cap = max((b - a) * lengths[a] for a, b in zip(equal, equal[1:]))

        def padded(cuts):
            return [(b - a) * lengths[a] for a, b in zip(cuts, cuts[1:])]

        best = min(sum(padded(c)) for inner in itertools.combinations(range(1, n), chunks - 1)
                   for c in [[0, *inner, n]] if max(padded(c)) <= cap)
        cuts = trainer.least_padding_cuts(lengths, chunks)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == chunks + 1 and all(a < b for a, b in zip(cuts, cuts[1:]))
        assert sum(padded(cuts)) == best and max(padded(cuts)) <= cap
