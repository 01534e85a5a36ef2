"""The run folder: only folders this project created are ever deleted, and only its own files."""

import pytest

from iris_ref import rundir
from iris_ref.rundir import MARKER, RunDirError, check_output_dir, prepare


def make_run(path):
    prepare(path, check_output_dir(path, resume=False, overwrite=False), "{}\n")
    (path / "iter_0").mkdir()
    (path / "iter_0" / "COMPLETE").write_text("x")
    (path / "summary.json").write_text("{}")
    return path


def test_a_new_run_writes_its_marker_first(tmp_path):
    run = make_run(tmp_path / "run")
    assert (run / MARKER).is_file() and (run / "config.json").read_text() == "{}\n"
    assert rundir.is_run(run)


def test_overwrite_deletes_only_our_own_run(tmp_path):
    run = make_run(tmp_path / "run")
    assert check_output_dir(run, resume=False, overwrite=True) == "overwrite"
    prepare(run, "overwrite", "{\"new\": 1}\n")
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "config.json"]


@pytest.mark.parametrize("setup, fragment", [
    ("user_folder", "not created by iris-ref"),
    ("package_folder", "not created by iris-ref"),
    ("run_with_user_file", "did not write"),
    ("file", "is a file"),
])
def test_overwrite_refuses_and_touches_nothing(tmp_path, setup, fragment):
    if setup == "user_folder":
        target = tmp_path / "mine"
        target.mkdir()
        (target / "thesis.tex").write_text("years of work")
    elif setup == "package_folder":  # e.g. --output-dir iris_ref by mistake
        target = tmp_path / "iris_ref"
        target.mkdir()
        (target / "config.json").write_text("{}")  # even with a config.json
        (target / "iter_1").mkdir()
    elif setup == "run_with_user_file":
        target = make_run(tmp_path / "run")
        (target / "notes.md").write_text("mine")
    else:
        target = tmp_path / "a_file"
        target.write_text("x")
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(RunDirError, match=fragment) as info:
        check_output_dir(target, resume=False, overwrite=True)
    assert "\n" not in str(info.value)
    after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="add --resume to continue it, or --overwrite"):
        check_output_dir(run, resume=False, overwrite=False)
    assert check_output_dir(run, resume=True, overwrite=False) == "resume"
    assert check_output_dir(tmp_path / "new", resume=False, overwrite=True) == "fresh"
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", resume=False, overwrite=False) == "fresh"


def test_an_existing_run_is_resumed_only_when_it_computes_the_same(tmp_path):
    """The advice for a folder that holds a run: --resume only when it would be accepted (the
    saved config agrees outside RESUMABLE_CHANGES), else another --output-dir (issue 16)."""
    import json

    from functools import partial

    from iris_ref.config import parse_config, saved_differences

    run = tmp_path / "run"
    saved = parse_config(["--output-dir", str(run)]).to_dict()
    prepare(run, check_output_dir(run, resume=False, overwrite=False), json.dumps({"config": saved}))
    (run / "iter_0").mkdir()
    same = {**saved, "iters": 5, "threads": 2, "template_date": "2000-01-01"}  # resumable, or kept by a resume
    with pytest.raises(RunDirError, match="add --resume to continue it"):
        check_output_dir(run, resume=False, overwrite=False, differ=partial(saved_differences, config=same))
    other = parse_config(["--dataset", "mine.jsonl", "--loss", "spin", "--output-dir", str(run)]).to_dict()
    with pytest.raises(RunDirError) as info:
        check_output_dir(run, resume=False, overwrite=False, differ=partial(saved_differences, config=other))
    message = str(info.value)
    assert "already holds another run" in message and "--loss 'spin' (the run has 'iris')" in message
    assert "--dataset" in message and "choose another --output-dir (--overwrite would delete that run)" in message
    assert "--resume" not in message and "\n" not in message
    assert check_output_dir(run, resume=False, overwrite=True, differ=partial(saved_differences, config=other)) == "overwrite"  # as asked
    (run / "config.json").unlink()  # a run stopped before its config was written: --resume would be refused
    with pytest.raises(RunDirError, match="another run \\(its config.json cannot be read\\)"):
        check_output_dir(run, resume=False, overwrite=False, differ=partial(saved_differences, config=same))


def test_a_completed_iteration_drops_its_trainer_state_only_after_complete(tmp_path):
    it = rundir.iteration(tmp_path, 2)
    (it.trainer_state / "step_00000001").mkdir(parents=True)
    assert not it.complete
    it.mark_complete()
    assert it.complete and not it.trainer_state.exists()
