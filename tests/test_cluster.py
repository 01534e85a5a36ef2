"""What a shared cluster does to a run (issue 16): two processes on one folder, SIGTERM/SIGUSR1,
damaged files, full disks. Each run here is the tiny model on the toy task (tests/driver_helpers.py);
the stopped runs are resumed and must end exactly like an uninterrupted one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from iris_ref import files, rundir, selfplay, train_state
from iris_ref.config import parse_config
from iris_ref.errors import WriteError
from tests.driver_helpers import REPO, SMALL, comparable, run_cli, small_config

NO_PERIODIC_SAVE = ("--save-steps", "100")  # a state on disk then comes only from the signal


def strip(summary: dict) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "resumed_from_step"} for e in comparable(summary)]


def resume(run_dir, *extra):
    return selfplay.run(parse_config(["--output-dir", str(run_dir), "--resume", *extra]))


def tree(path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (its folder, its summary)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_dir, selfplay.run(small_config(run_dir, *NO_PERIODIC_SAVE))


# --- preemption -----------------------------------------------------------------------------------


def test_sigterm_at_a_training_step_saves_that_step_and_the_resume_matches(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, *NO_PERIODIC_SAVE, "--output-dir", str(run_dir), script="tests/crash_run.py",
                   env_extra={"SIGNAL_AT": "2:1:TERM"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: interrupted by SIGTERM; continue with: --output-dir {run_dir} --resume"
    state = run_dir / "iter_2" / "trainer_state"
    assert (state / "LATEST").read_text().strip() == "step_00000001"  # saved by the signal, not periodically
    assert files.verify_directory(state / "step_00000001") is None
    resumed = resume(run_dir)
    assert resumed["iterations"][2]["resumed_from_step"] == 1  # from the step the signal saved
    assert strip(resumed) == strip(reference[1])


def test_sigusr1_is_slurms_early_warning_with_its_own_exit_code(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, *NO_PERIODIC_SAVE, "--iters", "1", "--output-dir", str(run_dir),
                   script="tests/crash_run.py", env_extra={"SIGNAL_AT": "1:1:USR1"})
    assert proc.returncode == 138 and "interrupted by SIGUSR1" in proc.stderr.splitlines()[-1]
    assert (run_dir / "iter_1" / "trainer_state" / "LATEST").read_text().strip() == "step_00000001"


def test_sigterm_during_generation_stops_at_once_and_the_resume_matches(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, *NO_PERIODIC_SAVE, "--output-dir", str(run_dir), script="tests/crash_run.py",
                   env_extra={"SIGNAL_IN": "generation"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert (run_dir / "iter_0" / "COMPLETE").exists() and not (run_dir / "iter_1" / "synthetic.jsonl").exists()
    assert strip(resume(run_dir)) == strip(reference[1])


def test_sigterm_during_a_checkpoint_write_completes_it_and_training_is_not_redone(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, *NO_PERIODIC_SAVE, "--output-dir", str(run_dir), script="tests/crash_run.py",
                   env_extra={"SIGNAL_IN": "checkpoint"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    it = run_dir / "iter_1"
    assert files.verify_directory(it / "checkpoint") is None  # the write finished before the run stopped
    assert not any(p.name.startswith(".checkpoint.tmp-") for p in it.iterdir())
    assert not (it / "COMPLETE").exists()
    metrics_before = (it / "metrics.jsonl").read_text()
    resumed = resume(run_dir)
    assert (it / "metrics.jsonl").read_text() == metrics_before  # not trained again
    assert strip(resumed) == strip(reference[1])


# --- one run per folder ----------------------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_holder_and_nothing_is_touched(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    held = rundir.RunLock(run_dir)
    held.acquire()
    try:
        before = tree(run_dir)
        for argv in (["--output-dir", str(run_dir), "--resume", "--iters", "3"], [*SMALL, "--output-dir", str(run_dir)]):
            proc = run_cli(*argv)
            assert proc.returncode == 2
            line = proc.stderr.strip().splitlines()[-1]
            assert "in use by another iris-ref process" in line and f"PID {os.getpid()}" in line
            assert f"host {socket.gethostname()}" in line and "started " in line
        assert tree(run_dir) == before
    finally:
        held.release()


def test_a_lock_left_by_a_killed_process_does_not_block_the_resume(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    code = ("import os, signal, sys; sys.path.insert(0, %r); from iris_ref import rundir; "
            "rundir.RunLock(%r).acquire(); os.kill(os.getpid(), signal.SIGKILL)" % (str(REPO), str(run_dir)))
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert json.loads((run_dir / rundir.LOCK).read_text())["pid"] != os.getpid()  # it was held
    assert strip(resume(run_dir)) == strip(reference[1])


def test_two_identical_runs_on_one_folder_one_runs_one_is_refused(tmp_path, reference):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = [sys.executable, str(REPO / "run_iris.py"), *SMALL, *NO_PERIODIC_SAVE, "--output-dir", str(run_dir)]
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-500:] for o in outputs]
    loser = outputs[[p.returncode for p in procs].index(2)][1].strip().splitlines()[-1]
    assert "in use by another iris-ref process" in loser or "already holds a run" in loser
    for t in (1, 2):  # one process's steps, not two interleaved
        lines = (run_dir / f"iter_{t}" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len((reference[0] / f"iter_{t}" / "metrics.jsonl").read_text().splitlines())
    assert strip(json.loads((run_dir / "summary.json").read_text())) == strip(reference[1])


# --- damaged files ---------------------------------------------------------------------------------


def _flip(path, count: int, at: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[at + 97 * i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "8 flipped bytes"])
def test_a_damaged_checkpoint_is_named_and_its_iteration_made_again(tmp_path, reference, damage, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    weights = run_dir / "iter_2" / "checkpoint" / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        _flip(weights, 8)
    resumed = resume(run_dir)
    out = capsys.readouterr().out
    assert f"{weights.parent}: model.safetensors: its SHA-256 differs from the one recorded when it was written; " \
           "iteration 2 is made again from iteration 1's checkpoint" in out
    assert files.verify_directory(weights.parent) is None
    assert strip(resumed) == strip(reference[1])


@pytest.mark.parametrize("damage", ["16 flipped bytes in model.pt", "truncated optimizer.pt"])
def test_a_damaged_trainer_state_is_set_aside_and_the_iteration_restarts(tmp_path, reference, damage, capsys):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, *NO_PERIODIC_SAVE, "--output-dir", str(run_dir), script="tests/crash_run.py",
                   env_extra={"SIGNAL_AT": "2:1:TERM"})
    assert proc.returncode == 143
    state = run_dir / "iter_2" / "trainer_state" / "step_00000001"
    if damage.startswith("16"):
        _flip(state / "model.pt", 16, at=600)
    else:
        (state / "optimizer.pt").write_bytes((state / "optimizer.pt").read_bytes()[:100])
    # leftovers of killed writes go; anything else in the folder stays
    leftovers = [run_dir / "iter_2" / ".checkpoint.tmp-k1ll3d", run_dir / "iter_1" / "checkpoint.old"]
    for folder in leftovers:
        folder.mkdir()
    (run_dir / "iter_2" / ".synthetic.jsonl.abc123.tmp").write_text("half")
    (run_dir / "iter_2" / "notes.txt").write_text("mine")
    resumed = resume(run_dir)
    out = capsys.readouterr().out
    assert "the trainer state is set aside as damaged_step_00000001 and this phase restarts from its beginning" in out
    assert resumed["iterations"][2]["resumed_from_step"] == 0
    assert strip(resumed) == strip(reference[1])
    assert not any(p.exists() for p in leftovers) and not (run_dir / "iter_2" / ".synthetic.jsonl.abc123.tmp").exists()
    assert (run_dir / "iter_2" / "notes.txt").read_text() == "mine"


def test_a_damaged_reused_artefact_is_made_again_with_one_line(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    made = []

    def make():
        made.append(1)
        return [{"x": len(made)}]

    reuse = lambda: files.reuse_or_make(path, make, save=files.write_jsonl, load=files.read_jsonl, log=print)  # noqa
    assert reuse() == [{"x": 1}]
    assert reuse() == [{"x": 1}] and len(made) == 1  # reused: it is the file that was written
    path.write_text('{"x": 7}\n')  # altered (a flipped byte in a token id would look the same)
    assert reuse() == [{"x": 2}]
    assert "is not the file that was written (its SHA-256 differs); making it again" in capsys.readouterr().out


# --- full disks and other write errors -----------------------------------------------------------------


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device (ENOSPC)"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded (EDQUOT)"),
    (OSError(errno.EIO, "Input/output error"), "I/O error (EIO)"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied (EACCES)"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "no space left on the device (ENOSPC)"),
])
def test_write_errors_are_one_line_naming_the_path_and_the_cause(tmp_path, error, words):
    target = tmp_path / "state"

    def fail(_):
        raise error

    with pytest.raises(WriteError) as caught:
        files.atomic_write(target / "x.pt", fail)
    message = str(caught.value)
    assert message == f"cannot write {target / 'x.pt'}: {words}; what was there before is intact"
    assert list(target.iterdir()) == []  # the temporary file is gone


def test_torch_full_disk_message_is_translated(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_space", lambda path: 0)
    with pytest.raises(WriteError, match=r"no space left on the device \(ENOSPC\)"):
        with files.writing(tmp_path / "model.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError, match="something else"):  # not a write failure: not disguised as one
        with files.writing(tmp_path / "model.pt"):
            raise RuntimeError("something else")


def test_a_full_disk_during_a_state_save_keeps_the_previous_state(tmp_path, monkeypatch):
    from iris_ref.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer(), seed=0)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    save = lambda step: train_state.save(tmp_path, model, optimizer, scheduler, step=step, order=[], history=[],  # noqa
                                         fingerprint={})
    save(1)
    real = files.torch_save

    def full_disk(payload, path):
        if path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(payload, path)

    monkeypatch.setattr(files, "torch_save", full_disk)
    with pytest.raises(WriteError, match="no space left on the device"):
        save(2)
    assert train_state.latest(tmp_path).name == "step_00000001"
    assert files.verify_directory(tmp_path / "step_00000001") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_00000001"]


def _private_tmpfs_works() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _private_tmpfs_works(), reason="needs `unshare --mount` to mount a private tmpfs")
def test_a_run_on_a_small_file_system_stops_with_one_line_and_its_last_state_intact(tmp_path):
    """The real thing: a 12 MB tmpfs, mounted in a private mount namespace for this run only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    verify = ("import sys; sys.path.insert(0, %r); from pathlib import Path; from iris_ref import files; "
              "print('verified', [files.verify_directory(p) for p in Path(%r).glob('run/iter_*/checkpoint')])"
              % (str(REPO), str(disk)))
    script = (f"mount -t tmpfs -o size=12m tmpfs {disk} && "
              f"{sys.executable} {REPO / 'run_iris.py'} {' '.join(SMALL)} --output-dir {disk / 'run'}; "
              f"echo rc=$?; {sys.executable} -c \"{verify}\"")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert "rc=1" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-2000:]
    last = [line for line in proc.stderr.splitlines() if line.startswith("error:")][-1]
    assert last.startswith(f"error: cannot write {disk / 'run'}") and "no space left on the device (ENOSPC)" in last
    verified = [line for line in proc.stdout.splitlines() if line.startswith("verified")][-1]
    assert "verified [" in verified and "'" not in verified.split("[", 1)[1]  # every saved checkpoint is whole


# --- found by review: the warm-up, torchrun ranks, safetensors, the sidecar, the next iteration ---------

PATIENT = ("--sft-epochs", "3", "--sft-patience", "1")  # a warm-up with early stopping (the embedded default's kind)


@pytest.fixture(scope="module")
def patient_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("patient") / "run"
    return run_dir, selfplay.run(small_config(run_dir, *NO_PERIODIC_SAVE, *PATIENT, "--iters", "1"))


def test_a_damaged_warm_up_checkpoint_is_warmed_up_again(tmp_path, patient_reference, capsys):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, *PATIENT, "--iters", "1", "--output-dir", str(run_dir), script="tests/crash_run.py",
                   env_extra={"CRASH_AT": "1:1"})
    assert proc.returncode == 17, proc.stderr[-2000:]
    _flip(run_dir / "iter_0" / "checkpoint" / "model.safetensors", 8)
    resumed = resume(run_dir)
    assert "iteration 0 is made again" in capsys.readouterr().out
    assert strip(resumed) == strip(patient_reference[1])


def test_a_damaged_warm_up_trainer_state_is_set_aside(tmp_path, patient_reference, capsys):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, *PATIENT, "--iters", "1", "--output-dir", str(run_dir), script="tests/crash_run.py",
                   env_extra={"CRASH_AT": "0:3"})
    assert proc.returncode == 17, proc.stderr[-2000:]
    state = train_state.latest(run_dir / "iter_0" / "trainer_state")
    (state / "trainer.pt").write_bytes((state / "trainer.pt").read_bytes()[:100])
    resumed = resume(run_dir)
    assert "is set aside as damaged_" in capsys.readouterr().out
    assert strip(resumed) == strip(patient_reference[1])


def test_a_damaged_checkpoint_discards_what_the_next_iteration_began_from_it(tmp_path, reference, capsys):
    run_dir = tmp_path / "run"
    proc = run_cli(*SMALL, "--output-dir", str(run_dir), script="tests/crash_run.py", env_extra={"CRASH_AT": "2:1"})
    assert proc.returncode == 17
    assert (run_dir / "iter_2" / "synthetic.jsonl").exists()
    _flip(run_dir / "iter_1" / "checkpoint" / "model.safetensors", 8)
    stale = (run_dir / "iter_2" / "synthetic.jsonl").stat().st_mtime_ns
    resumed = resume(run_dir)
    assert "iteration 1 is made again" in capsys.readouterr().out
    assert (run_dir / "iter_2" / "synthetic.jsonl").stat().st_mtime_ns != stale  # sampled again, from the new θ_1
    assert strip(resumed) == strip(reference[1])


def test_only_rank_0_probes_the_lock(tmp_path, monkeypatch):
    """The ranks of one job must not refuse each other: only rank 0 probes, the others hear it."""
    from iris_ref import distributed

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, src=0: None)
    monkeypatch.setattr(rundir.RunLock, "held_elsewhere", lambda self: pytest.fail("a non-zero rank probed"))
    assert rundir.check_output_dir(tmp_path / "run", resume=False, overwrite=False) == "fresh"


def test_a_full_disk_while_safetensors_writes_is_one_line(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(WriteError, match=r"no space left on the device \(ENOSPC\)"):
        with files.writing(tmp_path / "checkpoint"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_stop_during_an_artefact_write_keeps_the_file_and_its_record(tmp_path, monkeypatch):
    """A signal while a reused artefact is written: the file and its .sha256 both land, so the
    resume reuses it (generation is not redone)."""
    from iris_ref import preemption
    from iris_ref.errors import Interrupted

    path = tmp_path / "rows.jsonl"
    monkeypatch.setattr(preemption, "_pending", signal.SIGTERM)  # as if it arrived during the write
    with pytest.raises(Interrupted):
        files.reuse_or_make(path, lambda: [{"x": 1}], save=files.write_jsonl, load=files.read_jsonl)
    monkeypatch.setattr(preemption, "_pending", None)
    made = []
    again = files.reuse_or_make(path, lambda: made.append(1) or [{"x": 2}], save=files.write_jsonl,
                                load=files.read_jsonl)
    assert again == [{"x": 1}] and made == []
