"""What the registry keeps of a worktree's Postgres, and which server it lives on."""

from __future__ import annotations

from typing import Any

from devd.errors import DevdError
from devd.postgres import names
from devd.provisioners.base import Context

KIND = "postgres"
SQL_MODES = ("schema", "database")


def record_intent(ctx: Context, **fields: Any) -> None:
    """Record the names before creating anything: if this run fails half-way, release and
    gc still know what to look for (the names are derived, the password is not)."""
    ctx.registry.set_resource(ctx.worktree.id, KIND, "pending",
                              ctx.recorded(KIND) | fields)


def mark_dropping(ctx: Context) -> None:
    """Before a teardown's first drop: if a later step fails, status says the resource is
    half gone instead of `ready` (release forgets it only once every step succeeded)."""
    ctx.registry.set_resource(ctx.worktree.id, KIND, "failed", ctx.recorded(KIND) | {
        "error": "release stopped part-way (a dump, if made, is kept); run "
                 "`devd release --yes` again to finish",
        "hint": "see the release's message for the cause"})


def admin_url(ctx: Context) -> str:
    """DEVD_POSTGRES_URL (the caller's, else the daemon's) wins over devd.toml; empty means
    libpq defaults. A worktree whose objects live on one server stays there: switching
    would create a second copy and orphan the first."""
    url = ctx.options.get("postgres_url") or ctx.settings.postgres_url or ctx.config.postgres.url
    recorded = ctx.recorded("postgres")
    if recorded.get("mode") in SQL_MODES and recorded.get("admin_url", url) != url:
        raise DevdError(
            f"this worktree's Postgres {recorded['mode']} lives on "
            f"{names.mask_url(recorded['admin_url']) or 'the default server'}, not on "
            f"{names.mask_url(url) or 'the default server'}",
            "use the same URL, or `devd release --yes` first (a dump is kept)", code="config")
    return url


def public_view(detail: dict[str, Any], state: str) -> dict[str, Any]:
    """The status --json "postgres" entry: no password, no admin URL."""
    return {"mode": detail.get("mode"), "name": detail.get("name"), "host": detail.get("host"),
            "port": detail.get("port"), "state": state}


# -- schema and database modes ------------------------------------------------------------
