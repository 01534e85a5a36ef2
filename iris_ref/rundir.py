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
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from iris_ref import distributed, files

MARKER = ".iris-run"
_OWN_NAMES = {MARKER, "config.json", "data.json", "summary.json", "report.png", "tensorboard"}
_OWN_PATTERN = re.compile(r"^(iter_\d+|\..*\.tmp(-\w+)?|.*\.tmp)$")


class RunDirError(ValueError):
    """The output folder cannot be used as asked (one-line message)."""


def _is_own_entry(name: str) -> bool:
    return name in _OWN_NAMES or bool(_OWN_PATTERN.match(name))


def is_run(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run was started with; `ConfigError` (one line) when no run is there."""
    from iris_ref.config import ConfigError

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


def check_output_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> str:
    """What to do with `run_dir`: "fresh", "resume" or "overwrite"; `RunDirError` otherwise.

    Decides only; nothing is written or deleted here (the driver calls it before heavy work).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output-dir {run_dir} is a file, not a folder")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if resume:
        return "resume"  # config.resume_config already checked that a run is there
    if not entries:
        return "fresh"
    if not is_run(run_dir):
        raise RunDirError(
            f"--output-dir {run_dir} is not empty and was not created by iris-ref (no {MARKER} marker); "
            "nothing was touched: choose an empty or new folder")
    if not overwrite:
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
                if _is_own_entry(entry.name) and entry.name != MARKER:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
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
