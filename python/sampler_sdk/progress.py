"""A minimal progress bar for long downloads and loads: drawn only on a terminal, so
logs and pipes stay clean."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, label: str, total: int, *, enabled: bool = True, stream: Optional[TextIO] = None):
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._last_draw = 0.0

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[K{message}\n")
            self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(self.done / self.total, 1.0)
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        mb = self.done / 1e6
        self.stream.write(f"\r\x1b[K{self.label} [{bar}] {frac * 100:5.1f}% {mb:7.1f} MB")
        self.stream.flush()
