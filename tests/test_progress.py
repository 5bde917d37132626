"""Progress lines: pairs done and total, pairs/s, ETA, failures; a bar on a TTY, log lines elsewhere."""

from __future__ import annotations

import io

from ssim_ray.progress import Progress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_have_rate_eta_and_failures_and_respect_interval():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(total_pairs=1000, already_done=200, interval_s=10, stream=out, clock=clock)
    clock.now += 4
    progress.update(done_pairs=100, failures=3)  # 100 new pairs in 4 s: 25 pairs/s, 700 left: 28 s
    line = out.getvalue()
    assert "300/1000 pairs" in line and "25.0 pairs/s" in line and "ETA 0m28s" in line
    assert "failures 3" in line
    clock.now += 1
    progress.update(done_pairs=150, failures=3)  # within the interval: no new line
    assert out.getvalue().count("\n") == 1
    clock.now += 10
    progress.update(done_pairs=400, failures=4)
    assert out.getvalue().count("\n") == 2


def test_live_bar_rewrites_one_line_on_a_terminal():
    clock, out = FakeClock(), FakeTty()
    progress = Progress(total_pairs=10, already_done=0, interval_s=10, stream=out, clock=clock)
    clock.now += 1
    progress.update(done_pairs=5, failures=0)
    progress.update(done_pairs=10, failures=0)
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "[" + "#" * 30 + "]" in text


def test_format_duration():
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(59.6) == "1m00s"
    assert format_duration(None) == "?"
