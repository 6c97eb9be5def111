"""`vtrace demo`: the whole story on the shipped traces, as a report a person can open.

No root and no KVM: it reads the real traces in `traces/`, summarises them, compares the
emulated and virtio devices on the traces and in the model, runs a small what-if sweep,
executes the notebooks headless, and writes `DIR/index.html` with the key figures and links
to the executed notebooks.

Each step is independent: a step whose inputs are missing (no traces yet, a model file
not shipped) is reported in the page's "missing" list and the rest still runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from vtrace import plots
from vtrace.errors import VtraceError
from vtrace.notebook import NOTEBOOKS, ShippedTrace, notebooks_dir, shipped_traces, traces_dir
from vtrace.report import (
    NotebookRun,
    Section,
    execute_notebook,
    notebook_links,
    timeline_links,
    write_index,
)

DEFAULT_OUT = Path("vtrace-demo")
# The script that captures the shipped traces again (relative to the repository).
REGENERATE_SCRIPT = "traces/regenerate.sh"
# Where the report keeps each shipped trace's Perfetto timeline.
TIMELINES_DIR = "timelines"
# Model pairs compared side by side: (emulated, virtio) and what they stand for.
MODEL_PAIRS = (
    ("ide-emulated", "virtio-blk", "disk"),
    ("e1000-emulated", "virtio-net", "NIC"),
    ("lab-emulated", "lab-virtio", "lab device"),
)
# Demo sizes: enough requests for stable means, few enough for a 2-core machine.
DEMO_REQUESTS = 2_000
SWEEP_MODEL = "virtio-blk"
SWEEP_GRID: dict[str, list[Any]] = {
    "virtqueue.ring_size": [8, 32, 256],
    "virtqueue.batch": [1, 4, 16],
    "workload.queue_depth": [1, 16],
}
# Notebooks that open one trace (their `TRACE` parameter), and the trace the demo gives
# them: the first shipped trace on that side of the comparison, preferring names that
# start with the given prefix.
NOTEBOOK_TRACE: dict[str, tuple[str, str]] = {
    "01-explore-a-trace": ("emulated", "lab-emulated"),
    "05-capture-on-your-host": ("virtio", "lab-virtio-b8"),
}
# Parameters handed to every notebook in demo mode (each notebook declares what it takes).
NOTEBOOK_DEMO_PARAMETERS: dict[str, Any] = {"REQUESTS": DEMO_REQUESTS, "QUICK": True}


@dataclass
class DemoResult:
    """What the demo made: the report, the executed notebooks, and what it could not do."""

    out_dir: Path
    index: Path
    seconds: float
    traces: list[ShippedTrace]
    notebooks: list[NotebookRun] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def failed_notebooks(self) -> list[NotebookRun]:
        return [n for n in self.notebooks if not n.ok]


# --- steps ------------------------------------------------------------------------------------


def _about_section() -> Section:
    return (
        Section(
            "What this is",
            "An emulated device (an IDE disk, an e1000 NIC) makes the guest's driver touch "
            "device registers, and under KVM every touch is a VM exit, most of them a round "
            "trip to the VMM in user space. A virtio device puts requests in a shared ring "
            "and kicks once per batch, a write KVM hands to an eventfd without leaving the "
            "kernel. This report measures the difference on real traces and asks the model "
            "what batching, ring size and exit cost change.",
        )
        .text(
            "Figures are interactive: hover for values, drag to zoom, double-click to reset. "
            "Times are in microseconds unless an axis says otherwise."
        )
        .raw(
            "<p>Open the notebooks live with <code>vtrace notebook</code> (JupyterLab on "
            "<code>notebooks/</code>); run them on your own trace by setting "
            "<code>TRACE</code> in their parameters cell; make the report again with "
            "<code>vtrace demo</code>.</p>"
        )
    )


def _made_by(meta: dict[str, Any]) -> str:
    """What made a trace, in a few words, from its meta."""
    for key in ("command", "source", "importer"):
        if isinstance(meta.get(key), str):
            return meta[key]
    return "vtrace lab run" if "lab" in meta else ""


def _traces_section(traces: list[ShippedTrace]) -> Section:
    section = Section(
        "The shipped traces",
        "Real traces captured on a KVM host with vtrace (the lab VMM on /dev/kvm and Linux "
        "guests under QEMU). Every figure below comes from these files or from the model "
        "calibrated on them.",
    )
    if traces:
        section.table(
            pl.DataFrame(
                {
                    "trace": [t.name for t in traces],
                    "side": [t.side for t in traces],
                    "device": [t.device for t in traces],
                    "events": [t.events for t in traces],
                    "made by": [_made_by(t.meta) for t in traces],
                },
                schema_overrides={"events": pl.Int64},
            )
        )
    return section


def _summary_section(traces: list[ShippedTrace]) -> Section:
    from vtrace.analyze import accesses, accesses_by_target, by_reason, user_exits
    from vtrace.store import open_trace

    section = Section(
        "What is in the traces",
        "Events by name, the returns to user space by reason, and the device registers the "
        "emulated devices trap on most (vtrace.analyze; notebook 01 goes further).",
    )
    for t in _pick(traces, "emulated", "qemu-ide") + _pick(traces, "virtio", "qemu-virtio-blk"):
        events = open_trace(t.path).events
        section.figure(plots.event_counts(events, title=f"{t.name}: events by name and source"))
    for t in _pick(traces, "emulated", "lab-emulated"):
        user = user_exits(open_trace(t.path).events)
        if user.height:
            section.figure(
                plots.reason_bars(
                    by_reason(user, "until_next_ns"),
                    title=f"{t.name}: returns to user space by reason",
                ),
                "Count of returns from KVM_RUN to the VMM, and the time from each to the "
                "thread's next KVM event (the VMM's handling and the way back).",
            )
    for t in _pick(traces, "emulated", "qemu-ide"):
        events = open_trace(t.path).events
        section.figure(
            plots.top_accesses(
                accesses_by_target(accesses(events)), title=f"{t.name}: hottest device registers"
            ),
            "Each bar is one register (port or MMIO offset); every access handled in user "
            "space is an exit to the VMM.",
        )
    return section


def _pick(traces: list[ShippedTrace], side: str, prefix: str) -> list[ShippedTrace]:
    """The first trace on ``side`` whose name starts with ``prefix``, else the first on
    ``side``; none when no trace is on that side."""
    on_side = [t for t in traces if t.side == side and t.events]
    return sorted(on_side, key=lambda t: (not t.name.startswith(prefix), t.name))[:1]


def trace_for(notebook: str, traces: list[ShippedTrace]) -> ShippedTrace | None:
    """The shipped trace the demo opens in ``notebook`` (None: it opens none, or none fits)."""
    if notebook not in NOTEBOOK_TRACE:
        return None
    side, prefix = NOTEBOOK_TRACE[notebook]
    picked = _pick(traces, side, prefix)
    return picked[0] if picked else None


def timelines_section(traces: list[ShippedTrace], out_dir: Path) -> Section:
    """Each shipped trace exported as a Perfetto timeline into ``out_dir``/timelines, linked."""
    from vtrace.export import export_perfetto

    section = Section(
        "Timelines",
        "Each trace as a Perfetto timeline: a process per VM; per vCPU thread its exits and "
        "their handling in user space; per back-end thread its passes over the ring; per "
        "queue each request from its kick to its completion; arrows from a kick to the pass "
        "it woke and from a completion to its interrupt; ring occupancy and kicks per second "
        "as counters. What a trace did not record is not drawn.",
    )
    section.raw(
        "<p>To open one: download it, go to <code>ui.perfetto.dev</code> in a browser and "
        "choose <em>Open trace file</em> (or drop the file on the page); the page reads the "
        "file locally. Expand a process to see its threads; click a slice for its details "
        "and its flows. Make one for any trace with <code>vtrace export perfetto DIR -o "
        "FILE.pftrace</code>.</p>"
    )
    made = []
    for t in traces:
        path = out_dir / TIMELINES_DIR / f"{t.name}.pftrace"
        path.parent.mkdir(parents=True, exist_ok=True)
        result = export_perfetto(t.path, path, force=True)
        shown = [f"{n:,} {what}" for what, n in result.counts.items() if n]
        made.append((t.name, path, ", ".join(shown) or "nothing to draw"))
    if made:
        section.raw(timeline_links(made, out_dir))
    return section


def _comparison_section(traces: list[ShippedTrace], missing: list[str]) -> Section:
    from vtrace.compare import PER_REQUEST, model_costs, traces_costs
    from vtrace.sim import model_names

    section = Section(
        "Emulated vs virtio",
        "The central question: what does each request cost in exits, and what does the "
        "virtio ring buy back? First measured on the shipped traces, then in the model "
        "with costs measured on this kind of host. Red: emulated devices; blue: virtio.",
    )
    if traces:
        measured = traces_costs([t.path for t in traces])
        section.figure(
            plots.comparison(
                measured,
                metrics=[
                    "userspace_exits_per_request",
                    "trapping_accesses_per_request",
                    "kicks_per_request",
                    "irqs_per_request",
                    "latency_mean_ns",
                    "throughput_rps",
                ],
                title="Measured on the shipped traces: cost per request",
            ),
            "QEMU guests ran under TCG here: their trapping accesses are the register "
            "accesses QEMU emulated, each of which would be an exit under KVM.",
        )
        section.table(measured.drop("origin"), "Per-request costs of each trace")
    shipped = set(model_names())
    models = [m for pair in MODEL_PAIRS for m in pair[:2] if m in shipped]
    absent = [m for pair in MODEL_PAIRS for m in pair[:2] if m not in shipped]
    if absent:
        missing.append(f"models not shipped in models/: {', '.join(absent)}")
    if models:
        modelled = model_costs(models, requests=DEMO_REQUESTS)
        section.figure(
            plots.comparison(
                modelled,
                metrics=[*PER_REQUEST, "latency_p99_ns", "throughput_rps"],
                title=f"Modelled: emulated vs virtio ({DEMO_REQUESTS:,} requests each)",
            )
        )
        section.table(modelled.drop("origin", "device"), "Model runs")
    return section


def small_sweep(model: str = SWEEP_MODEL, requests: int = DEMO_REQUESTS) -> pl.DataFrame:
    """The demo's what-if sweep: ring size x batch x queue depth on one virtio model."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from vtrace.sim.sweep import parse_grid, run_sweep

    base = [f"workload.requests={requests}", "virtqueue.batch_policy=count"]
    grid = [f"{k}={','.join(map(str, v))}" for k, v in SWEEP_GRID.items()]
    # Spawned workers: forking a process whose polars thread pool runs can deadlock.
    with ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn")) as pool:
        return run_sweep(model, parse_grid(model, grid, base), base, executor=pool)


def _sweep_section(missing: list[str]) -> Section:
    from vtrace.sim import model_names

    section = Section(
        "Batching and ring size, what if",
        f"A small sweep of the {SWEEP_MODEL} model: ring size x batch x queue depth, the "
        "guest kicking once per batch. Notebook 03 runs a larger sweep and adds "
        "notification suppression.",
    )
    if SWEEP_MODEL not in model_names():
        missing.append(f"sweep: model {SWEEP_MODEL} not shipped in models/")
        return section
    results = small_sweep()
    x, y, depth = "virtqueue.ring_size", "virtqueue.batch", "workload.queue_depth"
    deep = results.filter(pl.col(depth) == pl.col(depth).max())
    qd = max(SWEEP_GRID[depth])
    for z in ("throughput_rps", "latency_ns.p99", "kicks_per_request"):
        section.figure(
            plots.sweep_heatmap(
                deep, x=x, y=y, z=z, title=f"{SWEEP_MODEL}: {plots.label(z)}, queue depth {qd}"
            )
        )
    section.figure(
        plots.pareto_front(
            results,
            y="latency_ns.p99",
            color=depth,
            hover=[x, y, depth],
            title=f"{SWEEP_MODEL}: throughput against p99 latency, every sweep point",
        )
    )
    return section


def _notebooks_section(runs: list[NotebookRun], out_dir: Path, skipped: list[str]) -> Section:
    section = Section(
        "Notebooks",
        "Each notebook tells one part of the story on the shipped traces; below are their "
        "executed versions. To open them live: `vtrace notebook` starts JupyterLab on "
        "notebooks/.",
    )
    if runs:
        section.raw(notebook_links(runs, out_dir))
    for s in skipped:
        section.text(s)
    return section


def _missing_section(missing: list[str]) -> Section:
    section = Section("Not in this report", "Parts the demo could not make here, and why.")
    for m in missing:
        section.text(m)
    return section


# --- the job ----------------------------------------------------------------------------------


def run_demo(
    out_dir: Path = DEFAULT_OUT,
    *,
    console: Console | None = None,
    notebooks: tuple[str, ...] = NOTEBOOKS,
    traces_root: Path | None = None,
    notebook_parameters: dict[str, Any] | None = None,
) -> DemoResult:
    """Run the demo into ``out_dir`` and return what it made.

    ``notebooks`` limits which notebooks run (all by default). The output directory may
    exist; the files the demo writes are replaced.
    """
    console = console or Console()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise VtraceError(f"{out_dir}: exists and is not a directory; choose another -o")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VtraceError(f"{out_dir}: cannot create the report directory: {e.strerror}") from None
    root = traces_root or traces_dir()
    traces = shipped_traces(root)
    missing: list[str] = []
    if not traces:
        missing.append(
            f"no traces in {root}: the figures from real traces are left out "
            f"({REGENERATE_SCRIPT} captures them)"
        )
    sections: list[Section] = [_about_section(), _traces_section(traces)]
    steps: list[tuple[str, Callable[[], Section]]] = []
    if traces:
        steps.append(("summarising the traces", lambda: _summary_section(traces)))
        steps.append(("exporting timelines", lambda: timelines_section(traces, out_dir)))
    steps.append(("emulated vs virtio", lambda: _comparison_section(traces, missing)))
    steps.append(("a small sweep", lambda: _sweep_section(missing)))

    nb_dir = notebooks_dir()
    runs: list[NotebookRun] = []
    skipped: list[str] = []
    params = {**NOTEBOOK_DEMO_PARAMETERS, **(notebook_parameters or {})}
    params.setdefault("TRACES", str(root.resolve()))
    with Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("vtrace demo", total=len(steps) + len(notebooks) + 1)
        for what, step in steps:
            progress.update(task, description=what)
            try:
                sections.append(step())
            except (ImportError, VtraceError) as e:
                missing.append(f"{what}: {e}")
            progress.advance(task)
        for name in notebooks:
            source = nb_dir / f"{name}.py"
            progress.update(task, description=f"notebook {name}")
            trace = trace_for(name, traces)
            if not source.is_file():
                skipped.append(f"{name}: not found in {nb_dir}")
            elif name in NOTEBOOK_TRACE and trace is None:
                skipped.append(f"{name}: not run, it needs a trace and {root} has none")
                missing.append(f"notebook {name}: no trace to open in {root}")
            else:
                extra = {"TRACE": trace.name} if trace else {}
                run = execute_notebook(source, out_dir / "notebooks", {**params, **extra})
                runs.append(run)
                if not run.ok:
                    progress.console.print(f"[red]notebook {name} failed:[/] {run.error}")
            progress.advance(task)
        progress.update(task, description="writing the report")
        sections.append(_notebooks_section(runs, out_dir, skipped))
        if missing:
            sections.append(_missing_section(missing))
        seconds = time.perf_counter() - started
        index = write_index(
            out_dir,
            title="vtrace: what each guest I/O costs in exits, and what virtio buys back",
            subtitle=f"{len(traces)} shipped traces, {len(runs)} notebooks, "
            f"made in {seconds:.0f} s",
            sections=sections,
        )
        progress.advance(task)
    return DemoResult(out_dir, index, time.perf_counter() - started, traces, runs, missing)
