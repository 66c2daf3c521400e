"""Progress reporting: a one-line bar on an interactive terminal, periodic log lines otherwise.

Off a terminal the first line does not wait for the caller's first periodic one: it comes with the first update at
least ``first_line_after`` seconds (2) after the start, i.e. after the first iteration when iterations are slow, so
a long run shows its pace and ETA within seconds. The pace leaves out the first iteration once there are others
(it also pays for starting the loader workers and first allocations); when the first line could only time the first
iteration, the next update logs a second line with the corrected pace.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; ``65`` -> ``1:05``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Iteration counter with ETA.

    Args:
        total: Number of iterations.
        start: Iterations already done (resume).
        logger: Where plain lines go when the stream is not a terminal.
        stream: The terminal stream (stderr by default).
        enabled: False silences the bar (non-main processes).
        desc: Prefix of each line.
        first_line_after: Off a terminal, the first update this many seconds after the start logs a line even
            without ``log_line``; None waits for the caller's first ``log_line``.
        clock: Seconds counter (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        start: int = 0,
        *,
        logger: logging.Logger | None = None,
        stream: TextIO | None = None,
        enabled: bool = True,
        desc: str = "train",
        first_line_after: float | None = 2.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total, self.start, self.done = total, start, start
        self.logger = logger or logging.getLogger(__name__)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.desc = desc
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.first_line_after = first_line_after
        self.clock = clock
        self.t0 = clock()
        self.first: tuple[int, float] | None = None  # (count, time) at the first update past ``start``
        self.lines = 0
        self.paced_by_first = False  # the only line so far timed the first iteration alone

    def seconds_per_item(self) -> float:
        """Current pace: since the first update once later ones exist (the first pays the start-up), else since
        the start; NaN before the first update."""
        now = self.clock()
        if self.first is not None and self.done > self.first[0]:
            return (now - self.first[1]) / (self.done - self.first[0])
        done = self.done - self.start
        return (now - self.t0) / done if done > 0 else float("nan")

    def eta(self) -> float:
        """Seconds left at the current pace."""
        return self.seconds_per_item() * (self.total - self.done)

    def line(self, stats: str = "") -> str:
        """``train 120/1000 [12%] loss 0.53 | 0:42 elapsed, 0.35 s/it, ETA 5:01``."""
        pct = 100.0 * self.done / max(1, self.total)
        pace = self.seconds_per_item()
        eta = pace * (self.total - self.done)
        eta_text = format_duration(eta) if eta == eta else "?"
        pace_text = f"{pace:.3g} s/it" if pace == pace else "? s/it"
        elapsed = format_duration(self.clock() - self.t0)
        head = f"{self.desc} {self.done}/{self.total} [{pct:3.0f}%] {stats}".rstrip()
        return f"{head} | {elapsed} elapsed, {pace_text}, ETA {eta_text}"

    def update(self, done: int, stats: str = "", *, log_line: bool = False) -> None:
        """Set the iteration count; redraw the bar, or emit a log line when ``log_line`` or when the first line is
        due (see the module docstring)."""
        if self.first is None and done > self.start:
            self.first = (done, self.clock())
        self.done = done
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r\x1b[2K" + self.line(stats))
            self.stream.flush()
        elif log_line or self._early_line_due():
            self.logger.info(self.line(stats))
            self.lines += 1
            self.paced_by_first = self.lines == 1 and self.first is not None and self.done == self.first[0]

    def _early_line_due(self) -> bool:
        """The first line (``first_line_after`` seconds in), or a second one when the first timed one iteration."""
        if self.first_line_after is None or self.first is None:
            return False
        if self.lines == 0:
            return self.clock() - self.t0 >= self.first_line_after
        return self.lines == 1 and self.paced_by_first and self.done > self.first[0]

    def close(self) -> None:
        """End the bar's line."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
