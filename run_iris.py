#!/usr/bin/env python
"""IRIS self-play fine-tuning from the command line (installed: `iris-run`).

    python run_iris.py                                     # embedded default: offline, CPU, a few minutes
    python run_iris.py --model Qwen/Qwen2.5-3B --iters 3   # paper-style run (GPU)
    python run_iris.py --config qwen2.5-3b --dry-run       # check a config, print the plan
    python run_iris.py --output-dir runs/x --resume        # continue a killed run
    torchrun --nproc_per_node 2 run_iris.py ...            # data parallel (DDP; --fsdp for FSDP2)

Every option with its default and the default's source: `python run_iris.py --help`.
The algorithm is in iris_ref/selfplay.py (`self_play_iteration`).
"""

import sys

from iris_ref.cli import main

if __name__ == "__main__":
    sys.exit(main())
