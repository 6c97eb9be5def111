"""Import speed: the vectorised ftrace importer vs a straightforward per-line `re` parser.

Generates a tracefs-format file of kvm events (default 1.2M lines, a mix like a VMX host
running an emulated device and a virtio one: exits and entries, PIO and MMIO with
user-space exits, MSI and IRQ-line interrupts, injections, instruction emulation and other
kvm events kept as raw), then times, in the same run and on the same file:

* ``vtrace.ingest.import_file("ftrace", ...)``: read, parse, write the trace directory, with
  the compiled reader of tracefs lines (vtrace/ingest/_tracefs.c) as installed;
* the same with the polars parser only (``VTRACE_PURE_PARSER=1``);
* the anchor: a loop over lines with Python's ``re`` filling per-column lists, building the
  same events frame and writing it with the same trace writer;
* the floor: reading the file's lines into a polars string column and nothing else, the
  fastest of polars' ways (``read_csv`` with a separator that never occurs, ``scan_lines``).

All three produce the same table (checked once). Prints lines/s, wall-clock and CPU time
(all threads) as medians over the repeats (all of them interleaved), the number of repeats,
the load average before and after, the speed-ups over the anchor and vtrace's time as a
multiple of the floor.

    .venv/bin/python benchmarks/bench_import.py [--lines N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from vtrace import schema as s
from vtrace.ingest import IMPORT_WRITE, import_file, native, read_events
from vtrace.store import open_trace, write_trace

# (weight, event, payload template); {x} fields are filled per line.
MIX = [
    (
        20,
        "kvm_exit",
        "vcpu {vcpu} reason {reason} rip 0x{rip:x} info1 0x{info:016x} info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000 requests 0x0000000000000000",
    ),
    (20, "kvm_entry", "vcpu {vcpu}, rip 0x{rip:x} intr_info 0x00000000 error_code 0x00000000"),
    (12, "kvm_pio", "pio_{rw} at 0x{port:x} size {size} count 1 val 0x{val:x} "),
    (8, "kvm_mmio", "mmio {mrw} len {size} gpa 0x{gpa:x} val 0x{val:x}"),
    (10, "kvm_userspace_exit", "reason {ureason}"),
    (4, "kvm_msi_set_irq", "dst 0 vec {vec} (Fixed|physical|edge)"),
    (3, "kvm_set_irq", "gsi {gsi} level {level} source 0"),
    (3, "kvm_inj_virq", "IRQ 0x{vec:x}"),
    (5, "kvm_emulate_insn", "0:{rip:x}:ee (prot64)"),
    (2, "kvm_fast_mmio", "fast mmio at gpa 0x{gpa:x}"),
    (8, "kvm_fpu", "{fpu}"),
    (5, "kvm_apic_accept_irq", "apicid 0 vec {vec} (Fixed|edge)"),
]
REASONS = [
    "IO_INSTRUCTION",
    "EPT_VIOLATION",
    "EPT_MISCONFIG",
    "HLT",
    "MSR_WRITE",
    "EXTERNAL_INTERRUPT",
]
UREASONS = ["KVM_EXIT_IO (2)", "KVM_EXIT_MMIO (6)"]
TASKS = ["CPU 0/KVM", "CPU 1/KVM", "qemu-system-x86", "kworker/1:2"]


def generate(path: Path, lines: int, seed: int = 1) -> None:
    """Write a tracefs `trace` file with ``lines`` event lines."""
    rng = random.Random(seed)
    weights = [w for w, _, _ in MIX]
    picks = rng.choices(range(len(MIX)), weights=weights, k=lines)
    ts_us = 1_000_000
    with path.open("w") as f:
        f.write("# tracer: nop\n#\n#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION\n")
        out = []
        for i, k in enumerate(picks):
            _, event, template = MIX[k]
            ts_us += rng.randint(1, 9)
            vcpu = i & 1
            payload = template.format(
                vcpu=vcpu,
                reason=REASONS[i % len(REASONS)],
                rip=0xFFFFFFFF81000000 + (i % 4096),
                info=i % 512,
                rw="write" if i % 3 else "read",
                port=0xC000 + (i % 64),
                size=(1, 2, 4)[i % 3],
                val=i % 251,
                mrw=("write", "read", "unsatisfied-read")[i % 3],
                gpa=0xFEBF0000 + (i % 4096),
                ureason=UREASONS[i % 2],
                vec=32 + i % 200,
                gsi=i % 24,
                level=i % 2,
                fpu=("load", "unload")[i % 2],
            )
            task = TASKS[vcpu] if event != "kvm_set_irq" else TASKS[3]
            out.append(
                f"{task:>16}-{4000 + vcpu:<7} [{vcpu:03d}] ..... {ts_us // 1_000_000:5d}."
                f"{ts_us % 1_000_000:06d}: {event}: {payload}\n"
            )
            if len(out) >= 100_000:
                f.writelines(out)
                out.clear()
        f.writelines(out)


# --- the anchor: one `re` match per line ------------------------------------------------------

HEADER_RE = re.compile(
    r"^\s*(?P<comm>.*)-(?P<tid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?:\S{4,5}\s+)?"
    r"(?P<sec>\d+)\.(?P<frac>\d+):\s+(?P<event>\w+):\s*(?P<payload>.*)$"
)
PIO_RE = re.compile(r"^pio_(read|write) at 0x([0-9a-f]+) size (\d+) count (\d+) val 0x([0-9a-f]+)")
MMIO_RE = re.compile(
    r"^mmio (unsatisfied-read|read|write) len (\d+) gpa 0x([0-9a-f]+) val 0x([0-9a-f]+)$"
)
USER_RE = re.compile(r"^reason (\S+) \((-?\d+)\)$")
EXIT_RE = re.compile(r"^(?:vcpu (\d+) )?reason (.+?) rip 0x([0-9a-f]+)(?:\s|$)")
ENTRY_RE = re.compile(r"^vcpu (\d+), rip 0x([0-9a-f]+)(.*)$")
MSI_RE = re.compile(
    r"^dst ([0-9a-f]+) vec (\d+) \((\w+)\|(logical|physical)\|(level|edge)(\|rh)?\)$"
)
IRQ_RE = re.compile(r"^gsi (\d+) level (-?\d+) source (-?\d+)$")
INJ_RE = re.compile(r"^(IRQ|Soft/INTn) 0x([0-9a-f]+)( \[reinjected\])?$")
INSN_RE = re.compile(r"^([0-9a-f]+):([0-9a-f]+):(.*?)( failed| FAIL)?$")
FAST_RE = re.compile(r"^fast mmio at gpa 0x([0-9a-f]+)$")
MODES = {"Fixed": 0, "LowPrio": 1, "SMI": 2, "Res3": 3, "NMI": 4, "INIT": 5, "SIPI": 6, "ExtINT": 7}


def per_line_parse(path: Path) -> pl.DataFrame:
    """The straightforward parser: a Python loop, one regex match per line and per payload."""
    tables = s.load_reason_tables()
    vmx = {v: k for k, v in tables.vmx.items()}
    svm = {v: k for k, v in tables.svm.items()}
    cols: dict[str, list] = {c: [] for c in s.COLUMNS}
    with path.open() as f:
        for line in f:
            m = HEADER_RE.match(line.rstrip("\n"))
            if m is None:
                continue
            ev, payload = m["event"], m["payload"].rstrip()
            row: dict[str, object] = {
                "ts_ns": int(m["sec"]) * 1_000_000_000 + int(m["frac"].ljust(9, "0")[:9]),
                "source": "kvm" if ev.startswith("kvm") else "kernel",
                "event": ev,
                "tid": int(m["tid"]),
                "cpu": int(m["cpu"]),
            }
            raw: str | None = payload
            if ev == "kvm_pio" and (p := PIO_RE.match(payload)):
                row.update(
                    write=p[1] == "write",
                    addr=int(p[2], 16),
                    size=int(p[3]),
                    count=int(p[4]),
                    value=int(p[5], 16),
                )
                raw = None
            elif ev == "kvm_mmio" and (p := MMIO_RE.match(payload)):
                row.update(
                    write=p[1] == "write",
                    flags={"unsatisfied-read": 0, "read": 1, "write": 2}[p[1]],
                    size=int(p[2]),
                    addr=int(p[3], 16),
                    value=int(p[4], 16),
                )
                raw = None
            elif ev == "kvm_userspace_exit" and (p := USER_RE.match(payload)):
                failed = p[1] in ("restart", "error")
                row.update(
                    reason=None if failed else int(p[2]),
                    reason_name=p[1],
                    flags=-int(p[2]) if failed else 0,
                )
                raw = None
            elif ev == "kvm_exit" and (p := EXIT_RE.match(payload)):
                name = p[2]
                flag = 0x80000000 if name.endswith(" FAILED_VMENTRY") else 0
                name = name.removesuffix(" FAILED_VMENTRY")
                row.update(vcpu=int(p[1]) if p[1] else None, rip=int(p[3], 16))
                if name in vmx:
                    row.update(reason=vmx[name], flags=flag, reason_name=name, isa="vmx")
                elif name in svm:
                    row.update(reason=svm[name], flags=0, reason_name=name, isa="svm")
            elif ev == "kvm_entry" and (p := ENTRY_RE.match(payload)):
                row.update(vcpu=int(p[1]), rip=int(p[2], 16), flags=int("[immediate exit]" in p[3]))
            elif ev == "kvm_msi_set_irq" and (p := MSI_RE.match(payload)):
                dst = int(p[1], 16)
                addr = 0xFEE00000 | (dst & 0xFF) << 12 | (dst & ~0xFF) << 32
                addr |= (4 if p[4] == "logical" else 0) | (8 if p[6] else 0)
                row.update(
                    addr=addr,
                    value=int(p[2]) | MODES[p[3]] << 8 | (1 << 15 if p[5] == "level" else 0),
                )
            elif ev == "kvm_set_irq" and (p := IRQ_RE.match(payload)):
                row.update(addr=int(p[1]), value=int(p[2]), flags=int(p[3]))
                raw = None
            elif ev == "kvm_inj_virq" and (p := INJ_RE.match(payload)):
                row.update(
                    value=int(p[2], 16), flags=int(p[1] == "Soft/INTn") | int(bool(p[3])) << 1
                )
                raw = None
            elif ev == "kvm_emulate_insn" and (p := INSN_RE.match(payload)):
                row.update(rip=int(p[2], 16), flags=int(bool(p[4])))
            elif ev == "kvm_fast_mmio" and (p := FAST_RE.match(payload)):
                row.update(addr=int(p[1], 16), write=True)
                raw = None
            row["raw"] = raw
            for c in s.COLUMNS:
                cols[c].append(row.get(c))
    schema = {c: pl.String if t == pl.Categorical() else t for c, t in s.EVENTS_SCHEMA.items()}
    return s.conform(pl.DataFrame(cols, schema=schema, strict=False))


def run_anchor(path: Path, out: Path) -> None:
    # The same Parquet as the importer writes: same writer, same compression and encodings.
    write_trace(out, per_line_parse(path), {"importer": "per-line re"}, **IMPORT_WRITE)


def run_vtrace(path: Path, out: Path) -> None:
    if native.module() is None:
        raise SystemExit(
            "vtrace.ingest._tracefs is not built: run `bash scripts/setup-python.sh --dev`"
        )
    import_file("ftrace", path, out)


def run_vtrace_polars(path: Path, out: Path) -> None:
    with native.pure_parser():
        import_file("ftrace", path, out)


# The floor: the file's lines as one polars column, each way polars has to read lines.
FLOORS = {
    "read_csv": lambda path: pl.read_csv(
        path,
        separator="\x1f",
        quote_char=None,
        has_header=False,
        new_columns=["line"],
        infer_schema=False,
    ),
    "scan_lines": lambda path: pl.scan_lines(path).collect(),
}


def run_floor(name: str):
    def read(path: Path, out: Path) -> None:
        FLOORS[name](path)

    return read


def timed(fn, path: Path, work: Path, name: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all threads) of one run."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    w0, c0 = time.perf_counter(), time.process_time()
    fn(path, out)
    return time.perf_counter() - w0, time.process_time() - c0


def phases(path: Path, work: Path, repeats: int) -> None:
    """Where vtrace's time goes: wall and CPU seconds of each step (medians)."""
    from vtrace.ingest.ftrace import FTRACE
    from vtrace.ingest.textlines import read_text_bytes, read_text_lines
    from vtrace.ingest.tracepoint_text import parsed_lines

    steps: dict[str, list[tuple[float, float]]] = {}

    def step(name: str, fn, *args, **kwargs):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        steps.setdefault(name, []).append((time.perf_counter() - w0, time.process_time() - c0))
        return result

    for _ in range(repeats):
        data = step("read the file's bytes", read_text_bytes, path)
        step("compiled reader (all lines)", native.parse, data)
        frame, meta = step("whole parse (read_events)", read_events, "ftrace", path)
        with native.pure_parser():
            text = step("polars only: read the lines", read_text_lines, path)
            step("polars only: split and parse", parsed_lines, text, FTRACE)
            step("polars only: whole parse", read_events, "ftrace", path)
        shutil.rmtree(work / "phases", ignore_errors=True)
        out = work / "phases"
        step(
            "write the trace directory",
            write_trace,
            out,
            frame,
            meta,
            **IMPORT_WRITE,
        )
    for name, got in steps.items():
        wall = statistics.median(r[0] for r in got)
        cpu = statistics.median(r[1] for r in got)
        print(f"  {name:28}: {wall:5.2f} s wall, {cpu:5.2f} s CPU")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lines", type=int, default=1_200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phases", action="store_true", help="also time each step of vtrace's import")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vtrace-bench-") as tmp:
        work = Path(tmp)
        path = work / "kvm_trace.txt"
        t0 = time.perf_counter()
        generate(path, args.lines)
        size_mb = path.stat().st_size / 1e6
        print(
            f"generated {args.lines:,} event lines ({size_mb:.0f} MB) in {time.perf_counter() - t0:.1f} s"
        )

        # Same table from all three (checked once, outside the timings).
        run_vtrace(path, work / "check-vtrace")
        run_vtrace_polars(path, work / "check-polars")
        run_anchor(path, work / "check-anchor")
        a, p, b = (
            open_trace(work / name)
            .events.collect()
            .with_columns(pl.col(pl.Categorical).cast(pl.String))
            for name in ("check-vtrace", "check-polars", "check-anchor")
        )
        same = a.equals(b) and p.equals(b)
        print(f"same events table from all three: {same} ({a.height:,} rows)")
        parts = sorted((work / "check-vtrace").glob("part-*.parquet"))
        print(
            f"vtrace's trace: {sum(x.stat().st_size for x in parts):,} bytes of Parquet "
            f"in {len(parts)} part(s), from {path.stat().st_size:,} bytes of text"
        )

        print("load average before the timings: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        labels = {
            "vtrace (compiled reader)": run_vtrace,
            "vtrace (polars only)": run_vtrace_polars,
            "per-line re (anchor)": run_anchor,
            **{f"floor: {name}": run_floor(name) for name in FLOORS},
        }
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
        for _ in range(args.repeats):  # interleaved: each repeat runs every contender once
            for label, fn in labels.items():
                runs[label].append(timed(fn, path, work, "out"))
        lines = args.lines + 3
        print(f"medians of {args.repeats} interleaved repeats:")
        med: dict[str, tuple[float, float]] = {}
        for label, got in runs.items():
            wall = statistics.median(r[0] for r in got)
            cpu = statistics.median(r[1] for r in got)
            med[label] = (wall, cpu)
            walls = ", ".join(f"{r[0]:.2f}" for r in got)
            print(
                f"{label:25}: {wall:6.2f} s wall ({lines / wall:10,.0f} lines/s), "
                f"{cpu:6.2f} s CPU  (runs: {walls})"
            )
        # Parsing alone (no Parquet): where they differ; the write is the same code.
        parse: dict[str, list[float]] = {"compiled": [], "polars only": [], "anchor": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            read_events("ftrace", path)
            parse["compiled"].append(time.perf_counter() - t0)
            with native.pure_parser():
                t0 = time.perf_counter()
                read_events("ftrace", path)
                parse["polars only"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            per_line_parse(path)
            parse["anchor"].append(time.perf_counter() - t0)
        pm = {k: statistics.median(v) for k, v in parse.items()}
        print(
            "parse only (no write), wall: "
            + ", ".join(f"{k} {v:.2f} s ({lines / v:,.0f} lines/s)" for k, v in pm.items())
            + f"; anchor / compiled {pm['anchor'] / pm['compiled']:.1f}x,"
            f" anchor / polars only {pm['anchor'] / pm['polars only']:.1f}x"
        )
        an = med["per-line re (anchor)"]
        floor = min(
            (m for label, m in med.items() if label.startswith("floor")), key=lambda m: m[0]
        )
        for label in ("vtrace (compiled reader)", "vtrace (polars only)"):
            vt = med[label]
            print(
                f"{label}: {an[0] / vt[0]:.1f}x the anchor in wall time, "
                f"{an[1] / vt[1]:.1f}x in CPU time (goal: at least 10x); "
                f"{vt[0] / floor[0]:.1f}x the floor in wall time, {vt[1] / floor[1]:.1f}x in CPU time"
            )
        if args.phases:
            print("vtrace's steps:")
            phases(path, work, args.repeats)
        print("load average after the timings: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        if not same:
            raise SystemExit("the parsers disagree: fix before trusting the timings")


if __name__ == "__main__":
    main()
