"""Held-out evaluation of one model: what SFT optimises, and what generation looks like.

- `heldout_nll`: mean negative log-likelihood per response token of the annotated held-out
  responses (total NLL / total response tokens, eos included), the SFT objective itself.
- `heldout_accuracy`: greedy exact-match accuracy (`tiny.toy_is_correct`), toy task only.
- `heldout_sampled_accuracy`: accuracy of one response sampled at the run's temperature and
  top_p per prompt (seeded), toy task only.
- `heldout_correct_mass`: the model's exact probability of producing a valid answer (the sum,
  over the valid answers, of p(answer + eos | prompt)): the expected sampled accuracy at
  temperature 1 without sampling noise. Toy task only.
- `heldout_answer_tv`: the total-variation distance between the model's answer distribution
  and the data's (uniform over the valid answers, `tiny.toy_valid_answers`), computed exactly
  from the same sequence probabilities (all invalid outputs lumped into one outcome), averaged
  over prompts. Toy task only. This is the generation-side measure DESIGN.md asks for: a model
  that always gives one valid answer has accuracy 1 but TV up to 1 - 1/K.

The generation and log-prob work is passed in (`generate`, `logprobs`) so that the driver's
rank-splitting versions are used under torchrun.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


def _user_text(prompt_messages: list[dict]) -> str:
    return "\n".join(m.get("content", "") for m in prompt_messages if m.get("role") == "user")


def evaluate(policy, tokenizer, examples, *, config, device, toy: bool, generate: Callable, logprobs: Callable) -> dict[str, Any]:
    """Held-out metrics of `policy` (a prepared model) on `examples` (list of data.Example)."""
    from iris_ref import data
    from iris_ref.distributed import unwrap_model

    was_training = policy.training
    policy.eval()
    try:
        pairs, tokens = [], []
        for ex in examples:
            seq = data.encode_pair(tokenizer, ex.prompt_messages, ex.response, config.max_length, config.max_prompt_length)
            if seq is not None:
                pairs.append((seq, None))
                tokens.append(len(seq.input_ids) - seq.prompt_length)
        out: dict[str, Any] = {"heldout_rows": len(pairs)}
        if pairs:
            real, _ = logprobs(policy, pairs, tokenizer.pad_token_id, config.micro_batch_size, config.bf16)
            out["heldout_nll"] = float(-real.double().sum() / sum(tokens))
        if not toy:
            return out
        from iris_ref import tiny

        prompts = [ex.prompt_messages for ex in examples]
        texts = [_user_text(p) for p in prompts]
        model = unwrap_model(policy)
        greedy, _ = generate(model, tokenizer, prompts, config=config, seed=config.seed + 7, temperature=0.0,
                          device=device, max_new_tokens=config.max_new_tokens)
        sampled, _ = generate(model, tokenizer, prompts, config=config, seed=config.seed + 11,
                           temperature=config.temperature, device=device, max_new_tokens=config.max_new_tokens)
        out["heldout_accuracy"] = float(np.mean([tiny.toy_is_correct(x, y) for x, y in zip(texts, greedy)]))
        out["heldout_sampled_accuracy"] = float(np.mean([tiny.toy_is_correct(x, y) for x, y in zip(texts, sampled)]))

        # Exact answer distribution over the valid answers of each prompt.
        answer_pairs, owners, sizes = [], [], []
        for i, (ex, text) in enumerate(zip(examples, texts)):
            answers = tiny.toy_valid_answers(text)
            sizes.append(len(answers))
            for answer in answers:
                seq = data.encode_pair(tokenizer, ex.prompt_messages, answer, config.max_length, config.max_prompt_length)
                if seq is not None:
                    answer_pairs.append((seq, None))
                    owners.append(i)
        logp, _ = logprobs(policy, answer_pairs, tokenizer.pad_token_id, config.micro_batch_size, config.bf16)
        probs = torch.exp(logp.double()).numpy()
        owners_arr = np.asarray(owners)
        masses, tvs = [], []
        for i, k in enumerate(sizes):
            p = probs[owners_arr == i]
            mass = float(p.sum())
            masses.append(mass)
            tvs.append(0.5 * (float(np.abs(p - 1.0 / k).sum()) + max(0.0, 1.0 - mass)))
        out["heldout_correct_mass"] = float(np.mean(masses))
        out["heldout_answer_tv"] = float(np.mean(tvs))
        out["greedy_samples"] = [{"prompt": x, "response": y} for x, y in list(zip(texts, greedy))[:5]]
        return out
    finally:
        policy.train(was_training)
