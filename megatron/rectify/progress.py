"""Throttled progress lines on stderr for the long-running tools (``tools/checkpoint``).

One :class:`Progress` per tool run: :meth:`Progress.note` prints a phase line now ("building
the model"); :meth:`Progress.begin` / :meth:`Progress.advance` count items and bytes and show
``done/total``, rate and ETA at most once per ``interval`` seconds (rewritten in place on a
terminal, one line per interval otherwise, as ``tools/preprocess_data.py`` does);
:meth:`Progress.finish` prints one summary line. ``quiet`` prints nothing (errors are the
caller's, and still print).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_bytes(nbytes: float) -> str:
    """Decimal units, as ``preprocess_data.py`` prints MB: ``512 B``, ``1.5 kB``, ``93.4 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def format_duration(seconds: float) -> str:
    """``42 s``, ``3:07``, ``1:02:03`` (h:mm:ss)."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress of one tool run on ``stream`` (default stderr); see the module docstring."""

    def __init__(
        self,
        label: str,
        quiet: bool = False,
        interval: float = 1.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.quiet = quiet
        self.interval = interval
        self.stream = stream
        self.clock = clock
        self._in_place = False  # a progress line not yet ended by a newline (terminal only)
        self.begin()

    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _write(self, line: str, in_place: bool = False) -> None:
        if self.quiet:
            return
        out = self._out
        tty = out.isatty()
        if tty and in_place:
            out.write(f"\r{self.label}: {line}\x1b[K")
        else:
            if self._in_place:
                out.write("\n")
            out.write(f"{self.label}: {line}\n")
        out.flush()
        self._in_place = tty and in_place

    def note(self, message: str) -> None:
        """A phase line, shown now."""
        self._write(message)

    def begin(
        self, total: int | None = None, total_bytes: int | None = None, unit: str = "tensors"
    ) -> None:
        """Start counting ``unit`` (``total`` of them, ``total_bytes`` bytes, when known)."""
        self.total, self.total_bytes, self.unit = total, total_bytes, unit
        self.done = self.bytes = 0
        self.started = self.last = self.clock()

    def advance(self, count: int = 1, nbytes: int = 0) -> None:
        self.done += count
        self.bytes += nbytes
        now = self.clock()
        if self.interval > 0 and now - self.last >= self.interval:
            self.last = now
            self._write(self.status(now), in_place=True)

    def _fraction(self) -> float | None:
        if self.total_bytes:
            return min(self.bytes / self.total_bytes, 1.0)
        if self.total:
            return min(self.done / self.total, 1.0)
        return None

    def status(self, now: float | None = None) -> str:
        """``12/40 tensors (30.0%)  1.2/4.0 GB  350.0 MB/s  ETA 0:08``."""
        elapsed = max((self.clock() if now is None else now) - self.started, 1e-9)
        count = f"{self.done:,}" + (f"/{self.total:,}" if self.total else "")
        parts = [f"{count} {self.unit}"]
        fraction = self._fraction()
        if fraction is not None:
            parts[0] += f" ({100 * fraction:.1f}%)"
        if self.bytes or self.total_bytes:
            size = format_bytes(self.bytes)
            if self.total_bytes:
                size += f"/{format_bytes(self.total_bytes)}"
            parts += [size, f"{format_bytes(self.bytes / elapsed)}/s"]
        if fraction:  # not None and > 0
            parts.append(f"ETA {format_duration(elapsed * (1 - fraction) / fraction)}")
        return "  ".join(parts)

    def finish(self, verb: str = "done") -> str:
        """The summary line of the counted phase (also returned, even when quiet)."""
        elapsed = max(self.clock() - self.started, 1e-9)
        line = f"{verb} {self.done:,} {self.unit}"
        if self.bytes:
            rate = format_bytes(self.bytes / elapsed)
            line += f", {format_bytes(self.bytes)} in {elapsed:.1f} s ({rate}/s)"
        else:
            line += f" in {elapsed:.1f} s"
        self._write(line)
        return line
