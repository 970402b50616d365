"""Progress of long work on stderr (submit, run, export, waiting on a job), never on stdout.

On a terminal the line is redrawn in place a few times a second. Elsewhere (a log file, CI) a
redrawn line would pile up as one endless line of carriage returns, so a new line is written only
every `LOG_INTERVAL_S`; the final line is always written. `--quiet` builds a disabled Progress.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from pipeline.printable import printable

BAR_WIDTH = 30
TTY_INTERVAL_S = 0.2
LOG_INTERVAL_S = 10.0


def bar(done: int, total: int) -> str:
    """`[#########.....................] 12/40`; a total of 0 shows a full bar."""
    filled = BAR_WIDTH * min(done, total) // total if total else BAR_WIDTH
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done:,}/{total:,}"


class Progress:
    """One progress line: `update()` as work goes, `finish()` once at the end."""

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._last = time.monotonic()  # nothing before the first interval: short work shows only its end

    def update(self, text: str) -> None:
        """Show `text` (after the label) if the last line is old enough."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < (TTY_INTERVAL_S if self._tty else LOG_INTERVAL_S):
            return
        self._last = now
        self._write(text, final=False)

    def note(self, text: str) -> None:
        """A line of its own between the progress lines (a warning), shown even when disabled: on a
        terminal it replaces the line being redrawn, which the next update draws again below it."""
        self._stream.write(("\r\x1b[K" if self._tty else "") + printable(text) + "\n")
        self._stream.flush()

    def finish(self, text: str) -> None:
        """The last line, always shown (unless disabled), ending the redrawn one."""
        if self.enabled:
            self._write(text, final=True)

    def _write(self, text: str, *, final: bool) -> None:
        line = printable(f"{self.label}: {text}")  # the label may name the user's file
        if self._tty:
            # Clear to the end of the line: a shorter text must not leave the old one's tail.
            self._stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
