"""Durable files: every write is atomic, made by rank 0 only, and followed by a barrier.

A crash at any moment leaves either the old file or the new one, never half of one: data is
written under a temporary name in the same folder, fsynced, then renamed over the target
(`os.replace` is atomic on POSIX), and the folder is fsynced so the rename survives a power
cut. Folders (checkpoints, trainer states) are written the same way with `atomic_directory`.

Under torchrun every rank calls these helpers with the same arguments; rank 0 writes and the
others wait at the barrier, so that no rank reads a file before it exists. The algorithm
never needs a rank check of its own.

`reuse_or_make` is the one place that makes resume work: a step whose artefact is already
on disk (and valid) is not run again. What a resume trusts is verified first: each file it
reuses has a `<name>.sha256` beside it, each folder (checkpoint, trainer state) a `SHA256SUMS`
written last inside it (`sha256sum -c SHA256SUMS` reads it), both recorded when they were written.

Every write goes through `writing(path)`: a termination signal waits until the write is complete
(`preemption.deferred`), and a full disk, a quota, an I/O error or a permission error becomes one
line naming the path and the cause (`errors.WriteError`, exit 1), with what was there before
intact (torch's own "unexpected pos" message for a full disk is translated too).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import numpy as np
import torch

from iris_ref import distributed, preemption
from iris_ref.errors import WriteError

T = TypeVar("T")
CHECKSUMS = "SHA256SUMS"
_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded", errno.EIO: "I/O error",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}


def free_space(path: Path) -> Optional[int]:
    """Free bytes on the disk that holds `path` (or its nearest existing parent); None if unreadable."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _cause(error: BaseException, path: Path) -> Optional[str]:
    """What a failed write ran into, in words, or None if it is not a write failure."""
    number = getattr(error, "errno", None)
    if number is None:  # safetensors: "... (os error 28)"; torch.save to a path: "unexpected pos"
        found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(error))
        number = int(found.group(1) or found.group(2)) if found else None
    if number is not None:
        return f"{_CAUSES.get(number, os.strerror(number))} ({errno.errorcode.get(number, number)})"
    if "unexpected pos" in str(error) or "PytorchStreamWriter" in str(error):
        free = free_space(path)
        return "no space left on the device (ENOSPC)" if free is not None and free < 2**26 else None
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """The context of every write: a termination signal waits for it, and a failure of the storage
    is one line naming `path` and the cause."""
    try:
        with preemption.deferred():
            yield
    except Exception as error:  # noqa: BLE001 - safetensors' SafetensorError is a bare Exception
        cause = _cause(error, Path(path))
        if cause is None and not isinstance(error, OSError):
            raise  # not the storage: a bug is never disguised as a write failure
        raise WriteError(f"cannot write {path}: {cause or error}; what was there before is intact") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, folder: bool = False) -> None:
    """The mode a plain `open`/`mkdir` would give (mkstemp and mkdtemp make files private to
    their owner: a checkpoint others on the cluster should read would not be readable)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename onto `path` (this process only; see `atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _usual_mode(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file atomically on rank 0 (`write` gets the temporary path), then a barrier."""
    if distributed.is_main_process():
        with writing(path):
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


def torch_save(payload: Any, path: Path) -> None:
    """`torch.save` through a file object: a full disk is then an OSError (ENOSPC) rather than
    torch's "unexpected pos"."""
    with open(path, "wb") as handle:
        torch.save(payload, handle)


def save_tensors(path: Path, payload: Any) -> None:
    atomic_write(path, lambda tmp: torch_save(payload, tmp))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in names)
    (folder / CHECKSUMS).write_text(lines, encoding="utf-8")


def verify_directory(folder: Path) -> Optional[str]:
    """What is wrong with a folder written by `atomic_directory(..., checksums=True)`, or None:
    every file listed in its SHA256SUMS must be there with the SHA-256 recorded when it was
    written. A folder without SHA256SUMS (written before checksums existed) is "unverified"."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return None if not folder.exists() else "unverified"
    for line in listing.read_text(encoding="utf-8").splitlines():
        expected, name = line.split("  ", 1)
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name}: its SHA-256 differs from the one recorded when it was written"
    return None


@contextlib.contextmanager
def atomic_directory(final: Path, *, checksums: bool = False) -> Iterator[Optional[Path]]:
    """Yield a temporary folder beside `final` on rank 0 (None elsewhere) to fill; on success it
    replaces `final` atomically: readers see the complete old folder or the complete new one.
    With `checksums`, a SHA256SUMS of its files is written last inside it (`verify_directory`).

    An existing `final` is renamed aside first and removed once the new one is in place; a
    crash in between leaves a `<name>.old` folder that nothing reads (and the next save or a
    resume removes). Ends with a barrier.
    """
    final = Path(final)
    tmp = None
    with writing(final):
        if distributed.is_main_process():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            yield tmp
            if tmp is not None:
                if checksums:
                    _write_checksums(tmp)
                _replace_directory(tmp, final)
        except BaseException:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    distributed.barrier()


def _replace_directory(tmp: Path, final: Path) -> None:
    for dirpath, _dirs, names in os.walk(tmp):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
            _usual_mode(Path(dirpath) / name)
        _usual_mode(Path(dirpath), folder=True)
        _fsync_dir(Path(dirpath))
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def reuse_or_make(path: Path, make: Callable[[], T], *, save: Callable[[Path, T], None],
                  load: Callable[[Path], T], mismatch: Callable[[T], Optional[str]] = lambda _: None,
                  log: Callable[[str], None] = print) -> T:
    """The artefact at `path` if a previous (stopped) run finished it, its bytes are the ones
    written (the SHA-256 in `<name>.sha256`) and `mismatch(value)` finds nothing wrong with it
    (None); else `make()` it, `save` it (atomically, rank 0) and record its SHA-256, saying in
    one line why it was made again. Every rank returns the same value."""
    path = Path(path)
    recorded = path.with_name(path.name + ".sha256")
    if path.exists():
        reason = _changed_since_written(path, recorded)
        if reason is None:
            value = load(path)
            reason = mismatch(value)
            if reason is None:
                return value
            reason = f"was made from {reason}"
        log(f"{path} {reason}; making it again")
    value = make()
    with preemption.deferred():  # the file and its record, or neither: a stop in between would redo `make`
        save(path, value)
        write_text(recorded, f"{sha256_file(path)}  {path.name}\n" if distributed.is_main_process() else "")
    return value


def _changed_since_written(path: Path, recorded: Path) -> Optional[str]:
    if not recorded.is_file():
        return "has no recorded SHA-256 (its write did not finish)"
    if recorded.read_text(encoding="utf-8").split()[:1] != [sha256_file(path)]:
        return "is not the file that was written (its SHA-256 differs)"
    return None
