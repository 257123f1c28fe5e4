"""Global settings (env DEVD_* over config.toml) and the per-repo devd.toml model.

Only the daemon imports this module: it pulls in pydantic, which the CLI must not.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from devd.errors import ConfigError
from devd.naming import SNAPSHOT_NAME
from devd.paths import Paths
from devd.services import config as services_config

REPO_CONFIG = "devd.toml"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")  # \Z: "$" lets "A\n" through
# Variables a cache mapping must not override: devd's contract and what every process needs.
_RESERVED = {"PATH", "HOME", "USER", "SHELL", "TMPDIR", "PWD", "PORT", "DATABASE_URL"}
_RESERVED_PREFIXES = ("DEVD_", "PORT_", "PG", "LD_", "PYTHON", "NODE_OPTIONS")
_PORT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}\Z")
# Bounds on devd.toml: its size, its lists, its strings, and ports per worktree.
MAX_CONFIG_BYTES = 256 << 10
MAX_LIST_ITEMS = 64
MAX_STRING = 4096
MAX_PORTS = 32


# Bound on every setting in seconds: beyond ~24 days a select() or a wait() overflows (a
# DEVD_REQUEST_TIMEOUT of 1e9 ended the serve loop at the first connection).
DAY = 86400.0


class Settings(BaseSettings):
    """Machine-wide settings: environment variables DEVD_* win over config.toml."""

    model_config = SettingsConfigDict(env_prefix="DEVD_", extra="forbid")

    port_range: str = "20000-29999"
    reconcile_interval: float = Field(10.0, gt=0, le=DAY)
    gc_grace: str = "24h"
    # Seconds between status' background passes: every check, who listens (DEVD_STATUS_INTERVAL).
    status_interval: float = Field(5.0, gt=0, le=DAY)
    browser: str = ""
    kill_timeout: float = Field(5.0, gt=0, le=DAY)
    # Seconds a client has to send its whole request line (DEVD_REQUEST_TIMEOUT).
    request_timeout: float = Field(10.0, gt=0, le=DAY)
    # Admin connection for [postgres] schema/database modes; wins over devd.toml's url.
    postgres_url: str = ""
    # How many worktrees install dependencies at once; 0 means the number of cores.
    deps_jobs: int = Field(0, ge=0)
    # Watcher budget (devd/watchers): fractions of the limit per level, pass cadence in s.
    watchers_watches_warn: float = Field(0.75, gt=0, le=1)
    watchers_watches_critical: float = Field(0.90, gt=0, le=1)
    watchers_instances_warn: float = Field(0.80, gt=0, le=1)
    watchers_instances_critical: float = Field(0.95, gt=0, le=1)
    watchers_fds_warn: float = Field(0.80, gt=0, le=1)
    watchers_cheap_interval: float = Field(5.0, gt=0, le=DAY)
    watchers_full_interval: float = Field(45.0, gt=0, le=DAY)
    watchers_notify: bool = True
    watchers_partial_ratio: float = Field(0.5, ge=0, le=1)
    watchers_settle: float = Field(20.0, ge=0, le=DAY)  # a watcher's start-up walk before `partial`
    # Stop devd-started watchers of worktrees unused this long ("2h"; "" or "0": never).
    watchers_idle_stop: str = ""
    # Remove a Claude Code subagent's unchanged, idle worktree this long after its last
    # activity (devd/agents.py); Claude itself removes one at once when it has no hook.
    claude_agent_grace: str = "30m"
    # Named URLs (devd/proxy): Caddy on this loopback port; next to portless' 1355, so both
    # can run. `proxy = false` turns it off; `proxy_tls`: https with Caddy's local CA.
    proxy: bool = True
    proxy_port: int = Field(1356, ge=1, le=65535)
    proxy_tls: bool = False
    caddy: str = ""  # the caddy binary (DEVD_CADDY); empty: beside python, then on PATH

    @field_validator("port_range")
    @classmethod
    def _valid_range(cls, value: str) -> str:
        parse_port_range(value)
        return value

    @field_validator("watchers_idle_stop", "claude_agent_grace")
    @classmethod
    def _valid_idle(cls, value: str) -> str:
        if value.strip():
            parse_duration(value)
        return value

    @property
    def idle_stop_seconds(self) -> float:
        """watchers_idle_stop in seconds; 0 means off."""
        return parse_duration(self.watchers_idle_stop) if self.watchers_idle_stop.strip() \
            else 0.0

    @property
    def agent_grace_seconds(self) -> float:
        return parse_duration(self.claude_agent_grace)

    @property
    def ports(self) -> range:
        return parse_port_range(self.port_range)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Init values come from config.toml, so the environment must beat them.
        return (env_settings, init_settings)


def load_settings(paths: Paths) -> Settings:
    """Read config.toml (if any) and the environment into one Settings object."""
    values: dict[str, Any] = {}
    if paths.config_file.is_file():
        values = _read_toml(paths.config_file)
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise _config_error(paths.config_file, exc, _text_of(paths.config_file)) from exc


def parse_port_range(value: str) -> range:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if not match:
        raise ValueError(f"port range {value!r} is not of the form LOW-HIGH, e.g. 20000-29999")
    low, high = int(match[1]), int(match[2])
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"port range {value!r} must lie within 1024-65535 with LOW <= HIGH")
    return range(low, high + 1)


def parse_duration(value: str) -> float:
    """'24h', '30m', '90s', '2d' or a bare number of seconds → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not match:
        raise ValueError(f"duration {value!r} is not a number with an optional s/m/h/d unit")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    return float(match[1]) * scale


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        """No list or string in devd.toml may grow without bound: each is one person's
        config, and each entry costs a port, a copy or a directory."""
        for key, value in (data.items() if isinstance(data, dict) else ()):
            if isinstance(value, list) and len(value) > (most := cls._most(key)):
                raise ValueError(f"{key!r} has {len(value)} entries; at most {most}")
            for item in (value if isinstance(value, list) else [value]):
                if isinstance(item, str) and len(item) > MAX_STRING:
                    raise ValueError(f"{key!r} holds a string of {len(item)} characters; "
                                     f"at most {MAX_STRING}")
        return data

    @classmethod
    def _most(cls, key: str) -> int:
        """A list field's own max_length (ports.names), else MAX_LIST_ITEMS."""
        field = cls.model_fields.get(key)
        bounds = [m.max_length for m in (field.metadata if field else [])
                  if getattr(m, "max_length", None) is not None]
        return min(bounds, default=MAX_LIST_ITEMS)


class PortsConfig(_Section):
    names: list[str] = Field(default=["web"], max_length=MAX_PORTS)

    @field_validator("names")
    @classmethod
    def _valid_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _PORT_NAME.match(name):
                raise ValueError(
                    f"port name {name!r} must be lowercase letters, digits and _, "
                    "starting with a letter"
                )
        if len(set(names)) != len(names):
            raise ValueError("port names must be unique")
        return names


class CacheConfig(_Section):
    env: list[str] = []

    @field_validator("env")
    @classmethod
    def _valid_vars(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name in _RESERVED or name.startswith(_RESERVED_PREFIXES):
                raise ValueError(f"{name!r} is devd's own or the system's; pick a tool's "
                                 "cache variable such as TURBO_CACHE_DIR")
        return names


class EnvConfig(_Section):
    """[env]: files copied from the main worktree, where devd's block goes, and the extra
    keys whose main-worktree value a copy must not carry (NAME, or PREFIX* for a family)."""

    copy_files: list[str] = Field(default=[".env", ".env.local"], alias="copy")
    file: str = ".env"
    managed: list[str] = []

    @field_validator("copy_files")
    @classmethod
    def _relative(cls, files: list[str]) -> list[str]:
        for name in files:
            _check_env_path(name)
        return files

    @field_validator("file")
    @classmethod
    def _relative_file(cls, name: str) -> str:
        return _check_env_path(name)

    @field_validator("managed")
    @classmethod
    def _valid_keys(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _ENV_NAME.match(name.removesuffix("*")):
                raise ValueError(f"{name!r} is not a variable name (or a PREFIX* pattern)")
        return names


def _check_env_path(name: str) -> str:
    """A path inside the worktree and outside git's own directory (any case: macOS)."""
    _check_relative(name)
    if any(part.casefold() == ".git" for part in Path(name).parts):
        raise ValueError(f"{name!r} lies in .git; devd writes only the worktree's own files")
    return name


class PostgresConfig(_Section):
    """[postgres]: one schema, database or container per worktree (none by default)."""

    mode: Literal["none", "schema", "database", "container"] = "none"
    url: str = ""  # admin connection; DEVD_POSTGRES_URL wins; empty means libpq defaults
    template: str = ""  # database mode: clone this database
    template_terminate: bool = False  # end other sessions on the template (opt-in only)
    createdb: bool = True  # the worktree role may create databases: test runners' test_<name>
    image: str = "postgres:16-alpine"  # container mode
    # container mode: start on a copy-on-write clone of this snapshot (`devd db snapshot`)
    snapshot: str = ""

    @field_validator("snapshot")
    @classmethod
    def _snapshot_name(cls, name: str) -> str:
        if name and not SNAPSHOT_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a snapshot name (lower-case letters, digits, "
                             "'.', '_', '-')")
        return name

    @model_validator(mode="after")
    def _snapshot_needs_container(self) -> PostgresConfig:
        if self.snapshot and self.mode != "container":
            raise ValueError('snapshot needs mode = "container" (a server of its own)')
        return self


class DepsConfig(_Section):
    """[deps]: node_modules and .venv per worktree, detected from lockfiles by default."""

    node: Literal["auto", "npm", "pnpm", "yarn", "bun", "none"] = "auto"
    python: Literal["auto", "uv", "pip", "none"] = "auto"
    dirs: list[str] = ["."]  # package roots, relative to the worktree (monorepos: several)
    timeout: str = "15m"  # per install command; a hung package manager is stopped

    @field_validator("dirs")
    @classmethod
    def _relative_dirs(cls, dirs: list[str]) -> list[str]:
        return [name if name == "." else _check_relative(name) for name in dirs]

    @field_validator("timeout")
    @classmethod
    def _valid_timeout(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError("timeout must be positive, e.g. 15m")
        return value

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout)


class ClaudeConfig(_Section):
    """[claude]: where `devd hook claude-create` puts worktrees; what claude-remove releases."""

    worktree_dir: str = ".claude/worktrees"  # relative to the repo root, or absolute
    release_data: bool = False  # claude-remove also releases data-bearing resources


class HooksConfig(_Section):
    """[hooks]: worktrees no hook told devd about (`git worktree add --no-checkout` fires
    no post-checkout) are provisioned when the daemon's reconcile finds them."""

    provision_on_discover: bool = False


class WatchersConfig(_Section):
    on_pressure: str = ""  # shell command run in the main worktree when a level is crossed
    estimate: Literal["files", "dirs"] = "files"  # chokidar-style, or directory watchers


class ComposeConfig(_Section):
    """[compose]: the repo's Compose files, run as one project per worktree."""

    files: list[str] = []  # relative to the worktree, e.g. ["compose.yaml"]; empty: off
    start: bool = True  # `devd provision` brings the project up (else `devd compose up`)
    copy_volumes: bool = False  # a new worktree's named volumes start as the main one's

    @field_validator("files")
    @classmethod
    def _relative_files(cls, files: list[str]) -> list[str]:
        return [_check_relative(name) for name in files]




class ContainerConfig(_Section):
    """[containers.NAME]: one container per worktree (or a shared Redis, `shared = true`)."""

    preset: Literal["", "redis"] = ""
    image: str = ""
    port: int = Field(0, ge=0, le=65535)  # the container's port, published on a leased one
    env: dict[str, str] = {}
    ready: str = ""  # a command run inside until it succeeds, e.g. "redis-cli ping"
    data: str = ""  # the data directory, kept in a labelled volume
    command: list[str] = []
    vars: dict[str, str] = {}  # exported, templated: {port} {host} {db} {name}
    shared: bool = False  # redis only: one server, a database index per worktree
    timeout: float = Field(60.0, gt=0, le=DAY)  # readiness

    @field_validator("vars", "env")
    @classmethod
    def _valid_keys(cls, values: dict[str, str]) -> dict[str, str]:
        for name in values:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return values


class RepoConfig(_Section):
    """The per-repo devd.toml; every section is optional."""

    ports: PortsConfig = PortsConfig()
    cache: CacheConfig = CacheConfig()
    env: EnvConfig = EnvConfig()
    postgres: PostgresConfig = PostgresConfig()
    deps: DepsConfig = DepsConfig()
    claude: ClaudeConfig = ClaudeConfig()
    watchers: WatchersConfig = WatchersConfig()
    hooks: HooksConfig = HooksConfig()
    compose: ComposeConfig = ComposeConfig()
    containers: dict[str, ContainerConfig] = Field(default={}, max_length=MAX_PORTS)
    services: dict[str, services_config.ServiceConfig] = {}

    @model_validator(mode="after")
    def _services_refer_to_ports(self) -> RepoConfig:
        services_config.check(self.services, self.ports.names)
        return self

    @field_validator("containers")
    @classmethod
    def _container_names(cls, found: dict[str, ContainerConfig]) -> dict[str, ContainerConfig]:
        for name, spec in found.items():
            if not _PORT_NAME.match(name):  # the same rule (it names PORT_<NAME>)
                raise ValueError(f"container name {name!r} must be lowercase letters, digits "
                                 "and _, starting with a letter")
            if not (spec.preset or spec.image):
                raise ValueError(f"[containers.{name}] needs an image or a preset")
            if spec.shared and spec.preset != "redis":
                raise ValueError(f"[containers.{name}] shared = true is for preset = \"redis\"")
        return found


def _check_relative(name: str) -> str:
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not name:
        raise ValueError(f"{name!r} must be a path relative to the worktree, without '..'")
    return name


def load_repo_config(root: Path) -> RepoConfig:
    """Read <root>/devd.toml; a repo without one gets the defaults."""
    path = root / REPO_CONFIG
    if not path.is_file():
        return RepoConfig()
    if (size := path.stat().st_size) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size} bytes; devd reads at most {MAX_CONFIG_BYTES}",
                          "a devd.toml is a few lines: see the README's reference")
    values = _read_toml(path)
    try:
        return RepoConfig.model_validate(values)
    except ValidationError as exc:
        raise _config_error(path, exc, _text_of(path)) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(_text_of(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}", "fix the TOML syntax at that line") from exc


def _text_of(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}", "make it a readable UTF-8 file") from exc


def _config_error(path: Path, exc: ValidationError, text: str) -> ConfigError:
    problems = []
    for err in exc.errors():
        keys = [str(part) for part in err["loc"] if not isinstance(part, int)]
        line = _line_of(text, keys)
        where = f"{path}:{line}" if line else str(path)
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {'.'.join(keys) or '(top level)'}: {message}")
    return ConfigError("; ".join(problems), f"see the devd.toml reference in the README ({path})")


def _line_of(text: str, keys: list[str]) -> int | None:
    """Best-effort line number of a key, e.g. ['ports', 'names'] → the names = line."""
    if not keys:
        return None
    section, key = (keys[0], keys[-1]) if len(keys) > 1 else ("", keys[0])
    current = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header[1]
            if not section and current == key:
                return number
            continue
        if current == section and re.match(rf"^{re.escape(key)}\s*=", line):
            return number
    return None
