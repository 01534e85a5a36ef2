"""Kept graphs against the scoring pass (`--scoring-pass`, issue 17): the same exact gradient of
the global batch for every objective, K = 2, SFT, two gloo ranks under DDP and FSDP2 through a
stop and a resume; a broken variant that does not match; memory within `trainer.graph_memory`'s
estimate; `auto`'s decision, its per-step metric and the dry run's line.

The exactness tests run the float64 tiny Qwen2 (float64 sums: equal to ~1e-15, asserted at 1e-9).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iris_ref import distributed, plan, trainer
from iris_ref.config import parse_config
from iris_ref.data import collate
from iris_ref.logprobs import sequence_logprobs
from iris_ref.objectives import get_objective
from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer
from tests.test_trainer import grads, make_data, max_rel_diff, options, random_sequences

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).resolve().parent / "scoring_worker.py"
REPO = WORKER.parents[1]
OBJECTIVES = {"iris-0.5": ("iris", {"alpha": 0.5}), "iris-1": ("iris", {"alpha": 1.0}), "iris-2": ("iris", {"alpha": 2.0}),
              "spin": ("spin", {}), "space": ("space", {"mu": 1.0}), "spif": ("spif", {})}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = build_tiny_model(tokenizer, seed=0).double()
    return model, make_data(model, tokenizer, 8)


def objective_of(name: str, **override):
    loss, constants = OBJECTIVES[name]
    return functools.partial(get_objective(loss), beta=0.5, **{**constants, **override})


def reference(model, data, objective, pad) -> list[torch.Tensor]:
    """The objective over the whole batch in ONE forward and a plain backward."""
    model.zero_grad(set_to_none=True)
    n = len(data.real)
    logps = sequence_logprobs(model, **collate(list(data.real) + list(data.synthetic), pad))
    objective(logps[:n], logps[n:], data.opponent_real.to(logps), data.opponent_synthetic.to(logps)).loss.backward()
    return grads(model)


def accumulated(model, data, objective, pad, mode: str, micro: int = 2):
    model.zero_grad(set_to_none=True)
    out = trainer.accumulate_gradient(distributed.prepare_model(model), data, list(range(len(data.real))), objective,
                                      micro, pad, scoring_pass=mode)
    return grads(model), out


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_kept_graphs_give_the_scoring_pass_gradient_for_every_objective(setup, tokenizer, name):
    """Global batch 8 as 4 micro-batches: kept graphs, the scoring pass and one forward over all
    16 sequences give one gradient, and the same metrics."""
    model, data = setup
    pad, objective = tokenizer.pad_token_id, objective_of(name)
    want = reference(model, data, objective, pad)
    kept, kept_out = accumulated(model, data, objective, pad, "never")
    scored, scored_out = accumulated(model, data, objective, pad, "always")
    assert max(float(t.abs().max()) for t in want) > 1e-3  # a gradient worth comparing
    assert max_rel_diff(kept, want) < 1e-9 and max_rel_diff(scored, want) < 1e-9
    assert (kept_out["scoring_pass"], scored_out["scoring_pass"]) == (0, 1)
    for key in ("loss", "rewards/margins", "weights/ess_real", "weights/ess_synthetic", "tokens", "padding_fraction"):
        assert kept_out[key] == pytest.approx(scored_out[key], rel=1e-12), key


def test_kept_graphs_with_k_2_synthetic_responses(tokenizer):
    """K = 2, micro-batches of one prompt's worth (3 sequences, 4 micro-batches): every objective."""
    model = build_tiny_model(tokenizer, seed=5).double()
    data = make_data(model, tokenizer, 4, k=2, seed=9)
    pad = tokenizer.pad_token_id
    for name in OBJECTIVES:
        objective = objective_of(name, mu=2.0) if name == "space" else objective_of(name)
        want = reference(model, data, objective, pad)
        kept, out = accumulated(model, data, objective, pad, "never", micro=1)
        scored, _ = accumulated(model, data, objective, pad, "always", micro=1)
        assert out["scoring_pass"] == 0
        assert max_rel_diff(kept, want) < 1e-9 and max_rel_diff(scored, want) < 1e-9, name


def test_sft_is_the_same_whatever_the_option(setup, tokenizer):
    """SFT knows its coefficients up front: one path, no scoring pass, bit for bit the same gradient."""
    model, data = setup
    pad, sft = tokenizer.pad_token_id, trainer.TrainingData(data.real)
    model.zero_grad(set_to_none=True)
    batch = collate(list(data.real), pad)
    (-sequence_logprobs(model, **batch).sum() / batch["response_mask"][:, 1:].sum()).backward()
    want = grads(model)
    results = [accumulated(model, sft, None, pad, mode) for mode in trainer.SCORING_PASS_MODES]
    for got, out in results:
        assert out["scoring_pass"] == 0 and max_rel_diff(got, want) < 1e-9
        assert all(torch.equal(a, b) for a, b in zip(got, results[0][0]))


def test_a_broken_variant_fails_the_equality(setup, tokenizer):
    """Negative control: graphs kept, but each micro-batch back-propagates the coefficients of its
    OWN objective (what a generic trainer's per-micro-batch loss does), averaged over the
    micro-batches. The same helpers with the global coefficients match, so the comparison can fail."""
    model, data = setup
    pad, objective = tokenizer.pad_token_id, objective_of("iris-2")
    policy = distributed.prepare_model(model)
    want = reference(model, data, objective, pad)

    def kept_graph_gradient(local_objective: bool):
        model.zero_grad(set_to_none=True)
        batch = trainer.GlobalBatch(data, list(range(8)), 2)
        batch.plan = [[[i, i + 1, 8 + i, 9 + i] for i in range(0, 8, 2)]]  # two prompts and their twins each
        local = trainer.forward_share(policy, batch, pad, False, keep_graphs=True)
        coefficients, _ = trainer.global_coefficients(batch, objective, local)
        if local_objective:
            for mb, logps in zip(batch.micro_batches, local):
                x = logps.detach().requires_grad_()
                loss = objective(x[:2], x[2:], data.opponent_real[mb[:2]], data.opponent_synthetic[mb[:2]]).loss / 4
                coefficients[mb] = torch.autograd.grad(loss, x)[0]
        trainer.backward_kept(policy, batch, local, coefficients)
        return grads(model)

    assert max_rel_diff(kept_graph_gradient(local_objective=False), want) < 1e-9
    assert max_rel_diff(kept_graph_gradient(local_objective=True), want) > 1e-2


def train_float64(tokenizer, mode: str, **overrides):
    model = build_tiny_model(tokenizer, seed=0).double()
    data = make_data(model, tokenizer, 8, seed=10)
    records = []
    trainer.train(distributed.prepare_model(model), data, objective_of("iris-2"),
                  options(micro_batch_size=2, scoring_pass=mode, **overrides), pad_token_id=tokenizer.pad_token_id,
                  epochs=2, learning_rate=1e-3, log=records.append)
    return model, records


def test_auto_keeps_the_graphs_when_they_fit_and_logs_it(tokenizer, monkeypatch):
    """`auto` compares the step's estimate with `memory_budget`: no room, the scoring pass; room,
    kept graphs. Every step's metrics say which ran; the trajectory is the same."""
    monkeypatch.setattr(trainer, "memory_budget", lambda device, resident=0.0: 0.0)
    model_a, scored = train_float64(tokenizer, "auto")
    monkeypatch.setattr(trainer, "memory_budget", lambda device, resident=0.0: float("inf"))
    model_b, kept = train_float64(tokenizer, "auto")
    assert [r["scoring_pass"] for r in scored] == [1] * 4 and [r["scoring_pass"] for r in kept] == [0] * 4
    assert all(r["graph_memory_gib"] > 0 for r in scored + kept)
    for a, b in zip(scored, kept):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_auto_budget_is_a_share_of_what_is_available(monkeypatch):
    """CPU: half of MemAvailable, split between the host's ranks, less what will be resident."""
    assert trainer.available_ram() > 0  # /proc/meminfo (or psutil) is readable here
    monkeypatch.setattr(trainer, "available_ram", lambda: 64e9)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu = torch.device("cpu")
    assert trainer.memory_budget(cpu) == 0.5 * 64e9
    assert trainer.memory_budget(cpu, resident=24e9) == 0.5 * 40e9
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert trainer.memory_budget(cpu, resident=24e9) == 0.5 * (64e9 - 48e9) / 2
    assert trainer.memory_budget(cpu, resident=40e9) == 0


def test_unknown_mode_is_a_value_error(setup, tokenizer):
    model, data = setup
    with pytest.raises(ValueError, match="scoring_pass"):
        accumulated(model, data, objective_of("iris-2"), tokenizer.pad_token_id, "sometimes")


def test_the_estimate_counts_what_checkpointing_keeps():
    """3B shape, one micro-batch of 16 x 1024 tokens (all response but the first): checkpointed,
    each layer's input plus the final norm's input and output in fp32 (also under bf16 autocast,
    whose residual stream stays fp32), the LM-head rows and the mask: ~20 GiB for 8 such micro-batches
    (the issue's 'layers x tokens x hidden x 4 bytes'); not checkpointed, all activations."""
    from transformers import Qwen2Config

    config = Qwen2Config(**json.loads((REPO / "bench" / "configs" / "qwen2.5-3b-shaped.json").read_text()))
    shape = (16, 1024, 16 * 1023)
    fp32 = trainer.graph_memory(config, [shape], checkpointing=True)
    bf16 = trainer.graph_memory(config, [shape], checkpointing=True, compute_bytes=2)
    tokens, d = 16 * 1024, 2048
    assert fp32.kept == bf16.kept  # the kept residual stream is fp32 either way
    assert 1.0 <= fp32.kept / (tokens * d * 4 * (36 + 2) + 16 * 1023 * d * 4) < 1.01
    plain = trainer.graph_memory(config, [shape], checkpointing=False, compute_bytes=2)
    assert plain.kept > 10 * bf16.kept
    assert trainer.graph_memory(config, [shape] * 8, checkpointing=True).kept == pytest.approx(8 * fp32.kept, rel=1e-3)


def test_dry_run_says_which_path_and_why(monkeypatch, capsys, tmp_path):
    import run_iris

    config = parse_config(["--output-dir", str(tmp_path / "run")])  # the embedded default
    encoded = random_sequences(build_tiny_tokenizer(), 4 * config.global_batch_size, seed=0)
    assert plan.scoring_pass_plan(config, encoded).startswith("auto: graphs kept, no scoring pass; kept graphs need")
    always = plan.scoring_pass_plan(dataclasses.replace(config, scoring_pass="always"), encoded)
    assert always.startswith("always: a scoring pass every step")
    one = dataclasses.replace(config, micro_batch_size=config.global_batch_size)
    assert plan.scoring_pass_plan(one, encoded).startswith("no scoring pass: one micro-batch per rank")
    monkeypatch.setattr(trainer, "memory_budget", lambda device, resident=0.0: 0.0)
    assert plan.scoring_pass_plan(config, encoded).startswith("auto: a scoring pass every step")
    monkeypatch.undo()
    assert run_iris.main(["--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    assert "  scoring pass   auto: graphs kept" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# memory: measured in a fresh process (bench.common.run_isolated)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "not-checkpointed"])
def test_kept_graph_memory_is_within_the_estimate(checkpointing):
    """Resident memory held once every micro-batch's graph is kept, and the step's peak, above its
    start: measured <= estimate <= 3 x measured (hidden 256, 4 layers, 4 micro-batches)."""
    from bench.common import run_isolated

    r = run_isolated("tests.scoring_worker", "measure_memory", {"checkpointing": checkpointing})
    assert r["scoring_pass"] == 0 and r["method"].startswith("VmHWM")
    assert r["kept"] > 8 * 2**20  # well above the noise of the resident set (pages, small objects)
    assert r["kept"] <= r["kept_estimate"] <= 3 * r["kept"], r
    assert r["peak"] <= r["peak_estimate"] <= 3 * r["peak"], r


# ---------------------------------------------------------------------------------------
# two gloo ranks: DDP and FSDP2 with kept graphs, through a stop and a resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, strategy: str, nproc: int, first: str, second: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(WORKER), "--strategy", strategy, "--micro", "2", "--first", first, "--second", second, "--out", str(out)]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((out / "result.json").read_text())
    result["weights"] = torch.load(out / "weights.pt", weights_only=True)
    return result


@pytest.fixture(scope="module")
def scoring_pass_run(tmp_path_factory):
    """The reference: one process, 4 micro-batches of 2 prompts, the scoring pass throughout."""
    return _run(tmp_path_factory.mktemp("always"), "none", 1, "always", "always")


@pytest.mark.parametrize("strategy, nproc, first, second", [
    ("none", 1, "never", "never"),  # one process, kept graphs throughout
    ("ddp", 2, "always", "never"),  # 2 ranks x 2 micro-batches: the scoring pass, then kept graphs after the resume
    ("fsdp", 2, "never", "auto"),  # sharded parameters: kept graphs, then auto (which keeps them here)
])
def test_kept_graphs_across_processes_match_one_process(tmp_path, scoring_pass_run, strategy, nproc, first, second):
    got, want = _run(tmp_path, strategy, nproc, first, second), scoring_pass_run
    assert got["world_size"] == nproc and got["resumed_from_step"] == 2
    assert [r["step"] for r in got["records"]] == [1, 2, 3, 4] == [r["step"] for r in want["records"]]
    assert [r["scoring_pass"] for r in got["records"]] == [int(first == "always")] * 2 + [int(second == "always")] * 2
    assert all(r["scoring_pass"] == 1 for r in want["records"])
    for a, b in zip(got["records"], want["records"]):
        for key in ("loss", "rewards/margins", "weights/ess_real", "weights/ess_synthetic", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["step"], key)
    start = build_tiny_model(build_tiny_tokenizer(), seed=0).double().state_dict()
    assert max(float((want["weights"][k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained
    for name, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-9, atol=1e-9, msg=name)
