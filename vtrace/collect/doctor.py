"""Can this host record? One check per requirement, each with a one-line verdict and the fix.

Every check takes the paths it looks at as parameters, so tests can take a feature away
(an empty folder for tracefs, a Python path without Debian's dist-packages for bcc).
"""

from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from vtrace import schema as s
from vtrace.collect import bccload, btf
from vtrace.collect.formats import read_format
from vtrace.collect.host import cpuinfo, virtualisation_isa
from vtrace.collect.raw_tracepoints import PROTOTYPES, raw_problem

TRACEFS = bccload.TRACEFS
MODULES = Path("/lib/modules")
USR_SRC = Path("/usr/src")
OK, WARN, FAIL = "ok", "warn", "fail"
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


@dataclass
class Check:
    """One verdict. ``required`` checks must pass before ``vtrace record`` can run."""

    name: str
    status: str  # ok / warn / fail
    verdict: str
    fix: str | None = None
    required: bool = False
    fixed: str | None = None  # what --fix did

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _effective_caps(status: Path = Path("/proc/self/status")) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def check_privileges(euid: int | None = None, caps: int | None = None) -> Check:
    euid = os.geteuid() if euid is None else euid
    caps = _effective_caps() if caps is None else caps
    if euid == 0:
        return Check("privileges", OK, "running as root", required=True)
    has_bpf = caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1
    if has_bpf or caps >> CAP_SYS_ADMIN & 1:
        return Check("privileges", OK, "CAP_BPF and CAP_PERFMON held", required=True)
    return Check(
        "privileges",
        FAIL,
        "not root and no CAP_BPF+CAP_PERFMON: BPF programs cannot be loaded",
        "run as root: sudo vtrace ...",
        required=True,
    )


def check_tracefs(tracefs: Path = TRACEFS) -> Check:
    why = bccload.tracefs_problem(tracefs)
    if why is None:
        return Check("tracefs", OK, f"mounted at {tracefs}", required=True)
    if not _readable(tracefs):
        return Check("tracefs", FAIL, why, "run as root: sudo vtrace ...", required=True)
    return Check("tracefs", FAIL, why, f"mount -t tracefs nodev {tracefs}", required=True)


def _readable(tracefs: Path) -> bool:
    """False when tracefs exists but this user may not look inside (not root)."""
    return not os.path.isdir(tracefs) or os.access(tracefs, os.R_OK | os.X_OK)


def check_bcc(dist_packages: str = bccload.DEBIAN_DIST_PACKAGES) -> Check:
    got = bccload._import_bcc(dist_packages)
    if isinstance(got, str):
        return Check("bcc", FAIL, got, bccload.INSTALL_FIX, required=True)
    version = getattr(got, "__version__", "?")
    return Check("bcc", OK, f"bcc {version} from {Path(got.__file__).parent}", required=True)


def headers_packages(usr_src: Path = USR_SRC) -> tuple[Path, Path] | None:
    """Debian's newest linux-headers-<ver>-amd64 and its -common folder, if installed."""
    for arch in sorted(usr_src.glob("linux-headers-*-amd64"), reverse=True):
        common = arch.with_name(arch.name.removesuffix("-amd64") + "-common")
        if common.is_dir():
            return arch, common
    return None


def check_headers(
    modules: Path = MODULES, release: str | None = None, usr_src: Path = USR_SRC
) -> Check:
    release = release or platform.release()
    build = modules / release / "build"
    why = bccload.headers_problem(modules, release)
    if why is None:
        target = os.path.realpath(build)
        linked = release not in target
        note = (
            f" (linked to {target}: another kernel's headers, safe for tracepoint programs only)"
            if linked
            else ""
        )
        return Check(
            "headers", WARN if linked else OK, f"kernel headers in {build}{note}", required=True
        )
    pkgs = headers_packages(usr_src)
    if pkgs:
        fix = f"vtrace doctor --fix (links {pkgs[0].name} into {build} and source)"
    else:
        fix = f"apt-get install linux-headers-{release} (or linux-headers-amd64, then vtrace doctor --fix)"
    return Check("headers", FAIL, why, fix, required=True)


def check_tracepoints(tracefs: Path = TRACEFS) -> Check:
    events = tracefs / "events" / "kvm"
    if not _readable(tracefs):
        return Check(
            "kvm tracepoints",
            FAIL,
            f"cannot tell: {tracefs} is not readable by this user",
            "run as root: sudo vtrace ...",
            required=True,
        )
    have = [e for e in s.KVM_TRACEPOINTS if os.access(events / e / "format", os.R_OK)]
    missing = [e for e in s.KVM_TRACEPOINTS if e not in have]
    if not have:
        return Check(
            "kvm tracepoints",
            FAIL,
            f"no kvm tracepoints in {events}",
            "modprobe kvm (and kvm_intel or kvm_amd), and mount tracefs",
            required=True,
        )
    if missing:
        return Check(
            "kvm tracepoints",
            WARN,
            f"{len(have)} present; missing {', '.join(missing)}",
            required=True,
        )
    return Check("kvm tracepoints", OK, f"all {len(have)} present in {events}", required=True)


def check_raw_tracepoints(tracefs: Path = TRACEFS, btf_dir: Path | None = None) -> Check:
    """Which kvm tracepoints the collector can read raw (cheaper per event) on this kernel."""
    where = btf.BTF_DIR if btf_dir is None else btf_dir
    why: dict[str, str] = {}
    for ev in PROTOTYPES:
        fields = read_format(tracefs / "events", "kvm", ev)
        if fields is None:
            why[ev] = "no format file"
            continue
        problem = raw_problem(ev, fields, where)
        if problem is not None:
            why[ev] = problem
    raw = len(PROTOTYPES) - len(why)
    if not why:
        return Check(
            "raw tracepoints",
            OK,
            f"all {raw} kvm I/O and interrupt tracepoints read raw (prototypes from {where})",
        )
    reasons = "; ".join(f"{ev}: {w}" for ev, w in why.items())
    return Check(
        "raw tracepoints",
        WARN,
        f"{raw} of {len(PROTOTYPES)} read raw; the others are read from formatted records, "
        f"which costs more per event ({reasons})",
        "a kernel with CONFIG_DEBUG_INFO_BTF=y (recording works either way)",
    )


def check_virtualisation(
    cpuinfo_path: Path = Path("/proc/cpuinfo"), dev_kvm: Path = Path("/dev/kvm")
) -> Check:
    isa = virtualisation_isa(cpuinfo(cpuinfo_path))
    kvm = "/dev/kvm present" if dev_kvm.exists() else "no /dev/kvm"
    if isa != "none":
        return Check("virtualisation", OK, f"{isa} ({kvm}): kvm_exit and kvm_entry will fire")
    return Check(
        "virtualisation",
        WARN,
        f"no vmx/svm CPU flag ({kvm}): KVM runs without hardware virtualisation, so kvm_exit "
        "and kvm_entry will not fire; kvm_pio, kvm_mmio, kvm_userspace_exit and IRQ events do",
        "run on a host (or a VM with nested virtualisation) whose CPU has vmx or svm",
    )


def kprobes_problem(tracefs: Path = TRACEFS) -> str | None:
    if os.path.exists(tracefs / "kprobe_events"):
        return None
    if not _readable(tracefs):
        return f"kprobes: cannot tell, {tracefs} is not readable by this user (run as root)"
    return f"kprobes unavailable: no {tracefs}/kprobe_events (kernel built without CONFIG_KPROBES)"


def check_kprobes(tracefs: Path = TRACEFS) -> Check:
    why = kprobes_problem(tracefs)
    if why is None:
        return Check(
            "kprobes",
            OK,
            "kprobes available: ioeventfd_write, irqfd_wakeup, vhost kicks can attach",
        )
    return Check(
        "kprobes",
        WARN,
        why + "; ioeventfd_write, irqfd_wakeup and vhost kick probes will be skipped",
        "a kernel with CONFIG_KPROBES=y (kvm tracepoints still work without it)",
    )


def find_qemu_binaries(path: str | None = None) -> list[Path]:
    """qemu-system-* executables on PATH (resolved, without duplicates)."""
    found: dict[Path, None] = {}
    for d in (path or os.environ.get("PATH", "")).split(os.pathsep):
        p = Path(d)
        if not os.path.isdir(p):  # also False for folders this user may not read
            continue
        for exe in sorted(p.glob("qemu-system-*")):
            if os.access(exe, os.X_OK):
                found[exe.resolve()] = None
    return list(found)


def usdt_probes(binary: Path) -> set[str]:
    """Names of the USDT probes in an ELF file's .note.stapsdt section (empty if none)."""
    try:
        with binary.open("rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                return set()  # only 64-bit little-endian ELF
            (shoff,) = struct.unpack_from("<Q", ident, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ident, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            headers = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
            _, _, _, _, str_off, str_size = headers[shstrndx]
            f.seek(str_off)
            names = f.read(str_size)
            for name_off, _, _, _, off, size in headers:
                if names[name_off : names.index(b"\0", name_off)] == b".note.stapsdt":
                    f.seek(off)
                    return _parse_stapsdt(f.read(size))
    except (OSError, struct.error, ValueError, IndexError):
        pass
    return set()


def _parse_stapsdt(notes: bytes) -> set[str]:
    probes: set[str] = set()
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        pos += 12
        name = notes[pos : pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        desc = notes[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        if name == b"stapsdt" and ntype == 3 and len(desc) > 24:
            _provider, probe, _ = desc[24:].split(b"\0", 2)
            probes.add(probe.decode(errors="replace"))
    return probes


def check_qemu_usdt(binaries: list[Path] | None = None) -> Check:
    binaries = find_qemu_binaries() if binaries is None else binaries
    if not binaries:
        return Check(
            "qemu usdt", WARN, "no qemu-system-* on PATH", "apt-get install qemu-system-x86"
        )
    notes = {b: usdt_probes(b) for b in binaries}
    with_notes = [f"{b.name} ({len(p)} probes)" for b, p in notes.items() if p]
    if with_notes:
        return Check("qemu usdt", OK, "USDT notes in " + ", ".join(with_notes))
    names = ", ".join(str(b) for b in binaries)
    return Check(
        "qemu usdt",
        WARN,
        f"{names}: no USDT notes (built without the dtrace trace backend); QEMU's virtio "
        "probes will be skipped",
        "a QEMU configured with --enable-trace-backends=dtrace (Fedora, RHEL), or import its "
        "`-trace` log with vtrace import",
    )


def fix_tracefs(tracefs: Path = TRACEFS) -> str:
    r = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(tracefs)], capture_output=True, text=True
    )
    if r.returncode:
        return f"mount failed: {r.stderr.strip()}"
    return f"mounted tracefs at {tracefs}"


def fix_headers(
    modules: Path = MODULES, release: str | None = None, usr_src: Path = USR_SRC
) -> str:
    release = release or platform.release()
    pkgs = headers_packages(usr_src)
    if pkgs is None:
        return "no Debian linux-headers-*-amd64 in /usr/src: apt-get install linux-headers-amd64"
    d = modules / release
    d.mkdir(parents=True, exist_ok=True)
    for link, target in ((d / "build", pkgs[0]), (d / "source", pkgs[1])):
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(target)
    return (
        f"linked {pkgs[0]} into {d}/build and source; WARNING: these are another kernel's "
        "headers: only tracepoint programs (like vtrace's) are safe with them"
    )


def run_checks(
    *,
    fix: bool = False,
    tracefs: Path = TRACEFS,
    dist_packages: str = bccload.DEBIAN_DIST_PACKAGES,
    modules: Path = MODULES,
    usr_src: Path = USR_SRC,
    release: str | None = None,
    cpuinfo_path: Path = Path("/proc/cpuinfo"),
    qemu_binaries: list[Path] | None = None,
) -> list[Check]:
    """All checks, in order; with ``fix``, mount tracefs and link headers where needed first."""
    checks = [check_privileges()]
    t = check_tracefs(tracefs)
    if fix and t.status == FAIL:
        did = fix_tracefs(tracefs)
        t = check_tracefs(tracefs)
        t.fixed = did
    checks.append(t)
    checks.append(check_bcc(dist_packages))
    h = check_headers(modules, release, usr_src)
    if fix and h.status == FAIL:
        did = fix_headers(modules, release, usr_src)
        h = check_headers(modules, release, usr_src)
        h.fixed = did
    checks.append(h)
    checks.append(check_tracepoints(tracefs))
    if _readable(tracefs):
        checks.append(check_raw_tracepoints(tracefs))
    checks.append(check_virtualisation(cpuinfo_path))
    checks.append(check_kprobes(tracefs))
    checks.append(check_qemu_usdt(qemu_binaries))
    return checks


def record_problem(checks: list[Check]) -> str | None:
    """The first failed required check as "what: fix", or None when recording can run."""
    for c in checks:
        if c.required and c.status == FAIL:
            return f"{c.name}: {c.verdict}" + (f"; fix: {c.fix}" if c.fix else "")
    return None


def check_qmp(socket_path: str, *, fix: bool = False) -> Check:
    """Trace events a recording left on in the VM at ``socket_path`` (after a ``kill -9``).

    The recording's state file says what it changed and what each event was before; without
    one, every virtio/device event vtrace switches that is on counts as left on. ``fix``
    puts them back (off, or as the state file says) and QEMU's log where it was."""
    from vtrace.collect import qemu_attach
    from vtrace.qmp import Qmp, trace_states

    name = f"qmp {socket_path}"
    with Qmp(socket_path) as qmp:
        pid = qmp.peer_pid()
        path = qemu_attach.state_file(pid)
        state: dict[str, object] | None = None
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                state = None  # unreadable: fall back to the events' current states
        states = trace_states(qmp)
        if state is not None and isinstance(state.get("previous"), dict):
            previous = {str(k): bool(v) for k, v in state["previous"].items()}  # type: ignore[union-attr]
        else:
            previous = {e: False for e in qemu_attach.ATTACH_EVENTS if e in states}
        left_on = sorted(e for e, was in previous.items() if states.get(e) and not was)
        if not left_on and state is None:
            return Check(name, OK, f"QEMU pid {pid}: no vtrace trace events on")
        verdict = (
            f"QEMU pid {pid}: {len(left_on)} trace events left on ({', '.join(left_on)})"
            if left_on
            else f"QEMU pid {pid}: events as they were, but {path} is left from a recording"
        )
        if not fix:
            return Check(name, WARN, verdict, f"vtrace doctor --qmp {socket_path} --fix")
        logfile = state.get("logfile") if state is not None else None
        turned_off = qemu_attach.restore(
            qmp, {"previous": previous, "logfile": logfile if isinstance(logfile, str) else None}
        )
        path.unlink(missing_ok=True)
        check = Check(name, OK, f"QEMU pid {pid}: no vtrace trace events on")
        off = [e for e in turned_off if e in left_on]
        where = logfile if isinstance(logfile, str) else "/dev/null"
        check.fixed = f"turned {len(off)} events off, QEMU's log back to {where}"
        return check
