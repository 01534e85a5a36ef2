"""The one-iteration trainer: exact gradient accumulation (THEORY.md I3), resume, failures, metrics.

Everything runs on the embedded tiny Qwen2 model with random token sequences (a few seconds).
"""

from __future__ import annotations

import math

import pytest
import torch

from iris_ref import distributed as dist_utils
from iris_ref import trainer
from iris_ref.data import EncodedSequence, collate
from iris_ref.logprobs import sequence_logprobs
from iris_ref.objectives import get_objective
from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer

LOSS_CONSTANTS = {"iris": {"alpha": 2.0}, "spin": {}, "space": {"mu": 1.0}, "spif": {}, "sft": {}}
NONDETERMINISTIC = ("tokens_per_s", "peak_memory_mb")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module's tiny matrices (restored afterwards): on a loaded
    2-core machine two spinning threads per process made these tests ~15x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def random_pairs(tokenizer, n: int, seed: int) -> list[tuple[EncodedSequence, EncodedSequence]]:
    """Pairs of random (prompt + response) sequences of varying lengths (so padding matters)."""
    g = torch.Generator().manual_seed(seed)

    def sequence():
        prompt = int(torch.randint(3, 9, (1,), generator=g))
        response = int(torch.randint(2, 10, (1,), generator=g))
        ids = torch.randint(5, len(tokenizer), (prompt + response,), generator=g).tolist()
        return EncodedSequence(input_ids=ids, prompt_length=prompt)

    return [(sequence(), sequence()) for _ in range(n)]


def perturbed_opponent(model, pairs, tokenizer, seed: int):
    """Opponent log-probs away from the policy's, so that rewards and IRIS weights are non-trivial."""
    real, synthetic = trainer.compute_logprobs(model, pairs, tokenizer.pad_token_id, 4)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, len(pairs), generator=g, dtype=torch.float64) * 2.0
    return real.double() + noise[0], synthetic.double() + noise[1]


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(float(t.abs().max()) for t in b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


def reference_gradient(model, pairs, opp_real, opp_syn, loss: str, beta: float, pad_token_id: int):
    """The objective over the whole batch in ONE forward and a plain ``loss.backward()``."""
    model.zero_grad(set_to_none=True)
    n = len(pairs)
    if loss == "sft":
        batch = collate([p[0] for p in pairs], pad_token_id)
        logps = sequence_logprobs(model, **batch)
        (-logps.sum() / batch["response_mask"].sum()).backward()
    else:
        batch = collate([p[0] for p in pairs] + [p[1] for p in pairs], pad_token_id)
        logps = sequence_logprobs(model, **batch)
        out = get_objective(loss)(logps[:n], logps[n:], opp_real.to(logps), opp_syn.to(logps), beta=beta, **LOSS_CONSTANTS[loss])
        out.loss.backward()
    return grads(model)


def trainer_gradient(model, pairs, opp_real, opp_syn, loss: str, beta: float, micro: int, pad_token_id: int):
    model.zero_grad(set_to_none=True)
    args = trainer.TrainingArgs(loss=loss, beta=beta, mu=1.0, global_batch_size=len(pairs), micro_batch_size=micro)
    policy = dist_utils.prepare_model(model)
    trainer.accumulate_gradients(
        policy, pairs, list(range(len(pairs))), opp_real, opp_syn,
        alpha=LOSS_CONSTANTS["iris"]["alpha"], args=args, pad_token_id=pad_token_id,
    )
    return grads(model)


# ---------------------------------------------------------------------------------------
# exact gradient accumulation (THEORY.md I3)


@pytest.fixture(scope="module")
def float64_setup(tokenizer):
    model = build_tiny_model(tokenizer, seed=0).double()
    pairs = random_pairs(tokenizer, 8, seed=1)
    opp_real, opp_syn = perturbed_opponent(model, pairs, tokenizer, seed=2)
    return model, pairs, opp_real, opp_syn


@pytest.mark.parametrize("loss", ["iris", "spin", "space", "spif", "sft"])
def test_accumulated_gradient_equals_single_batch_gradient(float64_setup, tokenizer, loss):
    """Global batch 8 as 4 micro-batches of 2 gives the gradient of the objective over all 8."""
    model, pairs, opp_real, opp_syn = float64_setup
    pad = tokenizer.pad_token_id
    reference = reference_gradient(model, pairs, opp_real, opp_syn, loss, 0.5, pad)
    one_pass = trainer_gradient(model, pairs, opp_real, opp_syn, loss, 0.5, micro=8, pad_token_id=pad)
    accumulated = trainer_gradient(model, pairs, opp_real, opp_syn, loss, 0.5, micro=2, pad_token_id=pad)
    assert max(float(t.abs().max()) for t in reference) > 1e-3  # a gradient worth comparing
    # float64 model and log-probs: equal up to float64 rounding of differently ordered sums
    assert max_rel_diff(one_pass, reference) < 1e-9
    assert max_rel_diff(accumulated, reference) < 1e-9


def test_micro_batch_local_iris_is_not_the_global_gradient(float64_setup, tokenizer):
    """Negative control: averaging IRIS losses computed per micro-batch (what a generic trainer
    does) changes the gradient, while for the separable SPIN loss it does not."""
    model, pairs, opp_real, opp_syn = float64_setup
    pad = tokenizer.pad_token_id

    def micro_batch_local(loss):
        model.zero_grad(set_to_none=True)
        for start in range(0, 8, 2):
            chunk = pairs[start : start + 2]
            batch = collate([p[0] for p in chunk] + [p[1] for p in chunk], pad)
            logps = sequence_logprobs(model, **batch)
            out = get_objective(loss)(
                logps[:2], logps[2:], opp_real[start : start + 2].to(logps), opp_syn[start : start + 2].to(logps),
                beta=0.5, **LOSS_CONSTANTS[loss],
            )
            (out.loss / 4).backward()
        return grads(model)

    iris_reference = reference_gradient(model, pairs, opp_real, opp_syn, "iris", 0.5, pad)
    assert max_rel_diff(micro_batch_local("iris"), iris_reference) > 1e-2
    spin_reference = reference_gradient(model, pairs, opp_real, opp_syn, "spin", 0.5, pad)
    assert max_rel_diff(micro_batch_local("spin"), spin_reference) < 1e-9


def test_gradient_checkpointing_gives_the_same_gradient(tokenizer):
    model = build_tiny_model(tokenizer, seed=3).double()
    pairs = random_pairs(tokenizer, 4, seed=4)
    opp_real, opp_syn = perturbed_opponent(model, pairs, tokenizer, seed=5)
    pad = tokenizer.pad_token_id
    model.train()
    plain = trainer_gradient(model, pairs, opp_real, opp_syn, "iris", 0.5, micro=2, pad_token_id=pad)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = trainer_gradient(model, pairs, opp_real, opp_syn, "iris", 0.5, micro=2, pad_token_id=pad)
    assert max_rel_diff(checkpointed, plain) < 1e-9


# ---------------------------------------------------------------------------------------
# the loop: schedule, metrics, determinism, resume, failures


def run_iteration(tokenizer, *, seed=0, loss="iris", n_pairs=8, state_dir=None, log_fn=None, **overrides):
    """Train a freshly built tiny model for one iteration; return (model, summary, metrics)."""
    model = build_tiny_model(tokenizer, seed=seed)
    pairs = random_pairs(tokenizer, n_pairs, seed=10)
    opp_real, opp_syn = trainer.compute_logprobs(model, pairs, tokenizer.pad_token_id, 8)
    values = dict(loss=loss, beta=1.0, optimizer="adamw", learning_rate=1e-3, warmup_ratio=0.2, epochs=2,
                  global_batch_size=4, micro_batch_size=4, save_steps=2, seed=seed, progress=False)
    values.update(overrides)
    args = trainer.TrainingArgs(**values)
    records = []

    def log(record):
        records.append(record)
        if log_fn is not None:
            log_fn(record)

    summary = trainer.train_iteration(
        model, pairs, opp_real, opp_syn, alpha=2.0, args=args, pad_token_id=tokenizer.pad_token_id,
        state_dir=state_dir, log_fn=log,
    )
    return model, summary, records


def deterministic(records):
    return [{k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in records]


def test_metrics_schedule_and_first_step(tokenizer):
    _, summary, records = run_iteration(tokenizer, micro_batch_size=2)  # with the scoring pass
    total, warmup, peak = 4, math.ceil(0.2 * 4), 1e-3  # 8 pairs / 4 per step x 2 epochs
    assert [r["step"] for r in records] == list(range(1, total + 1))
    expected_lr = [peak * s / warmup if s < warmup else peak * (total - s) / (total - warmup) for s in range(total)]
    assert [r["lr"] for r in records] == pytest.approx(expected_lr, rel=1e-12, abs=1e-15)
    names = {"loss", "rewards/real", "rewards/synthetic", "rewards/margins", "rewards/accuracies", "logps/real",
             "logps/synthetic", "alpha", "weights/ess_real", "weights/ess_synthetic", "lr", "grad_norm",
             "tokens_per_s", "peak_memory_mb", "step"}
    assert names <= set(records[0])
    # The opponent is the starting policy: every reward is 0 and the IRIS weights are uniform.
    first = records[0]
    assert first["rewards/real"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/synthetic"] == pytest.approx(0, abs=1e-5)
    assert first["weights/ess_real"] == pytest.approx(4, rel=1e-5)
    assert first["weights/ess_synthetic"] == pytest.approx(4, rel=1e-5)
    assert first["alpha"] == 2.0
    for r in records:
        assert 0 <= r["rewards/accuracies"] <= 1
        assert 1 - 1e-9 <= r["weights/ess_synthetic"] <= 4 + 1e-9
        assert r["rewards/margins"] == pytest.approx(r["rewards/real"] - r["rewards/synthetic"], abs=1e-6)
    # the policy moved away from the opponent in the direction the objective asks
    assert records[-1]["rewards/margins"] > 0
    assert summary["steps"] == total and summary["resumed_from_step"] == 0
    assert summary["loss"] == pytest.approx(sum(r["loss"] for r in records) / total)


def test_same_seed_same_run_and_sft_learns(tokenizer):
    model_a, _, records_a = run_iteration(tokenizer, loss="sft", epochs=3, learning_rate=3e-3, warmup_ratio=0.0)
    model_b, _, records_b = run_iteration(tokenizer, loss="sft", epochs=3, learning_rate=3e-3, warmup_ratio=0.0)
    assert deterministic(records_a) == deterministic(records_b)
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert records_a[-1]["loss"] < records_a[0]["loss"]
    assert "rewards/real" not in records_a[0]


class Crash(Exception):
    pass


def test_resume_gives_the_uninterrupted_result(tokenizer, tmp_path):
    reference_model, reference_summary, reference_records = run_iteration(tokenizer)

    # Stop after step 1 (state saved there), then resume with a fresh process's model.
    _, stopped, _ = run_iteration(tokenizer, state_dir=tmp_path / "a", max_steps=1)
    assert stopped["steps"] == 1 and trainer.saved_step(tmp_path / "a") == 1
    model_a, summary_a, records_a = run_iteration(tokenizer, state_dir=tmp_path / "a")
    assert summary_a["resumed_from_step"] == 1
    assert [r["step"] for r in records_a] == [2, 3, 4]

    # Crash inside step 3's logging: the last saved state is step 2; steps 3 and 4 are redone.
    def crash(record):
        if record["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        run_iteration(tokenizer, state_dir=tmp_path / "b", log_fn=crash)
    assert trainer.saved_step(tmp_path / "b") == 2
    model_b, summary_b, records_b = run_iteration(tokenizer, state_dir=tmp_path / "b")
    assert [r["step"] for r in records_b] == [3, 4]

    for model in (model_a, model_b):
        for (name, a), b in zip(model.state_dict().items(), reference_model.state_dict().values()):
            assert torch.equal(a, b), name
    for summary in (summary_a, summary_b):
        assert deterministic([summary["final"]]) == deterministic([reference_summary["final"]])
        assert summary["loss"] == reference_summary["loss"]
    assert deterministic(records_b) == deterministic(reference_records[2:])


def test_resume_refuses_a_state_of_another_configuration(tokenizer, tmp_path):
    run_iteration(tokenizer, state_dir=tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="learning_rate"):
        run_iteration(tokenizer, state_dir=tmp_path, learning_rate=5e-4)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tokenizer, tmp_path, monkeypatch):
    """A NaN weight appearing during step 3: the error names step 3, the step-2 state survives."""
    model = build_tiny_model(tokenizer, seed=0)
    pairs = random_pairs(tokenizer, 8, seed=10)
    opp_real, opp_syn = trainer.compute_logprobs(model, pairs, tokenizer.pad_token_id, 8)
    args = trainer.TrainingArgs(loss="iris", beta=1.0, optimizer="adamw", learning_rate=1e-3, epochs=2,
                                global_batch_size=4, micro_batch_size=2, save_steps=2, progress=False)
    steps_logged = []
    real_accumulate = trainer.accumulate_gradients

    def accumulate_with_nan_at_step_3(*a, **kw):
        if len(steps_logged) == 2:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return real_accumulate(*a, **kw)

    monkeypatch.setattr(trainer, "accumulate_gradients", accumulate_with_nan_at_step_3)
    with pytest.raises(trainer.NonFiniteLossError, match="optimizer step 3"):
        trainer.train_iteration(model, pairs, opp_real, opp_syn, alpha=1.0, args=args,
                                pad_token_id=tokenizer.pad_token_id, state_dir=tmp_path,
                                log_fn=lambda r: steps_logged.append(r["step"]))
    assert steps_logged == [1, 2]
    assert trainer.saved_step(tmp_path) == 2
    saved = torch.load(tmp_path / "step_00000002" / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize(
    "overrides, n_pairs, alpha, message",
    [
        ({"global_batch_size": 6, "micro_batch_size": 4}, 12, 1.0, "micro_batch_size"),
        ({"global_batch_size": 16}, 12, 1.0, "fewer than global_batch_size"),
        ({}, 12, 0.0, "alpha > 0"),
        ({"loss": "dpo"}, 12, 1.0, "unknown loss"),
        ({"optimizer": "sgd"}, 12, 1.0, "unknown optimizer"),
        ({"warmup_ratio": 1.0}, 12, 1.0, "warmup_ratio"),
    ],
)
def test_bad_arguments_are_value_errors(tokenizer, overrides, n_pairs, alpha, message):
    model = build_tiny_model(tokenizer, seed=0)
    pairs = random_pairs(tokenizer, n_pairs, seed=10)
    values = dict(global_batch_size=4, micro_batch_size=2, progress=False)
    values.update(overrides)
    zeros = torch.zeros(n_pairs)
    with pytest.raises(ValueError, match=message):
        trainer.train_iteration(model, pairs, zeros, zeros, alpha=alpha, args=trainer.TrainingArgs(**values),
                                pad_token_id=tokenizer.pad_token_id)


def test_opponent_log_probs_must_match_the_pairs(tokenizer):
    model = build_tiny_model(tokenizer, seed=0)
    pairs = random_pairs(tokenizer, 8, seed=10)
    args = trainer.TrainingArgs(global_batch_size=4, micro_batch_size=2, progress=False)
    with pytest.raises(ValueError, match="do not match"):
        trainer.train_iteration(model, pairs, torch.zeros(7), torch.zeros(8), alpha=1.0, args=args,
                                pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="non-finite"):
        trainer.train_iteration(model, pairs, torch.full((8,), float("nan")), torch.zeros(8), alpha=1.0,
                                args=args, pad_token_id=tokenizer.pad_token_id)


def test_compute_logprobs_is_batching_independent_and_ordered(tokenizer):
    model = build_tiny_model(tokenizer, seed=0)
    pairs = random_pairs(tokenizer, 7, seed=11)
    real_1, syn_1 = trainer.compute_logprobs(model, pairs, tokenizer.pad_token_id, 1)
    real_5, syn_5 = trainer.compute_logprobs(model, pairs, tokenizer.pad_token_id, 5)
    torch.testing.assert_close(real_5, real_1, rtol=0, atol=1e-5)
    torch.testing.assert_close(syn_5, syn_1, rtol=0, atol=1e-5)
    with torch.no_grad():
        direct = sequence_logprobs(model, **collate([pairs[3][1]], tokenizer.pad_token_id))
    assert float(syn_1[3]) == pytest.approx(float(direct[0]), abs=1e-5)
    real_only, none = trainer.compute_logprobs(model, [(p[0], None) for p in pairs], tokenizer.pad_token_id, 3)
    assert none is None
    torch.testing.assert_close(real_only, real_1, rtol=0, atol=1e-5)


def test_dropout_is_disabled_so_rewards_start_at_zero(tokenizer):
    """A model with dropout (as GPT-2 or Phi have) must still see rewards of exactly 0 at θ = θt
    and uniform IRIS weights: dropout would make the training forwards differ from the opponent's."""
    model = build_tiny_model(tokenizer, seed=0)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.model.embed_dropout = torch.nn.Dropout(0.5)  # an nn.Dropout module too
    pairs = random_pairs(tokenizer, 8, seed=10)
    opp_real, opp_syn = trainer.compute_logprobs(model, pairs, tokenizer.pad_token_id, 8)
    args = trainer.TrainingArgs(loss="iris", beta=1.0, optimizer="adamw", learning_rate=1e-3, epochs=1,
                                global_batch_size=8, micro_batch_size=4, max_steps=1, progress=False)
    records = []
    trainer.train_iteration(model, pairs, opp_real, opp_syn, alpha=2.0, args=args,
                            pad_token_id=tokenizer.pad_token_id, log_fn=records.append)
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
    pairs = random_pairs(tokenizer, 8, seed=10)
    opp_real, _ = trainer.compute_logprobs(model, pairs, tokenizer.pad_token_id, 8)
    model.train()
    batch = collate([p[0] for p in pairs], tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        train_mode = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    assert (train_mode - opp_real).abs().max() > 1e-3
