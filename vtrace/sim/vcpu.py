"""The guest's vCPU: its driver builds requests, adds them to the queue, kicks, and stalls.

One process per vCPU. For each request it waits until the request exists (the workload's
arrival) and the vCPU is free (an interrupt handler may have taken it), pays the driver's
``request_prep_ns`` plus the request's register exits (emulated devices), adds the request
to the queue and, by the batch policy, kicks. A full ring stalls it until the interrupt
handler takes used buffers back.

Batch policies (``virtqueue.batch_policy``):

- ``count``: kick after every ``batch`` added requests (and when no further request could
  ever fill the batch: end of the workload, or a closed loop with nothing left to issue);
- ``drain``: kick when the guest has nothing more pending right now, or after ``batch``;
- ``timer``: kick ``batch_timer_ns`` after the first unkicked add, or after ``batch``.

A full ring always kicks what is unkicked first, as Linux does before it stops the queue.

A polling driver (``interrupt.completion = "poll"``) takes used buffers back only when it
needs them (room in the ring, or a closed loop's next request), and each time it finds some
it pays ``reap_ns`` besides their per-buffer work (in ``request_prep_ns``): the lab guest's
failed room check, its calls into ``wait_used`` and ``reap``, two reads of used.idx and the
way back. A large ring pays it once per ring's worth of requests, a small one once per batch.
With ``whole_batches`` the driver checks for room before it builds a batch, as the lab guest
does, so on a ring the batch fills it cannot build while the back end serves.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from vtrace.sim.engine import Machine


def vcpu(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """The guest vCPU issuing ``m.n`` requests."""
    vq = m.vq
    arrivals = m.arrivals
    submit_ns = m.submit_ns
    n = m.n
    prep_ns = m.prep_ns + m.request_exits.time_ns
    exit_ns = m.request_exits.time_ns
    vcpu_ns = m.request_vcpu_ns
    stalls = len(vcpu_ns) > 1
    if stalls:
        prep_ns = max(prep_ns, 1e-9)  # a stall can fall on a request with no other cost
    req_exits, req_user = m.request_exits.exits, m.request_exits.userspace_exits
    exits, user_exits = m.exits, m.userspace_exits
    batch, policy = m.batch, m.batch_policy
    drop_when_full = m.drop_when_full
    whole_batches, poll = m.whole_batches, m.poll
    descs = vq.descs_per_request
    room_first = m.request_exits.exits > 0
    i = 0
    prepared = False
    while i < n:
        now = env.now
        if i >= len(arrivals):  # closed loop: wait for a completion to issue the next
            if m.unkicked:
                m.kick(i - 1)
            if poll:  # a polling driver learns of completions only by looking
                if vq.used:
                    reap_used(env, m)
                    continue
                yield from poll_used_ring(env, m)
                continue
            m.arrival_wait = env.event()
            yield m.arrival_wait
            continue
        wake = arrivals[i]
        if m.vcpu_free_ns > wake:
            wake = m.vcpu_free_ns
        if wake > now:
            yield env.timeout(wake - now)
            continue
        # A virtio driver builds the request, then finds the ring full when it adds; an
        # emulated device's register writes are the submission, so it waits for room first.
        if (room_first or prepared or prep_ns <= 0 or (whole_batches and not m.unkicked)) and (
            not vq.has_room()
            or (whole_batches and not m.unkicked and vq.num_free < min(batch, n - i) * descs)
        ):
            if poll and vq.used:  # a polling driver takes completions back when it needs room
                reap_used(env, m)
                continue
            if drop_when_full:  # a finite reference queue loses the arrival
                m.dropped[i] = True
                submit_ns[i] = arrivals[i]
                i += 1
                prepared = False
                continue
            if m.unkicked:
                m.kick(i - 1)
            m.ring_full_stalls += 1
            if poll:
                yield from poll_used_ring(env, m)
                continue
            m.space_wait = env.event()
            yield m.space_wait
            continue
        if not prepared and prep_ns > 0:
            # the driver's own work plus, for an emulated device, its register exits (plus,
            # now and then, the host preempting the vCPU thread)
            cost = vcpu_ns[i] if stalls else prep_ns
            m.vcpu_free_ns = now + cost
            m.vcpu_exit_ns += exit_ns
            prepared = True
            yield env.timeout(cost)
            continue
        prepared = False
        submit_ns[i] = arrivals[i]
        if req_exits:
            exits[i] = req_exits
            user_exits[i] = req_user
        vq.add(i)
        i += 1
        m.unkicked += 1
        if m.unkicked >= batch or i == n:
            m.kick(i - 1)
        elif policy == "drain":
            if i >= len(arrivals) or arrivals[i] > now:
                m.kick(i - 1)
        elif policy == "timer" and m.unkicked == 1:
            m.start_batch_timer(i - 1)
    if m.unkicked:
        m.kick(n - 1)
    while poll and vq.in_flight():  # a polling driver waits for its last requests
        if vq.used:
            m.take_used()
            continue
        yield from poll_used_ring(env, m)


def reap_used(env: simpy.Environment, m: Machine) -> None:
    """A polling driver's look that finds used buffers: it takes them all back (they complete
    now) and its vCPU is busy ``reap_ns`` longer."""
    m.take_used()
    if m.reap_ns > 0:
        now = env.now
        m.vcpu_free_ns = (m.vcpu_free_ns if m.vcpu_free_ns > now else now) + m.reap_ns


def poll_used_ring(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """A polling driver with nothing to take back spins on used.idx until the back end
    publishes, then takes the used buffers back.

    Its failed room check and the calls into the wait take ``reap_ns - poll_ns`` (the part of
    a reap before its first look), then it looks once per ``poll_ns``; the first look that
    starts after the publish finds the buffers and is done with them ``poll_ns`` later
    (the lab guest's reap: 8 + 19 x empty looks + 18 instructions, with a ``reap_ns`` of 26
    and a ``poll_ns`` of 19). So a publish that comes before the first look costs
    ``reap_ns``, as in :func:`reap_used`, and the wait itself hides the rest."""
    now = env.now
    began = m.vcpu_free_ns if m.vcpu_free_ns > now else now
    m.space_wait = env.event()
    yield m.space_wait
    poll_ns = m.poll_ns
    if poll_ns <= 0:
        return
    reap_ns = m.reap_ns
    lead = reap_ns - poll_ns if reap_ns > poll_ns else 0.0
    empty = max(0, math.ceil((env.now - began - lead) / poll_ns))
    m.empty_polls += empty
    seen = began + lead + empty * poll_ns  # the look that finds the publish starts
    if seen > env.now:
        yield env.timeout(seen - env.now)
    m.take_used()
    done = seen + (poll_ns if reap_ns > poll_ns else reap_ns)
    if done > m.vcpu_free_ns:
        m.vcpu_free_ns = done
