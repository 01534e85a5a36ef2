"""`--dry-run`: what a run would do and need, from its config, model config, tokenizer and data.

Nothing heavy is loaded (the model is instantiated on the meta device to count its
parameters) and nothing is written. The disk estimate is the arithmetic of what the run
keeps: one fp32 safetensors checkpoint per model (θ_0 when warmed up, and every iteration),
at most two trainer states at once (one complete, one being written: fp32 weights plus the
optimizer's state, 1 tensor per weight for RMSprop, 2 for AdamW), and the synthetic data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from iris_ref import chat as chat_lib
from iris_ref import distributed, files, trainer
from iris_ref.data import response_budget

GB = 1e9


def count_parameters(config) -> int:
    """Parameters of the run's model, without loading (or allocating) any weight."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config_of(config), trust_remote_code=config.trust_remote_code)
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def disk_estimate(config, parameters: int, prompts: int, mean_tokens: float) -> dict[str, float]:
    """Bytes the run keeps on disk at its peak (see the module docstring); `mean_tokens`: a
    synthetic row's prompt plus its response budget (both are stored as ids, the response as text too)."""
    models = config.iters + (1 if (config.sft_epochs > 0 or config.embedded) else 0)
    optimizer_tensors = 1 if config.optimizer == "rmsprop" else 2
    state = parameters * 4 * (1 + optimizer_tensors)
    synthetic = config.iters * prompts * config.num_synthetic * (mean_tokens * 8 + 64)  # text + ids, roughly
    return {"checkpoints": models * parameters * 4.0, "trainer_state": 2.0 * state, "synthetic": float(synthetic),
            "opponent_logps": config.iters * prompts * (1 + config.num_synthetic) * 12.0}


def scoring_pass_plan(config, sequences: Sequence) -> str:
    """`--dry-run`'s line: the path the run's self-play steps will take, and why.

    Synthetic responses are not known yet: each prompt's K stand-ins are its annotated
    sequence. The steps are those of the first epoch (its seeded order, as `train` draws it),
    the budget `memory_budget` of now, less the weights and optimizer state the run will hold.
    """
    model_config = model_config_of(config)
    parameters = count_parameters(config)
    world = distributed.get_world_size()
    shards = world if config.parallel == "fsdp" and world > 1 else 1
    K, G, micro = config.num_synthetic, config.global_batch_size, config.micro_batch_size
    if G % (world * micro) or len(sequences) < G:
        return f"{config.scoring_pass}: not decided (the batch sizes do not fit {len(sequences)} prompts and {world} ranks)"
    accumulation = G // (world * micro)
    if accumulation == 1:
        return "no scoring pass: one micro-batch per rank, whose graph is the one trained on"
    stand_in = trainer.TrainingData(list(sequences), [s for s in sequences for _ in range(K)])
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(config.seed)).tolist()
    steps = range(min(len(sequences) // G, 200))
    checkpointing, cuda = bool(config.gradient_checkpointing), str(config.device).startswith("cuda")
    needs = [trainer.graph_memory(model_config, trainer.GlobalBatch(stand_in, order[k * G:(k + 1) * G], micro).shapes(),
                          checkpointing=checkpointing, compute_bytes=2 if config.bf16 and cuda else None,
                          gradient_bytes=4.0 * parameters / shards).total for k in steps]
    mean, worst = sum(needs) / len(needs), max(needs)
    need = f"{mean / 2**30:.1f} GiB mean, {worst / 2**30:.1f} max over {len(needs)} steps " \
           f"{'with' if checkpointing else 'without'} gradient checkpointing"
    if config.scoring_pass == "always":
        return f"always: a scoring pass every step (one extra forward); kept graphs would need {need}"
    if config.scoring_pass == "never":
        return f"never: graphs kept every step, at your memory risk; they need {need}"
    state = parameters * (4 + (4 if config.optimizer == "rmsprop" else 8)) / shards
    device = torch.device(config.device if cuda and torch.cuda.is_available() else "cpu")
    budget = trainer.memory_budget(device, resident=state)
    share = f"{trainer.MEMORY_SHARE[device.type]} x {'free GPU memory' if device.type == 'cuda' else 'available RAM'} " \
            f"less weights and optimizer state"
    fitting = sum(n <= budget for n in needs)
    verdict = "graphs kept, no scoring pass" if fitting == len(needs) else "a scoring pass every step" if not fitting \
        else f"graphs kept on {fitting} of {len(needs)} steps, a scoring pass on the others"
    return f"auto: {verdict}; kept graphs need {need}, budget {budget / 2**30:.1f} GiB ({share})"


def model_config_of(config):
    """The run's model config (no weights)."""
    if config.embedded:
        from iris_ref import tiny

        return tiny.tiny_config(tiny.build_tiny_tokenizer())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)


def generator_choice(config) -> str:
    from iris_ref import generation

    if config.generator == "hf":
        return "transformers (--generator hf)"
    ok, reason = generation.vllm_available()
    if ok and str(config.device).startswith("cuda"):
        return "vLLM"
    if config.generator == "vllm":
        return f"vLLM requested but unavailable ({reason})"
    return f"transformers ({'no CUDA' if ok else reason})"


def print_plan(run, verdict: str) -> None:
    """Print the plan of `run` (a `selfplay.Run` whose data is loaded)."""
    config = run.config
    parameters = count_parameters(config)
    prompts = len(run.encoded)
    steps = prompts // config.global_batch_size
    annotated = sum(len(s.input_ids) for s in run.encoded) / prompts
    prompt_tokens = sum(s.prompt_length for s in run.encoded) / prompts
    # Synthetic responses are not known yet: assume they are as long as the annotated ones.
    per_step = config.global_batch_size * (annotated + config.num_synthetic * annotated)
    budget = sum(response_budget(s.prompt_length, config.max_length, config.max_new_tokens) for s in run.encoded) / prompts
    disk = disk_estimate(config, parameters, prompts, prompt_tokens + budget)
    free = files.free_space(Path(config.output_dir)) or 0  # 0 where it cannot be read: the warning shows
    what = {"fresh": "a new run", "resume": "resume the run there", "overwrite": "delete the run there and start afresh"}
    lines = [
        "dry run: the config, the model's config and tokenizer and the data are fine; nothing was written",
        f"  output folder  {config.output_dir} ({what[verdict]})",
        f"  model          {config.model or 'tiny (embedded default)'}: {parameters / 1e9:.3f}B parameters",
        f"  data           {prompts} prompts; {len(run.heldout)} held-out rows",
        f"  SFT warm-up    {config.sft_epochs} epochs x {steps} steps" + (
            f", early stopping after {config.sft_patience} epochs without progress" if config.sft_patience else ""),
        f"  self-play      {config.iters} iterations x {config.epochs} epochs x {steps} steps = "
        f"{config.iters * config.epochs * steps} optimizer steps ({config.loss}, K = {config.num_synthetic})",
        f"  per step       {config.global_batch_size} prompts x (1 + {config.num_synthetic}) sequences, about "
        f"{per_step:,.0f} tokens (annotated: {annotated:.0f} tokens a sequence, {prompt_tokens:.0f} of them prompt)",
        f"  generator      {generator_choice(config)}",
        f"  scoring pass   {scoring_pass_plan(config, run.encoded)}",
        f"  disk at peak   {size(sum(disk.values()))}: checkpoints {size(disk['checkpoints'])}, trainer state "
        f"{size(disk['trainer_state'])} (two copies at most), synthetic data {size(disk['synthetic'])}; "
        f"{size(free)} free there",
    ]
    if free < sum(disk.values()):
        lines.append(f"  warning        {size(free)} free on the disk of {config.output_dir} is less than the "
                     f"{size(sum(disk.values()))} this run keeps at its peak: it would stop with 'no space left' "
                     "(its last good state intact); free space or choose another --output-dir")
    lines += chat_lines(run.chat, run.encoded[0])
    if distributed.is_main_process():
        print("\n".join(lines), flush=True)


def chat_lines(chat, first) -> list[str]:
    """What is trained on, token by token, so that a template problem shows before a GPU hour is
    spent: the first annotated example, its prompt/response boundary, BOS, end of turn, stops."""
    tokenizer = chat.tokenizer
    names = tokenizer.convert_ids_to_tokens

    def ids_shown(ids) -> str:
        return ", ".join(f"{name!r} ({i})" for name, i in zip(names(list(ids)), ids)) or "none"

    date = chat.date + (" (the template prints it: frozen for the run)" if chat.depends_on_date else
                        " (the template does not use it)")
    return ["  first example  the tokens trained on; | is the prompt/response boundary, [BOS] and [STOP] are marked",
            *(f"                 {line}" for line in chat_lib.show_sequence(chat, first.input_ids, first.prompt_length)),
            f"  BOS            " + (f"{ids_shown(chat.leading_ids)}, once (the tokenizer's policy)" if chat.leading_ids
                                     else "none (the tokenizer adds none)"),
            f"  end of turn    {chat.end_of_turn_text!r}; after it, not trained: {chat.after_turn_text!r}",
            f"  stop tokens    {ids_shown(chat.stop_ids)} (both generators)",
            f"  template       date {date}; options {chat.template_kwargs or 'none'}"]


def size(n_bytes: float) -> str:
    """Bytes in GB, or in MB below 1 GB (a tiny run's 0.0 GB says nothing)."""
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= GB else f"{n_bytes / 1e6:.1f} MB"
