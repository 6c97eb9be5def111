"""Build a simulated VM from a config, run it, and return the per-request frame and summary.

:class:`Machine` holds what the actors share (the queue, the vCPU's time line, the
monitors); the actors themselves are the processes in ``vcpu``, ``backend`` and
``interrupts``. Monitoring is plain lists filled in place; one polars frame is built at the
end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import simpy

from vtrace.sim import backend, interrupts
from vtrace.sim.config import Config
from vtrace.sim.device import service_times_ns
from vtrace.sim.kvm import NO_EXITS, access_exits, exit_ns
from vtrace.sim.summary import summarize
from vtrace.sim.vcpu import vcpu
from vtrace.sim.virtqueue import DeviceQueue, Virtqueue
from vtrace.sim.workloads import open_loop_arrivals_ns


def stalled_times_ns(
    base_ns: float, probability: float, stall_ns: float, rng: np.random.Generator, n: int
) -> list[float]:
    """``base_ns`` for each of ``n`` steps, drawn up front, plus now and then (a thread the
    host preempted, with ``probability`` per step) an exponential extra delay of mean
    ``stall_ns``."""
    if probability <= 0 or stall_ns <= 0:
        return [base_ns]
    stalled = rng.random(n) < probability
    extra = rng.exponential(stall_ns, n) * stalled
    return (base_ns + extra).tolist()


class Machine:
    """The simulated VM and host: shared state of the actors and the run's monitors."""

    def __init__(self, env: simpy.Environment, cfg: Config, arrivals_ns: Sequence[float] | None):
        v = cfg.values
        w = v["workload"]
        self.env = env
        self.cfg = cfg
        rng = np.random.default_rng(w["seed"])
        kind = cfg.kind
        self.closed_loop = kind != "queue" and w["arrivals"] == "closed" and arrivals_ns is None
        if arrivals_ns is not None:
            self.n = min(w["requests"], len(arrivals_ns))
            self.arrivals: list[float] = list(arrivals_ns[: self.n])
        elif kind != "queue" and w["arrivals"] == "backlog":
            self.n = w["requests"]
            self.arrivals = [0.0] * self.n
        elif self.closed_loop:
            self.n = w["requests"]
            self.arrivals = [0.0] * min(w["queue_depth"], self.n)
        else:
            if kind != "queue" and w["arrivals"] == "trace":
                from vtrace.errors import VtraceError

                raise VtraceError(
                    f"{cfg.path}: workload.arrivals is 'trace': give a trace to replay"
                )
            self.n = w["requests"]
            self.arrivals = open_loop_arrivals_ns(cfg, rng, self.n)
        n = self.n
        self.think_ns = w["think_ns"]
        self.service_ns = service_times_ns(cfg, rng, n)

        # the queue between guest and back end
        self.drop_when_full = False
        if kind == "virtio":
            q = v["virtqueue"]
            self.vq: Virtqueue = Virtqueue(q["ring_size"], q["descs_per_request"], q["event_idx"])
            self.batch, self.batch_policy = q["batch"], q["batch_policy"]
            self.batch_timer_ns = q["batch_timer_ns"]
            self.whole_batches = q["whole_batches"]
            self.kick_handler = q["kick_handler"]
            self.kick_exit_ns = exit_ns(v["kvm"], q["kick_handler"], q["kick_emulation_ns"])
        elif kind == "emulated":
            self.vq = DeviceQueue(v["device"]["max_outstanding"])
            self.batch, self.batch_policy, self.batch_timer_ns = 1, "count", 0.0
            self.kick_handler, self.kick_exit_ns = "user", 0.0
            self.whole_batches = False
        else:
            capacity = v["queue"]["capacity"]
            self.vq = DeviceQueue(capacity if capacity > 0 else n + 1)
            self.drop_when_full = capacity > 0
            self.batch, self.batch_policy, self.batch_timer_ns = 1, "count", 0.0
            self.kick_handler, self.kick_exit_ns = "kernel", 0.0
            self.whole_batches = False

        # costs
        if kind == "queue":
            self.prep_ns = self.batch_prep_ns = self.poll_ns = self.reap_ns = 0.0
            self.request_exits = NO_EXITS
            self.irq_exits = NO_EXITS
            self.backend_wakeup_ns = self.backend_per_request_ns = self.backend_per_pass_ns = 0.0
            self.wakeup_ns = [0.0]
            self.request_vcpu_ns = [0.0]
            self.publish_per_pass = False
            self.irq_injection_ns = self.irq_delivery_ns = self.irq_handler_ns = 0.0
            self.coalesce_requests, self.coalesce_ns = 1, 0.0
            self.backend_thread = "iothread"
            self.poll = False
        else:
            self.prep_ns = v["vcpu"]["request_prep_ns"]
            self.batch_prep_ns = v["vcpu"]["batch_prep_ns"] if kind == "virtio" else 0.0
            self.poll_ns = v["vcpu"]["poll_ns"]
            self.reap_ns = v["vcpu"]["reap_ns"]
            self.request_exits = (
                access_exits(v["kvm"], v["device"]["accesses"]) if kind == "emulated" else NO_EXITS
            )
            irq = v["interrupt"]
            self.irq_exits = access_exits(v["kvm"], irq["accesses"])
            self.backend_wakeup_ns = v["backend"]["wakeup_ns"]
            b = v["backend"]
            self.wakeup_ns = stalled_times_ns(
                b["wakeup_ns"], b["stall_probability"], b["stall_ns"], rng, n + 1
            )
            # the vCPU thread is preempted at a rate per second of its work; a request's
            # share of that work includes its part of the per-batch work
            prep = self.prep_ns + self.request_exits.time_ns
            work_ns = prep + self.batch_prep_ns / self.batch
            chance = -math.expm1(-v["vcpu"]["stall_per_s"] * work_ns / 1e9)
            self.request_vcpu_ns = stalled_times_ns(prep, chance, v["vcpu"]["stall_ns"], rng, n)
            self.backend_per_request_ns = v["backend"]["per_request_ns"]
            self.backend_per_pass_ns = v["backend"]["per_pass_ns"]
            self.publish_per_pass = v["backend"]["publish"] == "per_pass"
            self.irq_injection_ns = irq["injection_ns"]
            self.irq_delivery_ns = irq["delivery_ns"]
            self.irq_handler_ns = irq["guest_handler_ns"]
            self.coalesce_requests, self.coalesce_ns = irq["coalesce_requests"], irq["coalesce_ns"]
            self.backend_thread = v["backend"]["thread"]
            self.poll = irq["completion"] == "poll"

        self.counts_irqs = kind != "queue"  # a reference queue has no interrupts to count
        if self.poll:  # the guest never asks for interrupts: it polls the used ring
            self.vq.avail_flags |= 1  # VRING_AVAIL_F_NO_INTERRUPT
        # shared state
        self.vcpu_free_ns = 0.0
        self.handler_free_ns = 0.0
        self.unkicked = 0
        self.unsignalled = 0
        self.last_used_request = 0
        self.batch_timer_generation = 0
        self.coalesce_timer_armed = False
        self.eventfd_signalled = False
        self.backend_wait: simpy.Event | None = None
        self.space_wait: simpy.Event | None = None
        self.arrival_wait: simpy.Event | None = None

        # monitors: one slot per request, filled in place
        nan = math.nan
        self.submit_ns = [nan] * n
        self.start_ns = [nan] * n
        self.complete_ns = [nan] * n
        self.exits = [0] * n
        self.userspace_exits = [0] * n
        self.kicks = [0] * n
        self.irqs = [0] * n
        self.dropped = [False] * n
        self.vcpu_exit_ns = 0.0
        self.backend_busy_ns = 0.0
        self.backend_wakeups = 0
        self.ring_full_stalls = 0
        self.kicks_suppressed = 0
        self.empty_polls = 0

    # -- the guest's notifications ---------------------------------------------------------
    def kick(self, request: int) -> None:
        """The driver's kick decision for what it added; a needed kick is an exit."""
        self.unkicked = 0
        self.batch_timer_generation += 1
        vq = self.vq
        if self.batch_prep_ns > 0:  # publish avail.idx, read the device's flags
            now = self.env.now
            free = self.vcpu_free_ns
            self.vcpu_free_ns = (free if free > now else now) + self.batch_prep_ns
        if not vq.kick_prepare():
            self.kicks_suppressed += 1
            return
        if vq.counts_kicks:
            self.kicks[request] += 1
            self.exits[request] += 1
            if self.kick_handler == "user":
                self.userspace_exits[request] += 1
            cost = self.kick_exit_ns
            self.vcpu_exit_ns += cost
            now = self.env.now
            self.vcpu_free_ns = (self.vcpu_free_ns if self.vcpu_free_ns > now else now) + cost
            self.eventfd_signalled = True
        wait = self.backend_wait
        if wait is not None and not wait.triggered:
            wait.succeed()

    def start_batch_timer(self, request: int) -> None:
        generation = self.batch_timer_generation

        def fire(_event: simpy.Event) -> None:
            if self.batch_timer_generation == generation and self.unkicked:
                self.kick(request + self.unkicked - 1)

        self.env.timeout(self.batch_timer_ns).callbacks.append(fire)

    # -- interrupts --------------------------------------------------------------------------
    def interrupt(self, request: int):  # -> Generator[simpy.Event, None, None]
        return interrupts.inject_interrupt(self, request)

    def start_coalesce_timer(self) -> None:
        interrupts.coalescing_timer(self)

    def guest_interrupt_handler(self, _event: simpy.Event) -> None:
        """The end of the guest's handler: take used buffers back, ask for the next interrupt."""
        self.take_used()
        self.vq.enable_cb()
        self.wake_guest()

    def take_used(self) -> None:
        """The driver takes every used buffer back; those requests complete now."""
        now = self.env.now
        done = self.vq.get_used()
        complete_ns = self.complete_ns
        for r in done:
            complete_ns[r] = now
        if self.closed_loop:
            room = self.n - len(self.arrivals)
            if room > 0:
                self.arrivals.extend([now + self.think_ns] * min(room, len(done)))

    def wake_guest(self) -> None:
        """Wake a vCPU waiting for a request to issue or for room in the ring."""
        wait = self.arrival_wait
        if wait is not None and not wait.triggered:
            wait.succeed()
        wait = self.space_wait
        if wait is not None and not wait.triggered and self.vq.has_room():
            wait.succeed()


@dataclass
class SimResult:
    """One run: the summary (the JSON of ``vtrace replay``), the per-request frame, the config."""

    summary: dict[str, Any]
    requests: pl.DataFrame
    config: Config


def simulate(cfg: Config, arrivals_ns: Sequence[float] | None = None) -> SimResult:
    """Run ``cfg``; ``arrivals_ns`` replays given request arrival times (open loop)."""
    env = simpy.Environment()
    m = Machine(env, cfg, arrivals_ns)
    guest = env.process(vcpu(env, m))
    env.process(backend.BACKEND_THREADS[m.backend_thread](env, m))
    env.run(until=guest)
    # let the back end and the interrupts finish what the guest submitted
    while env.peek() != math.inf:
        env.step()
    frame = requests_frame(m)
    return SimResult(summarize(m, frame, cfg), frame, cfg)


def requests_frame(m: Machine) -> pl.DataFrame:
    """The per-request monitor lists as one frame (times in ns from the start of the run)."""
    return pl.DataFrame(
        {
            "request": np.arange(m.n, dtype=np.int64),
            "submit_ns": np.asarray(m.submit_ns, dtype=np.float64),
            "start_ns": np.asarray(m.start_ns, dtype=np.float64),
            "complete_ns": np.asarray(m.complete_ns, dtype=np.float64),
            "exits": np.asarray(m.exits, dtype=np.int32),
            "userspace_exits": np.asarray(m.userspace_exits, dtype=np.int32),
            "kicks": np.asarray(m.kicks, dtype=np.int32),
            "interrupts": np.asarray(m.irqs, dtype=np.int32),
            "dropped": np.asarray(m.dropped, dtype=np.bool_),
        },
        nan_to_null=True,
    ).with_columns(latency_ns=pl.col("complete_ns") - pl.col("submit_ns"))
