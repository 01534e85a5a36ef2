"""Worker for tests/test_distributed.py: a few IRIS steps of the tiny model, one or two ranks.

    python tests/dist_worker.py --strategy none --micro 2 --out DIR                  # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py --strategy ddp --micro 2 --out DIR

Every run trains the same float64 tiny model on the same 16 random pairs with global batch 8
(micro-batch x accumulation x world) for 4 optimizer steps, stopping after 2 steps and
resuming from the saved trainer state (so the distributed save/load path runs too), then
writes ``DIR/result.json`` (per-step metrics, opponent log-probs) and ``DIR/checkpoint``
(one full Hugging Face folder, written by rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from iris_ref import distributed as dist_utils  # noqa: E402
from iris_ref import trainer  # noqa: E402
from iris_ref.data import EncodedSequence  # noqa: E402
from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402

GLOBAL_BATCH = 8
NUM_PAIRS = 16


def random_pairs(vocab: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def sequence():
        prompt = int(torch.randint(3, 9, (1,), generator=g))
        response = int(torch.randint(2, 10, (1,), generator=g))
        return EncodedSequence(torch.randint(5, vocab, (prompt + response,), generator=g).tolist(), prompt)

    return [(sequence(), sequence()) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["none", "ddp", "fsdp"], required=True)
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    # One thread per process: identical kernels (and rounding) whatever the number of ranks.
    torch.set_num_threads(1)
    info = dist_utils.init_distributed("cpu")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).double()
    policy = dist_utils.prepare_model(model, strategy=opts.strategy)
    assert dist_utils.parallel_strategy(policy) == opts.strategy

    pairs = random_pairs(len(tokenizer), NUM_PAIRS, seed=1)
    # Opponent log-probs scored across ranks (uneven shares: 16 pairs + 1 extra), then perturbed
    # so that IRIS's weights are far from uniform from the first step.
    extra = random_pairs(len(tokenizer), 1, seed=2)
    real, synthetic = trainer.compute_logprobs(policy, pairs + extra, tokenizer.pad_token_id, 3, split_across_ranks=True)
    noise = torch.randn(2, NUM_PAIRS, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2.0
    opp_real, opp_syn = real[:NUM_PAIRS].double() + noise[0], synthetic[:NUM_PAIRS].double() + noise[1]

    args = trainer.TrainingArgs(
        loss="iris", beta=0.5, optimizer="adamw", learning_rate=1e-3, warmup_ratio=0.0, epochs=2,
        global_batch_size=GLOBAL_BATCH, micro_batch_size=opts.micro, save_steps=1, seed=0, progress=False,
    )
    records: list[dict] = []
    state_dir = opts.out / "state"
    trainer.train_iteration(policy, pairs, opp_real, opp_syn, alpha=2.0, pad_token_id=tokenizer.pad_token_id,
                            args=trainer.TrainingArgs(**{**args.__dict__, "max_steps": 2}),
                            state_dir=state_dir, log_fn=records.append)
    summary = trainer.train_iteration(policy, pairs, opp_real, opp_syn, alpha=2.0, pad_token_id=tokenizer.pad_token_id,
                                      args=args, state_dir=state_dir, log_fn=records.append)
    dist_utils.save_full_checkpoint(policy, opts.out / "checkpoint", tokenizer=tokenizer)
    if dist_utils.is_main_process():
        result = {
            "world_size": info.world_size,
            "resumed_from_step": summary["resumed_from_step"],
            "records": records,
            "opponent_real": real.tolist(),
            "opponent_synthetic": synthetic.tolist(),
        }
        (opts.out / "result.json").write_text(json.dumps(result))
    dist_utils.teardown_distributed()


if __name__ == "__main__":
    main()
