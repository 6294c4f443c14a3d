"""Progress of long work on stderr: on a terminal one line, rewritten in place at most a few times
a second; elsewhere (a log file, a batch job, a notebook's captured stream) a line every 30 s."""
from __future__ import annotations

import sys
import time
from typing import Optional


class ProgressLine:
    """``report(done, total, note)``: a bar when the total is known, else a count, with the elapsed
    time and a note (an estimate so far); ``add(count, note)`` counts on where the total is not
    known; ``close()`` draws the last state and ends the line. ``unit`` names what is counted."""
    INTERVAL = 0.5  # seconds between redraws on a terminal
    LOG_INTERVAL = 30.0  # between lines elsewhere, where "\r" does not rewrite but piles up on one line

    def __init__(self, label: str, unit: str = "Hessian-vector products"):
        self.label, self.unit, self.start, self.shown = label, unit, time.perf_counter(), 0.0
        self.state = (0, None, "")  # done, total, note
        self.terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())

    def __call__(self, done: int, total: Optional[int] = None, note: str = "", force: bool = False) -> None:
        self.state = (done, total, note)
        interval = self.INTERVAL if self.terminal else self.LOG_INTERVAL
        if force or (done == total and self.terminal) or time.perf_counter() - self.shown >= interval:
            self._draw()

    def add(self, count: int, note: str = "") -> None:
        """``count`` more done, of a total not known in advance."""
        self(self.state[0] + count, note=note)

    def close(self) -> None:
        if self.shown:
            self._draw()
            if self.terminal:
                print(file=sys.stderr, flush=True)

    def _draw(self) -> None:
        done, total, note = self.state
        self.shown = now = time.perf_counter()
        if total:
            filled = int(30 * min(done, total) / total)
            count = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
        else:
            count = str(done)
        note = f"; {note}" if note else ""
        line = f"{count} {self.unit} ({self.label}, {now - self.start:.1f} s{note})"
        if self.terminal:
            print(f"\r{line}  ", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
