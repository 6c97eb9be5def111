"""The collector's BPF program: which probes this host has, the ``-D`` defines, attaching.

The C source (probes.c) never sees user text: every option arrives as an integer define
validated here, and every field offset comes from the running kernel's format files.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtrace import schema as s
from vtrace.collect import btf, doctor
from vtrace.collect.decode import C_NAMES, EVENT_IDS
from vtrace.collect.formats import TRACEPOINT_SLOTS, Field, parse_format, read_format, slot_defines
from vtrace.collect.raw_tracepoints import raw_problem
from vtrace.errors import VtraceError

SOURCE = Path(__file__).with_name("probes.c")
DEFAULT_BUFFER_MB = 32
MAX_BUFFER_MB = 1024
MAX_PIDS = 1024  # size of the pids map in probes.c
KPROBES = {
    s.IOEVENTFD_WRITE: "ioeventfd_write",
    s.IRQFD_WAKEUP: "irqfd_wakeup",
    "handle_tx_kick": "handle_tx_kick",
    "handle_rx_kick": "handle_rx_kick",
}
USDT_PROBES = (
    s.VIRTIO_QUEUE_NOTIFY,
    s.VIRTQUEUE_POP,
    s.VIRTQUEUE_FLUSH,
    s.VIRTIO_NOTIFY,
    s.VIRTIO_NOTIFY_IRQFD,
)
ALL_EVENTS = tuple(EVENT_IDS)


def parse_events(text: str | None) -> list[str] | None:
    """``--events`` text (comma separated names) -> names, or None for all."""
    if text is None or not text.strip():
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EVENT_IDS]
    if unknown:
        raise VtraceError(
            f"--events: unknown event {', '.join(unknown)}; known: {', '.join(ALL_EVENTS)}"
        )
    return names


def buffer_pages(buffer_mb: int | None) -> int:
    """Ring buffer size in pages: a power of two (the kernel requires it), rounded up."""
    mb = DEFAULT_BUFFER_MB if buffer_mb is None else buffer_mb
    if not isinstance(mb, int) or isinstance(mb, bool) or not 1 <= mb <= MAX_BUFFER_MB:
        raise VtraceError(f"--buffer-mb must be an integer from 1 to {MAX_BUFFER_MB}, got {mb!r}")
    pages = (mb << 20) // mmap.PAGESIZE
    return 1 << (pages - 1).bit_length()


def validate_pids(pids: list[int] | None) -> list[int]:
    out: list[int] = []
    for p in pids or []:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 1 << 22:
            raise VtraceError(f"--pid: not a process id: {p!r}")
        out.append(p)
    if len(out) > MAX_PIDS:
        raise VtraceError(f"--pid: at most {MAX_PIDS} processes")
    return sorted(set(out))


@dataclass
class ProbePlan:
    """What will be attached and what cannot be, with why."""

    tracepoints: dict[str, dict[str, Field]] = field(default_factory=dict)
    raw: set[str] = field(default_factory=set)  # tracepoints read raw (raw_tracepoints.py)
    classic_why: dict[str, str] = field(default_factory=dict)  # the others: why not raw
    kprobes: dict[str, str] = field(default_factory=dict)  # event -> kernel function
    usdt: dict[str, str] = field(default_factory=dict)  # event -> binary
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def events(self) -> list[str]:
        return [*self.tracepoints, *self.kprobes, *self.usdt]


def plan_probes(
    events: list[str] | None,
    tracefs: Path = doctor.TRACEFS,
    kallsyms: Path = Path("/proc/kallsyms"),
    qemu_binaries: list[Path] | None = None,
    raw: bool = True,
    btf_dir: Path = btf.BTF_DIR,
) -> ProbePlan:
    """Decide per wanted event whether this host can record it (and if not, why), and for
    each tracepoint whether it is read raw (``raw=False``: all classic)."""
    wanted = set(events or ALL_EVENTS)
    plan = ProbePlan()
    for ev in TRACEPOINT_SLOTS:
        if ev not in wanted:
            continue
        fields = read_format(tracefs / "events", "kvm", ev)
        if fields is None:
            plan.unavailable[ev] = f"no kvm:{ev} in {tracefs}/events (kernel without it?)"
        else:
            plan.tracepoints[ev] = fields
            why = raw_problem(ev, fields, btf_dir) if raw else "classic tracepoints asked for"
            if why is None:
                plan.raw.add(ev)
            else:
                plan.classic_why[ev] = why
    kprobe_events = [e for e in KPROBES if e in wanted]
    if kprobe_events:
        why = doctor.kprobes_problem(tracefs)
        symbols = set() if why else _kernel_symbols(kallsyms, set(KPROBES.values()))
        for ev in kprobe_events:
            fn = KPROBES[ev]
            if why:
                plan.unavailable[ev] = why
            elif fn not in symbols:
                module = "vhost_net" if "kick" in fn else "kvm"
                plan.unavailable[ev] = (
                    f"kernel function {fn} not found in {kallsyms} (is {module} loaded?)"
                )
            else:
                plan.kprobes[ev] = fn
    usdt_events = [e for e in USDT_PROBES if e in wanted]
    if usdt_events:
        binaries = doctor.find_qemu_binaries() if qemu_binaries is None else qemu_binaries
        with_notes = {b: doctor.usdt_probes(b) for b in binaries}
        for ev in usdt_events:
            have = [b for b, probes in with_notes.items() if ev in probes]
            if have:
                plan.usdt[ev] = str(have[0])
            elif not binaries:
                plan.unavailable[ev] = "no qemu-system-* binary on PATH"
            elif not any(with_notes.values()):
                names = ", ".join(str(b) for b in binaries)
                plan.unavailable[ev] = (
                    f"no USDT notes in {names} (QEMU built without the dtrace trace backend)"
                )
            else:
                plan.unavailable[ev] = f"no USDT probe {ev} in the QEMU binaries with USDT notes"
    return plan


def _kernel_symbols(kallsyms: Path, names: set[str]) -> set[str]:
    found: set[str] = set()
    try:
        with kallsyms.open() as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in names:
                    found.add(parts[2])
    except OSError:
        pass
    return found


def defines(plan: ProbePlan, pages: int, filter_pids: bool) -> dict[str, int]:
    """Every ``-D`` define of probes.c, all integers."""
    mask = raw_mask = 0
    for ev in plan.events:
        mask |= 1 << EVENT_IDS[ev]
    for ev in plan.raw:
        raw_mask |= 1 << EVENT_IDS[ev]
    out: dict[str, int] = {
        "RINGBUF_PAGES": pages,
        "FILTER_PIDS": int(filter_pids),
        "EVENT_MASK": mask,  # classic handlers, also the fallback of a raw one
        "RAW_MASK": raw_mask,
    }
    out.update({f"EV_{C_NAMES[ev]}": i for ev, i in EVENT_IDS.items()})
    for ev, fields in plan.tracepoints.items():
        out.update(slot_defines(ev, fields))
    return out


SHARED_HEADER = "tracepoint_fields.h"


def cflags(values: dict[str, int]) -> list[str]:
    for k, v in values.items():
        if not (isinstance(v, int) and k.replace("_", "").isalnum()):
            raise VtraceError(f"bad BPF define {k}={v!r}")
    # bcc compiles the source from memory: the shared header is found through -I.
    return [f"-I{SOURCE.parent}", *(f"-D{k}={v}" for k, v in values.items())]


def program_text(values: dict[str, int]) -> str:
    """The C as the compiler sees it: the defines, then probes.c (``--print-c``)."""
    head = "".join(f"#define {k} {v}\n" for k, v in values.items())
    header = SOURCE.with_name(SHARED_HEADER)
    body = SOURCE.read_text().replace(f'#include "{SHARED_HEADER}"', header.read_text())
    return f"// cflags: {' '.join(cflags(values))}\n{head}\n{body}"


def attach(bpf: Any, plan: ProbePlan) -> dict[str, str]:
    """Attach every planned probe; returns event -> what it attached to. Failures go to
    ``plan.unavailable`` with the kernel's reason instead of aborting the recording."""
    attached: dict[str, str] = {}
    for ev in sorted(plan.raw):
        try:
            bpf.attach_raw_tracepoint(tp=ev.encode(), fn_name=f"raw_on_{C_NAMES[ev]}".encode())
            attached[ev] = f"raw_tracepoint:{ev}"
        except Exception as e:  # the classic handler below records it instead
            plan.raw.discard(ev)
            plan.classic_why[ev] = f"raw attach failed: {e}"
    for ev in list(plan.tracepoints):
        if ev in attached:
            continue
        try:
            bpf.attach_tracepoint(tp=f"kvm:{ev}".encode(), fn_name=f"on_{C_NAMES[ev]}".encode())
            attached[ev] = f"tracepoint:kvm:{ev}"
        except Exception as e:  # bcc raises plain Exception with the kernel's errno text
            plan.unavailable[ev] = f"attach failed: {e}"
            del plan.tracepoints[ev]
    for ev, fn in list(plan.kprobes.items()):
        try:
            bpf.attach_kprobe(event=fn.encode(), fn_name=f"on_{C_NAMES[ev]}".encode())
            attached[ev] = f"kprobe:{fn}"
        except Exception as e:
            plan.unavailable[ev] = f"attach failed: {e}"
            del plan.kprobes[ev]
    return attached


def detach(bpf: Any, attached: dict[str, str]) -> None:
    """Detach what ``attach`` attached (USDT probes go with the program's cleanup)."""
    for where in attached.values():
        kind, _, name = where.partition(":")
        if kind == "raw_tracepoint":
            bpf.detach_raw_tracepoint(tp=name.encode())
        elif kind == "tracepoint":
            bpf.detach_tracepoint(tp=name.encode())
        elif kind == "kprobe":
            bpf.detach_kprobe(event=name.encode())


def usdt_contexts(plan: ProbePlan, pids: list[int], bcc: Any) -> list[Any]:
    """bcc USDT contexts for QEMU's virtio probes, one per binary and recorded process (bcc
    wants them before compiling); probes that cannot be enabled move to ``unavailable``.

    QEMU's dtrace backend guards each probe with an is-enabled semaphore: the probe fires
    only while its semaphore is raised in that process's memory. bcc raises it only in a
    process given by pid, so without ``--pid`` such probes are reported unavailable with
    that reason rather than attached and silent. The contexts lower the semaphores when
    freed: keep them until the probes are detached.
    """
    contexts: list[Any] = []
    by_binary: dict[str, list[str]] = {}
    for ev, binary in plan.usdt.items():
        by_binary.setdefault(binary, []).append(ev)
    for binary, evs in by_binary.items():
        enabled: set[str] = set()
        why: dict[str, str] = {}
        for pid in pids or [None]:
            # bcc's messages are generic: say which process and file.
            where = f"in {binary}" if pid is None else f"in pid {pid} (running {binary}?)"
            try:
                ctx = bcc.USDT(path=binary) if pid is None else bcc.USDT(path=binary, pid=pid)
                guarded = _semaphore_probes(ctx) if pid is None else set()
            except Exception as e:  # bcc's USDTException
                for ev in evs:
                    why.setdefault(ev, f"USDT enable failed {where}: {_first_line(e)}")
                continue
            here: set[str] = set()
            for ev in evs:
                if ev in guarded:
                    why[ev] = (
                        f"USDT probes in {binary} have is-enabled semaphores, which bcc can "
                        "only set in a given process: pass --pid of the QEMU process"
                    )
                    continue
                try:
                    ctx.enable_probe(probe=ev, fn_name=f"on_{C_NAMES[ev]}")
                    here.add(ev)
                except Exception as e:
                    why.setdefault(ev, f"USDT enable failed {where}: {_first_line(e)}")
            if here:
                contexts.append(ctx)
                enabled |= here
        for ev in evs:
            if ev not in enabled:
                plan.unavailable[ev] = why.get(ev, "USDT enable failed")
                del plan.usdt[ev]
    return contexts


def _semaphore_probes(ctx: Any) -> set[str]:
    """Names of a bcc USDT context's probes that have an is-enabled semaphore."""
    return {p.name.decode() for p in ctx.enumerate_probes() if p.semaphore}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(":")


def print_c(
    events: list[str] | None,
    pids: list[int] | None,
    buffer_mb: int | None,
    classic: bool = False,
) -> str:
    """The program with its defines as ``vtrace record`` would load it; needs no root.

    Field offsets come from the host's format files when readable, else from the copies
    shipped in vtrace/formats/kvm (said in the first line).
    """
    readable = os.access(doctor.TRACEFS / "events" / "kvm", os.R_OK)
    plan = plan_probes(events, raw=not classic) if readable else ProbePlan()
    origin = f"{doctor.TRACEFS}/events/kvm"
    if not readable:
        origin = str(s.FORMATS_DIR)
        for ev in TRACEPOINT_SLOTS:
            if events and ev not in events:
                continue
            path = s.FORMATS_DIR / f"{ev}.format"
            plan.tracepoints[ev] = parse_format(path.read_text(), str(path))
            if not classic and raw_problem(ev, plan.tracepoints[ev]) is None:
                plan.raw.add(ev)
    values = defines(plan, buffer_pages(buffer_mb), bool(validate_pids(pids)))
    return f"// field offsets from {origin}\n" + program_text(values)
