"""megatron.rectify.progress: the throttled stderr progress of the checkpoint tools."""

from __future__ import annotations

import io

from megatron.rectify.progress import Progress, format_bytes, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_are_throttled_and_show_count_bytes_rate_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("convert_hf.py import", interval=1.0, stream=out, clock=clock)
    progress.note("building the megatron model")
    progress.begin(total=40, total_bytes=4_000_000_000)
    for _ in range(10):  # 10 tensors in 0.625 s: under the interval, no line
        clock.now += 0.0625
        progress.advance(1, 100_000_000)
    assert out.getvalue() == "convert_hf.py import: building the megatron model\n"
    clock.now += 0.375  # 1.0 s, a quarter done: 3 s to go
    progress.advance(0)
    clock.now += 0.5
    progress.advance(1, 0)  # 0.5 s after the last line: throttled
    lines = out.getvalue().splitlines()
    assert lines[1:] == [
        "convert_hf.py import: 10/40 tensors (25.0%)  1.0 GB/4.0 GB  1.0 GB/s  ETA 3 s"
    ]
    clock.now += 0.5
    progress.advance(29, 3_000_000_000)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("convert_hf.py import: 40/40 tensors (100.0%)")
    assert progress.finish("filled") == "filled 40 tensors, 4.0 GB in 2.0 s (2.0 GB/s)"
    assert out.getvalue().splitlines()[-1] == (
        "convert_hf.py import: filled 40 tensors, 4.0 GB in 2.0 s (2.0 GB/s)"
    )


def test_quiet_prints_nothing_but_still_counts() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("upcycle", quiet=True, stream=out, clock=clock)
    progress.note("building")
    progress.begin(total=2)
    clock.now += 5
    progress.advance(2, 10)
    assert progress.finish() == "done 2 tensors, 10 B in 5.0 s (2 B/s)"
    assert out.getvalue() == ""


def test_terminal_rewrites_the_line_in_place_and_ends_it_before_the_next() -> None:
    clock, out = Clock(), Terminal()
    progress = Progress("export", stream=out, clock=clock)
    progress.begin(total_bytes=1000)  # tensor total unknown: the ETA comes from the bytes
    clock.now += 1
    progress.advance(1, 500)
    clock.now += 1
    progress.advance(1, 250)
    progress.finish("wrote")
    assert out.getvalue() == (
        "\rexport: 1 tensors (50.0%)  500 B/1.0 kB  500 B/s  ETA 1 s\x1b[K"
        "\rexport: 2 tensors (75.0%)  750 B/1.0 kB  375 B/s  ETA 1 s\x1b[K"
        "\nexport: wrote 2 tensors, 750 B in 2.0 s (375 B/s)\n"
    )


def test_formats() -> None:
    assert format_bytes(999) == "999 B"
    assert format_bytes(93_400_000_000) == "93.4 GB"
    assert format_duration(42.4) == "42 s"
    assert format_duration(187) == "3:07"
    assert format_duration(3723) == "1:02:03"
