"""Progress of a long audit: a live bar on a terminal, periodic log lines otherwise (CI, `ray job logs`)."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Pairs done out of the total, pairs/s, ETA and failures.

    Args:
        total_pairs: pairs in the whole plan.
        already_done: pairs of shards committed by an earlier run (counted done, not in the rate).
        interval_s: seconds between log lines when the stream is not a terminal.
        stream: where to print (stderr by default).
        clock: injectable for tests.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> progress = Progress(total_pairs=10, already_done=0, interval_s=0, stream=out)
        >>> progress.update(done_pairs=5, failures=1)
        >>> "5/10 pairs" in out.getvalue()
        True
    """

    def __init__(
        self,
        *,
        total_pairs: int,
        already_done: int,
        interval_s: float,
        stream: Optional[TextIO] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total_pairs
        self.base = already_done
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.last_print = float("-inf")
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = already_done
        self.failures = 0

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = (self.done - self.base) / elapsed
        remaining = self.total - self.done
        eta = remaining / rate if rate > 0 else None
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.done}/{self.total} pairs ({percent:5.1f}%)  {rate:7.1f} pairs/s  "
            f"ETA {format_duration(eta if remaining else 0)}  failures {self.failures}"
        )

    def update(self, *, done_pairs: int, failures: int, force: bool = False) -> None:
        self.done = self.base + done_pairs
        self.failures = failures
        now = self.clock()
        if self.live:
            width = 30
            filled = int(width * self.done / self.total) if self.total else width
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {self.line()}")
            self.stream.flush()
        elif force or now - self.last_print >= self.interval_s:
            self.stream.write(f"[ssim_ray] {self.line()}\n")
            self.stream.flush()
            self.last_print = now

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
        else:
            self.update(done_pairs=self.done - self.base, failures=self.failures, force=True)
