"""Two gloo processes on CPU (DDP and FSDP2) train exactly like one process with the same global batch.

Each run (tests/dist_worker.py) trains the float64 tiny model for 4 IRIS optimizer steps with
global batch 8, stopping after step 2 and resuming from the saved trainer state, and saves a
full Hugging Face checkpoint on rank 0. The reference is one process with micro-batches of the
same size as the distributed runs' (so every forward sees the same padded batch): the same
per-step losses and the same final weights are expected up to float64 rounding of the
gradient sums.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
REPO = WORKER.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, strategy: str, micro: int, nproc: int, part: str = "both") -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker_args = [str(WORKER), "--strategy", strategy, "--micro", str(micro), "--out", str(out), "--part", part]
    if nproc == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *worker_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    if part == "first":
        return {}
    result = json.loads((out / "result.json").read_text())
    result["weights"] = load_file(out / "checkpoint" / "model.safetensors")
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    # micro-batch 2 x accumulation 4 x 1 process = 8
    return _run(tmp_path_factory.mktemp("single"), "none", micro=2, nproc=1)


@pytest.fixture(scope="module")
def single_micro4(tmp_path_factory):
    # micro-batch 4 x accumulation 2 x 1 process = 8 (the FSDP run's micro-batch size)
    return _run(tmp_path_factory.mktemp("single4"), "none", micro=4, nproc=1)


def _compare(distributed: dict, reference: dict) -> None:
    assert distributed["world_size"] == 2 and reference["world_size"] == 1
    assert distributed["resumed_from_step"] == 2  # the second call resumed from the saved state
    steps = [r["step"] for r in distributed["records"]]
    assert steps == [1, 2, 3, 4] == [r["step"] for r in reference["records"]]
    for got, want in zip(distributed["records"], reference["records"]):
        for key in ("loss", "rewards/margins", "weights/ess_real", "weights/ess_synthetic", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (got["step"], key)
    # Opponent log-probs scored across ranks (uneven shares) come back complete and in order.
    torch.testing.assert_close(torch.tensor(distributed["opponent_real"]), torch.tensor(reference["opponent_real"]),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.tensor(distributed["opponent_synthetic"]),
                               torch.tensor(reference["opponent_synthetic"]), rtol=0, atol=1e-9)
    assert distributed["weights"].keys() == reference["weights"].keys()
    for name, want in reference["weights"].items():
        torch.testing.assert_close(distributed["weights"][name], want, rtol=1e-9, atol=1e-9, msg=name)


def test_training_moved_the_weights(single, single_micro4):
    """The comparison below is only meaningful if the runs trained, and the run is batching-invariant."""
    from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer

    start = build_tiny_model(build_tiny_tokenizer(), seed=0).double().state_dict()
    moved = max(float((single["weights"][k] - start[k]).abs().max()) for k in single["weights"])
    assert moved > 1e-4
    assert single["records"][-1]["rewards/margins"] != single["records"][0]["rewards/margins"]
    for got, want in zip(single_micro4["records"], single["records"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)


def test_ddp_two_processes_match_one_process(tmp_path, single):
    # micro-batch 2 x accumulation 2 x 2 ranks = 8: the scoring pass + all_gather path
    _compare(_run(tmp_path, "ddp", micro=2, nproc=2), single)


def test_fsdp2_two_processes_match_one_process(tmp_path, single_micro4):
    # micro-batch 4 x accumulation 1 x 2 ranks = 8: the one-pass path, sharded parameters
    _compare(_run(tmp_path, "fsdp", micro=4, nproc=2), single_micro4)


def test_a_state_saved_by_two_ranks_resumes_in_one_process(tmp_path, single):
    """The number of processes is not part of the trainer state: the data order and the
    micro-batches do not depend on it, so two DDP ranks stop after step 2 and one process
    finishes the iteration on the same trajectory."""
    _run(tmp_path, "ddp", micro=2, nproc=2, part="first")
    resumed = _run(tmp_path, "none", micro=2, nproc=1, part="second")
    assert resumed["resumed_from_step"] == 2
    for got, want in zip(resumed["records"], single["records"][2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
    for name, want in single["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], want, rtol=1e-9, atol=1e-9, msg=name)
