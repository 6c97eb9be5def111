"""The parameters of each kind of actor, as frozen values built once from a config.

An actor reads its own parameters and nothing else of the config: the vCPU its
:class:`GuestParams`, a back-end thread its :class:`BackendParams`, and so on. The three
kinds of model (virtio ring, emulated registers, reference queue) differ only in the values
built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vtrace.errors import VtraceError
from vtrace.sim.config import Config
from vtrace.sim.kvm import NO_EXITS, ExitCost, access_exits, exit_ns


@dataclass(frozen=True)
class WorkloadParams:
    arrivals: str  # poisson | deterministic | closed | backlog | trace
    requests: int
    warmup: int
    seed: int
    jobs: int  # closed loop: independent submitters (fio numjobs)
    queue_depth: int  # closed loop: requests each job keeps in flight
    submit: str  # closed loop: each (refill per completion) | batch (queue_depth together)
    dispatch_splits: float  # batch submission: mean early ends of its dispatch
    think_ns: float


@dataclass(frozen=True)
class VmParams:
    vcpus: int
    queues: int
    host_cpus: int = 0  # 0: a host CPU per thread


@dataclass(frozen=True)
class GuestParams:
    """The guest driver on one vCPU."""

    prep_ns: float  # per request, its register exits included (emulated)
    batch_prep_ns: float
    poll_ns: float
    reap_ns: float
    stall_per_s: float
    stall_ns: float
    driver_ns: float  # the guest's own part of prep_ns (what a slow stretch slows)
    slow_share: float
    slow_factor: float
    slow_stretch_ns: float
    request_exits: ExitCost
    batch: int
    batch_policy: str  # count | drain | timer
    batch_timer_ns: float
    whole_batches: bool
    polls_completions: bool  # interrupt.completion == "poll"
    room_first: bool  # emulated: the register writes are the submission: room before prep
    drop_when_full: bool  # a finite reference queue loses what does not fit
    idle_entry_ns: float = 0.0  # from its last request to the halt, running


@dataclass(frozen=True)
class RingParams:
    """One queue between guest and back end."""

    virtio: bool  # a split virtqueue in guest memory (else an emulated device's queue)
    ring_size: int
    descs_per_request: int
    event_idx: bool
    kick_handler: str  # kernel | user
    kick_exit_ns: float


@dataclass(frozen=True)
class BackendParams:
    thread: str  # iothread | vhost_worker | vmm
    threads: str  # shared | per_queue
    mode: str  # notify | poll
    wakeup_ns: float
    stall_probability: float
    stall_ns: float
    per_request_ns: float
    per_pass_ns: float
    publish_per_pass: bool
    max_per_pass: int  # 0: no limit
    poll_ns: float  # poll mode: time to notice a new avail entry
    wakeup_cpu_share: float = 1.0  # of each wake-up, the part spent on a CPU
    avail_event_on_pop: bool = False  # EVENT_IDX: avail_event follows every pop, kicks on
    submit_per_pass: bool = False  # a pass's requests go to the device as one merged I/O
    wakeup_quantiles: tuple[float, ...] = ()  # a measured wake-up law, in place of the rest
    per_request_quantiles: tuple[float, ...] = ()  # a measured law of per_request_ns
    completion_wakeup_quantiles: tuple[float, ...] = ()  # woken by the device: this law
    holds_kicks: bool = False  # a kick waits while the thread works (QEMU's lock, TCG)
    preempt_wakeup_quantiles: tuple[float, ...] = ()  # no host CPU free: this law
    lock_wake_ns: float = 0.0  # holds_kicks: the waiting vCPU runs again this long after
    complete_ns: float = 0.0  # work per device completion, under the lock
    idle_ns: float = 0.0  # holds_kicks: its way back to sleep, still holding the lock
    preempt_share: float = 0.0  # wake-ups that find the free CPU taken: on the vCPU's


@dataclass(frozen=True)
class DeviceParams:
    slots: int  # 0: the back-end thread serves each request itself; else served at once


@dataclass(frozen=True)
class InterruptParams:
    counted: bool  # a reference queue has no interrupts to count
    injection_ns: float
    delivery_ns: float
    handler_ns: float
    exits: ExitCost
    coalesce_requests: int
    coalesce_ns: float
    halted_wake_ns: float = 0.0  # more delivery when the vCPU is halted
    per_completion_ns: float = 0.0  # handler work per used buffer beyond the first


@dataclass(frozen=True)
class ModelParams:
    """Every actor's parameters for one run."""

    kind: str
    workload: WorkloadParams
    vm: VmParams
    guest: GuestParams
    ring: RingParams
    backend: BackendParams
    device: DeviceParams
    interrupt: InterruptParams


def _workload(cfg: Config, replayed: bool) -> WorkloadParams:
    w = cfg.values["workload"]
    arrivals = "poisson" if cfg.kind == "queue" else w["arrivals"]
    if replayed:
        arrivals = "trace"
    elif arrivals == "trace":
        raise VtraceError(f"{cfg.path}: workload.arrivals is 'trace': give a trace to replay")
    return WorkloadParams(
        arrivals=arrivals,
        requests=w["requests"],
        warmup=w["warmup_requests"],
        seed=w["seed"],
        jobs=w.get("jobs", 1),
        queue_depth=w["queue_depth"],
        submit=w.get("submit", "each"),
        dispatch_splits=w.get("dispatch_splits", 0.0),
        think_ns=w["think_ns"],
    )


def model_params(cfg: Config, replayed: bool = False) -> ModelParams:
    """The frozen parameters of every actor of ``cfg``."""
    v = cfg.values
    kind = cfg.kind
    workload = _workload(cfg, replayed)
    if kind == "queue":
        q = v["queue"]
        capacity = q["capacity"]
        servers = q.get("servers", 1)
        return ModelParams(
            kind=kind,
            workload=workload,
            vm=VmParams(1, 1),
            guest=GuestParams(
                prep_ns=0.0,
                batch_prep_ns=0.0,
                poll_ns=0.0,
                reap_ns=0.0,
                stall_per_s=0.0,
                stall_ns=0.0,
                driver_ns=0.0,
                slow_share=0.0,
                slow_factor=1.0,
                slow_stretch_ns=1.0,
                request_exits=NO_EXITS,
                batch=1,
                batch_policy="count",
                batch_timer_ns=0.0,
                whole_batches=False,
                polls_completions=False,
                room_first=False,
                drop_when_full=capacity > 0,
            ),
            ring=RingParams(False, capacity if capacity > 0 else 1 << 62, 1, False, "kernel", 0.0),
            backend=BackendParams(
                "iothread", "shared", "notify", 0.0, 0.0, 0.0, 0.0, 0.0, False, 0, 0.0
            ),
            device=DeviceParams(servers if servers > 1 else 0),  # one server: served inline
            interrupt=InterruptParams(False, 0.0, 0.0, 0.0, NO_EXITS, 1, 0.0),
        )
    vm = v.get("vm", {})
    g = v["vcpu"]
    b = v["backend"]
    d = v["device"]
    irq = v["interrupt"]
    virtio = kind == "virtio"
    request_exits = NO_EXITS if virtio else access_exits(v["kvm"], d["accesses"])
    if virtio:
        q = v["virtqueue"]
        ring = RingParams(
            True, q["ring_size"], q["descs_per_request"], q["event_idx"], q["kick_handler"],
            exit_ns(v["kvm"], q["kick_handler"], q["kick_emulation_ns"]),
        )  # fmt: skip
        batch, policy, timer = q["batch"], q["batch_policy"], q["batch_timer_ns"]
        whole, batch_prep = q["whole_batches"], g["batch_prep_ns"]
        queues = q.get("queues", 1)
        # above one request at a time the device serves on its own (AIO, NVMe depth); a back
        # end that submits a pass's requests as one merged I/O always hands them to it
        merged = b.get("submit", "each") == "pass"
        slots = d["max_outstanding"] if d["max_outstanding"] > 1 or merged else 0
    else:
        ring = RingParams(False, d["max_outstanding"], 1, False, "user", 0.0)
        batch, policy, timer, whole, batch_prep = 1, "count", 0.0, False, 0.0
        queues, slots = 1, 0
    guest = GuestParams(
        prep_ns=g["request_prep_ns"] + request_exits.time_ns,
        batch_prep_ns=batch_prep,
        poll_ns=g["poll_ns"],
        reap_ns=g["reap_ns"],
        stall_per_s=g["stall_per_s"],
        stall_ns=g["stall_ns"],
        driver_ns=g["request_prep_ns"],
        slow_share=g["slow_share"],
        slow_factor=g["slow_factor"],
        slow_stretch_ns=g["slow_stretch_ns"],
        request_exits=request_exits,
        batch=batch,
        batch_policy=policy,
        batch_timer_ns=timer,
        whole_batches=whole,
        polls_completions=irq["completion"] == "poll",
        room_first=request_exits.exits > 0,
        drop_when_full=False,
        idle_entry_ns=g["idle_entry_ns"],
    )
    backend = BackendParams(
        thread=b["thread"],
        threads=b.get("threads", "shared"),
        mode=b.get("mode", "notify"),
        wakeup_ns=b["wakeup_ns"],
        stall_probability=b["stall_probability"],
        stall_ns=b["stall_ns"],
        per_request_ns=b["per_request_ns"],
        per_pass_ns=b["per_pass_ns"],
        publish_per_pass=b["publish"] == "per_pass",
        max_per_pass=b.get("max_per_pass", 0),
        poll_ns=b.get("poll_ns", 0.0),
        avail_event_on_pop=b.get("avail_event", "idle") == "pop",
        submit_per_pass=b.get("submit", "each") == "pass",
        wakeup_quantiles=tuple(b.get("wakeup_quantiles_ns", ())),
        per_request_quantiles=tuple(b.get("per_request_quantiles_ns", ())),
        completion_wakeup_quantiles=tuple(b.get("completion_wakeup_quantiles_ns", ())),
        holds_kicks=b.get("holds_kicks", False),
        preempt_wakeup_quantiles=tuple(b.get("preempt_wakeup_quantiles_ns", ())),
        wakeup_cpu_share=b.get("wakeup_cpu_share", 1.0),
        lock_wake_ns=b.get("lock_wake_ns", 0.0),
        complete_ns=b.get("complete_ns", 0.0),
        idle_ns=b.get("idle_ns", 0.0),
        preempt_share=b.get("preempt_share", 0.0),
    )
    interrupt = InterruptParams(
        counted=True,
        injection_ns=irq["injection_ns"],
        delivery_ns=irq["delivery_ns"],
        handler_ns=irq["guest_handler_ns"],
        exits=access_exits(v["kvm"], irq["accesses"]),
        coalesce_requests=irq["coalesce_requests"],
        coalesce_ns=irq["coalesce_ns"],
        halted_wake_ns=irq.get("halted_wake_ns", 0.0),
        per_completion_ns=irq["per_completion_ns"],
    )
    vcpus, host_cpus = vm.get("vcpus", 1), vm.get("host_cpus", 0)
    if 0 < host_cpus < vcpus:
        raise VtraceError(
            f"{cfg.path}: vm.host_cpus = {host_cpus}: fewer host CPUs than vCPUs ({vcpus}) "
            "is not modelled; give 0 (a CPU per thread) or at least vm.vcpus"
        )
    return ModelParams(
        kind=kind,
        workload=workload,
        vm=VmParams(vcpus, queues, host_cpus),
        guest=guest,
        ring=ring,
        backend=backend,
        device=DeviceParams(slots),
        interrupt=interrupt,
    )


def preemption_chance(guest: GuestParams) -> float:
    """The chance that the host preempts the vCPU thread during one request's work (its
    share of the per-batch work included): ``stall_per_s`` is a rate per second of work."""
    work_ns = guest.prep_ns + guest.batch_prep_ns / guest.batch
    return -math.expm1(-guest.stall_per_s * work_ns / 1e9)
