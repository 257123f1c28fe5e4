"""Hostnames under .localhost: DNS-safe labels, distinct for distinct names, stable.

A name that already is a clean DNS label (lowercase letters, digits, inner dashes) is used as
it is; any other gets a slug plus six hex digits of the name itself: `feat/a` becomes
`feat-a-1f0c2e`, so it differs from `fix/a` and from a branch literally named `feat-a`. The
digest depends on the name alone, never on what else exists, so a URL does not change when
another worktree appears. Only a true clash (two detached worktrees with the same directory
name, a worktree named like one of the repo's ports) adds the path's digest, decided in a
fixed order.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from devd.naming import path_digest, slug

DOMAIN = "localhost"
DASHBOARD = "devd"  # devd.localhost: the dashboard; a repo named devd gets a suffix
_CLEAN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
SLUG_MAX = 40  # leaves room for "-" and the digest within a 63-character label
DIGEST = 6


def label(name: str) -> str:
    """`name` as one DNS label of at most 47 characters (see the module docstring)."""
    if _CLEAN.fullmatch(name) and "--" not in name:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:DIGEST]
    return f"{slug(name, SLUG_MAX) or 'x'}-{digest}"


def port_label(name: str) -> str:
    """Port names are [a-z][a-z0-9_]*: `_` → `-` is one-to-one (they hold no dash)."""
    return name.replace("_", "-")


def with_path(base: str, path: Path) -> str:
    """The clash breaker: `base` plus the path's digest."""
    return f"{base}-{path_digest(path, DIGEST)}"


def host(*labels: str) -> str:
    return ".".join((*labels, DOMAIN))
