# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Batching and ring size: what if?
#
# A virtio driver can put several requests in the ring and kick once for all of them
# (*batching*); the back end drains everything it finds per wake-up. Two things bound how
# far this goes:
#
# * the **ring size**: a split virtqueue has `ring_size` descriptors; with several
#   descriptors per request (virtio-blk: header, data, status) a small ring fills up and
#   the guest has to stall until the back end returns some;
# * the **queue depth**: the guest cannot batch requests it does not have.
#
# And batching is not free: a request that waits for its batch waits longer. This notebook
# sweeps the model over batch size x ring size x queue depth and shows throughput, tail
# latency, the Pareto front between them, and kicks and interrupts per request with and
# without notification suppression (EVENT_IDX).

# %% tags=["parameters"]
MODEL = "virtio-blk"
RING_SIZES = [8, 16, 64, 256]
BATCHES = [1, 2, 4, 8, 16, 32]
QUEUE_DEPTHS = [1, 8, 32]
REQUESTS = 5_000  # requests per point
WORKERS = None  # processes for the sweep (None: one per CPU)
QUICK = False

# %%
import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import polars as pl

from vtrace import plots
from vtrace.sim.sweep import dask_executor, parse_grid, run_sweep

# %% [markdown]
# The sweeps run in local processes, or on a Dask cluster when the environment names one:
# `DASK_SCHEDULER=tcp://host:8786` (a running scheduler, whose workers have vtrace
# installed) or `DASK_SCHEDULER=local` (a cluster of one worker process per CPU here).

# %%
DASK_SCHEDULER = os.environ.get("DASK_SCHEDULER")
executors = contextlib.ExitStack()
if DASK_SCHEDULER:
    pool = executors.enter_context(dask_executor(DASK_SCHEDULER, WORKERS))
else:
    # Sweep points run in fresh worker processes: forking a process whose polars thread
    # pool is running can deadlock the child, so the pool spawns instead.
    pool = executors.enter_context(
        ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
    )
print(f"sweep points run on {DASK_SCHEDULER or 'local processes'}")

if QUICK:  # the demo's small version of the same sweep
    RING_SIZES, BATCHES, QUEUE_DEPTHS = RING_SIZES[::2], BATCHES[::2], QUEUE_DEPTHS[::2]

# The guest kicks every `batch` requests (instead of when its queue drains), so the batch
# size is the knob being turned.
base = [f"workload.requests={REQUESTS}", "virtqueue.batch_policy=count"]
grid = [
    "virtqueue.ring_size=" + ",".join(map(str, RING_SIZES)),
    "virtqueue.batch=" + ",".join(map(str, BATCHES)),
    "workload.queue_depth=" + ",".join(map(str, QUEUE_DEPTHS)),
]
results = run_sweep(MODEL, parse_grid(MODEL, grid, base), base, executor=pool)
print(f"{results.height} points of {MODEL}")
results.select(
    "virtqueue.ring_size",
    "virtqueue.batch",
    "workload.queue_depth",
    "throughput_rps",
    "latency_ns.p99",
    "kicks_per_request",
    "irqs_per_request",
    "ring_full_stalls",
).head(10)

# %% [markdown]
# ## Throughput and tail latency over batch x ring size
#
# At the deepest queue, where batching has the most to work with. Each cell is one model
# run; hover for the value.

# %%
deep = results.filter(pl.col("workload.queue_depth") == max(QUEUE_DEPTHS))
plots.sweep_heatmap(
    deep,
    x="virtqueue.ring_size",
    y="virtqueue.batch",
    z="throughput_rps",
    title=f"{MODEL}: throughput at queue depth {max(QUEUE_DEPTHS)}",
)

# %%
plots.sweep_heatmap(
    deep,
    x="virtqueue.ring_size",
    y="virtqueue.batch",
    z="latency_ns.p99",
    title=f"{MODEL}: p99 latency at queue depth {max(QUEUE_DEPTHS)}",
)

# %% [markdown]
# ## The Pareto front
#
# Every point of the sweep as throughput against p99 latency. Points on the dotted line
# are the ones no other configuration beats on both; everything else gives something
# away for nothing.

# %%
plots.pareto_front(
    results,
    x="throughput_rps",
    y="latency_ns.p99",
    color="workload.queue_depth",
    hover=["virtqueue.ring_size", "virtqueue.batch", "workload.queue_depth"],
    title=f"{MODEL}: throughput against p99 latency, every sweep point",
)

# %% [markdown]
# ## Ring-full stalls
#
# When a batch does not fit, the guest waits for the back end to return descriptors. Small
# rings with deep queues stall; the stalls vanish once the ring holds a queue depth's
# worth of requests.

# %%
plots.sweep_heatmap(
    deep,
    x="virtqueue.ring_size",
    y="virtqueue.batch",
    z="ring_full_stalls",
    title=f"{MODEL}: ring-full stalls at queue depth {max(QUEUE_DEPTHS)}",
)

# %% [markdown]
# ## Kicks and interrupts per request, with and without suppression
#
# A busy back end does not need kicks: while it is draining the ring it sets
# `VRING_USED_F_NO_NOTIFY`, and with EVENT_IDX it tells the guest precisely "do not kick me
# until request N" (`avail_event`); the guest likewise tells it "no interrupt until
# completion M" (`used_event`). So kicks per request fall as the load rises — with
# Poisson arrivals and "kick only when the back end is idle", the share of requests that
# kick is 1 - ρ, the back end's idle share. Here requests arrive at a fixed mean rate
# (open loop) instead of a fixed queue depth, so the load can be set.

# %%
rates = [10_000, 20_000, 40_000, 60_000, 80_000]
open_loop = [*base, "workload.arrivals=poisson"]
suppression = run_sweep(
    MODEL,
    parse_grid(
        MODEL,
        [
            "workload.arrival_rate_per_s=" + ",".join(map(str, rates)),
            "virtqueue.event_idx=true,false",
            "virtqueue.batch=1,8",
        ],
        open_loop,
    ),
    open_loop,
    executor=pool,
).with_columns(
    pl.format(
        "EVENT_IDX {}, batch {}",
        pl.when(pl.col("virtqueue.event_idx")).then(pl.lit("on")).otherwise(pl.lit("off")),
        pl.col("virtqueue.batch"),
    ).alias("guest")
)
plots.sensitivity(
    suppression,
    x="workload.arrival_rate_per_s",
    y="kicks_per_request",
    color="guest",
    title=f"{MODEL}: kicks per request against offered load",
)

# %%
plots.sensitivity(
    suppression,
    x="workload.arrival_rate_per_s",
    y="irqs_per_request",
    color="guest",
    title=f"{MODEL}: interrupts per request against offered load",
)

# %% [markdown]
# ## More queues: what they buy, at which depth and vCPU count
#
# A multi-queue virtio-blk (blk-mq: one hardware queue per vCPU) gives each queue its own
# ring, suppression state and interrupt vector; vCPU v submits to queue v mod queues. Here
# eight jobs (fio `numjobs`) spread over the vCPUs, the back end runs a thread per queue
# (QEMU's iothread-vq-mapping, or a vhost worker per queue) and the device serves up to 64
# requests at once. With one queue every vCPU's requests meet in one ring and one back-end
# thread; more queues pay off once that thread, not the device, is what limits.

# %%
VCPUS = [1, 2, 4, 8]
QUEUES = [1, 2, 4, 8]
queue_base = [
    *base,
    "workload.jobs=8",
    "backend.threads=per_queue",
    "device.max_outstanding=64",
    "device.service_ns=20000.0",
]
if QUICK:
    VCPUS, QUEUES = [1, 4], [1, 4]
queues = run_sweep(
    MODEL,
    parse_grid(
        MODEL,
        [
            "vm.vcpus=" + ",".join(map(str, VCPUS)),
            "virtqueue.queues=" + ",".join(map(str, QUEUES)),
            "workload.queue_depth=" + ",".join(map(str, QUEUE_DEPTHS)),
        ],
        queue_base,
    ),
    queue_base,
    executor=pool,
).filter(pl.col("virtqueue.queues") <= pl.col("vm.vcpus"))  # a queue without a vCPU idles
plots.sweep_heatmap(
    queues.filter(pl.col("workload.queue_depth") == max(QUEUE_DEPTHS)),
    x="vm.vcpus",
    y="virtqueue.queues",
    z="throughput_rps",
    title=f"{MODEL}: throughput by vCPUs and queues, 8 jobs at depth {max(QUEUE_DEPTHS)}",
)

# %%
plots.sensitivity(
    queues.filter(pl.col("vm.vcpus") == max(VCPUS)).with_columns(
        pl.format("{} queues", pl.col("virtqueue.queues")).alias("queues")
    ),
    x="workload.queue_depth",
    y="throughput_rps",
    color="queues",
    title=f"{MODEL}: throughput against queue depth, {max(VCPUS)} vCPUs",
)

# %%
executors.close()
