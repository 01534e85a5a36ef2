"""Preemption: SIGTERM and SIGUSR1 stop a run where nothing is lost.

A cluster stops a job with SIGTERM (SLURM: `scancel`, preemption, the time limit; `--signal=USR1@T`
sends SIGUSR1 T seconds earlier) and SIGKILL after a grace period. With the handlers installed
(`installed()`, done by the command line):

* **while training**, the signal is only recorded; the trainer finishes the optimizer step, saves
  its state on every rank and stops (`stop_requested()` at each step boundary, agreed by all
  ranks), so a resume starts at that step rather than at the last periodic save;
* **while a file or folder is written** (`deferred()`, used by every write in `files`), the
  write completes first: a checkpoint is never cut in half by the signal;
* **anywhere else** (generation, the opponent pass, evaluation) it stops at once; those phases
  keep no partial results and are made again on resume.

The run then raises `errors.Interrupted`; the command line prints `interrupted by SIGTERM;
continue with: --output-dir ... --resume` and exits with 128 + the signal number (143 for
SIGTERM, 138 for SIGUSR1). The grace period must cover one optimizer step plus a state save
(docs/training_and_scaling.md).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

from iris_ref.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_pending: Optional[int] = None  # the first signal received
_deferring = 0                  # depth of deferred() blocks


def _handler(signum, _frame) -> None:
    global _pending
    if _pending is None:
        _pending = signum
    if _deferring == 0:
        raise Interrupted(signum)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Handle SIGTERM and SIGUSR1 as above for the duration (main thread only); restores the
    previous handlers."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _pending = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Record a signal that arrives in this block instead of stopping; stop when the block ends
    (the outermost one), unless the block itself raised."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _deferring == 0 and _pending is not None:
        raise Interrupted(_pending)


def stop_requested() -> Optional[int]:
    """The signal to stop for, the same on every rank (a rank that got none follows the others):
    a collective under torch.distributed, for loops that stop at a boundary."""
    from iris_ref import distributed

    received = int(distributed.all_reduce_max(float(_pending or 0)))
    return received or None
