"""Model configs: TOML files under ``models/``, validated on load, overridable with ``--set``.

A config is a set of tables (``[workload]``, ``[kvm]``, ``[virtqueue]`` ...). Every parameter
carries its unit in its name (``_ns``, ``_bytes``, ``_per_s``); the shipped files say in a
comment what each value is and where it comes from. Anything wrong in a file (unknown key,
wrong type, a number outside its range, a ring size that is not a power of two, text that is
not UTF-8) is one :class:`~vtrace.errors.VtraceError` line naming the file and the key.
Every number has a range (:func:`value_range`): its own bounds, else its unit's.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtrace.errors import VtraceError

MODELS_DIR = Path(__file__).resolve().parent.parent.parent / "models"

KINDS = ("virtio", "emulated", "queue")
ARRIVALS = ("poisson", "deterministic", "closed", "backlog", "trace")
COMPLETIONS = ("interrupt", "poll")
BATCH_POLICIES = ("count", "drain", "timer")
HANDLERS = ("kernel", "user")
DISTRIBUTIONS = ("exponential", "deterministic", "lognormal", "empirical")
# auto: exponential with queue.service_mean_ns, deterministic with queue.service_ns (M/D/1)
QUEUE_DISTRIBUTIONS = ("auto", "exponential", "deterministic", "lognormal")
CV_WHY = "a coefficient of variation (std / mean); measured device service rarely exceeds 10"
BACKEND_THREADS = ("iothread", "vhost_worker", "vmm")
PUBLISH = ("per_request", "per_pass")
SUBMIT = ("each", "batch")
THREADS = ("shared", "per_queue")
BACKEND_MODES = ("notify", "poll")
AVAIL_EVENT = ("idle", "pop")
BACKEND_SUBMIT = ("each", "pass")


@dataclass(frozen=True)
class Param:
    """One parameter: its type, default, allowed values and what it means."""

    kind: type
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    power_of_two: bool = False
    minimum: float | None = None
    maximum: float | None = None
    why: str = ""  # the reason for minimum/maximum (shown in the error)


# Range of a number by the unit its name ends in, for keys that do not give their own bounds,
# and why; a number without a unit must give minimum, maximum and why itself.
UNIT_RANGES: dict[str, tuple[float, float, str]] = {
    "_ns": (0.0, 3.6e12, "a duration: at most an hour, far above any per-request cost"),
    "_bytes": (0, 1 << 30, "a payload: at most 1 GiB, far above any single I/O request"),
    "_per_s": (0.0, 1e9, "a rate: at most one per nanosecond, the model's clock resolution"),
}


# Register accesses (an emulated device's per-request list, or the guest's per-interrupt list):
# each is an exit; `handler` says whether KVM handles it in the kernel or returns to the VMM.
ACCESS_KEYS: dict[str, Param] = {
    "register": Param(str, "", "name of the register (documentation only)"),
    "handler": Param(str, "user", "where the exit is handled: kernel or user (the VMM)", HANDLERS),
    "count": Param(
        int,
        1,
        "how many times the access repeats",
        minimum=0,
        maximum=1024,
        why="a device needs a handful of accesses per request; 1024 is far beyond any",
    ),
    "emulation_ns": Param(float, 0.0, "handler work on top of the bare exit round trip"),
}

# The lognormal law's spread, for a device and for a reference queue alike.
SERVICE_CV = Param(
    float,
    1.0,
    "lognormal: coefficient of variation of the service (std / mean, no unit)",
    minimum=0.0,
    maximum=100.0,
    why=CV_WHY,
)

SCHEMA: dict[str, dict[str, Param]] = {
    "model": {
        "kind": Param(
            str, "virtio", "virtio ring, emulated registers, or a reference queue", KINDS
        ),
        "description": Param(str, "", "what this model stands for"),
    },
    "vm": {
        "vcpus": Param(
            int,
            1,
            "guest vCPUs, each with its own time line; job j and open-loop request i run on "
            "vCPU j (i) mod vcpus",
            minimum=1,
            maximum=1024,
            why="KVM's limit on vCPUs per VM (KVM_MAX_VCPUS is 1024 on x86)",
        ),
        "host_cpus": Param(
            int,
            0,
            "host CPUs the VM's threads run on; 0: one per thread. Fewer than vCPUs plus "
            "back-end threads: the back end's work takes a CPU from a running vCPU",
            minimum=0,
            maximum=4096,
            why="Linux's default CONFIG_NR_CPUS range tops out at 4096 on x86 distributions",
        ),
    },
    "workload": {
        "jobs": Param(
            int,
            1,
            "closed loop: independent submitters (fio numjobs), each keeping queue_depth in flight",
            minimum=1,
            maximum=4096,
            why="far beyond the jobs a benchmark runs per VM",
        ),
        "submit": Param(
            str,
            "each",
            "closed loop: each (the next request when one completes, fio iodepth) or batch "
            "(queue_depth requests together when the last lot completed: dd with a block the "
            "guest splits into requests)",
            SUBMIT,
        ),
        "dispatch_splits": Param(
            float,
            0.0,
            "batch submission: mean number of times (Poisson, at random places) the guest's "
            "block layer ends the dispatch of one submission early: it kicks what it added and "
            "the rest wait for the next completion on the queue (blk-mq's restart)",
            minimum=0.0,
            maximum=64.0,
            why="measured guests split a submission a few times at most",
        ),
        "arrivals": Param(
            str, "poisson", "how requests arrive (backlog: all ready at the start)", ARRIVALS
        ),
        "arrival_rate_per_s": Param(float, 10_000.0, "open loop: mean request rate"),
        "queue_depth": Param(
            int,
            1,
            "closed loop: requests kept in flight (fio iodepth)",
            minimum=1,
            maximum=65536,
            why="far above Linux's per-queue limit (BLK_MQ_MAX_DEPTH 10240)",
        ),
        "think_ns": Param(
            float, 0.0, "closed loop: guest time from a completion to the next request"
        ),
        "requests": Param(
            int,
            20_000,
            "requests to simulate",
            minimum=1,
            maximum=10**12,
            why="at a million simulated requests a second 10^12 is twelve days",
        ),
        "request_bytes": Param(int, 4096, "payload per request"),
        "seed": Param(
            int,
            1,
            "random seed: the same seed gives the same result",
            minimum=0,
            maximum=(1 << 63) - 1,
            why="numpy seeds are not negative; TOML integers are 64-bit",
        ),
        "warmup_requests": Param(
            int,
            0,
            "requests left out of the summary (start-up transient)",
            minimum=0,
            maximum=10**12,
            why="no more than workload.requests can be",
        ),
    },
    "vcpu": {
        "request_prep_ns": Param(float, 0.0, "guest driver work to build one request"),
        "batch_prep_ns": Param(float, 0.0, "guest work per batch: publish avail.idx, test flags"),
        "poll_ns": Param(float, 0.0, "polling guest: one look at used.idx that finds nothing"),
        "reap_ns": Param(
            float, 0.0, "polling guest: fixed work of a look that takes used buffers back"
        ),
        "idle_entry_ns": Param(
            float,
            0.0,
            "guest work from its last request to halting when it has nothing left to do (the "
            "submitting task blocks, the idle loop reaches HLT); the vCPU runs meanwhile",
        ),
        "stall_per_s": Param(float, 0.0, "host preemptions of the vCPU thread per second of work"),
        "stall_ns": Param(float, 0.0, "mean time the vCPU thread loses to one preemption"),
        "slow_share": Param(
            float,
            0.0,
            "share of its time the vCPU thread runs the guest's code slower (stretches of a "
            "slower host CPU); 0: always one speed",
            minimum=0.0,
            maximum=1.0,
            why="a share of time",
        ),
        "slow_factor": Param(
            float,
            1.0,
            "how many times longer the guest's own work (per-request driver work, interrupt "
            "handler) takes in a slow stretch",
            minimum=1.0,
            maximum=100.0,
            why="measured slow stretches are under twice as slow",
        ),
        "slow_stretch_ns": Param(
            float,
            2_000_000.0,
            "mean length of a slow stretch (exponential); fast ones average "
            "slow_stretch_ns x (1 - slow_share) / slow_share",
            minimum=1_000.0,
            maximum=3.6e12,
            why="from a microsecond to an hour",
        ),
    },
    "kvm": {
        "kernel_exit_ns": Param(
            float, 0.0, "exit handled inside KVM (ioeventfd kick) and re-entry"
        ),
        "userspace_exit_ns": Param(
            float, 0.0, "exit that returns to the VMM in user space and back"
        ),
    },
    "virtqueue": {
        "ring_size": Param(
            int,
            256,
            "descriptors in the split ring",
            power_of_two=True,
            minimum=1,
            maximum=32768,
            why="virtio 1.x: Queue Size is at most 32768",
        ),
        "descs_per_request": Param(
            int,
            1,
            "descriptors one request takes",
            minimum=1,
            maximum=32768,
            why="a request must fit in the largest ring (32768)",
        ),
        "event_idx": Param(
            bool, True, "VIRTIO_RING_F_EVENT_IDX: avail_event/used_event suppression"
        ),
        "batch": Param(
            int,
            1,
            "requests added to the avail ring per kick",
            minimum=1,
            maximum=32768,
            why="the largest ring (32768) holds no more at once",
        ),
        "batch_policy": Param(str, "count", "when the guest kicks", BATCH_POLICIES),
        "batch_timer_ns": Param(float, 0.0, "timer policy: kick this long after the first add"),
        "kick_handler": Param(
            str, "kernel", "kernel (ioeventfd) or user (VMM) handles the kick", HANDLERS
        ),
        "kick_emulation_ns": Param(
            float, 0.0, "work on top of the exit to decode the notify write"
        ),
        "whole_batches": Param(bool, False, "the guest waits for room for a whole batch"),
        "queues": Param(
            int,
            1,
            "virtqueues (blk-mq hardware queues, virtio-net queue pairs); vCPU v submits to "
            "queue v mod queues, each with its own ring, suppression state and vector",
            minimum=1,
            maximum=1024,
            why="virtio-pci allows at most 1024 queues per device in Linux and QEMU",
        ),
    },
    "backend": {
        "thread": Param(str, "iothread", "the thread that serves the queue", BACKEND_THREADS),
        "wakeup_ns": Param(float, 0.0, "from the kick's eventfd signal to the back end running"),
        "wakeup_cpu_share": Param(
            float,
            1.0,
            "share of each wake-up (its stall included) the thread spends on a CPU; the rest "
            "it waits to be scheduled and holds none (matters with vm.host_cpus)",
            minimum=0.0,
            maximum=1.0,
            why="a share of the wake-up's time",
        ),
        "stall_probability": Param(
            float,
            0.0,
            "share of wake-ups that find the thread preempted",
            minimum=0.0,
            maximum=1.0,
            why="a probability",
        ),
        "stall_ns": Param(float, 0.0, "mean extra delay of a preempted wake-up (exponential)"),
        "per_request_quantiles_ns": Param(
            list,
            [],
            "a measured law of the per-request work (quantiles at equal steps, least first, "
            "ascending); each request's work is drawn from it in place of per_request_ns; "
            "empty: not used",
        ),
        "completion_wakeup_quantiles_ns": Param(
            list,
            [],
            "a measured law of the wake-ups a device completion causes (QEMU's thread pool "
            "signalling the main loop), quantiles as wakeup_quantiles_ns; empty: a kick's law",
        ),
        "preempt_share": Param(
            float,
            0.0,
            "with preempt_wakeup_quantiles_ns: the share of wake-ups, where the model has a "
            "host CPU free, that find it taken by work outside the model (other threads of the "
            "VMM, the host's own): the thread takes the CPU of the vCPU that kicked, which "
            "waits while it works",
            minimum=0.0,
            maximum=1.0,
            why="a share of wake-ups, from none to all",
        ),
        "preempt_wakeup_quantiles_ns": Param(
            list,
            [],
            "with vm.host_cpus, the wake-up law when no host CPU is free and the thread takes a "
            "running vCPU's (the scheduler's wake-up pre-emption), quantiles as "
            "wakeup_quantiles_ns; empty: the same law as any wake-up",
        ),
        "wakeup_quantiles_ns": Param(
            list,
            [],
            "a measured wake-up law: its quantiles at equal steps from the least (0) to the "
            "most (1), ascending; each wake-up is drawn from it (linear between quantiles) in "
            "place of wakeup_ns and the stall; empty: not used",
        ),
        "avail_event": Param(
            str,
            "idle",
            "with EVENT_IDX, when the back end moves avail_event: idle (only when it turns kicks "
            "back on before it sleeps, as Linux's vhost and QEMU virtio-blk do) or pop (after "
            "every pop as well: a back end that pops with kicks on, so an add that finds it "
            "caught up kicks, mid-pass too)",
            AVAIL_EVENT,
        ),
        "holds_kicks": Param(
            bool,
            False,
            "the thread holds a lock the guest's notify write needs while it works (QEMU's "
            "big lock under TCG): a kick written then waits, with its vCPU, until the thread "
            "is back in its poll",
        ),
        "lock_wake_ns": Param(
            float,
            0.0,
            "with holds_kicks: from the thread letting go of its lock to the vCPU thread that "
            "waited for it running again and writing its kick (the host scheduler waking a "
            "sleeping thread); 0: at once",
        ),
        "idle_ns": Param(
            float,
            0.0,
            "with holds_kicks: from the end of its work to letting go of the lock and "
            "sleeping (QEMU's main loop on its way back to its poll)",
        ),
        "complete_ns": Param(
            float,
            0.0,
            "back-end work per completion the device hands back (QEMU's virtio_blk_rw_complete "
            "to virtqueue_flush), on the thread and under its lock",
        ),
        "submit": Param(
            str,
            "each",
            "with a device (max_outstanding): each (every popped request goes to the device as "
            "it is popped: Linux AIO, vhost) or pass (the requests one pass popped go together "
            "at its end as one merged I/O, as QEMU virtio-blk's multireq does)",
            BACKEND_SUBMIT,
        ),
        "per_request_ns": Param(float, 0.0, "back-end work per request: pop, parse, push used"),
        "per_pass_ns": Param(float, 0.0, "back-end work per pass: publish used.idx, decide irq"),
        "publish": Param(
            str,
            "per_request",
            "when used.idx is published: after each request or per pass",
            PUBLISH,
        ),
        "threads": Param(
            str,
            "shared",
            "shared: one thread serves every queue in turn (QEMU's main loop, one iothread); "
            "per_queue: one thread per queue (iothread-vq-mapping, a vhost worker per queue)",
            THREADS,
        ),
        "mode": Param(
            str,
            "notify",
            "notify: sleeps until kicked; poll: busy-polls the rings (vhost-user PMD): no kicks, "
            "one core spent per thread",
            BACKEND_MODES,
        ),
        "max_per_pass": Param(
            int,
            0,
            "requests of one queue served before the thread looks at its next queue (vhost's "
            "weight); 0: no limit",
            minimum=0,
            maximum=1 << 20,
            why="far beyond vhost-net's VHOST_NET_PKT_WEIGHT of 256",
        ),
        "poll_ns": Param(
            float, 0.0, "poll mode: time from an add to the polling thread noticing it"
        ),
    },
    "device": {
        "service_ns": Param(
            float, 0.0, "device service per request (the mean when exponential or lognormal)"
        ),
        "per_byte_ns": Param(float, 0.0, "device service per payload byte (copies, DMA)"),
        "service_distribution": Param(
            str,
            "deterministic",
            "service time law (empirical: durations drawn from device.service_trace)",
            DISTRIBUTIONS,
        ),
        "service_cv": SERVICE_CV,
        "service_trace": Param(
            str,
            "",
            "empirical: trace directory whose pop-to-completion durations are drawn as given",
        ),
        "max_outstanding": Param(
            int,
            1,
            "emulated: requests the device accepts at once; virtio: requests the device serves "
            "at once (AIO threads, NVMe depth), 1 = the back-end thread serves each itself",
            minimum=1,
            maximum=32768,
            why="no device queue holds more than the largest virtqueue (32768)",
        ),
        "accesses": Param(list, [], "emulated: register accesses per request, each an exit"),
    },
    "interrupt": {
        "completion": Param(
            str,
            "interrupt",
            "how the guest learns of completions (poll: no interrupts)",
            COMPLETIONS,
        ),
        "injection_ns": Param(float, 0.0, "back-end work to inject one interrupt (irqfd write)"),
        "delivery_ns": Param(float, 0.0, "from injection to the guest handler starting"),
        "halted_wake_ns": Param(
            float,
            0.0,
            "added to delivery_ns when the vCPU is halted: its thread is woken from sleep "
            "(the halt-poll window missed, an idle host CPU woken)",
        ),
        "guest_handler_ns": Param(float, 0.0, "guest handler work per interrupt, without exits"),
        "per_completion_ns": Param(
            float,
            0.0,
            "guest handler work for each used buffer it takes back beyond the first, those "
            "that come while it runs included (Linux's virtblk_done loops until the ring is "
            "empty before it asks for the next interrupt)",
        ),
        "coalesce_requests": Param(
            int,
            1,
            "completions gathered per interrupt while busy",
            minimum=1,
            maximum=32768,
            why="no more completions are outstanding than the largest ring (32768) holds",
        ),
        "coalesce_ns": Param(float, 0.0, "hold an interrupt this long to gather completions"),
        "accesses": Param(list, [], "register accesses per interrupt (ack, EOI), each an exit"),
    },
    "queue": {
        "arrival_rate_per_s": Param(float, 1.0, "Poisson arrival rate"),
        "service_mean_ns": Param(
            float, 0.0, "service mean (exponential: M/M/1, M/M/c, M/M/1/K; lognormal: M/G/1)"
        ),
        "service_ns": Param(float, 0.0, "deterministic service (M/D/1)"),
        "service_distribution": Param(
            str,
            "auto",
            "service law (auto: exponential with service_mean_ns, deterministic with service_ns)",
            QUEUE_DISTRIBUTIONS,
        ),
        "service_cv": SERVICE_CV,
        "servers": Param(
            int,
            1,
            "servers working at once (M/M/c: c)",
            minimum=1,
            maximum=4096,
            why="more servers than any host has cores or any device has parallel units",
        ),
        "capacity": Param(
            int,
            0,
            "requests in the system at most, 0 for unbounded (M/M/1/K)",
            minimum=0,
            maximum=1 << 31,
            why="0 is unbounded; a K above 2^31 is unbounded in practice",
        ),
    },
}

# Tables each kind reads; the loader rejects tables a kind does not use, so a typo in a table
# name cannot be silently ignored.
KIND_TABLES: dict[str, tuple[str, ...]] = {
    "virtio": (
        "model",
        "vm",
        "workload",
        "vcpu",
        "kvm",
        "virtqueue",
        "backend",
        "device",
        "interrupt",
    ),
    "emulated": ("model", "vm", "workload", "vcpu", "kvm", "backend", "device", "interrupt"),
    "queue": ("model", "workload", "queue"),
}


def _type_name(t: type) -> str:
    return {float: "number", int: "integer", bool: "boolean", str: "string", list: "list"}[t]


def _check_value(where: str, key: str, p: Param, value: Any) -> Any:
    """The value converted to the parameter's type, or a one-line error naming the key."""
    if p.kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif p.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, p.kind)
    if not ok:
        raise VtraceError(
            f"{where}: {key}: expected {_type_name(p.kind)}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise VtraceError(f"{where}: {key}: must be a finite number, got {value!r}")
    if p.kind in (int, float):
        lo, hi, why = value_range(key, p)
        if value < lo:
            bound = "not be negative" if lo == 0 else f"be at least {_number(lo)}"
            raise VtraceError(f"{where}: {key}: must {bound}, got {value!r}")
        if value > hi:
            raise VtraceError(
                f"{where}: {key}: must be at most {_number(hi)} ({why}), got {value!r}"
            )
        if p.kind is float:
            value = float(value)  # in range, so no OverflowError
        if p.power_of_two and (value < 1 or value & (value - 1)):
            raise VtraceError(f"{where}: {key}: must be a power of two, got {value!r}")
    if p.choices and value not in p.choices:
        raise VtraceError(f"{where}: {key}: must be one of {', '.join(p.choices)}, got {value!r}")
    if p.kind is list and key.endswith("_quantiles_ns"):
        value = _check_quantiles(where, key, value)
    elif p.kind is list:
        value = [_check_access(where, f"{key}[{i}]", a) for i, a in enumerate(value)]
    return value


def _check_quantiles(where: str, key: str, value: list[Any]) -> list[float]:
    """Quantiles of a measured law: none, or 2 to 101 durations in ns, ascending."""
    lo, hi, why = UNIT_RANGES["_ns"]
    if len(value) == 1 or len(value) > 101:
        raise VtraceError(f"{where}: {key}: give 2 to 101 quantiles (or none), got {len(value)}")
    out: list[float] = []
    for i, q in enumerate(value):
        if not isinstance(q, int | float) or isinstance(q, bool) or not math.isfinite(q):
            raise VtraceError(f"{where}: {key}[{i}]: expected a number of ns, got {q!r}")
        if not lo <= q <= hi:
            raise VtraceError(f"{where}: {key}[{i}]: must be 0 to {_number(hi)} ({why}), got {q!r}")
        if out and q < out[-1]:
            raise VtraceError(
                f"{where}: {key}[{i}]: quantiles must ascend, got {q!r} after {out[-1]!r}"
            )
        out.append(float(q))
    return out


def value_range(key: str, p: Param) -> tuple[float, float, str]:
    """A number's (minimum, maximum, why): its own bounds, else those of its unit."""
    unit = next((r for u, r in UNIT_RANGES.items() if key.endswith(u)), None)
    lo = p.minimum if p.minimum is not None else unit[0] if unit else None
    hi = p.maximum if p.maximum is not None else unit[1] if unit else None
    why = p.why or (unit[2] if unit else "")
    if lo is None or hi is None or not why:
        raise ValueError(f"{key}: a number needs a unit suffix or minimum, maximum and why")
    return lo, hi, why


def _number(x: float) -> str:
    """A bound as written: integers in full, other numbers short."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _check_access(where: str, key: str, access: Any) -> dict[str, Any]:
    if not isinstance(access, dict):
        raise VtraceError(f"{where}: {key}: expected a table with {', '.join(ACCESS_KEYS)}")
    out = {}
    for k, v in access.items():
        if k not in ACCESS_KEYS:
            raise VtraceError(f"{where}: {key}.{k}: unknown key (known: {', '.join(ACCESS_KEYS)})")
        out[k] = _check_value(where, f"{key}.{k}", ACCESS_KEYS[k], v)
    return {k: out.get(k, p.default) for k, p in ACCESS_KEYS.items()}


@dataclass
class Config:
    """A validated model: ``values[table][key]``, where it was loaded from, and its overrides."""

    name: str
    path: str
    values: dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.values["model"]["kind"]

    def __getitem__(self, dotted: str) -> Any:
        table, key = dotted.split(".", 1)
        return self.values[table][key]

    def with_overrides(self, overrides: dict[str, Any] | list[str], where: str = "--set") -> Config:
        """A copy with ``table.key`` values replaced (strings ``k=v`` as on the command line)."""
        pairs = parse_assignments(overrides, where) if isinstance(overrides, list) else overrides
        values = copy.deepcopy(self.values)
        applied = dict(self.overrides)
        for key, raw in pairs.items():
            dotted = resolve_key(key, self.kind, where)
            table, name = dotted.split(".", 1)
            values[table][name] = _check_value(where, dotted, SCHEMA[table][name], raw)
            if dotted == "model.kind" and raw != self.kind:  # the kind decides the tables
                raise VtraceError(
                    f"{where}: model.kind: a {self.kind} model cannot become a {raw} model "
                    f"(its tables differ); load a {raw} model instead"
                )
            applied[dotted] = values[table][name]
        cfg = Config(self.name, self.path, values, applied)
        _check_consistency(cfg, where)
        return cfg


def resolve_key(key: str, kind: str, where: str = "--set") -> str:
    """``table.key`` for a dotted key or for a bare key that names one parameter of this kind."""
    tables = KIND_TABLES[kind]
    if "." in key:
        table, name = key.split(".", 1)
        if table not in tables or name not in SCHEMA[table]:
            raise VtraceError(f"{where}: {key}: unknown key for a {kind} model")
        return key
    hits = [t for t in tables if key in SCHEMA[t]]
    if kind == "queue" and "queue" in hits:  # a reference queue's rate lives in [queue]
        hits = ["queue"]
    if len(hits) == 1:
        return f"{hits[0]}.{key}"
    if not hits:
        raise VtraceError(f"{where}: {key}: unknown key for a {kind} model")
    raise VtraceError(f"{where}: {key}: ambiguous, say which table ({', '.join(hits)})")


def parse_value(text: str) -> Any:
    """A command-line value read as TOML (numbers, booleans, quoted strings), else a string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return doc["v"] if len(doc) == 1 else text  # "1\nk=2" is one string, not two keys


def parse_assignments(items: list[str], where: str = "--set") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise VtraceError(f"{where}: {item!r}: expected key=value")
        out[key.strip()] = parse_value(text.strip())
    return out


def _check_consistency(cfg: Config, where: str) -> None:
    """Rules that span several keys."""
    v = cfg.values
    if cfg.kind == "virtio":
        q = v["virtqueue"]
        if q["descs_per_request"] > q["ring_size"]:
            raise VtraceError(
                f"{where}: virtqueue.descs_per_request: {q['descs_per_request']} does not fit "
                f"in virtqueue.ring_size {q['ring_size']}"
            )
        if q["whole_batches"] and q["batch"] * q["descs_per_request"] > q["ring_size"]:
            raise VtraceError(
                f"{where}: virtqueue.batch: a whole batch of {q['batch']} x "
                f"{q['descs_per_request']} descriptors does not fit in ring_size {q['ring_size']}"
            )
        if q["batch_policy"] == "timer" and q["batch_timer_ns"] <= 0:
            raise VtraceError(
                f"{where}: virtqueue.batch_timer_ns: the timer policy needs a value > 0"
            )
    if cfg.kind == "queue":
        qq = v["queue"]
        if (qq["service_mean_ns"] > 0) == (qq["service_ns"] > 0):
            raise VtraceError(
                f"{where}: queue.service_mean_ns: set exactly one of service_mean_ns "
                "(exponential) and service_ns (deterministic)"
            )
        if qq["arrival_rate_per_s"] <= 0:
            raise VtraceError(f"{where}: queue.arrival_rate_per_s: must be > 0")
        law = qq["service_distribution"]
        if qq["service_ns"] > 0 and law not in ("auto", "deterministic"):
            raise VtraceError(
                f"{where}: queue.service_ns: a deterministic service; give the mean of a "
                f"{law} service in queue.service_mean_ns"
            )
        if law == "lognormal" and qq["service_cv"] <= 0:
            raise VtraceError(f"{where}: queue.service_cv: a lognormal service needs a value > 0")
        if 0 < qq["capacity"] < qq["servers"]:
            raise VtraceError(
                f"{where}: queue.capacity: {qq['capacity']} is below queue.servers "
                f"{qq['servers']} (the capacity counts the customers in service)"
            )
    if "device" in v:
        _check_device_law(v["device"], where)
    w = v["workload"]
    if w["arrivals"] in ("poisson", "deterministic") and w["arrival_rate_per_s"] <= 0:
        raise VtraceError(f"{where}: workload.arrival_rate_per_s: must be > 0")
    if w["warmup_requests"] >= w["requests"]:
        raise VtraceError(f"{where}: workload.warmup_requests: must be below workload.requests")


def _check_device_law(d: dict[str, Any], where: str) -> None:
    """A lognormal law needs a spread; an empirical one a trace with durations."""
    law = d["service_distribution"]
    if law == "lognormal" and d["service_cv"] <= 0:
        raise VtraceError(f"{where}: device.service_cv: a lognormal service needs a value > 0")
    if law == "empirical":
        from vtrace.sim.device import trace_service_ns  # device.py imports this module

        trace_service_ns(d["service_trace"], where)  # read once (cached), errors now


def from_dict(raw: dict[str, Any], where: str, name: str = "") -> Config:
    """Validate a parsed TOML document (``where`` names it in errors)."""
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise VtraceError(f"{where}: model: expected a table")
    kind = _check_value(where, "model.kind", SCHEMA["model"]["kind"], model.get("kind", "virtio"))
    allowed = KIND_TABLES[kind]
    values: dict[str, dict[str, Any]] = {}
    for table in allowed:
        values[table] = {k: copy.deepcopy(p.default) for k, p in SCHEMA[table].items()}
    for table, body in raw.items():
        if table not in allowed:
            known = ", ".join(allowed)
            raise VtraceError(
                f"{where}: {table}: unknown table for a {kind} model (known: {known})"
            )
        if not isinstance(body, dict):
            raise VtraceError(f"{where}: {table}: expected a table, got {type(body).__name__}")
        for key, value in body.items():
            if key not in SCHEMA[table]:
                raise VtraceError(f"{where}: {table}.{key}: unknown key")
            values[table][key] = _check_value(where, f"{table}.{key}", SCHEMA[table][key], value)
    cfg = Config(name or Path(where).stem, where, values)
    _check_consistency(cfg, where)
    return cfg


def model_path(name_or_path: str | Path) -> Path:
    """A model file: an existing path, or a name under ``models/`` (``mm1`` finds reference/)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise VtraceError(f"{p}: no such model file")
        return p
    for candidate in (MODELS_DIR / f"{p}.toml", MODELS_DIR / "reference" / f"{p}.toml"):
        if candidate.is_file():
            return candidate
    raise VtraceError(f"{name_or_path}: no such model (known: {', '.join(model_names())})")


def model_names() -> list[str]:
    """Names of the shipped models."""
    names = [p.stem for p in MODELS_DIR.glob("*.toml")]
    names += [p.stem for p in (MODELS_DIR / "reference").glob("*.toml")]
    return sorted(names)


def load_config(
    name_or_path: str | Path, overrides: dict[str, Any] | list[str] | None = None
) -> Config:
    """Load and validate a model by name or path, then apply ``overrides`` (``--set``)."""
    path = model_path(name_or_path)
    try:
        data = path.read_bytes()
        raw = tomllib.loads(data.decode())
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise VtraceError(
            f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise VtraceError(f"{path}: {e}") from None
    except OSError as e:
        raise VtraceError(f"{path}: cannot read: {e.strerror}") from None
    cfg = from_dict(raw, str(path), path.stem)
    return cfg.with_overrides(overrides) if overrides else cfg
