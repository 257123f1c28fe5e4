"""Attacks on issue 13's service break scan (devd/services/supervisor.py, logs.py): a real
supervisor runs real shell services; each test waits on what its hook saw, never a clock."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devd.services import logs
from devd.services.supervisor import Spec, Supervisor

LINE = "ENOSPC: System limit for number of file watchers reached, watch '/w/src'"


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[tuple[Supervisor, list[str], threading.Event]]:
    sup = Supervisor(tmp_path / "state", kill_timeout=2.0)
    seen: list[str] = []
    hit = threading.Event()

    def on_break(unit: object, signature: object, line: str) -> None:
        seen.append(line)
        hit.set()

    sup.on_break = on_break
    sup.start_watching()
    try:
        yield sup, seen, hit
    finally:
        sup.close()


def _start(sup: Supervisor, tmp_path: Path, name: str, script: str) -> None:
    sup.start(Spec("wt1", name, script, tmp_path, dict(os.environ),
                   logs.log_path(tmp_path / "state", "wt1", name)))


def test_a_break_printed_at_once_is_seen(supervised, tmp_path: Path) -> None:
    """A watcher that prints its break within its first instant (before the supervisor
    took the log's size) was missed: the scan started past it."""
    sup, seen, hit = supervised
    _start(sup, tmp_path, "fast", f"echo \"{LINE}\"; exec sleep 30")
    assert hit.wait(20), logs.log_path(tmp_path / "state", "wt1", "fast").read_text()
    assert seen == [LINE]


def test_a_break_followed_by_megabytes_survives_the_rotation(supervised, tmp_path: Path
                                                             ) -> None:
    """A chatty service: the break line, then more than a rotation's worth in one burst.
    The scan reads 1 MiB a tick; the copy-truncate dropped what it had not read yet."""
    sup, seen, hit = supervised
    filler = "head -c 2000000 /dev/zero | tr '\\0' x; echo"
    _start(sup, tmp_path, "chatty", f"sleep 0.3; {filler}; echo \"{LINE}\"; "
           f"head -c 6000000 /dev/zero | tr '\\0' y; echo; exec sleep 30")
    log = logs.log_path(tmp_path / "state", "wt1", "chatty")
    assert hit.wait(20), f"rotated: {log.with_name('chatty.log.1').exists()}"
    assert seen == [LINE]


def test_a_log_swapped_for_a_fifo_or_a_symlink_hangs_and_touches_nothing(
        supervised, tmp_path: Path) -> None:
    """The log path replaced under a running service: a FIFO blocked the watch thread in
    open() for good (every service of every worktree unwatched), a symlink to a big file
    had that file copy-truncated to nothing by the rotation."""
    sup, seen, hit = supervised
    state = tmp_path / "state"
    big = tmp_path / "precious.db"
    big.write_bytes(b"p" * (logs.MAX_BYTES + 1))
    _start(sup, tmp_path, "a", "exec sleep 30")
    _start(sup, tmp_path, "b", "exec sleep 30")
    log_a, log_b = logs.log_path(state, "wt1", "a"), logs.log_path(state, "wt1", "b")
    log_a.unlink()
    os.mkfifo(log_a)
    log_b.unlink()
    log_b.symlink_to(big)
    _start(sup, tmp_path, "c", f"sleep 0.2; echo \"{LINE}\"; exec sleep 30")
    assert hit.wait(20), "the watch thread is stuck"
    assert big.stat().st_size == logs.MAX_BYTES + 1
