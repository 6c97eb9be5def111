"""Finding and loading the BPF Compiler Collection from Debian's python3-bpfcc.

bcc's Python bindings are not on PyPI (the PyPI package named ``bcc`` is an unrelated
project); Debian installs them under /usr/lib/python3/dist-packages, pure Python over
libbcc, usable from any Python 3 that can see that folder. That folder is appended to
``sys.path`` only when bcc is not importable already, and after everything else, so it never
shadows packages of the virtual environment.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
TRACEFS = Path("/sys/kernel/tracing")
INSTALL_FIX = "apt-get install python3-bpfcc bpfcc-tools"


def _import_bcc(dist_packages: str) -> ModuleType | str:
    """Import bcc, from Debian's folder if needed; the module, or why it failed."""
    try:
        mod = importlib.import_module("bcc")
        if hasattr(mod, "BPF"):
            return mod
    except (ImportError, OSError):
        pass
    # Either nothing called `bcc` is importable, or something else (the unrelated PyPI
    # package) shadows Debian's: forget it and look in Debian's folder first, once.
    for name in [n for n in sys.modules if n == "bcc" or n.startswith("bcc.")]:
        del sys.modules[name]
    sys.path.insert(0, dist_packages)
    try:
        mod = importlib.import_module("bcc")
    except ImportError as e:
        return f"bcc is not importable ({e}): {INSTALL_FIX}"
    except OSError as e:  # libbcc.so missing or broken
        return f"bcc's library failed to load ({e}): {INSTALL_FIX}"
    finally:
        # Keep the folder reachable for bcc's own lazy imports, but behind the venv's.
        sys.path.remove(dist_packages)
        if dist_packages not in sys.path:
            sys.path.append(dist_packages)
    if not hasattr(mod, "BPF"):
        where = getattr(mod, "__file__", "?")
        return (
            f"the module `bcc` at {where} is not the BPF Compiler Collection (the unrelated "
            f"PyPI package?): pip uninstall bcc; {INSTALL_FIX}"
        )
    return mod


def headers_problem(
    modules_root: Path = Path("/lib/modules"), release: str | None = None
) -> str | None:
    """Why bcc cannot compile here for lack of kernel headers, or None."""
    release = release or platform.release()
    build = modules_root / release / "build"
    if (build / "include").is_dir() or (build / "Makefile").exists():
        return None
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return None  # bcc unpacks CONFIG_IKHEADERS itself
    return (
        f"no kernel headers for {release} in {build}: apt-get install linux-headers-{release}, "
        "or `vtrace doctor --fix` to link Debian's linux-headers-amd64 (tracepoint programs only)"
    )


def tracefs_problem(tracefs: Path = TRACEFS) -> str | None:
    """Why tracepoints cannot be found, or None."""
    try:
        if (tracefs / "events").is_dir():
            return None
    except PermissionError:
        return f"{tracefs} is not readable by this user: run as root"
    return f"tracefs is not mounted at {tracefs}: mount -t tracefs nodev {tracefs}"


def bcc_problem(dist_packages: str = DEBIAN_DIST_PACKAGES) -> str | None:
    """None when bcc (with BPF) is importable and can compile here; else the one-line fix."""
    got = _import_bcc(dist_packages)
    if isinstance(got, str):
        return got
    return headers_problem() or tracefs_problem()


def load_bcc(dist_packages: str = DEBIAN_DIST_PACKAGES) -> ModuleType:
    """The bcc module, or a :class:`VtraceError` saying how to install it."""
    from vtrace.errors import VtraceError

    got = _import_bcc(dist_packages)
    if isinstance(got, str):
        raise VtraceError(got)
    return got


def is_root() -> bool:
    return os.geteuid() == 0
