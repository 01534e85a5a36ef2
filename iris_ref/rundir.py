"""The run folder: what is in it, whether it is ours, and what may be deleted.

    <output-dir>/
        .iris-run                 marker, written FIRST: this folder was created by iris-ref
        config.json               resolved config + software versions
        data.json                 hashes of the token ids trained on (prompts, annotated sequences):
                                  a resume must find the same
        iter_0/                   the starting model θ_0 (SFT warm-up result, or source.json
                                  naming the given model), eval.json, COMPLETE
        iter_<t>/ (t = 1..T)      synthetic.jsonl, opponent_logps.pt, trainer_state/,
                                  metrics.jsonl, train_summary.json, checkpoint/, eval.json,
                                  COMPLETE (written last: the iteration is never redone)
        summary.json, report.png, tensorboard/

Nothing that this project did not write is ever deleted: `--overwrite` removes only the
entries listed in `OWN_ENTRIES` of a folder that carries the marker, and refuses (touching
nothing) when the folder is not a run or holds anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from iris_ref import distributed, files
from iris_ref.errors import ConfigError, InputError

MARKER = ".iris-run"
LOCK = ".iris-run.lock"
_OWN_NAMES = {MARKER, LOCK, "config.json", "data.json", "summary.json", "report.png", "tensorboard"}
_OWN_PATTERN = re.compile(r"^(iter_\d+|\..*\.tmp(-\w+)?|.*\.tmp)$")
# What a killed write leaves: `files`' temporary files and folders, and a folder renamed aside.
_LEFTOVER = re.compile(r"^(\..+\.tmp|\..+\.tmp-\w+|(checkpoint|step_\d{8})\.old)$")


class RunDirError(InputError):
    """The output folder cannot be used as asked (one-line message)."""


class RunLock:
    """The run folder is owned by one process at a time: an exclusive lock on `.iris-run.lock`
    (`filelock`: an flock, released by the kernel when its process dies, so a killed run never
    blocks its resume), taken before anything is written and held for the process's life; the
    holder's host, PID and start time are written into the file for the next one to read.
    Only rank 0 locks. On NFS the lock holds between machines where the server supports
    locking (NFSv4, or lockd for v3); see docs/usage.md."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._lock = None

    def acquire(self) -> None:
        """Take the lock, or `RunDirError` naming the process that holds it (nothing touched)."""
        import filelock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise self.in_use_error(self._holder()) from None
        self._lock = lock
        self.path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")

    def held_elsewhere(self) -> Optional[str]:
        """The holder, if another process holds the lock (probing an existing lock file changes
        nothing); None otherwise."""
        import filelock

        if not self.path.is_file():
            return None
        probe = filelock.FileLock(self.path, thread_local=False)
        try:
            probe.acquire(timeout=0)
        except filelock.Timeout:
            return self._holder()
        probe.release()
        return None

    def in_use_error(self, holder: str) -> "RunDirError":
        return RunDirError(f"--output-dir {self.path.parent} is in use by another iris-ref process ({holder}); nothing "
                           "was touched: wait for it to end, or stop it and continue with --resume")

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            return f"host {holder['host']}, PID {holder['pid']}, started {holder['started']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(run_dir: Path, *, resume: bool, overwrite: bool,
         differ: Optional[Callable[[Path], list[str]]] = None) -> RunLock:
    """Take the run folder's lock on rank 0 (every rank gets its `RunDirError`) and decide again,
    under the lock, what to do with the folder (another run may have written it meanwhile)."""
    held, error = RunLock(run_dir), None
    if distributed.is_main_process():
        try:
            held.acquire()
            check_output_dir(run_dir, resume=resume, overwrite=overwrite, differ=differ, holding_lock=True)
        except RunDirError as exc:
            held.release()
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    return held


def remove_leftovers(run_dir: Path) -> int:
    """Remove what killed writes left in a run folder of ours (temporary files and folders of
    `files`, folders renamed aside); nothing else. Returns how many entries were removed."""
    run_dir = Path(run_dir)
    if not is_run(run_dir) or not distributed.is_main_process():
        return 0
    removed = 0
    folders = [run_dir, *[p for p in run_dir.glob("iter_*") if p.is_dir()],
               *[p for p in run_dir.glob("iter_*/trainer_state") if p.is_dir()]]
    for folder in folders:
        for entry in folder.iterdir():
            if _LEFTOVER.match(entry.name) and not entry.is_symlink():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed += 1
    return removed


def _is_own_entry(name: str) -> bool:
    return name in _OWN_NAMES or bool(_OWN_PATTERN.match(name))


def is_run(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run was started with; `ConfigError` (one line) when no run is there."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"--resume: {run_dir} does not exist; there is no run to continue (drop --resume to start one)")
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no iris-ref run (no config.json); drop --resume to start one there")
    try:
        return json.loads(saved.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: cannot read {saved}: {exc}") from None


def check_output_dir(run_dir: Path, *, resume: bool, overwrite: bool,
                     differ: Optional[Callable[[Path], list[str]]] = None, holding_lock: bool = False) -> str:
    """What to do with `run_dir`: "fresh", "resume" or "overwrite"; `RunDirError` otherwise.

    Decides only; nothing is written or deleted here (the driver calls it before heavy work).
    `differ(run_dir)` (`config.saved_differences` bound to this run's options) makes the advice
    for a folder that already holds a run right: `--resume` is suggested only when that run
    computes the same, else another `--output-dir`.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output-dir {run_dir} is a file, not a folder")
    # Rank 0 probes (the ranks of one job must not refuse each other) and tells the others.
    holder = None if holding_lock or not distributed.is_main_process() else RunLock(run_dir).held_elsewhere()
    holder = holder if holding_lock else distributed.broadcast_object(holder)
    if holder is not None:  # a running process owns it: no other advice applies
        raise RunLock(run_dir).in_use_error(holder)
    # The lock file alone (left by a run that stopped before writing anything) is no content.
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
    if resume:
        return "resume"  # config.resume_config already checked that a run is there
    if not entries:
        return "fresh"
    if not is_run(run_dir):
        raise RunDirError(
            f"--output-dir {run_dir} is not empty and was not created by iris-ref (no {MARKER} marker); "
            "nothing was touched: choose an empty or new folder")
    if not overwrite:
        differing = differ(run_dir) if differ is not None else []
        if differing:
            shown = "; ".join(differing[:3]) + (f"; and {len(differing) - 3} more" if len(differing) > 3 else "")
            raise RunDirError(f"--output-dir {run_dir} already holds another run ({shown}): choose another "
                              "--output-dir (--overwrite would delete that run)")
        raise RunDirError(f"--output-dir {run_dir} already holds a run: add --resume to continue it, or --overwrite "
                          "to delete it and start afresh")
    foreign = [name for name in entries if not _is_own_entry(name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise RunDirError(f"--overwrite: {run_dir} also holds files iris-ref did not write ({shown}); nothing was "
                          "deleted: move them away or choose another --output-dir")
    return "overwrite"


def check_same_data(run_dir: Path, digest: dict) -> None:
    """`RunDirError` when the run in `run_dir` was started on other token ids than `digest` describes
    (a dataset file edited in place, another tokenizer or chat template): its saved artefacts
    would be paired with other sequences."""
    saved_path = Path(run_dir) / "data.json"
    if not saved_path.is_file():
        return  # a run from before data.json: its artefacts check their own hashes
    saved = files.read_json(saved_path)
    changed = [key.replace("_sha256", "") for key in sorted(digest) if saved.get(key) != digest[key]]
    if changed:
        raise RunDirError(f"--resume: the data of the run in {run_dir} changed since it started ({', '.join(changed)} "
                          "differ: the dataset file was edited, or the tokenizer or chat template changed); "
                          "nothing was touched: restore them, or start a new run in another --output-dir")


def prepare(run_dir: Path, verdict: str, config_text: str, data_digest: Optional[dict] = None) -> None:
    """Carry out `check_output_dir`'s verdict: delete our own entries for "overwrite", write the
    marker first, then config.json and data.json (rank 0; every rank waits)."""
    run_dir = Path(run_dir)
    if distributed.is_main_process():
        if verdict == "overwrite":
            for entry in run_dir.iterdir():
                if _is_own_entry(entry.name) and entry.name not in (MARKER, LOCK):  # the lock is ours, held
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    if verdict == "resume":
        remove_leftovers(run_dir)
    if not is_run(run_dir):  # a resumed run from before the marker existed gets one too
        files.write_json(run_dir / MARKER, {"created_by": "iris-ref", "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    # Rewritten on resume as well: a run extended with --iters keeps its new length.
    files.write_text(run_dir / "config.json", config_text)
    if data_digest is not None and not (run_dir / "data.json").is_file():
        files.write_json(run_dir / "data.json", data_digest)


@dataclass(frozen=True)
class IterationDir:
    """The files of one iteration t (t = 0: the starting model)."""

    path: Path
    t: int

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def trainer_state(self) -> Path:
        return self.path / "trainer_state"

    @property
    def complete(self) -> bool:
        return (self.path / "COMPLETE").is_file()

    @property
    def trained(self) -> bool:
        """The model of this iteration was saved (train_summary.json is written right after its
        checkpoint): a run stopped during its evaluation need not train it again."""
        return (self.path / "train_summary.json").is_file() and self.checkpoint.is_dir()

    def reopen(self) -> None:
        """Undo COMPLETE and remove the (damaged) checkpoint with what depends on it: the
        iteration is trained again from its start; its synthetic data and opponent log-probs,
        made before it, are reused if they verify."""
        if distributed.is_main_process():
            for name in ("COMPLETE", "train_summary.json", "eval.json", "sft_epochs.json"):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.checkpoint, ignore_errors=True)
            shutil.rmtree(self.trainer_state, ignore_errors=True)
        distributed.barrier()

    def discard(self) -> None:
        """Remove an unfinished iteration's folder (this project's own `iter_<t>`): it was begun
        from a previous model that is being made again."""
        if distributed.is_main_process() and not self.complete:
            shutil.rmtree(self.path, ignore_errors=True)
        distributed.barrier()

    def mark_complete(self) -> None:
        """The iteration is done: COMPLETE is written last, then the trainer state is dropped."""
        files.write_text(self.path / "COMPLETE", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        if distributed.is_main_process():
            shutil.rmtree(self.trainer_state, ignore_errors=True)
        distributed.barrier()

    def read(self, name: str) -> Optional[Any]:
        path = self.path / name
        return files.read_json(path) if path.is_file() else None


def iteration(run_dir: Path, t: int) -> IterationDir:
    path = Path(run_dir) / f"iter_{t}"
    if distributed.is_main_process():
        path.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return IterationDir(path, t)
