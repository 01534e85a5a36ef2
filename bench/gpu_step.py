"""Training-step throughput, MFU and peak memory of a Qwen2.5-3B-shaped model on one GPU.

The model is built from ``bench/configs/qwen2.5-3b-shaped.json`` (hidden 2048, 36 layers,
16 heads, 2 KV heads, intermediate 11008, vocabulary 151,936, tied embeddings: 3.09 B
parameters) with random weights, directly on the GPU. Nothing is downloaded.

The step is the IRIS training step as the trainer runs it with its GPU defaults: fp32 master
weights, bf16 autocast, gradient checkpointing (non-reentrant), real and synthetic sequences in
one forward through ``iris_ref.logprobs.sequence_logprobs`` (chunked LM head), the IRIS loss
against precomputed opponent log-probs, backward, gradient clipping at 1.0 and an optimizer
step (AdamW by default; ``--optimizer rmsprop`` for SPIN's). It is measured at sequence
lengths 1024 and 2048 with the same number of tokens per step.

MFU (model FLOP utilisation) = model FLOPs per second / peak. Model FLOPs per step, counting
a multiply-add as 2 FLOPs and backward as twice the forward (PaLM, appendix B):

    6 * N_body * tokens + 6 * V * d * scored_tokens + 12 * L * d * T * tokens

N_body = parameters of the decoder (all parameters except the tied embedding matrix);
V * d = the LM-head matmul, applied by the chunked log-probs only to the scored (response)
positions; 12 * L * d * T per token = attention scores and weighted values (QK^T and AV,
forward and backward, full T x T as PaLM counts it). The recomputation of gradient
checkpointing is deliberately NOT counted (it is hardware work, not model work), so MFU is
the conventional, comparable figure. Peak: 989 TFLOP/s, the H100 SXM dense bf16 tensor-core
figure (``--peak-tflops`` for another GPU).

Without CUDA the script prints a one-line message and exits 0 without writing results: CPU
numbers of a 3B model would be meaningless here. ``measure_training_step`` itself runs on
any device (the smoke test uses a tiny config on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MIB, alternate, median, write_results  # noqa: E402

NAME = "gpu_step"
CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "qwen2.5-3b-shaped.json"
H100_BF16_DENSE_TFLOPS = 989.0
PROMPT_FRACTION = 0.125  # the first eighth of each sequence is prompt (not scored)


def load_config(path: Path = CONFIG_PATH):
    from transformers import Qwen2Config

    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read model config {path}: {err}") from err
    return Qwen2Config(**values)


def parameter_counts(model) -> dict:
    """Total parameters (shared counted once) and the decoder body without the embedding."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "body": total - embedding}


def model_flops_per_step(config, body_params: int, batch_size: int, seq_len: int, scored_tokens: int) -> float:
    """The formula of the module docstring (no recomputation counted)."""
    tokens = batch_size * seq_len
    head = config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len * tokens
    return 6.0 * body_params * tokens + 6.0 * head * scored_tokens + float(attention)


def measure_training_step(
    config,
    seq_len: int,
    batch_size: int,
    device: str,
    *,
    autocast_bf16: bool = True,
    gradient_checkpointing: bool = True,
    optimizer_name: str = "adamw",
    steps: int = 5,
    warmup: int = 2,
    alpha: float = 1.0,
    beta: float = 0.1,
    seed: int = 0,
) -> dict:
    """Time ``steps`` full optimizer steps after ``warmup`` ones; peak memory over all of them."""
    import torch
    from transformers import Qwen2ForCausalLM

    from iris_ref.logprobs import sequence_logprobs
    from iris_ref.objectives import iris_loss

    if batch_size % 2:
        raise ValueError(f"batch_size counts real + synthetic sequences and must be even, got {batch_size}")
    if optimizer_name not in ("adamw", "rmsprop"):
        raise ValueError(f"optimizer must be 'adamw' or 'rmsprop', got {optimizer_name!r}")
    torch.manual_seed(seed)
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = Qwen2ForCausalLM(config)  # fp32 master weights, random init on the device
    model.config.use_cache = False
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = parameter_counts(model)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0, fused=on_cuda or None)
    else:
        optimizer = torch.optim.RMSprop(model.parameters(), lr=5e-7)

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    prompt_len = max(1, int(seq_len * PROMPT_FRACTION))
    response_mask[:, prompt_len:] = 1
    scored_tokens = int(response_mask[:, 1:].sum())  # positions whose next token is scored
    pairs = batch_size // 2
    autocast = dict(device_type="cuda" if on_cuda else "cpu", dtype=torch.bfloat16, enabled=autocast_bf16)
    # Opponent log-probs are precomputed once per iteration in the real pipeline (untimed here).
    with torch.no_grad(), torch.autocast(**autocast):
        opponent = sequence_logprobs(model, input_ids, attention_mask, response_mask).float()

    def step():
        with torch.autocast(**autocast):
            logps = sequence_logprobs(model, input_ids, attention_mask, response_mask)
        out = iris_loss(logps[:pairs], logps[pairs:], opponent[:pairs], opponent[pairs:], alpha=alpha, beta=beta)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = alternate({"step": step}, repeats=steps, warmup=warmup, device=device)["step"]
    step_s = median(times)
    flops = model_flops_per_step(config, counts["body"], batch_size, seq_len, scored_tokens)
    result = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_per_step": batch_size * seq_len,
        "scored_tokens_per_step": scored_tokens,
        "step_s_median": step_s,
        "step_s_samples": times,
        "tokens_per_s": batch_size * seq_len / step_s,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / step_s / 1e12,
        "parameters": counts,
        "weights_mib": weights_bytes / MIB,
    }
    if on_cuda:
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        result["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
    del model, optimizer
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG_PATH)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="batch size = this / seq len (even)")
    parser.add_argument("--optimizer", choices=("adamw", "rmsprop"), default="adamw")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step: no CUDA device here; this benchmark measures a 3B model on a GPU only. Nothing measured, nothing written.")
        return 0
    config = load_config(args.config)
    runs = []
    for seq_len in args.seq_lens:
        batch_size = args.tokens_per_step // seq_len
        batch_size -= batch_size % 2
        if batch_size < 2:
            parser.error(f"--tokens-per-step {args.tokens_per_step} gives fewer than 2 sequences at length {seq_len}")
        run = measure_training_step(config, seq_len, batch_size, "cuda", optimizer_name=args.optimizer,
                                    steps=args.steps, warmup=args.warmup)
        run["mfu"] = run["achieved_tflops"] / args.peak_tflops
        runs.append(run)
        print(f"seq {seq_len}: {run['tokens_per_s']:.0f} tokens/s, MFU {run['mfu']:.1%}, "
              f"peak {run['peak_allocated_mib'] / 1024:.1f} GiB", flush=True)
    write_results(NAME, {
        "device": torch.cuda.get_device_name(0),
        "settings": {"config": str(args.config.name), "precision": "fp32 master weights + bf16 autocast",
                     "gradient_checkpointing": True, "optimizer": args.optimizer, "objective": "iris alpha=1 beta=0.1",
                     "tokens_per_step": args.tokens_per_step, "steps": args.steps, "warmup": args.warmup,
                     "peak_tflops_assumed": args.peak_tflops},
        "flop_formula": "6*N_body*tokens + 6*V*d*scored_tokens + 12*L*d*T*tokens (no recompute counted)",
        "runs": runs,
    })
    summary = ", ".join(f"seq {r['seq_len']}: {r['tokens_per_s']:.0f} tok/s MFU {r['mfu']:.1%}" for r in runs)
    print(f"gpu_step: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
