"""Peak memory of the project's sequence log-probs against the naive full-vocabulary way.

What is compared (forward AND backward, same model, same batch):

* ``chunked``: :func:`iris_ref.logprobs.sequence_logprobs` — hidden states, then the LM head
  and an fp32 ``log_softmax`` per chunk of selected response positions, recomputed in backward.
* ``naive``: ``model(...).logits`` for every position, ``log_softmax`` over the full
  vocabulary, ``gather`` of the target tokens, masked sum — the way most DPO/SPIN code does it.
  Its logits alone take batch x tokens x vocab x 4 bytes (4 x 1024 x 151,936 x 4 = 2.5 GB).

The model is a tiny Qwen2 (one decoder layer, hidden 64) with Qwen2.5's vocabulary of 151,936
and tied embeddings, so the vocabulary projection dominates as it does in real models while the
run stays within the 2-minute budget on 2 CPU cores. The batch is 4 x 1024 tokens: a 128-token
prompt (masked out) and an 896-token response per row.

How peak memory is measured, and why this way: each variant runs in its own fresh Python
process (``bench.common.run_isolated``) that builds the model and the batch, resets the
kernel's resident-set high-water mark, runs forward + backward, and reports the high-water mark
minus the resident set at the reset (``bench.common.PeakMemory``). A fresh process per run
means no memory freed by the other variant is reused unseen; glibc's mmap threshold is pinned
low in that process so every tensor is its own mapping, returned to the kernel when freed, and
the resident set follows live tensor memory. Allocator-level profiling (``torch.profiler``)
would also work but reports per-operator events rather than a process peak. On CUDA the same
worker uses ``torch.cuda.max_memory_allocated``. The variants alternate (naive, chunked,
chunked, naive, ...) and the headline ``ratio`` is median(chunked) / median(naive).

The chunk size is the project's default (`iris_ref.logprobs.DEFAULT_CHUNK_SIZE`, 512 positions, as the trainer uses); with
``--chunk-size N`` the results go to ``bench/results/logprob_memory_chunkN.json`` instead.

Each worker also returns the per-sequence log-probs and the gradient norm, and the benchmark
checks that both variants agree, so a memory win can never come from computing something else.
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
    run_isolated,
    set_cpu_threads,
    time_call,
    write_results,
)
from iris_ref.logprobs import DEFAULT_CHUNK_SIZE  # noqa: E402

NAME = "logprob_memory"
DEFAULTS = dict(vocab_size=151_936, hidden_size=64, batch_size=4, seq_len=1024, prompt_len=128, chunk_size=DEFAULT_CHUNK_SIZE)
TARGET_RATIO = 0.25


def build_model(vocab_size: int, hidden_size: int, max_positions: int, seed: int = 0):
    """A one-layer Qwen2 causal LM with tied embeddings, random init, fp32, eval mode."""
    model = build_qwen2(vocab_size, hidden_size, 1, 2 * hidden_size, max_positions, seed=seed)
    model.eval()  # no dropout either way; gradients still flow
    return model


def build_batch(vocab_size: int, batch_size: int, seq_len: int, prompt_len: int, seed: int = 0):
    import torch

    if not 0 < prompt_len < seq_len:
        raise ValueError(f"need 0 < prompt_len < seq_len, got {prompt_len}, {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    response_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    response_mask[:, prompt_len:] = 1
    return input_ids, attention_mask, response_mask


def naive_sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """Full-vocabulary logits for every position, log_softmax, gather, masked sum (the baseline)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logps = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * response_mask[:, 1:].to(token_logps.dtype)).sum(-1)


def measure_variant(
    variant: str,
    vocab_size: int,
    hidden_size: int,
    batch_size: int,
    seq_len: int,
    prompt_len: int,
    chunk_size: int,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Forward + backward of one variant; peak memory above the post-setup level (run isolated)."""
    import torch

    if variant not in ("naive", "chunked"):
        raise ValueError(f"variant must be 'naive' or 'chunked', got {variant!r}")
    model = build_model(vocab_size, hidden_size, seq_len, seed).to(device)
    batch = [t.to(device) for t in build_batch(vocab_size, batch_size, seq_len, prompt_len, seed)]
    if variant == "naive":
        compute = lambda: naive_sequence_logprobs(model, *batch)  # noqa: E731
    else:
        from iris_ref.logprobs import sequence_logprobs

        compute = lambda: sequence_logprobs(model, *batch, chunk_size=chunk_size)  # noqa: E731

    outputs = {}

    def forward_backward():
        logps = compute()
        logps.sum().backward()
        outputs["logps"] = logps.detach().double().cpu().tolist()

    with PeakMemory(device) as peak:
        seconds = time_call(forward_backward, device)
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return {
        "variant": variant,
        "peak_bytes": peak.peak_bytes,
        "peak_mib": peak.peak_bytes / MIB,
        "method": peak.method,
        "seconds": seconds,
        "logps": outputs["logps"],
        "grad_norm": float(grad_norm),
    }


def run_benchmark(settings: dict, repeats: int, device: str) -> dict:
    """Alternate the variants in fresh processes; compare medians; check they agree."""
    runs: dict[str, list[dict]] = {"naive": [], "chunked": []}
    for round_index in range(repeats):
        order = ["naive", "chunked"] if round_index % 2 == 0 else ["chunked", "naive"]
        for variant in order:
            runs[variant].append(
                run_isolated("bench.logprob_memory", "measure_variant", {"variant": variant, "device": device, **settings})
            )
    peaks = {v: median([r["peak_bytes"] for r in rs]) for v, rs in runs.items()}
    naive, chunked = runs["naive"][0], runs["chunked"][0]
    max_logp_diff = max(abs(a - b) for a, b in zip(naive["logps"], chunked["logps"]))
    grad_rel_diff = abs(naive["grad_norm"] - chunked["grad_norm"]) / max(naive["grad_norm"], 1e-30)
    full_logits_bytes = settings["batch_size"] * settings["seq_len"] * settings["vocab_size"] * 4
    scored = settings["batch_size"] * (settings["seq_len"] - settings["prompt_len"])
    chunk_bytes = min(settings["chunk_size"], scored) * settings["vocab_size"] * 4
    return {
        "device": device,
        "settings": {**settings, "repeats": repeats, "variant_order": "ABBA, one fresh process per run"},
        "memory_method": naive["method"],
        "full_logits_fp32_mib": full_logits_bytes / MIB,
        "chunk_logits_fp32_mib": chunk_bytes / MIB,
        "chunked_peak_in_chunk_buffers": peaks["chunked"] / chunk_bytes,
        "naive_peak_in_full_logits": peaks["naive"] / full_logits_bytes,
        "peak_mib": {v: peaks[v] / MIB for v in peaks},
        "peak_mib_samples": {v: [r["peak_mib"] for r in rs] for v, rs in runs.items()},
        "seconds_samples": {v: [r["seconds"] for r in rs] for v, rs in runs.items()},
        "agreement": {"max_abs_logp_diff": max_logp_diff, "grad_norm_rel_diff": grad_rel_diff},
        "target_ratio": TARGET_RATIO,
        "ratio": peaks["chunked"] / peaks["naive"],
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant (alternating)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see bench.common.set_cpu_threads)")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        set_cpu_threads(args.threads)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    settings = {key: getattr(args, key) for key in DEFAULTS}
    result = run_benchmark(settings, args.repeats, args.device)
    agreement = result["agreement"]
    if agreement["max_abs_logp_diff"] > 1e-2 * settings["seq_len"] or agreement["grad_norm_rel_diff"] > 1e-3:
        print(f"error: chunked and naive log-probs disagree: {agreement}", file=sys.stderr)
        return 1
    # A non-default chunk size is a different experiment: its own results file.
    name = NAME if args.chunk_size == DEFAULTS["chunk_size"] else f"{NAME}_chunk{args.chunk_size}"
    write_results(name, result)
    peak = result["peak_mib"]
    print(f"naive peak {peak['naive']:.0f} MiB, chunked peak {peak['chunked']:.0f} MiB ({args.device})")
    print(f"logprob_memory ratio (chunked/naive peak memory, fwd+bwd): {result['ratio']:.3f} (target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
