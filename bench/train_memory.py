"""Peak memory of an IRIS training step against an SFT step and against a resident opponent.

Three designs, one optimizer step each through the project's trainer
(``iris_ref.trainer.train`` with ``max_steps=1``), same model, same optimizer
(RMSprop, the default), gradient checkpointing on (the GPU default):

* ``iris``: the project's design. Only the policy is resident; the opponent's log-probs were
  computed beforehand (by the policy's own weights, which ARE the opponent at the start of an
  iteration) and enter as two vectors. ``pairs`` pairs per micro-batch: real and synthetic
  sequences in one forward of 2 x ``pairs`` sequences.
* ``sft``: supervised fine-tuning of the same model with the same number of sequences (and
  tokens) per forward: 2 x ``pairs`` annotated responses. Headline ``ratio`` =
  peak(iris) / peak(sft); target <= 1.1. ``sft_half`` (``pairs`` sequences, the same prompts
  without their synthetic twins) is reported too.
* ``resident_opponent``: what TRL's DPO trainer does by default: a second, frozen copy of the
  model stays in memory and computes the opponent log-probs on the fly (no grad) before the
  policy's forward; then the same IRIS step. ``resident_ratio`` =
  peak(resident_opponent) / peak(iris).

Peak memory is measured as in ``bench/logprob_memory.py``: each run in a fresh process, the
resident-set high-water mark reset just before the model is built (after imports and data), so
the peak covers everything training holds: weights, gradients, optimizer state, activations,
the opponent copy where there is one. Each design runs ``repeats`` times, alternating; medians.

The model is a small random Qwen2 (vocabulary 16,384, hidden 256, 4 layers, 8.1 M parameters,
tied embeddings), fp32 on CPU, sequences of 128 random tokens (32 prompt + 96 response),
8 pairs per micro-batch. At this size activations weigh more than weights; docs/performance.md
scales the same accounting to 3B and 7B models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    MIB,
    PeakMemory,
    build_qwen2,
    median,
    random_pairs,
    run_isolated,
    set_cpu_threads,
    write_results,
)

NAME = "train_memory"
TARGET_RATIO = 1.1
VARIANTS = ("iris", "sft", "sft_half", "resident_opponent")
DEFAULTS = dict(vocab_size=16384, hidden_size=256, num_layers=4, intermediate_size=1024,
                seq_len=128, prompt_len=32, pairs=8, alpha=0.5, beta=0.1)


def measure_variant(variant: str, settings: dict, device: str = "cpu") -> dict:
    """One optimizer step of ``variant``; peak memory from just before the model is built."""
    import copy
    import dataclasses
    import functools

    import torch

    from iris_ref import distributed, trainer
    from iris_ref.config import parse_config
    from iris_ref.scoring import score_sequences
    from iris_ref.objectives import iris_loss

    # Modules the trainer imports lazily: loaded here, so no variant's peak includes them.
    import iris_ref.data  # noqa: F401
    import tqdm.auto  # noqa: F401
    from transformers import get_scheduler  # noqa: F401

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    m = settings["pairs"]
    n_sft = m if variant == "sft_half" else 2 * m
    all_pairs = random_pairs(n_sft if variant.startswith("sft") else m, settings["seq_len"],
                             settings["prompt_len"], settings["vocab_size"])
    pad = 0
    bf16 = str(device).startswith("cuda")
    with PeakMemory(device) as peak:
        model = build_qwen2(settings["vocab_size"], settings["hidden_size"], settings["num_layers"],
                            settings["intermediate_size"], settings["seq_len"]).to(device)
        policy = distributed.prepare_model(model)
        n = n_sft if variant.startswith("sft") else m
        config = dataclasses.replace(parse_config([]), device=device, bf16=bf16, gradient_checkpointing=True,
                                     optimizer="rmsprop", global_batch_size=n, micro_batch_size=n, save_steps=None)
        if variant.startswith("sft"):
            data, objective = trainer.TrainingData([real for real, _ in all_pairs]), None
        else:
            opponent = policy
            if variant == "resident_opponent":
                opponent = copy.deepcopy(model).eval().requires_grad_(False)
                if bf16:
                    opponent = opponent.to(torch.bfloat16)
            sequences = [real for real, _ in all_pairs] + [syn for _, syn in all_pairs]
            scores = score_sequences(opponent, sequences, pad, token_budget=2 * m * settings["seq_len"], bf16=bf16)
            data = trainer.TrainingData(sequences[:m], sequences[m:], scores[:m], scores[m:])
            objective = functools.partial(iris_loss, alpha=settings["alpha"], beta=settings["beta"])
        summary = trainer.train(policy, data, objective, config, pad_token_id=pad, epochs=1, learning_rate=1e-6,
                                max_steps=1)
        if variant == "resident_opponent":
            del opponent
    params = sum(p.numel() for p in model.parameters())
    return {
        "variant": variant,
        "peak_bytes": peak.peak_bytes,
        "peak_mib": peak.peak_bytes / MIB,
        "method": peak.method,
        "parameters": params,
        "loss": float(summary["loss"]),
    }


def run_benchmark(settings: dict, repeats: int, device: str) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_index in range(repeats):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            runs[variant].append(run_isolated("bench.train_memory", "measure_variant",
                                              {"variant": variant, "settings": settings, "device": device}))
    peak = {v: median([r["peak_bytes"] for r in rs]) / MIB for v, rs in runs.items()}
    params = runs["iris"][0]["parameters"]
    return {
        "device": device,
        "settings": {**settings, "repeats": repeats, "optimizer": "rmsprop", "gradient_checkpointing": True,
                     "order": "alternating, one fresh process per run"},
        "memory_method": runs["iris"][0]["method"],
        "parameters": params,
        "weights_mib": params * 4 / MIB,
        "peak_mib": peak,
        "peak_mib_samples": {v: [r["peak_mib"] for r in rs] for v, rs in runs.items()},
        "target_ratio": TARGET_RATIO,
        "ratio": peak["iris"] / peak["sft"],
        "ratio_vs_sft_half": peak["iris"] / peak["sft_half"],
        "resident_ratio": peak["resident_opponent"] / peak["iris"],
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see bench.common.set_cpu_threads)")
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        set_cpu_threads(args.threads)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    result = run_benchmark(dict(DEFAULTS), args.repeats, args.device)
    write_results(NAME, result)
    p = result["peak_mib"]
    print(f"peak MiB: iris {p['iris']:.0f}, sft {p['sft']:.0f} (same tokens), sft_half {p['sft_half']:.0f}, "
          f"resident opponent {p['resident_opponent']:.0f} -> resident/iris {result['resident_ratio']:.3f}")
    print(f"train_memory ratio (iris/sft peak memory, same tokens per forward): {result['ratio']:.3f} "
          f"(target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
