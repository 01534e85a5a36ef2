"""Progress of a long phase that can be followed anywhere: a bar on a terminal, log lines in a batch job.

tqdm's bar redraws one line with carriage returns, which a SLURM log, `nohup` or `| tee`
shows as nothing at all until the phase ends (or as one very long line). When stderr is not
a terminal, `Progress` prints plain lines instead::

    [iris] generation: 1200/5000 (24%) 41.3 prompts/s, elapsed 29s, ETA 1m32s

at least every 10% of the phase and at least every `interval` seconds (60 by default), plus
a last line when the phase ends. Only rank 0 reports (every rank counts the same work).
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm.auto import tqdm

DEFAULT_INTERVAL_S = 60.0


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Progress:
    """Count `done/total` units of one phase; use as a context manager or call `close()`."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0,
                 interval: float = DEFAULT_INTERVAL_S, stream: Optional[TextIO] = None,
                 enabled: Optional[bool] = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self._start = int(initial)
        self.interval = float(interval)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_main_process() if enabled is None else enabled
        self._t0 = self._last_time = time.monotonic()
        self._last_decile = self._decile(self.done)
        self._closed = False
        interactive = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, file=self.stream,
                         dynamic_ncols=True, leave=False) if interactive else None

    def _decile(self, done: int) -> int:
        return (10 * done) // self.total if self.total > 0 else 10

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        decile = self._decile(self.done)
        if decile > self._last_decile or now - self._last_time >= self.interval:
            self._line(now)
            self._last_decile, self._last_time = decile, now

    def line(self) -> str:
        """The status line as printed (also for tests)."""
        elapsed = time.monotonic() - self._t0
        rate = (self.done - self._start) / elapsed if elapsed > 0 else 0.0
        text = f"[iris] {self.desc}: {self.done}/{self.total}"
        if self.total > 0:
            text += f" ({100 * self.done // self.total}%)"
        text += f" {rate:.3g} {self.unit}/s, elapsed {tqdm.format_interval(elapsed)}"
        if 0 < rate and self.done < self.total:
            text += f", ETA {tqdm.format_interval((self.total - self.done) / rate)}"
        return text

    def _line(self, now: float) -> None:
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done != self._start and self._last_decile < 10:
            self._line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
