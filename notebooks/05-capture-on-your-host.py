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
# # 5. Capture on your host
#
# The other notebooks read shipped traces. This one goes through the steps that make a
# trace of your own KVM host and turn it into a model you can ask what-if questions of:
#
# | step | command | what it does |
# | --- | --- | --- |
# | 1 | `vtrace doctor` | checks privileges, tracefs, bcc, kernel headers, the kvm tracepoints, VMX/SVM |
# | 2 | `sudo vtrace record -p PID -d 10 -o mytrace` | records the kvm tracepoints of one VM (its VMM's pid) with bcc |
# |   | `sudo vtrace lab run --device virtio --batch 8 --record mytrace` | or: makes real KVM events with vtrace's own tiny VMM on `/dev/kvm` |
# | 3 | `vtrace summary mytrace` | exits, user-space exits, accesses, kicks, requests, interrupts |
# | 4 | `vtrace calibrate mytrace --model lab-virtio -o mine.toml` | fits the costs the trace shows into a model config |
# | 5 | `vtrace replay mytrace --model mine.toml` | replays the trace's request arrivals through the model |
#
# With `LIVE = True` (and root, `/dev/kvm` and bcc, which `vtrace doctor` checks) the
# notebook runs the lab and records it live; otherwise it uses a shipped trace made the
# same way, so every cell below runs anywhere.

# %% tags=["parameters"]
TRACES = "../traces"
TRACE = "lab-virtio-b8"  # the shipped trace used when not capturing live
MODEL = "lab-virtio"  # the model the trace is compared with
LIVE = False  # True: run the lab on this host's /dev/kvm and record it (root, bcc)
LIVE_DIR = None  # where the live trace goes (None: a new temporary folder)
LAB_REQUESTS = 2_000
LAB_BATCH = 8
QUICK = False

# %%
import tempfile
from pathlib import Path

import polars as pl

from vtrace import plots
from vtrace.analyze import summary
from vtrace.collect.doctor import record_problem, run_checks
from vtrace.compare import model_costs, traces_costs

# %% [markdown]
# ## 1. Can this host record?
#
# Each check says what it found and, when it fails, the command that fixes it. `required`
# checks must pass before `vtrace record` can run; a host without VMX/SVM (software KVM)
# records no `kvm_exit`/`kvm_entry`, and the analyses fall back to user-space exits.

# %%
checks = run_checks()
pl.DataFrame([c.as_dict() for c in checks]).select("name", "status", "required", "verdict", "fix")

# %% [markdown]
# ## 2. Record
#
# Live, the lab VMM runs a tiny guest that keeps a virtio ring busy, kicking through an
# ioeventfd once per batch of `LAB_BATCH` requests, while the collector records this
# process's kvm events; the lab adds its own back end's events (`lab_pop`, `lab_complete`,
# `lab_kick`) to the same trace.

# %%
problem = record_problem(checks)
if LIVE and problem is None:
    from vtrace.lab import run_lab

    out = Path(LIVE_DIR or tempfile.mkdtemp(prefix="vtrace-live-")) / "lab-virtio"
    lab = run_lab("virtio", LAB_REQUESTS, LAB_BATCH, record=out)
    trace_path = Path(lab.trace)
    print(f"recorded {trace_path}")
else:
    trace_path = Path(TRACES) / TRACE
    why = "LIVE is off" if not LIVE else f"this host cannot record: {problem}"
    print(f"using the shipped trace {trace_path} ({why})")

# %% [markdown]
# ## 3. Summarise
#
# The same tables `vtrace summary` prints: events by name, returns to user space by
# reason with their times (ns), and the requests per queue.

# %%
s = summary(trace_path)
pl.DataFrame(s["events"])

# %%
pl.DataFrame(s["user_exits"]) if s["user_exits"] else s["missing"].get("user_exits")

# %%
pl.DataFrame(s["batching"]) if s["batching"] else s["missing"].get("requests")

# %% [markdown]
# ## 4 and 5. Model and replay
#
# The model named `MODEL` replays the trace's own request arrivals. Where the model and
# the measurement agree on kicks and exits per request, its what-if answers (notebooks 3
# and 4) are worth trusting for this device; where they do not, `vtrace calibrate`
# refits its costs from the trace.

# %%
side_by_side = pl.concat(
    [
        traces_costs([trace_path]),
        model_costs([MODEL], trace=trace_path),
    ]
).with_columns(pl.format("{}: {}", pl.col("origin"), pl.col("name")).alias("name"))
side_by_side

# %%
plots.comparison(
    side_by_side,
    metrics=[
        "userspace_exits_per_request",
        "kicks_per_request",
        "irqs_per_request",
        "requests_per_kick",
        "latency_mean_ns",
        "throughput_rps",
    ],
    title=f"Measured ({trace_path.name}) and modelled ({MODEL})",
)
