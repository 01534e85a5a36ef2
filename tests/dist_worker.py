"""Worker for tests/test_distributed.py: a few IRIS steps of the tiny model, one or two ranks.

    python tests/dist_worker.py --strategy none --micro 2 --out DIR                  # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py --strategy ddp --micro 2 --out DIR

Every run trains the same float64 tiny model on the same 16 random prompts (one annotated and
one synthetic sequence each) with global batch 8
(micro-batch x accumulation x world) for 4 optimizer steps, stopping after 2 steps and
resuming from the saved trainer state (so the distributed save/load path runs too), then
writes ``DIR/result.json`` (per-step metrics, opponent log-probs) and ``DIR/checkpoint``
(one full Hugging Face folder, written by rank 0).
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

from iris_ref import distributed as dist_utils  # noqa: E402
from iris_ref import models, trainer  # noqa: E402
from iris_ref.config import parse_config  # noqa: E402
from iris_ref.data import EncodedSequence  # noqa: E402
from iris_ref.scoring import score_sequences  # noqa: E402
from iris_ref.objectives import iris_loss  # noqa: E402
from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402

GLOBAL_BATCH = 8
NUM_PROMPTS = 16


def random_sequences(vocab: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def sequence():
        prompt = int(torch.randint(3, 9, (1,), generator=g))
        response = int(torch.randint(2, 10, (1,), generator=g))
        return EncodedSequence(torch.randint(5, vocab, (prompt + response,), generator=g).tolist(), prompt)

    return [sequence() for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["none", "ddp", "fsdp"], required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", choices=["both", "first", "second"], default="both",
                        help="first: steps 1-2 and stop; second: resume the saved state and finish")
    opts = parser.parse_args()
    # One thread per process: identical kernels (and rounding) whatever the number of ranks.
    torch.set_num_threads(1)
    info = dist_utils.init_distributed("cpu")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).double()
    policy = dist_utils.prepare_model(model, strategy=opts.strategy)
    assert dist_utils.parallel_strategy(policy) == opts.strategy

    # 16 prompts + 16 synthetic responses, scored across ranks (33 sequences: uneven shares),
    # then perturbed so that IRIS's weights are far from uniform from the first step.
    real, synthetic = random_sequences(len(tokenizer), NUM_PROMPTS, 1), random_sequences(len(tokenizer), NUM_PROMPTS, 2)
    extra = random_sequences(len(tokenizer), 1, 3)
    scores = score_sequences(policy, real + synthetic + extra, tokenizer.pad_token_id, token_budget=40)
    noise = torch.randn(2, NUM_PROMPTS, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2.0
    data = trainer.TrainingData(real, synthetic, scores[:NUM_PROMPTS].double() + noise[0],
                                scores[NUM_PROMPTS:2 * NUM_PROMPTS].double() + noise[1])
    config = dataclasses.replace(parse_config([]), optimizer="adamw", warmup_ratio=0.0, global_batch_size=GLOBAL_BATCH,
                                 micro_batch_size=opts.micro, save_steps=1, seed=0)
    objective = functools.partial(iris_loss, alpha=2.0, beta=0.5)
    records: list[dict] = []
    state_dir = opts.out / "state"
    common = dict(pad_token_id=tokenizer.pad_token_id, epochs=2, learning_rate=1e-3, state_dir=state_dir,
                  log=records.append, fingerprint={"loss": "iris"})
    if opts.part in ("both", "first"):
        trainer.train(policy, data, objective, config, max_steps=2, **common)
    if opts.part == "first":
        dist_utils.teardown_distributed()
        return
    summary = trainer.train(policy, data, objective, config, **common)
    models.save_checkpoint(policy, opts.out / "checkpoint", tokenizer)
    if dist_utils.is_main_process():
        result = {
            "world_size": info.world_size,
            "resumed_from_step": summary["resumed_from_step"],
            "records": records,
            "opponent_real": scores[:NUM_PROMPTS].tolist(),
            "opponent_synthetic": scores[NUM_PROMPTS:].tolist(),
        }
        (opts.out / "result.json").write_text(json.dumps(result))
    dist_utils.teardown_distributed()


if __name__ == "__main__":
    main()
