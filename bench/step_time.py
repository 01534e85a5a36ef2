"""Time of one optimizer step with the IRIS objective against the same step with SPIN.

Both steps run the project's real trainer, ``iris_ref.trainer.train_iteration``, which has no
public single-step function: each call is given exactly one global batch (``max_steps=1``,
one epoch), so it performs one optimizer step plus its fixed set-up (optimizer and schedule
creation, wrapping), identical for every variant. The one-step schedule's warm-up makes that
step's learning rate 0, so the optimizer does all its work but the model never changes and
every call sees the same weights.

Variants, timed side by side in one process, interleaved in ABBA order, medians compared:

* ``iris`` / ``spin``: one micro-batch of ``pairs`` pairs (real + synthetic in one forward),
  IRIS at α = 0.5 against SPIN, β = 0.1. Headline ``ratio``: the median over rounds of
  time(iris) / time(spin) within the round (the two ran next to each other, so slow drifts of
  a shared machine cancel); ``ratio_of_medians`` is reported too. Target <= 1.05: the
  objectives are O(batch) arithmetic next to a forward and a backward. ``objective_only_ms``
  times the two losses alone (loss + backward on the batch's log-prob vectors), to show it.
* ``iris_exact_accum`` / ``spin_accum``: the same pairs per micro-batch, two micro-batches per
  optimizer step. IRIS's log-sum-exp couples the whole global batch, so the trainer first runs
  a no-grad scoring pass over both micro-batches, computes the weights over the global batch,
  then back-propagates each micro-batch's slice of the weighted surrogate: exact (THEORY.md
  I3). SPIN is separable, so the trainer takes the path with micro-batch-local weights (one
  forward+backward per micro-batch, weights from that micro-batch alone), which is exactly the
  cost IRIS would have with micro-batch-local weights. ``accumulation_overhead``: the paired
  median ratio iris_exact_accum / spin_accum, the price of exactness. Expected about
  1 + F / (F + B) with F, B the forward and backward times (about 1.33 without gradient
  checkpointing).

The model is a small random Qwen2 (hidden 128, 4 layers, vocabulary 2,048, tied embeddings)
on random token sequences of 64 tokens (16 prompt + 48 response), 8 pairs per micro-batch,
fp32 on CPU; on CUDA the same with bf16 autocast. Times are wall-clock on a shared 2-core
machine: only the ratios are meaningful there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    alternate,
    build_qwen2,
    median,
    random_pairs,
    set_cpu_threads,
    summarize_times,
    write_results,
)

NAME = "step_time"
TARGET_RATIO = 1.05
DEFAULTS = dict(vocab_size=2048, hidden_size=128, num_layers=4, intermediate_size=512,
                seq_len=64, prompt_len=16, pairs=8, alpha=0.5, beta=0.1)


def make_variants(settings: dict, device: str) -> dict:
    """The four trainer calls, as zero-argument callables sharing one model and one data set."""
    import torch

    from iris_ref.trainer import TrainingArgs, compute_logprobs, train_iteration

    model = build_qwen2(settings["vocab_size"], settings["hidden_size"], settings["num_layers"],
                        settings["intermediate_size"], settings["seq_len"]).to(device)
    m = settings["pairs"]
    pairs = random_pairs(2 * m, settings["seq_len"], settings["prompt_len"], settings["vocab_size"])
    pad = 0
    opp_real, opp_syn = compute_logprobs(model, pairs, pad, m)
    # An opponent that differs from the policy, so rewards and weights are not all equal.
    generator = torch.Generator().manual_seed(1)
    opp_real = opp_real + torch.randn(opp_real.shape, generator=generator)
    opp_syn = opp_syn + torch.randn(opp_syn.shape, generator=generator)
    bf16 = str(device).startswith("cuda")

    def trainer_call(loss: str, micro_batches: int):
        n = m * micro_batches
        args = TrainingArgs(loss=loss, beta=settings["beta"], global_batch_size=n, micro_batch_size=m,
                            epochs=1, max_steps=1, progress=False, bf16=bf16, seed=0)
        alpha = settings["alpha"] if loss == "iris" else None
        return lambda: train_iteration(model, pairs[:n], opp_real[:n], opp_syn[:n], alpha=alpha, args=args,
                                       pad_token_id=pad)

    return {
        "iris": trainer_call("iris", 1),
        "spin": trainer_call("spin", 1),
        "iris_exact_accum": trainer_call("iris", 2),
        "spin_accum": trainer_call("spin", 2),
    }


def objective_only_ms(pairs: int, alpha: float, beta: float, calls: int = 200, rounds: int = 6) -> dict:
    """Milliseconds per loss + backward of the objective alone on ``pairs`` pairs (no model)."""
    import torch

    from iris_ref.objectives import iris_loss, spin_loss

    generator = torch.Generator().manual_seed(0)
    policy = [(torch.randn(pairs, generator=generator) * 10 - 100).requires_grad_(True) for _ in range(2)]
    opponent = [torch.randn(pairs, generator=generator) * 10 - 100 for _ in range(2)]

    def block(loss_fn, **constants):
        def run():
            for _ in range(calls):
                loss_fn(policy[0], policy[1], opponent[0], opponent[1], **constants).loss.backward()
        return run

    times = alternate({"iris": block(iris_loss, alpha=alpha, beta=beta), "spin": block(spin_loss, beta=beta)},
                      repeats=rounds, warmup=1)
    return {name: median(samples) / calls * 1e3 for name, samples in times.items()}


def paired_ratio(times: dict, numerator: str, denominator: str) -> float:
    """Median over rounds of the ratio of two variants timed next to each other in that round."""
    return median([a / b for a, b in zip(times[numerator], times[denominator])])


def run_benchmark(settings: dict, repeats: int, warmup: int, device: str) -> dict:
    variants = make_variants(settings, device)
    times = alternate(variants, repeats=repeats, warmup=warmup, device=device)
    med = {name: median(samples) for name, samples in times.items()}
    return {
        "device": device,
        "settings": {**settings, "repeats": repeats, "warmup": warmup, "order": "ABBA interleaved",
                     "step": "iris_ref.trainer.train_iteration with max_steps=1 (one optimizer step + set-up)",
                     "ratio_estimator": "median over rounds of the per-round ratio (variants adjacent in time)"},
        "times": summarize_times(times),
        "median_s": med,
        "target_ratio": TARGET_RATIO,
        "ratio": paired_ratio(times, "iris", "spin"),
        "ratio_of_medians": med["iris"] / med["spin"],
        "accumulation_overhead": paired_ratio(times, "iris_exact_accum", "spin_accum"),
        "accumulation_overhead_of_medians": med["iris_exact_accum"] / med["spin_accum"],
        "objective_only_ms": objective_only_ms(settings["pairs"], settings["alpha"], settings["beta"]),
        "absolute_times_meaningful": str(device).startswith("cuda"),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see bench.common.set_cpu_threads)")
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        set_cpu_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    result = run_benchmark(dict(DEFAULTS), args.repeats, args.warmup, args.device)
    write_results(NAME, result)
    med = result["median_s"]
    print(f"median step: iris {med['iris'] * 1e3:.1f} ms, spin {med['spin'] * 1e3:.1f} ms; "
          f"2 micro-batches: iris exact {med['iris_exact_accum'] * 1e3:.1f} ms, spin (local weights) "
          f"{med['spin_accum'] * 1e3:.1f} ms -> exact accumulation costs x{result['accumulation_overhead']:.2f}")
    obj = result["objective_only_ms"]
    print(f"objective alone (loss + backward, {DEFAULTS['pairs']} pairs): iris {obj['iris']:.3f} ms, spin {obj['spin']:.3f} ms")
    print(f"step_time ratio (iris/spin step time): {result['ratio']:.3f} (target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
