"""Progress events rendered on stderr: one status line redrawn in place on a terminal, plain
lines elsewhere (as docker buildx's tty and plain modes).

On a terminal each event replaces the line before, which stays on screen only if it was
there for KEEP_AFTER seconds (a phase that took a while) or is a warning; a 0.5 s provision
ends as one or two lines, not eight. `verbose` (`-v`) and a pipe or log keep every line.
An event may carry `done`/`total` (a bar), `elapsed` (seconds) and `level` ("warning").
Standard library only: the CLI imports this on every command.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

BAR_WIDTH = 24
# Without a terminal, a repeated message is printed at most this often (logs stay short).
PLAIN_EVERY = 10.0
# On a terminal, a status line shown this long (seconds) is kept when the next one comes.
KEEP_AFTER = 0.3


class ProgressPrinter:
    """Callable per progress event; `clean` makes untrusted text safe for a terminal."""

    def __init__(self, clean: Callable[[str], str], stream: TextIO | None = None,
                 verbose: bool = False) -> None:
        self.clean = clean
        self._stream = stream
        self.verbose = verbose
        self._open = False  # a redrawn line is on screen without its newline
        self._last: tuple[str, float] = ("", 0.0)
        self._shown: tuple[str, float] = ("", 0.0)  # the redrawn line's text, since when

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __call__(self, event: dict[str, Any]) -> None:
        text = self.clean(f"  {event.get('phase', '')}: {event.get('message', '')}")
        counters = render_counters(event)
        if event.get("level") == "warning":
            self._line(text)
        elif self.stream.isatty() and (counters or not self.verbose):
            self._redraw(text, counters)
        elif not counters:
            self._line(text)
        elif text != self._last[0] or time.monotonic() - self._last[1] >= PLAIN_EVERY:
            self._line(f"{text} {counters}", key=text)

    def _redraw(self, text: str, counters: str) -> None:
        import shutil  # only on a terminal: the CLI's imports stay minimal

        now = time.monotonic()
        if text != self._shown[0]:
            if self._open and now - self._shown[1] >= (0.0 if self.verbose else KEEP_AFTER):
                self.close()  # a phase that took a while stays on screen
            self._shown = (text, now)
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r\x1b[K" + f"{text} {counters}".rstrip()[:width])
        self.stream.flush()
        self._open = True

    def _line(self, text: str, key: str | None = None) -> None:
        self.close()
        print(text, file=self.stream, flush=True)
        self._last = (key or text, time.monotonic())
        self._shown = ("", 0.0)

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
