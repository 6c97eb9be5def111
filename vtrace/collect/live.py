"""Running a recording from the command line: live line, stop on Ctrl-C / SIGTERM /
duration / every ``--pid`` process gone / a failed write, and the one-screen summary; plus the
doctor's verdict table."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vtrace.analyze.console import dropped_line
from vtrace.collect.doctor import FAIL, OK, Check
from vtrace.collect.recording import MAX_SIZE_REASON, Recording

REFRESH_S = 0.5
PIDS_EXITED = "every --pid process exited"


def _live_line(
    rec: Recording, out: Path, last: tuple[float, int]
) -> tuple[Text, tuple[float, int]]:
    now, delivered = time.monotonic(), rec.delivered
    rate = (delivered - last[1]) / max(now - last[0], 1e-9)
    lost = rec.lost_per_cpu()
    text = Text.assemble(
        ("recording ", "bold"),
        f"{out}  {rec.elapsed_s():7.1f} s  events {delivered:,}  ",
        (f"{rate:,.0f}/s", "cyan"),
        "  lost ",
        (f"{sum(lost):,}", "red" if sum(lost) else "green"),
        f" {lost}" if sum(lost) else "",
        "   (Ctrl-C stops)",
    )
    return text, (now, delivered)


def record(
    out: Path,
    console: Console,
    *,
    pids: list[int] | None = None,
    duration_s: float | None = None,
    events: list[str] | None = None,
    buffer_mb: int | None = None,
    classic: bool = False,
    qmp: list[str] | None = None,
    max_bytes: int | None = None,
    on_full: str = "ring",
    part_seconds: float = 1.0,
) -> dict[str, Any]:
    """Record until Ctrl-C, SIGTERM, ``duration_s``, the exit of every process in ``pids``
    or a failed write (raised as one-line :class:`~vtrace.output.OutputError` once meta says
    what was lost), or in ``on_full="stop"`` mode the parts reaching ``max_bytes`` (a line
    on ``console`` says so); returns the recording's summary. In ring mode the oldest parts
    go instead (:class:`Recording`).

    Each ``qmp`` socket names a running VM: its pid joins ``pids`` (when given; else every
    process is recorded) and, for the recording window, its QEMU's virtio and device events join the trace (:mod:`.qemu_attach`); every
    event's state is restored however the recording ends."""
    from vtrace.collect.qemu_attach import attach_all

    # Before anything is recorded: a socket that is no QEMU costs nothing.
    vms = attach_all(qmp or [])
    try:
        bound = {"max_bytes": max_bytes, "on_full": on_full, "flush_interval_s": part_seconds}
        return _record(out, console, vms, pids, duration_s, events, buffer_mb, classic, bound)
    finally:
        for vm in vms:
            vm.stop()  # a no-op unless an error skipped the stop in _record


def _record(
    out: Path,
    console: Console,
    vms: list[Any],
    pids: list[int] | None,
    duration_s: float | None,
    events: list[str] | None,
    buffer_mb: int | None,
    classic: bool,
    bound: dict[str, Any],
) -> dict[str, Any]:
    from vtrace.collect.qemu_attach import host_vms

    stop = threading.Event()
    reason: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        reason.append(signal.Signals(signum).name)
        stop.set()

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    if pids:  # a recording of some processes: the --qmp VMs are among them
        pids = list(dict.fromkeys([*pids, *(vm.pid for vm in vms)]))
    qemu_meta: dict[str, Any] = {"vms": [vm.meta for vm in vms]}
    meta_extra: dict[str, Any] = {"qemu": qemu_meta} if vms else {}
    # The VMs' names by pid: every KVM VM running at the start (and the stop), and the
    # --qmp VMs (TCG ones hold no kvm-vm file).
    names = {**host_vms(), **{str(vm.pid): {"name": vm.name} for vm in vms}}
    meta_extra["vms"] = names
    rec = Recording(
        out,
        pids=pids,
        events=events,
        buffer_mb=buffer_mb,
        classic=classic,
        meta_extra=meta_extra,
        **bound,
    )
    try:
        rec.start()
        for vm in vms:  # after the kernel's probes: QEMU's events need no earlier window
            vm.start(rec.add_events)
    except BaseException:
        for vm in vms:
            vm.stop()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        raise
    try:
        last = (time.monotonic(), 0)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        exited: list[int] = []
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            while not stop.is_set():
                timeout = (
                    REFRESH_S if deadline is None else min(REFRESH_S, deadline - time.monotonic())
                )
                if timeout <= 0:
                    reason.append("duration")
                    break
                if stop.wait(timeout) or rec.failure is not None:
                    break
                if rec.full:
                    reason.append(MAX_SIZE_REASON)
                    console.print(
                        f"stopped: the parts reached --max-size ({rec.max_bytes:,} bytes)",
                        highlight=False,
                    )
                    break
                now_exited = rec.exited_pids()
                for pid in now_exited:
                    if pid not in exited:
                        console.print(f"pid {pid} exited", highlight=False)
                exited = now_exited
                if rec.pids and len(exited) == len(rec.pids):
                    reason.append(PIDS_EXITED)
                    break
                line, last = _live_line(rec, out, last)
                live.update(line)
    finally:
        rec.stop_reason = reason[0] if reason else None
        # Cleanup detaches probes and writes the last part; a second Ctrl-C must not cut it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            # QEMU's events first: they are restored and their last lines join the trace
            # before the kernel's part is finalised.
            try:
                qemu_meta["vms"] = [vm.stop() for vm in vms]
                names.update({p: v for p, v in host_vms().items() if p not in names})
            finally:
                summary = rec.stop()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    if vms:
        summary["qemu"] = qemu_meta["vms"]
    return summary


def summary_view(summary: dict[str, Any]) -> Group:
    """The one-screen summary of a finished recording."""
    head = Text.assemble(
        ("recorded ", "bold"),
        f"{summary['events']:,} events in {summary['duration_s']:.2f} s ",
        (f"({summary['events_per_s']:,.0f}/s)", "cyan"),
        f" into {summary['path']} ({summary['parts']} parts)",
    )
    lost = summary["lost"]
    lost_line = Text.assemble(
        "lost ",
        (f"{lost:,}", "red bold" if lost else "green"),
        f" (per CPU {summary['lost_per_cpu']}; peak buffer fill {summary.get('peak_buffer_fill', 0):.0%})",
    )
    if summary.get("not_written"):
        lost_line.append(f"; {summary['not_written']:,} of them not written", style="red bold")
    table = Table(title=None, show_edge=False, box=None)
    table.add_column("event")
    table.add_column("count", justify="right")
    table.add_column("per s", justify="right")
    d = max(summary["duration_s"], 1e-9)
    for name, n in sorted(summary["by_event"].items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{n:,}", f"{n / d:,.0f}")
    parts: list[Any] = [head, lost_line, table]
    unavailable = summary["probes"]["unavailable"]
    if unavailable:
        parts.append(Text(f"not recorded here ({len(unavailable)}):", style="yellow"))
        # One line per distinct reason, not per probe: the same cause usually covers several.
        by_reason: dict[str, list[str]] = {}
        for ev, why in unavailable.items():
            by_reason.setdefault(why, []).append(ev)
        for why, evs in by_reason.items():
            parts.append(Text(f"  {', '.join(evs)}: {why}"))
    if summary["pids"]:
        parts.append(Text(f"pids {summary['pids']} (IRQ events also from kworker threads)"))
    for vm in summary.get("qemu", []):
        what = (
            f"{vm.get('events_recorded', 0):,} QEMU events"
            if vm.get("timestamps")
            else f"{sum(c['count'] for c in vm.get('counts', [])):,} QEMU events kept as counts "
            "(no -msg timestamp=on)"
        )
        requests = vm.get("requests_blockstats")
        parts.append(
            Text(
                f"VM {vm['name']} (pid {vm['pid']}): {what}"
                + (
                    f", {requests:,} block requests (query-blockstats)"
                    if requests is not None
                    else ""
                )
                + ("; " + vm["error"] if vm.get("error") else "; trace events restored"),
                style="red" if vm.get("error") else "",
            )
        )
    if summary.get("dropped"):
        parts.append(Text(dropped_line(summary["dropped"]), style="yellow"))
    if summary.get("stopped_by") == PIDS_EXITED:
        parts.append(Text(f"stopped: {PIDS_EXITED}"))
    if summary.get("stopped_by") == MAX_SIZE_REASON:
        parts.append(
            Text(
                f"stopped: the parts reached --max-size ({summary['max_bytes']:,} bytes; "
                f"{summary['part_bytes']:,} on disk)"
            )
        )
    return Group(*parts)


def checks_view(checks: list[Check]) -> Table:
    table = Table(show_edge=False, box=None, show_header=False)
    table.add_column("status")
    table.add_column("check", style="bold")
    table.add_column("verdict")
    for c in checks:
        style = "green" if c.status == OK else "red bold" if c.status == FAIL else "yellow"
        verdict = Text(c.verdict)
        if c.fixed:
            verdict.append(f"\n--fix: {c.fixed}", style="cyan")
        if c.fix and c.status != OK:
            verdict.append(f"\nfix: {c.fix}", style="dim")
        table.add_row(Text(c.status, style=style), c.name, verdict)
    return table
