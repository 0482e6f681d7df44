"""Progress as plain lines, for output that is not a terminal (a log file, a pipe, a CI console).

A terminal gets tqdm's bars; a file would get their carriage returns or nothing. A real model's step takes
seconds and its evaluation minutes, so a job writing to a file would look dead: `ProgressLines` prints a
line once a stage has run `every_s` seconds, then at most one every `every_s` seconds, and one at its end.
A stage shorter than that prints nothing (the default job's 45 runs of seconds each would otherwise
add a thousand lines to its log):

    [ce+cat] epoch 1/2: 12/75 steps (16 %), 3.4 s/step, ETA 3 min 34 s, loss 0.6931 ce 0.6931 cat 1.204
    [ce+cat] evaluating val: 96/400 examples (24 %), ETA 1 min 10 s

The rate counts only this stage's own work since it started, so a resumed epoch does not claim the
steps its checkpoint held as done in no time.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

# Seconds between lines: often enough that a stalled job shows within a minute, rarely enough that a log
# of a 5-hour real-model job stays a few thousand lines.
EVERY_S = 10.0


def duration(seconds: float) -> str:
    """`seconds` as people read it: 42 s, 3 min 34 s, 2 h 05 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """Lines `[label] stage: done/total unit (pct), rate, ETA, extra` every `every_s` seconds while
    `enabled`; a disabled one prints nothing (the terminal case, or --quiet, or not the main process)."""

    def __init__(self, label: str, stage: str, total: int, unit: str, *, enabled: bool, done: int = 0,
                 every_s: Optional[float] = None, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.stage, self.total, self.unit, self.enabled = label, stage, total, unit, enabled
        self.done, self._start_done = done, done
        self.every_s = EVERY_S if every_s is None else every_s  # read at each stage: tests shorten it
        self.stream, self.clock = stream, clock
        self._start = self._last = clock()
        self._printed = False

    def update(self, n: int = 1, extra: str = "") -> None:
        """`n` more done (at most the total: a last batch may be short); prints when `every_s` has passed
        since the last line, and once when the stage is done."""
        if self.done >= self.total:
            return
        self.done = min(self.total, self.done + n)
        now = self.clock()
        if self.enabled and (now - self._last >= self.every_s or (self.done >= self.total and self._printed)):
            self._last, self._printed = now, True
            self._print(self._status(now) + (f", {extra}" if extra else ""))

    def _status(self, now: float) -> str:
        text = f"{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f} %)"
        worked = self.done - self._start_done
        if worked <= 0:
            return text
        per_item = (now - self._start) / worked
        rate = f"{per_item:.1f} s/{self.unit.rstrip('s')}" if per_item >= 1 else f"{1 / max(per_item, 1e-9):.1f} {self.unit}/s"
        left = self.total - self.done
        return f"{text}, {rate}" + (f", ETA {duration(left * per_item)}" if left > 0 else
                                    f", {duration(now - self._start)}")

    def _print(self, text: str) -> None:
        print(f"[{self.label}] {self.stage}: {text}", file=self.stream or sys.stderr, flush=True)
