"""Progress reporting: a one-line bar on an interactive terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
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
    ) -> None:
        self.total, self.start, self.done = total, start, start
        self.logger = logger or logging.getLogger(__name__)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.desc = desc
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def eta(self) -> float:
        """Seconds left at the current pace."""
        elapsed = time.perf_counter() - self.t0
        done = self.done - self.start
        return elapsed / done * (self.total - self.done) if done else float("nan")

    def line(self, stats: str = "") -> str:
        """``train 120/1000 [12%] loss 0.53 | 0:42 elapsed, ETA 5:01``."""
        pct = 100.0 * self.done / max(1, self.total)
        eta = self.eta()
        eta_text = format_duration(eta) if eta == eta else "?"
        elapsed = format_duration(time.perf_counter() - self.t0)
        return f"{self.desc} {self.done}/{self.total} [{pct:3.0f}%] {stats} | {elapsed} elapsed, ETA {eta_text}"

    def update(self, done: int, stats: str = "", *, log_line: bool = False) -> None:
        """Set the iteration count; redraw the bar, or emit a log line when ``log_line``."""
        self.done = done
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r\x1b[2K" + self.line(stats))
            self.stream.flush()
        elif log_line:
            self.logger.info(self.line(stats))

    def close(self) -> None:
        """End the bar's line."""
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
