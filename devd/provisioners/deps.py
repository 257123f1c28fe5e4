"""node_modules and .venv per worktree: installed by the package manager, never shared.

Per tree (see deps_detect.Plan): skip when the lockfile hash matches the last install; else
clone the main worktree's node_modules copy-on-write when it was installed from the same
lockfile and the filesystem can reflink, then let the package manager verify it; otherwise
install normally. A .venv is always created fresh (absolute paths make copies wrong). Never
a symlink: a symlinked tree is reported, and replaced only on `devd provision --fix-deps`.
Installs run as jobs (devd.jobs): one per worktree, a few worktrees at a time, logged.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from devd import naming, reflink
from devd.errors import DevdError
from devd.jobs import Job, JobRunner, JobStopped, locked, tail
from devd.provisioners import deps_state
from devd.provisioners.base import Context, Health, Progress, Provisioner
from devd.provisioners.deps_detect import INSTALL_MARKERS, Plan, detect, find_tool, lock_hash, trap

NPM_FLAGS = ["--prefer-offline", "--no-audit", "--no-fund"]
INSTALL = {
    "npm": ["npm", "ci", *NPM_FLAGS, "--loglevel=http"],
    "pnpm": ["pnpm", "install", "--frozen-lockfile", "--prefer-offline"],
    "yarn": ["yarn", "install", "--frozen-lockfile", "--prefer-offline"],  # classic (1.x)
    "yarn-berry": ["yarn", "install", "--immutable"],
    "bun": ["bun", "install", "--frozen-lockfile"],
}
# After a clone: the package manager's own install, which finds the tree complete. (npm ci
# would delete node_modules first, so npm gets a plain install guarded against lock edits.)
VERIFY = {**INSTALL, "npm": ["npm", "install", *NPM_FLAGS]}
_PNPM_PROGRESS = re.compile(r"Progress: resolved (\d+), reused \d+, downloaded \d+, added (\d+)")
CLONE_TMP = ".node_modules.devd-clone"
LOG_ROTATE_BYTES = 1 << 20


class DepsProvisioner(Provisioner):
    kind = "deps"

    def __init__(self) -> None:
        self._runner: JobRunner | None = None
        self._guard = threading.Lock()

    def runner(self, ctx: Context) -> JobRunner:
        with self._guard:
            if self._runner is None:
                self._runner = JobRunner(deps_state.state_dir(ctx.paths.state_dir),
                                         ctx.settings.deps_jobs)
            return self._runner

    def applies(self, ctx: Context) -> bool:
        """Only worktrees with something to install (or a record to update) get a job."""
        try:
            return bool(detect(ctx.worktree.path, ctx.config.deps)) or \
                deps_state.state_file(ctx.paths.state_dir, ctx.worktree.id).exists()
        except DevdError:
            return True  # ensure raises it, so the error shows up as this resource's

    def ensure(self, ctx: Context, progress: Progress) -> dict[str, Any]:
        plans = detect(ctx.worktree.path, ctx.config.deps)
        base, wt_id = ctx.paths.state_dir, ctx.worktree.id
        if plans or deps_state.state_file(base, wt_id).exists():
            deps_state.keep_only(base, wt_id, {p.key for p in plans})
        if plans and not all(_up_to_date(ctx, p) for p in plans):
            self._install_all(ctx, plans, progress)
        elif plans:
            progress("deps", f"{', '.join(p.key for p in plans)}: up to date")
        records = deps_state.load(base, wt_id)
        return {"deps": {k: {f: r.get(f) for f in ("tool", "strategy", "seconds")}
                         for k, r in records.items()}}

    def _install_all(self, ctx: Context, plans: list[Plan], progress: Progress) -> None:
        runner = self.runner(ctx)
        wt = ctx.worktree
        _rotate(runner.log_path(wt.id))
        failures: list[DevdError] = []
        with runner.job(wt.id, lambda: (wt.path / ".git").exists(),
                        lambda text: progress("deps", text),
                        ctx.config.deps.timeout_seconds) as job:
            for plan in plans:
                if _up_to_date(ctx, plan):  # another job may have finished it meanwhile
                    progress("deps", f"{plan.key}: up to date ({plan.tool})")
                    continue
                try:
                    Install(ctx, plan, job, progress).run()
                except DevdError as exc:
                    failures.append(exc)
                    if exc.code == JobStopped.code and not job.alive():
                        break
        if failures:
            raise DevdError("; ".join(f.message for f in failures),
                            " ".join(dict.fromkeys(f.hint for f in failures if f.hint)),
                            code=failures[0].code)

    def check(self, ctx: Context, detail: dict[str, Any]) -> Health:
        shown = status(ctx.paths.state_dir, ctx.worktree.id, ctx.worktree.path,
                       self.runner(ctx))
        notes = [f"{key}: {d['state']}" + (f" ({d['note']})" if d["note"] else "")
                 for key, d in shown.items() if d["state"] != "ready"]
        bad = any(d["state"] in ("failed", "symlinked", "missing") for d in shown.values())
        return Health(not bad, "; ".join(notes), {"deps": shown})

    def teardown(self, ctx: Context, detail: dict[str, Any]) -> None:
        # The trees live in the worktree and go with it; devd forgets only its records. Not
        # while a previous daemon's install runs: without its lock file, the next provision
        # would start a second install beside it.
        if self.runner(ctx).adopted(ctx.worktree.id):
            raise DevdError("an install of this worktree from the previous daemon is still "
                            "running", "wait until `devd status` no longer shows it "
                            "installing, then release again", code="deps_busy")
        deps_state.remove(ctx.paths.state_dir, ctx.worktree.id)


def status(state_base: Path, wt_id: str, worktree: Path, runner: JobRunner | None = None
           ) -> dict[str, dict[str, Any]]:
    """`deps` for `devd status`: the records plus what a stat or two says now."""
    records = deps_state.load(state_base, wt_id)
    if not records:
        return {}
    runner = runner or JobRunner(deps_state.state_dir(state_base))
    shown = deps_state.describe(worktree, records, runner.busy(wt_id))
    if runner.adopted(wt_id):
        for entry in shown.values():
            if entry["state"] == "installing":
                entry["note"] = "from the previous daemon"
    return shown


def _up_to_date(ctx: Context, plan: Plan) -> bool:
    if ctx.options.get("fix_deps") and trap(plan.tree, ctx.worktree.path):
        return False
    record = deps_state.load(ctx.paths.state_dir, ctx.worktree.id).get(plan.key, {})
    state, _ = deps_state.current(ctx.worktree.path, record, busy=False)
    return (state == "ready" and record.get("tool") == plan.tool
            and record.get("dir") == plan.dir and record.get("mode") == plan.mode)


def _rotate(log: Path) -> None:
    """Logs are appended to (a waiting job must not erase the one before); keep them small."""
    try:
        if log.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log, log.with_suffix(".log.1"))
    except FileNotFoundError:
        pass


class Install:
    """Installing one tree in a job: trap check, strategy, records, progress."""

    def __init__(self, ctx: Context, plan: Plan, job: Job, progress: Progress) -> None:
        self.ctx, self.plan, self.job, self.progress = ctx, plan, job, progress
        self.timeout = ctx.config.deps.timeout_seconds
        self.label = plan.key if plan.dir == "." else f"{plan.key} ({plan.dir})"

    def record(self, **fields: Any) -> dict[str, Any]:
        """Update this tree's record; what it is and where always goes with any state."""
        plan = self.plan
        return deps_state.update(self.ctx.paths.state_dir, self.ctx.worktree.id, plan.key,
                                 eco=plan.eco, dir=plan.dir, tool=plan.tool, mode=plan.mode,
                                 inputs=list(plan.inputs), log=str(self.job.log_path), **fields)

    def run(self) -> None:
        plan = self.plan
        self._check_tree()
        tool_path = find_tool(plan.tool)
        if tool_path is None:
            raise self._fail(f"{self.label}: {plan.tool} is not installed (needed for "
                             f"{plan.root / plan.inputs[0]})", _install_hint(plan.tool))
        digest = lock_hash(plan.root, plan.inputs)
        self.record(state="installing", error=None)
        start = time.monotonic()
        try:
            strategy, saved = self._strategy(digest)
        except DevdError as exc:
            self._clean_if_deleted()
            raise self._fail(exc.message, exc.hint, exc.code) from exc
        seconds = round(time.monotonic() - start, 2)
        # A lockfile without dependencies: npm ci makes no node_modules, and that is ready.
        self.record(state="ready", lock_hash=digest, strategy=strategy, seconds=seconds,
                    saved_seconds=saved, empty=not plan.tree.is_dir())
        note = f", saved ~{saved:.1f} s" if saved else ""
        self.progress("deps", f"{self.label}: ready ({plan.tool}, {strategy}, {seconds:.1f} s"
                      f"{note})")

    def _fail(self, message: str, hint: str, code: str = "deps_failed") -> DevdError:
        self.record(state="failed", error=message.split("\n", 1)[0])
        return DevdError(message, hint, code=code)

    def _check_tree(self) -> None:
        plan, wt = self.plan, self.ctx.worktree.path
        problem = trap(plan.tree, wt)
        if problem and not self.ctx.options.get("fix_deps"):
            self.record(state="symlinked", error=problem)
            raise DevdError(f"{self.label}: {problem}; devd never installs through it",
                            "run `devd provision --fix-deps` to replace it with the "
                            "worktree's own tree", code="deps_symlinked")
        if problem:
            self.progress("deps", f"{self.label}: replacing {plan.tree} with a real tree")
            self.job.note(f"--fix-deps: removing {plan.tree} ({problem})")
            _remove_tree(plan.tree)
        if plan.tree.exists() and not plan.tree.is_dir():
            raise self._fail(f"{self.label}: {plan.tree} exists but is not a directory",
                             "move it away, then run `devd provision` again")

    def _strategy(self, digest: str) -> tuple[str, float | None]:
        if self.plan.eco == "python":
            self._venv()
            return "fresh", None
        cloned = self._clone(digest)
        if cloned is not None:
            return "reflink", cloned
        self._run(self._node_command(INSTALL), f"{self.plan.tool} install")
        return "install", None

    # -- node ------------------------------------------------------------------

    def _node_command(self, table: dict[str, list[str]]) -> list[str]:
        tool = self.plan.tool
        if tool == "yarn" and not _yarn_classic(self.plan.root):
            tool = "yarn-berry"
        return list(table[tool])

    def _clone(self, digest: str) -> float | None:
        """Reflink the main worktree's node_modules, then verify; None to install normally."""
        main_record = self._clone_source(digest)
        if main_record is None:
            return None
        plan, start = self.plan, time.monotonic()
        source = self.ctx.worktree.repo_main_path / plan.dir / "node_modules"
        sample = reflink.sample_file(source)
        if sample is None or not reflink.supported(sample, plan.root):
            self.job.note("the filesystem cannot clone (reflink): installing normally")
            return None
        tmp = plan.root / CLONE_TMP
        _remove_tree(tmp)
        self.progress("deps", f"{self.label}: cloning the main worktree's node_modules (reflink)")
        if self.job.run(reflink.clone_command(source, tmp), plan.root, _env(plan),
                        self.timeout) != 0:
            _remove_tree(tmp)
            return None
        _remove_tree(plan.tree)
        os.rename(tmp, plan.tree)
        if not self._verify():
            _remove_tree(plan.tree)
            self.job.note("the clone did not verify: installing normally")
            return None
        base = main_record.get("seconds") if main_record.get("strategy") == "install" else None
        return round(base - (time.monotonic() - start), 2) if base else None

    def _clone_source(self, digest: str) -> dict[str, Any] | None:
        """The main worktree's record when its node_modules came from this very lockfile."""
        plan, main = self.plan, self.ctx.worktree.repo_main_path
        root = main / plan.dir
        source = root / "node_modules"
        if (main == self.ctx.worktree.path or not source.is_dir() or trap(source, main)
                or lock_hash(root, plan.inputs) != digest):
            return None
        main_id = naming.worktree_id(main, main)
        if locked(deps_state.state_dir(self.ctx.paths.state_dir) / f"{main_id}.lock"):
            return None  # main's tree is being installed right now: not a source to clone
        for record in deps_state.load(self.ctx.paths.state_dir, main_id).values():
            if (record.get("dir"), record.get("tool")) == (plan.dir, plan.tool) and \
                    record.get("state") == "ready" and record.get("lock_hash") == digest:
                return record
        lock = root / plan.inputs[0]
        for marker in (source / name for name in INSTALL_MARKERS.get(plan.tool, ())):
            if marker.is_file() and marker.stat().st_mtime >= lock.stat().st_mtime:
                return {}  # installed outside devd, from a lockfile no newer than the install
        return None

    def _verify(self) -> bool:
        plan = self.plan
        guarded = {name: (plan.root / name).read_bytes() for name in plan.inputs}
        self.progress("deps", f"{self.label}: {plan.tool} verifies the clone")
        code = self.job.run(self._node_command(VERIFY), plan.root, _env(plan), self.timeout)
        changed = [n for n, data in guarded.items() if (plan.root / n).read_bytes() != data]
        for name in changed:  # the lockfile is the user's: a verify must never rewrite it
            (plan.root / name).write_bytes(guarded[name])
        return code == 0 and not changed

    # -- python ----------------------------------------------------------------

    def _venv(self) -> None:
        """A fresh .venv: uv sync for uv.lock, else uv or python -m venv plus an install."""
        plan, venv = self.plan, self.plan.tree
        if plan.mode == "sync":
            self._run(["uv", "sync", "--frozen"], "uv sync")
            return
        if venv.is_dir() and deps_state.load(self.ctx.paths.state_dir, self.ctx.worktree.id
                                             ).get(plan.key, {}).get("lock_hash"):
            _remove_tree(venv)  # ours from an earlier install: start fresh, no leftovers
        targets = [a for r in plan.inputs for a in ("-r", r)] if plan.mode == "requirements" \
            else ["-e", "."]
        python = str(venv / "bin" / "python")
        if plan.tool == "uv":
            self._run(["uv", "venv", "--allow-existing", str(venv)], "uv venv")
            self._run(["uv", "pip", "install", "--python", python, *targets], "uv pip install")
        else:
            if not (venv / "bin" / "python").exists():
                self._run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
            self._run([python, "-m", "pip", "install", "--no-input", *targets], "pip install")

    # -- running -----------------------------------------------------------------

    def _run(self, argv: list[str], what: str) -> None:
        meter = Meter(self.progress, f"{self.label}: {what}", _npm_total(self.plan)
                      if argv[:2] == ["npm", "ci"] else None)
        self.progress("deps", f"{self.label}: {' '.join(argv)}")
        code = self.job.run(argv, self.plan.root, _env(self.plan), self.timeout,
                            on_line=meter.line, on_tick=meter.tick)
        if code != 0:
            raise DevdError(
                f"{self.label}: `{' '.join(argv)}` failed in {self.plan.root} (exit {code}); "
                f"log: {self.job.log_path}\n{tail(self.job.log_path)}",
                "fix the cause shown above, then run `devd provision` again "
                "(the worktree's other resources are ready)", code="deps_failed")

    def _clean_if_deleted(self) -> None:
        """If the worktree vanished mid-install, undo what the tool may have recreated there."""
        wt = self.ctx.worktree.path
        if (wt / ".git").exists() or not wt.exists():
            return
        for path in (self.plan.tree, self.plan.root / CLONE_TMP):
            _remove_tree(path)
        for path in (self.plan.root, *self.plan.root.parents):
            try:
                path.rmdir()  # only empty directories: nothing of anyone else's goes
            except OSError:
                break
            if path == wt:
                break


class Meter:
    """Turns a tool's output into progress events: done/total where it says, else elapsed."""

    def __init__(self, progress: Progress, message: str, total: int | None) -> None:
        self.progress, self.message, self.total = progress, message, total
        self.done = 0
        self.start = self.last = time.monotonic()

    def line(self, text: str) -> None:
        if "http fetch GET" in text and ".tgz" in text:
            self.done += 1
        found = _PNPM_PROGRESS.search(text)
        if found:
            self.total, self.done = int(found[1]), int(found[2])

    def tick(self, elapsed: float) -> None:
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        extra: dict[str, Any] = {"elapsed": round(now - self.start, 1)}
        if self.total:
            extra.update(done=min(self.done, self.total), total=self.total)
        self.progress("deps", self.message, **extra)


def _npm_total(plan: Plan) -> int | None:
    """Packages npm ci will fetch: the lockfile's entries, minus links and the root."""
    try:
        data = json.loads((plan.root / plan.inputs[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    packages = data.get("packages")
    if not isinstance(packages, dict):
        return None
    return sum(1 for name, meta in packages.items()
               if name and isinstance(meta, dict) and not meta.get("link") and _fits(meta))


_NODE_OS = {"linux": "linux", "darwin": "darwin", "win32": "win32"}.get(sys.platform, sys.platform)
_NODE_CPU = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64"}.get(
    platform.machine().lower(), platform.machine().lower())


def _fits(meta: dict[str, Any]) -> bool:
    """Whether npm installs this entry here: platform packages (esbuild's, rollup's) of other
    systems are skipped, so they must not count towards the total."""
    for field, here in (("os", _NODE_OS), ("cpu", _NODE_CPU)):
        allowed = meta.get(field)
        if not isinstance(allowed, list) or not allowed:
            continue
        if f"!{here}" in allowed or (not all(a.startswith("!") for a in allowed)
                                      and here not in allowed):
            return False
    return True


def _yarn_classic(root: Path) -> bool:
    done = subprocess.run(["yarn", "--version"], cwd=root, capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout.strip().startswith("1.")


def _env(plan: Plan) -> dict[str, str]:
    """The daemon's environment for the tool, minus what would aim it at another venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONHOME", "CONDA_PREFIX")}
    env.update(NO_COLOR="1", npm_config_update_notifier="false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if plan.eco == "python":
        env["VIRTUAL_ENV"] = str(plan.tree)
    uv_dir = find_tool("uv")
    if uv_dir:  # uv installed beside devd's interpreter may not be on PATH
        env["PATH"] = f"{Path(uv_dir).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _remove_tree(path: Path) -> None:
    """Remove a tree without following symlinks out of it (a symlink itself is unlinked)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _install_hint(tool: str) -> str:
    return {"uv": "install it (`pip install uv`), or set [deps] python = \"pip\" in devd.toml",
            "pnpm": "install it (`npm install -g pnpm` or `corepack enable`)",
            "yarn": "install it (`npm install -g yarn` or `corepack enable`)",
            "bun": "install it (https://bun.sh)",
            }.get(tool, f"install {tool}, or set [deps] in devd.toml to another tool or none")
