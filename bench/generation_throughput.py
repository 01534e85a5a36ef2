"""Generation throughput (generated tokens/s) of the transformers path: new vs old, side by side.

What runs, on the embedded default's tiny random Qwen2 model and tokenizer (``iris_ref.tiny``),
all variants on the SAME prompts with the same sampling settings (temperature 1, top_p 1):

* ``new_<b>``: ``iris_ref.generation.generate(model, ..., backend="hf", batch_size=b)``: one
  global plan of length-sorted batches (longest prompt first), each seeded from (seed, batch
  index), early stop when every row has stopped. Measured at several ``b`` (the sweep).
* ``old_16`` / ``old_64``: THE OLD LOOP, copied below verbatim as ``old_generate_hf`` (the
  transformers path of ``generate_responses`` before ``generate`` replaced it, commit f2e23e1),
  with only a count of the generated tokens added: batches in data order, one seed for the whole
  call. 16 was the old function's default batch size, 64 what the driver passed.
* ``cb``: transformers' continuous batching (``model.generate_batch`` with a
  ``ContinuousBatchingConfig`` whose cache is sized to the workload: left to itself it sizes its
  paged cache from 90% of the machine's RAM on CPU, which took ~70 s to set up here for 8
  prompts), same sampling settings, seeded through its config. Only with ``--with-cb``
  (``run_benchmark(with_cb=True)``).

Workload ("a realistic mix of prompt lengths"): ``num_prompts`` toy prompts, each preceded by
filler context so that prompt lengths follow a log-normal law (median 64 tokens, sigma 0.8,
clipped to [16, 320]; the tiny model has 512 positions), shuffled, so a batch in data order mixes
short and long prompts as a real data set does. Response lengths: a random model almost never
emits a stop token, so a constant is added to the end-of-turn logit (a forward hook on the LM
head, the same for every variant): about 1 step in 25 stops, some responses run to
``max_new_tokens``. The settings record the measured prompt and response length statistics.

Tokens counted: generated tokens, each response's new tokens up to and including its stop token
(``len(Generation.token_ids)`` for the new path, the same count taken from ``model.generate``'s
output in the old loop, ``len(generated_tokens)`` for continuous batching). Timing: the
variants alternate in ABBA order, repeated, medians compared (``bench.common.alternate``);
ratios are of tokens/s measured in the same run. On the shared 2-core CPU here only the ratios
mean something.

Run: ``python bench/generation_throughput.py --with-cb`` (writes
``bench/results/generation_throughput.json``).

Measured (CPU, 1 thread, shared 2-core machine, 128 prompts of 16-324 tokens, mean response 18
tokens, 3 repeats): new_64 / old_64 x1.45, new_16 / old_16 x1.46, new_64 / old_16 x1.13. On
this CPU a smaller batch is faster (new_16 621 tokens/s, new_64 483, new_128 267): a static
batch keeps computing its finished rows until its longest response ends, and on a CPU every
row costs compute; on a GPU rows are nearly free and 64 is the better default. Continuous
batching: x0.77 of new_64, and not batch-invariant (the same 8 prompts sampled alone and among
16 others give different tokens, with the same seed), so a rank split would change the samples:
not adopted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import alternate, median, set_cpu_threads, write_results  # noqa: E402

NAME = "generation_throughput"
BATCH_SIZES = (16, 64, 128)
OLD_BATCH_SIZES = (16, 64)
STOP_LOGIT_BOOST = 3.0  # e^3 / (e^3 + 511) ~ 1/25 per step for the near-uniform random model
FILLER = ("the of and to in is that for it as with was on be by this are or at from an have not which "
          "but they you one all were can there been their more when if will would about into than").split()


def load_prompts(num_prompts: int) -> list[list[dict]]:
    from iris_ref.data import load_examples
    from iris_ref.tiny import TOY_TRAIN_PATH

    examples, _ = load_examples(str(TOY_TRAIN_PATH), num_samples=num_prompts, seed=0)
    if len(examples) < num_prompts:
        raise ValueError(f"the toy data set has only {len(examples)} usable prompts, need {num_prompts}")
    return [ex.prompt_messages for ex in examples]


def mixed_length_prompts(tokenizer, num_prompts: int, seed: int = 0, median_tokens: int = 64, sigma: float = 0.8,
                         shortest: int = 16, longest: int = 320) -> list[list[dict]]:
    """Toy prompts behind filler context, prompt lengths log-normal (see the module docstring)."""
    from iris_ref.chat import ChatFormat

    prompt_ids = ChatFormat(tokenizer).prompt_ids

    rng = random.Random(seed)
    prompts = []
    for messages in load_prompts(num_prompts):
        target = min(longest, max(shortest, int(rng.lognormvariate(math.log(median_tokens), sigma))))
        question = messages[-1]["content"]
        words: list[str] = []
        while True:
            content = (" ".join(words) + "\n" + question) if words else question
            prompt = [*messages[:-1], {"role": "user", "content": content}]
            if len(prompt_ids(prompt)) >= target:
                break
            words.extend(rng.choice(FILLER) for _ in range(max(1, (target - len(prompt_ids(prompt))) // 3)))
        prompts.append(prompt)
    rng.shuffle(prompts)
    return prompts


@contextlib.contextmanager
def stop_token_boost(model, token_id: int, boost: float):
    """Add ``boost`` to one logit of every forward (varied response lengths from a random model)."""
    import torch

    offset = torch.zeros(model.config.vocab_size)
    offset[token_id] = boost
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: output + offset.to(output.device, output.dtype))
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------
# BASELINE: the old transformers loop, copied from iris_ref/generation.py at commit f2e23e1
# (``_generate_hf`` and its helpers). Unchanged except that it also counts the tokens it
# generated (``generated``: up to and including each row's first stop token).
# ---------------------------------------------------------------------------------------


def _old_left_padded(batch_ids, pad_token_id, device):
    import torch

    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _old_cut_at_stop(new_ids, stops):
    for position, token in enumerate(new_ids):
        if token in stops:
            return new_ids[:position], True
    return new_ids, False


@contextlib.contextmanager
def _old_only_these_generation_settings(model, generation_config):
    saved = model.generation_config
    model.generation_config = generation_config
    try:
        yield
    finally:
        model.generation_config = saved


def old_generate_hf(model, tokenizer, token_ids, max_new_tokens, temperature, top_p, seed, batch_size,
                    synced_gpus=False):
    """THE OLD LOOP (baseline): returns (texts, finished, generated token count)."""
    import torch
    from transformers import GenerationConfig

    from iris_ref.chat import ChatFormat

    stops = ChatFormat(tokenizer).stop_ids
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = temperature > 0
    generation_config = GenerationConfig(
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        use_cache=True,
    )
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    responses, finished, generated = [], [], 0
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            with _old_only_these_generation_settings(model, generation_config):
                for start in range(0, len(token_ids), batch_size):
                    batch = token_ids[start: start + batch_size]
                    input_ids, attention_mask = _old_left_padded(batch, pad_token_id, device)
                    output = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                        synced_gpus=synced_gpus,
                    )
                    for row in output[:, input_ids.shape[1]:].tolist():
                        new_ids, stopped = _old_cut_at_stop(row, set(stops))
                        generated += len(new_ids) + int(stopped)  # (bench only) the stop token counts too
                        responses.append(tokenizer.decode(new_ids, skip_special_tokens=True))
                        finished.append(stopped)
    finally:
        model.train(was_training)
    return responses, finished, generated


# ----------------------------------------------------------------------- end of the baseline


def continuous_batching(model, token_ids, stops, pad_token_id, max_new_tokens, temperature, top_p, seed) -> int:
    """transformers' continuous batching on the same requests; the number of generated tokens."""
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation_config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                         max_new_tokens=max_new_tokens, eos_token_id=list(stops),
                                         pad_token_id=pad_token_id)
    page = 256
    needed = sum(math.ceil((len(ids) + max_new_tokens) / page) for ids in token_ids)
    config = ContinuousBatchingConfig(num_blocks=needed + 8, max_batch_tokens=4096, seed=seed)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        outputs = model.generate_batch(inputs=token_ids, generation_config=generation_config,
                                       continuous_batching_config=config, progress_bar=False, warmup=False)
    if len(outputs) != len(token_ids):
        raise RuntimeError(f"continuous batching returned {len(outputs)} of {len(token_ids)} results")
    return sum(len(out.generated_tokens) for out in outputs.values())


def _padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of pad positions in the prompt part of the batches (rows x longest prompt)."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1.0 - sum(lengths) / padded


def run_benchmark(batch_sizes=BATCH_SIZES, num_prompts: int = 128, max_new_tokens: int = 64, repeats: int = 3,
                  device: str = "cpu", with_cb: bool = False, old_batch_sizes=OLD_BATCH_SIZES) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from iris_ref.chat import ChatFormat
    from iris_ref.generation import generate, plan_batches
    from iris_ref.tiny import build_tiny_tokenizer, save_tiny_checkpoint

    if any(b < 1 for b in (*batch_sizes, *old_batch_sizes)) or num_prompts < 1 or max_new_tokens < 1 or repeats < 1:
        raise ValueError("batch sizes, num_prompts, max_new_tokens and repeats must be >= 1")
    tokenizer = build_tiny_tokenizer()
    prompts = mixed_length_prompts(tokenizer, num_prompts)
    chat = ChatFormat(tokenizer)
    token_ids = [chat.prompt_ids(p) for p in prompts]
    stops = chat.stop_ids
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        model = AutoModelForCausalLM.from_pretrained(checkpoint).to(device).eval()
    generated: dict[str, int] = {}
    response_lengths: list[int] = []
    reference = f"new_{64 if 64 in batch_sizes else max(batch_sizes)}"  # the default batch size

    def new(batch_size: int):
        def call():
            outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                               seed=0, batch_size=batch_size, backend="hf", desc=f"new_{batch_size}")
            lengths = [len(g.token_ids) for responses in outputs for g in responses]
            generated[f"new_{batch_size}"] = sum(lengths)
            if f"new_{batch_size}" == reference:
                response_lengths[:] = lengths
        return call

    def old(batch_size: int):
        def call():
            generated[f"old_{batch_size}"] = old_generate_hf(model, tokenizer, token_ids, max_new_tokens, 1.0, 1.0,
                                                             0, batch_size)[2]
        return call

    def cb():
        generated["cb"] = continuous_batching(model, token_ids, stops, tokenizer.pad_token_id, max_new_tokens,
                                              1.0, 1.0, 0)

    variants = {f"new_{b}": new(b) for b in batch_sizes}
    variants.update({f"old_{b}": old(b) for b in old_batch_sizes})
    if with_cb:
        variants["cb"] = cb
    with stop_token_boost(model, stops[0], STOP_LOGIT_BOOST):
        times = alternate(variants, repeats=repeats, warmup=1, device=device)

    lengths = [len(ids) for ids in token_ids]
    rows, comparison = [], []
    for name, samples in times.items():
        kind, _, size = name.partition("_")
        row = {"variant": name, "path": kind, "batch_size": int(size) if size else None,
               "generated_tokens": generated[name], "median_s": median(samples), "samples_s": samples,
               "tokens_per_s": generated[name] / median(samples)}
        if kind == "new":
            row["prompt_padding_share"] = _padding_share(
                lengths, [[p for p, _ in batch] for batch in plan_batches(lengths, 1, int(size))])
        elif kind == "old":
            b = int(size)
            row["prompt_padding_share"] = _padding_share(
                lengths, [list(range(s, min(s + b, len(lengths)))) for s in range(0, len(lengths), b)])
        (rows if kind == "new" else comparison).append(row)
    tps = {row["variant"]: row["tokens_per_s"] for row in rows + comparison}
    ratios = {}
    for b in old_batch_sizes:
        ratios[f"{reference}_over_old_{b}"] = tps[reference] / tps[f"old_{b}"]
        if f"new_{b}" in tps and f"new_{b}" != reference:
            ratios[f"new_{b}_over_old_{b}"] = tps[f"new_{b}"] / tps[f"old_{b}"]
    if with_cb:
        ratios[f"cb_over_{reference}"] = tps["cb"] / tps[reference]
        for b in old_batch_sizes:
            ratios[f"cb_over_old_{b}"] = tps["cb"] / tps[f"old_{b}"]
    return {
        "device": str(device),
        "settings": {
            "model": "iris_ref.tiny random Qwen2 (fp32)", "prompts": num_prompts, "num_responses": 1,
            "max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "repeats": repeats,
            "order": "ABBA interleaved, 1 warm-up round", "stop_logit_boost": STOP_LOGIT_BOOST,
            "prompt_tokens": {"mean": statistics.fmean(lengths), "median": statistics.median(lengths),
                              "min": min(lengths), "max": max(lengths)},
            f"response_tokens_{reference}": {"mean": statistics.fmean(response_lengths),
                                         "median": statistics.median(response_lengths),
                                         "share_cut_at_max": sum(n == max_new_tokens for n in response_lengths)
                                         / len(response_lengths)} if response_lengths else None,
            "token_count": "generated tokens up to and including each response's stop token",
        },
        "rows": rows,
        "comparison": comparison,
        "ratios": ratios,
        "absolute_times_meaningful": str(device).startswith("cuda"),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--with-cb", action="store_true", help="also time transformers' continuous batching")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see bench.common.set_cpu_threads)")
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        set_cpu_threads(args.threads)
    result = run_benchmark(BATCH_SIZES, args.num_prompts, args.max_new_tokens, args.repeats, args.device,
                           with_cb=args.with_cb)
    result["command"] = "python bench/generation_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(NAME, result)
    for row in result["rows"] + result["comparison"]:
        share = row.get("prompt_padding_share")
        print(f"{row['variant']:>8}: {row['tokens_per_s']:8.0f} tokens/s, {row['generated_tokens']} tokens"
              + (f", prompt padding {share:.0%}" if share is not None else ""))
    print("generation_throughput: " + ", ".join(f"{k} x{v:.2f}" for k, v in result["ratios"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
