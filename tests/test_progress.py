"""Progress lines a batch job can follow: at least every 10% and every `interval` seconds."""

import io

from iris_ref import progress
from iris_ref.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_every_tenth_and_every_interval_when_not_a_terminal(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stream = io.StringIO()  # not a terminal
    with Progress(1000, "generation", unit="prompts", interval=60, stream=stream, enabled=True) as bar:
        for i in range(1000):
            clock.now += 1.0 if i < 200 else 0.01
            bar.update()
    lines = stream.getvalue().splitlines()
    assert all(line.startswith("[iris] generation: ") and "prompts/s" in line for line in lines)
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert [d for d in done if d % 100 == 0] == list(range(100, 1001, 100))  # every 10%
    assert 160 in done  # 60 s after the 10% line, before the 20% one
    assert "ETA" in lines[0] and lines[-1].startswith("[iris] generation: 1000/1000 (100%)")


def test_a_terminal_gets_a_bar_and_other_ranks_stay_silent(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with Progress(10, "training", stream=stream, enabled=True) as bar:
        bar.update(10)
    assert "[iris]" not in stream.getvalue() and "training" in stream.getvalue()
    silent = io.StringIO()
    with Progress(10, "training", stream=silent, enabled=False) as bar:
        bar.update(10)
    assert silent.getvalue() == ""


def test_the_sft_warm_up_is_one_phase_across_its_epochs(tmp_path):
    """One counter, one elapsed time and one ETA for the whole warm-up, not one per epoch (issue 16)."""
    import re

    from tests.driver_helpers import SMALL, run_cli

    proc = run_cli(*SMALL, "--iters", "1", "--num-samples", "64", "--sft-epochs", "3", "--sft-patience", "3",
                   "--sft-validation-size", "0.25", "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    pattern = re.compile(r"\[iris\] SFT warm-up: (\d+)/(\d+) .* elapsed (\d+):(\d+)")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[iris] SFT warm-up")]
    found = [pattern.match(line) for line in lines]
    assert lines and all(found), lines
    done = [int(m.group(1)) for m in found]
    elapsed = [60 * int(m.group(3)) + int(m.group(4)) for m in found]
    assert {int(m.group(2)) for m in found} == {3 * 4}  # 3 epochs of 4 steps, one total
    assert done == sorted(done) and done[-1] == 12 and elapsed == sorted(elapsed)
    assert len(set(lines)) == len(lines)  # no repeated line
