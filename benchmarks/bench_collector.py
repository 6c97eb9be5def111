"""Collector overhead and capacity, side by side in one run (medians over interleaved rounds).

    .venv/bin/python benchmarks/bench_collector.py [--rounds 5] [--pio-exits 100000] [--kicks 1000000]

Workloads (real KVM guests):
- pio: tests/kvm_guest.py looping on `out dx, al`, every `out` exits to the VMM in user
  space (kvm_pio + kvm_userspace_exit per exit);
- kick: the same loop with the port an ioeventfd, every `out` stays in the kernel (one
  kvm_pio per kick): the highest event rate this host makes;
- lab-emulated, lab-virtio: `vtrace lab run --device emulated` and `--device virtio`
  (batch 1, ring 256): the lab's request rate, the measure the capture goals are set in
  (4 user-space PIO exits per emulated request; up to one ioeventfd kick per virtio
  request, plus the back end's thread); their CPU column is the VMM process's CPU time per
  request (vCPU and back-end threads, the lab's `cpu_s`).

Conditions, each run on the same workload in turn within a round:
- untraced;
- `vtrace record` (all processes, default buffers; raw tracepoints where the kernel's BTF
  allows), and `record classic`: the same with --classic-tracepoints (formatted records);
- `perf record -e kvm:kvm_pio -e kvm:kvm_userspace_exit -a` (the anchor: it slowed the
  user-space exit loop from about 9.6 to 12.2 us per exit on the development machines);
- `vtrace stat` (in-kernel aggregation), and `stat classic` with --classic-tracepoints;
- bcc-callback (kick only): the same BPF program read through bcc's ring_buffer_poll with
  a Python callback per event, to show why the collector drains the ring itself;
- placebo: a process that compiles and loads `vtrace stat`'s program but attaches nothing,
  a control for the benchmark's own bias and noise.

Each traced run starts --settle-s (1) seconds after its tracer is ready.

Printed: median rate per condition, its ratio to untraced (overhead = 1 - ratio), events
recorded and lost. Rates come from the VMM's own clock around its run (`out`s or requests
per second).
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "tests" / "kvm_guest.py"
PY = sys.executable
VTRACE = [PY, "-m", "vtrace.cli"]


SETTLE_S = [1.0]  # set from --settle-s


@dataclass(frozen=True)
class Workload:
    """A guest run in its own process: ``units`` `out`s or requests; run() returns the VMM's
    JSON with ``duration_s`` and ``cpu_s`` (the vCPU loop's, or the lab VMM process's)."""

    units: int
    argv: tuple[str, ...]

    def run(self) -> dict:
        out = subprocess.run(self.argv, capture_output=True, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])

    def events(self, res: dict) -> int:
        """The kvm_pio + kvm_userspace_exit events a tracer of every process sees at least:
        two per user-space PIO exit, one per in-kernel kick."""
        # The lab names exit reasons; tests/kvm_guest.py gives KVM_EXIT_* numbers (IO = 2).
        reasons = res.get("exit_reasons") or res["userspace_exits"]
        io = reasons.get("KVM_EXIT_IO", reasons.get("2", 0))
        return 2 * io + res.get("guest_kicks", res.get("kicks", 0))


def workloads(pio_exits: int, kicks: int, requests: int) -> dict[str, Workload]:
    guest = (PY, str(GUEST), "--exits")
    lab = (*VTRACE, "lab", "run", "--json", "--requests", str(requests), "--device")
    return {
        "pio": Workload(pio_exits, (*guest, str(pio_exits))),
        "kick": Workload(kicks, (*guest, str(kicks), "--ioeventfd")),
        "lab-emulated": Workload(requests, (*lab, "emulated")),
        "lab-virtio": Workload(requests, (*lab, "virtio", "--batch", "1")),
    }


def traced_run(w: Workload) -> dict:
    """The workload, once the tracer has settled: compiling and attaching load the machine
    for a moment after the tracer says it is ready, which is not the per-event cost."""
    time.sleep(SETTLE_S[0])
    return w.run()


def wait_for(pred, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc.poll() is not None:
            raise RuntimeError(f"tracer exited early: {proc.args}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tracer not ready: {proc.args}")
        time.sleep(0.05)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def under_vtrace_record(w: Workload, tmp: Path, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    out = tmp / f"rec-{time.monotonic_ns()}"
    proc = subprocess.Popen([*VTRACE, "record", "-o", str(out), *extra], stdout=subprocess.DEVNULL)
    wait_for(lambda: (out / "meta.json").exists(), proc)
    ready_cpu_s = _cpu_s(proc.pid)  # compiling and attaching is not part of the per-event cost
    res = traced_run(w)
    # The recorder's CPU for these events: until its parts hold them all (it rewrites
    # meta.json after each part), not counting detaching and exiting.
    want = w.events(res)
    wait_for(lambda: json.loads((out / "meta.json").read_text())["events"] >= want, proc)
    consumer_cpu_s = _cpu_s(proc.pid) - ready_cpu_s
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out)
    return res, {
        "events": meta["events"],
        "lost": meta["lost"],
        "bpf_ns_per_event": round(meta.get("bpf_ns_per_event", float("nan")), 1),
        # What the recorder process did after attaching until the events were in Parquet
        # parts: draining, decoding, writing, the live line.
        "consumer_cpu_s": round(consumer_cpu_s, 3),
        "consumer_ns_per_event": round(1e9 * consumer_cpu_s / max(meta["events"], 1), 1),
    }


def under_perf(w: Workload, tmp: Path) -> tuple[dict, dict]:
    data, ctl, ack = tmp / "perf.data", tmp / "perf.ctl", tmp / "perf.ack"
    for fifo in (ctl, ack):
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
    # Start with events disabled (-D -1), enable through the control fifo and wait for the
    # acknowledgement: only then is every CPU's kvm tracepoint being recorded.
    proc = subprocess.Popen(
        ["perf", "record", "-q", "-D", "-1", f"--control=fifo:{ctl},{ack}", "-a", "-o", str(data),
         "-e", "kvm:kvm_pio", "-e", "kvm:kvm_userspace_exit"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with open(ctl, "w") as c, open(ack) as a:
        c.write("enable\n")
        c.flush()
        a.readline()
        res = traced_run(w)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    size = data.stat().st_size if data.exists() else 0
    if not os.environ.get("BENCH_KEEP_PERF"):
        data.unlink(missing_ok=True)
    return res, {"perf_data_bytes": size}


def under_vtrace_stat(w: Workload, tmp: Path, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    proc = subprocess.Popen(
        [*VTRACE, "stat", "--csv", "--interval", "60", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stderr.readline()  # "attached ..."
    res = traced_run(w)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return res, {}


def under_bcc_callback(w: Workload, tmp: Path) -> tuple[dict, dict]:
    """The same program, consumed the way bcc's examples do: one Python call per event."""
    sys.path.insert(0, str(ROOT))
    from vtrace.collect import bccload, program

    bcc = bccload.load_bcc()
    plan = program.plan_probes(["kvm_pio", "kvm_userspace_exit"])
    values = program.defines(plan, program.buffer_pages(None), False)
    b = bcc.BPF(src_file=str(program.SOURCE).encode(), cflags=program.cflags(values))
    program.attach(b, plan)
    seen = [0]

    def on_event(ctx, data, size):
        seen[0] += 1

    b[b"events"].open_ring_buffer(on_event)
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            b.ring_buffer_poll(timeout=50)

    t = threading.Thread(target=poll)
    t.start()
    res = traced_run(w)
    deadline = time.monotonic() + 30
    while seen[0] < w.events(res) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join()
    b.ring_buffer_consume()
    lost = sum(int(v) for v in b[b"lost"][ct.c_int(0)])
    b.cleanup()
    return res, {"events": seen[0], "lost": lost}


def under_placebo(w: Workload, tmp: Path) -> tuple[dict, dict]:
    """A control: a process that compiles and loads vtrace stat's program like `vtrace stat`
    does but attaches nothing. What it shows is the benchmark's own bias and noise."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from vtrace.collect import bccload, program; from vtrace.collect.stat import Stat, SOURCE;"
        "bcc = bccload.load_bcc(); values = Stat().defines();"
        "b = bcc.BPF(src_file=str(SOURCE).encode(), cflags=program.cflags(values));"
        "print('ready', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([PY, "-c", code, str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    res = traced_run(w)
    proc.terminate()
    proc.wait(timeout=60)
    return res, {}


class SegmentGuest:
    """One loop guest VM that runs segments of `out`s on request (tests/kvm_guest.py
    --segments): the untraced and traced segments of a pair run back to back in the same VM,
    milliseconds apart, so the host's drift between them is small. Kicks (ioeventfd) or,
    with ``ioeventfd=False``, user-space PIO exits."""

    def __init__(self, ioeventfd: bool = True) -> None:
        self.ioeventfd = ioeventfd
        self.proc = subprocess.Popen(
            [PY, str(GUEST), "--exits", "0", "--segments"] + (["--ioeventfd"] * ioeventfd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        json.loads(self.proc.stdout.readline())

    def run(self, outs: int) -> float:
        """CPU ns of the vCPU thread per `out` over one segment."""
        self.proc.stdin.write(f"{outs}\n")
        self.proc.stdin.flush()
        res = json.loads(self.proc.stdout.readline())
        assert (res["kicks"] if self.ioeventfd else res["userspace_exits"]["2"]) == outs, res
        return 1e9 * res["cpu_s"] / outs

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def toggled(
    tracer: str, pairs: int, outs: int, tmp: Path, ioeventfd: bool = True
) -> list[tuple[float, float]]:
    """(off, on) CPU ns per `out` for ``pairs`` pairs of segments, the tracer loaded once in
    this process and its probes attached for one segment of each pair and detached for the
    other (the order alternates, so a drift within a pair cancels over pairs). ``floor`` is
    an empty program on the raw tracepoints of the loop's events (kvm_pio, and
    kvm_userspace_exit for PIO exits): the part no tracer of those events can avoid."""
    sys.path.insert(0, str(ROOT))
    if tracer == "floor":
        # The least any raw-tracepoint tracer can cost: an empty program on each event.
        from vtrace.collect import bccload

        tps = [b"kvm_pio"] + ([] if ioeventfd else [b"kvm_userspace_exit"])

        empty = bccload.load_bcc().BPF(
            text=b"int f(struct bpf_raw_tracepoint_args *ctx) { return 0; }"
        )
        empty.load_func(b"f", empty.RAW_TRACEPOINT)

        def on() -> None:
            for tp in tps:
                empty.attach_raw_tracepoint(tp=tp, fn_name=b"f")

        def off() -> None:
            for tp in tps:
                if tp in empty.raw_tracepoint_fds:
                    empty.detach_raw_tracepoint(tp=tp)

        close = empty.cleanup
    elif tracer == "stat":
        from vtrace.collect.stat import Stat

        t = Stat().start()
        on, off, close = t.reattach, t.detach, t.stop
    else:
        from vtrace.collect import Recording

        t = Recording(tmp / f"toggle-{time.monotonic_ns()}").start()
        on, off, close = t.reattach_probes, t.detach_probes, t.stop
    guest = SegmentGuest(ioeventfd)
    out: list[tuple[float, float]] = []
    try:
        off()
        guest.run(outs)  # warm-up: page faults, caches
        for i in range(pairs):
            if i % 2 == 0:
                a = guest.run(outs)
                on()
                b = guest.run(outs)
                off()
            else:
                on()
                b = guest.run(outs)
                off()
                a = guest.run(outs)
            out.append((a, b))
    finally:
        guest.close()
        close()
    return out


def untraced(w: Workload, tmp: Path) -> tuple[dict, dict]:
    return w.run(), {}


CLASSIC = ("--classic-tracepoints",)
CONDITIONS = {
    "untraced": untraced,
    "vtrace record": under_vtrace_record,
    "record classic": lambda w, tmp: under_vtrace_record(w, tmp, CLASSIC),
    "perf record": under_perf,
    "vtrace stat": under_vtrace_stat,
    "stat classic": lambda w, tmp: under_vtrace_stat(w, tmp, CLASSIC),
    "bcc callback": under_bcc_callback,
    "placebo": under_placebo,
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pio-exits", type=int, default=50_000)
    ap.add_argument("--kicks", type=int, default=500_000)
    ap.add_argument("--skip-perf", action="store_true")
    ap.add_argument(
        "--requests",
        type=int,
        default=20_000,
        help="requests per lab-emulated / lab-virtio run (default 20000)",
    )
    ap.add_argument(
        "--workloads",
        default="pio,kick,lab-emulated,lab-virtio",
        help="comma separated: pio, kick, lab-emulated, lab-virtio (default all)",
    )
    ap.add_argument(
        "--conditions",
        default=None,
        help=f"comma separated subset of: {', '.join(c for c in CONDITIONS if c != 'untraced')}",
    )
    ap.add_argument(
        "--bpf-stats",
        action="store_true",
        help="set kernel.bpf_stats_enabled=1 to report BPF ns per event; the kernel's own "
        "timing then adds to every BPF run, so overheads are measured without it by default",
    )
    ap.add_argument(
        "--settle-s",
        type=float,
        default=1.0,
        help="seconds between a tracer being ready and the guest starting (default 1)",
    )
    ap.add_argument(
        "--toggle-pairs",
        type=int,
        default=0,
        help="also measure `vtrace stat` and `vtrace record` on the kick and pio loops (those "
        "in --workloads) by attaching and detaching their probes between back-to-back "
        "segments of one guest, this many pairs (segments of --kicks / 10 kicks, "
        "--pio-exits / 10 exits); --rounds 0 runs only this",
    )
    args = ap.parse_args()
    SETTLE_S[0] = args.settle_s
    if os.geteuid() != 0:
        sys.exit("needs root (BPF, perf -a)")
    all_workloads = workloads(args.pio_exits, args.kicks, args.requests)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not names or any(w not in all_workloads for w in names):
        sys.exit(f"--workloads: choose from {', '.join(all_workloads)}")
    chosen = {w: all_workloads[w] for w in names}
    conds = [c for c in CONDITIONS if c != "untraced"]
    if args.conditions:
        wanted = [c.strip() for c in args.conditions.split(",") if c.strip()]
        if any(c not in conds for c in wanted):
            sys.exit(f"--conditions: choose from {', '.join(conds)}")
        conds = [c for c in conds if c in wanted]
    if (args.skip_perf or shutil.which("perf") is None) and "perf record" in conds:
        conds.remove("perf record")
    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_path.read_text().strip()
    if args.bpf_stats:
        stats_path.write_text("1")  # BPF run time per event, measured by the kernel
    # A kill must still restore the sysctl (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Each traced run is paired with an untraced run just before it: the host is shared, and
    # a ratio within a pair cancels most of the drift between rounds.
    ratios: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    extra: dict[tuple[str, str], list[dict]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    cpu_ratios: dict[tuple[str, str], list[float]] = {}
    # The host is shared: say how busy it was, with every figure.
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        if args.toggle_pairs > 0:
            for wl in chosen:
                if wl in ("kick", "pio"):
                    n = args.kicks if wl == "kick" else args.pio_exits
                    report_toggled(args.toggle_pairs, max(n // 10, 1000), wl == "kick")
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            for r in range(args.rounds):
                for wl, w in chosen.items():
                    for c in conds:
                        if c == "bcc callback" and wl != "kick":
                            continue
                        plain = w.run()
                        base = w.units / plain["duration_s"]
                        res, info = CONDITIONS[c](w, tmp)
                        rate = w.units / res["duration_s"]
                        rates.setdefault((wl, "untraced"), []).append(base)
                        rates.setdefault((wl, c), []).append(rate)
                        ratios.setdefault((wl, c), []).append(rate / base)
                        # CPU time of the VMM per `out` or request: the tracer's work done
                        # in the guest's context (BPF program, perf's buffer writes), and
                        # much less sensitive than wall time to other load on a shared host.
                        cpu_ns = 1e9 * res["cpu_s"] / w.units
                        plain_ns = 1e9 * plain["cpu_s"] / w.units
                        cpu.setdefault((wl, "untraced"), []).append(plain_ns)
                        cpu.setdefault((wl, c), []).append(cpu_ns)
                        cpu_ratios.setdefault((wl, c), []).append(cpu_ns / plain_ns)
                        extra.setdefault((wl, c), []).append(info)
                        print(
                            f"round {r + 1} {wl:12s} {c:14s} {rate:10,.0f}/s untraced "
                            f"{base:10,.0f}/s ratio {rate / base:5.3f} cpu/unit {cpu_ns:6.0f} ns "
                            f"vs {plain_ns:6.0f} {json.dumps(info)}",
                            flush=True,
                        )
    finally:
        stats_path.write_text(stats_before)
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if args.rounds == 0:
        return
    print(f"\nmedians over {args.rounds} rounds, each traced run paired with an untraced one")
    print(
        "rate: guest `out`s per second (pio, kick) or requests per second (lab-*), wall; "
        "cpu: VMM CPU ns per `out` (vCPU loop) or per request (VMM process)"
    )
    print(
        f"{'workload':12s} {'condition':14s} {'rate/s':>10s} {'ratio':>6s} {'overhead':>8s} "
        f"{'cpu ns':>7s} {'cpu +%':>7s}  details"
    )
    med = statistics.median
    for wl in chosen:
        print(
            f"{wl:12s} {'untraced':14s} {med(rates[(wl, 'untraced')]):10,.0f} {'':6s} {'':8s} {med(cpu[(wl, 'untraced')]):7.0f}"
        )
        for c in conds:
            if (wl, c) not in ratios:
                continue
            ratio = med(ratios[(wl, c)])
            infos = extra[(wl, c)]
            detail = ""
            if infos and "lost" in infos[0]:
                detail = f"events/run {med(i['events'] for i in infos):,.0f} lost {[i['lost'] for i in infos]}"
            if infos and "bpf_ns_per_event" in infos[0]:
                detail += (
                    f" bpf {med(i['bpf_ns_per_event'] for i in infos):.0f} ns/event,"
                    f" recorder {med(i['consumer_cpu_s'] for i in infos):.2f} cpu-s/run"
                )
            if infos and "perf_data_bytes" in infos[0]:
                detail = f"perf.data {med(i['perf_data_bytes'] for i in infos) / 1e6:.1f} MB/run"
            print(
                f"{wl:12s} {c:14s} {med(rates[(wl, c)]):10,.0f} {ratio:6.3f} {1 - ratio:8.1%} "
                f"{med(cpu[(wl, c)]):7.0f} {med(cpu_ratios[(wl, c)]) - 1:7.1%}"
                f"  {detail}"
            )


def report_toggled(pairs: int, outs: int, ioeventfd: bool) -> None:
    med = statistics.median
    what = "kick" if ioeventfd else "user-space PIO exit"
    print(
        f"\n{'kick' if ioeventfd else 'pio'} loop, probes attached/detached between "
        f"back-to-back segments of one guest ({pairs} pairs of {outs:,} `out`s): CPU ns per "
        f"{what} of the vCPU thread"
    )
    print(
        f"{'tracer':8s} {'off':>7s} {'on':>7s} {'+ns':>6s} {'overhead':>8s} {'IQR of pair ratios':>20s}"
    )
    with tempfile.TemporaryDirectory() as d:
        for tracer in ("floor", "stat", "record"):
            res = toggled(tracer, pairs, outs, Path(d), ioeventfd)
            ratios = sorted(b / a for a, b in res)
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            off, on = med(a for a, _ in res), med(b for _, b in res)
            print(
                f"{tracer:8s} {off:7.0f} {on:7.0f} {on - off:6.0f} {med(ratios) - 1:8.1%} "
                f"{q1 - 1:9.1%} to {q3 - 1:6.1%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
