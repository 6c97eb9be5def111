"""A minimal QMP client over QEMU's unix socket, shared by the QEMU lab and the recorder.

One command at a time; asynchronous events are skipped. The socket's peer credentials
(``SO_PEERCRED``) give QEMU's pid, which QMP itself does not report.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtrace.errors import VtraceError


class QemuExited(Exception):
    """QEMU ended before its QMP socket was up (bad kernel, bad option)."""


class Qmp:
    """A QMP session: connect (retrying until ``deadline`` while ``alive()``), negotiate, execute."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        deadline: float | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        # Without a deadline: one attempt with a short timeout (a socket that exists now).
        until = time.monotonic() + 5.0 if deadline is None else deadline
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(max(0.1, until - time.monotonic()))
                self._sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                self._sock.close()
                if alive is None:
                    raise VtraceError(f"{self.path}: no QMP socket there ({e.strerror})") from None
                if not alive():
                    raise QemuExited from None
                if time.monotonic() > until:
                    raise VtraceError(f"QEMU did not open its QMP socket {self.path}") from None
                time.sleep(0.05)
            except OSError as e:
                self._sock.close()
                raise VtraceError(f"{self.path}: cannot connect: {e.strerror or e}") from None
        self._file = self._sock.makefile("rwb")
        try:
            self._read()  # greeting
            self.execute("qmp_capabilities")
        except (OSError, VtraceError, json.JSONDecodeError) as e:
            # QEMU accepted the connection and then exited (a kernel it cannot load): its
            # own words on the console say why, not the reset socket. The socket closes
            # before the process has ended: give it a moment.
            self.close()
            if alive is None:
                raise VtraceError(f"{self.path}: not a QMP socket ({e})") from None
            wait_until = time.monotonic() + 2.0
            while alive() and time.monotonic() < wait_until:
                time.sleep(0.02)
            if not alive():
                raise QemuExited from None
            raise

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise VtraceError("QEMU closed its QMP socket")
            msg = json.loads(line)
            if "event" not in msg:  # asynchronous events are not answers
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self._file.write(json.dumps(req).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise VtraceError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command; its output (an error is reported as output by HMP)."""
        return str(self.execute("human-monitor-command", **{"command-line": command_line}))

    def peer_pid(self) -> int:
        """The pid of the QEMU process at the other end of the socket."""
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        return pid

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trace_states(qmp: Qmp, pattern: str = "*") -> dict[str, bool]:
    """Every trace event matching ``pattern`` whose state can change: name -> enabled."""
    rows = qmp.execute("trace-event-get-state", name=pattern)
    return {r["name"]: r["state"] == "enabled" for r in rows if r["state"] != "unavailable"}
