"""Regenerate the toy task pack's data from the embedded toy task's held-out split.

    python eval/tasks/toy/make_toy_data.py

* ``toy_gen.jsonl``: every held-out prompt with ALL its valid answers (from
  ``iris_ref.tiny.toy_valid_answers``); a greedy answer is right if it is any of them.
* ``toy_mc.jsonl``: the same prompts with four choices, the held-out row's own annotated
  answer and three invalid answers of the same surface form (digit pairs with another sum,
  letters outside the range, numbers of the wrong parity or outside the range), shuffled.

Seeded, so the files are reproducible byte for byte.
"""

from __future__ import annotations

import json
import random
import re
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from iris_ref.tiny import TOY_HELDOUT_PATH, toy_is_correct, toy_valid_answers  # noqa: E402

SEED = 4321
NUM_DISTRACTORS = 3


def _candidates(prompt: str) -> list[str]:
    """Answers of the prompt's surface form, valid or not (the distractor pool)."""
    if prompt.startswith("Give two digits"):
        return [f"{a}+{b}" for a in range(10) for b in range(10)]
    if prompt.startswith("Name a letter"):
        return list(string.ascii_lowercase)
    low, high = map(int, re.findall(r"\d+", prompt))
    return [str(n) for n in range(max(0, low - 6), high + 7)]


def build_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    mc_rows, gen_rows = [], []
    for line in TOY_HELDOUT_PATH.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt = row["messages"][0]["content"]
        annotated = row["messages"][-1]["content"]
        gen_rows.append({"question": prompt, "answers": toy_valid_answers(prompt)})
        invalid = [c for c in _candidates(prompt) if not toy_is_correct(prompt, c)]
        choices = [annotated, *rng.sample(invalid, NUM_DISTRACTORS)]
        rng.shuffle(choices)
        mc_rows.append({"question": prompt, "choices": choices, "answer": choices.index(annotated)})
    return mc_rows, gen_rows


def main() -> None:
    mc_rows, gen_rows = build_rows()
    for name, rows in (("toy_mc.jsonl", mc_rows), ("toy_gen.jsonl", gen_rows)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {HERE / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
