"""The `vtrace` command line: thin typer commands over the library.

Each command parses, calls the library, and renders with rich or prints `--json`. A
:class:`~vtrace.errors.VtraceError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from vtrace import __version__
from vtrace.errors import VtraceError

app = typer.Typer(
    name="vtrace",
    help="What each guest I/O costs in KVM exits, and what virtio rings, batching and "
    "notification suppression buy back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"vtrace {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """vtrace: capture, understand and predict the cost of guest I/O on KVM."""


# Commands are grouped by part of the product, one section each; each section only adds
# @app.command functions and imports what it needs inside them (keeps `--help` fast).

# --- import ---------------------------------------------------------------------------------

# Files above this size get a progress display (a few seconds of parsing here).
IMPORT_PROGRESS_BYTES = 32 * 1024 * 1024


@app.command("import")
def import_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="Format of FILE: ftrace, perf or qemu."),
    file: str = typer.Argument(
        ..., metavar="FILE", help="Text trace: tracefs/trace-cmd report, perf script, QEMU -D log."
    ),
    out: str = typer.Option(..., "-o", "--out", help="New trace directory to write."),
    strict: bool = typer.Option(False, "--strict", help="Fail on any line that is not an event."),
) -> None:
    """Import a text trace into a trace directory (events as Parquet + meta.json).

    [bold]Examples[/]

      vtrace import ftrace trace.txt -o mytrace       tracefs or trace-cmd report text

      vtrace import perf perf-script.txt -o mytrace   perf script of kvm:* events

      vtrace import qemu qemu.log -o mytrace --strict QEMU log; exit 2 on a bad line
    """
    import os
    from contextlib import nullcontext

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from vtrace.ingest import FORMATS, import_file
    from vtrace.output import check_new_dir

    if fmt not in FORMATS:
        raise VtraceError(f"{file}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_new_dir(out)  # before parsing: a bad -o costs nothing
    try:
        big = os.path.getsize(file) > IMPORT_PROGRESS_BYTES
    except OSError:
        big = False
    progress = (
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
        if big
        else nullcontext()
    )
    with progress as bar:
        task = bar.add_task(f"importing {file}", total=None) if big else None

        def step(name: str) -> None:
            if big:
                bar.update(task, description=f"{name}: {file}")

        trace = import_file(fmt, file, out, strict=strict, progress=step)
    meta = trace.meta

    def say(text: str) -> None:
        console.print(text, soft_wrap=True, markup=False, highlight=False)

    say(f"{trace.path}: {meta['events']:,} events from {meta['lines']:,} lines of {file}")
    if meta.get("unparsed"):
        first = ", ".join(map(str, meta.get("unparsed_first_lines", [])))
        say(f"  unparsed lines: {meta['unparsed']:,} (first: lines {first})")
    if meta.get("malformed"):
        first = ", ".join(map(str, meta.get("malformed_first_lines", [])))
        say(f"  events not matching their format (kept as raw): {meta['malformed']:,} ({first})")
    if meta.get("lost_events"):
        say(f"  events the tracer reported lost: {meta['lost_events']:,}")
    say(f"  clock: {meta.get('clock')}")


# --- summary ----------------------------------------------------------------------------------


@app.command("summary")
def summary_command(
    trace_dirs: Annotated[
        list[str],
        typer.Argument(
            metavar="DIR...",
            help="A trace directory; several, or a directory of them, for one row per trace.",
        ),
    ],
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (times in ns)."),
    top: int = typer.Option(
        10, "--top", min=1, help="Rows in the accesses, kicks and interrupts tables."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail on a trace that is not complete (parts or events missing)."
    ),
    requests: int | None = typer.Option(
        None,
        "--requests",
        min=1,
        help="Requests the trace covers, for the per-request costs when the trace does not "
        "count them itself (what the guest's iostat or fio said).",
    ),
) -> None:
    """Summarise a trace: what one request cost (exits, user-space exits, trapping accesses,
    kicks, interrupts, time), events, exits and user-space exits by reason, accesses, kicks,
    requests, batching, interrupts, lost and unparsed counts. Several traces (or a directory
    of traces): one table, a row per trace, with their totals and per-request costs.

    [bold]Examples[/]

      vtrace summary traces/qemu-ide               tables, times in microseconds

      vtrace summary traces/qemu-ide --json        the same as JSON, times in nanoseconds

      vtrace summary /tmp/live --requests 20000    per-request costs of a kernel-only recording

      vtrace summary mytrace --strict              exit 2 when parts or events are missing

      vtrace summary host1 host2 host3             a row per trace (a fleet of hosts or VMs)

      vtrace summary captures/ --json              a row per trace directory in captures/
    """
    import json

    from vtrace.analyze import summary
    from vtrace.analyze.summary import fleet, holds_traces

    # One trace directory: its full summary; several, or a directory of them: the fleet.
    if len(trace_dirs) > 1 or holds_traces(trace_dirs[0]):
        if requests is not None:
            raise VtraceError("--requests counts the requests of one trace: give one DIR")
        rows = fleet(trace_dirs, strict=strict)
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        from vtrace.analyze.console import print_fleet

        print_fleet(rows, console)
        return
    data = summary(trace_dirs[0], top=top, strict=strict, requests=requests)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    from vtrace.analyze.console import print_summary

    print_summary(data, console)


# --- table ------------------------------------------------------------------------------------


@app.command(
    "table",
    epilog="Examples:\n\n"
    "  vtrace table exits mytrace -o exits.parquet          one row per VM exit\n\n"
    "  vtrace table requests mytrace -o req.parquet --force  replace an older file\n\n"
    "  vtrace table exits_by_reason mytrace                  print an aggregate\n\n"
    "  vtrace table kicks_by_queue mytrace -o kicks.parquet  or write it\n\n"
    "Row tables: exits, user_exits, accesses, kicks, requests, interrupts (need -o). "
    "Aggregates: exits_by_reason, user_exits_by_reason, accesses_by_target, kicks_by_queue, "
    "interrupts_by_line, batching. Read the file with polars, pandas, DuckDB or Spark.",
)
def table_cmd(
    name: str = typer.Argument(..., metavar="TABLE", help="A row table or an aggregate (below)."),
    trace_dir: str = typer.Argument(..., metavar="DIR", help="A trace directory."),
    out: str | None = typer.Option(
        None, "-o", "--out", help="Parquet file to write (an aggregate prints without it)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write an analysis table of a trace to Parquet, or print an aggregate: the rows,
    columns and order of the Python analysis (`vtrace.analyze.exits(events)` ...), in memory
    that does not grow with the trace (a chunk of about a million events at a time). The
    file is written under a temporary name and renamed when complete; times are in ns."""
    from vtrace.analyze.tables import AGGREGATES, ROW_TABLES, aggregate, write_table

    if name not in ROW_TABLES and name not in AGGREGATES:
        raise VtraceError(
            f"{name}: no such table; row tables: {', '.join(ROW_TABLES)}; "
            f"aggregates: {', '.join(AGGREGATES)}"
        )
    if name in ROW_TABLES:
        if out is None:
            raise VtraceError(
                f"{name}: a row table (a row per event it derives from); give -o FILE.parquet, "
                f"or print an aggregate ({', '.join(a for a in AGGREGATES if name in a)})"
            )
        done = write_table(name, trace_dir, out, force=force)
        console.print(
            f"wrote {done.path}: {done.rows:,} rows of {name} in {done.seconds:.1f} s",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        return
    from vtrace.output import check_new_file, write_file

    if out is not None:
        check_new_file(out, force=force)  # before the work: a bad -o costs nothing
    frame = aggregate(name, trace_dir)
    if out is None:
        from vtrace.analyze.console import print_frame

        print_frame(f"{name} of {trace_dir}", frame.to_dicts(), console)
        return
    write_file(out, frame.write_parquet, force=force)
    console.print(
        f"wrote {out}: {frame.height:,} rows of {name}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


# --- export -----------------------------------------------------------------------------------

export_app = typer.Typer(
    help="Write a trace in another tool's format.", no_args_is_help=True, add_completion=False
)
app.add_typer(export_app, name="export")


@export_app.command(
    "perfetto",
    epilog="Examples:\n\n"
    "  vtrace export perfetto traces/qemu-virtio-blk-qd4 -o qd4.pftrace\n\n"
    "  vtrace export perfetto mytrace -o mytrace.pftrace --force    replace an older export\n\n"
    "Open the file in the Perfetto UI (ui.perfetto.dev, 'Open trace file'); it is read in "
    "the browser, nothing is uploaded.",
)
def export_perfetto_cmd(
    trace_dir: str = typer.Argument(..., metavar="DIR", help="A trace directory."),
    out: str = typer.Option(..., "-o", "--out", help="Timeline file to write (.pftrace)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write a trace as a Perfetto timeline (protobuf trace format).

    A process per VM; per vCPU thread its exits and user-space handling; per back-end
    thread its passes; per queue each request from kick to completion; flows from a kick to
    the pass it woke and from a completion to its interrupt; ring occupancy and kicks per
    second as counters. What the trace did not record is left out."""
    from vtrace.export import export_perfetto

    result = export_perfetto(trace_dir, out, force=force)
    counts = ", ".join(f"{n:,} {what}" for what, n in result.counts.items() if n)
    console.print(
        f"wrote {result.path}: {result.packets:,} packets, {result.bytes / 1e6:.1f} MB from "
        f"{result.events:,} events in {result.seconds:.1f} s",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    console.print(f"  {counts or 'nothing to draw'}", soft_wrap=True, markup=False, highlight=False)
    console.print(
        "  open it at ui.perfetto.dev (Open trace file): the browser reads it locally",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


# --- capture: record / doctor / stat -----------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  vtrace record -o /tmp/t1                      every KVM event on the host, until Ctrl-C\n\n"
    "  vtrace record -o /tmp/t1 --pid 4242 --duration 10   one VM for 10 s\n\n"
    "  vtrace record -o /tmp/t1 --events kvm_pio,kvm_userspace_exit\n\n"
    "  vtrace record -o /tmp/t1 --qmp /run/vm1.qmp --qmp /run/vm2.qmp --duration 30\n\n"
    "  vtrace record -o /tmp/t1 --max-size 2G          hours long: the newest 2 GiB of parts\n\n"
    "  vtrace record -o x --print-c                   show the BPF program (no root needed)"
)
def record(
    output: str = typer.Option(None, "-o", "--output", help="New trace directory to write."),
    pid: list[int] = typer.Option(  # noqa: B008 (typer's repeatable option)
        None, "--pid", help="VM (VMM) process to record; repeatable. Default: all."
    ),
    duration: float = typer.Option(None, "--duration", min=0.1, help="Stop after S seconds."),
    events: str = typer.Option(None, "--events", help="Comma-separated subset of events."),
    buffer_mb: int = typer.Option(
        None, "--buffer-mb", help="Ring buffer size in MiB (default 32)."
    ),
    classic: bool = typer.Option(
        False,
        "--classic-tracepoints",
        help="Read every tracepoint from its formatted record (format-file layout) instead of "
        "as a raw tracepoint where the kernel's BTF allows: slower, for comparison.",
    ),
    qmp: list[str] = typer.Option(  # noqa: B008 (typer's repeatable option)
        None,
        "--qmp",
        help="QMP socket of a running VM; repeatable. Adds QEMU's virtio and device trace "
        "events for the window (restored at the stop), and its pid to --pid if given.",
    ),
    max_size: str = typer.Option(
        None,
        "--max-size",
        metavar="SIZE",
        help="Bound the parts on disk (e.g. 500M, 2G; meta.json not counted): see --on-full.",
    ),
    on_full: str = typer.Option(
        None,
        "--on-full",
        metavar="ring|stop",
        help="At --max-size: ring (default) drops the oldest parts and records on, counting "
        "what it dropped in meta.json; stop ends the recording like --duration.",
    ),
    part_seconds: float = typer.Option(
        1.0, "--part-seconds", min=0.01, hidden=True, help="Seconds between parts."
    ),
    print_c: bool = typer.Option(False, "--print-c", hidden=True, help="Print the BPF C and exit."),
) -> None:
    """Record KVM events with bcc into a trace directory (needs root).

    Tracepoints whose kernel prototype (BTF) is the one vtrace knows are read raw, before the
    kernel formats a record, which costs the guest less per event; the others, and all with
    --classic-tracepoints, are read from the formatted record at the format file's offsets.
    meta.json says which way each was read."""
    from pathlib import Path

    from vtrace.collect import live, program
    from vtrace.collect.recording import check_on_full, parse_size

    max_bytes = None if max_size is None else parse_size(max_size)
    mode = check_on_full(on_full, max_bytes)
    event_list = program.parse_events(events)
    if print_c:
        typer.echo(program.print_c(event_list, pid or [], buffer_mb, classic))
        return
    if output is None:
        raise VtraceError("record: -o DIR is required")
    summary = live.record(
        Path(output),
        err_console,
        pids=pid or [],
        duration_s=duration,
        events=event_list,
        buffer_mb=buffer_mb,
        classic=classic,
        qmp=qmp or [],
        max_bytes=max_bytes,
        on_full=mode,
        part_seconds=part_seconds,
    )
    console.print(live.summary_view(summary))


@app.command(
    epilog="Examples:\n\n  vtrace doctor\n\n  vtrace doctor --fix      mount tracefs, link headers\n\n"
    "  vtrace doctor --json\n\n"
    "  vtrace doctor --qmp /run/vm1.qmp --fix    events a killed recording left on in a VM"
)
def doctor(
    fix: bool = typer.Option(
        False,
        "--fix",
        help="Mount tracefs and link headers where needed; with --qmp: turn the VM's events "
        "a recording left on off.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
    qmp: list[str] = typer.Option(  # noqa: B008 (typer's repeatable option)
        None, "--qmp", help="Check this VM (QMP socket) instead of the host; repeatable."
    ),
) -> None:
    """Can this host record? One verdict per requirement, with the exact fix.

    Exit status 1 when a check that recording needs fails, or (--qmp) a VM has events
    a recording left on.
    """
    import json

    from vtrace.collect import doctor as checks_mod
    from vtrace.collect import live

    if qmp:
        checks = [checks_mod.check_qmp(sock, fix=fix) for sock in qmp]
        if as_json:
            typer.echo(json.dumps([c.as_dict() for c in checks], indent=2))
        else:
            console.print(live.checks_view(checks))
        if any(c.status != checks_mod.OK for c in checks):
            raise typer.Exit(1)
        return
    checks = checks_mod.run_checks(fix=fix)
    if as_json:
        typer.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        console.print(live.checks_view(checks))
    if checks_mod.record_problem(checks):
        raise typer.Exit(1)


@app.command(
    epilog="Examples:\n\n  vtrace stat                       refresh every second\n\n"
    "  vtrace stat --pid 4242 --interval 5\n\n  vtrace stat --once --interval 2 --csv\n\n"
    "  vtrace stat --prometheus 9464             OpenMetrics on 127.0.0.1:9464/metrics\n\n"
    "  vtrace stat --prometheus 0.0.0.0:9464 --duration 3600"
)
def stat(
    interval: float = typer.Option(
        1.0, "--interval", help="Seconds between refreshes (0.1 to 86400)."
    ),
    csv: bool = typer.Option(
        False, "--csv", help="Print CSV rows (for logging) instead of a table."
    ),
    once: bool = typer.Option(False, "--once", help="Print one interval and exit."),
    pid: list[int] = typer.Option(  # noqa: B008 (typer's repeatable option)
        None, "--pid", help="VM process to show; repeatable."
    ),
    classic: bool = typer.Option(
        False,
        "--classic-tracepoints",
        help="Count from formatted tracepoint records instead of raw tracepoints (slower).",
    ),
    prometheus: str = typer.Option(
        None,
        "--prometheus",
        metavar="[HOST:]PORT",
        help="Serve the counters and histograms as OpenMetrics at http://HOST:PORT/metrics "
        "(HOST defaults to 127.0.0.1) instead of printing them.",
    ),
    duration: float = typer.Option(None, "--duration", help="Stop after S seconds."),
) -> None:
    """Live exit counts and handling-time histograms per VM and reason (in-kernel aggregation)."""
    from vtrace.collect import stat as stat_mod

    stat_mod.run(
        console,
        interval_s=interval,
        csv=csv,
        once=once,
        pids=pid or [],
        classic=classic,
        prometheus=prometheus,
        duration_s=duration,
    )


# --- lab: the /dev/kvm lab VMM --------------------------------------------------------------------

lab_app = typer.Typer(
    help="A minimal VMM on /dev/kvm: real exits and kicks from tiny guests.",
    no_args_is_help=True,
)
app.add_typer(lab_app, name="lab")


@lab_app.command(
    "run",
    epilog="Examples:\n\n"
    "  vtrace lab run --device emulated --requests 10000\n\n"
    "  vtrace lab run --device virtio --requests 100000 --batch 16 --ring-size 256 --json\n\n"
    "  vtrace lab run --device virtio --vcpus 2 --queues 2 --backend-threads per-queue\n\n"
    "  vtrace lab run --device virtio --wait irq --record /tmp/lab-trace",
)
def lab_run(
    device: str = typer.Option("virtio", help="emulated (PIO register file) or virtio."),
    requests: int = typer.Option(1000, help="Requests the guest issues."),
    batch: int = typer.Option(1, help="Requests added to the ring per kick (virtio)."),
    ring_size: int = typer.Option(256, help="Descriptors in the virtqueue (power of two)."),
    request_bytes: int = typer.Option(4096, help="Bytes the device writes per request."),
    wait: str = typer.Option("poll", help="virtio completions: poll used.idx, or irq (irqfd)."),
    vcpus: int = typer.Option(1, help="Guest vCPUs, one thread each (virtio)."),
    queues: int = typer.Option(1, help="Virtqueues; vCPU v submits to queue v mod queues."),
    backend_threads: str = typer.Option(
        "shared", help="shared: one back-end thread serves every queue; per-queue: one each."
    ),
    record: str | None = typer.Option(
        None, help="Trace directory: record kvm events of this VMM plus the lab's own."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run a tiny guest against an emulated device or a virtio ring; print what it cost."""
    import json

    from rich.table import Table

    from vtrace.lab import run_lab

    result = run_lab(
        device, requests, batch, ring_size, request_bytes, wait=wait, record=record,
        vcpus=vcpus, queues=queues, backend_threads=backend_threads,
    )  # fmt: skip
    if json_out:
        print(json.dumps(result.to_json()))
        return
    table = Table(title=f"lab run: {device}, pid {result.pid}", show_header=False)
    lat = result.latency_ns
    for key, value in (
        ("requests", f"{result.requests} (batch {result.batch}, ring {result.ring_size}, "
         f"{result.request_bytes} B)"),
        ("duration", f"{result.duration_s:.3f} s"),
        ("rate", f"{result.requests_per_s:,.0f} requests/s"),
        ("user-space exits", f"{result.userspace_exits} "
         f"({result.userspace_exits / result.requests:.2f} per request)"),
        ("kicks (eventfd)", f"{result.kicks} (guest skipped {result.kicks_suppressed})"),
        ("interrupts", str(result.interrupts)),
        *(
            [("vCPUs x queues", f"{result.vcpus} x {result.queues} "
              f"(back end: {result.backend_threads})")]
            if result.device == "virtio" else []
        ),
        *(
            (f"queue {q['queue']}", f"vCPUs {q['vcpus']}: {q['requests']} requests, "
             f"{q['kicks']} kicks, {q['passes']} passes")
            for q in (result.per_queue if result.queues > 1 else [])
        ),
        ("latency", f"mean {lat['mean'] / 1e3:.1f} us, p50 {lat['p50'] / 1e3:.1f} us, "
         f"p99 {lat['p99'] / 1e3:.1f} us"),
        ("trace", result.trace or "-"),
    ):  # fmt: skip
        table.add_row(key, value)
    console.print(table)


@lab_app.command(
    "exit-cost",
    epilog="Examples:\n\n  vtrace lab exit-cost --writes 50000\n\n  vtrace lab exit-cost --json",
)
def lab_exit_cost(
    writes: int = typer.Option(20000, help="PIO writes the guest makes per loop."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Time one PIO write handled in user space vs in the kernel (ioeventfd)."""
    import json

    from rich.table import Table

    from vtrace.lab import measure_exit_cost

    costs = {h: measure_exit_cost(writes, h) for h in ("userspace", "ioeventfd", "none")}
    if json_out:
        print(json.dumps({h: c.to_json() for h, c in costs.items()}))
        return
    loop_ns = costs["none"].per_write_ns
    table = Table(title=f"PIO write cost, {writes} writes")
    for col in ("handled", "per loop iteration", "less the loop", "user-space exits"):
        table.add_column(col, justify="right")
    for handling, c in costs.items():
        table.add_row(
            handling,
            f"{c.per_write_ns / 1e3:.2f} us",
            "-" if handling == "none" else f"{(c.per_write_ns - loop_ns) / 1e3:.2f} us",
            str(c.userspace_exits),
        )
    console.print(table)


# --- qemu-lab: real Linux guests under QEMU -------------------------------------------------------

qemu_lab_app = typer.Typer(
    help="Real Linux guests under QEMU: emulated vs virtio devices, traced per request.",
    no_args_is_help=True,
)
app.add_typer(qemu_lab_app, name="qemu-lab")


@qemu_lab_app.command(
    "run",
    epilog="Examples:\n\n"
    "  vtrace qemu-lab run --device ide --requests 64 -o /tmp/ide\n\n"
    "  vtrace qemu-lab run --device virtio-blk --queue-depth 16 --requests 512 -o /tmp/vblk16\n\n"
    "  vtrace qemu-lab run --device e1000 --requests 200 --request-bytes 56 -o /tmp/e1000 --json",
)
def qemu_lab_run(
    device: str = typer.Option("virtio-blk", help="ide, virtio-blk, e1000 or virtio-net."),
    out: str = typer.Option(..., "-o", "--out", help="New trace directory to write."),
    requests: int = typer.Option(64, help="Block requests, or echo round trips for a NIC."),
    request_bytes: int = typer.Option(4096, help="Bytes per block request, or echo payload."),
    queue_depth: int = typer.Option(1, help="Block requests in flight at once."),
    submit: str = typer.Option(
        "batch",
        help="How depth is made: batch (one stream, QUEUE_DEPTH requests per plug) or "
        "streams (QUEUE_DEPTH concurrent dd processes).",
    ),
    write: bool = typer.Option(False, "--write", help="Block writes instead of reads."),
    accel: str = typer.Option("auto", help="auto, kvm or tcg (auto: KVM only with vmx/svm)."),
    kernel: str | None = typer.Option(
        None, help="Guest kernel image (default: newest /boot/vmlinuz-*)."
    ),
    timeout: float = typer.Option(180.0, help="Hard limit for the whole run, in seconds."),
    raw_log: str | None = typer.Option(None, help="Also keep QEMU's raw trace log here."),
    vcpus: int = typer.Option(
        1, help="Guest vCPUs (-smp); block workloads run one stream per vCPU, pinned to it."
    ),
    queues: int = typer.Option(
        1,
        help="virtio-blk hardware queues (num-queues), or virtio-net queue pairs (as root: a "
        "multi-queue tap interface made for the run, a ping stream per pair); at most VCPUS.",
    ),
    sched: bool = typer.Option(
        True,
        "--sched/--no-sched",
        help="As root, also record the host scheduler's sched_waking and sched_switch of "
        "QEMU's threads over the window (when the guest wrote each kick, when its vCPU "
        "halted); without root the trace says why it has none.",
    ),
    guest_trace: bool = typer.Option(
        False,
        "--guest-trace/--no-guest-trace",
        help="virtio-blk: also record the guest's block layer issuing and completing each "
        "request and its disk interrupt handler's entries and exits (source guest: when "
        "the guest added each request, how long each interrupt held it); the guest prints "
        "them after the workload.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Boot a Linux guest, run one workload on DEVICE, print what each request cost."""
    import json

    from rich.table import Table

    from vtrace.lab.qemu import QemuLabConfig, run_qemu_lab

    config = QemuLabConfig(
        device=device,
        requests=requests,
        request_bytes=request_bytes,
        queue_depth=queue_depth,
        submit=submit,
        write=write,
        accel=accel,
        kernel=kernel,
        timeout_s=timeout,
        vcpus=vcpus,
        queues=queues,
        sched=sched,
        guest_trace=guest_trace,
    )
    trace, summary = run_qemu_lab(config, out, raw_log=raw_log)
    if json_out:
        print(json.dumps({**summary, "trace": str(trace.path)}))
        return

    def fmt(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:.2f}{unit}"

    unit = "request" if device in ("ide", "virtio-blk") else "echo round trip"
    table = Table(title=f"qemu-lab: {device} under {summary['accel']}", show_header=False)
    for key, value in (
        ("requests", f"{requests} x {request_bytes} B, queue depth {queue_depth}"),
        ("vCPUs x queues", f"{vcpus} x {queues}"),
        ("duration", fmt(summary["duration_s"], " s")),
        (f"trapping accesses per {unit}", fmt(summary["device_accesses_per_request"])),
        (f"kicks per {unit}", fmt(summary["kicks_per_request"])),
        (f"interrupts per {unit}", fmt(summary["interrupts_per_request"])),
        ("requests per kick", fmt(summary["requests_per_kick"])),
        ("most requests in one kick", str(summary["max_requests_per_kick"] or "-")),
        ("trace", str(trace.path)),
    ):  # fmt: skip
        table.add_row(key, value)
    for q in summary["per_queue"] if len(summary["per_queue"]) > 1 else ():
        table.add_row(
            f"queue {q['queue']}",
            f"{q['requests']} requests, {q['kicks']} kicks, {q['interrupts']} interrupts",
        )
    console.print(table)
    console.print(
        "Trapping accesses: register accesses that reached QEMU's device model, counted "
        f"under {summary['accel'].upper()}; under KVM each is an exit to user space.",
        style="dim",
    )


@qemu_lab_app.command(
    "start",
    epilog="Examples:\n\n"
    "  vtrace qemu-lab start --device virtio-blk --qmp /tmp/vm1.qmp\n\n"
    "  vtrace qemu-lab start --device virtio-blk --queue-depth 8 --qmp /tmp/vm2.qmp\n\n"
    "  vtrace record -o /tmp/t --qmp /tmp/vm1.qmp --duration 5; "
    "vtrace qemu-lab stop --qmp /tmp/vm1.qmp",
)
def qemu_lab_start(
    device: str = typer.Option("virtio-blk", help="ide, virtio-blk, e1000 or virtio-net."),
    qmp: str = typer.Option(..., "--qmp", help="QMP socket to create for the guest."),
    queue_depth: int = typer.Option(1, help="Block requests in flight at once."),
    requests: int | None = typer.Option(
        None,
        help="Requests per round (the guest prints its counts after each; default 32 x "
        "QUEUE_DEPTH).",
    ),
    request_bytes: int = typer.Option(4096, help="Bytes per block request, or echo payload."),
    write: bool = typer.Option(False, "--write", help="Block writes instead of reads."),
    accel: str = typer.Option("auto", help="auto, kvm or tcg (auto: KVM only with vmx/svm)."),
    kernel: str | None = typer.Option(
        None, help="Guest kernel image (default: newest /boot/vmlinuz-*)."
    ),
    timestamps: bool = typer.Option(
        True, "--timestamps/--no-timestamps", help="QEMU's -msg timestamp= (log line times)."
    ),
) -> None:
    """Boot the lab's guest in the background, its workload running until `qemu-lab stop`;
    print QEMU's pid. The console goes to QMP.console."""
    from vtrace.lab.qemu import ROUND_REQUESTS, QemuLabConfig, start_lab_guest

    config = QemuLabConfig(
        device=device,
        requests=requests if requests is not None else ROUND_REQUESTS * queue_depth,
        request_bytes=request_bytes,
        queue_depth=queue_depth,
        write=write,
        accel=accel,
        kernel=kernel,
    )
    guest = start_lab_guest(config, qmp, timestamps=timestamps)
    typer.echo(guest.pid)


@qemu_lab_app.command("stop", epilog="Example:\n\n  vtrace qemu-lab stop --qmp /tmp/vm1.qmp")
def qemu_lab_stop(
    qmp: str = typer.Option(..., "--qmp", help="QMP socket of a `qemu-lab start` guest."),
) -> None:
    """Stop a guest `qemu-lab start` booted (QMP quit); print its pid once it has exited."""
    from vtrace.lab.qemu import stop_lab_guest

    typer.echo(stop_lab_guest(qmp))


# --- model: calibrate / replay / sweep ---------------------------------------------------------


@app.command(
    "replay",
    epilog="""Examples:

  vtrace replay --model virtio-blk --json

  vtrace replay --model lab-virtio --set virtqueue.batch=8 --set ring_size=64

  vtrace replay traces/lab-virtio --model calibrated.toml --requests 10000
""",
)
def replay_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name or TOML file.")],
    trace: Annotated[
        str | None, typer.Argument(help="Trace whose arrivals drive the guest.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a parameter: key=value (dotted).")
    ] = None,
    requests: Annotated[int | None, typer.Option("--requests", "-n", help="Requests.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run a model (optionally replaying a trace's request arrivals) and summarise it."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from vtrace.sim import replay
    from vtrace.sim.report import summary_table

    # long runs show how far they are on stderr (it stays clean of --json's stdout)
    bar = Progress(
        "simulating", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err_console, transient=True,
    )  # fmt: skip
    task = bar.add_task("requests", total=None)

    def progress(completed: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=completed, total=total)

    try:
        result = replay(model, trace, set_ or [], requests=requests, seed=seed, progress=progress)
    finally:
        if bar.live.is_started:  # stopping one never started prints a blank line on stderr
            bar.stop()
    if json_out:
        print(json.dumps(result.summary))
    else:
        console.print(summary_table(result.summary))


@app.command(
    "calibrate",
    epilog="Examples:\n\n"
    "  vtrace calibrate runs/virtio-b1 runs/virtio-b8 --model lab-virtio -o lab-virtio-fit.toml\n\n"
    "  vtrace calibrate runs/emulated --model lab-emulated -o lab-emulated-fit.toml\n\n"
    "  vtrace calibrate host-trace --model virtio-blk --requests 250000 -o host-fit.toml\n\n"
    "  vtrace calibrate host-trace --model virtio-blk --requests 250000 --notify 0xfe003000 "
    "-o disk.toml\n\n"
    "The last two read a production host's trace of kernel events alone (vtrace record): exit "
    "costs from kvm_exit to kvm_entry, the kicks and interrupts of each queue, the vCPUs and "
    "queues that kicked. --requests is what the guest's iostat counted over the recording; "
    "--notify keeps the disk's kicks where the VM's network queues kicked too.",
)
def calibrate_cmd(
    traces: Annotated[list[str], typer.Argument(help="Trace directories to fit the costs from.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model to start from.")],
    output: Annotated[str, typer.Option("--output", "-o", help="TOML file to write.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output file.")
    ] = False,
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests",
            min=1,
            help="Requests each trace covers, for traces of kernel events alone (no lab_pop "
            "or QEMU events): what the guest's iostat or fio counted.",
        ),
    ] = None,
    notify: Annotated[
        str | None,
        typer.Option(
            "--notify",
            help="The device's notify addresses, comma-separated (I/O ports or guest-physical "
            "addresses, 0x... or decimal): only the kicks written there count, where the "
            "VM's other devices kicked too. Without it every kick handled in the kernel is "
            "the device's; the written source lists each address with its kicks.",
        ),
    ] = None,
) -> None:
    """Fit the costs a trace can show and write a model whose comments say where each came from."""
    from rich.markup import escape

    from vtrace.sim.calibrate import calibrate

    addresses = None
    if notify is not None:
        try:
            addresses = [int(a, 0) for a in notify.split(",")]
        except ValueError:
            raise VtraceError(
                f"--notify {notify!r}: give addresses, comma-separated, as 0x... or decimal"
            ) from None
        if any(a < 0 for a in addresses):
            raise VtraceError(f"--notify {notify!r}: an address cannot be negative")
    fit = calibrate(traces, model, output, force=force, requests=requests, notify=addresses)
    for key, (value, source) in fit.fitted.items():
        console.print(f"{key} = {value:.6g}  [dim]# {escape(source)}[/dim]")
    for key, source in fit.notes.items():  # settings the traces gave: the shape, the path
        if key not in fit.fitted:
            value = escape(repr(fit.config[key]))
            console.print(f"{key} = {value}  [dim]# {escape(source)}[/dim]")
    console.print(f"wrote {output}")


@app.command(
    "sweep",
    epilog="""Examples:

  vtrace sweep --model virtio-blk --grid ring_size=8,64,256 --grid batch=1,4,16 -o sweep.parquet

  vtrace sweep --model mm1 --grid queue.arrival_rate_per_s=20000,50000,80000 -o mm1.parquet

  vtrace sweep --model virtio-blk --grid batch=1,4,16 -o s.parquet --dask tcp://sched:8786

  vtrace sweep --model virtio-blk --grid batch=1,4,16 -o s.parquet --resume --best latency_ns.p99
""",
)
def sweep_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name or TOML file.")],
    grid: Annotated[list[str], typer.Option("--grid", "-g", help="key=v1,v2,... per parameter.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Parquet file, a row per point.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a parameter for every point.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-j", help="Processes (local, or --dask local's workers)."),
    ] = None,
    dask: Annotated[
        str | None,
        typer.Option(
            "--dask",
            help="Run the points on a Dask cluster: a scheduler's address (tcp://host:8786), "
            "or 'local' for a LocalCluster of single-threaded worker processes.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Run only the points an interrupted sweep lacks."),
    ] = False,
    best: Annotated[
        str,
        typer.Option(
            "--best", help="Metric of the closing table (highest throughput, lowest others)."
        ),
    ] = "throughput_rps",
    top: Annotated[int, typer.Option("--top", min=0, help="Points in the closing table.")] = 5,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output file (and parts).")
    ] = False,
) -> None:
    """Run a model over a grid of parameters in local processes or on a Dask cluster."""
    import contextlib
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from vtrace.sim.sweep import (
        SweepFailed,
        best_points,
        check_metric,
        check_options,
        dask_executor,
        dedupe,
        parse_grid,
        run_sweep,
    )

    # before the grid and the cluster: nothing runs on a bad -o, -j or --best
    check_options(output, workers, force, resume)
    check_metric(best)
    points = dedupe(parse_grid(model, grid, set_ or []))
    with contextlib.ExitStack() as stack:
        executor = stack.enter_context(dask_executor(dask, workers)) if dask else None
        columns = (
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed, {task.fields[rate]}"),
        )  # fmt: skip
        # The bar only on a terminal: elsewhere a transient bar leaves blank lines.
        progress = stack.enter_context(
            Progress(
                *columns, console=err_console, transient=True, disable=not err_console.is_terminal
            )
        )
        task = progress.add_task(f"sweep {model}", total=len(points), failed=0, rate="")
        start, ended, failed = time.monotonic(), 0, 0

        def on_point() -> None:
            nonlocal ended
            ended += 1
            rate = ended / max(time.monotonic() - start, 1e-9)
            progress.update(task, advance=1, rate=f"{rate:.3g} points/s")

        def on_failure(f: object) -> None:
            nonlocal failed
            failed += 1
            progress.update(task, failed=failed)
            progress.console.print(f"vtrace: {f}", markup=False, highlight=False, soft_wrap=True)

        def on_start(to_run: int, done: int) -> None:
            progress.update(task, total=to_run)
            if resume:
                progress.console.print(
                    f"resuming: {done} of {len(points)} points done before, running {to_run}"
                )

        try:
            frame = run_sweep(
                model, points, set_ or [], output, workers=None if dask else workers,
                executor=executor, force=force, resume=resume,
                on_point=on_point, on_failure=on_failure, on_start=on_start,
            )  # fmt: skip
        except SweepFailed as e:
            failure = e
        else:
            failure = None
    if failure is not None:  # the points that ran are kept; exit 1, not bad input's 2
        err_console.print(
            f"vtrace: error: {failure}", markup=False, highlight=False, soft_wrap=True
        )
        raise typer.Exit(1)
    console.print(f"wrote {output}: {frame.height} points")
    ranked = best_points(frame, best, top, list(points[0]) if points else [])
    if ranked.height:
        table = Table(title=f"best {ranked.height} by {best}")
        for col in ranked.columns:
            table.add_column(col, justify="right")
        for row in ranked.iter_rows():  # the --top points: a table of a few rows
            table.add_row(*(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)


# --- demo / notebook ------------------------------------------------------------------------------


@app.command(
    "demo",
    epilog="Examples:\n\n"
    "  vtrace demo                     # report in ./vtrace-demo/index.html\n\n"
    "  vtrace demo -o /tmp/report --notebooks 01-explore-a-trace,02-emulated-vs-virtio",
)
def demo(
    out: str = typer.Option(
        "vtrace-demo", "-o", "--out", help="Directory for the report (made if missing)."
    ),
    notebooks: str | None = typer.Option(
        None, help="Comma-separated notebook names to run (default: all)."
    ),
) -> None:
    """Run the whole story on the shipped traces and write a report (no root, no KVM).

    Trace summaries, emulated vs virtio, a small sweep and the executed notebooks, in one page.
    """
    from pathlib import Path

    from vtrace.demo import run_demo
    from vtrace.notebook import NOTEBOOKS

    chosen = NOTEBOOKS
    if notebooks is not None:
        chosen = tuple(n.strip() for n in notebooks.split(",") if n.strip())
        unknown = [n for n in chosen if n not in NOTEBOOKS]
        if unknown:
            raise VtraceError(
                f"--notebooks: unknown {', '.join(unknown)} (known: {', '.join(NOTEBOOKS)})"
            )
    result = run_demo(Path(out), console=console, notebooks=chosen)
    for m in result.missing:
        console.print(f"[yellow]not in the report:[/] {m}", highlight=False)
    failed = result.failed_notebooks
    console.print(
        f"\n[bold]Report:[/] {result.index.resolve()}  ({result.seconds:.0f} s, "
        f"{len(result.traces)} traces, {len(result.notebooks) - len(failed)}/"
        f"{len(result.notebooks)} notebooks ran)",
        highlight=False,
    )
    console.print(f"Open it:   xdg-open {result.index.resolve()}", highlight=False)
    console.print("Live:      vtrace notebook   (JupyterLab on the notebooks)", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command(
    "notebook",
    epilog="Examples:\n\n  vtrace notebook\n\n  vtrace notebook --port 8899 --no-browser",
)
def notebook(
    port: int | None = typer.Option(None, help="Port for JupyterLab (default: its own)."),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Open a browser tab."),
) -> None:
    """Start JupyterLab on the shipped notebooks (paired .py and .ipynb)."""
    from vtrace.notebook import notebooks_dir, start_jupyterlab

    console.print(f"JupyterLab on {notebooks_dir()} (Ctrl-C twice to stop)", highlight=False)
    raise typer.Exit(start_jupyterlab(notebooks_dir(), port=port, open_browser=browser))


def main() -> None:
    """Console entry point: user errors become one line and exit status 2."""
    try:
        app()
    except VtraceError as e:
        err_console.print(f"vtrace: error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("vtrace: interrupted")
        sys.exit(130)
    except OSError as e:
        # A write without a file name is standard output's (files go through
        # vtrace.output, whose errors are VtraceErrors): a full disk under `> file`.
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # What print() left buffered would fail again at exit, with a second message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        err_console.print(f"vtrace: error: standard output: cannot write: {e.strerror}")
        sys.exit(2)


if __name__ == "__main__":
    main()
