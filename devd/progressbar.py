"""Progress events rendered on stderr: a bar redrawn in place on a terminal, plain lines elsewhere.

An event may carry `done`/`total` (a bar) and `elapsed` (seconds). Standard library only: the
CLI imports this on every command.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

BAR_WIDTH = 24
# Without a terminal, a repeated message is printed at most this often (logs stay short).
PLAIN_EVERY = 10.0


class ProgressPrinter:
    """Callable per progress event; `clean` makes untrusted text safe for a terminal."""

    def __init__(self, clean: Callable[[str], str], stream: TextIO | None = None) -> None:
        self.clean = clean
        self._stream = stream
        self._open = False  # a redrawn line is on screen without its newline
        self._last: tuple[str, float] = ("", 0.0)

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __call__(self, event: dict[str, Any]) -> None:
        text = self.clean(f"  {event.get('phase', '')}: {event.get('message', '')}")
        counters = render_counters(event)
        if not counters:
            self._line(text)
        elif self.stream.isatty():
            import shutil  # only on a terminal: the CLI's imports stay minimal

            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\x1b[K" + f"{text} {counters}"[:width])
            self.stream.flush()
            self._open = True
        elif text != self._last[0] or time.monotonic() - self._last[1] >= PLAIN_EVERY:
            self._line(f"{text} {counters}", key=text)

    def _line(self, text: str, key: str | None = None) -> None:
        self.close()
        print(text, file=self.stream, flush=True)
        self._last = (key or text, time.monotonic())

    def close(self) -> None:
        """End a redrawn line, so what follows starts on a line of its own."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def render_counters(event: dict[str, Any]) -> str:
    """'[#####.....] 12/40 3.2 s' for done/total, '3.2 s' for elapsed only, else ''."""
    done, total, elapsed = event.get("done"), event.get("total"), event.get("elapsed")
    parts = []
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
        parts.append(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}")
    if isinstance(elapsed, (int, float)):
        parts.append(f"{elapsed:.1f} s")
    return " ".join(parts)
