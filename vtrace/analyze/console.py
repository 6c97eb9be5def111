"""The summary of a trace as rich tables (what `vtrace summary DIR` prints).

Times are shown in microseconds (`us` in every header); `--json` keeps nanoseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

Row = dict[str, Any]


def _us(ns: Any) -> str:
    return "" if ns is None else f"{ns / 1000:,.1f}"


def _ms(ns: Any) -> str:
    return "" if ns is None else f"{ns / 1e6:,.2f}"


def _int(n: Any) -> str:
    return "" if n is None else f"{n:,}"


def _pct(x: Any) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _hex(n: Any) -> str:
    return "" if n is None else f"0x{n:x}"


def _text(x: Any) -> str:
    return "" if x is None else str(x)


def _ratio(x: Any) -> str:
    return "" if x is None else f"{x:,.2f}"


def _cost(x: Any) -> str:
    """A per-request count: three decimals where it is small (0.073 kicks a request)."""
    return "" if x is None else f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"


Column = tuple[str, str, Callable[[Any], str]]


def _table(title: str, rows: Sequence[Row], columns: Sequence[Column]) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for header, key, _ in columns:
        numeric = key not in {"source", "event", "device", "reason_name", "handled"}
        # Names stay on one line; numbers fold rather than lose digits on a narrow terminal.
        table.add_column(
            header, justify="right" if numeric else "left", overflow="fold", no_wrap=not numeric
        )
    for row in rows:
        table.add_row(*(fmt(row.get(key)) for _, key, fmt in columns))
    return table


TIMES: list[Column] = [
    ("total (ms)", "total_ns", _ms),
    ("mean (us)", "mean_ns", _us),
    ("p50 (us)", "p50_ns", _us),
    ("p90 (us)", "p90_ns", _us),
    ("p99 (us)", "p99_ns", _us),
    ("p99.9 (us)", "p999_ns", _us),
    ("max (us)", "max_ns", _us),
]
BY_REASON: list[Column] = [
    ("reason", "reason_name", _text),
    ("count", "count", _int),
    ("share (%)", "share", _pct),
    *TIMES,
]

VM_COLUMNS: list[Column] = [
    ("pid", "pid", _text),
    ("name", "name", _text),
    ("events", "events", _int),
    ("user-space exits", "userspace_exits", _int),
    ("kicks", "kicks", _int),
    ("kicks from", "kicks_from", _text),
    ("interrupts", "interrupts", _int),
    ("interrupts from", "interrupts_from", _text),
]
QEMU_COUNT_COLUMNS: list[Column] = [
    ("event", "event", _text),
    ("device", "device", _text),
    ("queue", "queue", _text),
    ("count", "count", _int),
]


def dropped_line(dropped: dict[str, Any]) -> str:
    """What a recording with --max-size (ring) dropped, in one line."""
    first = dropped.get("first_kept_ts_ns")
    return (
        f"dropped to stay under --max-size: the {dropped['parts']:,} oldest parts, "
        f"{dropped['events']:,} events, {dropped['bytes'] / 2**20:,.1f} MiB (counted, not lost)"
        + (f"; the trace holds the events from ts_ns {first:,} on" if first is not None else "")
    )


def print_summary(data: dict[str, Any], console: Console) -> None:
    """Print :func:`vtrace.analyze.summary`'s dict as tables."""
    t = data["trace"]
    duration = t.get("duration_ns")
    console.print(
        f"[bold]{t['path']}[/]: {t['events']:,} events in {t['parts']} parts"
        + (f", {duration / 1e9:,.3f} s" if duration is not None else "")
        + (f"; host {t['host']}, kernel {t['kernel']}" if t.get("host") else ""),
        highlight=False,
    )
    lost, unparsed = data["lost_events"], data["unparsed"]
    style = "bold red" if lost or unparsed else "green"
    per_cpu = data.get("lost_events_per_cpu") or {}
    parts = [f"cpu {k}: {v:,}" for k, v in per_cpu.items() if v]
    if data.get("events_not_written"):
        parts.append(f"{data['events_not_written']:,} not written")
    detail = " (" + ", ".join(parts) + ")" if parts and lost else ""
    console.print(
        f"[{style}]lost events: {lost:,}{detail}; unparsed lines: {unparsed:,}[/]", highlight=False
    )
    if data.get("dropped"):
        console.print(f"[yellow]{dropped_line(data['dropped'])}[/]", highlight=False)
        if not data.get("per_request"):
            console.print(
                "[yellow]no per-request costs: the capture's request count is the whole "
                "run's; give --requests N for the kept events[/]",
                highlight=False,
            )
    if data.get("integrity"):
        console.print(f"[bold red]incomplete trace: {data['integrity']}[/]", highlight=False)
    if t.get("complete") is False:
        console.print("[bold red]the trace was not closed: its writer stopped early[/]")
    if data.get("error"):
        console.print(f"[bold red]recording error: {data['error']}[/]", highlight=False)
    if data.get("incomplete_parts"):
        console.print(f"[bold red]incomplete parts: {', '.join(data['incomplete_parts'])}[/]")

    if data.get("per_request"):
        p = data["per_request"]
        costs = [
            ("exits", "exits", _cost), ("userspace_exits", "user-space exits", _cost),
            ("trapping_accesses", "trapping accesses", _cost), ("kicks", "kicks", _cost),
            ("interrupts", "interrupts", _cost), ("time_ns", "time (us)", _us),
        ]  # fmt: skip
        rows = [{"what": label, "value": p[k]} for k, label, _ in costs if p[k] is not None]
        shown = {label: fmt for _, label, fmt in costs}
        console.print(
            f"[italic]Per request: {p['requests']:,} requests ({p['requests_from']})[/]",
            highlight=False,
        )
        table = Table()
        table.add_column("cost")
        table.add_column("per request", justify="right")
        for r in rows:
            table.add_row(r["what"], shown[r["what"]](r["value"]))
        console.print(table)
    console.print(
        _table(
            "Events by source and name",
            data["events"],
            [("source", "source", _text), ("event", "event", _text), ("count", "count", _int)],
        )
    )
    if data.get("vms"):
        console.print(_table("VMs (by pid)", data["vms"], VM_COLUMNS))
        if data.get("vms_unattributed_interrupts"):
            console.print(
                f"interrupts from kernel workers, no VM named: "
                f"{data['vms_unattributed_interrupts']:,}",
                highlight=False,
            )
    for vm in data.get("qemu_counts", []):
        title = f"QEMU events of {vm['name']} (pid {vm['pid']}), counts only: {vm['note']}"
        console.print(_table(title, vm["counts"], QEMU_COUNT_COLUMNS))
    missing = data["missing"]
    sections: list[tuple[str, str, list[Column]]] = [
        ("exits", "VM exits by reason (kvm_exit -> kvm_entry)", BY_REASON),
        (
            "exits_handled",
            "VM exits by where they were handled",
            [("handled", "handled", _text), ("count", "count", _int), *TIMES],
        ),
        (
            "user_exits",
            "User-space exits by reason (kvm_userspace_exit -> next KVM event of the thread)",
            BY_REASON,
        ),
        (
            "accesses",
            "Top device accesses",
            [
                ("source", "source", _text),
                ("event", "event", _text),
                ("device", "device", _text),
                ("addr", "addr", _hex),
                ("count", "count", _int),
                ("reads", "reads", _int),
                ("writes", "writes", _int),
                ("user space", "user", _int),
                ("kernel", "kernel", _int),
            ],
        ),
        (
            "kicks",
            "Kicks by queue",
            [
                ("source", "source", _text),
                ("event", "event", _text),
                ("device", "device", _text),
                ("queue", "queue", _text),
                ("addr", "addr", _hex),
                ("kicks", "kicks", _int),
                ("rate (/s)", "rate_per_s", _ratio),
            ],
        ),
        (
            "requests",
            "Requests by queue (pop -> completion)",
            [
                ("source", "source", _text),
                ("device", "device", _text),
                ("queue", "queue", _text),
                ("requests", "requests", _int),
                *TIMES[1:],
                ("kick->pop mean (us)", "mean_kick_to_pop_ns", _us),
                ("complete->irq mean (us)", "mean_complete_to_irq_ns", _us),
            ],
        ),
        (
            "batching",
            "Batching by queue",
            [
                ("source", "source", _text),
                ("device", "device", _text),
                ("queue", "queue", _text),
                ("requests", "requests", _int),
                ("kicks", "kicks", _int),
                ("requests/kick", "requests_per_kick", _ratio),
                ("interrupts", "interrupts", _int),
                ("requests/interrupt", "requests_per_interrupt", _ratio),
                ("completions", "completions", _int),
                ("requests/completion", "requests_per_completion", _ratio),
            ],
        ),
        (
            "interrupts",
            "Interrupts",
            [
                ("source", "source", _text),
                ("event", "event", _text),
                ("device", "device", _text),
                ("queue", "queue", _text),
                ("gsi", "gsi", _text),
                ("vector", "vector", _hex),
                ("count", "count", _int),
                ("raised", "raised", _int),
            ],
        ),
    ]
    # Where an empty table's reason comes from; a follow-up table of an absent analysis
    # is not printed at all.
    follows = {"exits_handled": "exits", "batching": "requests"}
    for key, title, columns in sections:
        rows = data[key]
        if rows:
            console.print(_table(title, rows, columns))
        elif key not in follows or follows[key] not in missing:
            why = missing.get(key, "no rows")
            console.print(f"[bold]{title}[/]: [dim]{why}[/]", highlight=False)


FLEET_COLUMNS: list[Column] = [
    ("trace", "name", _text),
    ("events", "events", _int),
    ("s", "duration_s", _ratio),
    ("exits", "exits", _int),
    ("user", "userspace_exits", _int),
    ("kicks", "kicks", _int),
    ("irqs", "interrupts", _int),
    ("reqs", "requests", _int),
    ("exits /req", "req_exits", _cost),
    ("user /req", "req_userspace_exits", _cost),
    ("traps /req", "req_trapping_accesses", _cost),
    ("kicks /req", "req_kicks", _cost),
    ("irqs /req", "req_interrupts", _cost),
    ("us /req", "req_time_ns", _us),
]
FLEET_NOTE = (
    "s: duration; user: user-space exits; irqs: interrupts; reqs: requests; traps: trapping "
    "accesses (handled in user space); /req: per request; empty: not in the trace"
)


def print_fleet(rows: Sequence[Row], console: Console) -> None:
    """Print :func:`vtrace.analyze.summary.fleet`'s rows as one table, a row per trace."""
    shown = []
    for r in rows:
        per = r.get("per_request") or {}
        duration = r.get("duration_ns")
        shown.append(
            {
                **r,
                "duration_s": None if duration is None else duration / 1e9,
                **{f"req_{k}": v for k, v in per.items()},
            }
        )
    table = _table(f"{len(rows)} traces", shown, FLEET_COLUMNS)
    table.columns[0].justify = "left"
    # Narrow edges: fourteen columns on an 80-column terminal.
    table.box = box.SIMPLE_HEAD
    table.padding = (0, 0, 0, 1)
    table.caption, table.caption_justify = FLEET_NOTE, "left"
    console.print(table)
    for r in rows:
        problems = [f"{r['lost_events']:,} events lost"] if r.get("lost_events") else []
        problems += [f"incomplete: {r['integrity']}"] if r.get("integrity") else []
        if problems:
            console.print(f"[bold red]{r['name']}: {'; '.join(problems)}[/]", highlight=False)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def print_frame(title: str, rows: Sequence[Row], console: Console) -> None:
    """Print an aggregate's rows (a polars frame's `to_dicts()`) as one table, its columns
    as they are named (times stay in ns, as in the frame)."""
    if not rows:
        console.print(f"{title}: no rows", highlight=False, markup=False)
        return
    names = list(rows[0])
    cells = [[_cell(row[n]) for n in names] for row in rows]
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for name in names:
        numeric = isinstance(next((r[name] for r in rows if r[name] is not None), 0), int | float)
        table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    # Every column whole, wider than the terminal if it must (a pager or a file reads it).
    widths = [max(len(n), *(len(r[i]) for r in cells)) for i, n in enumerate(names)]
    was = console.width
    console.width = max(was, sum(widths) + 3 * len(widths) + 4)
    try:
        console.print(table, crop=False)
    finally:
        console.width = was
