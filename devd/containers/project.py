"""The Compose file devd runs a worktree's project from, made from `config`'s output.

Why a whole resolved file and not a small override: Compose merges `ports` of an override
into the base file's (multi-value options are concatenated), and Compose 1.x has no
`!reset`, so an override can add 127.0.0.1:<leased>:5432 but never take 5432:5432 away.
`docker compose config` already gives the project's full model (every file merged,
variables interpolated, paths absolute), so devd writes that model back with:
- every port, published or not, on a leased port bound to 127.0.0.1;
- `container_name` dropped, and `name` of volumes and networks too (global names collide
  across worktrees; without them Compose prefixes the worktree's project name);
- devd's ownership labels on every service, volume and network (the default one included).
Services on `network_mode: host` share the host's ports: they cannot be isolated, refused.
The file is JSON, which every YAML parser (Compose's too) reads.
"""

from __future__ import annotations

import re
from typing import Any

from devd.errors import ConfigError

LEASE_PREFIX = "_compose_"


def env_key(service: str, target: int, protocol: str = "tcp") -> str:
    """PORT_<SERVICE>_<CONTAINERPORT> (+ _UDP): the service and the port it listens on
    inside, so the name says what it reaches and stays stable when the host port moves."""
    base = re.sub(r"[^A-Z0-9]+", "_", service.upper()).strip("_") or "SERVICE"
    return f"PORT_{base}_{target}" + ("" if protocol == "tcp" else f"_{protocol.upper()}")


def lease_name(key: str) -> str:
    return LEASE_PREFIX + key.lower()


def wanted_ports(model: dict[str, Any]) -> dict[str, tuple[str, int, str]]:
    """{env key: (service, container port, protocol)} for every port of every service."""
    found: dict[str, tuple[str, int, str]] = {}
    for service, spec in (model.get("services") or {}).items():
        _refuse_host_network(service, spec)
        for entry in spec.get("ports") or []:
            target, protocol = _target(service, entry)
            key = env_key(service, target, protocol)
            if key in found and found[key][0] != service:
                raise ConfigError(f"services {found[key][0]!r} and {service!r} both give "
                                  f"{key}", "rename one of the services")
            found[key] = (service, target, protocol)
    return found


def _refuse_host_network(service: str, spec: dict[str, Any]) -> None:
    if spec.get("network_mode") == "host":
        raise ConfigError(
            f"compose service {service!r} uses network_mode: host: it shares the host's "
            "ports with every other worktree, so devd cannot isolate it",
            "publish its ports instead (ports: [\"8080\"]), or run it outside [compose]")


def _target(service: str, entry: Any) -> tuple[int, str]:
    """The container port and protocol of one `ports` entry, long form (what `config`
    prints) or short form ("[ip:][host:]container[/proto]", older file versions)."""
    if isinstance(entry, dict):
        target, protocol = str(entry.get("target", "")), str(entry.get("protocol") or "tcp")
    else:
        text, _, protocol = str(entry).partition("/")
        target, protocol = text.rsplit(":", 1)[-1], protocol or "tcp"
    if not target.isdigit():
        raise ConfigError(f"compose service {service!r}: port {entry!r} is a range devd "
                          "cannot lease as one port", "list the ports one by one")
    return int(target), protocol


def resolve(model: dict[str, Any], leased: dict[str, int], labels: dict[str, str]
            ) -> dict[str, Any]:
    """The model with ports republished on `leased` (by env key), names dropped, labels on."""
    out = dict(model)
    out.pop("name", None)  # Compose v2 prints the project name; -p sets it
    out["services"] = {name: _service(name, spec, leased, labels)
                       for name, spec in (model.get("services") or {}).items()}
    for section in ("volumes", "networks"):
        out[section] = {key: _labelled(spec, labels)
                        for key, spec in (model.get(section) or {}).items()}
    if "default" not in out["networks"]:
        out["networks"]["default"] = {"labels": dict(labels)}
    if not out["volumes"]:
        out.pop("volumes")
    return out


def _service(name: str, spec: dict[str, Any], leased: dict[str, int],
             labels: dict[str, str]) -> dict[str, Any]:
    spec = {key: value for key, value in spec.items() if key != "container_name"}
    ports = []
    for entry in spec.get("ports") or []:
        target, protocol = _target(name, entry)
        port = leased[env_key(name, target, protocol)]
        ports.append(f"127.0.0.1:{port}:{target}/{protocol}")
    if ports:
        spec["ports"] = ports
    spec["labels"] = _labels_of(spec.get("labels")) | labels
    return spec


def _labelled(spec: dict[str, Any] | None, labels: dict[str, str]) -> dict[str, Any]:
    spec = dict(spec or {})
    if external(spec):
        return spec  # not the project's: Compose neither makes nor removes it
    spec.pop("name", None)
    spec["labels"] = _labels_of(spec.get("labels")) | labels
    return spec


def external(spec: dict[str, Any]) -> bool:
    external = spec.get("external")
    return bool(external) and external is not False


def externals(model: dict[str, Any]) -> list[str]:
    """External volumes and networks: shared by every worktree, so not isolated."""
    return [f"{section[:-1]} {key}" for section in ("volumes", "networks")
            for key, spec in (model.get(section) or {}).items() if external(spec or {})]


def _labels_of(value: Any) -> dict[str, str]:
    """Compose labels as a dict, whether `config` printed a mapping or a KEY=VALUE list."""
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    return dict(str(item).partition("=")[::2] for item in value or [])
