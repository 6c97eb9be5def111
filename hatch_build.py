"""Build hook (hatchling): compiles vtrace/ingest/_tracefs.c, the compiled reader of tracefs
lines, into the package.

An editable install (``scripts/setup-python.sh``) puts the module next to its source; a wheel
carries it. A compile that fails (no C compiler, no Python headers) is reported and the
build goes on: vtrace then reads every line with polars (vtrace/ingest/native.py), and
tests/test_ingest_native.py fails, so a checkout without the module does not go unnoticed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = "vtrace/ingest/_tracefs.c"
MODULE = "vtrace/ingest/_tracefs"
CFLAGS = ["-O3", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]


class TracefsBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        name = MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        self._tmp = Path(tempfile.mkdtemp(prefix="vtrace-build-"))
        built = self._tmp / Path(name).name
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        include = sysconfig.get_paths()["include"]
        cmd = [*cc, *CFLAGS, f"-I{include}", str(root / SOURCE), "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.app.display_warning(
                f"vtrace: could not compile {SOURCE} ({shlex.join(cmd)}): "
                f"{done.stderr.strip()[-2000:]}\nvtrace will read tracefs lines with polars only."
            )
            return
        if version == "editable":
            # Next to the source; a new file renamed into place, so a process that has the
            # old module loaded keeps a whole file.
            staged = root / (name + ".tmp")
            shutil.copyfile(built, staged)
            os.chmod(staged, 0o755)
            os.replace(staged, root / name)
        else:
            build_data["force_include"][str(built)] = name
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
