"""vLLM against transformers generation on one GPU, through the project's own `generation.generate`.

    python bench/gpu_generation.py            # writes bench/results/gpu_generation.json (CUDA only)

A random-weight model of the Qwen2.5-3B shape (`bench/configs/qwen2.5-3b-shaped.json`) is
saved once in bf16 with the tiny tokenizer (nothing is downloaded), then the same prompts are
generated from that checkpoint path with `backend="hf"` (length-sorted static batches, bf16,
KV cache) and with `backend="vllm"` (a fresh engine, seeded, `max_model_len` = the run's
1024, torn down afterwards), as a self-play iteration does. A random model rarely emits a stop
token, so nearly every response runs to `max_new_tokens`: both backends do the same work.
tokens/s counts generated token ids; vLLM's time includes its engine start-up (which an
iteration pays), and its start-up alone is reported beside it.
Without CUDA: one line, exit 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "qwen2.5-3b-shaped.json"


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_generation: no CUDA device, nothing measured")
        return 0
    from transformers import AutoModelForCausalLM, Qwen2Config

    from iris_ref import generation
    from iris_ref.tiny import TOY_TRAIN_PATH, build_tiny_tokenizer
    from iris_ref.data import load_examples

    tokenizer = build_tiny_tokenizer()
    examples, _ = load_examples(str(TOY_TRAIN_PATH), num_samples=args.prompts, seed=0)
    prompts = [ex.prompt_messages for ex in examples]
    result = {"settings": vars(args), "model": str(CONFIG)}
    with tempfile.TemporaryDirectory() as tmp:
        config = Qwen2Config(**json.loads(CONFIG.read_text()))
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()
        ok, reason = generation.vllm_available()
        for backend in ("hf", "vllm") if ok else ("hf",):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = generation.generate(tmp, tokenizer, prompts, max_new_tokens=args.max_new_tokens, seed=0,
                                      batch_size=args.batch_size, backend=backend, device="cuda",
                                      max_model_len=1024, desc=f"{backend} generation")
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            tokens = sum(len(g.token_ids) for responses in out for g in responses)
            result[backend] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}
        if ok:
            result["vllm_over_hf"] = result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
        else:
            result["vllm"] = f"not measured: {reason}"
    write_results("gpu_generation", result)
    line = f"generation: transformers {result['hf']['tokens_per_s']:,.0f} tokens/s"
    if ok:
        line += f", vLLM {result['vllm']['tokens_per_s']:,.0f} tokens/s (x{result['vllm_over_hf']:.1f}, start-up included)"
    else:
        line += f"; vLLM not measured ({reason})"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
