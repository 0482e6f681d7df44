"""Progress lines for output that is not a terminal: when they print, what they say, and that a job
writing to a pipe gets them (while --quiet silences them)."""
from __future__ import annotations

import io

from causalattn.lab.training.progress import ProgressLines, duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_line_per_interval_then_one_at_the_end():
    clock, stream = FakeClock(), io.StringIO()
    progress = ProgressLines("ce+cat", "epoch 1/2", 10, "steps", enabled=True, every_s=10, stream=stream, clock=clock)
    for _ in range(9):
        clock.now += 3.0  # 3 s a step: a line every fourth step
        progress.update(extra="loss 0.5")
    clock.now += 3.0
    progress.update()
    text = lines_of(stream)
    assert text[0] == "[ce+cat] epoch 1/2: 4/10 steps (40 %), 3.0 s/step, ETA 18 s, loss 0.5"
    assert text[1].startswith("[ce+cat] epoch 1/2: 8/10 steps (80 %), 3.0 s/step, ETA 6 s")
    assert text[-1] == "[ce+cat] epoch 1/2: 10/10 steps (100 %), 3.0 s/step, 30 s"
    assert len(text) == 3


def test_a_stage_shorter_than_the_interval_prints_nothing():
    clock, stream = FakeClock(), io.StringIO()
    progress = ProgressLines("ce", "epoch 1/2", 3, "steps", enabled=True, every_s=10, stream=stream, clock=clock)
    for _ in range(3):
        clock.now += 1.0
        progress.update()
    assert stream.getvalue() == ""


def test_a_resumed_stage_rates_only_its_own_work_and_counts_never_pass_the_total():
    clock, stream = FakeClock(), io.StringIO()
    progress = ProgressLines("ce", "evaluating iid", 100, "examples", enabled=True, done=50, every_s=0,
                             stream=stream, clock=clock)
    clock.now += 5.0
    progress.update(32)  # 32 examples in 5 s
    clock.now += 5.0
    progress.update(32)  # a last batch that would overshoot
    progress.update(32)  # nothing after the end
    text = lines_of(stream)
    assert text[0] == "[ce] evaluating iid: 82/100 examples (82 %), 6.4 examples/s, ETA 3 s"
    assert text[1] == "[ce] evaluating iid: 100/100 examples (100 %), 5.0 examples/s, 10 s"
    assert len(text) == 2


def test_disabled_lines_print_nothing():
    stream = io.StringIO()
    progress = ProgressLines("ce", "epoch 1/1", 3, "steps", enabled=False, every_s=0, stream=stream)
    progress.update()
    progress.update(2)
    assert stream.getvalue() == ""


def test_durations_read_as_people_read_them():
    assert [duration(s) for s in (0, 42.4, 214, 7500)] == ["0 s", "42 s", "3 min 34 s", "2 h 05 min"]
