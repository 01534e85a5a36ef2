"""The trainer's state for a mid-iteration `--resume`: saved atomically, at most one copy kept.

A state is a folder `step_XXXXXXXX/` under the iteration's `trainer_state/` holding the
full model, the optimizer (full, the rank-0 view under FSDP), the scheduler, the data order,
the step, the metric history, each rank's RNG state and a *fingerprint* of what was being
trained (loss, α, β, data size, batch sizes, seed, optimizer, learning rate). The number of
processes is not part of it: the data order and the micro-batches do not depend on it, so a
state saved by 8 ranks resumes on 4 (or on one) with the same gradients. It
is written as one atomic folder with a SHA256SUMS written last inside it (a resume verifies it
and sets a damaged state aside: `set_aside_if_damaged`), then the `LATEST` pointer is replaced,
then older states are removed: disk holds at most one complete state plus the one being written (about 25 GB
each at 3B with RMSprop, 37 GB with AdamW).

When to save (`Saver`): every `save_steps` optimizer steps if set, and whenever
`save_minutes` have passed since the last save, and when a run stops early (`max_steps`).
The end of an iteration needs no state: the checkpoint written next is the state.
On CPU a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from iris_ref import distributed, files
from iris_ref.errors import TrainingFailure

STATE_FORMAT = 2


def _rng_state() -> dict:
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state as plain types so that torch.load(weights_only=True) accepts it
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest(state_dir: Optional[Path]) -> Optional[Path]:
    """The newest complete state in `state_dir`, or None."""
    if state_dir is None:
        return None
    pointer = Path(state_dir) / "LATEST"
    if not pointer.is_file():
        return None
    path = Path(state_dir) / pointer.read_text().strip()
    return path if (path / "trainer.pt").is_file() else None


def set_aside_if_damaged(state_dir: Optional[Path], log: Callable[[str], None]) -> None:
    """Verify the latest state against the SHA256SUMS written last inside it; a damaged one (a
    truncated or altered file) is renamed `damaged_step_XXXXXXXX` and the phase restarts from
    its last good state, its beginning, saying so in one line. Call before training on every rank."""
    path = latest(state_dir)
    problem = None
    if path is not None and distributed.is_main_process():
        problem = files.verify_directory(path)
        problem = None if problem == "unverified" else problem  # a state from before checksums
    problem = distributed.broadcast_object(problem)
    if problem is None:
        return
    aside = path.with_name(f"damaged_{path.name}")
    if distributed.is_main_process():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        (Path(state_dir) / "LATEST").unlink()
    distributed.barrier()
    log(f"{path}: {problem}; the trainer state is set aside as {aside.name} and this phase restarts from its "
        "beginning (its last good state)")


def saved_step(state_dir: Optional[Path]) -> Optional[int]:
    """The optimizer step a resume from `state_dir` starts after, or None (no state)."""
    path = latest(state_dir)
    return None if path is None else int(files.load_tensors(path / "trainer.pt")["step"])


def save(state_dir: Path, policy, optimizer, scheduler, *, step: int, order, history: list, fingerprint: dict) -> None:
    """Write the state after `step` (collective under FSDP: every rank calls it)."""
    model_state = distributed.full_model_state_dict(policy)
    optim_state = distributed.optimizer_state_dict(policy, optimizer)
    rngs = distributed.all_gather_objects([_rng_state()])  # each rank's generators
    name = f"step_{step:08d}"
    with files.atomic_directory(Path(state_dir) / name, checksums=True) as tmp:
        if tmp is not None:
            files.torch_save(model_state, tmp / "model.pt")
            files.torch_save(optim_state, tmp / "optimizer.pt")
            for rank, rng in enumerate(rngs):
                files.torch_save(rng, tmp / f"rng_rank{rank}.pt")
            files.torch_save({"format": STATE_FORMAT, "step": step, "scheduler": scheduler.state_dict(), "order": order,
                              "history": history, "fingerprint": fingerprint}, tmp / "trainer.pt")
    files.write_text(Path(state_dir) / "LATEST", name + "\n")
    if distributed.is_main_process():
        for old in Path(state_dir).glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def resume(state_dir: Optional[Path], policy, optimizer, scheduler, fingerprint: dict) -> Optional[dict]:
    """Load the latest state into `policy`, `optimizer` and `scheduler`; return its step, order
    and history, or None when there is none. A state of something else is a TrainingFailure."""
    path = latest(state_dir)
    if path is None:
        return None
    trainer_state = files.load_tensors(path / "trainer.pt")
    saved = trainer_state["fingerprint"]
    if saved != fingerprint:
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise TrainingFailure(f"cannot resume from {path}: it was saved with different {', '.join(changed)} "
                              "(delete that folder to start this iteration afresh)")
    distributed.load_full_model_state_dict(policy, files.load_tensors(path / "model.pt"))
    distributed.load_optimizer_state_dict(policy, optimizer, files.load_tensors(path / "optimizer.pt"))
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_path = path / f"rng_rank{distributed.get_rank()}.pt"
    if rng_path.is_file():
        _set_rng_state(files.load_tensors(rng_path))
    return trainer_state


class Saver:
    """Decides when to save: every `save_steps` steps (if set) or after `save_minutes`."""

    def __init__(self, state_dir: Optional[Path], save_steps: Optional[int], save_minutes: float):
        self.state_dir, self.save_steps, self.save_seconds = state_dir, save_steps, 60.0 * save_minutes
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.state_dir is None:
            return False
        by_steps = self.save_steps is not None and step % self.save_steps == 0
        # Every rank must agree (the save is collective): rank 0's clock decides.
        by_time = distributed.broadcast_object(time.monotonic() - self._last >= self.save_seconds)
        return by_steps or by_time

    def saved(self) -> None:
        self._last = time.monotonic()


def fingerprint(**values: Any) -> dict:
    """What a saved state must match to be resumed (plain values only)."""
    return {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}
