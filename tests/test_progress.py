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
