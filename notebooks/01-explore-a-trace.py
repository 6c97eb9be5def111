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
# # 1. Explore a trace
#
# A vtrace *trace* is a directory of Parquet parts plus `meta.json`: one long table of
# events (the *events table*), whatever made it — the bcc collector on a KVM host, the lab
# VMM on `/dev/kvm`, or QEMU's own trace log. This notebook opens one and asks the
# questions a performance engineer asks first:
#
# * what is in it, and from which source;
# * how often the guest left the CPU for the host (*exits*), for which reasons, and how
#   long each round trip took;
# * which device registers the guest touched, and whether KVM handled each access in the
#   kernel or had to return to the VMM in user space (the expensive path);
# * what the threads were doing over time.
#
# Point `TRACE` at your own trace directory to run the same questions on it.

# %% tags=["parameters"]
# Where the shipped traces are, and which one to open (a name in TRACES, or any path).
TRACES = "../traces"
TRACE = "lab-emulated"
QUICK = False  # the demo sets this to keep figures small

# %%
from pathlib import Path

import polars as pl

import vtrace
from vtrace import plots
from vtrace.analyze import (
    accesses,
    accesses_by_target,
    by_reason,
    exits,
    log2_histogram,
    percentiles,
    user_exits,
)

trace = vtrace.open_trace(Path(TRACES) / TRACE)
events = trace.events
trace

# %% [markdown]
# ## What made this trace
#
# `meta.json` records the host, kernel, the tool and its settings, and — so nothing is lost
# silently — how many events were lost or lines left unparsed.

# %%
{k: trace.meta.get(k) for k in ("host", "kernel", "clock", "events", "lost", "unparsed", "isa")}

# %% [markdown]
# ## Events by name and source
#
# Each row of the events table is one event: a KVM tracepoint (`source = kvm`), an event
# of the VMM itself (`lab`, `qemu`), or a kprobe. The x axis is logarithmic: rare events
# such as interrupts sit next to the per-access events that dominate an emulated device.

# %%
plots.event_counts(events, title=f"{trace.name}: events by name and source")

# %% [markdown]
# ## Exits and returns to user space
#
# On hardware-virtualised KVM each exit is a `kvm_exit` paired with the next `kvm_entry` of
# the same vCPU thread. When the exit needs the VMM (an access to an emulated register),
# KVM returns from `KVM_RUN` to user space: a `kvm_userspace_exit`, the expensive path.
# On hosts where KVM runs without VMX/SVM (software KVM, as on the machine these traces
# came from) `kvm_exit` never fires, and the returns to user space are the exits we see.
# `until_next_ns` is the time from the return to user space to the thread's next KVM
# event: the VMM's handling plus the way back into the guest.

# %%
exit_table = exits(events)
user = user_exits(events)
print(f"{exit_table.height:,} paired exits, {user.height:,} returns to user space")
by_reason(user, "until_next_ns")

# %%
plots.reason_bars(
    by_reason(user, "until_next_ns"),
    time="total_ns",
    title=f"{trace.name}: returns to user space by reason",
)

# %% [markdown]
# How long is one round trip? A log2 histogram shows the bulk and the tail together; the
# percentiles below it are nearest observed values, so each is a time that happened.

# %%
plots.log2_histogram_bars(
    log2_histogram(user, "until_next_ns", by="reason_name"),
    color="reason_name",
    title=f"{trace.name}: user-space round trip, log2 buckets",
)

# %%
percentiles(user, "until_next_ns", by="reason_name")

# %% [markdown]
# ## The hottest registers
#
# Every port (`kvm_pio`) or MMIO address (`kvm_mmio`) the guest accessed, with where KVM
# handled it. Accesses handled in user space are exits to the VMM; a virtio notify write
# claimed by an ioeventfd stays in the kernel and only signals the back end.

# %%
targets = accesses_by_target(accesses(events))
targets.head(10)

# %%
plots.top_accesses(targets, title=f"{trace.name}: hottest device registers")

# %% [markdown]
# ## Over time
#
# Each mark is one event on its thread's lane. Bursts and gaps show the guest's request
# loop: on an emulated device, a run of register accesses per request; on a virtio ring,
# one kick per batch and the back end's work on its own thread.

# %%
plots.timeline(
    events.filter(pl.col("source").is_in(["kvm", "lab", "qemu"])),
    title=f"{trace.name}: events per thread",
    max_events=5_000 if QUICK else plots.TIMELINE_MAX_EVENTS,
)

# %% [markdown]
# ## Handing over to pandas
#
# Every table here is a polars DataFrame, and `.to_pandas()` (polars' own) hands it to
# pandas, seaborn or statsmodels. With `types_mapper=pandas_types` integers keep their
# width, sign and nulls (without it a column with a null becomes float64); categoricals stay
# categoricals either way. The events themselves come with
# `trace.to_pandas(columns=[...], events=[...])`. Below, a pandas `groupby` on the returns
# to user space gives the numbers of the polars table by reason above.

# %%
from vtrace.store import pandas_types

by_pandas = (
    user.to_pandas(types_mapper=pandas_types)
    .groupby("reason_name", observed=True)["until_next_ns"]
    .agg(count="size", timed="count", total_ns="sum", max_ns="max")
)
by_polars = (
    by_reason(user, "until_next_ns")
    .select("reason_name", *by_pandas.columns)
    .to_pandas(types_mapper=pandas_types)
    .set_index("reason_name")
)
assert by_pandas.to_dict() == by_polars.to_dict(), "pandas and polars disagree"
by_pandas
