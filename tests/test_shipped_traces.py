"""The real traces shipped in traces/: each one opens, fits the events schema, lost nothing,
and matches what traces/README.md says about it (the command that made it, host, kernel,
date; for the /dev/kvm lab traces also the exact event counts), and traces/regenerate.sh
runs that same command.

These read the shipped files only (no root, no KVM); fresh captures are tested elsewhere.
"""

from __future__ import annotations

import ast
import math
import re
import shlex
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

import vtrace
from vtrace.schema import validate

TRACES = Path(__file__).resolve().parent.parent / "traces"
README = TRACES / "README.md"
REGENERATE = TRACES / "regenerate.sh"

TOTAL_BUDGET_BYTES = 20 * 1024 * 1024
LAB_BUDGET_BYTES = 3 * 1024 * 1024
NOTIFY_PORT = 0x200  # the lab's virtio notify port (docs/lab.md)
LAB_IRQ_GSI = 5  # the lab's irqfd line (docs/lab.md)
_NUMBER_INT = r"(\d[\d,]*)"


@dataclass(frozen=True)
class Entry:
    """One `### name` entry of traces/README.md, with the facts of its `##` section."""

    name: str
    section: str
    command: list[str]
    text: str
    date: str | None
    host: str | None
    kernel: str | None
    guest_kernel: str | None


def _bullet(section_text: str, label: str) -> str | None:
    """The text of the `- Label: ...` bullet (continuation lines joined), if present."""
    m = re.search(rf"^- {label}:(.*(?:\n  .*)*)", section_text, re.M)
    return " ".join(m.group(1).split()) if m else None


def _parse_readme() -> list[Entry]:
    text = README.read_text()
    entries: list[Entry] = []
    for section in re.split(r"^(?=## )", text, flags=re.M):
        head, *items = re.split(r"^(?=### )", section, flags=re.M)
        date = re.search(r"^- Date: (\d{4}-\d{2}-\d{2})", head, re.M)
        host_line = _bullet(head, "Host") or ""
        host = re.match(r"\s*`([^`]+)`", host_line)  # "- Host: `name`, ..." names it
        kernel = re.search(r"kernel `?(\d[\w.+-]*\w)", host_line)
        guest = re.search(r"kernel (\d[\w.+-]*\w)", _bullet(head, "Guest") or "")
        for item in items:
            name = item.split("\n", 1)[0].removeprefix("### ").strip()
            block = re.search(r"```sh\n(.*?)\n```", item, re.S)
            command = shlex.split(block.group(1)) if block else []
            # A trace made later than the rest of its section says so: "Made 2026-12-04 ...
            # with guest kernel 6.1.0-57-amd64".
            made = re.search(r"^Made (\d{4}-\d{2}-\d{2})", item, re.M)
            own_guest = re.search(r"guest kernel\s+(\d[\w.+-]*\w)", item)
            entries.append(
                Entry(
                    name=name,
                    section=head.split("\n", 1)[0],
                    command=command[1:] if command[:1] == ["sudo"] else command,
                    text=item,
                    date=(made or date).group(1) if made or date else None,
                    host=host.group(1) if host else None,
                    kernel=kernel.group(1) if kernel else None,
                    guest_kernel=(own_guest or guest).group(1) if own_guest or guest else None,
                )
            )
    return entries


ALL_ENTRIES = _parse_readme()
# A series is a directory of traces of one command at several settings (qdD-rR: depth D,
# round R); every other entry is one trace.
SERIES = [e for e in ALL_ENTRIES if not (TRACES / e.name / "meta.json").exists()]
ENTRIES = [e for e in ALL_ENTRIES if e not in SERIES]
LAB = [e for e in ENTRIES if e.command[:3] == ["vtrace", "lab", "run"]]


def _options(argv: list[str]) -> dict[str, str | None]:
    """`--a-b 1 --flag -o x` -> {"a_b": "1", "flag": None, "o": "x"}."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        key = argv[i].lstrip("-").replace("-", "_")
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out[key] = argv[i + 1]
            i += 2
        else:
            out[key] = None
            i += 1
    return out


def _run_config(meta: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The run's parameters as meta stores them, and the option that names the output."""
    if "lab" in meta and isinstance(meta["lab"], dict):
        return meta["lab"], "record"
    config = meta.get("config")
    if isinstance(config, str):  # stored as a Python literal by the QEMU lab
        config = ast.literal_eval(config)
    assert isinstance(config, dict), "meta.json holds no run parameters (lab or config)"
    return config, "o"


def _counts_claim(text: str) -> tuple[int, dict[str, int], int]:
    """Parse `Counts: 2,816 events (kvm_pio 195, ...); lost 0.` from a README entry."""
    m = re.search(r"^Counts: ([\d,]+) events \(([^)]*)\); lost ([\d,]+)\.", text, re.M)
    assert m, "no 'Counts: N events (name count, ...); lost N.' line"
    by_event = {
        name: int(n.replace(",", "")) for name, n in re.findall(r"(\w+) ([\d,]+)", m.group(2))
    }
    return int(m.group(1).replace(",", "")), by_event, int(m.group(3).replace(",", ""))


@pytest.fixture(scope="module")
def opened() -> dict[str, tuple[vtrace.Trace, pl.DataFrame]]:
    out = {}
    for entry in ENTRIES:
        trace = vtrace.open_trace(TRACES / entry.name)
        out[entry.name] = (trace, trace.events.collect())
    return out


def test_readme_lists_exactly_the_shipped_traces() -> None:
    shipped = {p.name for p in TRACES.iterdir() if p.is_dir() and not p.name.startswith(".")}
    listed = [e.name for e in ALL_ENTRIES]
    assert len(listed) == len(set(listed)), "a trace is listed twice"
    assert set(listed) == shipped
    assert len(LAB) >= 5, "the lab section lists its five traces"


def test_traces_fit_the_size_budget() -> None:
    def size(paths: list[Path]) -> int:
        return sum(f.stat().st_size for p in paths for f in p.rglob("*") if f.is_file())

    assert size([TRACES]) < TOTAL_BUDGET_BYTES
    assert size([TRACES / e.name for e in LAB]) < LAB_BUDGET_BYTES


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_trace_opens_fits_the_schema_and_lost_nothing(entry: Entry, opened) -> None:
    trace, events = opened[entry.name]
    _whole_and_valid(entry.name, trace, events)


def _whole_and_valid(name: str, trace: vtrace.Trace, events: pl.DataFrame) -> None:
    assert trace.parts, "no Parquet part"
    for part in trace.parts:
        validate(pl.DataFrame(schema=pl.read_parquet_schema(part)), where=str(part))
        assert pl.read_parquet(part, columns=["ts_ns"])["ts_ns"].is_sorted(), f"{part}: time order"
    validate(events, where=name)
    assert events.height > 0
    assert trace.meta["events"] == events.height
    assert trace.meta.get("complete", True) is True
    assert "incomplete_parts" not in trace.meta
    dropped = {k: trace.meta[k] for k in ("lost", "unparsed", "malformed") if k in trace.meta}
    assert dropped, "meta says nothing about lost or unparsed events"
    assert all(v == 0 for v in dropped.values()), dropped


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_meta_has_what_the_readme_claims(entry: Entry, opened) -> None:
    _meta_as_claimed(entry, opened[entry.name][0].meta, f"traces/{entry.name}")


def _meta_as_claimed(entry: Entry, meta: dict[str, Any], output: str) -> None:
    assert entry.date, f"section {entry.section!r} states no '- Date:'"
    made = datetime.fromtimestamp(meta["created_unix"], UTC).date().isoformat()
    assert made == entry.date
    assert entry.kernel, f"section {entry.section!r} states no kernel on its '- Host:' line"
    # "kernel 6.18.44" names the release without its local suffix ("-fc-v669")
    assert meta["kernel"] == entry.kernel or meta["kernel"].startswith(entry.kernel + "-")
    assert meta.get("host")
    if entry.host is not None:
        assert meta["host"] == entry.host
    if entry in LAB:  # the lab section names both exactly
        assert (meta["host"], meta["kernel"]) == (entry.host, entry.kernel)
    if entry.guest_kernel is not None:
        assert meta["guest_kernel"] == entry.guest_kernel

    # The command: every option it gives is the value meta recorded for the run, and its
    # output is this directory.
    assert entry.command and entry.command[0] == "vtrace", "no ```sh block with the command"
    config, output_option = _run_config(meta)
    verb = 3  # vtrace <group> run
    options = _options(entry.command[verb:])
    assert options.pop(output_option) == output
    options.pop("json", None)
    for key, value in options.items():
        assert key in config, f"{key}: not in the run's meta"
        assert str(config[key]) == value, key


def _regenerate_lines() -> dict[str, list[str]]:
    """traces/regenerate.sh's `capture NAME ...` and `capture_lab NAME ...` lines, by name."""
    text = REGENERATE.read_text().replace("\\\n", " ")
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        argv = shlex.split(line, comments=True)
        if len(argv) > 2 and argv[0] in ("capture", "capture_lab"):
            lines[argv[1]] = argv
    return lines


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_regenerate_runs_the_readme_command(entry: Entry) -> None:
    argv = _regenerate_lines().get(entry.name)
    assert argv, f"traces/regenerate.sh does not make {entry.name}"
    readme = entry.command
    if argv[0] == "capture_lab":  # runs `vtrace lab run ARGS --record <dir> --json`
        assert readme[:3] == ["vtrace", "lab", "run"]
        readme_args = readme[3:]
        for option in ("--record", "--json"):
            i = readme_args.index(option)
            del readme_args[i : i + (2 if option == "--record" else 1)]
        assert argv[2:] == readme_args
    else:  # capture NAME $VTRACE ARGS: appends -o <dir>
        i = readme.index("-o")
        assert argv[3:] == readme[1:i] + readme[i + 2 :]


# --- a series: every trace whole, made by the entry's command at its own setting -------------


@pytest.mark.parametrize("entry", SERIES, ids=lambda e: e.name)
def test_series_traces_are_whole_and_made_by_the_command(entry: Entry) -> None:
    members = sorted(p for p in (TRACES / entry.name).iterdir() if not p.name.startswith("."))
    assert members, f"{entry.name}: an empty series"
    depths, rounds = set(), set()
    for member in members:
        m = re.fullmatch(r"qd(\d+)-r(\d+)", member.name)
        assert m, f"{member}: not named qdD-rR"
        depths.add(int(m[1]))
        rounds.add(int(m[2]))
        trace = vtrace.open_trace(member)
        _whole_and_valid(member.name, trace, trace.events.collect())
        # the command with this member's depth and directory
        argv = [m[1] if a == "D" else a for a in entry.command]
        argv = [f"traces/{entry.name}/{member.name}" if "qdD-rR" in a else a for a in argv]
        _meta_as_claimed(replace(entry, command=argv), trace.meta, argv[argv.index("-o") + 1])
    assert len(members) == len(depths) * len(rounds), "every depth in every round"
    script = REGENERATE.read_text()
    assert f"traces/{entry.name}" in script and '"$tmp/qd$d-r$r"' in script


# --- the QEMU virtio-blk traces: the counts and per-request figures their entries state ------

QEMU_BLK = [e for e in ENTRIES if e.name.startswith("qemu-virtio-blk-")]
_QEMU_COUNTS = re.compile(
    rf"{_NUMBER_INT}\s+kicks,\s+{_NUMBER_INT}\s+interrupts(?:,\s+{_NUMBER_INT}\s+pops)?;"
    rf"\s+{_NUMBER_INT}\s+events"
)


@pytest.mark.parametrize(
    "entry", [e for e in QEMU_BLK if _QEMU_COUNTS.search(e.text)], ids=lambda e: e.name
)
def test_qemu_blk_trace_has_the_counts_the_readme_states(entry: Entry, opened) -> None:
    """The entry's "N kicks, N interrupts, N pops; N events" and bold per-request figures."""
    trace, events = opened[entry.name]
    summary = trace.meta["qemu_lab"]
    event = pl.col("event")
    kicks = events.filter(event == "virtio_queue_notify").height
    interrupts = events.filter(event.is_in(["virtio_notify", "virtio_notify_irqfd"])).height
    pops = events.filter(event == "virtqueue_pop").height
    assert (kicks, interrupts, pops) == (
        summary["kicks"],
        summary["interrupts"],
        summary["virtqueue_pops"],
    )
    m = _QEMU_COUNTS.search(entry.text)
    assert m is not None
    stated = [None if g is None else int(g.replace(",", "")) for g in m.groups()]
    assert stated == [kicks, interrupts, pops if stated[2] is not None else None, events.height]
    requests = summary["requests"]
    bold = " ".join(b for b in re.findall(r"\*\*(.*?)\*\*", entry.text, re.S) if "per" in b)
    per_request = re.findall(r"(\d+\.\d+)\s+(kicks|interrupts)\b", bold)
    assert {kind for _, kind in per_request} == {"kicks", "interrupts"}
    for figure, kind in per_request:
        n = kicks if kind == "kicks" else interrupts
        decimals = len(figure.split(".")[1])
        assert figure == f"{n / requests:.{decimals}f}", kind


def test_every_batched_virtio_blk_depth_states_its_counts() -> None:
    """The depths the model is checked against (1, 4, 16, 32) are all shipped; the batched
    ones above depth 1 state their exact counts."""
    names = {e.name for e in QEMU_BLK}
    assert {f"qemu-virtio-blk-qd{q}" for q in (1, 4, 16, 32)} <= names
    for q in (4, 16, 32):
        entry = next(e for e in QEMU_BLK if e.name == f"qemu-virtio-blk-qd{q}")
        assert _QEMU_COUNTS.search(entry.text), entry.name


# --- the /dev/kvm lab traces: exact counts, and the VMM's own counters ------------------------


@pytest.mark.parametrize("entry", LAB, ids=lambda e: e.name)
def test_lab_trace_has_the_counts_the_readme_states(entry: Entry, opened) -> None:
    trace, events = opened[entry.name]
    total, by_event, lost = _counts_claim(entry.text)
    got = dict(events.group_by(pl.col("event").cast(pl.String)).len().iter_rows())
    assert got == by_event
    assert events.height == total
    assert trace.meta["lost"] == lost == 0
    assert trace.meta["seen"] == total - events.filter(pl.col("source") == "lab").height


_NUMBER = r"([\d.,]+)"
_MEASURED_EXITS = re.compile(
    rf"^Measured: {_NUMBER} user-space exits per request \({_NUMBER}\)", re.M
)
_MEASURED_VIRTIO = re.compile(
    rf"; {_NUMBER} kicks per request \({_NUMBER}; {_NUMBER} of {_NUMBER} batches suppressed\), "
    rf"{_NUMBER} requests per kick; {_NUMBER} back-end wake-ups, {_NUMBER} passes "
    rf"\(at most {_NUMBER} requests in one\); {_NUMBER} irqfd injections, "
    rf"{_NUMBER} interrupts taken by the guest\.$",
    re.M,
)


def _number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.parametrize("entry", LAB, ids=lambda e: e.name)
def test_lab_trace_has_the_ratios_the_readme_states(entry: Entry, opened) -> None:
    """The entry's Measured line: exits, kicks and batching, recomputed from the events."""
    trace, events = opened[entry.name]
    lab = trace.meta["lab"]
    requests = lab["requests"]
    event = pl.col("event")
    exits = events.filter(event == "kvm_userspace_exit").height
    m = _MEASURED_EXITS.search(entry.text)
    assert m, "no 'Measured: R user-space exits per request (N)' line"
    assert (m.group(1), _number(m.group(2))) == (f"{exits / requests:.4f}", exits)
    if lab["device"] == "emulated":
        return
    m = _MEASURED_VIRTIO.search(entry.text)
    assert m, "the Measured line lacks kicks, batching and interrupts"
    kicks = events.filter((event == "kvm_pio") & (pl.col("addr") == NOTIFY_PORT)).height
    batches = math.ceil(requests / lab["batch"])
    passes = events.filter(event == "lab_complete")["count"]
    injections = events.filter((event == "kvm_set_irq") & (pl.col("value") == 1)).height
    assert m.group(1) == f"{kicks / requests:.4f}"
    assert m.group(5) == f"{requests / kicks:.2f}"
    assert [_number(m.group(i)) for i in (2, 3, 4, 6, 7, 8, 9, 10)] == [
        kicks,
        batches - kicks,
        batches,
        events.filter(event == "lab_kick").height,
        passes.len(),
        passes.max(),
        injections,
        lab["interrupts"],
    ]
    assert passes.max() <= lab["ring_size"], "a pass never takes more than the ring holds"


@pytest.mark.parametrize("entry", LAB, ids=lambda e: e.name)
def test_lab_trace_agrees_with_the_vmm(entry: Entry, opened) -> None:
    """docs/lab.md's identities between the kernel's events, the back end's and the VMM's."""
    trace, events = opened[entry.name]
    lab = trace.meta["lab"]
    requests = lab["requests"]
    event = pl.col("event")
    vmm_pid = events.filter(pl.col("source") == "lab")["pid"].unique().to_list()
    assert len(vmm_pid) == 1
    assert trace.meta["filters"]["pids"] == vmm_pid, "recorded with --pid of the VMM"

    exits = events.filter(event == "kvm_userspace_exit")
    assert exits.height == lab["userspace_exits"]
    assert exits["reason_name"].cast(pl.String).unique().to_list() == ["KVM_EXIT_IO"]
    # Everything but the interrupt events comes from the VMM's process.
    assert events.filter(event != "kvm_set_irq")["pid"].unique().to_list() == vmm_pid

    pops = events.filter(event == "lab_pop")
    assert sorted(pops["value"].to_list()) == list(range(requests))
    assert events.filter(event == "lab_complete")["count"].sum() == requests
    assert lab["completed"] == requests

    kicks = events.filter((event == "kvm_pio") & (pl.col("addr") == NOTIFY_PORT))
    assert kicks.height == lab["kicks"] == lab["guest_kicks"]
    if lab["device"] == "emulated":
        assert lab["userspace_exits"] == 4 * requests + 1
        assert kicks.height == 0
    else:
        assert lab["userspace_exits"] == 1
        assert kicks["write"].all()
        assert events.filter(event == "lab_kick")["count"].sum() == lab["kicks"]
        assert lab["guest_kicks"] <= math.ceil(requests / lab["batch"])

    irq = events.filter(event == "kvm_set_irq")
    if lab["wait"] == "irq":
        # Kept under --pid although an irqfd injection runs in a kworker, not in the VMM.
        assert irq.height > 0 and irq.height % 2 == 0
        assert irq["addr"].unique().to_list() == [LAB_IRQ_GSI]
        assert irq.filter(pl.col("value") == 1).height == irq.height // 2
        assert vmm_pid[0] not in irq["pid"].to_list()
        assert 0 < lab["interrupts"] <= irq.height // 2
        # None is another VM's: injection i follows at least i back-end passes (each signals
        # the irqfd once; signals merge), the last of them shortly before.
        raised = np.sort(irq.filter(pl.col("value") == 1)["ts_ns"].to_numpy())
        passes_ns = np.sort(events.filter(event == "lab_complete")["ts_ns"].to_numpy())
        before = np.searchsorted(passes_ns, raised)
        assert (before >= np.arange(1, raised.size + 1)).all()
        assert (raised - passes_ns[before - 1] < 10_000_000).all()
    else:
        assert irq.height == 0, "a VM without an irqchip has no injections"
