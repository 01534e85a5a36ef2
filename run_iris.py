#!/usr/bin/env python
"""IRIS self-play fine-tuning from the command line.

    python run_iris.py                                    # embedded default: offline, CPU, ~2 minutes
    python run_iris.py --model Qwen/Qwen2.5-3B --iters 3  # paper-style run (GPU)
    python run_iris.py --config configs/qwen2.5-3b.yaml --learning-rate 1e-7
    torchrun --nproc_per_node 2 run_iris.py ...           # data parallel (DDP)

Options and defaults: `python run_iris.py --help` and docs/usage.md. Bad input gives one line
`error: ...` on stderr and exit code 2 before anything heavy runs; a run that must stop (e.g. a
non-finite loss) gives one line and exit code 1, leaving the last good checkpoint intact.
"""

from __future__ import annotations

import os
import sys

# Offline by default: the embedded default and the tests never need the hub. A user who wants
# to download a model sets HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from iris_ref.config import build_parser

        build_parser().print_help()
        return 0
    if not any(arg.split("=")[0] in ("--model", "--config", "--dataset", "--eval-dataset", "--eval_dataset") for arg in argv):
        # The embedded default never needs the network; set before transformers is imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from iris_ref.config import ConfigError, parse_config

    try:
        config = parse_config(argv)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from iris_ref import distributed, selfplay

    try:
        selfplay.run(config)
    except selfplay.InputError as exc:
        return _fail(str(exc), 2)
    except selfplay.TrainingFailure as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted; continue with --resume", 130)
    finally:
        distributed.teardown_distributed()
    return 0


def _fail(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
