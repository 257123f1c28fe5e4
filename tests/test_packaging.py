"""The built wheel carries every module and template: tests run from the source tree, so
without this check a package missing from the wheel only shows on a user's machine."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_contains_every_module_and_template(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("devd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "devd").rglob("*.py")}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    templates = {str(p.relative_to(ROOT)) for p in (ROOT / "devd" / "templates").iterdir()}
    assert templates <= names, f"missing from the wheel: {sorted(templates - names)}"
    # The command is bin/devd (a light launcher), not a console-script entry point.
    script = next(n for n in names if n.endswith(".data/scripts/devd"))
    text = zipfile.ZipFile(wheel).read(script).decode()
    assert text.startswith("#!python\n") and "from devd.quick import main" in text
