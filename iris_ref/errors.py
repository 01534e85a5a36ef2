"""The errors a run stops with: the command line's exit-code taxonomy, in one module every other may import.

    ConfigError, InputError   bad options or input, found before heavy work      exit 2
    TrainingFailure           the run cannot go on (non-finite loss, a write      exit 1
                              that failed); the last good state is intact
    Interrupted               SIGTERM / SIGUSR1 (cluster preemption)              exit 128 + signal (143, 138)
    KeyboardInterrupt         Ctrl-C                                              exit 130

Each message is one line, printed as `error: <message>`.
"""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A bad or contradictory option (exit 2)."""


class InputError(ValueError):
    """Bad user input found before heavy work: data, model, output folder (exit 2)."""


class TrainingFailure(RuntimeError):
    """The run cannot go on; the last good checkpoint and trainer state are intact (exit 1)."""


class WriteError(TrainingFailure):
    """A file could not be written (full disk, quota, I/O error, permissions); what was there before
    is intact (exit 1)."""


class Interrupted(BaseException):
    """A termination signal stopped the run after saving what could be saved. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
