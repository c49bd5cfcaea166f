"""A download progress line with size and rate: redrawn in place on a terminal, a few plain lines
(each quarter, and the end) when the stream is a file or a pipe (logs, CI)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    def __init__(self, label: str, total: int | None, *, done: int = 0, out: TextIO | None = None):
        self.label, self.total, self.done, self.start_done = label, total, done, done
        self.out = out or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.t0 = self.last_draw = time.monotonic()
        self.next_quarter = 1
        if done:
            self._line(f"{label}: resuming at {human(done)}" + (f" of {human(total)}" if total else ""))

    def _rate(self) -> float:
        return (self.done - self.start_done) / max(1e-6, time.monotonic() - self.t0)

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self.last_draw >= 0.1:
                self.last_draw = now
                pct = f" {100 * self.done / self.total:3.0f}%" if self.total else ""
                of = f"/{human(self.total)}" if self.total else ""
                self.out.write(f"\r{self.label}{pct} {human(self.done)}{of} {human(self._rate())}/s ")
                self.out.flush()
        elif self.total and self.done * 4 >= self.next_quarter * self.total and self.next_quarter < 4:
            while self.done * 4 >= self.next_quarter * self.total and self.next_quarter < 4:
                self.next_quarter += 1
            self._line(f"{self.label}: {human(self.done)} of {human(self.total)} ({human(self._rate())}/s)")

    def close(self) -> None:
        secs = time.monotonic() - self.t0
        text = f"{self.label}: {human(self.done)} in {secs:.1f} s ({human(self._rate())}/s)"
        if self.tty:
            self.out.write("\r" + text + " " * 10 + "\n")
            self.out.flush()
        else:
            self._line(text)
