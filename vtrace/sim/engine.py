"""Build a simulated VM from a config, run it, and return the per-request frame and summary.

The actors and what they share::

    workload ──> vCPU 0 ─┐ (time line 0)        ┌─> back-end thread A ──> device
                 vCPU 1 ─┼─> queue 0 (ring) ────┤   (shared, or one        (max_outstanding
                 ...     └─> queue 1 (ring) ────┘    per queue)             at once)
                      ^            │ used ring, interrupt vector
                      └────────────┘ handler on vCPU (queue mod vCPUs)

Each actor is its own object with its own SimPy process or callbacks: :class:`Vcpu`
(vcpu.py), :class:`BackendThread` (backend.py), :class:`DeviceServer` (device_server.py),
the interrupt path (interrupts.py). What they share is a :class:`QueuePath` per queue (its
ring, eventfd and vector) and a :class:`VcpuTimeline` per vCPU. The run's records are in a
:class:`RunMonitor`, bounded in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import simpy

from vtrace.sim.backend import BackendThread
from vtrace.sim.config import Config
from vtrace.sim.device import merged_extra_ns, service_sampler
from vtrace.sim.device_server import DeviceServer
from vtrace.sim.draws import Draws, from_quantiles, stalled
from vtrace.sim.host import HostCpus
from vtrace.sim.monitors import RunMonitor
from vtrace.sim.params import ModelParams, model_params, preemption_chance
from vtrace.sim.queuepath import QueuePath
from vtrace.sim.speed import guest_speed
from vtrace.sim.summary import summarize
from vtrace.sim.timeline import VcpuTimeline
from vtrace.sim.vcpu import Vcpu
from vtrace.sim.workloads import Workload, open_loop_law


class Machine:
    """The simulated VM and host: its actors, what they share, and the run's monitor."""

    def __init__(
        self, env: simpy.Environment, cfg: Config, arrivals_ns: Sequence[float] | None = None
    ) -> None:
        self.env = env
        self.cfg = cfg
        p: ModelParams = model_params(cfg, replayed=arrivals_ns is not None)
        self.params = p
        w = p.workload
        rng = np.random.default_rng(w.seed)
        rate, law = open_loop_law(cfg)
        replayed = None if arrivals_ns is None else np.asarray(arrivals_ns, dtype=np.float64)
        self.workload = Workload(w, rng, rate, law, replayed)
        self.n = n = self.workload.n
        warmup = min(w.warmup, n - 1) if n > 1 else 0
        self.monitor = monitor = RunMonitor(n, warmup)
        g = p.guest
        self.timelines = [
            VcpuTimeline(guest_speed(g.slow_share, g.slow_factor, g.slow_stretch_ns, rng))
            for _ in range(p.vm.vcpus)
        ]
        self.paths = [
            QueuePath(
                env, q, p.ring, p.interrupt, p.backend,
                self.timelines[q % p.vm.vcpus], monitor, self.workload,
            )
            for q in range(p.vm.queues)
        ]  # fmt: skip
        service = Draws(service_sampler(cfg, rng))
        self.device = (
            DeviceServer(env, p.device.slots, service, monitor, merged_extra_ns(cfg))
            if p.device.slots > 0
            else None
        )
        b = p.backend
        # a measured law where the model has one, else the drawn or fixed time
        wakeups = from_quantiles(b.wakeup_quantiles, rng) or stalled(
            b.wakeup_ns, b.stall_probability, b.stall_ns, rng
        )
        pop_work = from_quantiles(b.per_request_quantiles, rng) or Draws(None, b.per_request_ns)
        preempt_wakeups = from_quantiles(b.preempt_wakeup_quantiles, rng)
        device_wakeups = from_quantiles(b.completion_wakeup_quantiles, rng)
        groups = [[path] for path in self.paths] if b.threads == "per_queue" else [self.paths]
        self.threads = [
            BackendThread(
                env,
                group,
                b,
                self.device,
                service,
                wakeups,
                monitor,
                p.guest.polls_completions,
                pop_work,
                device_wakeups,
                preempt_wakeups,
                Draws(lambda k: rng.random(k)) if b.preempt_share > 0 else None,
            )
            for group in groups
        ]
        self.vcpus = [
            Vcpu(
                env, v, g, self.timelines[v], self.paths[v % p.vm.queues], self.workload,
                monitor, stalled(g.prep_ns, preemption_chance(g), g.stall_ns, rng), rng,
            )
            for v in range(p.vm.vcpus)
        ]  # fmt: skip
        self.workload.attach(self.vcpus)
        self.host: HostCpus | None = None
        cpus = p.vm.host_cpus
        if 0 < cpus < len(self.vcpus) + len(self.threads):  # threads wait for CPUs
            self.host = HostCpus(cpus)
            for vcpu in self.vcpus:
                self.host.add_vcpu(vcpu)
            for thread in self.threads:
                thread.host = self.host


@dataclass
class SimResult:
    """One run: the summary (the JSON of ``vtrace replay``), the per-request frame (the
    first :data:`~vtrace.sim.monitors.EXACT_REQUESTS` requests), the config."""

    summary: dict[str, Any]
    requests: pl.DataFrame
    config: Config


def simulate(
    cfg: Config,
    arrivals_ns: Sequence[float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run ``cfg``; ``arrivals_ns`` replays given request arrival times (open loop);
    ``progress(completed, requests)`` is called every 65,536 completions."""
    env = simpy.Environment()
    m = Machine(env, cfg, arrivals_ns)
    m.monitor.progress = progress
    guests = [env.process(v.run()) for v in m.vcpus]
    for thread in m.threads:
        env.process(thread.run())
    env.run(until=simpy.AllOf(env, guests))
    # let the back end and the interrupts finish what the guest submitted
    while env.peek() != math.inf:
        env.step()
    frame = m.monitor.frame()
    return SimResult(summarize(m, frame, cfg), frame, cfg)
