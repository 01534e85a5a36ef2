"""`run_iris.py` that dies abruptly (os._exit, no clean-up) after optimizer step S of iteration T,
as a killed batch job would: `CRASH_AT=T:S python tests/crash_run.py <options>`. Exit code 17.

The crash hook lives here, in the tests, not in the product: it wraps the metrics log.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iris_ref import metrics  # noqa: E402
from run_iris import main  # noqa: E402

ITERATION, STEP = map(int, os.environ["CRASH_AT"].split(":"))
_log = metrics.MetricsLog.__call__


def _log_then_crash(self, record):
    _log(self, record)
    if self.iteration == ITERATION and record.get("step") == STEP:
        sys.stdout.flush()
        os._exit(17)


metrics.MetricsLog.__call__ = _log_then_crash

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
