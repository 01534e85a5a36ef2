"""Smoke tests of the benchmarks: each core function runs at tiny sizes and its results file is
valid JSON with the headline keys. No timing is asserted anywhere (times are machine noise);
what is asserted are the invariants a benchmark relies on: the two log-prob variants compute
the same numbers, the chunked one uses less memory, the FLOP formula adds up, and the GPU
benchmark writes nothing without a GPU."""

import json
import math

import pytest
import torch

from bench import common, generation_throughput, logprob_memory, throughput, train_memory


def test_write_results_adds_environment(tmp_path):
    path = common.write_results("smoke_case", {"ratio": 0.5}, results_dir=tmp_path)
    record = json.loads(path.read_text())
    assert record["benchmark"] == "smoke_case" and record["ratio"] == 0.5
    assert record["environment"]["torch"] == torch.__version__
    with pytest.raises(ValueError, match="benchmark name"):
        common.write_results("Bad Name", {}, results_dir=tmp_path)


def test_peak_memory_sees_a_large_allocation():
    with common.PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert peak.peak_bytes >= 60 * 2**20


def test_alternate_runs_every_variant_in_abba_order():
    calls = []
    times = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError):
        common.alternate({"a": lambda: None}, repeats=0)


def test_naive_logprobs_match_a_direct_computation():
    model = logprob_memory.build_model(vocab_size=50, hidden_size=8, max_positions=16)
    ids, attn, resp = logprob_memory.build_batch(50, batch_size=2, seq_len=12, prompt_len=4)
    got = logprob_memory.naive_sequence_logprobs(model, ids, attn, resp)
    logits = model(input_ids=ids).logits.double()
    expected = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        for t in range(4, 12):  # response tokens, each predicted from the previous position
            expected[b] += torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_logprob_memory_benchmark_small(tmp_path):
    settings = dict(vocab_size=20_000, hidden_size=16, batch_size=2, seq_len=256, prompt_len=32, chunk_size=64)
    result = logprob_memory.run_benchmark(settings, repeats=1, device="cpu")
    assert result["agreement"]["max_abs_logp_diff"] < 1e-2
    assert result["agreement"]["grad_norm_rel_diff"] < 1e-3
    assert 0 < result["ratio"] < 1  # full logits are 40 MiB here, chunks 5 MiB
    record = json.loads(common.write_results("logprob_memory", result, results_dir=tmp_path).read_text())
    assert record["ratio"] == result["ratio"]


def test_train_memory_workers_run_small():
    settings = dict(train_memory.DEFAULTS, vocab_size=512, hidden_size=32, num_layers=1, intermediate_size=64,
                    seq_len=24, prompt_len=8, pairs=2)
    for variant in train_memory.VARIANTS:  # in-process: checks the workers run, not their numbers
        run = train_memory.measure_variant(variant, settings)
        assert run["variant"] == variant and run["peak_bytes"] >= 0 and math.isfinite(run["loss"])
    with pytest.raises(ValueError, match="variant"):
        train_memory.measure_variant("dpo", settings)


def test_train_memory_aggregation(tmp_path, monkeypatch):
    fake_peaks_mib = {"iris": 100.0, "sft": 98.0, "sft_half": 60.0, "resident_opponent": 130.0}

    def fake_run_isolated(module, function, kwargs, timeout=600):
        peak = fake_peaks_mib[kwargs["variant"]] * common.MIB
        return {"variant": kwargs["variant"], "peak_bytes": peak, "peak_mib": peak / common.MIB,
                "method": "fake", "parameters": 1000, "loss": 0.0}

    monkeypatch.setattr(train_memory, "run_isolated", fake_run_isolated)
    result = train_memory.run_benchmark(dict(train_memory.DEFAULTS), repeats=2, device="cpu")
    assert result["ratio"] == pytest.approx(100 / 98)
    assert result["resident_ratio"] == pytest.approx(1.3)
    assert result["ratio_vs_sft_half"] == pytest.approx(100 / 60)
    json.loads(common.write_results("train_memory", result, results_dir=tmp_path).read_text())


def test_generation_throughput_small(tmp_path):
    result = generation_throughput.run_benchmark(batch_sizes=(1, 2), num_prompts=4, max_new_tokens=3, repeats=1)
    assert [r["batch_size"] for r in result["rows"]] == [1, 2]
    assert all(0 < r["generated_tokens"] <= 4 * 3 for r in result["rows"])
    json.loads(common.write_results("generation_throughput", result, results_dir=tmp_path).read_text())


def test_throughput_flop_formula():
    from iris_ref.data import EncodedSequence
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    body = sum(p.numel() for p in model.parameters()) - 64 * 16
    sequences = [EncodedSequence(list(range(1, 11)), 4), EncodedSequence(list(range(1, 7)), 2)]
    expected = 6 * body * 16 + 6 * 64 * 16 * (6 + 4) + 12 * 2 * 16 * (10 ** 2 + 6 ** 2)
    assert throughput.model_flops(model, sequences) == pytest.approx(expected)


def test_throughput_packing_is_first_fit_decreasing_and_exact():
    """Packed rows hold every sequence once within the row length, and the packed log-probs equal
    the padded ones (transformers isolates packed sequences through position_ids)."""
    from iris_ref.data import EncodedSequence, collate
    from iris_ref.logprobs import sequence_logprobs
    from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer(), seed=0).double()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    sequences = [EncodedSequence(torch.randint(5, vocab, (n,), generator=g).tolist(), 3) for n in (9, 4, 7, 5, 12, 4)]
    rows = throughput.pack(sequences, 16)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(len(sequences[i].input_ids) for i in row) <= 16 for row in rows) and len(rows) == 3
    with torch.no_grad():
        packed = throughput.packed_logps(model, sequences, rows, torch.device("cpu"), bf16=False)
        padded = sequence_logprobs(model, **collate(sequences, 0)).sum()
    assert float(packed) == pytest.approx(float(padded), rel=1e-9)


def test_throughput_benchmark_small(tmp_path):
    import argparse

    small = tmp_path / "small.json"  # the code path, not the tiny model's speed: a smaller model will do
    small.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256,
                                 "max_position_embeddings": 128}))
    result = throughput.measure(argparse.Namespace(device="cpu", model_config=str(small), steps=1, global_batch_size=4,
                                                   micro_batch_size=2, max_length=64, max_prompt_length=32,
                                                   peak_tflops=1.0))
    assert {"training", "training_checkpointed"} <= set(result)
    assert 0 <= result["training"]["padding_fraction"] < 1 and result["training"]["ratio"] > 0
    assert 0 <= result["opponent_pass"]["padding_fraction"] < 1
    json.loads(common.write_results("throughput", result, results_dir=tmp_path).read_text())


def test_throughput_length_mix_respects_the_limits():
    lengths = throughput.length_mix(500, 1024, 512, seed=0)
    assert all(p <= 512 and p + r <= 1024 and p + s <= 1024 and min(p, r, s) >= 2 for p, r, s in lengths)
    import statistics

    assert 90 < statistics.median(p for p, _, _ in lengths) < 150  # the documented medians
    assert 240 < statistics.median(r for _, r, _ in lengths) < 320


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    import subprocess

    from tests.driver_helpers import REPO

    before = sorted(p.name for p in (REPO / "bench" / "results").iterdir())
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout
    assert sorted(p.name for p in (REPO / "bench" / "results").iterdir()) == before


def test_reproducibility_runs_two_tiny_runs_and_writes_its_tables(tmp_path, monkeypatch):
    """bench/reproducibility.py end to end at a tiny setting: the shipped run and the +1-ulp child
    (run_iris.main with the init wrapped), each a subprocess; the JSON holds per-iteration spreads."""
    from bench import reproducibility

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = ("--iters 1 --sft-epochs 1 --sft-patience 1 --num-samples 64 --eval-num-samples 8 --max-length 40 "
             "--generation-batch-size 64")
    code = reproducibility.main(["--runs", "s0-base", "s0-ulp+", f"--extra={extra}", "--work-dir",
                                 str(tmp_path / "work"), "--results-dir", str(tmp_path), "--timeout", "300"])
    assert code == 0
    record = json.loads((tmp_path / "reproducibility.json").read_text())
    assert record["benchmark"] == "reproducibility" and record["environment"]["torch"] == torch.__version__
    assert set(record["runs"]) == {"s0-base", "s0-ulp+"}
    for run in record["runs"].values():
        assert [row["iteration"] for row in run["iterations"]] == [0, 1]
        assert set(reproducibility.COLUMNS) <= set(run["iterations"][0]) and run["warmup"]["best_epoch"] == 1
    group = record["groups"]["float-order"]
    assert group["runs"] == ["s0-base", "s0-ulp+"] and group["last_iteration"] == 1
    cell = group["per_iteration"][0]["heldout_nll"]
    assert cell["n"] == 2 and cell["min"] <= cell["median"] <= cell["max"] and cell["sd"] >= 0
    assert set(group["last_minus_first"]["heldout_accuracy"]["per_run"]) == {"s0-base", "s0-ulp+"}
    assert record["effects"]["s0-ulp+"]["reference"] == "s0-base"
    assert "| iter |" in (tmp_path / "reproducibility.md").read_text()


def test_reproducibility_never_deletes_a_work_dir_it_did_not_make(tmp_path, capsys):
    from bench import reproducibility

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert reproducibility.main(["--runs", "s0-base", "--fresh", "--work-dir", str(mine),
                                 "--results-dir", str(tmp_path / "r")]) == 2
    assert "was not made by this bench" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"
