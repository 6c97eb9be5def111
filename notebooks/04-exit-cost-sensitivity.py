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
# # 4. How the gap moves with exit cost, back end and request size
#
# The gap between an emulated device and virtio is, at heart, *number of exits x cost of
# an exit*. Both factors vary:
#
# * **exit cost** differs by CPU generation and by mitigation: kvm-unit-tests measured a
#   user-space I/O exit at about 20,600 cycles in 2012 (about 6.9 µs at 3 GHz); newer CPUs
#   cut the bare exit to about 1,000-1,600 cycles; on the software-KVM machine these traces
#   came from a user-space round trip costs about 9.6 µs. Posted interrupts remove the exits
#   of interrupt delivery altogether.
# * **where the back end runs**: QEMU's virtio-net back end is a user-space thread, woken
#   through an eventfd; vhost-net runs it in a kernel thread, closer to the tap device.
# * **request size**: per-byte work (copies, DMA) grows with the request, per-request
#   exits do not, so big requests hide the exit cost.
#
# Each section sweeps one of them in the model, for an emulated and a virtio device.

# %% tags=["parameters"]
EMULATED = "ide-emulated"
VIRTIO = "virtio-blk"
NET_MODELS = ["e1000-emulated", "virtio-net", "vhost-net"]
USERSPACE_EXIT_NS = [1_000, 3_000, 6_858, 9_600, 20_000]
REQUEST_BYTES = [512, 4_096, 65_536]
REQUESTS = 5_000  # requests per point
WORKERS = None
QUICK = False

# %%
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import polars as pl

from vtrace import plots
from vtrace.compare import model_costs
from vtrace.sim.sweep import parse_grid, run_sweep

if QUICK:  # the demo's small version
    USERSPACE_EXIT_NS, REQUEST_BYTES = USERSPACE_EXIT_NS[::2], REQUEST_BYTES[::2]

# Fresh worker processes: forking a process whose polars thread pool runs can deadlock.
pool = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))
base = [f"workload.requests={REQUESTS}"]


def sweep_models(models: list[str], grid: list[str]) -> pl.DataFrame:
    """The same grid over several models, one frame with a `model` column."""
    return pl.concat(
        [run_sweep(m, parse_grid(m, grid, base), base, executor=pool) for m in models],
        how="diagonal_relaxed",
    )


# %% [markdown]
# ## Exit cost
#
# The user-space exit round trip from a fast modern CPU (1 µs) to this machine's software
# KVM (9.6 µs) and beyond. The emulated disk pays it tens of times per request; virtio-blk
# kicks through an ioeventfd, which never goes to user space.

# %%
by_exit = sweep_models(
    [EMULATED, VIRTIO], ["kvm.userspace_exit_ns=" + ",".join(map(str, USERSPACE_EXIT_NS))]
)
by_exit.select(
    "model",
    "kvm.userspace_exit_ns",
    "throughput_rps",
    "latency_ns.p99",
    "exits_per_request",
    "vcpu_exit_time_share",
)

# %%
plots.sensitivity(
    by_exit,
    x="kvm.userspace_exit_ns",
    y="throughput_rps",
    color="model",
    log_x=True,
    log_y=True,
    title="Throughput against the cost of one exit to user space",
)

# %%
plots.sensitivity(
    by_exit,
    x="kvm.userspace_exit_ns",
    y="vcpu_exit_time_share",
    color="model",
    log_x=True,
    title="Share of the vCPU's time spent in exits",
)

# %% [markdown]
# ## Back end in user space (QEMU) or in the kernel (vhost)
#
# The same virtio-net ring, once served by a QEMU thread and once by vhost-net, next to
# the emulated e1000. The ring and the kick are the same; what changes is the back end's
# wake-up and per-packet work, and the interrupt path.

# %%
net = model_costs(NET_MODELS, requests=REQUESTS)
net

# %%
plots.comparison(
    net,
    metrics=[
        "exits_per_request",
        "userspace_exits_per_request",
        "kicks_per_request",
        "irqs_per_request",
        "latency_p99_ns",
        "throughput_rps",
    ],
    title="e1000 vs virtio-net (QEMU back end) vs vhost-net (kernel back end)",
)

# %% [markdown]
# ## Request size
#
# With per-byte device work in the model, larger requests spend proportionally less of
# their time in exits: the emulated device's handicap shrinks as requests grow.

# %%
by_size = sweep_models(
    [EMULATED, VIRTIO], ["workload.request_bytes=" + ",".join(map(str, REQUEST_BYTES))]
)
plots.sensitivity(
    by_size,
    x="workload.request_bytes",
    y="throughput_rps",
    color="model",
    log_x=True,
    log_y=True,
    title="Throughput against request size",
)

# %%
plots.sensitivity(
    by_size,
    x="workload.request_bytes",
    y="vcpu_exit_time_share",
    color="model",
    log_x=True,
    title="Share of the vCPU's time in exits against request size",
)

# %% [markdown]
# ## An interactive what-if
#
# Move the sliders: each change re-runs the virtio-blk model (a short run) with that ring
# size, batch, number of queues (one vCPU and one job per queue), user-space exit cost and
# back-end wake-up, and redraws kicks per request, throughput and p99 latency. The dotted
# line is what a real guest measured: kicks per request of the shipped QEMU virtio-blk run
# at queue depth 16 (`traces/qemu-virtio-blk-qd16`). Run headless (the report, the tests),
# the cell draws the sliders' starting values once.

# %%
import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import display
from plotly.subplots import make_subplots

from vtrace import open_trace
from vtrace.notebook import traces_dir
from vtrace.sim import load_config, simulate

measured = open_trace(traces_dir() / "qemu-virtio-blk-qd16").meta["qemu_lab"]["kicks_per_request"]


def what_if(ring_size=256, batch=16, queues=1, userspace_exit_ns=6_858, wakeup_ns=5_000):
    """One short model run at these values, drawn as three panels."""
    cfg = load_config(
        VIRTIO,
        {
            "workload.requests": 3_000,
            "workload.warmup_requests": 300,
            "virtqueue.ring_size": ring_size,
            "virtqueue.batch": batch,
            "virtqueue.queues": queues,
            "vm.vcpus": queues,
            "workload.jobs": queues,
            "kvm.userspace_exit_ns": float(userspace_exit_ns),
            "backend.wakeup_ns": float(wakeup_ns),
        },
    )
    s = simulate(cfg).summary
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("kicks / request", "throughput (req/s)", "p99 (µs)")
    )
    fig.add_trace(go.Bar(x=["model"], y=[s["kicks_per_request"]], name="kicks"), 1, 1)
    fig.add_hline(y=measured, line_dash="dot", row=1, col=1, annotation_text="qd16 measured")
    fig.add_trace(go.Bar(x=["model"], y=[s["throughput_rps"]], name="throughput"), 1, 2)
    fig.add_trace(go.Bar(x=["model"], y=[s["latency_ns"]["p99"] / 1e3], name="p99"), 1, 3)
    fig.update_layout(
        title=f"{VIRTIO}: ring {ring_size}, batch {batch}, {queues} queue(s), "
        f"user exit {userspace_exit_ns / 1e3:.1f} µs, wake-up {wakeup_ns / 1e3:.1f} µs",
        showlegend=False,
        height=360,
    )
    return fig


# %% [markdown]
# The starting point, drawn once; the sliders below redraw it.

# %%
what_if()

# %%
controls = widgets.interact(
    lambda **values: display(what_if(**values)),
    ring_size=widgets.SelectionSlider(options=[16, 32, 64, 128, 256, 512], value=256),
    batch=widgets.IntSlider(value=16, min=1, max=64),
    queues=widgets.IntSlider(value=1, min=1, max=8),
    userspace_exit_ns=widgets.IntSlider(value=6_858, min=500, max=20_000, step=250),
    wakeup_ns=widgets.IntSlider(value=5_000, min=0, max=50_000, step=500),
)

# %%
pool.shutdown()
