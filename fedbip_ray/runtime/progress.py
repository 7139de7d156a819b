"""Progress inside a round: clients finished per phase, elapsed seconds and an estimate. On a
terminal one live line is redrawn; otherwise (``ray job submit`` logs, files) a plain line is
printed at most every ``interval_s`` seconds and when a phase ends."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def progress_text(rnd: int, rounds: int, phase: str, done: int, total: int,
                  elapsed: float) -> str:
    """``round 3/10 fit 4/12 clients  35s  ~70s left`` (no estimate before the first call)."""
    text = f"round {rnd}/{rounds} {phase} {done}/{total} clients  {elapsed:.0f}s"
    if 0 < done < total:
        text += f"  ~{elapsed / done * (total - done):.0f}s left"
    return text


def bar(done: int, total: int, width: int = 20) -> str:
    """``[#####---------------]``."""
    filled = width * done // total if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class PhaseProgress:
    """Reports one phase at a time: :meth:`start`, :meth:`update` per finished call, then
    :meth:`finish`. ``live`` defaults to whether ``stream`` is a terminal."""

    def __init__(self, rounds: int, stream: TextIO | None = None, live: bool | None = None,
                 interval_s: float = 30.0) -> None:
        self.rounds = rounds
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval_s = interval_s
        self._phase, self._rnd, self._total, self._done = "", 0, 0, 0
        self._t0 = self._last = 0.0

    def start(self, rnd: int, phase: str, total: int) -> None:
        self._phase, self._rnd, self._total, self._done = phase, rnd, total, 0
        self._t0 = self._last = time.monotonic()
        if self.live:
            self._draw()

    def update(self, done: int) -> None:
        self._done = done
        now = time.monotonic()
        if self.live:
            self._draw()
        elif now - self._last >= self.interval_s:
            self._print()
            self._last = now

    def finish(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
        elif time.monotonic() - self._t0 >= self.interval_s:
            self._print()  # a long phase ends with its final count

    def _text(self) -> str:
        return progress_text(self._rnd, self.rounds, self._phase, self._done, self._total,
                             time.monotonic() - self._t0)

    def _draw(self) -> None:
        self.stream.write(f"\r\033[K{bar(self._done, self._total)} {self._text()}")
        self.stream.flush()

    def _print(self) -> None:
        self.stream.write(self._text() + "\n")
        self.stream.flush()
