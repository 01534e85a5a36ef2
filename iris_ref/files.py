"""Durable files: every write is atomic, made by rank 0 only, and followed by a barrier.

A crash at any moment leaves either the old file or the new one, never half of one: data is
written under a temporary name in the same folder, fsynced, then renamed over the target
(`os.replace` is atomic on POSIX), and the folder is fsynced so the rename survives a power
cut. Folders (checkpoints, trainer states) are written the same way with `atomic_directory`.

Under torchrun every rank calls these helpers with the same arguments; rank 0 writes and the
others wait at the barrier, so that no rank reads a file before it exists. The algorithm
never needs a rank check of its own.

`reuse_or_make` is the one place that makes resume work: a step whose artefact is already
on disk (and valid) is not run again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np
import torch

from iris_ref import distributed

T = TypeVar("T")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename onto `path` (this process only; see `atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file atomically on rank 0 (`write` gets the temporary path), then a barrier."""
    if distributed.is_main_process():
        _write_atomic(path, write)
    distributed.barrier()


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(payload: Any) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, payload: Any) -> None:
    write_text(path, to_json(payload))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows)
    write_text(path, text)


def save_tensors(path: Path, payload: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Optional[Path]]:
    """Yield a temporary folder beside `final` on rank 0 (None elsewhere) to fill; on success it
    replaces `final` atomically: readers see the complete old folder or the complete new one.

    An existing `final` is renamed aside first and removed once the new one is in place; a
    crash in between leaves a `<name>.old` folder that nothing reads (and the next save
    removes). Ends with a barrier.
    """
    final = Path(final)
    tmp = None
    if distributed.is_main_process():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp is not None:
        for dirpath, _dirs, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(dirpath, name), "rb") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(Path(dirpath))
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def reuse_or_make(path: Path, make: Callable[[], T], *, save: Callable[[Path, T], None],
                  load: Callable[[Path], T], mismatch: Callable[[T], Optional[str]] = lambda _: None,
                  log: Callable[[str], None] = print) -> T:
    """The artefact at `path` if a previous (killed) run finished it and `mismatch(value)` finds
    nothing wrong with it (None), else `make()` it and `save` it (atomically, rank 0), saying
    why in one line. Every rank returns the same value."""
    path = Path(path)
    if path.exists():
        value = load(path)
        reason = mismatch(value)
        if reason is None:
            return value
        log(f"{path} was made from {reason}; making it again")
    value = make()
    save(path, value)
    return value
