"""The provisioner contract every resource kind implements.

- ensure: create if absent, adopt if ours, return the detail to record. Running it twice
  equals running it once, and it finishes what a crashed run half-made, because every
  name is derived from the worktree rather than stored randomness.
- check: read-only and fast; says whether the resource is still as recorded.
- teardown: remove what devd made; already absent counts as success.
- check_teardown: read-only; raises what teardown would fail on, before any teardown runs.
- back_up: phase 1 of a release (data-bearing kinds): a copy of the data, nothing removed;
  teardown then uses it (ctx.made) instead of making its own, and resume undoes what the
  copy needed (a container stopped, logins closed) when another resource's backup fails.
- env: the variables the worktree's processes should see.
Anything that exists under one of our names without devd's marker is an ownership
conflict: refuse and touch nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from devd.paths import Paths
from devd.registry import Registry, Worktree
from devd.settings import RepoConfig, Settings


class Progress(Protocol):
    def __call__(self, phase: str, message: str, **extra: Any) -> None: ...


@dataclass
class Context:
    """Everything a provisioner may look at for one worktree."""

    worktree: Worktree
    config: RepoConfig
    settings: Settings
    paths: Paths
    registry: Registry
    env: dict[str, str] = field(default_factory=dict)
    # Release options: keep a dump before dropping data; end sessions that hold it.
    backup: bool = True
    force: bool = False
    # What a teardown wants the caller to report, e.g. {"dumps": [path, ...]}.
    outputs: dict[str, Any] = field(default_factory=dict)
    # What each kind's back_up made in phase 1 of this release: its teardown only removes.
    made: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Request options for ensure, e.g. {"fix_deps": True} from `devd provision --fix-deps`.
    options: dict[str, Any] = field(default_factory=dict)

    def recorded(self, kind: str) -> dict[str, Any]:
        """What the registry holds for a resource of this worktree (empty if nothing)."""
        found = [r.detail for r in self.registry.resources(self.worktree.id) if r.kind == kind]
        return found[0] if found else {}


@dataclass(frozen=True)
class Health:
    ok: bool
    message: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class Provisioner(ABC):
    kind: ClassVar[str]
    # Resources holding user data (databases) are only released with explicit consent.
    holds_data: ClassVar[bool] = False

    @abstractmethod
    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        """Create or adopt the resource; return the detail to record."""

    @abstractmethod
    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        """Read-only health check of a recorded resource."""

    @abstractmethod
    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        """Remove what devd made; absent counts as success."""

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        """Raise the DevdError a teardown would fail with (sessions holding a database,
        objects depending on it), before anything of the worktree is torn down: release
        is all or nothing. Read-only."""
        return None

    def back_up(self, ctx: Context, detail: dict[str, Any]) -> dict[str, Any]:
        """Keep a copy of the resource's data (a dump, tarballs) and remove nothing; what
        it needed to keep the copy whole (logins closed, a server stopped) stays so until
        teardown or resume. Returns what was made (teardown finds it in ctx.made)."""
        return {}

    def resume(self, ctx: Context, detail: dict[str, Any], made: dict[str, Any]) -> None:
        """Another resource's backup failed, so nothing is released: undo what back_up did
        to the resource (start what it stopped, reopen what it closed)."""
        return None

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        return {}

    def applies(self, ctx: Context) -> bool:
        """Whether provisioning runs this at all (e.g. not for a repo without [postgres])."""
        return True
