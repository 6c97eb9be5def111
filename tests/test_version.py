"""The version is in one module the package, the store and the CLI read; pyproject agrees."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import vtrace
from vtrace.version import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_one_version_everywhere() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert vtrace.__version__ == __version__ == project["version"]


def test_the_store_imports_without_the_package_first() -> None:
    # Before: vtrace.store imported __version__ from vtrace, whose __init__ imports the store.
    r = subprocess.run(
        [sys.executable, "-c", "import vtrace.store as s; print(s.__version__)"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == __version__, r.stderr
