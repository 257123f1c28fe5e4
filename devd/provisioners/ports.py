"""Stable, unique port blocks: a preferred slot from a hash, verified with a real bind, leased."""

from __future__ import annotations

import errno
import hashlib
import shlex
import socket
from collections.abc import Iterator
from typing import Any

from devd.errors import DevdError, PortsExhausted
from devd.provisioners.base import Context, Health, Progress, Provisioner

# Loopback only: dev servers bind there, and the wildcard address needs no separate check
# (a wildcard listener makes the loopback bind fail too).
_PROBE_ADDRESSES = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))


class PortsProvisioner(Provisioner):
    kind = "ports"

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        names = ctx.config.ports.names
        wt_id = ctx.worktree.id
        held = {name: port for port, name, _ in ctx.registry.leases(wt_id)}
        # Names dropped from devd.toml give their port back; "_"-prefixed leases belong to
        # other provisioners (e.g. a Postgres container's port) and are theirs to release.
        ctx.registry.release_leases(wt_id, {n for n in held if n not in names and n[0] != "_"})
        held = {name: port for name, port in held.items() if name in names}
        missing = [name for name in names if name not in held]
        if missing:
            progress("ports", f"leasing {len(missing)} port(s)")
            held.update(self._lease(ctx, names, missing))
        return {"ports": {name: held[name] for name in names}}

    def _lease(self, ctx: Context, names: list[str], missing: list[str]) -> dict[str, int]:
        port_range = ctx.settings.ports
        if len(names) > len(port_range):
            raise PortsExhausted(
                f"port range {ctx.settings.port_range} holds {len(port_range)} port(s); "
                f"devd.toml asks for {len(names)}",
                "widen DEVD_PORT_RANGE (e.g. 20000-29999) or declare fewer [ports] names",
            )
        got: dict[str, int] = {}
        try:
            for name in missing:
                got[name] = self._lease_one(ctx, port_range, names.index(name), len(names), name)
        except PortsExhausted:
            # Nothing half-leased: give back what this call took.
            ctx.registry.release_leases(ctx.worktree.id, set(got))
            raise
        return got

    def _lease_one(self, ctx: Context, port_range: range, index: int, block: int,
                   name: str) -> int:
        leased = ctx.registry.leased_ports()
        for port in candidates(port_range, preferred_base(ctx, port_range, block), index, block):
            if port in leased or not is_free(port):
                continue
            if ctx.registry.try_lease(ctx.worktree.id, name, port):
                return port
        raise PortsExhausted(
            f"no free port left in {ctx.settings.port_range} for {name!r} of {ctx.worktree.path}",
            "run `devd gc` to free ports of removed worktrees, or widen DEVD_PORT_RANGE",
        )

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        leased = {name for _, name, _ in ctx.registry.leases(ctx.worktree.id)}
        lost = set(detail.get("ports", {})) - leased
        return Health(not lost, f"lease lost for {', '.join(sorted(lost))}" if lost else "")

    def check_teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        """Refuse to free a port something of this worktree still listens on: another
        worktree would get it leased while the old server still answers there."""
        from devd import processes  # psutil: the daemon's, never the CLI's

        held, worktrees = processes.listeners(), ctx.registry.worktrees()
        busy = [(port, name, holder) for port, name, _ in ctx.registry.leases(ctx.worktree.id)
                if (holder := held.get(port)) is not None
                and (owner := processes.owner_of(holder, worktrees, ctx.registry))
                and owner.id == ctx.worktree.id]
        if busy:
            path = shlex.quote(str(ctx.worktree.path))
            raise DevdError(
                f"{ctx.worktree.path} still listens on its port(s): " + ", ".join(
                    f"{port} ({name}) by pid {h.pid} `{h.command}`" for port, name, h in busy),
                "stop " + ", ".join(f"`devd kill-port {port} --path {path}`"
                                    for port, _, _ in busy) + ", then run this again",
                code="port_in_use")

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        ctx.registry.release_leases(ctx.worktree.id, set(ctx.config.ports.names)
                                    | set(detail.get("ports", {})))

    def env(self, ctx: Context, detail: dict[str, Any]) -> dict[str, str]:
        ports: dict[str, int] = detail.get("ports", {})
        first = {"PORT": str(next(iter(ports.values())))} if ports else {}
        return first | {f"PORT_{name.upper()}": str(port) for name, port in ports.items()}


def preferred_base(ctx: Context, port_range: range, block: int) -> int:
    """The first port of this worktree's preferred block: stable for the same repo and path."""
    key = f"{ctx.worktree.repo_common_dir}\0{ctx.worktree.path}".encode("utf-8", "surrogateescape")
    slots = max(1, len(port_range) // block)
    slot = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % slots
    return port_range.start + slot * block


def candidates(port_range: range, base: int, index: int, block: int) -> Iterator[int]:
    """The preferred port for position `index`, then the same position in each later block,
    wrapping around, then every other port of the range."""
    size = len(port_range)
    seen = set()
    for k in range(max(1, size // block)):
        port = port_range.start + (base - port_range.start + index + k * block) % size
        seen.add(port)
        yield port
    yield from (port for port in port_range if port not in seen)


def is_free(port: int) -> bool:
    """A real bind on 127.0.0.1 and ::1; an address family the host lacks does not count."""
    for family, address in _PROBE_ADDRESSES:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                # Like the dev servers that will use it: TIME_WAIT leftovers do not block.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue
            return False
    return True


def lease_internal(ctx: Context, name: str) -> int:
    """A port for another provisioner (e.g. '_postgres'), leased once and then kept stable."""
    assert name.startswith("_"), "internal lease names start with '_'"
    for port, leased, _ in ctx.registry.leases(ctx.worktree.id):
        if leased == name:
            return port
    return PortsProvisioner()._lease_one(ctx, ctx.settings.ports, 0, 1, name)
