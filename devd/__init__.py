"""devd: one isolated environment per git worktree, kept by a user daemon."""

__version__ = "0.1.0"
