"""Text for `devd watchers`, `devd doctor` and `devd run`'s warning (CLI side, stdlib only).

Process names and command lines come from other programs: every one goes through
`one_line`, so newlines and escape codes in a hostile name are shown, never obeyed.
"""

from __future__ import annotations

from typing import Any

from devd.watchers.analysis import one_line


def _of(used: Any, limit: Any) -> str:
    shown = "unknown" if used is None else str(used)
    if not limit:
        return f"{shown} of unknown"
    return f"{shown} of {limit}" + (f" ({used / limit:.0%})" if used is not None else "")


def watchers(report: dict[str, Any]) -> str:
    """Limits, totals, level, top consumers, per-worktree state."""
    lines = [f"watcher budget: {report['level']}",
             f"  inotify watches    {_of(report['watches'], report['max_watches'])}",
             f"  inotify instances  {_of(report['instances'], report['max_instances'])}"]
    lines += [f"  ! {one_line(r, 200)}" for r in report.get("reasons", [])]
    lines += consumers(report.get("top", []))
    for wt in report.get("worktrees", []):
        note = f"  {one_line(wt['reason'], 160)}" if wt.get("reason") else ""
        watches = "?" if wt["watches"] is None else wt["watches"]
        lines.append(f"  {wt['state']:<8} {watches:>7} watches  {one_line(wt['path'])}{note}")
    return "\n".join(lines)


def consumers(top: list[dict[str, Any]]) -> list[str]:
    if not top:
        return ["  no process holds an inotify instance"]
    lines = ["  top consumers:"]
    for c in top:
        flags = ", ".join(f for f, on in (("node_modules", c["node_modules"]),
                                          (".git", c["git"])) if on)
        where = one_line(c["worktree"]) if c["worktree"] else "no worktree"
        watches = "?" if c["watches"] is None else c["watches"]
        lines.append(f"    pid {c['pid']:<7} {watches:>7} watches  {one_line(c['name'], 32)}: "
                     f"{one_line(c['command'], 50)}"
                     f"  [{where}]" + (f" watches {flags}" if flags else ""))
    return lines


def doctor(result: dict[str, Any]) -> str:
    """The recovery ladder, top to bottom."""
    lines = [watchers(result["watchers"]), *binding(result.get("limits", []))]
    for b in result["broken"]:
        lines += [f"broken: {one_line(b['worktree'])}: pid {b['pid']} printed",
                  f"    {one_line(b['line'], 200)}"]
        if b.get("restart"):
            lines.append(f"  after fixing the limit, restart it (it will not retry by itself):"
                         f"\n    devd watchers --restart   (in the background, or by hand:)"
                         f"\n    {one_line(b['restart'], 400)}")
    lines += [f"partial: {one_line(p['worktree'])}: {one_line(p['reason'], 200)}"
              for p in result["partial"]]
    if "applied" in result:
        lines.append(f"--fix: {one_line(result['applied']['why'], 300)}")
    if not result["fix_needed"]:
        lines.append("no fix needed.")
        return "\n".join(lines)
    fix = result["fix"]
    if fix.get("namespace"):
        return "\n".join([*lines, "fix (as root of this user namespace; devd never runs it "
                          "silently):", *(f"  {c}" for c in fix["now"]),
                          f"they last as long as the namespace: {fix['persist']}",
                          "or run `devd doctor --fix` as that root"])
    lines += ["fix (needs root; devd never runs it silently):", *(f"  {c}" for c in fix["now"]),
              f"make it persist across reboots ({fix['persist_file']}):", f"  {fix['persist']}",
              "or run `sudo devd doctor --fix`"]
    return "\n".join(lines)


def binding(limits: list[dict[str, Any]]) -> list[str]:
    """Which sysctl sets each limit here (a namespace's own, or the machine's)."""
    return [f"  binding limit: {lim['sysctl']} = {lim['value']} "
            f"({'this user namespace' if lim['namespace'] else 'the machine'}'s)"
            for lim in limits]


def restarted(plan: dict[str, Any]) -> str:
    """What `devd watchers --restart` did."""
    lines = []
    for run in plan["runs"]:
        lines.append(f"restarted {one_line(run['worktree'])}: pid {run['pid']} "
                     f"({run['kind']}, {run.get('stopped', 'already exited')}) → pid "
                     f"{run['new_pid']}: {one_line(' '.join(run['argv']), 120)}")
        lines.append(f"  output: {one_line(run['log'])}")
    for unit in plan.get("services", []):
        lines.append(f"restarted {one_line(unit['worktree'])}: service {one_line(unit['service'])}"
                     f" ({unit['kind']}, pid {unit['pid']}) → pid {unit['new_pid']}, "
                     f"{unit['state']} (`devd logs {one_line(unit['service'])}`)")
    lines += [f"not restarted {one_line(s['worktree'])}: {one_line(s['why'], 200)}"
              for s in plan["skipped"]]
    lines += [f"left down {one_line(s['worktree'])}: service {one_line(s['service'])} was "
              "taken down (`devd up` starts it)" for s in plan.get("left_down", [])]
    return "\n".join(lines) or "nothing to restart: no devd-started watcher has failed."
