"""Where the shipped notebooks and traces live, and JupyterLab on the notebooks.

vtrace is installed editable from its repository, so `notebooks/`, `traces/` and
`models/` sit next to the `vtrace` package. ``VTRACE_TRACES`` and ``VTRACE_NOTEBOOKS``
point elsewhere when set (a copy of the traces on a shared disk, say).

JupyterLab gets vtrace's Jupyter settings (`vtrace/jupyter/`) through
``JUPYTER_CONFIG_PATH``: jupytext's notebook view is the default viewer of Python files,
so a paired `.py` notebook opens as a notebook from the file browser, not as text.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtrace.errors import VtraceError

REPO_ROOT = Path(__file__).resolve().parent.parent
META_NAME = "meta.json"
# A Jupyter config directory vtrace ships: labconfig/default_setting_overrides.json (the file
# `jupytext-config set-default-viewer` writes in ~/.jupyter) makes "Jupytext Notebook" the
# default viewer of Python files. Defaults only: a user's own JupyterLab settings still win.
JUPYTER_CONFIG_DIR = Path(__file__).resolve().parent / "jupyter"

# The notebooks, in reading order.
NOTEBOOKS = (
    "01-explore-a-trace",
    "02-emulated-vs-virtio",
    "03-batching-and-ring-size",
    "04-exit-cost-sensitivity",
    "05-capture-on-your-host",
)


def traces_dir() -> Path:
    """The shipped traces: ``$VTRACE_TRACES``, else `traces/` in the repository."""
    return Path(os.environ.get("VTRACE_TRACES") or REPO_ROOT / "traces")


def notebooks_dir() -> Path:
    """The shipped notebooks: ``$VTRACE_NOTEBOOKS``, else `notebooks/` in the repository."""
    return Path(os.environ.get("VTRACE_NOTEBOOKS") or REPO_ROOT / "notebooks")


def notebook_path(name: str) -> Path:
    """The jupytext `.py` of a shipped notebook, by name (`01-explore-a-trace`)."""
    path = notebooks_dir() / f"{name}.py"
    if not path.is_file():
        known = ", ".join(NOTEBOOKS)
        raise VtraceError(f"{path}: no such notebook (shipped: {known})")
    return path


@dataclass(frozen=True)
class ShippedTrace:
    """A trace directory under `traces/`, with what its meta says about it."""

    name: str
    path: Path
    meta: dict[str, Any]

    @property
    def events(self) -> int:
        return int(self.meta.get("events") or 0)

    @property
    def device(self) -> str:
        """The device the trace exercised: meta's `device` (top level, or in the section of
        the tool that made it, like `lab`), else the directory name."""
        candidates = [self.meta.get("device")]
        candidates += [v.get("device") for v in self.meta.values() if isinstance(v, dict)]
        for value in candidates:
            if isinstance(value, str) and value:
                return value
        return self.name

    @property
    def side(self) -> str:
        """Which side of the comparison the trace is on: emulated, virtio, or other."""
        text = f"{self.device} {self.name}".lower()
        if any(k in text for k in ("virtio", "vhost")):
            return "virtio"
        if any(k in text for k in ("emulated", "ide", "e1000")):
            return "emulated"
        return "other"


def shipped_traces(root: Path | None = None) -> list[ShippedTrace]:
    """Every complete trace directory under ``root`` (default :func:`traces_dir`), by name.

    Directories without a readable `meta.json` are not traces and are left out, and so
    are hidden ones (a trace being made under a temporary name).
    """
    root = root or traces_dir()
    if not root.is_dir():
        return []
    found = []
    for meta_path in sorted(root.glob(f"*/{META_NAME}")):
        if meta_path.parent.name.startswith("."):
            continue  # a trace still being written under a temporary name
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            found.append(ShippedTrace(meta_path.parent.name, meta_path.parent, meta))
    return found


def shipped_trace(name: str, root: Path | None = None) -> Path:
    """The path of one shipped trace by directory name; a clear error listing what exists."""
    root = root or traces_dir()
    path = root / name
    if (path / META_NAME).is_file():
        return path
    have = ", ".join(t.name for t in shipped_traces(root)) or "none"
    raise VtraceError(f"{path}: no such trace (traces in {root}: {have})")


def jupyterlab_command(
    directory: Path,
    *,
    port: int | None = None,
    open_browser: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that starts JupyterLab on ``directory`` with this Python.

    As root (a lab host, a container) JupyterLab refuses to start unless told it may.
    """
    cmd = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={directory}"]
    if port is not None:
        cmd.append(f"--port={port}")
    if not open_browser:
        cmd.append("--no-browser")
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    return [*cmd, *extra]


def jupyterlab_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment JupyterLab runs in: ``base`` (default this process's) with this
    Python's directory first on ``PATH`` and vtrace's Jupyter settings first on
    ``JUPYTER_CONFIG_PATH`` (the paired `.py` notebooks open as notebooks)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    config = [str(JUPYTER_CONFIG_DIR), env.get("JUPYTER_CONFIG_PATH", "")]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(p for p in config if p)
    return env


def start_jupyterlab(
    directory: Path | None = None, *, port: int | None = None, open_browser: bool = True
) -> int:
    """Run JupyterLab on the notebooks until it is stopped; returns its exit status.

    JupyterLab opens `.py` notebooks as notebooks through jupytext's contents manager and,
    from the file browser, with jupytext's notebook view (:func:`jupyterlab_env`); the
    kernel is this Python, so `import vtrace` works in every cell.
    """
    import subprocess

    directory = directory or notebooks_dir()
    if not directory.is_dir():
        raise VtraceError(f"{directory}: no notebooks directory")
    try:
        return subprocess.call(
            jupyterlab_command(directory, port=port, open_browser=open_browser),
            env=jupyterlab_env(),
        )
    except KeyboardInterrupt:
        return 130
