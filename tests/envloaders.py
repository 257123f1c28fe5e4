""".env loaders, for real: python-dotenv, npm's dotenv (installed from the registry), direnv,
Docker Compose 1.29's env_file, POSIX shells sourcing the file; and Compose v2's documented
env-file rules (its plugin cannot be installed here), as a small model of the documentation.

Each reader takes paths and returns {path: {KEY: value}}, so one process serves many files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from pgsupport import IMAGE, image_client, unavailable

SHELLS = ("sh", "dash", "bash")
NODE_PACKAGES = ["dotenv", "dotenv16@npm:dotenv@16", "pg"]
_NODE_READ = """
const fs = require('fs');
const out = {};
for (const path of process.argv.slice(1)) {
  const src = fs.readFileSync(path);
  out[path] = {
    'dotenv': require('dotenv').parse(src),
    'dotenv-fast': require('dotenv').parse(src, {fast: true}),
    'dotenv16': require('dotenv16').parse(src),
  };
}
process.stdout.write(JSON.stringify(out));
"""


def install_node(prefix: Path) -> Path:
    """npm's dotenv (latest and 16, which Next.js and Vite use) and node-postgres."""
    if not shutil.which("npm"):
        unavailable("npm is not installed (it installs the dotenv package for these tests)")
    done = subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                           "--no-save", *NODE_PACKAGES], capture_output=True, text=True,
                          env={**os.environ, "npm_config_cache": str(prefix / "cache"),
                               "npm_config_update_notifier": "false"}, timeout=300)
    if done.returncode != 0:
        unavailable(f"npm could not install {NODE_PACKAGES}: {done.stderr[-2000:]}")
    return prefix / "node_modules"


def node(modules: Path, paths: list[Path]) -> dict[str, dict[str, dict[str, str]]]:
    """{path: {parser: values}} for npm dotenv's default and fast parsers and dotenv 16."""
    out = subprocess.run(["node", "-e", _NODE_READ, *map(str, paths)], capture_output=True,
                         text=True, check=True, env={**os.environ, "NODE_PATH": str(modules)})
    return dict(json.loads(out.stdout))


def python_dotenv(path: Path) -> dict[str, str]:
    """python-dotenv as apps call it (interpolation on, the default)."""
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def direnv(path: Path) -> dict[str, str]:
    """direnv's `dotenv` stdlib function runs `direnv dotenv`; json is one of its shells."""
    if not shutil.which("direnv"):
        unavailable("direnv is not installed (apt-get install direnv)")
    out = subprocess.run(["direnv", "dotenv", "json", str(path)], capture_output=True,
                         text=True, check=True)
    return dict(json.loads(out.stdout or "{}"))


def shell(name: str, path: Path, cwd: Path) -> dict[str, str]:
    """`set -a; . FILE` in a POSIX shell, then the environment it exports (NUL-separated)."""
    out = subprocess.run([name, "-c", 'set -a; . "$1"; exec env -0', name, str(path)],
                         cwd=cwd, capture_output=True, check=True, env={"PATH": "/usr/bin:/bin"})
    pairs = (item.split(b"=", 1) for item in out.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode("utf-8", "surrogateescape") for k, v in pairs}


def compose_config(paths: list[Path], project: Path) -> dict[Path, dict[str, str]]:
    """Docker Compose 1.29 (Debian's docker-compose): one service per file with that file as
    its env_file; `docker-compose config` prints what each container would get."""
    if not shutil.which("docker-compose"):
        unavailable("docker-compose is not installed (apt-get install docker-compose)")
    _compose_file(paths, project)
    out = subprocess.run(["docker-compose", "--project-directory", str(project), "-f",
                          str(project / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, check=True)
    # Debian's docker-compose runs on the system Python, which has its YAML module.
    loaded = subprocess.run(["/usr/bin/python3", "-c", "import json, sys, yaml; "
                             "print(json.dumps(yaml.safe_load(sys.stdin)))"],
                            input=out.stdout, capture_output=True, text=True, check=True)
    services = json.loads(loaded.stdout)["services"]
    # `config` prints a compose file, where a literal $ is spelled $$.
    return {path: {k: str(v).replace("$$", "$") for k, v in
                   services[f"s{i}"].get("environment", {}).items()}
            for i, path in enumerate(paths)}


def compose_run(paths: list[Path], project: Path, index: int) -> dict[str, str]:
    """The environment a container of service `index` really gets (compose run; env -0)."""
    image_client()
    _compose_file(paths, project)
    name = f"devd-envtest-{uuid.uuid4().hex[:8]}"  # parallel sessions share one engine
    base = ["docker-compose", "--project-directory", str(project), "-p", name,
            "-f", str(project / "docker-compose.yml")]
    try:
        out = subprocess.run([*base, "run", "--rm", "-T", "--entrypoint", "env", f"s{index}",
                              "-0"], capture_output=True, check=False, timeout=120)
    finally:
        subprocess.run([*base, "down"], capture_output=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    pairs = (item.split(b"=", 1) for item in out.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


def _compose_file(paths: list[Path], project: Path) -> None:
    project.mkdir(parents=True, exist_ok=True)
    # A compose file interpolates $; a literal one is spelled $$.
    services = {f"s{i}": {"image": IMAGE, "env_file": [str(path).replace("$", "$$")]}
                for i, path in enumerate(paths)}
    # JSON is YAML: no YAML writer needed.
    text = json.dumps({"version": "3.8", "services": services})
    (project / "docker-compose.yml").write_text(text)


_V2_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*)$")


def compose_v2_documented(path: Path) -> dict[str, str]:
    """Compose v2's env-file rules as docs.docker.com/compose/how-tos/environment-variables/
    variable-interpolation/#env-file-syntax states them. Values whose result the rules leave
    to interpolation (a $ outside single quotes) raise: devd must never write those."""
    values = {}
    for line in path.read_text().split("\n"):
        match = _V2_LINE.match(line)
        if not line.strip() or line.lstrip().startswith("#") or not match:
            continue
        values[match[1]] = _v2_value(match[2])
    return values


def _v2_value(raw: str) -> str:
    if raw.startswith("'"):
        end = re.search(r"(?<!\\)'", raw[1:])
        assert end, f"unterminated single quote: {raw!r}"
        return raw[1:end.start() + 1].replace("\\'", "'")  # "used literally", \' escaped
    if raw.startswith('"'):
        end = re.search(r'(?<!\\)"', raw[1:])
        assert end, f"unterminated double quote: {raw!r}"
        body = raw[1:end.start() + 1]
        assert "$" not in body, f"interpolated: {raw!r}"
        escapes = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}
        return re.sub(r"\\(.)", lambda m: escapes.get(m[1], m[0]), body)
    value = re.split(r"\s#", raw, maxsplit=1)[0].strip()  # "inline comments ... a space"
    assert "$" not in value, f"interpolated: {raw!r}"
    return value


def every_loader(paths: list[Path], modules: Path, scratch: Path
                 ) -> dict[Path, dict[str, dict[str, str]]]:
    """{path: {loader: values}} through every loader above (Compose 1.29 via config)."""
    read: dict[Path, dict[str, dict[str, str]]] = {p: {} for p in paths}
    for path, parsed in node(modules, paths).items():
        read[Path(path)].update(parsed)
    for path, values in compose_config(paths, scratch / "compose").items():
        read[path]["compose-1.29"] = values
    for path in paths:
        read[path]["python-dotenv"] = python_dotenv(path)
        read[path]["direnv"] = direnv(path)
        read[path]["compose-v2-docs"] = compose_v2_documented(path)
        for name in SHELLS:
            read[path][name] = shell(name, path, scratch)
    return read
