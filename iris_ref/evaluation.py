"""Held-out evaluation of one model: what SFT optimises, and what generation looks like.

- `heldout_nll`: mean negative log-likelihood per response token of the annotated held-out
  responses (total NLL / total response tokens, end of turn included), SFT's own objective.
- On the toy tasks (every held-out prompt has an exact checker, `tiny.toy_valid_answers`):
  * `heldout_accuracy`: greedy exact-match accuracy;
  * `heldout_sampled_accuracy`: accuracy of one response per prompt sampled at the run's
    temperature and top_p (seeded);
  * `heldout_correct_mass`: the model's exact probability of a valid answer (the sum over the
    valid answers of p(answer + end of turn | prompt)), the expected sampled accuracy at
    temperature 1 without sampling noise;
  * `heldout_answer_tv`: the total-variation distance between the model's answer
    distribution and the data's (uniform over the valid answers), exact from the same
    probabilities (every invalid output lumped into one outcome), averaged over prompts. A
    model that always gives one valid answer has accuracy 1 but TV up to 1 - 1/K.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from iris_ref import data, distributed, generation
from iris_ref.scoring import score_sequences


def _user_text(prompt_messages: list[dict]) -> str:
    return "\n".join(m.get("content", "") for m in prompt_messages if m.get("role") == "user")


def is_toy_task(examples) -> bool:
    """True when every held-out prompt belongs to a toy task, whose answers can be checked exactly."""
    from iris_ref import tiny

    if not examples:
        return False
    try:
        for example in examples:
            tiny.toy_valid_answers(_user_text(example.prompt_messages))
    except ValueError:
        return False
    return True


def _token_budget(config) -> int:
    return config.micro_batch_size * 2 * config.max_length


def _encoded(chat, examples, config) -> list:
    """The held-out responses as trained on (data.encode_pair: the run's one rule and budgets)."""
    return data.encode_examples(chat, examples, config.max_length, config.max_prompt_length, config.max_new_tokens)[1]


def heldout_nll(policy, chat, examples, config) -> float:
    """Mean NLL per response token of the annotated held-out responses."""
    sequences = _encoded(chat, examples, config)
    logps = score_sequences(policy, sequences, chat.tokenizer.pad_token_id, token_budget=_token_budget(config),
                            bf16=config.bf16)
    return float(-logps.double().sum() / sum(len(s.input_ids) - s.prompt_length for s in sequences))


def evaluate(policy, chat, examples, config) -> dict[str, Any]:
    """Held-out metrics of `policy` (from `distributed.prepare_model`) on `examples` (data.Example);
    `chat` is the run's `chat.ChatFormat`."""
    sequences = _encoded(chat, examples, config)
    out: dict[str, Any] = {"heldout_rows": len(sequences)}
    if sequences:
        out["heldout_nll"] = heldout_nll(policy, chat, examples, config)
    if not is_toy_task(examples):
        return out
    from iris_ref import tiny

    prompts = [ex.prompt_messages for ex in examples]
    texts = [_user_text(p) for p in prompts]
    model = distributed.unwrap_model(policy)
    sharded = distributed.parallel_strategy(policy) == "fsdp"  # every forward is collective

    def sample(temperature: float, seed: int) -> list[str]:
        budgets = [data.response_budget(len(chat.prompt_ids(p)), config.max_length, config.max_new_tokens)
                   for p in prompts]
        outputs = generation.generate(model, chat, prompts, max_new_tokens=budgets,
                                      temperature=temperature, top_p=config.top_p, seed=seed,
                                      batch_size=config.generation_batch_size, backend="hf", synced_gpus=sharded,
                                      desc="held-out generation")
        return [responses[0].text for responses in outputs]

    greedy, sampled = sample(0.0, config.seed + 7), sample(config.temperature, config.seed + 11)
    out["heldout_accuracy"] = float(np.mean([tiny.toy_is_correct(x, y) for x, y in zip(texts, greedy)]))
    out["heldout_sampled_accuracy"] = float(np.mean([tiny.toy_is_correct(x, y) for x, y in zip(texts, sampled)]))

    # The exact answer distribution over each prompt's valid answers.
    answers, owners, sizes = [], [], []
    for i, (ex, text) in enumerate(zip(examples, texts)):
        valid = tiny.toy_valid_answers(text)
        sizes.append(len(valid))
        for answer in valid:
            seq, _ = data.encode_pair(chat, ex.prompt_messages, answer, config.max_length, config.max_prompt_length,
                                      config.max_new_tokens)
            if seq is not None:
                answers.append(seq)
                owners.append(i)
    probs = torch.exp(score_sequences(policy, answers, chat.tokenizer.pad_token_id, token_budget=_token_budget(config),
                                      bf16=config.bf16).double()).numpy()
    owners_arr = np.asarray(owners)
    masses, tvs = [], []
    for i, k in enumerate(sizes):
        p = probs[owners_arr == i]
        masses.append(float(p.sum()))
        tvs.append(0.5 * (float(np.abs(p - 1.0 / k).sum()) + max(0.0, 1.0 - float(p.sum()))))
    out["heldout_correct_mass"] = float(np.mean(masses))
    out["heldout_answer_tv"] = float(np.mean(tvs))
    out["greedy_samples"] = [{"prompt": x, "response": y} for x, y in list(zip(texts, greedy))[:5]]
    return out
