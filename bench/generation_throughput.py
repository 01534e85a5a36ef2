"""Generation throughput (tokens/s) of the transformers backend across batch sizes.

What runs: ``iris_ref.generation.generate_responses`` with ``backend="hf"`` (batched, left
padding, KV cache, seeded sampling at temperature 1.0), on the embedded default's tiny random
Qwen2 model and tokenizer (``iris_ref.tiny``), for the same 64 toy prompts at every batch size
in (1, 4, 16, 64), ``max_new_tokens`` 32. The batch sizes are interleaved in ABBA order and
repeated; the median time of each is reported.

Tokens counted: exactly the tokens the model generated, read from the output of
``model.generate`` (wrapped on the model instance for the benchmark): each row's new tokens
up to and including its first stop token, padding after a stop excluded. (Re-encoding the
returned text would be wrong: a random model emits partial UTF-8 byte tokens whose decoded
replacement characters re-encode to three tokens each.) vLLM, which runs from a checkpoint
path in its own engine, is counted by re-encoding its responses, and says so.

With CUDA and vLLM installed, vLLM (``backend="vllm"``: a fresh engine from the saved
checkpoint, freed afterwards, engine start-up included in its time, as in a self-play
iteration) is measured against transformers on the GPU at batch size 64. Absolute tokens/s
are only meaningful on a dedicated machine; on the shared 2-core CPU here, compare batch sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import alternate, median, set_cpu_threads, write_results  # noqa: E402

NAME = "generation_throughput"
BATCH_SIZES = (1, 4, 16, 64)


def load_prompts(num_prompts: int) -> list[list[dict]]:
    from iris_ref.data import load_examples
    from iris_ref.tiny import TOY_TRAIN_PATH

    examples, _ = load_examples(str(TOY_TRAIN_PATH), num_samples=num_prompts, seed=0)
    if len(examples) < num_prompts:
        raise ValueError(f"the toy data set has only {len(examples)} usable prompts, need {num_prompts}")
    return [ex.prompt_messages for ex in examples]


class GeneratedTokenCounter:
    """Wraps ``model.generate`` on one model instance and counts the tokens it generates."""

    def __init__(self, model, stop_ids):
        self.tokens = 0
        stops = set(stop_ids)
        original = model.generate

        def generate(*args, **kwargs):
            output = original(*args, **kwargs)
            prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            for row in output[:, prompt.shape[1]:].tolist():
                self.tokens += next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            return output

        model.generate = generate


def reencoded_tokens(tokenizer, responses: list[str], max_new_tokens: int) -> int:
    """Approximate count for backends whose token ids are not visible (vLLM): re-encoded text."""
    total = 0
    for text in responses:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        total += min(n + 1, max_new_tokens)  # + the stop token, when it stopped before the limit
    return total


def run_benchmark(
    batch_sizes=BATCH_SIZES,
    num_prompts: int = 64,
    max_new_tokens: int = 32,
    repeats: int = 2,
    device: str = "cpu",
    with_vllm: bool = False,
) -> dict:
    import torch

    from iris_ref.data import stop_token_ids
    from iris_ref.generation import generate_responses
    from iris_ref.tiny import build_tiny_tokenizer, save_tiny_checkpoint

    if any(b < 1 for b in batch_sizes) or num_prompts < 1 or max_new_tokens < 1:
        raise ValueError("batch sizes, num_prompts and max_new_tokens must be >= 1")
    prompts = load_prompts(num_prompts)
    tokenizer = build_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint).to(device).eval()
        counter = GeneratedTokenCounter(model, stop_token_ids(tokenizer))
        generated: dict[str, int] = {}

        def variant(batch_size: int, backend: str):
            def call():
                source = model if backend == "hf" else str(checkpoint)
                counter.tokens = 0
                with torch.no_grad():
                    responses = generate_responses(
                        source, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                        seed=0, batch_size=batch_size, backend=backend, device=device)
                name = f"{backend}_{batch_size}"
                generated[name] = counter.tokens if backend == "hf" else reencoded_tokens(
                    tokenizer, responses, max_new_tokens)
            return call

        variants = {f"hf_{b}": variant(b, "hf") for b in batch_sizes}
        if with_vllm:
            variants[f"vllm_{max(batch_sizes)}"] = variant(max(batch_sizes), "vllm")
        times = alternate(variants, repeats=repeats, warmup=0, device=device)
    rows = []
    for name, samples in times.items():
        backend, batch = name.split("_")
        tokens = generated[name]
        seconds = median(samples)
        rows.append({"backend": backend, "batch_size": int(batch), "generated_tokens": tokens,
                     "median_s": seconds, "samples_s": samples, "tokens_per_s": tokens / seconds})
    hf = {r["batch_size"]: r["tokens_per_s"] for r in rows if r["backend"] == "hf"}
    result = {
        "device": device,
        "settings": {"model": "iris_ref.tiny random Qwen2", "prompts": num_prompts, "max_new_tokens": max_new_tokens,
                     "temperature": 1.0, "top_p": 1.0, "repeats": repeats, "order": "ABBA interleaved",
                     "token_count": "hf: tokens returned by model.generate up to and including the first stop; "
                                    "vllm: responses re-encoded"},
        "rows": rows,
        "speedup_largest_vs_batch1": hf[max(batch_sizes)] / hf[min(batch_sizes)],
        "absolute_times_meaningful": str(device).startswith("cuda"),
    }
    vllm_rows = [r for r in rows if r["backend"] == "vllm"]
    if vllm_rows:
        result["vllm_vs_hf"] = vllm_rows[0]["tokens_per_s"] / hf[max(batch_sizes)]
    return result


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see bench.common.set_cpu_threads)")
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda"):
        set_cpu_threads(args.threads)
    if args.repeats < 1 or args.max_new_tokens < 1:
        parser.error("--repeats and --max-new-tokens must be >= 1")
    with_vllm = args.device.startswith("cuda") and importlib.util.find_spec("vllm") is not None
    result = run_benchmark(BATCH_SIZES, 64, args.max_new_tokens, args.repeats, args.device, with_vllm)
    write_results(NAME, result)
    for row in result["rows"]:
        print(f"{row['backend']:>4} batch {row['batch_size']:>3}: {row['tokens_per_s']:8.0f} tokens/s")
    extra = f", vLLM/transformers at batch 64: x{result['vllm_vs_hf']:.2f}" if "vllm_vs_hf" in result else ""
    tps = {r["batch_size"]: r["tokens_per_s"] for r in result["rows"] if r["backend"] == "hf"}
    print(f"generation_throughput: transformers {', '.join(f'b{b} {t:.0f}' for b, t in tps.items())} tokens/s "
          f"({args.device}); batch 64 vs 1: x{result['speedup_largest_vs_batch1']:.1f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
