"""A back-end thread: a QEMU iothread or main loop, a vhost worker, or the VMM's thread.

Every kind runs the same loop (virtio spec 2.7.13, "Supplying Buffers to The Device", seen
from the device): sleep until kicked; on wake-up turn kicks off; pop and serve what is
available, put it on the used ring and decide whether to interrupt; when nothing is left
turn kicks back on and look once more, which closes the race with a driver that added
just before. The guest publishes ``avail.idx`` as it adds, so a thread that is still
running takes whatever was published while it worked, without a kick: batching comes out
of that race.

One thread serves one queue (``backend.threads = "per_queue"``: iothread-vq-mapping, a
vhost worker per queue) or all of them in turn (``"shared"``: QEMU's main loop, one
iothread), at most ``backend.max_per_pass`` requests of a queue before it looks at the
next (vhost's weight). With ``device.max_outstanding`` above one it hands each request to
the device (:mod:`vtrace.sim.device_server`) and completes them as they come back;
otherwise it serves each itself. A busy-polling thread (``backend.mode = "poll"``, a
vhost-user PMD) never sleeps and never asks for a kick; it spends its core.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import simpy

from vtrace.sim.device_server import DeviceServer
from vtrace.sim.draws import Draws
from vtrace.sim.host import HostCpus
from vtrace.sim.interrupts import completed, inject_interrupt, start_handler
from vtrace.sim.monitors import RunMonitor
from vtrace.sim.params import BackendParams
from vtrace.sim.queuepath import QueuePath

if TYPE_CHECKING:
    from vtrace.sim.timeline import VcpuTimeline
    from vtrace.sim.vcpu import Vcpu


class BackendThread:
    """One back-end thread and the queues it serves."""

    def __init__(
        self,
        env: simpy.Environment,
        paths: list[QueuePath],
        params: BackendParams,
        device: DeviceServer | None,
        service: Draws,
        wakeups: Draws,
        monitor: RunMonitor,
        guest_polls: bool,
        pop_work: Draws | None = None,
        device_wakeups: Draws | None = None,
        preempt_wakeups: Draws | None = None,
        uniforms: Draws | None = None,
    ) -> None:
        self.env = env
        self.paths = paths
        self.p = params
        self.device = device
        self.service = service
        self.wakeups = wakeups
        # a wake-up by the device's completion, when it has a law of its own
        self.device_wakeups = device_wakeups
        self.woken_by_device = False
        # with fewer host CPUs than threads: the wake-up when none is free (it pre-empts)
        self.preempt_wakeups = preempt_wakeups
        # backend.holds_kicks: while it works, kicks wait for it to go back to sleep
        self.lock_held = False
        self.held_kicks: list[tuple[QueuePath, VcpuTimeline]] = []
        self.held_irqs: list[QueuePath] = []  # interrupts the guest takes once it has the lock
        self.lock_free: simpy.Event | None = None
        # each request's work: drawn from a measured law, or per_request_ns every time
        self.pop_work = pop_work if pop_work is not None else Draws(None, params.per_request_ns)
        self.monitor = monitor
        self.polling = params.mode == "poll"
        # the guest spins on used.idx (no interrupts): a publish is seen at once
        self.guest_polls = guest_polls
        self.wait_event: simpy.Event | None = None
        self.done: list[tuple[int, QueuePath]] = []  # device completions not yet handled
        self.next_path = 0
        self.current: QueuePath | None = None  # the queue whose handler runs
        self.woken_by: QueuePath | None = None  # the queue whose kick or completion woke it
        self.host: HostCpus | None = None  # fewer host CPUs than threads: it takes a vCPU's
        self.on_vcpu: Vcpu | None = None  # the vCPU whose CPU it took, until it sleeps
        self.uniforms = uniforms if uniforms is not None else Draws(None, 1.0)
        if self.polling:  # a polling thread keeps kicks off on every queue for good
            for path in paths:
                path.vq.disable_notification()
        for path in paths:
            path.thread = self

    # -- what wakes it ---------------------------------------------------------------------
    def signal(self, path: QueuePath) -> None:
        """A kick: ``path``'s eventfd is signalled."""
        path.eventfd = True
        self.woken_by = path
        if self.wait_event is not None and not self.wait_event.triggered:
            self.woken_by_device = False
        self._wake()

    def poke(self) -> None:
        """A polling thread sees a new avail entry."""
        self._wake()

    def device_completed(self, request: int, path: QueuePath) -> None:
        self.done.append((request, path))
        self.woken_by = path
        if self.wait_event is not None and not self.wait_event.triggered:
            self.woken_by_device = True
        self._wake()

    def _wake(self) -> None:
        wait = self.wait_event
        if wait is not None and not wait.triggered:
            wait.succeed()

    def _next_path(self) -> QueuePath | None:
        """The queue to serve: the one whose handler is running, until it runs dry or spends
        its ``max_per_pass``; then, round robin, one whose eventfd is readable or that spent
        its weight (a polling thread: round robin over those with avail entries)."""
        if self.current is not None:
            return self.current
        paths = self.paths
        n = len(paths)
        for k in range(n):
            path = paths[(self.next_path + k) % n]
            ready = path.vq.avail_pending() if self.polling else path.eventfd or path.draining
            if ready:
                self.next_path = (self.next_path + k + 1) % n
                return path
        return None

    def _others_wait(self, path: QueuePath) -> bool:
        return any(p is not path and (p.eventfd or p.draining) for p in self.paths)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> Generator[simpy.Event, None, None]:
        while True:
            if self.done:
                yield from self._complete()
                continue
            path = self._next_path()
            if path is None:
                yield from self._idle()
                continue
            if self.polling:
                yield from self._serve(path)
                continue
            # the queue's handler (QEMU's virtio_blk_handle_vq, vhost's handle_tx): kicks off
            # on this queue only, drain, kicks back on and look once more
            vq = path.vq
            if not path.draining:
                path.eventfd = False
                path.draining = True
                vq.disable_notification()
            self.current = path
            if vq.avail_pending():
                spent = yield from self._serve(path)
                if spent:  # vhost's weight: requeue itself, kicks still off, next queue's turn
                    self.current = None
                elif self._others_wait(path):
                    # another queue's eventfd is readable: this handler returns with kicks
                    # back on, and the main loop comes back to it (its avail entries pending)
                    vq.enable_notification()
                    path.draining = False
                    path.eventfd = path.eventfd or vq.avail_pending()
                    self.current = None
                continue
            vq.enable_notification()
            if vq.avail_pending():  # the driver added just before: keep draining
                vq.disable_notification()
                continue
            path.draining = False
            self.current = None

    def _idle(self) -> Generator[simpy.Event, None, None]:
        """Nothing to serve: flush held interrupts, then sleep until a kick or a completion."""
        env = self.env
        for path in self.paths:
            if path.unsignalled and path.irq.coalesce_ns <= 0:
                yield from inject_interrupt(path, path.last_used_request)
        if self.lock_held:  # back in its main loop's poll: it lets go of the lock
            if self.p.idle_ns > 0:
                yield self._work(self.p.idle_ns, None)
                if self.done or self._next_path() is not None:  # work came meanwhile
                    return
            self._release()
        if self.done or self._next_path() is not None:  # work came meanwhile
            self.lock_held = self.p.holds_kicks
            return
        self.on_vcpu = None  # asleep: it holds no CPU
        self.wait_event = env.event()
        yield self.wait_event
        self.wait_event = None
        if self.polling:  # it spins: it notices an add ``poll_ns`` later
            if self.p.poll_ns > 0:
                yield env.timeout(self.p.poll_ns)
            return
        # woken from its poll loop by an eventfd: a kick or a completion. It first waits to
        # be scheduled, holding no CPU, then runs its way out of the sleep on one
        by_device = self.woken_by_device and self.device_wakeups is not None
        if by_device:
            wake_ns = self.device_wakeups.next()
        elif self.preempt_wakeups is not None and (
            (self.host is not None and not self.host.cpu_free(env.now)) or self._cpu_taken()
        ):
            wake_ns = self.preempt_wakeups.next()
        else:
            wake_ns = self.wakeups.next()
        self.woken_by_device = False
        self.monitor.backend_wakeups += 1
        if wake_ns > 0:
            cpu_ns = wake_ns * self.p.wakeup_cpu_share
            if cpu_ns < wake_ns:
                yield env.timeout(wake_ns - cpu_ns)
            if cpu_ns > 0:
                yield self._work(cpu_ns, self.woken_by)
        self.lock_held = self.p.holds_kicks

    def lock_event(self) -> simpy.Event:
        """The event the vCPUs that wait for its lock wait on: it fires when they have it."""
        if self.lock_free is None:
            self.lock_free = self.env.event()
        return self.lock_free

    def _cpu_taken(self) -> bool:
        """``backend.preempt_share``: the CPU the model has free is taken by work outside
        it, so the thread takes the kicking vCPU's (when that vCPU runs) until it sleeps."""
        if self.p.preempt_share <= 0 or self.woken_by is None:
            return False
        vcpu = next((v for v in self.woken_by.vcpus if v.running), None)
        if vcpu is None or self.uniforms.next() >= self.p.preempt_share:
            return False
        self.on_vcpu = vcpu
        return True

    def hold_kick(self, path: QueuePath, timeline: VcpuTimeline) -> simpy.Event:
        """A kick written while it holds the lock: delivered when it lets go; the event the
        kicking vCPU (``timeline``) waits on."""
        self.held_kicks.append((path, timeline))
        return self.lock_event()

    def hold_interrupt(self, path: QueuePath) -> None:
        """An interrupt raised while it holds the lock: only its event is set. Without
        KVM's irqfd, QEMU's main loop reads the queue's guest notifier and injects the
        interrupt on its next pass through its poll (virtio_queue_guest_notifier_read), so
        the guest goes on running meanwhile and takes it once the lock is let go."""
        self.held_irqs.append(path)

    def _release(self) -> None:
        """Back in its poll: let go of the lock and inject the interrupts raised meanwhile.
        A running vCPU takes its interrupt at once (the lock it needs for that is free);
        the vCPUs that waited for the lock, or halted, run again ``lock_wake_ns`` later
        (the scheduler wakes their threads): they write their kicks and take their
        interrupts."""
        self.lock_held = False
        kicks, self.held_kicks = self.held_kicks, []
        irqs, self.held_irqs = self.held_irqs, []
        free, self.lock_free = self.lock_free, None
        if irqs:  # a running vCPU takes its interrupt now; the others wake first
            waking = [p for p in irqs if p.irq_timeline.halted or p.irq_timeline.lock_wait]
            if len(waking) < len(irqs):
                self._deliver([], [p for p in irqs if p not in waking], None)
                irqs = waking
        if self.p.lock_wake_ns <= 0:
            self._deliver(kicks, irqs, free)
        elif kicks or irqs or free is not None:
            self.env.timeout(self.p.lock_wake_ns).callbacks.append(
                lambda _event: self._deliver(kicks, irqs, free)
            )

    def _deliver(
        self,
        kicks: list[tuple[QueuePath, VcpuTimeline]],
        irqs: list[QueuePath],
        free: simpy.Event | None,
    ) -> None:
        """The waiting vCPUs have the lock: their kicks are written, their handlers start."""
        if self.lock_held:  # it took the lock again before they got it: they wait again
            self.held_kicks.extend(kicks)
            self.held_irqs.extend(irqs)
            if free is not None:
                if self.lock_free is None:
                    self.lock_free = free
                else:
                    self.lock_free.callbacks.append(lambda _event: free.succeed())
            return
        now = self.env.now
        for path in irqs:
            start_handler(path, path.last_used_request, now)
        for path, timeline in kicks:
            if path.vq.counts_kicks:  # the exit's way back after the write
                timeline.exit(now, path.ring.kick_exit_ns)
            self.signal(path)
        if free is not None:
            free.succeed()

    def _serve(self, path: QueuePath) -> Generator[simpy.Event, None, bool]:
        """Serve what ``path`` has available, at most ``max_per_pass`` requests; True when
        that weight is spent."""
        vq = path.vq
        limit = self.p.max_per_pass
        available = vq.avail_idx - vq.last_avail_idx
        take = available if limit <= 0 or available < limit else limit
        if self.device is not None and self.p.submit_per_pass:
            take = yield from self._submit_pass(path, limit)
        elif self.device is not None:
            yield from self._submit(path, take)
        elif self.p.publish_per_pass:
            yield from self._serve_pass(path, take)
        else:
            take = 1
            yield from self._serve_one(path)
        path.served_in_turn = 0 if limit <= 0 else path.served_in_turn + take
        if limit > 0 and path.served_in_turn >= limit:
            path.served_in_turn = 0
            return True
        return False

    def _serve_one(self, path: QueuePath) -> Generator[simpy.Event, None, None]:
        """Pop one request, serve it, put it on the used ring, decide on an interrupt."""
        env = self.env
        request = path.vq.pop()
        self.monitor.started(request, env.now)
        busy = self.pop_work.next() + self.service.next()
        if busy > 0:
            yield self._work(busy, path)
        path.vq.push_used(request)
        if self.guest_polls:
            path.space_freed()
            return
        yield from completed(path, request, 1)

    def _serve_pass(self, path: QueuePath, take: int) -> Generator[simpy.Event, None, None]:
        """One pass: take ``take`` available requests, serve them in order, then publish
        used.idx once and decide on one interrupt for the lot (the lab's back end, and
        QEMU's batched notification). Nothing outside sees the pass half done, so it is
        one timeout."""
        env = self.env
        vq = path.vq
        pop_work = self.pop_work
        service = self.service
        monitor = self.monitor
        t = env.now
        taken = []
        for _ in range(take):
            request = vq.pop()
            monitor.started(request, t)
            t += pop_work.next() + service.next()
            taken.append(request)
        t += self.p.per_pass_ns
        busy = t - env.now
        if busy > 0:
            yield self._work(busy, path)
        for request in taken:
            vq.push_used(request)
        if self.guest_polls:
            path.space_freed()
            return
        yield from completed(path, taken[-1], len(taken))

    def _submit(self, path: QueuePath, take: int) -> Generator[simpy.Event, None, None]:
        """Pop ``take`` requests and hand each to the device as it is popped."""
        vq = path.vq
        pop_work = self.pop_work
        device = self.device
        for _ in range(take):
            work_ns = pop_work.next()
            if work_ns > 0:
                yield self._work(work_ns, path)
            device.submit(vq.pop(), self, path)
        if self.p.per_pass_ns > 0:
            yield self._work(self.p.per_pass_ns, path)

    def _submit_pass(self, path: QueuePath, limit: int) -> Generator[simpy.Event, None, int]:
        """QEMU virtio-blk's pass: pop and parse one request at a time until the ring is
        empty (entries the guest adds meanwhile included), then hand them to the device
        together as one merged I/O (virtio_blk_submit_multireq); returns how many."""
        vq = path.vq
        pop_work = self.pop_work
        taken: list[int] = []
        while vq.avail_pending() and (limit <= 0 or len(taken) < limit):
            taken.append(vq.pop())
            work_ns = pop_work.next()
            if work_ns > 0:
                yield self._work(work_ns, path)
        if self.p.per_pass_ns > 0:
            yield self._work(self.p.per_pass_ns, path)
        self.device.submit(taken, self, path)
        return len(taken)

    def _work(self, cost_ns: float, path: QueuePath | None) -> simpy.Event:
        """``cost_ns`` of the thread's work, counted as busy time: the event it ends with.
        With fewer host CPUs than threads (``host``) it runs on a free CPU, on one taken
        from a running vCPU, or shared with the other busy back-end threads."""
        self.monitor.backend_busy_ns += cost_ns
        if self.on_vcpu is not None:  # on the CPU it took from a vCPU: the vCPU waits
            self.on_vcpu.timeline.occupy(self.env.now, cost_ns)
            return self.env.timeout(cost_ns)
        host = self.host
        if host is None:
            return self.env.timeout(cost_ns)
        took = host.backend_runs(self.env.now, cost_ns, path.vcpus if path is not None else [])
        host.backends_busy += 1
        done = self.env.timeout(took)
        done.callbacks.append(host.backend_done)
        return done

    def _complete(self) -> Generator[simpy.Event, None, None]:
        """Put what the device finished on the used rings and decide on interrupts: one
        decision per completion, or one per queue for the lot (``publish = per_pass``)."""
        done, self.done = self.done, []
        per_pass = self.p.publish_per_pass
        touched: dict[int, tuple[QueuePath, int, int]] = {}
        complete_ns = self.p.complete_ns
        for request, path in done:
            if complete_ns > 0:
                yield self._work(complete_ns, path)
            path.vq.push_used(request)
            if self.guest_polls:
                path.space_freed()
                continue
            if per_pass:
                _, _, count = touched.get(path.index, (path, request, 0))
                touched[path.index] = (path, request, count + 1)
            else:
                yield from completed(path, request, 1)
        for path, request, count in touched.values():
            yield from completed(path, request, count)
