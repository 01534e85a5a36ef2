"""`run_iris.py` with the things a cluster does to a job, as test hooks (they live here, in the tests,
not in the product):

    CRASH_AT=T:S            die abruptly (os._exit, no clean-up) after optimizer step S of iteration
                            T, as a killed batch job would: exit code 17
    SIGNAL_AT=T:S:NAME      send this process signal NAME (TERM, USR1) after optimizer step S of iteration T
    SIGNAL_IN=generation    send SIGTERM as iteration 1's generation starts
    SIGNAL_IN=checkpoint    send SIGTERM in the middle of writing iteration 1's checkpoint

    CRASH_AT=2:2 python tests/crash_run.py <run_iris.py options>
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iris_ref import files, generation, metrics  # noqa: E402
from run_iris import main  # noqa: E402

_log = metrics.MetricsLog.__call__


def _at(spec: str, record: dict, log) -> bool:
    iteration, step = map(int, spec.split(":")[:2])
    return log.iteration == iteration and record.get("step") == step


def _hooked_log(self, record):
    _log(self, record)
    if "CRASH_AT" in os.environ and _at(os.environ["CRASH_AT"], record, self):
        sys.stdout.flush()
        os._exit(17)
    if "SIGNAL_AT" in os.environ and _at(os.environ["SIGNAL_AT"], record, self):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ["SIGNAL_AT"].split(":")[2]))


metrics.MetricsLog.__call__ = _hooked_log

if os.environ.get("SIGNAL_IN") == "generation":
    _generate = generation.generate

    def _generate_then_signal(*args, **kwargs):
        if kwargs.get("desc") == "generation":  # the opponent's, not the held-out evaluation's
            os.kill(os.getpid(), signal.SIGTERM)
        return _generate(*args, **kwargs)

    generation.generate = _generate_then_signal

if os.environ.get("SIGNAL_IN") == "checkpoint":
    _write_checksums = files._write_checksums

    def _checksums_after_signal(folder):  # inside the write, after its files, before it is in place
        if folder.name.startswith(".checkpoint.tmp-") and folder.parent.name == "iter_1":
            os.kill(os.getpid(), signal.SIGTERM)
        _write_checksums(folder)

    files._write_checksums = _checksums_after_signal

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
