"""Self-play fine-tuning with IRIS, as it runs: read `self_play_iteration` first.

    run_iris.py → selfplay.run → self_play_iteration → trainer.train → objectives.iris_loss

θ_0 is the SFT model (the given one, or the result of the SFT warm-up). Iteration t:

    prompts → synthetic = generate(θ_{t-1}) → opponent log-probs → α_t from the gap → train θ_t → save

Choices, and why:

- The opponent of iteration t is θ_{t-1} as saved on disk (`iter_{t-1}/checkpoint`, or the
  given model), identified by the SHA-256 of its weights, never by a path.
- Generation runs from that checkpoint while no other model is in memory, so vLLM gets the
  GPU to itself; afterwards the policy is loaded from the same checkpoint, and is the
  opponent until its first update (rewards are exactly 0 at the first step).
- Only one model is resident while training: the opponent enters the objective through its
  log-probs of both response sets, computed once per iteration and saved.
- Synthetic responses are scored exactly as they were sampled (their token ids, including the
  stop token the opponent emitted), never decoded and re-tokenised.
- Every step goes through `files.reuse_or_make`: a killed run, resumed, reuses whatever a
  step already finished (synthetic responses, opponent log-probs, the trainer's state), and
  an iteration marked COMPLETE is never redone.
- File writes and barriers live in `files`/`rundir`; ranks split work inside `generation`,
  `logprobs` and `trainer`. The algorithm below has no rank logic.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from iris_ref import chat as chat_lib
from iris_ref import data as data_lib
from iris_ref import distributed, files, models, preemption, rundir, train_state, trainer
from iris_ref.config import MIN_VALIDATION_ROWS, IrisConfig, is_local, parse_template_kwargs, saved_differences
from iris_ref.metrics import MetricsLog
from iris_ref.objectives import get_objective
from iris_ref.progress import Progress
from iris_ref.schedule import AlphaSchedule, per_token_scores
from iris_ref.errors import InputError, TrainingFailure


def log(message: str) -> None:
    if distributed.is_main_process():
        print(f"[iris] {message}", flush=True)


@dataclass
class Run:
    """What every iteration needs, set up (and checked) once."""

    config: IrisConfig
    dir: Path
    device: torch.device
    chat: object            # chat.ChatFormat: the one rule for prompt ids, annotated sequences and stops
    examples: list          # data.Example per prompt
    encoded: list           # data.EncodedSequence of each annotated response
    heldout: list           # data.Example of the held-out data (may be empty)
    schedule: AlphaSchedule
    validation: list        # data.Example held out of training for the warm-up's early stopping (may be empty)
    lock: Optional[rundir.RunLock] = None  # the run folder is this process's until it ends

    @property
    def tokenizer(self):
        return self.chat.tokenizer


# ----------------------------------------------------------------------------------------
# the algorithm
# ----------------------------------------------------------------------------------------
def run(config: IrisConfig) -> Optional[dict]:
    """Run (or resume) self-play; returns the summary also written to `summary.json` (None for a dry run).

    Raises InputError for bad input (before anything is written) and TrainingFailure when the
    run must stop.
    """
    with _torch_threads(config.threads):
        session = setup(config)
        if session is None:  # --dry-run
            return None
        with session.lock:
            verify_resume_point(session)
            start_model(session)
            for t in range(1, config.iters + 1):
                self_play_iteration(session, t)
            return finish(session)


def self_play_iteration(run: Run, t: int) -> None:
    """Iteration t: the opponent θ_{t-1} writes K responses per prompt; θ_t learns to tell the
    annotated responses from them. Every step reuses its artefact if a killed run made it."""
    it = rundir.iteration(run.dir, t)
    if it.complete:
        return
    if it.trained:  # a run stopped while evaluating θ_t: only that is left
        return evaluate_and_complete(run, it, load_policy(run, it.checkpoint))
    config, opponent = run.config, model_path(run, t - 1)
    started = time.time()

    # 1. synthetic responses from the opponent, saved TRL-style (prompt / chosen / rejected)
    rows = files.reuse_or_make(
        it.path / "synthetic.jsonl", lambda: generate_synthetic(run, opponent, seed=config.seed * 1000 + t),
        save=files.write_jsonl, load=files.read_jsonl, mismatch=functools.partial(_other_prompts, run), log=log)
    data, skipped, cut = encode_synthetic(run, rows)
    generation_seconds = time.time() - started

    # 2. the opponent's log-probs of both response sets, once; the policy starts as the opponent
    policy = load_policy(run, opponent)
    opponent_sha, data_sha = models.weights_sha256(policy), data_lib.sequences_sha256([*data.real, *data.synthetic])
    logps = files.reuse_or_make(
        it.path / "opponent_logps.pt", lambda: opponent_logprobs(run, policy, data, opponent_sha, data_sha),
        save=files.save_tensors, load=files.load_tensors,
        mismatch=lambda saved: _other_source(saved, opponent_sha256=opponent_sha, sequences_sha256=data_sha), log=log)
    data = replace(data, opponent_real=logps["real"], opponent_synthetic=logps["synthetic"])

    # 3. α_t from the gap between the opponent's scores of annotated and synthetic responses
    gaps = previous_gaps(run, t) + [measure_gap(run, data, logps)]
    alpha = run.schedule.alpha_for(t - 1, gaps)
    warning = run.schedule.gap_warning(gaps)
    log(f"iteration {t}: opponent {opponent} (sha256 {opponent_sha[:12]}), gap {gaps[-1]:.4f}"
        + (f", alpha {alpha:.3f}" if config.loss == "iris" else "") + (f"; warning: {warning}" if warning else ""))

    # 4. train θ_t from θ_{t-1}
    objective = make_objective(config, alpha)
    fingerprint = {"loss": config.loss, "alpha": alpha if config.loss == "iris" else None, "beta": config.beta,
                   "data_sha256": data_sha, "opponent_sha256": opponent_sha}
    result = trainer.train(policy, data, objective, config, pad_token_id=run.tokenizer.pad_token_id,
                           epochs=config.epochs, learning_rate=config.learning_rate, state_dir=it.trainer_state,
                           log=metrics_log(run, it), desc=f"iteration {t} training", fingerprint=fingerprint)

    # 5. save θ_t with its summary (a termination signal waits for both), evaluate it, mark the iteration complete
    with preemption.deferred():
        save_policy(run, policy, data, it.checkpoint, phase=f"iteration {t}")
        files.write_json(it.path / "train_summary.json", {
            **result, "iteration": t, "alpha": alpha if config.loss == "iris" else None, "gap": gaps[-1],
            "gaps": gaps, "gap_warning": warning, "opponent_sha256": opponent_sha, "skipped_prompts": skipped,
            "cut": cut, "generation_seconds": generation_seconds,
            "train_seconds": time.time() - started - generation_seconds})
    evaluate_and_complete(run, it, policy)


def start_model(run: Run) -> None:
    """θ_0 (iter_0): the SFT warm-up's result, or the given model as it is."""
    it = rundir.iteration(run.dir, 0)
    if it.complete:
        return
    config = run.config
    if it.trained:  # a run stopped while evaluating θ_0: only that is left
        policy = load_policy(run, it.checkpoint)
    elif config.sft_epochs > 0 or config.embedded:
        policy = sft_warmup(run, it)
    else:
        files.write_json(it.path / "source.json", {"model": config.model})
        policy = load_policy(run, model_path(run, 0))
    evaluate_and_complete(run, it, policy)


def sft_warmup(run: Run, it: rundir.IterationDir):
    """Supervised fine-tuning on the annotated responses, saved as iter_0/checkpoint.

    With `--sft-patience` it stops when the NLL of the validation rows (`--sft-validation-size`,
    held out of training; else the held-out data) has not improved for that many epochs and
    keeps the best epoch's model: the converged SFT start that self-play claims its gains from.
    Otherwise it trains `--sft-epochs` and keeps the last. The learning-rate schedule spans
    `--sft-epochs` either way.
    """
    config = run.config
    policy = models.new_tiny_policy(run.tokenizer, seed=config.seed, device=run.device, parallel=config.parallel) \
        if config.embedded else load_policy(run, config.model)
    data = trainer.TrainingData(real=run.encoded)
    sft_fingerprint = {"loss": "sft", "data_sha256": data_lib.sequences_sha256(run.encoded)}
    log(f"SFT warm-up: up to {config.sft_epochs} epochs on {len(run.encoded)} annotated responses")
    if config.sft_patience is None:
        result = trainer.train(policy, data, None, config, pad_token_id=run.tokenizer.pad_token_id,
                               epochs=config.sft_epochs, learning_rate=config.sft_learning_rate,
                               state_dir=it.trainer_state, log=metrics_log(run, it), desc="SFT warm-up",
                               fingerprint=sft_fingerprint)
        with preemption.deferred():
            save_policy(run, policy, data, it.checkpoint, phase="SFT warm-up")
            files.write_json(it.path / "train_summary.json", result)
        return policy
    steps_per_epoch = len(run.encoded) // config.global_batch_size
    history = it.read("sft_epochs.json") or []
    best = min(history, key=lambda e: e["heldout_nll"]) if history else None
    train_state.set_aside_if_damaged(it.trainer_state, log)  # before its step is read
    done = train_state.saved_step(it.trainer_state) or len(history) * steps_per_epoch
    with Progress(config.sft_epochs * steps_per_epoch, "SFT warm-up", unit="steps", initial=done) as progress:
        for epoch in range(len(history) + 1, config.sft_epochs + 1):  # one phase: one elapsed time, one ETA
            if best is not None and epoch - 1 - best["epoch"] >= config.sft_patience:
                break
            result = trainer.train(policy, data, None, config, pad_token_id=run.tokenizer.pad_token_id,
                                   epochs=config.sft_epochs, learning_rate=config.sft_learning_rate,
                                   state_dir=it.trainer_state, log=metrics_log(run, it),
                                   max_steps=epoch * steps_per_epoch, desc=f"SFT warm-up, epoch {epoch}",
                                   fingerprint=sft_fingerprint, progress=progress)
            nll = heldout_nll(run, policy, run.validation or run.heldout)
            history.append({"epoch": epoch, "heldout_nll": nll, "train_loss": result.get("loss")})
            if best is None or nll < best["heldout_nll"]:
                best = history[-1]
                save_policy(run, policy, data, it.checkpoint, phase=f"SFT warm-up, epoch {epoch}")
            files.write_json(it.path / "sft_epochs.json", history)
            log(f"SFT warm-up epoch {epoch}: held-out NLL {nll:.4f} (best {best['heldout_nll']:.4f} at epoch "
                f"{best['epoch']})")
    stopped_by = "patience" if len(history) < config.sft_epochs else "epoch limit"
    files.write_json(it.path / "train_summary.json", {"sft_epochs": history, "best_epoch": best["epoch"],
                                                      "stopped_by": stopped_by, "stopped_on": "validation rows"
                                                      if run.validation else "held-out data",
                                                      "total_steps": len(history) * steps_per_epoch})
    return load_policy(run, it.checkpoint)


# ----------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------
def generate_synthetic(run: Run, opponent, *, seed: int) -> list[dict]:
    """K responses per prompt from the opponent's checkpoint, one TRL-style row each (prompt-major),
    with the prompt's token ids as fed to the model and the sampled ids exactly as sampled."""
    from iris_ref import generation

    config = run.config
    models.free_memory()  # no model is alive here: the previous policy went with its iteration
    prompts = [ex.prompt_messages for ex in run.examples]
    outputs = generation.generate(
        str(opponent), run.chat, prompts, num_responses=config.num_synthetic, max_new_tokens=budgets(run, prompts),
        temperature=config.temperature, top_p=config.top_p, seed=seed, batch_size=config.generation_batch_size,
        backend=config.generator, device=str(run.device), gpu_memory_utilization=config.gpu_memory_utilization,
        max_model_len=config.max_length, trust_remote_code=config.trust_remote_code, desc="generation")
    return [{"prompt": ex.prompt_messages,
             "chosen": [{"role": "assistant", "content": ex.response}],
             "rejected": [{"role": "assistant", "content": out.text}],
             "prompt_token_ids": run.chat.prompt_ids(ex.prompt_messages),
             "rejected_token_ids": list(out.token_ids),   # exactly what the opponent sampled
             "rejected_finished": out.finished,           # False: cut at the prompt's budget
             "chosen_cut": seq.cut,                       # the annotated response was cut at the same budget
             "sample_index": k}
            for ex, seq, responses in zip(run.examples, run.encoded, outputs) for k, out in enumerate(responses)]


def budgets(run: Run, prompts: list) -> list[int]:
    """Each prompt's response budget, the one its annotated response was cut to (data.response_budget)."""
    config = run.config
    return [data_lib.response_budget(len(run.chat.prompt_ids(p)), config.max_length, config.max_new_tokens)
            for p in prompts]


def encode_synthetic(run: Run, rows: list[dict]) -> tuple[trainer.TrainingData, int, dict]:
    """Training sequences: each prompt's annotated response and its K sampled ones, token for
    token. A prompt with an empty sampled response is left out of this iteration (counted).
    Also returns how many responses of each set were cut at their budget."""
    config, K = run.config, run.config.num_synthetic
    real, synthetic, skipped = [], [], 0
    for i, seq in enumerate(run.encoded):
        sampled = [data_lib.encode_generated(run.chat, row["prompt"], row["rejected_token_ids"], config.max_length,
                                             config.max_prompt_length, config.max_new_tokens)
                   for row in rows[i * K:(i + 1) * K]]
        if any(s is None or len(s.input_ids) <= s.prompt_length for s in sampled):
            skipped += 1
            continue
        real.append(seq)
        synthetic.extend(sampled)
    if skipped:
        log(f"{skipped} prompts left out of this iteration: a sampled response had no tokens")
    if len(real) < config.global_batch_size:
        raise InputError(f"only {len(real)} prompts have usable synthetic responses, fewer than --global-batch-size "
                         f"{config.global_batch_size}")
    cut = {"real": sum(s.cut for s in real),
           "synthetic": sum(not row["rejected_finished"] for row in rows)}
    log(f"responses cut at their budget (max length - prompt length): {cut['real']} of {len(real)} annotated, "
        f"{cut['synthetic']} of {len(rows)} synthetic")
    return trainer.TrainingData(real=real, synthetic=synthetic), skipped, cut


def opponent_logprobs(run: Run, policy, data: trainer.TrainingData, opponent_sha: str, data_sha: str) -> dict:
    """The opponent's log-probs of the annotated and the synthetic responses, with the hashes of
    its weights and of the token sequences scored."""
    config = run.config
    budget = config.micro_batch_size * (1 + config.num_synthetic) * config.max_length * 2  # no activations kept
    scores = _score(run, policy, list(data.real) + list(data.synthetic), budget, desc="opponent log-probs")
    n = len(data.real)
    return {"opponent_sha256": opponent_sha, "sequences_sha256": data_sha, "real": scores[:n], "synthetic": scores[n:],
            "real_lengths": torch.tensor([len(s.input_ids) - s.prompt_length for s in data.real]),
            "synthetic_lengths": torch.tensor([len(s.input_ids) - s.prompt_length for s in data.synthetic])}


def measure_gap(run: Run, data: trainer.TrainingData, logps: dict) -> float:
    """The schedule's gap from the opponent's per-token scores of both response sets (THEORY.md §4)."""
    real = per_token_scores(logps["real"].numpy(), logps["real_lengths"].numpy())
    synthetic = per_token_scores(logps["synthetic"].numpy(), logps["synthetic_lengths"].numpy())
    return run.schedule.measure_gap(real, synthetic)


def make_objective(config: IrisConfig, alpha: float):
    """The loss of `--loss` with its constants bound: a pure function of four log-prob vectors."""
    constants = {"iris": {"alpha": alpha, "beta": config.beta}, "spin": {"beta": config.beta},
                 "space": {"mu": config.mu, "beta": config.beta},
                 "spif": {"beta": config.beta, "reward_bound": config.reward_bound}}[config.loss]
    return functools.partial(get_objective(config.loss), **constants)


def metrics_log(run: Run, it: rundir.IterationDir) -> MetricsLog:
    """This phase's `metrics.jsonl` (and TensorBoard events), without the steps a resume redoes
    (after setting a damaged trainer state aside: the phase then restarts)."""
    train_state.set_aside_if_damaged(it.trainer_state, log)
    tensorboard = run.dir / "tensorboard" if run.config.report_to == "tensorboard" else None
    return MetricsLog(it.path / "metrics.jsonl", it.t, resume_step=train_state.saved_step(it.trainer_state),
                      tensorboard_dir=tensorboard, step_offset=_steps_before(run, it.t))


def save_policy(run: Run, policy, data: trainer.TrainingData, path: Path, *, phase: str) -> None:
    """Save a checkpoint, unless the last update made the model non-finite (then the previous
    checkpoint stays the last good one)."""
    try:
        models.check_finite(policy, phase)
    except ValueError as exc:
        raise TrainingFailure(str(exc)) from None
    probe = _score(run, policy, list(data.real[: run.config.micro_batch_size]), token_budget=10**9)
    if not torch.isfinite(probe).all():
        raise TrainingFailure(f"{phase}: non-finite log-probs after the last optimizer step; not saved, the previous "
                              "checkpoint is intact (lower the learning rate)")
    models.save_checkpoint(policy, path, run.tokenizer)


def evaluate_and_complete(run: Run, it: rundir.IterationDir, policy) -> None:
    files.write_json(it.path / "eval.json", evaluate(run, policy))
    it.mark_complete()


def evaluate(run: Run, policy) -> dict:
    from iris_ref import evaluation

    return evaluation.evaluate(policy, run.chat, run.heldout, run.config) if run.heldout else {}


def heldout_nll(run: Run, policy, examples) -> float:
    from iris_ref import evaluation

    return evaluation.heldout_nll(policy, run.chat, examples, run.config)


# ----------------------------------------------------------------------------------------
# plumbing: set-up, models on disk, resume history, the summary
# ----------------------------------------------------------------------------------------
def setup(config: IrisConfig) -> Optional[Run]:
    """Check the output folder, the model, the tokenizer and the data (nothing is written until
    all of it is fine), then create the run folder. None for --dry-run, after printing the plan."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the log
    info = distributed.init_distributed("cpu" if config.device == "cpu" else None)
    device = (info.device if info.world_size > 1 else torch.device(config.device)) \
        if str(config.device).startswith("cuda") else torch.device("cpu")
    try:
        differ = functools.partial(saved_differences, config=config.to_dict())
        verdict = rundir.check_output_dir(Path(config.output_dir), resume=config.resume, overwrite=config.overwrite,
                                          differ=differ)
        if not config.embedded:
            models.check_model_source(config.model, config.trust_remote_code)
        tokenizer = models.load_tokenizer(config.model, config.trust_remote_code)
        chat = chat_lib.ChatFormat(tokenizer, template_kwargs=parse_template_kwargs(config.chat_template_kwargs),
                                   date=config.template_date, generation_eos_ids=models.generation_eos_ids(config.model))
        examples, encoded, heldout, validation = load_data(config, chat)
        if verdict == "resume":
            rundir.check_same_data(Path(config.output_dir), data_digest(examples, encoded))
    except (rundir.RunDirError, models.ModelError, ValueError, OSError) as exc:
        raise InputError(_one_line(exc)) from None
    if not config.embedded and config.sft_epochs == 0 and models.looks_like_base_model(config.model):
        log(f"warning: {config.model} looks like a base model, not an SFT model; self-play starts from an SFT model "
            "(SPIN: zephyr-7b-sft-full). Add --sft-epochs 1 (or --config qwen2.5-3b) for an SFT warm-up first")
    schedule = AlphaSchedule(kind=config.alpha_schedule, alpha=config.alpha, alpha_min=config.alpha_min,
                             alpha_max=config.alpha_max, num_iterations=config.iters, gap=config.gap)
    session = Run(config, Path(config.output_dir), device, chat, examples, encoded, heldout, schedule, validation)
    if config.dry_run:
        from iris_ref import plan

        plan.print_plan(session, verdict)
        return None
    from iris_ref.config import saved_payload

    session.lock = rundir.lock(session.dir, resume=config.resume, overwrite=config.overwrite, differ=differ)
    rundir.prepare(session.dir, verdict, saved_payload(config), data_digest(examples, encoded))
    _set_seed(config.seed)
    return session


def data_digest(examples, encoded) -> dict:
    """What the run trains on, as hashes of its token ids: a resume must find the same."""
    prompts = [data_lib.EncodedSequence(s.input_ids[:s.prompt_length], s.prompt_length) for s in encoded]
    return {"prompts": len(encoded), "prompt_ids_sha256": data_lib.sequences_sha256(prompts),
            "annotated_ids_sha256": data_lib.sequences_sha256(encoded)}


def load_data(config: IrisConfig, chat):
    """Training examples (a fixed seeded subset) with their encodings, the held-out examples, and
    the rows held out of training for the warm-up's early stopping (`--sft-validation-size`).
    `ValueError` (one line) when too little is left for one optimizer step."""
    from iris_ref import tiny

    source = config.dataset or str(tiny.TOY_TRAIN_PATH)
    examples, skips = data_lib.load_examples(source, split=config.split or "train", num_samples=config.num_samples,
                                             seed=config.seed, first_turn=config.first_turn)
    kept, encoded, skips = data_lib.encode_examples(chat, examples, config.max_length, config.max_prompt_length,
                                                    config.max_new_tokens, skips)
    if skips.prefix_mismatch:
        log(f"data: {skips.prefix_mismatch} rows skipped: their tokenized prompt is not the start of the tokenized "
            f"conversation, so no sequence is both what the model is prompted with and what it would learn; first: "
            f"{skips.first['prefix_mismatch']}")
    if skips.template_error:
        log(f"data: {skips.template_error} rows skipped: the chat template refused them; first: "
            f"{skips.first['template_error']}")
    if skips.stop_in_response:
        log(f"data: {skips.stop_in_response} rows skipped: their response's text holds a stop token, which no "
            f"sampled response can; first: {skips.first['stop_in_response']}")
    validation = []
    if config.sft_validation_size and len(kept) >= config.global_batch_size:
        size = validation_rows(config.sft_validation_size, len(kept))
        if len(kept) - size < config.global_batch_size:
            raise ValueError(f"dataset {source}: --sft-validation-size {config.sft_validation_size:g} holds out {size} of "
                             f"the {len(kept)} usable prompts (for the warm-up's early stopping), leaving fewer than "
                             f"--global-batch-size {config.global_batch_size} to train on; lower it, or 0 to stop on "
                             "the held-out data")
        held = set(np.random.default_rng(config.seed + 1).permutation(len(kept))[:size].tolist())
        validation = [ex for i, ex in enumerate(kept) if i in held]
        kept, encoded = [ex for i, ex in enumerate(kept) if i not in held], [s for i, s in enumerate(encoded) if i not in held]
    log(f"data: {len(kept)} prompts from {source} (skipped: {skips.describe()}"
        + (f"; {len(validation)} more held out for the warm-up's early stopping)" if validation else ")"))
    if len(kept) < config.global_batch_size:
        raise ValueError(
            f"dataset {source}: {len(kept)} usable prompts (skipped: {skips.describe()}) are fewer than "
            f"--global-batch-size {config.global_batch_size}, so not one optimizer step fits; lower "
            f"--global-batch-size (and --micro-batch-size) or give more data")
    eval_source = config.eval_dataset or (str(tiny.TOY_HELDOUT_PATH) if config.dataset is None else None)
    heldout = []
    if eval_source is not None:
        heldout, eval_skips = data_lib.load_examples(eval_source, split=config.eval_split or "train",
                                                     num_samples=config.eval_num_samples, seed=config.seed,
                                                     first_turn=config.first_turn)
        log(f"held-out: {len(heldout)} rows from {eval_source} (skipped: {eval_skips.describe()})")
    else:
        log("held-out: none (no --eval-dataset): iterations are not evaluated")
    return kept, encoded, heldout, validation


def verify_resume_point(run: Run) -> None:
    """On --resume, the checkpoint the run continues from (the last one saved) is checked against the
    SHA256SUMS written with it; a damaged one (truncated, altered) reopens its iteration, which is
    made again from the checkpoint before it (checked the same way), saying so in one line."""
    if not run.config.resume:
        return
    its = [rundir.IterationDir(run.dir / f"iter_{t}", t) for t in range(run.config.iters + 1)]
    t = next((t for t, it in enumerate(its) if not it.complete), len(its))  # the first not complete
    t = t if t < len(its) and its[t].trained else t - 1                   # the last one saved
    while t >= 0:
        it = rundir.IterationDir(run.dir / f"iter_{t}", t)
        problem = None
        if distributed.is_main_process() and it.checkpoint.exists():  # θ_0 may be the given model
            problem = files.verify_directory(it.checkpoint)
        problem = distributed.broadcast_object(problem)
        if problem in (None, "unverified"):
            return
        log(f"{it.checkpoint}: {problem}; iteration {t} is made again"
            + (f" from iteration {t - 1}'s checkpoint" if t > 0 else ""))
        it.reopen()
        if t + 1 < len(its):  # what the next iteration began from the damaged θ_t is not reused
            its[t + 1].discard()
        t -= 1


def validation_rows(size: float, usable: int) -> int:
    """The rows `--sft-validation-size` holds out of `usable` ones: a fraction (< 1) of them, at
    least `MIN_VALIDATION_ROWS` (the embedded 0.1 of the toy task's 2000 rows is the 200 it has
    always held out), or a number of rows as given."""
    return int(size) if size >= 1 else max(round(size * usable), MIN_VALIDATION_ROWS)


def model_path(run: Run, t: int):
    """Where θ_t is on disk: `iter_t/checkpoint`, or the given model for θ_0 without a warm-up."""
    checkpoint = rundir.IterationDir(run.dir / f"iter_{t}", t).checkpoint
    return checkpoint if (t > 0 or checkpoint.exists()) else run.config.model


def load_policy(run: Run, path):
    return models.load_policy(path, device=run.device, parallel=run.config.parallel,
                              trust_remote_code=run.config.trust_remote_code)


def previous_gaps(run: Run, t: int) -> list[float]:
    """gap_1 .. gap_{t-1} of the completed iterations (the schedule's history survives --resume)."""
    return [rundir.IterationDir(run.dir / f"iter_{s}", s).read("train_summary.json")["gap"] for s in range(1, t)]


def _other_prompts(run: Run, rows: list[dict]) -> Optional[str]:
    """Why a saved synthetic.jsonl cannot be reused (None: it can): it must hold K rows per
    prompt, for these prompts, in order, sampled after exactly the prompt ids this run feeds
    the model (a changed template, template option or dataset file gives other ids)."""
    K = run.config.num_synthetic
    if len(rows) != K * len(run.examples):
        return f"{len(rows)} rows, not {K} for each of {len(run.examples)} prompts"
    for i, row in enumerate(rows):
        example = run.examples[i // K]
        if row.get("prompt") != example.prompt_messages or row.get("sample_index", 0) != i % K:
            return f"other prompts (row {i})"
        if "rejected_token_ids" not in row:
            return f"rows without sampled token ids (row {i})"
        if row.get("prompt_token_ids") != run.chat.prompt_ids(example.prompt_messages):
            return f"other prompt token ids (row {i}: another chat template, template option or date)"
    return None


def _other_source(saved: dict, **expected: str) -> Optional[str]:
    """Why saved opponent log-probs do not belong to these weights and sequences (None: they do)."""
    for key, value in expected.items():
        if saved.get(key) != value:
            return f"other {key.replace('_sha256', '')} (sha256 {str(saved.get(key))[:12]}, now {value[:12]})"
    return None


def _score(run: Run, policy, sequences, token_budget: int, desc: Optional[str] = None) -> torch.Tensor:
    from iris_ref.scoring import score_sequences

    return score_sequences(policy, sequences, run.tokenizer.pad_token_id, token_budget=token_budget,
                           bf16=run.config.bf16, desc=desc)


def _steps_before(run: Run, t: int) -> int:
    """Optimizer steps of the iterations before t (TensorBoard's global step)."""
    total = 0
    for s in range(t):
        summary = rundir.IterationDir(run.dir / f"iter_{s}", s).read("train_summary.json") or {}
        total += int(summary.get("total_steps", 0))
    return total


def finish(run: Run) -> dict:
    from iris_ref import report

    summary = build_summary(run.dir, run.config)
    files.write_json(run.dir / "summary.json", summary)
    if distributed.is_main_process():
        report.write_report(run.dir, summary)
        print(report.format_table(summary), flush=True)
        print(f"run folder: {run.dir}  (summary.json, report.png)", flush=True)
    distributed.barrier()
    return summary


def build_summary(run_dir: Path, config: IrisConfig) -> dict:
    """`summary.json`: entry 0 = the starting model, then one entry per completed iteration."""
    entries = []
    for t in range(config.iters + 1):
        it = rundir.IterationDir(Path(run_dir) / f"iter_{t}", t)
        if not it.complete:
            break
        entry = {"iteration": t, "alpha": None, "gap": None}
        if t > 0:
            entry.update(it.read("train_summary.json") or {})
        entry.update(it.read("eval.json") or {})
        entry["checkpoint"] = str(it.checkpoint) if it.checkpoint.exists() else config.model
        entries.append(entry)
    model = "tiny (embedded default)" if config.embedded else config.model
    schedule = f", {config.alpha_schedule} alpha" if config.loss == "iris" else ""
    title = f"{model} on {data_title(config)}: {config.loss.upper()}{schedule}, K={config.num_synthetic}"
    return {"title": title, "loss": config.loss,
            "model": config.model, "run_dir": str(run_dir), "has_heldout": any("heldout_nll" in e for e in entries),
            "iterations": entries}


def data_title(config: IrisConfig) -> str:
    """The training and held-out data as the report's title names them: a local file by its name,
    a hub dataset (or a local folder) by its name and split."""
    def name(source, split):
        shown = Path(source).name if is_local(source) else source
        return shown if Path(source).suffix.lower() in data_lib.LOCAL_BUILDERS else f"{shown} [{split}]"

    trained = "the toy task" if config.dataset is None else name(config.dataset, config.split)
    if config.eval_dataset is not None:
        return f"{trained}, held out: {name(config.eval_dataset, config.eval_split)}"
    return trained if config.dataset is None else f"{trained}, no held-out data"  # the toy task has its own


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
