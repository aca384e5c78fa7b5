"""Progress lines (count, rate, ETA, failures) and the closing summary for long stages."""

from __future__ import annotations

import os
import sys
import time


def format_duration(seconds: float) -> str:
    """Seconds as h:mm:ss (an ETA, an elapsed time)."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` with its noun in the right number: 1 failure, 0 failures, 1,281,167 images (`nouns`
    for an irregular plural: plural(2, "class", "classes"))."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def format_bytes(n: float) -> str:
    """A size in bytes as people read it: 812 bytes, 4.8 MB, 29.1 GB (powers of 1000)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


class Progress:
    """Prints `stage: done/total (pct) rate/s ETA h:mm:ss failures N` to stderr.

    On a terminal the line is redrawn in place; elsewhere (logs, CI) a new line is printed
    every `interval` seconds so that a log of a day-long build stays readable.
    """

    def __init__(self, stage: str, total: int | None, unit: str = "img", stream=None,
                 interval: float | None = None, enabled: bool = True, done: int = 0, failures: int = 0):
        self.stage = stage
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        if interval is None:
            interval = float(os.environ.get("IMGPREP_PROGRESS_INTERVAL", 0.5 if self.tty else 10.0))
        self.interval = interval
        self.enabled = enabled
        self.done = self.initial = done  # work finished before this run (a resumed build) counts
        self.failures = failures          # toward the total, not toward the rate
        self.start = time.perf_counter()
        self._last_print = self.start

    @property
    def elapsed(self) -> float:
        """Seconds since the stage started."""
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Units per second done in this run (work done before a resume does not count)."""
        return (self.done - self.initial) / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, n: int = 1, failures: int = 0) -> None:
        """Counts `n` more units done (`failures` of them failed); prints a line when one is due."""
        self.done += n
        self.failures += failures
        now = time.perf_counter()
        if self.enabled and now - self._last_print >= self.interval:
            self._last_print = now
            self._emit(self.line(), final=False)

    def line(self) -> str:
        """The progress line as it stands: count (of total), rate, ETA, failures."""
        parts = [f"{self.stage}: {self.done:,}"]
        if self.total:
            parts[0] += f"/{self.total:,} ({100.0 * self.done / self.total:.1f}%)"
        parts.append(f"{self.rate:,.0f} {self.unit}/s")
        if self.total and self.rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.done) / self.rate)}")
        parts.append(f"failures {self.failures:,}")
        return "  ".join(parts)

    def _emit(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, summary: str) -> None:
        """Ends the progress display with one summary line."""
        if self.enabled:
            if self.tty:
                self.stream.write("\r\x1b[K")
            self.stream.write(summary + "\n")
            self.stream.flush()
