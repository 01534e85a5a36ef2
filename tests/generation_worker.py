"""One rank of tests/test_generation.py's torchrun run: generation split over gloo ranks on CPU.

Writes ``<out>/rank<r>.json`` with this rank's view of the results (every rank gets all of
them) of two calls: from the checkpoint path (plain), and from an in-memory model with
``synced_gpus=True``, counting the model's forward calls (equal on every rank when the ranks
step together: the dummy batches pad the rank with fewer batches).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [[{"role": "user", "content": "x" * (1 + (5 * i) % 11)}] for i in range(7)]
# 7 prompts x 2 responses = 14 sequences in batches of 3: 5 batches, 3 on rank 0 and 2 on rank 1.
SETTINGS = {"num_responses": 2, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 5, "batch_size": 3,
            "backend": "hf"}


def as_json(outputs) -> list:
    return [[[g.token_ids, g.text, g.finished] for g in responses] for responses in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iris_ref import distributed
    from iris_ref.generation import generate

    # A short collective timeout: a rank left waiting (ranks out of step) fails in seconds, not hangs.
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    info = distributed.init_distributed("cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    plain = generate(args.checkpoint, tokenizer, PROMPTS, **SETTINGS)

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    forwards = [0]
    model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    synced = generate(model, tokenizer, PROMPTS, synced_gpus=True, **SETTINGS)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(
        {"world_size": info.world_size, "plain": as_json(plain), "synced": as_json(synced), "forwards": forwards[0]}))
    distributed.teardown_distributed()


if __name__ == "__main__":
    main()
