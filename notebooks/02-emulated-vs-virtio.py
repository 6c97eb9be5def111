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
# # 2. Emulated vs virtio: what does one request cost?
#
# An **emulated** device (an IDE disk, an e1000 NIC) looks to the guest like real hardware:
# its driver reads and writes device registers, and under KVM every one of those accesses
# traps — a VM exit, usually all the way back to the VMM in user space, which emulates the
# register and re-enters the guest. One 4 KiB read from an emulated IDE disk takes tens of
# such round trips.
#
# A **virtio** device is designed for virtualisation: the driver puts request descriptors
# in a shared ring (the *virtqueue*) and *kicks* the device once per batch — a single
# write, which KVM hands to an eventfd (ioeventfd) without leaving the kernel. The back end
# drains every request it finds and raises one interrupt.
#
# This notebook puts the two side by side, first on **real traces** (the lab VMM's two
# devices; QEMU guests on IDE vs virtio-blk and e1000 vs virtio-net), then in the
# **model**, whose costs come from those traces.

# %% tags=["parameters"]
# Shipped traces (all of them unless TRACE_NAMES lists some) and the models to compare.
TRACES = "../traces"
TRACE_NAMES = None  # e.g. ["lab-emulated", "lab-virtio-b8"]
MODELS = [
    "lab-emulated",
    "lab-virtio",
    "ide-emulated",
    "virtio-blk",
    "e1000-emulated",
    "virtio-net",
    "vhost-net",
]
REQUESTS = 20_000  # requests per model run
QUICK = False

# %%
from pathlib import Path

import polars as pl

import vtrace
from vtrace import plots
from vtrace.analyze import requests
from vtrace.compare import PER_REQUEST, model_costs, traces_costs
from vtrace.notebook import shipped_traces
from vtrace.sim import model_names

traces = [t for t in shipped_traces(Path(TRACES)) if TRACE_NAMES is None or t.name in TRACE_NAMES]
print(f"{len(traces)} traces:", ", ".join(t.name for t in traces))

# %% [markdown]
# ## On real traces
#
# For each trace: its requests (as the tool that made it counted them: disk reads, ping
# round trips, lab requests), and per request the exits to user space, the register
# accesses the VMM had to emulate, the kicks and the interrupts. On the machine these traces were made on,
# QEMU guests ran under TCG: every emulated register access reached QEMU as a
# `memory_region_ops` event — under KVM each would be an exit — so for QEMU traces read
# *trapping accesses per request* as *exits per request*.

# %%
measured = traces_costs([t.path for t in traces])
measured.drop("origin", "device")

# %%
plots.comparison(
    measured,
    metrics=[
        "userspace_exits_per_request",
        "trapping_accesses_per_request",
        "kicks_per_request",
        "irqs_per_request",
        "latency_mean_ns",
        "throughput_rps",
    ],
    title="Measured: per-request cost of each traced device",
)

# %% [markdown]
# ## Request latency, traced
#
# Each request from the back end taking it off the ring (or the device starting it) to its
# completion. A log scale keeps the emulated and virtio devices on one axis.

# %%
lat = (
    pl.concat(
        [
            requests(vtrace.open_trace(t.path).events)
            .select("latency_ns")
            .with_columns(pl.lit(t.name).alias("trace"))
            for t in traces
        ],
        how="vertical",
    )
    if traces
    else pl.DataFrame(schema={"latency_ns": pl.Int64, "trace": pl.String})
)
plots.latency_cdf(lat, color="trace", title="Measured request latency per trace")

# %% [markdown]
# ## In the model
#
# The same comparison in the SimPy model (`models/*.toml`): each model is a device with
# the costs measured on this kind of host — a user-space exit round trip, an in-kernel
# ioeventfd kick, the back end's wake-up and per-request work, the interrupt path. The
# model adds what a trace cannot show directly: the share of the vCPU's time spent in
# exits, and how throughput and tail latency follow from the per-request costs.

# %%
shipped = set(model_names())
runs = model_costs([m for m in MODELS if m in shipped], requests=REQUESTS)
runs

# %%
plots.comparison(
    runs,
    metrics=[*PER_REQUEST, "latency_p99_ns", "throughput_rps"],
    title="Modelled: emulated vs virtio",
)

# %% [markdown]
# ## What to take away
#
# * Emulated devices pay **several exits per request** (one per register access), each a
#   round trip through the VMM; virtio pays about **one kick per batch** and it stays in
#   the kernel.
# * The model reproduces the traced per-request counts from the device descriptions, so
#   the what-if notebooks (3 and 4) can change ring size, batching and exit costs with
#   some confidence.
