"""iris_ref.tabular: the population objective, the exact gap, the optimisers and the script."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_ref import divergences as D
from iris_ref import tabular
from iris_ref.objectives import iris_loss
from iris_ref.schedule import AlphaSchedule, adaptive_alpha, auc_gap, gap_warning
from theory_tests.conftest import examples


def _task():
    return tabular.TabularTask(
        (torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=torch.float64)),
        torch.tensor([0.25, 0.75], dtype=torch.float64),
    )


def test_population_loss_is_the_cellwise_sum():
    """The IRIS population loss equals T_{1−α}[−r] + T_α[r] written out cell by cell over p(x)p_data and p(x)p_θt."""
    task = _task()
    theta = torch.tensor([0.3, -0.2, 0.1, 1.0, 0.0, -0.5, 0.2], dtype=torch.float64)
    opponent = torch.tensor([0.0, 0.4, -0.3, 0.2, 0.1, 0.3, -1.0], dtype=torch.float64)
    alpha, beta = 0.7, 0.8
    logp = [torch.log_softmax(c, 0) for c in torch.split(theta, task.sizes)]
    logo = [torch.log_softmax(c, 0) for c in torch.split(opponent, task.sizes)]
    r = beta * (torch.cat(logp) - torch.cat(logo))
    q = task.joint_data()
    p = torch.cat([px * torch.exp(lo) for px, lo in zip(task.prompt_probs, logo)])
    expected = -math.log(float((q * torch.exp((alpha - 1) * r)).sum())) / (alpha - 1) + math.log(
        float((p * torch.exp(alpha * r)).sum())
    ) / alpha
    got = tabular.population_loss(task, theta, opponent, "iris", alpha=alpha, beta=beta).loss
    assert float(got) == pytest.approx(expected, rel=1e-13)


def test_spin_population_uses_all_pairs_of_a_prompt():
    """SPIN's population loss is Σ_x p(x) Σ_{y,y'} p_data(y|x) p_θt(y'|x) softplus(−(r(y) − r(y')))."""
    task = _task()
    theta = torch.tensor([0.3, -0.2, 0.1, 1.0, 0.0, -0.5, 0.2], dtype=torch.float64)
    opponent = torch.zeros(7, dtype=torch.float64)
    beta = 0.5
    total = 0.0
    for px, data, th, op in zip(task.prompt_probs, task.p_data, torch.split(theta, task.sizes), torch.split(opponent, task.sizes)):
        r = beta * (torch.log_softmax(th, 0) - torch.log_softmax(op, 0))
        popp = torch.softmax(op, 0)
        for i in range(len(data)):
            for j in range(len(data)):
                total += float(px * data[i] * popp[j] * torch.nn.functional.softplus(-(r[i] - r[j])))
    got = tabular.population_loss(task, theta, opponent, "spin", beta=beta).loss
    assert float(got) == pytest.approx(total, rel=1e-13)


def test_divergence_helpers_are_joint_divergences():
    """kl_to_data / tv_to_data are KL and TV between the joint distributions p(x)p_data(y|x) and p(x)p_θ(y|x)."""
    task = _task()
    theta = torch.tensor([0.3, -0.2, 0.1, 1.0, 0.0, -0.5, 0.2], dtype=torch.float64)
    per_prompt_kl = sum(
        float(px) * D.kl(data.numpy(), torch.softmax(th, 0).numpy())
        for px, data, th in zip(task.prompt_probs, task.p_data, torch.split(theta, task.sizes))
    )
    assert tabular.kl_to_data(task, theta) == pytest.approx(per_prompt_kl, rel=1e-13)
    assert tabular.kl_to_data(task, task.data_logits()) == pytest.approx(0.0, abs=1e-15)
    assert tabular.tv_to_data(task, task.data_logits()) <= 1e-15


@settings(max_examples=examples(25))
@given(st.lists(st.integers(2, 5), min_size=1, max_size=3), st.integers(0, 1000))
def test_exact_auc_gap_matches_large_sample_estimate(sizes, seed):
    """The exact population gap agrees with schedule.auc_gap on samples with integer multiplicities proportional to the weights."""
    task = tabular.TabularTask.random(sizes, seed=seed)
    opponent = task.random_logits(seed=seed + 1)
    exact = tabular.exact_auc_gap(task, opponent)
    assert 0.0 <= exact <= 1.0
    # Rational weights: round the masses to multiples of 1/400 and replicate cells accordingly.
    scores = torch.cat(tabular.policy_log_probs(task, opponent)).numpy()
    q = np.round(task.joint_data().numpy() * 400).astype(int)
    p_joint = torch.cat(
        [px * torch.exp(lp) for px, lp in zip(task.prompt_probs, tabular.policy_log_probs(task, opponent))]
    ).numpy()
    p = np.round(p_joint * 400).astype(int)
    if q.sum() == 0 or p.sum() == 0:
        return
    sampled = auc_gap(np.repeat(scores, q), np.repeat(scores, p))
    # The same pairwise formula on the rounded weights must reproduce Mann–Whitney on the replicated samples.
    above = (scores[None, :] > scores[:, None]) + 0.5 * (scores[None, :] == scores[:, None])
    direct = abs(2 * (q / q.sum()) @ above @ (p / p.sum()) - 1)
    assert sampled == pytest.approx(direct, abs=1e-12)
    assert exact == pytest.approx(abs(2 * task.joint_data().numpy() @ above @ p_joint - 1), abs=1e-12)


def test_gap_is_zero_at_the_fixed_point():
    """At p_θt = p_data the exact AUC and mean gaps are 0."""
    task = tabular.TabularTask.random([3, 5], seed=2)
    assert tabular.exact_auc_gap(task, task.data_logits()) == pytest.approx(0.0, abs=1e-12)
    assert tabular.exact_mean_gap(task, task.data_logits()) == pytest.approx(0.0, abs=1e-12)


def test_minimise_gradient_steps_are_plain_gradient_descent():
    """steps=K takes K steps θ ← θ − η∇L exactly."""
    task = _task()
    opponent = torch.tensor([0.0, 0.4, -0.3, 0.2, 0.1, 0.3, -1.0], dtype=torch.float64)
    theta = opponent.clone()
    for _ in range(3):
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(tabular.population_loss(task, t, opponent, "iris", alpha=1.5, beta=1.0).loss, t)
        theta = theta - 0.2 * g
    got = tabular.minimise(task, opponent, "iris", steps=3, step_size=0.2, alpha=1.5, beta=1.0)
    assert torch.allclose(got, theta, rtol=0, atol=1e-14)


def test_minimise_to_convergence_reaches_the_stationary_point():
    """Optimising to convergence ends with a gradient below the tolerance (SPIF, whose minimiser is not p_data)."""
    task = _task()
    opponent = torch.tensor([0.0, 0.4, -0.3, 0.2, 0.1, 0.3, -1.0], dtype=torch.float64)
    found = tabular.minimise(task, opponent, "spif", beta=1.0).requires_grad_(True)
    (g,) = torch.autograd.grad(tabular.population_loss(task, found, opponent, "spif", beta=1.0).loss, found)
    assert float(g.abs().max()) <= 1e-10


def test_self_play_records_the_adaptive_schedule():
    """With an AlphaSchedule, α_0 = α_max, α stays in [α_min, α_max], and gap_t is the exact gap of θt."""
    task = tabular.TabularTask.random([4, 5], seed=0)
    start = task.random_logits(seed=1)
    schedule = AlphaSchedule(kind="adaptive", alpha_min=0.5, alpha_max=2.0)
    history = tabular.self_play(task, start, "iris", iterations=4, schedule=schedule, steps=5, step_size=0.5, beta=1.0)
    assert len(history) == 5 and history[0].alpha is None
    assert history[1].alpha == 2.0
    assert all(0.5 <= h.alpha <= 2.0 for h in history[1:])
    assert history[1].gap == pytest.approx(tabular.exact_auc_gap(task, start))
    assert history[2].gap == pytest.approx(tabular.exact_auc_gap(task, history[1].logits))
    assert history[-1].kl < history[0].kl
    # The schedule gets the whole gap history: α_t = adaptive_alpha(gap_0..gap_t), never rising.
    gaps = [h.gap for h in history[1:]]
    assert [h.alpha for h in history[1:]] == [adaptive_alpha(gaps[: t + 1]) for t in range(len(gaps))]
    assert all(b <= a for a, b in zip([h.alpha for h in history[1:]], [h.alpha for h in history[2:]]))
    assert [h.gap_warning for h in history[1:]] == [gap_warning(gaps[: t + 1]) for t in range(len(gaps))]


def test_self_play_in_class_records_theta_and_schedule():
    """self_play_in_class records θ_t with logits Φθ_t, and follows an AlphaSchedule on the exact gap of Φθ_t."""
    policy_class = tabular.misspecified_class()
    start = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    history = tabular.self_play_in_class(policy_class, start, "iris", iterations=3, schedule=AlphaSchedule(), beta=1.0)
    assert torch.equal(history[0].theta, start) and history[1].alpha == 2.0
    for h in history:
        assert torch.allclose(h.logits, policy_class.logits(h.theta), rtol=0, atol=0)
        assert h.kl == pytest.approx(policy_class.kl_to_data(h.theta), rel=1e-15)
    assert history[2].gap == pytest.approx(tabular.exact_auc_gap(policy_class.task, history[1].logits))
    assert all(b <= a for a, b in zip([h.alpha for h in history[1:]], [h.alpha for h in history[2:]]))


def test_bad_input_raises_value_error():
    """Malformed tasks, logits and options raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="sum to 1"):
        tabular.TabularTask((torch.tensor([0.5, 0.6], dtype=torch.float64),), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least two responses"):
        tabular.TabularTask((torch.tensor([1.0], dtype=torch.float64),), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="entries for"):
        tabular.TabularTask((torch.tensor([0.5, 0.5], dtype=torch.float64),), torch.tensor([0.5, 0.5], dtype=torch.float64))
    task = _task()
    with pytest.raises(ValueError, match="cells"):
        tabular.kl_to_data(task, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        tabular.kl_to_data(task, torch.zeros(7, dtype=torch.float32))
    with pytest.raises(ValueError, match="either alpha or"):
        tabular.self_play(task, torch.zeros(7, dtype=torch.float64), iterations=1, schedule=AlphaSchedule(), alpha=1.0)
    with pytest.raises(ValueError, match="IRIS only"):
        tabular.self_play(task, torch.zeros(7, dtype=torch.float64), "spin", iterations=1, schedule=AlphaSchedule())
    with pytest.raises(ValueError, match="alpha"):
        tabular.population_loss(task, torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64), "iris", alpha=0.0)


def test_script_prints_table_and_writes_plot(tmp_path, capsys):
    """`python -m iris_ref.tabular` prints a per-iteration KL table for every method and writes the PNG."""
    out = tmp_path / "plot.png"
    argv = ["--iterations", "2", "--steps", "2", "--output", str(out), "--class-iterations", "3", "--class-orders", "3", "5"]
    assert tabular.main(argv) == 0
    text = capsys.readouterr().out
    for label in ("IRIS adaptive", "IRIS a=0.5", "IRIS a=1", "IRIS a=2", "SPIN", "SPACE mu=1", "SPIF"):
        assert label in text
    assert "KL(p_data || p_theta_t)" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The misspecified part (THEORY.md F3): the class, its projection, the KL table and the stability scan.
    assert "misspecified log-linear class" in text and "KL(p_data||p_theta*) = 0.048264" in text
    assert "alpha in (0, 4.6335)" in text and "IRIS a=0.25" in text and "IRIS a=5" in text
    assert "stability of the exact IRIS iteration" in text and "-1.224" in text  # min nu at alpha = 5
    # --class-iterations 0 skips it.
    assert tabular.main(["--iterations", "1", "--steps", "1", "--output", str(out), "--class-iterations", "0"]) == 0
    assert "misspecified" not in capsys.readouterr().out


def test_script_rejects_bad_options(capsys):
    """Bad CLI options give a one-line argparse error and exit code 2."""
    with pytest.raises(SystemExit) as excinfo:
        tabular.main(["--beta", "-1"])
    assert excinfo.value.code == 2
    assert "--beta must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tabular.main(["--class-iterations", "-1"])
    assert "--class-iterations must be >= 0" in capsys.readouterr().err
