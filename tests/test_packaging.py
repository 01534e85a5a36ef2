"""`pip install .` gives a package that works from any folder: the CLI (`iris-run` / `run_iris`),
the embedded default's data and configs, and the audit's golden vectors are all in the wheel."""

import os
import subprocess
import sys
import zipfile

from tests.driver_helpers import REPO


def test_the_wheel_runs_from_another_folder(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("iris_ref-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("run_iris.py", "iris_ref/configs/tiny.yaml", "iris_ref/configs/qwen2.5-3b.yaml",
                     "iris_ref/toy_data/train.jsonl", "iris_ref/golden/iris.json"):
        assert expected in names, expected
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "iris-run = run_iris:main" in entry_points and "iris-audit = iris_ref.audit:main" in entry_points
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def run(*code):
        return subprocess.run([sys.executable, *code], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    plan = run("-c", "import sys, run_iris; sys.exit(run_iris.main(['--dry-run', '--config', 'qwen2.5-3b', "
                     "'--model', '" + str(REPO / "no-such-model") + "']))")
    assert plan.returncode == 2 and "unknown model" in plan.stderr  # the shipped config by name was found
    plan = run("-c", "import sys, run_iris; sys.exit(run_iris.main(['--dry-run']))")
    assert plan.returncode == 0 and "1800 prompts" in plan.stdout, plan.stderr[-2000:]  # the toy data shipped
    assert str(target) in run("-c", "import iris_ref; print(iris_ref.__file__)").stdout  # not the checkout
    audit = run("-m", "iris_ref.audit", "--impl", "iris_ref.objectives:iris_loss", "--objective", "iris")
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
