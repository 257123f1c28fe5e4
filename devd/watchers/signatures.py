"""Known output lines of watchers that hit the inotify or file-descriptor budget.

Each one means: this process stopped seeing (some) file changes, and it will not retry by
itself. Matched line by line on the output `devd run` passes through, ANSI colours removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Long enough for any real error line; a line without a newline cannot grow memory forever.
MAX_LINE = 64 * 1024
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


@dataclass(frozen=True)
class Signature:
    """One known break message and the budget it points at."""

    name: str
    budget: str  # "watches", "instances" or "fds"
    pattern: re.Pattern[bytes]


SIGNATURES = (
    Signature("node-enospc", "watches",
              re.compile(rb"ENOSPC: System limit for number of file watchers reached")),
    Signature("watchpack", "watches", re.compile(rb"Watchpack Error \(watcher\)")),
    Signature("inotify-add-watch", "watches",
              re.compile(rb"inotify_add_watch.{0,400}No space left on device")),
    Signature("rust-notify", "watches", re.compile(rb"OS file watch limit reached")),
    Signature("watchdog-watches", "watches", re.compile(rb"inotify watch limit reached")),
    Signature("watchdog-instances", "instances",
              re.compile(rb"inotify instance limit reached")),
    Signature("node-emfile", "fds", re.compile(rb"EMFILE: too many open files, watch")),
    Signature("os-error-24", "fds", re.compile(rb"Too many open files \(os error 24\)")),
)

# A word each signature holds (tests check it does): a chunk without any has no break line.
HINT = re.compile(rb"ENOSPC|Watchpack|inotify|watch limit|EMFILE|os error 24")


def match(line: bytes) -> Signature | None:
    """The first known signature in one output line, colours removed."""
    plain = _ANSI.sub(b"", line)
    for signature in SIGNATURES:
        if signature.pattern.search(plain):
            return signature
    return None


class LineScanner:
    """Splits a byte stream into lines and reports each signature match once per stream."""

    def __init__(self) -> None:
        self._partial = b""
        self.seen: set[str] = set()

    def feed(self, chunk: bytes) -> list[tuple[Signature, str]]:
        """Matches completed by this chunk, with the line (decoded, shortened) that matched."""
        buffer = self._partial + chunk
        if not HINT.search(buffer):  # the usual chunk: one pass in C, no line split
            self._partial = buffer[buffer.rfind(b"\n") + 1:][-MAX_LINE:]
            return []
        lines = buffer.split(b"\n")
        self._partial = lines.pop()[-MAX_LINE:]
        return [hit for line in lines if (hit := self._check(line))]

    def close(self) -> list[tuple[Signature, str]]:
        """Check the last line, which had no newline."""
        hit = self._check(self._partial)
        self._partial = b""
        return [hit] if hit else []

    def _check(self, line: bytes) -> tuple[Signature, str] | None:
        found = match(line[-MAX_LINE:])
        if found is None or found.name in self.seen:
            return None
        self.seen.add(found.name)
        text = _ANSI.sub(b"", line).decode("utf-8", "replace").strip()
        return found, text[:500]
