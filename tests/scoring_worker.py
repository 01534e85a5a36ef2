"""Workers for tests/test_scoring_pass.py: kept graphs against the scoring pass, in fresh processes.

    python tests/scoring_worker.py --strategy none --micro 2 --first always --second never --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/scoring_worker.py --strategy fsdp --micro 2 ... --out DIR

`main`: the float64 tiny model trains for 4 IRIS optimizer steps (16 prompts, K = 1, global
batch 8 = micro-batch x accumulation x ranks), stopping after step 2 and resuming from the saved
trainer state; `--first` and `--second` set `scoring_pass` for the two calls (the option may
change on resume). Rank 0 writes DIR/result.json (per-step records) and DIR/weights.pt.

`measure_memory` (through `bench.common.run_isolated`, whose glibc settings make the resident
set follow live tensor memory): the resident memory that a step's kept graphs hold, and the
step's peak, against `trainer.graph_memory`'s estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from iris_ref import distributed, trainer  # noqa: E402
from iris_ref.config import parse_config  # noqa: E402
from iris_ref.data import EncodedSequence  # noqa: E402
from iris_ref.scoring import score_sequences  # noqa: E402
from iris_ref.objectives import iris_loss  # noqa: E402
from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402

GLOBAL_BATCH, NUM_PROMPTS = 8, 16


def random_sequences(vocab: int, n: int, seed: int, prompt=(3, 9), response=(2, 10)) -> list[EncodedSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = int(torch.randint(*prompt, (1,), generator=g)), int(torch.randint(*response, (1,), generator=g))
        out.append(EncodedSequence(torch.randint(5, vocab, (p + r,), generator=g).tolist(), p))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["none", "ddp", "fsdp"], required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--first", choices=trainer.SCORING_PASS_MODES, required=True)
    parser.add_argument("--second", choices=trainer.SCORING_PASS_MODES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)  # identical kernels (and rounding) whatever the number of ranks
    info = distributed.init_distributed("cpu")
    tokenizer = build_tiny_tokenizer()
    policy = distributed.prepare_model(build_tiny_model(tokenizer, seed=0).double(), strategy=opts.strategy)
    real = random_sequences(len(tokenizer), NUM_PROMPTS, 1)
    synthetic = random_sequences(len(tokenizer), NUM_PROMPTS, 2)
    scores = score_sequences(policy, real + synthetic, tokenizer.pad_token_id, token_budget=40).double()
    noise = torch.randn(2, NUM_PROMPTS, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2.0
    data = trainer.TrainingData(real, synthetic, scores[:NUM_PROMPTS] + noise[0], scores[NUM_PROMPTS:] + noise[1])
    config = dataclasses.replace(parse_config([]), optimizer="adamw", warmup_ratio=0.0, global_batch_size=GLOBAL_BATCH,
                                 micro_batch_size=opts.micro, save_steps=1, seed=0)
    records: list[dict] = []
    common = dict(pad_token_id=tokenizer.pad_token_id, epochs=2, learning_rate=1e-3, state_dir=opts.out / "state",
                  log=records.append, fingerprint={"loss": "iris"})
    objective = functools.partial(iris_loss, alpha=2.0, beta=0.5)
    trainer.train(policy, data, objective, dataclasses.replace(config, scoring_pass=opts.first), max_steps=2, **common)
    summary = trainer.train(policy, data, objective, dataclasses.replace(config, scoring_pass=opts.second), **common)
    weights = distributed.full_model_state_dict(policy)
    if distributed.is_main_process():
        (opts.out / "result.json").write_text(json.dumps({
            "world_size": info.world_size, "resumed_from_step": summary["resumed_from_step"], "records": records}))
        torch.save(weights, opts.out / "weights.pt")
    distributed.teardown_distributed()


def measure_memory(checkpointing: bool) -> dict:
    """One IRIS step with kept graphs on a float32 Qwen2 (hidden 256, 4 layers, MLP 704): the
    resident memory held once every micro-batch's graph is kept (before the backward), and the
    step's peak, both above the resident set at its start, with the estimates of both."""
    from bench.common import PeakMemory, build_qwen2

    torch.set_num_threads(1)
    model = build_qwen2(2048, 256, 4, 704, 1024, num_heads=4, num_kv_heads=2, seed=0)
    real = random_sequences(2048, 8, 1, prompt=(10, 40), response=(60, 160))
    synthetic = random_sequences(2048, 8, 2, prompt=(10, 40), response=(60, 160))
    data = trainer.TrainingData(real, synthetic, torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    objective = functools.partial(iris_loss, alpha=2.0, beta=0.1)
    policy = distributed.prepare_model(model)
    prompts = list(range(8))

    def resident() -> int:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024

    with trainer.training_mode(policy, checkpointing):
        # warm-up: the one-time allocations of a first forward and backward
        trainer.accumulate_gradient(policy, data, prompts, objective, 2, 0, scoring_pass="never")
        policy.zero_grad(set_to_none=True)
        batch = trainer.GlobalBatch(data, prompts, 2)
        estimate = trainer.step_graph_memory(policy, batch, bf16=False)
        before = resident()
        local = trainer.forward_share(policy, batch, 0, False, keep_graphs=True)
        kept = resident() - before
        del local
        policy.zero_grad(set_to_none=True)
        with PeakMemory("cpu") as peak:
            out = trainer.accumulate_gradient(policy, data, prompts, objective, 2, 0, scoring_pass="never")
    return {"kept": kept, "kept_estimate": estimate.kept, "peak": peak.peak_bytes, "peak_estimate": estimate.total,
            "method": peak.method, "shapes": batch.shapes(), "scoring_pass": out["scoring_pass"]}


if __name__ == "__main__":
    main()
