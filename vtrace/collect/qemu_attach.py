"""QEMU's own events from a VM that is already running, over its QMP socket.

For the recording window only, :class:`QemuAttach` points QEMU's log at a file vtrace owns
(HMP ``logfile``), turns QEMU's virtio and device trace events on
(``trace-event-set-state``), reads the log as it grows and hands the events to the
recording (the same trace as the kernel's), then puts every event back in its previous
state and the log back where it was. What it changed is written to a state file first, so
that after a ``kill -9`` ``vtrace doctor --qmp SOCKET --fix`` can undo it.

Clocks: with ``-msg timestamp=on`` each log line carries gettimeofday's wall-clock time;
kernel events carry CLOCK_MONOTONIC. The offset between the two is measured in this process
when each batch of lines is read (and at start and stop, stored in meta), and subtracted.
Without timestamps the lines have no time at all: their events are kept as counts (per
event, device and queue) in meta, not as events.

The log is rotated: once the file QEMU writes holds ``log_rotate_bytes``, QEMU is pointed at
a new one (HMP ``logfile``), the old one is read to its end once QEMU has closed it, then
removed. A recording of hours keeps at most two log files of about that size per VM; the
events themselves go into the trace's parts (bounded by ``--max-size``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl

from vtrace import schema as s
from vtrace.errors import VtraceError
from vtrace.qmp import Qmp, trace_states

# QEMU's virtio and device trace events vtrace turns on (those this QEMU has).
# memory_region_ops_* are left out: every access of every region (timers, serial, ...)
# would flood the log of a production VM.
ATTACH_EVENTS = (
    s.VIRTIO_QUEUE_NOTIFY,
    s.VIRTQUEUE_POP,
    s.VIRTQUEUE_FILL,
    s.VIRTQUEUE_FLUSH,
    s.VIRTIO_NOTIFY,
    s.VIRTIO_NOTIFY_IRQFD,
    "virtio_blk_handle_read",
    "virtio_blk_handle_write",
    "virtio_blk_req_complete",
    "virtio_blk_submit_multireq",
    "ide_exec_cmd",
    "ide_dma_cb",
)
COUNTS_NOTE = (
    "QEMU runs without -msg timestamp=on: its log lines carry no time, so its events are "
    "kept as counts per event, device and queue (qemu.vms[].counts), not as events; QMP "
    "switches the events on and off one at a time, so each counts a slightly different window"
)
READ_INTERVAL_S = 0.5
# The QEMU log file's size at which it is rotated (see the module's docstring).
LOG_ROTATE_BYTES = 64 << 20
# How long QEMU may take to close a log it was moved off (it frees the old file after an
# RCU grace period, usually within milliseconds).
LOG_CLOSE_TIMEOUT_S = 5.0


def state_dir() -> Path:
    """Where the changes made to running VMs are written until they are undone."""
    run = Path("/run")
    if os.access(run, os.W_OK):
        return run / "vtrace"
    return Path(tempfile.gettempdir()) / f"vtrace-{os.getuid()}"


def state_file(pid: int) -> Path:
    return state_dir() / f"qmp-{pid}.json"


def clock_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC, from the tightest of a few paired readings."""
    best: tuple[int, int] | None = None
    for _ in range(5):
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m2 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or m2 - m1 < best[0]:
            best = (m2 - m1, r - (m1 + m2) // 2)
    assert best is not None
    return best[1]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _option(args: list[str], name: str) -> str | None:
    """The value of the last ``-name VALUE`` (or ``--name=VALUE``) on a QEMU command line."""
    found = None
    for i, a in enumerate(args):
        if a in (name, "-" + name) and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(name + "=") or a.startswith("-" + name + "="):
            found = a.split("=", 1)[1]
    return found


def cmdline_facts(pid: int) -> dict[str, Any]:
    """What QEMU's command line says: its log file (-D), timestamps (-msg), -name."""
    args = _cmdline(pid)
    msg = _option(args, "-msg") or ""
    name = _option(args, "-name")
    if name is not None:
        # -name NAME[,debug-threads=on] or -name guest=NAME,...
        parts = dict(p.split("=", 1) if "=" in p else ("guest", p) for p in name.split(",") if p)
        name = parts.get("guest") or parts.get("process")
    return {
        "logfile": _option(args, "-D"),
        "timestamps": "timestamp=on" in msg.split(",") or msg == "timestamp=on",
        "name": name,
    }


def vm_name(pid: int, qmp_name: str | None = None) -> str:
    """A VM's name: QEMU's -name (libvirt passes the domain name there), else its process
    name."""
    if qmp_name:
        return qmp_name
    name = cmdline_facts(pid).get("name")
    if name:
        return str(name)
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid}"


def host_vms() -> dict[str, dict[str, str]]:
    """Every KVM VM on the host (a process holding a ``kvm-vm`` file): pid -> its name."""
    vms: dict[str, dict[str, str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
            if any(os.readlink(fd) == "anon_inode:kvm-vm" for fd in fds):
                vms[proc.name] = {"name": vm_name(int(proc.name))}
        except OSError:  # gone, or not ours to read
            continue
    return vms


def blockstats(qmp: Qmp) -> dict[str, dict[str, int]]:
    """Completed operations per block device (QMP ``query-blockstats``)."""
    out: dict[str, dict[str, int]] = {}
    for dev in qmp.execute("query-blockstats") or []:
        key = dev.get("device") or dev.get("qdev") or dev.get("node-name") or "?"
        st = dev.get("stats", {})
        out[key] = {
            k: int(st.get(k, 0)) for k in ("rd_operations", "wr_operations", "flush_operations")
        }
    return out


def timed_blockstats(qmp: Qmp) -> dict[str, Any]:
    """:func:`blockstats` and the CLOCK_MONOTONIC readings just before and after the query."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    stats = blockstats(qmp)
    return {
        "blockstats": stats,
        "blockstats_monotonic_ns": [before, time.clock_gettime_ns(time.CLOCK_MONOTONIC)],
    }


def _requests(stats: dict[str, dict[str, int]]) -> int:
    return sum(v["rd_operations"] + v["wr_operations"] for v in stats.values())


def write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def restore(qmp: Qmp, state: dict[str, Any]) -> list[str]:
    """Put the events back as ``state`` says they were and the log where it was; returns the
    events that were turned off."""
    off = []
    for name, was_on in state.get("previous", {}).items():
        qmp.execute("trace-event-set-state", name=name, enable=bool(was_on))
        if not was_on:
            off.append(name)
    # QEMU without -D logs to stderr, and no monitor command goes back there: /dev/null.
    qmp.hmp(f"logfile {state.get('logfile') or '/dev/null'}")
    return off


class QemuAttach:
    """One running VM's QEMU events for a recording (see the module's docstring)."""

    def __init__(
        self, socket_path: str | os.PathLike[str], log_rotate_bytes: int = LOG_ROTATE_BYTES
    ) -> None:
        self.socket = Path(socket_path)
        self.log_rotate_bytes = log_rotate_bytes
        self.log_rotations = 0
        self.log_bytes = 0  # read from QEMU's log files
        # A QMP socket serves one client at a time: vtrace connects only to switch and
        # query, so other tools (and `vtrace doctor --qmp`) can use it while recording.
        with Qmp(self.socket) as qmp:
            self.pid = qmp.peer_pid()
            facts = cmdline_facts(self.pid)
            self.name = vm_name(self.pid, (qmp.execute("query-name") or {}).get("name"))
            self.timestamps = bool(facts["timestamps"])
            self.logfile: str | None = facts["logfile"]
            # vCPU threads: a log line's thread id names the vCPU that wrote it.
            self.vcpu_threads = {
                int(c["thread-id"]): int(c["cpu-index"])
                for c in qmp.execute("query-cpus-fast") or []
            }
            available = trace_states(qmp)
        self.events = [e for e in ATTACH_EVENTS if e in available]
        self.previous = {e: available[e] for e in self.events}
        self.state_path = state_file(self.pid)
        if not self.events:
            raise VtraceError(
                f"--qmp {self.socket}: QEMU pid {self.pid} has none of the "
                f"virtio/device trace events ({', '.join(ATTACH_EVENTS[:3])}, ...)"
            )
        if self.state_path.exists():
            raise VtraceError(
                f"--qmp {self.socket}: {self.state_path} says a recording of QEMU pid "
                f"{self.pid} did not undo its changes: run vtrace doctor --qmp {self.socket} --fix"
            )
        self.log_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._offset = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # One QMP session at a time (a rotation in the follower, the stop in the caller),
        # and no rotation once the stop has put the log back.
        self._qmp_lock = threading.Lock()
        self._sink: Any = None
        self.meta: dict[str, Any] = {}
        self.counts: dict[tuple[str, str | None, int | None], int] = {}
        self.events_added = 0
        self.lines_unparsed = 0
        self._queues: dict[str, int] = {}  # VirtQueue pointer -> index, across batches
        self._devices: dict[str, str] = {}  # VirtQueue pointer -> device name
        self._errors: list[BaseException] = []
        self._on = False
        # Every event was on from _window_start to _window_end (QMP switches them one at a
        # time, tens of ms apart on a busy host): events outside are left out, so that no
        # event counts a longer window than another.
        self._window_start = 0
        self._window_end: int | None = None
        self.outside_window = 0

    # -- start / stop ----------------------------------------------------------------------------
    def start(self, sink: Any) -> None:
        """Point the log at a file of ours, turn the events on, start following the log.

        ``sink(frame)`` takes each batch of events (``Recording.add_events``)."""
        self._sink = sink
        qmp = self._connect()
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix="vtrace-qemu-log-")
            self.log_path = Path(self._tmp.name) / f"qemu-{self.pid}.log"
            self.log_path.touch()
            start = {
                "unix": time.time(),
                "clock_offset_ns": clock_offset_ns(),
                **timed_blockstats(qmp),
            }
            self.meta = {
                "socket": str(self.socket),
                "pid": self.pid,
                "name": self.name,
                "timestamps": self.timestamps,
                "events": self.events,
                "previous_states": {e: "on" if v else "off" for e, v in self.previous.items()},
                "vcpu_threads": {str(t): i for t, i in self.vcpu_threads.items()},
                "start": start,
            }
            if not self.timestamps:
                self.meta["note"] = COUNTS_NOTE
            self._write_state()
            self._on = True
            self._switch_on(qmp, start)
        finally:
            qmp.close()
        self._thread = threading.Thread(
            target=self._follow, name=f"vtrace-qemu-{self.pid}", daemon=True
        )
        self._thread.start()

    def _write_state(self) -> None:
        write_state(
            self.state_path,
            {
                "socket": str(self.socket),
                "pid": self.pid,
                "previous": self.previous,
                "logfile": self.logfile,
                "log": str(self.log_path),
            },
        )

    def _connect(self) -> Qmp:
        """A QMP session with this VM (the same process as at the start)."""
        qmp = Qmp(self.socket)
        pid = qmp.peer_pid()
        if pid != self.pid:
            qmp.close()
            raise VtraceError(
                f"--qmp {self.socket}: now served by pid {pid}, not QEMU pid {self.pid}"
            )
        return qmp

    def _switch_on(self, qmp: Qmp, start: dict[str, Any]) -> None:
        qmp.hmp(f"logfile {self.log_path}")
        # The window's edges as brackets in CLOCK_MONOTONIC: the events went on between
        # the two readings (and off between the two at the stop).
        turning_on = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for e in self.events:
            qmp.execute("trace-event-set-state", name=e, enable=True)
        self._window_start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        start["events_on_monotonic_ns"] = [turning_on, self._window_start]

    def stop(self) -> dict[str, Any]:
        """Restore every event and the log, read the rest of the log; returns the VM's meta."""
        if not self._on:
            self._close()
            return self.meta
        problems: list[str] = []
        qmp: Qmp | None = None
        with self._qmp_lock:  # after a rotation under way; none starts after this
            self._on = False
            turning_off = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            self._window_end = turning_off  # lines the follower reads from now on are cut
            try:
                qmp = self._connect()
                restore(qmp, {"previous": self.previous, "logfile": self.logfile})
                self.state_path.unlink(missing_ok=True)
            except (OSError, VtraceError) as e:
                problems.append(
                    f"could not restore QEMU pid {self.pid}'s trace events ({e}); "
                    f"run vtrace doctor --qmp {self.socket} --fix"
                )
        stop: dict[str, Any] = {
            "events_off_monotonic_ns": [turning_off, time.clock_gettime_ns(time.CLOCK_MONOTONIC)],
            "unix": time.time(),
            "clock_offset_ns": clock_offset_ns(),
        }
        if qmp is not None:
            with contextlib.suppress(OSError, VtraceError):
                stop.update(timed_blockstats(qmp))
            qmp.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError, VtraceError):
            if self.log_path is not None and not problems:
                self._wait_closed(self.log_path)  # QEMU flushes it as it closes it
            self._read_batch()  # what was written before the log moved
        self.meta["stop"] = stop
        if "blockstats" in stop:
            self.meta["requests_blockstats"] = _requests(stop["blockstats"]) - _requests(
                self.meta["start"]["blockstats"]
            )
        self.meta["events_recorded"] = self.events_added
        self.meta["lines_unparsed"] = self.lines_unparsed
        self.meta["log_rotations"] = self.log_rotations
        self.meta["log_bytes"] = self.log_bytes
        if self.timestamps:
            self.meta["window_monotonic_ns"] = [self._window_start, self._window_end]
            self.meta["outside_window"] = self.outside_window
        self.meta["counts"] = [
            {"event": e, "device": d, "queue": q, "count": n}
            for (e, d, q), n in sorted(self.counts.items(), key=lambda kv: str(kv[0]))
        ]
        problems += [f"{type(e).__name__}: {e}" for e in self._errors]
        if problems:
            self.meta["error"] = "; ".join(problems)
        self._close()
        return self.meta

    def _close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- following the log -------------------------------------------------------------------------
    def _follow(self) -> None:
        try:
            while not self._stop.wait(READ_INTERVAL_S):
                self._read_batch()
        except BaseException as e:  # reported in meta at the stop
            self._errors.append(e)

    def _read_batch(self) -> None:
        """Import the complete lines written since the last batch; rotate the log once it
        holds ``log_rotate_bytes``."""
        assert self.log_path is not None
        with self._lock:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line QEMU is still writing waits for the next
            self._offset += end
            self._import(data[:end])
            if self._offset >= self.log_rotate_bytes:
                self._rotate()

    def _rotate(self) -> None:
        """Point QEMU's log at a new file, read the old one to its end, remove it."""
        assert self.log_path is not None
        old, offset = self.log_path, self._offset
        new = old.with_name(f"qemu-{self.pid}.{self.log_rotations + 1}.log")
        with self._qmp_lock:
            if not self._on:  # stopping: the log goes back where it was instead
                return
            new.touch()
            qmp = self._connect()
            try:
                qmp.hmp(f"logfile {new}")
            finally:
                qmp.close()
            self.log_path, self._offset = new, 0
            self.log_rotations += 1
            self._write_state()
        self._wait_closed(old)
        with old.open("rb") as f:
            f.seek(offset)
            data = f.read()
        old.unlink()
        end = data.rfind(b"\n") + 1
        self._import(data[:end])
        if end < len(data):  # QEMU closed it in mid-line: nothing more will come
            self.lines_unparsed += 1

    def _wait_closed(self, path: Path) -> None:
        """Until QEMU holds no descriptor of ``path`` (it has flushed and closed it)."""
        fd_dir = Path(f"/proc/{self.pid}/fd")
        until = time.monotonic() + LOG_CLOSE_TIMEOUT_S
        while time.monotonic() < until:
            try:
                held = any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir())
            except FileNotFoundError:  # an fd closed while listing: look again
                continue
            except OSError:  # not ours to look at: give QEMU the read interval
                time.sleep(READ_INTERVAL_S)
                return
            if not held:
                return
            time.sleep(0.005)

    def _import(self, data: bytes) -> None:
        """Hand the events of these complete lines to the recording and count them."""
        from vtrace.ingest.qemu import read_qemu

        assert self.log_path is not None
        if not data:
            return
        self.log_bytes += len(data)
        offset_ns = clock_offset_ns()
        chunk = self.log_path.with_name("batch.log")
        chunk.write_bytes(data)
        try:
            events, meta = read_qemu(chunk)
        except VtraceError:  # no event in these lines (other log output)
            self.lines_unparsed += data.count(b"\n")
            return
        finally:
            chunk.unlink(missing_ok=True)
        self.lines_unparsed += int(meta.get("unparsed", 0) or 0)
        events = self._name_queues(events)
        if self.timestamps:
            aligned = pl.col("ts_ns") - offset_ns
            inside = aligned >= self._window_start
            if self._window_end is not None:
                inside &= aligned <= self._window_end
            kept = events.filter(inside)
            self.outside_window += events.height - kept.height
            events = kept
            frame = events.with_columns(
                ts_ns=aligned,
                pid=pl.lit(self.pid, pl.Int32),
                vcpu=pl.coalesce(
                    "vcpu",
                    pl.col("tid").replace_strict(
                        self.vcpu_threads, default=None, return_dtype=pl.Int32
                    ),
                ),
            )
            self.events_added += frame.height
            self._sink(frame)
        counts = (
            events.group_by(
                pl.col("event").cast(pl.String), pl.col("device").cast(pl.String), "queue"
            )
            .len()
            .iter_rows()
        )  # a row per event, device and queue: a handful
        for e, d, q, n in counts:
            self.counts[(e, d, q)] = self.counts.get((e, d, q), 0) + n

    def _name_queues(self, events: pl.DataFrame) -> pl.DataFrame:
        """Queue index and device of events whose queue was named in an earlier batch.

        The importer names a VirtQueue by the ``virtio_queue_notify`` lines in the same
        file; a batch may hold pops of a queue kicked in an earlier one."""
        vq = pl.col("raw").str.extract(r"\bvq (0x[0-9a-fA-F]+)", 1)
        frame = events.with_columns(_vq=vq)
        known = frame.filter(pl.col("queue").is_not_null() & pl.col("_vq").is_not_null())
        for ptr, q, d in (
            known.select("_vq", "queue", pl.col("device").cast(pl.String)).unique("_vq").iter_rows()
        ):  # a row per queue
            self._queues.setdefault(ptr, q)
            if d is not None:
                self._devices.setdefault(ptr, d)
        if not self._queues:
            return frame.drop("_vq")
        queues = pl.col("_vq").replace_strict(self._queues, default=None, return_dtype=pl.Int32)
        devices = pl.col("_vq").replace_strict(self._devices, default=None, return_dtype=pl.String)
        return s.conform(
            frame.with_columns(
                queue=pl.coalesce(queues, "queue"),
                device=pl.coalesce(devices, pl.col("device").cast(pl.String)),
            ).drop("_vq")
        )


def attach_all(sockets: list[str]) -> list[QemuAttach]:
    """Connect to every socket (before anything is recorded: a bad one costs nothing)."""
    attached: list[QemuAttach] = []
    try:
        for sock in sockets:
            a = QemuAttach(sock)
            if any(b.pid == a.pid for b in attached):
                raise VtraceError(f"--qmp {sock}: QEMU pid {a.pid} is already given")
            attached.append(a)
    except BaseException:
        for a in attached:
            a._close()
        raise
    return attached
