#!/usr/bin/env python
"""IRIS self-play fine-tuning from the command line (installed: `iris-run`, the same function).

    python run_iris.py                                     # embedded default: offline, CPU, a few minutes
    python run_iris.py --model Qwen/Qwen2.5-3B --iters 3   # paper-style run (GPU)
    python run_iris.py --config qwen2.5-3b --dry-run       # check a config, print the plan
    python run_iris.py --output-dir runs/x --resume        # continue a killed run
    torchrun --nproc_per_node 2 run_iris.py ...            # data parallel (DDP; --fsdp for FSDP2)

Every option with its default and the default's source: `python run_iris.py --help`.
Read the algorithm in this order: `selfplay.run` → `selfplay.self_play_iteration` →
`trainer.train` → `trainer.accumulate_gradient` → `objectives.iris_loss`.

Bad input gives one line `error: ...` on stderr and exit code 2 before anything is written; a
run that must stop (a non-finite loss, a full disk) gives one line and exit code 1, leaving the
last good checkpoint intact; SIGTERM or SIGUSR1 (cluster preemption) saves the trainer state at
the next optimizer step and exits 128 + the signal (143, 138); Ctrl-C gives exit code 130.
Continue either with --resume (see iris_ref/errors.py).
"""

from __future__ import annotations

import os
import sys

# Options that may need the hub; without any of them the run is the embedded default.
_HUB_OPTIONS = ("--model", "--config", "--dataset", "--eval-dataset", "--eval_dataset", "--resume")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "-h" in argv or "--help" in argv:
        from iris_ref.config import format_help

        print(format_help(), end="")
        return 0
    if not any(arg.split("=")[0] in _HUB_OPTIONS for arg in argv):
        # The embedded default never needs the network; set before transformers is imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from iris_ref.config import ConfigError, parse_config

    try:
        config = parse_config(argv)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from iris_ref import distributed, preemption, selfplay
    from iris_ref.errors import InputError, Interrupted, TrainingFailure

    resume = f"continue with: --output-dir {config.output_dir} --resume"
    try:
        with preemption.installed():
            selfplay.run(config)
    except InputError as exc:
        return _fail(str(exc), 2)
    except TrainingFailure as exc:
        return _fail(str(exc), 1)
    except Interrupted as exc:
        return _fail(f"interrupted by {exc.name}; {resume}", exc.exit_code)
    except KeyboardInterrupt:
        return _fail(f"interrupted; {resume}", 130)
    finally:
        distributed.teardown_distributed()
    return 0


def _fail(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
