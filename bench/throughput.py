"""Training and opponent-pass throughput of the trainer as it runs, against padded and packed SFT steps.

    python bench/throughput.py --steps 3            # CPU, tiny model: ratios (bench/results/throughput.json)
    python bench/throughput.py --device cuda --model-config bench/configs/qwen2.5-3b-shaped.json
                                                    # GPU: also tokens/s, MFU, peak memory (gpu_throughput.json)

What is measured, side by side in one process, on the same model and the same sequences, with
gradient checkpointing off and on (`--checkpointing both`, the CPU default; on CUDA only `on`:
a 3B micro-batch of 8 prompts does not fit without it):

* **IRIS step, kept graphs** (`--scoring-pass never`): the body of `iris_ref.trainer.train`'s
  loop (`accumulate_gradient`, clipping, the optimizer step) with the run's defaults: global
  batch 64 prompts, micro-batch 8, K = 1, RMSprop, bf16 autocast on CUDA: every micro-batch's
  forward with gradient, graphs kept, the global IRIS weights, one backward through them; the
  least-padding micro-batches and their real padding (`padding_fraction`: padding tokens /
  all tokens computed in training).
* **IRIS step, scoring pass** (`--scoring-pass always`): the same step with a forward without
  gradient first and each micro-batch's forward again with gradient: one extra forward.
* **Padded SFT step**: the same sequences as SFT targets through the same `accumulate_gradient`
  (same micro-batches, same padding): the ratios to it isolate what IRIS adds to SFT.
* **Packed SFT step** ("speed of light" for this hardware): the same sequences, every one
  trained on with plain NLL, packed without padding into rows of at most `max_length` tokens
  (first-fit decreasing; transformers isolates packed sequences from `position_ids`), in as
  many micro-batches as the IRIS step has, same optimizer, precision and checkpointing.
  The four steps run interleaved on the same global batches, the order rotating every step.
* Per checkpointing mode (`training`: off, `training_checkpointed`: on), response tokens per
  second as ratios: `ratio` = packed SFT / IRIS with the scoring pass, `ratio_to_padded_sft` =
  padded SFT / the same (these two keep their meaning from before kept graphs existed), and
  `kept_graphs_ratio`, `kept_graphs_ratio_to_padded_sft` for the IRIS step with kept graphs.
  Per token, kept graphs cost what padded SFT costs (forward + backward, + recompute when
  checkpointed); the scoring pass adds a forward: <= 0.75 of SFT without checkpointing, <= 0.8 with.
* The opponent pass (`scoring.score_sequences`: sorted by length, batched by a token budget)
  against a packed no-grad forward of the same sequences, and its padding fraction.
* On CUDA also tokens/s, MFU, each variant's peak memory above the step's start, and
  `trainer.graph_memory`'s estimate for the kept-graph step with what `--scoring-pass auto`
  would decide there (its budget: `trainer.memory_budget`).

The length mix is UltraChat-like (DESIGN.md: ~40% padding when shuffled and padded): lognormal
prompt lengths with median 120 tokens, annotated responses median 280, synthetic responses
median 320 (sigma 0.8, 0.6, 0.6), capped at the run's limits (prompt 512, total 1024); token
ids are random (throughput depends on shapes, not values). On CPU the tiny model's absolute
times mean nothing; only the ratios are reported as results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import set_cpu_threads, synchronize, write_results  # noqa: E402

MEDIANS = {"prompt": 120, "real": 280, "synthetic": 320}
SIGMAS = {"prompt": 0.8, "real": 0.6, "synthetic": 0.6}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def length_mix(n: int, max_length: int, max_prompt_length: int, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, annotated response, synthetic response) lengths of n prompts (see the docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = int(min(max_prompt_length, max(8, rng.lognormal(math.log(MEDIANS["prompt"]), SIGMAS["prompt"]))))
        r = int(min(max_length - p, max(2, rng.lognormal(math.log(MEDIANS["real"]), SIGMAS["real"]))))
        s = int(min(max_length - p, max(2, rng.lognormal(math.log(MEDIANS["synthetic"]), SIGMAS["synthetic"]))))
        out.append((p, r, s))
    return out


def make_data(lengths, vocab_size: int, seed: int):
    import torch

    from iris_ref.data import EncodedSequence
    from iris_ref.trainer import TrainingData

    g = torch.Generator().manual_seed(seed)
    real, synthetic = [], []
    for p, r, s in lengths:
        prompt = torch.randint(1, vocab_size, (p,), generator=g).tolist()
        real.append(EncodedSequence(prompt + torch.randint(1, vocab_size, (r,), generator=g).tolist(), p))
        synthetic.append(EncodedSequence(prompt + torch.randint(1, vocab_size, (s,), generator=g).tolist(), p))
    return TrainingData(real, synthetic)


def pack(sequences, row_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of the sequences in each row of at most `row_length` tokens."""
    rows, free = [], []
    for i in sorted(range(len(sequences)), key=lambda i: -len(sequences[i].input_ids)):
        n = len(sequences[i].input_ids)
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_length - n)
    return rows


def packed_logps(model, sequences, rows, device, bf16: bool):
    """Summed response log-probs of packed rows (no padding), through the model's own forward."""
    import contextlib

    import torch

    from iris_ref.logprobs import DEFAULT_CHUNK_SIZE, _chunk_token_logps
    from torch.utils.checkpoint import checkpoint

    totals = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for row in rows:
        ids = torch.tensor([t for i in row for t in sequences[i].input_ids], device=device)[None]
        pos = torch.tensor([j for i in row for j in range(len(sequences[i].input_ids))], device=device)[None]
        mask = torch.tensor([int(j >= sequences[i].prompt_length) for i in row
                             for j in range(len(sequences[i].input_ids))], device=device)
        # a row's first token of each sequence is a prompt token, so no target crosses a boundary
        captured = []
        hook = model.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
        with autocast:
            model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
        hook.remove()
        hidden = captured[0][0, :-1][mask[1:].bool()]
        targets = ids[0, 1:][mask[1:].bool()]
        head = model.get_output_embeddings()
        for start in range(0, len(targets), DEFAULT_CHUNK_SIZE):
            chunk = slice(start, start + DEFAULT_CHUNK_SIZE)
            with autocast:
                args = (head, hidden[chunk], targets[chunk], None, None)
                value = checkpoint(_chunk_token_logps, *args, use_reentrant=False) if torch.is_grad_enabled() else \
                    _chunk_token_logps(*args)
            totals.append(value.sum())
    return torch.stack(totals).sum()


def measure(args) -> dict:
    import torch

    from iris_ref import distributed
    from iris_ref.config import parse_config
    from iris_ref.scoring import score_sequences, token_budget_batches

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    modes = {"both": [False, True], "on": [True], "off": [False]}[getattr(args, "checkpointing", None) or
                                                                  ("on" if cuda else "both")]
    config = dataclasses.replace(
        parse_config(["--model", "bench", "--device", "cpu"]), device=args.device, bf16=cuda,
        global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
        max_length=args.max_length, max_prompt_length=args.max_prompt_length, save_minutes=1e9)
    model = build_model(args, device)
    vocab = model.config.vocab_size
    steps = args.steps + 1  # the first step is a warm-up
    n = config.global_batch_size * steps
    lengths = length_mix(n, config.max_length, config.max_prompt_length, seed=0)
    data = make_data(lengths, vocab, seed=1)
    policy = distributed.prepare_model(model)
    pad = 0
    budget = config.micro_batch_size * 2 * config.max_length * 2  # the driver's opponent-pass budget
    all_sequences = list(data.real) + list(data.synthetic)
    scores = score_sequences(policy, all_sequences, pad, token_budget=budget, bf16=cuda)
    data = dataclasses.replace(data, opponent_real=scores[:n].double(), opponent_synthetic=scores[n:].double())
    response_tokens = sum(len(s.input_ids) - s.prompt_length for s in all_sequences) / steps  # per step, on average
    all_tokens = sum(len(s.input_ids) for s in all_sequences) / steps

    result = {
        "settings": {"device": args.device, "model": args.model_config or "tiny", "steps_timed": args.steps,
                     "global_batch_size": config.global_batch_size, "micro_batch_size": config.micro_batch_size,
                     "max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
                     "bf16": cuda, "gradient_checkpointing": modes, "optimizer": config.optimizer,
                     "length_medians": MEDIANS, "length_sigmas": SIGMAS},
        "tokens_per_step": all_tokens, "response_tokens_per_step": response_tokens,
    }
    flops = model_flops(model, all_sequences) / steps if cuda else None
    for checkpointing in modes:
        training = measure_training(policy, model, data, config, device, steps, checkpointing,
                                    getattr(args, "seed_order", config.seed))
        if cuda:
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), args.peak_tflops)
            training["gpu"] = {
                "name": name, "peak_tflops": peak, "parameters": sum(p.numel() for p in model.parameters()),
                **{f"{k}_tokens_per_s": all_tokens / training[f"{k}_step_s"] for k in STEP_NAMES},
                **{f"{k}_mfu": flops / training[f"{k}_step_s"] / (peak * 1e12) for k in STEP_NAMES},
                "mfu_counts": "6*N_body*tokens + 6*V*d*response tokens + 12*L*d*sum(len^2): the training forward+"
                              "backward only (not the scoring pass, not checkpointing's recompute), for every variant"}
        result["training_checkpointed" if checkpointing else "training"] = training

    # --- the opponent pass against a packed no-grad forward --------------------------------
    batches = token_budget_batches([len(s.input_ids) for s in all_sequences], budget)
    computed = sum(len(b) * len(all_sequences[b[0]].input_ids) for b in batches)
    synchronize(args.device)
    t0 = time.perf_counter()
    score_sequences(policy, all_sequences, pad, token_budget=budget, bf16=cuda)
    synchronize(args.device)
    opponent_time = time.perf_counter() - t0
    rows = pack(all_sequences, config.max_length)
    synchronize(args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for j in range(0, len(rows), 8):
            packed_logps(model, all_sequences, rows[j:j + 8], device, cuda)
    synchronize(args.device)
    packed_time = time.perf_counter() - t0
    result["opponent_pass"] = {"padding_fraction": 1 - sum(len(s.input_ids) for s in all_sequences) / computed,
                               "ratio": packed_time / opponent_time, "seconds": opponent_time,
                               "packed_seconds": packed_time}
    result["limits"] = LIMITS
    return result


# The four steps, in the order of the first measured step (it rotates every step).
STEP_NAMES = ("iris_kept_graphs", "iris", "padded_sft", "packed_sft")
LIMITS = ("Kept graphs do the work of padded SFT, so kept_graphs_ratio_to_padded_sft measures what IRIS adds: the "
          "objective on the gathered log-probs (a few vectors), its all_gather (none in one process), one "
          "autograd.backward through all graphs instead of one per micro-batch, and holding every micro-batch's graph "
          "at once. On CPU the last is the only visible cost: glibc returns the kept graphs' memory to the kernel "
          "after each step and maps it again in the next (minor_page_faults_per_step; with gradient checkpointing "
          "the graphs are small). The chunked LM head is recomputed in every variant. The scoring pass costs one "
          "forward more (ratio_to_padded_sft). Padding is the same in all padded variants; packed SFT removes it, "
          "and on CPU pays full-row attention under its block mask.")


def measure_training(policy, model, data, config, device, steps: int, checkpointing: bool, seed_order: int) -> dict:
    """The four steps on the same global batches (see the module docstring), with or without checkpointing."""
    import torch

    from iris_ref import trainer
    from iris_ref.objectives import iris_loss

    cuda, pad = device.type == "cuda", 0
    objective = functools.partial(iris_loss, alpha=2.0, beta=0.1)
    optimizer = trainer.make_optimizer(policy, config.optimizer, 1e-7, 0.0)
    G, accumulation = config.global_batch_size, config.global_batch_size // config.micro_batch_size
    order = torch.randperm(G * steps, generator=torch.Generator().manual_seed(seed_order)).tolist()
    seconds = dict.fromkeys(STEP_NAMES, 0.0)
    peaks = dict.fromkeys(STEP_NAMES, 0.0)
    faults = dict.fromkeys(STEP_NAMES, 0)  # minor page faults (CPU): fresh memory the kernel had to map
    padding, estimates, auto, budgets = [], [], [], []

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def iris_step(prompts, mode):
        if mode == "never" and cuda:  # what --scoring-pass auto would decide at this step, and its budget
            batch = trainer.GlobalBatch(data, prompts, config.micro_batch_size)
            memory = trainer.step_graph_memory(policy, batch, cuda)
            auto.append(trainer.keep_graphs("auto", memory, len(batch.micro_batches), device))
            budgets.append(trainer.memory_budget(device))
        out = trainer.accumulate_gradient(policy, data, prompts, objective, config.micro_batch_size, pad, cuda, mode)
        assert out["scoring_pass"] == (mode == "always")
        padding.append(out["padding_fraction"])
        estimates.append(out["graph_memory_gib"])
        optimizer_step()

    def packed_sft_step(prompts):
        sequences = [data.real[i] for i in prompts] + [data.synthetic[i] for i in prompts]
        rows = pack(sequences, config.max_length)
        per = -(-len(rows) // accumulation)
        tokens = sum(len(s.input_ids) - s.prompt_length for s in sequences)
        for j in range(0, len(rows), per):
            (-packed_logps(model, sequences, rows[j:j + per], device, cuda) / tokens).backward()
        optimizer_step()

    def padded_sft_step(prompts):
        sft = trainer.TrainingData([data.real[i] for i in prompts] + [data.synthetic[i] for i in prompts])
        trainer.accumulate_gradient(policy, sft, list(range(2 * G)), None, 2 * config.micro_batch_size, pad, cuda)
        optimizer_step()

    variants = {"iris_kept_graphs": functools.partial(iris_step, mode="never"),
                "iris": functools.partial(iris_step, mode="always"),
                "padded_sft": padded_sft_step, "packed_sft": packed_sft_step}
    names = list(STEP_NAMES)
    with trainer.training_mode(policy, checkpointing):
        for step in range(steps):
            prompts = order[step * G:(step + 1) * G]
            for name in names[step % 4:] + names[:step % 4]:
                synchronize(str(device))
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    start = torch.cuda.memory_allocated(device)
                t0, faults0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                variants[name](prompts)
                synchronize(str(device))
                if step:  # the first step of each is a warm-up
                    seconds[name] += time.perf_counter() - t0
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
                if cuda:
                    peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated(device) - start) / 2**30)
    timed = steps - 1
    s = {k: seconds[k] / timed for k in STEP_NAMES}
    out = {"padding_fraction": sum(padding) / len(padding), "ratio": s["packed_sft"] / s["iris"],
           "ratio_to_padded_sft": s["padded_sft"] / s["iris"], "iris_step_s": s["iris"],
           "packed_sft_step_s": s["packed_sft"], "padded_sft_step_s": s["padded_sft"],
           "kept_graphs_ratio": s["packed_sft"] / s["iris_kept_graphs"],
           "kept_graphs_ratio_to_padded_sft": s["padded_sft"] / s["iris_kept_graphs"],
           "kept_graphs_speedup": s["iris"] / s["iris_kept_graphs"], "iris_kept_graphs_step_s": s["iris_kept_graphs"],
           "kept_graphs_estimate_gib": max(estimates),
           "minor_page_faults_per_step": {k: faults[k] / timed for k in STEP_NAMES}}
    if cuda:
        out.update(peak_memory_above_step_start_gib=peaks, auto_keeps_graphs=auto,
                   auto_budget_gib=[b / 2**30 for b in budgets])
    return out


def model_flops(model, sequences) -> float:
    """Model FLOPs of one forward+backward over `sequences` (PaLM's appendix B accounting, a
    multiply-add = 2 FLOPs, backward = 2 x forward): 6·N_body per token, 6·V·d per scored
    (response) token for the LM head, which the chunked log-probs apply only there, and
    12·L·d·T per token of a length-T sequence for attention scores and values. Neither the
    scoring pass nor checkpointing's recompute is counted: they are work, not model FLOPs."""
    params = sum(p.numel() for p in model.parameters())
    vocab, d, layers = model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers
    body = params - vocab * d  # the tied embedding / LM head matrix is counted through the head term
    tokens = sum(len(s.input_ids) for s in sequences)
    scored = sum(len(s.input_ids) - s.prompt_length for s in sequences)
    attention = 12 * layers * d * sum(len(s.input_ids) ** 2 for s in sequences)
    return 6.0 * body * tokens + 6.0 * vocab * d * scored + attention


def build_model(args, device):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if args.model_config:
        config = Qwen2Config(**json.loads(Path(args.model_config).read_text()))
        with torch.device(device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return model
    from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer

    return build_tiny_model(build_tiny_tokenizer(), seed=0).to(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-config", default=None, help="Qwen2 config JSON (random weights); default: the tiny model")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default=None,
                        help="gradient checkpointing of the training steps (default: both on CPU, on with CUDA)")
    parser.add_argument("--seed-order", type=int, default=0, help="seed of the global batches' draw")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of an unknown GPU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="results name (default: throughput, or gpu_throughput on CUDA)")
    args = parser.parse_args(argv)
    set_cpu_threads(args.threads)
    result = measure(args)
    name = args.out or ("gpu_throughput" if args.device.startswith("cuda") else "throughput")
    malloc = "".join(f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))  # glibc tuning
    path = write_results(name, {"command": malloc + "python bench/throughput.py " + " ".join(argv or sys.argv[1:]),
                                **result})
    for key in ("training", "training_checkpointed"):
        if key in result:
            t = result[key]
            print(f"training ({'with' if key.endswith('checkpointed') else 'without'} checkpointing): padding "
                  f"{t['padding_fraction']:.3f}; IRIS / padded SFT: kept graphs {t['kept_graphs_ratio_to_padded_sft']:.3f}, "
                  f"scoring pass {t['ratio_to_padded_sft']:.3f}; / packed SFT: {t['kept_graphs_ratio']:.3f}, {t['ratio']:.3f}")
            if "gpu" in t:
                g = t["gpu"]
                print(f"gpu: IRIS kept graphs {g['iris_kept_graphs_tokens_per_s']:,.0f} tokens/s, MFU "
                      f"{g['iris_kept_graphs_mfu']:.3f}; scoring pass {g['iris_tokens_per_s']:,.0f} tokens/s, MFU "
                      f"{g['iris_mfu']:.3f}; packed SFT MFU {g['packed_sft_mfu']:.3f}; peak above step start: kept "
                      f"graphs {t['peak_memory_above_step_start_gib']['iris_kept_graphs']:.1f} GiB (estimate "
                      f"{t['kept_graphs_estimate_gib']:.1f}), scoring pass "
                      f"{t['peak_memory_above_step_start_gib']['iris']:.1f} GiB; auto keeps graphs on "
                      f"{sum(t['auto_keeps_graphs'])}/{len(t['auto_keeps_graphs'])} steps")
    o = result["opponent_pass"]
    print(f"opponent pass: padding {o['padding_fraction']:.3f}, ratio {o['ratio']:.3f}  ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
